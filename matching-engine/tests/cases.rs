//! Named case tables: one case per rule, each with its own expected trades, book and balances.
//! Every command goes through `H::cmd`, which checks all invariants after it and, for a rejected
//! command, that the state hash did not change.

use matching_engine::config::{AssetConfig, Limits};
use matching_engine::*;

const BASE: AssetId = AssetId(0);
const QUOTE: AssetId = AssetId(1);
const M: MarketId = MarketId(0);

/// lot 1, tick 1, min notional 1, maker 10 bps, taker 20 bps: fees are easy to compute by hand.
fn config() -> EngineConfig {
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
            base: BASE,
            quote: QUOTE,
            lot_size: 1,
            tick_size: 1,
            min_qty: Qty(1),
            min_notional: Amount(1),
            min_price: Price(1),
            max_price: Price(1_000_000),
            max_qty: Qty(1_000_000),
            maker_fee_bps: 10,
            taker_fee_bps: 20,
        }],
        limits: Limits {
            max_orders_per_book: 1000,
            max_open_orders_per_account: 50,
            max_accounts: 100,
        },
    }
}

struct H {
    e: Engine,
    now: u64,
    keys: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct T {
    price: u64,
    qty: u64,
    maker: OrderId,
    taker: OrderId,
    maker_fee: u64,
    taker_fee: u64,
}

impl H {
    fn new() -> Self {
        Self::with(config())
    }
    fn with(c: EngineConfig) -> Self {
        Self {
            e: Engine::new(c).unwrap(),
            now: 1_000,
            keys: 0,
        }
    }

    fn cmd(&mut self, c: Command) -> Result<Vec<Event>, RejectCode> {
        let before = self.e.state_hash();
        let mut out = Vec::new();
        self.now += 1;
        let r = self.e.apply(&c, Timestamp(self.now), &mut out);
        self.e.check_invariants();
        match r {
            Ok(()) => {
                assert!(
                    matches!(out[0], Event::Accepted { .. }),
                    "first event is Accepted: {out:?}"
                );
                Ok(out)
            }
            Err(code) => {
                assert_eq!(out, vec![Event::Rejected { code }]);
                assert_eq!(
                    before,
                    self.e.state_hash(),
                    "rejected {c:?} changed the state"
                );
                Err(code)
            }
        }
    }

    fn key(&mut self) -> IdempotencyKey {
        self.keys += 1;
        IdempotencyKey::reference(&format!("k{}", self.keys))
    }

    /// A new account with `base` and `quote` credited.
    fn account(&mut self, base: u64, quote: u64) -> AccountId {
        let ev = self.cmd(Command::CreateAccount).unwrap();
        let Event::Accepted {
            account: Some(a), ..
        } = ev[0]
        else {
            panic!("{ev:?}")
        };
        for (asset, amount) in [(BASE, base), (QUOTE, quote)] {
            if amount > 0 {
                let key = self.key();
                self.cmd(Command::Credit {
                    account: a,
                    asset,
                    amount: Amount(amount),
                    key,
                })
                .unwrap();
            }
        }
        a
    }

    fn bal(&self, a: AccountId, asset: AssetId) -> (u64, u64) {
        let (av, h) = self.e.balance(a, asset).unwrap();
        (av.0, h.0)
    }

    fn order(&mut self, o: NewOrder) -> Result<(OrderId, Vec<Event>), RejectCode> {
        let ev = self.cmd(Command::NewOrder(o))?;
        let Event::Accepted {
            order: Some(id), ..
        } = ev[0]
        else {
            panic!("{ev:?}")
        };
        Ok((id, ev))
    }

    fn limit(&mut self, a: AccountId, side: Side, price: u64, qty: u64) -> OrderId {
        self.order(lim(a, side, price, qty)).unwrap().0
    }

    fn book(&self, side: Side) -> Vec<(u64, u64)> {
        self.e
            .book(M)
            .unwrap()
            .levels(side)
            .map(|(p, q)| (p.0, q.0))
            .collect()
    }

    fn queue(&self, price: u64) -> Vec<OrderId> {
        self.e
            .book(M)
            .unwrap()
            .orders_at(Price(price))
            .map(|n| n.id)
            .collect()
    }
}

fn lim(a: AccountId, side: Side, price: u64, qty: u64) -> NewOrder {
    NewOrder {
        account: a,
        market: M,
        side,
        order_type: OrderType::Limit {
            price: Price(price),
            qty: Qty(qty),
        },
        tif: TimeInForce::Gtc,
        post_only: false,
        stp: StpMode::None,
        client_id: None,
    }
}

fn with_tif(mut o: NewOrder, tif: TimeInForce) -> NewOrder {
    o.tif = tif;
    o
}

fn trades(ev: &[Event]) -> Vec<T> {
    ev.iter()
        .filter_map(|e| match *e {
            Event::Trade {
                price,
                qty,
                maker_order,
                taker_order,
                maker_fee,
                taker_fee,
                ..
            } => Some(T {
                price: price.0,
                qty: qty.0,
                maker: maker_order,
                taker: taker_order,
                maker_fee: maker_fee.0,
                taker_fee: taker_fee.0,
            }),
            _ => None,
        })
        .collect()
}

fn done(ev: &[Event]) -> Vec<(OrderId, DoneReason, u64, u64)> {
    ev.iter()
        .filter_map(|e| match *e {
            Event::OrderDone {
                info,
                reason,
                filled,
                remaining,
                ..
            } => Some((info.order, reason, filled.0, remaining.0)),
            _ => None,
        })
        .collect()
}

const FEE: AccountId = FEE_ACCOUNT;

#[test]
fn resting_bid_holds_notional_plus_fee_allowance() {
    let mut h = H::new();
    let a = h.account(0, 10_000);
    h.limit(a, Side::Buy, 100, 10);
    // 1000 notional + 20 bps (the larger fee) = 2.
    assert_eq!(h.bal(a, QUOTE), (10_000 - 1002, 1002));
    assert_eq!(h.book(Side::Buy), vec![(100, 10)]);
}

#[test]
fn full_fill_trades_at_maker_price_and_charges_both_fees() {
    let mut h = H::new();
    let s = h.account(10, 0);
    let b = h.account(0, 10_000);
    let ask = h.limit(s, Side::Sell, 100, 10);
    let (bid, ev) = h.order(lim(b, Side::Buy, 105, 10)).unwrap();
    assert_eq!(
        trades(&ev),
        vec![T {
            price: 100,
            qty: 10,
            maker: ask,
            taker: bid,
            maker_fee: 1,
            taker_fee: 2
        }]
    );
    assert_eq!(
        done(&ev),
        vec![
            (ask, DoneReason::Filled, 10, 0),
            (bid, DoneReason::Filled, 10, 0)
        ]
    );
    assert_eq!(
        h.bal(b, QUOTE),
        (10_000 - 1002, 0),
        "price improvement is released"
    );
    assert_eq!(h.bal(b, BASE), (10, 0));
    assert_eq!(h.bal(s, QUOTE), (999, 0));
    assert_eq!(h.bal(s, BASE), (0, 0));
    assert_eq!(h.bal(FEE, QUOTE), (3, 0));
    assert!(h.book(Side::Buy).is_empty() && h.book(Side::Sell).is_empty());
    assert_eq!(h.e.last_price(M), Some(Price(100)));
}

#[test]
fn partial_fill_rests_the_remainder() {
    let mut h = H::new();
    let s = h.account(5, 0);
    let b = h.account(0, 10_000);
    let ask = h.limit(s, Side::Sell, 100, 5);
    let (bid, ev) = h.order(lim(b, Side::Buy, 100, 10)).unwrap();
    assert_eq!(trades(&ev).len(), 1);
    assert_eq!(trades(&ev)[0].qty, 5);
    assert_eq!(done(&ev), vec![(ask, DoneReason::Filled, 5, 0)]);
    assert_eq!(h.book(Side::Buy), vec![(100, 5)]);
    let o = h.e.order(M, bid).unwrap();
    assert_eq!(
        (o.remaining, o.meta.filled, o.meta.orig_qty),
        (Qty(5), Qty(5), Qty(10))
    );
    // Paid 500 + 1 fee; holds 500 + 1 for the rest.
    assert_eq!(h.bal(b, QUOTE), (10_000 - 501 - 501, 501));
}

#[test]
fn price_then_time_priority() {
    let mut h = H::new();
    let s = h.account(100, 0);
    let b = h.account(0, 100_000);
    let a1 = h.limit(s, Side::Sell, 100, 5);
    let a2 = h.limit(s, Side::Sell, 100, 5);
    let a0 = h.limit(s, Side::Sell, 99, 5);
    let (_, ev) = h.order(lim(b, Side::Buy, 100, 12)).unwrap();
    let t: Vec<_> = trades(&ev)
        .iter()
        .map(|t| (t.maker, t.price, t.qty))
        .collect();
    assert_eq!(t, vec![(a0, 99, 5), (a1, 100, 5), (a2, 100, 2)]);
    assert_eq!(h.queue(100), vec![a2]);
    assert_eq!(h.book(Side::Sell), vec![(100, 3)]);
}

#[test]
fn ioc_cancels_the_remainder() {
    let mut h = H::new();
    let s = h.account(5, 0);
    let b = h.account(0, 10_000);
    h.limit(s, Side::Sell, 100, 5);
    let (id, ev) = h
        .order(with_tif(lim(b, Side::Buy, 100, 10), TimeInForce::Ioc))
        .unwrap();
    assert_eq!(trades(&ev).len(), 1);
    assert!(done(&ev).contains(&(id, DoneReason::IocRemainder, 5, 5)));
    assert!(h.book(Side::Buy).is_empty());
    assert_eq!(h.bal(b, QUOTE), (10_000 - 501, 0));
}

#[test]
fn fok_is_all_or_nothing() {
    let mut h = H::new();
    let s = h.account(20, 0);
    let b = h.account(0, 10_000);
    h.limit(s, Side::Sell, 100, 5);
    h.limit(s, Side::Sell, 101, 4);
    let fok = |q| with_tif(lim(b, Side::Buy, 101, q), TimeInForce::Fok);
    assert_eq!(h.order(fok(10)).unwrap_err(), RejectCode::FokCannotFill);
    let (id, ev) = h.order(fok(9)).unwrap();
    assert_eq!(trades(&ev).iter().map(|t| t.qty).sum::<u64>(), 9);
    assert!(done(&ev).contains(&(id, DoneReason::Filled, 9, 0)));
}

#[test]
fn fok_counts_only_what_self_trade_prevention_lets_it_take() {
    let mut h = H::new();
    let a = h.account(10, 10_000);
    let s = h.account(10, 0);
    h.limit(a, Side::Sell, 100, 5);
    h.limit(s, Side::Sell, 100, 5);
    let mut o = with_tif(lim(a, Side::Buy, 100, 6), TimeInForce::Fok);
    o.stp = StpMode::ExpireMaker;
    assert_eq!(h.order(o).unwrap_err(), RejectCode::FokCannotFill);
    o.order_type = OrderType::Limit {
        price: Price(100),
        qty: Qty(5),
    };
    let (_, ev) = h.order(o).unwrap();
    assert_eq!(trades(&ev).len(), 1);
    assert_eq!(
        done(&ev)
            .iter()
            .filter(|d| d.1 == DoneReason::SelfTrade)
            .count(),
        1
    );
}

#[test]
fn post_only_rejects_when_it_would_take_and_rests_otherwise() {
    let mut h = H::new();
    let s = h.account(5, 0);
    let b = h.account(0, 10_000);
    h.limit(s, Side::Sell, 100, 5);
    let mut o = lim(b, Side::Buy, 100, 1);
    o.post_only = true;
    assert_eq!(h.order(o).unwrap_err(), RejectCode::PostOnlyWouldTake);
    o.order_type = OrderType::Limit {
        price: Price(99),
        qty: Qty(1),
    };
    h.order(o).unwrap();
    assert_eq!(h.book(Side::Buy), vec![(99, 1)]);
    o.tif = TimeInForce::Ioc;
    assert_eq!(h.order(o).unwrap_err(), RejectCode::InvalidOrder);
}

#[test]
fn market_buy_by_quantity_walks_levels_and_holds_exactly() {
    let mut h = H::new();
    let s = h.account(10, 0);
    let b = h.account(0, 10_000);
    h.limit(s, Side::Sell, 100, 5);
    h.limit(s, Side::Sell, 101, 5);
    let mut o = lim(b, Side::Buy, 0, 0);
    o.order_type = OrderType::Market { qty: Qty(7) };
    let (id, ev) = h.order(o).unwrap();
    let t: Vec<_> = trades(&ev)
        .iter()
        .map(|t| (t.price, t.qty, t.taker_fee))
        .collect();
    assert_eq!(t, vec![(100, 5, 1), (101, 2, 0)]);
    assert!(done(&ev).contains(&(id, DoneReason::Filled, 7, 0)));
    assert_eq!(h.bal(b, QUOTE), (10_000 - 500 - 1 - 202, 0));
    assert_eq!(h.bal(b, BASE), (7, 0));
}

#[test]
fn market_buy_without_funds_is_rejected() {
    let mut h = H::new();
    let s = h.account(10, 0);
    let b = h.account(0, 100);
    h.limit(s, Side::Sell, 100, 5);
    let mut o = lim(b, Side::Buy, 0, 0);
    o.order_type = OrderType::Market { qty: Qty(2) };
    assert_eq!(h.order(o).unwrap_err(), RejectCode::InsufficientBalance);
}

#[test]
fn market_buy_by_quote_budget_spends_at_most_the_budget() {
    let mut h = H::new();
    let s = h.account(10, 0);
    let b = h.account(0, 10_000);
    h.limit(s, Side::Sell, 100, 5);
    h.limit(s, Side::Sell, 101, 5);
    let mut o = lim(b, Side::Buy, 0, 0);
    o.order_type = OrderType::MarketBudget {
        budget: Amount(700),
    };
    let (id, ev) = h.order(o).unwrap();
    let t: Vec<_> = trades(&ev).iter().map(|t| (t.price, t.qty)).collect();
    // 5 @ 100 cost 501; 199 left buys 1 @ 101 (101 + fee 0); 98 cannot buy another lot.
    assert_eq!(t, vec![(100, 5), (101, 1)]);
    assert!(done(&ev).contains(&(id, DoneReason::Filled, 6, 0)));
    assert_eq!(h.bal(b, QUOTE), (10_000 - 602, 0));
}

#[test]
fn market_sell_by_quote_budget_sells_enough_to_receive_it() {
    let mut h = H::new();
    let b = h.account(0, 10_000);
    let s = h.account(20, 0);
    h.limit(b, Side::Buy, 100, 5);
    h.limit(b, Side::Buy, 99, 5);
    let mut o = lim(s, Side::Sell, 0, 0);
    o.order_type = OrderType::MarketBudget {
        budget: Amount(650),
    };
    let (_, ev) = h.order(o).unwrap();
    let t: Vec<_> = trades(&ev).iter().map(|t| (t.price, t.qty)).collect();
    assert_eq!(t, vec![(100, 5), (99, 2)]);
    assert_eq!(h.bal(s, BASE), (13, 0));
}

#[test]
fn market_order_with_nothing_to_price_it_is_rejected() {
    let mut h = H::new();
    let b = h.account(0, 10_000);
    let s = h.account(10, 0);
    let mut o = lim(b, Side::Buy, 0, 0);
    o.order_type = OrderType::Market { qty: Qty(3) };
    assert_eq!(h.order(o).unwrap_err(), RejectCode::InvalidOrder);
    let mut o = lim(s, Side::Sell, 0, 0);
    o.order_type = OrderType::MarketBudget {
        budget: Amount(500),
    };
    assert_eq!(h.order(o).unwrap_err(), RejectCode::InvalidOrder);
    assert_eq!(h.bal(b, QUOTE), (10_000, 0));
    assert_eq!(h.bal(s, BASE), (10, 0));
}

#[test]
fn stop_limit_buy_triggers_on_last_trade_price() {
    let mut h = H::new();
    let s = h.account(100, 0);
    let b = h.account(0, 100_000);
    let t = h.account(0, 100_000);
    let mut stop = lim(t, Side::Buy, 0, 0);
    stop.order_type = OrderType::StopLimit {
        stop: Price(105),
        price: Price(106),
        qty: Qty(3),
    };
    let (sid, ev) = h.order(stop).unwrap();
    assert!(trades(&ev).is_empty());
    assert_eq!(
        h.bal(t, QUOTE),
        (100_000 - 318, 318),
        "106 * 3 + fee 0 held"
    );
    h.limit(s, Side::Sell, 106, 5);
    h.limit(s, Side::Sell, 104, 1);
    // A trade at 104 does not reach 105.
    let (_, ev) = h.order(lim(b, Side::Buy, 104, 1)).unwrap();
    assert!(!ev.iter().any(|e| matches!(e, Event::OrderTriggered { .. })));
    h.limit(s, Side::Sell, 105, 1);
    let (_, ev) = h.order(lim(b, Side::Buy, 105, 1)).unwrap();
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::OrderTriggered { info, .. } if info.order == sid)));
    let stop_fills: Vec<_> = trades(&ev)
        .iter()
        .filter(|x| x.taker == sid)
        .map(|x| (x.price, x.qty))
        .collect();
    assert_eq!(stop_fills, vec![(106, 3)]);
    assert_eq!(h.bal(t, BASE), (3, 0));
}

