//! The store dashboard's withdrawal address allow-list (ADR 0015, addendum): an optional list,
//! per store, of the addresses that the store's withdrawals may go to. [`ListPolicy`] makes it
//! the API's withdrawal policy ([`api::policy`]): every money-out path of the store's account
//! asks it, whatever key, token or session requests ([`check_destination`]).
//!
//! * **Loosening waits, tightening is immediate.** An added address is usable only
//!   [`crate::MerchantConfig::withdraw_address_delay_ms`] after it was added (24 h by default):
//!   whoever stole a session *and* the password cannot add their own address and withdraw to it
//!   before the owner (who sees the list, and the audit log) can react. Removing an address
//!   takes effect at once for that address, but the list stays **on** for the same delay after
//!   its last removal, so emptying the list is not a way around it either.
//! * **On when non-empty.** A store whose list has an address (usable or still in its delay),
//!   or had one removed less than the delay ago, refuses dashboard withdrawals to any address
//!   not usable on it. A store that never listed an address withdraws as before.
//! * **Addresses compare as custody does:** bech32 in lower case (BIP 173: one case, the form
//!   may carry upper case), any other address exactly.
//! * **Time is passed in** (`now_ms`): the handlers pass the clock, tests any time.
//!
//! At most [`MAX_ADDRESSES`] listed addresses per store.

use rusqlite::{params, Connection, OptionalExtension};

/// The most addresses one store may list.
pub const MAX_ADDRESSES: usize = 20;

/// The default delay before an added address is usable (and the list stays on after its last
/// removal): 24 hours.
pub const DEFAULT_DELAY_MS: u64 = 24 * 3_600_000;

/// The longest delay the configuration accepts: 30 days.
pub const MAX_DELAY_MS: u64 = 30 * 24 * 3_600_000;

/// Creates the table (`CREATE TABLE IF NOT EXISTS`: a database from before the list gains it
/// empty, which leaves every store's withdrawals as they were).
pub fn init_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS dashboard_withdraw_address (
            merchant INTEGER NOT NULL, address TEXT NOT NULL, added_ms INTEGER NOT NULL,
            active_ms INTEGER NOT NULL, removed_ms INTEGER, list_on_until_ms INTEGER,
            PRIMARY KEY (merchant, address));",
    )
}

/// A listed address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// The address, as compared ([`normalize`]).
    pub address: String,
    /// When it was added, ms.
    pub added_ms: u64,
    /// From when withdrawals may go to it, ms.
    pub active_ms: u64,
}

/// Why the list refused a withdrawal or a change. [`AllowListError::code`] is stable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AllowListError {
    /// The store's list is on and the address is not on it.
    #[error("address {address} is not on this store's withdrawal address list")]
    NotListed {
        /// The address refused.
        address: String,
    },
    /// The address is on the list but still in its delay.
    #[error(
        "address {address} is on the list but usable only from {} UTC (a new address waits before it can be used)",
        api::capital::utc_datetime(*.active_ms)
    )]
    Pending {
        /// The address refused.
        address: String,
        /// From when it is usable, ms.
        active_ms: u64,
    },
    /// The store's list is on and the money would go where a list cannot name (another
    /// account, a Lightning payment), or to whatever address a claim will name (a new pull
    /// payment, a refund).
    #[error(
        "this store's withdrawal address list is on, and {what} cannot go to a listed address"
    )]
    ListOn {
        /// What was refused (`a transfer to another account`).
        what: &'static str,
    },
    /// Adding an address that is already listed.
    #[error("address {address} is already on the list")]
    AlreadyListed {
        /// The address.
        address: String,
    },
    /// Adding past [`MAX_ADDRESSES`].
    #[error("the list already has {MAX_ADDRESSES} addresses")]
    Full,
    /// The database failed (nothing is known to have changed).
    #[error("merchant database: {0}")]
    Database(#[from] rusqlite::Error),
}

impl AllowListError {
    /// A stable code for the refusal (shown on the dashboard, for support and tests).
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotListed { .. } => "address_not_listed",
            Self::Pending { .. } => "address_in_delay",
            Self::ListOn { .. } => "address_list_on",
            Self::AlreadyListed { .. } => "address_already_listed",
            Self::Full => "address_list_full",
            Self::Database(_) => "database",
        }
    }
}

/// The form an address is kept and compared in: a bech32 address (`bc1`, `tb1`, `bcrt1`, any
/// case) in lower case, any other exactly as given.
pub fn normalize(address: &str) -> String {
    let bech32 = ["bc1", "tb1", "bcrt1"].iter().any(|hrp| {
        address
            .get(..hrp.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(hrp))
    });
    if bech32 {
        address.to_ascii_lowercase()
    } else {
        address.to_owned()
    }
}

