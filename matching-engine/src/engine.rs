//! The engine: every market's book and the ledger, changed together by one writer.
//!
//! [`Engine::apply`] validates a command completely before it changes anything, so a rejection
//! leaves no trace; then it executes it, settles every fill in the ledger in the same step, and
//! reports what happened as [`Event`]s. Per command, changed price levels and balances are
//! reported once each, at the end, in a deterministic order.

use crate::book::Book;
use crate::command::{
    Command, NewOco, NewOrder, OrderRef, OrderType, StpMode, TimeInForce, Trigger,
};
use crate::config::{ConfigError, EngineConfig, MarketConfig};
use crate::event::{DoneReason, Event, OrderInfo};
use crate::ledger::{dedup_dirty, mark_dirty, AssetTotals, Balance, Ledger};
use crate::reject::RejectCode;
use crate::units::{
    AccountId, Amount, AssetId, ClientOrderId, IdempotencyKey, ListId, MarketId, OrderId, Price,
    Qty, Side, Timestamp, TradeId, WithdrawalId,
};
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

/// The exchange's fee account: created with the engine, receives every trading fee and the flat
/// part of withdrawal fees that the network did not take.
pub const FEE_ACCOUNT: AccountId = AccountId(0);

/// What the engine keeps with each resting order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderMeta {
    /// Owner.
    pub account: AccountId,
    /// What is still held for it (quote for a bid, base for an ask).
    pub hold: Amount,
    /// Quantity filled so far.
    pub filled: Qty,
    /// Total quantity (filled included).
    pub orig_qty: Qty,
    /// Self-trade prevention mode.
    pub stp: StpMode,
    /// Post-only.
    pub post_only: bool,
    /// Time in force (GTC or GTD for a resting order).
    pub tif: TimeInForce,
    /// Client order id.
    pub client_id: Option<ClientOrderId>,
    /// Quote value of its fills so far (the sum of its trades' notional). Not in the snapshot's
    /// order records: a format-4 snapshot carries it in [`EngineSnapshot::order_quotes`].
    #[serde(skip)]
    pub quote: Amount,
}

impl Default for OrderMeta {
    fn default() -> Self {
        Self {
            account: AccountId(0),
            hold: Amount(0),
            filled: Qty(0),
            orig_qty: Qty(0),
            stp: StpMode::None,
            post_only: false,
            tif: TimeInForce::Gtc,
            client_id: None,
            quote: Amount(0),
        }
    }
}

/// A stop or take-profit order waiting for its trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopOrder {
    /// Its id.
    pub id: OrderId,
    /// The order as placed.
    pub order: NewOrder,
    /// What is held for it now.
    pub hold: Amount,
}

/// A live order list (OCO): both legs are open. It ends at the first thing that happens to
/// either leg (see [`NewOco`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderList {
    /// Its id.
    pub id: ListId,
    /// Owner.
    pub account: AccountId,
    /// Market.
    pub market: MarketId,
    /// `[above, below]`.
    pub legs: [OrderId; 2],
    /// The leg (0 or 1) that holds for both: the limit maker if there is one, else the above
    /// leg. The other leg holds nothing.
    pub holder: u8,
    /// The list's client id.
    pub client_id: Option<ClientOrderId>,
}

/// The pending part of an OTO or OTOCO list: ids assigned when the list was placed, nothing
/// held, nothing in the book.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pending {
    /// OTO: one order.
    Order {
        /// Its id.
        id: OrderId,
        /// The order as it will be placed.
        order: NewOrder,
    },
    /// OTOCO: an OCO pair, `[above, below]`, placed as an OCO under the list's id.
    Oco {
        /// `[above, below]` ids.
        ids: [OrderId; 2],
        /// `[above, below]`.
        legs: [NewOrder; 2],
    },
}

impl Pending {
    /// The pending orders with their ids, in order.
    pub fn orders(&self) -> impl Iterator<Item = (OrderId, NewOrder)> {
        let (a, n) = match *self {
            Pending::Order { id, order } => ([(id, order), (id, order)], 1),
            Pending::Oco { ids, legs } => ([(ids[0], legs[0]), (ids[1], legs[1])], 2),
        };
        a.into_iter().take(n)
    }
}

/// A live OTO or OTOCO list whose working order rests in the book (partly filled or not) and
/// whose pending order(s) wait for it to fill completely.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtoList {
    /// Its id (from the same sequence as OCO lists).
    pub id: ListId,
    /// Owner.
    pub account: AccountId,
    /// Market.
    pub market: MarketId,
    /// The working order (a resting limit order).
    pub working: OrderId,
    /// The pending order(s).
    pub pending: Pending,
    /// The list's client id.
    pub client_id: Option<ClientOrderId>,
}

/// How the pending phase of an OTO or OTOCO list ended ([`Event::OtoDone`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtoOutcome {
    /// The working order filled completely and the pending order(s) were placed.
    Placed,
    /// The working order filled completely but the pending order(s) could not be placed then
    /// (for example the account no longer had the balance to hold for them): nothing was placed
    /// and nothing else changed.
    Refused(RejectCode),
    /// The working order left unfilled or partly filled (cancelled, by its owner or by a cancel
    /// of a pending order; expired; IOC/FOK rest; self-trade prevention): the pending order(s)
    /// are cancelled without ever being placed.
    Cancelled(DoneReason),
}

#[derive(Debug)]
struct Market {
    book: Book<OrderMeta>,
    /// Orders that trigger when last >= stop (stop buys, take-profit sells), by
    /// [`StopKey`].
    stop_buys: BTreeMap<StopKey, StopOrder>,
    /// Orders that trigger when last <= stop (stop sells, take-profit buys), by [`StopKey`].
    stop_sells: BTreeMap<StopKey, StopOrder>,
    stop_index: FxHashMap<OrderId, (Trigger, StopKey)>,
    /// The placement sequence the next stop put into the trigger maps takes (see
    /// [`StopKey`]). Not in snapshots: a restored market numbers its stops in their snapshot
    /// order (which is key order), so only the relative order is kept, and that is all that
    /// decides anything.
    next_stop_seq: u64,
    depth_seq: u64,
    last_price: Option<Price>,
    dirty_levels: Vec<(Side, Price)>,
}

/// Where a waiting stop sits in its trigger map: its trigger price, then its placement
/// sequence in the market ([`Market::next_stop_seq`]), so equal trigger prices trigger in the
/// order the stops were placed. Not the order id: an OTO/OTOCO's pending order has an id
/// reserved when its list is placed, but it is placed (and queues) when its working order
/// fills, after stops placed in between, as on Binance.
type StopKey = (Price, u64);

impl Market {
    fn open_orders(&self) -> usize {
        self.book.len() + self.stop_index.len()
    }

    /// A waiting stop by id.
    fn stop(&self, id: OrderId) -> Option<&StopOrder> {
        let &(dir, key) = self.stop_index.get(&id)?;
        Some(match dir {
            Trigger::Rise => &self.stop_buys[&key],
            Trigger::Fall => &self.stop_sells[&key],
        })
    }

    /// Puts a stop into its trigger map with the next placement sequence (its time priority
    /// among equal trigger prices). False when the id waits already (nothing changed).
    fn put_stop(&mut self, dir: Trigger, stop: Price, s: StopOrder) -> bool {
        if self.stop_index.contains_key(&s.id) {
            return false;
        }
        let key = (stop, self.next_stop_seq);
        self.next_stop_seq += 1;
        self.stop_index.insert(s.id, (dir, key));
        match dir {
            Trigger::Rise => self.stop_buys.insert(key, s),
            Trigger::Fall => self.stop_sells.insert(key, s),
        };
        true
    }
}

/// A withdrawal's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WithdrawalState {
    /// Funds are held.
    Held,
    /// Given back.
    Released,
    /// Paid; left the ledger.
    Completed,
}

/// A withdrawal the ledger knows of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withdrawal {
    /// Owner.
    pub account: AccountId,
    /// Asset.
    pub asset: AssetId,
    /// Amount paid out.
    pub amount: Amount,
    /// Flat fee.
    pub fee: Amount,
    /// State.
    pub state: WithdrawalState,
}

/// What a transfer under an idempotency key moved: the same key again with other terms is
/// [`RejectCode::TransferKeyReused`], never a duplicate of the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TransferTerms {
    /// Sender.
    pub from: AccountId,
    /// Recipient.
    pub to: AccountId,
    /// Asset.
    pub asset: AssetId,
    /// Amount moved.
    pub amount: Amount,
}

/// A transfer key as the engine keeps it: the terms it moved and the sequence number of the
/// command that moved them (`None`: restored from a snapshot older than format 7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KnownTransfer {
    terms: TransferTerms,
    seq: Option<u64>,
}

/// What a credit under an idempotency key credited: the same key again with other terms is
/// [`RejectCode::CreditKeyReused`], never a duplicate of the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CreditTerms {
    /// Beneficiary.
    pub account: AccountId,
    /// Asset.
    pub asset: AssetId,
    /// Amount credited.
    pub amount: Amount,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Account {
    open_orders: u32,
}

/// An incoming order while it matches.
#[derive(Clone, Copy, Debug)]
struct Taker {
    info: OrderInfo,
    limit: Option<Price>,
    remaining: Qty,
    /// Quote-budget buy: quantity is bounded by `hold` only; reported remaining is 0.
    budget: bool,
    filled: Qty,
    /// Quote value of its fills so far.
    quote: Amount,
    hold: Amount,
    stp: StpMode,
}

/// How a taker's matching ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MatchEnd {
    /// Nothing left to fill.
    Filled,
    /// No more crossing liquidity (or the budget is spent).
    NoMore,
    /// Self-trade prevention expired the taker.
    SelfTrade,
    /// A quote-budget (or market) buy spent what it held.
    Budget,
}

/// The state of one order as a query answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrderView {
    /// Id.
    pub id: OrderId,
    /// Market.
    pub market: MarketId,
    /// Side.
    pub side: Side,
    /// Limit price (stop orders: the limit price, or 0 for stop-market).
    pub price: Price,
    /// Open quantity.
    pub remaining: Qty,
    /// The engine's data.
    pub meta: OrderMeta,
    /// Trigger price for a waiting stop order.
    pub stop: Option<Price>,
    /// A waiting take-profit order (it triggers on the mirror side of a stop).
    pub take_profit: bool,
    /// The live order list (OCO) it is a leg of.
    pub list: Option<ListId>,
}

/// Whether an accepted command changed nothing because it had been applied before.
#[derive(Clone, Copy, Debug, Default)]
struct Accept {
    order: Option<OrderId>,
    account: Option<AccountId>,
    duplicate: bool,
    original: Option<u64>,
}

/// The matching engine and ledger. See the [crate docs](crate).
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    params: Vec<MarketParams>,
    seq: u64,
    next_order_id: u64,
    next_trade_id: u64,
    accounts: Vec<Account>,
    ledger: Ledger,
    markets: Vec<Market>,
    client_ids: FxHashMap<(AccountId, ClientOrderId), (MarketId, OrderId)>,
    /// Every credit key with the terms of its credit (`None` for a key restored from a snapshot
    /// older than format 6: any retry under it is a duplicate, as before).
    credit_keys: FxHashMap<IdempotencyKey, Option<CreditTerms>>,
    /// Every transfer key with the terms and sequence number of its transfer (`None` for a key
    /// restored from a snapshot older than format 6: any retry under it is a duplicate, as
    /// before).
    transfer_keys: FxHashMap<IdempotencyKey, Option<KnownTransfer>>,
    withdrawals: FxHashMap<WithdrawalId, Withdrawal>,
    /// GTD expiries `(time, order, market)`; entries of orders that left are skipped when popped.
    expiries: BinaryHeap<Reverse<(u64, u64, u16)>>,
    now: Timestamp,
    scratch_ids: Vec<OrderId>,
    next_list_id: u64,
    /// Live order lists by id.
    lists: BTreeMap<ListId, OrderList>,
    /// The list of each leg of a live list.
    list_of: FxHashMap<OrderId, ListId>,
    /// The live list (OCO, OTO or OTOCO) holding each account's list client id: a new list
    /// with one of them is refused ([`RejectCode::DuplicateClientId`]), as Binance accepts a
    /// `listClientOrderId` again only once its list is over. A list repeated after its answer
    /// was lost is not placed twice.
    list_cids: FxHashMap<(AccountId, ClientOrderId), ListId>,
    /// List legs that traded as makers during the current taker's match: their lists end once
    /// the match is over.
    list_fills: Vec<OrderId>,
    /// Live OTO and OTOCO lists by id (their working orders are in `list_of` too).
    otos: BTreeMap<ListId, OtoList>,
    /// The list of each pending order of a live OTO or OTOCO list.
    pending_of: FxHashMap<OrderId, ListId>,
    /// OTO/OTOCO lists whose working order filled completely during this command: their pending
    /// orders are placed once the command's own matching is over (empty between commands).
    oto_ready: Vec<ListId>,
}

/// The numbers of a market the hot path needs, `Copy` so they can be read while the engine is
/// borrowed mutably.
#[derive(Clone, Copy, Debug)]
struct MarketParams {
    base: AssetId,
    quote: AssetId,
    lot_size: u64,
    tick_size: u64,
    min_qty: Qty,
    max_qty: Qty,
    min_price: Price,
    max_price: Price,
    min_notional: Amount,
    maker_fee_bps: u16,
    taker_fee_bps: u16,
}

impl MarketParams {
    fn of(m: &MarketConfig) -> Self {
        Self {
            base: m.base,
            quote: m.quote,
            lot_size: m.lot_size,
            tick_size: m.tick_size,
            min_qty: m.min_qty,
            max_qty: m.max_qty,
            min_price: m.min_price,
            max_price: m.max_price,
            min_notional: m.min_notional,
            maker_fee_bps: m.maker_fee_bps,
            taker_fee_bps: m.taker_fee_bps,
        }
    }
    #[inline]
    fn notional(&self, price: Price, qty: Qty) -> Option<Amount> {
        price
            .0
            .checked_mul(qty.0)?
            .checked_mul(self.tick_size)
            .map(Amount)
    }
    #[inline]
    fn base_amount(&self, qty: Qty) -> Option<Amount> {
        qty.0.checked_mul(self.lot_size).map(Amount)
    }
    #[inline]
    fn max_fee_bps(&self) -> u16 {
        self.maker_fee_bps.max(self.taker_fee_bps)
    }
    /// The asset a side holds: quote for a bid, base for an ask.
    #[inline]
    fn hold_asset(&self, side: Side) -> AssetId {
        match side {
            Side::Buy => self.quote,
            Side::Sell => self.base,
        }
    }
    fn check_qty(&self, qty: Qty) -> Result<(), RejectCode> {
        if qty.is_zero() {
            Err(RejectCode::ZeroQuantity)
        } else if qty < self.min_qty || qty > self.max_qty {
            Err(RejectCode::QtyOffLot)
        } else {
            Ok(())
        }
    }
    fn check_price(&self, price: Price) -> Result<(), RejectCode> {
        if price.is_zero() {
            Err(RejectCode::PriceOffTick)
        } else if price < self.min_price || price > self.max_price {
            Err(RejectCode::OutsidePriceBand)
        } else {
            Ok(())
        }
    }
    fn check_notional(&self, price: Price, qty: Qty) -> Result<(), RejectCode> {
        match self.notional(price, qty) {
            None => Err(RejectCode::InvalidAmount),
            Some(n) if n < self.min_notional => Err(RejectCode::BelowMinNotional),
            Some(_) => Ok(()),
        }
    }
}

