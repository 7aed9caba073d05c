//! A reusable benchmark driver: producer threads push a command stream through a running
//! [`Sequencer`](crate::sequencer::Sequencer) and record submit-to-reply latency in an HDR
//! histogram. With a durable sequencer the reply comes after `fdatasync`, so this is
//! submit-to-durable-reply latency.
//!
//! ```no_run
//! # fn demo<S: matching_engine::StateMachine + Send + 'static>(
//! #     genesis: impl FnOnce() -> S,
//! #     make_command: impl Fn(usize, u64) -> S::Command + Sync,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! use matching_engine::bench::{run, BenchConfig};
//! use matching_engine::recovery::{Store, StoreConfig};
//! use matching_engine::sequencer::{Sequencer, SequencerConfig, SystemClock};
//!
//! let dir = tempfile::tempdir()?;
//! let recovered = Store::open(dir.path(), StoreConfig::default(), genesis)?;
//! let sequencer = Sequencer::durable(recovered, SystemClock, SequencerConfig::default())?;
//! let config = BenchConfig { producers: 2, commands_per_producer: 100_000, window: 64 };
//! let report = run(sequencer.handle(), &config, make_command);
//! println!("{}", report.summary());
//! sequencer.shutdown()?;
//! # Ok(())
//! # }
//! ```
//!
//! Each producer keeps up to `window` submissions in flight (`window = 1` is a closed loop:
//! submit, wait, repeat). Latency runs from the `try_submit` that took the command to the
//! receipt of its reply; a `Busy` answer is counted and the command retried after a reply is
//! received, so queueing time before a successful submit is not in the histogram.

use crate::sequencer::{Outcome, Producer, SequencerHandle, SubmitError};
use crate::StateMachine;
use hdrhistogram::Histogram;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BenchConfig {
    /// Producer threads.
    pub producers: usize,
    /// Commands each producer submits.
    pub commands_per_producer: u64,
    /// Most submissions a producer keeps in flight (clamped to the sequencer's
    /// `max_in_flight`).
    pub window: usize,
}

/// What was measured.
#[derive(Debug)]
pub struct BenchReport {
    /// Wall time from the first submission to the last reply.
    pub elapsed: Duration,
    /// Commands answered.
    pub commands: u64,
    /// Of those, accepted.
    pub accepted: u64,
    /// Of those, rejected by the state machine.
    pub rejected: u64,
    /// Of those, not applied or indeterminate (the sequencer stopped).
    pub failed: u64,
    /// `Busy` or in-flight-limit answers (each retried).
    pub busy: u64,
    /// Group commits during the run.
    pub batches: u64,
    /// Journal syncs during the run (zero when not durable).
    pub syncs: u64,
    /// Submit-to-reply latency in nanoseconds.
    pub latency_ns: Histogram<u64>,
}

impl BenchReport {
    /// Commands answered per second.
    pub fn commands_per_sec(&self) -> u64 {
        let nanos = self.elapsed.as_nanos().max(1);
        u64::try_from(u128::from(self.commands) * 1_000_000_000 / nanos).unwrap_or(u64::MAX)
    }

    /// Mean commands per group commit.
    pub fn mean_batch(&self) -> u64 {
        self.commands / self.batches.max(1)
    }

    /// One line: throughput, latency percentiles in microseconds, batching.
    pub fn summary(&self) -> String {
        let us = |q: f64| self.latency_ns.value_at_quantile(q) / 1_000;
        format!(
            "{} cmd/s; latency p50 {} us, p99 {} us, p99.9 {} us, max {} us; \
             {} commands ({} accepted, {} rejected, {} failed), {} busy, \
             {} batches (mean {}), {} syncs",
            self.commands_per_sec(),
            us(0.5),
            us(0.99),
            us(0.999),
            self.latency_ns.max() / 1_000,
            self.commands,
            self.accepted,
            self.rejected,
            self.failed,
            self.busy,
            self.batches,
            self.mean_batch(),
            self.syncs,
        )
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// Runs `config.producers` threads, each submitting `command(producer, n)` for `n` in
/// `1..=commands_per_producer`, and waits for every reply.
pub fn run<S: StateMachine>(
    handle: &SequencerHandle<S>,
    config: &BenchConfig,
    command: impl Fn(usize, u64) -> S::Command + Sync,
) -> BenchReport {
    assert!(config.producers > 0 && config.window > 0);
    let window = config.window.min(handle.config().max_in_flight);
    let before = handle.metrics();
    let start = Instant::now();
    let command = &command;
    let parts: Vec<BenchReport> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..config.producers)
            .map(|p| {
                let handle = handle.clone();
                scope.spawn(move || {
                    produce(&handle, p, config.commands_per_producer, window, command)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("producer thread panicked"))
            .collect()
    });
    let elapsed = start.elapsed();
    let after = handle.metrics();
    let mut total = BenchReport {
        elapsed,
        commands: 0,
        accepted: 0,
        rejected: 0,
        failed: 0,
        busy: 0,
        batches: after.batches - before.batches,
        syncs: after.syncs - before.syncs,
        latency_ns: histogram(),
    };
    for part in parts {
        total.commands += part.commands;
        total.accepted += part.accepted;
        total.rejected += part.rejected;
        total.failed += part.failed;
        total.busy += part.busy;
        total
            .latency_ns
            .add(&part.latency_ns)
            .expect("same histogram bounds");
    }
    total
}

fn produce<S: StateMachine>(
    handle: &SequencerHandle<S>,
    p: usize,
    commands: u64,
    window: usize,
    command: &(impl Fn(usize, u64) -> S::Command + Sync),
) -> BenchReport {
    let mut producer = handle.producer();
    let mut sent_at: VecDeque<Instant> = VecDeque::with_capacity(window);
    let mut part = BenchReport {
        elapsed: Duration::ZERO,
        commands: 0,
        accepted: 0,
        rejected: 0,
        failed: 0,
        busy: 0,
        batches: 0,
        syncs: 0,
        latency_ns: histogram(),
    };
    fn receive<S: StateMachine>(
        producer: &mut Producer<S>,
        sent_at: &mut VecDeque<Instant>,
        part: &mut BenchReport,
    ) {
        let reply = producer.recv().expect("a submission is in flight");
        let sent = sent_at
            .pop_front()
            .expect("replies come in submission order");
        let nanos = u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX);
        part.latency_ns.saturating_record(nanos.max(1));
        part.commands += 1;
        match reply.outcome {
            Outcome::Accepted { .. } => part.accepted += 1,
            Outcome::Rejected(_) => part.rejected += 1,
            Outcome::NotApplied | Outcome::Indeterminate => part.failed += 1,
        }
    }
    let mut n = 1;
    while n <= commands {
        if producer.in_flight() >= window {
            receive(&mut producer, &mut sent_at, &mut part);
            continue;
        }
        let now = Instant::now();
        match producer.try_submit(command(p, n)) {
            Ok(_) => {
                sent_at.push_back(now);
                n += 1;
            }
            Err(SubmitError::Busy | SubmitError::InFlightLimit) => {
                part.busy += 1;
                if producer.in_flight() > 0 {
                    receive(&mut producer, &mut sent_at, &mut part);
                } else {
                    std::thread::yield_now();
                }
            }
            Err(_) => break,
        }
    }
    while producer.in_flight() > 0 {
        receive(&mut producer, &mut sent_at, &mut part);
    }
    part
}
