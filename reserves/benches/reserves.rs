//! The liabilities tree over 100,000 accounts, one inclusion proof (build + verify), and
//! `audit verify` over 1,000,000 entries (in memory: the chain walk, not the disk).
//!
//! `cargo bench -p reserves --bench reserves`

use criterion::{criterion_group, criterion_main, Criterion};
use reserves::{auditlog, liabilities};
use std::hint::black_box;
use std::time::Duration;

fn balances(n: u32) -> Vec<(u32, u64)> {
    (0..n)
        .map(|a| (a, 1 + (a as u64 * 7919) % 100_000_000))
        .collect()
}

fn tree(c: &mut Criterion) {
    let secret = [7u8; 32];
    let b = balances(100_000);
    let mut g = c.benchmark_group("liabilities");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.bench_function("build_100k_accounts", |x| {
        x.iter(|| liabilities::Tree::build(&secret, 1, "BTC", black_box(&b)).unwrap())
    });
    let t = liabilities::Tree::build(&secret, 1, "BTC", &b).unwrap();
    g.bench_function("prove_one_of_100k", |x| {
        x.iter(|| t.prove(black_box(4242), None).unwrap())
    });
    let p = t.prove(4242, None).unwrap();
    g.bench_function("verify_one_of_100k", |x| {
        x.iter(|| liabilities::verify(black_box(&p)).unwrap())
    });
    g.finish();
}

fn audit(c: &mut Criterion) {
    let mut log = Vec::with_capacity(200 << 20);
    let mut prev = [0u8; 32];
    for seq in 1..=1_000_000u64 {
        let line = auditlog::entry_line(
            seq,
            1_700_000_000_000 + seq,
            "admin",
            "account.credit",
            serde_json::json!({"account": seq % 1000, "asset": "BTC", "amount": "100000"}),
            &prev,
        );
        prev = auditlog::line_hash(&line);
        log.extend_from_slice(&line);
        log.push(b'\n');
    }
    let mut g = c.benchmark_group("audit");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("verify_1m_entries", |x| {
        x.iter(|| {
            let r = auditlog::verify(black_box(&log[..])).unwrap();
            assert!(r.ok() && r.last_seq == 1_000_000);
        })
    });
    g.finish();
}

criterion_group!(benches, tree, audit);
criterion_main!(benches);
