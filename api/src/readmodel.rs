//! Read models built from the engine's event stream: balances, open orders, order and trade
//! history (SQLite), public trades, klines, 24h statistics and the depth book. The engine cannot
//! be queried from API threads; everything the API reads is here.
//!
//! **Architecture invariant:** one applier thread applies batches in sequence order; after a
//! group of batches is in memory, [`ReadModel::applied`] advances to the group's last `seq`, then
//! the WebSocket messages of the group are published; the history thread writes the group's rows
//! to SQLite later ([`PERSIST_EVERY`]), and queries merge the rows still in memory. A handler that got
//! a reply with `seq` waits for `applied >= seq` before answering (read-your-writes).
//!
//! **Start-up after any stop** ([`Regenerator`]): the history in SQLite records the last engine
//! `seq` it committed (`history_seq`); a crash can leave it behind the journal. The engine is
//! recovered through that floor: the read models are seeded from the engine's state *at* the
//! floor, then every journaled command above it is replayed through the same applier as live
//! batches, and its history rows are written to SQLite, all before the API answers. So every
//! acknowledged order and every fill is in the history and `history_gap` is 0. The persister
//! publishes its committed `seq` ([`ReadModel::history_floor`]); the engine's store keeps the
//! snapshots and journal back to it. Only a floor older than every kept file (a database from
//! before the floor was kept, or lost files) leaves a gap: logged as an error, counted in
//! `mediator_history_gap_commands`.

use crate::core::EventBatch;
use crate::market::Markets;
use crate::store::Store;
use axum::extract::ws::Utf8Bytes;
use matching_engine::recovery::Replayed;
use matching_engine::{
    DoneReason, Engine, Event, MarketId, OrderType, OtoOutcome, Price, Qty, Side, StpMode,
    TimeInForce, Timestamp,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard};
use tokio::sync::{broadcast, watch};

/// Binance order types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrdKind {
    /// LIMIT
    Limit,
    /// MARKET
    Market,
    /// LIMIT_MAKER
    LimitMaker,
    /// STOP_LOSS
    StopLoss,
    /// STOP_LOSS_LIMIT
    StopLossLimit,
    /// TAKE_PROFIT
    TakeProfit,
    /// TAKE_PROFIT_LIMIT
    TakeProfitLimit,
}

impl OrdKind {
    /// Binance's name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrdKind::Limit => "LIMIT",
            OrdKind::Market => "MARKET",
            OrdKind::LimitMaker => "LIMIT_MAKER",
            OrdKind::StopLoss => "STOP_LOSS",
            OrdKind::StopLossLimit => "STOP_LOSS_LIMIT",
            OrdKind::TakeProfit => "TAKE_PROFIT",
            OrdKind::TakeProfitLimit => "TAKE_PROFIT_LIMIT",
        }
    }
}

/// Binance order statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrdStatus {
    /// NEW
    New,
    /// PARTIALLY_FILLED
    PartiallyFilled,
    /// FILLED
    Filled,
    /// CANCELED
    Canceled,
    /// EXPIRED
    Expired,
    /// EXPIRED_IN_MATCH (self-trade prevention)
    ExpiredInMatch,
    /// PENDING_NEW: the pending order of an OTO/OTOCO list, not placed yet. (Last: rows
    /// written before it existed decode unchanged.)
    PendingNew,
}

impl OrdStatus {
    /// The status of an order that left the book for `reason` (an `OrderDone`): a quote-budget
    /// order (`budget`) whose IOC rest or unaffordable rest ended it after it traded (`traded`)
    /// counts as filled, as Binance reports it.
    pub fn done(reason: DoneReason, budget: bool, traded: bool) -> Self {
        match reason {
            DoneReason::Filled => OrdStatus::Filled,
            DoneReason::Cancelled => OrdStatus::Canceled,
            DoneReason::IocRemainder | DoneReason::InsufficientBalance if budget && traded => {
                OrdStatus::Filled
            }
            DoneReason::IocRemainder | DoneReason::Expired | DoneReason::InsufficientBalance => {
                OrdStatus::Expired
            }
            DoneReason::SelfTrade => OrdStatus::ExpiredInMatch,
        }
    }

    /// Binance's name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrdStatus::New => "NEW",
            OrdStatus::PartiallyFilled => "PARTIALLY_FILLED",
            OrdStatus::Filled => "FILLED",
            OrdStatus::Canceled => "CANCELED",
            OrdStatus::Expired => "EXPIRED",
            OrdStatus::ExpiredInMatch => "EXPIRED_IN_MATCH",
            OrdStatus::PendingNew => "PENDING_NEW",
        }
    }
}

/// Binance's name of a time in force.
pub fn tif_str(t: TimeInForce) -> &'static str {
    match t {
        TimeInForce::Gtc => "GTC",
        TimeInForce::Ioc => "IOC",
        TimeInForce::Fok => "FOK",
        TimeInForce::Gtd(_) => "GTD",
    }
}

/// Binance's name of a self-trade prevention mode.
pub fn stp_str(s: StpMode) -> &'static str {
    match s {
        StpMode::None => "NONE",
        StpMode::ExpireTaker => "EXPIRE_TAKER",
        StpMode::ExpireMaker => "EXPIRE_MAKER",
        StpMode::ExpireBoth => "EXPIRE_BOTH",
    }
}

/// Binance's name of a side.
pub fn side_str(s: Side) -> &'static str {
    match s {
        Side::Buy => "BUY",
        Side::Sell => "SELL",
    }
}

/// An order as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRec {
    /// Order id.
    pub id: u64,
    /// Owner.
    pub account: u32,
    /// Market.
    pub market: u16,
    /// Client order id.
    pub client_id: String,
    /// Side.
    pub side: Side,
    /// Type.
    pub kind: OrdKind,
    /// Time in force.
    pub tif: TimeInForce,
    /// Limit price in ticks (0 for market orders).
    pub price: u64,
    /// Stop price in ticks (0 for none).
    pub stop: u64,
    /// Original quantity in lots (for a quote-budget order: 0 until done, then the executed qty).
    pub orig_qty: u64,
    /// Quote budget (`quoteOrderQty`), 0 for none.
    pub orig_quote: u64,
    /// Executed quantity in lots.
    pub executed: u64,
    /// Cumulative quote quantity in quote units.
    pub cum_quote: u64,
    /// Status.
    pub status: OrdStatus,
    /// Self-trade prevention mode.
    pub stp: StpMode,
    /// Creation time.
    pub time_ms: u64,
    /// Last update time.
    pub update_ms: u64,
    /// When it started working (stops: when triggered), `None` while waiting.
    pub working_ms: Option<u64>,
    /// The order list (OCO) it was placed in. Last field: a row written before lists existed
    /// decodes with `None` ([`crate::store`] appends the missing byte).
    pub list_id: Option<u64>,
}

/// Binance's `contingencyType` of an order list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    /// `OCO`.
    Oco,
    /// `OTO`: a working order and a pending order.
    Oto,
    /// `OTOCO`: a working order and a pending OCO pair.
    Otoco,
}

impl ListKind {
    /// Binance's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ListKind::Oco => "OCO",
            ListKind::Oto => "OTO",
            ListKind::Otoco => "OTOCO",
        }
    }
}

/// An order list (OCO, OTO, OTOCO) as the API reports it (`GET /api/v3/orderList`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRec {
    /// `contingencyType`.
    pub kind: ListKind,
    /// `orderListId`.
    pub id: u64,
    /// Owner.
    pub account: u32,
    /// Market.
    pub market: u16,
    /// `listClientOrderId`.
    pub client_id: String,
    /// Order ids and client ids: an OCO's `[above, below]`; an OTO's working then pending order;
    /// an OTOCO's working order then its pending `above`, `below`.
    pub legs: Vec<(u64, String)>,
    /// False while the list works (`EXEC_STARTED` / `EXECUTING`), true once done (`ALL_DONE`).
    pub done: bool,
    /// Placement time.
    pub time_ms: u64,
}

/// Done order lists kept in memory for `allOrderList` (the oldest go first).
pub const MAX_DONE_LISTS: usize = 100_000;

impl OrderRec {
    /// True while the order is open.
    pub fn is_open(&self) -> bool {
        matches!(self.status, OrdStatus::New | OrdStatus::PartiallyFilled)
    }
}

/// Which trades a history query wants: ids from `from_id`, times `start_ms..=end_ms`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TradeWindow {
    /// The first trade id.
    pub from_id: Option<u64>,
    /// The earliest time.
    pub start_ms: Option<u64>,
    /// The latest time.
    pub end_ms: Option<u64>,
}

/// The account's trades read per page by [`ReadModel::order_trades`].
pub const ORDER_TRADES_PAGE: u32 = 1_000;

/// A trade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TradeRec {
    /// Trade id.
    pub id: u64,
    /// Market.
    pub market: u16,
    /// Price in ticks.
    pub price: u64,
    /// Quantity in lots.
    pub qty: u64,
    /// Quote amount.
    pub quote: u64,
    /// Taker's side.
    pub taker_side: Side,
    /// Maker order.
    pub maker_order: u64,
    /// Taker order.
    pub taker_order: u64,
    /// Maker account.
    pub maker_account: u32,
    /// Taker account.
    pub taker_account: u32,
    /// Maker fee (quote).
    pub maker_fee: u64,
    /// Taker fee (quote).
    pub taker_fee: u64,
    /// Time.
    pub time_ms: u64,
}

/// A kline (candle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Kline {
    /// Open time.
    pub open_ms: u64,
    /// Close time (open + interval - 1).
    pub close_ms: u64,
    /// Open price (ticks).
    pub open: u64,
    /// High.
    pub high: u64,
    /// Low.
    pub low: u64,
    /// Close.
    pub close: u64,
    /// Base volume (lots).
    pub volume: u128,
    /// Quote volume (quote units).
    pub quote: u128,
    /// Number of trades.
    pub trades: u64,
    /// Taker-buy base volume (lots).
    pub taker_buy_volume: u128,
    /// Taker-buy quote volume.
    pub taker_buy_quote: u128,
    /// First trade id.
    pub first_id: u64,
    /// Last trade id.
    pub last_id: u64,
}

/// The length that stands for a calendar month (`1M`).
pub const MONTH: u64 = 0;

/// The kline intervals (Binance names and lengths in ms; `1M` is a calendar month, UTC).
pub const INTERVALS: &[(&str, u64)] = &[
    ("1s", 1_000),
    ("1m", 60_000),
    ("3m", 180_000),
    ("5m", 300_000),
    ("15m", 900_000),
    ("30m", 1_800_000),
    ("1h", 3_600_000),
    ("2h", 7_200_000),
    ("4h", 14_400_000),
    ("6h", 21_600_000),
    ("8h", 28_800_000),
    ("12h", 43_200_000),
    ("1d", 86_400_000),
    ("3d", 259_200_000),
    ("1w", 604_800_000),
    ("1M", MONTH),
];

/// Index of an interval by name.
pub fn interval_index(name: &str) -> Option<usize> {
    INTERVALS.iter().position(|(n, _)| *n == name)
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian; Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date (year, month) of a day number.
fn civil_from_days(z: i64) -> (i64, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m)
}

/// Open and close time (inclusive) of the interval of length `len` containing `t`.
pub fn bucket(t: u64, len: u64) -> (u64, u64) {
    if len == MONTH {
        let (y, m) = civil_from_days((t / 86_400_000) as i64);
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        let open = days_from_civil(y, m, 1).max(0) as u64 * 86_400_000;
        let next = days_from_civil(ny, nm, 1).max(0) as u64 * 86_400_000;
        return (open, next - 1);
    }
    let open = bucket_start(t, len);
    (open, open + len - 1)
}

/// Open time of the interval containing `t` (fixed lengths). Weeks start on Monday, as on
/// Binance.
pub fn bucket_start(t: u64, len: u64) -> u64 {
    if len == MONTH {
        return bucket(t, len).0;
    }
    if len == 604_800_000 {
        let monday = 4 * 86_400_000; // 1970-01-05
        if t < monday {
            return 0;
        }
        return (t - monday) / len * len + monday;
    }
    t / len * len
}

const KLINES_KEPT: usize = 1_500;
const TRADES_KEPT: usize = 1_000;

/// A price level: price and total quantity.
pub type Level = (Price, Qty);

/// A depth diff being built: first and last seq, bid and ask levels.
type DiffBuild = (u64, u64, Vec<[String; 2]>, Vec<[String; 2]>);

/// One market's public state.
#[derive(Debug, Default)]
pub struct MarketState {
    /// Bids: price → qty.
    pub bids: BTreeMap<Price, Qty>,
    /// Asks.
    pub asks: BTreeMap<Price, Qty>,
    /// The market's depth sequence (Binance's `lastUpdateId`).
    pub depth_seq: u64,
    /// Recent trades, oldest first.
    pub trades: VecDeque<TradeRec>,
    /// Klines per interval, oldest first.
    pub klines: Vec<VecDeque<Kline>>,
    /// The last five minutes' trades by second, oldest first: `(second, quote, lots)`, for
    /// `avgPrice` (review: it averaged only the trades kept in `trades`, the last 1,000, so a
    /// market trading more than that in five minutes showed the average of a shorter window).
    pub avg_window: VecDeque<(u64, u128, u128)>,
}