#[test]
fn stop_market_sell_triggers_when_price_falls() {
    let mut h = H::new();
    let b = h.account(0, 100_000);
    let s = h.account(100, 0);
    let t = h.account(10, 0);
    h.limit(b, Side::Buy, 95, 10);
    let mut stop = lim(t, Side::Sell, 0, 0);
    stop.order_type = OrderType::StopMarket {
        stop: Price(96),
        qty: Qty(4),
    };
    let (sid, _) = h.order(stop).unwrap();
    assert_eq!(h.bal(t, BASE), (6, 4));
    h.limit(b, Side::Buy, 96, 1);
    let (_, ev) = h.order(lim(s, Side::Sell, 96, 1)).unwrap();
    let fills: Vec<_> = trades(&ev)
        .iter()
        .filter(|x| x.taker == sid)
        .map(|x| (x.price, x.qty))
        .collect();
    assert_eq!(fills, vec![(95, 4)]);
    assert_eq!(h.bal(t, BASE), (6, 0));
}

#[test]
fn stop_orders_can_be_cancelled_and_release_their_hold() {
    let mut h = H::new();
    let t = h.account(10, 0);
    let mut stop = lim(t, Side::Sell, 0, 0);
    stop.order_type = OrderType::StopLimit {
        stop: Price(90),
        price: Price(89),
        qty: Qty(4),
    };
    let (sid, _) = h.order(stop).unwrap();
    assert_eq!(h.bal(t, BASE), (6, 4));
    assert_eq!(
        h.cmd(Command::Amend {
            account: t,
            market: M,
            order: OrderRef::Id(sid),
            new_price: Some(Price(88)),
            new_qty: None
        })
        .unwrap_err(),
        RejectCode::InvalidAmend
    );
    let ev = h
        .cmd(Command::Cancel {
            account: t,
            market: M,
            order: OrderRef::Id(sid),
        })
        .unwrap();
    assert_eq!(done(&ev), vec![(sid, DoneReason::Cancelled, 0, 4)]);
    assert_eq!(h.bal(t, BASE), (10, 0));
}

fn amend(
    h: &mut H,
    a: AccountId,
    id: OrderId,
    price: Option<u64>,
    qty: Option<u64>,
) -> Result<Vec<Event>, RejectCode> {
    h.cmd(Command::Amend {
        account: a,
        market: M,
        order: OrderRef::Id(id),
        new_price: price.map(Price),
        new_qty: qty.map(Qty),
    })
}

#[test]
fn amend_quantity_down_keeps_priority() {
    let mut h = H::new();
    let a = h.account(0, 10_000);
    let b = h.account(0, 10_000);
    let first = h.limit(a, Side::Buy, 100, 10);
    let second = h.limit(b, Side::Buy, 100, 10);
    let ev = amend(&mut h, a, first, None, Some(4)).unwrap();
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::OrderAmended {
            kept_priority: true,
            ..
        }
    )));
    assert_eq!(h.queue(100), vec![first, second]);
    assert_eq!(h.book(Side::Buy), vec![(100, 14)]);
    // 4 * 100 + fee 0 now held; the rest released.
    assert_eq!(h.bal(a, QUOTE), (10_000 - 400, 400));
}

fn keep_priority(h: &mut H, a: AccountId, id: OrderId, qty: u64) -> Result<Vec<Event>, RejectCode> {
    h.cmd(Command::AmendKeepPriority {
        account: a,
        market: M,
        order: OrderRef::Id(id),
        new_qty: Qty(qty),
    })
}

/// `AmendKeepPriority` checks its condition against the order as it stands when it applies: a
/// quantity not below the current total is refused, never taken as an increase (which would
/// drop the order to the back of its level and hold more). The case of two amends racing in a
/// gateway: the first lowered 10 to 4, the second (checked by the gateway against 10) asks for 8.
#[test]
fn amend_keep_priority_refuses_a_quantity_not_below_the_current_one() {
    let mut h = H::new();
    let a = h.account(0, 10_000);
    let b = h.account(0, 10_000);
    let first = h.limit(a, Side::Buy, 100, 10);
    let second = h.limit(b, Side::Buy, 100, 10);
    let ev = keep_priority(&mut h, a, first, 4).unwrap();
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::OrderAmended {
            kept_priority: true,
            ..
        }
    )));
    for qty in [8, 4, 12] {
        assert_eq!(
            keep_priority(&mut h, a, first, qty).unwrap_err(),
            RejectCode::InvalidAmend,
            "{qty}"
        );
    }
    assert_eq!(
        keep_priority(&mut h, a, first, 0).unwrap_err(),
        RejectCode::ZeroQuantity
    );
    // Nothing changed by the refusals: still first in line, 4 held.
    assert_eq!(h.queue(100), vec![first, second]);
    assert_eq!(h.bal(a, QUOTE), (10_000 - 400, 400));
    // Another account's order is unknown to it.
    assert_eq!(
        keep_priority(&mut h, b, first, 2).unwrap_err(),
        RejectCode::UnknownOrder
    );
}

#[test]
fn amend_quantity_up_or_price_change_loses_priority() {
    let mut h = H::new();
    let a = h.account(0, 10_000);
    let b = h.account(0, 10_000);
    let first = h.limit(a, Side::Buy, 100, 10);
    let second = h.limit(b, Side::Buy, 100, 10);
    let ev = amend(&mut h, a, first, None, Some(12)).unwrap();
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::OrderAmended {
            kept_priority: false,
            ..
        }
    )));
    assert_eq!(h.queue(100), vec![second, first]);
    amend(&mut h, b, second, Some(101), None).unwrap();
    assert_eq!(h.queue(101), vec![second]);
    amend(&mut h, b, second, Some(100), None).unwrap();
    assert_eq!(h.queue(100), vec![first, second]);
}

#[test]
fn amend_to_a_crossing_price_trades() {
    let mut h = H::new();
    let s = h.account(10, 0);
    let b = h.account(0, 10_000);
    let ask = h.limit(s, Side::Sell, 102, 3);
    let bid = h.limit(b, Side::Buy, 100, 5);
    let ev = amend(&mut h, b, bid, Some(102), None).unwrap();
    assert_eq!(
        trades(&ev),
        vec![T {
            price: 102,
            qty: 3,
            maker: ask,
            taker: bid,
            maker_fee: 0,
            taker_fee: 0
        }]
    );
    assert_eq!(h.book(Side::Buy), vec![(102, 2)]);
}

#[test]
fn amend_rejections_change_nothing() {
    let mut h = H::new();
    let s = h.account(10, 0);
    let b = h.account(0, 1_000);
    let bid = h.limit(b, Side::Buy, 50, 5);
    h.limit(s, Side::Sell, 60, 5);
    // Filled quantity is zero: a new total of zero is not above it.
    assert_eq!(
        amend(&mut h, b, bid, None, Some(0)).unwrap_err(),
        RejectCode::ZeroQuantity
    );
    assert_eq!(
        amend(&mut h, b, bid, None, None).unwrap_err(),
        RejectCode::InvalidAmend
    );
    assert_eq!(
        amend(&mut h, b, bid, Some(500), None).unwrap_err(),
        RejectCode::InsufficientBalance
    );
    assert_eq!(
        amend(&mut h, s, bid, Some(40), None).unwrap_err(),
        RejectCode::UnknownOrder
    );
    assert_eq!(
        amend(&mut h, b, OrderId(999), Some(40), None).unwrap_err(),
        RejectCode::UnknownOrder
    );
}

fn stp_case(mode: StpMode) -> (H, AccountId, OrderId, OrderId, Vec<Event>) {
    let mut h = H::new();
    let a = h.account(10, 10_000);
    let other = h.account(10, 0);
    let own_ask = h.limit(a, Side::Sell, 100, 3);
    h.limit(other, Side::Sell, 101, 3);
    let mut o = lim(a, Side::Buy, 101, 4);
    o.stp = mode;
    let (id, ev) = h.order(o).unwrap();
    (h, a, own_ask, id, ev)
}

#[test]
fn stp_none_allows_the_self_trade() {
    let (h, a, own_ask, id, ev) = stp_case(StpMode::None);
    let t: Vec<_> = trades(&ev)
        .iter()
        .map(|t| (t.maker, t.taker, t.qty))
        .collect();
    assert_eq!(t[0], (own_ask, id, 3));
    assert_eq!(t.len(), 2);
    // The account paid both fees of the self-trade: 300 notional, 0 + 0 fees (rounded down).
    assert_eq!(h.bal(a, BASE).0 + h.bal(a, BASE).1, 10 + 1);
}

#[test]
fn stp_expire_taker_keeps_the_maker() {
    let (h, _, own_ask, id, ev) = stp_case(StpMode::ExpireTaker);
    assert!(trades(&ev).is_empty());
    assert_eq!(done(&ev), vec![(id, DoneReason::SelfTrade, 0, 4)]);
    assert_eq!(h.queue(100), vec![own_ask]);
}

#[test]
fn stp_expire_maker_removes_it_and_keeps_matching() {
    let (h, _, own_ask, id, ev) = stp_case(StpMode::ExpireMaker);
    assert_eq!(done(&ev)[0], (own_ask, DoneReason::SelfTrade, 0, 3));
    let t: Vec<_> = trades(&ev).iter().map(|t| (t.price, t.qty)).collect();
    assert_eq!(t, vec![(101, 3)]);
    assert!(h.queue(100).is_empty());
    assert_eq!(h.book(Side::Buy), vec![(101, 1)]);
    assert_eq!(h.e.order(M, id).unwrap().remaining, Qty(1));
}

#[test]
fn stp_expire_both_removes_maker_and_taker() {
    let (h, _, own_ask, id, ev) = stp_case(StpMode::ExpireBoth);
    assert!(trades(&ev).is_empty());
    assert_eq!(
        done(&ev),
        vec![
            (own_ask, DoneReason::SelfTrade, 0, 3),
            (id, DoneReason::SelfTrade, 0, 4)
        ]
    );
    assert!(h.book(Side::Buy).is_empty());
    assert_eq!(h.book(Side::Sell), vec![(101, 3)]);
}

