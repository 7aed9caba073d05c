//! Custody benchmarks against a real regtest bitcoind (`BITCOIND_EXE`). One-shot wall-clock
//! measurements of whole operations, printed as a table:
//!
//! * applying 1,000 regtest blocks (100 of them paying deposits) to a wallet with 10,000 revealed
//!   deposit addresses, then crediting the deposits;
//! * building, signing and recording one batch of 100 withdrawals.
//!
//! Run: `BITCOIND_EXE=... cargo bench -p wallet --bench custody`.

#[path = "../tests/support/mod.rs"]
mod support;

use matching_engine::units::Amount;
use std::time::{Duration, Instant};
use support::{Customer, World};
use wallet::WithdrawalRequest;

fn ms(d: Duration) -> String {
    format!("{}.{:01} ms", d.as_millis(), d.subsec_micros() % 1000 / 100)
}

fn main() {
    let w = World::new();
    let alice = w.ledger.create_account();
    let mut config = w.config();
    config.batch.max_requests = 100;
    config.withdrawal.daily_limit = Amount(u64::MAX / 2);
    let mut svc = w.open(config);

    let t = Instant::now();
    let addresses = svc
        .new_deposit_addresses(alice, 10_000, w.clock.now())
        .unwrap();
    let reveal = t.elapsed();

    // 1,000 blocks: coinbases to a customer, then 100 deposits spread over the chain.
    let mut customer = Customer::new(42);
    customer.fund(&w.node, 2);
    for round in 0..10 {
        let outs: Vec<_> = (0..10)
            .map(|i| (&addresses[round * 997 + i * 7], 500_000u64))
            .collect();
        customer.pay(&w.node, &outs);
        w.node.mine(80);
        customer.sync(&w.node);
    }
    let height = w.node.height();
    w.node.mine(1_000 - height);
    assert_eq!(w.node.height(), 1_000);

    let t = Instant::now();
    let sync = svc.sync_once(w.clock.now()).unwrap();
    let apply = t.elapsed();
    assert_eq!(sync.blocks, 1_000);
    let t = Instant::now();
    let deposits = svc.process_deposits(w.clock.now()).unwrap();
    let credit = t.elapsed();
    assert_eq!(deposits.credited.len(), 100);

    // 100 withdrawals in one batch.
    let mut receiver = Customer::new(43);
    for i in 0..100 {
        let req = WithdrawalRequest {
            account: alice,
            address: receiver.address().to_string(),
            amount: Amount(20_000 + i),
            idempotency_key: format!("bench-{i}"),
            other_used: Amount(0),
        };
        svc.request_withdrawal(req, w.clock.now()).unwrap();
    }
    let t = Instant::now();
    let batch = svc
        .build_batch(w.clock.now())
        .unwrap()
        .expect("100 requests make a batch");
    let build = t.elapsed();
    assert_eq!(batch.withdrawals.len(), 100);
    let t = Instant::now();
    assert_eq!(svc.broadcast_pending(w.clock.now()).unwrap(), 1);
    let broadcast = t.elapsed();

    println!("custody benchmarks (one run each, wall clock)");
    println!(
        "  reveal and persist 10,000 deposit addresses (bulk) {}",
        ms(reveal)
    );
    println!(
        "  apply 1,000 blocks, 10,000 addresses (sync_once)  {}  ({} µs/block)",
        ms(apply),
        apply.as_micros() / 1_000
    );
    println!(
        "  find and credit 100 deposits (process_deposits)  {}",
        ms(credit)
    );
    println!(
        "  build, sign and record a 100-withdrawal batch     {}",
        ms(build)
    );
    println!(
        "  broadcast it                                      {}",
        ms(broadcast)
    );
}