impl MarketState {
    /// Best bid and ask.
    pub fn best(&self) -> (Option<Level>, Option<Level>) {
        (
            self.bids.iter().next_back().map(|(p, q)| (*p, *q)),
            self.asks.iter().next().map(|(p, q)| (*p, *q)),
        )
    }
}

/// Everything in memory.
#[derive(Debug, Default)]
pub struct State {
    /// Balances: account → per asset (available, held).
    pub balances: HashMap<u32, Vec<(u64, u64)>>,
    /// Open orders by id.
    pub open: HashMap<u64, OrderRec>,
    /// Open order ids per account.
    pub open_by_account: HashMap<u32, BTreeSet<u64>>,
    /// Order and trade rows not yet in SQLite, read before SQLite, indexed by account.
    pub unpersisted: Unpersisted,
    /// Bumped (under the write lock) each time the history thread drops rows it committed
    /// from memory: a reader that saw the same value before its SQLite read and at its memory
    /// read missed nothing ([`ReadModel::merged`]).
    pub persist_gen: u64,
    /// Markets.
    pub markets: Vec<MarketState>,
    /// Known accounts.
    pub accounts: BTreeSet<u32>,
    /// Counters for `/metrics`.
    pub counters: Counters,
    /// Journaled commands whose orders and trades are missing from the SQLite history (found at
    /// start-up: a crash between the journal's fsync and the history's commit).
    pub history_gap: u64,
    /// Order lists: the live ones and the last [`MAX_DONE_LISTS`] done ones, by id.
    pub lists: BTreeMap<u64, ListRec>,
    /// Done list ids, oldest first (for the bound).
    pub done_lists: VecDeque<u64>,
    /// The ids in [`State::lists`] of each account: an account's look-ups read its own lists
    /// only (not up to [`MAX_DONE_LISTS`] of everyone's).
    pub lists_by_account: HashMap<u32, BTreeSet<u64>>,
    /// The pending orders (`PENDING_NEW`) of live OTO/OTOCO lists, by id: not open, not in the
    /// book, in the history store with that status.
    pub pending: BTreeMap<u64, OrderRec>,
}

/// History rows waiting in memory for the history thread to commit them ([`PERSIST_EVERY`],
/// [`PERSIST_ROWS`]), each with the generation (group of batches) that wrote it, and indexed by
/// account: a query for one account (`allOrders`, `myTrades`, an order by client id) touches
/// only that account's rows, not the up to [`PERSIST_ROWS`] rows of every account, under the
/// read lock.
///
/// **Invariant:** `orders_by_account[a]` holds exactly the ids of the order rows of account
/// `a`; `trades_by_account[a]` the positions (counted from the first trade ever pushed) of the
/// trades `a` made or took, oldest first; no empty index entry is kept.
#[derive(Debug, Default)]
pub struct Unpersisted {
    /// The latest row of each order, with its generation, by id.
    orders: HashMap<u64, (OrderRec, u64)>,
    /// Every `(generation, order id)` written, in order: what [`Unpersisted::drop_some`] walks
    /// instead of every order (an entry whose order was written again later is skipped).
    order_gens: VecDeque<(u64, u64)>,
    /// Order ids per account, ascending.
    orders_by_account: HashMap<u32, BTreeSet<u64>>,
    /// Trades in the order they were applied (ids ascending), with their generation.
    trades: VecDeque<(TradeRec, u64)>,
    /// Trades dropped from the front of `trades` so far: the trade at position `p` is
    /// `trades[p - trades_dropped]`.
    trades_dropped: u64,
    /// Trade positions per account (maker or taker, once for a self-trade), oldest first.
    trades_by_account: HashMap<u32, VecDeque<u64>>,
}

impl Unpersisted {
    /// Keeps `o` as its order's latest row, written by `generation`.
    pub fn insert_order(&mut self, o: OrderRec, generation: u64) {
        self.orders_by_account
            .entry(o.account)
            .or_default()
            .insert(o.id);
        // `drop_some` stops at the first newer generation: the log must be in order.
        debug_assert!(self.order_gens.back().is_none_or(|&(g, _)| g <= generation));
        self.order_gens.push_back((generation, o.id));
        self.orders.insert(o.id, (o, generation));
        // One entry per write, not per order: while commits fail (rows are kept and retried),
        // an order amended again and again would grow the log without bound. Keep only the
        // entries of each order's current row then.
        if self.order_gens.len() > 2 * self.orders.len() + 4096 {
            let orders = &self.orders;
            self.order_gens
                .retain(|(g, id)| orders.get(id).is_some_and(|(_, cur)| cur == g));
        }
    }

    /// Appends a trade written by `generation` (trades come in id order).
    pub fn push_trade(&mut self, t: TradeRec, generation: u64) {
        let at = self.trades_dropped + self.trades.len() as u64;
        self.trades_by_account
            .entry(t.maker_account)
            .or_default()
            .push_back(at);
        if t.taker_account != t.maker_account {
            self.trades_by_account
                .entry(t.taker_account)
                .or_default()
                .push_back(at);
        }
        self.trades.push_back((t, generation));
    }

    /// Drops the rows the history thread committed: those written by `generation` or before
    /// (an order row rewritten later stays).
    pub fn drop_through(&mut self, generation: u64) {
        while self.drop_some(generation, usize::MAX) {}
    }

    /// [`Unpersisted::drop_through`] in steps: drops at most `max` rows (and skips at most
    /// `max` stale entries); true when rows of `generation` or before are left. The history
    /// thread drops a commit's rows (tens of thousands under load: 3 ms under the write lock
    /// at once) a chunk per lock, so the applier and the readers wait for one chunk at most.
    pub fn drop_some(&mut self, generation: u64, max: usize) -> bool {
        let mut budget = max;
        while budget > 0 {
            let Some(&(g, id)) = self.order_gens.front() else {
                break;
            };
            if g > generation {
                break;
            }
            self.order_gens.pop_front();
            budget -= 1;
            // Written again after `generation`: the newer row stays.
            if self.orders.get(&id).is_none_or(|(_, g)| *g > generation) {
                continue;
            }
            let Some((o, _)) = self.orders.remove(&id) else {
                continue;
            };
            if let Some(ids) = self.orders_by_account.get_mut(&o.account) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.orders_by_account.remove(&o.account);
                }
            }
        }
        while budget > 0 && self.trades.front().is_some_and(|(_, g)| *g <= generation) {
            let Some((t, _)) = self.trades.pop_front() else {
                break;
            };
            budget -= 1;
            let at = self.trades_dropped;
            self.trades_dropped += 1;
            for a in [t.maker_account, t.taker_account] {
                if let Some(q) = self.trades_by_account.get_mut(&a) {
                    // The oldest trade of each of its accounts (a self-trade's second account is
                    // the same queue, already popped).
                    if q.front() == Some(&at) {
                        q.pop_front();
                    }
                    if q.is_empty() {
                        self.trades_by_account.remove(&a);
                    }
                }
            }
        }
        self.order_gens
            .front()
            .is_some_and(|(g, _)| *g <= generation)
            || self.trades.front().is_some_and(|(_, g)| *g <= generation)
    }

    /// The latest row of an order.
    pub fn order(&self, id: u64) -> Option<&OrderRec> {
        self.orders.get(&id).map(|(o, _)| o)
    }

    /// The order rows of `account`, ascending by id.
    pub fn orders_of(&self, account: u32) -> impl DoubleEndedIterator<Item = &OrderRec> + '_ {
        self.orders_by_account
            .get(&account)
            .into_iter()
            .flatten()
            .filter_map(|id| self.orders.get(id).map(|(o, _)| o))
    }

    /// The trades `account` made or took, oldest first.
    pub fn trades_of(&self, account: u32) -> impl Iterator<Item = &TradeRec> + '_ {
        self.trades_by_account
            .get(&account)
            .into_iter()
            .flatten()
            .filter_map(|&at| {
                let i = usize::try_from(at - self.trades_dropped).ok()?;
                self.trades.get(i).map(|(t, _)| t)
            })
    }

    /// Every trade, oldest first.
    pub fn trades(&self) -> impl Iterator<Item = &TradeRec> + '_ {
        self.trades.iter().map(|(t, _)| t)
    }

    /// The trades with ids from `from_id` on, oldest first: found by binary search (trades come
    /// in id order), so a query starts where its ids do instead of walking every row before.
    pub fn trades_from(&self, from_id: u64) -> impl Iterator<Item = &TradeRec> + '_ {
        let start = self.trades.partition_point(|(t, _)| t.id < from_id);
        self.trades.range(start..).map(|(t, _)| t)
    }

    /// Rows waiting: orders, trades.
    pub fn counts(&self) -> (usize, usize) {
        (self.orders.len(), self.trades.len())
    }
}

/// Monotonic counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    /// Orders accepted.
    pub orders: u64,
    /// Trades.
    pub trades: u64,
    /// Batches applied.
    pub batches: u64,
}

/// A public market message, serialized once when published: every WebSocket connection sends
/// the same shared bytes (cloning a [`Utf8Bytes`] bumps a reference count; no copy per
/// subscriber).
#[derive(Debug, Clone)]
pub struct MarketMsg {
    /// Market index.
    pub market: usize,
    /// What it is.
    pub kind: MarketMsgKind,
    /// The payload (Binance's `data`).
    pub json: Utf8Bytes,
    /// The combined-stream frame `{"stream":<name>,"data":<json>}`, made by the first
    /// connection that needs it and shared by those that name the stream the same way.
    pub combined: OnceLock<(Box<str>, Utf8Bytes)>,
}

/// Kinds of pushed market messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarketMsgKind {
    /// `depthUpdate` diff.
    Depth,
    /// `trade`.
    Trade,
    /// `bookTicker`.
    BookTicker,
}

/// A user-data message for one account.
#[derive(Debug, Clone)]
pub struct UserMsg {
    /// Account.
    pub account: u32,
    /// The payload, serialized once (shared like [`MarketMsg::json`]).
    pub json: Utf8Bytes,
}

/// The read models and their publishers.
#[derive(Debug)]
pub struct ReadModel {
    state: RwLock<State>,
    applied: watch::Sender<u64>,
    persisted: watch::Sender<u64>,
    /// Market messages (all markets).
    pub market_tx: broadcast::Sender<Arc<MarketMsg>>,
    /// User messages.
    pub user_tx: broadcast::Sender<Arc<UserMsg>>,
    /// Specs.
    pub markets: Arc<Markets>,
    /// History.
    pub store: Arc<Store>,
    /// Set when events were lost (see [`crate::core::EventSink::fail`]).
    pub broken: Arc<std::sync::atomic::AtomicBool>,
    /// The release-mode ledger auditor, fed by the applier ([`crate::audit`]).
    auditor: std::sync::Mutex<crate::audit::Auditor>,
    /// The circuit breaker: set (once, with what was found) when the auditor finds a violation.
    pub halted: Arc<std::sync::OnceLock<crate::audit::Violation>>,
    /// The circuit breaker, opened by the engine's own invariant check after recovery.
    pub engine_invalid: std::sync::OnceLock<String>,
    /// The last engine `seq` whose history rows are committed to SQLite (see
    /// [`ReadModel::history_floor`]).
    history_floor: Arc<AtomicU64>,
    /// The highest `seq` answered to a client before the read models held it
    /// ([`ReadModel::answered_ahead`]): what [`ReadModel::fence`] waits for.
    answered: AtomicU64,
}

/// History rows of one group of batches, for the persister.
struct PersistMsg {
    generation: u64,
    seq: u64,
    orders: Vec<OrderRec>,
    trades: Vec<TradeRec>,
}

/// The `tracing` target of the history thread's event after each write (`debug`, fields
/// `rows` and `micros`: the SQLite transaction, any WAL checkpoint it ran, and the rows' drop
/// from memory). `api/tests/load.rs` reads it to tell how much of the latency tail falls in
/// these writes.
pub const HISTORY_WRITE_TARGET: &str = "mediator::history_write";

/// Messages (one per read-model group) that may wait for the history thread; when full, the
/// applier waits for it.
const HISTORY_QUEUE: usize = 4_096;

/// History writes of at least this many rows run in the background (see [`Priority`]).
const BACKGROUND_ROWS: usize = 1_024;

/// The history thread's priority (see [`ReadModel::persist_loop`]): in the background
/// (`SCHED_IDLE`) while it keeps up, if the process may bring it back; in the foreground while
/// it is behind or holds the read models' lock.
struct Priority {
    /// The process may move the thread to the background and back.
    able: bool,
    background: bool,
}

impl Priority {
    fn new() -> Self {
        Self {
            able: sched_hint::background_is_reversible(),
            background: false,
        }
    }

