//! A seeded simulation whose world is on disk: the engine with its real journal and snapshots,
//! the API's SQLite stores and the merchant store (all opened by `api::start_node_with`, the
//! start-up `mediator serve` runs), custody's records and a small chain (`crash_sim/custody.rs`).
//! Trading, transfers, withdrawals, merchant invoices, balance and chain payments, refunds and
//! conversions run with faults chosen by the seed:
//!
//! * lost replies (the command applied, the caller told nothing: *unknown*);
//! * crashes: just before or just after any engine command (in a handler, the merchant monitor,
//!   custody), and at every step of custody's withdrawal (record, hold, batch record, broadcast,
//!   completion, release) and deposit protocols. A crash drops every object of that life (the
//!   runtime with its tasks, AppState, sequencer, custody) and a restart rebuilds them from disk;
//! * torn and corrupted journal tails written at crash time (the last record's bytes cut short,
//!   a byte flipped in an unacknowledged record), and a byte flipped in the middle of the
//!   journal: start-up must refuse, naming the damage and changing nothing; `journal repair`
//!   (`repair_truncate`, as the CLI runs it) and a restart are the way forward;
//! * the history (SQLite) stops committing while trading goes on; the next crash restarts on a
//!   copy of the disk as the crash left it, so start-up must regenerate the history;
//! * node refusals and restarts (away a few steps), reorgs of credited deposits (custody flags
//!   the account; the credit stays, as custody does today).
//!
//! Custody here is a model that follows the wallet's protocol step for step (`wallet/README.md`),
//! not `wallet::CustodyService`, which needs a node's RPC; the wallet's own recovery is tested on
//! regtest (`wallet/tests`).
//!
//! An auditor checks after every step that no money was created or destroyed (per asset, the
//! balances incl. held add up to what was minted less what left: credits of chain deposits,
//! withdrawals completed) and that the circuit breaker is closed; after every restart that every
//! acknowledged command is still there (orders by client order id, transfers by key, refunds by
//! idempotency key, balance payments, withdrawals, credits, completions); and at the end (faults
//! off, retries, custody steps and monitor ticks run) that nothing stays held, pending or
//! unknown and the chain and the ledger agree to the satoshi.
//!
//! A failure prints the seed and the replay command:
//! `MEDIATOR_SIM_SEED=<seed> cargo test -p merchant --test crash_sim`; `MEDIATOR_SIM_SEEDS=<n>` runs
//! seeds 1..=n (default 6). Runs are deterministic (the same seed takes the same steps and faults).

mod common;

use merchant::MerchantState as _;
#[path = "crash_sim/crash.rs"]
mod crash;
#[path = "crash_sim/custody.rs"]
mod custody;

use api::core::Outcome;
use api::{ApiConfig, NodeConfig};
use common::{Harness, Resp, Rng};
use crash::{Crash, FaultCore};
use custody::{Chain, SimCustody, WStatus, NETWORK_FEE, POINTS};
use matching_engine::config::USD;
use matching_engine::journal::{check_journal, list_segments, repair_truncate, SegmentReader};
use matching_engine::recovery::{RecoveryError, StoreConfig};
use matching_engine::{
    AccountId, Amount, Command, Event, IdempotencyKey, RejectCode, WithdrawalId, WithdrawalState,
};
use merchant::model::Source;
use merchant::store;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

const STEPS: usize = 100;
const PAYER_USD: u64 = 10_000;
const TRADER_USD: u64 = 1_000_000;
const SAT: u64 = 100_000_000;

type Key = (String, String);

/// One life of the server: everything in memory, rebuilt from disk by `start`.
struct Life {
    rt: tokio::runtime::Runtime,
    node: api::Node,
    h: Harness,
    core: Arc<FaultCore>,
    custody: Arc<SimCustody>,
    crash: Arc<Crash>,
    /// A connection holding SQLite's write lock on the history (`api.sqlite`): the history
    /// stops committing while trading goes on, so a crash leaves it behind the journal.
    stall: Option<rusqlite::Connection>,
}

/// A request whose outcome is not known yet: repeated (same idempotency key) until it is.
#[derive(Clone, Debug)]
struct Pending {
    path: &'static str,
    params: String,
    key: Key,
    what: Ack,
}

/// What an acknowledged request promised.
#[derive(Clone, Debug)]
enum Ack {
    Order {
        trader: usize,
        coid: String,
    },
    /// USD from payer to payer, with the transfer's key.
    Transfer {
        from: usize,
        to: usize,
        usd: u64,
        tran: String,
    },
    /// `held`: answered with its id (the hold applied); else custody only has it (a repeat
    /// answered "duplicate key").
    Withdrawal {
        payer: usize,
        key: String,
        held: bool,
    },
    Refund {
        invoice: String,
        key: String,
    },
    Pay {
        invoice: String,
        payer: usize,
    },
}

struct World {
    dir: tempfile::TempDir,
    rng: Rng,
    chain: Arc<Chain>,
    life: Option<Life>,
    admin: Key,
    merchant: (u32, Key),
    payers: Vec<(u32, Key)>,
    traders: Vec<(u32, Key)>,
    invoices: Vec<(String, String)>,
    /// Every payment to a custody address: (outpoint, account, sats).
    deposits: Vec<(String, u32, u64)>,
    /// Invoices something was paid to (refund candidates).
    paid: Vec<String>,
    acked: Vec<Ack>,
    pending: Vec<Pending>,
    /// A repair cut journal records the history had not committed: their order rows are gone
    /// (reported as a history gap); order lookups may miss them from then on.
    history_cut: bool,
    next_id: u64,
    next_tx: u64,
    log: Arc<Mutex<Vec<String>>>,
    stats: BTreeMap<String, u64>,
}

fn api_config() -> ApiConfig {
    ApiConfig {
        orders_per_10s: 1_000_000,
        ip_weight_per_min: 1_000_000,
        key_weight_per_min: 1_000_000,
        ..ApiConfig::default()
    }
}

fn node_config() -> NodeConfig {
    NodeConfig {
        api: api_config(),
        // Snapshots (and journal segments) every few dozen commands, so crashes land around them.
        store: StoreConfig {
            snapshot_every: 30,
            snapshots_kept: 2,
            ..StoreConfig::default()
        },
        ..NodeConfig::default()
    }
}

