//! The node's own records in `lightning.sqlite` (beside ldk-node's data): deposit invoices and
//! withdrawals. Every write is one SQLite transaction in WAL mode with `synchronous = FULL`, so a
//! row is durable when the call returns; a withdrawal's row is written before its hold is asked
//! for, and its `sending` status before the payment is handed to the node.

use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;

/// The database file's name in the node's directory.
pub const DATABASE_FILE: &str = "lightning.sqlite";

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[error("lightning store: {0}")]
pub struct StoreError(#[from] rusqlite::Error);

/// Where a withdrawal is. Transitions: `new` → `held` | `refused`; `held` → `sending` |
/// `releasing`; `sending` → `completing` | `releasing`; `completing` → `completed`;
/// `releasing` → `released`. `refused`, `completed` and `released` are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LnWithdrawalStatus {
    /// The row exists; the hold was asked for and its answer is not known yet.
    New,
    /// The ledger refused the hold: nothing was held, nothing will be sent.
    Refused,
    /// Held in the ledger; not handed to the node yet.
    Held,
    /// Handed to the node (or about to be): the outcome is the node's, asked by payment hash.
    Sending,
    /// Paid; the ledger's completion is being recorded.
    Completing,
    /// Paid and completed in the ledger.
    Completed,
    /// Not paid; the ledger's release is being recorded.
    Releasing,
    /// Not paid and given back to the account.
    Released,
}

impl LnWithdrawalStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Refused => "refused",
            Self::Held => "held",
            Self::Sending => "sending",
            Self::Completing => "completing",
            Self::Completed => "completed",
            Self::Releasing => "releasing",
            Self::Released => "released",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "new" => Self::New,
            "refused" => Self::Refused,
            "held" => Self::Held,
            "sending" => Self::Sending,
            "completing" => Self::Completing,
            "completed" => Self::Completed,
            "releasing" => Self::Releasing,
            "released" => Self::Released,
            _ => return None,
        })
    }
}

/// A Lightning withdrawal as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LnWithdrawal {
    /// Row id (the engine's withdrawal id is [`crate::engine_withdrawal_id`] of it).
    pub id: u64,
    /// Owner.
    pub account: u32,
    /// The invoice's payment hash (the node's payment id).
    pub payment_hash: [u8; 32],
    /// The invoice paid.
    pub bolt11: String,
    /// Amount paid to the payee, satoshis.
    pub amount_sat: u64,
    /// Flat fee held and charged to the account, satoshis (the routing fee's cap).
    pub fee_sat: u64,
    /// Where it is.
    pub status: LnWithdrawalStatus,
    /// The routing fee the node paid, satoshis rounded up (set from `completing` on).
    pub routing_fee_sat: Option<u64>,
    /// Why it was refused or released.
    pub reason: Option<String>,
    /// Created, ms since the epoch.
    pub created_ms: u64,
    /// An invoice paid again after a failed attempt: the node's record of that attempt (failed,
    /// last updated then, seconds since the epoch). The node keeps one record per invoice, so
    /// until the record changes it may still be the earlier attempt's (see
    /// `LightningService::outcome`).
    pub prior_failed_s: Option<u64>,
    /// Set when the payment's outcome is in doubt: the node had no record of it after a
    /// restart, and sending it again under the same id failed, which does not tell whether the
    /// first send reached LDK's channel manager (see `LightningService::resolve`). The block
    /// height from which no HTLC of the first send can be claimed any more: the row stays
    /// `sending` until then, unless the node reports how the payment ended.
    pub doubt_until_height: Option<u32>,
}

/// A withdrawal to store ([`Store::insert_withdrawal`]; the fields of [`LnWithdrawal`]).
pub(crate) struct NewWithdrawal<'a> {
    pub account: u32,
    pub payment_hash: &'a [u8; 32],
    pub bolt11: &'a str,
    pub amount_sat: u64,
    pub fee_sat: u64,
    pub created_ms: u64,
    pub prior_failed_s: Option<u64>,
}

/// A deposit invoice as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LnDeposit {
    /// The invoice's payment hash.
    pub payment_hash: [u8; 32],
    /// Beneficiary.
    pub account: u32,
    /// Amount asked, satoshis.
    pub amount_sat: u64,
    /// The invoice.
    pub bolt11: String,
    /// Created, ms since the epoch.
    pub created_ms: u64,
    /// Expires, ms since the epoch.
    pub expires_ms: u64,
    /// Satoshis credited (the amount received, rounded down), once credited.
    pub credited_sat: Option<u64>,
}

