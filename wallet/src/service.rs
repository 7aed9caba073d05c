//! The custody service: one wallet, one database, one bitcoind connection, step functions.

use crate::config::{CustodyConfig, RpcAuth};
use crate::error::AbandonError;
use crate::error::{
    BatchError, BumpError, DepositAddressError, DepositError, OpenError, ProveError, StepError,
    StoreError, SyncError, WithdrawalError,
};
use crate::keys;
use crate::ledger::{Ledger, LedgerError};
use crate::store::{self, Alarm, BatchTx, DepositStatus, WithdrawalStatus, WithdrawalView};
use bdk_bitcoind_rpc::bitcoincore_rpc::{self, Auth, Client, RpcApi};
use bdk_bitcoind_rpc::Emitter;
use bdk_wallet::bitcoin::address::NetworkUnchecked;
use bdk_wallet::bitcoin::consensus::encode;
use bdk_wallet::bitcoin::hashes::Hash;
use bdk_wallet::bitcoin::{
    self, Address, FeeRate, OutPoint, Psbt, ScriptBuf, Transaction, Txid, Weight,
};
use bdk_wallet::chain::{ChainPosition, ConfirmationBlockTime};
use bdk_wallet::error::CreateTxError;
use bdk_wallet::rusqlite::Connection;
use bdk_wallet::{
    KeychainKind, LoadError, LoadMismatch, LoadWithPersistError, PersistedWallet, SignOptions,
    Wallet,
};
use matching_engine::command::Command;
use matching_engine::config::BTC;
use matching_engine::units::{AccountId, Amount, IdempotencyKey, Timestamp, WithdrawalId};
use matching_engine::{RejectCode, Withdrawal, WithdrawalState};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

/// The database file's name in the data directory.
pub const DATABASE_FILE: &str = "wallet.sqlite";
const DAY_MS: u64 = 24 * 60 * 60 * 1000;
/// Bitcoin Core's largest standard transaction (`MAX_STANDARD_TX_WEIGHT`): a heavier batch would
/// be refused by every node, for good.
const MAX_BATCH_WEIGHT: Weight = Weight::from_wu(400_000);
/// The most batch builds one step tries ([`CustodyService::build_batch`]); the rest wait.
const BATCH_ATTEMPTS: usize = 16;

/// One try at a batch.
enum Attempt {
    /// Signed and recorded.
    Built(BatchInfo),
    /// No relayable transaction pays `kept` (those of the try the wallet could fund) within
    /// their flat fees: `why`. Nothing recorded.
    Unpayable {
        kept: Vec<WithdrawalView>,
        why: String,
    },
}
/// RPC error codes of bitcoind (`src/rpc/protocol.h`).
const RPC_VERIFY_ALREADY_IN_CHAIN: i32 = -27;
/// `getmempoolentry` of a transaction not in the mempool.
const RPC_INVALID_ADDRESS_OR_KEY: i32 = -5;
/// Completed batches watched for a reorg that takes their transaction out of the chain (the
/// newest ones: a reorg deeper than this many batches is not looked for).
const REORG_WATCHED_BATCHES: u32 = 100;
/// Confirmations before a coinbase output can be spent (consensus).
const COINBASE_MATURITY: u32 = 100;

/// A deposit seen, credited or reorged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepositEvent {
    /// Beneficiary.
    pub account: AccountId,
    /// The paying output.
    pub outpoint: OutPoint,
    /// Its value, sats.
    pub amount: Amount,
    /// Confirmations now (0: mempool or no longer in the chain).
    pub confirmations: u32,
}

/// A deposit as the service knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepositView {
    /// Beneficiary.
    pub account: AccountId,
    /// The paying output.
    pub outpoint: OutPoint,
    /// Its value, sats.
    pub amount: Amount,
    /// Pending, credited or reorged.
    pub status: DepositStatus,
    /// Confirmations now (0: mempool, or no longer in the chain).
    pub confirmations: u32,
    /// When the service first saw it, ms since the epoch.
    pub first_seen_ms: u64,
}

/// What [`CustodyService::process_deposits`] did.
#[derive(Clone, Debug, Default)]
pub struct DepositReport {
    /// Deposits seen for the first time (pending).
    pub seen: Vec<DepositEvent>,
    /// Deposits credited to the ledger now.
    pub credited: Vec<DepositEvent>,
    /// Credited deposits that a reorg took out of the chain: reported, account flagged.
    pub reorged: Vec<DepositEvent>,
    /// Reorged deposits that are confirmed again (no second credit).
    pub reconfirmed: Vec<DepositEvent>,
    /// Credited deposits whose transaction was double-spent, taken back from their accounts
    /// now (what the balance held; the rest is the account's debt).
    pub reversed: Vec<DepositEvent>,
    /// Reversed deposits confirmed again and credited again now.
    pub recredited: Vec<DepositEvent>,
    /// Debts collected from accounts' balances now (what a reversal could not take then).
    pub collected: Vec<(AccountId, Amount)>,
    /// Credits the ledger refused (tried again next time).
    pub rejected: Vec<(DepositEvent, RejectCode)>,
    /// Credits whose outcome is unknown (asked again next time; the credit is idempotent).
    pub unresolved: Vec<DepositEvent>,
}

/// Where taking an amount back from an account's balance is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TakeBack {
    /// Held and completed: the amount left the balance.
    Done,
    /// An answer is unknown: asked again next step.
    Waiting,
    /// The hold was refused: nothing held, nothing taken.
    Refused,
}

/// What [`CustodyService::sync_once`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Blocks applied (reorged blocks count again).
    pub blocks: u32,
    /// Wallet tip height afterwards.
    pub tip_height: u32,
    /// Mempool transactions applied.
    pub mempool_txs: usize,
    /// Mempool evictions applied.
    pub evicted: usize,
}

/// A batch that was built, signed and recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchInfo {
    /// Batch id.
    pub id: u64,
    /// Its transaction.
    pub txid: Txid,
    /// Network fee, sats.
    pub fee: Amount,
    /// The withdrawals it pays.
    pub withdrawals: Vec<WithdrawalId>,
}

/// A batch as the operator sees it (`mediator batches`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchView {
    /// Batch id.
    pub id: u64,
    /// `inflight`, `confirmed`, `alarm` (confirmed, but some withdrawals did not complete in
    /// the ledger: see the alarms) or `abandoned` (could never confirm; its withdrawals went to
    /// a later batch).
    pub status: String,
    /// When signed, ms since the epoch.
    pub created_ms: u64,
    /// Its transactions, the original first, then fee bumps.
    pub txids: Vec<Txid>,
    /// Network fee of the newest transaction, sats.
    pub fee: Amount,
    /// Sum of its withdrawals' flat fees: the most any version may pay, sats.
    pub fee_budget: Amount,
    /// The withdrawals it pays.
    pub withdrawals: Vec<WithdrawalId>,
    /// The transaction that confirmed, once confirmed.
    pub confirmed_txid: Option<Txid>,
    /// Times in a row the node refused it (0: accepted or not tried yet).
    pub refusals: u32,
    /// The node's last refusal.
    pub last_error: Option<String>,
}

/// What [`CustodyService::process_withdrawals`] did.
#[derive(Clone, Debug, Default)]
pub struct WithdrawalReport {
    /// Completed withdrawals with their network fee share.
    pub completed: Vec<(WithdrawalId, Amount)>,
    /// Batches confirmed now.
    pub batches_confirmed: Vec<(u64, Txid)>,
    /// Withdrawals paid on chain that the ledger did not complete (released, or unknown to
    /// it): each is an alarm (logged, stored, counted); the withdrawal is not marked completed.
    pub alarms: Vec<(WithdrawalId, String)>,
}

/// What one [`CustodyService::step`] did.
#[derive(Clone, Debug, Default)]
pub struct StepReport {
    /// Chain sync.
    pub sync: SyncReport,
    /// Deposits.
    pub deposits: DepositReport,
    /// Withdrawal completions.
    pub withdrawals: WithdrawalReport,
    /// A batch made in this step.
    pub batch: Option<BatchInfo>,
    /// Reconciliation after the step.
    pub reconciliation: Reconciliation,
    /// Withdrawals whose hold or release outcome the ledger could not tell yet (retried).
    pub unresolved_withdrawals: usize,
}

/// Told of an account custody just flagged (a credited deposit left the chain), right after the
/// flag is recorded, on the custody thread and under the service's lock: it must not wait, and
/// must not call back into the service.
pub type FlagHook = Arc<dyn Fn(AccountId) + Send + Sync>;

/// Wallet assets against ledger liabilities, in sats. Metrics-friendly: plain numbers.
///
/// `adjusted_assets = wallet_confirmed + wallet_pending - uncredited_deposits + withdrawals_in_flight`
/// is what the ledger should owe; `surplus = adjusted_assets - ledger_liabilities` is 0 when both
/// agree, and negative (a shortfall, logged as an error) when customers are owed more than the
/// wallet holds. Fee income lives in the ledger's fee account (account 0), so it is part of the
/// liabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// Confirmed wallet balance.
    pub wallet_confirmed: Amount,
    /// Unconfirmed and immature wallet balance.
    pub wallet_pending: Amount,
    /// Deposits in the wallet not yet credited (pending confirmations).
    pub uncredited_deposits: Amount,
    /// Amounts plus network fees of batches that left the wallet but are not completed yet.
    pub withdrawals_in_flight: Amount,
    /// Custody's money outside this wallet ([`OtherAssets`]: the Lightning node's on-chain
    /// wallet, its side of the channels and closing sweeps), counted as assets.
    pub other_assets: Amount,
    /// All BTC balances in the ledger, held included.
    pub ledger_liabilities: Amount,
    /// Flat fees minus network fee shares of completed withdrawals (part of the liabilities).
    pub fee_income: Amount,
    /// Adjusted assets minus liabilities.
    pub surplus_sat: i64,
    /// True when the surplus is negative.
    pub shortfall: bool,
}

/// One record that differs between custody and the ledger or the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordMismatch {
    /// Stable kind: `deposit_missing_in_ledger`, `deposit_not_recorded_credited`,
    /// `withdrawal_not_confirmed`, `withdrawal_ledger_mismatch` (also the alarm's kind).
    pub kind: &'static str,
    /// Which record: `deposit TXID:VOUT` or `withdrawal ID`.
    pub subject: String,
    /// What differs.
    pub detail: String,
}

/// What [`CustodyService::reconcile_records`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordsReport {
    /// Deposits compared with the ledger.
    pub deposits_checked: usize,
    /// Completed withdrawals compared with the chain and the ledger.
    pub withdrawals_checked: usize,
    /// Finished or refused reversals (and debt collections) compared with the ledger.
    pub reversals_checked: usize,
    /// Ledger queries that got no answer (those records were not compared).
    pub unanswered: usize,
    /// Every mismatch, by id (each is also an alarm).
    pub mismatches: Vec<RecordMismatch>,
}

/// A withdrawal request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WithdrawalRequest {
    /// Owner.
    pub account: AccountId,
    /// Destination address, as the user gave it.
    pub address: String,
    /// Amount to pay out, sats (the flat fee is charged on top).
    pub amount: Amount,
    /// Caller's idempotency key, 1 to 64 bytes; a second request with it is refused.
    pub idempotency_key: String,
    /// What the account sent by another path (Lightning) in the 24 hours before the request:
    /// counted with this wallet's withdrawals in the account's daily limit and approval
    /// threshold, as [`CustodyService::check_outflow`] counts on-chain amounts for Lightning.
    /// `Amount(0)` when there is no other path. Recorded with the request: a `new` row
    /// recovered after a crash (or an unknown ledger answer) is re-decided with it.
    pub other_used: Amount,
}

struct Rpc {
    client: Arc<Client>,
    emitter: Emitter<Arc<Client>>,
}

/// The custody service. See the crate documentation.
pub struct CustodyService {
    config: CustodyConfig,
    ledger: Arc<dyn Ledger>,
    db: Connection,
    wallet: PersistedWallet<Connection>,
    rpc: Option<Rpc>,
    deny_list: HashSet<ScriptBuf>,
    /// The only copy of the private key in the process (BDK's wallet holds public descriptors).
    key: keys::MasterKey,
    /// The latest `now` a caller passed in (0 before the first): the time stamped on alarms
    /// raised where no time is passed (the library never reads the clock).
    last_now_ms: u64,
    /// Where the service's own automatic decisions are recorded (the server's audit log).
    decisions: Option<Arc<dyn DecisionLog>>,
    /// Told of each account flagged, right after the flag is recorded ([`FlagHook`]).
    flag_hook: Option<FlagHook>,
    other_assets: Option<Arc<dyn OtherAssets>>,
    /// The last reconciliation recorded there: (shortfall, surplus), recorded again on change.
    last_reconciliation: Option<(bool, i64)>,
    /// The shortfall above the tolerance found by the last two steps' reconciliations in a row
    /// (the smaller), in sat: money out at once (a Lightning payment, through
    /// [`check_outflow`](Self::check_outflow)) is refused while it is `Some`. Two in a row, so
    /// that a reading between a payment's two sides (a Lightning deposit credited a moment
    /// before the channel shows it) refuses nothing. Batches look for themselves when due.
    /// Kept with custody's records (`mediator_shortfall`), so that a restart goes on where the
    /// last step left off.
    payouts_held: Option<u64>,
    /// The shortfall above the tolerance at the last step's reconciliation (kept like
    /// `payouts_held`).
    last_short: Option<u64>,
    /// Counts the changes of the wallet's transactions or their places (a block, the mempool,
    /// a broadcast, an eviction): with the tip and the number of transactions, the key of
    /// `history_view`.
    view_changes: u64,
    /// The wallet's view (txid → confirmations) last built for the history queries
    /// ([`deposits`](Self::deposits), [`confirmations_of`](Self::confirmations_of)), and its
    /// key. Building it reads every transaction the wallet ever saw against the chain, under
    /// custody's lock: without it a client reading its history a hundred times a second (weight
    /// 1 each) kept every withdrawal and deposit waiting (review).
    history_view: std::sync::Mutex<Option<HistoryView>>,
}

/// A built [`CustodyService::history_view`]: what it was built from, and the view.
#[derive(Debug)]
struct HistoryView {
    key: (bitcoin::BlockHash, usize, u64),
    view: Arc<HashMap<Txid, u32>>,
    builds: u64,
}

/// Where custody records its own automatic decisions: a withdrawal approved by policy
/// (`custody.withdrawal.auto_approve`), one released by the service
/// (`custody.withdrawal.release`), an account flagged (`custody.account.flag`), an alarm raised
/// (`custody.alarm.raise`), a changed reconciliation result (`custody.reconcile`). The server
/// implements it over its audit log.
///
/// **Contract:** [`record`](DecisionLog::record) returns after the entry is durable; the service
/// calls it when it makes the decision, before the step or request that made it returns (so
/// before any reply that reports it). A failed record is logged as an error and raises the
/// `decision_log_failed` alarm (the decision itself stands: it is already in the wallet's
/// database and, for holds, in the ledger). Params never hold a secret.
pub trait DecisionLog: Send + Sync {
    /// Records `action` with `params` (name, value) durably.
    fn record(&self, action: &str, params: &[(&str, String)]) -> Result<(), String>;
}

/// Custody's money held outside the BDK wallet (the Lightning node), counted as assets by every
/// reconciliation, the periodic one included: without it, money a Lightning payment brought in
/// is owed by the ledger and held by the node, and the wallet alone shows a false shortfall.
pub trait OtherAssets: Send + Sync {
    /// The total, satoshis.
    fn sats(&self) -> u64;
}

impl fmt::Debug for CustodyService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustodyService")
            .field("network", &self.config.network)
            .field("data_dir", &self.config.data_dir)
            .field("tip_height", &self.wallet.latest_checkpoint().height())
            .field("connected", &self.rpc.is_some())
            .finish_non_exhaustive()
    }
}

fn confirmations(pos: &ChainPosition<ConfirmationBlockTime>, tip: u32) -> u32 {
    match pos {
        ChainPosition::Confirmed { anchor, .. } => {
            tip.saturating_sub(anchor.block_id.height).saturating_add(1)
        }
        ChainPosition::Unconfirmed { .. } => 0,
    }
}

/// A batch in flight: its id and its versions, oldest first.
type Inflight = (u64, Vec<store::BatchTx>);

fn sats(a: bitcoin::Amount) -> Amount {
    Amount(a.to_sat())
}

fn rpc_err(e: bitcoincore_rpc::Error) -> String {
    e.to_string()
}

/// Whether `txid` is in bitcoind's mempool (`getmempoolentry`, its answer read as untyped JSON:
/// the typed one expects fields newer nodes no longer send).
/// Sends the newest of a batch's older versions (all but the last) the node takes; `None` if it
/// takes none. An older version already in the chain is not sent (the next sync sees it
/// confirmed). No answer from the node: [`BatchError::Rpc`].
fn send_older_version(client: &Client, txs: &[BatchTx]) -> Result<Option<Transaction>, BatchError> {
    for t in txs[..txs.len().saturating_sub(1)].iter().rev() {
        let tx: Transaction = encode::deserialize(&t.raw)
            .map_err(|e| BatchError::Build(format!("stored batch transaction: {e}")))?;
        match client.send_raw_transaction(&tx) {
            Ok(_) => return Ok(Some(tx)),
            Err(e) if rpc_code(&e) == Some(RPC_VERIFY_ALREADY_IN_CHAIN) => return Ok(None),
            Err(e) if rpc_code(&e).is_some() => continue,
            Err(e) => return Err(BatchError::Rpc(rpc_err(e))),
        }
    }
    Ok(None)
}

fn in_mempool(client: &Client, txid: Txid) -> Result<bool, bitcoincore_rpc::Error> {
    match client.call::<bitcoincore_rpc::jsonrpc::serde_json::Value>(
        "getmempoolentry",
        &[txid.to_string().into()],
    ) {
        Ok(_) => Ok(true),
        Err(e) if rpc_code(&e) == Some(RPC_INVALID_ADDRESS_OR_KEY) => Ok(false),
        Err(e) => Err(e),
    }
}

fn rpc_code(e: &bitcoincore_rpc::Error) -> Option<i32> {
    match e {
        bitcoincore_rpc::Error::JsonRpc(bitcoincore_rpc::jsonrpc::Error::Rpc(r)) => Some(r.code),
        _ => None,
    }
}

/// Splits a batch's network fee across its withdrawals in proportion to their flat fees, each
/// share at most its flat fee, the shares adding up to `fee` exactly. `fee` must not exceed the sum
/// of the flat fees.
pub(crate) fn split_fee(fee: Amount, flat_fees: &[Amount]) -> Vec<Amount> {
    let total: u128 = flat_fees.iter().map(|f| u128::from(f.0)).sum();
    assert!(u128::from(fee.0) <= total, "batch fee above the flat fees");
    if total == 0 {
        return vec![Amount::ZERO; flat_fees.len()];
    }
    let mut shares: Vec<u64> = flat_fees
        .iter()
        .map(|f| (u128::from(fee.0) * u128::from(f.0) / total) as u64)
        .collect();
    let mut rest = fee.0 - shares.iter().sum::<u64>();
    for (share, flat) in shares.iter_mut().zip(flat_fees) {
        if rest == 0 {
            break;
        }
        let room = flat.0 - *share;
        let add = room.min(rest);
        *share += add;
        rest -= add;
    }
    assert_eq!(rest, 0, "fee shares do not add up");
    shares.into_iter().map(Amount).collect()
}

