//! SQLite persistence: API keys, order history and trade history, so that a restart keeps them.
//! History records are postcard bytes (a quarter of the JSON size); the indexed columns beside
//! them serve the queries.
//!
//! **Orders are written in chunks** (`order_chunks`): each write groups the orders it places for
//! the first time by account and market, at most [`CHUNK_RECORDS`] to a row, ids ascending. An
//! order's later versions (a fill or cancel in a later write, a replay) go to `order_updates`,
//! one row per order, which a reader prefers over the chunk's version. An order is new to a
//! write when its id is above every id in a chunk (`meta.order_max_id`: the engine gives ids in
//! order), so the chunks of one account and market never overlap and are read in id order.
//! Each order also gets an `order_clients` entry for look-ups by client id.
//!
//! **Trades are written in chunks too** (`trade_chunks`), three times: the market's (under
//! account [`MARKET`]), the maker's and the taker's (once for a trade of an account with
//! itself), each read in id order. A trade never changes, so one at or below
//! `meta.trade_max_id` is skipped (a replay writes it again).
//!
//! One row per ~128 records instead of a row and two index entries per record: SQLite's
//! per-row cost (a B-tree descent, a record, a page change) was most of the history thread's
//! CPU (6.1 µs per order in a scratch benchmark, 2.9 µs of it the two per-order indexes and
//! 1.0 the trades'). A database written by an earlier version (one `orders` and one `trades`
//! row per record) is converted when it is opened ([`Store::open`]).
//!
//! Durability: history rows are written by the read-model applier in one transaction per group of
//! event batches (WAL, `synchronous=NORMAL`); the engine's journal is the source of truth and a
//! replay writes the same records again (as updates of its orders; its trades are skipped). API keys are written with `synchronous=FULL` semantics by
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
    /// Permission bits ([`crate::keys::Perms`]).
    pub perms: u32,
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

/// Records (orders, trades) per chunk row at most: a look-up of an order by id decodes at most
/// this many.
pub const CHUNK_RECORDS: usize = 128;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS api_keys(
  api_key TEXT PRIMARY KEY, account INTEGER NOT NULL, perms INTEGER NOT NULL,
  label TEXT NOT NULL, created_ms INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS order_chunks(
  chunk INTEGER PRIMARY KEY, account INTEGER NOT NULL, market INTEGER NOT NULL,
  first_id INTEGER NOT NULL, last_id INTEGER NOT NULL, last_ms INTEGER NOT NULL,
  data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS order_chunks_by_account ON order_chunks(account, market, first_id);
CREATE TABLE IF NOT EXISTS order_markets(
  account INTEGER NOT NULL, market INTEGER NOT NULL, PRIMARY KEY(account, market)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS order_updates(
  order_id INTEGER PRIMARY KEY, account INTEGER NOT NULL, market INTEGER NOT NULL,
  data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS order_updates_by_account ON order_updates(account, market, order_id);
CREATE TABLE IF NOT EXISTS order_clients(
  account INTEGER NOT NULL, client_id TEXT NOT NULL, order_id INTEGER NOT NULL,
  PRIMARY KEY(account, client_id, order_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS trade_chunks(
  chunk INTEGER PRIMARY KEY, account INTEGER NOT NULL, market INTEGER NOT NULL,
  first_id INTEGER NOT NULL, last_id INTEGER NOT NULL, last_ms INTEGER NOT NULL,
  data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS trade_chunks_by_account ON trade_chunks(account, market, first_id);
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
        let mut c = open_conn(path)?;
        c.execute_batch(SCHEMA)?;
        convert_rows(&mut c)?;
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

    /// Writes orders (new ones in chunks, later versions as updates: see the module docs),
    /// trades and the engine sequence number they reach, in one transaction (idempotent: a
    /// replay writes updates and the same trades again). `ON CONFLICT .. DO UPDATE`, not `INSERT OR
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
        write_orders(&tx, orders, &mut count)?;
        write_trades(&tx, trades, &mut count)?;
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

    /// One order of an account by id (its latest version).
    pub fn order(&self, account: u32, id: u64) -> Result<Option<OrderRec>, StoreError> {
        self.with(|c| order_in(c, account, id))
    }

    /// The latest order of an account with this client id.
    pub fn order_by_client(
        &self,
        account: u32,
        market: Option<u16>,
        client: &str,
    ) -> Result<Option<OrderRec>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT order_id FROM order_clients WHERE account = ?1 AND client_id = ?2 \
                 ORDER BY order_id DESC",
            )?;
            let mut ids = st.query(params![account, client])?;
            // The entry names the client id an order had when it was written; its latest
            // version is the one that counts.
            while let Some(r) = ids.next()? {
                let id = r.get::<_, i64>(0)? as u64;
                if let Some(o) = order_in(c, account, id)? {
                    if o.client_id == client && market.is_none_or(|m| o.market == m) {
                        return Ok(Some(o));
                    }
                }
            }
            Ok(None)
        })
    }

    /// Orders of an account in a market: ids from `from_id` (or the latest `limit` ones), time
    /// range (creation time), oldest first. The time bounds become id bounds first
    /// ([`id_at_or_after`]), so an `endTime` in the past does not read the account's
    /// newer orders; then the account's chunks in that range are read in id order, merged with
    /// the later versions in `order_updates`, until `limit` orders are found.
    pub fn orders(
        &self,
        account: u32,
        market: u16,
        from_id: Option<u64>,
        start_ms: Option<u64>,
        end_ms: Option<u64>,
        limit: u32,
    ) -> Result<Vec<OrderRec>, StoreError> {
        let asc = from_id.is_some();
        let mut v = self.with(|c| {
            let key = i64::from(account);
            let Some((lo, hi)) =
                id_bounds(c, Table::Orders, key, market, from_id, start_ms, end_ms)?
            else {
                return Ok(Vec::new());
            };
            let keep = |o: &OrderRec| {
                start_ms.is_none_or(|s| o.time_ms >= s) && end_ms.is_none_or(|e| o.time_ms <= e)
            };
            let mut chunks =
                ChunkWalk::<OrderRec>::new(c, Table::Orders, key, market, lo, hi, asc)?;
            let mut ups = c.prepare_cached(if asc {
                "SELECT order_id, data FROM order_updates WHERE account = ?1 AND market = ?2 \
                 AND order_id >= ?3 AND order_id <= ?4 ORDER BY order_id ASC"
            } else {
                "SELECT order_id, data FROM order_updates WHERE account = ?1 AND market = ?2 \
                 AND order_id >= ?3 AND order_id <= ?4 ORDER BY order_id DESC"
            })?;
            let mut ups = ups.query(params![account, market, lo, hi])?;
            let mut next_up = || -> rusqlite::Result<Option<OrderRec>> {
                while let Some(r) = ups.next()? {
                    if let Some(o) = decode_order(r.get_ref(1)?.as_blob()?) {
                        return Ok(Some(o));
                    }
                }
                Ok(None)
            };
            let mut out = Vec::new();
            let mut up = next_up()?;
            let mut chunk = chunks.next()?;
            let first = |a: u64, b: u64| if asc { a < b } else { a > b };
            while out.len() < limit as usize {
                // The next order in id order of either stream; a later version (an update)
                // wins over its chunk's.
                let o = match (chunk.take(), up.take()) {
                    (None, None) => break,
                    (Some(a), None) => {
                        chunk = chunks.next()?;
                        a
                    }
                    (None, Some(b)) => {
                        up = next_up()?;
                        b
                    }
                    (Some(a), Some(b)) => {
                        if a.id == b.id {
                            chunk = chunks.next()?;
                            up = next_up()?;
                            b
                        } else if first(a.id, b.id) {
                            chunk = chunks.next()?;
                            up = Some(b);
                            a
                        } else {
                            chunk = Some(a);
                            up = next_up()?;
                            b
                        }
                    }
                };
                if keep(&o) {
                    out.push(o);
                }
            }
            Ok(out)
        })?;
        if !asc {
            v.reverse();
        }
        Ok(v)
    }

    /// The latest `limit` trades of a market, oldest first.
    pub fn recent_trades(&self, market: u16, limit: u32) -> Result<Vec<TradeRec>, StoreError> {
        let mut v = self.with(|c| {
            take_walk(
                ChunkWalk::<TradeRec>::new(c, Table::Trades, MARKET, market, 0, i64::MAX, false)?,
                limit,
                |_| true,
            )
        })?;
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
        self.with(|c| {
            let walk = ChunkWalk::<TradeRec>::new(
                c,
                Table::Trades,
                MARKET,
                market,
                bound(from_id),
                i64::MAX,
                true,
            )?;
            take_walk(walk, limit, |_| true)
        })
    }

    /// The id of the first trade of a market at `ms` or later (`None`: none that late), found
    /// by [`id_at_or_after`] over the market's chunks.
    pub fn market_trade_at_or_after(
        &self,
        market: u16,
        ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        self.with(|c| {
            Ok(
                id_at_or_after::<TradeRec>(c, Table::Trades, MARKET, market, ms)?
                    .and_then(|id| u64::try_from(id).ok()),
            )
        })
    }

    /// Trades of an account in a market, oldest first: ids from `from_id` (ascending from
    /// there), or the latest `limit` ones; `start_ms..=end_ms` bounds their time. The
    /// account's own chunks (a trade is in its maker's and its taker's, once for a trade of
    /// the account with itself), read in id order. The time bounds become id bounds first
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
        let asc = from_id.is_some();
        let mut v = self.with(|c| {
            let key = i64::from(account);
            let Some((lo, hi)) =
                id_bounds(c, Table::Trades, key, market, from_id, start_ms, end_ms)?
            else {
                return Ok(Vec::new());
            };
            let walk = ChunkWalk::<TradeRec>::new(c, Table::Trades, key, market, lo, hi, asc)?;
            take_walk(walk, limit, |t| {
                start_ms.is_none_or(|s| t.time_ms >= s) && end_ms.is_none_or(|e| t.time_ms <= e)
            })
        })?;
        if !asc {
            v.reverse();
        }
        Ok(v)
    }
}

/// A record kept in chunks: its id (ascending within a chunk) and time.
trait Chunked: serde::Serialize + serde::de::DeserializeOwned {
    fn id(&self) -> u64;
    fn time_ms(&self) -> u64;
}

impl Chunked for OrderRec {
    fn id(&self) -> u64 {
        self.id
    }
    /// The creation time.
    fn time_ms(&self) -> u64 {
        self.time_ms
    }
}

impl Chunked for TradeRec {
    fn id(&self) -> u64 {
        self.id
    }
    fn time_ms(&self) -> u64 {
        self.time_ms
    }
}

/// One record's postcard bytes: as this version writes them, or as an earlier one did before
/// a last `Option` field was added (its `None` is one zero byte, missing there). The frames
/// of a chunk keep each record's bytes apart, so that this works within a chunk too.
fn decode<T: Chunked>(bytes: &[u8]) -> Option<T> {
    postcard::from_bytes(bytes).ok().or_else(|| {
        let mut v = bytes.to_vec();
        v.push(0);
        postcard::from_bytes(&v).ok()
    })
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn take_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    let mut shift = 0u32;
    loop {
        let (&x, rest) = b.split_first()?;
        *b = rest;
        if shift > 63 {
            return None;
        }
        v |= u64::from(x & 0x7f) << shift;
        if x & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
    }
}

/// Appends `rec` to a chunk's data as one frame: its id and length (LEB128 varints), then its
/// postcard bytes. The id lets a look-up skip to its record without decoding the others; the
/// length keeps records apart when a later version adds a field.
fn put_frame<T: Chunked>(data: &mut Vec<u8>, one: &mut Vec<u8>, rec: &T) -> rusqlite::Result<()> {
    one.clear();
    *one = encode(rec, std::mem::take(one))?;
    put_varint(data, rec.id());
    put_varint(data, one.len() as u64);
    data.extend_from_slice(one);
    Ok(())
}

/// The frames of a chunk's data, `(id, bytes)`, ids ascending (a malformed frame ends them).
fn frames(data: &[u8]) -> impl Iterator<Item = (u64, &[u8])> + '_ {
    let mut rest = data;
    std::iter::from_fn(move || {
        let mut take = || {
            let id = take_varint(&mut rest)?;
            let len = usize::try_from(take_varint(&mut rest)?).ok()?;
            let b = rest.get(..len)?;
            rest = &rest[len..];
            Some((id, b))
        };
        let f = take();
        if f.is_none() {
            rest = &[];
        }
        f
    })
}