/// Quote needed for `qty` at `price` including a fee allowance of `bps`.
#[inline]
fn worst_cost(cfg: &MarketParams, price: Price, qty: Qty, bps: u16) -> Option<Amount> {
    let n = cfg.notional(price, qty)?;
    n.checked_add(MarketConfig::fee(n, bps))
}

/// What an order waiting for its trigger (or a limit order about to rest in full) holds on its
/// own: a buy its worst cost at its limit price (nothing for a market buy, priced when it
/// triggers), a sell its base quantity. `None` for market orders and on overflow.
fn lone_hold(p: &MarketParams, o: &NewOrder) -> Option<Amount> {
    match (o.side, o.order_type) {
        (Side::Buy, OrderType::Limit { price, qty })
        | (Side::Buy, OrderType::StopLimit { price, qty, .. })
        | (Side::Buy, OrderType::TakeProfitLimit { price, qty, .. }) => {
            worst_cost(p, price, qty, p.max_fee_bps())
        }
        (Side::Buy, OrderType::StopMarket { .. } | OrderType::TakeProfitMarket { .. }) => {
            Some(Amount(0))
        }
        (Side::Sell, OrderType::Market { .. } | OrderType::MarketBudget { .. })
        | (Side::Buy, OrderType::Market { .. } | OrderType::MarketBudget { .. }) => None,
        (Side::Sell, t) => p.base_amount(t.qty()?),
    }
}

/// The largest quantity whose cost at `price` with taker fee `bps` fits in `budget`.
#[inline]
fn affordable(cfg: &MarketParams, price: Price, budget: Amount, bps: u16) -> Qty {
    let unit = u128::from(price.0) * u128::from(cfg.tick_size);
    if unit == 0 {
        return Qty::ZERO;
    }
    let mut q = (u128::from(budget.0) * 10_000 / (unit * (10_000 + u128::from(bps)))) as u64;
    // Fees round down, so a little more may fit.
    while let Some(c) = worst_cost(cfg, price, Qty(q + 1), bps) {
        if c > budget {
            break;
        }
        q += 1;
    }
    Qty(q)
}

impl Engine {
    /// A new engine with no orders; the fee account ([`FEE_ACCOUNT`]) exists.
    pub fn new(config: EngineConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let markets = config
            .markets
            .iter()
            .map(|m| Market {
                book: Book::new(m.max_price, config.limits.max_orders_per_book),
                stop_buys: BTreeMap::new(),
                stop_sells: BTreeMap::new(),
                stop_index: FxHashMap::default(),
                next_stop_seq: 0,
                depth_seq: 0,
                last_price: None,
                dirty_levels: Vec::with_capacity(64),
            })
            .collect();
        let mut e = Self {
            ledger: Ledger::new(config.assets.len()),
            params: config.markets.iter().map(MarketParams::of).collect(),
            config,
            seq: 0,
            next_order_id: 1,
            next_trade_id: 1,
            accounts: Vec::new(),
            markets,
            client_ids: FxHashMap::default(),
            credit_keys: FxHashMap::default(),
            transfer_keys: FxHashMap::default(),
            withdrawals: FxHashMap::default(),
            expiries: BinaryHeap::new(),
            now: Timestamp(0),
            scratch_ids: Vec::with_capacity(256),
            next_list_id: 1,
            lists: BTreeMap::new(),
            list_of: FxHashMap::default(),
            list_cids: FxHashMap::default(),
            list_fills: Vec::new(),
            otos: BTreeMap::new(),
            pending_of: FxHashMap::default(),
            oto_ready: Vec::new(),
        };
        e.accounts.push(Account::default());
        e.ledger.add_account();
        Ok(e)
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The number of commands that changed the state (the last journal sequence number).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Time of the last command.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// Number of accounts, the fee account included.
    pub fn account_count(&self) -> usize {
        self.accounts.len()
    }

    /// True when the account exists.
    pub fn account_exists(&self, a: AccountId) -> bool {
        (a.0 as usize) < self.accounts.len()
    }

    /// Balance of `asset` of `account`: `(available, held)`.
    pub fn balance(&self, account: AccountId, asset: AssetId) -> Option<(Amount, Amount)> {
        if !self.account_exists(account) || asset.0 as usize >= self.config.assets.len() {
            return None;
        }
        let b = self.ledger.get(account, asset);
        Some((Amount(b.available), Amount(b.held)))
    }

    /// Sum of all balances of `asset` (available and held, fee account included).
    pub fn asset_total(&self, asset: AssetId) -> Amount {
        self.ledger.asset_total_u64(asset)
    }

    /// Credits and withdrawals of `asset` so far.
    pub fn asset_totals(&self, asset: AssetId) -> AssetTotals {
        self.ledger.totals[asset.0 as usize]
    }

    /// A withdrawal the ledger knows of.
    pub fn withdrawal(&self, id: WithdrawalId) -> Option<Withdrawal> {
        self.withdrawals.get(&id).copied()
    }

    /// Amounts (amount + fee) held for withdrawals of `asset`.
    pub fn withdrawals_held(&self, asset: AssetId) -> Amount {
        Amount(
            self.withdrawals
                .values()
                .filter(|w| w.asset == asset && w.state == WithdrawalState::Held)
                .map(|w| w.amount.0 + w.fee.0)
                .sum(),
        )
    }

    /// The book of a market (read-only).
    pub fn book(&self, market: MarketId) -> Option<&Book<OrderMeta>> {
        self.markets.get(market.0 as usize).map(|m| &m.book)
    }

    /// Last trade price of a market.
    pub fn last_price(&self, market: MarketId) -> Option<Price> {
        self.markets
            .get(market.0 as usize)
            .and_then(|m| m.last_price)
    }

    /// The per-market depth sequence number (of the last depth event).
    pub fn depth_seq(&self, market: MarketId) -> u64 {
        self.markets
            .get(market.0 as usize)
            .map_or(0, |m| m.depth_seq)
    }

    /// The earliest GTD expiry that is still pending, if any. Whoever drives the engine applies
    /// a command (e.g. [`Command::Tick`]) at or after that time so the order expires on time.
    pub fn next_expiry(&mut self) -> Option<Timestamp> {
        while let Some(Reverse((t, id, m))) = self.expiries.peek().copied() {
            let m = &self.markets[m as usize];
            if m.book.slot(OrderId(id)).is_some() || m.stop_index.contains_key(&OrderId(id)) {
                return Some(Timestamp(t));
            }
            self.expiries.pop();
        }
        None
    }

    /// An open order (resting or stop).
    pub fn order(&self, market: MarketId, id: OrderId) -> Option<OrderView> {
        let m = self.markets.get(market.0 as usize)?;
        if let Some(slot) = m.book.slot(id) {
            let n = m.book.node(slot);
            return Some(OrderView {
                id,
                market,
                side: n.side,
                price: n.price,
                remaining: n.qty,
                meta: n.data,
                stop: None,
                take_profit: false,
                list: self.list_of.get(&id).copied(),
            });
        }
        let s = m.stop(id)?;
        let (_, stop) = s.order.order_type.trigger(s.order.side)?;
        let price = s.order.order_type.limit_price().unwrap_or(Price(0));
        let qty = s.order.order_type.qty().expect("only stop orders wait");
        Some(OrderView {
            id,
            market,
            side: s.order.side,
            price,
            remaining: qty,
            meta: OrderMeta {
                account: s.order.account,
                hold: s.hold,
                filled: Qty(0),
                quote: Amount(0),
                orig_qty: qty,
                stp: s.order.stp,
                post_only: false,
                tif: s.order.tif,
                client_id: s.order.client_id,
            },
            stop: Some(stop),
            take_profit: matches!(
                s.order.order_type,
                OrderType::TakeProfitLimit { .. } | OrderType::TakeProfitMarket { .. }
            ),
            list: self.list_of.get(&id).copied(),
        })
    }

    /// A live order list (OCO): both of its legs are open.
    pub fn order_list(&self, id: ListId) -> Option<OrderList> {
        self.lists.get(&id).copied()
    }

    /// The live order lists of an account, by id.
    pub fn open_order_lists(&self, account: AccountId) -> Vec<OrderList> {
        self.lists
            .values()
            .filter(|l| l.account == account)
            .copied()
            .collect()
    }

    /// The open orders of an account (all markets, or one), by id.
    pub fn open_orders(&self, account: AccountId, market: Option<MarketId>) -> Vec<OrderView> {
        let mut v = Vec::new();
        for (i, m) in self.markets.iter().enumerate() {
            let mid = MarketId(i as u16);
            if market.is_some_and(|x| x != mid) {
                continue;
            }
            for side in [Side::Buy, Side::Sell] {
                for (p, _) in m.book.levels(side) {
                    for n in m.book.orders_at(p) {
                        if n.data.account == account {
                            v.extend(self.order(mid, n.id));
                        }
                    }
                }
            }
            for s in m.stop_buys.values().chain(m.stop_sells.values()) {
                if s.order.account == account {
                    v.extend(self.order(mid, s.id));
                }
            }
        }
        v.sort_by_key(|o| o.id);
        v
    }

    /// Finds an open order of `account` by client order id.
    pub fn order_by_client_id(
        &self,
        account: AccountId,
        client_id: &ClientOrderId,
    ) -> Option<(MarketId, OrderId)> {
        self.client_ids.get(&(account, *client_id)).copied()
    }

    /// Applies one command at time `now`, appending its events to `out`.
    ///
    /// Returns `Ok` when the command was accepted (its events start with [`Event::Accepted`]) and
    /// `Err` when it was rejected (its only event is [`Event::Rejected`]); the events of GTD
    /// orders expiring at `now` come before either. A rejected command
    /// changes nothing, except that GTD orders whose time has come at `now` expire first, whatever
    /// the command: a driver journals a command whenever [`Engine::seq`] advanced.
    ///
    /// A query ([`Command::WithdrawalStatus`], [`Command::CreditStatus`],
    /// [`Command::TransferStatus`]) is the exception: its only event is its answer, and
    /// it changes nothing at all (no time, no expiries, no `seq`), so it is never journaled.
    pub fn apply(
        &mut self,
        cmd: &Command,
        now: Timestamp,
        out: &mut Vec<Event>,
    ) -> Result<(), RejectCode> {
        // A query reads and answers; it moves neither time nor `seq`, so it is never journaled.
        match *cmd {
            Command::WithdrawalStatus { id } => {
                out.push(Event::WithdrawalStatus {
                    id,
                    withdrawal: self.withdrawals.get(&id).copied(),
                });
                return Ok(());
            }
            Command::CreditStatus { key } => {
                out.push(Event::CreditStatus {
                    key,
                    credited: self.credit_keys.contains_key(&key),
                });
                return Ok(());
            }
            Command::TransferStatus { key } => {
                out.push(Event::TransferStatus {
                    key,
                    transferred: self.transfer_keys.contains_key(&key),
                });
                return Ok(());
            }
            _ => {}
        }
        // `now` is state (it is in the snapshot): a command that ends up changing nothing must
        // not move it, or the live state would differ from a replay of the journal.
        let prev_now = self.now;
        if now > self.now {
            self.now = now;
        }
        let expired = self.expire_due(out);
        let at = out.len();
        out.push(Event::Accepted {
            seq: self.seq + 1,
            time: self.now,
            order: None,
            account: None,
            duplicate: false,
            original: None,
        });
        let result = self.execute(cmd, out);
        match result {
            Ok(acc) => {
                if !self.oto_ready.is_empty() {
                    self.place_ready(out);
                }
                if acc.duplicate {
                    debug_assert_eq!(out.len(), at + 1, "a duplicate changes nothing");
                    if !expired {
                        let time = self.now;
                        self.now = prev_now;
                        out[at] = Event::Accepted {
                            seq: self.seq,
                            time,
                            order: None,
                            account: acc.account,
                            duplicate: true,
                            original: acc.original,
                        };
                        return Ok(());
                    }
                }
                self.seq += 1;
                out[at] = Event::Accepted {
                    seq: self.seq,
                    time: self.now,
                    order: acc.order,
                    account: acc.account,
                    duplicate: acc.duplicate,
                    original: acc.original,
                };
                self.flush(out);
                Ok(())
            }
            Err(code) => {
                debug_assert_eq!(out.len(), at + 1, "a rejected command emitted events");
                out.truncate(at);
                if expired {
                    self.seq += 1;
                } else {
                    self.now = prev_now;
                }
                out.push(Event::Rejected { code });
                Err(code)
            }
        }
        .inspect(|_| self.debug_check())
        .inspect_err(|_| self.debug_check())
    }

    #[inline]
    fn debug_check(&self) {
        #[cfg(debug_assertions)]
        self.ledger.check_conservation();
    }

    /// Full invariant check (tests): panics with the first broken invariant (see
    /// [`validate`](Self::validate)).
    pub fn check_invariants(&self) {
        for m in &self.markets {
            m.book.check_invariants();
        }
        if let Err(reason) = self.validate() {
            panic!("engine invariant broken: {reason}");
        }
    }

    /// Checks the invariants that tie the state together, without panicking: per asset the sum of
    /// balances equals credits minus withdrawals; every held balance equals what its open orders,
    /// waiting stops and held withdrawals hold; a bid holds at least its worst cost and an ask
    /// exactly its base amount; `orig_qty = filled + open`; books are not crossed; open-order
    /// counts are right. [`from_snapshot`](Self::from_snapshot) refuses a snapshot that fails.
    pub fn validate(&self) -> Result<(), &'static str> {
        for (i, t) in self.ledger.totals.iter().enumerate() {
            let outstanding = t
                .credited
                .checked_sub(t.withdrawn)
                .ok_or("more withdrawn than credited")?;
            if self.ledger.asset_total(AssetId(i as u16)) != outstanding {
                return Err("balances do not add up to credits minus withdrawals");
            }
        }
        let n_assets = self.config.assets.len();
        let mut held = vec![0u128; self.accounts.len() * n_assets];
        let mut open = vec![0u32; self.accounts.len()];
        let mut add = |account: AccountId, asset: AssetId, amount: u128| {
            let a = account.0 as usize;
            let slot = held
                .get_mut(a * n_assets + asset.0 as usize)
                .ok_or("a hold of an unknown account or asset")?;
            *slot += amount;
            Ok::<(), &'static str>(())
        };
        for (mi, m) in self.markets.iter().enumerate() {
            let cfg = &self.params[mi];
            if let (Some(bid), Some(ask)) = (m.book.best_bid(), m.book.best_ask()) {
                if bid >= ask {
                    return Err("crossed book");
                }
            }
            for side in [Side::Buy, Side::Sell] {
                for (p, _) in m.book.levels(side) {
                    for n in m.book.orders_at(p) {
                        let (asset, need) = match side {
                            Side::Buy => (
                                cfg.quote,
                                worst_cost(cfg, n.price, n.qty, cfg.max_fee_bps())
                                    .ok_or("a bid's cost overflows")?,
                            ),
                            Side::Sell => (
                                cfg.base,
                                cfg.base_amount(n.qty).ok_or("an ask's amount overflows")?,
                            ),
                        };
                        let enough = match side {
                            Side::Buy => n.data.hold >= need,
                            Side::Sell => n.data.hold == need,
                        };
                        if !enough {
                            return Err("an order's hold does not cover it");
                        }
                        if n.data.filled.0.checked_add(n.qty.0) != Some(n.data.orig_qty.0) {
                            return Err("an order's filled and open quantities do not add up");
                        }
                        add(n.data.account, asset, u128::from(n.data.hold.0))?;
                        *open
                            .get_mut(n.data.account.0 as usize)
                            .ok_or("an order of an unknown account")? += 1;
                    }
                }
            }
            for s in m.stop_buys.values().chain(m.stop_sells.values()) {
                let asset = match s.order.side {
                    Side::Buy => cfg.quote,
                    Side::Sell => cfg.base,
                };
                add(s.order.account, asset, u128::from(s.hold.0))?;
                *open
                    .get_mut(s.order.account.0 as usize)
                    .ok_or("a stop of an unknown account")? += 1;
            }
            if m.stop_index.len() != m.stop_buys.len() + m.stop_sells.len() {
                return Err("stop index");
            }
            for (&id, &(dir, key)) in &m.stop_index {
                let s = match dir {
                    Trigger::Rise => m.stop_buys.get(&key),
                    Trigger::Fall => m.stop_sells.get(&key),
                };
                if s.map(|s| s.id) != Some(id) || key.1 >= m.next_stop_seq {
                    return Err("stop index");
                }
            }
        }
        self.validate_lists()?;
        for w in self.withdrawals.values() {
            if w.state == WithdrawalState::Held {
                add(
                    w.account,
                    w.asset,
                    u128::from(w.amount.0) + u128::from(w.fee.0),
                )?;
            }
        }
        if self
            .ledger
            .balances
            .iter()
            .zip(&held)
            .any(|(b, h)| u128::from(b.held) != *h)
        {
            return Err("a held balance differs from what its orders and withdrawals hold");
        }
        if self
            .accounts
            .iter()
            .zip(&open)
            .any(|(a, n)| a.open_orders != *n)
        {
            return Err("open order count");
        }
        Ok(())
    }

