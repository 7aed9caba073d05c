//! Seeded simulation with an auditor (TigerBeetle style): many accounts send a random mix of every
//! command (limit, market, stop and GTD orders, amends, cancels, credits, withdrawals, transfers)
//! while time advances. After every step:
//!
//! * the **auditor** rebuilds every balance from the emitted events alone (credits, trades and
//!   their fees, withdrawals, transfers) and checks it against the `Balance` events and the
//!   engine, checks conservation per asset (balances == credits - completed withdrawals), and
//!   checks every trade's notional and fees against the market's configuration;
//! * a **depth observer** that took a depth snapshot at the start and applies only `Depth` diffs
//!   (gap-free `seq`) must hold exactly the engine's price levels;
//! * an **order tracker** following orders through their events checks that trades happen at the
//!   maker's price within the taker's limit, that no GTD order (resting or waiting stop) outlives
//!   its time, and that `next_expiry` is the earliest GTD time still open;
//! * balances and price levels are reported once per flush, after the other events;
//! * `Engine::check_invariants` holds.
//!
//! Every few hundred steps the engine is replaced by one restored from its snapshot, and at the
//! end a fresh engine replaying the journal (the commands that advanced `seq`) must reach the same
//! state hash.
//!
//! The workload runs with ample funds and again with tight funds (so that balance checks,
//! including those of triggered stop-market buys, are hit).
//!
//! A failure prints the seed and step; `MEDIATOR_SEED=<seed>` replays exactly that run
//! (`MEDIATOR_STEPS=<n>` changes the number of steps, default 2,000).

use matching_engine::{
    AccountId, Amount, AssetConfig, AssetId, Command, Engine, EngineConfig, Event, IdempotencyKey,
    Limits, MarketConfig, MarketId, NewOco, NewOrder, NewOto, NewOtoco, OrderRef, OrderType, Price,
    Qty, RejectCode, Side, StpMode, TimeInForce, Timestamp, WithdrawalId,
};
use std::collections::{BTreeMap, HashMap};

const DEFAULT_SEEDS: [u64; 4] = [1, 2, 0xDEAD_BEEF, 20_261_122];
const DEFAULT_STEPS: usize = 2_000;
const ACCOUNTS: u32 = 200;
const N_ASSETS: u16 = 3;
const MS: u64 = 1_000_000;

