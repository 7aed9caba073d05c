//! The BIP-127 proof of reserves over 1,000 UTXOs of a real custody wallet on regtest
//! (`BITCOIND_EXE`): the wallet's `prove_reserves` (build, sign 1,000 inputs SIGHASH_ALL,
//! finalize, self-check) and an auditor's offline `reserves::por::verify_psbt` of the result.
//!
//! Run: `BITCOIND_EXE=... cargo bench -p wallet --bench reserves`.

#[path = "../tests/support/mod.rs"]
mod support;

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::Duration;
use support::{Customer, World};

fn prove(c: &mut Criterion) {
    let w = World::new();
    let alice = w.ledger.create_account();
    let mut svc = w.open(w.config());
    let addresses = svc
        .new_deposit_addresses(alice, 1_000, w.clock.now())
        .unwrap();
    let mut customer = Customer::new(44);
    customer.fund(&w.node, 2);
    for chunk in addresses.chunks(250) {
        let outs: Vec<_> = chunk.iter().map(|a| (a, 20_000u64)).collect();
        customer.pay(&w.node, &outs);
    }
    w.node.mine(1);
    svc.step(w.clock.now()).unwrap();
    let message = "Mediator reserves benchmark: 1,000 UTXOs";
    let proof = svc.prove_reserves(message).unwrap();
    assert_eq!(proof.utxos, 1_000);
    assert_eq!(proof.reserves.0, 20_000_000);

    let mut g = c.benchmark_group("reserves");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("prove_1000_utxos", |b| {
        b.iter(|| svc.prove_reserves(black_box(message)).unwrap())
    });
    g.bench_function("verify_psbt_1000_inputs", |b| {
        b.iter(|| reserves::por::verify_psbt(black_box(&proof.psbt), message).unwrap())
    });
    g.finish();
}

criterion_group!(benches, prove);
criterion_main!(benches);
