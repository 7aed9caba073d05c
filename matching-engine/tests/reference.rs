//! Property tests of the engine against a deliberately naive reference model.
//!
//! The model below is written from the documented rules (the doc comments of `Command`,
//! `OrderType`, `StpMode`, `RejectCode`, `MarketConfig::fee` and the crate docs), not from the
//! engine's code, and it uses none of the engine's data structures: resting orders and stops are
//! plain `Vec`s scanned linearly (best price, then earliest priority stamp), and balances live in
//! a `BTreeMap<(account, asset), (available, held)>`.
//!
//! Rules the model implements (one market, lot 1, tick 1, fees maker 10 / taker 20 bps and also
//! maker 35 / taker 5, small order limits so `BookFull` and `AccountOrderLimit` happen):
//! * a bid holds `notional + fee(notional, max(maker, taker))`, an ask holds its base; a resting
//!   bid holds exactly that for its open quantity once it has finished taking;
//! * trades at the maker's price, strict price-time priority, fees rounded down per fill;
//! * self-trade prevention decided by the taker's mode;
//! * market by quantity holds the cost of walking the asks (fee on the total), a buy by quote
//!   budget holds the budget and spends at most it (fees included); a sell by quote budget sells
//!   the lots that, walking the bids, bring in at least the budget before fees; under
//!   `ExpireMaker` the walks skip the account's own orders (they are expired, not traded), and a
//!   market order with nothing it could trade with on the other side is invalid;
//! * amend: lower quantity (same price) keeps priority; a new price or a higher quantity loses it
//!   and may trade at once;
//! * stops trigger on the last trade price (buys at or above their stop, lowest first; then sells
//!   at or below, highest first; ties in time order); a stop-market buy is priced when triggered;
//!   take-profit orders are the mirror (a sell triggers at or above its stop, with the stop buys;
//!   a buy at or below, with the stop sells);
//! * GTD orders, resting or waiting stops, expire at the first command at or after their time;
//! * an OCO (`Command::NewOco`) places both legs or neither: a sell's above leg is a limit maker
//!   or take-profit, its below leg a stop (a buy the other way round), one quantity, the above
//!   leg's level (limit price, else trigger) above the last price and the below leg's under it;
//!   it holds once (a sell its base, a buy the larger quote need, on the limit maker or else the
//!   above leg); the first fill, trigger, cancel or expiry of a leg cancels the other (a
//!   triggered leg then holds what it would alone; a partly filled buy maker keeps only its own
//!   worst cost), and its legs cannot be amended;
//! * an OTO (`Command::NewOto`) or OTOCO (`Command::NewOtoco`) places a working limit order now
//!   and its pending order (an OCO pair for an OTOCO) when the working order has filled
//!   completely, after the command's matching, under ids assigned at placement (the working
//!   order's, then the pending ones'); the pending orders hold nothing and are not open until
//!   then, but their client ids are taken; when placed they are checked like a new order (an
//!   OCO) at that moment and a refusal only ends the list; the working order leaving any other
//!   way, or a cancel naming a pending order, ends the list unplaced; the working order cannot
//!   be amended;
//! * a new order, each OCO leg and each pending order pass one set of static checks in one
//!   order (quantity, stop, price, notional, then post-only and time in force), so a leg with
//!   two faults is refused with the code a new order with them gets;
//! * withdrawals hold `amount + fee`; completion pays the unused flat fee to the fee account;
//! * a rejected command changes nothing (but GTD expiries due at its time).
//!
//! Properties: `engine_matches_reference` and `..._maker_fee_above_taker` (outcome, reject code, trades, order events, book per
//! level and order, stops, last price and every balance after every command),
//! `rejected_changes_nothing` (state hash) and `snapshot_restore_is_identical`.
//! `PROPTEST_CASES` raises the number of cases (default 256).

use matching_engine::{
    AccountId, Amount, AssetConfig, AssetId, ClientOrderId, Command, DoneReason, Engine,
    EngineConfig, Event, IdempotencyKey, Limits, MarketConfig, MarketId, NewOco, NewOrder, NewOto,
    NewOtoco, OrderId, OrderRef, OrderType, OtoOutcome, Price, Qty, RejectCode, Side, StpMode,
    TimeInForce, Timestamp, WithdrawalId, WithdrawalState,
};
use proptest::prelude::*;
use std::collections::BTreeMap;

const M: MarketId = MarketId(0);
const BASE: u16 = 0;
const QUOTE: u16 = 1;
const N_ASSETS: u16 = 2;
/// Fees in basis points: (maker, taker).
const FEES: (u16, u16) = (10, 20);
/// Maker above taker: a bid's fee allowance is the maker fee.
const FEES_MAKER_ABOVE: (u16, u16) = (35, 5);
const MIN_PRICE: u64 = 1;
const MAX_PRICE: u64 = 2_000;
const MAX_QTY: u64 = 1_000;
const MIN_NOTIONAL: u64 = 1_000;
const MAX_OPEN_PER_ACCOUNT: usize = 6;
const MAX_BOOK: usize = 14;