/// Starts a life from the data directory, as `mediator serve` does (custody resolves on open).
fn start(w: &World) -> Result<Life, api::node::NodeError> {
    let crash = Crash::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut fc = None;
    let node = api::start_node_with(w.dir.path(), node_config(), |inner| {
        let c = FaultCore::new(inner, crash.clone());
        fc = Some(c.clone());
        c
    })?;
    let custody = SimCustody::open(
        w.dir.path().join("custody"),
        w.chain.clone(),
        node.state.clone(),
        rt.handle().clone(),
        crash.clone(),
    );
    node.state.set_custody(custody.clone()).ok().unwrap();
    custody.resolve().expect("custody resolves on open");
    merchant::attach(&node.state, common::test_merchant_config()).unwrap();
    let h = Harness(common::base::Harness {
        state: node.state.clone(),
        router: merchant::app(node.state.clone()),
        dir: tempfile::tempdir().unwrap(),
        admin: w.admin.clone(),
    });
    Ok(Life {
        rt,
        node,
        h,
        core: fc.unwrap(),
        custody,
        crash,
        stall: None,
    })
}

impl World {
    fn life(&self) -> &Life {
        self.life.as_ref().expect("a life")
    }
    fn say(&self, line: String) {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
    /// Runs `f` on this life's runtime; `None` when the process crashed meanwhile.
    fn run<F: std::future::Future>(&self, f: F) -> Option<F::Output> {
        let l = self.life();
        let crash = l.crash.clone();
        l.rt.block_on(async move {
            tokio::select! {
                biased;
                r = f => Some(r),
                () = crash.wait() => None,
            }
        })
    }
    fn signed(&self, method: &str, path: &str, params: &str, key: &Key) -> Option<Resp> {
        let h = &self.life().h;
        self.run(h.signed(method, path, params, key))
    }
    fn submit(&self, cmd: Command) -> Outcome {
        let st = self.life().h.state.clone();
        self.run(async move { st.submit_outcome(cmd).await })
            .expect("no crash armed")
    }
    fn count(&mut self, what: String) {
        *self.stats.entry(what).or_default() += 1;
    }
}

fn btc(sat: u64) -> String {
    api::decimal::format_units(sat, 8)
}

// ---------------------------------------------------------------------------------------------
// Setup (no faults).

fn setup(seed: u64, log: Arc<Mutex<Vec<String>>>) -> World {
    let mut w = World {
        dir: tempfile::tempdir().unwrap(),
        rng: Rng(seed),
        chain: Arc::new(Chain::default()),
        life: None,
        admin: (String::new(), String::new()),
        merchant: (0, (String::new(), String::new())),
        payers: Vec::new(),
        traders: Vec::new(),
        invoices: Vec::new(),
        deposits: Vec::new(),
        paid: Vec::new(),
        acked: Vec::new(),
        pending: Vec::new(),
        history_cut: false,
        next_id: 0,
        next_tx: 0,
        log,
        stats: BTreeMap::new(),
    };
    let life = start(&w).unwrap();
    w.admin = life
        .h
        .state
        .create_key(
            0,
            api::keys::Perms(api::keys::Perms::ADMIN.0 | api::keys::Perms::READ.0),
            "admin",
        )
        .unwrap();
    w.life = Some(life);
    let account = |w: &mut World, perms: &str, usd: u64| -> (u32, Key) {
        let h = &w.life().h;
        let admin = w.admin.clone();
        let (acct, key) = w.life().rt.block_on(async {
            let acct = h.ok("POST", "/mapi/v1/admin/account", "", &admin).await["account"]
                .as_u64()
                .unwrap() as u32;
            let k = h
                .ok(
                    "POST",
                    "/mapi/v1/admin/apiKey",
                    &format!("account={acct}&permissions={perms}&label=sim"),
                    &admin,
                )
                .await;
            if usd > 0 {
                h.ok(
                    "POST",
                    "/mapi/v1/admin/credit",
                    &format!("account={acct}&asset=USD&amount={usd}&reference=setup-{acct}"),
                    &admin,
                )
                .await;
            }
            (
                acct,
                (
                    k["apiKey"].as_str().unwrap().to_owned(),
                    k["secretKey"].as_str().unwrap().to_owned(),
                ),
            )
        });
        (acct, key)
    };
    w.merchant = account(&mut w, "read,merchant,withdraw", 0);
    for _ in 0..3 {
        let p = account(&mut w, "read,trade,transfer,withdraw", PAYER_USD);
        w.payers.push(p);
    }
    for _ in 0..2 {
        let t = account(&mut w, "read,trade", TRADER_USD);
        w.traders.push(t);
    }
    // BTC comes from the chain only: a deposit to each payer and trader, credited by custody.
    let funded: Vec<(u32, u64)> = w
        .payers
        .iter()
        .map(|p| (p.0, SAT))
        .chain(w.traders.iter().map(|t| (t.0, 10 * SAT)))
        .collect();
    for (acct, sat) in funded {
        let addr = w.life().custody.deposit_address_for(acct);
        let tx = w.tx();
        w.deposits.push((format!("{tx}:0"), acct, sat));
        w.chain.pay(tx, &addr, sat);
    }
    w.chain.mine();
    w.life().custody.step().unwrap();
    if w.rng.chance(50) {
        let m = w.merchant.1.clone();
        w.signed("POST", "/mapi/v1/merchant/store", "settlement=convert", &m)
            .unwrap();
    }
    audit_step(&w);
    w
}

impl World {
    fn tx(&mut self) -> String {
        self.next_tx += 1;
        format!("{:064x}", self.next_tx)
    }
}

impl SimCustody {
    fn deposit_address_for(&self, account: u32) -> String {
        api::custody::Custody::deposit_address(self, account, true)
            .unwrap()
            .address
    }
}

// ---------------------------------------------------------------------------------------------
// Faults and crashes.

/// Arms the faults of one step: a lost reply, a crash before or after an engine command, a
/// crash at a custody step, a lost custody answer, a node refusal.
fn arm(w: &mut World) {
    let l = w.life.as_ref().unwrap();
    let mut rng = Rng(w.rng.next());
    l.core
        .lose
        .store(usize::from(rng.chance(12)), Ordering::SeqCst);
    // A crash stays armed until it fires (the life ends with it).
    let armed =
        l.core.crash_in.load(Ordering::SeqCst) > 0 || l.custody.crash_at.lock().unwrap().is_some();
    match if armed { 100 } else { rng.below(100) } {
        // A crash just before or just after one of the next engine commands.
        0..=9 => {
            l.core
                .crash_in
                .store(1 + rng.below(3) as usize, Ordering::SeqCst);
            l.core.crash_after.store(rng.chance(50), Ordering::SeqCst);
        }
        // A crash between two steps of custody's protocols.
        10..=24 => {
            let p = POINTS[rng.below(POINTS.len() as u64) as usize];
            *l.custody.crash_at.lock().unwrap() = Some(p);
        }
        _ => {}
    }
    l.custody
        .lose
        .store(usize::from(rng.chance(8)), Ordering::SeqCst);
    let stall = l.stall.is_none() && rng.chance(4);
    if stall {
        let lock = rusqlite::Connection::open(w.dir.path().join("api/api.sqlite")).unwrap();
        lock.execute_batch("BEGIN IMMEDIATE").unwrap();
        w.life.as_mut().unwrap().stall = Some(lock);
        w.say("the history stops committing".into());
        w.count("history stalled".into());
    }
    if rng.chance(5) {
        w.chain.refuse.store(1, Ordering::SeqCst);
    }
}

/// Lost answers and refusals are per step; an armed crash stays until it fires, or `all`.
fn disarm(w: &World, all: bool) {
    if let Some(l) = &w.life {
        l.core.lose.store(0, Ordering::SeqCst);
        l.custody.lose.store(0, Ordering::SeqCst);
        if all {
            l.core.quiet();
            *l.custody.crash_at.lock().unwrap() = None;
        }
    }
    w.chain.refuse.store(0, Ordering::SeqCst);
}

/// Tears the current life down as a crash does: its runtime stops with every task where it was,
/// its threads find nobody listening, the engine and the read models stop.
///
/// With the history stalled, the disk as the crash left it (the history as committed, behind
/// the journal) is copied first and the next life starts on that copy: stopping this one lets
/// the history commit, which a crash would not have.
fn crash(w: &mut World) {
    let Some(life) = w.life.take() else { return };
    let Life {
        rt,
        node,
        h,
        core,
        custody,
        crash,
        stall,
    } = life;
    crash.trip();
    rt.shutdown_background();
    crash.bury();
    let mut old_dir = None;
    if let Some(lock) = stall {
        let image = tempfile::tempdir().unwrap();
        crash_image(w.dir.path(), image.path());
        lock.execute_batch("ROLLBACK").unwrap();
        old_dir = Some(std::mem::replace(&mut w.dir, image));
    }
    custody.detach();
    drop((h, core, custody));
    node.shutdown().expect("engine stops");
    drop(old_dir);
}

/// Copies a data directory stopped in time (SQLite rebuilds its shared-memory index from the
/// WAL).
fn crash_image(from: &Path, to: &Path) {
    for sub in ["journal", "api", "custody"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for e in std::fs::read_dir(from.join(sub)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            if e.file_type().unwrap().is_file() && !name.ends_with("-shm") {
                std::fs::copy(e.path(), to.join(sub).join(&name)).unwrap();
            }
        }
    }
}

/// Every path under `dir` (for a failure's message).
fn tree(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        v.push(p.display().to_string());
        if p.is_dir() {
            v.extend(tree(&p));
        }
    }
    v
}