#[test]
fn cancel_releases_and_only_the_owner_can_cancel() {
    let mut h = H::new();
    let a = h.account(0, 10_000);
    let b = h.account(0, 10_000);
    let id = h.limit(a, Side::Buy, 100, 10);
    let c = |acc| Command::Cancel {
        account: acc,
        market: M,
        order: OrderRef::Id(id),
    };
    assert_eq!(h.cmd(c(b)).unwrap_err(), RejectCode::UnknownOrder);
    let ev = h.cmd(c(a)).unwrap();
    assert_eq!(done(&ev), vec![(id, DoneReason::Cancelled, 0, 10)]);
    assert_eq!(h.bal(a, QUOTE), (10_000, 0));
    assert_eq!(h.cmd(c(a)).unwrap_err(), RejectCode::UnknownOrder);
}

#[test]
fn cancel_all_cancels_every_open_order_of_the_account_only() {
    let mut h = H::new();
    let a = h.account(10, 10_000);
    let b = h.account(0, 10_000);
    let o1 = h.limit(a, Side::Buy, 90, 1);
    let o2 = h.limit(a, Side::Sell, 110, 2);
    let other = h.limit(b, Side::Buy, 90, 1);
    let ev = h
        .cmd(Command::CancelAll {
            account: a,
            market: Some(M),
        })
        .unwrap();
    let ids: Vec<_> = done(&ev).iter().map(|d| d.0).collect();
    assert_eq!(ids, vec![o1, o2]);
    assert_eq!(h.queue(90), vec![other]);
    assert_eq!(h.bal(a, QUOTE), (10_000, 0));
    assert_eq!(h.bal(a, BASE), (10, 0));
    assert_eq!(
        h.cmd(Command::CancelAll {
            account: a,
            market: Some(MarketId(7))
        })
        .unwrap_err(),
        RejectCode::UnknownMarket
    );
}

#[test]
fn client_order_ids_are_unique_among_open_orders() {
    let mut h = H::new();
    let a = h.account(0, 10_000);
    let b = h.account(0, 10_000);
    let cid = ClientOrderId::new("my-order-1").unwrap();
    let mut o = lim(a, Side::Buy, 100, 1);
    o.client_id = Some(cid);
    let (id, _) = h.order(o).unwrap();
    assert_eq!(h.order(o).unwrap_err(), RejectCode::DuplicateClientId);
    // Another account may use the same id.
    let mut ob = o;
    ob.account = b;
    h.order(ob).unwrap();
    let ev = h
        .cmd(Command::Cancel {
            account: a,
            market: M,
            order: OrderRef::Client(cid),
        })
        .unwrap();
    assert_eq!(done(&ev)[0].0, id);
    // Free again once the order is closed.
    h.order(o).unwrap();
}

#[test]
fn gtd_orders_expire_at_their_time() {
    let mut h = H::new();
    let a = h.account(0, 10_000);
    let t = h.now + 100;
    let (id, _) = h
        .order(with_tif(
            lim(a, Side::Buy, 100, 1),
            TimeInForce::Gtd(Timestamp(t)),
        ))
        .unwrap();
    assert_eq!(h.e.next_expiry(), Some(Timestamp(t)));
    let mut out = vec![];
    h.e.apply(&Command::Tick, Timestamp(t - 1), &mut out)
        .unwrap();
    assert!(h.e.order(M, id).is_some());
    out.clear();
    h.e.apply(&Command::Tick, Timestamp(t), &mut out).unwrap();
    assert_eq!(done(&out), vec![(id, DoneReason::Expired, 0, 1)]);
    assert_eq!(h.bal(a, QUOTE), (10_000, 0));
    h.e.check_invariants();
    h.now = t;
    let past = with_tif(lim(a, Side::Buy, 100, 1), TimeInForce::Gtd(Timestamp(t)));
    assert_eq!(h.order(past).unwrap_err(), RejectCode::InvalidOrder);
}

#[test]
fn expiry_happens_before_a_rejected_command_and_is_journaled() {
    let mut h = H::new();
    let a = h.account(0, 10_000);
    let t = h.now + 10;
    h.order(with_tif(
        lim(a, Side::Buy, 100, 1),
        TimeInForce::Gtd(Timestamp(t)),
    ))
    .unwrap();
    let seq = h.e.seq();
    let mut out = vec![];
    let r = h.e.apply(
        &Command::Cancel {
            account: a,
            market: M,
            order: OrderRef::Id(OrderId(999)),
        },
        Timestamp(t + 5),
        &mut out,
    );
    assert_eq!(r, Err(RejectCode::UnknownOrder));
    assert_eq!(
        h.e.seq(),
        seq + 1,
        "the expiry changed the state, so the command must be journaled"
    );
    assert!(matches!(out.last(), Some(Event::Rejected { .. })));
    assert!(out.iter().any(|e| matches!(
        e,
        Event::OrderDone {
            reason: DoneReason::Expired,
            ..
        }
    )));
}

#[test]
fn order_validation_table() {
    let mut h = H::new();
    let a = h.account(10, 1_000);
    let cases: Vec<(&str, NewOrder, RejectCode)> = vec![
        (
            "zero quantity",
            lim(a, Side::Buy, 100, 0),
            RejectCode::ZeroQuantity,
        ),
        (
            "zero price",
            lim(a, Side::Buy, 0, 1),
            RejectCode::PriceOffTick,
        ),
        (
            "above the band",
            lim(a, Side::Buy, 1_000_001, 1),
            RejectCode::OutsidePriceBand,
        ),
        (
            "above max qty",
            lim(a, Side::Sell, 1, 1_000_001),
            RejectCode::QtyOffLot,
        ),
        (
            "insufficient quote",
            lim(a, Side::Buy, 100, 10),
            RejectCode::InsufficientBalance,
        ),
        (
            "insufficient base",
            lim(a, Side::Sell, 100, 11),
            RejectCode::InsufficientBalance,
        ),
        (
            "unknown market",
            NewOrder {
                market: MarketId(3),
                ..lim(a, Side::Buy, 1, 1)
            },
            RejectCode::UnknownMarket,
        ),
        (
            "unknown account",
            lim(AccountId(77), Side::Buy, 1, 1),
            RejectCode::UnknownAccount,
        ),
        (
            "fee account",
            lim(FEE, Side::Buy, 1, 1),
            RejectCode::FeeAccount,
        ),
        (
            "fok market",
            with_tif(
                NewOrder {
                    order_type: OrderType::Market { qty: Qty(1) },
                    ..lim(a, Side::Buy, 1, 1)
                },
                TimeInForce::Fok,
            ),
            RejectCode::InvalidOrder,
        ),
        (
            "post-only market",
            NewOrder {
                order_type: OrderType::Market { qty: Qty(1) },
                post_only: true,
                ..lim(a, Side::Sell, 1, 1)
            },
            RejectCode::InvalidOrder,
        ),
        (
            "zero budget",
            NewOrder {
                order_type: OrderType::MarketBudget { budget: Amount(0) },
                ..lim(a, Side::Buy, 1, 1)
            },
            RejectCode::ZeroQuantity,
        ),
        (
            "stop price zero",
            NewOrder {
                order_type: OrderType::StopMarket {
                    stop: Price(0),
                    qty: Qty(1),
                },
                ..lim(a, Side::Sell, 1, 1)
            },
            RejectCode::PriceOffTick,
        ),
    ];
    for (name, o, code) in cases {
        assert_eq!(h.order(o).map(|_| ()), Err(code), "case {name}");
    }
    let mut strict = config();
    strict.markets[0].min_notional = Amount(1_000);
    strict.markets[0].min_qty = Qty(2);
    let mut h = H::with(strict);
    let a = h.account(10, 100_000);
    assert_eq!(
        h.order(lim(a, Side::Buy, 100, 9)).map(|_| ()),
        Err(RejectCode::BelowMinNotional)
    );
    assert_eq!(
        h.order(lim(a, Side::Buy, 1000, 1)).map(|_| ()),
        Err(RejectCode::QtyOffLot)
    );
}

#[test]
fn account_and_book_order_limits() {
    let mut c = config();
    c.limits.max_open_orders_per_account = 2;
    c.limits.max_orders_per_book = 3;
    let mut h = H::with(c);
    let a = h.account(0, 100_000);
    let b = h.account(0, 100_000);
    h.limit(a, Side::Buy, 10, 1);
    h.limit(a, Side::Buy, 11, 1);
    assert_eq!(
        h.order(lim(a, Side::Buy, 12, 1)).map(|_| ()),
        Err(RejectCode::AccountOrderLimit)
    );
    // An IOC never rests, so the limit does not apply to it.
    h.order(with_tif(lim(a, Side::Buy, 12, 1), TimeInForce::Ioc))
        .unwrap();
    h.limit(b, Side::Buy, 9, 1);
    assert_eq!(
        h.order(lim(b, Side::Buy, 8, 1)).map(|_| ()),
        Err(RejectCode::BookFull)
    );
}

#[test]
fn credit_is_idempotent_by_key() {
    let mut h = H::new();
    let a = h.account(0, 0);
    let key = IdempotencyKey::outpoint([7; 32], 1);
    let c = Command::Credit {
        account: a,
        asset: BASE,
        amount: Amount(500),
        key,
    };
    h.cmd(c.clone()).unwrap();
    let seq = h.e.seq();
    let ev = h.cmd(c).unwrap();
    assert!(matches!(
        ev[0],
        Event::Accepted {
            duplicate: true,
            ..
        }
    ));
    assert_eq!(ev.len(), 1);
    assert_eq!(h.e.seq(), seq, "a duplicate is not a new state");
    assert_eq!(h.bal(a, BASE), (500, 0));
    assert_eq!(h.e.asset_totals(BASE).credited, 500);
    // The key names that credit: the same key with other terms (account, asset, amount) is
    // refused and credits nothing (it was a duplicate, answered as if those terms were done).
    let other = h.account(0, 0);
    for (account, asset, amount) in [(a, BASE, 501), (other, BASE, 500), (a, QUOTE, 500)] {
        assert_eq!(
            h.cmd(Command::Credit {
                account,
                asset,
                amount: Amount(amount),
                key,
            })
            .unwrap_err(),
            RejectCode::CreditKeyReused
        );
    }
    assert_eq!(h.bal(a, BASE), (500, 0));
    assert_eq!(h.bal(a, QUOTE), (0, 0));
    assert_eq!(h.bal(other, BASE), (0, 0));
    assert_eq!(h.e.asset_totals(BASE).credited, 500);
    for (name, cmd, code) in [
        (
            "zero",
            Command::Credit {
                account: a,
                asset: BASE,
                amount: Amount(0),
                key: h.key(),
            },
            RejectCode::ZeroQuantity,
        ),
        (
            "asset",
            Command::Credit {
                account: a,
                asset: AssetId(9),
                amount: Amount(1),
                key: h.key(),
            },
            RejectCode::UnknownAsset,
        ),
        (
            "account",
            Command::Credit {
                account: AccountId(50),
                asset: BASE,
                amount: Amount(1),
                key: h.key(),
            },
            RejectCode::UnknownAccount,
        ),
        (
            "overflow",
            Command::Credit {
                account: a,
                asset: BASE,
                amount: Amount(u64::MAX),
                key: h.key(),
            },
            RejectCode::InvalidAmount,
        ),
    ] {
        assert_eq!(h.cmd(cmd).map(|_| ()), Err(code), "case {name}");
    }
}

#[test]
fn withdrawal_hold_release_and_complete() {
    let mut h = H::new();
    let a = h.account(10_000, 0);
    let hold = |id, amount| Command::WithdrawHold {
        account: a,
        asset: BASE,
        amount: Amount(amount),
        fee: Amount(100),
        id: WithdrawalId(id),
    };
    h.cmd(hold(1, 3_000)).unwrap();
    assert_eq!(h.bal(a, BASE), (6_900, 3_100));
    assert_eq!(
        h.cmd(hold(1, 1)).unwrap_err(),
        RejectCode::DuplicateWithdrawal
    );
    assert_eq!(
        h.cmd(hold(2, 6_850)).unwrap_err(),
        RejectCode::InsufficientBalance
    );
    h.cmd(Command::WithdrawRelease {
        id: WithdrawalId(1),
    })
    .unwrap();
    assert_eq!(h.bal(a, BASE), (10_000, 0));
    assert_eq!(
        h.cmd(Command::WithdrawRelease {
            id: WithdrawalId(1)
        })
        .unwrap_err(),
        RejectCode::UnknownWithdrawal
    );
    assert_eq!(
        h.cmd(hold(1, 5)).unwrap_err(),
        RejectCode::DuplicateWithdrawal,
        "ids are never reused"
    );
    h.cmd(hold(2, 4_000)).unwrap();
    assert_eq!(
        h.cmd(Command::WithdrawComplete {
            id: WithdrawalId(2),
            network_fee: Amount(101)
        })
        .unwrap_err(),
        RejectCode::InvalidAmount
    );
    h.cmd(Command::WithdrawComplete {
        id: WithdrawalId(2),
        network_fee: Amount(30),
    })
    .unwrap();
    assert_eq!(h.bal(a, BASE), (5_900, 0));
    assert_eq!(h.bal(FEE, BASE), (70, 0));
    let t = h.e.asset_totals(BASE);
    assert_eq!((t.credited, t.withdrawn), (10_000, 4_030));
    assert_eq!(
        h.cmd(Command::WithdrawComplete {
            id: WithdrawalId(2),
            network_fee: Amount(0)
        })
        .unwrap_err(),
        RejectCode::UnknownWithdrawal
    );
}

