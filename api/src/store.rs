//! SQLite persistence: API keys, order history and trade history, so that a restart keeps them.
//! History rows carry their record in `data` as postcard bytes (a quarter of the JSON size);
//! the indexed columns beside it serve the queries.
//!
//! Durability: history rows are written by the read-model applier in one transaction per group of
//! event batches (WAL, `synchronous=NORMAL`); the engine's journal is the source of truth and a
//! replay upserts the same rows again. API keys are written with `synchronous=FULL` semantics by
//! their own transaction before the key is shown.

use crate::readmodel::{OrderRec, TradeRec};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A storage failure (logged, answered as `-1000`).
#[derive(Debug, thiserror::Error)]
#[error("storage: {0}")]
#[non_exhaustive]
pub struct StoreError(#[from] pub rusqlite::Error);

/// A stored API key (never the secret: secrets are derived, see [`crate::keys`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    /// The public key.
    pub api_key: String,
    /// Its account.
    pub account: u32,
    /// Permission bits.
    pub perms: u8,
    /// A label.
    pub label: String,
    /// Creation time.
    pub created_ms: u64,
}

/// The database: a small pool of connections to one file.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
}

/// Rows between two calls of [`Store::write_history_with`]'s `every` (~0.3 ms of SQLite work).
pub const HISTORY_CHUNK: usize = 128;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS api_keys(
  api_key TEXT PRIMARY KEY, account INTEGER NOT NULL, perms INTEGER NOT NULL,
  label TEXT NOT NULL, created_ms INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS orders(
  order_id INTEGER PRIMARY KEY, account INTEGER NOT NULL, market INTEGER NOT NULL,
  client_id TEXT NOT NULL, time_ms INTEGER NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS orders_by_account ON orders(account, market, order_id);
CREATE INDEX IF NOT EXISTS orders_by_client ON orders(account, client_id);
CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS trades(
  trade_id INTEGER PRIMARY KEY, market INTEGER NOT NULL, maker_account INTEGER NOT NULL,
  taker_account INTEGER NOT NULL, time_ms INTEGER NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS trades_by_maker ON trades(maker_account, market, trade_id);
CREATE INDEX IF NOT EXISTS trades_by_taker ON trades(taker_account, market, trade_id);
";

fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let c = Connection::open(path)?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "NORMAL")?;
    // Checkpoints of 1,000 pages (SQLite's default, ~4 MiB): a checkpoint's write and sync
    // share the disk with the engine's journal, and the 16,384-page ones this had before made
    // a group commit's `fdatasync` wait 23-45 ms (WebSocket API load test at two orders in
    // flight: p99.9 24-29 ms, max 51-52 ms; with 1,000 pages 12-14 ms and 23-39 ms, the
    // history thread's CPU per order within 0.2 µs). And a page cache that holds the hot index
    // pages.
    c.pragma_update(None, "wal_autocheckpoint", 1_000)?;
    c.pragma_update(None, "cache_size", -65_536)?;
    Ok(c)
}

/// i64 columns hold u64 values bit for bit.
fn to_sql(v: u64) -> i64 {
    v as i64
}

/// A query's bound (an id or time a client sent): no stored id or time reaches `i64::MAX`, so
/// a larger bound is that one. Bit for bit it would turn negative (a `fromId` or `startTime`
/// of 2^63 or more read everything from the start; such an `endTime`, nothing).
fn bound(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let c = open_conn(path)?;
        c.execute_batch(SCHEMA)?;
        Ok(Self {
            path: path.to_owned(),
            pool: Mutex::new(vec![c]),
        })
    }

    /// Opens a fresh connection (the applier's writer).
    pub fn connect(&self) -> Result<Connection, StoreError> {
        open_conn(&self.path)
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match conn {
            Some(c) => c,
            None => open_conn(&self.path)?,
        };
        let r = f(&conn);
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < 8 {
            pool.push(conn);
        }
        Ok(r?)
    }

    /// Inserts a key.
    pub fn insert_key(&self, k: &KeyRow) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO api_keys(api_key, account, perms, label, created_ms) VALUES (?1,?2,?3,?4,?5)",
                params![k.api_key, k.account, k.perms, k.label, to_sql(k.created_ms)],
            )
            .map(drop)
        })
    }

    /// Revokes a key; false if there was no such live key.
    pub fn revoke_key(&self, api_key: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE api_keys SET revoked = 1 WHERE api_key = ?1 AND revoked = 0",
                params![api_key],
            )
            .map(|n| n == 1)
        })
    }

    /// Every live key.
    pub fn keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT api_key, account, perms, label, created_ms FROM api_keys WHERE revoked = 0",
            )?;
            let rows = st.query_map([], |r| {
                Ok(KeyRow {
                    api_key: r.get(0)?,
                    account: r.get(1)?,
                    perms: r.get(2)?,
                    label: r.get(3)?,
                    created_ms: r.get::<_, i64>(4)? as u64,
                })
            })?;
            rows.collect()
        })
    }

    /// Writes order and trade rows and the engine sequence number they reach, in one
    /// transaction (upserts: replays are idempotent). `ON CONFLICT .. DO UPDATE`, not `INSERT OR
    /// REPLACE`: REPLACE on a table with indexes and `NOT NULL` columns makes SQLite keep a
    /// statement journal (a copy of every page each row's insert touches) and, for a row that
    /// exists, delete and re-insert its index entries.
    pub fn write_history<'a>(
        conn: &mut Connection,
        orders: impl IntoIterator<Item = &'a OrderRec>,
        trades: &[TradeRec],
        seq: u64,
    ) -> Result<(), StoreError> {
        Self::write_history_with(conn, orders, trades, seq, &mut || {})
    }

    /// [`write_history`](Self::write_history), calling `every` after each
    /// [`HISTORY_CHUNK`] rows (the history thread checks there whether it fell behind).
    pub fn write_history_with<'a>(
        conn: &mut Connection,
        orders: impl IntoIterator<Item = &'a OrderRec>,
        trades: &[TradeRec],
        seq: u64,
        every: &mut dyn FnMut(),
    ) -> Result<(), StoreError> {
        let mut written = 0usize;
        let mut count = || {
            written += 1;
            if written % HISTORY_CHUNK == 0 {
                every();
            }
        };
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO meta(name, value) VALUES ('history_seq', ?1) ON CONFLICT(name) DO UPDATE SET value = max(value, excluded.value)",
            params![to_sql(seq)],
        )?;
        {
            // An order's account and market never change (its id is the engine's, given when it
            // is placed), so an update leaves them out: SQLite rewrites the entries of every
            // index over a column the `SET` names, and `orders_by_account` would be rewritten
            // for each fill or cancel of an order that rested across commits (an update took
            // 5.4 µs with them, 3.9 µs without, in a 200,000-row table:
            // `scripts/bench-history-upsert.py`).
            // The client id is written again (the engine keeps one per order today; the row
            // follows the order's record if that ever changes).
            let mut o = tx.prepare_cached(
                "INSERT INTO orders(order_id, account, market, client_id, time_ms, data) VALUES (?1,?2,?3,?4,?5,?6) \
                 ON CONFLICT(order_id) DO UPDATE SET \
                 client_id = excluded.client_id, time_ms = excluded.time_ms, data = excluded.data",
            )?;
            // One encoding buffer for the whole transaction.
            let mut data = Vec::with_capacity(256);
            for r in orders {
                data.clear();
                data = postcard::to_extend(r, data).unwrap_or_default();
                o.execute(params![
                    to_sql(r.id),
                    r.account,
                    r.market,
                    r.client_id,
                    to_sql(r.time_ms),
                    &data[..]
                ])?;
                count();
            }
            // A trade never changes; a replay writes it again as it was. Its indexed columns
            // are left out of the `SET` for the same reason as the orders'.
            let mut t = tx.prepare_cached(
                "INSERT INTO trades(trade_id, market, maker_account, taker_account, time_ms, data) VALUES (?1,?2,?3,?4,?5,?6) \
                 ON CONFLICT(trade_id) DO UPDATE SET time_ms = excluded.time_ms, data = excluded.data",
            )?;
            for r in trades {
                data.clear();
                data = postcard::to_extend(r, data).unwrap_or_default();
                t.execute(params![
                    to_sql(r.id),
                    r.market,
                    r.maker_account,
                    r.taker_account,
                    to_sql(r.time_ms),
                    &data[..]
                ])?;
                count();
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The engine sequence number the stored history reaches (0 when empty).
    pub fn history_seq(&self) -> Result<u64, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT value FROM meta WHERE name = 'history_seq'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()
        })
        .map(|v| v.map_or(0, |v| v as u64))
    }

    /// One order of an account by id.
    pub fn order(&self, account: u32, id: u64) -> Result<Option<OrderRec>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT data FROM orders WHERE order_id = ?1 AND account = ?2",
                params![to_sql(id), account],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()
        })
        .map(|o| o.and_then(|s| decode_order(&s)))
    }

    /// The latest order of an account with this client id.
    pub fn order_by_client(
        &self,
        account: u32,
        client: &str,
    ) -> Result<Option<OrderRec>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT data FROM orders WHERE account = ?1 AND client_id = ?2 ORDER BY order_id DESC LIMIT 1",
                params![account, client],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()
        })
        .map(|o| o.and_then(|s| decode_order(&s)))
    }

    /// Orders of an account in a market: ids from `from_id` (or the latest `limit` ones), time
    /// range (creation time), oldest first. The time bounds become id bounds first
    /// ([`id_at_or_after`]), so an `endTime` in the past does not read the account's newer
    /// orders one by one.
    pub fn orders(
        &self,
        account: u32,
        market: u16,
        from_id: Option<u64>,
        start_ms: Option<u64>,
        end_ms: Option<u64>,
        limit: u32,
    ) -> Result<Vec<OrderRec>, StoreError> {
        let (sql, asc) = if from_id.is_some() {
            ("SELECT data FROM orders WHERE account=?1 AND market=?2 AND order_id>=?3 AND order_id<=?7 AND time_ms>=?4 AND time_ms<=?5 ORDER BY order_id ASC LIMIT ?6", true)
        } else {
            ("SELECT data FROM orders WHERE account=?1 AND market=?2 AND order_id>=?3 AND order_id<=?7 AND time_ms>=?4 AND time_ms<=?5 ORDER BY order_id DESC LIMIT ?6", false)
        };
        let mut v: Vec<OrderRec> = self
            .with(|c| {
                let Some((lo, hi)) = id_bounds(c, Timed::Orders, from_id, start_ms, end_ms)? else {
                    return Ok(Vec::new());
                };
                let mut st = c.prepare_cached(sql)?;
                let rows = st.query_map(
                    params![
                        account,
                        market,
                        lo,
                        start_ms.map_or(0, bound),
                        end_ms.map_or(i64::MAX, bound),
                        limit,
                        hi
                    ],
                    |r| r.get::<_, Vec<u8>>(0),
                )?;
                rows.collect::<rusqlite::Result<Vec<Vec<u8>>>>()
            })?
            .into_iter()
            .filter_map(|s| decode_order(&s))
            .collect();
        if !asc {
            v.reverse();
        }
        Ok(v)
    }

    /// The latest `limit` trades of a market, oldest first.
    pub fn recent_trades(&self, market: u16, limit: u32) -> Result<Vec<TradeRec>, StoreError> {
        let mut v: Vec<TradeRec> = self
            .with(|c| {
                let mut st = c.prepare_cached(
                    "SELECT data FROM trades WHERE market=?1 ORDER BY trade_id DESC LIMIT ?2",
                )?;
                let rows = st.query_map(params![market, limit], |r| r.get::<_, Vec<u8>>(0))?;
                rows.collect::<rusqlite::Result<Vec<Vec<u8>>>>()
            })?
            .into_iter()
            .filter_map(|s| postcard::from_bytes(&s).ok())
            .collect();
        v.reverse();
        Ok(v)
    }

    /// Trades of a market from `from_id` on, oldest first.
    pub fn market_trades_from(
        &self,
        market: u16,
        from_id: u64,
        limit: u32,
    ) -> Result<Vec<TradeRec>, StoreError> {
        Ok(self
            .with(|c| {
                let mut st = c.prepare_cached(
                    "SELECT data FROM trades WHERE market=?1 AND trade_id>=?2 ORDER BY trade_id ASC LIMIT ?3",
                )?;
                let rows = st.query_map(params![market, bound(from_id), limit], |r| {
                    r.get::<_, Vec<u8>>(0)
                })?;
                rows.collect::<rusqlite::Result<Vec<Vec<u8>>>>()
            })?
            .into_iter()
            .filter_map(|s| postcard::from_bytes(&s).ok())
            .collect())
    }

    /// Trades of an account in a market, oldest first: ids from `from_id` (ascending from
    /// there), or the latest `limit` ones; `start_ms..=end_ms` bounds their time.
    ///
    /// Two ordered index scans (the account as maker, as taker), each stopping at `limit`, then
    /// merged: a single `maker_account = ? OR taker_account = ?` made SQLite collect every trade
    /// of the account and sort them for each query (for an account with a million trades, a
    /// million rows read to answer 500). The time bounds become id bounds first
    /// ([`id_at_or_after`]: a trade's time never decreases with its id, the engine's clock
    /// never going back), so a window in the past is found without reading what came after it.
    pub fn trades(
        &self,
        account: u32,
        market: u16,
        from_id: Option<u64>,
        start_ms: Option<u64>,
        end_ms: Option<u64>,
        limit: u32,
    ) -> Result<Vec<TradeRec>, StoreError> {
        let order = if from_id.is_some() { "ASC" } else { "DESC" };
        let side = |col: &str| {
            format!(
                "SELECT trade_id, data FROM (SELECT trade_id, data FROM trades \
                 WHERE {col}=?1 AND market=?2 AND trade_id>=?3 AND trade_id<=?4 \
                 AND time_ms>=?5 AND time_ms<=?6 ORDER BY trade_id {order} LIMIT ?7)"
            )
        };
        // UNION, not UNION ALL: a trade of the account with itself is one row.
        let sql = format!(
            "{} UNION {} ORDER BY trade_id {order} LIMIT ?7",
            side("maker_account"),
            side("taker_account")
        );
        let mut v: Vec<TradeRec> = self
            .with(|c| {
                let Some((lo, hi)) = id_bounds(c, Timed::Trades, from_id, start_ms, end_ms)? else {
                    return Ok(Vec::new());
                };
                let mut st = c.prepare_cached(&sql)?;
                let rows = st.query_map(
                    params![
                        account,
                        market,
                        lo,
                        hi,
                        start_ms.map_or(0, bound),
                        end_ms.map_or(i64::MAX, bound),
                        limit
                    ],
                    |r| r.get::<_, Vec<u8>>(1),
                )?;
                rows.collect::<rusqlite::Result<Vec<Vec<u8>>>>()
            })?
            .into_iter()
            .filter_map(|s| postcard::from_bytes(&s).ok())
            .collect();
        if from_id.is_none() {
            v.reverse();
        }
        Ok(v)
    }
}