pub(crate) struct Store {
    db: Connection,
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).expect("stored values are written from u64 below i64::MAX")
}

fn i64_of(v: u64) -> rusqlite::Result<i64> {
    i64::try_from(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn hash_of(v: Vec<u8>) -> rusqlite::Result<[u8; 32]> {
    v.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            "payment hash is not 32 bytes".into(),
        )
    })
}

const WITHDRAWAL_COLUMNS: &str = "id, account, payment_hash, bolt11, amount_sat, fee_sat, status, \
                                  routing_fee_sat, reason, created_ms, prior_failed_s, \
                                  doubt_until_height";

fn withdrawal_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LnWithdrawal> {
    let status: String = r.get(6)?;
    Ok(LnWithdrawal {
        id: u64_of(r.get(0)?),
        account: r.get(1)?,
        payment_hash: hash_of(r.get(2)?)?,
        bolt11: r.get(3)?,
        amount_sat: u64_of(r.get(4)?),
        fee_sat: u64_of(r.get(5)?),
        status: LnWithdrawalStatus::parse(&status).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                6,
                rusqlite::types::Type::Text,
                format!("unknown status {status}").into(),
            )
        })?,
        routing_fee_sat: r.get::<_, Option<i64>>(7)?.map(u64_of),
        reason: r.get(8)?,
        created_ms: u64_of(r.get(9)?),
        prior_failed_s: r.get::<_, Option<i64>>(10)?.map(u64_of),
        doubt_until_height: r.get(11)?,
    })
}

fn deposit_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LnDeposit> {
    Ok(LnDeposit {
        payment_hash: hash_of(r.get(0)?)?,
        account: r.get(1)?,
        amount_sat: u64_of(r.get(2)?),
        bolt11: r.get(3)?,
        created_ms: u64_of(r.get(4)?),
        expires_ms: u64_of(r.get(5)?),
        credited_sat: r.get::<_, Option<i64>>(6)?.map(u64_of),
    })
}

/// A read-only connection beside the store's own: in WAL mode it reads the last commit without
/// the store's lock. For readings taken under another lock: custody's reconciliation holds
/// custody's lock, while a payment takes the store's lock first and then asks custody
/// ([`crate::PayPolicy`]); taking the store's lock there would invert that order.
pub(crate) struct Reader {
    db: Connection,
}

/// The withdrawals that may have left the channels ([`Reader::withdrawals_in_flight`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct InFlight {
    /// Amount plus fee of those out for sure (`sending` not in doubt, `completing`).
    pub sure_sat: u64,
    /// `(payment hash, amount plus fee)` of those in doubt.
    pub in_doubt: Vec<([u8; 32], u64)>,
}