/// The records of a chunk row, ids ascending (one that does not decode is left out).
fn records<T: Chunked>(data: &[u8]) -> impl Iterator<Item = T> + '_ {
    frames(data).filter_map(|(_, b)| decode(b))
}

/// The chunk tables, both keyed by `(account, market, first_id)`.
#[derive(Clone, Copy)]
enum Table {
    /// `order_chunks`: an account's orders in a market.
    Orders,
    /// `trade_chunks`: an account's trades in a market (as maker or taker), and under
    /// [`MARKET`] the market's.
    Trades,
}

/// The `account` of a market's own trade chunks.
const MARKET: i64 = -1;

impl Table {
    /// The statement `sql` with `{t}` naming this table (SQL cannot bind a table's name).
    fn sql(self, sql: &str) -> String {
        sql.replace(
            "{t}",
            match self {
                Table::Orders => "order_chunks",
                Table::Trades => "trade_chunks",
            },
        )
    }
}

/// The first id of `key`'s records in `market` whose time is known and `ms` or later (`None`:
/// none that late), by a binary search over the chunks' `first_id`s. A chunk's `last_ms` is
/// the latest known time of its records; a record's time never decreases with its id (the
/// engine's clock never goes back; replays use the journaled times), so the chunks whose
/// `last_ms` reaches `ms` come after those whose does not. An open order rebuilt after a
/// history gap has no known time (0) and is skipped: it is placed in time by its id. The
/// search finds the chunk in O(log n) look-ups of `first_id`, and the record is looked for in
/// it. (The smallest and largest `first_id` are two subqueries: SQLite reads `min(x), max(x)`
/// in one `SELECT` by scanning.)
fn id_at_or_after<T: Chunked>(
    c: &Connection,
    table: Table,
    key: i64,
    market: u16,
    ms: u64,
) -> rusqlite::Result<Option<i64>> {
    let (lo, hi): (Option<i64>, Option<i64>) = c
        .prepare_cached(&table.sql(
            "SELECT (SELECT min(first_id) FROM {t} WHERE account = ?1 AND market = ?2), \
             (SELECT max(first_id) FROM {t} WHERE account = ?1 AND market = ?2)",
        ))?
        .query_row(params![key, market], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let (Some(mut lo), Some(mut hi)) = (lo, hi) else {
        return Ok(None);
    };
    let mut next = c.prepare_cached(&table.sql(
        "SELECT first_id, last_ms FROM {t} WHERE account = ?1 AND market = ?2 \
         AND first_id >= ?3 AND last_ms > 0 ORDER BY first_id LIMIT 1",
    ))?;
    let mut found = None;
    // Checked steps: ids come from the database (a corrupt one must not loop or panic here).
    while lo <= hi {
        // In i128: `hi - lo` may not fit an i64.
        let mid = i64::try_from((i128::from(lo) + i128::from(hi)) / 2).unwrap_or(lo);
        let probe = next
            .query_row(params![key, market, mid], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })
            .optional()?;
        match probe {
            // The answer is in this chunk or one below `mid` (none starts in `mid..first`).
            Some((first, last_ms)) if last_ms as u64 >= ms => {
                found = Some(first);
                let Some(h) = mid.checked_sub(1) else { break };
                hi = h;
            }
            Some((first, _)) => {
                let Some(l) = first.checked_add(1) else { break };
                lo = l;
            }
            // No chunk of known time from `mid` on: the answer, if any, lies below.
            None => {
                let Some(h) = mid.checked_sub(1) else { break };
                hi = h;
            }
        }
    }
    let Some(first) = found else {
        return Ok(None);
    };
    let data: Vec<u8> = c
        .prepare_cached(
            &table.sql("SELECT data FROM {t} WHERE account = ?1 AND market = ?2 AND first_id = ?3"),
        )?
        .query_row(params![key, market, first], |r| r.get(0))?;
    let id = records::<T>(&data)
        .find(|o| o.time_ms() != 0 && o.time_ms() >= ms)
        .map(|o| to_sql(o.id()));
    Ok(id)
}

