//! The API's SQLite history write (`api::store::Store::write_history`), the history thread's
//! work per commit: µs per order of a commit of 16,000 orders (1,000 of them later versions of
//! the commit before's: fills and cancels of resting orders) and 8,000 trades, onto a history
//! that keeps growing, in two shapes:
//!
//! - **dense:** 64 accounts (the load test's shape: each account places ~250 orders a commit);
//! - **sparse:** 16,000 accounts, one order each per commit, and trades between distinct
//!   accounts (the shape in which chunks of one account and market hold one record each).
//!
//! Prints the median and best of the timed commits. The database lives under the build
//! directory (`CARGO_TARGET_TMPDIR`), on the real disk, WAL and `synchronous=NORMAL` as the API
//! opens it. `cargo bench -p api --bench history` (`MEDIATOR_HISTORY_COMMITS` timed commits, default
//! 20, after 10 untimed ones).

use api::readmodel::{OrdKind, OrdStatus, OrderRec, TradeRec};
use api::store::Store;
use matching_engine::{Side, StpMode, TimeInForce};
use std::time::{Duration, Instant};

const ORDERS: u64 = 16_000;
const UPDATES: u64 = 1_000;
const TRADES: u64 = 8_000;

fn order(id: u64, account: u32, time_ms: u64) -> OrderRec {
    OrderRec {
        id,
        account,
        market: 0,
        // A generated client id's shape: 22 characters sorting by time.
        client_id: format!("{time_ms:013}{id:09}"),
        side: if id % 2 == 0 { Side::Buy } else { Side::Sell },
        kind: OrdKind::Limit,
        tif: TimeInForce::Gtc,
        price: 3_000_000,
        stop: 0,
        orig_qty: 1_000,
        orig_quote: 0,
        executed: 0,
        cum_quote: 0,
        status: OrdStatus::New,
        stp: StpMode::None,
        time_ms,
        update_ms: time_ms,
        working_ms: Some(time_ms),
        list_id: None,
    }
}

fn trade(id: u64, maker: u32, taker: u32, time_ms: u64) -> TradeRec {
    TradeRec {
        id,
        market: 0,
        price: 3_000_000,
        qty: 1_000,
        quote: 3_000,
        taker_side: Side::Buy,
        maker_order: id * 2,
        taker_order: id * 2 + 1,
        maker_account: maker,
        taker_account: taker,
        maker_fee: 3,
        taker_fee: 6,
        time_ms,
    }
}

/// Commit `n`'s orders and trades for `accounts` accounts.
fn commit(n: u64, accounts: u32) -> (Vec<OrderRec>, Vec<TradeRec>) {
    let time = 1_700_000_000_000 + n * 200;
    let acct = |i: u64| (i % u64::from(accounts)) as u32;
    let mut orders: Vec<OrderRec> = (0..ORDERS)
        .map(|i| order(n * ORDERS + i + 1, acct(i), time))
        .collect();
    if n > 0 {
        for i in 0..UPDATES {
            let mut o = order((n - 1) * ORDERS + i * (ORDERS / UPDATES) + 1, 0, time - 200);
            o.account = acct(i * (ORDERS / UPDATES));
            o.executed = o.orig_qty;
            o.status = OrdStatus::Filled;
            o.update_ms = time;
            orders.push(o);
        }
    }
    let trades = (0..TRADES)
        .map(|i| {
            let (maker, taker) = (acct(2 * i), acct(2 * i + 1));
            trade(n * TRADES + i + 1, maker, taker, time)
        })
        .collect();
    (orders, trades)
}

#[allow(clippy::float_arithmetic)] // times for the printout, not money
fn run(name: &str, accounts: u32, timed: u64) {
    let dir = tempfile::Builder::new()
        .prefix("history-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a temporary directory");
    let store = Store::open(&dir.path().join("api.sqlite")).expect("the history database");
    let mut conn = store.connect().expect("a connection");
    let mut times: Vec<Duration> = Vec::new();
    for n in 0..10 + timed {
        let (orders, trades) = commit(n, accounts);
        let t = Instant::now();
        Store::write_history(&mut conn, &orders, &trades, n + 1).expect("a history write");
        if n >= 10 {
            times.push(t.elapsed());
        }
    }
    times.sort();
    let per_order = |d: Duration| d.as_secs_f64() * 1e6 / (ORDERS + UPDATES) as f64;
    println!(
        "history write, {name} ({accounts} accounts): median {:.2} µs per order ({:.1} ms per \
         commit of {} orders and {TRADES} trades), best {:.2} µs per order",
        per_order(times[times.len() / 2]),
        times[times.len() / 2].as_secs_f64() * 1e3,
        ORDERS + UPDATES,
        per_order(times[0]),
    );
}

fn main() {
    let timed = std::env::var("MEDIATOR_HISTORY_COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    run("dense", 64, timed);
    run("sparse", 16_000, timed);
}