fn load_deny_list(path: &Path, network: bitcoin::Network) -> Result<HashSet<ScriptBuf>, OpenError> {
    let text = std::fs::read_to_string(path).map_err(|e| OpenError::DenyList {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut set = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let addr = Address::<NetworkUnchecked>::from_str(line)
            .ok()
            .and_then(|a| a.require_network(network).ok())
            .ok_or_else(|| OpenError::DenyList {
                path: path.to_owned(),
                reason: format!("line {} is not an address of {network}", n + 1),
            })?;
        set.insert(addr.script_pubkey());
    }
    Ok(set)
}

impl CustodyService {
    /// Opens the service: creates the data directory, the secret (first start) and the database,
    /// or loads them and checks network and descriptors. Recovers withdrawals that a crash left
    /// between the database and the ledger. Does not contact bitcoind.
    pub fn open(config: CustodyConfig, ledger: Arc<dyn Ledger>) -> Result<Self, OpenError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| OpenError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let (key, created) =
            keys::load_or_create(&config.data_dir, config.network, config.passphrase.as_ref())?;
        if created {
            tracing::info!(network = %config.network, "created a new wallet secret");
        }
        let mut db = Connection::open(config.data_dir.join(DATABASE_FILE))
            .map_err(|e| OpenError::Store(e.into()))?;
        store::init(&db)?;
        // WAL with full sync: each commit is durable (fsync of the log) at one fsync per commit.
        db.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
            .map_err(|e| OpenError::Store(e.into()))?;
        db.execute_batch("PRAGMA synchronous = FULL")
            .map_err(|e| OpenError::Store(e.into()))?;
        let (external, internal) = key.public_descriptors(config.network)?;
        let loaded = Wallet::load()
            .descriptor(KeychainKind::External, Some(external.clone()))
            .descriptor(KeychainKind::Internal, Some(internal.clone()))
            .check_network(config.network)
            .load_wallet(&mut db);
        let wallet = match loaded {
            Ok(Some(w)) => w,
            Ok(None) => Wallet::create(external, internal)
                .network(config.network)
                .create_wallet(&mut db)
                .map_err(|e| OpenError::Wallet(e.to_string()))?,
            Err(LoadWithPersistError::InvalidChangeSet(LoadError::Mismatch(m))) => {
                return Err(match m {
                    LoadMismatch::Network { loaded, expected } => OpenError::NetworkMismatch {
                        found: loaded,
                        expected,
                    },
                    LoadMismatch::Descriptor { keychain, .. } => OpenError::DescriptorMismatch {
                        keychain: match keychain {
                            KeychainKind::External => "external",
                            KeychainKind::Internal => "internal",
                        },
                    },
                    other => OpenError::Wallet(format!("{other:?}")),
                });
            }
            Err(e) => return Err(OpenError::Wallet(e.to_string())),
        };
        let deny_list = match &config.withdrawal.deny_list {
            Some(path) => load_deny_list(path, config.network)?,
            None => HashSet::new(),
        };
        // The last step's readings, under the tolerance configured now (an operator who accepts
        // a shortfall with a larger one restarts: its payouts go at once).
        let (last_short, payouts_held) = store::shortfall_readings(&db)?;
        let tolerance = config.batch.shortfall_tolerance.0;
        let last_short = last_short.filter(|s| *s > tolerance);
        let payouts_held = payouts_held.filter(|s| *s > tolerance);
        let mut service = Self {
            config,
            ledger,
            db,
            wallet,
            rpc: None,
            deny_list,
            key,
            last_now_ms: 0,
            decisions: None,
            flag_hook: None,
            other_assets: None,
            last_reconciliation: None,
            payouts_held,
            last_short,
            view_changes: 0,
            history_view: std::sync::Mutex::new(None),
        };
        service.recover_withdrawals()?;
        Ok(service)
    }

    /// Withdrawals recorded as `new` were written before their ledger hold, and `releasing` ones
    /// before their release; a crash (or an unknown answer) came before the outcome was recorded.
    /// Resolved by asking the ledger; what the ledger cannot answer now stays for the next step.
    fn recover_withdrawals(&mut self) -> Result<(), OpenError> {
        match self.resolve_withdrawals() {
            Ok(_) => Ok(()),
            Err(WithdrawalError::Store(e)) => Err(OpenError::Store(e)),
            Err(e) => {
                tracing::warn!(error = %e, "withdrawals left unresolved at open; retried each step");
                Ok(())
            }
        }
    }

    /// Resolves every withdrawal whose ledger outcome is not recorded (`new`: the hold;
    /// `releasing`: the release) by asking the ledger. Returns how many stay unresolved (the
    /// ledger did not answer); they are tried again at the next step.
    pub fn resolve_withdrawals(&mut self) -> Result<usize, WithdrawalError> {
        let mut unresolved = 0;
        for w in store::withdrawals_in(&self.db, WithdrawalStatus::New)? {
            // Re-decided as the request would have been: with the Lightning outflow it counted
            // (recorded with the row). A row from before that was recorded counts as above any
            // threshold: it waits for approval rather than skip it after a crash.
            let other_used =
                store::withdrawal_other_used(&self.db, w.id)?.unwrap_or(Amount(u64::MAX));
            match self.settle_hold(&w, other_used) {
                Ok(_) => {}
                Err(WithdrawalError::LedgerUnknown(_)) => unresolved += 1,
                Err(WithdrawalError::Store(e)) => return Err(WithdrawalError::Store(e)),
                Err(e) => tracing::warn!(id = %w.id, error = %e, "withdrawal request not held"),
            }
        }
        for w in store::withdrawals_in(&self.db, WithdrawalStatus::Releasing)? {
            match self.settle_release(&w) {
                Ok(()) => {}
                Err(WithdrawalError::Store(e)) => return Err(WithdrawalError::Store(e)),
                Err(e) => {
                    unresolved += 1;
                    tracing::warn!(id = %w.id, error = %e, "release not resolved; retried");
                }
            }
        }
        Ok(unresolved)
    }

    fn hold_of(w: &WithdrawalView) -> Command {
        Command::WithdrawHold {
            account: w.account,
            asset: BTC,
            amount: w.amount,
            fee: w.fee,
            id: w.id,
        }
    }

    /// True when the ledger's record is this withdrawal (same account, asset and amounts).
    fn same(w: &WithdrawalView, rec: &Withdrawal) -> bool {
        rec.account == w.account && rec.asset == BTC && rec.amount == w.amount && rec.fee == w.fee
    }

    fn alarm(&self, kind: &str, subject: &str, message: &str) -> Result<(), crate::StoreError> {
        if store::raise_alarm(&self.db, kind, subject, message, self.last_now_ms)? {
            tracing::error!(kind, subject, message, "custody alarm");
            self.decide(
                "custody.alarm.raise",
                &[
                    ("kind", kind.to_owned()),
                    ("subject", subject.to_owned()),
                    ("message", message.to_owned()),
                ],
            );
        }
        Ok(())
    }

    /// Raises an alarm for custody's money outside this wallet (the Lightning node's
    /// discrepancies): the same table, log line and decision record as this service's own, seen
    /// by the operator in [`alarms`](Self::alarms); once per `(kind, subject)` until cleared.
    /// `kind` and `subject` should name their source (`lightning_...`).
    pub fn raise_alarm(
        &self,
        kind: &str,
        subject: &str,
        message: &str,
    ) -> Result<(), crate::StoreError> {
        self.alarm(kind, subject, message)
    }

    /// Sets where automatic decisions are recorded ([`DecisionLog`]).
    pub fn set_decision_log(&mut self, log: Arc<dyn DecisionLog>) {
        self.decisions = Some(log);
    }

    /// Sets who is told of each account flagged ([`FlagHook`]): the order path, which must stop
    /// the account's trading at once rather than at its next look at the flags.
    pub fn set_flag_hook(&mut self, hook: FlagHook) {
        self.flag_hook = Some(hook);
    }

    /// The rules money out by another path (Lightning) obeys as on-chain withdrawals do: a
    /// flagged account is refused, and `other_used` (sent by that path in the last 24 hours)
    /// counts with this wallet's withdrawals in the account's 24-hour limit and in its approval
    /// threshold. That path cannot wait for an operator (a BOLT11 invoice expires), so where an
    /// on-chain withdrawal would wait for approval (the account's running 24-hour total, this
    /// amount included, above `approval_threshold`) it is refused: `ApprovalRequired`.
    pub fn check_outflow(
        &self,
        account: AccountId,
        amount: Amount,
        other_used: Amount,
        now_ms: u64,
    ) -> Result<(), WithdrawalError> {
        if store::flagged(&self.db)?.iter().any(|(a, _)| *a == account) {
            return Err(WithdrawalError::AccountFlagged(account));
        }
        // Paid at once, unlike a batch: refused while payouts are held back (a shortfall at the
        // last two steps' reconciliations).
        if let Some(short) = self.payouts_held {
            return Err(WithdrawalError::PayoutsHeld {
                short: Amount(short),
            });
        }
        let policy = &self.config.withdrawal;
        let onchain = store::withdrawn_since(&self.db, account, now_ms.saturating_sub(DAY_MS))?;
        let used = onchain
            .checked_add(other_used)
            .ok_or(WithdrawalError::DailyLimit {
                amount,
                used: onchain,
                limit: policy.daily_limit,
            })?;
        if used
            .checked_add(amount)
            .is_none_or(|t| t > policy.daily_limit)
        {
            return Err(WithdrawalError::DailyLimit {
                amount,
                used,
                limit: policy.daily_limit,
            });
        }
        // As `held_status`: above the threshold (not at it) waits for approval on chain.
        if used
            .checked_add(amount)
            .is_none_or(|t| t > policy.approval_threshold)
        {
            return Err(WithdrawalError::ApprovalRequired {
                amount,
                used,
                threshold: policy.approval_threshold,
            });
        }
        Ok(())
    }

    /// Counts `assets` (custody's money outside this wallet) in every reconciliation.
    pub fn set_other_assets(&mut self, assets: Arc<dyn OtherAssets>) {
        self.other_assets = Some(assets);
    }

    /// Records an automatic decision (see [`DecisionLog`]); a failure is an error in the log
    /// and the `decision_log_failed` alarm, never a panic.
    fn decide(&self, action: &str, params: &[(&str, String)]) {
        let Some(log) = &self.decisions else {
            return;
        };
        if let Err(e) = log.record(action, params) {
            tracing::error!(action, error = %e, "custody decision not recorded in the audit log");
            if let Err(e2) = store::raise_alarm(
                &self.db,
                "decision_log_failed",
                action,
                &format!("the audit log refused the entry: {e}"),
                self.last_now_ms,
            ) {
                tracing::error!(error = %e2, "could not raise the decision_log_failed alarm");
            }
        }
    }

    /// [`held_status`](Self::held_status), recording an approval by policy.
    fn held_status_recorded(
        &self,
        w: &WithdrawalView,
        other_used: Amount,
    ) -> Result<WithdrawalStatus, crate::StoreError> {
        let status = self.held_status(w, other_used)?;
        if status == WithdrawalStatus::Pending {
            self.decide(
                "custody.withdrawal.auto_approve",
                &[
                    ("id", w.id.to_string()),
                    ("account", w.account.to_string()),
                    ("amount_sat", w.amount.0.to_string()),
                    (
                        "reason",
                        "within the approval threshold and the hot wallet's daily limit".into(),
                    ),
                ],
            );
        }
        Ok(status)
    }

    /// Gets the hold of a `new` withdrawal settled: asks the ledger for its record first (an
    /// earlier hold may have been applied), and asks for the hold only when there is none.
    /// `Ok` when held (the row moves on); `Err(LedgerUnknown)` when the ledger did not answer
    /// or did not take the command (busy; the row stays `new`); any other error when the
    /// ledger refused the hold (the row is deleted: its id is never handed out again).
    fn settle_hold(
        &mut self,
        w: &WithdrawalView,
        other_used: Amount,
    ) -> Result<WithdrawalStatus, WithdrawalError> {
        let answer = match self.ledger.withdrawal(w.id) {
            Ok(Some(rec)) => return self.hold_found(w, &rec, other_used),
            Ok(None) => self.ledger.submit(Self::hold_of(w)),
            Err(_) => return Err(WithdrawalError::LedgerUnknown(w.id)),
        };
        match answer {
            Ok(()) => {
                let status = self.held_status_recorded(w, other_used)?;
                store::set_withdrawal_status(&self.db, w.id, status, None)?;
                Ok(status)
            }
            Err(LedgerError::Rejected(RejectCode::DuplicateWithdrawal)) => {
                match self.ledger.withdrawal(w.id) {
                    Ok(Some(rec)) => self.hold_found(w, &rec, other_used),
                    _ => Err(WithdrawalError::LedgerUnknown(w.id)),
                }
            }
            // Not taken now (the queue full, the engine halted): no refusal of the hold. The
            // row stays `new`, tried again at the next step; its caller was told the outcome
            // is unknown and custody resolves it.
            Err(LedgerError::Rejected(RejectCode::EngineBusy)) => {
                Err(WithdrawalError::LedgerUnknown(w.id))
            }
            Err(LedgerError::Rejected(code)) => {
                store::delete_new_withdrawal(&self.db, w.id)?;
                Err(match code {
                    RejectCode::InsufficientBalance => WithdrawalError::InsufficientBalance {
                        amount: w.amount,
                        fee: w.fee,
                    },
                    RejectCode::UnknownAccount => WithdrawalError::UnknownAccount(w.account),
                    other => WithdrawalError::LedgerRejected(other),
                })
            }
            Err(_) => Err(WithdrawalError::LedgerUnknown(w.id)),
        }
    }

    /// The ledger has a withdrawal with the id of `w` (a `new` row). It is our hold only when
    /// account and amounts match (`DuplicateWithdrawal` alone proves nothing).
    fn hold_found(
        &mut self,
        w: &WithdrawalView,
        rec: &Withdrawal,
        other_used: Amount,
    ) -> Result<WithdrawalStatus, WithdrawalError> {
        let subject = format!("withdrawal {}", w.id);
        if !Self::same(w, rec) {
            // Another withdrawal owns this id in the ledger (an id reused by an older version):
            // ours is certainly not held. The other's funds stay held: the operator sees it.
            self.alarm(
                "withdrawal_id_conflict",
                &subject,
                &format!(
                    "the ledger's withdrawal {} is {rec:?}, not account {} amount {} fee {}; request dropped",
                    w.id, w.account, w.amount, w.fee
                ),
            )?;
            store::delete_new_withdrawal(&self.db, w.id)?;
            return Err(WithdrawalError::LedgerMismatch(w.id));
        }
        match rec.state {
            WithdrawalState::Held => {
                let status = self.held_status_recorded(w, other_used)?;
                store::set_withdrawal_status(&self.db, w.id, status, None)?;
                Ok(status)
            }
            WithdrawalState::Released => {
                store::set_withdrawal_status(
                    &self.db,
                    w.id,
                    WithdrawalStatus::Released,
                    Some("released in the ledger"),
                )?;
                Ok(WithdrawalStatus::Released)
            }
            WithdrawalState::Completed => {
                // Completed in the ledger, yet never batched here: never pay it.
                self.alarm(
                    "withdrawal_completed_unbatched",
                    &subject,
                    "the ledger completed a withdrawal that custody never batched",
                )?;
                Err(WithdrawalError::LedgerMismatch(w.id))
            }
        }
    }

    /// Gets the release of a `releasing` withdrawal settled: asks for it (idempotent by id: a
    /// repeat is `UnknownWithdrawal`), and on any answer but *applied* asks the ledger's record.
    /// Released there: recorded as released. Still held: the release did not happen (retried).
    /// Completed or unknown to the ledger: an alarm; the row stays `releasing` (never batched).
    fn settle_release(&mut self, w: &WithdrawalView) -> Result<(), WithdrawalError> {
        let subject = format!("withdrawal {}", w.id);
        match self.ledger.submit(Command::WithdrawRelease { id: w.id }) {
            Ok(()) => {}
            Err(LedgerError::Rejected(RejectCode::UnknownWithdrawal))
            | Err(LedgerError::Unknown) => match self.ledger.withdrawal(w.id) {
                Ok(Some(rec)) if Self::same(w, &rec) => match rec.state {
                    WithdrawalState::Released => {}
                    WithdrawalState::Held => return Err(WithdrawalError::LedgerUnknown(w.id)),
                    WithdrawalState::Completed => {
                        self.alarm(
                            "withdrawal_release_after_completion",
                            &subject,
                            "a release was asked for a withdrawal the ledger completed",
                        )?;
                        return Err(WithdrawalError::LedgerMismatch(w.id));
                    }
                },
                Ok(other) => {
                    self.alarm(
                        "withdrawal_release_mismatch",
                        &subject,
                        &format!("release asked; the ledger's record is {other:?}"),
                    )?;
                    return Err(WithdrawalError::LedgerMismatch(w.id));
                }
                Err(_) => return Err(WithdrawalError::LedgerUnknown(w.id)),
            },
            Err(LedgerError::Rejected(code)) => return Err(WithdrawalError::LedgerRejected(code)),
        }
        store::set_withdrawal_status(&self.db, w.id, WithdrawalStatus::Released, None)?;
        tracing::warn!(id = %w.id, reason = ?w.reason, "withdrawal released");
        Ok(())
    }

    /// Clears an alarm once an operator dealt with it (the same kind and subject may be raised
    /// again if the cause remains). `UnknownAlarm` when there is no such alarm not cleared.
    pub fn clear_alarm(&mut self, id: u64, now: Timestamp) -> Result<(), WithdrawalError> {
        if !store::clear_alarm(&self.db, id, now.as_millis())? {
            return Err(WithdrawalError::UnknownAlarm(id));
        }
        tracing::warn!(alarm = id, "alarm cleared by an operator");
        Ok(())
    }

    /// Alarms raised by the service (money that moved in one place and not the other), oldest
    /// first; only the ones not cleared unless `all`.
    pub fn alarms(&self, all: bool) -> Result<Vec<Alarm>, WithdrawalError> {
        Ok(store::alarms(&self.db, all)?)
    }

    /// Where a freshly held withdrawal goes: it waits for approval when the account's running
    /// 24-hour total (this one included, plus `other_used`, what it sent over Lightning in that
    /// window) passes the approval threshold, or when all accounts' 24-hour on-chain total
    /// passes the hot wallet's exchange-wide limit; otherwise it waits for a batch.
    fn held_status(
        &self,
        w: &WithdrawalView,
        other_used: Amount,
    ) -> Result<WithdrawalStatus, crate::StoreError> {
        let policy = &self.config.withdrawal;
        let since = w.created_ms.saturating_sub(DAY_MS);
        let onchain = store::withdrawn_since(&self.db, w.account, since)?;
        let all = store::withdrawn_since_all(&self.db, since)?;
        // An overflowing sum is above any threshold.
        let above = onchain
            .checked_add(other_used)
            .is_none_or(|t| t > policy.approval_threshold);
        Ok(if above || all > policy.hot_wallet_daily_limit {
            WithdrawalStatus::AwaitingApproval
        } else {
            WithdrawalStatus::Pending
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CustodyConfig {
        &self.config
    }

    /// The wallet's tip height.
    pub fn tip_height(&self) -> u32 {
        self.wallet.latest_checkpoint().height()
    }

    /// The wallet's tip block hash.
    pub fn tip_hash(&self) -> bitcoin::BlockHash {
        self.wallet.latest_checkpoint().hash()
    }

    /// The wallet's balance.
    pub fn balance(&self) -> bdk_wallet::Balance {
        self.wallet.balance()
    }

    /// A transaction of the wallet as it is in the wallet's canonical view, with its confirmations.
    pub fn transaction(&self, txid: Txid) -> Option<(Arc<Transaction>, u32)> {
        let tip = self.tip_height();
        self.wallet
            .get_tx(txid)
            .map(|t| (t.tx_node.tx.clone(), confirmations(&t.chain_position, tip)))
    }

    /// The confirmations (0: unconfirmed) of those of `txids` that are in the wallet's canonical
    /// view, in one pass over it. `Wallet::get_tx` canonicalises the whole transaction graph at
    /// each call: one call per deposit or batch made every step quadratic in the wallet's
    /// history (measured, debug build: 1,000 look-ups in a 1,000-transaction wallet 11 s,
    /// 4,000 in 4,000 193 s), under the custody lock.
    /// The batches in flight with their versions, and the confirmations of every version the
    /// wallet has in view (one canonicalization for all).
    fn inflight_in_view(&self) -> Result<(Vec<Inflight>, HashMap<Txid, u32>), StoreError> {
        let mut inflight = Vec::new();
        for batch in store::inflight_batches(&self.db)? {
            inflight.push((batch, store::batch_txs(&self.db, batch)?));
        }
        let view = self.in_view(
            &inflight
                .iter()
                .flat_map(|(_, txs)| txs.iter().map(|t| t.txid))
                .collect(),
        );
        Ok((inflight, view))
    }

    /// [`in_view`](Self::in_view) for the read-only history queries: from the view last built
    /// for them while the chain's tip, the wallet's transactions and `view_changes` are what
    /// they were (every change of the wallet's view moves one of them), else built anew.
    fn history_in_view(&self, txids: &HashSet<Txid>) -> HashMap<Txid, u32> {
        if txids.is_empty() {
            return HashMap::new();
        }
        let key = (
            self.wallet.latest_checkpoint().hash(),
            self.wallet.tx_graph().full_txs().count(),
            self.view_changes,
        );
        let mut cached = self.history_view.lock().unwrap_or_else(|e| e.into_inner());
        let view = match cached.as_ref() {
            Some(h) if h.key == key => Arc::clone(&h.view),
            _ => {
                let tip = self.tip_height();
                let view: Arc<HashMap<Txid, u32>> = Arc::new(
                    self.wallet
                        .transactions()
                        .map(|t| (t.tx_node.txid, confirmations(&t.chain_position, tip)))
                        .collect(),
                );
                let builds = cached.as_ref().map_or(0, |h| h.builds) + 1;
                *cached = Some(HistoryView {
                    key,
                    view: Arc::clone(&view),
                    builds,
                });
                view
            }
        };
        drop(cached);
        txids
            .iter()
            .filter_map(|t| view.get(t).map(|c| (*t, *c)))
            .collect()
    }

    /// How many times the history queries' view was built (for tests and metrics).
    pub fn history_view_builds(&self) -> u64 {
        self.history_view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, |h| h.builds)
    }

    fn in_view(&self, txids: &HashSet<Txid>) -> HashMap<Txid, u32> {
        if txids.is_empty() {
            return HashMap::new();
        }
        let tip = self.tip_height();
        self.wallet
            .transactions()
            .filter(|t| txids.contains(&t.tx_node.txid))
            .map(|t| (t.tx_node.txid, confirmations(&t.chain_position, tip)))
            .collect()
    }

    // -----------------------------------------------------------------------------------------
    // Deposit addresses

    /// A new deposit address for `account` (its older ones keep working).
    pub fn new_deposit_address(
        &mut self,
        account: AccountId,
        now: Timestamp,
    ) -> Result<Address, DepositAddressError> {
        let mut v = self.new_deposit_addresses(account, 1, now)?;
        v.pop()
            .ok_or(DepositAddressError::Store(crate::StoreError::Corrupt(
                "no address revealed".into(),
            )))
    }

    /// `count` new deposit addresses for `account` at once (one wallet persist, one database
    /// transaction), e.g. to pre-generate them.
    pub fn new_deposit_addresses(
        &mut self,
        account: AccountId,
        count: u32,
        now: Timestamp,
    ) -> Result<Vec<Address>, DepositAddressError> {
        self.reveal_addresses(account, count, store::AddressPurpose::Deposit, now)
    }

    /// A new address for one merchant invoice of `account`. Payments to it are credited to the
    /// account like deposits, but it is never shown as the account's deposit address (so the
    /// merchant's own deposits cannot land on an invoice).
    pub fn new_invoice_address(
        &mut self,
        account: AccountId,
        now: Timestamp,
    ) -> Result<Address, DepositAddressError> {
        let mut v = self.reveal_addresses(account, 1, store::AddressPurpose::Invoice, now)?;
        v.pop()
            .ok_or(DepositAddressError::Store(crate::StoreError::Corrupt(
                "no address revealed".into(),
            )))
    }

    fn reveal_addresses(
        &mut self,
        account: AccountId,
        count: u32,
        purpose: store::AddressPurpose,
        now: Timestamp,
    ) -> Result<Vec<Address>, DepositAddressError> {
        if !self.ledger.account_exists(account) {
            return Err(DepositAddressError::UnknownAccount(account));
        }
        if count == 0 {
            return Ok(Vec::new());
        }
        let next = self.wallet.next_derivation_index(KeychainKind::External);
        let last = next.saturating_add(count - 1);
        let infos: Vec<_> = self
            .wallet
            .reveal_addresses_to(KeychainKind::External, last)
            .collect();
        // The revealed indexes are durable before they are handed out, so never reused.
        self.wallet.persist(&mut self.db)?;
        let rows: Vec<(u32, String)> = infos
            .iter()
            .map(|i| (i.index, i.address.to_string()))
            .collect();
        store::insert_deposit_addresses(&mut self.db, account, &rows, purpose, now.as_millis())?;
        Ok(infos.into_iter().map(|i| i.address).collect())
    }

    /// The deposit addresses of `account`, oldest first.
    pub fn deposit_addresses(
        &self,
        account: AccountId,
    ) -> Result<Vec<String>, DepositAddressError> {
        Ok(store::addresses_of(&self.db, account)?)
    }

    /// The deposits of `account` (all accounts with `None`) that the service has seen, with their
    /// confirmations now: pending ones (mempool or below the threshold), credited and reorged.
    pub fn deposits(&self, account: Option<AccountId>) -> Result<Vec<DepositView>, DepositError> {
        let rows = match account {
            Some(a) => store::deposits_of_account(&self.db, a)?,
            None => store::deposits(&self.db)?,
        };
        let view = self.history_in_view(&rows.iter().map(|d| d.outpoint.txid).collect());
        let mut out = Vec::with_capacity(rows.len());
        for d in rows {
            let in_view = view.get(&d.outpoint.txid).copied();
            let confirmations = in_view.unwrap_or(0);
            // A pending deposit whose transaction left the mempool unconfirmed (replaced by a
            // fee bump, double-spent) is not a payment on its way: never shown as one.
            let status = match d.status {
                DepositStatus::Pending if in_view.is_none() => DepositStatus::Dropped,
                s => s,
            };
            out.push(DepositView {
                account: d.account,
                outpoint: d.outpoint,
                amount: d.amount,
                status,
                confirmations,
                first_seen_ms: d.first_seen_ms,
            });
        }
        Ok(out)
    }

    /// An output of any transaction the wallet has seen, in its view or not (a deposit that was
    /// replaced still has its address).
    pub fn output(&self, outpoint: OutPoint) -> Option<bitcoin::TxOut> {
        self.wallet.tx_graph().get_txout(outpoint).cloned()
    }

    /// Clears an account's flags (an operator reviewed it): it may withdraw again.
    pub fn clear_flag(
        &mut self,
        account: AccountId,
        now: Timestamp,
    ) -> Result<(), WithdrawalError> {
        let debt = store::debt_of(&self.db, account)?;
        if !debt.is_zero() {
            return Err(WithdrawalError::InDebt { account, debt });
        }
        if store::clear_flags(&self.db, account, now.as_millis())? == 0 {
            return Err(WithdrawalError::NotFlagged(account));
        }
        tracing::warn!(%account, "account flag cleared by an operator");
        Ok(())
    }

    /// Writes an account's debt off (an operator decided the exchange bears it): what it owed
    /// beyond a collection in progress is forgotten, and its flag may then be cleared. Returns
    /// what was written off. Recorded as `custody.debt.write_off`.
    pub fn write_off_debt(
        &mut self,
        account: AccountId,
        now: Timestamp,
    ) -> Result<Amount, WithdrawalError> {
        self.last_now_ms = self.last_now_ms.max(now.as_millis());
        let debt = store::debt_of(&self.db, account)?;
        let collecting = store::open_collection(&self.db, account)?.map_or(0, |r| r.amount.0);
        let forgiven = Amount(debt.0.saturating_sub(collecting));
        if forgiven.is_zero() {
            return Err(WithdrawalError::NoDebt(account));
        }
        store::set_debt(&self.db, account, Amount(debt.0 - forgiven.0))?;
        // Recovered from the reversed deposit if it is confirmed after all.
        let written_off = store::written_off_of(&self.db, account)?;
        let written_off = written_off
            .checked_add(forgiven)
            .ok_or_else(|| crate::StoreError::Corrupt("written-off total overflows".into()))?;
        store::set_written_off(&self.db, account, written_off)?;
        tracing::warn!(%account, %forgiven, "debt written off by an operator");
        self.decide(
            "custody.debt.write_off",
            &[
                ("account", account.to_string()),
                ("amount_sat", forgiven.0.to_string()),
            ],
        );
        Ok(forgiven)
    }

    /// What accounts owe custody: reversals of double-spent deposits their balances could not
    /// cover, less what their later deposits paid. By account; accounts that owe nothing left out.
    pub fn debts(&self) -> Result<Vec<(AccountId, Amount)>, DepositError> {
        Ok(store::debts(&self.db)?)
    }

    /// Accounts flagged for review (not cleared), with the reason (a credited deposit that a reorg removed).
    pub fn flagged_accounts(&self) -> Result<Vec<(AccountId, String)>, DepositError> {
        Ok(store::flagged(&self.db)?)
    }

    // -----------------------------------------------------------------------------------------
    // Chain sync

    fn client(&self) -> Result<Client, String> {
        let auth = match &self.config.rpc.auth {
            RpcAuth::CookieFile(p) => Auth::CookieFile(p.clone()),
            RpcAuth::UserPass { user, password } => Auth::UserPass(user.clone(), password.clone()),
        };
        Client::new(&self.config.rpc.url, auth).map_err(rpc_err)
    }

    fn connect(&mut self) -> Result<&mut Rpc, String> {
        if self.rpc.is_none() {
            let client = Arc::new(self.client()?);
            // Fail fast (and stay disconnected) when bitcoind is not there yet.
            client.get_block_count().map_err(rpc_err)?;
            let unconfirmed: Vec<Arc<Transaction>> = self
                .wallet
                .transactions()
                .filter(|t| t.chain_position.is_unconfirmed())
                .map(|t| t.tx_node.tx.clone())
                .collect();
            let emitter = Emitter::new(
                client.clone(),
                self.wallet.latest_checkpoint(),
                self.config.sync_start_height,
                unconfirmed,
            );
            tracing::info!(url = %self.config.rpc.url, "connected to bitcoind");
            self.rpc = Some(Rpc { client, emitter });
        }
        self.rpc.as_mut().ok_or_else(|| "not connected".to_owned())
    }

    fn disconnect(&mut self, why: &str) {
        if self.rpc.take().is_some() {
            tracing::warn!(reason = why, "lost bitcoind; will reconnect");
        }
    }

    /// Brings the wallet to bitcoind's best chain (blocks, following reorgs) and mempool, and
    /// persists it. On an RPC error the connection is dropped and made again on the next call.
    pub fn sync_once(&mut self, now: Timestamp) -> Result<SyncReport, SyncError> {
        let mut report = SyncReport::default();
        let mut result = self.sync_inner(now, &mut report);
        if result.is_ok() {
            result = self.keep_batches_in_view(now);
        }
        // Persist what was applied even when the node went away half-way.
        self.wallet.persist(&mut self.db)?;
        match result {
            Ok(()) => {
                report.tip_height = self.tip_height();
                Ok(report)
            }
            Err(e) => {
                let msg = e.to_string();
                self.disconnect(&msg);
                Err(e)
            }
        }
    }

    fn sync_inner(&mut self, now: Timestamp, report: &mut SyncReport) -> Result<(), SyncError> {
        self.connect().map_err(SyncError::Rpc)?;
        let Self {
            rpc,
            wallet,
            db,
            view_changes,
            ..
        } = self;
        let Some(rpc) = rpc.as_mut() else {
            return Err(SyncError::Rpc("not connected".into()));
        };
        loop {
            match rpc.emitter.next_block() {
                Ok(Some(ev)) => {
                    wallet
                        .apply_block_connected_to(&ev.block, ev.block_height(), ev.connected_to())
                        .map_err(|e| SyncError::Connect(e.to_string()))?;
                    report.blocks += 1;
                    if report.blocks % 256 == 0 {
                        wallet.persist(db)?;
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(SyncError::Rpc(rpc_err(e))),
            }
        }
        let mempool = rpc
            .emitter
            .mempool_at(now.as_millis() / 1000)
            .map_err(|e| SyncError::Rpc(rpc_err(e)))?;
        report.mempool_txs = mempool.update.len();
        report.evicted = mempool.evicted.len();
        wallet.apply_evicted_txs(mempool.evicted);
        wallet.apply_unconfirmed_txs(mempool.update);
        *view_changes = view_changes.wrapping_add(1);
        Ok(())
    }

    /// Puts back in the wallet's view the newest transaction of every batch in flight that has
    /// no version there: one the node does not have (it refused it, or dropped it from its
    /// mempool) is reported as evicted by the first mempool sync of a connection that expected
    /// it (every restart and reconnection), and one recorded just before a crash may never have
    /// reached the wallet. We keep broadcasting it, so its inputs are spent for us until a
    /// version confirms (as a wallet keeps its own unconfirmed transaction's inputs spent until
    /// it is abandoned): otherwise the next batch spends them, the two conflict, and once that
    /// one confirms this batch never can (its withdrawals stay held and batched for good), and
    /// it cannot be fee-bumped either (the wallet no longer has it). A version that lost to a
    /// confirmed conflict is not put back (it was not evicted: the wallet leaves it out).
    ///
    /// The same for a completed batch whose confirmed transaction a reorg took out of the chain
    /// ([`reorged_batches`](Self::reorged_batches)): the ledger paid its withdrawals, so that
    /// transaction is kept and broadcast again until it confirms.
    fn keep_batches_in_view(&mut self, now: Timestamp) -> Result<(), SyncError> {
        let (inflight, view) = self.inflight_in_view()?;
        let mut kept = Vec::new();
        for (batch, txs) in inflight {
            if txs.iter().any(|t| view.contains_key(&t.txid)) {
                continue;
            }
            if let Some(latest) = txs.last().cloned() {
                kept.push((batch, txs, latest));
            }
        }
        let reorged = self.reorged_batches()?;
        let reorged_view = self.in_view(&reorged.iter().map(|(_, _, paid)| paid.txid).collect());
        kept.extend(
            reorged
                .into_iter()
                .filter(|(_, _, paid)| !reorged_view.contains_key(&paid.txid)),
        );
        for (batch, txs, latest) in kept {
            let latest = &latest;
            let graph = self.wallet.tx_graph();
            let evicted = match graph.get_tx_node(latest.txid) {
                None => true,
                Some(node) => graph
                    .get_last_evicted(latest.txid)
                    .is_some_and(|e| node.last_seen.is_none_or(|s| e >= s)),
            };
            if !evicted {
                continue;
            }
            let tx: Transaction = encode::deserialize(&latest.raw).map_err(|e| {
                SyncError::Store(crate::StoreError::Corrupt(format!(
                    "stored batch transaction {}: {e}",
                    latest.txid
                )))
            })?;
            let seen = graph
                .get_last_evicted(latest.txid)
                .map_or(0, |e| e.saturating_add(1))
                .max(self.last_seen_floor(&txs, now));
            tracing::warn!(batch, txid = %latest.txid, "batch transaction not in the node's mempool; kept as pending (its coins stay spent) and broadcast again");
            self.wallet.apply_unconfirmed_txs([(tx, seen)]);
            self.view_changes = self.view_changes.wrapping_add(1);
        }
        Ok(())
    }

    /// Completed batches (of the newest [`REORG_WATCHED_BATCHES`]) none of whose versions is
    /// confirmed in the wallet's view: a reorg took the confirmed one out of the chain. Each with
    /// its versions and the one that confirmed (the ledger completed its withdrawals with that
    /// version's fee: it is the one broadcast again).
    fn reorged_batches(&self) -> Result<Vec<(u64, Vec<BatchTx>, BatchTx)>, crate::StoreError> {
        let mut batches = Vec::new();
        for (batch, confirmed) in store::recent_completed_batches(&self.db, REORG_WATCHED_BATCHES)?
        {
            batches.push((batch, confirmed, store::batch_txs(&self.db, batch)?));
        }
        let view = self.in_view(
            &batches
                .iter()
                .flat_map(|(_, _, txs)| txs.iter().map(|t| t.txid))
                .collect(),
        );
        let mut out = Vec::new();
        for (batch, confirmed, txs) in batches {
            let in_chain = txs
                .iter()
                .any(|t| view.get(&t.txid).is_some_and(|c| *c > 0));
            if in_chain {
                continue;
            }
            if let Some(paid) = txs.iter().find(|t| t.txid == confirmed).cloned() {
                out.push((batch, txs, paid));
            }
        }
        Ok(out)
    }

    // -----------------------------------------------------------------------------------------
    // Deposits

    /// Finds payments to deposit addresses and credits each, once, when it reaches the configured
    /// confirmations. A credited deposit that a reorg took out of the chain is reported, and its
    /// account flagged.
    ///
    /// Runs in a database transaction that is committed before each credit is asked for, with
    /// the deposit marked `crediting`: a crash or a lost answer after that leaves a deposit that
    /// is maybe credited, credited again once confirmed (the ledger takes a repeat as a duplicate:
    /// credits are keyed by outpoint) or, if a reorg took it away meanwhile, asked about; credited,
    /// it is reorged and its account flagged like any credited deposit that left the chain.
    pub fn process_deposits(&mut self, now: Timestamp) -> Result<DepositReport, DepositError> {
        let sql = |e| DepositError::Store(crate::StoreError::Sqlite(e));
        self.db.execute_batch("BEGIN IMMEDIATE").map_err(sql)?;
        match self.process_deposits_inner(now) {
            Ok(report) => {
                self.db.execute_batch("COMMIT").map_err(sql)?;
                Ok(report)
            }
            Err(e) => {
                let _ = self.db.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// When the transaction `txid` replaced (double-spent) transactions whose deposits to
    /// `output`'s address are known and add up to at least what `txid` pays that address (all
    /// its outputs to it together: a replacement that splits or raises the payment is new, not
    /// the old one): the earliest time one of those was first seen. `None` otherwise.
    fn replaced_payment_seen(
        &self,
        output: &bdk_wallet::bitcoin::TxOut,
        txid: bdk_wallet::bitcoin::Txid,
        known: &HashMap<OutPoint, store::DepositRow>,
    ) -> Option<u64> {
        let graph = self.wallet.tx_graph();
        let tx = graph.get_tx(txid)?;
        let (mut paid, mut earliest) = (0u64, None::<u64>);
        let mut replaced: Vec<_> = graph.direct_conflicts(&tx).map(|(_, t)| t).collect();
        replaced.sort_unstable();
        replaced.dedup();
        for old in replaced {
            let Some(old_tx) = graph.get_tx(old) else {
                continue;
            };
            for (vout, o) in old_tx.output.iter().enumerate() {
                if o.script_pubkey != output.script_pubkey {
                    continue;
                }
                let Ok(vout) = u32::try_from(vout) else {
                    continue;
                };
                if let Some(d) = known.get(&OutPoint { txid: old, vout }) {
                    paid = paid.saturating_add(d.amount.0);
                    earliest = Some(earliest.map_or(d.first_seen_ms, |e| e.min(d.first_seen_ms)));
                }
            }
        }
        let pays: u64 = tx
            .output
            .iter()
            .filter(|o| o.script_pubkey == output.script_pubkey)
            .fold(0u64, |sum, o| sum.saturating_add(o.value.to_sat()));
        earliest.filter(|_| paid >= pays)
    }

    fn process_deposits_inner(&mut self, now: Timestamp) -> Result<DepositReport, DepositError> {
        let tip = self.tip_height();
        let required = self.config.deposit_confirmations.max(1);
        let accounts: HashMap<u32, AccountId> =
            store::deposit_indexes(&self.db)?.into_iter().collect();
        let known: HashMap<OutPoint, store::DepositRow> = store::deposits(&self.db)?
            .into_iter()
            .map(|d| (d.outpoint, d))
            .collect();
        let mut present = HashSet::new();
        let mut report = DepositReport::default();
        let outputs: Vec<_> = self
            .wallet
            .list_output()
            .filter(|o| o.keychain == KeychainKind::External)
            .filter_map(|o| accounts.get(&o.derivation_index).map(|a| (*a, o)))
            .collect();
        for (account, out) in outputs {
            let event = DepositEvent {
                account,
                outpoint: out.outpoint,
                amount: sats(out.txout.value),
                confirmations: confirmations(&out.chain_position, tip),
            };
            present.insert(out.outpoint);
            let (status, netted) = match known.get(&out.outpoint) {
                Some(d) => (d.status, d.netted),
                None => {
                    // First seen: now, or its block's time if it is first seen in a block
                    // (custody or its node was away when it was paid): an invoice paid on
                    // time is not paid late because custody looked late (review). Never later
                    // than now (a block's time may run up to two hours ahead).
                    let seen = match out.chain_position {
                        ChainPosition::Confirmed { anchor, .. } => now
                            .as_millis()
                            .min(anchor.confirmation_time.saturating_mul(1000)),
                        ChainPosition::Unconfirmed { .. } => now.as_millis(),
                    };
                    // A replacement (RBF) of a payment seen earlier is that payment, seen when
                    // it was: a fee bump after an invoice's expiry does not make an on-time
                    // payment late. Only when what the replaced transactions paid this address
                    // covers the new amount: a payer cannot announce a token payment on time
                    // and raise it at leisure to the price of then.
                    let seen = self
                        .replaced_payment_seen(&out.txout, out.outpoint.txid, &known)
                        .map_or(seen, |earlier| earlier.min(seen));
                    store::insert_deposit(&self.db, out.outpoint, account, event.amount, seen)?;
                    tracing::info!(%account, outpoint = %out.outpoint, amount = %event.amount, "deposit seen");
                    report.seen.push(event);
                    (DepositStatus::Pending, Amount::ZERO)
                }
            };
            // A coinbase output can be spent only after COINBASE_MATURITY blocks: not credited
            // before (a reorg of those blocks would take it back for good).
            let coinbase = self
                .wallet
                .tx_graph()
                .get_tx(out.outpoint.txid)
                .is_some_and(|t| t.is_coinbase());
            let needed = if coinbase {
                required.max(COINBASE_MATURITY)
            } else {
                required
            };
            match status {
                DepositStatus::Pending | DepositStatus::Crediting
                    if event.confirmations >= needed =>
                {
                    let key = IdempotencyKey::outpoint(
                        out.outpoint.txid.to_byte_array(),
                        out.outpoint.vout,
                    );
                    // The intent first, committed: if the answer is lost or the process stops
                    // before the credit is recorded, the deposit is known to be maybe credited,
                    // and is resolved by asking the ledger even if a reorg then takes it out of
                    // the chain (a pending deposit is never asked about). With it, the part
                    // that pays the account's debt (a reversal its balance could not cover).
                    let mut netted = netted;
                    if status == DepositStatus::Pending {
                        netted = self.uncollected_debt(account)?.min(event.amount);
                        if !netted.is_zero() {
                            let debt = store::debt_of(&self.db, account)?;
                            store::set_debt(&self.db, account, Amount(debt.0 - netted.0))?;
                            store::set_deposit_netted(&self.db, out.outpoint, netted)?;
                            tracing::warn!(%account, outpoint = %out.outpoint, %netted,
                                "deposit pays the account's debt first");
                        }
                        store::set_deposit_status(
                            &self.db,
                            out.outpoint,
                            DepositStatus::Crediting,
                        )?;
                    }
                    self.db
                        .execute_batch("COMMIT; BEGIN IMMEDIATE")
                        .map_err(|e| DepositError::Store(crate::StoreError::Sqlite(e)))?;
                    let to_credit = Amount(event.amount.0 - netted.0);
                    if to_credit.is_zero() {
                        // All of it paid the debt: nothing to ask the ledger.
                        store::set_deposit_status(&self.db, out.outpoint, DepositStatus::Credited)?;
                        report.credited.push(event);
                        continue;
                    }
                    let credit = Command::Credit {
                        account,
                        asset: BTC,
                        amount: to_credit,
                        key,
                    };
                    // Credit is idempotent by key: only an applied (or duplicate) answer marks
                    // the deposit credited; refused, it is pending again; unknown, it stays
                    // `crediting` and is asked again at the next step.
                    match self.ledger.submit(credit) {
                        Ok(()) => {
                            store::set_deposit_status(
                                &self.db,
                                out.outpoint,
                                DepositStatus::Credited,
                            )?;
                            tracing::info!(%account, outpoint = %out.outpoint, amount = %event.amount, "deposit credited");
                            report.credited.push(event);
                        }
                        // Not taken now; an earlier try may have been applied: tried again
                        // as it is (same key, same amount) next step.
                        Err(LedgerError::Rejected(RejectCode::EngineBusy)) => {
                            report.unresolved.push(event);
                        }
                        // Refused; given up only once the ledger says no try was applied (a
                        // netted credit's amount follows the debt, so a later try may differ).
                        Err(LedgerError::Rejected(code)) => match self.ledger.credited(key) {
                            Ok(true) => {
                                store::set_deposit_status(
                                    &self.db,
                                    out.outpoint,
                                    DepositStatus::Credited,
                                )?;
                                report.credited.push(event);
                            }
                            Ok(false) => {
                                self.uncredit(account, out.outpoint, netted)?;
                                tracing::error!(%account, outpoint = %out.outpoint, %code, "ledger refused a deposit credit");
                                report.rejected.push((event, code));
                            }
                            Err(_) => report.unresolved.push(event),
                        },
                        Err(_) => {
                            tracing::warn!(%account, outpoint = %out.outpoint, "deposit credit outcome unknown; asked again next step");
                            report.unresolved.push(event);
                        }
                    }
                }
                DepositStatus::Credited if event.confirmations == 0 => {
                    self.deposit_reorged(event, now)?;
                    report.reorged.push(event);
                }
                // Maybe credited, and no longer confirmed enough (a reorg): ask the ledger.
                DepositStatus::Crediting => self.resolve_crediting(event, now, &mut report)?,
                DepositStatus::Reorged if event.confirmations >= required => {
                    store::set_deposit_status(&self.db, out.outpoint, DepositStatus::Credited)?;
                    tracing::warn!(%account, outpoint = %out.outpoint, "reorged deposit confirmed again; not credited twice");
                    report.reconfirmed.push(event);
                }
                // A reversal goes on to its end whatever the chain does meanwhile (a deposit
                // confirmed again after it is credited again).
                DepositStatus::Reversing => self.go_on_reversing(event, now, &mut report)?,
                DepositStatus::Reversed if event.confirmations >= needed => {
                    let d = &known[&out.outpoint];
                    self.recredit(d, event, &mut report)?;
                }
                DepositStatus::Recrediting => {
                    let d = &known[&out.outpoint];
                    self.submit_recredit(d, event, &mut report)?;
                }
                _ => {}
            }
        }
        // A credited (or maybe credited) deposit whose transaction left the wallet's view
        // entirely (double-spent).
        for d in store::deposits(&self.db)? {
            if present.contains(&d.outpoint) {
                continue;
            }
            let event = DepositEvent {
                account: d.account,
                outpoint: d.outpoint,
                amount: d.amount,
                confirmations: 0,
            };
            // Out of the wallet's view: a credit of it is taken back once bitcoind shows a
            // conflicting transaction replaced it (double-spent), not for an eviction alone.
            match d.status {
                DepositStatus::Credited => {
                    self.deposit_reorged(event, now)?;
                    report.reorged.push(event);
                    if self.double_spent(d.outpoint) {
                        self.start_reversal(event, now, &mut report)?;
                    }
                }
                DepositStatus::Reorged if self.double_spent(d.outpoint) => {
                    self.start_reversal(event, now, &mut report)?
                }
                DepositStatus::Reversing => self.go_on_reversing(event, now, &mut report)?,
                DepositStatus::Recrediting => self.submit_recredit(&d, event, &mut report)?,
                DepositStatus::Crediting => self.resolve_crediting(event, now, &mut report)?,
                _ => {}
            }
        }
        self.collect_debts(now, &mut report)?;
        Ok(report)
    }

    /// A credit certainly not applied: the deposit is pending again, and the part of it that
    /// was to pay the account's debt is owed again.
    fn uncredit(
        &mut self,
        account: AccountId,
        outpoint: OutPoint,
        netted: Amount,
    ) -> Result<(), DepositError> {
        if !netted.is_zero() {
            let debt = store::debt_of(&self.db, account)?;
            let back = debt.checked_add(netted).ok_or(DepositError::Overflow)?;
            store::set_debt(&self.db, account, back)?;
            store::set_deposit_netted(&self.db, outpoint, Amount::ZERO)?;
            let now = Timestamp::from_millis(self.last_now_ms);
            self.ensure_flagged(
                account,
                "a deposit that was to pay the account's debt was not credited: it owes again",
                now,
            )?;
        }
        store::set_deposit_status(&self.db, outpoint, DepositStatus::Pending)?;
        Ok(())
    }

    /// Starts taking back a credited deposit whose transaction was double-spent: as much of its
    /// amount as the account has available (a hold, then its completion, with no fee), the rest
    /// as the account's debt. The reversal's row is committed before the hold is asked.
    fn start_reversal(
        &mut self,
        event: DepositEvent,
        now: Timestamp,
        report: &mut DepositReport,
    ) -> Result<(), DepositError> {
        // Flagged first (an operator may have cleared the reorg's flag): no money out while
        // the balance is read and taken.
        let reason = format!(
            "credited deposit {} of {} sat double-spent: being taken back",
            event.outpoint, event.amount
        );
        self.ensure_flagged(event.account, &reason, now)?;
        let available = match self.ledger.btc_available(event.account) {
            Ok(a) => a,
            Err(_) => {
                report.unresolved.push(event);
                return Ok(());
            }
        };
        let take = available.min(event.amount);
        if take.is_zero() {
            return self.finish_reversal(event, Amount::ZERO, now, report);
        }
        store::insert_reversal(
            &self.db,
            Some(event.outpoint),
            event.account,
            take,
            now.as_millis(),
        )?;
        store::set_deposit_status(&self.db, event.outpoint, DepositStatus::Reversing)?;
        self.db
            .execute_batch("COMMIT; BEGIN IMMEDIATE")
            .map_err(|e| DepositError::Store(crate::StoreError::Sqlite(e)))?;
        self.go_on_reversing(event, now, report)
    }

    /// Moves a reversal on from where its row says it is.
    fn go_on_reversing(
        &mut self,
        event: DepositEvent,
        now: Timestamp,
        report: &mut DepositReport,
    ) -> Result<(), DepositError> {
        let Some(row) = store::open_reversal(&self.db, event.outpoint)? else {
            // No reversal in progress (cannot happen: the row and the status are written in one
            // transaction): start again.
            store::set_deposit_status(&self.db, event.outpoint, DepositStatus::Reorged)?;
            return self.start_reversal(event, now, report);
        };
        let subject = format!("deposit {}", event.outpoint);
        match self.take_back(&row, event.account, &subject)? {
            TakeBack::Done => self.finish_reversal(event, row.amount, now, report),
            TakeBack::Waiting => {
                report.unresolved.push(event);
                Ok(())
            }
            TakeBack::Refused => {
                // Started again, from what is available then, at the next step.
                store::set_deposit_status(&self.db, event.outpoint, DepositStatus::Reorged)?;
                Ok(())
            }
        }
    }

    /// Takes `row.amount` out of `account`'s balance: a hold with no fee, then its completion,
    /// from where the row says it is. An unknown answer is resolved by asking the engine about
    /// the row's id, never assumed; `Done` marks the row done.
    fn take_back(
        &mut self,
        row: &store::ReversalRow,
        account: AccountId,
        subject: &str,
    ) -> Result<TakeBack, DepositError> {
        let id = crate::reversal_id(row.id);
        if row.state == store::ReversalState::Holding {
            let hold = Command::WithdrawHold {
                account,
                asset: BTC,
                amount: row.amount,
                fee: Amount::ZERO,
                id,
            };
            match self.ledger.submit(hold) {
                Ok(()) => {}
                Err(LedgerError::Rejected(RejectCode::DuplicateWithdrawal)) => {
                    match self.ledger.withdrawal(id) {
                        Ok(Some(w))
                            if w.account == account
                                && w.amount == row.amount
                                && w.fee.is_zero()
                                && w.state != WithdrawalState::Released =>
                        {
                            if w.state == WithdrawalState::Completed {
                                store::set_reversal_state(&self.db, row.id, "done")?;
                                return Ok(TakeBack::Done);
                            }
                        }
                        Ok(other) => {
                            self.alarm(
                                "reversal_mismatch",
                                subject,
                                &format!("the ledger's record of {} is {other:?}", id.0),
                            )?;
                            return Ok(TakeBack::Waiting);
                        }
                        Err(_) => return Ok(TakeBack::Waiting),
                    }
                }
                // Not taken now: an earlier try of this hold may still have been applied (its
                // answer lost, or the `held` mark rolled back by a stop), so the engine is asked
                // before the row is given up.
                Err(LedgerError::Rejected(RejectCode::EngineBusy)) => return Ok(TakeBack::Waiting),
                Err(LedgerError::Rejected(code)) => match self.ledger.withdrawal(id) {
                    Ok(None) => {
                        // Nothing held (the balance moved): tried again from what is there.
                        tracing::warn!(%account, subject, %code, "reversal hold refused; tried again next step");
                        store::set_reversal_state(&self.db, row.id, "refused")?;
                        return Ok(TakeBack::Refused);
                    }
                    Ok(Some(w)) => {
                        self.alarm(
                            "reversal_mismatch",
                            subject,
                            &format!(
                                "hold refused ({code}); the ledger's record of {} is {w:?}",
                                id.0
                            ),
                        )?;
                        return Ok(TakeBack::Waiting);
                    }
                    Err(_) => return Ok(TakeBack::Waiting),
                },
                Err(LedgerError::Unknown) => return Ok(TakeBack::Waiting),
            }
            store::set_reversal_state(&self.db, row.id, "held")?;
        }
        let complete = Command::WithdrawComplete {
            id,
            network_fee: Amount::ZERO,
        };
        let done = match self.ledger.submit(complete) {
            Ok(()) => true,
            Err(LedgerError::Rejected(RejectCode::UnknownWithdrawal)) => {
                match self.ledger.withdrawal(id) {
                    Ok(Some(w)) if w.state == WithdrawalState::Completed => true,
                    Ok(other) => {
                        self.alarm(
                            "reversal_mismatch",
                            subject,
                            &format!("held here; the ledger's record of {} is {other:?}", id.0),
                        )?;
                        false
                    }
                    Err(_) => false,
                }
            }
            Err(_) => false,
        };
        if done {
            store::set_reversal_state(&self.db, row.id, "done")?;
            Ok(TakeBack::Done)
        } else {
            Ok(TakeBack::Waiting)
        }
    }

    /// What `account` owes beyond a collection in progress (which will pay its part).
    fn uncollected_debt(&self, account: AccountId) -> Result<Amount, DepositError> {
        let debt = store::debt_of(&self.db, account)?;
        let collecting = store::open_collection(&self.db, account)?.map_or(0, |r| r.amount.0);
        Ok(Amount(debt.0.saturating_sub(collecting)))
    }

    /// Collects accounts' debts from what their balances hold now (the orders a flag cancelled
    /// after the reversal, transfers received since), one hold-and-complete per account at a
    /// time, the row committed before the hold is asked.
    fn collect_debts(
        &mut self,
        now: Timestamp,
        report: &mut DepositReport,
    ) -> Result<(), DepositError> {
        for (account, debt) in store::debts(&self.db)? {
            let row = match store::open_collection(&self.db, account)? {
                Some(row) => row,
                None => {
                    let Ok(available) = self.ledger.btc_available(account) else {
                        continue;
                    };
                    let take = available.min(debt);
                    if take.is_zero() {
                        continue;
                    }
                    let id =
                        store::insert_reversal(&self.db, None, account, take, now.as_millis())?;
                    self.db
                        .execute_batch("COMMIT; BEGIN IMMEDIATE")
                        .map_err(|e| DepositError::Store(crate::StoreError::Sqlite(e)))?;
                    store::ReversalRow {
                        id,
                        amount: take,
                        state: store::ReversalState::Holding,
                    }
                }
            };
            let subject = format!("debt of account {account}");
            if self.take_back(&row, account, &subject)? == TakeBack::Done {
                let debt = store::debt_of(&self.db, account)?;
                store::set_debt(
                    &self.db,
                    account,
                    Amount(debt.0.saturating_sub(row.amount.0)),
                )?;
                tracing::warn!(%account, amount = %row.amount, "debt collected from the balance");
                self.decide(
                    "custody.debt.collect",
                    &[
                        ("account", account.to_string()),
                        ("amount_sat", row.amount.0.to_string()),
                    ],
                );
                report.collected.push((account, row.amount));
            }
        }
        Ok(())
    }

    /// A reversal done: `taken` left the balance, the rest of the deposit is the account's debt.
    fn finish_reversal(
        &mut self,
        event: DepositEvent,
        taken: Amount,
        now: Timestamp,
        report: &mut DepositReport,
    ) -> Result<(), DepositError> {
        let owed = Amount(event.amount.0 - taken.0);
        if !owed.is_zero() {
            let debt = store::debt_of(&self.db, event.account)?;
            let debt = debt.checked_add(owed).ok_or(DepositError::Overflow)?;
            store::set_debt(&self.db, event.account, debt)?;
        }
        store::set_deposit_reversed(&self.db, event.outpoint, taken)?;
        // Flagged again (an operator may have cleared the reorg's flag meanwhile); the flag of
        // an account that owes cannot be cleared until the debt is paid.
        let reason = format!(
            "credited deposit {} of {} sat double-spent: {} sat taken back, {} sat owed",
            event.outpoint, event.amount, taken, owed
        );
        self.ensure_flagged(event.account, &reason, now)?;
        tracing::error!(account = %event.account, outpoint = %event.outpoint, amount = %event.amount,
            %taken, %owed, "credited deposit double-spent: credit taken back");
        self.decide(
            "custody.deposit.reverse",
            &[
                ("account", event.account.to_string()),
                ("outpoint", event.outpoint.to_string()),
                ("amount_sat", event.amount.0.to_string()),
                ("taken_sat", taken.0.to_string()),
                ("debt_sat", owed.0.to_string()),
            ],
        );
        report.reversed.push(event);
        Ok(())
    }

    /// A reversed deposit confirmed again: the account gets its amount back, first as the
    /// part of its own reversal it still owes (cancelled), the rest credited again.
    fn recredit(
        &mut self,
        d: &store::DepositRow,
        event: DepositEvent,
        report: &mut DepositReport,
    ) -> Result<(), DepositError> {
        let debt = store::debt_of(&self.db, d.account)?;
        // What its reversal left owing: cancelled where still owed, recovered where an operator
        // wrote it off (the exchange bore it; the deposit is there after all).
        let own = Amount(d.amount.0 - d.reversed.0.min(d.amount.0));
        let cancelled = self.uncollected_debt(d.account)?.min(own);
        store::set_debt(&self.db, d.account, Amount(debt.0 - cancelled.0))?;
        let written_off = store::written_off_of(&self.db, d.account)?;
        let recovered = written_off.min(Amount(own.0 - cancelled.0));
        store::set_written_off(&self.db, d.account, Amount(written_off.0 - recovered.0))?;
        let give = Amount(d.amount.0 - cancelled.0 - recovered.0);
        if give.is_zero() {
            store::set_deposit_status(&self.db, d.outpoint, DepositStatus::Credited)?;
            report.recredited.push(event);
            return Ok(());
        }
        store::set_deposit_recrediting(&self.db, d.outpoint, give, recovered)?;
        self.db
            .execute_batch("COMMIT; BEGIN IMMEDIATE")
            .map_err(|e| DepositError::Store(crate::StoreError::Sqlite(e)))?;
        let d = store::DepositRow {
            recredit: give,
            recovered,
            ..d.clone()
        };
        self.submit_recredit(&d, event, report)
    }

    /// Asks for a reversed deposit's credit again (idempotent by its key); refused, the deposit
    /// is reversed again and what it cancelled of the debt is owed again.
    fn submit_recredit(
        &mut self,
        d: &store::DepositRow,
        event: DepositEvent,
        report: &mut DepositReport,
    ) -> Result<(), DepositError> {
        let credit = Command::Credit {
            account: d.account,
            asset: BTC,
            amount: d.recredit,
            key: crate::recredit_key(d.outpoint, d.reversals),
        };
        match self.ledger.submit(credit) {
            Ok(()) => {
                store::set_deposit_status(&self.db, d.outpoint, DepositStatus::Credited)?;
                tracing::warn!(account = %d.account, outpoint = %d.outpoint, amount = %d.recredit,
                    "reversed deposit confirmed again: credited again");
                report.recredited.push(event);
            }
            Err(LedgerError::Rejected(RejectCode::EngineBusy)) | Err(LedgerError::Unknown) => {
                report.unresolved.push(event)
            }
            Err(LedgerError::Rejected(code)) => {
                // Given up only once the ledger says no try of it was applied.
                match self
                    .ledger
                    .credited(crate::recredit_key(d.outpoint, d.reversals))
                {
                    Ok(false) => {}
                    Ok(true) => {
                        store::set_deposit_status(&self.db, d.outpoint, DepositStatus::Credited)?;
                        report.recredited.push(event);
                        return Ok(());
                    }
                    Err(_) => {
                        report.unresolved.push(event);
                        return Ok(());
                    }
                }
                let withheld = Amount(d.amount.0 - d.recredit.0.min(d.amount.0));
                let recovered = d.recovered.min(withheld);
                let cancelled = Amount(withheld.0 - recovered.0);
                let debt = store::debt_of(&self.db, d.account)?;
                let debt = debt.checked_add(cancelled).ok_or(DepositError::Overflow)?;
                store::set_debt(&self.db, d.account, debt)?;
                let written_off = store::written_off_of(&self.db, d.account)?;
                let written_off = written_off
                    .checked_add(recovered)
                    .ok_or(DepositError::Overflow)?;
                store::set_written_off(&self.db, d.account, written_off)?;
                if !cancelled.is_zero() {
                    let now = Timestamp::from_millis(self.last_now_ms);
                    self.ensure_flagged(
                        d.account,
                        "a credit again refused: the account owes again",
                        now,
                    )?;
                }
                store::set_deposit_status(&self.db, d.outpoint, DepositStatus::Reversed)?;
                tracing::error!(account = %d.account, outpoint = %d.outpoint, %code,
                    "ledger refused a credit again; tried again next step");
                report.rejected.push((event, code));
            }
        }
        Ok(())
    }

    /// A deposit whose credit has no known answer and that is no longer confirmed enough to be
    /// credited: if the ledger applied the credit, it is a credited deposit, which a reorg took
    /// away if it is out of the chain (reorged, account flagged) and is credited as any other
    /// if it is still in a block (a credited deposit at that depth is not flagged either); if
    /// not applied, it is pending again; no answer, asked next step.
    fn resolve_crediting(
        &mut self,
        event: DepositEvent,
        now: Timestamp,
        report: &mut DepositReport,
    ) -> Result<(), DepositError> {
        let key =
            IdempotencyKey::outpoint(event.outpoint.txid.to_byte_array(), event.outpoint.vout);
        match self.ledger.credited(key) {
            Ok(true) if event.confirmations > 0 => {
                store::set_deposit_status(&self.db, event.outpoint, DepositStatus::Credited)?;
                tracing::warn!(account = %event.account, outpoint = %event.outpoint,
                    "a credit whose answer was lost was applied; the deposit is still in a block");
                report.credited.push(event);
            }
            Ok(true) => {
                self.deposit_reorged(event, now)?;
                report.reorged.push(event);
            }
            Ok(false) => {
                let netted = store::deposits(&self.db)?
                    .into_iter()
                    .find(|d| d.outpoint == event.outpoint)
                    .map_or(Amount::ZERO, |d| d.netted);
                self.uncredit(event.account, event.outpoint, netted)?;
            }
            Err(_) => report.unresolved.push(event),
        }
        Ok(())
    }

    fn deposit_reorged(&mut self, event: DepositEvent, now: Timestamp) -> Result<(), DepositError> {
        store::set_deposit_status(&self.db, event.outpoint, DepositStatus::Reorged)?;
        let reason = format!(
            "credited deposit {} of {} sat left the chain in a reorg",
            event.outpoint, event.amount
        );
        self.flag(event.account, &reason, now)?;
        tracing::error!(account = %event.account, outpoint = %event.outpoint, amount = %event.amount,
            "credited deposit removed by a reorg; account flagged");
        Ok(())
    }

    /// Flags an account unless it already is (not cleared).
    fn ensure_flagged(
        &mut self,
        account: AccountId,
        reason: &str,
        now: Timestamp,
    ) -> Result<(), DepositError> {
        if store::flagged(&self.db)?.iter().any(|(a, _)| *a == account) {
            return Ok(());
        }
        self.flag(account, reason, now)
    }

    /// Flags an account for an operator, and tells the order path at once.
    fn flag(
        &mut self,
        account: AccountId,
        reason: &str,
        now: Timestamp,
    ) -> Result<(), DepositError> {
        store::flag_account(&self.db, account, reason, now.as_millis())?;
        if let Some(hook) = &self.flag_hook {
            hook(account);
        }
        self.decide(
            "custody.account.flag",
            &[
                ("account", account.to_string()),
                ("reason", reason.to_owned()),
            ],
        );
        Ok(())
    }

    /// True when bitcoind shows that a deposit's transaction, out of the wallet's view, can no
    /// longer confirm as things stand: it is not in the node's mempool, its output is not
    /// unspent in the chain, and the node would refuse it for missing inputs (an output it
    /// spends is spent in the chain, or is not there) or an output it spends is spent by a
    /// transaction in the mempool. A transaction merely dropped (the node's mempool restarted
    /// or expired it) is accepted by the node, so it is not. One case reads as double-spent
    /// without being one: its parent dropped as well; the credit again of a reversed deposit
    /// confirmed after all makes that right. No answer (bitcoind away): false, asked again next
    /// step.
    fn double_spent(&mut self, outpoint: OutPoint) -> bool {
        let Some(tx) = self.wallet.tx_graph().get_tx(outpoint.txid) else {
            return false;
        };
        let Ok(rpc) = self.connect() else {
            return false;
        };
        let client = rpc.client.clone();
        match in_mempool(&client, outpoint.txid) {
            Ok(false) => {}
            Ok(true) | Err(_) => return false,
        }
        match client.get_tx_out(&outpoint.txid, outpoint.vout, Some(true)) {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return false,
        }
        let verdict = match client.test_mempool_accept(&[tx.as_ref()]) {
            Ok(v) => v,
            Err(_) => return false,
        };
        let Some(verdict) = verdict.first() else {
            return false;
        };
        if verdict.allowed {
            return false;
        }
        match verdict.reject_reason.as_deref() {
            Some("missing-inputs") => return true,
            Some(r) if r.contains("already") => return false,
            _ => {}
        }
        // Refused for another reason (e.g. as a replacement of a transaction in the mempool
        // that spends the same output): an output it spends is spent there.
        for input in &tx.input {
            let prev = input.previous_output;
            match client.get_tx_out(&prev.txid, prev.vout, Some(true)) {
                Ok(None) => return true,
                Ok(Some(_)) => {}
                Err(_) => return false,
            }
        }
        false
    }

    // -----------------------------------------------------------------------------------------
    // Withdrawal requests

    /// Validates a request and holds amount plus flat fee in the ledger. Returns the withdrawal,
    /// pending (or awaiting approval above the configured amount). On error nothing changed.
    pub fn request_withdrawal(
        &mut self,
        req: WithdrawalRequest,
        now: Timestamp,
    ) -> Result<WithdrawalView, WithdrawalError> {
        let policy = &self.config.withdrawal;
        if req.idempotency_key.is_empty() || req.idempotency_key.len() > 64 {
            return Err(WithdrawalError::InvalidKey);
        }
        self.last_now_ms = self.last_now_ms.max(now.as_millis());
        if let Some(existing) =
            store::withdrawal_by_key(&self.db, req.account, &req.idempotency_key)?
        {
            return Err(WithdrawalError::DuplicateKey {
                key: req.idempotency_key,
                existing,
            });
        }
        if !self.ledger.account_exists(req.account) {
            return Err(WithdrawalError::UnknownAccount(req.account));
        }
        if store::flagged(&self.db)?
            .iter()
            .any(|(a, _)| *a == req.account)
        {
            return Err(WithdrawalError::AccountFlagged(req.account));
        }
        let unchecked =
            Address::<NetworkUnchecked>::from_str(req.address.trim()).map_err(|_| {
                WithdrawalError::MalformedAddress {
                    address: req.address.clone(),
                }
            })?;
        let address = unchecked
            .require_network(self.config.network)
            .map_err(|_| WithdrawalError::WrongNetwork {
                address: req.address.clone(),
                expected: self.config.network,
            })?;
        let script = address.script_pubkey();
        if self.deny_list.contains(&script) {
            return Err(WithdrawalError::DenyListed {
                address: address.to_string(),
            });
        }
        // Our change: paid there, it would stay ours and be no one's. (A deposit or invoice
        // address of ours is a destination: the payment is credited to its account.)
        if self
            .wallet
            .derivation_of_spk(script.clone())
            .is_some_and(|(k, _)| k == KeychainKind::Internal)
        {
            return Err(WithdrawalError::OwnAddress {
                address: address.to_string(),
            });
        }
        let dust_limit = sats(script.minimal_non_dust());
        if req.amount < dust_limit {
            return Err(WithdrawalError::Dust {
                amount: req.amount,
                dust_limit,
            });
        }
        if req.amount < policy.min_amount {
            return Err(WithdrawalError::BelowMinimum {
                amount: req.amount,
                minimum: policy.min_amount,
            });
        }
        let since = now.as_millis().saturating_sub(DAY_MS);
        let onchain = store::withdrawn_since(&self.db, req.account, since)?;
        // Lightning amounts count too (`other_used`), as on-chain ones do in `check_outflow`.
        let used = onchain
            .checked_add(req.other_used)
            .ok_or(WithdrawalError::DailyLimit {
                amount: req.amount,
                used: onchain,
                limit: policy.daily_limit,
            })?;
        if used
            .checked_add(req.amount)
            .is_none_or(|t| t > policy.daily_limit)
        {
            return Err(WithdrawalError::DailyLimit {
                amount: req.amount,
                used,
                limit: policy.daily_limit,
            });
        }
        let fee = policy.flat_fee;
        // Recorded first (status `new`), so a crash after the hold is recovered on open.
        let id = store::insert_withdrawal(
            &mut self.db,
            &store::NewWithdrawal {
                account: req.account,
                address: &address.to_string(),
                amount: req.amount,
                fee,
                key: &req.idempotency_key,
                created_ms: now.as_millis(),
                other_used: req.other_used,
            },
        )?;
        let w = store::withdrawal(&self.db, id)?.ok_or(WithdrawalError::UnknownWithdrawal(id))?;
        let status = match self.ledger.submit(Self::hold_of(&w)) {
            Ok(()) => {
                let status = self.held_status_recorded(&w, req.other_used)?;
                store::set_withdrawal_status(&self.db, id, status, None)?;
                status
            }
            Err(LedgerError::Rejected(code)) => {
                // Certainly not held: the row goes (its id is never handed out again).
                store::delete_new_withdrawal(&self.db, id)?;
                return Err(match code {
                    RejectCode::InsufficientBalance => WithdrawalError::InsufficientBalance {
                        amount: req.amount,
                        fee,
                    },
                    RejectCode::UnknownAccount => WithdrawalError::UnknownAccount(req.account),
                    other => WithdrawalError::LedgerRejected(other),
                });
            }
            // Maybe held: ask the ledger now; if it cannot say, the row stays `new` (never
            // deleted while its hold may exist) and is resolved at the next step or open.
            Err(LedgerError::Unknown) => match self.settle_hold(&w, req.other_used) {
                Ok(status) => status,
                Err(e) => {
                    tracing::warn!(%id, error = %e, "withdrawal hold outcome unresolved");
                    return Err(e);
                }
            },
        };
        tracing::info!(%id, account = %req.account, amount = %req.amount, ?status, "withdrawal held");
        store::withdrawal(&self.db, id)?.ok_or(WithdrawalError::UnknownWithdrawal(id))
    }

    /// One withdrawal.
    pub fn withdrawal(&self, id: WithdrawalId) -> Result<Option<WithdrawalView>, WithdrawalError> {
        Ok(store::withdrawal(&self.db, id)?)
    }

    /// All withdrawals, oldest first.
    pub fn withdrawals(&self) -> Result<Vec<WithdrawalView>, WithdrawalError> {
        Ok(store::all_withdrawals(&self.db)?)
    }

    /// One account's withdrawals, oldest first (read through the index on account and key:
    /// the other accounts' rows are not read).
    pub fn withdrawals_of(
        &self,
        account: AccountId,
    ) -> Result<Vec<WithdrawalView>, WithdrawalError> {
        Ok(store::withdrawals_of_account(&self.db, account)?)
    }

    /// The withdrawal of `account` under the idempotency key `key`, if any: keys are per
    /// account, so another account's withdrawal under the same key is never answered. Two
    /// indexed look-ups, whatever the number of withdrawals.
    pub fn withdrawal_by_key(
        &self,
        account: AccountId,
        key: &str,
    ) -> Result<Option<WithdrawalView>, WithdrawalError> {
        let Some(id) = store::withdrawal_by_key(&self.db, account, key)? else {
            return Ok(None);
        };
        let w = store::withdrawal(&self.db, id)?;
        debug_assert!(w
            .as_ref()
            .is_none_or(|w| w.account == account && w.idempotency_key == key));
        Ok(w)
    }

    /// Approves a withdrawal that waits for approval: it joins the next batch.
    pub fn approve_withdrawal(&mut self, id: WithdrawalId) -> Result<(), WithdrawalError> {
        let w = store::withdrawal(&self.db, id)?.ok_or(WithdrawalError::UnknownWithdrawal(id))?;
        if w.status != WithdrawalStatus::AwaitingApproval {
            return Err(WithdrawalError::NotAwaitingApproval(id));
        }
        store::set_withdrawal_status(&self.db, id, WithdrawalStatus::Pending, None)?;
        tracing::info!(%id, "withdrawal approved");
        Ok(())
    }

    /// Refuses a withdrawal that is not batched yet (awaiting approval, or pending): the ledger
    /// gives the hold back and the withdrawal is released with `reason`.
    pub fn reject_withdrawal(
        &mut self,
        id: WithdrawalId,
        reason: &str,
    ) -> Result<(), WithdrawalError> {
        let w = store::withdrawal(&self.db, id)?.ok_or(WithdrawalError::UnknownWithdrawal(id))?;
        if !matches!(
            w.status,
            WithdrawalStatus::AwaitingApproval
                | WithdrawalStatus::Pending
                | WithdrawalStatus::Releasing
        ) {
            return Err(WithdrawalError::NotAwaitingApproval(id));
        }
        self.release(id, reason)
    }

    /// Releases a held withdrawal: recorded as `releasing` with its reason first (so it is never
    /// batched from here on), then released in the ledger; an unknown answer is resolved by
    /// asking the ledger, now or at a later step.
    fn release(&mut self, id: WithdrawalId, reason: &str) -> Result<(), WithdrawalError> {
        store::set_withdrawal_status(&self.db, id, WithdrawalStatus::Releasing, Some(reason))?;
        let w = store::withdrawal(&self.db, id)?.ok_or(WithdrawalError::UnknownWithdrawal(id))?;
        self.settle_release(&w)
    }

    // -----------------------------------------------------------------------------------------
    // Batches

    fn fee_rate(&mut self) -> Result<FeeRate, BatchError> {
        let target = self.config.batch.confirmation_target;
        let fallback = self.config.batch.fallback_fee_rate;
        let rpc = self.connect().map_err(BatchError::Rpc)?;
        match rpc.client.estimate_smart_fee(target, None) {
            Ok(est) => Ok(est
                .fee_rate
                .map(|per_kvb| FeeRate::from_sat_per_kwu(per_kvb.to_sat() / 4))
                .unwrap_or(fallback)
                .max(FeeRate::BROADCAST_MIN)),
            Err(e) => {
                let msg = rpc_err(e);
                self.disconnect(&msg);
                Err(BatchError::Rpc(msg))
            }
        }
    }

    fn build_psbt(
        &mut self,
        outputs: &[(ScriptBuf, bitcoin::Amount)],
        fee: Result<FeeRate, bitcoin::Amount>,
    ) -> Result<Psbt, BatchError> {
        // The inputs of abandoned batches still unspent are spent too (with whatever else coin
        // selection takes): the abandoned batch can then never confirm beside this one.
        let kill = store::kill_inputs(&self.db)?;
        let must: Vec<OutPoint> = if kill.is_empty() {
            Vec::new()
        } else {
            let unspent: HashSet<OutPoint> =
                self.wallet.list_unspent().map(|o| o.outpoint).collect();
            kill.into_iter().filter(|o| unspent.contains(o)).collect()
        };
        self.build_psbt_from(outputs, fee, &must, false)
    }

    /// [`build_psbt`](Self::build_psbt), spending `inputs` and, unless `only`, whatever else
    /// coin selection takes. `only` spends exactly `inputs` (a capped fee is the same
    /// transaction at a lower fee: with an absolute fee BDK selects coins at a zero fee rate, and
    /// a new selection could be far heavier than the one the cap was checked on).
    fn build_psbt_from(
        &mut self,
        outputs: &[(ScriptBuf, bitcoin::Amount)],
        fee: Result<FeeRate, bitcoin::Amount>,
        inputs: &[OutPoint],
        only: bool,
    ) -> Result<Psbt, BatchError> {
        let min_confs = self.config.deposit_confirmations.max(1);
        let mut builder = self.wallet.build_tx();
        builder.set_recipients(outputs.to_vec());
        // Pending deposits are not ours to spend yet: only coins with the deposit confirmations.
        builder.exclude_below_confirmations(min_confs);
        if !inputs.is_empty() {
            builder
                .add_utxos(inputs)
                .map_err(|e| BatchError::Build(e.to_string()))?;
        }
        if only {
            builder.manually_selected_only();
        }
        match fee {
            Ok(rate) => builder.fee_rate(rate),
            Err(abs) => builder.fee_absolute(abs),
        };
        builder.finish().map_err(|e| match e {
            CreateTxError::CoinSelection(e) => BatchError::InsufficientFunds(e.to_string()),
            other => BatchError::Build(other.to_string()),
        })
    }

    fn sign(&self, mut psbt: Psbt) -> Result<(Transaction, Amount), BatchError> {
        let signed = self.key.sign(&mut psbt).map_err(BatchError::Sign)?;
        if signed != psbt.inputs.len() {
            return Err(BatchError::Sign(format!(
                "signed {signed} of {} inputs",
                psbt.inputs.len()
            )));
        }
        let finalized = self
            .wallet
            .finalize_psbt(&mut psbt, SignOptions::default())
            .map_err(|e| BatchError::Sign(e.to_string()))?;
        if !finalized {
            return Err(BatchError::Sign("inputs left unsigned".into()));
        }
        let fee = psbt.fee().map_err(|e| BatchError::Build(e.to_string()))?;
        let tx = psbt
            .extract_tx()
            .map_err(|e| BatchError::Build(e.to_string()))?;
        Ok((tx, sats(fee)))
    }

    /// Abandons a batch in flight that can never confirm as things stand (an operator's decision,
    /// after `batch_refused`): every version of it is out of the chain and the node's mempool,
    /// and the node refuses each for missing inputs (one was double-spent, e.g. a deposit a
    /// reorg took away and its payer spent again). Its withdrawals are pending again (still
    /// held) and go out in the next batch, which also spends every input of the abandoned one
    /// that is still unspent, so that the two can never both confirm. Returns the withdrawals.
    /// Recorded as `custody.batch.abandon`.
    pub fn abandon_batch(
        &mut self,
        batch: u64,
        now: Timestamp,
    ) -> Result<Vec<WithdrawalId>, AbandonError> {
        self.last_now_ms = self.last_now_ms.max(now.as_millis());
        if !store::inflight_batches(&self.db)?.contains(&batch) {
            return Err(AbandonError::NotInFlight(batch));
        }
        let txs = store::batch_txs(&self.db, batch)?;
        let view = self.in_view(&txs.iter().map(|t| t.txid).collect());
        let may = |why: String| AbandonError::MayConfirm { batch, why };
        // A withdrawal of it already completed in the ledger (a version confirmed, then
        // reorged) would stay completed and never paid: not abandoned.
        if let Some(w) = store::withdrawals_of_batch(&self.db, batch)?
            .into_iter()
            .find(|w| w.status != WithdrawalStatus::Batched)
        {
            return Err(may(format!(
                "withdrawal {} of it is {:?}: a version of it confirmed once",
                w.id, w.status
            )));
        }
        let mut inputs: Vec<OutPoint> = Vec::new();
        let rpc = self
            .connect()
            .map_err(|e| AbandonError::Batch(BatchError::Rpc(e)))?;
        let client = rpc.client.clone();
        let rpc_fail = |e: bitcoincore_rpc::Error| AbandonError::Batch(BatchError::Rpc(rpc_err(e)));
        for t in &txs {
            if view.get(&t.txid).is_some_and(|c| *c > 0) {
                return Err(may(format!("{} is confirmed", t.txid)));
            }
            if in_mempool(&client, t.txid).map_err(rpc_fail)? {
                return Err(may(format!("{} is in the mempool", t.txid)));
            }
            let tx: Transaction = encode::deserialize(&t.raw)
                .map_err(|e| BatchError::Build(format!("stored batch transaction: {e}")))?;
            let verdict = client.test_mempool_accept(&[&tx]).map_err(rpc_fail)?;
            match verdict.first() {
                Some(v) if !v.allowed && v.reject_reason.as_deref() == Some("missing-inputs") => {}
                Some(v) => {
                    return Err(may(format!(
                        "the node would {} {} ({})",
                        if v.allowed { "take" } else { "refuse" },
                        t.txid,
                        v.reject_reason.as_deref().unwrap_or("accepted")
                    )))
                }
                None => return Err(may(format!("no answer about {}", t.txid))),
            }
            // Its inputs still unspent in the chain (confirmed: a pending coin is never forced
            // into a batch) are what the next batch spends so that the two conflict.
            for input in &tx.input {
                let prev = input.previous_output;
                if !inputs.contains(&prev)
                    && client
                        .get_tx_out(&prev.txid, prev.vout, Some(false))
                        .map_err(rpc_fail)?
                        .is_some()
                {
                    inputs.push(prev);
                }
            }
        }
        // With none, nothing can make it conflict with the next batch: "missing inputs" is also
        // the node's answer when a parent is merely unknown to it, and the batch would confirm
        // beside the next one if that parent came back.
        if inputs.is_empty() {
            return Err(may(
                "none of its inputs is still unspent in the chain: nothing can make it conflict \
                 with the next batch"
                    .into(),
            ));
        }
        let Some(ids) = store::abandon_batch(&self.db, batch, &inputs)? else {
            return Err(AbandonError::NotInFlight(batch));
        };
        // Out of the wallet's view: its inputs are ours to spend again (the next batch must).
        // Evicted after the last time it was seen (a batch kept in view was seen "later").
        let graph = self.wallet.tx_graph();
        let evictions: Vec<(Txid, u64)> = txs
            .iter()
            .map(|t| {
                let seen = graph
                    .get_tx_node(t.txid)
                    .and_then(|n| n.last_seen)
                    .unwrap_or(0);
                (t.txid, (now.as_millis() / 1000).max(seen.saturating_add(1)))
            })
            .collect();
        self.wallet.apply_evicted_txs(evictions);
        self.view_changes = self.view_changes.wrapping_add(1);
        // Recorded already: a failed write of the wallet is made good at the next sync (the
        // emitter reports the batch evicted), not an error of the abandonment.
        if let Err(e) = self.wallet.persist(&mut self.db) {
            tracing::warn!(batch, error = %e, "persisting the wallet after abandoning a batch");
        }
        tracing::warn!(
            batch,
            withdrawals = ids.len(),
            kill = inputs.len(),
            "batch abandoned by an operator"
        );
        self.decide(
            "custody.batch.abandon",
            &[
                ("batch", batch.to_string()),
                (
                    "withdrawals",
                    ids.iter()
                        .map(|i| i.0.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                (
                    "inputs_to_spend",
                    inputs
                        .iter()
                        .map(|o| o.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
            ],
        );
        Ok(ids)
    }

    /// Builds, signs and records a batch when one is due: the oldest pending request waited the
    /// batch interval, or `max_requests` are pending. Does not broadcast (see
    /// [`broadcast_pending`](Self::broadcast_pending)): the signed transaction is durable first.
    /// Only one batch is in flight at a time, except that a batch the node refused does not block
    /// the next one.
    pub fn build_batch(&mut self, now: Timestamp) -> Result<Option<BatchInfo>, BatchError> {
        self.last_now_ms = self.last_now_ms.max(now.as_millis());
        // One batch in flight at a time, except that a batch the node keeps refusing does not
        // block the others (the wallet counts its inputs as spent, and a new batch spends only
        // confirmed coins, so the two never conflict).
        for batch in store::inflight_batches(&self.db)? {
            if store::batch_broadcast(&self.db, batch)?.refusals == 0 {
                return Ok(None);
            }
        }
        // The withdrawals of an abandoned batch back in the wallet's view (its parent and itself
        // broadcast again: both were public) wait: the inputs it was abandoned with count as
        // spent by it, so the next batch could not be made to conflict with it, and would pay
        // them a second time (review). An operator decides; the alarm says why.
        let Some(held) = self.abandoned_back()? else {
            return Ok(None);
        };
        // Requests of an account flagged after they were made wait until it is cleared.
        let flagged: HashSet<AccountId> = store::flagged(&self.db)?
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        // Requests the wallet could not fund wait for their backoff to pass.
        let deferred = store::deferred(&self.db)?;
        let pending: Vec<WithdrawalView> =
            store::withdrawals_in(&self.db, WithdrawalStatus::Pending)?
                .into_iter()
                .filter(|w| !flagged.contains(&w.account))
                .filter(|w| !held.contains(&w.id))
                .filter(|w| {
                    deferred
                        .get(&w.id)
                        .is_none_or(|(_, t)| *t <= now.as_millis())
                })
                .collect();
        let Some(oldest) = pending.first() else {
            return Ok(None);
        };
        let interval_ms = u64::try_from(self.config.batch.interval.as_millis()).unwrap_or(u64::MAX);
        let max = self.config.batch.max_requests.max(1);
        let due = pending.len() >= max
            || oldest.created_ms.saturating_add(interval_ms) <= now.as_millis();
        if !due {
            return Ok(None);
        }
        // No payout while the wallet cannot cover what the ledger owes (beyond the tolerance):
        // paying first come, first served out of what is left would hand the shortfall to the
        // customers who ask last. The requests wait, held in the ledger; the batch is made at
        // the first step the shortfall is covered (or accepted with a larger tolerance).
        let rec = self.reconcile()?;
        let tolerance = self.config.batch.shortfall_tolerance.0;
        if let Some(short) = self.short_beyond_tolerance(&rec) {
            // The alarm once the last step's reconciliation found it too: a reading between a
            // payment's two sides holds one step back and asks no operator.
            if self.last_short.is_some() {
                self.alarm(
                    "reconciliation_shortfall",
                    "custody",
                    &format!(
                        "the wallet holds {short} sat less than the ledger owes (tolerance \
                         {tolerance} sat): no withdrawal batch is made until it is covered"
                    ),
                )?;
            }
            tracing::warn!(
                short_sat = short,
                tolerance_sat = tolerance,
                pending = pending.len(),
                "withdrawal batch held back: reconciliation shortfall"
            );
            return Ok(None);
        }
        let mut batch = Vec::new();
        let mut outputs = Vec::new();
        for w in pending.into_iter().take(max) {
            let script = Address::<NetworkUnchecked>::from_str(&w.address)
                .ok()
                .and_then(|a| a.require_network(self.config.network).ok())
                .map(|a| a.script_pubkey());
            match script {
                Some(s) if !self.deny_list.contains(&s) => {
                    outputs.push((s, bitcoin::Amount::from_sat(w.amount.0)));
                    batch.push(w);
                }
                _ => {
                    self.decide(
                        "custody.withdrawal.release",
                        &[
                            ("id", w.id.to_string()),
                            ("account", w.account.to_string()),
                            ("reason", "destination is deny-listed".into()),
                        ],
                    );
                    if let Err(e) = self.release(w.id, "destination is deny-listed") {
                        tracing::error!(id = %w.id, error = %e, "could not release a denied withdrawal");
                    }
                }
            }
        }
        if batch.is_empty() {
            return Ok(None);
        }
        let rate = self.fee_rate()?;
        // The oldest requests first. A set no relayable transaction pays within its flat fees is
        // halved (older half kept); a single request that cannot be paid so is put off like one
        // the wallet cannot fund, and the rest are tried together: no request holds the others
        // back. At most `BATCH_ATTEMPTS` builds a step.
        let mut queue: Vec<(WithdrawalView, (ScriptBuf, bitcoin::Amount))> =
            batch.into_iter().zip(outputs).collect();
        let mut size = queue.len();
        for _ in 0..BATCH_ATTEMPTS {
            if queue.is_empty() {
                return Ok(None);
            }
            let take = size.clamp(1, queue.len());
            let (b, o): (Vec<_>, Vec<_>) = queue[..take].iter().cloned().unzip();
            match self.try_batch(b, o, rate, now)? {
                Attempt::Built(info) => return Ok(Some(info)),
                Attempt::Unpayable { kept, why } => {
                    // Those the wallet could not fund were put off already.
                    let kept_ids: HashSet<WithdrawalId> = kept.iter().map(|w| w.id).collect();
                    let tail = queue.split_off(take);
                    queue.retain(|(w, _)| kept_ids.contains(&w.id));
                    if queue.len() <= 1 {
                        if let Some((w, _)) = queue.first() {
                            self.defer_unfundable(w, &why, now)?;
                        }
                        queue = tail;
                        size = queue.len();
                    } else {
                        size = queue.len() / 2;
                        queue.extend(tail);
                    }
                }
            }
        }
        Ok(None)
    }

    /// Builds, signs and records one batch of `batch` (paying `outputs`), or says why no
    /// relayable transaction pays it within its flat fees ([`Attempt::Unpayable`], nothing
    /// recorded).
    fn try_batch(
        &mut self,
        batch: Vec<WithdrawalView>,
        outputs: Vec<(ScriptBuf, bitcoin::Amount)>,
        rate: FeeRate,
        now: Timestamp,
    ) -> Result<Attempt, BatchError> {
        let Some((batch, outputs, psbt)) = self.fundable(batch, outputs, rate, now)? else {
            // None can be funded now: each was put off.
            return Ok(Attempt::Unpayable {
                kept: Vec::new(),
                why: String::new(),
            });
        };
        let budget = Amount(batch.iter().map(|w| w.fee.0).sum());
        let unpayable = |why: String| {
            tracing::warn!(withdrawals = batch.len(), %why, "batch not made");
            Ok(Attempt::Unpayable {
                kept: batch.clone(),
                why,
            })
        };
        let mut psbt = psbt;
        let fee = sats(psbt.fee().map_err(|e| BatchError::Build(e.to_string()))?);
        if fee > budget {
            // Capped: the flat fees pay the network fee, never more than each withdrawal's own.
            let weight = psbt.unsigned_tx.weight() + Weight::from_wu(batch_witness_wu(&psbt));
            let needed = sats(FeeRate::BROADCAST_MIN * weight);
            if budget < needed {
                return unpayable(format!(
                    "the flat fees ({budget} sat) cannot pay the minimum network fee ({needed} sat)"
                ));
            }
            tracing::warn!(%fee, %budget, "batch fee capped at the flat fees");
            let inputs: Vec<OutPoint> = psbt
                .unsigned_tx
                .input
                .iter()
                .map(|i| i.previous_output)
                .collect();
            psbt = self.build_psbt_from(
                &outputs,
                Err(bitcoin::Amount::from_sat(budget.0)),
                &inputs,
                true,
            )?;
        }
        let (tx, fee) = self.sign(psbt)?;
        if fee > budget {
            // BDK gave a change output below dust to the miners: the fee cannot be split within
            // the flat fees. Nothing is recorded.
            return unpayable(format!(
                "fee {fee} sat passes the flat fees {budget} sat (change would be dust)"
            ));
        }
        // What the node would refuse for good is never recorded (a recorded batch holds its
        // withdrawals until it confirms).
        let weight = tx.weight();
        if weight > MAX_BATCH_WEIGHT {
            return unpayable(format!(
                "{} WU, above the standard transaction weight",
                weight.to_wu()
            ));
        }
        let min_fee = sats(FeeRate::BROADCAST_MIN * weight);
        if fee < min_fee {
            return unpayable(format!(
                "fee {fee} sat below the minimum relay fee {min_fee} sat"
            ));
        }
        let txid = tx.compute_txid();
        let ids: Vec<WithdrawalId> = batch.iter().map(|w| w.id).collect();
        let record = BatchTx {
            txid,
            raw: encode::serialize(&tx),
            fee,
        };
        let id = store::insert_batch(&mut self.db, &ids, &record, now.as_millis())?;
        // Durable now; the wallet sees its inputs spent (and its change) from here on.
        self.wallet
            .apply_unconfirmed_txs([(tx, now.as_millis() / 1000)]);
        self.view_changes = self.view_changes.wrapping_add(1);
        self.wallet.persist(&mut self.db)?;
        tracing::info!(batch = id, %txid, %fee, withdrawals = ids.len(), "batch signed and recorded");
        Ok(Attempt::Built(BatchInfo {
            id,
            txid,
            fee,
            withdrawals: ids,
        }))
    }

    /// The requests of a batch the wallet can pay: all of them when it can; otherwise, oldest
    /// first, each one that still fits. One that does not is put off with a backoff (doubling
    /// from the batch interval, at most a day) and, from its third skip, an alarm; an operator
    /// may release it (`reject_withdrawal`). `None` when none fits.
    #[allow(clippy::type_complexity)]
    fn fundable(
        &mut self,
        batch: Vec<WithdrawalView>,
        outputs: Vec<(ScriptBuf, bitcoin::Amount)>,
        rate: FeeRate,
        now: Timestamp,
    ) -> Result<Option<(Vec<WithdrawalView>, Vec<(ScriptBuf, bitcoin::Amount)>, Psbt)>, BatchError>
    {
        match self.build_psbt(&outputs, Ok(rate)) {
            Ok(psbt) => return Ok(Some((batch, outputs, psbt))),
            Err(BatchError::InsufficientFunds(e)) => {
                tracing::warn!(error = %e, "the wallet cannot fund the whole batch; trying each request")
            }
            Err(e) => return Err(e),
        }
        let mut kept = Vec::new();
        let mut kept_out = Vec::new();
        let mut last = None;
        for (w, out) in batch.into_iter().zip(outputs) {
            kept_out.push(out);
            match self.build_psbt(&kept_out, Ok(rate)) {
                Ok(psbt) => {
                    kept.push(w);
                    last = Some(psbt);
                }
                Err(BatchError::InsufficientFunds(e)) => {
                    kept_out.pop();
                    self.defer_unfundable(&w, &e, now)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(last.map(|psbt| (kept, kept_out, psbt)))
    }

    fn defer_unfundable(
        &mut self,
        w: &WithdrawalView,
        reason: &str,
        now: Timestamp,
    ) -> Result<(), BatchError> {
        let skips = store::deferred(&self.db)?.get(&w.id).map_or(0, |(s, _)| *s);
        let interval_ms = u64::try_from(self.config.batch.interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1_000);
        let backoff = interval_ms
            .saturating_mul(1u64 << skips.min(20))
            .min(DAY_MS);
        let skips =
            store::defer_withdrawal(&self.db, w.id, now.as_millis().saturating_add(backoff))?;
        tracing::warn!(id = %w.id, amount = %w.amount, skips, backoff_ms = backoff, reason, "withdrawal cannot be funded now; skipped");
        if skips >= 3 {
            self.alarm(
                "withdrawal_unfundable",
                &format!("withdrawal {}", w.id),
                &format!(
                    "the wallet could not fund it {skips} times: {reason}; release it or add funds"
                ),
            )?;
        }
        Ok(())
    }

    /// Broadcasts the newest transaction of every batch in flight that is not confirmed yet
    /// (again after a restart: bitcoind answers "already known" or "already in chain" when it has
    /// it). Returns how many were sent.
    pub fn broadcast_pending(&mut self, now: Timestamp) -> Result<usize, BatchError> {
        let mut sent = 0;
        let (inflight, view) = self.inflight_in_view()?;
        for (batch, txs) in inflight {
            let confirmed = txs
                .iter()
                .any(|t| view.get(&t.txid).is_some_and(|c| *c > 0));
            let Some(latest) = txs.last() else { continue };
            if confirmed {
                continue;
            }
            let state = store::batch_broadcast(&self.db, batch)?;
            if state.refusals > 0 && now.as_millis() < state.retry_after_ms {
                continue; // refused before: retried with a backoff
            }
            let tx: Transaction = encode::deserialize(&latest.raw)
                .map_err(|e| BatchError::Build(format!("stored batch transaction: {e}")))?;
            let rpc = self.connect().map_err(BatchError::Rpc)?;
            match rpc.client.send_raw_transaction(&tx) {
                Ok(_) => {
                    sent += 1;
                    if state.refusals > 0 {
                        store::batch_refused(&self.db, batch, None, 0)?;
                    }
                }
                Err(e) if rpc_code(&e) == Some(RPC_VERIFY_ALREADY_IN_CHAIN) => {}
                Err(e) if rpc_code(&e).is_some() => {
                    // An older version the node takes keeps the batch in flight (a refused
                    // bump, or one whose added coin a later batch spent, while the first
                    // version is still good): sent instead, and not a refusal. Counted as
                    // refused, the batch let the next one be built and spend the bump's added
                    // coin; once the node lost the first version, only the refused bump was
                    // sent again, then invalid, and the batch could be neither paid, bumped
                    // nor abandoned.
                    let older = match send_older_version(&rpc.client, &txs) {
                        Ok(older) => older,
                        Err(BatchError::Rpc(msg)) => {
                            self.disconnect(&msg);
                            return Err(BatchError::Rpc(msg));
                        }
                        Err(other) => return Err(other),
                    };
                    if let Some(older) = older {
                        sent += 1;
                        if state.refusals > 0 {
                            store::batch_refused(&self.db, batch, None, 0)?;
                        }
                        tracing::warn!(batch, refused = %latest.txid, sent = %older.compute_txid(), error = %e,
                            "bitcoind refused the batch's newest version; an earlier one went out");
                        let seen = self.last_seen_floor(&txs, now).saturating_add(1);
                        self.wallet.apply_unconfirmed_txs([(older, seen)]);
                        self.view_changes = self.view_changes.wrapping_add(1);
                        continue;
                    }
                    let msg = e.to_string();
                    let backoff = 10_000u64
                        .saturating_mul(1u64 << state.refusals.min(20))
                        .min(60 * 60 * 1000);
                    let refusals = store::batch_refused(
                        &self.db,
                        batch,
                        Some(&msg),
                        now.as_millis().saturating_add(backoff),
                    )?;
                    tracing::warn!(batch, txid = %latest.txid, error = %msg, refusals, "bitcoind refused the batch transaction; later batches go on");
                    if refusals >= 3 {
                        self.alarm(
                            "batch_refused",
                            &format!("batch {batch}"),
                            &format!("bitcoind refused it {refusals} times: {msg}; bump its fee, or, if an input is missing (double-spent), abandon it (mediator batch abandon {batch})"),
                        )?;
                    }
                    continue;
                }
                Err(e) => {
                    let msg = rpc_err(e);
                    self.disconnect(&msg);
                    return Err(BatchError::Rpc(msg));
                }
            }
            let seen = self.last_seen_floor(&txs, now);
            self.wallet.apply_unconfirmed_txs([(tx, seen)]);
            self.view_changes = self.view_changes.wrapping_add(1);
        }
        // Completed batches whose transaction a reorg took out of the chain: the ledger paid
        // them, so the same transaction goes out again until it confirms (never a new one).
        for (batch, txs, paid) in self.reorged_batches()? {
            let tx: Transaction = encode::deserialize(&paid.raw)
                .map_err(|e| BatchError::Build(format!("stored batch transaction: {e}")))?;
            let rpc = self.connect().map_err(BatchError::Rpc)?;
            match rpc.client.send_raw_transaction(&tx) {
                Ok(_) => {
                    sent += 1;
                    // Every step until it confirms again (the node answers "in the mempool").
                    tracing::debug!(batch, txid = %paid.txid, "completed batch left the chain in a reorg; broadcast again");
                }
                Err(e) if rpc_code(&e) == Some(RPC_VERIFY_ALREADY_IN_CHAIN) => {}
                Err(e) if rpc_code(&e).is_some() => {
                    self.alarm(
                        "batch_reorged",
                        &format!("batch {batch}"),
                        &format!(
                            "completed, then {} left the chain in a reorg, and bitcoind refuses it: {e}",
                            paid.txid
                        ),
                    )?;
                    continue;
                }
                Err(e) => {
                    let msg = rpc_err(e);
                    self.disconnect(&msg);
                    return Err(BatchError::Rpc(msg));
                }
            }
            let seen = self.last_seen_floor(&txs, now);
            self.wallet.apply_unconfirmed_txs([(tx, seen)]);
            self.view_changes = self.view_changes.wrapping_add(1);
        }
        self.wallet.persist(&mut self.db)?;
        Ok(sent)
    }

    /// A last-seen time for the newest transaction of a batch that is later than every earlier
    /// one's, so the wallet prefers it among the conflicting versions.
    fn last_seen_floor(&self, txs: &[BatchTx], now: Timestamp) -> u64 {
        let mut seen = now.as_millis() / 1000;
        let graph = self.wallet.tx_graph();
        for t in &txs[..txs.len().saturating_sub(1)] {
            if let Some(s) = graph.get_tx_node(t.txid).and_then(|n| n.last_seen) {
                seen = seen.max(s.saturating_add(1));
            }
        }
        seen
    }

    /// An abandoned batch that confirmed after all (a parent the node did not know came back,
    /// and someone broadcast it before the next batch spent its inputs): its withdrawals were
    /// paid by it, and are paid again by a later batch unless an operator stops it. Raised as
    /// `abandoned_batch_confirmed` (once while uncleared); the newest 100 abandoned batches are
    /// watched.
    fn watch_abandoned(&mut self) -> Result<(), BatchError> {
        let abandoned = store::abandoned_batches(&self.db, REORG_WATCHED_BATCHES)?;
        if abandoned.is_empty() {
            return Ok(());
        }
        let mut txs = Vec::new();
        for (batch, withdrawals) in &abandoned {
            for t in store::batch_txs(&self.db, *batch)? {
                txs.push((*batch, withdrawals.clone(), t.txid));
            }
        }
        let view = self.in_view(&txs.iter().map(|(_, _, t)| *t).collect());
        for (batch, withdrawals, txid) in txs {
            if view.get(&txid).is_some_and(|c| *c > 0) {
                self.alarm(
                    "abandoned_batch_confirmed",
                    &format!("batch {batch}"),
                    &format!(
                        "abandoned, then {txid} confirmed: it paid withdrawals {withdrawals}; \
                         the batch paying them again must not go out (or be recovered)"
                    ),
                )?;
            }
        }
        Ok(())
    }

    /// The withdrawals of the abandoned batches (the newest 100 watched) with a version in the
    /// wallet's view, confirmed or not, each raised as `abandoned_batch_back` (once while
    /// uncleared); `None` when such a batch's withdrawals cannot be read (then none may go).
    fn abandoned_back(&mut self) -> Result<Option<HashSet<WithdrawalId>>, BatchError> {
        let abandoned = store::abandoned_batches(&self.db, REORG_WATCHED_BATCHES)?;
        let mut held = HashSet::new();
        if abandoned.is_empty() {
            return Ok(Some(held));
        }
        let mut txs = Vec::new();
        for (batch, withdrawals) in &abandoned {
            for t in store::batch_txs(&self.db, *batch)? {
                txs.push((*batch, withdrawals.clone(), t.txid));
            }
        }
        let view = self.in_view(&txs.iter().map(|(_, _, t)| *t).collect());
        let mut readable = true;
        for (batch, withdrawals, txid) in txs {
            if !view.contains_key(&txid) {
                continue;
            }
            self.alarm(
                "abandoned_batch_back",
                &format!("batch {batch}"),
                &format!(
                    "abandoned, then {txid} came back (broadcast again): it pays withdrawals \
                     {withdrawals}, which wait while it may confirm"
                ),
            )?;
            for w in withdrawals.split(',') {
                match w.trim().parse::<u64>() {
                    Ok(id) => {
                        held.insert(WithdrawalId(id));
                    }
                    Err(_) => readable = false,
                }
            }
        }
        Ok(readable.then_some(held))
    }

    /// [`build_batch`](Self::build_batch) then [`broadcast_pending`](Self::broadcast_pending).
    pub fn run_batcher(&mut self, now: Timestamp) -> Result<Option<BatchInfo>, BatchError> {
        let batch = self.build_batch(now)?;
        self.broadcast_pending(now)?;
        Ok(batch)
    }

    /// Completes in the ledger the withdrawals of every batch whose transaction (the original or a
    /// fee bump) has the configured confirmations, each with its share of the fee actually paid.
    pub fn process_withdrawals(&mut self, now: Timestamp) -> Result<WithdrawalReport, BatchError> {
        self.last_now_ms = self.last_now_ms.max(now.as_millis());
        let mut report = WithdrawalReport::default();
        let required = self.config.withdrawal_confirmations.max(1);
        let (inflight, view) = self.inflight_in_view()?;
        for (batch, txs) in inflight {
            let Some(paid) = txs
                .iter()
                .find(|t| view.get(&t.txid).is_some_and(|c| *c >= required))
            else {
                continue;
            };
            let ws = store::withdrawals_of_batch(&self.db, batch)?;
            let flat: Vec<Amount> = ws.iter().map(|w| w.fee).collect();
            let shares = split_fee(paid.fee, &flat);
            let mut done = Vec::with_capacity(ws.len());
            let mut unresolved = false;
            let mut alarmed = false;
            for (w, share) in ws.iter().zip(shares) {
                if w.status == WithdrawalStatus::Completed {
                    continue;
                }
                let answer = self.ledger.submit(Command::WithdrawComplete {
                    id: w.id,
                    network_fee: share,
                });
                match answer {
                    Ok(()) => done.push((w.id, share)),
                    // Not held any more, or no answer: ask what became of it. Completed (before
                    // a crash, or the lost answer) is done; released or never held is an alarm:
                    // it was paid on chain and the ledger did not take it.
                    Err(LedgerError::Rejected(RejectCode::UnknownWithdrawal))
                    | Err(LedgerError::Unknown) => match self.ledger.withdrawal(w.id) {
                        Ok(Some(rec))
                            if Self::same(w, &rec) && rec.state == WithdrawalState::Completed =>
                        {
                            done.push((w.id, share))
                        }
                        Ok(Some(rec))
                            if Self::same(w, &rec) && rec.state == WithdrawalState::Held =>
                        {
                            unresolved = true
                        }
                        Ok(other) => {
                            let message = format!(
                                "paid on chain by batch {batch} ({}), but the ledger's record is {other:?}",
                                paid.txid
                            );
                            let subject = format!("withdrawal {}", w.id);
                            self.alarm("withdrawal_not_completed", &subject, &message)?;
                            report.alarms.push((w.id, message));
                            alarmed = true;
                        }
                        Err(_) => unresolved = true,
                    },
                    Err(LedgerError::Rejected(code)) => {
                        store::complete_batch(&mut self.db, batch, None, &done, false)?;
                        return Err(BatchError::CompleteRejected { id: w.id, code });
                    }
                }
            }
            if unresolved {
                // Progress is kept; the batch stays in flight and the rest is asked next step.
                store::complete_batch(&mut self.db, batch, None, &done, false)?;
                tracing::warn!(
                    batch,
                    "batch completion unresolved (no ledger answer); retried"
                );
                report.completed.extend(done);
                continue;
            }
            store::complete_batch(&mut self.db, batch, Some(paid.txid), &done, alarmed)?;
            if alarmed {
                tracing::error!(batch, txid = %paid.txid, "batch confirmed with withdrawals the ledger did not complete");
            } else {
                tracing::info!(batch, txid = %paid.txid, fee = %paid.fee, withdrawals = done.len(), "batch confirmed; withdrawals completed");
            }
            report.batches_confirmed.push((batch, paid.txid));
            report.completed.extend(done);
        }
        Ok(report)
    }

    /// Every batch, newest first, with its transactions, withdrawals and broadcast state.
    pub fn batches(&self) -> Result<Vec<BatchView>, BatchError> {
        let mut out = Vec::new();
        for b in store::all_batches(&self.db)? {
            let txs = store::batch_txs(&self.db, b.id)?;
            let ws = store::withdrawals_of_batch(&self.db, b.id)?;
            out.push(BatchView {
                id: b.id,
                status: b.status,
                created_ms: b.created_ms,
                fee: txs.last().map_or(Amount::ZERO, |t| t.fee),
                txids: txs.iter().map(|t| t.txid).collect(),
                fee_budget: Amount(ws.iter().map(|w| w.fee.0).sum()),
                withdrawals: ws.iter().map(|w| w.id).collect(),
                confirmed_txid: b.confirmed_txid,
                refusals: b.broadcast.refusals,
                last_error: b.broadcast.last_error,
            });
        }
        Ok(out)
    }

    /// Ids of batches in flight (signed, not yet completed), oldest first.
    pub fn batches_in_flight(&self) -> Result<Vec<u64>, BatchError> {
        Ok(store::inflight_batches(&self.db)?)
    }

    /// The transaction that pays a batch's withdrawals, as their holders should see it: the
    /// version that confirmed once the batch completed (a fee bump may have lost to the
    /// original), else the newest version (the one broadcast).
    pub fn batch_payment_txid(&self, batch: u64) -> Result<Option<Txid>, BatchError> {
        if let Some(confirmed) = store::batch_confirmed_txid(&self.db, batch)? {
            return Ok(Some(confirmed));
        }
        Ok(store::batch_txs(&self.db, batch)?.last().map(|t| t.txid))
    }

    /// The confirmations (0: unconfirmed) of those of `txids` in the wallet's view, in one pass
    /// over it (for listings: one [`transaction`](Self::transaction) per row would walk the
    /// wallet's whole history each time).
    pub fn confirmations_of(&self, txids: &HashSet<Txid>) -> HashMap<Txid, u32> {
        self.history_in_view(txids)
    }

    /// The transactions of a batch: the original first, then its fee bumps.
    pub fn batch_txids(&self, batch: u64) -> Result<Vec<Txid>, BatchError> {
        Ok(store::batch_txs(&self.db, batch)?
            .into_iter()
            .map(|t| t.txid)
            .collect())
    }

    /// Replaces a stuck batch's newest transaction with one paying `fee_rate` (RBF): same
    /// withdrawal outputs, less change. The fee may not pass the batch's flat fees. The replacement
    /// is recorded before it is broadcast; once recorded the answer is `Ok` (a failed broadcast
    /// is retried by every step).
    pub fn bump_fee(
        &mut self,
        batch: u64,
        fee_rate: FeeRate,
        now: Timestamp,
    ) -> Result<Txid, BumpError> {
        if !store::inflight_batches(&self.db)?.contains(&batch) {
            return Err(BumpError::NotInFlight(batch));
        }
        let txs = store::batch_txs(&self.db, batch)?;
        let Some(latest) = txs.last() else {
            return Err(BumpError::NotInFlight(batch));
        };
        let budget = Amount(
            store::withdrawals_of_batch(&self.db, batch)?
                .iter()
                .map(|w| w.fee.0)
                .sum(),
        );
        // The newest version the wallet has (in its view: the one the node has): a version the
        // node refused never reached the wallet, and BDK can only replace what it knows.
        let view = self.in_view(&txs.iter().map(|t| t.txid).collect());
        let replaced = txs
            .iter()
            .rev()
            .find(|t| view.contains_key(&t.txid))
            .unwrap_or(latest)
            .txid;
        let psbt = {
            let mut builder =
                self.wallet
                    .build_fee_bump(replaced)
                    .map_err(|e| BumpError::Build {
                        txid: replaced,
                        reason: e.to_string(),
                    })?;
            builder.fee_rate(fee_rate);
            // Added inputs (if the change cannot pay) are coins with the deposit confirmations
            // only: a pending deposit is not ours to spend before it is credited.
            builder.exclude_below_confirmations(self.config.deposit_confirmations.max(1));
            builder.finish().map_err(|e| BumpError::Build {
                txid: replaced,
                reason: e.to_string(),
            })?
        };
        let fee = sats(psbt.fee().map_err(|e| BumpError::Build {
            txid: replaced,
            reason: e.to_string(),
        })?);
        if fee > budget {
            return Err(BumpError::FeeBudgetExceeded { fee, budget });
        }
        let (tx, fee) = self.sign(psbt)?;
        let txid = tx.compute_txid();
        // Sent now, even when an earlier version was refused and waits out its backoff (before
        // the record: nothing after it may fail).
        store::batch_retry_now(&self.db, batch)?;
        store::insert_batch_tx(
            &self.db,
            batch,
            &BatchTx {
                txid,
                raw: encode::serialize(&tx),
                fee,
            },
            now.as_millis(),
        )?;
        tracing::info!(batch, %replaced, %txid, %fee, "batch fee bumped");
        // Recorded: the bump is done. Its broadcast is tried now and, failing (bitcoind away),
        // by every step, as a new batch's is; an error here would invite a retry of a done bump.
        if let Err(e) = self.broadcast_pending(now) {
            tracing::warn!(batch, %txid, error = %e, "fee bump recorded; broadcast at the next step");
        }
        Ok(txid)
    }

    // -----------------------------------------------------------------------------------------
    // Reconciliation and the whole step

    /// The shortfall `rec` shows above the tolerance, in sat.
    fn short_beyond_tolerance(&self, rec: &Reconciliation) -> Option<u64> {
        let tolerance = i128::from(self.config.batch.shortfall_tolerance.0);
        (i128::from(rec.surplus_sat) < -tolerance).then(|| rec.surplus_sat.unsigned_abs())
    }

    /// Records a step's reconciliation: payouts are held back once two in a row show a
    /// shortfall above the tolerance ([`CustodyService::check_outflow`]). Durable before the
    /// readings change here (a restart reads them back).
    fn note_shortfall(&mut self, rec: &Reconciliation) -> Result<(), StoreError> {
        let short = self.short_beyond_tolerance(rec);
        let held = match (self.last_short, short) {
            (Some(a), Some(b)) => Some(a.min(b)),
            _ => None,
        };
        if (short, held) != (self.last_short, self.payouts_held) {
            store::set_shortfall_readings(&self.db, short, held)?;
        }
        self.payouts_held = held;
        self.last_short = short;
        Ok(())
    }

    /// Wallet assets against ledger liabilities. A shortfall is logged as an error.
    pub fn reconcile(&self) -> Result<Reconciliation, BatchError> {
        let other = self.other_assets.as_ref().map_or(0, |o| o.sats());
        self.reconcile_counting(Amount(other))
    }

    /// The wallet's unspent outputs on customers' deposit addresses that no balance counts yet
    /// (not credited: too few confirmations, below the minimum, or not seen by a step yet):
    /// custody holds them, but no liability stands for them, so neither the reconciliation
    /// nor the proof of reserves counts them.
    fn uncredited_deposits(&self) -> Result<HashSet<OutPoint>, StoreError> {
        let accounts: HashSet<u32> = store::deposit_indexes(&self.db)?
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        let credited = self.credited_deposits()?;
        Ok(self
            .wallet
            .list_unspent()
            .filter(|o| {
                o.keychain == KeychainKind::External && accounts.contains(&o.derivation_index)
            })
            .filter(|o| !credited.contains(&o.outpoint))
            .map(|o| o.outpoint)
            .collect())
    }

    /// The deposits a balance counts (credited, or taken back and not yet given again).
    fn credited_deposits(&self) -> Result<HashSet<OutPoint>, StoreError> {
        Ok(store::deposits(&self.db)?
            .into_iter()
            .filter(|d| {
                matches!(
                    d.status,
                    DepositStatus::Credited
                        | DepositStatus::Reorged
                        | DepositStatus::Reversing
                        | DepositStatus::Recrediting
                )
            })
            .map(|d| d.outpoint)
            .collect())
    }

    /// [`reconcile`](Self::reconcile) with `other_assets` as custody's money outside this
    /// wallet, instead of asking the [`OtherAssets`] set: for a caller that reports a breakdown
    /// of the same figure (the Lightning node's balances move with every payment; two readings
    /// would mix two moments in one report).
    pub fn reconcile_counting(&self, other_assets: Amount) -> Result<Reconciliation, BatchError> {
        let other = other_assets.0;
        let balance = self.wallet.balance();
        let wallet_confirmed = sats(balance.confirmed);
        let wallet_pending =
            sats(balance.trusted_pending + balance.untrusted_pending + balance.immature);
        let uncredited_outpoints = self.uncredited_deposits()?;
        let uncredited: u64 = self
            .wallet
            .list_unspent()
            .filter(|o| uncredited_outpoints.contains(&o.outpoint))
            .map(|o| o.txout.value.to_sat())
            .sum();
        let mut in_flight: u64 = 0;
        let mut txids = HashSet::new();
        for batch in store::inflight_batches(&self.db)? {
            txids.extend(
                store::batch_txs(&self.db, batch)?
                    .into_iter()
                    .map(|t| t.txid),
            );
        }
        let view = self.in_view(&txids);
        for txid in txids {
            if !view.contains_key(&txid) {
                continue;
            }
            let Some(tx) = self.wallet.tx_graph().get_tx(txid) else {
                continue;
            };
            // What left the wallet's coins for good: all but the change. An output to one of our
            // deposit addresses (a withdrawal to a customer of ours) is in flight too: it is an
            // uncredited deposit, taken off the assets above, until it is credited.
            let (sent, _) = self.wallet.sent_and_received(&tx);
            let change: u64 = tx
                .output
                .iter()
                .filter(|o| {
                    self.wallet
                        .derivation_of_spk(o.script_pubkey.clone())
                        .is_some_and(|(k, _)| k == KeychainKind::Internal)
                })
                .map(|o| o.value.to_sat())
                .sum();
            in_flight += sent.to_sat().saturating_sub(change);
        }
        let fee_income: u64 = store::all_withdrawals(&self.db)?
            .iter()
            .filter_map(|w| w.network_fee.map(|n| w.fee.0.saturating_sub(n.0)))
            .sum();
        let liabilities = self.ledger.btc_liabilities();
        let assets = i128::from(wallet_confirmed.0) + i128::from(wallet_pending.0)
            - i128::from(uncredited)
            + i128::from(in_flight)
            + i128::from(other);
        let surplus = assets - i128::from(liabilities.0);
        let surplus_sat =
            i64::try_from(surplus).unwrap_or(if surplus < 0 { i64::MIN } else { i64::MAX });
        let report = Reconciliation {
            wallet_confirmed,
            wallet_pending,
            uncredited_deposits: Amount(uncredited),
            withdrawals_in_flight: Amount(in_flight),
            other_assets: Amount(other),
            ledger_liabilities: liabilities,
            fee_income: Amount(fee_income),
            surplus_sat,
            shortfall: surplus_sat < 0,
        };
        if report.shortfall {
            tracing::error!(
                ?report,
                "reconciliation shortfall: the wallet holds less than the ledger owes"
            );
        }
        Ok(report)
    }

    /// Two-sided reconciliation of the records, beyond the totals of [`reconcile`](Self::reconcile):
    /// every credited deposit in this database is credited in the ledger (by its key) and every
    /// deposit the ledger credited is recorded as credited here; every completed withdrawal is
    /// paid by a confirmed transaction (the batch's, paying its address its amount) and completed
    /// in the ledger with the same account and amounts. Each mismatch is reported by id and
    /// raised as an alarm, even when the totals agree. One ledger query per record: an operator
    /// command, not part of every step.
    pub fn reconcile_records(&mut self) -> Result<RecordsReport, BatchError> {
        let mut report = RecordsReport::default();
        let mut found = Vec::new();
        for d in store::deposits(&self.db)? {
            let key = IdempotencyKey::outpoint(d.outpoint.txid.to_byte_array(), d.outpoint.vout);
            let Ok(in_ledger) = self.ledger.credited(key) else {
                report.unanswered += 1;
                continue;
            };
            report.deposits_checked += 1;
            // Credited under its own key unless all of it paid the account's debt; a reversal
            // or a credit again leaves that first credit in place.
            let here = matches!(
                d.status,
                DepositStatus::Credited
                    | DepositStatus::Reorged
                    | DepositStatus::Reversing
                    | DepositStatus::Reversed
                    | DepositStatus::Recrediting
            ) && d.netted < d.amount;
            if here && !in_ledger {
                found.push(RecordMismatch {
                    kind: "deposit_missing_in_ledger",
                    subject: format!("deposit {}", d.outpoint),
                    detail: format!(
                        "credited here ({} sat to account {}) but not in the ledger",
                        d.amount, d.account
                    ),
                });
            } else if !here && in_ledger {
                found.push(RecordMismatch {
                    kind: "deposit_not_recorded_credited",
                    subject: format!("deposit {}", d.outpoint),
                    detail: format!(
                        "credited in the ledger but pending here ({} sat to account {})",
                        d.amount, d.account
                    ),
                });
            }
        }
        // A deposit credited again after its last reversal: its credit again is in the ledger.
        for d in store::deposits(&self.db)? {
            if d.reversals == 0 || d.status != DepositStatus::Credited || d.recredit.is_zero() {
                continue;
            }
            match self
                .ledger
                .credited(crate::recredit_key(d.outpoint, d.reversals))
            {
                Err(_) => report.unanswered += 1,
                Ok(true) => {}
                Ok(false) => found.push(RecordMismatch {
                    kind: "deposit_recredit_missing_in_ledger",
                    subject: format!("deposit {}", d.outpoint),
                    detail: format!(
                        "credited again here ({} sat to account {}) but not in the ledger",
                        d.recredit, d.account
                    ),
                }),
            }
        }
        // Reversals and debt collections: a finished one completed in the ledger for the same
        // account and amount; a refused one holding nothing there (a hold stranded by a refusal
        // believed too early would be money taken from the account and never accounted for).
        for (id, account, amount, state) in store::reversals(&self.db)? {
            let wid = crate::reversal_id(id);
            let expect_done = match state.as_str() {
                "done" => true,
                "refused" => false,
                _ => continue,
            };
            let rec = match self.ledger.withdrawal(wid) {
                Ok(r) => r,
                Err(_) => {
                    report.unanswered += 1;
                    continue;
                }
            };
            report.reversals_checked += 1;
            let fine = match (&rec, expect_done) {
                (Some(w), true) => {
                    w.account == account
                        && w.amount == amount
                        && w.state == WithdrawalState::Completed
                }
                (None, false) => true,
                _ => false,
            };
            if !fine {
                found.push(RecordMismatch {
                    kind: if expect_done {
                        "reversal_ledger_mismatch"
                    } else {
                        "reversal_refused_but_held"
                    },
                    subject: format!("reversal {id}"),
                    detail: format!(
                        "{state} here ({amount} sat of account {account}); the ledger's record of {} is {rec:?}",
                        wid.0
                    ),
                });
            }
        }
        let batches: HashMap<u64, Option<Txid>> = store::all_batches(&self.db)?
            .into_iter()
            .map(|b| (b.id, b.confirmed_txid))
            .collect();
        let view = self.in_view(&batches.values().flatten().copied().collect());
        for w in store::withdrawals_in(&self.db, WithdrawalStatus::Completed)? {
            let subject = format!("withdrawal {}", w.id);
            let script = Address::<NetworkUnchecked>::from_str(&w.address)
                .ok()
                .and_then(|a| a.require_network(self.config.network).ok())
                .map(|a| a.script_pubkey());
            let txid = w.batch_id.and_then(|b| batches.get(&b).copied().flatten());
            let paid = txid
                .filter(|t| view.get(t).is_some_and(|c| *c > 0))
                .and_then(|t| self.wallet.tx_graph().get_tx(t))
                .is_some_and(|tx| {
                    tx.output.iter().any(|o| {
                        Some(&o.script_pubkey) == script.as_ref() && sats(o.value) == w.amount
                    })
                });
            if !paid {
                found.push(RecordMismatch {
                    kind: "withdrawal_not_confirmed",
                    subject: subject.clone(),
                    detail: format!(
                        "completed, but no confirmed transaction pays {} sat to {} (batch {:?}, tx {:?})",
                        w.amount, w.address, w.batch_id, txid
                    ),
                });
            }
            match self.ledger.withdrawal(w.id) {
                Err(_) => report.unanswered += 1,
                Ok(Some(rec))
                    if Self::same(&w, &rec) && rec.state == WithdrawalState::Completed => {}
                Ok(other) => found.push(RecordMismatch {
                    kind: "withdrawal_ledger_mismatch",
                    subject,
                    detail: format!("completed here; the ledger's record is {other:?}"),
                }),
            }
            report.withdrawals_checked += 1;
        }
        for m in &found {
            self.alarm(m.kind, &m.subject, &m.detail)?;
        }
        report.mismatches = found;
        Ok(report)
    }

    /// One full step, in order: resolve withdrawals whose ledger outcome is unknown, rebroadcast
    /// batches in flight, sync, credit deposits, complete
    /// withdrawals, batch, reconcile.
    pub fn step(&mut self, now: Timestamp) -> Result<StepReport, StepError> {
        self.last_now_ms = self.last_now_ms.max(now.as_millis());
        let unresolved = self.resolve_withdrawals()?;
        self.broadcast_pending(now)?;
        let sync = self.sync_once(now)?;
        let deposits = self.process_deposits(now)?;
        let withdrawals = self.process_withdrawals(now)?;
        self.watch_abandoned()?;
        let batch = self.run_batcher(now)?;
        let reconciliation = self.reconcile()?;
        self.note_shortfall(&reconciliation)
            .map_err(BatchError::from)?;
        let now_rec = (reconciliation.shortfall, reconciliation.surplus_sat);
        if self.decisions.is_some() && self.last_reconciliation != Some(now_rec) {
            let r = &reconciliation;
            self.decide(
                "custody.reconcile",
                &[
                    ("shortfall", r.shortfall.to_string()),
                    ("surplus_sat", r.surplus_sat.to_string()),
                    ("wallet_confirmed_sat", r.wallet_confirmed.0.to_string()),
                    ("wallet_pending_sat", r.wallet_pending.0.to_string()),
                    ("ledger_liabilities_sat", r.ledger_liabilities.0.to_string()),
                    (
                        "withdrawals_in_flight_sat",
                        r.withdrawals_in_flight.0.to_string(),
                    ),
                ],
            );
            self.last_reconciliation = Some(now_rec);
        }
        Ok(StepReport {
            sync,
            deposits,
            withdrawals,
            batch,
            reconciliation,
            unresolved_withdrawals: unresolved,
        })
    }
}

/// Witness weight of the (unsigned) inputs of a BDK psbt: P2WPKH inputs, 1 + 73 + 34 bytes.
fn batch_witness_wu(psbt: &Psbt) -> u64 {
    const P2WPKH_WITNESS_WU: u64 = 1 + 1 + 73 + 1 + 33;
    P2WPKH_WITNESS_WU * psbt.inputs.len() as u64
}

/// A signed BIP-127 proof of reserves over the wallet's confirmed UTXOs at its tip
/// ([`CustodyService::prove_reserves`]).
#[derive(Debug, Clone)]
pub struct ReservesProof {
    /// The finalized proof PSBT (input 0 the commitment, every other input signed).
    pub psbt: Psbt,
    /// The block the UTXOs are taken at (the wallet's tip).
    pub block_hash: bitcoin::BlockHash,
    /// Its height.
    pub block_height: u32,
    /// The sum of the UTXOs proven.
    pub reserves: Amount,
    /// How many UTXOs.
    pub utxos: usize,
}

impl CustodyService {
    /// A withdrawal batch in a block at the tip but not completed yet (fewer confirmations
    /// than `withdrawal_confirmations`, or its ledger answer still unresolved): (batch id, the
    /// paying txid). Its coins are gone at the tip while its withdrawals' holds are still
    /// liabilities, so no proof of reserves can be consistent until it completes.
    pub fn confirming_batch(&self) -> Result<Option<(u64, Txid)>, StoreError> {
        let (inflight, view) = self.inflight_in_view()?;
        Ok(inflight.into_iter().find_map(|(batch, txs)| {
            txs.iter()
                .find(|t| view.get(&t.txid).is_some_and(|c| *c > 0))
                .map(|t| (batch, t.txid))
        }))
    }

    /// Builds and signs a BIP-127 proof of reserves (`reserves::por`) for `message` over the
    /// wallet's UTXO set at its tip: every output confirmed at or below the tip that no
    /// transaction confirmed there spends. An output spent only by an unconfirmed transaction
    /// of ours (a withdrawal batch in the mempool) is still unspent at that block and is
    /// counted, as its withdrawals' holds are still liabilities until the batch confirms and
    /// completes; that batch's change is not (it is in no block). Deposits no balance counts
    /// yet are left out: the liabilities do not stand for them. Each reserve input is signed
    /// `SIGHASH_ALL` here, with the key that never leaves this crate; the result is checked by
    /// `reserves::por::verify_psbt` before it is returned. Changes nothing and persists nothing.
    pub fn prove_reserves(&self, message: &str) -> Result<ReservesProof, ProveError> {
        let tip = self.wallet.latest_checkpoint();
        let (block_height, block_hash) = (tip.height(), tip.hash());
        let build = |e: StoreError| ProveError::Build(e.to_string());
        let accounts: HashSet<u32> = store::deposit_indexes(&self.db)
            .map_err(build)?
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        let credited = self.credited_deposits().map_err(build)?;
        let confirmed: HashSet<Txid> = self
            .wallet
            .transactions()
            .filter(|t| match t.chain_position {
                ChainPosition::Confirmed { anchor, .. } => anchor.block_id.height <= block_height,
                ChainPosition::Unconfirmed { .. } => false,
            })
            .map(|t| t.tx_node.txid)
            .collect();
        let graph = self.wallet.tx_graph();
        let mut utxos: Vec<_> = self
            .wallet
            .list_output()
            .filter(|u| match u.chain_position {
                ChainPosition::Confirmed { anchor, .. } => anchor.block_id.height <= block_height,
                ChainPosition::Unconfirmed { .. } => false,
            })
            .filter(|u| {
                !u.is_spent
                    || !graph
                        .outspends(u.outpoint)
                        .iter()
                        .any(|t| confirmed.contains(t))
            })
            .filter(|u| {
                let deposit =
                    u.keychain == KeychainKind::External && accounts.contains(&u.derivation_index);
                !deposit || credited.contains(&u.outpoint)
            })
            .collect();
        if utxos.is_empty() {
            return Err(ProveError::NoUtxos);
        }
        utxos.sort_by_key(|u| u.outpoint);
        let count = utxos.len();
        let inputs = utxos
            .into_iter()
            .map(|u| {
                let op = u.outpoint;
                self.wallet
                    .get_psbt_input(u, Some(bitcoin::EcdsaSighashType::All.into()), true)
                    .map(|i| (op, i))
                    .map_err(|e| ProveError::Build(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut psbt = reserves::por::proof_psbt(message, inputs)?;
        let signed = self.key.sign_proof(&mut psbt).map_err(ProveError::Sign)?;
        if signed != count {
            return Err(ProveError::Sign(format!(
                "signed {signed} of {count} reserve inputs"
            )));
        }
        let finalized = self
            .wallet
            .finalize_psbt(&mut psbt, SignOptions::default())
            .map_err(|e| ProveError::Sign(e.to_string()))?;
        if !finalized {
            return Err(ProveError::Sign("inputs left unfinalized".into()));
        }
        let checked = reserves::por::verify_psbt(&psbt, message)?;
        debug_assert_eq!(checked.inputs.len(), count);
        Ok(ReservesProof {
            psbt,
            block_hash,
            block_height,
            reserves: sats(checked.reserves),
            utxos: count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::split_fee;
    use matching_engine::units::Amount;

    #[test]
    fn fee_split_is_exact_and_within_each_flat_fee() {
        let cases: &[(u64, &[u64])] = &[
            (0, &[10, 10]),
            (7, &[10, 10, 10]),
            (30, &[10, 10, 10]),
            (29, &[1, 3, 25]),
            (1_001, &[1_000, 1, 1]),
            (5, &[0, 5]),
        ];
        for (fee, flats) in cases {
            let flats: Vec<Amount> = flats.iter().copied().map(Amount).collect();
            let shares = split_fee(Amount(*fee), &flats);
            assert_eq!(
                shares.iter().map(|s| s.0).sum::<u64>(),
                *fee,
                "{fee} {flats:?}"
            );
            for (s, f) in shares.iter().zip(&flats) {
                assert!(s <= f, "{fee} {flats:?} {shares:?}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "batch fee above the flat fees")]
    fn fee_above_flat_fees_is_a_bug() {
        split_fee(Amount(31), &[Amount(10), Amount(10), Amount(10)]);
    }
}