    fn set(&mut self, background: bool) {
        if !self.able || background == self.background {
            return;
        }
        match sched_hint::set_background(background) {
            Ok(()) => self.background = background,
            Err(e) => {
                // Stay where it is: in the foreground if it cannot come back (never again
                // to the background then), otherwise as it was.
                tracing::warn!(error = %e, background, "history thread priority unchanged");
                if !background {
                    self.able = false;
                }
            }
        }
    }
}

/// Rows the history thread drops from memory per write lock after a commit (~0.1 ms).
const DROP_CHUNK: usize = 1024;

/// How long history rows may wait in memory before they are written to SQLite. A commit
/// rewrites every B-tree page its rows touch (five indexes spread one group's rows over many
/// pages), so the cost per row falls with the rows per commit: at 20 ms the history thread took
/// 16–26 µs of CPU per order in `api/tests/load.rs` (at load 13), at 200 ms 8–13 µs. Rows
/// waiting here are served from memory and regenerated from the journal after a crash.
pub const PERSIST_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// While rows wait for a commit, the history thread sleeps this long at most between looks at
/// its queue (so [`PERSIST_ROWS`] is checked at least this often).
const PERSIST_SLICE: std::time::Duration = std::time::Duration::from_millis(20);
/// How many history rows may wait in memory before they are written to SQLite. Queries for one
/// account read only its waiting rows ([`Unpersisted`]); `historicalTrades` scans them all.
pub const PERSIST_ROWS: usize = 32_768;

/// The first `limit` rows (ascending from a start id) or the last `limit` rows.
fn take_limit<T>(mut v: Vec<T>, from_start: bool, limit: u32) -> Vec<T> {
    let limit = limit as usize;
    if from_start {
        v.truncate(limit);
        v
    } else {
        let skip = v.len().saturating_sub(limit);
        v.split_off(skip)
    }
}

/// Default capacity of each broadcast channel: a WebSocket that falls this far behind is
/// disconnected.
pub const WS_QUEUE: usize = 4_096;

/// What applying a group of batches produces. Order rows are deduplicated per group (an order
/// placed and filled in one group is written once); messages are only built when someone
/// listens.
#[derive(Default)]
struct Out {
    orders: BTreeMap<u64, OrderRec>,
    trades: Vec<TradeRec>,
    market: Vec<MarketMsg>,
    user: Vec<UserMsg>,
    want_market: bool,
    want_user: bool,
}

impl Out {
    fn push_user(&mut self, f: impl FnOnce() -> UserMsg) {
        if self.want_user {
            self.user.push(f());
        }
    }
    fn push_market(&mut self, f: impl FnOnce() -> MarketMsg) {
        if self.want_market {
            self.market.push(f());
        }
    }
}

impl ReadModel {
    /// Empty read models over a store.
    pub fn new(markets: Arc<Markets>, store: Arc<Store>, ws_queue: usize) -> Self {
        let mut st = State::default();
        for _ in &markets.markets {
            st.markets.push(MarketState {
                klines: vec![VecDeque::new(); INTERVALS.len()],
                ..Default::default()
            });
        }
        let auditor = crate::audit::Auditor::new(markets.assets.len());
        Self {
            auditor: std::sync::Mutex::new(auditor),
            state: RwLock::new(st),
            applied: watch::channel(0).0,
            persisted: watch::channel(0).0,
            market_tx: broadcast::channel(ws_queue.max(1)).0,
            user_tx: broadcast::channel(ws_queue.max(1)).0,
            markets,
            store,
            broken: Arc::default(),
            halted: Arc::default(),
            engine_invalid: std::sync::OnceLock::new(),
            history_floor: Arc::default(),
            answered: AtomicU64::new(0),
        }
    }

    /// Trips the circuit breaker (the first violation is kept and logged; later ones only
    /// logged).
    pub fn trip(&self, v: crate::audit::Violation) {
        tracing::error!(
            seq = v.seq,
            asset = v.asset,
            balances = %v.balances,
            supply = %v.supply,
            "LEDGER AUDIT FAILED: money was created or destroyed; commands that move money are \
             refused until an operator restarts the server"
        );
        let _ = self.halted.set(v);
    }

    /// Opens the circuit breaker for a broken engine invariant found outside the auditor (the
    /// check after recovery).
    pub fn trip_engine(&self, reason: String) {
        tracing::error!(
            reason,
            "ENGINE INVARIANT CHECK FAILED: commands that move money are refused"
        );
        let _ = self.engine_invalid.set(reason);
    }

    /// Commands the auditor has checked.
    pub fn audited(&self) -> u64 {
        self.auditor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .checked()
    }

    /// The last engine `seq` whose history rows are committed to SQLite, advanced by the
    /// history thread after each commit. Give it to the engine's store
    /// ([`matching_engine::recovery::Store::retain_from`]) so that the next start-up can replay
    /// from it whatever a crash kept from being committed.
    pub fn history_floor(&self) -> Arc<AtomicU64> {
        self.history_floor.clone()
    }

    /// Reads the state.
    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The last applied sequence number.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Notes that the command of sequence number `seq` was answered before the read models
    /// applied it (a new order: [`crate::state::AppState::submit_ahead`]). Called before the
    /// answer leaves, so any request that starts after the client read it is fenced behind it.
    pub fn answered_ahead(&self, seq: u64) {
        self.answered
            .fetch_max(seq, std::sync::atomic::Ordering::Release);
    }

    /// Waits until the read models hold every command answered so far (see
    /// [`ReadModel::answered_ahead`]): a request that reads them runs this first, so that a
    /// client sees its own answered orders (or 5 seconds pass, or the read models lost events:
    /// then false). When they are caught up, which is almost always, it reads two counters and
    /// returns.
    pub async fn fence(&self) -> bool {
        let seq = self.answered.load(std::sync::atomic::Ordering::Acquire);
        self.wait_for(seq).await
    }