fn config((maker_bps, taker_bps): (u16, u16)) -> EngineConfig {
    EngineConfig {
        assets: vec![
            AssetConfig {
                symbol: "BTC".into(),
                decimals: 8,
            },
            AssetConfig {
                symbol: "USD".into(),
                decimals: 8,
            },
        ],
        markets: vec![MarketConfig {
            symbol: "BTCUSD".into(),
            base: AssetId(BASE),
            quote: AssetId(QUOTE),
            lot_size: 1,
            tick_size: 1,
            min_qty: Qty(1),
            min_notional: Amount(MIN_NOTIONAL),
            min_price: Price(MIN_PRICE),
            max_price: Price(MAX_PRICE),
            max_qty: Qty(MAX_QTY),
            maker_fee_bps: maker_bps,
            taker_fee_bps: taker_bps,
        }],
        limits: Limits {
            max_orders_per_book: MAX_BOOK as u32,
            max_open_orders_per_account: MAX_OPEN_PER_ACCOUNT as u32,
            max_accounts: 64,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// The reference model.
// ---------------------------------------------------------------------------------------------

/// What the model and the engine are compared on, per accepted command, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    New {
        order: u64,
    },
    Trade {
        price: u64,
        qty: u64,
        maker_order: u64,
        taker_order: u64,
        maker_account: u32,
        taker_account: u32,
        maker_fee: u64,
        taker_fee: u64,
        notional: u64,
        maker_remaining: u64,
        taker_remaining: u64,
    },
    Done {
        order: u64,
        reason: DoneReason,
        filled: u64,
        remaining: u64,
    },
    Amended {
        order: u64,
        price: u64,
        qty: u64,
        remaining: u64,
        kept_priority: bool,
    },
    Triggered {
        order: u64,
        last_price: u64,
    },
    ListNew {
        list: u64,
        legs: [u64; 2],
    },
    ListDone {
        list: u64,
    },
    OtoNew {
        list: u64,
        working: u64,
        pending: Vec<u64>,
    },
    OtoDone {
        list: u64,
        outcome: OtoOutcome,
    },
    /// The answer to a credit query.
    CreditStatus {
        key: [u8; 36],
        credited: bool,
    },
    /// The answer to a transfer query.
    TransferStatus {
        key: [u8; 36],
        transferred: bool,
    },
    /// The answer to a withdrawal query: (account, asset, amount, fee, state), or none.
    WithdrawalStatus {
        id: u64,
        record: Option<(u32, u16, u64, u64, WState)>,
    },
}

#[derive(Clone, Debug)]
struct ROrder {
    id: u64,
    account: u32,
    side: Side,
    price: u64,
    /// Open quantity.
    open: u64,
    filled: u64,
    /// Amount of the hold asset this order holds.
    hold: u64,
    /// Time priority: lower goes first. A fresh stamp on insertion.
    prio: u64,
    post_only: bool,
    stp: StpMode,
    tif: TimeInForce,
    client: Option<ClientOrderId>,
}

/// A stop order waiting for the last trade price to reach `stop`.
#[derive(Clone, Debug)]
struct RStop {
    id: u64,
    account: u32,
    side: Side,
    stop: u64,
    /// Triggers when the last price rises to `stop` (stop buy, take-profit sell), else when it
    /// falls to it.
    rise: bool,
    /// Limit price once triggered; `None` for a stop-market order.
    limit: Option<u64>,
    qty: u64,
    hold: u64,
    tif: TimeInForce,
    stp: StpMode,
    client: Option<ClientOrderId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WState {
    Held,
    Released,
    Completed,
}

fn gtd_of(tif: TimeInForce) -> Option<u64> {
    match tif {
        TimeInForce::Gtd(t) => Some(t.0),
        _ => None,
    }
}

/// Where `find` found an order.
enum Found {
    Resting(usize),
    Stop(usize),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum End {
    Filled,
    NoMore,
    SelfTrade,
    /// A buy without a limit price ran out of what it holds.
    OutOfHold,
}

struct Taker {
    id: u64,
    account: u32,
    side: Side,
    limit: Option<u64>,
    /// Open quantity (`u64::MAX` for a buy by quote budget: bounded by its hold only).
    open: u64,
    filled: u64,
    hold: u64,
    stp: StpMode,
    budget_buy: bool,
}

/// A live OCO: `legs` are `[above, below]`; `holder` holds for both.
#[derive(Clone, Debug)]
struct RList {
    id: u64,
    account: u32,
    legs: [u64; 2],
    holder: usize,
    client: Option<ClientOrderId>,
}

/// A live OTO/OTOCO list in its pending phase.
#[derive(Clone, Debug)]
struct ROto {
    id: u64,
    account: u32,
    working: u64,
    /// (id, order): one for an OTO, `[above, below]` for an OTOCO.
    pending: Vec<(u64, NewOrder)>,
    client: Option<ClientOrderId>,
    /// The working order filled completely: placed at the end of the command.
    ready: bool,
}

#[derive(Default)]
struct Reference {
    lists: Vec<RList>,
    otos: Vec<ROto>,
    /// Lists whose working order filled in this command, in fill order.
    oto_ready: Vec<u64>,
    next_list_id: u64,
    /// Makers of list legs that traded during the current match.
    list_fills: Vec<u64>,
    accounts: u32,
    bal: BTreeMap<(u32, u16), (u64, u64)>,
    /// All resting orders of both sides, unordered: every query scans.
    orders: Vec<ROrder>,
    stops: Vec<RStop>,
    last_price: Option<u64>,
    /// id -> (account, asset, amount, fee, state).
    withdrawals: BTreeMap<u64, (u32, u16, u64, u64, WState)>,
    next_order_id: u64,
    next_prio: u64,
    /// key -> (account, asset, amount) of the credit made under it.
    credit_keys: BTreeMap<[u8; 36], (u32, u16, u64)>,
    /// key -> (from, to, asset, amount) of the transfer made under it.
    transfer_keys: BTreeMap<[u8; 36], (u32, u32, u16, u64)>,
    now: u64,
    maker_bps: u64,
    taker_bps: u64,
}

fn fee(notional: u64, bps: u64) -> u64 {
    notional * bps / 10_000
}

fn hold_asset(side: Side) -> u16 {
    match side {
        Side::Buy => QUOTE,
        Side::Sell => BASE,
    }
}

/// The account whose resting orders an incoming order expires rather than trades with: they are
/// no liquidity for it ("the rest is cancelled when the book runs out").
fn expired_makers(stp: StpMode, account: u32) -> Option<u32> {
    (stp == StpMode::ExpireMaker).then_some(account)
}

fn crosses(side: Side, limit: u64, maker_price: u64) -> bool {
    match side {
        Side::Buy => maker_price <= limit,
        Side::Sell => maker_price >= limit,
    }
}

/// Why a taker that does not rest is done.
fn done_reason(end: &End, budget_buy: bool) -> DoneReason {
    match end {
        End::Filled => DoneReason::Filled,
        End::SelfTrade => DoneReason::SelfTrade,
        End::NoMore => DoneReason::IocRemainder,
        // A quote-budget buy that spent its budget is done; a market buy by quantity that could
        // not pay for more has its rest cancelled like any IOC remainder.
        End::OutOfHold if budget_buy => DoneReason::Filled,
        End::OutOfHold => DoneReason::IocRemainder,
    }
}

impl Reference {
    fn new((maker_bps, taker_bps): (u16, u16)) -> Self {
        let mut r = Reference {
            accounts: 1,
            next_order_id: 1,
            next_list_id: 1,
            maker_bps: maker_bps.into(),
            taker_bps: taker_bps.into(),
            ..Reference::default()
        };
        for a in 0..N_ASSETS {
            r.bal.insert((0, a), (0, 0));
        }
        r
    }

    /// What a bid of `qty` at `price` holds: notional plus the larger fee.
    fn bid_hold(&self, price: u64, qty: u64) -> u64 {
        let n = price * qty;
        n + fee(n, self.maker_bps.max(self.taker_bps))
    }

    fn exists(&self, a: AccountId) -> bool {
        a.0 < self.accounts
    }

    fn avail(&self, a: u32, asset: u16) -> u64 {
        self.bal[&(a, asset)].0
    }

    fn add_avail(&mut self, a: u32, asset: u16, amt: i128) {
        let b = self.bal.get_mut(&(a, asset)).unwrap();
        b.0 = u64::try_from(i128::from(b.0) + amt).expect("available stays non-negative");
    }

    fn add_held(&mut self, a: u32, asset: u16, amt: i128) {
        let b = self.bal.get_mut(&(a, asset)).unwrap();
        b.1 = u64::try_from(i128::from(b.1) + amt).expect("held stays non-negative");
    }

    fn hold(&mut self, a: u32, asset: u16, amt: u64) {
        self.add_avail(a, asset, -i128::from(amt));
        self.add_held(a, asset, i128::from(amt));
    }

    fn release(&mut self, a: u32, asset: u16, amt: u64) {
        self.add_held(a, asset, -i128::from(amt));
        self.add_avail(a, asset, i128::from(amt));
    }

    /// Index of the best resting order on `side`: best price, then earliest priority.
    fn best(&self, side: Side) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, o) in self.orders.iter().enumerate() {
            if o.side != side {
                continue;
            }
            let better = match best {
                None => true,
                Some(b) => {
                    let b = &self.orders[b];
                    let price_better = match side {
                        Side::Buy => o.price > b.price,
                        Side::Sell => o.price < b.price,
                    };
                    price_better || (o.price == b.price && o.prio < b.prio)
                }
            };
            if better {
                best = Some(i);
            }
        }
        best
    }

    /// Orders of `side` from the best, in priority.
    fn sorted(&self, side: Side) -> Vec<ROrder> {
        let mut v: Vec<ROrder> = self
            .orders
            .iter()
            .filter(|o| o.side == side)
            .cloned()
            .collect();
        v.sort_by_key(|o| {
            let p = match side {
                Side::Buy => u64::MAX - o.price,
                Side::Sell => o.price,
            };
            (p, o.prio)
        });
        v
    }

    fn open_count(&self, a: u32) -> usize {
        self.orders.iter().filter(|o| o.account == a).count()
            + self.stops.iter().filter(|o| o.account == a).count()
    }

    fn remove_stop(&mut self, i: usize, reason: DoneReason, evs: &mut Vec<Ev>) {
        let s = self.stops.remove(i);
        self.release(s.account, hold_asset(s.side), s.hold);
        evs.push(Ev::Done {
            order: s.id,
            reason,
            filled: 0,
            remaining: s.qty,
        });
        self.end_list_of(s.id, None, evs);
    }

    /// Ends the live list `id` is a leg of, if any: cancels the other legs (not `keep`), trims a
    /// still-resting `keep` buy to its own worst cost, and reports the list done.
    fn end_list_of(&mut self, id: u64, keep: Option<u64>, evs: &mut Vec<Ev>) {
        let Some(li) = self.lists.iter().position(|l| l.legs.contains(&id)) else {
            return;
        };
        let l = self.lists.remove(li);
        for leg in l.legs {
            if Some(leg) == keep {
                continue;
            }
            if let Some(i) = self.orders.iter().position(|o| o.id == leg) {
                self.remove(i, DoneReason::Cancelled, evs);
            } else if let Some(i) = self.stops.iter().position(|o| o.id == leg) {
                self.remove_stop(i, DoneReason::Cancelled, evs);
            }
        }
        if let Some(k) = keep {
            if let Some(i) = self.orders.iter().position(|o| o.id == k) {
                let o = self.orders[i].clone();
                if o.side == Side::Buy {
                    let need = self.bid_hold(o.price, o.open);
                    if o.hold > need {
                        self.orders[i].hold = need;
                        self.release(o.account, QUOTE, o.hold - need);
                    }
                }
            }
        }
        evs.push(Ev::ListDone { list: l.id });
    }

    /// Expires every GTD order (resting or waiting stop) whose time has come, earliest first.
    fn expire_due(&mut self, evs: &mut Vec<Ev>) {
        let mut due: Vec<(u64, u64)> = self
            .orders
            .iter()
            .filter_map(|o| gtd_of(o.tif).map(|t| (t, o.id)))
            .chain(
                self.stops
                    .iter()
                    .filter_map(|o| gtd_of(o.tif).map(|t| (t, o.id))),
            )
            .filter(|&(t, _)| t <= self.now)
            .collect();
        due.sort_unstable();
        for (_, id) in due {
            if let Some(i) = self.orders.iter().position(|o| o.id == id) {
                self.remove(i, DoneReason::Expired, evs);
            } else if let Some(i) = self.stops.iter().position(|o| o.id == id) {
                self.remove_stop(i, DoneReason::Expired, evs);
            }
        }
    }

    /// Removes a resting order, releases what it holds and reports it done.
    fn remove(&mut self, i: usize, reason: DoneReason, evs: &mut Vec<Ev>) {
        let o = self.orders.remove(i);
        self.release(o.account, hold_asset(o.side), o.hold);
        evs.push(Ev::Done {
            order: o.id,
            reason,
            filled: o.filled,
            remaining: o.open,
        });
        // A maker that filled ends its list once the match is over (see `list_fills`).
        if reason != DoneReason::Filled {
            self.end_list_of(o.id, None, evs);
            self.end_oto_of(o.id, reason, evs);
        }
    }

    /// What an order holds on its own: a buy its worst cost at its limit price (nothing for a
    /// market buy), a sell its quantity.
    fn lone_hold(&self, o: &NewOrder) -> u64 {
        match (o.side, o.order_type) {
            (
                Side::Buy,
                OrderType::Limit { price, qty }
                | OrderType::StopLimit { price, qty, .. }
                | OrderType::TakeProfitLimit { price, qty, .. },
            ) => self.bid_hold(price.0, qty.0),
            (Side::Buy, _) => 0,
            (Side::Sell, t) => t.qty().map_or(0, |q| q.0),
        }
    }

    fn new_oco(&mut self, l: &NewOco, evs: &mut Vec<Ev>) -> Result<(), RejectCode> {
        let [above, below] = l.legs;
        if !self.exists(above.account) {
            return Err(RejectCode::UnknownAccount);
        }
        if above.market != M {
            return Err(RejectCode::UnknownMarket);
        }
        if above.account.0 == 0 {
            return Err(RejectCode::FeeAccount);
        }
        if above.account != below.account
            || above.market != below.market
            || above.side != below.side
        {
            return Err(RejectCode::InvalidOrder);
        }
        let (a, side) = (above.account.0, above.side);
        let qty = above.order_type.qty().ok_or(RejectCode::InvalidOrder)?;
        if below.order_type.qty() != Some(qty) {
            return Err(RejectCode::InvalidOrder);
        }
        let maker_leg = |o: &NewOrder| {
            matches!(o.order_type, OrderType::Limit { .. })
                && o.post_only
                && o.tif == TimeInForce::Gtc
        };
        let profit = |o: &NewOrder| {
            maker_leg(o)
                || (matches!(
                    o.order_type,
                    OrderType::TakeProfitLimit { .. } | OrderType::TakeProfitMarket { .. }
                ) && !o.post_only)
        };
        let loss = |o: &NewOrder| {
            matches!(
                o.order_type,
                OrderType::StopLimit { .. } | OrderType::StopMarket { .. }
            ) && !o.post_only
        };
        let ok = match side {
            Side::Sell => profit(&above) && loss(&below),
            Side::Buy => loss(&above) && profit(&below),
        };
        if !ok {
            return Err(RejectCode::InvalidOrder);
        }
        let price_of = |o: &NewOrder| -> (Option<u64>, Option<u64>) {
            match o.order_type {
                OrderType::Limit { price, .. } => (Some(price.0), None),
                OrderType::StopLimit { stop, price, .. }
                | OrderType::TakeProfitLimit { stop, price, .. } => (Some(price.0), Some(stop.0)),
                OrderType::StopMarket { stop, .. } | OrderType::TakeProfitMarket { stop, .. } => {
                    (None, Some(stop.0))
                }
                _ => (None, None),
            }
        };
        for o in [&above, &below] {
            Self::check_qty(qty.0)?;
            let (price, stop) = price_of(o);
            if let Some(price) = price {
                Self::check_price(price)?;
                Self::check_notional(price, qty.0)?;
            }
            if let Some(stop) = stop {
                Self::check_price(stop)?;
            }
            match o.tif {
                TimeInForce::Gtd(t) if t.0 <= self.now => return Err(RejectCode::InvalidOrder),
                TimeInForce::Fok => return Err(RejectCode::InvalidOrder),
                _ => {}
            }
        }
        // A limit maker works at its price, the others at their trigger.
        let level = |o: &NewOrder| {
            let (price, stop) = price_of(o);
            stop.or(price).unwrap()
        };
        let (hi, lo) = (level(&above), level(&below));
        if hi <= lo
            || self
                .last_price
                .is_some_and(|last| !(lo < last && last < hi))
        {
            return Err(RejectCode::InvalidOrder);
        }
        let m = if maker_leg(&below) { 1 } else { 0 };
        let mk = [&above, &below][m];
        if let OrderType::Limit { price, .. } = mk.order_type {
            let crossing = self
                .best(side.opposite())
                .is_some_and(|j| crosses(side, price.0, self.orders[j].price));
            if crossing {
                return Err(RejectCode::PostOnlyWouldTake);
            }
        }
        if above.client_id.is_some() && above.client_id == below.client_id {
            return Err(RejectCode::DuplicateClientId);
        }
        for c in [above.client_id, below.client_id].into_iter().flatten() {
            if self
                .orders
                .iter()
                .any(|x| x.account == a && x.client == Some(c))
                || self
                    .stops
                    .iter()
                    .any(|x| x.account == a && x.client == Some(c))
                || self.reserved(a, c)
            {
                return Err(RejectCode::DuplicateClientId);
            }
        }
        if self.list_client_taken(a, l.list_client_id) {
            return Err(RejectCode::DuplicateClientId);
        }
        if self.open_count(a) + 2 > MAX_OPEN_PER_ACCOUNT {
            return Err(RejectCode::AccountOrderLimit);
        }
        if self.orders.len() + self.stops.len() + 2 > MAX_BOOK {
            return Err(RejectCode::BookFull);
        }
        let hold = self.lone_hold(&above).max(self.lone_hold(&below));
        let asset = hold_asset(side);
        if self.avail(a, asset) < hold {
            return Err(RejectCode::InsufficientBalance);
        }
        let list = self.next_list_id;
        self.next_list_id += 1;
        let ids = [self.next_order_id, self.next_order_id + 1];
        self.next_order_id += 2;
        let holder = if maker_leg(&above) { 0 } else { m };
        evs.push(Ev::ListNew { list, legs: ids });
        self.hold(a, asset, hold);
        for (i, o) in [above, below].into_iter().enumerate() {
            evs.push(Ev::New { order: ids[i] });
            let h = if i == holder { hold } else { 0 };
            let (price, stop) = price_of(&o);
            match stop {
                None => {
                    self.next_prio += 1;
                    self.orders.push(ROrder {
                        id: ids[i],
                        account: a,
                        side,
                        price: price.unwrap(),
                        open: qty.0,
                        filled: 0,
                        hold: h,
                        prio: self.next_prio,
                        post_only: true,
                        stp: o.stp,
                        tif: TimeInForce::Gtc,
                        client: o.client_id,
                    });
                }
                Some(stop) => {
                    let take_profit = matches!(
                        o.order_type,
                        OrderType::TakeProfitLimit { .. } | OrderType::TakeProfitMarket { .. }
                    );
                    self.stops.push(RStop {
                        id: ids[i],
                        account: a,
                        side,
                        stop,
                        rise: (side == Side::Buy) != take_profit,
                        limit: price,
                        qty: qty.0,
                        hold: h,
                        tif: o.tif,
                        stp: o.stp,
                        client: o.client_id,
                    });
                }
            }
        }
        self.lists.push(RList {
            id: list,
            account: a,
            legs: ids,
            holder,
            client: l.list_client_id,
        });
        Ok(())
    }

    /// A client id a pending order of a live OTO/OTOCO list has taken.
    /// A live list (OCO, or OTO/OTOCO in its pending phase) of `a` has the list client id
    /// `c`: Binance accepts it again only once that list is over.
    fn list_client_taken(&self, a: u32, c: Option<ClientOrderId>) -> bool {
        let Some(c) = c else { return false };
        self.lists
            .iter()
            .any(|l| l.account == a && l.client == Some(c))
            || self
                .otos
                .iter()
                .any(|l| l.account == a && l.client == Some(c))
    }

    fn reserved(&self, a: u32, c: ClientOrderId) -> bool {
        self.otos
            .iter()
            .any(|l| l.account == a && l.pending.iter().any(|(_, o)| o.client_id == Some(c)))
    }

    /// The working order `id` left (not filled completely): its OTO/OTOCO list ends unplaced.
    fn end_oto_of(&mut self, id: u64, reason: DoneReason, evs: &mut Vec<Ev>) {
        if let Some(i) = self.otos.iter().position(|l| l.working == id && !l.ready) {
            let l = self.otos.remove(i);
            evs.push(Ev::OtoDone {
                list: l.id,
                outcome: OtoOutcome::Cancelled(reason),
            });
        }
    }

    /// The checks of a pending order made when its list is placed: its filters, type and time
    /// in force (the rest when it is placed).
    fn check_pending(&self, o: &NewOrder) -> Result<(), RejectCode> {
        if matches!(o.order_type, OrderType::MarketBudget { .. }) {
            return Err(RejectCode::InvalidOrder);
        }
        self.check_order(o)
    }

    /// The OCO rules that do not depend on the book or the last price (see `new_oco`).
    fn oco_shape(&self, above: &NewOrder, below: &NewOrder) -> Result<(), RejectCode> {
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
        let maker_leg = |o: &NewOrder| {
            matches!(o.order_type, OrderType::Limit { .. })
                && o.post_only
                && o.tif == TimeInForce::Gtc
        };
        let profit = |o: &NewOrder| {
            maker_leg(o)
                || (matches!(
                    o.order_type,
                    OrderType::TakeProfitLimit { .. } | OrderType::TakeProfitMarket { .. }
                ) && !o.post_only)
        };
        let loss = |o: &NewOrder| {
            matches!(
                o.order_type,
                OrderType::StopLimit { .. } | OrderType::StopMarket { .. }
            ) && !o.post_only
        };
        let ok = match above.side {
            Side::Sell => profit(above) && loss(below),
            Side::Buy => loss(above) && profit(below),
        };
        if !ok {
            return Err(RejectCode::InvalidOrder);
        }
        let price_of = |o: &NewOrder| -> (Option<u64>, Option<u64>) {
            match o.order_type {
                OrderType::Limit { price, .. } => (Some(price.0), None),
                OrderType::StopLimit { stop, price, .. }
                | OrderType::TakeProfitLimit { stop, price, .. } => (Some(price.0), Some(stop.0)),
                OrderType::StopMarket { stop, .. } | OrderType::TakeProfitMarket { stop, .. } => {
                    (None, Some(stop.0))
                }
                _ => (None, None),
            }
        };
        for o in [above, below] {
            self.check_order(o)?;
        }
        let level = |o: &NewOrder| {
            let (price, stop) = price_of(o);
            stop.or(price).unwrap()
        };
        if level(above) <= level(below) {
            return Err(RejectCode::InvalidOrder);
        }
        Ok(())
    }

    fn new_oto(
        &mut self,
        w: &NewOrder,
        pending: &[NewOrder],
        client: Option<ClientOrderId>,
        evs: &mut Vec<Ev>,
    ) -> Result<(), RejectCode> {
        if !self.exists(w.account) {
            return Err(RejectCode::UnknownAccount);
        }
        if w.market != M {
            return Err(RejectCode::UnknownMarket);
        }
        if w.account.0 == 0 {
            return Err(RejectCode::FeeAccount);
        }
        if !matches!(w.order_type, OrderType::Limit { .. }) {
            return Err(RejectCode::InvalidOrder);
        }
        let a = w.account.0;
        for o in pending {
            if o.account != w.account || o.market != w.market {
                return Err(RejectCode::InvalidOrder);
            }
            self.check_pending(o)?;
        }
        if let [above, below] = pending {
            self.oco_shape(above, below)?;
        }
        let mut cids: Vec<ClientOrderId> = pending.iter().filter_map(|o| o.client_id).collect();
        cids.extend(w.client_id);
        for (i, c) in cids.iter().enumerate() {
            let taken = self
                .orders
                .iter()
                .any(|x| x.account == a && x.client == Some(*c))
                || self
                    .stops
                    .iter()
                    .any(|x| x.account == a && x.client == Some(*c))
                || self.reserved(a, *c);
            if cids[..i].contains(c) || taken {
                return Err(RejectCode::DuplicateClientId);
            }
        }
        if self.list_client_taken(a, client) {
            return Err(RejectCode::DuplicateClientId);
        }
        if self.open_count(a) + 1 + pending.len() > MAX_OPEN_PER_ACCOUNT {
            return Err(RejectCode::AccountOrderLimit);
        }
        let list = self.next_list_id;
        let wid = self.next_order_id;
        let ids: Vec<u64> = (0..pending.len() as u64).map(|i| wid + 1 + i).collect();
        let at = evs.len();
        evs.push(Ev::OtoNew {
            list,
            working: wid,
            pending: ids.clone(),
        });
        self.next_list_id += 1;
        self.otos.push(ROto {
            id: list,
            account: a,
            working: wid,
            pending: ids.iter().copied().zip(pending.iter().copied()).collect(),
            client,
            ready: false,
        });
        if let Err(e) = self.new_order(w, evs) {
            self.next_list_id -= 1;
            self.otos.pop();
            evs.truncate(at);
            return Err(e);
        }
        self.next_order_id = wid + 1 + pending.len() as u64;
        let rests = self.orders.iter().any(|o| o.id == wid);
        let live = self.otos.iter().any(|l| l.id == list && !l.ready);
        if live && !rests {
            let reason = evs[at..]
                .iter()
                .rev()
                .find_map(|e| match e {
                    Ev::Done { order, reason, .. } if *order == wid => Some(*reason),
                    _ => None,
                })
                .unwrap();
            if reason == DoneReason::Filled {
                self.otos.iter_mut().find(|l| l.id == list).unwrap().ready = true;
                self.oto_ready.push(list);
            } else {
                self.end_oto_of(wid, reason, evs);
            }
        }
        Ok(())
    }

    /// Places the pending orders of the lists whose working order filled in this command.
    fn place_ready(&mut self, evs: &mut Vec<Ev>) {
        let mut i = 0;
        while i < self.oto_ready.len() {
            let list = self.oto_ready[i];
            i += 1;
            let li = self.otos.iter().position(|l| l.id == list).unwrap();
            let l = self.otos.remove(li);
            let saved = (self.next_order_id, self.next_list_id);
            self.next_order_id = l.pending[0].0;
            let r = if let [(_, above), (_, below)] = l.pending[..] {
                self.next_list_id = list;
                self.new_oco(
                    &NewOco {
                        legs: [above, below],
                        list_client_id: l.client,
                    },
                    evs,
                )
            } else {
                self.new_order(&l.pending[0].1, evs)
            };
            (self.next_order_id, self.next_list_id) = saved;
            evs.push(Ev::OtoDone {
                list,
                outcome: match r {
                    Ok(()) => OtoOutcome::Placed,
                    Err(code) => OtoOutcome::Refused(code),
                },
            });
        }
        self.oto_ready.clear();
    }

    fn find(&self, account: AccountId, market: MarketId, r: OrderRef) -> Result<Found, RejectCode> {
        if !self.exists(account) {
            return Err(RejectCode::UnknownAccount);
        }
        if market != M {
            return Err(RejectCode::UnknownMarket);
        }
        let is = |id: u64, a: u32, client: Option<ClientOrderId>| {
            a == account.0
                && match r {
                    OrderRef::Id(x) => x.0 == id,
                    OrderRef::Client(c) => client == Some(c),
                }
        };
        if let Some(i) = self
            .orders
            .iter()
            .position(|o| is(o.id, o.account, o.client))
        {
            return Ok(Found::Resting(i));
        }
        if let Some(i) = self
            .stops
            .iter()
            .position(|o| is(o.id, o.account, o.client))
        {
            return Ok(Found::Stop(i));
        }
        Err(RejectCode::UnknownOrder)
    }

    /// The events of GTD orders expiring at `now` (whatever the command), then `Ok((duplicate,
    /// events))` or the rejection. On `Err` nothing but those expiries changed.
    #[allow(clippy::type_complexity)]
    fn apply(&mut self, cmd: &Command, now: u64) -> (Vec<Ev>, Result<(bool, Vec<Ev>), RejectCode>) {
        // "A read-only query ... never advances `seq` or the engine's time, expires nothing."
        if let Command::WithdrawalStatus { id } = *cmd {
            let record = self.withdrawals.get(&id.0).copied();
            return (
                Vec::new(),
                Ok((false, vec![Ev::WithdrawalStatus { id: id.0, record }])),
            );
        }
        if let Command::CreditStatus { key } = *cmd {
            let credited = self.credit_keys.contains_key(&key.0);
            return (
                Vec::new(),
                Ok((
                    false,
                    vec![Ev::CreditStatus {
                        key: key.0,
                        credited,
                    }],
                )),
            );
        }
        if let Command::TransferStatus { key } = *cmd {
            let transferred = self.transfer_keys.contains_key(&key.0);
            return (
                Vec::new(),
                Ok((
                    false,
                    vec![Ev::TransferStatus {
                        key: key.0,
                        transferred,
                    }],
                )),
            );
        }
        self.now = self.now.max(now);
        let mut expired = Vec::new();
        self.expire_due(&mut expired);
        (expired, self.command(cmd))
    }

    fn command(&mut self, cmd: &Command) -> Result<(bool, Vec<Ev>), RejectCode> {
        let mut evs = Vec::new();
        match *cmd {
            Command::CreateAccount => {
                let a = self.accounts;
                self.accounts += 1;
                for asset in 0..N_ASSETS {
                    self.bal.insert((a, asset), (0, 0));
                }
            }
            Command::Credit {
                account,
                asset,
                amount,
                key,
            } => {
                if !self.exists(account) {
                    return Err(RejectCode::UnknownAccount);
                }
                if asset.0 >= N_ASSETS {
                    return Err(RejectCode::UnknownAsset);
                }
                if amount.0 == 0 {
                    return Err(RejectCode::ZeroQuantity);
                }
                if let Some(c) = self.credit_keys.get(&key.0) {
                    // "the same key again with other terms is CreditKeyReused"
                    if *c != (account.0, asset.0, amount.0) {
                        return Err(RejectCode::CreditKeyReused);
                    }
                    return Ok((true, evs));
                }
                self.credit_keys
                    .insert(key.0, (account.0, asset.0, amount.0));
                self.add_avail(account.0, asset.0, i128::from(amount.0));
            }
            Command::Transfer {
                from,
                to,
                asset,
                amount,
                key,
            } => {
                if !self.exists(from) || !self.exists(to) {
                    return Err(RejectCode::UnknownAccount);
                }
                if asset.0 >= N_ASSETS {
                    return Err(RejectCode::UnknownAsset);
                }
                // "The fee account cannot place orders or send transfers."
                if from.0 == 0 {
                    return Err(RejectCode::FeeAccount);
                }
                if from == to {
                    return Err(RejectCode::SelfTransfer);
                }
                if amount.0 == 0 {
                    return Err(RejectCode::ZeroQuantity);
                }
                if let Some(t) = self.transfer_keys.get(&key.0) {
                    // "the same key again with other terms is TransferKeyReused"
                    if *t != (from.0, to.0, asset.0, amount.0) {
                        return Err(RejectCode::TransferKeyReused);
                    }
                    return Ok((true, evs));
                }
                if self.avail(from.0, asset.0) < amount.0 {
                    return Err(RejectCode::InsufficientBalance);
                }
                self.transfer_keys
                    .insert(key.0, (from.0, to.0, asset.0, amount.0));
                self.add_avail(from.0, asset.0, -i128::from(amount.0));
                self.add_avail(to.0, asset.0, i128::from(amount.0));
            }
            Command::NewOrder(o) => self.new_order(&o, &mut evs)?,
            Command::NewOco(ref l) => self.new_oco(l, &mut evs)?,
            Command::NewOto(ref l) => {
                self.new_oto(&l.working, &[l.pending], l.list_client_id, &mut evs)?
            }
            Command::NewOtoco(ref l) => {
                self.new_oto(&l.working, &l.pending, l.list_client_id, &mut evs)?
            }
            Command::Cancel {
                account,
                market,
                order,
            } => match self.find(account, market, order) {
                Ok(Found::Resting(i)) => self.remove(i, DoneReason::Cancelled, &mut evs),
                Ok(Found::Stop(i)) => self.remove_stop(i, DoneReason::Cancelled, &mut evs),
                Err(RejectCode::UnknownOrder) => {
                    // "A cancel of either order ... ends the list": a pending order's cancel
                    // cancels the working order.
                    let named = |id: u64, o: &NewOrder| match order {
                        OrderRef::Id(x) => x.0 == id,
                        OrderRef::Client(c) => o.client_id == Some(c),
                    };
                    let w = self
                        .otos
                        .iter()
                        .find(|l| {
                            !l.ready
                                && l.account == account.0
                                && l.pending.iter().any(|(id, o)| named(*id, o))
                        })
                        .map(|l| l.working)
                        .ok_or(RejectCode::UnknownOrder)?;
                    let i = self.orders.iter().position(|o| o.id == w).unwrap();
                    self.remove(i, DoneReason::Cancelled, &mut evs);
                }
                Err(e) => return Err(e),
            },
            Command::CancelAll { account, market } => {
                if !self.exists(account) {
                    return Err(RejectCode::UnknownAccount);
                }
                if market.is_some_and(|m| m != M) {
                    return Err(RejectCode::UnknownMarket);
                }
                let mut ids: Vec<u64> = self
                    .orders
                    .iter()
                    .filter(|o| o.account == account.0)
                    .map(|o| o.id)
                    .chain(
                        self.stops
                            .iter()
                            .filter(|o| o.account == account.0)
                            .map(|o| o.id),
                    )
                    .collect();
                ids.sort_unstable();
                for id in ids {
                    if let Some(i) = self.orders.iter().position(|o| o.id == id) {
                        self.remove(i, DoneReason::Cancelled, &mut evs);
                    } else if let Some(i) = self.stops.iter().position(|o| o.id == id) {
                        // (The other leg of a list is gone with the first.)
                        self.remove_stop(i, DoneReason::Cancelled, &mut evs);
                    }
                }
            }
            Command::Amend {
                account,
                market,
                order,
                new_price,
                new_qty,
            } => self.amend(account, market, order, new_price, new_qty, &mut evs)?,
            Command::AmendKeepPriority {
                account,
                market,
                order,
                new_qty,
            } => {
                // "A new quantity not below the order's current total is refused, never taken
                // as an increase."
                let i = match self.find(account, market, order)? {
                    Found::Resting(i) => i,
                    Found::Stop(_) => return Err(RejectCode::InvalidAmend),
                };
                let o = &self.orders[i];
                if new_qty.0 >= o.open + o.filled {
                    return Err(RejectCode::InvalidAmend);
                }
                self.amend(account, market, order, None, Some(new_qty), &mut evs)?
            }
            Command::WithdrawHold {
                account,
                asset,
                amount,
                fee,
                id,
            } => {
                if !self.exists(account) {
                    return Err(RejectCode::UnknownAccount);
                }
                if asset.0 >= N_ASSETS {
                    return Err(RejectCode::UnknownAsset);
                }
                if amount.0 == 0 {
                    return Err(RejectCode::ZeroQuantity);
                }
                if self.withdrawals.contains_key(&id.0) {
                    return Err(RejectCode::DuplicateWithdrawal);
                }
                if self.avail(account.0, asset.0) < amount.0 + fee.0 {
                    return Err(RejectCode::InsufficientBalance);
                }
                self.hold(account.0, asset.0, amount.0 + fee.0);
                self.withdrawals
                    .insert(id.0, (account.0, asset.0, amount.0, fee.0, WState::Held));
            }
            Command::WithdrawRelease { id } => {
                let w = match self.withdrawals.get(&id.0) {
                    Some(w) if w.4 == WState::Held => *w,
                    _ => return Err(RejectCode::UnknownWithdrawal),
                };
                self.release(w.0, w.1, w.2 + w.3);
                self.withdrawals.get_mut(&id.0).unwrap().4 = WState::Released;
            }
            Command::WithdrawComplete { id, network_fee } => {
                let w = match self.withdrawals.get(&id.0) {
                    Some(w) if w.4 == WState::Held => *w,
                    _ => return Err(RejectCode::UnknownWithdrawal),
                };
                // "network_fee (at most the flat fee) leaves it too, and the rest of the flat
                // fee goes to the fee account."
                if network_fee.0 > w.3 {
                    return Err(RejectCode::InvalidAmount);
                }
                self.add_held(w.0, w.1, -i128::from(w.2 + w.3));
                self.add_avail(0, w.1, i128::from(w.3 - network_fee.0));
                self.withdrawals.get_mut(&id.0).unwrap().4 = WState::Completed;
            }
            Command::Tick => {}
            Command::WithdrawalStatus { .. }
            | Command::CreditStatus { .. }
            | Command::TransferStatus { .. } => {
                unreachable!("queries are answered by apply")
            }
        }
        self.place_ready(&mut evs);
        Ok((false, evs))
    }

    fn check_qty(qty: u64) -> Result<(), RejectCode> {
        if qty == 0 {
            Err(RejectCode::ZeroQuantity)
        } else if qty > MAX_QTY {
            Err(RejectCode::QtyOffLot)
        } else {
            Ok(())
        }
    }

    fn check_price(price: u64) -> Result<(), RejectCode> {
        if price == 0 {
            Err(RejectCode::PriceOffTick)
        } else if !(MIN_PRICE..=MAX_PRICE).contains(&price) {
            Err(RejectCode::OutsidePriceBand)
        } else {
            Ok(())
        }
    }

    fn check_notional(price: u64, qty: u64) -> Result<(), RejectCode> {
        if price * qty < MIN_NOTIONAL {
            Err(RejectCode::BelowMinNotional)
        } else {
            Ok(())
        }
    }

    /// Whether `side` has an order not of `skip`.
    fn has_liquidity(&self, side: Side, skip: Option<u32>) -> bool {
        self.orders
            .iter()
            .any(|o| o.side == side && Some(o.account) != skip)
    }

    /// Cost (fee on the total) of buying `qty` now from the asks, as far as they go, skipping
    /// the orders of `skip` (which self-trade prevention will expire instead of trading).
    fn walk_buy_cost(&self, qty: u64, skip: Option<u32>) -> u64 {
        let mut left = qty;
        let mut notional = 0;
        for o in self.sorted(Side::Sell) {
            if Some(o.account) == skip {
                continue;
            }
            let q = left.min(o.open);
            notional += q * o.price;
            left -= q;
        }
        notional + fee(notional, self.taker_bps)
    }

    /// Lots to sell to bring in at least `budget` before fees, walking the bids (skipping the
    /// orders of `skip`).
    fn walk_sell_qty(&self, budget: u64, skip: Option<u32>) -> u64 {
        let mut left = budget;
        let mut qty = 0;
        for o in self.sorted(Side::Buy) {
            if Some(o.account) == skip {
                continue;
            }
            if left == 0 {
                break;
            }
            let q = left.div_ceil(o.price).min(o.open);
            qty += q;
            left = left.saturating_sub(q * o.price);
        }
        qty
    }

    /// Whether `qty` can fill now against orders crossing `limit`, respecting self-trade
    /// prevention (an own order stops the fill unless the mode expires makers or allows it).
    fn fok_fillable(&self, side: Side, limit: u64, qty: u64, account: u32, stp: StpMode) -> bool {
        let mut need = qty;
        for o in self.sorted(side.opposite()) {
            if !crosses(side, limit, o.price) {
                return false;
            }
            if o.account == account && stp != StpMode::None {
                if stp == StpMode::ExpireMaker {
                    continue;
                }
                return false;
            }
            need -= need.min(o.open);
            if need == 0 {
                return true;
            }
        }
        false
    }

    /// The checks of one order that need nothing but the order and the time: quantity, prices
    /// and notional, then post-only and time in force. One rule for a new order, each OCO leg
    /// and each pending order of an OTO/OTOCO.
    fn check_order(&self, o: &NewOrder) -> Result<(), RejectCode> {
        let is_limit = matches!(o.order_type, OrderType::Limit { .. });
        let is_stop = matches!(
            o.order_type,
            OrderType::StopLimit { .. }
                | OrderType::StopMarket { .. }
                | OrderType::TakeProfitLimit { .. }
                | OrderType::TakeProfitMarket { .. }
        );
        let is_market = !is_limit && !is_stop;
        match o.order_type {
            OrderType::Limit { price, qty } => {
                Self::check_qty(qty.0)?;
                Self::check_price(price.0)?;
                Self::check_notional(price.0, qty.0)?;
            }
            OrderType::Market { qty } => Self::check_qty(qty.0)?,
            OrderType::MarketBudget { budget } => {
                if budget.0 == 0 {
                    return Err(RejectCode::ZeroQuantity);
                }
                if budget.0 < MIN_NOTIONAL {
                    return Err(RejectCode::BelowMinNotional);
                }
            }
            OrderType::StopLimit { stop, price, qty }
            | OrderType::TakeProfitLimit { stop, price, qty } => {
                Self::check_qty(qty.0)?;
                Self::check_price(stop.0)?;
                Self::check_price(price.0)?;
                Self::check_notional(price.0, qty.0)?;
            }
            OrderType::StopMarket { stop, qty } | OrderType::TakeProfitMarket { stop, qty } => {
                Self::check_qty(qty.0)?;
                Self::check_price(stop.0)?;
            }
        }
        if o.post_only && (!is_limit || matches!(o.tif, TimeInForce::Ioc | TimeInForce::Fok)) {
            return Err(RejectCode::InvalidOrder);
        }
        match o.tif {
            TimeInForce::Gtd(t) if t.0 <= self.now || is_market => Err(RejectCode::InvalidOrder),
            // "FOK on a stop order" is invalid; market orders are always IOC.
            TimeInForce::Fok if !is_limit => Err(RejectCode::InvalidOrder),
            _ => Ok(()),
        }
    }

    fn new_order(&mut self, o: &NewOrder, evs: &mut Vec<Ev>) -> Result<(), RejectCode> {
        if !self.exists(o.account) {
            return Err(RejectCode::UnknownAccount);
        }
        if o.market != M {
            return Err(RejectCode::UnknownMarket);
        }
        if o.account.0 == 0 {
            return Err(RejectCode::FeeAccount);
        }
        self.check_order(o)?;
        let is_limit = matches!(o.order_type, OrderType::Limit { .. });
        let is_stop = matches!(
            o.order_type,
            OrderType::StopLimit { .. }
                | OrderType::StopMarket { .. }
                | OrderType::TakeProfitLimit { .. }
                | OrderType::TakeProfitMarket { .. }
        );
        let is_market = !is_limit && !is_stop;
        // "market order with nothing on the other side to price it"
        if is_market && !self.has_liquidity(o.side.opposite(), expired_makers(o.stp, o.account.0)) {
            return Err(RejectCode::InvalidOrder);
        }
        if let Some(c) = o.client_id {
            if self
                .orders
                .iter()
                .any(|x| x.account == o.account.0 && x.client == Some(c))
                || self
                    .stops
                    .iter()
                    .any(|x| x.account == o.account.0 && x.client == Some(c))
                || self.reserved(o.account.0, c)
            {
                return Err(RejectCode::DuplicateClientId);
            }
        }
        let can_rest =
            is_stop || (is_limit && matches!(o.tif, TimeInForce::Gtc | TimeInForce::Gtd(_)));
        if can_rest {
            if self.open_count(o.account.0) >= MAX_OPEN_PER_ACCOUNT {
                return Err(RejectCode::AccountOrderLimit);
            }
            if self.orders.len() + self.stops.len() >= MAX_BOOK {
                return Err(RejectCode::BookFull);
            }
        }
        let mut market_qty = 0;
        let hold = match (o.side, o.order_type) {
            (Side::Buy, OrderType::Limit { price, qty }) => self.bid_hold(price.0, qty.0),
            (Side::Buy, OrderType::Market { qty }) => {
                market_qty = qty.0;
                self.walk_buy_cost(qty.0, expired_makers(o.stp, o.account.0))
            }
            (Side::Buy, OrderType::MarketBudget { budget }) => budget.0,
            (Side::Sell, OrderType::MarketBudget { budget }) => {
                market_qty = self.walk_sell_qty(budget.0, expired_makers(o.stp, o.account.0));
                market_qty
            }
            (Side::Sell, OrderType::Market { qty }) => {
                market_qty = qty.0;
                qty.0
            }
            (Side::Sell, OrderType::Limit { qty, .. }) => qty.0,
            (
                Side::Buy,
                OrderType::StopLimit { price, qty, .. }
                | OrderType::TakeProfitLimit { price, qty, .. },
            ) => self.bid_hold(price.0, qty.0),
            // A stop-market (or take-profit market) buy is priced (and held for) only when it
            // triggers.
            (Side::Buy, OrderType::StopMarket { .. } | OrderType::TakeProfitMarket { .. }) => 0,
            (
                Side::Sell,
                OrderType::StopLimit { qty, .. }
                | OrderType::StopMarket { qty, .. }
                | OrderType::TakeProfitLimit { qty, .. }
                | OrderType::TakeProfitMarket { qty, .. },
            ) => qty.0,
        };
        let asset = hold_asset(o.side);
        if self.avail(o.account.0, asset) < hold {
            return Err(RejectCode::InsufficientBalance);
        }
        if let OrderType::Limit { price, qty } = o.order_type {
            let crossing = self
                .best(o.side.opposite())
                .is_some_and(|i| crosses(o.side, price.0, self.orders[i].price));
            if o.post_only && crossing {
                return Err(RejectCode::PostOnlyWouldTake);
            }
            if o.tif == TimeInForce::Fok
                && !self.fok_fillable(o.side, price.0, qty.0, o.account.0, o.stp)
            {
                return Err(RejectCode::FokCannotFill);
            }
        }
        // Accepted.
        let id = self.next_order_id;
        self.next_order_id += 1;
        evs.push(Ev::New { order: id });
        self.hold(o.account.0, asset, hold);
        if is_stop {
            let (stop, limit, qty, take_profit) = match o.order_type {
                OrderType::StopLimit { stop, price, qty } => (stop.0, Some(price.0), qty.0, false),
                OrderType::StopMarket { stop, qty } => (stop.0, None, qty.0, false),
                OrderType::TakeProfitLimit { stop, price, qty } => {
                    (stop.0, Some(price.0), qty.0, true)
                }
                OrderType::TakeProfitMarket { stop, qty } => (stop.0, None, qty.0, true),
                _ => unreachable!(),
            };
            self.stops.push(RStop {
                id,
                account: o.account.0,
                side: o.side,
                stop,
                rise: (o.side == Side::Buy) != take_profit,
                limit,
                qty,
                hold,
                tif: o.tif,
                stp: o.stp,
                client: o.client_id,
            });
            self.process_triggers(evs);
            return Ok(());
        }
        let budget_buy =
            o.side == Side::Buy && matches!(o.order_type, OrderType::MarketBudget { .. });
        let (limit, open, tif) = match o.order_type {
            OrderType::Limit { price, qty } => (Some(price.0), qty.0, o.tif),
            _ if budget_buy => (None, u64::MAX, TimeInForce::Ioc),
            _ => (None, market_qty, TimeInForce::Ioc),
        };
        let t = Taker {
            id,
            account: o.account.0,
            side: o.side,
            limit,
            open,
            filled: 0,
            hold,
            stp: o.stp,
            budget_buy,
        };
        self.run_taker(t, tif, o.post_only, o.client_id, evs);
        self.process_triggers(evs);
        Ok(())
    }

    /// "A limit order that is placed when the last trade price reaches `stop` (at or above it
    /// for a buy, at or below for a sell)": buy stops from the lowest trigger price, then sell
    /// stops from the highest, equal prices in time order, until none is reached. Time order is
    /// the order stops were placed (`stops` is appended to), not their ids: an OTO's pending
    /// stop, whose id was taken when its list was placed, queues from when it is placed.
    fn process_triggers(&mut self, evs: &mut Vec<Ev>) {
        loop {
            let Some(last) = self.last_price else { return };
            let buy = (0..self.stops.len())
                .filter(|&i| self.stops[i].rise && self.stops[i].stop <= last)
                .min_by_key(|&i| (self.stops[i].stop, i));
            let sell = (0..self.stops.len())
                .filter(|&i| !self.stops[i].rise && self.stops[i].stop >= last)
                .min_by_key(|&i| (u64::MAX - self.stops[i].stop, i));
            let Some(i) = buy.or(sell) else { return };
            let mut s = self.stops.remove(i);
            evs.push(Ev::Triggered {
                order: s.id,
                last_price: last,
            });
            if self.lists.iter().any(|l| l.legs.contains(&s.id)) {
                self.end_list_of(s.id, Some(s.id), evs);
                // Alone now: it holds what it would have held as a lone order.
                let need = match (s.side, s.limit) {
                    (Side::Buy, Some(price)) => self.bid_hold(price, s.qty),
                    (Side::Buy, None) => 0,
                    (Side::Sell, _) => s.qty,
                };
                self.release(s.account, hold_asset(s.side), s.hold);
                self.hold(s.account, hold_asset(s.side), need);
                s.hold = need;
            }
            let mut hold = s.hold;
            if s.limit.is_none() && s.side == Side::Buy {
                // Priced now: hold what buying `qty` costs now, or what the account has.
                let cost = self
                    .walk_buy_cost(s.qty, expired_makers(s.stp, s.account))
                    .min(self.avail(s.account, QUOTE));
                self.hold(s.account, QUOTE, cost);
                hold = cost;
                if cost == 0 && self.has_liquidity(Side::Sell, expired_makers(s.stp, s.account)) {
                    evs.push(Ev::Done {
                        order: s.id,
                        reason: DoneReason::InsufficientBalance,
                        filled: 0,
                        remaining: s.qty,
                    });
                    continue;
                }
            }
            let t = Taker {
                id: s.id,
                account: s.account,
                side: s.side,
                limit: s.limit,
                open: s.qty,
                filled: 0,
                hold,
                stp: s.stp,
                budget_buy: false,
            };
            let tif = if s.limit.is_some() {
                s.tif
            } else {
                TimeInForce::Ioc
            };
            self.run_taker(t, tif, false, s.client, evs);
        }
    }

    fn run_taker(
        &mut self,
        mut t: Taker,
        tif: TimeInForce,
        post_only: bool,
        client: Option<ClientOrderId>,
        evs: &mut Vec<Ev>,
    ) {
        let end = self.match_taker(&mut t, evs);
        for leg in std::mem::take(&mut self.list_fills) {
            self.end_list_of(leg, Some(leg), evs);
            // A working order gone from the book filled completely.
            if !self.orders.iter().any(|o| o.id == leg) {
                if let Some(l) = self.otos.iter_mut().find(|l| l.working == leg && !l.ready) {
                    l.ready = true;
                    self.oto_ready.push(l.id);
                }
            }
        }
        let asset = hold_asset(t.side);
        if let (End::NoMore, Some(price), TimeInForce::Gtc | TimeInForce::Gtd(_)) =
            (&end, t.limit, tif)
        {
            let need = match t.side {
                Side::Buy => self.bid_hold(price, t.open),
                Side::Sell => t.open,
            };
            self.release(t.account, asset, t.hold - need);
            self.next_prio += 1;
            self.orders.push(ROrder {
                id: t.id,
                account: t.account,
                side: t.side,
                price,
                open: t.open,
                filled: t.filled,
                hold: need,
                prio: self.next_prio,
                post_only,
                stp: t.stp,
                tif,
                client,
            });
            return;
        }
        self.release(t.account, asset, t.hold);
        let reason = done_reason(&end, t.budget_buy);
        evs.push(Ev::Done {
            order: t.id,
            reason,
            filled: t.filled,
            remaining: if t.budget_buy || end == End::Filled {
                0
            } else {
                t.open
            },
        });
    }

    fn match_taker(&mut self, t: &mut Taker, evs: &mut Vec<Ev>) -> End {
        loop {
            if t.open == 0 {
                return End::Filled;
            }
            let Some(mi) = self.best(t.side.opposite()) else {
                return End::NoMore;
            };
            let maker = self.orders[mi].clone();
            if let Some(limit) = t.limit {
                if !crosses(t.side, limit, maker.price) {
                    return End::NoMore;
                }
            }
            if maker.account == t.account && t.stp != StpMode::None {
                match t.stp {
                    StpMode::ExpireTaker => return End::SelfTrade,
                    StpMode::ExpireMaker => {
                        self.remove(mi, DoneReason::SelfTrade, evs);
                        continue;
                    }
                    _ => {
                        self.remove(mi, DoneReason::SelfTrade, evs);
                        return End::SelfTrade;
                    }
                }
            }
            let mut q = maker.open.min(t.open);
            if t.side == Side::Buy && t.limit.is_none() {
                // Largest quantity whose cost, fee included, the taker's hold still covers.
                let taker_bps = self.taker_bps;
                let cost = |q: u64| maker.price * q + fee(maker.price * q, taker_bps);
                let mut fit = 0;
                while fit < q && cost(fit + 1) <= t.hold {
                    fit += 1;
                }
                q = fit;
                if q == 0 {
                    return End::OutOfHold;
                }
            }
            let notional = maker.price * q;
            let taker_fee = fee(notional, self.taker_bps);
            let maker_fee = fee(notional, self.maker_bps);
            let (buyer, seller, buyer_fee, seller_fee) = match t.side {
                Side::Buy => (t.account, maker.account, taker_fee, maker_fee),
                Side::Sell => (maker.account, t.account, maker_fee, taker_fee),
            };
            // Both pay out of what they hold: the buyer quote, the seller base.
            self.add_held(buyer, QUOTE, -i128::from(notional + buyer_fee));
            self.add_avail(buyer, BASE, i128::from(q));
            self.add_held(seller, BASE, -i128::from(q));
            self.add_avail(seller, QUOTE, i128::from(notional - seller_fee));
            self.add_avail(0, QUOTE, i128::from(taker_fee + maker_fee));
            let taker_paid = match t.side {
                Side::Buy => notional + taker_fee,
                Side::Sell => q,
            };
            let maker_paid = match t.side {
                Side::Buy => q,
                Side::Sell => notional + maker_fee,
            };
            self.last_price = Some(maker.price);
            t.hold -= taker_paid;
            t.open -= q;
            t.filled += q;
            if self.lists.iter().any(|l| l.legs.contains(&maker.id))
                || self.otos.iter().any(|l| l.working == maker.id && !l.ready)
            {
                self.list_fills.push(maker.id);
            }
            let m = &mut self.orders[mi];
            m.hold -= maker_paid;
            m.open -= q;
            m.filled += q;
            let maker_remaining = m.open;
            evs.push(Ev::Trade {
                price: maker.price,
                qty: q,
                maker_order: maker.id,
                taker_order: t.id,
                maker_account: maker.account,
                taker_account: t.account,
                maker_fee,
                taker_fee,
                notional,
                maker_remaining,
                taker_remaining: if t.budget_buy { 0 } else { t.open },
            });
            if maker_remaining == 0 {
                self.remove(mi, DoneReason::Filled, evs);
            }
        }
    }

    fn amend(
        &mut self,
        account: AccountId,
        market: MarketId,
        r: OrderRef,
        new_price: Option<Price>,
        new_qty: Option<Qty>,
        evs: &mut Vec<Ev>,
    ) -> Result<(), RejectCode> {
        let i = match self.find(account, market, r)? {
            Found::Resting(i) => i,
            Found::Stop(_) => return Err(RejectCode::InvalidAmend),
        };
        if self
            .lists
            .iter()
            .any(|l| l.legs.contains(&self.orders[i].id))
            || self
                .otos
                .iter()
                .any(|l| l.working == self.orders[i].id && !l.ready)
        {
            return Err(RejectCode::InvalidAmend);
        }
        if new_price.is_none() && new_qty.is_none() {
            return Err(RejectCode::InvalidAmend);
        }
        let o = self.orders[i].clone();
        let price = new_price.map_or(o.price, |p| p.0);
        Self::check_price(price)?;
        let total = new_qty.map_or(o.open + o.filled, |q| q.0);
        Self::check_qty(total)?;
        if total <= o.filled {
            return Err(RejectCode::InvalidAmend);
        }
        let open = total - o.filled;
        let asset = hold_asset(o.side);
        let need = match o.side {
            Side::Buy => self.bid_hold(price, open),
            Side::Sell => open,
        };
        if price == o.price && open <= o.open {
            let release = o.hold - need;
            self.release(o.account, asset, release);
            let m = &mut self.orders[i];
            m.open = open;
            m.hold = need;
            evs.push(Ev::Amended {
                order: o.id,
                price,
                qty: total,
                remaining: open,
                kept_priority: true,
            });
            return Ok(());
        }
        if price != o.price {
            Self::check_notional(price, open)?;
        }
        if self.avail(o.account, asset) + o.hold < need {
            return Err(RejectCode::InsufficientBalance);
        }
        let crossing = self
            .best(o.side.opposite())
            .is_some_and(|j| crosses(o.side, price, self.orders[j].price));
        if o.post_only && crossing {
            return Err(RejectCode::PostOnlyWouldTake);
        }
        self.orders.remove(i);
        self.release(o.account, asset, o.hold);
        self.hold(o.account, asset, need);
        evs.push(Ev::Amended {
            order: o.id,
            price,
            qty: total,
            remaining: open,
            kept_priority: false,
        });
        let t = Taker {
            id: o.id,
            account: o.account,
            side: o.side,
            limit: Some(price),
            open,
            filled: o.filled,
            hold: need,
            stp: o.stp,
            budget_buy: false,
        };
        self.run_taker(t, o.tif, o.post_only, o.client, evs);
        self.process_triggers(evs);
        Ok(())
    }

    /// Book as `(side, price, level qty, [(id, open, filled, hold)])`, best level first.
    fn book(&self) -> Vec<Level> {
        let mut out: Vec<Level> = Vec::new();
        for side in [Side::Buy, Side::Sell] {
            for o in self.sorted(side) {
                let entry = (o.id, o.open, o.filled, o.hold);
                match out.last_mut() {
                    Some(l) if l.0 == side && l.1 == o.price => {
                        l.2 += o.open;
                        l.3.push(entry);
                    }
                    _ => out.push((side, o.price, o.open, vec![entry])),
                }
            }
        }
        out
    }
}

type Level = (Side, u64, u64, Vec<(u64, u64, u64, u64)>);

/// A waiting stop: (id, account, side, stop, limit or 0, qty, hold).
type StopRow = (u64, u32, Side, u64, u64, u64, u64);

impl Reference {
    fn stop_rows(&self) -> Vec<StopRow> {
        let mut v: Vec<StopRow> = self
            .stops
            .iter()
            .map(|s| {
                (
                    s.id,
                    s.account,
                    s.side,
                    s.stop,
                    s.limit.unwrap_or(0),
                    s.qty,
                    s.hold,
                )
            })
            .collect();
        v.sort_unstable_by_key(|r| r.0);
        v
    }
}

/// A live OCO: (list id, [above, below], holder).
type ListRow = (u64, [u64; 2], usize);

impl Reference {
    fn list_rows(&self) -> Vec<ListRow> {
        let mut v: Vec<ListRow> = self
            .lists
            .iter()
            .map(|l| (l.id, l.legs, l.holder))
            .collect();
        v.sort_unstable();
        v
    }
}

/// A live OTO/OTOCO list: (list id, working order, pending ids).
type OtoRow = (u64, u64, Vec<u64>);

impl Reference {
    fn oto_rows(&self) -> Vec<OtoRow> {
        let mut v: Vec<OtoRow> = self
            .otos
            .iter()
            .map(|l| (l.id, l.working, l.pending.iter().map(|p| p.0).collect()))
            .collect();
        v.sort_unstable();
        v
    }
}

fn engine_oto_rows(e: &Engine) -> Vec<OtoRow> {
    let mut v: Vec<OtoRow> = (0..e.account_count() as u32)
        .flat_map(|a| e.open_oto_lists(AccountId(a)))
        .map(|l| {
            let pending = l.pending.orders().map(|(id, _)| id.0).collect();
            (l.id.0, l.working.0, pending)
        })
        .collect();
    v.sort_unstable();
    v
}

fn engine_list_rows(e: &Engine) -> Vec<ListRow> {
    let mut v: Vec<ListRow> = (0..e.account_count() as u32)
        .flat_map(|a| e.open_order_lists(AccountId(a)))
        .map(|l| (l.id.0, [l.legs[0].0, l.legs[1].0], usize::from(l.holder)))
        .collect();
    v.sort_unstable();
    v
}

fn engine_stop_rows(e: &Engine) -> Vec<StopRow> {
    let mut v: Vec<StopRow> = (0..e.account_count() as u32)
        .flat_map(|a| e.open_orders(AccountId(a), Some(M)))
        .filter_map(|o| {
            Some((
                o.id.0,
                o.meta.account.0,
                o.side,
                o.stop?.0,
                o.price.0,
                o.remaining.0,
                o.meta.hold.0,
            ))
        })
        .collect();
    v.sort_unstable_by_key(|r| r.0);
    v
}

// ---------------------------------------------------------------------------------------------
// The engine seen the same way.
// ---------------------------------------------------------------------------------------------

fn engine_book(e: &Engine) -> Vec<Level> {
    let b = e.book(M).unwrap();
    let mut out = Vec::new();
    for side in [Side::Buy, Side::Sell] {
        for (price, qty) in b.levels(side) {
            let orders = b
                .orders_at(price)
                .map(|n| {
                    assert_eq!(n.side, side, "order {} on the wrong side", n.id);
                    (n.id.0, n.qty.0, n.data.filled.0, n.data.hold.0)
                })
                .collect();
            out.push((side, price.0, qty.0, orders));
        }
    }
    out
}

fn engine_evs(events: &[Event]) -> (bool, Vec<Ev>) {
    let mut dup = false;
    let mut v = Vec::new();
    for e in events {
        match *e {
            Event::Accepted { duplicate, .. } => dup = duplicate,
            Event::OrderNew { info, .. } => v.push(Ev::New {
                order: info.order.0,
            }),
            Event::Trade {
                price,
                qty,
                maker_order,
                taker_order,
                maker_account,
                taker_account,
                maker_fee,
                taker_fee,
                notional,
                maker_remaining,
                taker_remaining,
                ..
            } => v.push(Ev::Trade {
                price: price.0,
                qty: qty.0,
                maker_order: maker_order.0,
                taker_order: taker_order.0,
                maker_account: maker_account.0,
                taker_account: taker_account.0,
                maker_fee: maker_fee.0,
                taker_fee: taker_fee.0,
                notional: notional.0,
                maker_remaining: maker_remaining.0,
                taker_remaining: taker_remaining.0,
            }),
            Event::OrderDone {
                info,
                reason,
                filled,
                remaining,
                ..
            } => v.push(Ev::Done {
                order: info.order.0,
                reason,
                filled: filled.0,
                remaining: remaining.0,
            }),
            Event::OrderTriggered { info, last_price } => v.push(Ev::Triggered {
                order: info.order.0,
                last_price: last_price.0,
            }),
            Event::OrderListNew { list, legs, .. } => v.push(Ev::ListNew {
                list: list.0,
                legs: [legs[0].0, legs[1].0],
            }),
            Event::OrderListDone { list, .. } => v.push(Ev::ListDone { list: list.0 }),
            Event::OtoNew { list, working, .. } => v.push(Ev::OtoNew {
                list: list.0,
                working: working.0,
                pending: Vec::new(),
            }),
            Event::OrderPending { order, .. } => match v.last_mut() {
                Some(Ev::OtoNew { pending, .. }) => pending.push(order.0),
                _ => panic!("OrderPending after {:?}", v.last()),
            },
            Event::OtoDone { list, outcome, .. } => v.push(Ev::OtoDone {
                list: list.0,
                outcome,
            }),
            Event::OrderAmended {
                info,
                price,
                qty,
                remaining,
                kept_priority,
            } => v.push(Ev::Amended {
                order: info.order.0,
                price: price.0,
                qty: qty.0,
                remaining: remaining.0,
                kept_priority,
            }),
            Event::CreditStatus { key, credited } => v.push(Ev::CreditStatus {
                key: key.0,
                credited,
            }),
            Event::TransferStatus { key, transferred } => v.push(Ev::TransferStatus {
                key: key.0,
                transferred,
            }),
            Event::WithdrawalStatus { id, withdrawal } => v.push(Ev::WithdrawalStatus {
                id: id.0,
                record: withdrawal.map(|w| {
                    let state = match w.state {
                        WithdrawalState::Held => WState::Held,
                        WithdrawalState::Released => WState::Released,
                        WithdrawalState::Completed => WState::Completed,
                    };
                    (w.account.0, w.asset.0, w.amount.0, w.fee.0, state)
                }),
            }),
            _ => {}
        }
    }
    (dup, v)
}

fn engine_balances(e: &Engine) -> BTreeMap<(u32, u16), (u64, u64)> {
    let mut m = BTreeMap::new();
    for a in 0..e.account_count() as u32 {
        for asset in 0..N_ASSETS {
            let (av, h) = e.balance(AccountId(a), AssetId(asset)).unwrap();
            m.insert((a, asset), (av.0, h.0));
        }
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Generators: few accounts, a narrow price band so orders cross often, small quantities.
// ---------------------------------------------------------------------------------------------

fn key(b: u8) -> IdempotencyKey {
    IdempotencyKey([b; 36])
}

fn cid(s: &str) -> ClientOrderId {
    ClientOrderId::new(s).unwrap()
}

fn arb_account() -> impl Strategy<Value = AccountId> {
    prop_oneof![1 => Just(0u32), 12 => 1u32..=3, 1 => 4u32..=6].prop_map(AccountId)
}

fn arb_market() -> impl Strategy<Value = MarketId> {
    prop_oneof![12 => Just(0u16), 1 => Just(1u16)].prop_map(MarketId)
}

fn arb_price() -> impl Strategy<Value = Price> {
    prop_oneof![40 => 996u64..=1004, 1 => Just(0), 1 => Just(MAX_PRICE + 1)].prop_map(Price)
}

fn arb_qty() -> impl Strategy<Value = Qty> {
    prop_oneof![40 => 1u64..=8, 1 => Just(0), 1 => Just(MAX_QTY + 1)].prop_map(Qty)
}

fn arb_stp() -> impl Strategy<Value = StpMode> {
    prop_oneof![
        Just(StpMode::None),
        Just(StpMode::ExpireTaker),
        Just(StpMode::ExpireMaker),
        Just(StpMode::ExpireBoth)
    ]
}

fn arb_client() -> impl Strategy<Value = Option<ClientOrderId>> {
    prop_oneof![4 => Just(None), 1 => Just(Some(cid("a"))), 1 => Just(Some(cid("b")))]
}

fn arb_tif() -> impl Strategy<Value = TimeInForce> {
    prop_oneof![
        8 => Just(TimeInForce::Gtc),
        2 => Just(TimeInForce::Ioc),
        2 => Just(TimeInForce::Fok),
        // Relative to the step's time (see `resolve`): due within a few steps, or already past.
        2 => (1u64..=30).prop_map(|steps| TimeInForce::Gtd(Timestamp(steps * STEP_NS - 3))),
        1 => Just(TimeInForce::Gtd(Timestamp(0))),
    ]
}

fn arb_order_type() -> impl Strategy<Value = OrderType> {
    prop_oneof![
        10 => (arb_price(), arb_qty()).prop_map(|(price, qty)| OrderType::Limit { price, qty }),
        2 => arb_qty().prop_map(|qty| OrderType::Market { qty }),
        2 => prop_oneof![10 => 500u64..=12_000, 1 => Just(0)]
            .prop_map(|b| OrderType::MarketBudget { budget: Amount(b) }),
        2 => (arb_price(), arb_price(), arb_qty())
            .prop_map(|(stop, price, qty)| OrderType::StopLimit { stop, price, qty }),
        1 => (arb_price(), arb_qty()).prop_map(|(stop, qty)| OrderType::StopMarket { stop, qty }),
        1 => (arb_price(), arb_price(), arb_qty())
            .prop_map(|(stop, price, qty)| OrderType::TakeProfitLimit { stop, price, qty }),
        1 => (arb_price(), arb_qty())
            .prop_map(|(stop, qty)| OrderType::TakeProfitMarket { stop, qty }),
    ]
}

fn arb_new_order() -> impl Strategy<Value = NewOrder> {
    (
        arb_account(),
        arb_market(),
        prop_oneof![Just(Side::Buy), Just(Side::Sell)],
        arb_order_type(),
        arb_tif(),
        prop::bool::weighted(0.15),
        arb_stp(),
        arb_client(),
    )
        .prop_map(
            |(account, market, side, order_type, tif, post_only, stp, client_id)| NewOrder {
                account,
                market,
                side,
                order_type,
                tif,
                post_only,
                stp,
                client_id,
            },
        )
}

fn arb_ref() -> impl Strategy<Value = OrderRef> {
    prop_oneof![
        4 => (1u64..=40).prop_map(|i| OrderRef::Id(OrderId(i))),
        1 => Just(OrderRef::Client(cid("a"))),
        1 => Just(OrderRef::Client(cid("b"))),
    ]
}

fn arb_amount() -> impl Strategy<Value = Amount> {
    prop_oneof![1 => Just(0u64), 6 => 1u64..=40, 6 => 1u64..=30_000].prop_map(Amount)
}

fn arb_asset() -> impl Strategy<Value = AssetId> {
    prop_oneof![10 => 0u16..N_ASSETS, 1 => Just(N_ASSETS)].prop_map(AssetId)
}

/// OCOs around the traded prices: mostly well formed (profit leg above a sell's stop, below a
/// buy's), sometimes with the legs swapped, quantities that differ or a fill-or-kill leg.
fn arb_oco() -> impl Strategy<Value = NewOco> {
    (
        (
            arb_account(),
            prop_oneof![Just(Side::Buy), Just(Side::Sell)],
            arb_qty(),
        ),
        (992u64..=1002, 1u64..=8, 0u64..=3),
        (0u8..3, 0u8..2, arb_stp()),
        (arb_client(), arb_client()),
        prop_oneof![12 => Just(0u8), 1 => Just(1), 1 => Just(2), 1 => Just(3)],
    )
        .prop_map(
            |((account, side, qty), (lo, gap, off), (profit, loss, stp), (c0, c1), twist)| {
                let hi = lo + gap;
                let mk = |order_type, post_only, client_id| NewOrder {
                    account,
                    market: M,
                    side,
                    order_type,
                    tif: TimeInForce::Gtc,
                    post_only,
                    stp,
                    client_id,
                };
                // The profit leg at `at`, the loss leg at `at`, with limit prices `off` beyond.
                let profit_leg = |at: u64, client| {
                    let toward = if side == Side::Sell {
                        at - off
                    } else {
                        at + off
                    };
                    match profit {
                        0 => mk(
                            OrderType::Limit {
                                price: Price(at),
                                qty,
                            },
                            true,
                            client,
                        ),
                        1 => mk(
                            OrderType::TakeProfitLimit {
                                stop: Price(at),
                                price: Price(toward),
                                qty,
                            },
                            false,
                            client,
                        ),
                        _ => mk(
                            OrderType::TakeProfitMarket {
                                stop: Price(at),
                                qty,
                            },
                            false,
                            client,
                        ),
                    }
                };
                let loss_leg = |at: u64, client| {
                    let beyond = if side == Side::Sell {
                        at - off
                    } else {
                        at + off
                    };
                    match loss {
                        0 => mk(
                            OrderType::StopLimit {
                                stop: Price(at),
                                price: Price(beyond),
                                qty,
                            },
                            false,
                            client,
                        ),
                        _ => mk(
                            OrderType::StopMarket {
                                stop: Price(at),
                                qty,
                            },
                            false,
                            client,
                        ),
                    }
                };
                let mut legs = match side {
                    Side::Sell => [profit_leg(hi, c0), loss_leg(lo, c1)],
                    Side::Buy => [loss_leg(hi, c0), profit_leg(lo, c1)],
                };
                match twist {
                    1 => legs.swap(0, 1),
                    2 => {
                        legs[1].order_type = match legs[1].order_type {
                            OrderType::Limit { price, qty } => OrderType::Limit {
                                price,
                                qty: Qty(qty.0 + 1),
                            },
                            t => t,
                        }
                    }
                    3 => legs[1].tif = TimeInForce::Fok,
                    _ => {}
                }
                NewOco {
                    legs,
                    // From a small set shared with the legs' own (separate namespaces): a
                    // list often repeats a live list's client id.
                    list_client_id: match lo % 4 {
                        0 => None,
                        1 => Some(cid("a")),
                        2 => Some(cid("L")),
                        _ => c0,
                    },
                }
            },
        )
}

/// A working limit order of `account` around the traded prices (sometimes IOC, post-only, or
/// not a limit order at all).
fn arb_working() -> impl Strategy<Value = (Side, OrderType, TimeInForce, bool, StpMode)> {
    (
        prop_oneof![Just(Side::Buy), Just(Side::Sell)],
        prop_oneof![
            12 => (994u64..=1004, 1u64..=8)
                .prop_map(|(p, q)| OrderType::Limit { price: Price(p), qty: Qty(q) }),
            1 => arb_order_type(),
        ],
        prop_oneof![6 => Just(TimeInForce::Gtc), 1 => Just(TimeInForce::Ioc), 1 => arb_tif()],
        prop::bool::weighted(0.15),
        arb_stp(),
    )
}

/// OTOs: a working limit order and a pending order of the same account (now and then another
/// account's, or one the rules refuse).
fn arb_oto() -> impl Strategy<Value = NewOto> {
    (
        arb_account(),
        arb_working(),
        arb_client(),
        arb_new_order(),
        0u8..12,
    )
        .prop_map(
            |(account, (side, order_type, tif, post_only, stp), client_id, mut pending, twist)| {
                if twist != 0 {
                    pending.account = account;
                    pending.market = M;
                }
                NewOto {
                    working: NewOrder {
                        account,
                        market: M,
                        side,
                        order_type,
                        tif,
                        post_only,
                        stp,
                        client_id,
                    },
                    pending,
                    list_client_id: match twist % 3 {
                        0 => None,
                        1 => Some(cid("L")),
                        _ => client_id,
                    },
                }
            },
        )
}

/// OTOCOs: a working limit order and an OCO pair of the same account.
fn arb_otoco() -> impl Strategy<Value = NewOtoco> {
    (arb_working(), arb_client(), arb_oco()).prop_map(
        |((side, order_type, tif, post_only, stp), client_id, oco)| NewOtoco {
            working: NewOrder {
                account: oco.legs[0].account,
                market: M,
                side,
                order_type,
                tif,
                post_only,
                stp,
                client_id,
            },
            pending: oco.legs,
            list_client_id: oco.list_client_id.or(client_id),
        },
    )
}

fn arb_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        12 => arb_new_order().prop_map(Command::NewOrder),
        3 => arb_oco().prop_map(|l| Command::NewOco(Box::new(l))),
        3 => arb_oto().prop_map(|l| Command::NewOto(Box::new(l))),
        2 => arb_otoco().prop_map(|l| Command::NewOtoco(Box::new(l))),
        3 => (arb_account(), arb_market(), arb_ref())
            .prop_map(|(account, market, order)| Command::Cancel { account, market, order }),
        1 => (arb_account(), prop::option::of(arb_market()))
            .prop_map(|(account, market)| Command::CancelAll { account, market }),
        4 => (
            arb_account(),
            arb_market(),
            arb_ref(),
            prop::option::of(arb_price()),
            prop::option::of(arb_qty())
        )
            .prop_map(|(account, market, order, new_price, new_qty)| Command::Amend {
                account,
                market,
                order,
                new_price,
                new_qty,
            }),
        2 => (arb_account(), arb_market(), arb_ref(), arb_qty()).prop_map(
            |(account, market, order, new_qty)| Command::AmendKeepPriority {
                account,
                market,
                order,
                new_qty,
            }
        ),
        1 => (arb_account(), arb_asset(), arb_amount(), 0u8..6).prop_map(
            |(account, asset, amount, k)| Command::Credit { account, asset, amount, key: key(k) }
        ),
        1 => (arb_account(), arb_account(), arb_asset(), arb_amount(), 0u8..6).prop_map(
            |(from, to, asset, amount, k)| Command::Transfer { from, to, asset, amount, key: key(k) }
        ),
        // The same transfers again and again: once applied, their retries are duplicates.
        1 => (1u32..=2, 0u8..2).prop_map(|(from, k)| Command::Transfer {
            from: AccountId(from),
            to: AccountId(3 - from),
            asset: AssetId(u16::from(k)),
            amount: Amount(1),
            key: key(100 + k),
        }),
        1 => Just(Command::CreateAccount),
        1 => Just(Command::Tick),
        1 => (arb_account(), arb_asset(), arb_amount(), 0u64..=50, 1u64..=6).prop_map(
            |(account, asset, amount, fee, id)| Command::WithdrawHold {
                account,
                asset,
                amount,
                fee: Amount(fee),
                id: WithdrawalId(id),
            }
        ),
        1 => (1u64..=7).prop_map(|id| Command::WithdrawRelease { id: WithdrawalId(id) }),
        1 => (1u64..=7).prop_map(|id| Command::WithdrawalStatus { id: WithdrawalId(id) }),
        1 => (0u8..6).prop_map(|k| Command::CreditStatus { key: key(k) }),
        // The random transfers' keys and the repeated ones' (100, 101).
        1 => prop_oneof![0u8..6, 100u8..102].prop_map(|k| Command::TransferStatus { key: key(k) }),
        1 => (1u64..=7, 0u64..=60).prop_map(|(id, fee)| Command::WithdrawComplete {
            id: WithdrawalId(id),
            network_fee: Amount(fee),
        }),
    ]
}

/// A step of a scenario: a command, or a cancel or amend of whichever order is open when the
/// step runs (so that most of them name an order that exists, by its owner).
#[derive(Clone, Debug)]
enum Op {
    Cmd(Command),
    CancelOpen {
        pick: usize,
        by_client: bool,
    },
    AmendOpen {
        pick: usize,
        by_client: bool,
        new_price: Option<Price>,
        new_qty: Option<Qty>,
    },
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        16 => arb_command().prop_map(Op::Cmd),
        3 => (any::<usize>(), prop::bool::weighted(0.3))
            .prop_map(|(pick, by_client)| Op::CancelOpen { pick, by_client }),
        6 => (
            any::<usize>(),
            prop::bool::weighted(0.3),
            prop::option::of(arb_price()),
            prop::option::of(arb_qty())
        )
            .prop_map(|(pick, by_client, new_price, new_qty)| Op::AmendOpen {
                pick,
                by_client,
                new_price,
                new_qty,
            }),
    ]
}

