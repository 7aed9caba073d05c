//! Named cases for the engine bugs that the reference model and the simulation found, so that
//! each stays fixed whatever the random generators happen to produce.

use matching_engine::{
    AccountId, Amount, AssetConfig, AssetId, Command, DoneReason, Engine, EngineConfig, Event,
    IdempotencyKey, Limits, MarketConfig, MarketId, NewOrder, OrderType, Price, Qty, RejectCode,
    Side, StpMode, TimeInForce, Timestamp,
};

const M: MarketId = MarketId(0);
const BASE: AssetId = AssetId(0);
const QUOTE: AssetId = AssetId(1);

fn engine() -> Engine {
    let asset = |s: &str| AssetConfig {
        symbol: s.into(),
        decimals: 8,
    };
    Engine::new(EngineConfig {
        assets: vec![asset("BTC"), asset("USD")],
        markets: vec![MarketConfig {
            symbol: "BTCUSD".into(),
            base: BASE,
            quote: QUOTE,
            lot_size: 1,
            tick_size: 1,
            min_qty: Qty(1),
            min_notional: Amount(1),
            min_price: Price(1),
            max_price: Price(10_000),
            max_qty: Qty(1_000),
            maker_fee_bps: 10,
            taker_fee_bps: 20,
        }],
        limits: Limits {
            max_orders_per_book: 100,
            max_open_orders_per_account: 10,
            max_accounts: 10,
        },
    })
    .unwrap()
}

/// Drives an engine with an advancing clock.
struct Run {
    e: Engine,
    now: u64,
    keys: u8,
}

impl Run {
    /// An engine with accounts 1..=n, each with 100 BTC units and `quote` USD units.
    fn new(n: u32, quote: u64) -> Self {
        let mut r = Run {
            e: engine(),
            now: 0,
            keys: 0,
        };
        for a in 1..=n {
            r.ok(Command::CreateAccount);
            r.credit(a, BASE, 100);
            r.credit(a, QUOTE, quote);
        }
        r
    }

    fn apply(&mut self, cmd: Command) -> (Result<(), RejectCode>, Vec<Event>) {
        self.now += 10;
        let mut out = Vec::new();
        let res = self.e.apply(&cmd, Timestamp(self.now), &mut out);
        self.e.check_invariants();
        (res, out)
    }

    fn ok(&mut self, cmd: Command) -> Vec<Event> {
        let (res, out) = self.apply(cmd.clone());
        assert_eq!(res, Ok(()), "{cmd:?}: {out:?}");
        out
    }

    fn credit(&mut self, account: u32, asset: AssetId, amount: u64) {
        self.keys += 1;
        self.ok(Command::Credit {
            account: AccountId(account),
            asset,
            amount: Amount(amount),
            key: IdempotencyKey([self.keys; 36]),
        });
    }
}

fn order(account: u32, side: Side, order_type: OrderType) -> NewOrder {
    NewOrder {
        account: AccountId(account),
        market: M,
        side,
        order_type,
        tif: TimeInForce::Gtc,
        post_only: false,
        stp: StpMode::ExpireTaker,
        client_id: None,
    }
}

fn limit(account: u32, side: Side, price: u64, qty: u64) -> Command {
    Command::NewOrder(order(
        account,
        side,
        OrderType::Limit {
            price: Price(price),
            qty: Qty(qty),
        },
    ))
}

fn done(out: &[Event]) -> Vec<(u64, DoneReason, u64, u64)> {
    out.iter()
        .filter_map(|e| match *e {
            Event::OrderDone {
                info,
                reason,
                filled,
                remaining,
                ..
            } => Some((info.order.0, reason, filled.0, remaining.0)),
            _ => None,
        })
        .collect()
}

#[test]
fn rejected_or_duplicate_command_does_not_move_the_clock() {
    let mut r = Run::new(1, 1_000);
    let before = r.e.state_hash();
    let now = r.e.now();
    let (res, _) = r.apply(limit(1, Side::Buy, 0, 1));
    assert_eq!(res, Err(RejectCode::PriceOffTick));
    // A duplicate credit (key 1 credited 100 BASE to account 1) is accepted and changes
    // nothing either; the same key with other terms is refused and changes nothing.
    r.ok(Command::Credit {
        account: AccountId(1),
        asset: BASE,
        amount: Amount(100),
        key: IdempotencyKey([1; 36]),
    });
    let (res, _) = r.apply(Command::Credit {
        account: AccountId(1),
        asset: BASE,
        amount: Amount(5),
        key: IdempotencyKey([1; 36]),
    });
    assert_eq!(res, Err(RejectCode::CreditKeyReused));
    assert_eq!(r.e.now(), now);
    assert_eq!(r.e.state_hash(), before);
}