    /// Waits until batches up to `seq` are applied (or 5 seconds pass: then false).
    pub async fn wait_for(&self, seq: u64) -> bool {
        if self.broken.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        // Already there: no subscription, no timer.
        if *self.applied.borrow() >= seq {
            return true;
        }
        let mut rx = self.applied.subscribe();
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            rx.wait_for(|&s| s >= seq),
        )
        .await;
        matches!(r, Ok(Ok(_)))
    }

    /// Runs the applier on the current thread until the sink is dropped.
    ///
    /// Batches are applied to memory at once and `applied` advances (handlers read their own
    /// writes from memory: open orders, and rows not yet in SQLite). A persister thread writes
    /// history rows to SQLite in one transaction every [`PERSIST_EVERY`] (or [`PERSIST_ROWS`]
    /// rows), so SQLite pays per commit rather than per order, and its commits and checkpoints
    /// never stall the applier. Its queue is bounded: a persister that cannot keep up slows
    /// the applier (and so the engine's fan-out), it never loses rows.
    pub(crate) fn run(&self, rx: crossbeam::channel::Receiver<crate::core::SinkInput>) {
        let conn = match self.store.connect() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "read model cannot open the database");
                return;
            }
        };
        let (ptx, prx) = crossbeam::channel::bounded::<PersistMsg>(HISTORY_QUEUE);
        std::thread::scope(|scope| {
            let persister = std::thread::Builder::new()
                .name("history".into())
                .spawn_scoped(scope, move || self.persist_loop(conn, prx));
            if let Err(e) = persister {
                tracing::error!(error = %e, "cannot start the history thread");
                return;
            }
            self.apply_loop(&rx, &ptx);
            drop(ptx);
        });
    }

    fn apply_loop(
        &self,
        rx: &crossbeam::channel::Receiver<crate::core::SinkInput>,
        ptx: &crossbeam::channel::Sender<PersistMsg>,
    ) {
        let mut group = Vec::with_capacity(256);
        let mut generation = 0u64;
        let mut input = Input {
            rx,
            fanout: None,
            broken: &self.broken,
            ended: false,
        };
        while let Some(first) = input.recv() {
            group.clear();
            group.push(first);
            while group.len() < 256 {
                match input.try_recv() {
                    Some(b) => group.push(b),
                    None => break,
                }
            }
            let mut out = Out {
                want_market: self.market_tx.receiver_count() > 0,
                want_user: self.user_tx.receiver_count() > 0,
                ..Out::default()
            };
            generation += 1;
            let orders: Vec<OrderRec>;
            {
                let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
                let mut auditor = self.auditor.lock().unwrap_or_else(|e| e.into_inner());
                for b in &group {
                    if let Err(v) = auditor.fold(b) {
                        self.trip(v);
                    }
                    apply_batch(&mut st, &self.markets, b, &mut out);
                }
                drop(auditor);
                orders = std::mem::take(&mut out.orders).into_values().collect();
                for o in &orders {
                    st.unpersisted.insert_order(o.clone(), generation);
                }
                for t in &out.trades {
                    st.unpersisted.push_trade(t.clone(), generation);
                }
            }
            let last_seq = group.last().map_or(0, |b| b.seq);
            self.applied.send_if_modified(|s| {
                if last_seq > *s {
                    *s = last_seq;
                    true
                } else {
                    false
                }
            });
            for msg in out.market.drain(..) {
                let _ = self.market_tx.send(Arc::new(msg));
            }
            for msg in out.user.drain(..) {
                let _ = self.user_tx.send(Arc::new(msg));
            }
            let msg = PersistMsg {
                generation,
                seq: last_seq,
                orders,
                trades: std::mem::take(&mut out.trades),
            };
            if ptx.send(msg).is_err() {
                tracing::error!("the history thread stopped");
            }
        }
    }

    /// Writes history rows in batches until the applier stops, then writes the rest.
    ///
    /// A large write runs in the background (`SCHED_IDLE`, [`sched_hint::set_background`]) when
    /// the process may bring the thread back: it then takes idle cores, not the order path's
    /// (WebSocket API load test, alternated: ~46k → ~49k orders/s, p99 ~5.2 → ~5.0 ms). It comes
    /// back to the foreground when it falls behind (half its queue full, or its rows a second
    /// overdue: checked every [`crate::store::HISTORY_CHUNK`] rows, and a background thread
    /// still gets a sliver of a busy CPU, so it always gets there), and before it takes the
    /// read models' write lock (a preempted background holder would stall the applier and every
    /// reader). SQLite's own write lock is held in the background through the commit: under a
    /// fully busy CPU another writer of the API's database (a key change) may wait for it, up to
    /// its busy timeout (5 s), and then fail having changed nothing.
    fn persist_loop(
        &self,
        mut conn: rusqlite::Connection,
        rx: crossbeam::channel::Receiver<PersistMsg>,
    ) {
        let mut orders: HashMap<u64, OrderRec> = HashMap::new();
        let mut trades: Vec<TradeRec> = Vec::new();
        let (mut generation, mut seq) = (0u64, 0u64);
        let mut since: Option<std::time::Instant> = None;
        let mut priority = Priority::new();
        // Behind: messages piling up, or the rows' window long overdue (a write in the
        // background that the foreground starved; it still gets a sliver of the CPU, so it
        // gets here within its next chunk of rows).
        let behind = |since: Option<std::time::Instant>| {
            rx.len() >= HISTORY_QUEUE / 2 || since.is_some_and(|t| t.elapsed() >= PERSIST_EVERY * 5)
        };
        fn take(
            m: PersistMsg,
            orders: &mut HashMap<u64, OrderRec>,
            trades: &mut Vec<TradeRec>,
            generation: &mut u64,
            seq: &mut u64,
        ) {
            for o in m.orders {
                orders.insert(o.id, o);
            }
            trades.extend(m.trades);
            *generation = m.generation;
            *seq = (*seq).max(m.seq);
        }
        loop {
            // Idle: block for the first message. A window open: sleep in slices and take what
            // came meanwhile, instead of waking for every message (one per read-model group,
            // hundreds a second under load).
            let stop = match since {
                None => match rx.recv() {
                    Ok(m) => {
                        take(m, &mut orders, &mut trades, &mut generation, &mut seq);
                        since = Some(std::time::Instant::now());
                        false
                    }
                    Err(_) => true,
                },
                Some(t) => {
                    std::thread::sleep(
                        PERSIST_EVERY.saturating_sub(t.elapsed()).min(PERSIST_SLICE),
                    );
                    loop {
                        match rx.try_recv() {
                            Ok(m) => take(m, &mut orders, &mut trades, &mut generation, &mut seq),
                            Err(e) => break e.is_disconnected(),
                        }
                    }
                }
            };
            let due = since.is_some_and(|t| t.elapsed() >= PERSIST_EVERY)
                || orders.len() + trades.len() >= PERSIST_ROWS;
            if (due || stop) && since.is_some() {
                let started = std::time::Instant::now();
                let rows = orders.len() + trades.len();
                // A small write (a light load) stays in the foreground: it is quick, and a
                // reader waiting for it (`wait_persisted`) should not wait for idle cores.
                priority.set(rows >= BACKGROUND_ROWS && !behind(since));
                // The store sorts the orders by id (its chunks are in id order).
                let written = Store::write_history_with(
                    &mut conn,
                    orders.values(),
                    &trades,
                    seq,
                    &mut || {
                        if priority.background && behind(since) {
                            priority.set(false);
                        }
                    },
                );
                // The read models' write lock, below, is never held in the background: a
                // preempted holder would keep the applier and every reader waiting.
                priority.set(false);
                match written {
                    Ok(()) => {
                        orders.clear();
                        trades.clear();
                        since = None;
                        // A chunk per write lock (see `Unpersisted::drop_some`). The first
                        // moves `persist_gen`, so a reader that read SQLite before the commit
                        // and memory after any drop reads again; a reader that sampled it after
                        // the first chunk read SQLite after the commit, which has every row the
                        // later chunks drop (moving it again would only make readers retry).
                        let mut first = true;
                        loop {
                            let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
                            if std::mem::take(&mut first) {
                                st.persist_gen += 1;
                            }
                            let more = st.unpersisted.drop_some(generation, DROP_CHUNK);
                            drop(st);
                            if !more {
                                break;
                            }
                        }
                        self.history_floor.fetch_max(seq, Ordering::Release);
                        self.persisted.send_replace(seq);
                        tracing::debug!(
                            target: HISTORY_WRITE_TARGET,
                            rows,
                            micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                            "history rows written"
                        );
                    }
                    // Rows stay here and are retried with the next write.
                    Err(e) => {
                        tracing::error!(error = %e, "writing history failed");
                        since = Some(std::time::Instant::now());
                    }
                }
            }
            if stop {
                return;
            }
        }
    }

    /// Waits until everything applied or answered so far is in SQLite (or 5 seconds pass, for
    /// either wait: then false).
    pub async fn wait_persisted(&self) -> bool {
        if !self.fence().await {
            return false;
        }
        let target = self.applied();
        let mut rx = self.persisted.subscribe();
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            rx.wait_for(|&s| s >= target),
        )
        .await;
        matches!(r, Ok(Ok(_)))
    }

    /// Orders of an account in a market (`allOrders`): SQLite merged with newer rows in memory.
    pub fn orders_history(
        &self,
        account: u32,
        market: u16,
        from_id: Option<u64>,
        start_ms: Option<u64>,
        end_ms: Option<u64>,
        limit: u32,
    ) -> Result<Vec<OrderRec>, crate::store::StoreError> {
        self.merged(
            || {
                self.store
                    .orders(account, market, from_id, start_ms, end_ms, limit)
            },
            |st, rows| {
                Self::merge_orders(st, rows, account, market, from_id, start_ms, end_ms, limit)
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn merge_orders(
        st: &State,
        rows: Vec<OrderRec>,
        account: u32,
        market: u16,
        from_id: Option<u64>,
        start_ms: Option<u64>,
        end_ms: Option<u64>,
        limit: u32,
    ) -> Vec<OrderRec> {
        let keep = |o: &OrderRec| {
            o.account == account
                && o.market == market
                && from_id.is_none_or(|f| o.id >= f)
                && start_ms.is_none_or(|s| o.time_ms >= s)
                && end_ms.is_none_or(|e| o.time_ms <= e)
        };
        let mut all: BTreeMap<u64, OrderRec> = rows.into_iter().map(|o| (o.id, o)).collect();
        for o in st.unpersisted.orders_of(account).filter(|o| keep(o)) {
            all.insert(o.id, o.clone());
        }
        for id in st.open_by_account.get(&account).into_iter().flatten() {
            if let Some(o) = st.open.get(id).filter(|o| keep(o)) {
                all.insert(o.id, o.clone());
            }
        }
        take_limit(all.into_values().collect(), from_id.is_some(), limit)
    }

    /// Reads SQLite rows with `read_db` and merges the rows still in memory with `merge`, so
    /// that no row is missed while the history thread moves rows from memory to SQLite: if it
    /// dropped committed rows from memory between the SQLite read and the memory read
    /// (`persist_gen` moved), the read is repeated; the last attempt holds the read lock across
    /// the SQLite read (nothing can be dropped then, and SQLite holds no row newer than memory).
    fn merged<T, R>(
        &self,
        read_db: impl Fn() -> Result<T, crate::store::StoreError>,
        merge: impl Fn(&State, T) -> R,
    ) -> Result<R, crate::store::StoreError> {
        for _ in 0..4 {
            let before = self.read().persist_gen;
            let rows = read_db()?;
            let st = self.read();
            if st.persist_gen == before {
                return Ok(merge(&st, rows));
            }
        }
        let st = self.read();
        let rows = read_db()?;
        Ok(merge(&st, rows))
    }

    /// Trades of an account in a market (`myTrades`): SQLite merged with trades in memory.
    pub fn trades_history(
        &self,
        account: u32,
        market: u16,
        from_id: Option<u64>,
        start_ms: Option<u64>,
        end_ms: Option<u64>,
        limit: u32,
    ) -> Result<Vec<TradeRec>, crate::store::StoreError> {
        self.merged(
            || {
                self.store
                    .trades(account, market, from_id, start_ms, end_ms, limit)
            },
            |st, rows| {
                let mut all: BTreeMap<u64, TradeRec> =
                    rows.into_iter().map(|t| (t.id, t)).collect();
                for t in st.unpersisted.trades_of(account).filter(|t| {
                    t.market == market
                        && from_id.is_none_or(|f| t.id >= f)
                        && start_ms.is_none_or(|s| t.time_ms >= s)
                        && end_ms.is_none_or(|e| t.time_ms <= e)
                }) {
                    all.insert(t.id, t.clone());
                }
                take_limit(all.into_values().collect(), from_id.is_some(), limit)
            },
        )
    }

    /// The trades of order `order_id` of `account` in `market` in the window (ids from
    /// `from_id`, times `start_ms..=end_ms`), oldest first, at most `limit` (`myTrades?orderId`).
    /// They lie between the order's creation and its last update (a trade's time never decreases
    /// with its id, and each fill sets the order's update time to its own), so the account's
    /// trades of that window are read in pages of [`ORDER_TRADES_PAGE`], however many the account
    /// made since: an old order of a busy account is found (it was looked for among the
    /// account's latest 100,000 trades only, and got `[]`). An open order's window ends at its
    /// last fill, not now: the work is the account's trades during the order's life.
    pub fn order_trades(
        &self,
        account: u32,
        market: u16,
        order_id: u64,
        TradeWindow {
            from_id,
            start_ms,
            end_ms,
        }: TradeWindow,
        limit: u32,
    ) -> Result<Vec<TradeRec>, crate::store::StoreError> {
        let Some(o) = self.find_order(account, order_id)? else {
            return Ok(Vec::new());
        };
        if o.market != market {
            return Ok(Vec::new());
        }
        let lo = start_ms.map_or(o.time_ms, |s| s.max(o.time_ms));
        // Every fill sets the order's `update_ms` to the trade's own time, open or not; an
        // order rebuilt after a history gap has none (0) until its next event.
        let last = if o.update_ms == 0 {
            u64::MAX
        } else {
            o.update_ms
        };
        let hi = end_ms.map_or(last, |e| e.min(last));
        let mut out = Vec::new();
        if lo > hi {
            return Ok(out);
        }
        // The whole of the order's life asked for: the reading stops once its fills add up to
        // what it executed (none: nothing to read). Before, an order with no fill, or with
        // its fills early in a long life, had every trade of the account since read, page by
        // page, at weight 20 (review).
        let whole_life = from_id.is_none() && start_ms.is_none() && end_ms.is_none();
        if whole_life && o.executed == 0 {
            return Ok(out);
        }
        let mut found_qty = 0u64;
        let mut from = from_id.unwrap_or(0);
        loop {
            let page = self.trades_history(
                account,
                market,
                Some(from),
                Some(lo),
                Some(hi),
                ORDER_TRADES_PAGE,
            )?;
            let n = page.len();
            for t in page {
                from = t.id + 1;
                if (t.maker_account == account && t.maker_order == order_id)
                    || (t.taker_account == account && t.taker_order == order_id)
                {
                    found_qty = found_qty.saturating_add(t.qty);
                    out.push(t);
                }
            }
            if n < ORDER_TRADES_PAGE as usize
                || out.len() >= limit as usize
                || (whole_life && found_qty >= o.executed)
            {
                break;
            }
        }
        out.truncate(limit as usize);
        Ok(out)
    }

    /// Trades of a market from `from_id` on (`historicalTrades`), oldest first.
    pub fn market_trades_from(
        &self,
        market: u16,
        from_id: u64,
        limit: u32,
    ) -> Result<Vec<TradeRec>, crate::store::StoreError> {
        self.merged(
            || self.store.market_trades_from(market, from_id, limit),
            |st, rows| {
                let mut all: BTreeMap<u64, TradeRec> =
                    rows.into_iter().map(|t| (t.id, t)).collect();
                // Only the first `limit` of the market's waiting trades from `from_id` can be
                // among the first `limit` of the union (both sides are in id order): the scan
                // under the read lock stops there.
                for t in st
                    .unpersisted
                    .trades_from(from_id)
                    .filter(|t| t.market == market)
                    .take(limit as usize)
                {
                    all.insert(t.id, t.clone());
                }
                take_limit(all.into_values().collect(), true, limit)
            },
        )
    }

    /// The id of the first trade of a market at `ms` or later, in SQLite or in memory (`None`:
    /// none that late).
    pub fn market_trade_at_or_after(
        &self,
        market: u16,
        ms: u64,
    ) -> Result<Option<u64>, crate::store::StoreError> {
        self.merged(
            || self.store.market_trade_at_or_after(market, ms),
            |st, stored| {
                let waiting = st
                    .unpersisted
                    .trades_from(0)
                    .filter(|t| t.market == market && t.time_ms >= ms)
                    .map(|t| t.id)
                    .min();
                match (stored, waiting) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            },
        )
    }

    /// Seeds the in-memory models from a recovered engine (balances, open orders, books, depth
    /// sequences) and the public trade history from SQLite, and reports in `history_gap` the
    /// commands the SQLite history misses. Call before the first batch. Start-up uses
    /// [`ReadModel::regenerate`] instead, which fills that gap.
    pub fn seed(&self, engine: &Engine) -> Result<(), crate::store::StoreError> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        self.seed_state(&mut st, engine)?;
        let stored = self.store.history_seq()?;
        st.history_gap = engine.seq().saturating_sub(stored);
        if st.history_gap > 0 && stored > 0 {
            tracing::error!(
                from_seq = stored + 1,
                to_seq = engine.seq(),
                "order and trade history misses the commands journaled after its last commit \
                 (the journal no longer reaches back to it); balances, open orders and books \
                 are exact"
            );
        }
        drop(st);
        self.history_floor
            .fetch_max(engine.seq(), Ordering::Release);
        self.applied.send_replace(engine.seq());
        self.persisted.send_replace(engine.seq());
        Ok(())
    }

    /// The state of `engine` into `st`: accounts, balances, open orders (their records from
    /// SQLite), books, depth sequences, and recent public trades from SQLite.
    fn seed_state(&self, st: &mut State, engine: &Engine) -> Result<(), crate::store::StoreError> {
        use matching_engine::{AccountId, AssetId};
        *self.auditor.lock().unwrap_or_else(|e| e.into_inner()) =
            crate::audit::Auditor::seed(engine);
        let n_assets = self.markets.assets.len();
        for a in 0..engine.account_count() as u32 {
            if !engine.account_exists(AccountId(a)) {
                continue;
            }
            st.accounts.insert(a);
            let bal: Vec<(u64, u64)> = (0..n_assets)
                .map(|i| {
                    engine
                        .balance(AccountId(a), AssetId(i as u16))
                        .map_or((0, 0), |(f, h)| (f.0, h.0))
                })
                .collect();
            st.balances.insert(a, bal);
            for v in engine.open_orders(AccountId(a), None) {
                let stored = self.store.order(a, v.id.0)?;
                let kind = match (v.stop, v.meta.post_only, v.price.0) {
                    (Some(_), _, 0) if v.take_profit => OrdKind::TakeProfit,
                    (Some(_), _, _) if v.take_profit => OrdKind::TakeProfitLimit,
                    (Some(_), _, 0) => OrdKind::StopLoss,
                    (Some(_), _, _) => OrdKind::StopLossLimit,
                    (None, true, _) => OrdKind::LimitMaker,
                    (None, false, _) => OrdKind::Limit,
                };
                let mut o = stored.unwrap_or(OrderRec {
                    id: v.id.0,
                    account: a,
                    market: v.market.0,
                    client_id: v
                        .meta
                        .client_id
                        .map(|c| c.as_str().to_owned())
                        .unwrap_or_default(),
                    side: v.side,
                    kind,
                    tif: v.meta.tif,
                    price: v.price.0,
                    stop: v.stop.map_or(0, |p| p.0),
                    orig_qty: v.meta.orig_qty.0,
                    orig_quote: 0,
                    executed: 0,
                    cum_quote: 0,
                    status: OrdStatus::New,
                    stp: v.meta.stp,
                    time_ms: 0,
                    update_ms: 0,
                    working_ms: None,
                    list_id: v.list.map(|l| l.0),
                });
                o.price = v.price.0;
                o.executed = v.meta.filled.0;
                o.orig_qty = v.meta.orig_qty.0;
                o.status = if o.executed > 0 {
                    OrdStatus::PartiallyFilled
                } else {
                    OrdStatus::New
                };
                st.open_by_account.entry(a).or_default().insert(o.id);
                st.open.insert(o.id, o);
            }
            for l in engine.open_order_lists(AccountId(a)) {
                let leg = |id: matching_engine::OrderId| {
                    let c = st.open.get(&id.0).map(|o| o.client_id.clone());
                    (id.0, c.unwrap_or_default())
                };
                let mut rec = ListRec {
                    kind: ListKind::Oco,
                    id: l.id.0,
                    account: a,
                    market: l.market.0,
                    client_id: l
                        .client_id
                        .map(|c| c.as_str().to_owned())
                        .unwrap_or_default(),
                    legs: vec![leg(l.legs[0]), leg(l.legs[1])],
                    done: false,
                    time_ms: st.open.get(&l.legs[0].0).map_or(0, |o| o.time_ms),
                };
                // The placed pair of an OTOCO is an OCO in the engine under the list's id; its
                // working order (the id before the pair's: ids are taken at once) is in the
                // history with that list id. The list stays an OTOCO of three orders, as live.
                // Without that row (a gap in the history) it can only read as the OCO it is.
                if let Some(w) = l.legs[0].0.checked_sub(1) {
                    if let Some(o) = self.store.order(a, w)? {
                        if o.list_id == Some(l.id.0) && !st.open.contains_key(&w) {
                            rec.kind = ListKind::Otoco;
                            rec.legs.insert(0, (w, o.client_id));
                            rec.time_ms = o.time_ms;
                        }
                    }
                }
                add_list(st, rec);
            }
            // OTO/OTOCO lists waiting for their working order: the pending orders' rows are
            // in the history store (PENDING_NEW). A row missing there (a gap in the history:
            // the journal no longer reaches back to the list) is rebuilt from the engine, which
            // holds the pending order as it will be placed; its time is its list's.
            for l in engine.open_oto_lists(AccountId(a)) {
                let working = st.open.get(&l.working.0);
                let mut legs = vec![(
                    l.working.0,
                    working.map(|o| o.client_id.clone()).unwrap_or_default(),
                )];
                let list_ms = working.map_or(0, |o| o.time_ms);
                for (id, new) in l.pending.orders() {
                    let o = match self.store.order(a, id.0)? {
                        Some(o) => o,
                        None => OrderRec::pending(l.id.0, id, &new, list_ms),
                    };
                    legs.push((id.0, o.client_id.clone()));
                    st.pending.insert(id.0, o);
                }
                let rec = ListRec {
                    kind: match l.pending {
                        matching_engine::Pending::Order { .. } => ListKind::Oto,
                        matching_engine::Pending::Oco { .. } => ListKind::Otoco,
                    },
                    id: l.id.0,
                    account: a,
                    market: l.market.0,
                    client_id: l
                        .client_id
                        .map(|c| c.as_str().to_owned())
                        .unwrap_or_default(),
                    legs,
                    done: false,
                    time_ms: st.open.get(&l.working.0).map_or(0, |o| o.time_ms),
                };
                add_list(st, rec);
            }
        }
        for (i, spec) in self.markets.markets.iter().enumerate() {
            let m = &mut st.markets[i];
            if let Some(book) = engine.book(spec.id) {
                m.bids = book.levels(Side::Buy).collect();
                m.asks = book.levels(Side::Sell).collect();
            }
            m.depth_seq = engine.depth_seq(spec.id);
            for t in self.store.recent_trades(spec.id.0, 20_000)? {
                add_trade(m, &t);
            }
        }
        Ok(())
    }

    /// Empties the in-memory models (before seeding them again).
    fn reset(&self, st: &mut State) {
        *st = State::default();
        for _ in &self.markets.markets {
            st.markets.push(MarketState {
                klines: vec![VecDeque::new(); INTERVALS.len()],
                ..Default::default()
            });
        }
    }

    /// Starts the start-up replay: reads the history's floor (the last `seq` SQLite committed).
    /// Recover the engine with [`matching_engine::recovery::Store::open_from`] from
    /// [`Regenerator::floor`], handing every step to [`Regenerator::visit`], then call
    /// [`Regenerator::finish`] with the recovered engine before the first batch.
    pub fn regenerate(&self) -> Result<Regenerator<'_>, crate::store::StoreError> {
        Ok(Regenerator {
            rm: self,
            floor: self.store.history_seq()?,
            conn: self.store.connect()?,
            orders: BTreeMap::new(),
            trades: Vec::new(),
            reached: false,
            seq: 0,
            commands: 0,
            error: None,
        })
    }

    /// An order of an account: open, just finished, or from history.
    pub fn find_order(
        &self,
        account: u32,
        id: u64,
    ) -> Result<Option<OrderRec>, crate::store::StoreError> {
        {
            let st = self.read();
            // A pending order's latest record is in `pending` (its row may be missing from
            // the history after a gap: rebuilt from the engine at start-up).
            if let Some(o) = st
                .open
                .get(&id)
                .or_else(|| st.pending.get(&id))
                .or_else(|| st.unpersisted.order(id))
            {
                return Ok((o.account == account).then(|| o.clone()));
            }
        }
        self.store.order(account, id)
    }

    /// An order list of an account by id (live, or done and still in memory).
    pub fn order_list(&self, account: u32, id: u64) -> Option<ListRec> {
        self.read()
            .lists
            .get(&id)
            .filter(|l| l.account == account)
            .cloned()
    }

    /// The latest order list of an account with this `listClientOrderId`.
    pub fn order_list_by_client(&self, account: u32, client: &str) -> Option<ListRec> {
        let st = self.read();
        st.lists_by_account
            .get(&account)?
            .iter()
            .rev()
            .filter_map(|id| st.lists.get(id))
            .find(|l| l.client_id == client)
            .cloned()
    }

    /// The order lists of an account by id: the live ones, or all still in memory.
    pub fn order_lists(&self, account: u32, live_only: bool) -> Vec<ListRec> {
        let st = self.read();
        st.lists_by_account
            .get(&account)
            .into_iter()
            .flatten()
            .filter_map(|id| st.lists.get(id))
            .filter(|l| !(live_only && l.done))
            .cloned()
            .collect()
    }

    /// A page of an account's order lists (`GET /api/v3/allOrderList`), oldest first: from
    /// list id `from_id` on, or else the newest `limit` created in `[start, end]`. Only the
    /// `limit` answered are copied (review: every list of the account, up to 100,000, was
    /// copied under the read lock before the page was cut from them).
    pub fn order_lists_page(
        &self,
        account: u32,
        from_id: Option<u64>,
        (start, end): (Option<u64>, Option<u64>),
        limit: usize,
    ) -> Vec<ListRec> {
        let st = self.read();
        let Some(ids) = st.lists_by_account.get(&account) else {
            return Vec::new();
        };
        let in_time = |l: &&ListRec| {
            start.is_none_or(|s| l.time_ms >= s) && end.is_none_or(|e| l.time_ms <= e)
        };
        match from_id {
            Some(f) => ids
                .range(f..)
                .filter_map(|id| st.lists.get(id))
                .filter(in_time)
                .take(limit)
                .cloned()
                .collect(),
            None => {
                let mut page: Vec<ListRec> = ids
                    .iter()
                    .rev()
                    .filter_map(|id| st.lists.get(id))
                    .filter(in_time)
                    .take(limit)
                    .cloned()
                    .collect();
                page.reverse();
                page
            }
        }
    }

    /// An order by client id, in `market` when given (Binance scopes a client order id to its
    /// symbol: the same id may name a newer order in another market): an open one first, else
    /// the latest in history.
    pub fn find_order_by_client(
        &self,
        account: u32,
        market: Option<u16>,
        client: &str,
    ) -> Result<Option<OrderRec>, crate::store::StoreError> {
        let named = |o: &OrderRec| o.client_id == client && market.is_none_or(|m| o.market == m);
        {
            let st = self.read();
            if let Some(ids) = st.open_by_account.get(&account) {
                for id in ids.iter().rev() {
                    if let Some(o) = st.open.get(id) {
                        if named(o) {
                            return Ok(Some(o.clone()));
                        }
                    }
                }
            }
            if let Some(o) = st
                .pending
                .values()
                .find(|o| o.account == account && named(o))
            {
                return Ok(Some(o.clone()));
            }
            let latest = st
                .unpersisted
                .orders_of(account)
                .rev()
                .find(|o| named(o))
                .cloned();
            if latest.is_some() {
                return Ok(latest);
            }
        }
        self.store.order_by_client(account, market, client)
    }
}