/// Whether two addresses are the same address as custody and the list compare them: their
/// [`normalize`]d forms are equal (custody stores a bech32 address in lower case, a form or a
/// claim may carry it in upper case; any other address compares exactly).
pub fn same_address(a: &str, b: &str) -> bool {
    normalize(a) == normalize(b)
}

fn ms(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn sql_ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The store's listed addresses (not removed), oldest first.
pub fn list(conn: &Connection, merchant: u32) -> rusqlite::Result<Vec<Listed>> {
    let mut q = conn.prepare_cached(
        "SELECT address, added_ms, active_ms FROM dashboard_withdraw_address \
         WHERE merchant = ?1 AND removed_ms IS NULL ORDER BY added_ms, address",
    )?;
    let rows = q
        .query_map(params![merchant], |r| {
            Ok(Listed {
                address: r.get(0)?,
                added_ms: ms(r.get(1)?),
                active_ms: ms(r.get(2)?),
            })
        })?
        .collect();
    rows
}

/// Whether the store's list is on at `now_ms`: an address is listed, or one was removed less
/// than the delay ago.
pub fn is_on(conn: &Connection, merchant: u32, now_ms: u64) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM dashboard_withdraw_address WHERE merchant = ?1 \
         AND (removed_ms IS NULL OR list_on_until_ms > ?2))",
        params![merchant, sql_ms(now_ms)],
        |r| r.get(0),
    )
}

/// Whether a dashboard withdrawal of `merchant` may go to `address` at `now_ms`: yes when the
/// list is off, or the address is listed and its delay has passed.
pub fn check(
    conn: &Connection,
    merchant: u32,
    address: &str,
    now_ms: u64,
) -> Result<(), AllowListError> {
    if !is_on(conn, merchant, now_ms)? {
        return Ok(());
    }
    let address = normalize(address);
    let active: Option<i64> = conn
        .query_row(
            "SELECT active_ms FROM dashboard_withdraw_address \
             WHERE merchant = ?1 AND address = ?2 AND removed_ms IS NULL",
            params![merchant, address],
            |r| r.get(0),
        )
        .optional()?;
    match active.map(ms) {
        None => Err(AllowListError::NotListed { address }),
        Some(active_ms) if active_ms > now_ms => {
            Err(AllowListError::Pending { address, active_ms })
        }
        Some(_) => Ok(()),
    }
}

/// Whether `merchant` (a store's account) may send money to `to` at `now_ms`, on every
/// money-out path of the account ([`api::policy`]): yes while the list is off; while it is on,
/// only to a usable listed address ([`check`]); another account or a Lightning payment,
/// which a list cannot name, is refused ([`AllowListError::ListOn`]).
pub fn check_destination(
    conn: &Connection,
    merchant: u32,
    to: &api::policy::Destination,
    now_ms: u64,
) -> Result<(), AllowListError> {
    use api::policy::Destination;
    match to {
        Destination::Address(a) => check(conn, merchant, a, now_ms),
        other => {
            if !is_on(conn, merchant, now_ms)? {
                return Ok(());
            }
            Err(AllowListError::ListOn {
                what: match other {
                    Destination::Account(_) => "a transfer to another account",
                    Destination::Lightning => "a Lightning payment",
                    _ => "this payment",
                },
            })
        }
    }
}

/// Refuses what would pay whatever address a later claim names (a new pull payment, a refund's
/// pull payment) while the store's list is on ([`AllowListError::ListOn`] with `what`).
pub fn check_list_off(
    conn: &Connection,
    merchant: u32,
    what: &'static str,
    now_ms: u64,
) -> Result<(), AllowListError> {
    if is_on(conn, merchant, now_ms)? {
        return Err(AllowListError::ListOn { what });
    }
    Ok(())
}

/// The store's list as the withdrawal policy of the whole API ([`api::policy`]), installed by
/// [`crate::attach`]: every money-out path of a store's account is asked
/// ([`check_destination`]). An account that is no store has no list (off): allowed.
#[derive(Clone)]
pub struct ListPolicy {
    db: crate::MerchantDb,
}

impl ListPolicy {
    /// The policy over the merchant database.
    pub fn new(db: crate::MerchantDb) -> Self {
        Self { db }
    }
}

impl std::fmt::Debug for ListPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListPolicy").finish_non_exhaustive()
    }
}

/// The list's answer as the policy's: a refusal with its stable code, a database failure as a
/// failure (nothing is known to be allowed).
pub fn policy_answer(r: Result<(), AllowListError>) -> Result<(), api::policy::PolicyError> {
    match r {
        Ok(()) => Ok(()),
        Err(AllowListError::Database(e)) => Err(api::policy::PolicyError::Failed(e.to_string())),
        Err(e) => Err(api::policy::PolicyError::Refused(
            api::policy::PolicyRefusal {
                code: e.code(),
                message: e.to_string(),
            },
        )),
    }
}