/// Custody resolves an unknown outcome by asking: the engine remembers every withdrawal it held
/// (held, released or completed, with account and amounts), and the query changes nothing.
#[test]
fn withdrawal_status_answers_the_record_and_changes_nothing() {
    let mut h = H::new();
    let a = h.account(10_000, 0);
    let query = |h: &mut H, id| {
        let before = (h.e.state_hash(), h.e.seq(), h.e.now());
        let mut out = Vec::new();
        h.e.apply(
            &Command::WithdrawalStatus {
                id: WithdrawalId(id),
            },
            Timestamp(h.now + 1_000_000),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            (h.e.state_hash(), h.e.seq(), h.e.now()),
            before,
            "a query moves neither state, seq nor time"
        );
        match out.as_slice() {
            [Event::WithdrawalStatus {
                id: got,
                withdrawal,
            }] => {
                assert_eq!(*got, WithdrawalId(id));
                withdrawal.map(|w| (w.account, w.amount.0, w.fee.0, w.state))
            }
            other => panic!("one answer expected: {other:?}"),
        }
    };
    assert_eq!(query(&mut h, 1), None, "never seen");
    let hold = |id, amount| Command::WithdrawHold {
        account: a,
        asset: BASE,
        amount: Amount(amount),
        fee: Amount(100),
        id: WithdrawalId(id),
    };
    h.cmd(hold(1, 3_000)).unwrap();
    h.cmd(hold(2, 2_000)).unwrap();
    assert_eq!(
        query(&mut h, 1),
        Some((a, 3_000, 100, WithdrawalState::Held))
    );
    h.cmd(Command::WithdrawRelease {
        id: WithdrawalId(1),
    })
    .unwrap();
    h.cmd(Command::WithdrawComplete {
        id: WithdrawalId(2),
        network_fee: Amount(10),
    })
    .unwrap();
    assert_eq!(
        query(&mut h, 1),
        Some((a, 3_000, 100, WithdrawalState::Released))
    );
    assert_eq!(
        query(&mut h, 2),
        Some((a, 2_000, 100, WithdrawalState::Completed))
    );
    // The records survive a snapshot.
    let restored = Engine::from_snapshot(h.e.snapshot()).unwrap();
    assert_eq!(
        restored.withdrawal(WithdrawalId(1)).map(|w| w.state),
        Some(WithdrawalState::Released)
    );
}

#[test]
fn transfers_move_available_funds_once() {
    let mut h = H::new();
    let a = h.account(0, 1_000);
    let b = h.account(0, 0);
    let key = h.key();
    let t = |amount| Command::Transfer {
        from: a,
        to: b,
        asset: QUOTE,
        amount: Amount(amount),
        key,
    };
    h.cmd(t(400)).unwrap();
    let ev = h.cmd(t(400)).unwrap();
    assert!(matches!(
        ev[0],
        Event::Accepted {
            duplicate: true,
            ..
        }
    ));
    assert_eq!(h.bal(a, QUOTE), (600, 0));
    assert_eq!(h.bal(b, QUOTE), (400, 0));
    let k2 = h.key();
    assert_eq!(
        h.cmd(Command::Transfer {
            from: a,
            to: b,
            asset: QUOTE,
            amount: Amount(601),
            key: k2
        })
        .unwrap_err(),
        RejectCode::InsufficientBalance
    );
    assert_eq!(
        h.cmd(Command::Transfer {
            from: a,
            to: a,
            asset: QUOTE,
            amount: Amount(1),
            key: k2
        })
        .unwrap_err(),
        RejectCode::SelfTransfer
    );
    // The key names that transfer: the same key with other terms moves nothing.
    for (to, asset, amount) in [(b, QUOTE, 300), (a, QUOTE, 400), (b, BASE, 400)] {
        let other = h.account(0, 0);
        let to = if to == a { other } else { to };
        assert_eq!(
            h.cmd(Command::Transfer {
                from: a,
                to,
                asset,
                amount: Amount(amount),
                key,
            })
            .unwrap_err(),
            RejectCode::TransferKeyReused
        );
    }
    // Held funds cannot be transferred.
    h.limit(a, Side::Buy, 100, 5);
    assert_eq!(
        h.cmd(Command::Transfer {
            from: a,
            to: b,
            asset: QUOTE,
            amount: Amount(200),
            key: k2
        })
        .unwrap_err(),
        RejectCode::InsufficientBalance
    );
}

#[test]
fn depth_diffs_are_gap_free_and_rebuild_the_book() {
    let mut h = H::new();
    let s = h.account(100, 0);
    let b = h.account(0, 100_000);
    let mut levels: std::collections::BTreeMap<(bool, u64), u64> = Default::default();
    let mut last_seq = h.e.depth_seq(M);
    let mut apply = |h: &mut H, c: Command| {
        let ev = h.cmd(c);
        for e in ev.iter().flatten() {
            if let Event::Depth {
                seq,
                side,
                price,
                qty,
                ..
            } = *e
            {
                assert_eq!(seq, last_seq + 1, "gap in depth sequence");
                last_seq = seq;
                if qty.is_zero() {
                    levels.remove(&(side == Side::Buy, price.0));
                } else {
                    levels.insert((side == Side::Buy, price.0), qty.0);
                }
            }
        }
        let mut want: std::collections::BTreeMap<(bool, u64), u64> = Default::default();
        for side in [Side::Buy, Side::Sell] {
            for (p, q) in h.book(side) {
                want.insert((side == Side::Buy, p), q);
            }
        }
        assert_eq!(levels, want);
    };
    for (side, acc, price, qty) in [
        (Side::Sell, s, 105, 3),
        (Side::Sell, s, 104, 2),
        (Side::Buy, b, 100, 4),
        (Side::Buy, b, 104, 4),
        (Side::Buy, b, 106, 6),
        (Side::Sell, s, 99, 10),
    ] {
        apply(&mut h, Command::NewOrder(lim(acc, side, price, qty)));
    }
    apply(
        &mut h,
        Command::CancelAll {
            account: b,
            market: None,
        },
    );
}

#[test]
fn snapshot_restores_the_same_state_and_continues_identically() {
    let mut h = H::new();
    let s = h.account(100, 0);
    let b = h.account(0, 100_000);
    h.limit(s, Side::Sell, 105, 3);
    h.limit(b, Side::Buy, 100, 4);
    let mut o = lim(b, Side::Buy, 101, 2);
    o.client_id = Some(ClientOrderId::new("c1").unwrap());
    o.tif = TimeInForce::Gtd(Timestamp(h.now + 1_000));
    h.order(o).unwrap();
    let mut stop = lim(s, Side::Sell, 0, 0);
    stop.order_type = OrderType::StopLimit {
        stop: Price(99),
        price: Price(98),
        qty: Qty(2),
    };
    h.order(stop).unwrap();
    let snap = h.e.snapshot();
    let bytes = postcard::to_stdvec(&snap).unwrap();
    let mut r = Engine::from_snapshot(postcard::from_bytes(&bytes).unwrap()).unwrap();
    r.check_invariants();
    assert_eq!(r.state_hash(), h.e.state_hash());
    for c in [
        Command::NewOrder(lim(s, Side::Sell, 100, 5)),
        Command::Cancel {
            account: b,
            market: M,
            order: OrderRef::Client(ClientOrderId::new("c1").unwrap()),
        },
        Command::Tick,
    ] {
        let (mut x, mut y) = (vec![], vec![]);
        let t = Timestamp(h.now + 5_000);
        assert_eq!(h.e.apply(&c, t, &mut x), r.apply(&c, t, &mut y));
        assert_eq!(x, y);
        assert_eq!(h.e.state_hash(), r.state_hash());
    }
}

#[test]
fn default_config_is_btcusd_with_sane_units() {
    let c = EngineConfig::default();
    c.validate().unwrap();
    assert_eq!(c.markets.len(), 1);
    let m = &c.markets[0];
    assert_eq!(m.symbol, "BTCUSD");
    // 1 BTC = 100,000 lots; at 50,000.00 USD (5,000,000 ticks) it costs 50,000 USD in 1e-8 units.
    assert_eq!(
        m.notional(Price(5_000_000), Qty(100_000)),
        Some(Amount(50_000 * 100_000_000))
    );
    assert_eq!(m.base_amount(Qty(100_000)), Some(Amount(100_000_000)));
}

/// Reconciliation asks whether a credit key was applied; the query changes nothing.
#[test]
fn credit_status_answers_whether_a_key_was_credited() {
    let mut h = H::new();
    let a = h.account(0, 0);
    let key = h.key();
    let query = |h: &mut H, key| {
        let before = (h.e.state_hash(), h.e.seq(), h.e.now());
        let mut out = Vec::new();
        h.e.apply(
            &Command::CreditStatus { key },
            Timestamp(h.now + 1_000_000),
            &mut out,
        )
        .unwrap();
        assert_eq!((h.e.state_hash(), h.e.seq(), h.e.now()), before);
        match out.as_slice() {
            [Event::CreditStatus { key: k, credited }] if *k == key => *credited,
            other => panic!("one answer expected: {other:?}"),
        }
    };
    assert!(!query(&mut h, key));
    h.cmd(Command::Credit {
        account: a,
        asset: BASE,
        amount: Amount(5),
        key,
    })
    .unwrap();
    assert!(query(&mut h, key));
}

/// Take-profit orders (issue 9): the mirror of the stops. One row per case: the order's side and
/// type, the trades that happen before, and whether it has triggered after each.
#[test]
fn take_profit_orders_trigger_on_the_mirror_side_of_stops() {
    struct Case {
        name: &'static str,
        side: Side,
        limit: Option<u64>,
        stop: u64,
        /// Last trade prices made one after the other, and whether the order has triggered
        /// after each.
        path: &'static [(u64, bool)],
    }
    let cases = [
        Case {
            name: "take-profit sell triggers when the price rises to the stop",
            side: Side::Sell,
            limit: None,
            stop: 110,
            path: &[(100, false), (109, false), (110, true)],
        },
        Case {
            name: "take-profit-limit sell triggers above the stop too",
            side: Side::Sell,
            limit: Some(108),
            stop: 110,
            path: &[(105, false), (112, true)],
        },
        Case {
            name: "take-profit sell does not trigger on a fall",
            side: Side::Sell,
            limit: None,
            stop: 110,
            path: &[(100, false), (90, false), (80, false)],
        },
        Case {
            name: "take-profit buy triggers when the price falls to the stop",
            side: Side::Buy,
            limit: None,
            stop: 90,
            path: &[(100, false), (91, false), (90, true)],
        },
        Case {
            name: "take-profit-limit buy triggers below the stop too",
            side: Side::Buy,
            limit: Some(92),
            stop: 90,
            path: &[(95, false), (85, true)],
        },
        Case {
            name: "take-profit buy does not trigger on a rise",
            side: Side::Buy,
            limit: Some(92),
            stop: 90,
            path: &[(95, false), (120, false)],
        },
    ];
    for c in cases {
        let mut h = H::new();
        let mm = h.account(1_000, 1_000_000);
        let t = h.account(10, 100_000);
        // Prices are made by a pair of crossing orders of the market maker; liquidity for the
        // triggered order rests far away on its other side.
        let (first, _) = c.path[0];
        h.limit(mm, Side::Buy, first, 1);
        h.order(lim(mm, Side::Sell, first, 1)).unwrap();
        let mut o = lim(t, c.side, 0, 0);
        o.order_type = match c.limit {
            Some(price) => OrderType::TakeProfitLimit {
                stop: Price(c.stop),
                price: Price(price),
                qty: Qty(2),
            },
            None => OrderType::TakeProfitMarket {
                stop: Price(c.stop),
                qty: Qty(2),
            },
        };
        let (id, ev) = h.order(o).unwrap();
        assert!(
            !ev.iter().any(|e| matches!(e, Event::OrderTriggered { .. })),
            "{}: triggered at once",
            c.name
        );
        let view = h.e.order(M, id).unwrap();
        assert_eq!(view.stop, Some(Price(c.stop)), "{}", c.name);
        let held = match c.side {
            Side::Sell => (8, 2),
            Side::Buy => {
                let q = c.limit.map_or(0, |p| p * 2 + p * 2 * 10 / 10_000);
                (100_000 - q, q)
            }
        };
        let asset = if c.side == Side::Sell { BASE } else { QUOTE };
        assert_eq!(h.bal(t, asset), held, "{}: hold", c.name);
        let mut triggered = false;
        for &(price, expect) in &c.path[1..] {
            h.limit(mm, Side::Buy, price, 1);
            let (_, ev) = h.order(lim(mm, Side::Sell, price, 1)).unwrap();
            if ev
                .iter()
                .any(|e| matches!(e, Event::OrderTriggered { info, .. } if info.order == id))
            {
                triggered = true;
            }
            assert_eq!(triggered, expect, "{}: after a trade at {price}", c.name);
            assert_eq!(h.e.order(M, id).is_some(), !triggered || c.limit.is_some());
        }
    }
}

#[test]
fn triggered_take_profit_market_sell_trades_and_take_profit_limit_rests() {
    let mut h = H::new();
    let mm = h.account(1_000, 1_000_000);
    let t = h.account(10, 0);
    h.limit(mm, Side::Buy, 100, 1);
    h.order(lim(mm, Side::Sell, 100, 1)).unwrap();
    // Equal trigger prices go in time order: the limit one first (it rests and does not move
    // the price), then the market one.
    let mut tpl = lim(t, Side::Sell, 0, 0);
    tpl.order_type = OrderType::TakeProfitLimit {
        stop: Price(110),
        price: Price(130),
        qty: Qty(2),
    };
    let (tpl_id, _) = h.order(tpl).unwrap();
    let mut tp = lim(t, Side::Sell, 0, 0);
    tp.order_type = OrderType::TakeProfitMarket {
        stop: Price(110),
        qty: Qty(3),
    };
    let (tp_id, _) = h.order(tp).unwrap();
    assert_eq!(h.bal(t, BASE), (5, 5));
    // Bids for the triggered market sell, then a trade at 110.
    h.limit(mm, Side::Buy, 105, 10);
    h.limit(mm, Side::Buy, 110, 1);
    let (_, ev) = h.order(lim(mm, Side::Sell, 110, 1)).unwrap();
    let fills: Vec<_> = trades(&ev)
        .iter()
        .filter(|x| x.taker == tp_id)
        .map(|x| (x.price, x.qty))
        .collect();
    assert_eq!(fills, vec![(105, 3)]);
    // The limit one rests at 130, holding its 2 lots.
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::OrderTriggered { info, .. } if info.order == tpl_id)));
    assert_eq!(h.book(Side::Sell), vec![(130, 2)]);
    assert_eq!(h.bal(t, BASE), (5, 2));
    // A snapshot round trip keeps everything.
    let again = Engine::from_snapshot(h.e.snapshot()).unwrap();
    assert_eq!(again.state_hash(), h.e.state_hash());
}

