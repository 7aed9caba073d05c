//! Throughput and latency of the sequencer with the toy bank, and the raw cost of a journal
//! sync on this machine. Ignored by default; run in release:
//! `cargo test --release -p matching-engine --test durability bench -- --ignored --nocapture`.

use crate::bank::{Bank, BankCmd};
use hdrhistogram::Histogram;
use matching_engine::bench::{run, BenchConfig};
use matching_engine::journal::JournalWriter;
use matching_engine::recovery::{Store, StoreConfig};
use matching_engine::sequencer::{Sequencer, SequencerConfig, SystemClock};
use matching_engine::Timestamp;
use std::time::Instant;

fn deposit(p: usize, n: u64) -> BankCmd {
    BankCmd::Deposit {
        account: p as u32,
        amount: 1,
        producer: p as u32,
        n,
    }
}

#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn bench_sequencer_with_the_toy_bank() {
    let mut sync_ns = Histogram::<u64>::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut journal = JournalWriter::create(dir.path(), 1).unwrap();
    for n in 1..=2_000u64 {
        journal.append(n, Timestamp(n), &deposit(0, n)).unwrap();
        let start = Instant::now();
        journal.sync().unwrap();
        sync_ns.record(start.elapsed().as_nanos() as u64).unwrap();
    }
    println!(
        "journal sync (write + fdatasync of one record): p50 {} us, p99 {} us, p99.9 {} us",
        sync_ns.value_at_quantile(0.5) / 1_000,
        sync_ns.value_at_quantile(0.99) / 1_000,
        sync_ns.value_at_quantile(0.999) / 1_000,
    );

    for durable in [false, true] {
        for producers in [1, 2] {
            for window in [1, 64] {
                let bank = Bank::new(2, 2);
                let config = SequencerConfig::default();
                let dir = tempfile::tempdir().unwrap();
                let seq = if durable {
                    let store = StoreConfig {
                        snapshot_every: 0,
                        snapshots_kept: 2,
                    };
                    let recovered = Store::open(dir.path(), store, || bank).unwrap();
                    Sequencer::durable(recovered, SystemClock, config).unwrap()
                } else {
                    Sequencer::volatile(bank, SystemClock, config).unwrap()
                };
                let commands_per_producer = match (durable, window) {
                    (true, 1) => 5_000,
                    _ => 200_000,
                };
                let bench = BenchConfig {
                    producers,
                    commands_per_producer,
                    window,
                };
                let report = run(seq.handle(), &bench, deposit);
                seq.shutdown().unwrap();
                assert_eq!(report.failed + report.rejected, 0);
                println!(
                    "{} producers={producers} window={window}: {}",
                    if durable { "durable " } else { "volatile" },
                    report.summary()
                );
            }
        }
    }
}