/// The start-up replay of the read models from the history's floor (see the module docs and
/// [`ReadModel::regenerate`]).
pub struct Regenerator<'a> {
    rm: &'a ReadModel,
    floor: u64,
    conn: rusqlite::Connection,
    /// Rows not yet written (the latest version of each order).
    orders: BTreeMap<u64, OrderRec>,
    trades: Vec<TradeRec>,
    /// The floor was reached: the models were seeded there.
    reached: bool,
    /// The last command applied.
    seq: u64,
    /// Commands applied above the floor.
    commands: u64,
    /// The first failure (the rest of the replay is then ignored).
    error: Option<crate::store::StoreError>,
}

impl std::fmt::Debug for Regenerator<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Regenerator")
            .field("floor", &self.floor)
            .field("reached", &self.reached)
            .field("seq", &self.seq)
            .field("commands", &self.commands)
            .finish_non_exhaustive()
    }
}

impl Regenerator<'_> {
    /// The last engine `seq` the SQLite history committed: replay from here.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// One step of the engine's recovery: at the floor, seeds the models from the engine there;
    /// above it, applies the command's events as a live batch and queues its history rows.
    pub fn visit(&mut self, step: Replayed<'_, Engine>) {
        if self.error.is_some() {
            return;
        }
        match step {
            Replayed::Floor(engine) => {
                let mut st = self.rm.state.write().unwrap_or_else(|e| e.into_inner());
                self.rm.reset(&mut st);
                if let Err(e) = self.rm.seed_state(&mut st, engine) {
                    self.error = Some(e);
                }
                self.reached = true;
                self.seq = engine.seq();
            }
            Replayed::Command { seq, time, events } => {
                if !self.reached {
                    return;
                }
                let mut out = Out::default();
                {
                    let mut st = self.rm.state.write().unwrap_or_else(|e| e.into_inner());
                    let audited = self
                        .rm
                        .auditor
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .fold_events(seq, events);
                    if let Err(v) = audited {
                        self.rm.trip(v);
                    }
                    apply_events(&mut st, &self.rm.markets, time, events, &mut out);
                }
                self.orders.append(&mut out.orders);
                self.trades.append(&mut out.trades);
                self.seq = seq;
                self.commands += 1;
                if self.orders.len() + self.trades.len() >= PERSIST_ROWS {
                    if let Err(e) = self.write() {
                        self.error = Some(e);
                    }
                }
            }
        }
    }

    fn write(&mut self) -> Result<(), crate::store::StoreError> {
        let rows: Vec<OrderRec> = std::mem::take(&mut self.orders).into_values().collect();
        Store::write_history(&mut self.conn, &rows, &self.trades, self.seq)?;
        self.trades.clear();
        Ok(())
    }

    /// Ends the start-up replay with the recovered `engine`: writes the remaining history rows
    /// (history then reaches `engine.seq()`), checks the models against the engine, and marks
    /// everything applied. When the floor was not reached, seeds from `engine` and reports the
    /// gap ([`ReadModel::seed`]). Returns the number of commands whose history was regenerated.
    pub fn finish(mut self, engine: &Engine) -> Result<u64, crate::store::StoreError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if !self.reached {
            let mut st = self.rm.state.write().unwrap_or_else(|e| e.into_inner());
            self.rm.reset(&mut st);
            drop(st);
            self.rm.seed(engine)?;
            return Ok(0);
        }
        assert_eq!(
            self.seq,
            engine.seq(),
            "the replay reached the engine's state"
        );
        if self.commands > 0 {
            self.write()?;
        }
        let rm = self.rm;
        let mut st = rm.state.write().unwrap_or_else(|e| e.into_inner());
        if let Err(what) = rm.diverges_from(&st, engine) {
            // A bug: the models must equal the engine's state (tests stop here). Balances,
            // orders and books come from the engine then; the history rows written stay.
            if cfg!(debug_assertions) {
                panic!("read models after the replay differ from the engine: {what}");
            }
            tracing::error!(
                what,
                "read models after the replay differ from the engine; reseeding"
            );
            rm.reset(&mut st);
            rm.seed_state(&mut st, engine)?;
        }
        st.history_gap = 0;
        drop(st);
        if self.commands > 0 {
            tracing::warn!(
                from_seq = self.floor + 1,
                to_seq = engine.seq(),
                "regenerated the order and trade history of the commands journaled after its \
                 last commit"
            );
        }
        rm.history_floor.fetch_max(engine.seq(), Ordering::Release);
        rm.applied.send_replace(engine.seq());
        rm.persisted.send_replace(engine.seq());
        Ok(self.commands)
    }
}