    /// Order lists: each live list's legs are open orders of its account in its market, on one
    /// side, with one quantity and nothing filled; the holder leg holds what either leg needs
    /// on its own (a sell exactly its base), the other leg nothing; the leg index agrees.
    fn validate_lists(&self) -> Result<(), &'static str> {
        if self.list_of.len() != 2 * self.lists.len() + self.otos.len() {
            return Err("list leg index");
        }
        for (&(account, c), id) in &self.list_cids {
            let holds = |a: AccountId, cid: Option<ClientOrderId>| a == account && cid == Some(c);
            let live = self
                .lists
                .get(id)
                .is_some_and(|l| holds(l.account, l.client_id))
                || self
                    .otos
                    .get(id)
                    .is_some_and(|l| holds(l.account, l.client_id));
            if !live {
                return Err("list client id index");
            }
        }
        let with_cid = (self
            .lists
            .values()
            .filter(|l| l.client_id.is_some())
            .count())
            + self.otos.values().filter(|l| l.client_id.is_some()).count();
        if self.list_cids.len() > with_cid {
            return Err("list client id index");
        }
        self.validate_otos()?;
        for (&id, l) in &self.lists {
            if l.id != id || id.0 >= self.next_list_id || l.holder > 1 {
                return Err("list id");
            }
            let p = self
                .params
                .get(l.market.0 as usize)
                .ok_or("a list's market")?;
            let m = &self.markets[l.market.0 as usize];
            let mut legs = [None; 2];
            for (i, &leg) in l.legs.iter().enumerate() {
                if self.list_of.get(&leg) != Some(&id) {
                    return Err("list leg index");
                }
                let (order, hold) = if let Some(slot) = m.book.slot(leg) {
                    let n = m.book.node(slot);
                    if !n.data.filled.is_zero() || !n.data.post_only {
                        return Err("a list's limit leg traded or is not a limit maker");
                    }
                    let o = NewOrder {
                        account: n.data.account,
                        market: l.market,
                        side: n.side,
                        order_type: OrderType::Limit {
                            price: n.price,
                            qty: n.qty,
                        },
                        tif: n.data.tif,
                        post_only: true,
                        stp: n.data.stp,
                        client_id: n.data.client_id,
                    };
                    (o, n.data.hold)
                } else if let Some(s) = m.stop(leg) {
                    (s.order, s.hold)
                } else {
                    return Err("a list's leg is not open");
                };
                if order.account != l.account {
                    return Err("a list's leg has another owner");
                }
                legs[i] = Some((order, hold));
            }
            let [Some((a, ha)), Some((b, hb))] = legs else {
                return Err("a list's legs");
            };
            if a.side != b.side || a.order_type.qty() != b.order_type.qty() {
                return Err("a list's legs differ in side or quantity");
            }
            let need = lone_hold(p, &a)
                .zip(lone_hold(p, &b))
                .map(|(x, y)| x.max(y))
                .ok_or("a list's hold overflows")?;
            let (held, other) = if l.holder == 0 { (ha, hb) } else { (hb, ha) };
            let enough = match a.side {
                Side::Buy => held >= need,
                Side::Sell => held == need,
            };
            if !enough || !other.is_zero() {
                return Err("a list's hold does not cover its legs once");
            }
        }
        Ok(())
    }

    /// Emits depth and balance events for everything this command changed.
    fn flush(&mut self, out: &mut Vec<Event>) {
        for (mi, m) in self.markets.iter_mut().enumerate() {
            if m.dirty_levels.is_empty() {
                continue;
            }
            dedup_dirty(&mut m.dirty_levels);
            let (best_bid, best_ask) = (m.book.best_bid(), m.book.best_ask());
            for &(side, price) in &m.dirty_levels {
                // The book is never crossed: an occupied level at or below the best bid is a bid,
                // at or above the best ask an ask.
                let on_side = match side {
                    Side::Buy => best_bid.is_some_and(|b| price <= b),
                    Side::Sell => best_ask.is_some_and(|a| price >= a),
                };
                let qty = if on_side {
                    m.book.level_qty(price)
                } else {
                    Qty(0)
                };
                m.depth_seq += 1;
                out.push(Event::Depth {
                    market: MarketId(mi as u16),
                    seq: m.depth_seq,
                    side,
                    price,
                    qty,
                });
            }
            m.dirty_levels.clear();
        }
        dedup_dirty(&mut self.ledger.dirty);
        for &(account, asset) in &self.ledger.dirty {
            let b = self.ledger.get(account, asset);
            out.push(Event::Balance {
                account,
                asset,
                available: Amount(b.available),
                held: Amount(b.held),
            });
        }
        self.ledger.dirty.clear();
    }

    /// Expires GTD orders whose time has come. Returns true when any did.
    fn expire_due(&mut self, out: &mut Vec<Event>) -> bool {
        let mut any = false;
        while let Some(&Reverse((t, id, m))) = self.expiries.peek() {
            if t > self.now.0 {
                break;
            }
            self.expiries.pop();
            let market = MarketId(m);
            if let Some(slot) = self.markets[m as usize].book.slot(OrderId(id)) {
                self.remove_resting(market, slot, DoneReason::Expired, out);
                any = true;
            } else if self.markets[m as usize]
                .stop_index
                .contains_key(&OrderId(id))
            {
                // A GTD stop order expires while it waits, too.
                self.remove_stop(market, OrderId(id), DoneReason::Expired, out);
                any = true;
            }
        }
        if any {
            self.flush(out);
        }
        any
    }

    // One call site (`apply`): inlined, so a command pays one call's prologue and epilogue.
    #[inline(always)]
    fn execute(&mut self, cmd: &Command, out: &mut Vec<Event>) -> Result<Accept, RejectCode> {
        match *cmd {
            Command::CreateAccount => {
                if self.accounts.len() >= self.config.limits.max_accounts as usize {
                    return Err(RejectCode::AccountLimit);
                }
                let id = AccountId(self.accounts.len() as u32);
                self.accounts.push(Account::default());
                self.ledger.add_account();
                out.push(Event::AccountCreated { account: id });
                Ok(Accept {
                    account: Some(id),
                    ..Accept::default()
                })
            }
            Command::NewOrder(o) => self.new_order(&o, out),
            Command::NewOco(ref l) => self.new_oco(l, out),
            Command::NewOto(ref l) => self.new_oto(
                &l.working,
                Pending::Order {
                    id: OrderId(0),
                    order: l.pending,
                },
                l.list_client_id,
                out,
            ),
            Command::NewOtoco(ref l) => self.new_oto(
                &l.working,
                Pending::Oco {
                    ids: [OrderId(0); 2],
                    legs: l.pending,
                },
                l.list_client_id,
                out,
            ),
            Command::Cancel {
                account,
                market,
                order,
            } => {
                let (market, id, slot) = match self.find_order(account, market, order) {
                    Ok(found) => found,
                    Err(code) => return self.cancel_pending(account, market, order, code, out),
                };
                match slot {
                    Some(slot) => self.remove_resting(market, slot, DoneReason::Cancelled, out),
                    None => self.remove_stop(market, id, DoneReason::Cancelled, out),
                }
                Ok(Accept {
                    order: Some(id),
                    ..Accept::default()
                })
            }
            Command::CancelAll { account, market } => self.cancel_all(account, market, out),
            Command::Amend {
                account,
                market,
                order,
                new_price,
                new_qty,
            } => self.amend(account, market, order, new_price, new_qty, out),
            Command::AmendKeepPriority {
                account,
                market,
                order,
                new_qty,
            } => self.amend_keep_priority(account, market, order, new_qty, out),
            Command::Credit {
                account,
                asset,
                amount,
                key,
            } => {
                self.check_account(account)?;
                self.check_asset(asset)?;
                if amount.is_zero() {
                    return Err(RejectCode::ZeroQuantity);
                }
                let terms = CreditTerms {
                    account,
                    asset,
                    amount,
                };
                if let Some(known) = self.credit_keys.get(&key) {
                    if known.is_some_and(|t| t != terms) {
                        return Err(RejectCode::CreditKeyReused);
                    }
                    return Ok(Accept {
                        duplicate: true,
                        ..Accept::default()
                    });
                }
                let t = &self.ledger.totals[asset.0 as usize];
                let b = self.ledger.get(account, asset);
                if b.available.checked_add(amount.0).is_none()
                    || t.credited - t.withdrawn + u128::from(amount.0) > u128::from(u64::MAX)
                {
                    return Err(RejectCode::InvalidAmount);
                }
                self.credit_keys.insert(key, Some(terms));
                self.ledger.totals[asset.0 as usize].credited += u128::from(amount.0);
                self.ledger.add_available(account, asset, amount.0);
                out.push(Event::Credited {
                    account,
                    asset,
                    amount,
                    key,
                });
                Ok(Accept::default())
            }
            Command::WithdrawHold {
                account,
                asset,
                amount,
                fee,
                id,
            } => {
                self.check_account(account)?;
                self.check_asset(asset)?;
                if amount.is_zero() {
                    return Err(RejectCode::ZeroQuantity);
                }
                if self.withdrawals.contains_key(&id) {
                    return Err(RejectCode::DuplicateWithdrawal);
                }
                let total = amount.checked_add(fee).ok_or(RejectCode::InvalidAmount)?;
                if self.ledger.get(account, asset).available < total.0 {
                    return Err(RejectCode::InsufficientBalance);
                }
                self.ledger.hold(account, asset, total.0);
                self.withdrawals.insert(
                    id,
                    Withdrawal {
                        account,
                        asset,
                        amount,
                        fee,
                        state: WithdrawalState::Held,
                    },
                );
                out.push(Event::WithdrawalHeld {
                    id,
                    account,
                    asset,
                    amount,
                    fee,
                });
                Ok(Accept::default())
            }
            Command::WithdrawRelease { id } => {
                let w = match self.withdrawals.get(&id) {
                    Some(w) if w.state == WithdrawalState::Held => *w,
                    _ => return Err(RejectCode::UnknownWithdrawal),
                };
                self.ledger
                    .release(w.account, w.asset, w.amount.0 + w.fee.0);
                self.withdrawals.get_mut(&id).expect("exists").state = WithdrawalState::Released;
                out.push(Event::WithdrawalReleased {
                    id,
                    account: w.account,
                });
                Ok(Accept::default())
            }
            Command::WithdrawComplete { id, network_fee } => {
                let w = match self.withdrawals.get(&id) {
                    Some(w) if w.state == WithdrawalState::Held => *w,
                    _ => return Err(RejectCode::UnknownWithdrawal),
                };
                if network_fee > w.fee {
                    return Err(RejectCode::InvalidAmount);
                }
                self.ledger
                    .take_held(w.account, w.asset, w.amount.0 + w.fee.0);
                self.ledger
                    .add_available(FEE_ACCOUNT, w.asset, w.fee.0 - network_fee.0);
                self.ledger.totals[w.asset.0 as usize].withdrawn +=
                    u128::from(w.amount.0) + u128::from(network_fee.0);
                self.withdrawals.get_mut(&id).expect("exists").state = WithdrawalState::Completed;
                out.push(Event::WithdrawalCompleted {
                    id,
                    account: w.account,
                    network_fee,
                });
                Ok(Accept::default())
            }
            Command::WithdrawalStatus { .. }
            | Command::CreditStatus { .. }
            | Command::TransferStatus { .. } => {
                unreachable!("queries are answered by apply")
            }
            Command::Transfer {
                from,
                to,
                asset,
                amount,
                key,
            } => {
                self.check_account(from)?;
                self.check_account(to)?;
                self.check_asset(asset)?;
                if from == FEE_ACCOUNT {
                    return Err(RejectCode::FeeAccount);
                }
                if from == to {
                    return Err(RejectCode::SelfTransfer);
                }
                if amount.is_zero() {
                    return Err(RejectCode::ZeroQuantity);
                }
                let terms = TransferTerms {
                    from,
                    to,
                    asset,
                    amount,
                };
                if let Some(known) = self.transfer_keys.get(&key) {
                    if known.is_some_and(|k| k.terms != terms) {
                        return Err(RejectCode::TransferKeyReused);
                    }
                    return Ok(Accept {
                        duplicate: true,
                        original: known.and_then(|k| k.seq),
                        ..Accept::default()
                    });
                }
                if self.ledger.get(from, asset).available < amount.0 {
                    return Err(RejectCode::InsufficientBalance);
                }
                // This command's sequence number once accepted (`apply` moves `seq` after).
                let seq = Some(self.seq + 1);
                self.transfer_keys
                    .insert(key, Some(KnownTransfer { terms, seq }));
                self.ledger.take_available(from, asset, amount.0);
                self.ledger.add_available(to, asset, amount.0);
                out.push(Event::Transferred {
                    from,
                    to,
                    asset,
                    amount,
                    key,
                });
                Ok(Accept::default())
            }
            Command::Tick => Ok(Accept::default()),
        }
    }

    fn check_account(&self, a: AccountId) -> Result<(), RejectCode> {
        if self.account_exists(a) {
            Ok(())
        } else {
            Err(RejectCode::UnknownAccount)
        }
    }

    fn check_asset(&self, a: AssetId) -> Result<(), RejectCode> {
        if (a.0 as usize) < self.config.assets.len() {
            Ok(())
        } else {
            Err(RejectCode::UnknownAsset)
        }
    }

    fn market_cfg(&self, m: MarketId) -> Result<&MarketConfig, RejectCode> {
        self.config
            .markets
            .get(m.0 as usize)
            .ok_or(RejectCode::UnknownMarket)
    }
}

