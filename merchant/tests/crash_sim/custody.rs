//! The simulation's custody and chain: a small deterministic chain (`Chain`, the node: it
//! outlives the server's crashes) and a custody service (`SimCustody`) whose records are a file
//! in the data directory, written after every change, as the wallet's SQLite rows are. Custody
//! follows the wallet's protocol step for step (`wallet/README.md`): a withdrawal is recorded
//! `new` before its hold, `pending` after it, batched (the batch stored before it is broadcast),
//! completed in the ledger once its transaction confirms, or released (`releasing` first); a
//! deposit is credited once by its outpoint key; a credited deposit a reorg took away flags its
//! account and the credit stays. Every unknown ledger answer is resolved by asking the engine
//! (`WithdrawalStatus`), never by assuming. A crash point between any two of these steps stops
//! the process there (`Crash`).

use super::crash::Crash;
use api::core::Outcome;
use api::custody::{
    Custody, CustodyError, DepositInfo, DepositState, ReconcileInfo, WithdrawalInfo,
    WithdrawalState as WState,
};
use api::AppState;
use matching_engine::config::BTC;
use matching_engine::{
    AccountId, Amount, Command, Event, IdempotencyKey, RejectCode, Withdrawal, WithdrawalId,
    WithdrawalState,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The flat withdrawal fee the user pays, and the network fee share each withdrawal's batch
/// pays (the rest goes to the fee account).
pub const FLAT_FEE: u64 = 1_000;
pub const NETWORK_FEE: u64 = 400;
pub const MIN_WITHDRAWAL: u64 = 1_000;

/// A transaction: outputs (address, sats); `fee` only for our batches.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tx {
    pub txid: String,
    pub outs: Vec<(String, u64)>,
    pub fee: u64,
}

#[derive(Default, Debug, Clone, Serialize, Deserialize)]
struct ChainState {
    blocks: Vec<Vec<Tx>>,
    mempool: Vec<Tx>,
}

/// The node: blocks and a mempool. It survives the server's crashes; a node restart leaves it
/// away for a few steps; it can refuse a transaction.
#[derive(Debug, Default)]
pub struct Chain {
    s: Mutex<ChainState>,
    /// Custody steps the node stays unreachable.
    pub down: AtomicU32,
    /// Broadcasts to refuse.
    pub refuse: AtomicUsize,
}

/// Where a transaction is: confirmations (0: mempool), or `None`: not known to the node.
impl Chain {
    pub fn pay(&self, txid: String, address: &str, sat: u64) {
        self.s.lock().unwrap().mempool.push(Tx {
            txid,
            outs: vec![(address.to_owned(), sat)],
            fee: 0,
        });
    }
    pub fn mine(&self) {
        let mut s = self.s.lock().unwrap();
        let block = std::mem::take(&mut s.mempool);
        s.blocks.push(block);
    }
    /// The last block goes away (never the first: the exchange's initial deposits); our own
    /// transactions in it go back to the mempool, a payment from outside is gone (double-spent)
    /// when `double_spent` says so, else back to the mempool. Returns the payments gone.
    pub fn reorg(
        &self,
        ours: impl Fn(&Tx) -> bool,
        mut double_spent: impl FnMut() -> bool,
    ) -> Vec<Tx> {
        let mut s = self.s.lock().unwrap();
        if s.blocks.len() < 2 {
            return Vec::new();
        }
        let block = s.blocks.pop().unwrap();
        let mut gone = Vec::new();
        for tx in block {
            if ours(&tx) || !double_spent() {
                s.mempool.push(tx);
            } else {
                gone.push(tx);
            }
        }
        s.blocks.push(Vec::new());
        gone
    }
    /// The node restarts: away for a few custody steps (its mempool is kept, as bitcoind's
    /// `mempool.dat` keeps it).
    pub fn restart(&self, away_steps: u32) {
        self.down.store(away_steps, Ordering::SeqCst);
    }
    fn up(&self) -> bool {
        self.down.load(Ordering::SeqCst) == 0
    }
    fn send(&self, tx: &Tx) -> Result<(), &'static str> {
        if !self.up() {
            return Err("node away");
        }
        let mut s = self.s.lock().unwrap();
        if s.blocks.iter().flatten().any(|t| t.txid == tx.txid) {
            return Ok(()); // already in the chain
        }
        if take(&self.refuse) {
            return Err("refused");
        }
        if !s.mempool.iter().any(|t| t.txid == tx.txid) {
            s.mempool.push(tx.clone());
        }
        Ok(())
    }
    /// Every transaction with its confirmations (0: mempool).
    pub fn txs(&self) -> Vec<(Tx, u32)> {
        let s = self.s.lock().unwrap();
        let tip = s.blocks.len() as u32;
        let mut v: Vec<(Tx, u32)> = Vec::new();
        for (h, b) in s.blocks.iter().enumerate() {
            v.extend(b.iter().map(|t| (t.clone(), tip - h as u32)));
        }
        v.extend(s.mempool.iter().map(|t| (t.clone(), 0)));
        v
    }
}