/// The id bounds `[lo, hi]` of `key`'s records in `market` from `from_id` within the time
/// bounds (`None`: none can match).
fn id_bounds(
    c: &Connection,
    table: Table,
    key: i64,
    market: u16,
    from_id: Option<u64>,
    start_ms: Option<u64>,
    end_ms: Option<u64>,
) -> rusqlite::Result<Option<(i64, i64)>> {
    let at = |ms| match table {
        Table::Orders => id_at_or_after::<OrderRec>(c, table, key, market, ms),
        Table::Trades => id_at_or_after::<TradeRec>(c, table, key, market, ms),
    };
    let mut lo = bound(from_id.unwrap_or(0));
    let mut hi = i64::MAX;
    if let Some(s) = start_ms {
        match at(s)? {
            Some(id) => lo = lo.max(id),
            None => return Ok(None),
        }
    }
    if let Some(e) = end_ms.and_then(|e| e.checked_add(1)) {
        if let Some(id) = at(e)? {
            hi = id.saturating_sub(1);
        }
    }
    Ok((lo <= hi).then_some((lo, hi)))
}

/// The first `limit` records of `walk` that `keep` keeps.
fn take_walk<T: Chunked>(
    mut walk: ChunkWalk<'_, T>,
    limit: u32,
    keep: impl Fn(&T) -> bool,
) -> rusqlite::Result<Vec<T>> {
    let mut out = Vec::new();
    while out.len() < limit as usize {
        match walk.next()? {
            Some(t) if keep(&t) => out.push(t),
            Some(_) => {}
            None => break,
        }
    }
    Ok(out)
}

/// The latest version of order `id` of `account`: its row in `order_updates`, else its
/// version in the chunk that holds it, looked for in each of the account's markets (a seek
/// each).
fn order_in(c: &Connection, account: u32, id: u64) -> rusqlite::Result<Option<OrderRec>> {
    let key = bound(id);
    let updated = c
        .prepare_cached("SELECT data FROM order_updates WHERE order_id = ?1 AND account = ?2")?
        .query_row(params![key, account], |r| r.get::<_, Vec<u8>>(0))
        .optional()?;
    if let Some(bytes) = updated {
        return Ok(decode_order(&bytes));
    }
    let markets: Vec<u16> = c
        .prepare_cached("SELECT market FROM order_markets WHERE account = ?1")?
        .query_map([account], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut chunk = c.prepare_cached(
        "SELECT last_id, data FROM order_chunks WHERE account = ?1 AND market = ?2 \
         AND first_id <= ?3 ORDER BY first_id DESC LIMIT 1",
    )?;
    for m in markets {
        let hit = chunk
            .query_row(params![account, m, key], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .optional()?;
        if let Some((_, data)) = hit.filter(|(last, _)| *last >= key) {
            // The chunks of an account's markets overlap in ids: it may be in another's.
            let found = frames(&data)
                .take_while(|(i, _)| *i <= id)
                .find(|(i, _)| *i == id);
            if let Some((_, b)) = found {
                return Ok(decode(b));
            }
        }
    }
    Ok(None)
}

/// The records of `key`'s chunks in one market with ids in `lo..=hi`, in id order (descending
/// unless `asc`), read a chunk at a time: the chunks of one key and market never overlap, so
/// each next one is one look-up of the chunk table's index.
struct ChunkWalk<'c, T> {
    c: &'c Connection,
    table: Table,
    key: i64,
    market: u16,
    lo: i64,
    hi: i64,
    asc: bool,
    /// The `first_id` of the chunk read last (ascending: before the first, the key below it).
    at: Option<i64>,
    buf: std::collections::VecDeque<T>,
    done: bool,
}

impl<'c, T: Chunked> ChunkWalk<'c, T> {
    fn new(
        c: &'c Connection,
        table: Table,
        key: i64,
        market: u16,
        lo: i64,
        hi: i64,
        asc: bool,
    ) -> rusqlite::Result<Self> {
        let mut at = None;
        if asc {
            // The chunk holding `lo` starts at or below it; the walk starts there.
            let holding = c
                .prepare_cached(&table.sql(
                    "SELECT first_id, last_id FROM {t} WHERE account = ?1 AND market = ?2 \
                     AND first_id <= ?3 ORDER BY first_id DESC LIMIT 1",
                ))?
                .query_row(params![key, market, lo], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })
                .optional()?;
            at = Some(match holding {
                Some((first, last)) if last >= lo => first.saturating_sub(1),
                _ => lo,
            });
        }
        Ok(Self {
            c,
            table,
            key,
            market,
            lo,
            hi,
            asc,
            at,
            buf: std::collections::VecDeque::new(),
            done: false,
        })
    }

    fn next(&mut self) -> rusqlite::Result<Option<T>> {
        loop {
            if let Some(o) = self.buf.pop_front() {
                return Ok(Some(o));
            }
            if self.done {
                return Ok(None);
            }
            self.fill()?;
        }
    }

    /// Reads the next chunk into `buf` (or ends the walk).
    fn fill(&mut self) -> rusqlite::Result<()> {
        let get = |r: &rusqlite::Row<'_>| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        };
        let row = if self.asc {
            self.c
                .prepare_cached(&self.table.sql(
                    "SELECT first_id, last_id, data FROM {t} WHERE account = ?1 AND market = ?2 \
                     AND first_id > ?3 AND first_id <= ?4 ORDER BY first_id ASC LIMIT 1",
                ))?
                .query_row(
                    params![self.key, self.market, self.at.unwrap_or(self.lo), self.hi],
                    get,
                )
                .optional()?
        } else {
            self.c
                .prepare_cached(&self.table.sql(
                    "SELECT first_id, last_id, data FROM {t} WHERE account = ?1 AND market = ?2 \
                     AND first_id <= ?3 ORDER BY first_id DESC LIMIT 1",
                ))?
                .query_row(
                    params![
                        self.key,
                        self.market,
                        self.at.map_or(self.hi, |k| k.saturating_sub(1))
                    ],
                    get,
                )
                .optional()?
        };
        let Some((first, last, data)) = row else {
            self.done = true;
            return Ok(());
        };
        self.at = Some(first);
        if !self.asc && last < self.lo {
            self.done = true;
            return Ok(());
        }
        let (lo, hi) = (self.lo, self.hi);
        let within = frames(&data)
            .filter(|(id, _)| (lo..=hi).contains(&to_sql(*id)))
            .filter_map(|(_, b)| decode::<T>(b));
        if self.asc {
            self.buf.extend(within);
        } else {
            let mut v: Vec<T> = within.collect();
            v.reverse();
            self.buf.extend(v);
        }
        Ok(())
    }
}