/// A refusal of the list as the signed API answers it (`403`, `-4038`, [`api::policy`]); a
/// database failure as the policy's failure (`503`, `-1001`: nothing done).
pub fn api_error(e: AllowListError) -> api::error::ApiError {
    match policy_answer(Err(e)) {
        Err(e) => api::policy::policy_error(e),
        Ok(()) => api::error::ApiError::internal(),
    }
}

impl api::policy::WithdrawalPolicy for ListPolicy {
    fn check(
        &self,
        account: u32,
        to: &api::policy::Destination,
        now_ms: u64,
    ) -> Result<(), api::policy::PolicyError> {
        let conn = self.db.lock().unwrap_or_else(|e| e.into_inner());
        policy_answer(check_destination(&conn, account, to, now_ms))
    }
}

/// Adds `address` to the store's list at `now_ms`, usable from `now_ms + delay_ms`. The caller
/// has checked its syntax and the store's password. [`add_with`] without a hook.
pub fn add(
    conn: &mut Connection,
    merchant: u32,
    address: &str,
    now_ms: u64,
    delay_ms: u64,
) -> Result<Listed, AllowListError> {
    match add_with(conn, merchant, address, now_ms, delay_ms, |_| {
        Ok::<(), std::convert::Infallible>(())
    }) {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// As [`add`], calling `before_commit` with the entry once the addition is checked and written
/// but not yet committed (the dashboard appends its audit entry there). The outer `Err` is the
/// hook's: then nothing is added (rolled back). The inner result is the list's answer.
pub fn add_with<E>(
    conn: &mut Connection,
    merchant: u32,
    address: &str,
    now_ms: u64,
    delay_ms: u64,
    before_commit: impl FnOnce(&Listed) -> Result<(), E>,
) -> Result<Result<Listed, AllowListError>, E> {
    let address = normalize(address);
    let tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => return Ok(Err(e.into())),
    };
    let listed = match list(&tx, merchant) {
        Ok(l) => l,
        Err(e) => return Ok(Err(e.into())),
    };
    if listed.iter().any(|l| l.address == address) {
        return Ok(Err(AllowListError::AlreadyListed { address }));
    }
    if listed.len() >= MAX_ADDRESSES {
        return Ok(Err(AllowListError::Full));
    }
    let entry = Listed {
        address,
        added_ms: now_ms,
        active_ms: now_ms.saturating_add(delay_ms),
    };
    // A removed row of the same address is replaced: a new delay from now.
    if let Err(e) = tx.execute(
        "INSERT INTO dashboard_withdraw_address \
         (merchant, address, added_ms, active_ms, removed_ms, list_on_until_ms) \
         VALUES (?1, ?2, ?3, ?4, NULL, NULL) \
         ON CONFLICT (merchant, address) DO UPDATE SET added_ms = ?3, active_ms = ?4, \
         removed_ms = NULL, list_on_until_ms = NULL",
        params![
            merchant,
            entry.address,
            sql_ms(entry.added_ms),
            sql_ms(entry.active_ms)
        ],
    ) {
        return Ok(Err(e.into()));
    }
    // Dropping `tx` on the hook's error rolls the insert back.
    before_commit(&entry)?;
    Ok(tx.commit().map(|()| entry).map_err(AllowListError::from))
}

/// Removes `address` from the store's list at `now_ms`: at once for that address; the list
/// stays on until `now_ms + delay_ms`. `Ok(false)` if it was not listed (nothing changed).
/// [`remove_with`] without a hook.
pub fn remove(
    conn: &mut Connection,
    merchant: u32,
    address: &str,
    now_ms: u64,
    delay_ms: u64,
) -> Result<bool, AllowListError> {
    match remove_with(conn, merchant, address, now_ms, delay_ms, |_| {
        Ok::<(), std::convert::Infallible>(())
    }) {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// As [`remove`], calling `before_commit` with the normalized address once the removal is
/// written but not yet committed (only when the address was listed). The outer `Err` is the
/// hook's: then nothing is removed (rolled back).
pub fn remove_with<E>(
    conn: &mut Connection,
    merchant: u32,
    address: &str,
    now_ms: u64,
    delay_ms: u64,
    before_commit: impl FnOnce(&str) -> Result<(), E>,
) -> Result<Result<bool, AllowListError>, E> {
    let address = normalize(address);
    let tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => return Ok(Err(e.into())),
    };
    let n = match tx.execute(
        "UPDATE dashboard_withdraw_address SET removed_ms = ?3, list_on_until_ms = ?4 \
         WHERE merchant = ?1 AND address = ?2 AND removed_ms IS NULL",
        params![
            merchant,
            address,
            sql_ms(now_ms),
            sql_ms(now_ms.saturating_add(delay_ms))
        ],
    ) {
        Ok(n) => n,
        Err(e) => return Ok(Err(e.into())),
    };
    if n != 1 {
        return Ok(Ok(false));
    }
    before_commit(&address)?;
    Ok(tx.commit().map(|()| true).map_err(AllowListError::from))
}
