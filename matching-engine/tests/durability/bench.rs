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
                        ..StoreConfig::default()
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

#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn bench_recovery_check_then_replay() {
    let dir = tempfile::tempdir().unwrap();
    let records = 500_000u64;
    let mut journal = JournalWriter::create(dir.path(), 1).unwrap();
    for n in 1..=records {
        journal.append(n, Timestamp(n), &deposit(0, n)).unwrap();
        if n % 1_000 == 0 {
            journal.sync().unwrap();
        }
    }
    journal.sync().unwrap();
    let bytes = journal.file_len();
    drop(journal);
    let start = Instant::now();
    let check = matching_engine::journal::check_journal(dir.path()).unwrap();
    let check_ms = start.elapsed().as_secs_f64() * 1e3;
    assert!(check.damage().is_none());
    let start = Instant::now();
    let store = StoreConfig {
        snapshot_every: 0,
        snapshots_kept: 2,
        ..StoreConfig::default()
    };
    let r = Store::open(dir.path(), store, || Bank::new(1, 1)).unwrap();
    let open_ms = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(r.report.replayed, records);
    drop(r);
    // Damage near the start: the scan for intact records after it covers the whole file.
    let path = dir
        .path()
        .join(matching_engine::journal::segment_file_name(1));
    let mut file = std::fs::read(&path).unwrap();
    file[100] ^= 1;
    std::fs::write(&path, &file).unwrap();
    let start = Instant::now();
    let check = matching_engine::journal::check_journal(dir.path()).unwrap();
    let damaged_ms = start.elapsed().as_secs_f64() * 1e3;
    assert!(check.damage().is_some());
    println!(
        "recovery of {records} records ({} MB): check_journal {check_ms:.0} ms, Store::open \
         (check + replay) {open_ms:.0} ms; check_journal with damage at the start (scans the \
         rest) {damaged_ms:.0} ms",
        bytes / 1_000_000
    );
}