/// Writes orders: versions of orders already in a chunk to `order_updates`, new ones in chunks
/// (see the module docs). Repeated ids keep their last version.
fn write_orders<'a>(
    tx: &Connection,
    orders: impl IntoIterator<Item = &'a OrderRec>,
    count: &mut dyn FnMut(),
) -> rusqlite::Result<()> {
    let mut rows: Vec<&OrderRec> = orders.into_iter().collect();
    if rows.is_empty() {
        return Ok(());
    }
    // Stable, so that of a repeated id the last version is kept.
    rows.sort_by_key(|o| o.id);
    rows.reverse();
    rows.dedup_by_key(|o| o.id);
    rows.reverse();
    let max = max_id(tx, "order_max_id")?;
    let (updates, new) = rows.split_at(rows.partition_point(|o| max.is_some_and(|m| o.id <= m)));
    let mut st = Stmts::new(tx)?;
    let mut data = Vec::with_capacity(256);
    for o in updates {
        upsert_order(&mut st, o, &mut data)?;
        count();
    }
    let Some(last) = new.last() else {
        return Ok(());
    };
    let last = last.id;
    let mut new = new.to_vec();
    // Stable: ids stay ascending within an account and market.
    new.sort_by_key(|o| (o.account, o.market));
    for group in new.chunk_by(|a, b| (a.account, a.market) == (b.account, b.market)) {
        for part in group.chunks(CHUNK_RECORDS) {
            insert_order_chunk(&mut st, part, &mut data)?;
            for _ in part {
                count();
            }
        }
    }
    set_max_id(tx, "order_max_id", last)
}

/// A history write's statements, prepared once per write: `prepare_cached` per row hashed its
/// SQL and moved the statement out of the cache and back each time (for a write of one record
/// per account, about a statement per record).
struct Stmts<'t> {
    order_chunk: rusqlite::CachedStatement<'t>,
    trade_chunk: rusqlite::CachedStatement<'t>,
    client: rusqlite::CachedStatement<'t>,
    market: rusqlite::CachedStatement<'t>,
    upsert: rusqlite::CachedStatement<'t>,
}

impl<'t> Stmts<'t> {
    fn new(tx: &'t Connection) -> rusqlite::Result<Self> {
        let chunk = |table: Table| {
            tx.prepare_cached(&table.sql(
                "INSERT INTO {t}(account, market, first_id, last_id, last_ms, data) \
                 VALUES (?1,?2,?3,?4,?5,?6)",
            ))
        };
        Ok(Self {
            order_chunk: chunk(Table::Orders)?,
            trade_chunk: chunk(Table::Trades)?,
            client: tx.prepare_cached(
                "INSERT OR IGNORE INTO order_clients(account, client_id, order_id) \
                 VALUES (?1,?2,?3)",
            )?,
            market: tx.prepare_cached(
                "INSERT OR IGNORE INTO order_markets(account, market) VALUES (?1,?2)",
            )?,
            // An order's account and market never change (its id is the engine's, given when
            // it is placed), so an update leaves them out: SQLite rewrites the entries of every
            // index over a column the `SET` names.
            upsert: tx.prepare_cached(
                "INSERT INTO order_updates(order_id, account, market, data) VALUES (?1,?2,?3,?4) \
                 ON CONFLICT(order_id) DO UPDATE SET data = excluded.data",
            )?,
        })
    }
}

/// Writes a later version of an order already in a chunk (or of one first written after a
/// higher id: an order of a history gap) to `order_updates`.
fn upsert_order(st: &mut Stmts<'_>, o: &OrderRec, data: &mut Vec<u8>) -> rusqlite::Result<()> {
    data.clear();
    *data = encode(o, std::mem::take(data))?;
    st.upsert
        .execute(params![to_sql(o.id), o.account, o.market, &data[..]])?;
    // The client id is written again: the entry a look-up starts from (the engine keeps one
    // per order today, and an order of a history gap has no chunk).
    st.client
        .execute(params![o.account, o.client_id, to_sql(o.id)])?;
    Ok(())
}

/// One record's postcard bytes appended to `buf`.
fn encode<T: serde::Serialize>(v: &T, buf: Vec<u8>) -> rusqlite::Result<Vec<u8>> {
    postcard::to_extend(v, buf).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// Writes `part` (records of one key and market, ids ascending) as one chunk row of `table`.
fn insert_chunk<T: Chunked>(
    st: &mut Stmts<'_>,
    table: Table,
    key: i64,
    market: u16,
    part: &[&T],
    data: &mut Vec<u8>,
) -> rusqlite::Result<()> {
    let (Some(first), Some(last)) = (part.first(), part.last()) else {
        return Ok(());
    };
    data.clear();
    let mut one = Vec::with_capacity(128);
    for o in part {
        put_frame(data, &mut one, *o)?;
    }
    let last_ms = part.iter().map(|o| o.time_ms()).max().unwrap_or(0);
    insert_frames(
        st,
        table,
        key,
        market,
        (first.id(), last.id(), last_ms),
        data,
    )
}

/// Inserts one chunk row of `table` whose `data` (frames, ids ascending) spans `ids_ms`:
/// its first and last id and its latest known time.
fn insert_frames(
    st: &mut Stmts<'_>,
    table: Table,
    key: i64,
    market: u16,
    (first, last, last_ms): (u64, u64, u64),
    data: &[u8],
) -> rusqlite::Result<()> {
    let ins = match table {
        Table::Orders => &mut st.order_chunk,
        Table::Trades => &mut st.trade_chunk,
    };
    ins.execute(params![
        key,
        market,
        to_sql(first),
        to_sql(last),
        to_sql(last_ms),
        data
    ])?;
    Ok(())
}

/// Writes `part` (orders of one account and market, ids ascending) as one chunk row, with its
/// client ids and its market in the account's list.
fn insert_order_chunk(
    st: &mut Stmts<'_>,
    part: &[&OrderRec],
    data: &mut Vec<u8>,
) -> rusqlite::Result<()> {
    let Some(first) = part.first() else {
        return Ok(());
    };
    let (account, market) = (first.account, first.market);
    insert_chunk(st, Table::Orders, i64::from(account), market, part, data)?;
    for o in part {
        st.client
            .execute(params![o.account, o.client_id, to_sql(o.id)])?;
    }
    st.market.execute(params![account, market])?;
    Ok(())
}

/// The largest id in `name`'s chunks (`meta`), if any.
fn max_id(tx: &Connection, name: &str) -> rusqlite::Result<Option<u64>> {
    Ok(tx
        .prepare_cached("SELECT value FROM meta WHERE name = ?1")?
        .query_row([name], |r| r.get::<_, i64>(0))
        .optional()?
        .map(|v| v as u64))
}

fn set_max_id(tx: &Connection, name: &str, id: u64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO meta(name, value) VALUES (?1, ?2) \
         ON CONFLICT(name) DO UPDATE SET value = max(value, excluded.value)",
    )?
    .execute(params![name, to_sql(id)])?;
    Ok(())
}