/// Every file of the journal directory with its bytes (to check that a refusal changed
/// nothing).
fn journal_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            m.insert(
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            );
        }
    }
    m
}

/// Records of one segment: (seq, offset, group).
fn records(path: &Path, first: u64) -> Vec<(u64, u64, Option<u64>)> {
    let mut r = SegmentReader::open(path, first).unwrap();
    let mut v = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        v.push((rec.seq, rec.offset, rec.group));
    }
    v
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Damage {
    None,
    /// An unacknowledged record cut short (a torn write of the last group).
    TornTail,
    /// An unacknowledged record with a byte flipped.
    FlippedTail,
    /// A byte flipped in an acknowledged record that a snapshot holds, with acknowledged
    /// records after it.
    FlippedMiddle,
}

/// Writes `damage` into the journal of the stopped server. Returns what it did (a middle flip
/// needs a record that a snapshot holds; without one, nothing is written).
fn damage_journal(w: &mut World, damage: Damage) -> Damage {
    let dir = w.dir.path().join("journal");
    let segments = list_segments(&dir).unwrap();
    let with_records: Vec<custody::SegmentRecords> = segments
        .iter()
        .map(|(f, p)| (*f, p.clone(), records(p, *f)))
        .filter(|s| !s.2.is_empty())
        .collect();
    let Some((_, last_path, last_recs)) = with_records.last().cloned() else {
        return Damage::None;
    };
    match damage {
        Damage::None => Damage::None,
        Damage::TornTail | Damage::FlippedTail => {
            // A copy of the last record, renumbered as the next one in a new group, cut short or
            // with a payload byte flipped: bytes no client was ever told about.
            let bytes = std::fs::read(&last_path).unwrap();
            let &(seq, off, _) = last_recs.last().unwrap();
            let mut rec = bytes[off as usize..].to_vec();
            rec[4..12].copy_from_slice(&(seq + 1).to_le_bytes());
            rec[12..20].copy_from_slice(&(seq + 1).to_le_bytes());
            if damage == Damage::TornTail {
                let keep = 1 + w.rng.below(rec.len() as u64 - 1) as usize;
                rec.truncate(keep);
            } else {
                let at = 24 + w.rng.below(rec.len() as u64 - 24) as usize;
                rec[at] ^= 0x5a;
            }
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&last_path)
                .unwrap();
            std::io::Write::write_all(&mut f, &rec).unwrap();
            damage
        }
        Damage::FlippedMiddle => {
            // A record of a segment before the last one: a snapshot was taken at that segment's
            // end (segments rotate at snapshots) and holds it.
            let snapshots = matching_engine::snapshot::list_snapshots(&dir).unwrap();
            let older: Vec<_> = with_records[..with_records.len() - 1]
                .iter()
                .filter(|(_, _, recs)| {
                    let last = recs.last().unwrap().0;
                    snapshots.iter().any(|(s, _)| *s >= last)
                })
                .collect();
            if older.is_empty() {
                return Damage::None;
            }
            let (_, path, recs) = older[w.rng.below(older.len() as u64) as usize];
            let (_, off, _) = recs[w.rng.below(recs.len() as u64) as usize];
            let mut bytes = std::fs::read(path).unwrap();
            let at = off as usize + 24;
            bytes[at] ^= 0x01;
            std::fs::write(path, bytes).unwrap();
            Damage::FlippedMiddle
        }
    }
}