/// The account whose resting orders an incoming order expires instead of trading with
/// (self-trade prevention `ExpireMaker`): they are no liquidity for it, so market orders walk
/// past them when they are priced.
fn expired_makers(stp: StpMode, account: AccountId) -> Option<AccountId> {
    (stp == StpMode::ExpireMaker).then_some(account)
}

/// Fee of `bps` on `notional`, rounded down.
#[inline]
fn fee(notional: Amount, bps: u16) -> Amount {
    MarketConfig::fee(notional, bps)
}

impl Engine {
    fn cancel_all(
        &mut self,
        account: AccountId,
        market: Option<MarketId>,
        out: &mut Vec<Event>,
    ) -> Result<Accept, RejectCode> {
        self.check_account(account)?;
        if let Some(m) = market {
            self.market_cfg(m)?;
        }
        let mut ids = std::mem::take(&mut self.scratch_ids);
        for mi in 0..self.markets.len() {
            let mid = MarketId(mi as u16);
            if market.is_some_and(|x| x != mid) {
                continue;
            }
            if self.accounts[account.0 as usize].open_orders == 0 {
                break;
            }
            ids.clear();
            let m = &self.markets[mi];
            for side in [Side::Buy, Side::Sell] {
                for (p, _) in m.book.levels(side) {
                    ids.extend(
                        m.book
                            .orders_at(p)
                            .filter(|n| n.data.account == account)
                            .map(|n| n.id),
                    );
                }
            }
            ids.extend(
                m.stop_buys
                    .values()
                    .chain(m.stop_sells.values())
                    .filter(|s| s.order.account == account)
                    .map(|s| s.id),
            );
            ids.sort_unstable();
            for &id in &ids {
                self.cancel_one(mid, id, DoneReason::Cancelled, out);
            }
        }
        ids.clear();
        self.scratch_ids = ids;
        Ok(Accept::default())
    }

    /// Resolves an order reference to an open order owned by `account`: its market, id and its
    /// book slot when it rests (`None`: a stop order waiting for its trigger). Inlined: it is on
    /// every cancel and amend, and the call's prologue and epilogue cost as much as its checks.
    #[inline(always)]
    fn find_order(
        &self,
        account: AccountId,
        market: MarketId,
        r: OrderRef,
    ) -> Result<(MarketId, OrderId, Option<u32>), RejectCode> {
        self.check_account(account)?;
        self.market_cfg(market)?;
        let id = match r {
            OrderRef::Id(id) => id,
            OrderRef::Client(c) => match self.client_ids.get(&(account, c)) {
                Some(&(m, id)) if m == market => id,
                _ => return Err(RejectCode::UnknownOrder),
            },
        };
        let m = &self.markets[market.0 as usize];
        let slot = m.book.slot(id);
        let owner = if let Some(slot) = slot {
            m.book.node(slot).data.account
        } else if let Some(s) = m.stop(id) {
            s.order.account
        } else {
            return Err(RejectCode::UnknownOrder);
        };
        if owner == account {
            Ok((market, id, slot))
        } else {
            Err(RejectCode::UnknownOrder)
        }
    }

    fn cancel_one(
        &mut self,
        market: MarketId,
        id: OrderId,
        reason: DoneReason,
        out: &mut Vec<Event>,
    ) {
        if let Some(slot) = self.markets[market.0 as usize].book.slot(id) {
            self.remove_resting(market, slot, reason, out);
        } else {
            self.remove_stop(market, id, reason, out);
        }
    }

    fn forget_order(&mut self, account: AccountId, client_id: Option<ClientOrderId>) {
        self.accounts[account.0 as usize].open_orders -= 1;
        if let Some(c) = client_id {
            self.client_ids.remove(&(account, c));
        }
    }

    /// Takes a resting order out of the book, releases its hold, reports it done.
    fn remove_resting(
        &mut self,
        market: MarketId,
        slot: u32,
        reason: DoneReason,
        out: &mut Vec<Event>,
    ) {
        let p = self.params[market.0 as usize];
        let m = &mut self.markets[market.0 as usize];
        let node = m.book.remove(slot);
        mark_dirty(&mut m.dirty_levels, (node.side, node.price));
        self.ledger
            .release(node.data.account, p.hold_asset(node.side), node.data.hold.0);
        self.forget_order(node.data.account, node.data.client_id);
        out.push(Event::OrderDone {
            info: OrderInfo {
                order: node.id,
                account: node.data.account,
                market,
                side: node.side,
                client_id: node.data.client_id,
            },
            reason,
            filled: node.data.filled,
            quote: node.data.quote,
            remaining: node.qty,
        });
        if !self.list_of.is_empty() {
            self.leg_left(node.id, reason, out);
        }
    }

    fn take_stop(&mut self, market: MarketId, id: OrderId) -> Option<StopOrder> {
        let m = &mut self.markets[market.0 as usize];
        let (dir, key) = m.stop_index.remove(&id)?;
        let s = match dir {
            Trigger::Rise => m.stop_buys.remove(&key),
            Trigger::Fall => m.stop_sells.remove(&key),
        }
        .expect("stop index and maps agree");
        self.forget_order(s.order.account, s.order.client_id);
        Some(s)
    }

    fn remove_stop(
        &mut self,
        market: MarketId,
        id: OrderId,
        reason: DoneReason,
        out: &mut Vec<Event>,
    ) {
        let Some(s) = self.take_stop(market, id) else {
            return;
        };
        let p = self.params[market.0 as usize];
        self.ledger
            .release(s.order.account, p.hold_asset(s.order.side), s.hold.0);
        let qty = s.order.order_type.qty().unwrap_or(Qty(0));
        out.push(Event::OrderDone {
            info: stop_info(market, &s),
            reason,
            filled: Qty(0),
            quote: Amount(0),
            remaining: qty,
        });
        if !self.list_of.is_empty() {
            self.leg_left(id, reason, out);
        }
    }

    /// Open quantity at `price` that an order can trade with: all of it, or what is not
    /// `skip`'s (see [`expired_makers`]).
    fn tradable_at(&self, mi: usize, price: Price, level: Qty, skip: Option<AccountId>) -> u64 {
        match skip {
            None => level.0,
            Some(a) => self.markets[mi]
                .book
                .orders_at(price)
                .filter(|n| n.data.account != a)
                .map(|n| n.qty.0)
                .sum(),
        }
    }

    /// Whether `side` has anything an order skipping `skip`'s orders can trade with.
    fn has_liquidity(&self, mi: usize, side: Side, skip: Option<AccountId>) -> bool {
        self.markets[mi]
            .book
            .levels(side)
            .any(|(price, level)| self.tradable_at(mi, price, level, skip) > 0)
    }

    /// Quote cost (with taker fee) of buying `qty` now, walking the asks (not `skip`'s).
    fn walk_buy_cost(&self, mi: usize, qty: Qty, skip: Option<AccountId>) -> Option<Amount> {
        let p = &self.params[mi];
        let book = &self.markets[mi].book;
        let mut left = qty.0;
        let mut notional = Amount(0);
        for (price, level) in book.levels(Side::Sell) {
            let q = Qty(left.min(self.tradable_at(mi, price, level, skip)));
            notional = notional.checked_add(p.notional(price, q)?)?;
            left -= q.0;
            if left == 0 {
                break;
            }
        }
        notional.checked_add(fee(notional, p.taker_fee_bps))
    }

    /// Lots to sell now to receive at least `budget` quote (before fees), walking the bids (not
    /// `skip`'s).
    fn walk_sell_qty(&self, mi: usize, budget: Amount, skip: Option<AccountId>) -> Qty {
        let p = &self.params[mi];
        let book = &self.markets[mi].book;
        let mut left = u128::from(budget.0);
        let mut qty = 0u64;
        for (price, level) in book.levels(Side::Buy) {
            let unit = u128::from(price.0) * u128::from(p.tick_size);
            let need = left.div_ceil(unit);
            let tradable = self.tradable_at(mi, price, level, skip);
            let take = need.min(u128::from(tradable)) as u64;
            qty += take;
            left = left.saturating_sub(unit * u128::from(take));
            if left == 0 {
                break;
            }
        }
        Qty(qty)
    }

    /// Whether a FOK order of `qty` could fill in full now, under its self-trade mode.
    #[allow(clippy::too_many_arguments)]
    fn fok_fillable(
        &self,
        mi: usize,
        side: Side,
        limit: Price,
        qty: Qty,
        account: AccountId,
        stp: StpMode,
    ) -> bool {
        let book = &self.markets[mi].book;
        let mut need = qty.0;
        for (price, _) in book.levels(side.opposite()) {
            let crosses = match side {
                Side::Buy => price <= limit,
                Side::Sell => price >= limit,
            };
            if !crosses {
                return false;
            }
            for n in book.orders_at(price) {
                if n.data.account == account && stp != StpMode::None {
                    if stp == StpMode::ExpireMaker {
                        continue;
                    }
                    return false;
                }
                need -= need.min(n.qty.0);
                if need == 0 {
                    return true;
                }
            }
        }
        false
    }

    /// The checks of an order that need only the order, its market's parameters and the time
    /// (no balance, book or account state): quantity, prices and notional against the market,
    /// then post-only and time-in-force combinations, in that order. The one place for them: a
    /// new order, each leg of an OCO (after [`Engine::oco_static`]'s shape checks) and each
    /// pending order of an OTO/OTOCO at creation ([`Engine::check_pending`]; placed later as a
    /// new order, it is checked again then).
    fn check_static(&self, p: &MarketParams, o: &NewOrder) -> Result<(), RejectCode> {
        match o.order_type {
            OrderType::Limit { price, qty } => {
                p.check_qty(qty)?;
                p.check_price(price)?;
                p.check_notional(price, qty)?;
            }
            OrderType::Market { qty } => p.check_qty(qty)?,
            OrderType::MarketBudget { budget } => {
                if budget.is_zero() {
                    return Err(RejectCode::ZeroQuantity);
                }
                if budget < p.min_notional {
                    return Err(RejectCode::BelowMinNotional);
                }
            }
            OrderType::StopLimit { stop, price, qty }
            | OrderType::TakeProfitLimit { stop, price, qty } => {
                p.check_qty(qty)?;
                p.check_price(stop)?;
                p.check_price(price)?;
                p.check_notional(price, qty)?;
            }
            OrderType::StopMarket { stop, qty } | OrderType::TakeProfitMarket { stop, qty } => {
                p.check_qty(qty)?;
                p.check_price(stop)?;
            }
        }
        let is_limit = matches!(o.order_type, OrderType::Limit { .. });
        let is_stop = o.order_type.trigger_price().is_some();
        let is_market = !is_limit && !is_stop;
        if o.post_only && (!is_limit || matches!(o.tif, TimeInForce::Ioc | TimeInForce::Fok)) {
            return Err(RejectCode::InvalidOrder);
        }
        match o.tif {
            TimeInForce::Gtd(t) if t <= self.now || is_market => Err(RejectCode::InvalidOrder),
            TimeInForce::Fok if is_market || is_stop => Err(RejectCode::InvalidOrder),
            _ => Ok(()),
        }
    }

    fn new_order(&mut self, o: &NewOrder, out: &mut Vec<Event>) -> Result<Accept, RejectCode> {
        self.check_account(o.account)?;
        let _ = self.market_cfg(o.market)?;
        if o.account == FEE_ACCOUNT {
            return Err(RejectCode::FeeAccount);
        }
        let mi = o.market.0 as usize;
        let p = self.params[mi];
        self.check_static(&p, o)?;
        let is_limit = matches!(o.order_type, OrderType::Limit { .. });
        let is_stop = o.order_type.trigger_price().is_some();
        let is_market = !is_limit && !is_stop;
        if is_market && !self.has_liquidity(mi, o.side.opposite(), expired_makers(o.stp, o.account))
        {
            // Nothing on the other side to price it (RejectCode::InvalidOrder).
            return Err(RejectCode::InvalidOrder);
        }
        if let Some(c) = o.client_id {
            if self.client_ids.contains_key(&(o.account, c)) {
                return Err(RejectCode::DuplicateClientId);
            }
        }
        let can_rest =
            is_stop || (is_limit && matches!(o.tif, TimeInForce::Gtc | TimeInForce::Gtd(_)));
        if can_rest {
            if self.accounts[o.account.0 as usize].open_orders
                >= self.config.limits.max_open_orders_per_account
            {
                return Err(RejectCode::AccountOrderLimit);
            }
            if self.markets[mi].open_orders() >= self.config.limits.max_orders_per_book as usize {
                return Err(RejectCode::BookFull);
            }
        }
        // What to hold, and for a quote-budget sell, how much to sell.
        let mut market_qty = Qty(0);
        let hold = match (o.side, o.order_type) {
            (Side::Buy, OrderType::Limit { price, qty })
            | (Side::Buy, OrderType::StopLimit { price, qty, .. })
            | (Side::Buy, OrderType::TakeProfitLimit { price, qty, .. }) => {
                worst_cost(&p, price, qty, p.max_fee_bps())
            }
            (Side::Buy, OrderType::Market { qty }) => {
                market_qty = qty;
                self.walk_buy_cost(mi, qty, expired_makers(o.stp, o.account))
            }
            (Side::Buy, OrderType::MarketBudget { budget }) => Some(budget),
            (Side::Buy, OrderType::StopMarket { .. } | OrderType::TakeProfitMarket { .. }) => {
                Some(Amount(0))
            }
            (Side::Sell, OrderType::MarketBudget { budget }) => {
                market_qty = self.walk_sell_qty(mi, budget, expired_makers(o.stp, o.account));
                p.base_amount(market_qty)
            }
            (Side::Sell, OrderType::Market { qty }) => {
                market_qty = qty;
                p.base_amount(qty)
            }
            (Side::Sell, OrderType::Limit { qty, .. })
            | (Side::Sell, OrderType::StopLimit { qty, .. })
            | (Side::Sell, OrderType::StopMarket { qty, .. })
            | (Side::Sell, OrderType::TakeProfitLimit { qty, .. })
            | (Side::Sell, OrderType::TakeProfitMarket { qty, .. }) => p.base_amount(qty),
        }
        .ok_or(RejectCode::InvalidAmount)?;
        let asset = p.hold_asset(o.side);
        if self.ledger.get(o.account, asset).available < hold.0 {
            return Err(RejectCode::InsufficientBalance);
        }
        if let OrderType::Limit { price, qty } = o.order_type {
            let book = &self.markets[mi].book;
            let crosses = match o.side {
                Side::Buy => book.best_ask().is_some_and(|a| a <= price),
                Side::Sell => book.best_bid().is_some_and(|b| b >= price),
            };
            if o.post_only && crosses {
                return Err(RejectCode::PostOnlyWouldTake);
            }
            if o.tif == TimeInForce::Fok
                && !self.fok_fillable(mi, o.side, price, qty, o.account, o.stp)
            {
                return Err(RejectCode::FokCannotFill);
            }
        }

        // Validated: from here on the command is accepted and changes the state.
        let id = OrderId(self.next_order_id);
        self.next_order_id += 1;
        let info = OrderInfo {
            order: id,
            account: o.account,
            market: o.market,
            side: o.side,
            client_id: o.client_id,
        };
        out.push(Event::OrderNew {
            info,
            order_type: o.order_type,
            tif: o.tif,
            post_only: o.post_only,
            stp: o.stp,
        });
        self.ledger.hold(o.account, asset, hold.0);
        match o.order_type {
            OrderType::StopLimit { .. }
            | OrderType::StopMarket { .. }
            | OrderType::TakeProfitLimit { .. }
            | OrderType::TakeProfitMarket { .. } => {
                self.insert_stop(id, o, hold);
            }
            OrderType::Limit { price, qty } => {
                let t = Taker {
                    info,
                    limit: Some(price),
                    remaining: qty,
                    budget: false,
                    filled: Qty(0),
                    quote: Amount(0),
                    hold,
                    stp: o.stp,
                };
                self.run_taker(t, o.tif, o.post_only, out);
            }
            OrderType::Market { .. } | OrderType::MarketBudget { .. } => {
                let budget =
                    o.side == Side::Buy && matches!(o.order_type, OrderType::MarketBudget { .. });
                let t = Taker {
                    info,
                    limit: None,
                    remaining: if budget { Qty::MAX } else { market_qty },
                    budget,
                    filled: Qty(0),
                    quote: Amount(0),
                    hold,
                    stp: o.stp,
                };
                self.run_taker(t, TimeInForce::Ioc, false, out);
            }
        }
        self.process_triggers(o.market, out);
        Ok(Accept {
            order: Some(id),
            ..Accept::default()
        })
    }