#[test]
fn take_profit_validation_is_the_stops() {
    let mut h = H::new();
    let t = h.account(10, 1_000);
    let tp = |order_type, tif| {
        let mut o = with_tif(lim(t, Side::Buy, 0, 0), tif);
        o.order_type = order_type;
        o
    };
    let cases = [
        (
            "zero stop",
            tp(
                OrderType::TakeProfitMarket {
                    stop: Price(0),
                    qty: Qty(1),
                },
                TimeInForce::Gtc,
            ),
            RejectCode::PriceOffTick,
        ),
        (
            "zero quantity",
            tp(
                OrderType::TakeProfitLimit {
                    stop: Price(10),
                    price: Price(10),
                    qty: Qty(0),
                },
                TimeInForce::Gtc,
            ),
            RejectCode::ZeroQuantity,
        ),
        (
            "fill or kill",
            tp(
                OrderType::TakeProfitLimit {
                    stop: Price(10),
                    price: Price(10),
                    qty: Qty(1),
                },
                TimeInForce::Fok,
            ),
            RejectCode::InvalidOrder,
        ),
        (
            "more than the account has",
            tp(
                OrderType::TakeProfitLimit {
                    stop: Price(10),
                    price: Price(100),
                    qty: Qty(10),
                },
                TimeInForce::Gtc,
            ),
            RejectCode::InsufficientBalance,
        ),
    ];
    for (name, o, code) in cases {
        assert_eq!(h.order(o).unwrap_err(), code, "{name}");
    }
}

// ---- Order lists (OCO), issue 9 ----

fn leg(a: AccountId, side: Side, order_type: OrderType) -> NewOrder {
    let mut o = lim(a, side, 0, 0);
    o.order_type = order_type;
    if matches!(order_type, OrderType::Limit { .. }) {
        o.post_only = true;
    }
    o
}

fn maker(a: AccountId, side: Side, price: u64, qty: u64) -> NewOrder {
    leg(
        a,
        side,
        OrderType::Limit {
            price: Price(price),
            qty: Qty(qty),
        },
    )
}

fn stop_limit(a: AccountId, side: Side, stop: u64, price: u64, qty: u64) -> NewOrder {
    leg(
        a,
        side,
        OrderType::StopLimit {
            stop: Price(stop),
            price: Price(price),
            qty: Qty(qty),
        },
    )
}

fn stop_market(a: AccountId, side: Side, stop: u64, qty: u64) -> NewOrder {
    leg(
        a,
        side,
        OrderType::StopMarket {
            stop: Price(stop),
            qty: Qty(qty),
        },
    )
}

impl H {
    /// Places an OCO `[above, below]`; returns the two leg ids and the list id.
    fn oco(
        &mut self,
        above: NewOrder,
        below: NewOrder,
    ) -> Result<([OrderId; 2], ListId), RejectCode> {
        let ev = self.cmd(Command::NewOco(Box::new(NewOco {
            legs: [above, below],
            list_client_id: None,
        })))?;
        let (list, legs) = ev
            .iter()
            .find_map(|e| match *e {
                Event::OrderListNew { list, legs, .. } => Some((list, legs)),
                _ => None,
            })
            .expect("OrderListNew");
        assert_eq!(self.e.order_list(list).unwrap().legs, legs);
        for l in legs {
            assert_eq!(self.e.order(M, l).unwrap().list, Some(list));
        }
        Ok((legs, list))
    }

    /// Makes a trade at `price` between two orders of `mm`'s (self-trades allowed: STP none).
    fn print(&mut self, mm: AccountId, price: u64) -> Vec<Event> {
        self.limit(mm, Side::Buy, price, 1);
        self.order(lim(mm, Side::Sell, price, 1)).unwrap().1
    }
}

fn list_done(ev: &[Event], list: ListId) -> bool {
    ev.iter()
        .any(|e| matches!(e, Event::OrderListDone { list: l, .. } if *l == list))
}

fn done_reason(ev: &[Event], id: OrderId) -> Option<DoneReason> {
    ev.iter().find_map(|e| match e {
        Event::OrderDone { info, reason, .. } if info.order == id => Some(*reason),
        _ => None,
    })
}

#[test]
fn oco_sell_holds_its_quantity_once() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    // Exactly 5 lots: enough for the pair, since it holds once.
    let t = h.account(5, 0);
    let ([a, b], list) = h
        .oco(
            maker(t, Side::Sell, 110, 5),
            stop_limit(t, Side::Sell, 90, 89, 5),
        )
        .unwrap();
    assert_eq!(h.bal(t, BASE), (0, 5));
    assert_eq!(h.e.open_orders(t, None).len(), 2);
    assert_eq!(h.book(Side::Sell), vec![(110, 5)]);
    assert_eq!(h.e.order(M, b).unwrap().stop, Some(Price(90)));
    assert!(h.e.order_list(list).is_some());
    let _ = a;
    // One lot short: refused, nothing changed (H::cmd checks the state hash).
    let poor = h.account(4, 0);
    assert_eq!(
        h.oco(
            maker(poor, Side::Sell, 110, 5),
            stop_limit(poor, Side::Sell, 90, 89, 5)
        )
        .unwrap_err(),
        RejectCode::InsufficientBalance
    );
}

#[test]
fn oco_buy_holds_the_larger_of_its_legs() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    let t = h.account(0, 10_000);
    // Below: a limit maker buy at 90 (cost 450 + fee 0 = 450); above: a stop-limit buy at
    // 110 limit 120 (600 + 1 = 601 with the 20 bps allowance).
    h.oco(
        stop_limit(t, Side::Buy, 110, 120, 5),
        maker(t, Side::Buy, 90, 5),
    )
    .unwrap();
    assert_eq!(h.bal(t, QUOTE), (10_000 - 601, 601));
    // A stop-market above needs nothing until it triggers: the maker's 450 is the larger.
    let u = h.account(0, 10_000);
    h.oco(
        stop_market(u, Side::Buy, 110, 5),
        maker(u, Side::Buy, 90, 5),
    )
    .unwrap();
    assert_eq!(h.bal(u, QUOTE), (10_000 - 450, 450));
}

#[test]
fn oco_fill_of_the_limit_leg_cancels_the_stop_leg() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    let t = h.account(5, 0);
    let ([a, b], list) = h
        .oco(
            maker(t, Side::Sell, 110, 5),
            stop_limit(t, Side::Sell, 90, 89, 5),
        )
        .unwrap();
    // A partial fill: the stop leg is cancelled, the limit leg keeps resting alone.
    let (_, ev) = h.order(lim(mm, Side::Buy, 110, 2)).unwrap();
    assert_eq!(done_reason(&ev, b), Some(DoneReason::Cancelled));
    assert!(list_done(&ev, list));
    assert!(h.e.order_list(list).is_none());
    let v = h.e.order(M, a).unwrap();
    assert_eq!((v.remaining, v.list), (Qty(3), None));
    assert_eq!(h.bal(t, BASE), (0, 3));
    // A price fall no longer triggers anything of t's.
    let ev = h.print(mm, 80);
    assert!(!ev.iter().any(|e| matches!(e, Event::OrderTriggered { .. })));
    // The rest fills as a lone order.
    h.order(lim(mm, Side::Buy, 110, 3)).unwrap();
    assert_eq!(h.bal(t, BASE), (0, 0));
    assert!(h.e.open_orders(t, None).is_empty());
}

#[test]
fn oco_trigger_of_the_stop_leg_cancels_the_limit_leg() {
    for market in [false, true] {
        let mut h = H::new();
        let mm = h.account(100, 1_000_000);
        h.print(mm, 100);
        let t = h.account(5, 0);
        let below = if market {
            stop_market(t, Side::Sell, 90, 5)
        } else {
            stop_limit(t, Side::Sell, 90, 85, 5)
        };
        let ([a, b], list) = h.oco(maker(t, Side::Sell, 110, 5), below).unwrap();
        // Bids the triggered sell trades with, then a trade at 90.
        h.limit(mm, Side::Buy, 88, 10);
        let ev = h.print(mm, 90);
        assert!(ev
            .iter()
            .any(|e| matches!(e, Event::OrderTriggered { info, .. } if info.order == b)));
        assert_eq!(done_reason(&ev, a), Some(DoneReason::Cancelled));
        assert!(list_done(&ev, list));
        let fills: Vec<_> = trades(&ev)
            .iter()
            .filter(|x| x.taker == b)
            .map(|x| (x.price, x.qty))
            .collect();
        assert_eq!(fills, vec![(88, 5)], "market leg: {market}");
        assert_eq!(h.bal(t, BASE), (0, 0));
        // 440 at 20 bps is a fee of 0.88, rounded down to 0.
        assert_eq!(h.bal(t, QUOTE).0, 88 * 5);
        assert!(h.e.open_orders(t, None).is_empty());
    }
}

#[test]
fn oco_buy_stop_leg_triggers_with_the_shared_hold() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    let t = h.account(0, 10_000);
    let ([a, b], list) = h
        .oco(
            stop_limit(t, Side::Buy, 110, 120, 5),
            maker(t, Side::Buy, 90, 5),
        )
        .unwrap();
    h.limit(mm, Side::Sell, 115, 10);
    let ev = h.print(mm, 110);
    assert_eq!(done_reason(&ev, b), Some(DoneReason::Cancelled));
    assert!(list_done(&ev, list));
    let fills: Vec<_> = trades(&ev)
        .iter()
        .filter(|x| x.taker == a)
        .map(|x| (x.price, x.qty))
        .collect();
    assert_eq!(fills, vec![(115, 5)]);
    assert_eq!(h.bal(t, BASE), (5, 0));
    assert_eq!(h.bal(t, QUOTE), (10_000 - 575 - 1, 0));
}

#[test]
fn oco_take_profit_and_stop_legs() {
    // Sell: a take-profit above, a stop below; the rise triggers the take-profit.
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    let t = h.account(5, 0);
    let tp = leg(
        t,
        Side::Sell,
        OrderType::TakeProfitLimit {
            stop: Price(110),
            price: Price(109),
            qty: Qty(5),
        },
    );
    let ([a, b], list) = h.oco(tp, stop_market(t, Side::Sell, 90, 5)).unwrap();
    assert_eq!(h.bal(t, BASE), (0, 5));
    let ev = h.print(mm, 110);
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::OrderTriggered { info, .. } if info.order == a)));
    assert_eq!(done_reason(&ev, b), Some(DoneReason::Cancelled));
    assert!(list_done(&ev, list));
    // The take-profit-limit rests at 109 alone, holding its 5 lots.
    assert_eq!(h.book(Side::Sell), vec![(109, 5)]);
    assert_eq!(h.bal(t, BASE), (0, 5));
}

#[test]
fn oco_cancel_of_either_leg_or_all_cancels_the_list() {
    for how in 0..4 {
        let mut h = H::new();
        let mm = h.account(100, 1_000_000);
        h.print(mm, 100);
        let t = h.account(5, 0);
        let mut above = maker(t, Side::Sell, 110, 5);
        above.client_id = Some(ClientOrderId::new("up").unwrap());
        let ([a, b], list) = h.oco(above, stop_limit(t, Side::Sell, 90, 89, 5)).unwrap();
        let cmd = match how {
            0 => Command::Cancel {
                account: t,
                market: M,
                order: OrderRef::Id(a),
            },
            1 => Command::Cancel {
                account: t,
                market: M,
                order: OrderRef::Id(b),
            },
            2 => Command::Cancel {
                account: t,
                market: M,
                order: OrderRef::Client(ClientOrderId::new("up").unwrap()),
            },
            _ => Command::CancelAll {
                account: t,
                market: None,
            },
        };
        let ev = h.cmd(cmd).unwrap();
        assert_eq!(done_reason(&ev, a), Some(DoneReason::Cancelled), "{how}");
        assert_eq!(done_reason(&ev, b), Some(DoneReason::Cancelled), "{how}");
        assert!(list_done(&ev, list));
        assert_eq!(h.bal(t, BASE), (5, 0));
        assert!(h.e.open_orders(t, None).is_empty());
        assert!(h
            .e
            .order_by_client_id(t, &ClientOrderId::new("up").unwrap())
            .is_none());
    }
}

#[test]
fn oco_limit_leg_expired_by_self_trade_prevention_ends_the_list() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    let t = h.account(5, 10_000);
    let ([a, b], list) = h
        .oco(
            maker(t, Side::Sell, 110, 5),
            stop_limit(t, Side::Sell, 90, 89, 5),
        )
        .unwrap();
    let mut buy = lim(t, Side::Buy, 110, 1);
    buy.stp = StpMode::ExpireMaker;
    let (_, ev) = h.order(buy).unwrap();
    assert_eq!(done_reason(&ev, a), Some(DoneReason::SelfTrade));
    assert_eq!(done_reason(&ev, b), Some(DoneReason::Cancelled));
    assert!(list_done(&ev, list));
    assert_eq!(h.bal(t, BASE), (5, 0));
}

#[test]
fn oco_legs_cannot_be_amended() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    let t = h.account(5, 0);
    let ([a, _], _) = h
        .oco(
            maker(t, Side::Sell, 110, 5),
            stop_limit(t, Side::Sell, 90, 89, 5),
        )
        .unwrap();
    assert_eq!(
        h.cmd(Command::Amend {
            account: t,
            market: M,
            order: OrderRef::Id(a),
            new_price: None,
            new_qty: Some(Qty(2)),
        })
        .unwrap_err(),
        RejectCode::InvalidAmend
    );
}