/// After a crash: maybe damage the journal, restart; a refusal must name the damage and change
/// nothing, then the operator's repair and a restart.
fn restart(w: &mut World) {
    let why = w.life().crash.reason().unwrap_or_default();
    w.count(format!("crash: {why}"));
    crash(w);
    let pick = match w.rng.below(10) {
        0..=1 => Damage::TornTail,
        2..=3 => Damage::FlippedTail,
        4 => Damage::FlippedMiddle,
        _ => Damage::None,
    };
    let done = damage_journal(w, pick);
    w.say(format!("crash; journal damage {done:?}"));
    w.count(format!("journal damage {done:?}"));
    let dir = w.dir.path().join("journal");
    let before = journal_bytes(&dir);
    match start(w) {
        Ok(life) => {
            assert_ne!(
                done,
                Damage::FlippedMiddle,
                "a damaged journal was accepted"
            );
            w.life = Some(life);
        }
        Err(api::node::NodeError::Recovery(RecoveryError::Damaged(d))) => {
            assert_eq!(
                done,
                Damage::FlippedMiddle,
                "refused an undamaged journal: {d}"
            );
            assert_eq!(journal_bytes(&dir), before, "a refusal changed the journal");
            // `mediator journal verify` reports the same damage; `repair` cuts there.
            let check = check_journal(&dir).unwrap();
            assert_eq!(check.damage(), Some(&d));
            let msg = d.to_string();
            assert!(msg.contains(&d.offset.to_string()) && msg.contains("acknowledged"));
            let repair =
                repair_truncate::<matching_engine::Engine>(&dir, d.segment_first_seq, d.offset, 0)
                    .unwrap();
            w.say(format!("repaired: {}", repair.log_line.trim()));
            w.life = Some(start(w).expect("starts after the repair"));
            // The repair cut records a snapshot holds: the state is whole, but if the history
            // had not committed them, their order and trade rows cannot be regenerated: a gap
            // the server reports (`mediator_history_gap_commands`), as documented.
            let gap = w.life().h.state.read_model().read().history_gap;
            if gap > 0 {
                w.say(format!("history gap of {gap} commands after the repair"));
                w.count("history gap after a repair".into());
                w.history_cut = true;
            }
        }
        Err(e) => panic!(
            "restart failed: {e}; data directory: {:?}",
            tree(w.dir.path())
        ),
    }
    audit_restart(w);
}

// ---------------------------------------------------------------------------------------------
// The workload.

fn expect(w: &mut World, what: &str, r: &Resp, codes: &[i64]) {
    let ok = (r.status.is_success() && codes.contains(&0)) || codes.contains(&r.code());
    assert!(ok, "{what}: unexpected answer {} {}", r.status, r.json);
    w.count(format!("{what} {}", r.code()));
}

/// One request that moves money: acknowledged, refused, or unknown (kept to repeat).
fn request(w: &mut World, what: &str, p: Pending, codes: &[i64]) {
    w.say(format!("{what} {} {}", p.path, p.params));
    let Some(r) = w.signed("POST", p.path, &p.params, &p.key) else {
        w.pending.push(p);
        return;
    };
    expect(w, what, &r, codes);
    match (r.code(), &p.what) {
        (0, _) => w.acked.push(p.what),
        // Custody's answer was lost (500): unknown, as -1007.
        (-1007 | -1001, _) => w.pending.push(p),
        // A repeated withdrawal key: custody has it; the history shows it by that key.
        (-4029, Ack::Withdrawal { key, .. }) => {
            let q = format!("withdrawOrderId={key}");
            let h = w
                .signed("GET", "/sapi/v1/capital/withdraw/history", &q, &p.key)
                .expect("no crash armed");
            let found = h.json.as_array().is_some_and(|v| v.len() == 1);
            assert!(
                found,
                "withdrawal {key}: duplicate key but no record: {}",
                h.json
            );
            if let Ack::Withdrawal { payer, key, .. } = p.what {
                w.acked.push(Ack::Withdrawal {
                    payer,
                    key,
                    held: false,
                });
            }
        }
        _ => {}
    }
}