/// The command `op` stands for, given the engine's open orders and the time now (GTD times are
/// generated relative to it).
fn resolve(op: &Op, e: &Engine, now: Timestamp) -> Command {
    let pick_order = |pick: usize, by_client: bool| {
        let b = e.book(M).unwrap();
        let mut open: Vec<_> = [Side::Buy, Side::Sell]
            .into_iter()
            .flat_map(|side| b.levels(side).collect::<Vec<_>>())
            .flat_map(|(p, _)| {
                b.orders_at(p)
                    .map(|n| (n.id, n.data.account, n.data.client_id))
            })
            .collect();
        open.sort_by_key(|o| o.0);
        let &(id, account, client) = open.get(pick % open.len().max(1))?;
        let order = match client {
            Some(c) if by_client => OrderRef::Client(c),
            _ => OrderRef::Id(id),
        };
        Some((account, order))
    };
    match *op {
        Op::Cmd(Command::NewOrder(mut o)) => {
            if let TimeInForce::Gtd(t) = o.tif {
                o.tif = TimeInForce::Gtd(Timestamp(now.0 + t.0));
            }
            Command::NewOrder(o)
        }
        Op::Cmd(Command::NewOto(ref l)) => {
            let mut l = **l;
            for o in [&mut l.working, &mut l.pending] {
                if let TimeInForce::Gtd(t) = o.tif {
                    o.tif = TimeInForce::Gtd(Timestamp(now.0 + t.0));
                }
            }
            Command::NewOto(Box::new(l))
        }
        Op::Cmd(Command::NewOtoco(ref l)) => {
            let mut l = **l;
            if let TimeInForce::Gtd(t) = l.working.tif {
                l.working.tif = TimeInForce::Gtd(Timestamp(now.0 + t.0));
            }
            Command::NewOtoco(Box::new(l))
        }
        Op::Cmd(ref c) => c.clone(),
        Op::CancelOpen { pick, by_client } => match pick_order(pick, by_client) {
            Some((account, order)) => Command::Cancel {
                account,
                market: M,
                order,
            },
            None => Command::Tick,
        },
        Op::AmendOpen {
            pick,
            by_client,
            new_price,
            new_qty,
        } => match pick_order(pick, by_client) {
            Some((account, order)) => Command::Amend {
                account,
                market: M,
                order,
                new_price,
                new_qty,
            },
            None => Command::Tick,
        },
    }
}