#[test]
fn oco_validation_table() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.limit(mm, Side::Buy, 95, 1);
    h.print(mm, 100);
    h.limit(mm, Side::Sell, 120, 1);
    let t = h.account(50, 100_000);
    let mut taker_leg = maker(t, Side::Sell, 110, 5);
    taker_leg.post_only = false;
    let mut dup_a = maker(t, Side::Sell, 110, 5);
    dup_a.client_id = Some(ClientOrderId::new("x").unwrap());
    let mut dup_b = stop_limit(t, Side::Sell, 90, 89, 5);
    dup_b.client_id = Some(ClientOrderId::new("x").unwrap());
    let mut fok = stop_limit(t, Side::Sell, 90, 89, 5);
    fok.tif = TimeInForce::Fok;
    let cases: Vec<(&str, NewOrder, NewOrder, RejectCode)> = vec![
        (
            "sell: the stop must be below",
            stop_limit(t, Side::Sell, 110, 109, 5),
            maker(t, Side::Sell, 90, 5),
            RejectCode::InvalidOrder,
        ),
        (
            "buy: the maker must be below",
            maker(t, Side::Buy, 110, 5),
            stop_limit(t, Side::Buy, 90, 91, 5),
            RejectCode::InvalidOrder,
        ),
        (
            "the limit leg is a limit maker",
            taker_leg,
            stop_limit(t, Side::Sell, 90, 89, 5),
            RejectCode::InvalidOrder,
        ),
        (
            "quantities differ",
            maker(t, Side::Sell, 110, 5),
            stop_limit(t, Side::Sell, 90, 89, 4),
            RejectCode::InvalidOrder,
        ),
        (
            "sides differ",
            maker(t, Side::Sell, 110, 5),
            stop_limit(t, Side::Buy, 90, 89, 5),
            RejectCode::InvalidOrder,
        ),
        (
            "the stop is above the last price (would trigger at once)",
            maker(t, Side::Sell, 110, 5),
            stop_limit(t, Side::Sell, 101, 100, 5),
            RejectCode::InvalidOrder,
        ),
        (
            "the maker price is below the last price",
            maker(t, Side::Sell, 99, 5),
            stop_limit(t, Side::Sell, 90, 89, 5),
            RejectCode::InvalidOrder,
        ),
        (
            "a fill-or-kill leg",
            maker(t, Side::Sell, 110, 5),
            fok,
            RejectCode::InvalidOrder,
        ),
        (
            "the same client id twice",
            dup_a,
            dup_b,
            RejectCode::DuplicateClientId,
        ),
        (
            "more than the account has",
            maker(t, Side::Sell, 110, 51),
            stop_limit(t, Side::Sell, 90, 89, 51),
            RejectCode::InsufficientBalance,
        ),
    ];
    for (name, above, below, code) in cases {
        assert_eq!(h.oco(above, below).unwrap_err(), code, "{name}");
    }
    // A buy maker that would cross the ask at 120 (last 100: a buy's maker is below 100, so it
    // cannot cross; checked here for a sell maker above the bid instead).
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    h.limit(mm, Side::Buy, 99, 1);
    let t = h.account(50, 0);
    // The bid at 99 is below the maker at 101: fine.
    h.oco(
        maker(t, Side::Sell, 101, 5),
        stop_limit(t, Side::Sell, 90, 89, 5),
    )
    .unwrap();
}

#[test]
fn oco_survives_a_snapshot_round_trip_and_replays_identically() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    let t = h.account(10, 10_000);
    h.oco(
        maker(t, Side::Sell, 110, 5),
        stop_limit(t, Side::Sell, 90, 89, 5),
    )
    .unwrap();
    h.oco(
        stop_limit(t, Side::Buy, 110, 120, 5),
        maker(t, Side::Buy, 90, 5),
    )
    .unwrap();
    let snap = h.e.snapshot();
    assert_eq!(snap.lists.len(), 2);
    let mut again = Engine::from_snapshot(snap.clone()).unwrap();
    assert_eq!(again.state_hash(), h.e.state_hash());
    // The same command on both gives the same events and state.
    let cmd = Command::NewOrder(lim(mm, Side::Buy, 110, 2));
    let (mut x, mut y) = (Vec::new(), Vec::new());
    h.e.apply(&cmd, Timestamp(h.now + 1), &mut x).unwrap();
    again.apply(&cmd, Timestamp(h.now + 1), &mut y).unwrap();
    assert_eq!(x, y);
    assert!(x.iter().any(|e| matches!(e, Event::OrderListDone { .. })));
    assert_eq!(again.state_hash(), h.e.state_hash());
    // A snapshot whose holder leg holds nothing is refused.
    let mut bad = snap;
    for m in &mut bad.markets {
        for o in &mut m.orders {
            if o.meta.account == t && o.side == Side::Sell {
                o.meta.hold = Amount(0);
            }
        }
    }
    assert!(Engine::from_snapshot(bad).is_err());
}

/// The trailing bytes of `e`'s snapshot that formats 6 and 7 added: its transfer and credit
/// terms, and its transfers' sequence numbers.
fn terms_suffix(e: &Engine) -> Vec<u8> {
    let s = e.snapshot();
    [
        postcard::to_stdvec(&s.transfer_terms).unwrap(),
        postcard::to_stdvec(&s.credit_terms).unwrap(),
        postcard::to_stdvec(&s.transfer_seqs).unwrap(),
    ]
    .concat()
}

/// `e`'s snapshot without formats 6's and 7's terms and sequence numbers, encoded: the state
/// an older format restores.
fn without_terms(e: &Engine) -> Vec<u8> {
    let mut s = e.snapshot();
    s.transfer_terms.clear();
    s.credit_terms.clear();
    s.transfer_seqs.clear();
    postcard::to_stdvec(&s).unwrap()
}

/// `bytes`, a snapshot file, rewritten as format `version` with the last `cut` payload bytes
/// left out (the fields that format added), its checksum as format 5 on computes it.
fn restamped(bytes: &[u8], version: u32, cut: usize) -> Vec<u8> {
    use sha2::Digest;
    let payload = &bytes[60..bytes.len() - cut];
    let mut out = bytes[..60].to_vec();
    out[8..12].copy_from_slice(&version.to_le_bytes());
    out[20..28].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut sum = sha2::Sha256::new();
    sum.update(&out[..28]);
    sum.update(payload);
    out[28..60].copy_from_slice(&sum.finalize());
    out.extend_from_slice(payload);
    out
}

/// A transfer's retry answers the transfer's own sequence number (`original`), also after a
/// snapshot (format 7). A format-6 snapshot (no sequence numbers) loads, and its keys' retries
/// are still duplicates, with no original.
#[test]
fn a_transfers_sequence_number_survives_a_snapshot_and_a_format_6_snapshot_loads_without_it() {
    use matching_engine::snapshot::{read_snapshot, snapshot_file_name, write_snapshot};
    let mut h = H::new();
    let a = h.account(0, 1_000);
    let b = h.account(0, 0);
    let key = h.key();
    let t = Command::Transfer {
        from: a,
        to: b,
        asset: QUOTE,
        amount: Amount(400),
        key,
    };
    let ev = h.cmd(t.clone()).unwrap();
    let Event::Accepted { seq: first, .. } = ev[0] else {
        panic!("{ev:?}")
    };
    h.account(0, 5);
    let retry = |e: &mut Engine, now| {
        let mut out = Vec::new();
        e.apply(&t, Timestamp(now), &mut out).unwrap();
        match out[0] {
            Event::Accepted {
                duplicate: true,
                original,
                ..
            } => original,
            _ => panic!("{out:?}"),
        }
    };
    assert_eq!(retry(&mut h.e, h.now + 1), Some(first));
    let dir = tempfile::tempdir().unwrap();
    let path = write_snapshot(dir.path(), &h.e).unwrap();
    let mut e: Engine = read_snapshot(&path, h.e.seq()).unwrap();
    assert_eq!(e.state_hash(), h.e.state_hash());
    assert_eq!(retry(&mut e, h.now + 1), Some(first));
    // Format 6: the same payload without the trailing sequence numbers.
    assert_eq!(h.e.snapshot().transfer_seqs, vec![(key, first)]);
    let bytes = std::fs::read(&path).unwrap();
    let seqs = postcard::to_stdvec(&h.e.snapshot().transfer_seqs).unwrap();
    assert_eq!(&bytes[bytes.len() - seqs.len()..], &seqs[..]);
    let v6 = restamped(&bytes, 6, seqs.len());
    std::fs::write(dir.path().join(snapshot_file_name(h.e.seq())), &v6).unwrap();
    let mut e: Engine = read_snapshot(&path, h.e.seq()).unwrap();
    assert!(e.snapshot().transfer_seqs.is_empty());
    assert_eq!(e.snapshot().transfer_terms, h.e.snapshot().transfer_terms);
    assert_eq!(retry(&mut e, h.now + 1), None);
    // A sequence number of a key without terms, or beyond the snapshot's, is refused.
    let mut bad = h.e.snapshot();
    bad.transfer_terms.clear();
    assert!(Engine::from_snapshot(bad).is_err());
    let mut bad = h.e.snapshot();
    bad.transfer_seqs[0].1 = bad.seq + 1;
    assert!(Engine::from_snapshot(bad).is_err());
}

#[test]
fn a_format_1_snapshot_without_lists_still_loads() {
    use matching_engine::snapshot::{read_snapshot, snapshot_file_name, write_snapshot};
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    h.limit(mm, Side::Sell, 120, 3);
    let dir = tempfile::tempdir().unwrap();
    let path = write_snapshot(dir.path(), &h.e).unwrap();
    // Rewrite it as format 1: without the three trailing list fields (and format 4's order
    // quotes, none here, and format 6's terms of the accounts' credits).
    let bytes = std::fs::read(&path).unwrap();
    let trailer = [
        &EngineSnapshot::V1_TO_V2_TRAILER[..],
        &EngineSnapshot::V2_TO_V3_TRAILER[..],
        &EngineSnapshot::V3_TO_V4_TRAILER[..],
        &terms_suffix(&h.e),
    ]
    .concat();
    let payload = &bytes[60..bytes.len() - trailer.len()];
    assert_eq!(&bytes[bytes.len() - trailer.len()..], &trailer[..]);
    let mut v1 = bytes[..60].to_vec();
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    v1[20..28].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    use sha2::Digest;
    v1[28..60].copy_from_slice(&sha2::Sha256::digest(payload));
    v1.extend_from_slice(payload);
    std::fs::write(dir.path().join(snapshot_file_name(h.e.seq())), &v1).unwrap();
    let e: Engine = read_snapshot(&path, h.e.seq()).unwrap();
    assert_eq!(without_terms(&e), without_terms(&h.e));
    assert!(e.snapshot().credit_terms.is_empty());
    // An unknown future version is refused.
    v1[8..12].copy_from_slice(&(matching_engine::snapshot::SNAPSHOT_VERSION + 1).to_le_bytes());
    std::fs::write(&path, &v1).unwrap();
    assert!(read_snapshot::<Engine>(&path, h.e.seq()).is_err());
}