fn step(w: &mut World) {
    arm(w);
    let dice = w.rng.below(100);
    match dice {
        0..=13 => {
            let t = w.rng.below(w.traders.len() as u64) as usize;
            let side = if w.rng.chance(50) { "BUY" } else { "SELL" };
            let price = 49_000 + 100 * w.rng.below(20);
            let qty = 1 + w.rng.below(9);
            let coid = format!("sim-{}", w.id());
            let p = Pending {
                path: "/api/v3/order",
                params: format!(
                    "symbol=BTCUSD&side={side}&type=LIMIT&timeInForce=GTC&quantity=0.0{qty}&price={price}&newClientOrderId={coid}"
                ),
                key: w.traders[t].1.clone(),
                what: Ack::Order { trader: t, coid },
            };
            // An order is not repeated: its outcome is found by its client order id.
            w.say(format!("order {}", p.params));
            if let Some(r) = w.signed("POST", p.path, &p.params, &p.key) {
                expect(w, "order", &r, &[0, -1007, -2010]);
                if r.code() == 0 {
                    w.acked.push(p.what);
                }
            }
        }
        14..=25 => {
            let from = w.rng.below(w.payers.len() as u64) as usize;
            let to = (from + 1 + w.rng.below(w.payers.len() as u64 - 1) as usize) % w.payers.len();
            let usd = 1 + w.rng.below(300);
            let tran = format!("t{}", w.id());
            let p = Pending {
                path: "/mapi/v1/transfer",
                params: format!(
                    "toAccount={}&asset=USD&amount={usd}&clientTranId={tran}",
                    w.payers[to].0
                ),
                key: w.payers[from].1.clone(),
                what: Ack::Transfer {
                    from,
                    to,
                    usd,
                    tran,
                },
            };
            request(w, "transfer", p, &[0, -1007, -2010]);
        }
        26..=33 => {
            let payer = w.rng.below(w.payers.len() as u64) as usize;
            let sat = 2_000 + 1_000 * w.rng.below(50);
            let key = format!("w{}", w.id());
            let p = Pending {
                path: "/sapi/v1/capital/withdraw/apply",
                params: format!(
                    "coin=BTC&address=bcrt1qout{payer}&amount={}&withdrawOrderId={key}",
                    btc(sat)
                ),
                key: w.payers[payer].1.clone(),
                what: Ack::Withdrawal {
                    payer,
                    key,
                    held: true,
                },
            };
            request(w, "withdraw", p, &[0, -1001, -1007, -4026, -4029, -4032]);
        }
        34..=41 => {
            let sat = 10_000 + 1_000 * w.rng.below(100);
            let m = w.merchant.1.clone();
            w.say(format!("invoice {sat}"));
            if let Some(r) = w.signed(
                "POST",
                "/mapi/v1/merchant/invoice",
                &format!("amount={}&currency=BTC", btc(sat)),
                &m,
            ) {
                expect(w, "invoice", &r, &[0]);
                w.invoices.push((
                    r.json["id"].as_str().unwrap().to_owned(),
                    r.json["address"].as_str().unwrap().to_owned(),
                ));
            }
        }
        42..=51 if !w.invoices.is_empty() => {
            let (invoice, _) = w.invoices[w.rng.below(w.invoices.len() as u64) as usize].clone();
            let payer = w.rng.below(w.payers.len() as u64) as usize;
            w.say(format!("pay {invoice} by payer {payer}"));
            let key = w.payers[payer].1.clone();
            if let Some(r) = w.signed(
                "POST",
                "/mapi/v1/merchant/invoice/pay",
                &format!("invoiceId={invoice}"),
                &key,
            ) {
                expect(w, "pay", &r, &[0, -1007, -1155, -1165, -2010]);
                if r.code() == 0 {
                    w.paid.push(invoice.clone());
                    w.acked.push(Ack::Pay { invoice, payer });
                }
            }
        }
        52..=57 if !w.invoices.is_empty() => {
            let (invoice, addr) = w.invoices[w.rng.below(w.invoices.len() as u64) as usize].clone();
            w.paid.push(invoice);
            let sat = 5_000 + 1_000 * w.rng.below(50);
            let tx = w.tx();
            w.say(format!("chain payment {sat} to {addr}"));
            w.deposits.push((format!("{tx}:0"), w.merchant.0, sat));
            w.chain.pay(tx, &addr, sat);
        }
        58..=67 if !w.paid.is_empty() => {
            let invoice = w.paid[w.rng.below(w.paid.len() as u64) as usize].clone();
            let sat = 1_000 * (2 + w.rng.below(20));
            let dest = if w.rng.chance(50) {
                "address=bcrt1qrefund".to_owned()
            } else {
                format!(
                    "toAccount={}",
                    w.payers[w.rng.below(w.payers.len() as u64) as usize].0
                )
            };
            let key = format!("r{}", w.id());
            let p = Pending {
                path: "/mapi/v1/merchant/invoice/refund",
                params: format!(
                    "invoiceId={invoice}&amount={}&{dest}&idempotencyKey={key}",
                    btc(sat)
                ),
                key: w.merchant.1.clone(),
                what: Ack::Refund { invoice, key },
            };
            request(
                w,
                "refund",
                p,
                &[
                    0, -1001, -1007, -1155, -1156, -1159, -2010, -4026, -4029, -4032,
                ],
            );
        }
        68..=71 if !w.pending.is_empty() => {
            let i = w.rng.below(w.pending.len() as u64) as usize;
            let p = w.pending.remove(i);
            request(
                w,
                "retry",
                p,
                &[
                    0, -1001, -1007, -1155, -1156, -1159, -2010, -4026, -4029, -4032,
                ],
            );
        }
        72..=85 => {
            w.say("custody step".into());
            let c = w.life().custody.clone();
            let r = c.step();
            if r.is_err() && !w.life().crash.tripped() {
                panic!("custody step failed with no crash: {r:?}");
            }
            if w.rng.chance(50) {
                w.chain.mine();
            }
        }
        86..=90 => {
            w.say("merchant tick".into());
            let st = w.life().h.state.clone();
            let lost_before = w.life().core.lost.load(Ordering::SeqCst);
            if let Some(r) =
                w.run(async move { merchant::monitor::tick(&st, api::core::now_ms()).await })
            {
                let lost = w.life().core.lost.load(Ordering::SeqCst) > lost_before;
                assert!(r.is_ok() || lost, "tick failed with no fault: {r:?}");
            }
        }
        91..=92 => {
            // The operator refuses a withdrawal that is not batched yet.
            let c = w.life().custody.clone();
            let ids: Vec<u64> = c
                .records()
                .wds
                .values()
                .filter(|x| x.status == WStatus::Pending)
                .map(|x| x.id)
                .collect();
            if !ids.is_empty() {
                let id = ids[w.rng.below(ids.len() as u64) as usize];
                w.say(format!("operator releases withdrawal {id}"));
                let _ = c.release(id);
            }
        }
        93..=94 => {
            let c = w.life().custody.clone();
            let batches: Vec<String> = c
                .records()
                .batches
                .values()
                .map(|b| b.tx.txid.clone())
                .collect();
            let mut rng = Rng(w.rng.next());
            let gone = w
                .chain
                .reorg(|t| batches.contains(&t.txid), || rng.chance(50));
            w.say(format!("reorg: {} payment(s) gone", gone.len()));
        }
        95 => {
            w.say("node restart".into());
            w.chain.restart(1 + w.rng.below(3) as u32);
        }
        96..=99 => {
            w.say("crash".into());
            w.life().crash.trip_because("between two steps");
        }
        _ => {}
    }
    disarm(w, false);
    if w.life().crash.tripped() {
        restart(w);
    }
    audit_step(w);
}

// ---------------------------------------------------------------------------------------------
// The auditor.