/// splitmix64: tiny, fast, and the whole run is a function of the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    /// True with probability `pct` percent.
    fn chance(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

fn config() -> EngineConfig {
    let asset = |symbol: &str| AssetConfig {
        symbol: symbol.into(),
        decimals: 8,
    };
    EngineConfig {
        assets: vec![asset("BTC"), asset("USD"), asset("ETH")],
        markets: vec![
            MarketConfig {
                symbol: "BTCUSD".into(),
                base: AssetId(0),
                quote: AssetId(1),
                lot_size: 10,
                tick_size: 5,
                min_qty: Qty(1),
                min_notional: Amount(100_000),
                min_price: Price(1),
                max_price: Price(1_000_000),
                max_qty: Qty(10_000),
                maker_fee_bps: 10,
                taker_fee_bps: 25,
            },
            MarketConfig {
                symbol: "ETHBTC".into(),
                base: AssetId(2),
                quote: AssetId(0),
                lot_size: 100,
                tick_size: 3,
                min_qty: Qty(1),
                min_notional: Amount(1_000),
                min_price: Price(1),
                max_price: Price(100_000),
                max_qty: Qty(10_000),
                maker_fee_bps: 0,
                taker_fee_bps: 30,
            },
        ],
        limits: Limits {
            max_orders_per_book: 4_000,
            max_open_orders_per_account: 25,
            max_accounts: ACCOUNTS + 20,
        },
    }
}

/// Rebuilds balances from events only.
struct Auditor {
    cfg: EngineConfig,
    /// available + held per (account, asset), from deltas implied by events.
    totals: BTreeMap<(u32, u16), i128>,
    /// The last `Balance` event per (account, asset).
    reported: BTreeMap<(u32, u16), (u64, u64)>,
    credited: Vec<u128>,
    withdrawn: Vec<u128>,
    /// Withdrawals from their `WithdrawalHeld` event: (account, asset, amount, fee, still held).
    withdrawals: HashMap<u64, (u32, u16, u64, u64, bool)>,
}

impl Auditor {
    fn new(cfg: EngineConfig) -> Self {
        let n = cfg.assets.len();
        Self {
            cfg,
            totals: BTreeMap::new(),
            reported: BTreeMap::new(),
            credited: vec![0; n],
            withdrawn: vec![0; n],
            withdrawals: HashMap::new(),
        }
    }

    fn add(&mut self, account: AccountId, asset: AssetId, delta: i128) {
        *self.totals.entry((account.0, asset.0)).or_default() += delta;
    }

    fn event(&mut self, ev: &Event) -> Result<(), String> {
        match *ev {
            Event::Credited {
                account,
                asset,
                amount,
                ..
            } => {
                self.add(account, asset, i128::from(amount.0));
                self.credited[asset.0 as usize] += u128::from(amount.0);
            }
            Event::Transferred {
                from,
                to,
                asset,
                amount,
                ..
            } => {
                self.add(from, asset, -i128::from(amount.0));
                self.add(to, asset, i128::from(amount.0));
            }
            Event::WithdrawalHeld {
                id,
                account,
                asset,
                amount,
                fee,
            } => {
                let old = self
                    .withdrawals
                    .insert(id.0, (account.0, asset.0, amount.0, fee.0, true));
                if old.is_some() {
                    return Err(format!("withdrawal {id:?} held twice"));
                }
            }
            Event::WithdrawalReleased { id, account } => {
                let w = self.withdrawals.get_mut(&id.0).ok_or("unknown release")?;
                if !w.4 || w.0 != account.0 {
                    return Err(format!("release of {id:?} not held by {account:?}"));
                }
                w.4 = false;
            }
            Event::WithdrawalCompleted {
                id,
                account,
                network_fee,
            } => {
                let w = self
                    .withdrawals
                    .get_mut(&id.0)
                    .ok_or("unknown completion")?;
                if !w.4 || w.0 != account.0 || network_fee.0 > w.3 {
                    return Err(format!("bad completion of {id:?}: {w:?} {network_fee:?}"));
                }
                w.4 = false;
                let (_, asset, amount, fee, _) = *w;
                self.add(account, AssetId(asset), -i128::from(amount + fee));
                self.add(
                    AccountId(0),
                    AssetId(asset),
                    i128::from(fee - network_fee.0),
                );
                self.withdrawn[asset as usize] += u128::from(amount + network_fee.0);
            }
            Event::Trade {
                market,
                price,
                qty,
                taker_side,
                maker_account,
                taker_account,
                maker_fee,
                taker_fee,
                notional,
                ..
            } => {
                let m = self.cfg.markets[market.0 as usize].clone();
                let want_notional = price.0 * qty.0 * m.tick_size;
                let want_maker_fee = MarketConfig::fee(Amount(want_notional), m.maker_fee_bps);
                let want_taker_fee = MarketConfig::fee(Amount(want_notional), m.taker_fee_bps);
                if qty.0 == 0
                    || notional.0 != want_notional
                    || maker_fee != want_maker_fee
                    || taker_fee != want_taker_fee
                {
                    return Err(format!("trade numbers wrong: {ev:?}"));
                }
                let base = i128::from(qty.0 * m.lot_size);
                let n = i128::from(notional.0);
                let (buyer, seller, buyer_fee, seller_fee) = match taker_side {
                    Side::Buy => (taker_account, maker_account, taker_fee, maker_fee),
                    Side::Sell => (maker_account, taker_account, maker_fee, taker_fee),
                };
                self.add(buyer, m.base, base);
                self.add(buyer, m.quote, -(n + i128::from(buyer_fee.0)));
                self.add(seller, m.base, -base);
                self.add(seller, m.quote, n - i128::from(seller_fee.0));
                self.add(AccountId(0), m.quote, i128::from(maker_fee.0 + taker_fee.0));
            }
            Event::Balance {
                account,
                asset,
                available,
                held,
            } => {
                self.reported
                    .insert((account.0, asset.0), (available.0, held.0));
            }
            _ => {}
        }
        Ok(())
    }

    /// Everything the events imply must be what the engine holds.
    fn check(&self, e: &Engine) -> Result<(), String> {
        let mut held_by_withdrawals: BTreeMap<(u32, u16), u64> = BTreeMap::new();
        for &(a, asset, amount, fee, held) in self.withdrawals.values() {
            if held {
                *held_by_withdrawals.entry((a, asset)).or_default() += amount + fee;
            }
        }
        let mut sums = vec![0i128; N_ASSETS as usize];
        for a in 0..e.account_count() as u32 {
            for asset in 0..N_ASSETS {
                let (av, h) = e.balance(AccountId(a), AssetId(asset)).unwrap();
                let reported = self.reported.get(&(a, asset)).copied().unwrap_or((0, 0));
                if (av.0, h.0) != reported {
                    return Err(format!(
                        "account {a} asset {asset}: engine ({}, {}), last Balance event {reported:?}",
                        av.0, h.0
                    ));
                }
                let total = self.totals.get(&(a, asset)).copied().unwrap_or(0);
                if i128::from(av.0) + i128::from(h.0) != total {
                    return Err(format!(
                        "account {a} asset {asset}: engine total {}, events imply {total}",
                        u128::from(av.0) + u128::from(h.0)
                    ));
                }
                let w = held_by_withdrawals.get(&(a, asset)).copied().unwrap_or(0);
                if h.0 < w {
                    return Err(format!(
                        "account {a} asset {asset}: held {} below withdrawals {w}",
                        h.0
                    ));
                }
                sums[asset as usize] += total;
            }
        }
        for (asset, &sum) in sums.iter().enumerate() {
            let want = self.credited[asset] as i128 - self.withdrawn[asset] as i128;
            let t = e.asset_totals(AssetId(asset as u16));
            if sum != want
                || i128::from(e.asset_total(AssetId(asset as u16)).0) != want
                || t.credited != self.credited[asset]
                || t.withdrawn != self.withdrawn[asset]
            {
                return Err(format!(
                    "conservation of asset {asset}: balances {}, credits {} - withdrawals {}, \
                     engine totals {t:?}",
                    sum, self.credited[asset], self.withdrawn[asset]
                ));
            }
        }
        Ok(())
    }
}

/// A market-data client: a depth snapshot plus gap-free diffs.
struct DepthObserver {
    levels: Vec<BTreeMap<(bool, Price), Qty>>,
    seq: Vec<u64>,
}

fn engine_levels(e: &Engine, m: MarketId) -> BTreeMap<(bool, Price), Qty> {
    let b = e.book(m).unwrap();
    [Side::Buy, Side::Sell]
        .into_iter()
        .flat_map(|side| {
            b.levels(side)
                .map(move |(p, q)| ((side == Side::Buy, p), q))
        })
        .collect()
}

impl DepthObserver {
    fn new(e: &Engine) -> Self {
        let n = e.config().markets.len() as u16;
        Self {
            levels: (0..n).map(|m| engine_levels(e, MarketId(m))).collect(),
            seq: (0..n).map(|m| e.depth_seq(MarketId(m))).collect(),
        }
    }

    fn event(&mut self, ev: &Event) -> Result<(), String> {
        if let Event::Depth {
            market,
            seq,
            side,
            price,
            qty,
        } = *ev
        {
            let m = market.0 as usize;
            if seq != self.seq[m] + 1 {
                return Err(format!(
                    "depth gap in market {m}: had {}, got {seq}",
                    self.seq[m]
                ));
            }
            self.seq[m] = seq;
            let k = (side == Side::Buy, price);
            if qty.is_zero() {
                self.levels[m].remove(&k);
            } else {
                self.levels[m].insert(k, qty);
            }
        }
        Ok(())
    }

    fn check(&self, e: &Engine) -> Result<(), String> {
        for (m, levels) in self.levels.iter().enumerate() {
            let want = engine_levels(e, MarketId(m as u16));
            if *levels != want {
                return Err(format!(
                    "market {m} depth rebuilt from diffs {levels:?} != book {want:?}"
                ));
            }
            if e.depth_seq(MarketId(m as u16)) != self.seq[m] {
                return Err(format!("market {m} depth seq differs"));
            }
        }
        Ok(())
    }
}

/// Follows every order through its events: its limit price and GTD time. Checks that trades happen
/// at the maker's price and within the taker's limit, and that no order outlives its GTD time.
#[derive(Default)]
struct OrderTracker {
    /// Open orders (waiting stops included): (limit price, GTD time).
    open: BTreeMap<u64, (Option<Price>, Option<Timestamp>)>,
}

impl OrderTracker {
    fn event(&mut self, ev: &Event, now: Timestamp) -> Result<(), String> {
        match *ev {
            Event::OrderNew {
                info,
                order_type,
                tif,
                ..
            } => {
                let limit = match order_type {
                    OrderType::Limit { price, .. }
                    | OrderType::StopLimit { price, .. }
                    | OrderType::TakeProfitLimit { price, .. } => Some(price),
                    _ => None,
                };
                let gtd = match tif {
                    TimeInForce::Gtd(t) => Some(t),
                    _ => None,
                };
                if self.open.insert(info.order.0, (limit, gtd)).is_some() {
                    return Err(format!("order id {:?} reused", info.order));
                }
            }
            Event::OrderAmended { info, price, .. } => {
                let o = self
                    .open
                    .get_mut(&info.order.0)
                    .ok_or("amend of unknown order")?;
                o.0 = Some(price);
            }
            Event::OrderDone { info, .. } => {
                self.open
                    .remove(&info.order.0)
                    .ok_or_else(|| format!("done twice: {:?}", info.order))?;
            }
            Event::Trade {
                price,
                taker_side,
                maker_order,
                taker_order,
                ..
            } => {
                for order in [maker_order, taker_order] {
                    let (_, gtd) = self.open.get(&order.0).ok_or("trade of unknown order")?;
                    if gtd.is_some_and(|t| t <= now) {
                        return Err(format!("{order:?} traded after its GTD time {gtd:?}"));
                    }
                }
                let (maker_limit, _) = self.open[&maker_order.0];
                if maker_limit != Some(price) {
                    return Err(format!(
                        "trade at {price:?}, maker {maker_order:?} limit {maker_limit:?}"
                    ));
                }
                if let (Some(limit), _) = self.open[&taker_order.0] {
                    let ok = match taker_side {
                        Side::Buy => price <= limit,
                        Side::Sell => price >= limit,
                    };
                    if !ok {
                        return Err(format!("trade at {price:?} beyond taker limit {limit:?}"));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// After a command at `now`, every GTD order whose time has come is gone, and the engine's
    /// next expiry (which its driver relies on to expire orders on time) is the earliest GTD time
    /// of the open orders.
    fn check(&self, now: Timestamp, e: &mut Engine) -> Result<(), String> {
        let earliest = self.open.values().filter_map(|&(_, gtd)| gtd).min();
        if e.next_expiry() != earliest {
            return Err(format!(
                "next expiry {:?}, open orders' earliest GTD {earliest:?}",
                e.next_expiry()
            ));
        }
        match self
            .open
            .iter()
            .find(|(_, (_, gtd))| gtd.is_some_and(|t| t <= now))
        {
            Some((id, (_, gtd))) => Err(format!("order {id} still open after its GTD {gtd:?}")),
            None => Ok(()),
        }
    }
}

impl OrderTracker {
    /// The open orders known from events are exactly the engine's, at the same limit prices.
    fn check_open_set(&self, e: &Engine) -> Result<(), String> {
        let mut engine_open = BTreeMap::new();
        for a in 0..e.account_count() as u32 {
            for o in e.open_orders(AccountId(a), None) {
                let price = (o.price.0 != 0).then_some(o.price);
                engine_open.insert(o.id.0, price);
            }
        }
        let tracked: BTreeMap<u64, Option<Price>> = self
            .open
            .iter()
            .map(|(&id, &(price, _))| (id, price))
            .collect();
        if engine_open != tracked {
            let missing: Vec<_> = tracked
                .keys()
                .filter(|k| !engine_open.contains_key(k))
                .collect();
            let extra: Vec<_> = engine_open
                .keys()
                .filter(|k| !tracked.contains_key(k))
                .collect();
            return Err(format!(
                "open orders differ from events: open in the engine only {extra:?}, gone without \
                 OrderDone {missing:?} (or a limit price differs)"
            ));
        }
        Ok(())
    }
}

/// The workload: picks commands from the current state so most of them are meaningful.
struct Driver {
    rng: Rng,
    now: u64,
    mid: Vec<u64>,
    next_key: u64,
    next_withdrawal: u64,
    held_withdrawals: Vec<WithdrawalId>,
    accounts: u32,
}

fn key(n: u64) -> IdempotencyKey {
    let mut k = [0u8; 36];
    k[..8].copy_from_slice(&n.to_le_bytes());
    IdempotencyKey(k)
}

impl Driver {
    fn account(&mut self) -> AccountId {
        // Account 0 (fees) now and then; otherwise a user, busier ones more often.
        if self.rng.chance(1) {
            return AccountId(0);
        }
        let n = u64::from(self.accounts - 1);
        let a = if self.rng.chance(50) {
            self.rng.range(1, 20.min(n))
        } else {
            self.rng.range(1, n)
        };
        AccountId(a as u32)
    }

    fn price(&mut self, m: usize, spread: u64) -> Price {
        Price(self.rng.range(self.mid[m] - spread, self.mid[m] + spread))
    }

    fn stp(&mut self) -> StpMode {
        self.rng.pick(&[
            StpMode::None,
            StpMode::ExpireTaker,
            StpMode::ExpireMaker,
            StpMode::ExpireBoth,
        ])
    }

    fn pick_open(&mut self, e: &Engine, account: AccountId) -> Option<(MarketId, OrderRef)> {
        let open = e.open_orders(account, None);
        if open.is_empty() {
            return None;
        }
        let o = open[(self.rng.next() % open.len() as u64) as usize];
        let r = match o.meta.client_id {
            Some(c) if self.rng.chance(30) => OrderRef::Client(c),
            _ => OrderRef::Id(o.id),
        };
        Some((o.market, r))
    }

    fn new_order(&mut self, account: AccountId) -> NewOrder {
        let m = self.rng.range(0, 1) as usize;
        let side = if self.rng.chance(50) {
            Side::Buy
        } else {
            Side::Sell
        };
        let qty = Qty(self.rng.range(1, 30));
        let roll = self.rng.range(0, 99);
        let order_type = match roll {
            0..=69 => OrderType::Limit {
                price: self.price(m, 12),
                qty,
            },
            70..=77 => OrderType::Market { qty },
            78..=83 => OrderType::MarketBudget {
                budget: Amount(self.rng.range(1, 20) * self.mid[m] * [5, 3][m]),
            },
            84..=88 => {
                let stop = self.price(m, 8);
                OrderType::StopLimit {
                    stop,
                    price: self.price(m, 12),
                    qty,
                }
            }
            89..=92 => {
                let stop = self.price(m, 8);
                OrderType::TakeProfitLimit {
                    stop,
                    price: self.price(m, 12),
                    qty,
                }
            }
            93..=96 => OrderType::StopMarket {
                stop: self.price(m, 8),
                qty,
            },
            _ => OrderType::TakeProfitMarket {
                stop: self.price(m, 8),
                qty,
            },
        };
        let tif = match self.rng.range(0, 9) {
            0..=4 => TimeInForce::Gtc,
            5 => TimeInForce::Ioc,
            6 => TimeInForce::Fok,
            _ => TimeInForce::Gtd(Timestamp(self.now + self.rng.range(1, 5_000) * MS)),
        };
        let client_id = if self.rng.chance(20) {
            let s = format!("c{}", self.rng.range(0, 4));
            Some(matching_engine::ClientOrderId::new(&s).unwrap())
        } else {
            None
        };
        NewOrder {
            account,
            market: MarketId(m as u16),
            side,
            order_type,
            tif,
            post_only: self.rng.chance(10),
            stp: self.stp(),
            client_id,
        }
    }

    /// The working order of an OTO/OTOCO: a limit order near the mid (mostly GTC).
    fn working(&mut self, account: AccountId, market: MarketId) -> NewOrder {
        let mut w = self.new_order(account);
        w.market = market;
        w.order_type = OrderType::Limit {
            price: self.price(market.0 as usize, 6),
            qty: Qty(self.rng.range(1, 30)),
        };
        if self.rng.chance(70) {
            w.tif = TimeInForce::Gtc;
        }
        w
    }

    /// An OCO around the market's last price (most are accepted; some are refused because the
    /// price moved, the account lacks funds or a limit maker would cross).
    fn new_oco(&mut self, e: &Engine, account: AccountId) -> NewOco {
        let m = self.rng.range(0, 1) as usize;
        let market = MarketId(m as u16);
        let side = if self.rng.chance(50) {
            Side::Buy
        } else {
            Side::Sell
        };
        let qty = Qty(self.rng.range(1, 30));
        let last = e.last_price(market).map_or(self.mid[m], |p| p.0);
        let hi = last + self.rng.range(1, 12);
        let lo = last.saturating_sub(self.rng.range(1, 12)).max(1);
        let off = self.rng.range(0, 3);
        let (profit, loss) = (self.rng.range(0, 2), self.rng.range(0, 1));
        let stp = self.stp();
        let leg = |order_type, post_only| NewOrder {
            account,
            market,
            side,
            order_type,
            tif: TimeInForce::Gtc,
            post_only,
            stp,
            client_id: None,
        };
        // The profit leg at `at` (a limit maker, or a take-profit with its limit `off` toward
        // the market), the loss leg at `at` (a stop, its limit `off` beyond).
        let profit_leg = |at: u64| {
            let toward = if side == Side::Sell {
                at - off
            } else {
                at + off
            };
            match profit {
                0 => leg(
                    OrderType::Limit {
                        price: Price(at),
                        qty,
                    },
                    true,
                ),
                1 => leg(
                    OrderType::TakeProfitLimit {
                        stop: Price(at),
                        price: Price(toward),
                        qty,
                    },
                    false,
                ),
                _ => leg(
                    OrderType::TakeProfitMarket {
                        stop: Price(at),
                        qty,
                    },
                    false,
                ),
            }
        };
        let loss_leg = |at: u64| {
            let beyond = if side == Side::Sell {
                at - off
            } else {
                at + off
            };
            match loss {
                0 => leg(
                    OrderType::StopLimit {
                        stop: Price(at),
                        price: Price(beyond),
                        qty,
                    },
                    false,
                ),
                _ => leg(
                    OrderType::StopMarket {
                        stop: Price(at),
                        qty,
                    },
                    false,
                ),
            }
        };
        let legs = match side {
            Side::Sell => [profit_leg(hi), loss_leg(lo)],
            Side::Buy => [loss_leg(hi), profit_leg(lo)],
        };
        NewOco {
            legs,
            list_client_id: None,
        }
    }

    fn command(&mut self, e: &Engine) -> Command {
        // The mid price drifts so that stops trigger and old orders end up deep in the book.
        for m in 0..self.mid.len() {
            if self.rng.chance(10) {
                let lo = [9_900, 480][m];
                let hi = [10_100, 520][m];
                self.mid[m] = (self.mid[m] + self.rng.range(0, 4)).saturating_sub(2);
                self.mid[m] = self.mid[m].clamp(lo, hi);
            }
        }
        let account = self.account();
        let asset = AssetId(self.rng.range(0, u64::from(N_ASSETS) - 1) as u16);
        let roll = self.rng.range(0, 99);
        match roll {
            0..=4 => Command::NewOco(Box::new(self.new_oco(e, account))),
            5..=6 => {
                let pending = self.new_order(account);
                Command::NewOto(Box::new(NewOto {
                    working: self.working(account, pending.market),
                    pending,
                    list_client_id: None,
                }))
            }
            7 => {
                let pair = self.new_oco(e, account);
                Command::NewOtoco(Box::new(NewOtoco {
                    working: self.working(account, pair.legs[0].market),
                    pending: pair.legs,
                    list_client_id: None,
                }))
            }
            8..=49 => Command::NewOrder(self.new_order(account)),
            50..=59 => match self.pick_open(e, account) {
                Some((market, order)) => Command::Cancel {
                    account,
                    market,
                    order,
                },
                None => Command::Tick,
            },
            60..=67 => match self.pick_open(e, account) {
                Some((market, order)) => {
                    let m = market.0 as usize;
                    let new_price = self.rng.chance(60).then(|| self.price(m, 12));
                    let new_qty = self.rng.chance(60).then(|| Qty(self.rng.range(1, 30)));
                    Command::Amend {
                        account,
                        market,
                        order,
                        new_price,
                        new_qty,
                    }
                }
                None => Command::Tick,
            },
            68..=69 => Command::CancelAll {
                account,
                market: self
                    .rng
                    .chance(50)
                    .then(|| MarketId(self.rng.range(0, 1) as u16)),
            },
            70..=75 => {
                // Mostly fresh deposits, sometimes a replay of an old one (idempotent).
                let k = if self.next_key > 0 && self.rng.chance(15) {
                    self.rng.range(0, self.next_key - 1)
                } else {
                    self.next_key += 1;
                    self.next_key - 1
                };
                Command::Credit {
                    account,
                    asset,
                    amount: Amount(self.rng.range(1, 1_000_000)),
                    key: key(k),
                }
            }
            76..=81 => {
                let avail = e.balance(account, asset).map_or(0, |b| b.0 .0);
                self.next_withdrawal += 1;
                let id = if self.rng.chance(3) && self.next_withdrawal > 1 {
                    WithdrawalId(self.rng.range(1, self.next_withdrawal - 1))
                } else {
                    WithdrawalId(self.next_withdrawal)
                };
                Command::WithdrawHold {
                    account,
                    asset,
                    amount: Amount(self.rng.range(0, avail / 4 + 10)),
                    fee: Amount(self.rng.range(0, 500)),
                    id,
                }
            }
            82..=86 => {
                if self.held_withdrawals.is_empty() || self.rng.chance(5) {
                    return Command::WithdrawRelease {
                        id: WithdrawalId(self.rng.range(0, self.next_withdrawal + 1)),
                    };
                }
                let i = (self.rng.next() % self.held_withdrawals.len() as u64) as usize;
                let id = self.held_withdrawals[i];
                if self.rng.chance(40) {
                    Command::WithdrawRelease { id }
                } else {
                    let fee = e.withdrawal(id).map_or(0, |w| w.fee.0);
                    Command::WithdrawComplete {
                        id,
                        network_fee: Amount(self.rng.range(0, fee + fee / 10)),
                    }
                }
            }
            87..=93 => {
                let to = self.account();
                let avail = e.balance(account, asset).map_or(0, |b| b.0 .0);
                let k = if self.rng.chance(10) && self.next_key > 0 {
                    self.rng.range(0, self.next_key - 1)
                } else {
                    self.next_key += 1;
                    self.next_key - 1
                };
                Command::Transfer {
                    from: account,
                    to,
                    asset,
                    amount: Amount(self.rng.range(0, avail / 2 + 10)),
                    key: key(k),
                }
            }
            94 => Command::CreateAccount,
            _ => Command::Tick,
        }
    }
}

/// "Per command, changed price levels and balances are reported once each, at the end": in each
/// flush (the GTD expiries before a command, then the command itself) every balance and level
/// appears at most once, after all the other events of that part.
fn reported_once_at_the_end(out: &[Event]) -> Result<(), String> {
    let split = out
        .iter()
        .position(|e| matches!(e, Event::Accepted { .. } | Event::Rejected { .. }))
        .ok_or("no Accepted or Rejected event")?;
    for part in [&out[..split], &out[split..]] {
        let mut seen_balances = std::collections::HashSet::new();
        let mut seen_levels = std::collections::HashSet::new();
        let mut in_tail = false;
        for e in part {
            match *e {
                Event::Depth {
                    market,
                    side,
                    price,
                    ..
                } => {
                    in_tail = true;
                    if !seen_levels.insert((market, side == Side::Buy, price)) {
                        return Err(format!("level reported twice: {e:?}"));
                    }
                }
                Event::Balance { account, asset, .. } => {
                    in_tail = true;
                    if !seen_balances.insert((account, asset)) {
                        return Err(format!("balance reported twice: {e:?}"));
                    }
                }
                Event::Rejected { .. } => {}
                _ if in_tail => return Err(format!("{e:?} after the depth and balance events")),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Names the seed and step of a failing run, however it fails (auditor or engine assertion).
struct Context {
    seed: u64,
    step: usize,
    steps: usize,
    funds_divisor: u64,
}

impl Drop for Context {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "simulation failed at seed {} step {} (run of {} steps, funds divisor {}): \
                 replay with MEDIATOR_SEED={} MEDIATOR_STEPS={} cargo test -p matching-engine \
                 --test simulation",
                self.seed,
                self.step,
                self.steps,
                self.funds_divisor,
                self.seed,
                steps()
            );
        }
    }
}

struct Outcome {
    hash: [u8; 32],
    accepted: usize,
    rejected: usize,
    trades: usize,
    triggered: usize,
    expired: usize,
    /// OCO lists placed, and ended.
    lists: usize,
    lists_done: usize,
    /// OTO/OTOCO lists whose pending orders were placed, and refused when placed.
    otos_placed: usize,
    otos_refused: usize,
    /// Rejections for balance, and market orders ended for balance.
    insufficient: usize,
}

/// Runs one seeded simulation. `funds_divisor` scales the accounts' starting funds down: with
/// tight funds most orders, amends, withdrawals and triggered stop-market buys hit the balance
/// checks.
fn run(seed: u64, steps: usize, funds_divisor: u64) -> Outcome {
    let mut ctx = Context {
        seed,
        step: 0,
        steps,
        funds_divisor,
    };
    let cfg = config();
    let mut e = Engine::new(cfg.clone()).unwrap();
    let mut auditor = Auditor::new(cfg.clone());
    let mut depth = DepthObserver::new(&e);
    let mut orders = OrderTracker::default();
    let mut d = Driver {
        rng: Rng(seed),
        now: 1_700_000_000_000 * MS,
        mid: vec![10_000, 500],
        next_key: 0,
        next_withdrawal: 0,
        held_withdrawals: Vec::new(),
        accounts: 1,
    };
    let mut journal: Vec<(Command, Timestamp)> = Vec::new();
    let mut out = Vec::new();
    let mut o = Outcome {
        hash: [0; 32],
        accepted: 0,
        rejected: 0,
        trades: 0,
        triggered: 0,
        expired: 0,
        lists: 0,
        lists_done: 0,
        otos_placed: 0,
        otos_refused: 0,
        insufficient: 0,
    };
    // Open and fund the accounts.
    let mut setup = Vec::new();
    for a in 1..ACCOUNTS {
        setup.push(Command::CreateAccount);
        for (asset, max) in [(0u16, 2_000_000u64), (1, 50_000_000), (2, 200_000)] {
            d.next_key += 1;
            setup.push(Command::Credit {
                account: AccountId(a),
                asset: AssetId(asset),
                amount: Amount(d.rng.range(max / 10, max) / funds_divisor + 1),
                key: key(d.next_key - 1),
            });
        }
    }
    let total = setup.len() + steps;
    for i in 0..total {
        ctx.step = i;
        let cmd = if i < setup.len() {
            setup[i].clone()
        } else {
            d.now += d.rng.range(0, 300) * MS;
            d.command(&e)
        };
        let now = Timestamp(d.now);
        let seq = e.seq();
        out.clear();
        let res = e.apply(&cmd, now, &mut out);
        let fail = |what: String| -> ! { panic!("seed {seed} step {i}: {cmd:?}: {what}") };
        // Every command whose `seq` advanced is journaled; nothing else may change the state.
        if e.seq() != seq {
            if e.seq() != seq + 1 {
                fail(format!("seq jumped from {seq} to {}", e.seq()));
            }
            journal.push((cmd.clone(), now));
        }
        match res {
            Ok(()) => {
                o.accepted += 1;
                let Some(Event::Accepted { seq: s, .. }) =
                    out.iter().find(|ev| matches!(ev, Event::Accepted { .. }))
                else {
                    fail(format!("accepted without an Accepted event: {out:?}"));
                };
                if *s != e.seq() {
                    fail(format!("Accepted seq {s} but engine seq {}", e.seq()));
                }
                if let Command::WithdrawHold { id, .. } = cmd {
                    d.held_withdrawals.push(id);
                }
                if let Command::WithdrawRelease { id } | Command::WithdrawComplete { id, .. } = cmd
                {
                    d.held_withdrawals.retain(|&w| w != id);
                }
                if cmd == Command::CreateAccount {
                    d.accounts += 1;
                }
            }
            Err(code) => {
                o.rejected += 1;
                o.insufficient += usize::from(code == RejectCode::InsufficientBalance);
                if out.last() != Some(&Event::Rejected { code }) {
                    fail(format!("rejection not reported last: {out:?}"));
                }
                if code == RejectCode::EngineBusy {
                    fail("the engine itself never answers busy".into());
                }
            }
        }
        reported_once_at_the_end(&out).unwrap_or_else(|m| fail(m));
        for ev in &out {
            match ev {
                Event::Trade { .. } => o.trades += 1,
                Event::OrderTriggered { .. } => o.triggered += 1,
                Event::OrderListNew { .. } => o.lists += 1,
                Event::OrderListDone { .. } => o.lists_done += 1,
                Event::OtoDone { outcome, .. } => match outcome {
                    matching_engine::OtoOutcome::Placed => o.otos_placed += 1,
                    matching_engine::OtoOutcome::Refused(_) => o.otos_refused += 1,
                    matching_engine::OtoOutcome::Cancelled(_) => {}
                },
                Event::OrderDone {
                    reason: matching_engine::DoneReason::Expired,
                    ..
                } => o.expired += 1,
                Event::OrderDone {
                    reason: matching_engine::DoneReason::InsufficientBalance,
                    ..
                } => o.insufficient += 1,
                _ => {}
            }
            auditor.event(ev).unwrap_or_else(|m| fail(m));
            orders.event(ev, now).unwrap_or_else(|m| fail(m));
            depth.event(ev).unwrap_or_else(|m| fail(m));
        }
        e.check_invariants();
        auditor.check(&e).unwrap_or_else(|m| fail(m));
        depth.check(&e).unwrap_or_else(|m| fail(m));
        orders.check(now, &mut e).unwrap_or_else(|m| fail(m));
        if i % 50 == 0 {
            orders.check_open_set(&e).unwrap_or_else(|m| fail(m));
        }
        // Now and then carry on with an engine restored from a snapshot.
        if i % 397 == 0 {
            let hash = e.state_hash();
            e = Engine::from_snapshot(e.snapshot()).unwrap();
            if e.state_hash() != hash {
                fail("restored engine has another state hash".into());
            }
        }
    }
    ctx.step = total;
    o.hash = e.state_hash();
    // The journal alone rebuilds the same state.
    let mut r = Engine::new(cfg).unwrap();
    for (j, (cmd, now)) in journal.iter().enumerate() {
        out.clear();
        let _ = r.apply(cmd, *now, &mut out);
        if r.seq() != j as u64 + 1 {
            panic!("seed {seed}: journal replay of entry {j} ({cmd:?}) did not advance seq");
        }
    }
    assert_eq!(
        r.state_hash(),
        o.hash,
        "seed {seed}: journal replay reaches another state"
    );
    o
}

fn seeds() -> Vec<u64> {
    match std::env::var("MEDIATOR_SEED") {
        Ok(s) => vec![s.parse().expect("MEDIATOR_SEED is a u64")],
        Err(_) => DEFAULT_SEEDS.to_vec(),
    }
}

fn steps() -> usize {
    std::env::var("MEDIATOR_STEPS").map_or(DEFAULT_STEPS, |s| {
        s.parse().expect("MEDIATOR_STEPS is a number")
    })
}

#[test]
fn simulation_with_auditor() {
    for seed in seeds() {
        let o = run(seed, steps(), 1);
        eprintln!(
            "seed {seed}: {} accepted, {} rejected, {} trades, {} stops triggered, {} expired, \
             {} OCO lists ({} ended), OTO/OTOCO pending orders placed {} (refused {})",
            o.accepted,
            o.rejected,
            o.trades,
            o.triggered,
            o.expired,
            o.lists,
            o.lists_done,
            o.otos_placed,
            o.otos_refused
        );
        // The workload must exercise what it claims to (not a result check: a weak workload
        // would pass every check above vacuously).
        assert!(
            o.trades > 0
                && o.triggered > 0
                && o.expired > 0
                && o.lists_done > 0
                && o.otos_placed > 0,
            "seed {seed}: weak workload"
        );
    }
}

#[test]
fn same_seed_same_run() {
    let seed = seeds()[0];
    let a = run(seed, 300, 1);
    let b = run(seed, 300, 1);
    assert_eq!(a.hash, b.hash, "seed {seed}: two runs differ");
}

#[test]
fn simulation_with_auditor_tight_funds() {
    for seed in seeds() {
        let o = run(seed, steps() / 2, 40);
        eprintln!(
            "seed {seed} (tight funds): {} accepted, {} rejected, {} trades, {} insufficient",
            o.accepted, o.rejected, o.trades, o.insufficient
        );
        assert!(
            o.trades > 0 && o.insufficient > 0,
            "seed {seed}: weak workload"
        );
    }
}