    /// Matches an incoming order, then rests, expires or finishes it.
    fn run_taker(&mut self, mut t: Taker, tif: TimeInForce, post_only: bool, out: &mut Vec<Event>) {
        let market = t.info.market;
        let mi = market.0 as usize;
        let p = self.params[mi];
        let end = if t.remaining.is_zero() {
            MatchEnd::Filled
        } else {
            self.match_taker(&mut t, out)
        };
        if !self.list_fills.is_empty() {
            self.end_filled_lists(out);
        }
        let asset = p.hold_asset(t.info.side);
        let rests = end == MatchEnd::NoMore
            && t.limit.is_some()
            && matches!(tif, TimeInForce::Gtc | TimeInForce::Gtd(_));
        if rests {
            let price = t.limit.expect("limit order");
            let need = match t.info.side {
                Side::Buy => {
                    worst_cost(&p, price, t.remaining, p.max_fee_bps()).expect("held before")
                }
                Side::Sell => p.base_amount(t.remaining).expect("held before"),
            };
            debug_assert!(t.hold >= need);
            self.ledger
                .release(t.info.account, asset, t.hold.0 - need.0);
            let meta = OrderMeta {
                account: t.info.account,
                hold: need,
                filled: t.filled,
                orig_qty: Qty(t.filled.0 + t.remaining.0),
                stp: t.stp,
                post_only,
                tif,
                client_id: t.info.client_id,
                quote: t.quote,
            };
            let m = &mut self.markets[mi];
            m.book
                .insert(t.info.order, t.info.side, price, t.remaining, meta)
                .expect("room was checked when the order was accepted");
            mark_dirty(&mut m.dirty_levels, (t.info.side, price));
            self.accounts[t.info.account.0 as usize].open_orders += 1;
            if let Some(c) = t.info.client_id {
                self.client_ids
                    .insert((t.info.account, c), (market, t.info.order));
            }
            if let TimeInForce::Gtd(at) = tif {
                self.expiries
                    .push(Reverse((at.0, t.info.order.0, market.0)));
            }
            return;
        }
        self.ledger.release(t.info.account, asset, t.hold.0);
        let reason = match end {
            MatchEnd::Filled => DoneReason::Filled,
            // A quote-budget buy that spent its budget is done; a market buy by quantity that
            // cannot pay for more (a triggered stop-market buy holding only what the account
            // had) has its rest cancelled.
            MatchEnd::Budget if t.budget => DoneReason::Filled,
            MatchEnd::Budget => DoneReason::IocRemainder,
            MatchEnd::SelfTrade => DoneReason::SelfTrade,
            MatchEnd::NoMore => DoneReason::IocRemainder,
        };
        out.push(Event::OrderDone {
            info: t.info,
            reason,
            filled: t.filled,
            quote: t.quote,
            remaining: if t.budget || end == MatchEnd::Filled {
                Qty(0)
            } else {
                t.remaining
            },
        });
    }

    /// The matching loop: strict price-time priority, trades at the maker's price, every fill
    /// settled in the ledger at once.
    fn match_taker(&mut self, t: &mut Taker, out: &mut Vec<Event>) -> MatchEnd {
        let market = t.info.market;
        let mi = market.0 as usize;
        let p = self.params[mi];
        let side = t.info.side;
        let bounded_by_hold = side == Side::Buy && t.limit.is_none();
        loop {
            if t.remaining.is_zero() {
                return MatchEnd::Filled;
            }
            let m = &mut self.markets[mi];
            let Some(best) = m.book.best(side.opposite()) else {
                return MatchEnd::NoMore;
            };
            if let Some(limit) = t.limit {
                let crosses = match side {
                    Side::Buy => best <= limit,
                    Side::Sell => best >= limit,
                };
                if !crosses {
                    return MatchEnd::NoMore;
                }
            }
            let slot = m
                .book
                .front(best)
                .expect("an occupied level has a first order");
            let maker = *m.book.node(slot);
            if maker.data.account == t.info.account && t.stp != StpMode::None {
                match t.stp {
                    StpMode::ExpireTaker => return MatchEnd::SelfTrade,
                    StpMode::ExpireMaker => {
                        self.remove_resting(market, slot, DoneReason::SelfTrade, out);
                        continue;
                    }
                    StpMode::ExpireBoth | StpMode::None => {
                        self.remove_resting(market, slot, DoneReason::SelfTrade, out);
                        return MatchEnd::SelfTrade;
                    }
                }
            }
            let mut q = maker.qty.min(t.remaining);
            if bounded_by_hold {
                q = q.min(affordable(&p, best, t.hold, p.taker_fee_bps));
                if q.is_zero() {
                    return MatchEnd::Budget;
                }
            }
            let notional = p.notional(best, q).expect("bounded by holds");
            let base = p.base_amount(q).expect("bounded by holds");
            let taker_fee = fee(notional, p.taker_fee_bps);
            let maker_fee = fee(notional, p.maker_fee_bps);
            let maker_acc = maker.data.account;
            let maker_hold_used = match side {
                Side::Buy => {
                    let cost = notional.0 + taker_fee.0;
                    t.hold.0 = t
                        .hold
                        .0
                        .checked_sub(cost)
                        .expect("a bid's hold covers its fills");
                    self.ledger.take_held(t.info.account, p.quote, cost);
                    self.ledger.add_available(t.info.account, p.base, base.0);
                    self.ledger.take_held(maker_acc, p.base, base.0);
                    self.ledger
                        .add_available(maker_acc, p.quote, notional.0 - maker_fee.0);
                    base.0
                }
                Side::Sell => {
                    let cost = notional.0 + maker_fee.0;
                    t.hold.0 = t.hold.0.checked_sub(base.0).expect("an ask holds its base");
                    self.ledger.take_held(t.info.account, p.base, base.0);
                    self.ledger
                        .add_available(t.info.account, p.quote, notional.0 - taker_fee.0);
                    self.ledger.take_held(maker_acc, p.quote, cost);
                    self.ledger.add_available(maker_acc, p.base, base.0);
                    cost
                }
            };
            self.ledger
                .add_available(FEE_ACCOUNT, p.quote, taker_fee.0 + maker_fee.0);
            t.remaining.0 -= q.0;
            t.filled.0 += q.0;
            t.quote = t
                .quote
                .checked_add(notional)
                .expect("an order's fills are bounded by what it holds");
            let trade = TradeId(self.next_trade_id);
            self.next_trade_id += 1;
            let m = &mut self.markets[mi];
            m.last_price = Some(best);
            mark_dirty(&mut m.dirty_levels, (side.opposite(), best));
            let maker_remaining = Qty(maker.qty.0 - q.0);
            out.push(Event::Trade {
                trade,
                market,
                price: best,
                qty: q,
                taker_side: side,
                maker_order: maker.id,
                taker_order: t.info.order,
                maker_account: maker_acc,
                taker_account: t.info.account,
                maker_fee,
                taker_fee,
                notional,
                maker_remaining,
                taker_remaining: if t.budget { Qty(0) } else { t.remaining },
            });
            if !self.list_of.is_empty() {
                leg_traded(&self.list_of, &mut self.list_fills, maker.id);
            }
            let d = m.book.data_mut(slot);
            d.filled.0 += q.0;
            d.quote = d
                .quote
                .checked_add(notional)
                .expect("an order's fills are bounded by what it holds");
            d.hold.0 = d
                .hold
                .0
                .checked_sub(maker_hold_used)
                .expect("a maker's hold covers its fills");
            if maker_remaining.is_zero() {
                let node = m.book.remove(slot);
                self.ledger
                    .release(maker_acc, p.hold_asset(maker.side), node.data.hold.0);
                self.forget_order(maker_acc, node.data.client_id);
                out.push(Event::OrderDone {
                    info: OrderInfo {
                        order: node.id,
                        account: maker_acc,
                        market,
                        side: node.side,
                        client_id: node.data.client_id,
                    },
                    reason: DoneReason::Filled,
                    filled: node.data.filled,
                    quote: node.data.quote,
                    remaining: Qty(0),
                });
            } else {
                m.book.reduce(slot, q);
            }
        }
    }

    /// Triggers stop and take-profit orders while the last trade price reaches them: those that
    /// trigger on a rise (stop buys, take-profit sells) from the lowest trigger price, then those
    /// that trigger on a fall (stop sells, take-profit buys) from the highest; equal prices in
    /// time order.
    fn process_triggers(&mut self, market: MarketId, out: &mut Vec<Event>) {
        let mi = market.0 as usize;
        if self.markets[mi].stop_index.is_empty() {
            return;
        }
        loop {
            let m = &self.markets[mi];
            let Some(last) = m.last_price else { return };
            let next = m
                .stop_buys
                .first_key_value()
                .filter(|((stop, _), _)| *stop <= last)
                .map(|(_, s)| s.id)
                .or_else(|| {
                    let (&(stop, _), _) = m.stop_sells.last_key_value()?;
                    if stop < last {
                        return None;
                    }
                    m.stop_sells.range((stop, 0)..).next().map(|(_, s)| s.id)
                });
            let Some(id) = next else { return };
            let mut s = self.take_stop(market, id).expect("found above");
            let info = stop_info(market, &s);
            out.push(Event::OrderTriggered {
                info,
                last_price: last,
            });
            if !self.list_of.is_empty() {
                if let Some(&list) = self.list_of.get(&id) {
                    self.end_list(list, Some(id), out);
                    // It now stands alone: it holds what a lone order of its kind holds (the
                    // shared hold was the larger, and the other leg's part was just released).
                    let p = self.params[mi];
                    let asset = p.hold_asset(s.order.side);
                    let need = lone_hold(&p, &s.order).expect("checked when placed");
                    self.ledger.release(s.order.account, asset, s.hold.0);
                    debug_assert!(self.ledger.get(s.order.account, asset).available >= need.0);
                    self.ledger.hold(s.order.account, asset, need.0);
                    s.hold = need;
                }
            }
            self.run_triggered(info, s, out);
        }
    }

    fn run_triggered(&mut self, info: OrderInfo, s: StopOrder, out: &mut Vec<Event>) {
        let mi = info.market.0 as usize;
        let p = self.params[mi];
        let o = s.order;
        match o.order_type {
            OrderType::StopLimit { price, qty, .. }
            | OrderType::TakeProfitLimit { price, qty, .. } => {
                if o.tif == TimeInForce::Fok
                    && !self.fok_fillable(mi, o.side, price, qty, o.account, o.stp)
                {
                    self.ledger
                        .release(o.account, p.hold_asset(o.side), s.hold.0);
                    out.push(Event::OrderDone {
                        info,
                        reason: DoneReason::IocRemainder,
                        filled: Qty(0),
                        quote: Amount(0),
                        remaining: qty,
                    });
                    return;
                }
                let t = Taker {
                    info,
                    limit: Some(price),
                    remaining: qty,
                    budget: false,
                    filled: Qty(0),
                    quote: Amount(0),
                    hold: s.hold,
                    stp: o.stp,
                };
                self.run_taker(t, o.tif, false, out);
            }
            OrderType::StopMarket { qty, .. } | OrderType::TakeProfitMarket { qty, .. } => {
                let mut hold = s.hold;
                if o.side == Side::Buy {
                    // A stop-market buy is priced when it triggers: hold what it costs now, or
                    // what the account has.
                    let avail = self.ledger.get(o.account, p.quote).available;
                    let skip = expired_makers(o.stp, o.account);
                    let cost = self
                        .walk_buy_cost(mi, qty, skip)
                        .map_or(avail, |c| c.0.min(avail));
                    self.ledger.hold(o.account, p.quote, cost);
                    hold = Amount(cost);
                    if cost == 0 && self.has_liquidity(mi, Side::Sell, skip) {
                        out.push(Event::OrderDone {
                            info,
                            reason: DoneReason::InsufficientBalance,
                            filled: Qty(0),
                            quote: Amount(0),
                            remaining: qty,
                        });
                        return;
                    }
                }
                let t = Taker {
                    info,
                    limit: None,
                    remaining: qty,
                    budget: false,
                    filled: Qty(0),
                    quote: Amount(0),
                    hold,
                    stp: o.stp,
                };
                self.run_taker(t, TimeInForce::Ioc, false, out);
            }
            _ => unreachable!("only stop orders wait for a trigger"),
        }
    }

    /// [`Command::AmendKeepPriority`]: [`Self::amend`] of the quantity alone, refused unless
    /// `new_qty` is below the order's current total (so it keeps time priority).
    fn amend_keep_priority(
        &mut self,
        account: AccountId,
        market: MarketId,
        order: OrderRef,
        new_qty: Qty,
        out: &mut Vec<Event>,
    ) -> Result<Accept, RejectCode> {
        let (found, _, slot) = self.find_order(account, market, order)?;
        let Some(slot) = slot else {
            return Err(RejectCode::InvalidAmend);
        };
        let node = self.markets[found.0 as usize].book.node(slot);
        if new_qty >= node.data.orig_qty {
            return Err(RejectCode::InvalidAmend);
        }
        self.amend(account, market, order, None, Some(new_qty), out)
    }