/// Transfer and credit keys' terms survive a snapshot (format 6): after a restore the same key
/// with other terms is still refused. A format-5 snapshot (no terms) loads, and its keys answer
/// any retry as a duplicate, as that build did.
#[test]
fn transfer_and_credit_terms_survive_a_snapshot_and_a_format_5_snapshot_loads_without_them() {
    use matching_engine::snapshot::{read_snapshot, snapshot_file_name, write_snapshot};
    let mut h = H::new();
    let a = h.account(0, 1_000);
    let b = h.account(0, 0);
    let key = h.key();
    let t = |amount| Command::Transfer {
        from: a,
        to: b,
        asset: QUOTE,
        amount: Amount(amount),
        key,
    };
    h.cmd(t(400)).unwrap();
    let ckey = h.key();
    let c = |amount| Command::Credit {
        account: b,
        asset: QUOTE,
        amount: Amount(amount),
        key: ckey,
    };
    h.cmd(c(5)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_snapshot(dir.path(), &h.e).unwrap();
    let mut e: Engine = read_snapshot(&path, h.e.seq()).unwrap();
    assert_eq!(e.state_hash(), h.e.state_hash());
    let mut out = Vec::new();
    assert_eq!(
        e.apply(&t(401), Timestamp(h.now + 1), &mut out),
        Err(RejectCode::TransferKeyReused)
    );
    assert_eq!(
        e.apply(&c(6), Timestamp(h.now + 1), &mut out),
        Err(RejectCode::CreditKeyReused)
    );
    // Format 5: the same payload without the trailing terms (and format 7's sequence numbers).
    let snap = h.e.snapshot();
    assert_eq!(snap.transfer_terms.len(), 1);
    let bytes = std::fs::read(&path).unwrap();
    let terms = terms_suffix(&h.e);
    assert_eq!(&bytes[bytes.len() - terms.len()..], &terms[..]);
    let v5 = restamped(&bytes, 5, terms.len());
    std::fs::write(dir.path().join(snapshot_file_name(h.e.seq())), &v5).unwrap();
    let mut e: Engine = read_snapshot(&path, h.e.seq()).unwrap();
    assert!(e.snapshot().transfer_terms.is_empty());
    assert!(e.snapshot().credit_terms.is_empty());
    for cmd in [t(401), c(6)] {
        let mut out = Vec::new();
        e.apply(&cmd, Timestamp(h.now + 1), &mut out).unwrap();
        assert!(
            matches!(
                out[0],
                Event::Accepted {
                    duplicate: true,
                    ..
                }
            ),
            "{cmd:?}: {out:?}"
        );
    }
    // Terms of a key the snapshot does not hold are refused as inconsistent.
    let mut bad = h.e.snapshot();
    bad.transfer_keys.clear();
    assert!(Engine::from_snapshot(bad).is_err());
    let mut bad = h.e.snapshot();
    bad.credit_keys.clear();
    assert!(Engine::from_snapshot(bad).is_err());
}

// ---- OTO and OTOCO lists, issue 9 ----

/// What an OTO/OTOCO placement reported.
struct Oto {
    list: ListId,
    working: OrderId,
    pending: Vec<OrderId>,
    ev: Vec<Event>,
}

impl H {
    fn oto_cmd(&mut self, c: Command) -> Result<Oto, RejectCode> {
        let ev = self.cmd(c)?;
        let (list, working) = ev
            .iter()
            .find_map(|e| match *e {
                Event::OtoNew { list, working, .. } => Some((list, working)),
                _ => None,
            })
            .expect("OtoNew");
        let pending: Vec<OrderId> = ev
            .iter()
            .filter_map(|e| match *e {
                Event::OrderPending { order, .. } => Some(order),
                _ => None,
            })
            .collect();
        let Event::Accepted { order, .. } = ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(order, Some(working));
        // Ids: the working order's, then the pending orders', in order.
        for (i, p) in pending.iter().enumerate() {
            assert_eq!(p.0, working.0 + 1 + i as u64);
        }
        Ok(Oto {
            list,
            working,
            pending,
            ev,
        })
    }

    fn oto(&mut self, working: NewOrder, pending: NewOrder) -> Result<Oto, RejectCode> {
        self.oto_cmd(Command::NewOto(Box::new(NewOto {
            working,
            pending,
            list_client_id: None,
        })))
    }

    fn otoco(
        &mut self,
        working: NewOrder,
        above: NewOrder,
        below: NewOrder,
    ) -> Result<Oto, RejectCode> {
        self.oto_cmd(Command::NewOtoco(Box::new(NewOtoco {
            working,
            pending: [above, below],
            list_client_id: None,
        })))
    }
}

fn oto_outcome(ev: &[Event], list: ListId) -> Option<OtoOutcome> {
    ev.iter().find_map(|e| match *e {
        Event::OtoDone {
            list: l, outcome, ..
        } if l == list => Some(outcome),
        _ => None,
    })
}

fn placed(ev: &[Event], id: OrderId) -> bool {
    ev.iter()
        .any(|e| matches!(e, Event::OrderNew { info, .. } if info.order == id))
}

#[test]
fn oto_pending_order_is_placed_when_the_working_order_fills_completely_not_before() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    // t has quote for the working buy and no base: the pending sell holds nothing yet.
    let t = h.account(0, 10_000);
    let o = h
        .oto(lim(t, Side::Buy, 100, 5), lim(t, Side::Sell, 120, 5))
        .unwrap();
    assert_eq!(o.pending.len(), 1);
    let p = o.pending[0];
    assert!(!placed(&o.ev, p));
    // The working order holds as usual (500 + 1 at the 20 bps allowance), the pending nothing.
    assert_eq!(h.bal(t, QUOTE), (10_000 - 501, 501));
    assert_eq!(h.bal(t, BASE), (0, 0));
    assert!(h.e.order(M, p).is_none(), "a pending order is not open");
    assert_eq!(h.e.order(M, o.working).unwrap().list, Some(o.list));
    assert_eq!(h.e.oto_list(o.list).unwrap().working, o.working);
    assert_eq!(h.book(Side::Sell), vec![]);
    // A partial fill places nothing.
    let (_, ev) = h.order(lim(mm, Side::Sell, 100, 2)).unwrap();
    assert!(!placed(&ev, p));
    assert_eq!(oto_outcome(&ev, o.list), None);
    assert!(h.e.oto_list(o.list).is_some());
    // The rest fills: the pending sell is placed in the same command, after the fill, and now
    // holds the 5 base the working order bought.
    let (_, ev) = h.order(lim(mm, Side::Sell, 100, 3)).unwrap();
    assert_eq!(done_reason(&ev, o.working), Some(DoneReason::Filled));
    assert!(placed(&ev, p));
    assert_eq!(oto_outcome(&ev, o.list), Some(OtoOutcome::Placed));
    let done_at = ev
        .iter()
        .position(|e| matches!(e, Event::OrderDone { info, .. } if info.order == o.working))
        .unwrap();
    let new_at = ev
        .iter()
        .position(|e| matches!(e, Event::OrderNew { info, .. } if info.order == p))
        .unwrap();
    assert!(done_at < new_at);
    assert!(h.e.oto_list(o.list).is_none());
    let v = h.e.order(M, p).unwrap();
    assert_eq!((v.price, v.remaining, v.list), (Price(120), Qty(5), None));
    assert_eq!(h.book(Side::Sell), vec![(120, 5)]);
    assert_eq!(h.bal(t, BASE), (0, 5));
}

#[test]
fn oto_working_order_filled_when_placed_places_the_pending_in_the_same_command() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    h.limit(mm, Side::Sell, 100, 5);
    let t = h.account(0, 10_000);
    let o = h
        .oto(lim(t, Side::Buy, 100, 5), lim(t, Side::Sell, 120, 5))
        .unwrap();
    assert_eq!(done_reason(&o.ev, o.working), Some(DoneReason::Filled));
    assert!(placed(&o.ev, o.pending[0]));
    assert_eq!(oto_outcome(&o.ev, o.list), Some(OtoOutcome::Placed));
    assert_eq!(h.book(Side::Sell), vec![(120, 5)]);
    assert!(h.e.oto_list(o.list).is_none());
    // An IOC working order that does not fill completely ends the list unplaced.
    h.limit(mm, Side::Sell, 101, 2);
    let o = h
        .oto(
            with_tif(lim(t, Side::Buy, 101, 5), TimeInForce::Ioc),
            lim(t, Side::Sell, 130, 5),
        )
        .unwrap();
    assert_eq!(
        oto_outcome(&o.ev, o.list),
        Some(OtoOutcome::Cancelled(DoneReason::IocRemainder))
    );
    assert!(!placed(&o.ev, o.pending[0]));
    assert!(h.e.oto_list(o.list).is_none());
    assert_eq!(h.book(Side::Sell), vec![(120, 5)]);
}

#[test]
fn oto_cancel_of_the_working_or_a_pending_order_cancels_the_list() {
    let cid = ClientOrderId::new("pend-1").unwrap();
    for how in 0..4 {
        let mut h = H::new();
        let mm = h.account(100, 1_000_000);
        h.print(mm, 100);
        let t = h.account(0, 10_000);
        let mut pending = lim(t, Side::Sell, 120, 5);
        pending.client_id = Some(cid);
        let o = h.oto(lim(t, Side::Buy, 100, 5), pending).unwrap();
        // The pending order's client id is taken while it waits.
        let mut other = lim(t, Side::Buy, 90, 1);
        other.client_id = Some(cid);
        assert_eq!(
            h.order(other).unwrap_err(),
            RejectCode::DuplicateClientId,
            "{how}"
        );
        let order = match how {
            0 => OrderRef::Id(o.working),
            1 => OrderRef::Id(o.pending[0]),
            _ => OrderRef::Client(cid),
        };
        let ev = if how == 3 {
            h.cmd(Command::CancelAll {
                account: t,
                market: None,
            })
            .unwrap()
        } else {
            h.cmd(Command::Cancel {
                account: t,
                market: M,
                order,
            })
            .unwrap()
        };
        assert_eq!(done_reason(&ev, o.working), Some(DoneReason::Cancelled));
        assert_eq!(
            oto_outcome(&ev, o.list),
            Some(OtoOutcome::Cancelled(DoneReason::Cancelled)),
            "{how}"
        );
        assert!(h.e.oto_list(o.list).is_none());
        assert_eq!(h.bal(t, QUOTE), (10_000, 0));
        assert!(h.e.open_orders(t, None).is_empty());
        // Nothing is placed later, and the client id is free again.
        h.order(lim(mm, Side::Sell, 100, 5)).unwrap();
        assert_eq!(h.book(Side::Sell), vec![(100, 5)]);
        h.order(other).unwrap();
        // Another account cannot cancel a pending order; an unknown id stays unknown.
        let o = h
            .oto(lim(t, Side::Buy, 95, 1), lim(t, Side::Sell, 120, 1))
            .unwrap();
        assert_eq!(
            h.cmd(Command::Cancel {
                account: mm,
                market: M,
                order: OrderRef::Id(o.pending[0]),
            })
            .unwrap_err(),
            RejectCode::UnknownOrder
        );
    }
}

#[test]
fn oto_pending_order_the_account_cannot_cover_when_placed_is_refused_cleanly() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    // t sells 5 at 100 and wants to buy 10 at 90 after: 900 + fee, but the sale brings 499.
    let t = h.account(5, 0);
    let o = h
        .oto(lim(t, Side::Sell, 100, 5), lim(t, Side::Buy, 90, 10))
        .unwrap();
    let (_, ev) = h.order(lim(mm, Side::Buy, 100, 5)).unwrap();
    assert_eq!(done_reason(&ev, o.working), Some(DoneReason::Filled));
    assert_eq!(
        oto_outcome(&ev, o.list),
        Some(OtoOutcome::Refused(RejectCode::InsufficientBalance))
    );
    assert!(!placed(&ev, o.pending[0]));
    assert!(h.e.oto_list(o.list).is_none());
    // Only the working order's trade moved t's funds: 500 less the 10 bps maker fee.
    assert_eq!(h.bal(t, BASE), (0, 0));
    assert_eq!(h.bal(t, QUOTE), (500, 0));
    assert!(h.e.open_orders(t, None).is_empty());
    assert_eq!(h.book(Side::Buy), vec![]);
}

#[test]
fn otoco_pending_pair_is_placed_as_an_oco_and_behaves_as_one() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    let t = h.account(0, 10_000);
    let o = h
        .otoco(
            lim(t, Side::Buy, 100, 5),
            maker(t, Side::Sell, 110, 5),
            stop_limit(t, Side::Sell, 90, 85, 5),
        )
        .unwrap();
    let [a, b] = [o.pending[0], o.pending[1]];
    assert_eq!(h.bal(t, BASE), (0, 0));
    assert!(h.e.order_list(o.list).is_none());
    // The working order fills: the pair is placed as an OCO under the same list id, holding
    // the bought 5 base once.
    let (_, ev) = h.order(lim(mm, Side::Sell, 100, 5)).unwrap();
    assert_eq!(oto_outcome(&ev, o.list), Some(OtoOutcome::Placed));
    assert!(ev.iter().any(
        |e| matches!(e, Event::OrderListNew { list, legs, .. } if *list == o.list && *legs == [a, b])
    ));
    assert_eq!(h.e.order_list(o.list).unwrap().legs, [a, b]);
    assert!(h.e.oto_list(o.list).is_none());
    assert_eq!(h.bal(t, BASE), (0, 5));
    assert_eq!(h.book(Side::Sell), vec![(110, 5)]);
    // A fall to 90 triggers the stop leg and cancels the maker leg: the list is done.
    h.limit(mm, Side::Buy, 88, 10);
    let ev = h.print(mm, 90);
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::OrderTriggered { info, .. } if info.order == b)));
    assert_eq!(done_reason(&ev, a), Some(DoneReason::Cancelled));
    assert!(list_done(&ev, o.list));
    // The triggered stop-limit (limit 85) sold to the bid at 88.
    assert_eq!(h.bal(t, BASE), (0, 0));
    assert!(h.e.open_orders(t, None).is_empty());
}

#[test]
fn otoco_pending_pair_the_price_has_moved_past_is_refused_when_placed() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    let t = h.account(0, 10_000);
    // The pair brackets 100; the working buy at 85 fills only after the price fell below 90.
    let o = h
        .otoco(
            lim(t, Side::Buy, 85, 5),
            maker(t, Side::Sell, 110, 5),
            stop_limit(t, Side::Sell, 90, 89, 5),
        )
        .unwrap();
    let (_, ev) = h.order(lim(mm, Side::Sell, 85, 5)).unwrap();
    assert_eq!(
        oto_outcome(&ev, o.list),
        Some(OtoOutcome::Refused(RejectCode::InvalidOrder))
    );
    assert!(h.e.order_list(o.list).is_none());
    assert_eq!(h.bal(t, BASE), (5, 0));
}