fn credited(w: &World, outpoint: &str) -> bool {
    match w.submit(Command::CreditStatus {
        key: custody::outpoint_key(outpoint),
    }) {
        Outcome::Applied(r) => r
            .events
            .iter()
            .any(|e| matches!(e, Event::CreditStatus { credited: true, .. })),
        other => panic!("credit status: {other:?}"),
    }
}

fn withdrawal(w: &World, id: u64) -> Option<matching_engine::Withdrawal> {
    match w.submit(Command::WithdrawalStatus {
        id: WithdrawalId(id),
    }) {
        Outcome::Applied(r) => r.events.iter().find_map(|e| match e {
            Event::WithdrawalStatus { withdrawal, .. } => *withdrawal,
            _ => None,
        }),
        other => panic!("withdrawal status: {other:?}"),
    }
}

/// Sums of (available + held) per asset over every account, from the read model.
fn balances(w: &World) -> (u128, u128) {
    let rm = w.life().h.state.read_model().read();
    let mut s = [0u128; 2];
    for v in rm.balances.values() {
        for (i, &(a, h)) in v.iter().enumerate().take(2) {
            s[i] += u128::from(a) + u128::from(h);
        }
    }
    (s[0], s[1])
}

/// Money: no breaker; USD as minted; BTC = credits of chain deposits − withdrawals completed;
/// the chain and the ledger agree (wallet coins − uncredited + in flight − liabilities = minus
/// what reorgs took from credited deposits).
fn audit_step(w: &World) {
    let st = &w.life().h.state;
    assert!(
        !st.breaker_open(),
        "the circuit breaker opened: {:?}",
        st.halted()
    );
    let c = w.life().custody.records();
    let txs = w.chain.txs();
    // Minted: every deposit the simulation paid that the engine credited (asked by its key),
    // whether custody wrote its row yet or a reorg took the payment away since.
    let mut minted = 0u128;
    let mut reorged = 0i128;
    let mut uncredited = 0i128;
    for (op, _, sat) in &w.deposits {
        let txid = op.split(':').next().unwrap();
        let on_chain = txs.iter().any(|(t, _)| t.txid == txid);
        if credited(w, op) {
            minted += u128::from(*sat);
            if !on_chain {
                reorged += i128::from(*sat);
            }
        } else if on_chain {
            uncredited += i128::from(*sat);
        }
    }
    // The wallet's coins: payments to its addresses less what its batches spend.
    let mut assets = 0i128;
    for (tx, _) in &txs {
        if c.batches.values().any(|b| b.tx.txid == tx.txid) {
            assets -= tx.outs.iter().map(|o| i128::from(o.1)).sum::<i128>() + i128::from(tx.fee);
        } else if w.deposits.iter().any(|d| d.0.starts_with(&tx.txid)) {
            assets += tx.outs.iter().map(|o| i128::from(o.1)).sum::<i128>();
        }
    }
    let mut withdrawn = 0u128;
    let mut in_flight = 0i128;
    for wd in c.wds.values() {
        let gone = match wd.status {
            WStatus::Completed => true,
            WStatus::Batched(b) => {
                let on_chain = txs.iter().any(|(t, _)| t.txid == c.batches[&b].tx.txid);
                let done =
                    withdrawal(w, wd.id).is_some_and(|r| r.state == WithdrawalState::Completed);
                if on_chain && !done {
                    in_flight += i128::from(wd.amount + NETWORK_FEE);
                }
                done
            }
            _ => false,
        };
        if gone {
            withdrawn += u128::from(wd.amount + NETWORK_FEE);
        }
    }
    let (b, u) = balances(w);
    let usd = (w.payers.len() as u128 * u128::from(PAYER_USD)
        + w.traders.len() as u128 * u128::from(TRADER_USD))
        * u128::from(SAT);
    assert_eq!(u, usd, "USD balances != USD minted");
    assert_eq!(b, minted - withdrawn, "BTC balances != minted − withdrawn");
    let surplus = assets - uncredited + in_flight - b as i128;
    assert_eq!(surplus, -reorged, "chain and ledger disagree");
}