/// Three funded accounts, then random steps.
fn arb_scenario() -> impl Strategy<Value = Vec<Op>> {
    (
        prop::collection::vec((0u64..=60, 0u64..=80_000), 3),
        prop::collection::vec(arb_op(), 1..150),
    )
        .prop_map(|(funds, ops)| {
            let mut v = vec![Op::Cmd(Command::CreateAccount); 3];
            for (i, (base, quote)) in funds.into_iter().enumerate() {
                let account = AccountId(i as u32 + 1);
                for (asset, amount) in [(BASE, base), (QUOTE, quote)] {
                    if amount > 0 {
                        v.push(Op::Cmd(Command::Credit {
                            account,
                            asset: AssetId(asset),
                            amount: Amount(amount),
                            key: key(100 + 2 * i as u8 + asset as u8),
                        }));
                    }
                }
            }
            v.extend(ops);
            v
        })
}

const STEP_NS: u64 = 10;

fn now_of(step: usize) -> Timestamp {
    Timestamp((step as u64 + 1) * STEP_NS)
}

// ---------------------------------------------------------------------------------------------
// Properties.
// ---------------------------------------------------------------------------------------------

/// Runs `ops` on the engine and the reference side by side, comparing after every command.
fn check_against_reference(ops: &[Op], fees: (u16, u16)) -> Result<(), TestCaseError> {
    let mut e = Engine::new(config(fees)).unwrap();
    let mut r = Reference::new(fees);
    let mut out = Vec::new();
    // Each transfer key's sequence number when it was applied: a retry names it.
    let mut transfer_seqs = std::collections::HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        let cmd = &resolve(op, &e, now_of(i));
        out.clear();
        let got = e.apply(cmd, now_of(i), &mut out);
        let (expired, want) = r.apply(cmd, now_of(i).0);
        e.check_invariants();
        let (gdup, gevs) = engine_evs(&out);
        match (&got, &want) {
            (Err(g), Err(w)) => {
                prop_assert_eq!(g, w, "step {}: {:?}", i, cmd);
                prop_assert_eq!(&gevs, &expired, "step {}: expiries before {:?}", i, cmd);
            }
            (Ok(()), Ok((dup, evs))) => {
                let want_evs: Vec<Ev> = expired.iter().chain(evs).cloned().collect();
                prop_assert_eq!(gdup, *dup, "step {}: duplicate flag of {:?}", i, cmd);
                prop_assert_eq!(&gevs, &want_evs, "step {}: events of {:?}", i, cmd);
                let accepted = out.iter().find_map(|ev| match *ev {
                    Event::Accepted { seq, original, .. } => Some((seq, original)),
                    _ => None,
                });
                match (cmd, *dup, accepted) {
                    (Command::Transfer { key, .. }, false, Some((seq, original))) => {
                        prop_assert_eq!(original, None, "step {}", i);
                        transfer_seqs.insert(*key, seq);
                    }
                    (Command::Transfer { key, .. }, true, Some((_, original))) => prop_assert_eq!(
                        original,
                        transfer_seqs.get(key).copied(),
                        "step {}: the original of {:?}",
                        i,
                        cmd
                    ),
                    (Command::Transfer { .. }, _, None) => {
                        prop_assert!(false, "step {}: {:?} accepted without Accepted", i, cmd)
                    }
                    (_, _, acc) => {
                        prop_assert_eq!(acc.and_then(|a| a.1), None, "step {}: {:?}", i, cmd)
                    }
                }
            }
            _ => prop_assert!(
                false,
                "step {}: {:?}: engine {:?}, reference {:?}, events {:?}",
                i,
                cmd,
                got,
                want.as_ref().map(|x| &x.1),
                out
            ),
        }
        prop_assert_eq!(
            engine_book(&e),
            r.book(),
            "step {}: book after {:?}",
            i,
            cmd
        );
        prop_assert_eq!(
            engine_stop_rows(&e),
            r.stop_rows(),
            "step {}: stops after {:?}",
            i,
            cmd
        );
        prop_assert_eq!(
            engine_list_rows(&e),
            r.list_rows(),
            "step {}: order lists after {:?}",
            i,
            cmd
        );
        prop_assert_eq!(
            engine_oto_rows(&e),
            r.oto_rows(),
            "step {}: OTO lists after {:?}",
            i,
            cmd
        );
        prop_assert_eq!(
            e.last_price(M).map(|p| p.0),
            r.last_price,
            "step {}: last price",
            i
        );
        prop_assert_eq!(
            engine_balances(&e),
            r.bal.clone(),
            "step {}: balances after {:?}",
            i,
            cmd
        );
    }
    Ok(())
}