#[test]
fn oto_validation_table() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    h.limit(mm, Side::Sell, 105, 5);
    let t = h.account(10, 10_000);
    let u = h.account(10, 10_000);
    let cid = ClientOrderId::new("c1").unwrap();
    let mut open = lim(t, Side::Buy, 50, 1);
    open.client_id = Some(cid);
    h.order(open).unwrap();
    let w = lim(t, Side::Buy, 100, 5);
    let sell = lim(t, Side::Sell, 120, 5);
    let with_cid = |mut o: NewOrder, c: &str| {
        o.client_id = Some(ClientOrderId::new(c).unwrap());
        o
    };
    let budget = leg(
        t,
        Side::Sell,
        OrderType::MarketBudget {
            budget: Amount(100),
        },
    );
    let cases: Vec<(&str, NewOrder, NewOrder, RejectCode)> = vec![
        (
            "working is not a limit order",
            stop_limit(t, Side::Buy, 110, 120, 5),
            sell,
            RejectCode::InvalidOrder,
        ),
        (
            "pending by quote budget",
            w,
            budget,
            RejectCode::InvalidOrder,
        ),
        (
            "pending of another account",
            w,
            lim(u, Side::Sell, 120, 5),
            RejectCode::InvalidOrder,
        ),
        (
            "pending off the price filter",
            w,
            lim(t, Side::Sell, 2_000_000, 5),
            RejectCode::OutsidePriceBand,
        ),
        (
            "pending zero quantity",
            w,
            lim(t, Side::Sell, 120, 0),
            RejectCode::ZeroQuantity,
        ),
        (
            "pending post-only IOC",
            w,
            with_tif(maker(t, Side::Sell, 120, 5), TimeInForce::Ioc),
            RejectCode::InvalidOrder,
        ),
        (
            "pending client id of an open order",
            w,
            with_cid(sell, "c1"),
            RejectCode::DuplicateClientId,
        ),
        (
            "working and pending share a client id",
            with_cid(w, "x"),
            with_cid(sell, "x"),
            RejectCode::DuplicateClientId,
        ),
        (
            "working cannot be paid for",
            lim(t, Side::Buy, 100, 500),
            sell,
            RejectCode::InsufficientBalance,
        ),
        (
            "working post-only would take",
            maker(t, Side::Buy, 105, 1),
            sell,
            RejectCode::PostOnlyWouldTake,
        ),
    ];
    for (name, working, pending, code) in cases {
        let r = h.oto(working, pending).map(|o| o.list);
        assert_eq!(r.unwrap_err(), code, "{name}");
    }
    let otoco_cases: Vec<(&str, [NewOrder; 2], RejectCode)> = vec![
        (
            "pair in the wrong order",
            [
                stop_limit(t, Side::Sell, 90, 89, 5),
                maker(t, Side::Sell, 110, 5),
            ],
            RejectCode::InvalidOrder,
        ),
        (
            "pair of two quantities",
            [
                maker(t, Side::Sell, 110, 5),
                stop_limit(t, Side::Sell, 90, 89, 4),
            ],
            RejectCode::InvalidOrder,
        ),
        (
            "pair with its levels crossed",
            [
                maker(t, Side::Sell, 90, 5),
                stop_limit(t, Side::Sell, 95, 89, 5),
            ],
            RejectCode::InvalidOrder,
        ),
    ];
    for (name, [a, b], code) in otoco_cases {
        let r = h.otoco(w, a, b).map(|o| o.list);
        assert_eq!(r.unwrap_err(), code, "{name}");
    }
    // The same shapes, well formed, are accepted.
    h.oto(w, sell).unwrap();
    h.otoco(
        lim(t, Side::Buy, 99, 1),
        maker(t, Side::Sell, 110, 1),
        stop_limit(t, Side::Sell, 90, 89, 1),
    )
    .unwrap();
}

#[test]
fn oto_lists_survive_a_snapshot_round_trip_and_replay_identically() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    let t = h.account(0, 10_000);
    let mut pending = lim(t, Side::Sell, 120, 5);
    pending.client_id = Some(ClientOrderId::new("p").unwrap());
    let oto = h.oto(lim(t, Side::Buy, 100, 5), pending).unwrap();
    let otoco = h
        .otoco(
            lim(t, Side::Buy, 99, 3),
            maker(t, Side::Sell, 110, 3),
            stop_limit(t, Side::Sell, 90, 89, 3),
        )
        .unwrap();
    let snap = h.e.snapshot();
    assert_eq!(snap.otos.len(), 2);
    let mut again = Engine::from_snapshot(snap.clone()).unwrap();
    assert_eq!(again.state_hash(), h.e.state_hash());
    again.check_invariants();
    // The same commands on both give the same events and state: both working orders fill.
    let cmd = Command::NewOrder(lim(mm, Side::Sell, 99, 8));
    let (mut x, mut y) = (Vec::new(), Vec::new());
    h.e.apply(&cmd, Timestamp(h.now + 1), &mut x).unwrap();
    again.apply(&cmd, Timestamp(h.now + 1), &mut y).unwrap();
    assert_eq!(x, y);
    assert_eq!(oto_outcome(&x, oto.list), Some(OtoOutcome::Placed));
    assert_eq!(oto_outcome(&x, otoco.list), Some(OtoOutcome::Placed));
    assert_eq!(again.state_hash(), h.e.state_hash());
    again.check_invariants();
    // A snapshot whose pending order is also open, or whose working order is gone, is refused.
    let mut bad = snap.clone();
    bad.otos[0].working = OrderId(9_999);
    assert!(Engine::from_snapshot(bad).is_err());
    let mut bad = snap;
    bad.otos[1].pending = bad.otos[0].pending;
    assert!(Engine::from_snapshot(bad).is_err());
}

#[test]
fn a_format_2_snapshot_without_oto_lists_still_loads() {
    use matching_engine::snapshot::{read_snapshot, snapshot_file_name, write_snapshot};
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    let t = h.account(5, 0);
    h.oco(
        maker(t, Side::Sell, 110, 5),
        stop_limit(t, Side::Sell, 90, 89, 5),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_snapshot(dir.path(), &h.e).unwrap();
    // Rewrite it as format 2: without the trailing OTO list field (and format 4's order
    // quotes, none here, and format 6's terms of the accounts' credits).
    let bytes = std::fs::read(&path).unwrap();
    let trailer = &[
        &EngineSnapshot::V2_TO_V3_TRAILER[..],
        &EngineSnapshot::V3_TO_V4_TRAILER[..],
        &terms_suffix(&h.e),
    ]
    .concat()[..];
    assert_eq!(&bytes[bytes.len() - trailer.len()..], trailer);
    let payload = &bytes[60..bytes.len() - trailer.len()];
    let mut v2 = bytes[..60].to_vec();
    v2[8..12].copy_from_slice(&2u32.to_le_bytes());
    v2[20..28].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    use sha2::Digest;
    v2[28..60].copy_from_slice(&sha2::Sha256::digest(payload));
    v2.extend_from_slice(payload);
    std::fs::write(dir.path().join(snapshot_file_name(h.e.seq())), &v2).unwrap();
    let e: Engine = read_snapshot(&path, h.e.seq()).unwrap();
    assert_eq!(without_terms(&e), without_terms(&h.e));
    assert_eq!(e.snapshot().lists.len(), 1);
}

fn first_maker(ev: &[Event]) -> Option<OrderId> {
    ev.iter().find_map(|e| match *e {
        Event::Trade { maker_order, .. } => Some(maker_order),
        _ => None,
    })
}

/// An OTO's pending order (an OTOCO's pair) takes its id when the list is made (Binance answers
/// the ids at once) but enters the book only when its working order has filled. Its time
/// priority is that moment's: it queues behind every order that reached its level before,
/// although their ids are higher, and a snapshot keeps that order. Cases: an OTO's pending
/// limit sell, an OTOCO's limit-maker leg.
#[test]
fn a_placed_pending_order_queues_behind_orders_that_arrived_before_it_whatever_the_ids() {
    for otoco in [false, true] {
        let mut h = H::new();
        let mm = h.account(100, 1_000_000);
        h.print(mm, 100);
        let t = h.account(0, 10_000);
        let o = if otoco {
            h.otoco(
                lim(t, Side::Buy, 100, 5),
                maker(t, Side::Sell, 120, 5),
                stop_limit(t, Side::Sell, 90, 85, 5),
            )
        } else {
            h.oto(lim(t, Side::Buy, 100, 5), lim(t, Side::Sell, 120, 5))
        }
        .unwrap();
        let p = o.pending[0];
        // Another seller rests at 120 after the list was made: a higher id than `p`.
        let s = h.account(10, 0);
        let later = h.limit(s, Side::Sell, 120, 3);
        assert!(later > p, "otoco {otoco}");
        // The working order fills: `p` enters the book now, behind `later`.
        let (_, ev) = h.order(lim(mm, Side::Sell, 100, 5)).unwrap();
        assert!(placed(&ev, p), "otoco {otoco}");
        assert_eq!(h.queue(120), vec![later, p], "otoco {otoco}");
        let again = Engine::from_snapshot(h.e.snapshot()).unwrap();
        let queue: Vec<OrderId> = again
            .book(M)
            .unwrap()
            .orders_at(Price(120))
            .map(|n| n.id)
            .collect();
        assert_eq!(queue, vec![later, p], "otoco {otoco}: after a snapshot");
        // A buy of 3 at 120 trades with `later` only; `p` keeps its 5.
        let b = h.account(0, 100_000);
        let (_, ev) = h.order(lim(b, Side::Buy, 120, 3)).unwrap();
        assert_eq!(first_maker(&ev), Some(later), "otoco {otoco}");
        assert_eq!(h.queue(120), vec![p], "otoco {otoco}");
        assert_eq!(h.e.order(M, p).unwrap().remaining, Qty(5), "otoco {otoco}");
    }
}

/// Rewrites the snapshot at `path` (written by this build) as format `version`, payload as is.
fn restamp_snapshot(path: &std::path::Path, version: u32) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[8..12].copy_from_slice(&version.to_le_bytes());
    std::fs::write(path, &bytes).unwrap();
}

/// The snapshot header's format version is shared by every state machine and was raised for
/// the engine's payload: a version this build cannot read (0, never written; one above the
/// current) is refused with an error that names the version and says why, and recovery skips
/// it; the versions the engine upgrades (1, 2) are read (see the two tests above).
#[test]
fn a_snapshot_of_a_version_this_build_cannot_read_is_refused_clearly() {
    use matching_engine::snapshot::{read_snapshot, write_snapshot, SNAPSHOT_VERSION};
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    let dir = tempfile::tempdir().unwrap();
    let path = write_snapshot(dir.path(), &h.e).unwrap();
    let seq = h.e.seq();
    for (version, why) in [
        (0, "older than this build's"),
        (SNAPSHOT_VERSION + 1, "newer than this build's"),
    ] {
        restamp_snapshot(&path, version);
        let err = read_snapshot::<Engine>(&path, seq).unwrap_err().to_string();
        assert!(
            err.contains(&format!("format version {version}")) && err.contains(why),
            "{version}: {err}"
        );
    }
    restamp_snapshot(&path, SNAPSHOT_VERSION);
    let e: Engine = read_snapshot(&path, seq).unwrap();
    assert_eq!(e.state_hash(), h.e.state_hash());
}

/// The quote value of an order's trades, as taker or maker.
fn quote_of(ev: &[Event], id: OrderId) -> u64 {
    ev.iter()
        .filter_map(|e| match *e {
            Event::Trade {
                maker_order,
                taker_order,
                notional,
                ..
            } if maker_order == id || taker_order == id => Some(notional.0),
            _ => None,
        })
        .sum()
}

/// `OrderDone` carries the order's quote filled over its life (its fills as a taker when
/// placed and as a maker since), and a snapshot keeps it for resting orders (format 4): the
/// API answers a cancel's `cummulativeQuoteQty` from it while its read models lag.
#[test]
fn order_done_carries_the_quote_filled_over_the_orders_life_across_a_snapshot() {
    let mut h = H::new();
    let s = h.account(100, 0);
    let b = h.account(0, 100_000);
    h.limit(s, Side::Sell, 99, 3);
    let (bid, placed) = h.order(lim(b, Side::Buy, 100, 10)).unwrap();
    let mut fills = placed.clone();
    let ioc = with_tif(lim(s, Side::Sell, 100, 2), TimeInForce::Ioc);
    let (_, ev) = h.order(ioc).unwrap();
    fills.extend(ev);
    let want = quote_of(&fills, bid);
    assert!(want > quote_of(&placed, bid) && quote_of(&placed, bid) > 0);
    let snap = h.e.snapshot();
    assert_eq!(snap.order_quotes, vec![(bid, Amount(want))]);
    let bytes = postcard::to_stdvec(&snap).unwrap();
    let mut r = Engine::from_snapshot(postcard::from_bytes(&bytes).unwrap()).unwrap();
    assert_eq!(r.state_hash(), h.e.state_hash());
    let cancel = Command::Cancel {
        account: b,
        market: M,
        order: OrderRef::Id(bid),
    };
    let t = Timestamp(h.now + 5_000);
    for e in [&mut h.e, &mut r] {
        let mut out = vec![];
        e.apply(&cancel, t, &mut out).unwrap();
        let quotes: Vec<_> = out
            .iter()
            .filter_map(|e| match *e {
                Event::OrderDone { info, quote, .. } if info.order == bid => Some(quote.0),
                _ => None,
            })
            .collect();
        assert_eq!(quotes, vec![want], "{out:?}");
    }
    // A snapshot whose quotes name an order not in the book is refused.
    let mut bad = h.e.snapshot();
    bad.order_quotes.push((OrderId(bid.0 + 1_000), Amount(1)));
    assert!(Engine::from_snapshot(bad).is_err());
}

/// Time priority of stops: an OTO's pending stop is placed when its working order fills, so it
/// queues from then, behind a stop at the same trigger price placed in between (which has the
/// higher id: the pending order's id was reserved with its list). Stops were keyed by
/// (price, id), and the pending stop triggered first. A restored snapshot keeps the order.
#[test]
fn oto_pending_stop_queues_from_its_placement_not_its_reserved_id() {
    let mut h = H::new();
    let mm = h.account(100, 1_000_000);
    h.print(mm, 100);
    let t = h.account(0, 10_000);
    let o = h
        .oto(
            lim(t, Side::Buy, 100, 5),
            stop_limit(t, Side::Sell, 90, 80, 5),
        )
        .unwrap();
    let p = o.pending[0];
    let u = h.account(5, 0);
    let (between, _) = h.order(stop_limit(u, Side::Sell, 90, 80, 5)).unwrap();
    assert!(
        between.0 > p.0,
        "the stop placed in between has the higher id"
    );
    // The working order fills: the pending stop is placed now, after `between`.
    let (_, ev) = h.order(lim(mm, Side::Sell, 100, 5)).unwrap();
    assert!(placed(&ev, p));
    let triggered = |ev: &[Event]| -> Vec<OrderId> {
        ev.iter()
            .filter_map(|e| match e {
                Event::OrderTriggered { info, .. } => Some(info.order),
                _ => None,
            })
            .collect()
    };
    let mut restored = H {
        e: Engine::from_snapshot(h.e.snapshot()).unwrap(),
        now: h.now,
        keys: h.keys,
    };
    assert_eq!(restored.e.state_hash(), h.e.state_hash());
    // A trade at 90 reaches both: `between` triggers first.
    assert_eq!(triggered(&h.print(mm, 90)), vec![between, p]);
    assert_eq!(triggered(&restored.print(mm, 90)), vec![between, p]);
    assert_eq!(restored.e.state_hash(), h.e.state_hash());
}