/// After a restart: every acknowledged command is still there.
fn audit_restart(w: &mut World) {
    let gap = w.life().h.state.read_model().read().history_gap;
    assert!(
        gap == 0 || w.history_cut,
        "the history misses {gap} journaled commands after the restart"
    );
    let acked = w.acked.clone();
    for a in &acked {
        match a {
            Ack::Order { trader, coid } => {
                let key = w.traders[*trader].1.clone();
                let r = w
                    .signed(
                        "GET",
                        "/api/v3/order",
                        &format!("symbol=BTCUSD&origClientOrderId={coid}"),
                        &key,
                    )
                    .unwrap();
                if r.code() != 0 && w.history_cut {
                    // Its rows may be among those the repair cut (its money is checked all the
                    // same: balances, holds and books are the engine's).
                    w.count("order history cut by a repair".into());
                    continue;
                }
                assert_eq!(r.code(), 0, "acknowledged order {coid} lost: {}", r.json);
            }
            Ack::Transfer { from, tran, .. } => {
                // A transfer of more than anyone holds under the same key: refused as the key
                // used for other terms (`TransferKeyReused`) if the key is known, as
                // insufficient balance if it was lost; either way nothing changes.
                let (acct, to) = (w.payers[*from].0, w.payers[(*from + 1) % 3].0);
                let out = w.submit(Command::Transfer {
                    from: AccountId(acct),
                    to: AccountId(to),
                    asset: USD,
                    amount: Amount(u64::MAX / 2),
                    key: IdempotencyKey::reference(&format!("transfer/{acct}/{tran}")),
                });
                assert!(
                    matches!(out, Outcome::Rejected(RejectCode::TransferKeyReused)),
                    "acknowledged transfer {tran} lost: {out:?}"
                );
            }
            Ack::Withdrawal { payer, key, held } => {
                let acct = w.payers[*payer].0;
                let rec = w.life().custody.records();
                let wd = rec
                    .wds
                    .values()
                    .find(|x| x.account == acct && &x.key == key)
                    .unwrap_or_else(|| panic!("acknowledged withdrawal {key} lost by custody"));
                let id = wd.id;
                assert!(
                    !held || withdrawal(w, id).is_some(),
                    "acknowledged withdrawal {key} (id {id}) unknown to the engine"
                );
            }
            Ack::Refund { invoice, key } => {
                let st = w.life().h.state.clone();
                let db = st.merchant().db.lock().unwrap();
                let rs = store::refunds(&db, invoice).unwrap();
                if rs
                    .iter()
                    .any(|r| r.idem_key.as_deref() == Some(key) && r.state != "cancelled")
                {
                    continue;
                }
                // Given back only when custody released its withdrawal (the merchant's balance
                // could no longer cover it): then the refund is `cancelled` and its amount can
                // be refunded again.
                let ns: Vec<u32> = db
                    .prepare(
                        "SELECT n FROM invoice_refund WHERE invoice_id = ?1 AND idem_key = ?2
                         AND state = 'cancelled' AND to_address IS NOT NULL",
                    )
                    .unwrap()
                    .query_map([invoice.as_str(), key.as_str()], |r| r.get(0))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                drop(db);
                let rec = w.life().custody.records();
                let released = ns.iter().any(|n| {
                    let wkey = format!("refund-{invoice}-{n}");
                    rec.wds
                        .values()
                        .any(|x| x.key == wkey && x.status == WStatus::Released)
                });
                assert!(released, "acknowledged refund {key} lost: {rs:?}");
                w.count("refund given back: custody released it".into());
            }
            Ack::Pay { invoice, payer } => {
                let st = w.life().h.state.clone();
                let db = st.merchant().db.lock().unwrap();
                let rec = store::load(&db, invoice).unwrap().unwrap();
                let acct = w.payers[*payer].0;
                assert!(
                    rec.inv
                        .payments
                        .iter()
                        .any(|p| matches!(p.source, Source::Balance { payer } if payer == acct)),
                    "acknowledged payment of {invoice} by {acct} lost"
                );
            }
        }
    }
    let c = w.life().custody.records();
    for op in c.credited.keys() {
        assert!(
            credited(w, op),
            "credit {op} recorded by custody, unknown to the engine"
        );
    }
    for wd in c.wds.values() {
        let rec = withdrawal(w, wd.id);
        match wd.status {
            WStatus::Completed => assert_eq!(
                rec.map(|r| r.state),
                Some(WithdrawalState::Completed),
                "withdrawal {} completed by custody",
                wd.id
            ),
            WStatus::Pending | WStatus::Batched(_) => assert!(
                rec.is_some_and(|r| r.state != WithdrawalState::Released),
                "withdrawal {} held by custody: {rec:?}",
                wd.id
            ),
            _ => {}
        }
    }
    audit_step(w);
}

// ---------------------------------------------------------------------------------------------
// The end: faults off, everything resolved.

fn settle(w: &mut World) {
    disarm(w, true);
    if w.life().stall.is_some() {
        w.life()
            .crash
            .trip_because("settling with the history stalled");
        restart(w);
    }
    w.chain.down.store(0, Ordering::SeqCst);
    for p in std::mem::take(&mut w.pending) {
        request(
            w,
            "settle",
            p,
            &[0, -1155, -1156, -1159, -2010, -4026, -4029, -4032],
        );
    }
    assert!(w.pending.is_empty(), "still unknown with no fault");
    let c = w.life().custody.clone();
    // The operator clears flagged accounts (reorged deposits) so their withdrawals go on.
    for _ in 0..6 {
        let st = w.life().h.state.clone();
        w.run(async move { merchant::monitor::tick(&st, api::core::now_ms()).await })
            .unwrap()
            .unwrap();
        c.clear_all_flags();
        c.step().unwrap();
        w.chain.mine();
        c.step().unwrap();
    }
    // A withdrawal the wallet cannot fund (a reorg took coins away) waits; the operator
    // releases it (`mediator withdrawal reject`).
    let unfunded: Vec<u64> = c
        .records()
        .wds
        .values()
        .filter(|x| x.status == WStatus::Pending)
        .map(|x| x.id)
        .collect();
    for id in unfunded {
        w.say(format!(
            "settle: operator releases unfunded withdrawal {id}"
        ));
        assert!(c.release(id).unwrap());
    }
    // Cancel every open order: nothing may stay held.
    for i in 0..w.traders.len() {
        let key = w.traders[i].1.clone();
        let r = w
            .signed("DELETE", "/api/v3/openOrders", "symbol=BTCUSD", &key)
            .unwrap();
        assert!(r.code() == 0 || r.code() == -2011, "cancel all: {}", r.json);
    }
}

fn audit_end(w: &mut World) {
    audit_restart(w);
    let c = w.life().custody.records();
    // Custody agrees with the engine on every deposit: each credit is in its records, and each
    // credited deposit a reorg took out of the chain is marked reorged (its account flagged).
    let txs = w.chain.txs();
    for (op, acct, _) in w.deposits.clone() {
        if !credited(w, &op) {
            continue;
        }
        let txid = op.split(':').next().unwrap();
        let confirmed = txs.iter().any(|(t, n)| t.txid == txid && *n > 0);
        assert!(
            c.credited.contains_key(&op),
            "deposit {op} of account {acct} credited by the engine, not in custody's records"
        );
        assert_eq!(
            c.reorged.contains(&op),
            !confirmed,
            "deposit {op} of account {acct}: credited, confirmed {confirmed}, custody's reorged mark"
        );
    }
    assert!(c.alarms.is_empty(), "custody alarms: {:?}", c.alarms);
    // Seed 116's scenario, counted so that a change which stops a seed reaching it shows.
    if c.flagged_unsure > 0 {
        *w.stats.entry(FLAGGED_UNSURE.to_owned()).or_default() += c.flagged_unsure;
    }
    for wd in c.wds.values() {
        assert!(
            matches!(wd.status, WStatus::Completed | WStatus::Released),
            "withdrawal stays {:?}: {wd:?}; custody {c:#?}; chain {:#?}",
            wd.status,
            w.chain.txs()
        );
        // Paid on chain exactly once per completed withdrawal, never for a released one.
        let paid = c
            .batches
            .values()
            .filter(|b| b.wids.contains(&wd.id))
            .count();
        assert_eq!(paid, usize::from(wd.status == WStatus::Completed), "{wd:?}");
    }
    let rm = w.life().h.state.read_model().read();
    for (acct, v) in &rm.balances {
        for (asset, &(_, held)) in v.iter().enumerate() {
            assert_eq!(held, 0, "account {acct} asset {asset} still holds {held}");
        }
    }
    drop(rm);
    let st = w.life().h.state.clone();
    {
        let db = st.merchant().db.lock().unwrap();
        assert!(
            store::pay_intents(&db).unwrap().is_empty(),
            "payment intents left"
        );
        let unresolved = store::unresolved_refunds(&db, true).unwrap();
        assert!(unresolved.is_empty(), "refunds unresolved: {unresolved:?}");
        for rec in store::list(&db, w.merchant.0, None, 0, u64::MAX, 10_000).unwrap() {
            assert!(rec.conv.client_id.is_none(), "a conversion stays unknown");
            assert!(
                rec.inv.refunded_sat <= rec.inv.credited_sat(),
                "{}",
                rec.inv.id
            );
        }
    }
    // The payers' USD is what the acknowledged transfers say.
    let mut usd = vec![i128::from(PAYER_USD); w.payers.len()];
    for a in &w.acked {
        if let Ack::Transfer {
            from, to, usd: x, ..
        } = a
        {
            usd[*from] -= i128::from(*x);
            usd[*to] += i128::from(*x);
        }
    }
    for (i, (acct, _)) in w.payers.iter().enumerate() {
        let rm = st.read_model().read();
        let (a, h) = rm.balances.get(acct).map_or((0, 0), |v| v[1]);
        assert_eq!(
            i128::from(a + h),
            usd[i] * i128::from(SAT),
            "payer {i} USD is not what the acknowledged transfers say"
        );
    }
}