proptest! {
    /// Engine and reference agree on every outcome, trade, book level and balance.
    #[test]
    fn engine_matches_reference(ops in arb_scenario()) {
        check_against_reference(&ops, FEES)?;
    }

    /// The same with the maker fee above the taker fee (a bid's fee allowance is the maker's).
    #[test]
    fn engine_matches_reference_maker_fee_above_taker(ops in arb_scenario()) {
        check_against_reference(&ops, FEES_MAKER_ABOVE)?;
    }

    /// A rejected command (or a duplicate) leaves the state exactly as it was.
    #[test]
    fn rejected_changes_nothing(ops in arb_scenario()) {
        let mut e = Engine::new(config(FEES)).unwrap();
        let mut out = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let now = now_of(i);
            let cmd = &resolve(op, &e, now);
            let before = e.state_hash();
            let snapshot = e.snapshot();
            let seq = e.seq();
            out.clear();
            let result = e.apply(cmd, now, &mut out);
            if let [Event::Accepted { duplicate: true, .. }] = out.as_slice() {
                // A duplicate credit or transfer is accepted but changes nothing either.
                prop_assert_eq!(e.state_hash(), before, "step {}: duplicate {:?}", i, cmd);
                prop_assert_eq!(e.seq(), seq);
            }
            if let Command::WithdrawalStatus { .. }
            | Command::CreditStatus { .. }
            | Command::TransferStatus { .. } = cmd
            {
                // A query changes nothing, not even time: same hash, same seq, one answer.
                prop_assert!(result.is_ok());
                let answered = matches!(
                    out.as_slice(),
                    [Event::WithdrawalStatus { .. }
                        | Event::CreditStatus { .. }
                        | Event::TransferStatus { .. }]
                );
                prop_assert!(answered, "step {}: events of a query: {:?}", i, out);
                prop_assert_eq!(e.state_hash(), before, "step {}: query {:?}", i, cmd);
                prop_assert_eq!(e.seq(), seq);
            }
            if let Err(code) = result {
                prop_assert_eq!(out.last(), Some(&Event::Rejected { code }));
                if out.len() == 1 {
                    prop_assert_eq!(
                        e.state_hash(), before, "step {}: {:?} rejected {:?}", i, cmd, code
                    );
                    prop_assert_eq!(e.seq(), seq);
                } else {
                    // GTD orders due at `now` expired first: the state is exactly that of a
                    // `Tick` at `now` from the state before.
                    let mut t = Engine::from_snapshot(snapshot).unwrap();
                    t.apply(&Command::Tick, now, &mut Vec::new()).unwrap();
                    prop_assert_eq!(
                        e.state_hash(), t.state_hash(), "step {}: {:?} rejected {:?}", i, cmd, code
                    );
                    prop_assert_eq!(e.seq(), seq + 1);
                }
            }
        }
    }

    /// A restored snapshot is the same engine: same hash now, same events and hashes later.
    #[test]
    fn snapshot_restore_is_identical(
        before in arb_scenario(),
        after in prop::collection::vec(arb_op(), 1..60),
    ) {
        let mut a = Engine::new(config(FEES)).unwrap();
        let mut out = Vec::new();
        for (i, op) in before.iter().enumerate() {
            let cmd = resolve(op, &a, now_of(i));
            let _ = a.apply(&cmd, now_of(i), &mut out);
        }
        let mut b = Engine::from_snapshot(a.snapshot()).unwrap();
        prop_assert_eq!(a.state_hash(), b.state_hash());
        b.check_invariants();
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        for (j, op) in after.iter().enumerate() {
            let now = now_of(before.len() + j);
            let cmd = &resolve(op, &a, now);
            oa.clear();
            ob.clear();
            let ra = a.apply(cmd, now, &mut oa);
            let rb = b.apply(cmd, now, &mut ob);
            prop_assert_eq!(ra, rb, "step {}: {:?}", j, cmd);
            prop_assert_eq!(&oa, &ob, "step {}: {:?}", j, cmd);
            prop_assert_eq!(a.state_hash(), b.state_hash(), "step {}: {:?}", j, cmd);
        }
    }
}