    #[allow(clippy::too_many_arguments)]
    fn amend(
        &mut self,
        account: AccountId,
        market: MarketId,
        order: OrderRef,
        new_price: Option<Price>,
        new_qty: Option<Qty>,
        out: &mut Vec<Event>,
    ) -> Result<Accept, RejectCode> {
        let (market, id, slot) = self.find_order(account, market, order)?;
        let mi = market.0 as usize;
        let p = self.params[mi];
        let Some(slot) = slot else {
            return Err(RejectCode::InvalidAmend);
        };
        if !self.list_of.is_empty() && self.is_leg(id) {
            // A leg's hold is shared with the other leg: it is not amended (cancel the list).
            return Err(RejectCode::InvalidAmend);
        }
        let node = *self.markets[mi].book.node(slot);
        if new_price.is_none() && new_qty.is_none() {
            return Err(RejectCode::InvalidAmend);
        }
        let price = new_price.unwrap_or(node.price);
        p.check_price(price)?;
        let total = new_qty.unwrap_or(node.data.orig_qty);
        p.check_qty(total)?;
        if total <= node.data.filled {
            return Err(RejectCode::InvalidAmend);
        }
        let remaining = Qty(total.0 - node.data.filled.0);
        let info = OrderInfo {
            order: id,
            account,
            market,
            side: node.side,
            client_id: node.data.client_id,
        };
        let asset = p.hold_asset(node.side);
        if price == node.price && remaining <= node.qty {
            // Down (or unchanged): keeps its place in line.
            let need = match node.side {
                Side::Buy => worst_cost(&p, price, remaining, p.max_fee_bps()),
                Side::Sell => p.base_amount(remaining),
            }
            .expect("smaller than what is held");
            let m = &mut self.markets[mi];
            if remaining < node.qty {
                m.book.reduce(slot, Qty(node.qty.0 - remaining.0));
                mark_dirty(&mut m.dirty_levels, (node.side, price));
            }
            let d = m.book.data_mut(slot);
            let release = d.hold.0 - need.0;
            d.hold = need;
            d.orig_qty = total;
            self.ledger.release(account, asset, release);
            out.push(Event::OrderAmended {
                info,
                price,
                qty: total,
                remaining,
                kept_priority: true,
            });
            return Ok(Accept {
                order: Some(id),
                ..Accept::default()
            });
        }
        if price != node.price {
            p.check_notional(price, remaining)?;
        }
        let need = match node.side {
            Side::Buy => worst_cost(&p, price, remaining, p.max_fee_bps()),
            Side::Sell => p.base_amount(remaining),
        }
        .ok_or(RejectCode::InvalidAmount)?;
        let available = self.ledger.get(account, asset).available;
        if u128::from(available) + u128::from(node.data.hold.0) < u128::from(need.0) {
            return Err(RejectCode::InsufficientBalance);
        }
        let book = &self.markets[mi].book;
        let crosses = match node.side {
            Side::Buy => book.best_ask().is_some_and(|a| a <= price),
            Side::Sell => book.best_bid().is_some_and(|b| b >= price),
        };
        if node.data.post_only && crosses {
            return Err(RejectCode::PostOnlyWouldTake);
        }
        if !crosses {
            // Accepted; the common case: it rests at the new price, at the back of the queue. It
            // keeps its slot (no index churn) and its hold is adjusted by the difference.
            let m = &mut self.markets[mi];
            m.book.relocate(slot, price, remaining);
            mark_dirty(&mut m.dirty_levels, (node.side, node.price));
            mark_dirty(&mut m.dirty_levels, (node.side, price));
            let d = m.book.data_mut(slot);
            d.hold = need;
            d.orig_qty = total;
            if need > node.data.hold {
                self.ledger.hold(account, asset, need.0 - node.data.hold.0);
            } else {
                self.ledger
                    .release(account, asset, node.data.hold.0 - need.0);
            }
            out.push(Event::OrderAmended {
                info,
                price,
                qty: total,
                remaining,
                kept_priority: false,
            });
            return Ok(Accept {
                order: Some(id),
                ..Accept::default()
            });
        }
        // Accepted: loses priority, re-enters at the new price and trades.
        let m = &mut self.markets[mi];
        m.book.remove(slot);
        mark_dirty(&mut m.dirty_levels, (node.side, node.price));
        self.forget_order(account, node.data.client_id);
        self.ledger.release(account, asset, node.data.hold.0);
        self.ledger.hold(account, asset, need.0);
        out.push(Event::OrderAmended {
            info,
            price,
            qty: total,
            remaining,
            kept_priority: false,
        });
        let t = Taker {
            info,
            limit: Some(price),
            remaining,
            budget: false,
            filled: node.data.filled,
            quote: node.data.quote,
            hold: need,
            stp: node.data.stp,
        };
        self.run_taker(t, node.data.tif, node.data.post_only, out);
        self.process_triggers(market, out);
        Ok(Accept {
            order: Some(id),
            ..Accept::default()
        })
    }
}

impl Engine {
    /// Puts an accepted stop or take-profit order into its market's trigger maps.
    fn insert_stop(&mut self, id: OrderId, o: &NewOrder, hold: Amount) {
        let (dir, stop) = o.order_type.trigger(o.side).expect("a trigger order");
        let s = StopOrder {
            id,
            order: *o,
            hold,
        };
        let m = &mut self.markets[o.market.0 as usize];
        let placed = m.put_stop(dir, stop, s);
        debug_assert!(placed, "a stop id placed twice");
        if let TimeInForce::Gtd(at) = o.tif {
            self.expiries.push(Reverse((at.0, id.0, o.market.0)));
        }
        self.accounts[o.account.0 as usize].open_orders += 1;
        if let Some(c) = o.client_id {
            self.client_ids.insert((o.account, c), (o.market, id));
        }
    }

    /// The checks of an OCO pair that do not depend on the book or the last price: same account,
    /// market, side and quantity; the shape (a profit leg and a stop); each leg's filters and
    /// time in force; the above leg's level over the below leg's. Returns the quantity and the
    /// levels (above, below).
    fn oco_static(
        &self,
        p: &MarketParams,
        above: &NewOrder,
        below: &NewOrder,
    ) -> Result<(Qty, Price, Price), RejectCode> {
        if above.account != below.account
            || above.market != below.market
            || above.side != below.side
        {
            return Err(RejectCode::InvalidOrder);
        }
        let qty = above.order_type.qty().ok_or(RejectCode::InvalidOrder)?;
        if below.order_type.qty() != Some(qty) {
            return Err(RejectCode::InvalidOrder);
        }
        // The profit leg: a limit maker or a take-profit order; the loss leg: a stop.
        let profit = |o: &NewOrder| match o.order_type {
            OrderType::Limit { .. } => o.post_only && o.tif == TimeInForce::Gtc,
            OrderType::TakeProfitLimit { .. } | OrderType::TakeProfitMarket { .. } => !o.post_only,
            _ => false,
        };
        let loss = |o: &NewOrder| {
            matches!(
                o.order_type,
                OrderType::StopLimit { .. } | OrderType::StopMarket { .. }
            ) && !o.post_only
        };
        let shape = match above.side {
            Side::Sell => profit(above) && loss(below),
            Side::Buy => loss(above) && profit(below),
        };
        if !shape {
            return Err(RejectCode::InvalidOrder);
        }
        // The shape leaves no market order and no post-only but a GTC limit maker: a leg's
        // own checks refuse a past GTD and a FOK (on a stop) as they would on a new order.
        for o in [above, below] {
            self.check_static(p, o)?;
        }
        // Where each leg works: a limit maker at its price, the others at their trigger.
        let level = |o: &NewOrder| match o.order_type {
            OrderType::Limit { price, .. } => price,
            t => t.trigger_price().expect("a trigger order"),
        };
        let (hi, lo) = (level(above), level(below));
        if hi <= lo {
            return Err(RejectCode::InvalidOrder);
        }
        Ok((qty, hi, lo))
    }

    /// Validates and places an OCO (see [`NewOco`]).
    fn new_oco(&mut self, l: &NewOco, out: &mut Vec<Event>) -> Result<Accept, RejectCode> {
        let [above, below] = l.legs;
        self.check_account(above.account)?;
        let _ = self.market_cfg(above.market)?;
        if above.account == FEE_ACCOUNT {
            return Err(RejectCode::FeeAccount);
        }
        if above.account != below.account
            || above.market != below.market
            || above.side != below.side
        {
            return Err(RejectCode::InvalidOrder);
        }
        let (account, market, side) = (above.account, above.market, above.side);
        let mi = market.0 as usize;
        let p = self.params[mi];
        let (_, hi, lo) = self.oco_static(&p, &above, &below)?;
        let m = &self.markets[mi];
        if m.last_price.is_some_and(|last| !(lo < last && last < hi)) {
            return Err(RejectCode::InvalidOrder);
        }
        let maker = usize::from(matches!(below.order_type, OrderType::Limit { .. }));
        let maker_leg = [&above, &below][maker];
        if let OrderType::Limit { price, .. } = maker_leg.order_type {
            let crosses = match side {
                Side::Buy => m.book.best_ask().is_some_and(|a| a <= price),
                Side::Sell => m.book.best_bid().is_some_and(|b| b >= price),
            };
            if crosses {
                return Err(RejectCode::PostOnlyWouldTake);
            }
        }
        if let (Some(a), Some(b)) = (above.client_id, below.client_id) {
            if a == b {
                return Err(RejectCode::DuplicateClientId);
            }
        }
        for c in [above.client_id, below.client_id].into_iter().flatten() {
            if self.client_ids.contains_key(&(account, c)) {
                return Err(RejectCode::DuplicateClientId);
            }
        }
        if self.list_cid_taken(account, l.list_client_id) {
            return Err(RejectCode::DuplicateClientId);
        }
        if self.accounts[account.0 as usize].open_orders + 2
            > self.config.limits.max_open_orders_per_account
        {
            return Err(RejectCode::AccountOrderLimit);
        }
        if m.open_orders() + 2 > self.config.limits.max_orders_per_book as usize {
            return Err(RejectCode::BookFull);
        }
        let needs = [lone_hold(&p, &above), lone_hold(&p, &below)];
        let [Some(n0), Some(n1)] = needs else {
            return Err(RejectCode::InvalidAmount);
        };
        // Held once: a sell's legs need the same base; a buy holds the larger quote need.
        let hold = n0.max(n1);
        let asset = p.hold_asset(side);
        if self.ledger.get(account, asset).available < hold.0 {
            return Err(RejectCode::InsufficientBalance);
        }

        // Validated: both legs are placed, neither trades or triggers.
        let list = ListId(self.next_list_id);
        self.next_list_id += 1;
        let ids = [OrderId(self.next_order_id), OrderId(self.next_order_id + 1)];
        self.next_order_id += 2;
        let holder = if matches!(above.order_type, OrderType::Limit { .. }) {
            0
        } else {
            maker
        };
        out.push(Event::OrderListNew {
            list,
            account,
            market,
            legs: ids,
            client_id: l.list_client_id,
        });
        self.ledger.hold(account, asset, hold.0);
        for (i, o) in [above, below].iter().enumerate() {
            let id = ids[i];
            out.push(Event::OrderNew {
                info: OrderInfo {
                    order: id,
                    account,
                    market,
                    side,
                    client_id: o.client_id,
                },
                order_type: o.order_type,
                tif: o.tif,
                post_only: o.post_only,
                stp: o.stp,
            });
            let leg_hold = if i == holder { hold } else { Amount(0) };
            if let OrderType::Limit { price, qty } = o.order_type {
                let meta = OrderMeta {
                    account,
                    hold: leg_hold,
                    filled: Qty(0),
                    quote: Amount(0),
                    orig_qty: qty,
                    stp: o.stp,
                    post_only: true,
                    tif: TimeInForce::Gtc,
                    client_id: o.client_id,
                };
                let m = &mut self.markets[mi];
                m.book
                    .insert(id, side, price, qty, meta)
                    .expect("room was checked");
                mark_dirty(&mut m.dirty_levels, (side, price));
                self.accounts[account.0 as usize].open_orders += 1;
                if let Some(c) = o.client_id {
                    self.client_ids.insert((account, c), (market, id));
                }
            } else {
                self.insert_stop(id, o, leg_hold);
            }
        }
        self.lists.insert(
            list,
            OrderList {
                id: list,
                account,
                market,
                legs: ids,
                holder: holder as u8,
                client_id: l.list_client_id,
            },
        );
        self.list_of.insert(ids[0], list);
        self.list_of.insert(ids[1], list);
        self.take_list_cid(account, l.list_client_id, list);
        Ok(Accept {
            order: Some(ids[0]),
            ..Accept::default()
        })
    }

    /// Ends a live list: cancels its legs but `keep`, and trims `keep`'s hold to what it needs
    /// on its own if it still rests.
    fn end_list(&mut self, list: ListId, keep: Option<OrderId>, out: &mut Vec<Event>) {
        let Some(l) = self.lists.remove(&list) else {
            return;
        };
        self.free_list_cid(l.account, l.client_id, list);
        for leg in l.legs {
            self.list_of.remove(&leg);
        }
        for leg in l.legs {
            if Some(leg) != keep {
                self.cancel_one(l.market, leg, DoneReason::Cancelled, out);
            }
        }
        if let Some(k) = keep {
            let p = self.params[l.market.0 as usize];
            let m = &mut self.markets[l.market.0 as usize];
            if let Some(slot) = m.book.slot(k) {
                let n = *m.book.node(slot);
                if n.side == Side::Buy {
                    let need =
                        worst_cost(&p, n.price, n.qty, p.max_fee_bps()).expect("held before");
                    if n.data.hold > need {
                        m.book.data_mut(slot).hold = need;
                        self.ledger
                            .release(l.account, p.quote, n.data.hold.0 - need.0);
                    }
                }
            }
        }
        out.push(Event::OrderListDone {
            list,
            account: l.account,
            market: l.market,
        });
    }