impl ReadModel {
    /// `Ok` when the in-memory models hold `engine`'s accounts, balances, open orders, books and
    /// depth sequences; else what differs first.
    pub fn check_against(&self, engine: &Engine) -> Result<(), String> {
        self.diverges_from(&self.read(), engine)
    }

    fn diverges_from(&self, st: &State, engine: &Engine) -> Result<(), String> {
        use matching_engine::{AccountId, AssetId};
        let mut accounts = BTreeSet::new();
        for a in 0..engine.account_count() as u32 {
            if !engine.account_exists(AccountId(a)) {
                continue;
            }
            accounts.insert(a);
            for i in 0..self.markets.assets.len() {
                let want = engine
                    .balance(AccountId(a), AssetId(i as u16))
                    .map_or((0, 0), |(f, h)| (f.0, h.0));
                let have = st.balances.get(&a).and_then(|v| v.get(i).copied());
                if have.unwrap_or((0, 0)) != want {
                    return Err(format!("account {a} asset {i}: {have:?}, engine {want:?}"));
                }
            }
            let want: BTreeSet<u64> = engine
                .open_orders(AccountId(a), None)
                .iter()
                .map(|v| v.id.0)
                .collect();
            let have = st.open_by_account.get(&a).cloned().unwrap_or_default();
            if have != want {
                return Err(format!(
                    "account {a} open orders: {have:?}, engine {want:?}"
                ));
            }
        }
        if st.accounts != accounts {
            return Err("accounts".into());
        }
        for (i, spec) in self.markets.markets.iter().enumerate() {
            let m = &st.markets[i];
            if m.depth_seq != engine.depth_seq(spec.id) {
                return Err(format!("market {i} depth sequence"));
            }
            if let Some(book) = engine.book(spec.id) {
                let bids: BTreeMap<Price, Qty> = book.levels(Side::Buy).collect();
                let asks: BTreeMap<Price, Qty> = book.levels(Side::Sell).collect();
                if m.bids != bids || m.asks != asks {
                    return Err(format!("market {i} book"));
                }
            }
        }
        Ok(())
    }
}

impl OrderRec {
    /// The record of a pending order (`PENDING_NEW`) of the OTO/OTOCO list `list`, placed with
    /// its list at `ms` (`Event::OrderPending`).
    pub fn pending(
        list: u64,
        id: matching_engine::OrderId,
        new: &matching_engine::NewOrder,
        ms: u64,
    ) -> Self {
        let info = matching_engine::OrderInfo {
            order: id,
            account: new.account,
            market: new.market,
            side: new.side,
            client_id: new.client_id,
        };
        let mut o = OrderRec::placed(info, &new.order_type, new.tif, new.post_only, new.stp, ms);
        o.status = OrdStatus::PendingNew;
        o.working_ms = None;
        o.list_id = Some(list);
        o
    }

    /// The record of an order just placed (`Event::OrderNew`), at `ms`.
    pub fn placed(
        info: matching_engine::OrderInfo,
        order_type: &OrderType,
        tif: TimeInForce,
        post_only: bool,
        stp: StpMode,
        ms: u64,
    ) -> Self {
        let (kind, price, stop, qty, quote) = kind_of(order_type, post_only);
        OrderRec {
            id: info.order.0,
            account: info.account.0,
            market: info.market.0,
            client_id: info
                .client_id
                .map(|c| c.as_str().to_owned())
                .unwrap_or_default(),
            side: info.side,
            kind,
            tif: if matches!(
                kind,
                OrdKind::Market | OrdKind::StopLoss | OrdKind::TakeProfit
            ) {
                TimeInForce::Gtc
            } else {
                tif
            },
            price,
            stop,
            orig_qty: qty,
            orig_quote: quote,
            executed: 0,
            cum_quote: 0,
            status: OrdStatus::New,
            stp,
            time_ms: ms,
            update_ms: ms,
            working_ms: if stop == 0 { Some(ms) } else { None },
            list_id: None,
        }
    }
}

fn kind_of(t: &OrderType, post_only: bool) -> (OrdKind, u64, u64, u64, u64) {
    match *t {
        OrderType::Limit { price, qty } => (
            if post_only {
                OrdKind::LimitMaker
            } else {
                OrdKind::Limit
            },
            price.0,
            0,
            qty.0,
            0,
        ),
        OrderType::Market { qty } => (OrdKind::Market, 0, 0, qty.0, 0),
        OrderType::MarketBudget { budget } => (OrdKind::Market, 0, 0, 0, budget.0),
        OrderType::StopLimit { stop, price, qty } => {
            (OrdKind::StopLossLimit, price.0, stop.0, qty.0, 0)
        }
        OrderType::StopMarket { stop, qty } => (OrdKind::StopLoss, 0, stop.0, qty.0, 0),
        OrderType::TakeProfitLimit { stop, price, qty } => {
            (OrdKind::TakeProfitLimit, price.0, stop.0, qty.0, 0)
        }
        OrderType::TakeProfitMarket { stop, qty } => (OrdKind::TakeProfit, 0, stop.0, qty.0, 0),
    }
}

/// Binance's user-data `listStatus` event for an order list.
pub fn list_status_event(markets: &Markets, l: &ListRec, ms: u64) -> String {
    let symbol = markets
        .markets
        .get(usize::from(l.market))
        .map_or("", |m| m.symbol.as_str());
    let (st, ost) = if l.done {
        ("ALL_DONE", "ALL_DONE")
    } else {
        ("EXEC_STARTED", "EXECUTING")
    };
    serde_json::json!({
        "e": "listStatus",
        "E": ms,
        "s": symbol,
        "g": l.id,
        "c": l.kind.as_str(),
        "l": st,
        "L": ost,
        "r": "NONE",
        "C": l.client_id,
        "T": ms,
        "O": l.legs.iter().map(|(id, c)| serde_json::json!({"s": symbol, "i": id, "c": c})).collect::<Vec<_>>(),
    })
    .to_string()
}

/// Binance's `executionReport` for an order after an event.
pub fn execution_report(
    markets: &Markets,
    o: &OrderRec,
    exec_type: &str,
    time_ms: u64,
    trade: Option<(&TradeRec, bool)>,
) -> String {
    let m = markets.get(MarketId(o.market));
    let (last_qty, last_price, fee, trade_id, is_maker, last_quote) = match trade {
        Some((t, maker)) => (
            t.qty,
            t.price,
            if maker { t.maker_fee } else { t.taker_fee },
            t.id as i64,
            maker,
            t.quote,
        ),
        None => (0, 0, 0, -1, false, 0),
    };
    json!({
        "e": "executionReport",
        "E": time_ms,
        "s": m.symbol,
        "c": o.client_id,
        "S": side_str(o.side),
        "o": o.kind.as_str(),
        "f": tif_str(o.tif),
        "q": m.fmt_qty(Qty(o.orig_qty)),
        "p": m.fmt_price(Price(o.price)),
        "P": m.fmt_price(Price(o.stop)),
        "F": "0.00000000",
        "g": o.list_id.map_or(-1, |l| l as i64),
        "C": if exec_type == "CANCELED" { o.client_id.as_str() } else { "" },
        "x": exec_type,
        "X": o.status.as_str(),
        "r": "NONE",
        "i": o.id,
        "l": m.fmt_qty(Qty(last_qty)),
        "z": m.fmt_qty(Qty(o.executed)),
        "L": m.fmt_price(Price(last_price)),
        "n": m.fmt_quote(u128::from(fee)),
        "N": if trade.is_some() { Some(m.quote.symbol.as_str()) } else { None },
        "T": time_ms,
        "t": trade_id,
        "v": 0,
        "I": 0,
        "w": o.is_open() && o.working_ms.is_some(),
        "m": is_maker,
        "M": false,
        "O": o.time_ms,
        "Z": m.fmt_quote(u128::from(o.cum_quote)),
        "Y": m.fmt_quote(u128::from(last_quote)),
        "Q": m.fmt_quote(u128::from(o.orig_quote)),
        "W": o.working_ms.map_or(-1, |w| w as i64),
        "V": stp_str(o.stp),
    })
    .to_string()
}

/// Adds a trade to a market's recent trades and klines.
fn add_trade(m: &mut MarketState, t: &TradeRec) {
    for (i, (_, len)) in INTERVALS.iter().enumerate() {
        let (open, close) = bucket(t.time_ms, *len);
        let ks = &mut m.klines[i];
        if ks.back().is_none_or(|k| k.open_ms != open) {
            ks.push_back(Kline {
                open_ms: open,
                close_ms: close,
                open: t.price,
                high: t.price,
                low: t.price,
                close: t.price,
                first_id: t.id,
                ..Default::default()
            });
            if ks.len() > KLINES_KEPT {
                ks.pop_front();
            }
        }
        if let Some(k) = ks.back_mut() {
            k.high = k.high.max(t.price);
            k.low = k.low.min(t.price);
            k.close = t.price;
            k.volume += u128::from(t.qty);
            k.quote += u128::from(t.quote);
            k.trades += 1;
            k.last_id = t.id;
            if t.taker_side == Side::Buy {
                k.taker_buy_volume += u128::from(t.qty);
                k.taker_buy_quote += u128::from(t.quote);
            }
        }
    }
    m.trades.push_back(t.clone());
    if m.trades.len() > TRADES_KEPT {
        m.trades.pop_front();
    }
    let sec = t.time_ms / 1000;
    match m.avg_window.back_mut() {
        Some((s, quote, lots)) if *s == sec => {
            *quote += u128::from(t.quote);
            *lots += u128::from(t.qty);
        }
        _ => m
            .avg_window
            .push_back((sec, u128::from(t.quote), u128::from(t.qty))),
    }
    while m
        .avg_window
        .front()
        .is_some_and(|(s, _, _)| s + AVG_WINDOW_SECS < sec)
    {
        m.avg_window.pop_front();
    }
}

/// `avgPrice`'s window, in seconds.
pub const AVG_WINDOW_SECS: u64 = 300;

/// Keeps an order list (and its place in its account's index).
fn add_list(st: &mut State, rec: ListRec) {
    st.lists_by_account
        .entry(rec.account)
        .or_default()
        .insert(rec.id);
    st.lists.insert(rec.id, rec);
}

/// An order list is done (`ALL_DONE`): its status goes out, and it is kept among the last
/// [`MAX_DONE_LISTS`] done ones.
fn list_done(st: &mut State, markets: &Markets, list: u64, ms: u64, out: &mut Out) {
    if let Some(l) = st.lists.get_mut(&list) {
        if l.done {
            return;
        }
        l.done = true;
        let l = l.clone();
        out.push_user(|| UserMsg {
            account: l.account,
            json: list_status_event(markets, &l, ms).into(),
        });
        st.done_lists.push_back(list);
        while st.done_lists.len() > MAX_DONE_LISTS {
            if let Some(old) = st.done_lists.pop_front() {
                if let Some(l) = st.lists.remove(&old) {
                    if let Some(ids) = st.lists_by_account.get_mut(&l.account) {
                        ids.remove(&old);
                        if ids.is_empty() {
                            st.lists_by_account.remove(&l.account);
                        }
                    }
                }
            }
        }
    }
}

fn finish(st: &mut State, id: u64, out: &mut Out) -> Option<OrderRec> {
    let o = st.open.remove(&id)?;
    if let Some(ids) = st.open_by_account.get_mut(&o.account) {
        ids.remove(&id);
    }
    out.orders.insert(o.id, o.clone());
    Some(o)
}

fn apply_batch(st: &mut State, markets: &Markets, b: &EventBatch, out: &mut Out) {
    apply_events(st, markets, b.time, &b.events, out);
}