/// The tables whose rows' times never decrease with their ids (the engine's clock never goes
/// back; replays use the journaled times), so that a time bound becomes an id bound.
#[derive(Clone, Copy)]
enum Timed {
    /// Trades by `trade_id`.
    Trades,
    /// Orders by `order_id`, creation time. An open order rebuilt after a history gap has no
    /// known time (0) and is skipped: it is placed in time by its id.
    Orders,
}

/// The first stored id of `table` whose time is `ms` or later (`None`: no row that late), by a
/// binary search over ids. O(log n) look-ups of the primary key. (The smallest and largest
/// ids are two subqueries: SQLite reads `min(x), max(x)` in one `SELECT` by scanning the table,
/// and each alone from the end of the key.)
fn id_at_or_after(c: &Connection, table: Timed, ms: u64) -> rusqlite::Result<Option<i64>> {
    let (range, next) = match table {
        Timed::Trades => (
            "SELECT (SELECT min(trade_id) FROM trades), (SELECT max(trade_id) FROM trades)",
            "SELECT trade_id, time_ms FROM trades WHERE trade_id >= ?1 ORDER BY trade_id LIMIT 1",
        ),
        Timed::Orders => (
            "SELECT (SELECT min(order_id) FROM orders), (SELECT max(order_id) FROM orders)",
            "SELECT order_id, time_ms FROM orders WHERE order_id >= ?1 AND time_ms > 0 \
             ORDER BY order_id LIMIT 1",
        ),
    };
    let (lo, hi): (Option<i64>, Option<i64>) =
        c.query_row(range, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let (Some(mut lo), Some(mut hi)) = (lo, hi) else {
        return Ok(None);
    };
    let mut next = c.prepare_cached(next)?;
    let mut found = None;
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        match next
            .query_row([mid], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .optional()?
        {
            // The answer is `id` or an id below `mid` (none lies in `mid..id`).
            Some((id, t)) if t as u64 >= ms => {
                found = Some(id);
                hi = mid - 1;
            }
            Some((id, _)) => lo = id + 1,
            // No row of known time from `mid` on: the answer, if any, lies below.
            None => hi = mid - 1,
        }
    }
    Ok(found)
}

/// The id bounds `[lo, hi]` of rows of `table` from `from_id` within the time bounds (`None`:
/// no row can match).
fn id_bounds(
    c: &Connection,
    table: Timed,
    from_id: Option<u64>,
    start_ms: Option<u64>,
    end_ms: Option<u64>,
) -> rusqlite::Result<Option<(i64, i64)>> {
    let mut lo = bound(from_id.unwrap_or(0));
    let mut hi = i64::MAX;
    if let Some(s) = start_ms {
        match id_at_or_after(c, table, s)? {
            Some(id) => lo = lo.max(id),
            None => return Ok(None),
        }
    }
    if let Some(e) = end_ms.and_then(|e| e.checked_add(1)) {
        if let Some(id) = id_at_or_after(c, table, e)? {
            hi = id - 1;
        }
    }
    Ok(Some((lo, hi)))
}

/// An order row: written by this version, or before `OrderRec::list_id` existed (its
/// encoding then lacks that last field, an `Option` whose `None` is one zero byte).
fn decode_order(bytes: &[u8]) -> Option<OrderRec> {
    postcard::from_bytes(bytes).ok().or_else(|| {
        let mut v = bytes.to_vec();
        v.push(0);
        postcard::from_bytes(&v).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use matching_engine::{
        AccountId, ClientOrderId, MarketId, OrderId, OrderInfo, OrderType, Price, Qty, Side,
        StpMode, TimeInForce,
    };

    /// A store in a new temporary directory (removed by the caller).
    fn temp_store(tag: &str) -> (std::path::PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!(
            "mediator-store-{tag}-{}-{}",
            std::process::id(),
            crate::core::wall_clock_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("api.sqlite")).unwrap();
        (dir, store)
    }

    /// Order 7 of account 3 in market 0: a limit of 2 at 100, placed at time 5.
    fn sample_order(side: Side, client: &str) -> OrderRec {
        let info = OrderInfo {
            order: OrderId(7),
            account: AccountId(3),
            market: MarketId(0),
            side,
            client_id: Some(ClientOrderId::new(client).unwrap()),
        };
        let t = OrderType::Limit {
            price: Price(100),
            qty: Qty(2),
        };
        OrderRec::placed(info, &t, TimeInForce::Gtc, false, StpMode::None, 5)
    }

    /// Trade 1: order 7 of account 3 (maker) with order 8 of account 4, at time 6.
    fn sample_trade() -> TradeRec {
        TradeRec {
            id: 1,
            market: 0,
            price: 100,
            qty: 1,
            quote: 100,
            taker_side: Side::Sell,
            maker_order: 7,
            taker_order: 8,
            maker_account: 3,
            taker_account: 4,
            maker_fee: 0,
            taker_fee: 0,
            time_ms: 6,
        }
    }

    /// Order rows written before `OrderRec::list_id` existed still decode (with no list), and
    /// rows with a list keep it.
    #[test]
    fn an_order_row_from_before_lists_decodes_without_a_list() {
        let mut rec = sample_order(Side::Sell, "c");
        let bytes = postcard::to_allocvec(&rec).unwrap();
        // The old encoding: everything but the last field (`None` is one zero byte).
        assert_eq!(bytes.last(), Some(&0));
        let old = &bytes[..bytes.len() - 1];
        assert!(postcard::from_bytes::<OrderRec>(old).is_err());
        assert_eq!(decode_order(old), Some(rec.clone()));
        rec.list_id = Some(9);
        let bytes = postcard::to_allocvec(&rec).unwrap();
        assert_eq!(decode_order(&bytes), Some(rec));
        assert_eq!(decode_order(&[1, 2, 3]), None);
    }
    /// A row written again (an order that filled, a replay after a restart) replaces the one
    /// before in the table and in every index: looked up by id, by client id and in the account's
    /// list, it is the new row once; a trade written twice is one trade.
    #[test]
    fn history_rows_written_again_replace_the_rows_before() {
        let (dir, store) = temp_store("upsert");
        let placed = sample_order(Side::Buy, "first");
        let trade = sample_trade();
        let mut conn = store.connect().unwrap();
        Store::write_history(&mut conn, [&placed], std::slice::from_ref(&trade), 1).unwrap();
        let mut filled = placed.clone();
        filled.executed = 1;
        filled.client_id = "second".into();
        filled.time_ms = 9;
        Store::write_history(&mut conn, [&filled], std::slice::from_ref(&trade), 2).unwrap();

        assert_eq!(store.order(3, 7).unwrap(), Some(filled.clone()));
        assert_eq!(
            store.order_by_client(3, "second").unwrap(),
            Some(filled.clone())
        );
        assert_eq!(store.order_by_client(3, "first").unwrap(), None);
        assert_eq!(
            store.orders(3, 0, None, None, None, 10).unwrap(),
            vec![filled]
        );
        assert_eq!(
            store.trades(3, 0, None, None, None, 10).unwrap(),
            vec![trade.clone()]
        );
        assert_eq!(
            store.trades(4, 0, None, None, None, 10).unwrap(),
            vec![trade]
        );
        assert_eq!(store.history_seq().unwrap(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A seeded xorshift generator: `rnd(n)` is below `n`.
    fn xorshift(mut x: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        }
    }

    /// `trades` (two index scans merged, time bounds turned into id bounds) answers what a
    /// plain filter of every row answers: seeded histories with self-trades, several markets,
    /// runs of equal times and gaps in the ids, against many windows, `fromId`s and limits.
    #[test]
    fn account_trades_match_a_plain_filter_of_every_row() {
        let (dir, store) = temp_store("trades");
        let mut rnd = xorshift(0x9e37_79b9_7f4a_7c15);
        let (mut id, mut time) = (0u64, 100u64);
        let mut all = Vec::new();
        for _ in 0..3_000 {
            id += 1 + rnd(3);
            time += rnd(3);
            all.push(TradeRec {
                id,
                market: rnd(2) as u16,
                price: 100,
                qty: 1,
                quote: 100,
                taker_side: Side::Buy,
                maker_order: id * 2,
                taker_order: id * 2 + 1,
                maker_account: rnd(5) as u32,
                taker_account: rnd(5) as u32,
                maker_fee: 0,
                taker_fee: 0,
                time_ms: time,
            });
        }
        let mut conn = store.connect().unwrap();
        Store::write_history(&mut conn, std::iter::empty(), &all, 1).unwrap();
        let (first, last) = (all[0].time_ms, all[all.len() - 1].time_ms);
        for _ in 0..400 {
            let account = rnd(6) as u32;
            let market = rnd(2) as u16;
            let from = (rnd(3) == 0).then(|| rnd(id + 10));
            let start = (rnd(2) == 0).then(|| first - 5 + rnd(last - first + 10));
            let end = (rnd(2) == 0).then(|| first - 5 + rnd(last - first + 10));
            let limit = 1 + rnd(40) as u32;
            let mut want: Vec<TradeRec> = all
                .iter()
                .filter(|t| {
                    (t.maker_account == account || t.taker_account == account)
                        && t.market == market
                        && from.is_none_or(|f| t.id >= f)
                        && start.is_none_or(|s| t.time_ms >= s)
                        && end.is_none_or(|e| t.time_ms <= e)
                })
                .cloned()
                .collect();
            if from.is_some() {
                want.truncate(limit as usize);
            } else {
                want = want.split_off(want.len().saturating_sub(limit as usize));
            }
            let got = store
                .trades(account, market, from, start, end, limit)
                .unwrap();
            assert_eq!(
                got, want,
                "account {account} market {market} from {from:?} start {start:?} end {end:?} limit {limit}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Defect: `allOrders` with an `endTime` (and no `orderId`) read every newer order of the
    /// account in that market before reaching the window (one index ordered by id, the time
    /// checked row by row): an account with millions of orders made each such request read them
    /// all. The time bounds become id bounds first, as for trades; this counts SQLite's
    /// virtual-machine steps (its progress handler, every 100), which do not depend on timing.
    #[test]
    fn orders_before_an_end_time_are_found_without_reading_the_newer_ones() {
        let (dir, store) = temp_store("orders-end");
        let rows: Vec<OrderRec> = (1..=20_000u64)
            .map(|i| {
                let mut o = sample_order(if i % 2 == 0 { Side::Buy } else { Side::Sell }, "c");
                o.id = i;
                o.client_id = format!("c{i}");
                o.time_ms = 1_000 + i;
                o
            })
            .collect();
        let mut conn = store.connect().unwrap();
        Store::write_history(&mut conn, &rows, &[], 1).unwrap();
        let steps = count_steps(&store);
        let got = store.orders(3, 0, None, None, Some(1_100), 10).unwrap();
        let ids: Vec<u64> = got.iter().map(|o| o.id).collect();
        assert_eq!(ids, (91..=100).collect::<Vec<u64>>());
        let hundreds = steps.load(std::sync::atomic::Ordering::Relaxed);
        // ~10 rows and a binary search over 20,000 ids, not 19,900 rows.
        assert!(
            hundreds < 100,
            "{hundreds} hundred SQLite steps to find 10 orders"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `allOrders`' query against a plain filter of every row, over seeded random orders: the
    /// id bounds found by binary search select exactly the rows of the time window. One row in
    /// twenty has no known time (0: an open order rebuilt after a history gap), which the
    /// search skips: such a row is within an `endTime` if an order of known time at or before
    /// it is (it is placed in time by its id), and never within a `startTime`.
    #[test]
    fn account_orders_match_a_plain_filter_of_every_row() {
        let (dir, store) = temp_store("orders");
        let mut rnd = xorshift(0x2545_f491_4f6c_dd1d);
        let (mut id, mut time) = (0u64, 100u64);
        let mut all = Vec::new();
        for _ in 0..3_000 {
            id += 1 + rnd(3);
            time += rnd(3);
            let mut o = sample_order(Side::Buy, "c");
            o.id = id;
            o.account = rnd(5) as u32;
            o.market = rnd(2) as u16;
            o.client_id = format!("c{id}");
            o.time_ms = if rnd(20) == 0 { 0 } else { time };
            all.push(o);
        }
        let mut conn = store.connect().unwrap();
        Store::write_history(&mut conn, &all, &[], 1).unwrap();
        // The first id whose known time is `ms` or later, by a walk over every row.
        let first_at = |ms: u64| {
            all.iter()
                .find(|o| o.time_ms != 0 && o.time_ms >= ms)
                .map(|o| o.id)
        };
        for _ in 0..400 {
            let account = rnd(6) as u32;
            let market = rnd(2) as u16;
            let from = (rnd(3) == 0).then(|| rnd(id + 10));
            let start = (rnd(2) == 0).then(|| 95 + rnd(time - 90));
            let end = (rnd(2) == 0).then(|| 95 + rnd(time - 90));
            let limit = 1 + rnd(40) as u32;
            let below = end.map(|e| first_at(e + 1).unwrap_or(u64::MAX));
            let mut want: Vec<OrderRec> = all
                .iter()
                .filter(|o| {
                    o.account == account
                        && o.market == market
                        && from.is_none_or(|f| o.id >= f)
                        && start.is_none_or(|s| o.time_ms >= s)
                        && end.is_none_or(|e| o.time_ms <= e)
                        && below.is_none_or(|b| o.id < b)
                })
                .cloned()
                .collect();
            if from.is_some() {
                want.truncate(limit as usize);
            } else {
                want = want.split_off(want.len().saturating_sub(limit as usize));
            }
            let got = store
                .orders(account, market, from, start, end, limit)
                .unwrap();
            assert_eq!(
                got, want,
                "account {account} market {market} from {from:?} start {start:?} end {end:?} limit {limit}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A counter of SQLite's virtual-machine steps (in hundreds) on the connection `store`
    /// hands out next: steps do not depend on timing.
    fn count_steps(store: &Store) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        let steps = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = store.connect().unwrap();
        let s = steps.clone();
        counted.progress_handler(
            100,
            Some(move || {
                s.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                false
            }),
        );
        store.pool.lock().unwrap().push(counted);
        steps
    }

    /// Defect: `myTrades` with a time bound looked up the smallest and largest trade ids with
    /// `SELECT min(trade_id), max(trade_id)`, which SQLite answers by reading the whole table
    /// (each alone is read from the end of the key): every such request read every trade of
    /// every account.
    #[test]
    fn trades_in_a_time_window_are_found_without_reading_the_table() {
        let (dir, store) = temp_store("trades-window");
        let rows: Vec<TradeRec> = (1..=20_000u64)
            .map(|i| TradeRec {
                id: i,
                time_ms: 1_000 + i,
                ..sample_trade()
            })
            .collect();
        let mut conn = store.connect().unwrap();
        Store::write_history(&mut conn, std::iter::empty(), &rows, 1).unwrap();
        let steps = count_steps(&store);
        let got = store
            .trades(3, 0, None, Some(1_091), Some(1_100), 100)
            .unwrap();
        let ids: Vec<u64> = got.iter().map(|t| t.id).collect();
        assert_eq!(ids, (91..=100).collect::<Vec<u64>>());
        let hundreds = steps.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            hundreds < 100,
            "{hundreds} hundred SQLite steps to find 10 trades"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Defect: a client's `fromId`, `orderId` (as `allOrders`' start), `startTime` or `endTime`
    /// of 2^63 or more was bound bit for bit as a negative i64, so `myTrades`, `allOrders` and
    /// `historicalTrades` read everything from the start (ids, start times) or nothing (end
    /// times). Such a bound is the largest one now: nothing from it, everything up to it.
    #[test]
    fn history_bounds_beyond_i64_are_the_largest_not_negative() {
        let (dir, store) = temp_store("bounds");
        let order = sample_order(Side::Sell, "c");
        let trade = sample_trade();
        let mut conn = store.connect().unwrap();
        Store::write_history(&mut conn, [&order], std::slice::from_ref(&trade), 1).unwrap();
        let huge = [1u64 << 63, u64::MAX - 1, u64::MAX];
        for big in huge {
            assert_eq!(
                store.trades(3, 0, Some(big), None, None, 10).unwrap(),
                vec![],
                "fromId {big}"
            );
            assert_eq!(
                store.trades(3, 0, None, Some(big), None, 10).unwrap(),
                vec![],
                "startTime {big}"
            );
            assert_eq!(
                store.trades(3, 0, None, None, Some(big), 10).unwrap(),
                vec![trade.clone()],
                "endTime {big}"
            );
            assert_eq!(
                store.orders(3, 0, Some(big), None, None, 10).unwrap(),
                vec![],
                "orderId {big}"
            );
            assert_eq!(
                store.orders(3, 0, None, Some(big), None, 10).unwrap(),
                vec![],
                "startTime {big}"
            );
            assert_eq!(
                store.orders(3, 0, None, None, Some(big), 10).unwrap(),
                vec![order.clone()],
                "endTime {big}"
            );
            assert_eq!(
                store.market_trades_from(0, big, 10).unwrap(),
                vec![],
                "fromId {big}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