/// Writes the trades not yet stored (a trade never changes: one at or below
/// `meta.trade_max_id` is in its chunks already, written again only by a replay) in chunks:
/// the market's, the maker's and the taker's (one for a trade of an account with itself).
fn write_trades(
    tx: &Connection,
    trades: &[TradeRec],
    count: &mut dyn FnMut(),
) -> rusqlite::Result<()> {
    let max = max_id(tx, "trade_max_id")?;
    let mut new: Vec<&TradeRec> = trades
        .iter()
        .filter(|t| max.is_none_or(|m| t.id > m))
        .collect();
    new.sort_by_key(|t| t.id);
    new.dedup_by_key(|t| t.id);
    let Some(last) = new.last().map(|t| t.id) else {
        return Ok(());
    };
    // Each trade's frame, encoded once for its three copies.
    let mut enc = Vec::with_capacity(new.len() * 64);
    let mut spans = Vec::with_capacity(new.len());
    let mut one = Vec::with_capacity(128);
    for t in &new {
        let at = enc.len();
        put_frame(&mut enc, &mut one, *t)?;
        spans.push(at..enc.len());
    }
    // (key, market, index) of each copy; stable sort: ids stay ascending within a key and
    // market.
    let mut copies: Vec<(i64, u16, usize)> = Vec::with_capacity(new.len() * 3);
    for (i, t) in new.iter().enumerate() {
        copies.push((MARKET, t.market, i));
        copies.push((i64::from(t.maker_account), t.market, i));
        if t.taker_account != t.maker_account {
            copies.push((i64::from(t.taker_account), t.market, i));
        }
    }
    copies.sort_by_key(|&(k, m, _)| (k, m));
    let mut st = Stmts::new(tx)?;
    let mut data = Vec::with_capacity(CHUNK_RECORDS * 64);
    for group in copies.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        let (key, market) = (group[0].0, group[0].1);
        for c in group.chunks(CHUNK_RECORDS) {
            data.clear();
            for &(_, _, i) in c {
                data.extend_from_slice(&enc[spans[i].clone()]);
            }
            let (first, last) = (new[c[0].2], new[c[c.len() - 1].2]);
            let last_ms = c.iter().map(|&(_, _, i)| new[i].time_ms).max().unwrap_or(0);
            insert_frames(
                &mut st,
                Table::Trades,
                key,
                market,
                (first.id, last.id, last_ms),
                &data,
            )?;
            // Each trade counted once, with its market's copy.
            if key == MARKET {
                for _ in c {
                    count();
                }
            }
        }
    }
    set_max_id(tx, "trade_max_id", last)
}

/// Records of one key and market gathered into chunks as they come in key order, one chunk
/// pending at a time ([`convert_rows`]).
struct Chunker<T> {
    table: Table,
    at: Option<(i64, u16)>,
    pending: Vec<T>,
    data: Vec<u8>,
}

impl<T: Chunked> Chunker<T> {
    fn new(table: Table) -> Self {
        Self {
            table,
            at: None,
            pending: Vec::with_capacity(CHUNK_RECORDS),
            data: Vec::new(),
        }
    }

    fn push(&mut self, st: &mut Stmts<'_>, key: i64, market: u16, rec: T) -> rusqlite::Result<()> {
        if self.at != Some((key, market)) || self.pending.len() == CHUNK_RECORDS {
            self.flush(st)?;
            self.at = Some((key, market));
        }
        self.pending.push(rec);
        Ok(())
    }

    fn flush(&mut self, st: &mut Stmts<'_>) -> rusqlite::Result<()> {
        let Some((key, market)) = self.at else {
            return Ok(());
        };
        let part: Vec<&T> = self.pending.iter().collect();
        insert_chunk(st, self.table, key, market, &part, &mut self.data)?;
        self.pending.clear();
        Ok(())
    }
}