fn run(seed: u64, log: Arc<Mutex<Vec<String>>>) -> BTreeMap<String, u64> {
    let mut w = setup(seed, log);
    for _ in 0..STEPS {
        step(&mut w);
    }
    settle(&mut w);
    audit_end(&mut w);
    // A last crash and restart with everything settled: still all there.
    w.life().crash.trip_because("at the end, settled");
    restart(&mut w);
    let stats = std::mem::take(&mut w.stats);
    crash(&mut w);
    stats
}

fn seeds() -> Vec<u64> {
    match std::env::var("MEDIATOR_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("MEDIATOR_SIM_SEED is a number")],
        Err(_) => {
            let n = std::env::var("MEDIATOR_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(6u64);
            (1..=n).collect()
        }
    }
}

fn run_seed(seed: u64) -> BTreeMap<String, u64> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l2 = log.clone();
    let r = std::thread::spawn(move || run(seed, l2)).join();
    match r {
        Ok(stats) => {
            let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
            eprintln!("seed {seed} (open files {fds}): {stats:?}");
            stats
        }
        Err(e) => {
            let log = log.lock().unwrap_or_else(|e| e.into_inner());
            let from = log.len().saturating_sub(40);
            eprintln!("last steps of seed {seed}:\n  {}", log[from..].join("\n  "));
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!(
                "crash simulation failed at seed {seed}: {msg}\n\
                 replay: MEDIATOR_SIM_SEED={seed} cargo test -p merchant --test crash_sim"
            );
        }
    }
}

#[test]
fn seeded_crash_simulation_loses_no_acknowledged_command_and_no_unit() {
    let mut total = BTreeMap::<String, u64>::new();
    for seed in seeds() {
        for (k, v) in run_seed(seed) {
            *total.entry(k).or_default() += v;
        }
    }
    eprintln!("all seeds: {total:#?}");
}

/// Seed 1 found that `journal repair` of damage in an older segment, which the snapshot taken at
/// that segment's end holds, moved every later segment aside: the acknowledged commands after
/// the snapshot were lost (here a withdrawal's hold). Kept as a named seed (its trajectory
/// depends on this file: the stable, minimal regression is `matching-engine`'s
/// `repairing_damage_a_snapshot_holds_keeps_the_later_segments`).
#[test]
fn seed_1_a_repaired_journal_keeps_the_commands_after_the_snapshot() {
    let stats = run_seed(1);
    // Still the path that found it: a repaired middle of the journal, records cut by it.
    assert!(
        stats.get("journal damage FlippedMiddle") > Some(&0)
            && stats.get("order history cut by a repair") > Some(&0),
        "seed 1 no longer repairs the journal: {stats:?}"
    );
}

/// Seed 12 found that after such a repair, with the history behind the journal (its floor
/// inside the cut records), start-up replayed from the snapshot below the floor into the hole
/// and refused ("journal gap"). It now starts from the snapshot that holds the cut records and
/// reports the history's gap. Minimal regression: `matching-engine`'s
/// `a_floor_behind_a_repaired_hole_recovers_from_the_snapshot_that_holds_it`.
#[test]
fn seed_12_a_history_behind_a_repaired_journal_does_not_stop_the_start() {
    let stats = run_seed(12);
    assert!(
        stats.get("history gap after a repair") > Some(&0),
        "seed 12 no longer leaves the history behind a repair: {stats:?}"
    );
}

/// Seed 116 finds (seed 18 of an earlier version of this file found) that custody's model lost
/// track of a deposit whose credit the engine applied while the process died before custody
/// wrote it down, and which a reorg then took out of the chain: the engine kept the credit and
/// custody never flagged the account (the wallet had the same gap: `process_deposits` marked a
/// deposit only after an applied answer, in one transaction). Custody writes the credit's intent
/// first and asks the engine about every intent whose deposit is no longer confirmed. Seen
/// failing with that question left out of the model; the wallet's regression is
/// `a_deposit_credited_with_a_lost_answer_then_reorged_flags_the_account` (regtest).
#[test]
fn seed_116_a_maybe_credited_deposit_that_leaves_the_chain_is_flagged() {
    let stats = run_seed(116);
    // Still the path that found it: a credit with a lost answer, resolved as applied after its
    // deposit left the chain, and the account flagged.
    assert!(
        stats.get(FLAGGED_UNSURE) > Some(&0),
        "seed 116 no longer flags a maybe-credited deposit that left the chain: {stats:?}"
    );
}

/// The stats entry of seed 116's scenario (custody's model flagged an account for a deposit
/// whose credit had no known answer and which left the chain).
const FLAGGED_UNSURE: &str = "custody flagged a maybe-credited deposit that left the chain";
