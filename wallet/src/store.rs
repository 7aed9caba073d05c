//! The service's own tables, in the wallet's SQLite database (`mediator_*`, next to BDK's).
//! Every function here is one statement or one transaction: durable when it returns.

use crate::error::StoreError;
use bdk_wallet::bitcoin::{OutPoint, Txid};
use bdk_wallet::rusqlite::{self, params, Connection, OptionalExtension};
use matching_engine::units::{AccountId, Amount, WithdrawalId};
use std::str::FromStr;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS mediator_deposit_address (
    keychain_index INTEGER PRIMARY KEY,
    account INTEGER NOT NULL,
    address TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    purpose TEXT NOT NULL DEFAULT 'deposit'
);
CREATE INDEX IF NOT EXISTS mediator_deposit_address_account ON mediator_deposit_address(account);
CREATE TABLE IF NOT EXISTS mediator_deposit (
    txid TEXT NOT NULL,
    vout INTEGER NOT NULL,
    account INTEGER NOT NULL,
    amount_sat INTEGER NOT NULL,
    status TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    PRIMARY KEY (txid, vout)
);
CREATE INDEX IF NOT EXISTS mediator_deposit_account ON mediator_deposit(account);
CREATE TABLE IF NOT EXISTS mediator_flagged_account (
    account INTEGER NOT NULL,
    reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    cleared_ms INTEGER
);
CREATE TABLE IF NOT EXISTS mediator_withdrawal (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account INTEGER NOT NULL,
    address TEXT NOT NULL,
    amount_sat INTEGER NOT NULL,
    fee_sat INTEGER NOT NULL,
    idempotency_key TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    created_ms INTEGER NOT NULL,
    batch_id INTEGER,
    network_fee_sat INTEGER,
    UNIQUE (account, idempotency_key)
);
CREATE INDEX IF NOT EXISTS mediator_withdrawal_status ON mediator_withdrawal(status);
CREATE TABLE IF NOT EXISTS mediator_alarm (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    message TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    cleared_ms INTEGER
);
CREATE TABLE IF NOT EXISTS mediator_batch (
    id INTEGER PRIMARY KEY,
    status TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    confirmed_txid TEXT
);
-- The shortfalls (sat, above the tolerance then) custody's last step found and holds payouts
-- back for (`CustodyService::check_outflow`): one row, so that a restart goes on holding them.
CREATE TABLE IF NOT EXISTS mediator_shortfall (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_short_sat INTEGER,
    held_sat INTEGER
);
CREATE TABLE IF NOT EXISTS mediator_batch_tx (
    txid TEXT PRIMARY KEY,
    batch_id INTEGER NOT NULL,
    raw BLOB NOT NULL,
    fee_sat INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);
-- Reversals of credited deposits whose transaction was double-spent (`deposit`, the deposit's
-- outpoint) and collections of an account's debt from its balance (`debt`, no outpoint): the
-- row first (its id is the engine withdrawal id's low bits), then the hold of `amount_sat`, then
-- its completion.
CREATE TABLE IF NOT EXISTS mediator_reversal (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    txid TEXT,
    vout INTEGER,
    account INTEGER NOT NULL,
    amount_sat INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
-- What an account owes custody: reversed credits its balance could not cover, less what its
-- later deposits paid.
CREATE TABLE IF NOT EXISTS mediator_debt (
    account INTEGER PRIMARY KEY,
    sat INTEGER NOT NULL CHECK (sat >= 0)
);
-- What operators wrote off of accounts' debts and a deposit confirmed again has not yet
-- recovered: taken from the deposit's credit again before the account sees it.
CREATE TABLE IF NOT EXISTS mediator_written_off (
    account INTEGER PRIMARY KEY,
    sat INTEGER NOT NULL CHECK (sat >= 0)
);
";

/// The withdrawal table of databases made before ids came from AUTOINCREMENT and keys were per
/// account: copied into the current schema in one transaction (ids kept; AUTOINCREMENT continues
/// above the highest).
const MIGRATE_WITHDRAWALS: &str = "
BEGIN IMMEDIATE;
CREATE TABLE mediator_withdrawal_v2 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account INTEGER NOT NULL,
    address TEXT NOT NULL,
    amount_sat INTEGER NOT NULL,
    fee_sat INTEGER NOT NULL,
    idempotency_key TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    created_ms INTEGER NOT NULL,
    batch_id INTEGER,
    network_fee_sat INTEGER,
    UNIQUE (account, idempotency_key)
);
INSERT INTO mediator_withdrawal_v2 (id, account, address, amount_sat, fee_sat, idempotency_key,
    status, reason, created_ms, batch_id, network_fee_sat)
    SELECT id, account, address, amount_sat, fee_sat, idempotency_key, status, reason, created_ms,
    batch_id, network_fee_sat FROM mediator_withdrawal;
DROP TABLE mediator_withdrawal;
ALTER TABLE mediator_withdrawal_v2 RENAME TO mediator_withdrawal;
CREATE INDEX IF NOT EXISTS mediator_withdrawal_status ON mediator_withdrawal(status);
COMMIT;
";

/// Creates the tables when missing.
pub(crate) fn init(db: &Connection) -> Result<(), StoreError> {
    db.execute_batch(SCHEMA)?;
    let withdrawal_sql: String = db.query_row(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'mediator_withdrawal'",
        [],
        |r| r.get(0),
    )?;
    // First, so the columns added below are added to the migrated table (the copy keeps only
    // the columns it names).
    if !withdrawal_sql.contains("AUTOINCREMENT") {
        if let Err(e) = db.execute_batch(MIGRATE_WITHDRAWALS) {
            let _ = db.execute_batch("ROLLBACK");
            return Err(e.into());
        }
    }
    // Columns added later: backoff of withdrawals and batches that could not go out.
    for (table, column, decl) in [
        ("mediator_withdrawal", "skips", "INTEGER NOT NULL DEFAULT 0"),
        (
            "mediator_withdrawal",
            "retry_after_ms",
            "INTEGER NOT NULL DEFAULT 0",
        ),
        // What the request counted as the account's Lightning outflow of the last 24 hours
        // (`WithdrawalRequest::other_used`), for re-deciding a `new` row after a crash. NULL
        // in rows written before it was recorded.
        ("mediator_withdrawal", "other_used_sat", "INTEGER"),
        ("mediator_batch", "refusals", "INTEGER NOT NULL DEFAULT 0"),
        // Reversals ([`DepositStatus::Reversed`]): the part of a deposit that paid its
        // account's debt instead of being credited, the part of a reversal taken from the
        // balance, how many times it was reversed, and what a credit again is for.
        (
            "mediator_deposit",
            "netted_sat",
            "INTEGER NOT NULL DEFAULT 0",
        ),
        (
            "mediator_deposit",
            "reversed_sat",
            "INTEGER NOT NULL DEFAULT 0",
        ),
        (
            "mediator_deposit",
            "reversals",
            "INTEGER NOT NULL DEFAULT 0",
        ),
        (
            "mediator_deposit",
            "recredit_sat",
            "INTEGER NOT NULL DEFAULT 0",
        ),
        (
            "mediator_deposit",
            "recovered_sat",
            "INTEGER NOT NULL DEFAULT 0",
        ),
        // The still-unspent inputs of a batch an operator abandoned (outpoints, comma
        // separated): the next batch spends them, so that the two can never both confirm.
        ("mediator_batch", "kill_inputs", "TEXT"),
        // The withdrawals an abandoned batch paid (comma separated ids): watched, in case it
        // confirms after all.
        ("mediator_batch", "abandoned_withdrawals", "TEXT"),
        ("mediator_batch", "last_error", "TEXT"),
        (
            "mediator_batch",
            "retry_after_ms",
            "INTEGER NOT NULL DEFAULT 0",
        ),
    ] {
        let has: bool = db
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = '{column}'"
            ))?
            .exists([])?;
        if !has {
            db.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    // Databases made before an operator could clear a flag.
    let has_cleared: bool = db
        .prepare(
            "SELECT 1 FROM pragma_table_info('mediator_flagged_account') WHERE name = 'cleared_ms'",
        )?
        .exists([])?;
    if !has_cleared {
        db.execute_batch("ALTER TABLE mediator_flagged_account ADD COLUMN cleared_ms INTEGER")?;
    }
    // Databases made before addresses had a purpose: every address so far is a deposit address.
    let has_purpose: bool = db
        .prepare(
            "SELECT 1 FROM pragma_table_info('mediator_deposit_address') WHERE name = 'purpose'",
        )?
        .exists([])?;
    if !has_purpose {
        db.execute_batch(
            "ALTER TABLE mediator_deposit_address ADD COLUMN purpose TEXT NOT NULL DEFAULT 'deposit'",
        )?;
    }
    Ok(())
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| corrupt("negative amount"))
}