    /// An order left (cancelled, expired, expired by self-trade prevention): if it was a leg of
    /// a live list, the list ends and its other leg is cancelled. Out of line: lists are rare
    /// and the callers are on the hot path.
    #[cold]
    #[inline(never)]
    fn leg_left(&mut self, id: OrderId, reason: DoneReason, out: &mut Vec<Event>) {
        if let Some(&list) = self.list_of.get(&id) {
            if self.lists.contains_key(&list) {
                self.end_list(list, None, out);
            } else {
                // The working order of an OTO/OTOCO left before it filled completely.
                self.end_oto(list, OtoOutcome::Cancelled(reason), out);
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn is_leg(&self, id: OrderId) -> bool {
        self.list_of.contains_key(&id)
    }

    /// Ends the lists whose legs traded as makers in the last match (the leg keeps what is left).
    #[cold]
    fn end_filled_lists(&mut self, out: &mut Vec<Event>) {
        let mut legs = std::mem::take(&mut self.list_fills);
        for &leg in &legs {
            if let Some(&list) = self.list_of.get(&leg) {
                if self.lists.contains_key(&list) {
                    self.end_list(list, Some(leg), out);
                } else {
                    // An OTO/OTOCO working order: once it is completely filled (gone from the
                    // book), its pending orders are placed after this command's matching.
                    let market = self.otos[&list].market;
                    if self.markets[market.0 as usize].book.slot(leg).is_none() {
                        self.list_of.remove(&leg);
                        self.oto_ready.push(list);
                    }
                }
            }
        }
        legs.clear();
        self.list_fills = legs;
    }
}

/// OTO and OTOCO lists: a working order now, pending order(s) once it has filled completely.
impl Engine {
    /// The live OTO and OTOCO lists (in their pending phase) of an account, by id.
    pub fn open_oto_lists(&self, account: AccountId) -> Vec<OtoList> {
        self.otos
            .values()
            .filter(|l| l.account == account)
            .copied()
            .collect()
    }

    /// A live OTO or OTOCO list in its pending phase.
    pub fn oto_list(&self, id: ListId) -> Option<OtoList> {
        self.otos.get(&id).copied()
    }

    /// The checks of a pending order that do not depend on the book, the balance or the last
    /// price (those are made when it is placed): its filters, type and time in force.
    fn check_pending(&self, p: &MarketParams, o: &NewOrder) -> Result<(), RejectCode> {
        // Binance refuses a quote-quantity pending order too.
        if matches!(o.order_type, OrderType::MarketBudget { .. }) {
            return Err(RejectCode::InvalidOrder);
        }
        self.check_static(p, o)
    }

    /// Validates and places an OTO or OTOCO list (see [`NewOto`](crate::NewOto), [`NewOtoco`](crate::NewOtoco)). `pending`
    /// comes with placeholder ids; the list's ids are assigned here: the working order the next
    /// order id, the pending orders the ones after it.
    fn new_oto(
        &mut self,
        working: &NewOrder,
        pending: Pending,
        client_id: Option<ClientOrderId>,
        out: &mut Vec<Event>,
    ) -> Result<Accept, RejectCode> {
        let w = *working;
        self.check_account(w.account)?;
        let _ = self.market_cfg(w.market)?;
        if w.account == FEE_ACCOUNT {
            return Err(RejectCode::FeeAccount);
        }
        if !matches!(w.order_type, OrderType::Limit { .. }) {
            return Err(RejectCode::InvalidOrder);
        }
        let (account, market) = (w.account, w.market);
        let p = self.params[market.0 as usize];
        for (_, o) in pending.orders() {
            if o.account != account || o.market != market {
                return Err(RejectCode::InvalidOrder);
            }
            self.check_pending(&p, &o)?;
        }
        if let Pending::Oco { legs, .. } = pending {
            self.oco_static(&p, &legs[0], &legs[1])?;
        }
        let mut cids: Vec<ClientOrderId> =
            pending.orders().filter_map(|(_, o)| o.client_id).collect();
        cids.extend(w.client_id);
        for (i, c) in cids.iter().enumerate() {
            if cids[..i].contains(c) || self.client_ids.contains_key(&(account, *c)) {
                return Err(RejectCode::DuplicateClientId);
            }
        }
        if self.list_cid_taken(account, client_id) {
            return Err(RejectCode::DuplicateClientId);
        }
        let n = pending.orders().count() as u64;
        if u64::from(self.accounts[account.0 as usize].open_orders) + 1 + n
            > u64::from(self.config.limits.max_open_orders_per_account)
        {
            return Err(RejectCode::AccountOrderLimit);
        }

        // Ids: the list's, the working order's (`new_order` takes the next one), then the
        // pending orders'.
        let list = ListId(self.next_list_id);
        let wid = OrderId(self.next_order_id);
        let first = wid.0 + 1;
        let pending = match pending {
            Pending::Order { order, .. } => Pending::Order {
                id: OrderId(first),
                order,
            },
            Pending::Oco { legs, .. } => Pending::Oco {
                ids: [OrderId(first), OrderId(first + 1)],
                legs,
            },
        };
        let l = OtoList {
            id: list,
            account,
            market,
            working: wid,
            pending,
            client_id,
        };
        let start = out.len();
        out.push(Event::OtoNew {
            list,
            account,
            market,
            working: wid,
            client_id,
            otoco: matches!(pending, Pending::Oco { .. }),
        });
        for (id, o) in pending.orders() {
            out.push(Event::OrderPending { order: id, new: o });
        }
        // Registered before the working order is placed: a trade with it in this very command
        // (a triggered stop taking it) must see the list.
        self.next_list_id += 1;
        self.otos.insert(list, l);
        self.take_list_cid(account, client_id, list);
        self.list_of.insert(wid, list);
        for (id, o) in pending.orders() {
            self.pending_of.insert(id, list);
            if let Some(c) = o.client_id {
                self.client_ids.insert((account, c), (market, id));
            }
        }
        if let Err(code) = self.new_order(&w, out) {
            // Nothing was placed: undo the registration.
            self.next_list_id -= 1;
            self.otos.remove(&list);
            self.free_list_cid(account, client_id, list);
            self.list_of.remove(&wid);
            for (id, o) in pending.orders() {
                self.pending_of.remove(&id);
                if let Some(c) = o.client_id {
                    self.client_ids.remove(&(account, c));
                }
            }
            out.truncate(start);
            return Err(code);
        }
        debug_assert_eq!(self.next_order_id, first, "the working order took one id");
        self.next_order_id = first + n;
        let m = &self.markets[market.0 as usize];
        if self.list_of.get(&wid) == Some(&list) && m.book.slot(wid).is_none() {
            // The working order did not rest: it filled completely as a taker, or its rest
            // expired (IOC, FOK, self-trade prevention).
            let reason = out[start..]
                .iter()
                .rev()
                .find_map(|e| match *e {
                    Event::OrderDone { info, reason, .. } if info.order == wid => Some(reason),
                    _ => None,
                })
                .expect("an order that does not rest is done");
            if reason == DoneReason::Filled {
                self.list_of.remove(&wid);
                self.oto_ready.push(list);
            } else {
                self.end_oto(list, OtoOutcome::Cancelled(reason), out);
            }
        }
        Ok(Accept {
            order: Some(wid),
            ..Accept::default()
        })
    }

    /// True when a live list of `account` holds the list client id `c`.
    fn list_cid_taken(&self, account: AccountId, c: Option<ClientOrderId>) -> bool {
        c.is_some_and(|c| self.list_cids.contains_key(&(account, c)))
    }

    /// Records that the live list `list` holds its client id.
    fn take_list_cid(&mut self, account: AccountId, c: Option<ClientOrderId>, list: ListId) {
        if let Some(c) = c {
            self.list_cids.insert((account, c), list);
        }
    }

    /// Frees a list's client id when the list is over (only if it is the list holding it: a
    /// snapshot from before the rule may hold two live lists with one client id).
    fn free_list_cid(&mut self, account: AccountId, c: Option<ClientOrderId>, list: ListId) {
        if let Some(c) = c {
            if self.list_cids.get(&(account, c)) == Some(&list) {
                self.list_cids.remove(&(account, c));
            }
        }
    }

    /// Forgets a list's pending orders (their ids and reserved client ids).
    fn forget_pending(&mut self, l: &OtoList) {
        for (id, o) in l.pending.orders() {
            self.pending_of.remove(&id);
            if let Some(c) = o.client_id {
                if self.client_ids.get(&(l.account, c)) == Some(&(l.market, id)) {
                    self.client_ids.remove(&(l.account, c));
                }
            }
        }
    }

    /// Ends an OTO/OTOCO list whose working order left unfilled (or filled, but its pending
    /// orders were not placed): its pending orders are forgotten.
    fn end_oto(&mut self, list: ListId, outcome: OtoOutcome, out: &mut Vec<Event>) {
        let Some(l) = self.otos.remove(&list) else {
            return;
        };
        self.free_list_cid(l.account, l.client_id, list);
        self.list_of.remove(&l.working);
        self.forget_pending(&l);
        out.push(Event::OtoDone {
            list,
            account: l.account,
            market: l.market,
            outcome,
        });
    }

    /// Places the pending orders of the lists whose working order filled completely in this
    /// command, in the order the fills happened. Each placement is checked and held as a new
    /// order (an OCO for an OTOCO) would be now, under the ids assigned when the list was
    /// placed; a refusal changes nothing but ending the list. A placement can fill further
    /// working orders: those are placed after it.
    #[cold]
    #[inline(never)]
    fn place_ready(&mut self, out: &mut Vec<Event>) {
        let mut i = 0;
        while i < self.oto_ready.len() {
            let list = self.oto_ready[i];
            i += 1;
            let Some(l) = self.otos.remove(&list) else {
                continue;
            };
            // An OTOCO's pair is placed as an OCO under the same list and client id.
            self.free_list_cid(l.account, l.client_id, list);
            self.forget_pending(&l);
            let saved = (self.next_order_id, self.next_list_id);
            let at = out.len();
            let placed = match l.pending {
                Pending::Order { id, order } => {
                    self.next_order_id = id.0;
                    self.new_order(&order, out)
                }
                Pending::Oco { ids, legs } => {
                    self.next_order_id = ids[0].0;
                    self.next_list_id = list.0;
                    self.new_oco(
                        &NewOco {
                            legs,
                            list_client_id: l.client_id,
                        },
                        out,
                    )
                }
            };
            let n = l.pending.orders().count() as u64;
            debug_assert!(placed.is_err() || self.next_order_id == l.working.0 + 1 + n);
            (self.next_order_id, self.next_list_id) = saved;
            let outcome = match placed {
                Ok(_) => OtoOutcome::Placed,
                Err(code) => {
                    debug_assert_eq!(out.len(), at, "a refused placement emitted events");
                    OtoOutcome::Refused(code)
                }
            };
            out.push(Event::OtoDone {
                list,
                account: l.account,
                market: l.market,
                outcome,
            });
        }
        self.oto_ready.clear();
    }

    /// A cancel that named no open order: if it names a pending order of a live OTO/OTOCO list,
    /// the list is cancelled (its working order, and with it the pending orders), as Binance
    /// cancels the whole list. Otherwise the cancel is refused with `code`.
    #[cold]
    #[inline(never)]
    fn cancel_pending(
        &mut self,
        account: AccountId,
        market: MarketId,
        order: OrderRef,
        code: RejectCode,
        out: &mut Vec<Event>,
    ) -> Result<Accept, RejectCode> {
        if code != RejectCode::UnknownOrder || self.pending_of.is_empty() {
            return Err(code);
        }
        let id = match order {
            OrderRef::Id(id) => id,
            OrderRef::Client(c) => match self.client_ids.get(&(account, c)) {
                Some(&(_, id)) => id,
                None => return Err(code),
            },
        };
        let Some(l) = self
            .pending_of
            .get(&id)
            .and_then(|l| self.otos.get(l))
            .copied()
        else {
            return Err(code);
        };
        if l.account != account || l.market != market {
            return Err(code);
        }
        self.cancel_one(market, l.working, DoneReason::Cancelled, out);
        debug_assert!(!self.otos.contains_key(&l.id));
        Ok(Accept {
            order: Some(id),
            ..Accept::default()
        })
    }

    /// OTO/OTOCO lists: each live list's working order rests in its market's book, owned by
    /// its account and not completely filled; its pending orders have ids already assigned,
    /// are not open, are on its account and market, and keep their client ids reserved; the
    /// indexes agree; no list waits to be placed between commands.
    fn validate_otos(&self) -> Result<(), &'static str> {
        if !self.oto_ready.is_empty() {
            return Err("an OTO list left waiting for placement");
        }
        let mut pending = 0;
        for (&id, l) in &self.otos {
            if l.id != id || id.0 >= self.next_list_id || self.lists.contains_key(&id) {
                return Err("OTO list id");
            }
            let m = self
                .markets
                .get(l.market.0 as usize)
                .ok_or("an OTO list's market")?;
            if self.list_of.get(&l.working) != Some(&id) {
                return Err("OTO working order index");
            }
            let slot = m
                .book
                .slot(l.working)
                .ok_or("an OTO working order does not rest")?;
            let n = m.book.node(slot);
            if n.data.account != l.account {
                return Err("an OTO working order has another owner");
            }
            for (pid, o) in l.pending.orders() {
                pending += 1;
                if pid.0 >= self.next_order_id || pid == l.working {
                    return Err("OTO pending order id");
                }
                if self.pending_of.get(&pid) != Some(&id) {
                    return Err("OTO pending order index");
                }
                if m.book.slot(pid).is_some() || m.stop_index.contains_key(&pid) {
                    return Err("an OTO pending order is open");
                }
                if o.account != l.account || o.market != l.market {
                    return Err("an OTO pending order has another owner or market");
                }
                if let Some(c) = o.client_id {
                    if self.client_ids.get(&(l.account, c)) != Some(&(l.market, pid)) {
                        return Err("an OTO pending order's client id is not reserved");
                    }
                }
            }
        }
        if self.pending_of.len() != pending {
            return Err("OTO pending order index");
        }
        Ok(())
    }
}

/// A maker traded: if it is a leg of a live list, the list ends after the match.
#[cold]
#[inline(never)]
fn leg_traded(list_of: &FxHashMap<OrderId, ListId>, fills: &mut Vec<OrderId>, id: OrderId) {
    if list_of.contains_key(&id) {
        fills.push(id);
    }
}

fn stop_info(market: MarketId, s: &StopOrder) -> OrderInfo {
    OrderInfo {
        order: s.id,
        account: s.order.account,
        market,
        side: s.order.side,
        client_id: s.order.client_id,
    }
}

/// A resting order in a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestingOrder {
    /// Id.
    pub id: OrderId,
    /// Side.
    pub side: Side,
    /// Limit price.
    pub price: Price,
    /// Open quantity.
    pub qty: Qty,
    /// The engine's data.
    pub meta: OrderMeta,
}

/// One market in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketSnapshot {
    /// Depth sequence number.
    pub depth_seq: u64,
    /// Last trade price.
    pub last_price: Option<Price>,
    /// Resting orders: bids from the best, then asks from the best; each level in time order.
    pub orders: Vec<RestingOrder>,
    /// Waiting stop and take-profit orders: those triggering on a rise by (stop, id), then those
    /// triggering on a fall by (stop, id).
    pub stops: Vec<StopOrder>,
}

/// The whole engine state, canonical: equal states give equal snapshots (and equal encodings).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSnapshot {
    /// Configuration.
    pub config: EngineConfig,
    /// Sequence number.
    pub seq: u64,
    /// Next order id.
    pub next_order_id: u64,
    /// Next trade id.
    pub next_trade_id: u64,
    /// Time of the last command.
    pub now: Timestamp,
    /// Number of accounts.
    pub accounts: u32,
    /// Balances, account-major.
    pub balances: Vec<Balance>,
    /// Per-asset totals.
    pub totals: Vec<AssetTotals>,
    /// Markets.
    pub markets: Vec<MarketSnapshot>,
    /// Credit idempotency keys, sorted.
    pub credit_keys: Vec<IdempotencyKey>,
    /// Transfer idempotency keys, sorted.
    pub transfer_keys: Vec<IdempotencyKey>,
    /// Withdrawals, by id.
    pub withdrawals: Vec<(WithdrawalId, Withdrawal)>,
    /// Next order list id (snapshot format 2; format 1 had no lists).
    pub next_list_id: u64,
    /// Live order lists, by id.
    pub lists: Vec<OrderList>,
    /// Live OTO and OTOCO lists in their pending phase, by id (snapshot format 3).
    pub otos: Vec<OtoList>,
    /// The quote value filled so far of each resting order that has one (non-zero), by id
    /// (snapshot format 4; the order records themselves do not carry it).
    pub order_quotes: Vec<(OrderId, Amount)>,
    /// The terms of the transfer keys applied since format 6, sorted by key (each one of
    /// `transfer_keys`; keys from older snapshots have none).
    pub transfer_terms: Vec<(IdempotencyKey, TransferTerms)>,
    /// The terms of the credit keys applied since format 6, sorted by key (each one of
    /// `credit_keys`; keys from older snapshots have none).
    pub credit_terms: Vec<(IdempotencyKey, CreditTerms)>,
    /// The sequence number of each transfer applied since format 7, sorted by key (each one a
    /// key of `transfer_terms`; keys from older snapshots have none, and their retries answer
    /// no original).
    pub transfer_seqs: Vec<(IdempotencyKey, u64)>,
}