fn apply_events(
    st: &mut State,
    markets: &Markets,
    time: Timestamp,
    events: &[Event],
    out: &mut Out,
) {
    let mut ms = time.as_millis();
    st.counters.batches += 1;
    // Depth diffs of this batch per market: (first seq, last seq, bids, asks).
    let mut depth: BTreeMap<usize, DiffBuild> = BTreeMap::new();
    let mut touched_best: BTreeSet<usize> = BTreeSet::new();
    let mut balances_changed: BTreeMap<u32, BTreeSet<u16>> = BTreeMap::new();
    for ev in events {
        match *ev {
            Event::Accepted { time, .. } => ms = time.as_millis(),
            Event::AccountCreated { account } => {
                st.accounts.insert(account.0);
                st.balances
                    .entry(account.0)
                    .or_insert_with(|| vec![(0, 0); markets.assets.len()]);
            }
            Event::OrderNew {
                info,
                order_type,
                tif,
                post_only,
                stp,
            } => {
                st.counters.orders += 1;
                let mut o = OrderRec::placed(info, &order_type, tif, post_only, stp, ms);
                // The legs of a list follow its OrderListNew in the same command; the list's
                // status goes out after the last leg's report.
                let mut started = None;
                if let Some(p) = st.pending.remove(&o.id) {
                    // A pending order of an OTO/OTOCO placed now: it stays in its list.
                    o.list_id = p.list_id;
                    o.time_ms = p.time_ms;
                } else if let Some(l) = st.lists.values_mut().next_back() {
                    // An OCO starts with its second leg; an OTO/OTOCO with its working order
                    // (its pending orders came before it).
                    let last = match l.kind {
                        ListKind::Oco => l.legs.get(1).map(|x| x.0),
                        ListKind::Oto | ListKind::Otoco => l.legs.first().map(|x| x.0),
                    };
                    if let Some(leg) = l.legs.iter_mut().find(|(id, _)| *id == o.id) {
                        leg.1 = o.client_id.clone();
                        o.list_id = Some(l.id);
                        if last == Some(o.id) {
                            started = Some(l.clone());
                        }
                    }
                }
                out.push_user(|| UserMsg {
                    account: o.account,
                    json: execution_report(markets, &o, "NEW", ms, None).into(),
                });
                if let Some(l) = started {
                    out.push_user(|| UserMsg {
                        account: l.account,
                        json: list_status_event(markets, &l, ms).into(),
                    });
                }
                out.orders.insert(o.id, o.clone());
                st.open_by_account
                    .entry(o.account)
                    .or_default()
                    .insert(o.id);
                st.open.insert(o.id, o);
            }
            Event::OrderTriggered { info, .. } => {
                if let Some(o) = st.open.get_mut(&info.order.0) {
                    o.working_ms = Some(ms);
                    o.update_ms = ms;
                }
            }
            Event::OrderAmended {
                info, price, qty, ..
            } => {
                if let Some(o) = st.open.get_mut(&info.order.0) {
                    o.price = price.0;
                    o.orig_qty = qty.0;
                    o.update_ms = ms;
                    let o = o.clone();
                    out.push_user(|| UserMsg {
                        account: o.account,
                        json: execution_report(markets, &o, "REPLACED", ms, None).into(),
                    });
                    out.orders.insert(o.id, o);
                }
            }
            Event::Trade {
                trade,
                market,
                price,
                qty,
                taker_side,
                maker_order,
                taker_order,
                maker_account,
                taker_account,
                maker_fee,
                taker_fee,
                notional,
                maker_remaining,
                taker_remaining,
            } => {
                st.counters.trades += 1;
                let t = TradeRec {
                    id: trade.0,
                    market: market.0,
                    price: price.0,
                    qty: qty.0,
                    quote: notional.0,
                    taker_side,
                    maker_order: maker_order.0,
                    taker_order: taker_order.0,
                    maker_account: maker_account.0,
                    taker_account: taker_account.0,
                    maker_fee: maker_fee.0,
                    taker_fee: taker_fee.0,
                    time_ms: ms,
                };
                for (oid, remaining, maker) in [
                    (maker_order.0, maker_remaining, true),
                    (taker_order.0, taker_remaining, false),
                ] {
                    if let Some(o) = st.open.get_mut(&oid) {
                        o.executed += qty.0;
                        o.cum_quote = o.cum_quote.saturating_add(notional.0);
                        o.update_ms = ms;
                        o.status = if remaining.is_zero() && o.orig_quote == 0 {
                            OrdStatus::Filled
                        } else {
                            OrdStatus::PartiallyFilled
                        };
                        if o.orig_quote != 0 {
                            o.orig_qty = o.executed;
                        }
                        out.push_user(|| UserMsg {
                            account: o.account,
                            json: execution_report(markets, o, "TRADE", ms, Some((&t, maker)))
                                .into(),
                        });
                        out.orders.insert(o.id, o.clone());
                    }
                }
                let mi = usize::from(market.0);
                let spec = markets.get(market);
                out.push_market(|| MarketMsg {
                    market: mi,
                    kind: MarketMsgKind::Trade,
                    combined: OnceLock::new(),
                    json: json!({
                        "e": "trade", "E": ms, "s": spec.symbol, "t": t.id,
                        "p": spec.fmt_price(price), "q": spec.fmt_qty(qty), "T": ms,
                        "m": taker_side == Side::Sell, "M": true,
                    })
                    .to_string()
                    .into(),
                });
                add_trade(&mut st.markets[mi], &t);
                out.trades.push(t);
            }
            Event::OrderDone { info, reason, .. } => {
                let id = info.order.0;
                if let Some(o) = st.open.get_mut(&id) {
                    let status = OrdStatus::done(reason, o.orig_quote != 0, o.executed > 0);
                    let exec = match status {
                        OrdStatus::Canceled => Some("CANCELED"),
                        OrdStatus::Expired => Some("EXPIRED"),
                        OrdStatus::ExpiredInMatch => Some("TRADE_PREVENTION"),
                        _ => None,
                    };
                    o.status = status;
                    o.update_ms = ms;
                    if let Some(x) = exec {
                        out.push_user(|| UserMsg {
                            account: o.account,
                            json: execution_report(markets, o, x, ms, None).into(),
                        });
                    }
                }
                finish(st, id, out);
            }
            Event::Balance {
                account,
                asset,
                available,
                held,
            } => {
                let v = st
                    .balances
                    .entry(account.0)
                    .or_insert_with(|| vec![(0, 0); markets.assets.len()]);
                if let Some(slot) = v.get_mut(usize::from(asset.0)) {
                    *slot = (available.0, held.0);
                }
                balances_changed
                    .entry(account.0)
                    .or_default()
                    .insert(asset.0);
            }
            Event::Depth {
                market,
                seq,
                side,
                price,
                qty,
            } => {
                let mi = usize::from(market.0);
                let m = &mut st.markets[mi];
                let book = if side == Side::Buy {
                    &mut m.bids
                } else {
                    &mut m.asks
                };
                if qty.is_zero() {
                    book.remove(&price);
                } else {
                    book.insert(price, qty);
                }
                m.depth_seq = seq;
                touched_best.insert(mi);
                if out.want_market {
                    let spec = markets.get(market);
                    let e = depth
                        .entry(mi)
                        .or_insert((seq, seq, Vec::new(), Vec::new()));
                    e.1 = seq;
                    let level = [spec.fmt_price(price), spec.fmt_qty(qty)];
                    if side == Side::Buy {
                        e.2.push(level);
                    } else {
                        e.3.push(level);
                    }
                }
            }
            Event::Credited {
                account,
                asset,
                amount,
                ..
            } => {
                out.push_user(|| UserMsg {
                    account: account.0,
                    json: json!({
                        "e": "balanceUpdate", "E": ms,
                        "a": markets.assets[usize::from(asset.0)].symbol,
                        "d": markets.fmt_amount(asset, amount.0), "T": ms,
                    })
                    .to_string()
                    .into(),
                });
            }
            Event::Transferred {
                from,
                to,
                asset,
                amount,
                ..
            } => {
                let a = &markets.assets[usize::from(asset.0)].symbol;
                let d = markets.fmt_amount(asset, amount.0);
                out.push_user(|| UserMsg {
                    account: from.0,
                    json: json!({"e": "balanceUpdate", "E": ms, "a": a, "d": format!("-{d}"), "T": ms})
                        .to_string().into(),
                });
                out.push_user(|| UserMsg {
                    account: to.0,
                    json: json!({"e": "balanceUpdate", "E": ms, "a": a, "d": d, "T": ms})
                        .to_string()
                        .into(),
                });
            }
            Event::Rejected { .. }
            | Event::WithdrawalHeld { .. }
            | Event::WithdrawalReleased { .. }
            | Event::WithdrawalCompleted { .. }
            | Event::WithdrawalStatus { .. }
            | Event::CreditStatus { .. }
            | Event::TransferStatus { .. } => {}
            Event::OrderListNew { list, .. } if st.lists.contains_key(&list.0) => {
                // The pending pair of an OTOCO placed as an OCO: the list goes on.
            }
            Event::OrderListNew {
                list,
                account,
                market,
                legs,
                client_id,
            } => {
                let rec = ListRec {
                    kind: ListKind::Oco,
                    id: list.0,
                    account: account.0,
                    market: market.0,
                    client_id: client_id.map(|c| c.as_str().to_owned()).unwrap_or_default(),
                    legs: vec![(legs[0].0, String::new()), (legs[1].0, String::new())],
                    done: false,
                    time_ms: ms,
                };
                add_list(st, rec);
            }
            Event::OrderListDone { list, .. } => list_done(st, markets, list.0, ms, out),
            Event::OtoNew {
                list,
                account,
                market,
                working,
                client_id,
                otoco,
            } => {
                let rec = ListRec {
                    kind: if otoco {
                        ListKind::Otoco
                    } else {
                        ListKind::Oto
                    },
                    id: list.0,
                    account: account.0,
                    market: market.0,
                    client_id: client_id.map(|c| c.as_str().to_owned()).unwrap_or_default(),
                    legs: vec![(working.0, String::new())],
                    done: false,
                    time_ms: ms,
                };
                add_list(st, rec);
            }
            Event::OrderPending { order, new } => {
                // It follows its list's OtoNew, and the working order's OrderNew follows it.
                if let Some(l) = st.lists.values_mut().next_back() {
                    let o = OrderRec::pending(l.id, order, &new, ms);
                    l.legs.push((o.id, o.client_id.clone()));
                    out.orders.insert(o.id, o.clone());
                    st.pending.insert(o.id, o);
                }
            }
            Event::OtoDone { list, outcome, .. } => {
                let Some(l) = st.lists.get(&list.0).cloned() else {
                    continue;
                };
                // Pending orders not placed end with the list: CANCELED with a cancelled
                // working order, EXPIRED otherwise (Binance's statuses for them).
                let status = match outcome {
                    OtoOutcome::Cancelled(DoneReason::Cancelled) => OrdStatus::Canceled,
                    _ => OrdStatus::Expired,
                };
                for (id, _) in &l.legs[1..] {
                    if let Some(mut o) = st.pending.remove(id) {
                        o.status = status;
                        o.update_ms = ms;
                        out.push_user(|| UserMsg {
                            account: o.account,
                            json: execution_report(markets, &o, status.as_str(), ms, None).into(),
                        });
                        out.orders.insert(o.id, o);
                    }
                }
                // An OTOCO's placed pair goes on as an OCO (its OrderListDone ends the list).
                if !(l.kind == ListKind::Otoco && outcome == OtoOutcome::Placed) {
                    list_done(st, markets, list.0, ms, out);
                }
            }
        }
    }
    for (mi, (first, last, b_levels, a_levels)) in depth {
        let spec = &markets.markets[mi];
        out.push_market(|| MarketMsg {
            market: mi,
            kind: MarketMsgKind::Depth,
            combined: OnceLock::new(),
            json: json!({
                "e": "depthUpdate", "E": ms, "s": spec.symbol,
                "U": first, "u": last, "b": b_levels, "a": a_levels,
            })
            .to_string()
            .into(),
        });
    }
    let want_market = out.want_market;
    for mi in touched_best.into_iter().filter(|_| want_market) {
        let spec = &markets.markets[mi];
        let m = &st.markets[mi];
        let (bid, ask) = m.best();
        let fmt = |x: Option<(Price, Qty)>| {
            x.map_or(
                ("0.00000000".to_owned(), "0.00000000".to_owned()),
                |(p, q)| (spec.fmt_price(p), spec.fmt_qty(q)),
            )
        };
        let (bp, bq) = fmt(bid);
        let (ap, aq) = fmt(ask);
        out.push_market(|| MarketMsg {
            market: mi,
            kind: MarketMsgKind::BookTicker,
            combined: OnceLock::new(),
            json: json!({"u": m.depth_seq, "s": spec.symbol, "b": bp, "B": bq, "a": ap, "A": aq})
                .to_string()
                .into(),
        });
    }
    if !out.want_user {
        return;
    }
    for (account, assets) in balances_changed {
        let Some(v) = st.balances.get(&account) else {
            continue;
        };
        let list: Vec<_> = assets
            .iter()
            .filter_map(|a| {
                let (f, l) = *v.get(usize::from(*a))?;
                let spec = &markets.assets[usize::from(*a)];
                Some(json!({
                    "a": spec.symbol,
                    "f": crate::decimal::format_units(f, spec.decimals),
                    "l": crate::decimal::format_units(l, spec.decimals),
                }))
            })
            .collect();
        out.push_user(|| UserMsg {
            account,
            json: json!({"e": "outboundAccountPosition", "E": ms, "u": ms, "B": list})
                .to_string()
                .into(),
        });
    }
}

/// The read models' input: the sink's channel, then (once a core attached one) the engine's
/// fan-out subscriber, read on this thread ([`crate::core::EventSink::attach`]).
///
/// Once attached, the channel is not read again: the durable core publishes only to the fan-out
/// (a batch or a second subscriber sent on the channel afterwards is never read).
struct Input<'a> {
    rx: &'a crossbeam::channel::Receiver<crate::core::SinkInput>,
    fanout: Option<Box<matching_engine::fanout::Subscriber<Event>>>,
    broken: &'a AtomicBool,
    /// The fan-out ended (closed, or this consumer dropped): nothing more, and said once.
    ended: bool,
}