/// Converts the `orders` and `trades` tables of an earlier version (a row and two index
/// entries per record, each order row the order's latest version) into chunks, in one
/// transaction (a stop part way leaves them as they were, to convert at the next start), and
/// drops them.
///
/// - The rows are read in key order (account, market, id), so that one chunk is pending at a
///   time whatever the number of accounts: the orders by their old index, the trades' copies
///   through SQLite's sorter (which spills to temporary files, not memory).
/// - A row that does not decode is kept in `unconverted_rows`, not dropped.
/// - A database that has chunks already (this version ran, then an earlier one, which made and
///   wrote the old tables again) gets the orders the chunks hold as later versions
///   (`order_updates`), and the trades they hold are skipped, so that chunks never overlap.
fn convert_rows(c: &mut Connection) -> rusqlite::Result<()> {
    let old = |c: &Connection, name: &str| -> rusqlite::Result<bool> {
        c.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
    };
    let (orders, trades) = (old(c, "orders")?, old(c, "trades")?);
    if !orders && !trades {
        return Ok(());
    }
    let tx = c.transaction()?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS unconverted_rows(
           kind TEXT NOT NULL, id INTEGER NOT NULL, data BLOB NOT NULL);",
    )?;
    // A record's bytes, whatever the column holds (a corrupt row is kept aside, not an error
    // that would fail every start).
    let bytes_of = |v: rusqlite::types::ValueRef<'_>| -> Vec<u8> {
        match v {
            rusqlite::types::ValueRef::Blob(b) | rusqlite::types::ValueRef::Text(b) => b.to_vec(),
            _ => Vec::new(),
        }
    };
    let keep = |tx: &Connection, kind: &str, id: i64, bytes: &[u8]| {
        tx.execute(
            "INSERT INTO unconverted_rows(kind, id, data) VALUES (?1, ?2, ?3)",
            params![kind, id, bytes],
        )
        .map(drop)
    };
    let (mut read, mut kept) = (0u64, 0u64);
    if orders {
        let chunked = max_id(&tx, "order_max_id")?;
        let mut max = chunked;
        let mut chunker = Chunker::<OrderRec>::new(Table::Orders);
        let mut data = Vec::new();
        let mut stmts = Stmts::new(&tx)?;
        let mut st =
            tx.prepare("SELECT order_id, data FROM orders ORDER BY account, market, order_id")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            read += 1;
            let (id, bytes) = (r.get::<_, i64>(0)?, bytes_of(r.get_ref(1)?));
            let Some(o) = decode_order(&bytes) else {
                keep(&tx, "order", id, &bytes)?;
                kept += 1;
                continue;
            };
            if chunked.is_some_and(|m| o.id <= m) {
                upsert_order(&mut stmts, &o, &mut data)?;
                continue;
            }
            max = max.max(Some(o.id));
            // The chunk's client ids and market, as a history write does.
            stmts
                .client
                .execute(params![o.account, o.client_id, to_sql(o.id)])?;
            stmts.market.execute(params![o.account, o.market])?;
            chunker.push(&mut stmts, i64::from(o.account), o.market, o)?;
        }
        chunker.flush(&mut stmts)?;
        if let Some(m) = max {
            set_max_id(&tx, "order_max_id", m)?;
        }
    }
    if trades {
        let chunked = max_id(&tx, "trade_max_id")?;
        let mut max = chunked;
        // The market's copies (every row: one that does not decode is kept aside here), then
        // the accounts' (a trade of an account with itself once). The key's market is the
        // record's.
        let passes = [
            "SELECT -1, market, trade_id, data FROM trades ORDER BY market, trade_id",
            "SELECT account, market, trade_id, data FROM (
               SELECT maker_account AS account, market, trade_id, data FROM trades
               UNION ALL
               SELECT taker_account, market, trade_id, data FROM trades
               WHERE taker_account <> maker_account)
             WHERE trade_id > ?1 ORDER BY account, market, trade_id",
        ];
        let from = chunked.map_or(-1, to_sql);
        for (pass, sql) in passes.iter().enumerate() {
            let mut chunker = Chunker::<TradeRec>::new(Table::Trades);
            let mut stmts = Stmts::new(&tx)?;
            let mut st = tx.prepare(sql)?;
            let mut rows = if pass == 0 {
                st.query([])?
            } else {
                st.query([from])?
            };
            while let Some(r) = rows.next()? {
                let id = r.get::<_, i64>(2)?;
                let bytes = bytes_of(r.get_ref(3)?);
                if pass == 0 {
                    read += 1;
                }
                let Some(t) = decode::<TradeRec>(&bytes) else {
                    if pass == 0 {
                        keep(&tx, "trade", id, &bytes)?;
                        kept += 1;
                    }
                    continue;
                };
                // Already in the chunks (a return to the version before and back).
                if id <= from {
                    continue;
                }
                let Ok(key) = r.get::<_, i64>(0) else {
                    continue;
                };
                if pass == 0 {
                    max = max.max(Some(t.id));
                }
                let market = t.market;
                chunker.push(&mut stmts, key, market, t)?;
            }
            chunker.flush(&mut stmts)?;
        }
        if let Some(m) = max {
            set_max_id(&tx, "trade_max_id", m)?;
        }
    }
    // Dropping a table drops its indexes. Rows an earlier conversion kept aside stay.
    tx.execute_batch("DROP TABLE IF EXISTS orders; DROP TABLE IF EXISTS trades;")?;
    let any_kept: bool =
        tx.query_row("SELECT EXISTS(SELECT 1 FROM unconverted_rows)", [], |r| {
            r.get(0)
        })?;
    if !any_kept {
        tx.execute_batch("DROP TABLE unconverted_rows")?;
    }
    tx.commit()?;
    if kept > 0 {
        tracing::warn!(
            rows = read,
            undecodable = kept,
            "history: order and trade rows converted into chunks; the undecodable ones are kept \
             in the table unconverted_rows"
        );
    } else {
        tracing::info!(
            rows = read,
            "history: order and trade rows converted into chunks"
        );
    }
    Ok(())
}