impl EngineSnapshot {
    /// The postcard bytes that turn a format-1 payload (before order lists) into a format-2
    /// one: `next_list_id = 1` and no lists, appended after the last format-1 field.
    pub const V1_TO_V2_TRAILER: [u8; 2] = [1, 0];
    /// The postcard bytes that turn a format-2 payload (before OTO lists) into a format-3 one:
    /// no OTO lists, appended after the last format-2 field.
    pub const V2_TO_V3_TRAILER: [u8; 1] = [0];
    /// The postcard bytes that turn a format-3 payload (before per-order quote filled) into a
    /// format-4 one: no order quotes (orders resting then count only their later fills).
    pub const V3_TO_V4_TRAILER: [u8; 1] = [0];
    /// The postcard bytes that turn a format-4/5 payload (before transfer and credit terms) into
    /// a format-6 one: no terms of either (a retry under those keys stays a duplicate whatever
    /// its terms).
    pub const V5_TO_V6_TRAILER: [u8; 2] = [0, 0];
    /// The postcard bytes that turn a format-6 payload (before transfers' sequence numbers)
    /// into a format-7 one: none.
    pub const V6_TO_V7_TRAILER: [u8; 1] = [0];
}

/// A snapshot that does not describe a valid engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The configuration is invalid.
    #[error("invalid configuration in snapshot: {0}")]
    Config(#[from] ConfigError),
    /// Sizes or contents are inconsistent.
    #[error("inconsistent snapshot: {0}")]
    Inconsistent(&'static str),
}

impl Engine {
    /// A canonical copy of the whole state.
    pub fn snapshot(&self) -> EngineSnapshot {
        let mut order_quotes = Vec::new();
        let markets = self
            .markets
            .iter()
            .map(|m| {
                let mut orders = Vec::with_capacity(m.book.len());
                for side in [Side::Buy, Side::Sell] {
                    for (price, _) in m.book.levels(side) {
                        orders.extend(m.book.orders_at(price).map(|n| RestingOrder {
                            id: n.id,
                            side: n.side,
                            price: n.price,
                            qty: n.qty,
                            meta: OrderMeta {
                                quote: Amount(0),
                                ..n.data
                            },
                        }));
                        order_quotes.extend(
                            m.book
                                .orders_at(price)
                                .filter(|n| !n.data.quote.is_zero())
                                .map(|n| (n.id, n.data.quote)),
                        );
                    }
                }
                MarketSnapshot {
                    depth_seq: m.depth_seq,
                    last_price: m.last_price,
                    orders,
                    stops: m
                        .stop_buys
                        .values()
                        .chain(m.stop_sells.values())
                        .copied()
                        .collect(),
                }
            })
            .collect();
        let (credit_keys, credit_terms) = keys_and_terms(&self.credit_keys, |t| t);
        let (transfer_keys, transfer_terms) = keys_and_terms(&self.transfer_keys, |k| k.terms);
        let mut transfer_seqs: Vec<_> = self
            .transfer_keys
            .iter()
            .filter_map(|(key, k)| Some((*key, (*k)?.seq?)))
            .collect();
        transfer_seqs.sort_unstable_by_key(|(key, _)| *key);
        let mut withdrawals: Vec<_> = self.withdrawals.iter().map(|(k, v)| (*k, *v)).collect();
        withdrawals.sort_unstable_by_key(|(k, _)| *k);
        EngineSnapshot {
            config: self.config.clone(),
            seq: self.seq,
            next_order_id: self.next_order_id,
            next_trade_id: self.next_trade_id,
            now: self.now,
            accounts: self.accounts.len() as u32,
            balances: self.ledger.balances.clone(),
            totals: self.ledger.totals.clone(),
            markets,
            credit_keys,
            transfer_keys,
            withdrawals,
            next_list_id: self.next_list_id,
            lists: self.lists.values().copied().collect(),
            otos: self.otos.values().copied().collect(),
            order_quotes: {
                order_quotes.sort_unstable_by_key(|(id, _)| *id);
                order_quotes
            },
            transfer_terms,
            credit_terms,
            transfer_seqs,
        }
    }

    /// Rebuilds an engine from a snapshot, and refuses one whose contents are inconsistent
    /// (see [`validate`](Self::validate)) instead of running on a broken ledger.
    pub fn from_snapshot(s: EngineSnapshot) -> Result<Self, SnapshotError> {
        let mut e = Engine::new(s.config)?;
        let n_assets = e.config.assets.len();
        if s.balances.len() != s.accounts as usize * n_assets
            || s.totals.len() != n_assets
            || s.markets.len() != e.markets.len()
            || s.accounts == 0
        {
            return Err(SnapshotError::Inconsistent("sizes"));
        }
        e.seq = s.seq;
        e.next_order_id = s.next_order_id;
        e.next_trade_id = s.next_trade_id;
        e.now = s.now;
        e.accounts = vec![Account::default(); s.accounts as usize];
        e.ledger.balances = s.balances;
        e.ledger.totals = s.totals;
        let mut ids = FxHashSet::default();
        let mut new_id = |id: OrderId| {
            if id.0 >= s.next_order_id || !ids.insert(id) {
                return Err(SnapshotError::Inconsistent(
                    "order id reused or not yet issued",
                ));
            }
            Ok(())
        };
        if s.order_quotes.windows(2).any(|w| w[0].0 >= w[1].0)
            || s.order_quotes.iter().any(|(_, q)| q.is_zero())
        {
            return Err(SnapshotError::Inconsistent("order quotes"));
        }
        let mut quotes: FxHashMap<OrderId, Amount> = s.order_quotes.into_iter().collect();
        for (mi, ms) in s.markets.into_iter().enumerate() {
            let market = MarketId(mi as u16);
            let m = &mut e.markets[mi];
            m.depth_seq = ms.depth_seq;
            m.last_price = ms.last_price;
            for o in ms.orders {
                let account = o.meta.account.0 as usize;
                if account >= e.accounts.len()
                    || o.price.0 == 0
                    || o.price > m.book.max_price()
                    || o.qty.is_zero()
                {
                    return Err(SnapshotError::Inconsistent("order"));
                }
                let crosses = match o.side {
                    Side::Buy => m.book.best_ask().is_some_and(|a| o.price >= a),
                    Side::Sell => m.book.best_bid().is_some_and(|b| o.price <= b),
                };
                if crosses {
                    return Err(SnapshotError::Inconsistent("crossed book"));
                }
                new_id(o.id)?;
                let meta = OrderMeta {
                    quote: quotes.remove(&o.id).unwrap_or_default(),
                    ..o.meta
                };
                m.book
                    .insert(o.id, o.side, o.price, o.qty, meta)
                    .map_err(|_| SnapshotError::Inconsistent("book full"))?;
                e.accounts[account].open_orders += 1;
                if let Some(c) = o.meta.client_id {
                    if e.client_ids
                        .insert((o.meta.account, c), (market, o.id))
                        .is_some()
                    {
                        return Err(SnapshotError::Inconsistent("client order id reused"));
                    }
                }
                if let TimeInForce::Gtd(t) = o.meta.tif {
                    e.expiries.push(Reverse((t.0, o.id.0, market.0)));
                }
            }
            for st in ms.stops {
                let account = st.order.account.0 as usize;
                let Some((dir, stop)) = st.order.order_type.trigger(st.order.side) else {
                    return Err(SnapshotError::Inconsistent("stop"));
                };
                if account >= e.accounts.len() {
                    return Err(SnapshotError::Inconsistent("stop account"));
                }
                new_id(st.id)?;
                // Numbered in snapshot order, which is each map's key order: equal trigger
                // prices keep their time priority ([`StopKey`]).
                if !m.put_stop(dir, stop, st) {
                    return Err(SnapshotError::Inconsistent("stop listed twice"));
                }
                if let TimeInForce::Gtd(t) = st.order.tif {
                    e.expiries.push(Reverse((t.0, st.id.0, market.0)));
                }
                e.accounts[account].open_orders += 1;
                if let Some(c) = st.order.client_id {
                    if e.client_ids
                        .insert((st.order.account, c), (market, st.id))
                        .is_some()
                    {
                        return Err(SnapshotError::Inconsistent("client order id reused"));
                    }
                }
            }
        }
        if !quotes.is_empty() {
            return Err(SnapshotError::Inconsistent(
                "quote of an order not in the book",
            ));
        }
        e.credit_keys = keys_with_terms(s.credit_keys, s.credit_terms).ok_or(
            SnapshotError::Inconsistent("credit terms unsorted or of an unknown key"),
        )?;
        let transfers = keys_with_terms(s.transfer_keys, s.transfer_terms).ok_or(
            SnapshotError::Inconsistent("transfer terms unsorted or of an unknown key"),
        )?;
        e.transfer_keys = transfers
            .into_iter()
            .map(|(key, t)| (key, t.map(|terms| KnownTransfer { terms, seq: None })))
            .collect();
        if s.transfer_seqs.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(SnapshotError::Inconsistent(
                "transfer sequence numbers unsorted",
            ));
        }
        for (key, seq) in s.transfer_seqs {
            match e.transfer_keys.get_mut(&key) {
                Some(Some(k)) if seq != 0 && seq <= s.seq => k.seq = Some(seq),
                _ => {
                    return Err(SnapshotError::Inconsistent(
                        "transfer sequence number of an unknown key or out of range",
                    ))
                }
            }
        }
        e.withdrawals = s.withdrawals.into_iter().collect();
        e.next_list_id = s.next_list_id;
        for l in s.lists {
            if e.lists.insert(l.id, l).is_some() {
                return Err(SnapshotError::Inconsistent("list listed twice"));
            }
            for leg in l.legs {
                if e.list_of.insert(leg, l.id).is_some() {
                    return Err(SnapshotError::Inconsistent("order in two lists"));
                }
            }
        }
        for l in s.otos {
            if e.lists.contains_key(&l.id) || e.otos.insert(l.id, l).is_some() {
                return Err(SnapshotError::Inconsistent("list listed twice"));
            }
            if e.list_of.insert(l.working, l.id).is_some() {
                return Err(SnapshotError::Inconsistent("order in two lists"));
            }
            for (id, o) in l.pending.orders() {
                if e.pending_of.insert(id, l.id).is_some() {
                    return Err(SnapshotError::Inconsistent("order in two lists"));
                }
                if let Some(c) = o.client_id {
                    if e.client_ids
                        .insert((l.account, c), (l.market, id))
                        .is_some()
                    {
                        return Err(SnapshotError::Inconsistent("client order id reused"));
                    }
                }
            }
        }
        // Derived: which live list holds each list client id (the first by id, should a
        // snapshot from before the rule hold two).
        let held: Vec<_> = (e.lists.values().map(|l| (l.account, l.client_id, l.id)))
            .chain(e.otos.values().map(|l| (l.account, l.client_id, l.id)))
            .collect();
        for (account, c, id) in held {
            if let Some(c) = c {
                e.list_cids.entry((account, c)).or_insert(id);
            }
        }
        e.validate().map_err(SnapshotError::Inconsistent)?;
        Ok(e)
    }

    /// SHA-256 of the canonical encoding of the whole state.
    pub fn state_hash(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let bytes = postcard::to_stdvec(&self.snapshot()).expect("snapshot encodes");
        Sha256::digest(&bytes).into()
    }
}

/// An idempotency key map as a snapshot holds it: every key, sorted, and the terms (`terms` of
/// the map's value) of those that have them (format 6 on), sorted by key.
fn keys_and_terms<V: Copy, T>(
    map: &FxHashMap<IdempotencyKey, Option<V>>,
    terms: impl Fn(V) -> T,
) -> (Vec<IdempotencyKey>, Vec<(IdempotencyKey, T)>) {
    let mut keys: Vec<_> = map.keys().copied().collect();
    keys.sort_unstable();
    let mut terms: Vec<_> = map
        .iter()
        .filter_map(|(k, v)| Some((*k, terms((*v)?))))
        .collect();
    terms.sort_unstable_by_key(|(k, _)| *k);
    (keys, terms)
}

/// The map [`keys_and_terms`] came from; `None` when the terms are unsorted or name a key
/// that is not there.
fn keys_with_terms<T>(
    keys: Vec<IdempotencyKey>,
    terms: Vec<(IdempotencyKey, T)>,
) -> Option<FxHashMap<IdempotencyKey, Option<T>>> {
    let mut map: FxHashMap<_, Option<T>> = keys.into_iter().map(|k| (k, None)).collect();
    if terms.windows(2).any(|w| w[0].0 >= w[1].0) {
        return None;
    }
    for (k, t) in terms {
        *map.get_mut(&k)? = Some(t);
    }
    Some(map)
}

impl crate::StateMachine for Engine {
    type Command = Command;
    type Event = Event;
    type Snapshot = EngineSnapshot;

    fn apply(
        &mut self,
        cmd: &Command,
        now: Timestamp,
        out: &mut Vec<Event>,
    ) -> Result<(), RejectCode> {
        Engine::apply(self, cmd, now, out)
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn snapshot(&self) -> EngineSnapshot {
        Engine::snapshot(self)
    }
    fn restore(snapshot: EngineSnapshot) -> Result<Self, crate::RestoreError> {
        Engine::from_snapshot(snapshot).map_err(Into::into)
    }
    fn state_hash(&self) -> [u8; 32] {
        Engine::state_hash(self)
    }
    fn upgrade_snapshot_payload(version: u32, payload: &mut Vec<u8>) -> bool {
        // Each older payload lacks the trailing fields of the formats after it.
        let trailers: &[&[u8]] = match version {
            1 => &[
                &EngineSnapshot::V1_TO_V2_TRAILER,
                &EngineSnapshot::V2_TO_V3_TRAILER,
                &EngineSnapshot::V3_TO_V4_TRAILER,
                &EngineSnapshot::V5_TO_V6_TRAILER,
                &EngineSnapshot::V6_TO_V7_TRAILER,
            ],
            2 => &[
                &EngineSnapshot::V2_TO_V3_TRAILER,
                &EngineSnapshot::V3_TO_V4_TRAILER,
                &EngineSnapshot::V5_TO_V6_TRAILER,
                &EngineSnapshot::V6_TO_V7_TRAILER,
            ],
            3 => &[
                &EngineSnapshot::V3_TO_V4_TRAILER,
                &EngineSnapshot::V5_TO_V6_TRAILER,
                &EngineSnapshot::V6_TO_V7_TRAILER,
            ],
            // Format 5 changed the header's checksum only: its payload is format 4's.
            4 | 5 => &[
                &EngineSnapshot::V5_TO_V6_TRAILER,
                &EngineSnapshot::V6_TO_V7_TRAILER,
            ],
            6 => &[&EngineSnapshot::V6_TO_V7_TRAILER],
            _ => return false,
        };
        for t in trailers {
            payload.extend_from_slice(t);
        }
        true
    }
    fn validate(&self) -> Result<(), crate::RestoreError> {
        Engine::validate(self).map_err(Into::into)
    }
}