impl Reader {
    /// Opens the store's database (which [`Store::open`] created) read-only.
    pub(crate) fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = Connection::open_with_flags(
            dir.join(DATABASE_FILE),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self { db })
    }

    /// Amount plus fee of the withdrawals that may have left the channels and are still held
    /// in the ledger (`sending`, `completing`). Not those never sent (`new`, `held`) nor those
    /// that failed (`releasing`): their money is still in the channels' balance, and counting
    /// it twice hid a shortfall of that size while they waited. A `sending` one in doubt (the
    /// node lost its record) is listed apart, with its payment hash: most often its money
    /// never left or came back, so the caller counts it only when the node shows it out
    /// ([`crate::LightningService::balances`]).
    pub(crate) fn withdrawals_in_flight(&self) -> Result<InFlight, StoreError> {
        let sum: i64 = self.db.query_row(
            "SELECT COALESCE(SUM(amount_sat + fee_sat), 0) FROM ln_withdrawals \
             WHERE status = 'completing' OR (status = 'sending' AND doubt_until_height IS NULL)",
            [],
            |r| r.get(0),
        )?;
        let mut st = self.db.prepare_cached(
            "SELECT payment_hash, amount_sat + fee_sat FROM ln_withdrawals \
             WHERE status = 'sending' AND doubt_until_height IS NOT NULL",
        )?;
        let in_doubt = st
            .query_map([], |r| {
                Ok((
                    hash_of(r.get::<_, Vec<u8>>(0)?)?,
                    u64_of(r.get::<_, i64>(1)?),
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(InFlight {
            sure_sat: u64_of(sum),
            in_doubt,
        })
    }
}

/// Adds an `INTEGER` column that a database from an older build lacks.
fn add_column(db: &Connection, table: &str, column: &str) -> Result<(), StoreError> {
    let has: bool = db.query_row(
        "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
        params![table, column],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has {
        db.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} INTEGER;"))?;
    }
    Ok(())
}

impl Store {
    pub(crate) fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = Connection::open(dir.join(DATABASE_FILE))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS ln_deposits (
                payment_hash BLOB PRIMARY KEY,
                account INTEGER NOT NULL,
                amount_sat INTEGER NOT NULL,
                bolt11 TEXT NOT NULL,
                created_ms INTEGER NOT NULL,
                expires_ms INTEGER NOT NULL,
                credited_sat INTEGER
             );
             CREATE TABLE IF NOT EXISTS ln_withdrawals (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                account INTEGER NOT NULL,
                payment_hash BLOB NOT NULL,
                bolt11 TEXT NOT NULL,
                amount_sat INTEGER NOT NULL,
                fee_sat INTEGER NOT NULL,
                status TEXT NOT NULL,
                routing_fee_sat INTEGER,
                reason TEXT,
                created_ms INTEGER NOT NULL
             );
             -- At most one withdrawal per invoice that may still pay or has paid.
             CREATE UNIQUE INDEX IF NOT EXISTS ln_withdrawals_live
                ON ln_withdrawals(payment_hash) WHERE status NOT IN ('refused', 'released');
             -- The loop looks only at open deposits that expired recently (`open_deposits`).
             CREATE INDEX IF NOT EXISTS ln_deposits_open
                ON ln_deposits(expires_ms) WHERE credited_sat IS NULL;",
        )?;
        // Received by the node, not credited yet (the ledger refused or did not answer): kept
        // until credited, however long that takes (`received_uncredited`).
        add_column(&db, "ln_deposits", "received_msat")?;
        add_column(&db, "ln_withdrawals", "prior_failed_s")?;
        add_column(&db, "ln_withdrawals", "doubt_until_height")?;
        // The order credits were applied in (1, 2, ...; `credited_after`): how others (the
        // merchant's monitor) follow every credit, however late it came.
        add_column(&db, "ln_deposits", "credited_seq")?;
        // Credits recorded before the numbering, numbered in the order they were written (once:
        // after that every credit gets its number as it is recorded).
        db.execute_batch(
            "WITH o AS (
                SELECT rowid AS r, ROW_NUMBER() OVER (ORDER BY rowid)
                    + (SELECT COALESCE(MAX(credited_seq), 0) FROM ln_deposits) AS n
                FROM ln_deposits WHERE credited_sat IS NOT NULL AND credited_seq IS NULL)
             UPDATE ln_deposits SET credited_seq = (SELECT n FROM o WHERE o.r = ln_deposits.rowid)
             WHERE rowid IN (SELECT r FROM o);",
        )?;
        db.execute_batch(
            "CREATE INDEX IF NOT EXISTS ln_deposits_received ON ln_deposits(payment_hash)
                WHERE credited_sat IS NULL AND received_msat IS NOT NULL;
             CREATE UNIQUE INDEX IF NOT EXISTS ln_deposits_credited_seq
                ON ln_deposits(credited_seq) WHERE credited_seq IS NOT NULL;",
        )?;
        Ok(Self { db })
    }

    pub(crate) fn insert_deposit(&self, d: &LnDeposit) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO ln_deposits (payment_hash, account, amount_sat, bolt11, created_ms, \
             expires_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                &d.payment_hash[..],
                d.account,
                i64_of(d.amount_sat)?,
                d.bolt11,
                i64_of(d.created_ms)?,
                i64_of(d.expires_ms)?
            ],
        )?;
        Ok(())
    }

    pub(crate) fn deposit(&self, hash: &[u8; 32]) -> Result<Option<LnDeposit>, StoreError> {
        Ok(self
            .db
            .query_row(
                "SELECT payment_hash, account, amount_sat, bolt11, created_ms, expires_ms, \
                 credited_sat FROM ln_deposits WHERE payment_hash = ?1",
                params![&hash[..]],
                deposit_row,
            )
            .optional()?)
    }

    /// Deposits not credited yet that expire after `since_ms` (0: all of them), read through
    /// [`open_deposits_page`](Self::open_deposits_page) two at a time.
    #[cfg(test)]
    pub(crate) fn open_deposits(&self, since_ms: u64) -> Result<Vec<LnDeposit>, StoreError> {
        let mut all: Vec<LnDeposit> = Vec::new();
        loop {
            let after = all.last().map(|d| (d.expires_ms, d.payment_hash));
            let page = self.open_deposits_page(since_ms, after, 2)?;
            let done = page.len() < 2;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// One page of [`open_deposits`](Self::open_deposits), in (expiry, payment hash) order:
    /// at most `limit` rows after `after` (`None`: from the start). The sweep reads them a page at
    /// a time, so that the store's lock is never held over the whole of them.
    pub(crate) fn open_deposits_page(
        &self,
        since_ms: u64,
        after: Option<(u64, [u8; 32])>,
        limit: usize,
    ) -> Result<Vec<LnDeposit>, StoreError> {
        // From the start, every row is past `since_ms` (so past `after_ms` = `since_ms`).
        let (after_ms, after_hash) = after.unwrap_or((since_ms, [0u8; 32]));
        let mut st = self.db.prepare_cached(
            "SELECT payment_hash, account, amount_sat, bolt11, created_ms, expires_ms, \
             credited_sat FROM ln_deposits WHERE credited_sat IS NULL AND expires_ms > ?1 \
             AND (expires_ms > ?2 OR (expires_ms = ?2 AND payment_hash > ?3)) \
             ORDER BY expires_ms, payment_hash LIMIT ?4",
        )?;
        let rows = st.query_map(
            params![
                i64_of(since_ms)?,
                i64_of(after_ms)?,
                &after_hash[..],
                i64_of(limit as u64)?
            ],
            deposit_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deposits the node received and the ledger has not credited yet, with what arrived (msat).
    pub(crate) fn received_uncredited(&self) -> Result<Vec<([u8; 32], u64)>, StoreError> {
        let mut st = self.db.prepare_cached(
            "SELECT payment_hash, received_msat FROM ln_deposits \
             WHERE credited_sat IS NULL AND received_msat IS NOT NULL",
        )?;
        let rows = st.query_map([], |r| Ok((hash_of(r.get(0)?)?, u64_of(r.get(1)?))))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records that the node received `msat` for a deposit (durable before the credit is asked
    /// for); the first amount recorded stays.
    pub(crate) fn mark_received(&self, hash: &[u8; 32], msat: u64) -> Result<(), StoreError> {
        self.db.execute(
            "UPDATE ln_deposits SET received_msat = ?2 WHERE payment_hash = ?1 \
             AND received_msat IS NULL",
            params![&hash[..], i64_of(msat)?],
        )?;
        Ok(())
    }

    /// Records a deposit's credit as applied, numbered after every credit before it.
    pub(crate) fn mark_credited(&self, hash: &[u8; 32], sat: u64) -> Result<(), StoreError> {
        self.db.execute(
            "UPDATE ln_deposits SET credited_sat = ?2, credited_seq = \
               (SELECT COALESCE(MAX(credited_seq), 0) + 1 FROM ln_deposits) \
             WHERE payment_hash = ?1 AND credited_sat IS NULL",
            params![&hash[..], i64_of(sat)?],
        )?;
        Ok(())
    }

    /// Deposits credited after position `after` (0: from the first), in the order their credits
    /// were applied, at most `limit`: `(position, payment hash)`.
    pub(crate) fn credited_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
        let mut st = self.db.prepare_cached(
            "SELECT credited_seq, payment_hash FROM ln_deposits \
             WHERE credited_seq > ?1 ORDER BY credited_seq LIMIT ?2",
        )?;
        let rows = st.query_map(params![i64_of(after)?, limit], |r| {
            Ok((u64_of(r.get(0)?), hash_of(r.get(1)?)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Satoshis an account sent or is sending over Lightning since `since_ms` (refused and
    /// released withdrawals excluded): its part of the 24-hour withdrawal limit.
    pub(crate) fn withdrawn_since(&self, account: u32, since_ms: u64) -> Result<u64, StoreError> {
        let sum: i64 = self.db.query_row(
            "SELECT COALESCE(SUM(amount_sat), 0) FROM ln_withdrawals \
             WHERE account = ?1 AND created_ms > ?2 AND status NOT IN ('refused', 'released')",
            params![account, i64_of(since_ms)?],
            |r| r.get(0),
        )?;
        Ok(u64_of(sum))
    }

    /// Inserts a `new` withdrawal; `None` when a live one for the same invoice exists.
    pub(crate) fn insert_withdrawal(
        &self,
        w: &NewWithdrawal<'_>,
    ) -> Result<Option<u64>, StoreError> {
        let r = self.db.execute(
            "INSERT INTO ln_withdrawals (account, payment_hash, bolt11, amount_sat, fee_sat, \
             status, created_ms, prior_failed_s) VALUES (?1, ?2, ?3, ?4, ?5, 'new', ?6, ?7)",
            params![
                w.account,
                &w.payment_hash[..],
                w.bolt11,
                i64_of(w.amount_sat)?,
                i64_of(w.fee_sat)?,
                i64_of(w.created_ms)?,
                w.prior_failed_s.map(i64_of).transpose()?
            ],
        );
        match r {
            Ok(_) => Ok(Some(u64_of(self.db.last_insert_rowid()))),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn withdrawal(&self, id: u64) -> Result<Option<LnWithdrawal>, StoreError> {
        Ok(self
            .db
            .query_row(
                &format!("SELECT {WITHDRAWAL_COLUMNS} FROM ln_withdrawals WHERE id = ?1"),
                params![i64_of(id)?],
                withdrawal_row,
            )
            .optional()?)
    }

    /// The live (not refused, not released) withdrawal paying this invoice.
    pub(crate) fn live_withdrawal_by_hash(
        &self,
        hash: &[u8; 32],
    ) -> Result<Option<LnWithdrawal>, StoreError> {
        Ok(self
            .db
            .query_row(
                &format!(
                    "SELECT {WITHDRAWAL_COLUMNS} FROM ln_withdrawals WHERE payment_hash = ?1 \
                     AND status NOT IN ('refused', 'released')"
                ),
                params![&hash[..]],
                withdrawal_row,
            )
            .optional()?)
    }

    /// Withdrawals whose outcome is not final yet, oldest first.
    pub(crate) fn unfinished_withdrawals(&self) -> Result<Vec<LnWithdrawal>, StoreError> {
        let mut st = self.db.prepare(&format!(
            "SELECT {WITHDRAWAL_COLUMNS} FROM ln_withdrawals \
             WHERE status NOT IN ('refused', 'completed', 'released') ORDER BY id"
        ))?;
        let rows = st.query_map([], withdrawal_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks a `sending` withdrawal in doubt until block `until_height`. False when the row is
    /// not `sending` or is in doubt already (nothing changed: a mark's deadline never moves).
    pub(crate) fn mark_in_doubt(&self, id: u64, until_height: u32) -> Result<bool, StoreError> {
        let n = self.db.execute(
            "UPDATE ln_withdrawals SET doubt_until_height = ?2 \
             WHERE id = ?1 AND status = 'sending' AND doubt_until_height IS NULL",
            params![i64_of(id)?, until_height],
        )?;
        Ok(n == 1)
    }

    /// Takes the in-doubt mark off (the second send was not refused).
    pub(crate) fn clear_doubt(&self, id: u64) -> Result<(), StoreError> {
        self.db.execute(
            "UPDATE ln_withdrawals SET doubt_until_height = NULL WHERE id = ?1",
            params![i64_of(id)?],
        )?;
        Ok(())
    }

    /// Moves a withdrawal from `from` to `to`; false when it was not in `from` (nothing changed).
    pub(crate) fn transition(
        &self,
        id: u64,
        from: LnWithdrawalStatus,
        to: LnWithdrawalStatus,
        routing_fee_sat: Option<u64>,
        reason: Option<&str>,
    ) -> Result<bool, StoreError> {
        let fee = routing_fee_sat.map(i64_of).transpose()?;
        let n = self.db.execute(
            "UPDATE ln_withdrawals SET status = ?3, \
             routing_fee_sat = COALESCE(?4, routing_fee_sat), reason = COALESCE(?5, reason) \
             WHERE id = ?1 AND status = ?2",
            params![i64_of(id)?, from.as_str(), to.as_str(), fee, reason],
        )?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_row(hash: &[u8; 32], amount_sat: u64, created_ms: u64) -> NewWithdrawal<'_> {
        NewWithdrawal {
            account: 1,
            payment_hash: hash,
            bolt11: "lnbcrt1",
            amount_sat,
            fee_sat: 10,
            created_ms,
            prior_failed_s: None,
        }
    }

    /// Defect: withdrawals never sent (`new`, `held`) or failed (`releasing`) were counted in
    /// flight: their money is also in the channels' balance, so custody counted it twice and a
    /// shortfall that size went unseen. Only `sending` and `completing` count.
    #[test]
    fn only_withdrawals_that_may_have_left_the_channels_count_in_flight() {
        use LnWithdrawalStatus::*;
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let reader = Reader::open(dir.path()).unwrap();
        let row = |n: u8, path: &[LnWithdrawalStatus]| {
            let id = s
                .insert_withdrawal(&new_row(&[n; 32], 1_000 * u64::from(n), 5))
                .unwrap()
                .unwrap();
            for w in path.windows(2) {
                assert!(s.transition(id, w[0], w[1], None, None).unwrap());
            }
        };
        row(1, &[New]);
        row(2, &[New, Held]);
        row(3, &[New, Held, Sending]);
        row(4, &[New, Held, Sending, Completing]);
        row(5, &[New, Held, Sending, Releasing]);
        row(6, &[New, Held, Sending, Completing, Completed]);
        row(7, &[New, Held, Sending, Releasing, Released]);
        row(8, &[New, Refused]);
        assert_eq!(
            reader.withdrawals_in_flight().unwrap(),
            InFlight {
                sure_sat: 3_010 + 4_010,
                in_doubt: Vec::new()
            }
        );
    }

    /// Defect (review): a withdrawal in doubt (the node lost its record; sent again once, or
    /// not at all with no channel usable) counted in flight for as long as it stayed in doubt
    /// (up to 1,152 blocks), while in the usual cases its money never left the channels or came
    /// back: the reconciliation counted it twice and a shortfall of that size read as none. It
    /// is now listed apart, for the service to count only when the node shows it out.
    #[test]
    fn a_withdrawal_in_doubt_is_not_counted_in_flight_for_sure() {
        use LnWithdrawalStatus::*;
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let reader = Reader::open(dir.path()).unwrap();
        let mut ids = Vec::new();
        for n in [1u8, 2] {
            let id = s
                .insert_withdrawal(&new_row(&[n; 32], 1_000 * u64::from(n), 5))
                .unwrap()
                .unwrap();
            assert!(s.transition(id, New, Held, None, None).unwrap());
            assert!(s.transition(id, Held, Sending, None, None).unwrap());
            ids.push(id);
        }
        assert!(s.mark_in_doubt(ids[1], 900).unwrap());
        assert_eq!(
            reader.withdrawals_in_flight().unwrap(),
            InFlight {
                sure_sat: 1_010,
                in_doubt: vec![([2; 32], 2_010)]
            }
        );
        // Its mark taken off (the node did not run: nothing sent), it is in flight again.
        s.clear_doubt(ids[1]).unwrap();
        assert_eq!(reader.withdrawals_in_flight().unwrap().sure_sat, 3_020);
    }

    /// A database from a build before `received_msat`, `prior_failed_s` and `credited_seq` opens
    /// with them added, its credits numbered in the order they were written.
    #[test]
    fn an_older_database_gets_the_new_columns() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
            db.execute_batch(
                "CREATE TABLE ln_deposits (payment_hash BLOB PRIMARY KEY, account INTEGER NOT NULL,
                    amount_sat INTEGER NOT NULL, bolt11 TEXT NOT NULL, created_ms INTEGER NOT NULL,
                    expires_ms INTEGER NOT NULL, credited_sat INTEGER);
                 CREATE TABLE ln_withdrawals (id INTEGER PRIMARY KEY AUTOINCREMENT,
                    account INTEGER NOT NULL, payment_hash BLOB NOT NULL, bolt11 TEXT NOT NULL,
                    amount_sat INTEGER NOT NULL, fee_sat INTEGER NOT NULL, status TEXT NOT NULL,
                    routing_fee_sat INTEGER, reason TEXT, created_ms INTEGER NOT NULL);
                 INSERT INTO ln_deposits VALUES (x'0202020202020202020202020202020202020202020202020202020202020202', 1, 5, 'lnbcrt1', 0, 9, 5);
                 INSERT INTO ln_deposits VALUES (x'0101010101010101010101010101010101010101010101010101010101010101', 1, 5, 'lnbcrt1', 0, 9, 5);
                 INSERT INTO ln_deposits VALUES (x'0303030303030303030303030303030303030303030303030303030303030303', 1, 5, 'lnbcrt1', 0, 9, NULL);",
            )
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let listed: Vec<(u64, u8)> = s
            .credited_after(0, 10)
            .unwrap()
            .into_iter()
            .map(|(seq, h)| (seq, h[0]))
            .collect();
        assert_eq!(listed, [(1, 2), (2, 1)]);
        s.mark_received(&[3; 32], 5_000).unwrap();
        s.mark_credited(&[3; 32], 5).unwrap();
        assert_eq!(s.credited_after(2, 10).unwrap(), [(3, [3; 32])]);
        let id = s.insert_withdrawal(&new_row(&[4; 32], 1_000, 5)).unwrap();
        let w = s.withdrawal(id.unwrap()).unwrap().unwrap();
        assert_eq!((w.prior_failed_s, w.doubt_until_height), (None, None));
    }

    /// Only a `sending` row is marked in doubt, once: the first mark's deadline stays (a later
    /// resolution must not push it on); a cleared mark may be set again.
    #[test]
    fn a_sending_withdrawal_is_marked_in_doubt_once() {
        use LnWithdrawalStatus::*;
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let id = s
            .insert_withdrawal(&new_row(&[1; 32], 1_000, 5))
            .unwrap()
            .unwrap();
        let until = |s: &Store| s.withdrawal(id).unwrap().unwrap().doubt_until_height;
        assert!(!s.mark_in_doubt(id, 900).unwrap(), "new");
        assert!(s.transition(id, New, Held, None, None).unwrap());
        assert!(!s.mark_in_doubt(id, 900).unwrap(), "held");
        assert_eq!(until(&s), None);
        assert!(s.transition(id, Held, Sending, None, None).unwrap());
        assert!(s.mark_in_doubt(id, 900).unwrap());
        assert!(!s.mark_in_doubt(id, 2_000).unwrap(), "again");
        assert_eq!(until(&s), Some(900));
        s.clear_doubt(id).unwrap();
        assert_eq!(until(&s), None);
        assert!(s.mark_in_doubt(id, 2_000).unwrap());
        assert_eq!(until(&s), Some(2_000));
    }

    /// Credits are numbered in the order they were applied, once each (a repeated mark changes
    /// nothing), and listed after a position in that order.
    #[test]
    fn credits_are_listed_in_the_order_they_were_applied() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for n in 1u8..=4 {
            insert_open(&s, n, u64::from(n));
        }
        for n in [3u8, 1, 3, 4] {
            s.mark_credited(&[n; 32], 100).unwrap();
        }
        let listed = |s: &Store, after, limit| -> Vec<(u64, u8)> {
            s.credited_after(after, limit)
                .unwrap()
                .into_iter()
                .map(|(seq, h)| (seq, h[0]))
                .collect()
        };
        let listed_now = |after, limit| listed(&s, after, limit);
        assert_eq!(listed_now(0, 10), [(1, 3), (2, 1), (3, 4)]);
        assert_eq!(listed_now(1, 1), [(2, 1)]);
        assert_eq!(listed_now(3, 10), []);
        s.mark_credited(&[2; 32], 100).unwrap();
        assert_eq!(listed_now(3, 10), [(4, 2)]);
        // A database from before the numbering: its credits are numbered on opening, in the
        // order they were written, after any already numbered.
        s.db.execute(
            "UPDATE ln_deposits SET credited_seq = NULL WHERE payment_hash IN (?1, ?2)",
            params![&[1u8; 32][..], &[3u8; 32][..]],
        )
        .unwrap();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(listed(&s, 0, 10), [(3, 4), (4, 2), (5, 1), (6, 3)]);
    }

    /// Records an open deposit of 100 sat, hash `[n; 32]`, expiring at `expires_ms`.
    fn insert_open(s: &Store, n: u8, expires_ms: u64) {
        s.insert_deposit(&LnDeposit {
            payment_hash: [n; 32],
            account: 1,
            amount_sat: 100,
            bolt11: "lnbcrt1".into(),
            created_ms: 0,
            expires_ms,
            credited_sat: None,
        })
        .unwrap();
    }

    /// The loop's scan of open deposits is bounded by their expiry (every merchant invoice
    /// leaves one behind); `since` 0 (start-up) sees them all; credited ones never.
    #[test]
    fn open_deposits_are_bounded_by_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for (n, expires_ms) in [(1u8, 1_000u64), (2, 5_000), (3, 9_000)] {
            insert_open(&s, n, expires_ms);
        }
        s.mark_credited(&[3; 32], 100).unwrap();
        let hashes = |since| -> Vec<u8> {
            let mut v: Vec<u8> = s
                .open_deposits(since)
                .unwrap()
                .iter()
                .map(|d| d.payment_hash[0])
                .collect();
            v.sort();
            v
        };
        assert_eq!(hashes(0), [1, 2]);
        assert_eq!(hashes(1_000), [2]);
        assert_eq!(hashes(5_000), Vec::<u8>::new());
    }

    /// The sweep's pages visit every open deposit once, in (expiry, hash) order, whatever the
    /// page size and however many share an expiry.
    #[test]
    fn open_deposit_pages_visit_each_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let rows = [
            (7u8, 2_000u64),
            (2, 2_000),
            (9, 2_000),
            (4, 3_000),
            (1, 1_000),
            (5, 500),
            (8, 3_000),
        ];
        for (n, expires_ms) in rows {
            insert_open(&s, n, expires_ms);
        }
        s.mark_credited(&[8; 32], 100).unwrap();
        for size in [1, 2, 3, 10] {
            let mut seen = Vec::new();
            let mut after = None;
            loop {
                let page = s.open_deposits_page(600, after, size).unwrap();
                seen.extend(page.iter().map(|d| d.payment_hash[0]));
                match page.last() {
                    Some(l) if page.len() == size => after = Some((l.expires_ms, l.payment_hash)),
                    _ => break,
                }
            }
            assert_eq!(seen, [1, 2, 7, 9, 4], "page size {size}");
        }
    }

    /// A deposit the node received stays listed for a credit retry until it is credited,
    /// whatever its expiry; the first amount recorded stays. A database from before the column
    /// gains it on open.
    #[test]
    fn a_received_deposit_is_listed_until_credited_whatever_its_expiry() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
            old.execute_batch(
                "CREATE TABLE ln_deposits (payment_hash BLOB PRIMARY KEY, account INTEGER NOT \
                 NULL, amount_sat INTEGER NOT NULL, bolt11 TEXT NOT NULL, created_ms INTEGER \
                 NOT NULL, expires_ms INTEGER NOT NULL, credited_sat INTEGER);",
            )
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        for n in [1u8, 2] {
            s.insert_deposit(&LnDeposit {
                payment_hash: [n; 32],
                account: 1,
                amount_sat: 100,
                bolt11: "lnbcrt1".into(),
                created_ms: 0,
                expires_ms: 1_000,
                credited_sat: None,
            })
            .unwrap();
        }
        assert!(s.received_uncredited().unwrap().is_empty());
        s.mark_received(&[1; 32], 100_500).unwrap();
        s.mark_received(&[1; 32], 1).unwrap();
        assert_eq!(s.received_uncredited().unwrap(), [([1; 32], 100_500)]);
        assert!(s.open_deposits(5_000).unwrap().is_empty(), "expired");
        s.mark_credited(&[1; 32], 100).unwrap();
        assert!(s.received_uncredited().unwrap().is_empty());
        // Reopening keeps the column and the rows.
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(
            s.deposit(&[1; 32]).unwrap().unwrap().credited_sat,
            Some(100)
        );
    }

    #[test]
    fn one_live_withdrawal_per_invoice_and_transitions_are_conditional() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let h = [7u8; 32];
        let id = s
            .insert_withdrawal(&new_row(&h, 1_000, 5))
            .unwrap()
            .unwrap();
        assert_eq!(s.insert_withdrawal(&new_row(&h, 1_000, 6)).unwrap(), None);
        use LnWithdrawalStatus::*;
        assert!(!s.transition(id, Held, Sending, None, None).unwrap());
        assert!(s
            .transition(id, New, Refused, None, Some("insufficient balance"))
            .unwrap());
        // A refused withdrawal no longer blocks the invoice.
        let id2 = s
            .insert_withdrawal(&new_row(&h, 1_000, 7))
            .unwrap()
            .unwrap();
        assert_ne!(id, id2);
        assert_eq!(s.live_withdrawal_by_hash(&h).unwrap().unwrap().id, id2);
        assert_eq!(s.unfinished_withdrawals().unwrap().len(), 1);
        let w = s.withdrawal(id).unwrap().unwrap();
        assert_eq!(w.status, Refused);
        assert_eq!(w.reason.as_deref(), Some("insufficient balance"));
    }
}
