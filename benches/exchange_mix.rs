//! The exchange-core workload through the full engine (risk checks, ledger and matching) via
//! `Engine::apply`: see `support/exchange_mix.rs` for the setup and the command mix (9% GTC,
//! 3% IOC, 6% cancel, 82% amend; 1,000 accounts; about 1,000 resting orders over 750 levels).
//!
//! Each iteration applies the same commands to a fresh engine built by the same setup (outside
//! the timing), reusing one events `Vec`. Throughput is in commands: the reported elem/s are
//! ops/s.
//!
//! Run: `cargo bench --bench exchange_mix`.

#[path = "support/exchange_mix.rs"]
mod exchange_mix;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use exchange_mix::{apply_all, engine_after, generate, kind, Kind, RESTING};
use matching_engine::MarketId;
use std::collections::BTreeMap;
use std::hint::black_box;

const SEED: u64 = 1;
const COMMANDS: usize = 200_000;

fn exchange(c: &mut Criterion) {
    let w = generate(SEED, COMMANDS);
    let first = w.setup.len() as u64;

    // Once, outside the timing: the replay is deterministic and the book keeps its size.
    let mut kinds = BTreeMap::<Kind, u64>::new();
    for cmd in &w.mix {
        *kinds.entry(kind(cmd)).or_default() += 1;
    }
    let mut events = Vec::with_capacity(4096);
    let mut engine = engine_after(&w.setup);
    let start_len = engine.book(MarketId(0)).map_or(0, |b| b.len());
    let mut rejects = BTreeMap::<String, u64>::new();
    for (i, cmd) in w.mix.iter().enumerate() {
        events.clear();
        let now = matching_engine::Timestamp(exchange_mix::T0.0 + first + i as u64);
        if let Err(code) = engine.apply(cmd, now, &mut events) {
            *rejects.entry(format!("{code:?}")).or_default() += 1;
        }
    }
    let rejected: u64 = rejects.values().sum();
    let book = engine.book(MarketId(0)).expect("market 0");
    let levels = book.levels(matching_engine::Side::Buy).count()
        + book.levels(matching_engine::Side::Sell).count();
    println!(
        "exchange mix: {} setup + {} commands {kinds:?}; rejected {rejects:?}; book {start_len} -> {} \
         orders (target {RESTING}) on {levels} levels",
        w.setup.len(),
        w.mix.len(),
        book.len(),
    );
    engine.check_invariants();
    let mut again = engine_after(&w.setup);
    assert_eq!(apply_all(&mut again, &w.mix, first, &mut events), rejected);
    assert_eq!(
        again.state_hash(),
        engine.state_hash(),
        "replay is deterministic"
    );

    let mut group = c.benchmark_group("exchange");
    group.throughput(Throughput::Elements(w.mix.len() as u64));
    group.sample_size(10);
    group.bench_function("mix", |b| {
        b.iter_batched(
            || engine_after(&w.setup),
            |mut engine| {
                black_box(apply_all(
                    &mut engine,
                    black_box(&w.mix),
                    first,
                    &mut events,
                ));
                engine
            },
            BatchSize::PerIteration,
        )
    });
    // The release-mode ledger auditor (api::audit) on the same commands' events: it runs on the
    // read model's thread, not the engine's, so the engine's numbers above do not include it;
    // this is its own cost per command, to compare with the engine's.
    let mut engine = engine_after(&w.setup);
    let mut batches = Vec::with_capacity(w.mix.len());
    for (i, cmd) in w.mix.iter().enumerate() {
        events.clear();
        let before = engine.seq();
        let now = matching_engine::Timestamp(exchange_mix::T0.0 + first + i as u64);
        let _ = engine.apply(cmd, now, &mut events);
        if engine.seq() != before {
            batches.push(api::EventBatch {
                seq: engine.seq(),
                time: now,
                events: events.clone().into(),
            });
        }
    }
    let seeded = api::audit::Auditor::seed(&engine_after(&w.setup));
    group.bench_function("auditor", |b| {
        b.iter_batched(
            || seeded.clone(),
            |mut auditor| {
                for batch in &batches {
                    auditor
                        .fold(black_box(batch))
                        .expect("the engine conserves money");
                }
                auditor
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, exchange);
criterion_main!(benches);