/// Named points between two steps of custody's protocols where the process can crash: right
/// after the step each names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// A withdrawal recorded `new`, before its hold.
    Recorded,
    /// The hold applied, before the row says `pending`.
    Held,
    /// A release recorded (`releasing`), before the release.
    ReleaseMarked,
    /// The release applied, before the row says `released`.
    Released,
    /// A batch stored, before its broadcast.
    BatchStored,
    /// The batch broadcast, before anything else.
    Broadcast,
    /// A withdrawal completed in the ledger, before the row says so.
    Completed,
    /// A deposit credited in the ledger, before the row says so.
    Credited,
}

pub const POINTS: [Point; 8] = [
    Point::Recorded,
    Point::Held,
    Point::ReleaseMarked,
    Point::Released,
    Point::BatchStored,
    Point::Broadcast,
    Point::Completed,
    Point::Credited,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WStatus {
    New,
    Pending,
    Releasing,
    Batched(u64),
    Completed,
    Released,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Wd {
    pub id: u64,
    pub account: u32,
    pub address: String,
    pub amount: u64,
    pub key: String,
    pub status: WStatus,
    pub created_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Batch {
    pub id: u64,
    pub wids: Vec<u64>,
    pub tx: Tx,
    pub done: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Records {
    /// AUTOINCREMENT: the last id handed out (never handed out again).
    pub last_wid: u64,
    pub last_addr: u64,
    pub last_batch: u64,
    pub addrs: BTreeMap<String, u32>,
    /// Outpoints credited, with (account, sats).
    pub credited: BTreeMap<String, (u32, u64)>,
    /// Credited outpoints a reorg took away.
    pub reorged: BTreeSet<String>,
    /// Credits asked for whose answer is not known yet (written before the ledger is asked):
    /// (account, sats).
    pub crediting: BTreeMap<String, (u32, u64)>,
    pub wds: BTreeMap<u64, Wd>,
    pub flagged: BTreeMap<u32, String>,
    /// Credits with no known answer that the engine's `CreditStatus` said were applied, after
    /// their deposit left the chain: flagged next (the scenario seed 116 reaches).
    pub credited_unsure: BTreeSet<String>,
    /// How many of those were flagged (`seed_116_...` asserts it reaches this).
    pub flagged_unsure: u64,
    pub batches: BTreeMap<u64, Batch>,
    pub alarms: Vec<String>,
}

/// The credit key of an outpoint.
pub fn outpoint_key(outpoint: &str) -> IdempotencyKey {
    IdempotencyKey::reference(&format!("deposit/{outpoint}"))
}

pub struct SimCustody {
    path: PathBuf,
    r: Mutex<Records>,
    chain: Arc<Chain>,
    /// The API (which holds this custody: the cycle is broken by `detach` when the life ends).
    state: Mutex<Option<AppState>>,
    rt: tokio::runtime::Handle,
    crash: Arc<Crash>,
    /// The crash point armed for this life, if any.
    pub crash_at: Mutex<Option<Point>>,
    /// Answers of `request_withdrawal` to lose (recorded, then an internal error).
    pub lose: AtomicUsize,
    dead: AtomicBool,
}

impl std::fmt::Debug for SimCustody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimCustody").finish_non_exhaustive()
    }
}

type R<T> = Result<T, CustodyError>;

/// A journal segment's records: (first seq, file, records as (seq, offset, group)).
pub type SegmentRecords = (u64, PathBuf, Vec<(u64, u64, Option<u64>)>);

impl SimCustody {
    /// Opens custody's records (a missing file: a first start) and resolves every withdrawal
    /// whose ledger answer is not known, as the wallet does on open.
    pub fn open(
        dir: PathBuf,
        chain: Arc<Chain>,
        state: AppState,
        rt: tokio::runtime::Handle,
        crash: Arc<Crash>,
    ) -> Arc<Self> {
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("custody.json");
        let r = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).expect("custody records"),
            Err(_) => Records::default(),
        };
        Arc::new(Self {
            path,
            r: Mutex::new(r),
            chain,
            state: Mutex::new(Some(state)),
            rt,
            crash,
            crash_at: Mutex::new(None),
            lose: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
        })
    }

    /// The life ended: custody lets go of the API (which holds custody), so both are freed.
    pub fn detach(&self) {
        self.state.lock().unwrap().take();
    }

    pub fn records(&self) -> Records {
        self.r.lock().unwrap().clone()
    }

    /// The process died here: nothing after this point happens. A thread of the server blocks
    /// until the simulation buried this life; the simulation's own thread gets an error.
    fn died(&self, place: &str) -> CustodyError {
        self.dead.store(true, Ordering::SeqCst);
        self.crash.trip_because(place);
        self.crash.block_until_buried();
        CustodyError::internal("crashed")
    }

    fn point(&self, p: Point) -> R<()> {
        if *self.crash_at.lock().unwrap() == Some(p) {
            return Err(self.died(&format!("custody {p:?}")));
        }
        Ok(())
    }

    fn save(&self, r: &Records) -> R<()> {
        if self.dead.load(Ordering::SeqCst) || self.crash.tripped() {
            return Err(self.died("custody"));
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(r).unwrap()).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
        Ok(())
    }

    fn ledger(&self, cmd: Command) -> R<Outcome> {
        if self.dead.load(Ordering::SeqCst) || self.crash.tripped() {
            return Err(self.died("custody"));
        }
        let Some(state) = self.state.lock().unwrap().clone() else {
            return Err(self.died("custody"));
        };
        let crash = self.crash.clone();
        let o = self.rt.block_on(async move {
            tokio::select! {
                biased;
                () = crash.wait() => None,
                o = state.submit_outcome(cmd) => Some(o),
            }
        });
        o.ok_or_else(|| self.died("custody"))
    }

    /// The engine's record of a withdrawal: `Ok(None)` never held, `Err` no answer.
    fn record(&self, id: u64) -> R<Result<Option<Withdrawal>, ()>> {
        Ok(
            match self.ledger(Command::WithdrawalStatus {
                id: WithdrawalId(id),
            })? {
                Outcome::Applied(reply) => reply
                    .events
                    .iter()
                    .find_map(|e| match e {
                        Event::WithdrawalStatus { withdrawal, .. } => Some(*withdrawal),
                        _ => None,
                    })
                    .ok_or(()),
                _ => Err(()),
            },
        )
    }

    fn same(w: &Wd, rec: &Withdrawal) -> bool {
        rec.account.0 == w.account && rec.amount.0 == w.amount && rec.fee.0 == FLAT_FEE
    }

    fn hold(w: &Wd) -> Command {
        Command::WithdrawHold {
            account: AccountId(w.account),
            asset: BTC,
            amount: Amount(w.amount),
            fee: Amount(FLAT_FEE),
            id: WithdrawalId(w.id),
        }
    }

    /// Resolves `new` rows (was the hold applied?) and `releasing` rows (was the release?).
    pub fn resolve(&self) -> R<()> {
        let mut r = self.r.lock().unwrap();
        let ids: Vec<u64> = r.wds.keys().copied().collect();
        for id in ids {
            let w = r.wds[&id].clone();
            match w.status {
                WStatus::New => match self.record(id)? {
                    Ok(Some(rec)) if Self::same(&w, &rec) => {
                        let st = match rec.state {
                            WithdrawalState::Held => WStatus::Pending,
                            WithdrawalState::Released => WStatus::Released,
                            WithdrawalState::Completed => {
                                r.alarms
                                    .push(format!("withdrawal {id} completed while new"));
                                WStatus::Completed
                            }
                        };
                        r.wds.get_mut(&id).unwrap().status = st;
                        self.save(&r)?;
                    }
                    Ok(Some(rec)) => {
                        r.alarms.push(format!(
                            "withdrawal {id} conflicts with the ledger: {rec:?}"
                        ));
                        r.wds.get_mut(&id).unwrap().status = WStatus::Released;
                        self.save(&r)?;
                    }
                    // Never held: ask for the hold again (idempotent by id).
                    Ok(None) => match self.ledger(Self::hold(&w))? {
                        Outcome::Applied(_) => {
                            self.point(Point::Held)?;
                            r.wds.get_mut(&id).unwrap().status = WStatus::Pending;
                            self.save(&r)?;
                        }
                        Outcome::Rejected(RejectCode::InsufficientBalance) => {
                            // Certainly not held: the row goes, as the wallet deletes it (its
                            // key free again): never a release a caller could take for one.
                            r.wds.remove(&id);
                            self.save(&r)?;
                        }
                        _ => {}
                    },
                    Err(()) => {}
                },
                WStatus::Releasing => self.release_row(&mut r, id)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn release_row(&self, r: &mut Records, id: u64) -> R<()> {
        let w = r.wds[&id].clone();
        let done = match self.ledger(Command::WithdrawRelease {
            id: WithdrawalId(id),
        })? {
            Outcome::Applied(_) => true,
            Outcome::Rejected(RejectCode::UnknownWithdrawal) | Outcome::Unknown => {
                match self.record(id)? {
                    Ok(Some(rec)) if Self::same(&w, &rec) => match rec.state {
                        WithdrawalState::Released => true,
                        WithdrawalState::Held => false,
                        WithdrawalState::Completed => {
                            r.alarms
                                .push(format!("withdrawal {id} released but completed"));
                            true
                        }
                    },
                    Ok(other) => {
                        r.alarms.push(format!(
                            "withdrawal {id} released but the ledger has {other:?}"
                        ));
                        true
                    }
                    Err(()) => false,
                }
            }
            _ => false,
        };
        if done {
            self.point(Point::Released)?;
            r.wds.get_mut(&id).unwrap().status = WStatus::Released;
            self.save(r)?;
        }
        Ok(())
    }

    /// The operator clears every flagged account (`mediator account clear-flag`).
    pub fn clear_all_flags(&self) {
        let mut r = self.r.lock().unwrap();
        if !r.flagged.is_empty() {
            r.flagged.clear();
            self.save(&r).unwrap();
        }
    }

    /// The operator's refusal of a withdrawal not yet batched.
    pub fn release(&self, id: u64) -> R<bool> {
        let mut r = self.r.lock().unwrap();
        match r.wds.get(&id).map(|w| w.status) {
            Some(WStatus::Pending) => {}
            _ => return Ok(false),
        }
        r.wds.get_mut(&id).unwrap().status = WStatus::Releasing;
        self.save(&r)?;
        self.point(Point::ReleaseMarked)?;
        self.release_row(&mut r, id)?;
        Ok(true)
    }

    /// One pass, in the wallet's order: resolve, rebroadcast, deposits, completions, a batch.
    pub fn step(&self) -> R<()> {
        if self.chain.down.load(Ordering::SeqCst) > 0 {
            self.chain.down.fetch_sub(1, Ordering::SeqCst);
        }
        self.resolve()?;
        self.broadcast()?;
        self.deposits_step()?;
        self.completions()?;
        self.batch()
    }

    fn broadcast(&self) -> R<()> {
        let r = self.r.lock().unwrap();
        let txs = self.chain.txs();
        for b in r.batches.values().filter(|b| !b.done) {
            if txs.iter().any(|(t, c)| t.txid == b.tx.txid && *c > 0) {
                continue;
            }
            if self.chain.send(&b.tx).is_ok() {
                self.point(Point::Broadcast)?;
            }
        }
        Ok(())
    }

    fn deposits_step(&self) -> R<()> {
        let mut r = self.r.lock().unwrap();
        let txs = self.chain.txs();
        let mut seen = BTreeSet::new();
        for (tx, conf) in &txs {
            for (vout, (addr, sat)) in tx.outs.iter().enumerate() {
                let Some(&account) = r.addrs.get(addr) else {
                    continue;
                };
                let op = format!("{}:{vout}", tx.txid);
                if *conf == 0 {
                    continue;
                }
                seen.insert(op.clone());
                if r.reorged.remove(&op) {
                    self.save(&r)?; // back in the chain: credited again, without a second credit
                }
                if r.credited.contains_key(&op) {
                    continue;
                }
                // The intent first: if the answer is lost or the process dies, the deposit is
                // known to be maybe credited even if it then leaves the chain.
                if !r.crediting.contains_key(&op) {
                    r.crediting.insert(op.clone(), (account, *sat));
                    self.save(&r)?;
                }
                // Unknown or refused: asked again next step (idempotent by outpoint).
                if let Outcome::Applied(_) = self.ledger(Command::Credit {
                    account: AccountId(account),
                    asset: BTC,
                    amount: Amount(*sat),
                    key: outpoint_key(&op),
                })? {
                    self.point(Point::Credited)?;
                    r.crediting.remove(&op);
                    r.credited.insert(op, (account, *sat));
                    self.save(&r)?;
                }
            }
        }
        // A credit with no known answer whose deposit is no longer confirmed: the engine says
        // whether it was applied (then it is a credited deposit that left the chain).
        let unsure: Vec<(String, (u32, u64))> = r
            .crediting
            .iter()
            .filter(|(op, _)| !seen.contains(*op))
            .map(|(op, v)| (op.clone(), *v))
            .collect();
        for (op, (account, sat)) in unsure {
            // No answer: asked again next step.
            if let Outcome::Applied(reply) = self.ledger(Command::CreditStatus {
                key: outpoint_key(&op),
            })? {
                let yes = reply
                    .events
                    .iter()
                    .any(|e| matches!(e, Event::CreditStatus { credited: true, .. }));
                r.crediting.remove(&op);
                if yes {
                    r.credited_unsure.insert(op.clone());
                    r.credited.insert(op, (account, sat));
                }
                self.save(&r)?;
            }
        }
        // A credited deposit no longer in the chain: flagged, the credit stays.
        let gone: Vec<(String, u32)> = r
            .credited
            .iter()
            .filter(|(op, _)| !seen.contains(*op) && !r.reorged.contains(*op))
            .map(|(op, (a, _))| (op.clone(), *a))
            .collect();
        for (op, account) in gone {
            r.reorged.insert(op.clone());
            if r.credited_unsure.remove(&op) {
                r.flagged_unsure += 1;
            }
            r.flagged.insert(account, format!("deposit {op} reorged"));
            self.save(&r)?;
        }
        Ok(())
    }

    fn completions(&self) -> R<()> {
        let mut r = self.r.lock().unwrap();
        let txs = self.chain.txs();
        let open: Vec<u64> = r
            .batches
            .values()
            .filter(|b| !b.done)
            .filter(|b| txs.iter().any(|(t, c)| t.txid == b.tx.txid && *c > 0))
            .map(|b| b.id)
            .collect();
        for bid in open {
            let mut unresolved = false;
            for wid in r.batches[&bid].wids.clone() {
                let w = r.wds[&wid].clone();
                if w.status == WStatus::Completed {
                    continue;
                }
                let done = match self.ledger(Command::WithdrawComplete {
                    id: WithdrawalId(wid),
                    network_fee: Amount(NETWORK_FEE),
                })? {
                    Outcome::Applied(_) => true,
                    Outcome::Rejected(RejectCode::UnknownWithdrawal) | Outcome::Unknown => {
                        match self.record(wid)? {
                            Ok(Some(rec))
                                if Self::same(&w, &rec)
                                    && rec.state == WithdrawalState::Completed =>
                            {
                                true
                            }
                            Ok(Some(rec))
                                if Self::same(&w, &rec) && rec.state == WithdrawalState::Held =>
                            {
                                false
                            }
                            Ok(other) => {
                                r.alarms.push(format!(
                                    "withdrawal {wid} paid on chain, the ledger has {other:?}"
                                ));
                                true
                            }
                            Err(()) => false,
                        }
                    }
                    _ => false,
                };
                if done {
                    self.point(Point::Completed)?;
                    r.wds.get_mut(&wid).unwrap().status = WStatus::Completed;
                    self.save(&r)?;
                } else {
                    unresolved = true;
                }
            }
            if !unresolved {
                r.batches.get_mut(&bid).unwrap().done = true;
                self.save(&r)?;
            }
        }
        Ok(())
    }

    /// Coins the wallet can spend: confirmed deposits to our addresses still in the chain, less
    /// what our broadcast batches spend.
    pub fn spendable(&self, r: &Records) -> i64 {
        let txs = self.chain.txs();
        let mut v = 0i64;
        for (tx, conf) in &txs {
            let ours = r.batches.values().any(|b| b.tx.txid == tx.txid);
            if ours {
                v -= tx.outs.iter().map(|o| o.1 as i64).sum::<i64>() + tx.fee as i64;
            } else if *conf > 0 {
                v += tx
                    .outs
                    .iter()
                    .filter(|o| r.addrs.contains_key(&o.0))
                    .map(|o| o.1 as i64)
                    .sum::<i64>();
            }
        }
        v
    }

    fn batch(&self) -> R<()> {
        let mut r = self.r.lock().unwrap();
        let ready: Vec<u64> = r
            .wds
            .values()
            .filter(|w| w.status == WStatus::Pending && !r.flagged.contains_key(&w.account))
            .map(|w| w.id)
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        let need: i64 = ready
            .iter()
            .map(|id| (r.wds[id].amount + NETWORK_FEE) as i64)
            .sum();
        if self.spendable(&r) < need {
            return Ok(()); // waits for coins
        }
        r.last_batch += 1;
        let id = r.last_batch;
        let tx = Tx {
            txid: format!("batch-{id}"),
            outs: ready
                .iter()
                .map(|w| (r.wds[w].address.clone(), r.wds[w].amount))
                .collect(),
            fee: NETWORK_FEE * ready.len() as u64,
        };
        for w in &ready {
            r.wds.get_mut(w).unwrap().status = WStatus::Batched(id);
        }
        r.batches.insert(
            id,
            Batch {
                id,
                wids: ready,
                tx: tx.clone(),
                done: false,
            },
        );
        self.save(&r)?;
        self.point(Point::BatchStored)?;
        if self.chain.send(&tx).is_ok() {
            self.point(Point::Broadcast)?;
        }
        Ok(())
    }

    fn info(&self, r: &Records, w: &Wd) -> WithdrawalInfo {
        let txid = match w.status {
            WStatus::Batched(b) => Some(r.batches[&b].tx.txid.clone()),
            _ => None,
        };
        WithdrawalInfo {
            id: w.id,
            account: w.account,
            address: w.address.clone(),
            amount_sat: w.amount,
            fee_sat: FLAT_FEE,
            idempotency_key: w.key.clone(),
            state: match w.status {
                // As the wallet's custody answers: a `new` row's hold is not known yet.
                WStatus::New => WState::Unresolved,
                WStatus::Pending | WStatus::Releasing => WState::Pending,
                WStatus::Batched(_) => WState::Processing,
                WStatus::Completed => WState::Completed,
                WStatus::Released => WState::Released,
            },
            reason: None,
            created_ms: w.created_ms,
            txid,
            confirmations: 0,
        }
    }
}

impl Custody for SimCustody {
    fn deposit_address(&self, account: u32, _new: bool) -> R<api::custody::DepositAddress> {
        let mut r = self.r.lock().unwrap();
        r.last_addr += 1;
        let a = format!("bcrt1qsim{account}x{}", r.last_addr);
        r.addrs.insert(a.clone(), account);
        self.save(&r)?;
        Ok(api::custody::DepositAddress {
            address: a,
            made: true,
        })
    }

    fn deposits(&self, account: Option<u32>) -> R<Vec<DepositInfo>> {
        let r = self.r.lock().unwrap();
        let mut v = Vec::new();
        for (tx, conf) in self.chain.txs() {
            for (vout, (addr, sat)) in tx.outs.iter().enumerate() {
                let Some(&a) = r.addrs.get(addr) else {
                    continue;
                };
                if account.is_some_and(|x| x != a) {
                    continue;
                }
                let op = format!("{}:{vout}", tx.txid);
                v.push(DepositInfo {
                    account: a,
                    txid: tx.txid.clone(),
                    vout: vout as u32,
                    amount_sat: *sat,
                    address: addr.clone(),
                    state: if r.credited.contains_key(&op) && conf > 0 {
                        DepositState::Credited
                    } else {
                        DepositState::Pending
                    },
                    confirmations: conf,
                    required_confirmations: 1,
                    seen_ms: 0,
                });
            }
        }
        for op in &r.reorged {
            let (a, sat) = r.credited[op];
            let (txid, vout) = op.split_once(':').unwrap();
            v.push(DepositInfo {
                account: a,
                txid: txid.to_owned(),
                vout: vout.parse().unwrap(),
                amount_sat: sat,
                address: String::new(),
                state: DepositState::Reorged,
                confirmations: 0,
                required_confirmations: 1,
                seen_ms: 0,
            });
        }
        Ok(v)
    }

    fn request_withdrawal(
        &self,
        account: u32,
        address: &str,
        amount: u64,
        key: &str,
    ) -> R<WithdrawalInfo> {
        let mut r = self.r.lock().unwrap();
        if r.flagged.contains_key(&account) {
            return Err(CustodyError::bad_request(-4032, "account flagged"));
        }
        if r.wds.values().any(|w| w.account == account && w.key == key) {
            return Err(CustodyError::bad_request(-4029, "duplicate key"));
        }
        if amount < MIN_WITHDRAWAL {
            return Err(CustodyError::bad_request(-4022, "below minimum"));
        }
        r.last_wid += 1;
        let w = Wd {
            id: r.last_wid,
            account,
            address: address.to_owned(),
            amount,
            key: key.to_owned(),
            status: WStatus::New,
            created_ms: api::core::now_ms(),
        };
        r.wds.insert(w.id, w.clone());
        self.save(&r)?;
        self.point(Point::Recorded)?;
        match self.ledger(Self::hold(&w))? {
            Outcome::Applied(_) => {
                self.point(Point::Held)?;
                r.wds.get_mut(&w.id).unwrap().status = WStatus::Pending;
                self.save(&r)?;
                if take(&self.lose) {
                    return Err(CustodyError::internal("the answer was lost"));
                }
                Ok(self.info(&r, &r.wds[&w.id]))
            }
            Outcome::Rejected(RejectCode::InsufficientBalance) => {
                // Certainly not held: the row goes (its id is never handed out again).
                r.wds.remove(&w.id);
                self.save(&r)?;
                Err(CustodyError::bad_request(-4026, "insufficient balance"))
            }
            Outcome::Rejected(code) => {
                r.wds.remove(&w.id);
                self.save(&r)?;
                Err(CustodyError::bad_request(
                    -4026,
                    format!("ledger refused: {code}"),
                ))
            }
            Outcome::Busy | Outcome::Halted => {
                r.wds.remove(&w.id);
                self.save(&r)?;
                Err(CustodyError::internal("ledger busy"))
            }
            _ => Err(CustodyError::unknown("ledger outcome unknown")),
        }
    }

    fn withdrawals(&self, account: Option<u32>) -> R<Vec<WithdrawalInfo>> {
        let r = self.r.lock().unwrap();
        Ok(r.wds
            .values()
            .filter(|w| account.is_none_or(|a| a == w.account))
            .map(|w| self.info(&r, w))
            .collect())
    }

    fn withdrawal_by_key(&self, account: u32, key: &str) -> R<Option<WithdrawalInfo>> {
        let r = self.r.lock().unwrap();
        Ok(r.wds
            .values()
            .find(|w| w.account == account && w.key == key)
            .map(|w| self.info(&r, w)))
    }

    fn approve_withdrawal(&self, _: u64) -> R<WithdrawalInfo> {
        Err(CustodyError::not_supported())
    }

    fn withdrawal_terms(&self) -> (u64, u64) {
        (FLAT_FEE, MIN_WITHDRAWAL)
    }

    fn reconcile(&self) -> R<ReconcileInfo> {
        Err(CustodyError::not_supported())
    }

    fn regtest_mine(&self, _: u32) -> R<u32> {
        Err(CustodyError::not_supported())
    }

    fn regtest_fund(&self, _: u32) -> R<u64> {
        Err(CustodyError::not_supported())
    }
}

fn take(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}