#[test]
fn fee_account_cannot_send_transfers() {
    let mut r = Run::new(1, 1_000);
    r.credit(0, QUOTE, 50);
    let (res, _) = r.apply(Command::Transfer {
        from: AccountId(0),
        to: AccountId(1),
        asset: QUOTE,
        amount: Amount(10),
        key: IdempotencyKey([200; 36]),
    });
    assert_eq!(res, Err(RejectCode::FeeAccount));
}

#[test]
fn market_order_on_an_empty_side_is_invalid() {
    let mut r = Run::new(1, 1_000);
    let buy = order(1, Side::Buy, OrderType::Market { qty: Qty(1) });
    let sell = order(
        1,
        Side::Sell,
        OrderType::MarketBudget {
            budget: Amount(100),
        },
    );
    for o in [buy, sell] {
        assert_eq!(
            r.apply(Command::NewOrder(o)).0,
            Err(RejectCode::InvalidOrder)
        );
    }
}

#[test]
fn fok_stop_order_is_invalid() {
    let mut r = Run::new(1, 1_000);
    let mut o = order(
        1,
        Side::Sell,
        OrderType::StopMarket {
            stop: Price(90),
            qty: Qty(1),
        },
    );
    o.tif = TimeInForce::Fok;
    assert_eq!(
        r.apply(Command::NewOrder(o)).0,
        Err(RejectCode::InvalidOrder)
    );
}

#[test]
fn gtd_stop_expires_while_it_waits() {
    let mut r = Run::new(1, 1_000);
    let at = r.now + 25;
    let mut o = order(
        1,
        Side::Sell,
        OrderType::StopLimit {
            stop: Price(90),
            price: Price(90),
            qty: Qty(3),
        },
    );
    o.tif = TimeInForce::Gtd(Timestamp(at));
    r.ok(Command::NewOrder(o));
    assert_eq!(
        r.e.balance(AccountId(1), BASE),
        Some((Amount(97), Amount(3)))
    );
    assert_eq!(r.e.next_expiry(), Some(Timestamp(at)));
    r.ok(Command::Tick);
    let out = r.ok(Command::Tick);
    assert_eq!(done(&out), vec![(1, DoneReason::Expired, 0, 3)]);
    assert_eq!(
        r.e.balance(AccountId(1), BASE),
        Some((Amount(100), Amount(0)))
    );
    assert_eq!(r.e.next_expiry(), None);
}

#[test]
fn expire_maker_market_buy_walks_past_own_asks() {
    let mut r = Run::new(2, 10_000);
    r.ok(limit(1, Side::Sell, 100, 2)); // order 1: own ask, first in line
    r.ok(limit(2, Side::Sell, 101, 3)); // order 2
    let mut o = order(1, Side::Buy, OrderType::Market { qty: Qty(3) });
    o.stp = StpMode::ExpireMaker;
    let out = r.ok(Command::NewOrder(o));
    // The own ask is expired, and the whole quantity fills at 101 (it used to stop short, out of
    // a hold priced on the own ask, and report Filled with a remainder).
    assert_eq!(
        done(&out),
        vec![
            (1, DoneReason::SelfTrade, 0, 2),
            (2, DoneReason::Filled, 3, 0),
            (3, DoneReason::Filled, 3, 0),
        ]
    );
}

#[test]
fn expire_maker_market_order_with_only_own_liquidity_is_invalid() {
    let mut r = Run::new(1, 10_000);
    r.ok(limit(1, Side::Buy, 100, 2));
    let mut o = order(
        1,
        Side::Sell,
        OrderType::MarketBudget {
            budget: Amount(100),
        },
    );
    o.stp = StpMode::ExpireMaker;
    assert_eq!(
        r.apply(Command::NewOrder(o)).0,
        Err(RejectCode::InvalidOrder)
    );
}

#[test]
fn stop_market_buy_short_of_funds_ends_as_ioc_remainder() {
    let mut r = Run::new(3, 10_000);
    r.ok(limit(1, Side::Sell, 100, 10)); // order 1
    r.ok(Command::Transfer {
        from: AccountId(2),
        to: AccountId(3),
        asset: QUOTE,
        amount: Amount(9_850),
        key: IdempotencyKey([201; 36]),
    });
    // Account 2 has 150: a stop-market buy of 5 at 100 can pay for 1 lot when it triggers.
    r.ok(Command::NewOrder(order(
        2,
        Side::Buy,
        OrderType::StopMarket {
            stop: Price(100),
            qty: Qty(5),
        },
    ))); // order 2
    let out = r.ok(limit(3, Side::Buy, 100, 1)); // order 3 trades at 100 and triggers order 2
    assert!(out
        .iter()
        .any(|e| matches!(e, Event::OrderTriggered { info, .. } if info.order.0 == 2)));
    assert_eq!(
        done(&out),
        vec![
            (3, DoneReason::Filled, 1, 0),
            (2, DoneReason::IocRemainder, 1, 4)
        ]
    );
}