fn txid(s: &str) -> Result<Txid, StoreError> {
    Txid::from_str(s).map_err(|_| corrupt("txid"))
}

// ---------------------------------------------------------------------------------------------
// Deposit addresses

/// What an address was handed out for. Payments to either are credited to its account; only
/// deposit addresses are shown as the account's deposit address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AddressPurpose {
    /// The account's own deposit address.
    Deposit,
    /// One merchant invoice's address (used for that invoice only).
    Invoice,
}

impl AddressPurpose {
    fn as_str(self) -> &'static str {
        match self {
            Self::Deposit => "deposit",
            Self::Invoice => "invoice",
        }
    }
}

/// Records that external indexes belong to `account`, in one transaction.
pub(crate) fn insert_deposit_addresses(
    db: &mut Connection,
    account: AccountId,
    rows: &[(u32, String)],
    purpose: AddressPurpose,
    now_ms: u64,
) -> Result<(), StoreError> {
    let tx = db.transaction()?;
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO mediator_deposit_address (keychain_index, account, address, created_ms, purpose)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for (index, address) in rows {
            st.execute(params![
                index,
                account.0,
                address,
                to_i64(now_ms),
                purpose.as_str()
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// All `(index, account)` pairs.
pub(crate) fn deposit_indexes(db: &Connection) -> Result<Vec<(u32, AccountId)>, StoreError> {
    let mut st =
        db.prepare_cached("SELECT keychain_index, account FROM mediator_deposit_address")?;
    let rows = st.query_map([], |r| {
        Ok((r.get::<_, u32>(0)?, AccountId(r.get::<_, u32>(1)?)))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The deposit addresses of one account (not its invoice addresses), oldest first.
pub(crate) fn addresses_of(db: &Connection, account: AccountId) -> Result<Vec<String>, StoreError> {
    let mut st = db.prepare_cached(
        "SELECT address FROM mediator_deposit_address WHERE account = ?1 AND purpose = 'deposit'
         ORDER BY keychain_index",
    )?;
    let rows = st.query_map([account.0], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---------------------------------------------------------------------------------------------
// Deposits

/// Where a deposit is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DepositStatus {
    /// Seen (mempool or too few confirmations); not credited.
    Pending,
    /// The credit was asked for and its answer is not known (lost, or the process stopped):
    /// maybe credited. Written, and committed, before the ledger is asked; resolved by asking it
    /// again (confirmed) or by asking whether the key was credited (no longer confirmed).
    Crediting,
    /// Credited to the ledger.
    Credited,
    /// Credited, then a reorg took it out of the chain: reported, account flagged.
    Reorged,
    /// Credited, and its transaction was double-spent: being taken back from the account (the
    /// reversal's ledger hold and completion asked for, answers maybe lost).
    Reversing,
    /// Credited, its transaction double-spent, and taken back: what the balance held then, the
    /// rest as the account's debt.
    Reversed,
    /// Reversed, then confirmed again: credited again (`recredit_sat`, the answer maybe lost).
    Recrediting,
    /// Seen, never credited, and its transaction is no longer in the mempool nor the chain
    /// (replaced, e.g. a fee bump of the payer, or double-spent). A view of a `pending` row
    /// ([`CustodyService::deposits`](crate::CustodyService::deposits)), never stored: pending
    /// again if the transaction comes back.
    Dropped,
}

impl DepositStatus {
    fn as_str(self) -> &'static str {
        match self {
            DepositStatus::Pending => "pending",
            DepositStatus::Crediting => "crediting",
            DepositStatus::Credited => "credited",
            DepositStatus::Reorged => "reorged",
            DepositStatus::Reversing => "reversing",
            DepositStatus::Reversed => "reversed",
            DepositStatus::Recrediting => "recrediting",
            DepositStatus::Dropped => "dropped",
        }
    }
    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "pending" => Ok(DepositStatus::Pending),
            "crediting" => Ok(DepositStatus::Crediting),
            "credited" => Ok(DepositStatus::Credited),
            "reorged" => Ok(DepositStatus::Reorged),
            "reversing" => Ok(DepositStatus::Reversing),
            "reversed" => Ok(DepositStatus::Reversed),
            "recrediting" => Ok(DepositStatus::Recrediting),
            _ => Err(corrupt("deposit status")),
        }
    }
}

/// A deposit row.
#[derive(Clone, Debug)]
pub(crate) struct DepositRow {
    pub outpoint: OutPoint,
    pub account: AccountId,
    pub amount: Amount,
    pub status: DepositStatus,
    pub first_seen_ms: u64,
    /// The part that paid the account's debt instead of being credited.
    pub netted: Amount,
    /// Times reversed.
    pub reversals: u32,
    /// The part of its last reversal taken from the balance (the rest became debt).
    pub reversed: Amount,
    /// What its credit again is for (`recrediting`).
    pub recredit: Amount,
    /// What its credit again took back of a written-off debt.
    pub recovered: Amount,
}

/// Inserts a new pending deposit (no-op when known).
pub(crate) fn insert_deposit(
    db: &Connection,
    outpoint: OutPoint,
    account: AccountId,
    amount: Amount,
    now_ms: u64,
) -> Result<(), StoreError> {
    db.execute(
        "INSERT OR IGNORE INTO mediator_deposit (txid, vout, account, amount_sat, status, first_seen_ms)
         VALUES (?1, ?2, ?3, ?4, 'pending', ?5)",
        params![outpoint.txid.to_string(), outpoint.vout, account.0, to_i64(amount.0), to_i64(now_ms)],
    )?;
    Ok(())
}

/// Sets a deposit's status.
pub(crate) fn set_deposit_status(
    db: &Connection,
    outpoint: OutPoint,
    status: DepositStatus,
) -> Result<(), StoreError> {
    db.execute(
        "UPDATE mediator_deposit SET status = ?3 WHERE txid = ?1 AND vout = ?2",
        params![outpoint.txid.to_string(), outpoint.vout, status.as_str()],
    )?;
    Ok(())
}

/// Sets the part of a deposit that pays its account's debt (with the `crediting` intent).
pub(crate) fn set_deposit_netted(
    db: &Connection,
    outpoint: OutPoint,
    netted: Amount,
) -> Result<(), StoreError> {
    db.execute(
        "UPDATE mediator_deposit SET netted_sat = ?3 WHERE txid = ?1 AND vout = ?2",
        params![outpoint.txid.to_string(), outpoint.vout, to_i64(netted.0)],
    )?;
    Ok(())
}

/// Records a finished reversal: `reversed` taken from the balance, one more reversal.
pub(crate) fn set_deposit_reversed(
    db: &Connection,
    outpoint: OutPoint,
    reversed: Amount,
) -> Result<(), StoreError> {
    db.execute(
        "UPDATE mediator_deposit SET status = 'reversed', reversed_sat = ?3,
                reversals = reversals + 1, recredit_sat = 0, recovered_sat = 0
         WHERE txid = ?1 AND vout = ?2",
        params![outpoint.txid.to_string(), outpoint.vout, to_i64(reversed.0)],
    )?;
    Ok(())
}

/// Records the intent to credit a reversed deposit again with `amount`, having taken
/// `recovered` of a written-off debt.
pub(crate) fn set_deposit_recrediting(
    db: &Connection,
    outpoint: OutPoint,
    amount: Amount,
    recovered: Amount,
) -> Result<(), StoreError> {
    db.execute(
        "UPDATE mediator_deposit SET status = 'recrediting', recredit_sat = ?3, recovered_sat = ?4
         WHERE txid = ?1 AND vout = ?2",
        params![
            outpoint.txid.to_string(),
            outpoint.vout,
            to_i64(amount.0),
            to_i64(recovered.0)
        ],
    )?;
    Ok(())
}

/// What operators wrote off of `account`'s debts, not yet recovered.
pub(crate) fn written_off_of(db: &Connection, account: AccountId) -> Result<Amount, StoreError> {
    let sat: Option<i64> = db
        .query_row(
            "SELECT sat FROM mediator_written_off WHERE account = ?1",
            params![account.0],
            |r| r.get(0),
        )
        .optional()?;
    Ok(Amount(to_u64(sat.unwrap_or(0))?))
}

/// Sets what operators wrote off of `account`'s debts, not yet recovered.
pub(crate) fn set_written_off(
    db: &Connection,
    account: AccountId,
    sat: Amount,
) -> Result<(), StoreError> {
    db.execute(
        "INSERT INTO mediator_written_off (account, sat) VALUES (?1, ?2)
         ON CONFLICT(account) DO UPDATE SET sat = excluded.sat",
        params![account.0, to_i64(sat.0)],
    )?;
    Ok(())
}

/// What `account` owes custody.
pub(crate) fn debt_of(db: &Connection, account: AccountId) -> Result<Amount, StoreError> {
    let sat: Option<i64> = db
        .query_row(
            "SELECT sat FROM mediator_debt WHERE account = ?1",
            params![account.0],
            |r| r.get(0),
        )
        .optional()?;
    Ok(Amount(to_u64(sat.unwrap_or(0))?))
}

/// Sets what `account` owes custody (a zero debt leaves no row).
pub(crate) fn set_debt(db: &Connection, account: AccountId, sat: Amount) -> Result<(), StoreError> {
    if sat.is_zero() {
        db.execute(
            "DELETE FROM mediator_debt WHERE account = ?1",
            params![account.0],
        )?;
    } else {
        db.execute(
            "INSERT INTO mediator_debt (account, sat) VALUES (?1, ?2)
             ON CONFLICT(account) DO UPDATE SET sat = excluded.sat",
            params![account.0, to_i64(sat.0)],
        )?;
    }
    Ok(())
}

/// Every account's debt, by account.
pub(crate) fn debts(db: &Connection) -> Result<Vec<(AccountId, Amount)>, StoreError> {
    let mut st = db.prepare("SELECT account, sat FROM mediator_debt ORDER BY account")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (a, sat) = row?;
        out.push((AccountId(a), Amount(to_u64(sat)?)));
    }
    Ok(out)
}

/// Where a reversal is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReversalState {
    /// Written; the hold asked for (answer maybe lost).
    Holding,
    /// Held; its completion asked for (answer maybe lost).
    Held,
}

/// A reversal in progress.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReversalRow {
    pub id: u64,
    pub amount: Amount,
    pub state: ReversalState,
}

/// Writes a reversal of `amount` (state `holding`): of a deposit (`Some(outpoint)`) or a
/// collection of the account's debt (`None`). Its id.
pub(crate) fn insert_reversal(
    db: &Connection,
    outpoint: Option<OutPoint>,
    account: AccountId,
    amount: Amount,
    now_ms: u64,
) -> Result<u64, StoreError> {
    db.execute(
        "INSERT INTO mediator_reversal (kind, txid, vout, account, amount_sat, state, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, 'holding', ?6)",
        params![
            if outpoint.is_some() {
                "deposit"
            } else {
                "debt"
            },
            outpoint.map(|o| o.txid.to_string()),
            outpoint.map(|o| o.vout),
            account.0,
            to_i64(amount.0),
            to_i64(now_ms)
        ],
    )?;
    to_u64(db.last_insert_rowid())
}

/// The reversal of a deposit in progress (`holding` or `held`), if any.
pub(crate) fn open_reversal(
    db: &Connection,
    outpoint: OutPoint,
) -> Result<Option<ReversalRow>, StoreError> {
    let row: Option<(i64, i64, String)> = db
        .query_row(
            "SELECT id, amount_sat, state FROM mediator_reversal
             WHERE kind = 'deposit' AND txid = ?1 AND vout = ?2 AND state IN ('holding', 'held')",
            params![outpoint.txid.to_string(), outpoint.vout],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    reversal_row(row)
}

/// The collection of an account's debt in progress (`holding` or `held`), if any.
pub(crate) fn open_collection(
    db: &Connection,
    account: AccountId,
) -> Result<Option<ReversalRow>, StoreError> {
    let row: Option<(i64, i64, String)> = db
        .query_row(
            "SELECT id, amount_sat, state FROM mediator_reversal
             WHERE kind = 'debt' AND account = ?1 AND state IN ('holding', 'held')",
            params![account.0],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    reversal_row(row)
}

fn reversal_row(row: Option<(i64, i64, String)>) -> Result<Option<ReversalRow>, StoreError> {
    let Some((id, amount, state)) = row else {
        return Ok(None);
    };
    let state = match state.as_str() {
        "holding" => ReversalState::Holding,
        "held" => ReversalState::Held,
        _ => return Err(corrupt("reversal state")),
    };
    Ok(Some(ReversalRow {
        id: to_u64(id)?,
        amount: Amount(to_u64(amount)?),
        state,
    }))
}

/// Every reversal and debt collection: (id, account, amount, state).
pub(crate) fn reversals(
    db: &Connection,
) -> Result<Vec<(u64, AccountId, Amount, String)>, StoreError> {
    let mut st =
        db.prepare("SELECT id, account, amount_sat, state FROM mediator_reversal ORDER BY id")?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, u32>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    rows.map(|r| {
        let (id, account, amount, state) = r?;
        Ok((
            to_u64(id)?,
            AccountId(account),
            Amount(to_u64(amount)?),
            state,
        ))
    })
    .collect()
}

/// Moves a reversal on: `held`, `done`, or `refused` (the hold was refused; nothing held).
pub(crate) fn set_reversal_state(db: &Connection, id: u64, state: &str) -> Result<(), StoreError> {
    db.execute(
        "UPDATE mediator_reversal SET state = ?2 WHERE id = ?1",
        params![to_i64(id), state],
    )?;
    Ok(())
}

/// All deposits, oldest first.
pub(crate) fn deposits(db: &Connection) -> Result<Vec<DepositRow>, StoreError> {
    query_deposits(db, "", [])
}

/// One account's deposits, oldest first, read through the index on account (a user's history
/// reads that account's rows only, not every account's: it runs under custody's lock).
pub(crate) fn deposits_of_account(
    db: &Connection,
    account: AccountId,
) -> Result<Vec<DepositRow>, StoreError> {
    query_deposits(db, "WHERE account = ?1", [account.0])
}

/// The columns [`query_deposits`] reads.
const DEPOSIT_COLS: &str = "txid, vout, account, amount_sat, status, first_seen_ms, netted_sat, \
     reversals, reversed_sat, recredit_sat, recovered_sat";

fn query_deposits(
    db: &Connection,
    where_: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<DepositRow>, StoreError> {
    let sql = format!("SELECT {DEPOSIT_COLS} FROM mediator_deposit {where_} ORDER BY rowid");
    let mut st = db.prepare_cached(&sql)?;
    let rows = st.query_map(p, |r| {
        Ok((
            (
                r.get::<_, String>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
            ),
            (
                r.get::<_, i64>(6)?,
                r.get::<_, u32>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, i64>(9)?,
                r.get::<_, i64>(10)?,
            ),
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (
            (t, vout, account, amount, status, seen),
            (netted, reversals, reversed, recredit, recovered),
        ) = row?;
        out.push(DepositRow {
            outpoint: OutPoint {
                txid: txid(&t)?,
                vout,
            },
            account: AccountId(account),
            amount: Amount(to_u64(amount)?),
            status: DepositStatus::parse(&status)?,
            first_seen_ms: to_u64(seen)?,
            netted: Amount(to_u64(netted)?),
            reversals,
            reversed: Amount(to_u64(reversed)?),
            recredit: Amount(to_u64(recredit)?),
            recovered: Amount(to_u64(recovered)?),
        });
    }
    Ok(out)
}

/// Flags an account for review.
pub(crate) fn flag_account(
    db: &Connection,
    account: AccountId,
    reason: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    db.execute(
        "INSERT INTO mediator_flagged_account (account, reason, at_ms) VALUES (?1, ?2, ?3)",
        params![account.0, reason, to_i64(now_ms)],
    )?;
    Ok(())
}

/// Clears every flag of an account. Returns how many there were.
pub(crate) fn clear_flags(
    db: &Connection,
    account: AccountId,
    now_ms: u64,
) -> Result<usize, StoreError> {
    Ok(db.execute(
        "UPDATE mediator_flagged_account SET cleared_ms = ?2
         WHERE account = ?1 AND cleared_ms IS NULL",
        params![account.0, to_i64(now_ms)],
    )?)
}

/// Flagged accounts (flags not cleared) with their reasons.
pub(crate) fn flagged(db: &Connection) -> Result<Vec<(AccountId, String)>, StoreError> {
    let mut st = db.prepare_cached(
        "SELECT account, reason FROM mediator_flagged_account WHERE cleared_ms IS NULL
         ORDER BY rowid",
    )?;
    let rows = st.query_map([], |r| {
        Ok((AccountId(r.get::<_, u32>(0)?), r.get::<_, String>(1)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---------------------------------------------------------------------------------------------
// Withdrawals

/// Where a withdrawal is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WithdrawalStatus {
    /// Recorded, ledger hold not yet confirmed (only seen after a crash).
    New,
    /// Held; waits for an operator's approval.
    AwaitingApproval,
    /// Held; waits for a batch.
    Pending,
    /// In a batch transaction that is signed (and broadcast, or about to be).
    Batched,
    /// Paid and completed in the ledger.
    Completed,
    /// Given back to the account; see its reason.
    Released,
    /// A release was asked (reason recorded) and the ledger's answer is not known yet: never
    /// batched; resolved by asking the ledger (retried every step).
    Releasing,
}

impl WithdrawalStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            WithdrawalStatus::New => "new",
            WithdrawalStatus::AwaitingApproval => "awaiting_approval",
            WithdrawalStatus::Pending => "pending",
            WithdrawalStatus::Batched => "batched",
            WithdrawalStatus::Completed => "completed",
            WithdrawalStatus::Released => "released",
            WithdrawalStatus::Releasing => "releasing",
        }
    }
    fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "new" => WithdrawalStatus::New,
            "awaiting_approval" => WithdrawalStatus::AwaitingApproval,
            "pending" => WithdrawalStatus::Pending,
            "batched" => WithdrawalStatus::Batched,
            "completed" => WithdrawalStatus::Completed,
            "released" => WithdrawalStatus::Released,
            "releasing" => WithdrawalStatus::Releasing,
            _ => return Err(corrupt("withdrawal status")),
        })
    }
}

/// A withdrawal as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WithdrawalView {
    /// Id (also the ledger's withdrawal id).
    pub id: WithdrawalId,
    /// Owner.
    pub account: AccountId,
    /// Destination address.
    pub address: String,
    /// Amount paid out, sats.
    pub amount: Amount,
    /// Flat fee charged, sats.
    pub fee: Amount,
    /// Caller's idempotency key.
    pub idempotency_key: String,
    /// Status.
    pub status: WithdrawalStatus,
    /// Why it was released, if it was.
    pub reason: Option<String>,
    /// When requested, ms since the epoch.
    pub created_ms: u64,
    /// The batch paying it, if any.
    pub batch_id: Option<u64>,
    /// Its share of the network fee, once completed.
    pub network_fee: Option<Amount>,
}

const W_COLS: &str = "id, account, address, amount_sat, fee_sat, idempotency_key, status, reason,
    created_ms, batch_id, network_fee_sat";

fn w_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WithdrawalRaw> {
    Ok(WithdrawalRaw {
        id: r.get(0)?,
        account: r.get(1)?,
        address: r.get(2)?,
        amount: r.get(3)?,
        fee: r.get(4)?,
        key: r.get(5)?,
        status: r.get(6)?,
        reason: r.get(7)?,
        created_ms: r.get(8)?,
        batch_id: r.get(9)?,
        network_fee: r.get(10)?,
    })
}

struct WithdrawalRaw {
    id: i64,
    account: u32,
    address: String,
    amount: i64,
    fee: i64,
    key: String,
    status: String,
    reason: Option<String>,
    created_ms: i64,
    batch_id: Option<i64>,
    network_fee: Option<i64>,
}

impl WithdrawalRaw {
    fn view(self) -> Result<WithdrawalView, StoreError> {
        Ok(WithdrawalView {
            id: WithdrawalId(to_u64(self.id)?),
            account: AccountId(self.account),
            address: self.address,
            amount: Amount(to_u64(self.amount)?),
            fee: Amount(to_u64(self.fee)?),
            idempotency_key: self.key,
            status: WithdrawalStatus::parse(&self.status)?,
            reason: self.reason,
            created_ms: to_u64(self.created_ms)?,
            batch_id: self.batch_id.map(to_u64).transpose()?,
            network_fee: self.network_fee.map(to_u64).transpose()?.map(Amount),
        })
    }
}

fn query_withdrawals(
    db: &Connection,
    where_: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<WithdrawalView>, StoreError> {
    let sql = format!("SELECT {W_COLS} FROM mediator_withdrawal WHERE {where_} ORDER BY id");
    let mut st = db.prepare_cached(&sql)?;
    let rows = st.query_map(p, w_row)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row?.view()?);
    }
    Ok(out)
}

/// One withdrawal.
pub(crate) fn withdrawal(
    db: &Connection,
    id: WithdrawalId,
) -> Result<Option<WithdrawalView>, StoreError> {
    Ok(query_withdrawals(db, "id = ?1", [to_i64(id.0)])?
        .into_iter()
        .next())
}

/// The account's withdrawal with this idempotency key (keys are per account).
pub(crate) fn withdrawal_by_key(
    db: &Connection,
    account: AccountId,
    key: &str,
) -> Result<Option<WithdrawalId>, StoreError> {
    let id: Option<i64> = db
        .query_row(
            "SELECT id FROM mediator_withdrawal WHERE account = ?1 AND idempotency_key = ?2",
            params![account.0, key],
            |r| r.get(0),
        )
        .optional()?;
    Ok(id.map(to_u64).transpose()?.map(WithdrawalId))
}

/// One account's withdrawals, oldest first.
pub(crate) fn withdrawals_of_account(
    db: &Connection,
    account: AccountId,
) -> Result<Vec<WithdrawalView>, StoreError> {
    query_withdrawals(db, "account = ?1", [account.0])
}

/// Withdrawals in one status, oldest first.
pub(crate) fn withdrawals_in(
    db: &Connection,
    status: WithdrawalStatus,
) -> Result<Vec<WithdrawalView>, StoreError> {
    query_withdrawals(db, "status = ?1", [status.as_str()])
}

/// Withdrawals of one batch.
pub(crate) fn withdrawals_of_batch(
    db: &Connection,
    batch: u64,
) -> Result<Vec<WithdrawalView>, StoreError> {
    query_withdrawals(db, "batch_id = ?1", [to_i64(batch)])
}

/// All withdrawals.
pub(crate) fn all_withdrawals(db: &Connection) -> Result<Vec<WithdrawalView>, StoreError> {
    query_withdrawals(db, "1 = 1", [])
}

/// Sum of amounts an account requested since `since_ms`, released ones excluded.
pub(crate) fn withdrawn_since(
    db: &Connection,
    account: AccountId,
    since_ms: u64,
) -> Result<Amount, StoreError> {
    let sum: i64 = db.query_row(
        "SELECT COALESCE(SUM(amount_sat), 0) FROM mediator_withdrawal
         WHERE account = ?1 AND created_ms > ?2 AND status != 'released'",
        params![account.0, to_i64(since_ms)],
        |r| r.get(0),
    )?;
    Ok(Amount(to_u64(sum)?))
}

/// Sum of amounts all accounts requested since `since_ms`, released ones excluded.
pub(crate) fn withdrawn_since_all(db: &Connection, since_ms: u64) -> Result<Amount, StoreError> {
    let sum: i64 = db.query_row(
        "SELECT COALESCE(SUM(amount_sat), 0) FROM mediator_withdrawal
         WHERE created_ms > ?1 AND status != 'released'",
        [to_i64(since_ms)],
        |r| r.get(0),
    )?;
    Ok(Amount(to_u64(sum)?))
}

/// Withdrawals put off by the batcher: id -> (times skipped, not before this time).
pub(crate) fn deferred(
    db: &Connection,
) -> Result<std::collections::HashMap<WithdrawalId, (u32, u64)>, StoreError> {
    let mut st = db.prepare_cached(
        "SELECT id, skips, retry_after_ms FROM mediator_withdrawal
         WHERE status = 'pending' AND skips > 0",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, u32>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut out = std::collections::HashMap::new();
    for row in rows {
        let (id, skips, after) = row?;
        out.insert(WithdrawalId(to_u64(id)?), (skips, to_u64(after)?));
    }
    Ok(out)
}

/// Puts a pending withdrawal off until `retry_after_ms`; returns how often it was skipped.
pub(crate) fn defer_withdrawal(
    db: &Connection,
    id: WithdrawalId,
    retry_after_ms: u64,
) -> Result<u32, StoreError> {
    Ok(db.query_row(
        "UPDATE mediator_withdrawal SET skips = skips + 1, retry_after_ms = ?2 WHERE id = ?1
         RETURNING skips",
        params![to_i64(id.0), to_i64(retry_after_ms)],
        |r| r.get(0),
    )?)
}

/// A batch's broadcast state: refusals by the node in a row, the last error, next attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct BatchBroadcast {
    pub refusals: u32,
    pub last_error: Option<String>,
    pub retry_after_ms: u64,
}

/// The broadcast state of a batch.
pub(crate) fn batch_broadcast(db: &Connection, batch: u64) -> Result<BatchBroadcast, StoreError> {
    let (refusals, last_error, after) = db.query_row(
        "SELECT refusals, last_error, retry_after_ms FROM mediator_batch WHERE id = ?1",
        [to_i64(batch)],
        |r| {
            Ok((
                r.get::<_, u32>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        },
    )?;
    Ok(BatchBroadcast {
        refusals,
        last_error,
        retry_after_ms: to_u64(after)?,
    })
}

/// Records the node's refusal of a batch (or, with `None`, an accepted broadcast: the count is
/// reset). Returns the refusals in a row.
pub(crate) fn batch_refused(
    db: &Connection,
    batch: u64,
    error: Option<&str>,
    retry_after_ms: u64,
) -> Result<u32, StoreError> {
    Ok(match error {
        Some(e) => db.query_row(
            "UPDATE mediator_batch SET refusals = refusals + 1, last_error = ?2,
             retry_after_ms = ?3 WHERE id = ?1 RETURNING refusals",
            params![to_i64(batch), e, to_i64(retry_after_ms)],
            |r| r.get(0),
        )?,
        None => {
            db.execute(
                "UPDATE mediator_batch SET refusals = 0, retry_after_ms = 0 WHERE id = ?1",
                [to_i64(batch)],
            )?;
            0
        }
    })
}

/// A new version of a batch (a fee bump) is tried at once: the backoff was the old version's.
/// The refusal count stays until the node accepts a version.
pub(crate) fn batch_retry_now(db: &Connection, batch: u64) -> Result<(), StoreError> {
    db.execute(
        "UPDATE mediator_batch SET retry_after_ms = 0 WHERE id = ?1",
        [to_i64(batch)],
    )?;
    Ok(())
}

/// A batch row: id, status (`inflight`, `confirmed`, `alarm`), created, confirmed txid,
/// broadcast state.
pub(crate) struct BatchRow {
    pub id: u64,
    pub status: String,
    pub created_ms: u64,
    pub confirmed_txid: Option<Txid>,
    pub broadcast: BatchBroadcast,
}

/// All batches, newest first.
pub(crate) fn all_batches(db: &Connection) -> Result<Vec<BatchRow>, StoreError> {
    let mut st = db.prepare_cached(
        "SELECT id, status, created_ms, confirmed_txid, refusals, last_error, retry_after_ms
         FROM mediator_batch ORDER BY id DESC",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, u32>(4)?,
            r.get::<_, Option<String>>(5)?,
            r.get::<_, i64>(6)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, status, created, confirmed, refusals, last_error, after) = row?;
        out.push(BatchRow {
            id: to_u64(id)?,
            status,
            created_ms: to_u64(created)?,
            confirmed_txid: confirmed.as_deref().map(txid).transpose()?,
            broadcast: BatchBroadcast {
                refusals,
                last_error,
                retry_after_ms: to_u64(after)?,
            },
        });
    }
    Ok(out)
}

/// The transaction that confirmed a completed batch (`None`: in flight, or no such batch).
pub(crate) fn batch_confirmed_txid(
    db: &Connection,
    batch: u64,
) -> Result<Option<Txid>, StoreError> {
    let t: Option<Option<String>> = db
        .query_row(
            "SELECT confirmed_txid FROM mediator_batch WHERE id = ?1",
            [to_i64(batch)],
            |r| r.get(0),
        )
        .optional()?;
    t.flatten().as_deref().map(txid).transpose()
}

/// The newest `limit` completed batches (status `confirmed` or `alarm`) with the transaction
/// that confirmed, newest first.
pub(crate) fn recent_completed_batches(
    db: &Connection,
    limit: u32,
) -> Result<Vec<(u64, Txid)>, StoreError> {
    let mut st = db.prepare_cached(
        "SELECT id, confirmed_txid FROM mediator_batch
         WHERE status != 'inflight' AND confirmed_txid IS NOT NULL ORDER BY id DESC LIMIT ?1",
    )?;
    let rows = st.query_map([limit], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, confirmed) = row?;
        out.push((to_u64(id)?, txid(&confirmed)?));
    }
    Ok(out)
}

/// A withdrawal request as recorded before its hold (status `new`).
pub(crate) struct NewWithdrawal<'a> {
    pub account: AccountId,
    pub address: &'a str,
    pub amount: Amount,
    pub fee: Amount,
    pub key: &'a str,
    pub created_ms: u64,
    /// The Lightning outflow the request counted (`WithdrawalRequest::other_used`).
    pub other_used: Amount,
}

/// Inserts a new withdrawal in status `new`. Its id comes from AUTOINCREMENT: never handed out
/// again, even after the row is deleted (the ledger may know an id whose row is gone).
pub(crate) fn insert_withdrawal(
    db: &mut Connection,
    w: &NewWithdrawal<'_>,
) -> Result<WithdrawalId, StoreError> {
    db.execute(
        "INSERT INTO mediator_withdrawal (account, address, amount_sat, fee_sat, idempotency_key,
         status, created_ms, other_used_sat) VALUES (?1, ?2, ?3, ?4, ?5, 'new', ?6, ?7)",
        params![
            w.account.0,
            w.address,
            to_i64(w.amount.0),
            to_i64(w.fee.0),
            w.key,
            to_i64(w.created_ms),
            to_i64(w.other_used.0)
        ],
    )?;
    Ok(WithdrawalId(to_u64(db.last_insert_rowid())?))
}

/// The Lightning outflow a withdrawal's request counted (`other_used`); `None` when the row
/// predates the column (or the withdrawal is unknown).
pub(crate) fn withdrawal_other_used(
    db: &Connection,
    id: WithdrawalId,
) -> Result<Option<Amount>, StoreError> {
    let v: Option<Option<i64>> = db
        .query_row(
            "SELECT other_used_sat FROM mediator_withdrawal WHERE id = ?1",
            [to_i64(id.0)],
            |r| r.get(0),
        )
        .optional()?;
    v.flatten().map(|v| to_u64(v).map(Amount)).transpose()
}

/// Deletes a withdrawal that never got its hold.
pub(crate) fn delete_new_withdrawal(db: &Connection, id: WithdrawalId) -> Result<(), StoreError> {
    db.execute(
        "DELETE FROM mediator_withdrawal WHERE id = ?1 AND status = 'new'",
        [to_i64(id.0)],
    )?;
    Ok(())
}

/// Sets status (and reason) of a withdrawal.
pub(crate) fn set_withdrawal_status(
    db: &Connection,
    id: WithdrawalId,
    status: WithdrawalStatus,
    reason: Option<&str>,
) -> Result<(), StoreError> {
    db.execute(
        "UPDATE mediator_withdrawal SET status = ?2, reason = COALESCE(?3, reason) WHERE id = ?1",
        params![to_i64(id.0), status.as_str(), reason],
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Batches

/// A signed transaction of a batch (the first one, or a fee bump).
#[derive(Clone, Debug)]
pub(crate) struct BatchTx {
    pub txid: Txid,
    pub raw: Vec<u8>,
    pub fee: Amount,
}

/// Records a new batch: its signed transaction, and its withdrawals marked batched. One SQLite
/// transaction: after it returns, the batch is durable and may be broadcast.
pub(crate) fn insert_batch(
    db: &mut Connection,
    withdrawals: &[WithdrawalId],
    tx_: &BatchTx,
    now_ms: u64,
) -> Result<u64, StoreError> {
    let tx = db.transaction()?;
    tx.execute(
        "INSERT INTO mediator_batch (status, created_ms) VALUES ('inflight', ?1)",
        [to_i64(now_ms)],
    )?;
    let batch = tx.last_insert_rowid();
    tx.execute(
        "INSERT INTO mediator_batch_tx (txid, batch_id, raw, fee_sat, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            tx_.txid.to_string(),
            batch,
            tx_.raw,
            to_i64(tx_.fee.0),
            to_i64(now_ms)
        ],
    )?;
    for id in withdrawals {
        let n = tx.execute(
            "UPDATE mediator_withdrawal SET status = 'batched', batch_id = ?2
             WHERE id = ?1 AND status = 'pending'",
            params![to_i64(id.0), batch],
        )?;
        if n != 1 {
            return Err(corrupt("batched withdrawal was not pending"));
        }
    }
    tx.commit()?;
    to_u64(batch)
}

/// Records a replacement transaction of a batch.
pub(crate) fn insert_batch_tx(
    db: &Connection,
    batch: u64,
    tx_: &BatchTx,
    now_ms: u64,
) -> Result<(), StoreError> {
    db.execute(
        "INSERT INTO mediator_batch_tx (txid, batch_id, raw, fee_sat, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            tx_.txid.to_string(),
            to_i64(batch),
            tx_.raw,
            to_i64(tx_.fee.0),
            to_i64(now_ms)
        ],
    )?;
    Ok(())
}

/// Ids of batches in flight, oldest first.
pub(crate) fn inflight_batches(db: &Connection) -> Result<Vec<u64>, StoreError> {
    let mut st =
        db.prepare_cached("SELECT id FROM mediator_batch WHERE status = 'inflight' ORDER BY id")?;
    let rows = st.query_map([], |r| r.get::<_, i64>(0))?;
    rows.map(|r| to_u64(r?)).collect()
}

/// Abandons a batch in flight (one transaction): its status `abandoned`, the inputs the next
/// batch must spend recorded, its withdrawals pending again (still held in the ledger). Returns
/// them; `None` when the batch is not in flight.
pub(crate) fn abandon_batch(
    db: &Connection,
    batch: u64,
    kill: &[OutPoint],
) -> Result<Option<Vec<WithdrawalId>>, StoreError> {
    let tx = db.unchecked_transaction()?;
    let kill = kill
        .iter()
        .map(|o| o.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let n = tx.execute(
        "UPDATE mediator_batch SET status = 'abandoned', kill_inputs = ?2
         WHERE id = ?1 AND status = 'inflight'",
        params![to_i64(batch), kill],
    )?;
    if n == 0 {
        return Ok(None);
    }
    let ids: Vec<WithdrawalId> = {
        let mut st = tx.prepare(
            "SELECT id FROM mediator_withdrawal WHERE batch_id = ?1 AND status = 'batched'
             ORDER BY id",
        )?;
        let rows = st.query_map(params![to_i64(batch)], |r| r.get::<_, i64>(0))?;
        rows.map(|r| Ok(WithdrawalId(to_u64(r?)?)))
            .collect::<Result<_, StoreError>>()?
    };
    tx.execute(
        "UPDATE mediator_withdrawal SET status = 'pending', batch_id = NULL
         WHERE batch_id = ?1 AND status = 'batched'",
        params![to_i64(batch)],
    )?;
    tx.execute(
        "UPDATE mediator_batch SET abandoned_withdrawals = ?2 WHERE id = ?1",
        params![
            to_i64(batch),
            ids.iter()
                .map(|i| i.0.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ],
    )?;
    tx.commit()?;
    Ok(Some(ids))
}

/// Abandoned batches (the newest `limit`), each with the withdrawals it paid.
pub(crate) fn abandoned_batches(
    db: &Connection,
    limit: u32,
) -> Result<Vec<(u64, String)>, StoreError> {
    let mut st = db.prepare_cached(
        "SELECT id, COALESCE(abandoned_withdrawals, '') FROM mediator_batch
         WHERE status = 'abandoned' ORDER BY id DESC LIMIT ?1",
    )?;
    let rows = st.query_map(params![limit], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
    })?;
    rows.map(|r| {
        let (id, w) = r?;
        Ok((to_u64(id)?, w))
    })
    .collect()
}

/// The inputs abandoned batches left for the next batch to spend.
pub(crate) fn kill_inputs(db: &Connection) -> Result<Vec<OutPoint>, StoreError> {
    let mut st = db.prepare_cached(
        "SELECT kill_inputs FROM mediator_batch
         WHERE status = 'abandoned' AND kill_inputs IS NOT NULL AND kill_inputs != ''",
    )?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for row in rows {
        for o in row?.split(',') {
            out.push(OutPoint::from_str(o).map_err(|_| corrupt("abandoned batch input"))?);
        }
    }
    Ok(out)
}

/// The transactions of a batch, oldest (original) first.
pub(crate) fn batch_txs(db: &Connection, batch: u64) -> Result<Vec<BatchTx>, StoreError> {
    let mut st = db.prepare_cached(
        "SELECT txid, raw, fee_sat FROM mediator_batch_tx WHERE batch_id = ?1 ORDER BY rowid",
    )?;
    let rows = st.query_map([to_i64(batch)], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (t, raw, fee) = row?;
        out.push(BatchTx {
            txid: txid(&t)?,
            raw,
            fee: Amount(to_u64(fee)?),
        });
    }
    Ok(out)
}

/// Completes a batch: the confirmed transaction, and each withdrawal's network fee share. One
/// SQLite transaction. With `alarm`, the batch is recorded as `alarm` instead of `confirmed`:
/// confirmed on chain, but some of its withdrawals did not complete in the ledger (see the alarms).
/// `confirmed` is `None` for partial progress: the listed withdrawals are completed and the batch
/// stays in flight.
pub(crate) fn complete_batch(
    db: &mut Connection,
    batch: u64,
    confirmed: Option<Txid>,
    shares: &[(WithdrawalId, Amount)],
    alarm: bool,
) -> Result<(), StoreError> {
    let tx = db.transaction()?;
    if let Some(confirmed) = confirmed {
        tx.execute(
            "UPDATE mediator_batch SET status = ?3, confirmed_txid = ?2 WHERE id = ?1",
            params![
                to_i64(batch),
                confirmed.to_string(),
                if alarm { "alarm" } else { "confirmed" }
            ],
        )?;
    }
    for (id, share) in shares {
        tx.execute(
            "UPDATE mediator_withdrawal SET status = 'completed', network_fee_sat = ?2 WHERE id = ?1",
            params![to_i64(id.0), to_i64(share.0)],
        )?;
    }
    tx.commit()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Alarms

/// Something an operator must look at: money that moved in one place and not in the other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alarm {
    /// Id.
    pub id: u64,
    /// Stable kind, e.g. `withdrawal_not_completed`, `withdrawal_id_conflict`.
    pub kind: String,
    /// What it is about, e.g. `withdrawal 7`.
    pub subject: String,
    /// Details.
    pub message: String,
    /// When raised (the service's time at its last step), ms since the epoch.
    pub at_ms: u64,
    /// When an operator cleared it.
    pub cleared_ms: Option<u64>,
}

/// The shortfall the last step's reconciliation found and the one payouts are held back for
/// (both `None` when none was recorded).
pub(crate) fn shortfall_readings(
    db: &Connection,
) -> Result<(Option<u64>, Option<u64>), StoreError> {
    let row = db
        .query_row(
            "SELECT last_short_sat, held_sat FROM mediator_shortfall WHERE id = 1",
            [],
            |r| Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?)),
        )
        .optional()?;
    let sat = |v: Option<i64>| v.map(|v| v.max(0).unsigned_abs());
    Ok(row.map_or((None, None), |(last, held)| (sat(last), sat(held))))
}

/// Records the readings [`shortfall_readings`] returns.
pub(crate) fn set_shortfall_readings(
    db: &Connection,
    last_short: Option<u64>,
    held: Option<u64>,
) -> Result<(), StoreError> {
    db.execute(
        "INSERT INTO mediator_shortfall (id, last_short_sat, held_sat) VALUES (1, ?1, ?2)
         ON CONFLICT(id) DO UPDATE SET last_short_sat = excluded.last_short_sat,
             held_sat = excluded.held_sat",
        params![last_short.map(to_i64), held.map(to_i64)],
    )?;
    Ok(())
}

/// Raises an alarm unless the same kind and subject is raised and not cleared. True when new.
pub(crate) fn raise_alarm(
    db: &Connection,
    kind: &str,
    subject: &str,
    message: &str,
    now_ms: u64,
) -> Result<bool, StoreError> {
    let n = db.execute(
        "INSERT INTO mediator_alarm (kind, subject, message, at_ms)
         SELECT ?1, ?2, ?3, ?4 WHERE NOT EXISTS (SELECT 1 FROM mediator_alarm
             WHERE kind = ?1 AND subject = ?2 AND cleared_ms IS NULL)",
        params![kind, subject, message, to_i64(now_ms)],
    )?;
    Ok(n == 1)
}

/// Clears an alarm (an operator dealt with it). False when there is no such alarm not cleared.
pub(crate) fn clear_alarm(db: &Connection, id: u64, now_ms: u64) -> Result<bool, StoreError> {
    Ok(db.execute(
        "UPDATE mediator_alarm SET cleared_ms = ?2 WHERE id = ?1 AND cleared_ms IS NULL",
        params![to_i64(id), to_i64(now_ms)],
    )? == 1)
}

/// Alarms, oldest first; only those not cleared unless `all`.
pub(crate) fn alarms(db: &Connection, all: bool) -> Result<Vec<Alarm>, StoreError> {
    let mut st = db.prepare_cached(
        "SELECT id, kind, subject, message, at_ms, cleared_ms FROM mediator_alarm
         WHERE ?1 OR cleared_ms IS NULL ORDER BY id",
    )?;
    let rows = st.query_map([all], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, Option<i64>>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, kind, subject, message, at, cleared) = row?;
        out.push(Alarm {
            id: to_u64(id)?,
            kind,
            subject,
            message,
            at_ms: to_u64(at)?,
            cleared_ms: cleared.map(to_u64).transpose()?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Account `account`'s request under key "k" that counted `other_used` sats of Lightning.
    fn new_row(account: u32, other_used: u64) -> NewWithdrawal<'static> {
        NewWithdrawal {
            account: AccountId(account),
            address: "b",
            amount: Amount(1),
            fee: Amount(1),
            key: "k",
            created_ms: 2,
            other_used: Amount(other_used),
        }
    }

    /// Review finding: a user's deposit history read every account's rows and filtered them
    /// in Rust, under custody's lock, at weight 1: one key polling it on a large wallet held
    /// the lock that crediting, withdrawals and transfers wait for. It reads through the
    /// index on account now (on a database made before the index too).
    #[test]
    fn one_accounts_deposits_are_read_through_the_account_index() {
        let db = Connection::open_in_memory().unwrap();
        init(&db).unwrap();
        db.execute_batch("DROP INDEX mediator_deposit_account")
            .unwrap();
        init(&db).unwrap(); // an older database gets the index
        for i in 0..6u32 {
            let txid = Txid::from_str(&format!("{:064x}", i + 1)).unwrap();
            let op = OutPoint { txid, vout: i };
            insert_deposit(&db, op, AccountId(1 + i % 2), Amount(100 + u64::from(i)), 5).unwrap();
        }
        let mine = deposits_of_account(&db, AccountId(2)).unwrap();
        assert_eq!(
            mine.iter().map(|d| d.amount.0).collect::<Vec<_>>(),
            [101, 103, 105],
            "that account's, oldest first"
        );
        assert_eq!(deposits(&db).unwrap().len(), 6);
        let plan: Vec<String> = db
            .prepare(&format!(
                "EXPLAIN QUERY PLAN SELECT {DEPOSIT_COLS} FROM mediator_deposit \
                 WHERE account = ?1 ORDER BY rowid"
            ))
            .unwrap()
            .query_map([2], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|p| p.contains("USING INDEX mediator_deposit_account")),
            "{plan:?}"
        );
        assert!(!plan.iter().any(|p| p.starts_with("SCAN")), "{plan:?}");
    }

    #[test]
    fn an_address_table_from_before_purposes_is_migrated_as_deposit_addresses() {
        let mut db = Connection::open_in_memory().unwrap();
        db.execute_batch(
            "CREATE TABLE mediator_deposit_address (
                 keychain_index INTEGER PRIMARY KEY, account INTEGER NOT NULL,
                 address TEXT NOT NULL UNIQUE, created_ms INTEGER NOT NULL);
             INSERT INTO mediator_deposit_address VALUES (0, 7, 'old', 1);",
        )
        .unwrap();
        init(&db).unwrap();
        init(&db).unwrap(); // idempotent
        insert_deposit_addresses(
            &mut db,
            AccountId(7),
            &[(1, "inv".into())],
            AddressPurpose::Invoice,
            2,
        )
        .unwrap();
        assert_eq!(addresses_of(&db, AccountId(7)).unwrap(), vec!["old"]);
        assert_eq!(deposit_indexes(&db).unwrap().len(), 2);
    }

    /// The columns added later are added to the migrated table in the same open: the
    /// AUTOINCREMENT copy ran after them and dropped them (`skips`, `retry_after_ms`,
    /// `other_used_sat` missing until the next open).
    #[test]
    fn a_withdrawal_table_migrated_in_one_open_has_the_later_columns() {
        let mut db = Connection::open_in_memory().unwrap();
        db.execute_batch(
            "CREATE TABLE mediator_withdrawal (
                 id INTEGER PRIMARY KEY, account INTEGER NOT NULL, address TEXT NOT NULL,
                 amount_sat INTEGER NOT NULL, fee_sat INTEGER NOT NULL,
                 idempotency_key TEXT NOT NULL UNIQUE, status TEXT NOT NULL, reason TEXT,
                 created_ms INTEGER NOT NULL, batch_id INTEGER, network_fee_sat INTEGER);
             INSERT INTO mediator_withdrawal VALUES (1, 7, 'a', 5000, 10, 'k', 'new', NULL, 1, NULL, NULL);",
        )
        .unwrap();
        init(&db).unwrap();
        let id = insert_withdrawal(&mut db, &new_row(8, 95)).unwrap();
        assert_eq!(withdrawal_other_used(&db, id).unwrap(), Some(Amount(95)));
        assert_eq!(withdrawal_other_used(&db, WithdrawalId(1)).unwrap(), None);
        let skips: i64 = db
            .query_row(
                "SELECT skips FROM mediator_withdrawal WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(skips, 0);
    }

    #[test]
    fn a_withdrawal_table_from_before_autoincrement_is_migrated_with_per_account_keys() {
        let mut db = Connection::open_in_memory().unwrap();
        db.execute_batch(
            "CREATE TABLE mediator_withdrawal (
                 id INTEGER PRIMARY KEY, account INTEGER NOT NULL, address TEXT NOT NULL,
                 amount_sat INTEGER NOT NULL, fee_sat INTEGER NOT NULL,
                 idempotency_key TEXT NOT NULL UNIQUE, status TEXT NOT NULL, reason TEXT,
                 created_ms INTEGER NOT NULL, batch_id INTEGER, network_fee_sat INTEGER);
             INSERT INTO mediator_withdrawal VALUES (1, 7, 'a', 5000, 10, 'k', 'pending', NULL, 1, NULL, NULL);
             INSERT INTO mediator_withdrawal VALUES (2, 7, 'a', 6000, 10, 'j', 'new', NULL, 1, NULL, NULL);",
        )
        .unwrap();
        init(&db).unwrap();
        init(&db).unwrap(); // idempotent
        assert_eq!(all_withdrawals(&db).unwrap().len(), 2, "rows kept");
        // The highest id is deleted: AUTOINCREMENT still never hands it out again.
        delete_new_withdrawal(&db, WithdrawalId(2)).unwrap();
        let id = insert_withdrawal(&mut db, &new_row(8, 0)).unwrap();
        assert_eq!(id, WithdrawalId(3));
        // Keys are per account: account 8 may use "k"; account 7 may not use it twice.
        assert_eq!(withdrawal_by_key(&db, AccountId(8), "k").unwrap(), Some(id));
        assert_eq!(
            withdrawal_by_key(&db, AccountId(7), "k").unwrap(),
            Some(WithdrawalId(1))
        );
        assert!(insert_withdrawal(&mut db, &new_row(7, 0)).is_err());
        // One account's withdrawals: its own rows only.
        let of = |a: u32| -> Vec<u64> {
            withdrawals_of_account(&db, AccountId(a))
                .unwrap()
                .iter()
                .map(|w| w.id.0)
                .collect()
        };
        assert_eq!(of(7), vec![1]);
        assert_eq!(of(8), vec![3]);
        assert!(of(9).is_empty());
    }

    #[test]
    fn an_alarm_is_raised_once_until_cleared() {
        let db = Connection::open_in_memory().unwrap();
        init(&db).unwrap();
        assert!(raise_alarm(&db, "kind", "withdrawal 1", "first", 5).unwrap());
        assert!(!raise_alarm(&db, "kind", "withdrawal 1", "again", 6).unwrap());
        assert!(raise_alarm(&db, "kind", "withdrawal 2", "other", 7).unwrap());
        let a = alarms(&db, false).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].message.as_str(), a[0].at_ms), ("first", 5));
        assert!(clear_alarm(&db, a[0].id, 8).unwrap());
        assert!(!clear_alarm(&db, a[0].id, 9).unwrap(), "cleared once");
        assert_eq!(alarms(&db, false).unwrap().len(), 1);
        assert_eq!(alarms(&db, true).unwrap()[0].cleared_ms, Some(8));
        assert!(
            raise_alarm(&db, "kind", "withdrawal 1", "back", 10).unwrap(),
            "raised again"
        );
    }
}