/// An order row: written by this version, or before `OrderRec::list_id` existed (its
/// encoding then lacks that last field, an `Option` whose `None` is one zero byte).
fn decode_order(bytes: &[u8]) -> Option<OrderRec> {
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readmodel::OrdStatus;
    use matching_engine::{
        AccountId, ClientOrderId, MarketId, OrderId, OrderInfo, OrderType, Price, Qty, Side,
        StpMode, TimeInForce,
    };
    use std::collections::BTreeMap;

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
    /// Review finding: a chunk's records were concatenated postcard values, so a record
    /// written before a field was added (one byte shorter) made the next record's first byte
    /// read as that field, and every record after the first failed. Each record is a frame
    /// now (its id and length first): records written before `list_id` existed decode in a
    /// chunk as they do alone, and a look-up by id finds its record.
    #[test]
    fn a_chunk_of_records_from_before_a_field_was_added_decodes() {
        let mut data = Vec::new();
        let mut want = Vec::new();
        for i in 1..=200u64 {
            let mut o = sample_order(Side::Buy, &format!("c{i}"));
            o.id = i;
            let mut bytes = postcard::to_allocvec(&o).unwrap();
            assert_eq!(bytes.pop(), Some(0), "the missing field's None");
            put_varint(&mut data, o.id);
            put_varint(&mut data, bytes.len() as u64);
            data.extend_from_slice(&bytes);
            want.push(o);
        }
        assert_eq!(records::<OrderRec>(&data).collect::<Vec<_>>(), want);
        let (_, b) = frames(&data).find(|(id, _)| *id == 150).unwrap();
        assert_eq!(decode::<OrderRec>(b).as_ref(), Some(&want[149]));
        // A cut chunk yields the whole frames before the cut.
        assert_eq!(records::<OrderRec>(&data[..data.len() - 3]).count(), 199);
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
            store.order_by_client(3, None, "second").unwrap(),
            Some(filled.clone())
        );
        assert_eq!(store.order_by_client(3, None, "first").unwrap(), None);
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

    /// `trades` (the account's chunks, time bounds turned into id bounds), `recent_trades` and
    /// `market_trades_from` answer what a plain filter of every trade answers: seeded
    /// histories with self-trades, several markets, runs of equal times and gaps in the ids,
    /// written in ten writes that each repeat the one before's trades (a replay), against many
    /// windows, `fromId`s and limits.
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
        // Ten writes, each with the one before's trades again (as a replay writes them).
        for (i, part) in all.chunks(300).enumerate() {
            let from = i.saturating_sub(1) * 300;
            let upto = ((i + 1) * 300).min(all.len());
            let again: Vec<TradeRec> = all[from..upto].to_vec();
            assert!(again.ends_with(part));
            Store::write_history(&mut conn, std::iter::empty(), &again, i as u64 + 1).unwrap();
        }
        let (first, last) = (all[0].time_ms, all[all.len() - 1].time_ms);
        for market in 0..3u16 {
            let of: Vec<TradeRec> = all.iter().filter(|t| t.market == market).cloned().collect();
            for limit in [1u32, 7, 500, 5_000] {
                let recent = store.recent_trades(market, limit).unwrap();
                assert_eq!(recent[..], of[of.len().saturating_sub(limit as usize)..]);
                let from = rnd(id + 10);
                let want: Vec<TradeRec> = of
                    .iter()
                    .filter(|t| t.id >= from)
                    .take(limit as usize)
                    .cloned()
                    .collect();
                assert_eq!(store.market_trades_from(market, from, limit).unwrap(), want);
            }
        }
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

    /// `allOrders`' query against a plain filter of every order's latest version, over seeded
    /// random orders written in several writes: later writes carry new versions of earlier
    /// orders (fills and cancels: `order_updates`), and some orders are first written only
    /// after a higher id (as an open order rebuilt after a history gap is: no known time, no
    /// chunk). The id bounds found by binary search select exactly the orders of the time
    /// window. One order in twenty has no known time (0), which the search skips: such an order
    /// is within an `endTime` if an order of known time of its account and market at or before
    /// it is (it is placed in time by its id), and never within a `startTime`.
    #[test]
    fn account_orders_match_a_plain_filter_of_every_row() {
        let (dir, store) = temp_store("orders");
        let mut rnd = xorshift(0x2545_f491_4f6c_dd1d);
        let (mut id, mut time) = (0u64, 100u64);
        let mut all: BTreeMap<u64, OrderRec> = BTreeMap::new();
        let mut conn = store.connect().unwrap();
        // Orders first written in a later write than their own.
        let mut held: Vec<u64> = Vec::new();
        for write in 0..12u64 {
            let mut rows = Vec::new();
            for _ in 0..250 {
                id += 1 + rnd(3);
                time += rnd(3);
                let mut o = sample_order(Side::Buy, "c");
                o.id = id;
                o.account = rnd(3) as u32;
                o.market = rnd(2) as u16;
                o.client_id = format!("c{id}");
                o.time_ms = if rnd(20) == 0 { 0 } else { time };
                if o.time_ms == 0 && rnd(2) == 0 {
                    held.push(o.id);
                } else {
                    rows.push(o.clone());
                }
                all.insert(o.id, o);
            }
            // New versions of earlier orders, and the held-back ones of earlier writes.
            for _ in 0..40 {
                let pick = rnd(id) + 1;
                let o = all.range_mut(..=pick).next_back().map(|(_, o)| o);
                if let Some(o) = o.filter(|o| !held.contains(&o.id)) {
                    o.executed += 1;
                    o.status = OrdStatus::PartiallyFilled;
                    o.update_ms = time;
                    rows.push(o.clone());
                }
            }
            if write % 3 == 2 {
                for h in held.drain(..) {
                    rows.push(all[&h].clone());
                }
            }
            Store::write_history(&mut conn, &rows, &[], write + 1).unwrap();
        }
        for h in held.drain(..) {
            all.remove(&h);
        }
        let all: Vec<OrderRec> = all.into_values().collect();
        let updates: i64 = conn
            .query_row("SELECT count(*) FROM order_updates", [], |r| r.get(0))
            .unwrap();
        assert!(updates > 300, "{updates} updated orders");
        // The first id of the account and market whose known time is `ms` or later.
        let first_at = |account: u32, market: u16, ms: u64| {
            all.iter()
                .find(|o| {
                    o.account == account && o.market == market && o.time_ms != 0 && o.time_ms >= ms
                })
                .map(|o| o.id)
        };
        for o in all.iter().step_by(7) {
            assert_eq!(store.order(o.account, o.id).unwrap().as_ref(), Some(o));
            assert_eq!(store.order(o.account + 1, o.id).unwrap(), None);
            assert_eq!(
                store
                    .order_by_client(o.account, None, &o.client_id)
                    .unwrap()
                    .as_ref(),
                Some(o)
            );
        }
        for _ in 0..600 {
            let account = rnd(4) as u32;
            let market = rnd(2) as u16;
            let from = (rnd(3) == 0).then(|| rnd(id + 10));
            let start = (rnd(2) == 0).then(|| 95 + rnd(time - 90));
            let end = (rnd(2) == 0).then(|| 95 + rnd(time - 90));
            let limit = 1 + rnd(300) as u32;
            let below = end.map(|e| first_at(account, market, e + 1).unwrap_or(u64::MAX));
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

    /// The write path's shape (what made the history thread cheaper): orders placed in one
    /// write are one chunk row per [`CHUNK_RECORDS`] orders of an account and market, not one
    /// row each; a later version of one of them is one `order_updates` row; trades are a chunk
    /// row per [`CHUNK_RECORDS`] for the market, the maker and the taker, and a replay's
    /// trades are not written again.
    #[test]
    fn a_write_of_new_orders_makes_a_row_per_chunk_not_per_order() {
        let (dir, store) = temp_store("chunks");
        let rows: Vec<OrderRec> = (1..=1_000u64)
            .map(|i| {
                let mut o = sample_order(Side::Buy, "c");
                o.id = i;
                o.account = (i % 2) as u32;
                o.client_id = format!("c{i}");
                o.time_ms = 1_000 + i;
                o
            })
            .collect();
        let mut conn = store.connect().unwrap();
        Store::write_history(&mut conn, &rows, &[], 1).unwrap();
        let count = |conn: &Connection, table: &str| -> i64 {
            conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        // 500 orders per account: 4 chunks of at most 128 each.
        assert_eq!(count(&conn, "order_chunks"), 8);
        assert_eq!(count(&conn, "order_updates"), 0);
        assert_eq!(count(&conn, "order_clients"), 1_000);
        let mut filled = rows[499].clone();
        filled.status = OrdStatus::Filled;
        Store::write_history(&mut conn, [&filled], &[], 2).unwrap();
        assert_eq!(count(&conn, "order_chunks"), 8);
        assert_eq!(count(&conn, "order_updates"), 1);
        assert_eq!(
            store.order(filled.account, filled.id).unwrap(),
            Some(filled)
        );
        // 300 trades of accounts 3 and 4 in one market: 3 chunks each for the market, the
        // maker and the taker; written again (a replay), nothing more.
        let trades: Vec<TradeRec> = (1..=300u64)
            .map(|i| TradeRec {
                id: i,
                ..sample_trade()
            })
            .collect();
        Store::write_history(&mut conn, std::iter::empty(), &trades, 3).unwrap();
        assert_eq!(count(&conn, "trade_chunks"), 9);
        Store::write_history(&mut conn, std::iter::empty(), &trades, 4).unwrap();
        assert_eq!(count(&conn, "trade_chunks"), 9);
        assert_eq!(
            store.trades(4, 0, Some(0), None, None, 1_000).unwrap(),
            trades
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The history tables of the version before chunks.
    const OLD_TABLES: &str = "
        CREATE TABLE IF NOT EXISTS orders(
          order_id INTEGER PRIMARY KEY, account INTEGER NOT NULL, market INTEGER NOT NULL,
          client_id TEXT NOT NULL, time_ms INTEGER NOT NULL, data BLOB NOT NULL);
        CREATE INDEX IF NOT EXISTS orders_by_account ON orders(account, market, order_id);
        CREATE INDEX IF NOT EXISTS orders_by_client ON orders(account, client_id);
        CREATE TABLE IF NOT EXISTS trades(
          trade_id INTEGER PRIMARY KEY, market INTEGER NOT NULL,
          maker_account INTEGER NOT NULL, taker_account INTEGER NOT NULL,
          time_ms INTEGER NOT NULL, data BLOB NOT NULL);
        CREATE INDEX IF NOT EXISTS trades_by_maker ON trades(maker_account, market, trade_id);
        CREATE INDEX IF NOT EXISTS trades_by_taker ON trades(taker_account, market, trade_id);";

    /// Order `o`'s row in the version before chunks, its record `data`.
    fn old_order_row(c: &Connection, o: &OrderRec, data: &[u8]) {
        c.execute(
            "INSERT INTO orders VALUES (?1,?2,?3,?4,?5,?6)",
            params![
                to_sql(o.id),
                o.account,
                o.market,
                o.client_id,
                to_sql(o.time_ms),
                data
            ],
        )
        .unwrap();
    }

    /// Trade `t`'s row in the version before chunks.
    fn old_trade_row(c: &Connection, t: &TradeRec) {
        c.execute(
            "INSERT INTO trades VALUES (?1,?2,?3,?4,?5,?6)",
            params![
                to_sql(t.id),
                t.market,
                t.maker_account,
                t.taker_account,
                to_sql(t.time_ms),
                postcard::to_allocvec(t).unwrap()
            ],
        )
        .unwrap();
    }

    /// A database written by the version before chunks (one `orders` and one `trades` row per
    /// record, two indexes each) is converted when it is opened: every order reads as it did,
    /// by id, by client id and in the account's list, every trade in its accounts' and its
    /// market's lists, the old tables are gone, a row that does not decode is kept aside, and
    /// writes go on from there (an order of the old rows written again is an update, a new one
    /// goes into a chunk). Review finding: after a return to the version before and back, the
    /// old tables' rows of orders and trades already in chunks made overlapping chunks; now
    /// such an order's row is its later version and such a trade is skipped.
    #[test]
    fn an_order_table_of_the_version_before_chunks_is_converted_on_open() {
        let dir = std::env::temp_dir().join(format!(
            "mediator-store-convert-{}-{}",
            std::process::id(),
            crate::core::wall_clock_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sqlite");
        // Trades of accounts 0-3, some of an account with itself.
        let trades: Vec<TradeRec> = (1..=200u64)
            .map(|i| TradeRec {
                id: i,
                maker_account: (i % 4) as u32,
                taker_account: (i % 3) as u32,
                time_ms: 2_000 + i,
                ..sample_trade()
            })
            .collect();
        let rows: Vec<OrderRec> = (1..=300u64)
            .map(|i| {
                let mut o = sample_order(Side::Sell, "c");
                o.id = i * 2;
                o.account = (i % 3) as u32;
                o.market = (i % 2) as u16;
                o.client_id = format!("c{i}");
                o.time_ms = 1_000 + i;
                o
            })
            .collect();
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(OLD_TABLES).unwrap();
            for t in &trades {
                old_trade_row(&c, t);
            }
            for o in &rows {
                let mut data = postcard::to_allocvec(o).unwrap();
                if o.id == 4 {
                    // A row from before order lists (no `list_id` byte).
                    data.pop();
                }
                old_order_row(&c, o, &data);
            }
        }
        {
            // A row that does not decode.
            let c = Connection::open(&path).unwrap();
            c.execute(
                "INSERT INTO orders VALUES (9999, 1, 0, 'x', 1, X'FFFFFFFF')",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let conn = store.connect().unwrap();
        let unconverted: (String, i64) = conn
            .query_row("SELECT kind, id FROM unconverted_rows", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(unconverted, ("order".to_owned(), 9999));
        let old: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name LIKE 'orders%' OR name LIKE 'trades%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 0, "the old tables and their indexes are dropped");
        drop(conn);
        for account in 0..4u32 {
            let want: Vec<TradeRec> = trades
                .iter()
                .filter(|t| t.maker_account == account || t.taker_account == account)
                .cloned()
                .collect();
            assert_eq!(
                store
                    .trades(account, 0, Some(0), None, None, 1_000)
                    .unwrap(),
                want
            );
        }
        assert_eq!(store.recent_trades(0, 1_000).unwrap(), trades);
        for o in &rows {
            assert_eq!(store.order(o.account, o.id).unwrap().as_ref(), Some(o));
            assert_eq!(
                store
                    .order_by_client(o.account, None, &o.client_id)
                    .unwrap()
                    .as_ref(),
                Some(o)
            );
        }
        for account in 0..3u32 {
            for market in 0..2u16 {
                let want: Vec<OrderRec> = rows
                    .iter()
                    .filter(|o| o.account == account && o.market == market)
                    .cloned()
                    .collect();
                assert_eq!(
                    store
                        .orders(account, market, Some(0), None, None, 1_000)
                        .unwrap(),
                    want
                );
            }
        }
        let mut conn = store.connect().unwrap();
        let mut again = rows[10].clone();
        again.status = OrdStatus::Canceled;
        let mut new = rows[10].clone();
        new.id = 1_000;
        new.client_id = "new".into();
        Store::write_history(&mut conn, [&again, &new], &[], 9).unwrap();
        assert_eq!(store.order(again.account, again.id).unwrap(), Some(again));
        assert_eq!(
            store.order_by_client(new.account, None, "new").unwrap(),
            Some(new)
        );
        let updates: i64 = conn
            .query_row("SELECT count(*) FROM order_updates", [], |r| r.get(0))
            .unwrap();
        assert_eq!(updates, 1);
        drop(conn);
        drop(store);
        // Opened again: nothing left to convert, nothing lost.
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.order(rows[0].account, rows[0].id).unwrap().as_ref(),
            Some(&rows[0])
        );
        drop(store);
        // Back to the version before, which makes its tables again and writes a later version
        // of a chunked order, a new order, a trade the chunks hold and a new trade; then this
        // version again: the chunked order's later version wins, nothing is listed twice.
        let mut later = rows[20].clone();
        later.status = OrdStatus::Filled;
        let mut newer = rows[20].clone();
        newer.id = 2_000;
        newer.client_id = "newer".into();
        let new_trade = TradeRec {
            id: 500,
            maker_account: 0,
            taker_account: 1,
            time_ms: 9_000,
            ..sample_trade()
        };
        {
            // The version before makes its tables again (`IF NOT EXISTS`).
            let c = Connection::open(&path).unwrap();
            c.execute_batch(OLD_TABLES).unwrap();
            for o in [&later, &newer] {
                old_order_row(&c, o, &postcard::to_allocvec(o).unwrap());
            }
            for t in [&trades[5], &new_trade] {
                old_trade_row(&c, t);
            }
        }
        let store = Store::open(&path).unwrap();
        let conn = store.connect().unwrap();
        let kept: i64 = conn
            .query_row("SELECT count(*) FROM unconverted_rows", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            kept, 1,
            "the first conversion's undecodable row is still kept"
        );
        drop(conn);
        assert_eq!(
            store.order(later.account, later.id).unwrap(),
            Some(later.clone())
        );
        assert_eq!(
            store.order_by_client(newer.account, None, "newer").unwrap(),
            Some(newer.clone())
        );
        let listed = store
            .orders(later.account, later.market, Some(0), None, None, 1_000)
            .unwrap();
        assert_eq!(listed.iter().filter(|o| o.id == later.id).count(), 1);
        assert!(listed.contains(&later) && listed.contains(&newer));
        let mut all_trades = trades.clone();
        all_trades.push(new_trade);
        assert_eq!(store.recent_trades(0, 1_000).unwrap(), all_trades);
        let of_1: Vec<TradeRec> = all_trades
            .iter()
            .filter(|t| t.maker_account == 1 || t.taker_account == 1)
            .cloned()
            .collect();
        assert_eq!(
            store.trades(1, 0, Some(0), None, None, 1_000).unwrap(),
            of_1
        );
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