impl Input<'_> {
    /// The next batch, waiting for it; `None` at the end (the sink dropped, the engine stopped,
    /// or the fan-out dropped this consumer: then the read models are marked broken).
    fn recv(&mut self) -> Option<EventBatch> {
        loop {
            if self.ended {
                return None;
            }
            if let Some(sub) = &mut self.fanout {
                let r = sub.recv();
                return self.end(r);
            }
            match self.rx.recv().ok()? {
                crate::core::SinkInput::Batch(b) => return Some(b),
                crate::core::SinkInput::Attach(sub) => self.fanout = Some(sub),
            }
        }
    }

    /// The next batch if one is there.
    fn try_recv(&mut self) -> Option<EventBatch> {
        loop {
            if self.ended {
                return None;
            }
            if let Some(sub) = &mut self.fanout {
                let r = sub.try_recv().transpose()?;
                return self.end(r);
            }
            match self.rx.try_recv().ok()? {
                crate::core::SinkInput::Batch(b) => return Some(b),
                crate::core::SinkInput::Attach(sub) => self.fanout = Some(sub),
            }
        }
    }

    fn end(
        &mut self,
        r: Result<matching_engine::fanout::Batch<Event>, matching_engine::fanout::RecvError>,
    ) -> Option<EventBatch> {
        if r.is_err() {
            self.ended = true;
        }
        match r {
            Ok(b) => Some(EventBatch::from(b)),
            Err(matching_engine::fanout::RecvError::Lagged { missed_from_seq }) => {
                tracing::error!(
                    missed_from_seq,
                    "read models fell behind the engine; restart to resync"
                );
                self.broken.store(true, Ordering::SeqCst);
                None
            }
            // The engine stopped (or an error this code does not know): the end of the input.
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fan_batch(seq: u64) -> matching_engine::fanout::Batch<Event> {
        matching_engine::fanout::Batch {
            first_seq: seq,
            last_seq: seq,
            events: Arc::from(Vec::<Event>::new()),
        }
    }

    #[test]
    fn the_read_models_read_the_sink_then_the_attached_fan_out_in_order() {
        let (tx, rx) = crossbeam::channel::bounded(8);
        let broken = AtomicBool::new(false);
        let mut fan = matching_engine::fanout::FanOut::<Event>::new(4);
        let sub = fan.subscriptions().subscribe(8).unwrap();
        let sent = EventBatch {
            seq: 1,
            time: Timestamp(5),
            events: Arc::from(Vec::<Event>::new()),
        };
        tx.send(crate::core::SinkInput::Batch(sent)).unwrap();
        tx.send(crate::core::SinkInput::Attach(Box::new(sub)))
            .unwrap();
        fan.publish(&fan_batch(2));
        fan.publish(&fan_batch(3));
        let mut input = Input {
            rx: &rx,
            fanout: None,
            broken: &broken,
            ended: false,
        };
        assert_eq!(
            input.recv().map(|b| (b.seq, b.time)),
            Some((1, Timestamp(5)))
        );
        assert_eq!(input.try_recv().map(|b| b.seq), Some(2));
        assert_eq!(input.recv().map(|b| b.seq), Some(3));
        assert!(input.try_recv().is_none(), "nothing more yet");
        // Once attached, the channel is no longer read: the engine publishes only to the fan-out.
        fan.close();
        assert!(input.recv().is_none(), "the engine stopped: the end");
        assert!(!broken.load(Ordering::SeqCst), "a clean end is not a loss");
    }

    #[test]
    fn read_models_that_the_fan_out_dropped_are_marked_broken() {
        let (tx, rx) = crossbeam::channel::bounded(8);
        let broken = AtomicBool::new(false);
        let mut fan = matching_engine::fanout::FanOut::<Event>::new(4);
        let sub = fan.subscriptions().subscribe(2).unwrap();
        tx.send(crate::core::SinkInput::Attach(Box::new(sub)))
            .unwrap();
        for seq in 1..=5 {
            fan.publish(&fan_batch(seq));
        }
        let mut input = Input {
            rx: &rx,
            fanout: None,
            broken: &broken,
            ended: false,
        };
        let mut seen = Vec::new();
        while let Some(b) = input.recv() {
            seen.push(b.seq);
        }
        assert_eq!(
            seen,
            [1, 2],
            "what was queued before the drop, then the end"
        );
        assert!(broken.load(Ordering::SeqCst));
    }

    fn order_row(id: u64, account: u32, market: u16) -> OrderRec {
        OrderRec {
            id,
            account,
            market,
            client_id: format!("c{}", id % 97),
            side: Side::Buy,
            kind: OrdKind::Limit,
            tif: TimeInForce::Gtc,
            price: 100,
            stop: 0,
            orig_qty: 1,
            orig_quote: 0,
            executed: 0,
            cum_quote: 0,
            status: OrdStatus::New,
            stp: StpMode::None,
            time_ms: id,
            update_ms: id,
            working_ms: Some(id),
            list_id: None,
        }
    }

    fn trade_row(id: u64, maker: u32, taker: u32, market: u16) -> TradeRec {
        TradeRec {
            id,
            market,
            price: 100,
            qty: 1,
            quote: 100,
            taker_side: Side::Buy,
            maker_order: id,
            taker_order: id,
            maker_account: maker,
            taker_account: taker,
            maker_fee: 0,
            taker_fee: 0,
            time_ms: id,
        }
    }

    /// Queries for one account read only that account's rows among those waiting in memory
    /// ([`Unpersisted`]'s per-account index): with 20,000 order rows and trades of 50 accounts
    /// pending, `allOrders`, `myTrades` and an order by client id answer exactly what a scan of
    /// every row finds, ascending, before and after the history thread drops committed rows.
    #[test]
    fn a_query_reads_only_its_accounts_pending_rows_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("h.sqlite")).unwrap());
        let markets = Arc::new(Markets::new(&matching_engine::EngineConfig::default()).unwrap());
        let rm = ReadModel::new(markets, store, 16);
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        {
            let mut st = rm.state.write().unwrap();
            for id in 1..=20_000u64 {
                let generation = id / 1_000 + 1;
                let market = u16::from(id % 3 == 0);
                let account = (next() % 50) as u32;
                st.unpersisted
                    .insert_order(order_row(id, account, market), generation);
                // Some self-trades (maker and taker the same account).
                let (maker, taker) = ((next() % 50) as u32, (next() % 50) as u32);
                st.unpersisted
                    .push_trade(trade_row(id, maker, taker, market), generation);
            }
            // A later version of some rows, from a later group (groups come in order).
            for id in (10..=20_000u64).step_by(10) {
                let mut o = st.unpersisted.order(id).unwrap().clone();
                o.status = OrdStatus::Filled;
                st.unpersisted.insert_order(o, 100);
            }
        }
        let check = |when: &str| {
            for account in [0u32, 7, 49] {
                let (orders, trades, by_client) = {
                    let st = rm.read();
                    let mut o: Vec<OrderRec> = st
                        .unpersisted
                        .orders
                        .values()
                        .map(|(o, _)| o.clone())
                        .filter(|o| o.account == account && o.market == 0)
                        .collect();
                    o.sort_by_key(|o| o.id);
                    let t: Vec<TradeRec> = st
                        .unpersisted
                        .trades
                        .iter()
                        .map(|(t, _)| t.clone())
                        .filter(|t| {
                            (t.maker_account == account || t.taker_account == account)
                                && t.market == 0
                        })
                        .collect();
                    let c = st
                        .unpersisted
                        .orders
                        .values()
                        .map(|(o, _)| o.clone())
                        .filter(|o| o.account == account && o.client_id == "c5")
                        .max_by_key(|o| o.id);
                    (o, t, c)
                };
                assert!(!orders.is_empty() && !trades.is_empty(), "{when}");
                let got = rm
                    .orders_history(account, 0, None, None, None, 100_000)
                    .unwrap();
                assert_eq!(got, orders, "{when}: account {account} orders");
                let got = rm
                    .trades_history(account, 0, None, None, None, 100_000)
                    .unwrap();
                assert_eq!(got, trades, "{when}: account {account} trades");
                let got = rm.find_order_by_client(account, None, "c5").unwrap();
                assert_eq!(got, by_client, "{when}: account {account} by client id");
            }
            // A market's trades from an id (`historicalTrades`): what a scan of every row finds.
            for (from_id, limit) in [(1u64, 5u32), (5_000, 1_000), (14_999, 7), (20_001, 10)] {
                let want: Vec<TradeRec> = {
                    let st = rm.read();
                    st.unpersisted
                        .trades
                        .iter()
                        .map(|(t, _)| t.clone())
                        .filter(|t| t.market == 1 && t.id >= from_id)
                        .take(limit as usize)
                        .collect()
                };
                let got = rm.market_trades_from(1, from_id, limit).unwrap();
                assert_eq!(got, want, "{when}: trades of market 1 from {from_id}");
            }
            // The index holds exactly the rows, and no empty entry.
            let st = rm.read();
            let u = &st.unpersisted;
            let indexed: usize = u.orders_by_account.values().map(BTreeSet::len).sum();
            assert_eq!(indexed, u.orders.len(), "{when}");
            assert!(u.orders_by_account.values().all(|s| !s.is_empty()));
            assert!(u.trades_by_account.values().all(|q| !q.is_empty()));
            for (a, ids) in &u.orders_by_account {
                assert!(ids.iter().all(|id| u.orders[id].0.account == *a), "{when}");
            }
        };
        check("pending");
        let before = rm.read().unpersisted.counts();
        // The history thread committed the first ten groups, and drops their rows in chunks.
        let mut chunks = 0;
        while rm.state.write().unwrap().unpersisted.drop_some(10, 7) {
            chunks += 1;
            if chunks == 1 {
                check("after one chunk");
            }
        }
        assert!(chunks > 1, "more than one chunk of 7");
        assert!(
            !rm.state.write().unwrap().unpersisted.drop_some(10, 7),
            "nothing of 10 left"
        );
        {
            // Every row of the first ten groups left, and only those.
            let st = rm.read();
            let u = &st.unpersisted;
            assert!(u.orders.values().all(|(_, g)| *g > 10));
            assert!(u.trades.iter().all(|(_, g)| *g > 10));
        }
        let after = rm.read().unpersisted.counts();
        assert!(after.0 < before.0 && after.1 < before.1);
        check("after a commit");
        rm.state.write().unwrap().unpersisted.drop_through(100);
        assert_eq!(rm.read().unpersisted.counts(), (0, 0));
        let st = rm.read();
        assert!(st.unpersisted.orders_by_account.is_empty());
        assert!(st.unpersisted.trades_by_account.is_empty());
    }

    /// Regression (a flaky `myTrades` that returned nothing): a reader that read SQLite before
    /// the history thread committed a row, and memory after it dropped the row, missed it. The
    /// merge now notices the drop (`persist_gen`) and reads again.
    #[test]
    fn a_row_moved_from_memory_to_sqlite_during_a_read_is_not_missed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("h.sqlite")).unwrap());
        let markets = Arc::new(Markets::new(&matching_engine::EngineConfig::default()).unwrap());
        let rm = ReadModel::new(markets, store, 16);
        // Stand-ins for a history row: in memory (here, the account set) until the history
        // thread moves it to SQLite.
        let row = 7u32;
        rm.state.write().unwrap().accounts.insert(row);
        let calls = std::sync::atomic::AtomicU32::new(0);
        let got = rm
            .merged(
                || {
                    // The first SQLite read comes before the commit; then the history thread
                    // commits the row and drops it from memory; a second read sees it.
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    if n == 0 {
                        let mut st = rm.state.write().unwrap();
                        st.accounts.remove(&row);
                        st.persist_gen += 1;
                        Ok(Vec::new())
                    } else {
                        Ok(vec![row])
                    }
                },
                |st, db: Vec<u32>| {
                    let mut all: BTreeSet<u32> = db.into_iter().collect();
                    all.extend(st.accounts.iter().copied());
                    all
                },
            )
            .unwrap();
        assert_eq!(got, BTreeSet::from([row]));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket_start(61_000, 60_000), 60_000);
        // 1970-01-12 (a Monday) 10:00.
        let t = 11 * 86_400_000 + 36_000_000;
        assert_eq!(bucket_start(t, 604_800_000), 11 * 86_400_000);
        assert_eq!(interval_index("1h"), Some(6));
        assert_eq!(interval_index("1M"), Some(15));
        // 2024-02-15 12:00 UTC: February of a leap year.
        let feb15 = 1_708_000_000_000;
        assert_eq!(bucket(feb15, MONTH), (1_706_745_600_000, 1_709_251_199_999));
        // December rolls over to January.
        let dec31 = 1_704_023_999_000; // 2023-12-31 11:59:59 UTC
        assert_eq!(bucket(dec31, MONTH), (1_701_388_800_000, 1_704_067_199_999));
        assert_eq!(bucket(0, MONTH), (0, 2_678_399_999));
        for d in [0i64, 59, 365, 10_957, 19_723, 47_482] {
            let (y, m) = civil_from_days(d);
            assert!(days_from_civil(y, m, 1) <= d && d - days_from_civil(y, m, 1) < 31);
        }
    }
}
