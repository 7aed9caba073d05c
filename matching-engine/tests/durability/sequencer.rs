//! The sequencer under load: every taken submission gets exactly one reply, in order; busy
//! answers change nothing; replies wait for the journal; failures still answer everyone.

use crate::bank::{Bank, BankCmd, BankEvent};
use matching_engine::journal::{list_segments, SegmentReader};
use matching_engine::recovery::{Recovered, Store, StoreConfig};
use matching_engine::sequencer::{
    Clock, Outcome, Sequencer, SequencerConfig, SequencerError, StepClock, SubmitError, Ticket,
};
use matching_engine::{RejectCode, StateMachine, Timestamp};
use std::collections::VecDeque;
use std::path::Path;

/// Handles move across threads.
const _: () = {
    const fn send<T: Send>() {}
    send::<matching_engine::sequencer::Producer<Bank>>();
    send::<matching_engine::sequencer::SequencerHandle<Bank>>();
    send::<matching_engine::sequencer::Reply<BankEvent>>();
    send::<matching_engine::fanout::Subscriber<BankEvent>>();
};

const PRODUCERS: u32 = 4;
const PER_PRODUCER: u64 = 10_000;

fn clock() -> StepClock {
    StepClock {
        next: Timestamp(1_000),
        step: 1,
    }
}

/// A durable sequencer with the default configuration on the store in `dir`.
fn durable_default(dir: &Path) -> Sequencer<Bank> {
    Sequencer::durable(
        open(dir, StoreConfig::default()),
        clock(),
        SequencerConfig::default(),
    )
    .unwrap()
}

fn open(dir: &Path, config: StoreConfig) -> Recovered<Bank> {
    Store::open(dir, config, || {
        Bank::new(PRODUCERS as usize, PRODUCERS as usize)
    })
    .unwrap()
}

/// Producer `p`'s command `n`: a deposit into its own account, except every fifth, an overdraft
/// that is rejected.
fn command(p: u32, n: u64) -> BankCmd {
    if n % 5 == 0 {
        BankCmd::Transfer {
            from: p,
            to: (p + 1) % PRODUCERS,
            amount: u64::MAX,
            producer: p,
            n,
        }
    } else {
        BankCmd::Deposit {
            account: p,
            amount: n,
            producer: p,
            n,
        }
    }
}

#[derive(Default)]
struct Tally {
    accepted: u64,
    rejected: u64,
    busy: u64,
}

/// Checks the outcome of producer `p`'s command `n`: a deposit is accepted after every earlier
/// one of `p` (`last_seq`) with its one event, an overdraft rejected.
fn check_outcome(
    p: u32,
    n: u64,
    outcome: Outcome<BankEvent>,
    last_seq: &mut u64,
    tally: &mut Tally,
) {
    match outcome {
        Outcome::Accepted { seq, events } => {
            assert_ne!(n % 5, 0, "only deposits are accepted");
            assert!(seq > *last_seq, "a producer's commands apply in its order");
            *last_seq = seq;
            match events[..] {
                [BankEvent::Deposited {
                    seq: event_seq,
                    account,
                    ..
                }] => assert_eq!((event_seq, account), (seq, p)),
                ref other => panic!("unexpected events {other:?}"),
            }
            tally.accepted += 1;
        }
        Outcome::Rejected(code) => {
            assert_eq!((n % 5, code), (0, RejectCode::InsufficientBalance));
            tally.rejected += 1;
        }
        other => panic!("unexpected outcome {other:?}"),
    }
}

/// Submits `command(p, 1..=PER_PRODUCER)`, pipelining, retrying busy answers, and checks each
/// reply against its submission.
fn hammer(seq: &Sequencer<Bank>, p: u32) -> Tally {
    let mut producer = seq.producer();
    let mut tally = Tally::default();
    // Submitted and not yet answered: (ticket, n).
    let mut waiting: VecDeque<(Ticket, u64)> = VecDeque::new();
    let mut last_seq = 0;
    let mut check = |reply: matching_engine::sequencer::Reply<BankEvent>,
                     waiting: &mut VecDeque<(Ticket, u64)>,
                     tally: &mut Tally| {
        let (ticket, n) = waiting.pop_front().expect("a reply answers a submission");
        assert_eq!(reply.ticket, ticket, "replies come in submission order");
        check_outcome(p, n, reply.outcome, &mut last_seq, tally);
    };
    let mut n = 1;
    while n <= PER_PRODUCER {
        match producer.try_submit(command(p, n)) {
            Ok(ticket) => {
                waiting.push_back((ticket, n));
                n += 1;
            }
            Err(e @ (SubmitError::Busy | SubmitError::InFlightLimit)) => {
                assert_eq!(e.reject_code(), Some(RejectCode::EngineBusy));
                tally.busy += 1;
                match producer.recv() {
                    Some(reply) => check(reply, &mut waiting, &mut tally),
                    None => std::thread::yield_now(),
                }
            }
            Err(e) => panic!("unexpected {e}"),
        }
        while let Some(reply) = producer.try_recv() {
            check(reply, &mut waiting, &mut tally);
        }
    }
    while let Some(reply) = producer.recv() {
        check(reply, &mut waiting, &mut tally);
    }
    assert!(waiting.is_empty(), "every submission was answered");
    assert!(producer.try_recv().is_none(), "and answered once");
    tally
}

/// [`hammer`] through [`SequencerHandle::submit_with`](matching_engine::sequencer::SequencerHandle::submit_with):
/// no producer, each reply handed to a function, which passes it to this thread.
fn hammer_with_functions(seq: &Sequencer<Bank>, p: u32) -> Tally {
    let handle = seq.handle().clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut tally = Tally::default();
    let mut taken = 0u64;
    let mut n = 1;
    while n <= PER_PRODUCER {
        let tx = tx.clone();
        match handle.submit_with(command(p, n), move |r| tx.send((n, r)).unwrap()) {
            Ok(()) => {
                taken += 1;
                n += 1;
            }
            Err(SubmitError::Busy) => {
                tally.busy += 1;
                std::thread::yield_now();
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    drop(tx);
    let mut answered = vec![false; PER_PRODUCER as usize + 1];
    let mut last_seq = 0;
    // Every function is called once and then dropped: the channel ends after the last one.
    for (n, reply) in rx {
        assert!(
            !std::mem::replace(&mut answered[n as usize], true),
            "{n} answered twice"
        );
        assert_eq!(reply.ticket, Ticket(0));
        check_outcome(p, n, reply.outcome, &mut last_seq, &mut tally);
    }
    assert_eq!(
        tally.accepted + tally.rejected,
        taken,
        "every submission answered"
    );
    tally
}

fn check_final_state(bank: &Bank, tallies: &[Tally]) {
    assert_eq!(bank.disorder(), 0);
    let deposits: u64 = (1..=PER_PRODUCER).filter(|n| n % 5 != 0).sum();
    for p in 0..PRODUCERS {
        assert_eq!(bank.balance(p), deposits, "busy answers changed nothing");
        assert_eq!(bank.last_n(p), PER_PRODUCER - 1);
    }
    let accepted: u64 = tallies.iter().map(|t| t.accepted).sum();
    assert_eq!(bank.seq(), accepted);
    assert_eq!(accepted, u64::from(PRODUCERS) * PER_PRODUCER * 4 / 5);
    let rejected: u64 = tallies.iter().map(|t| t.rejected).sum();
    assert_eq!(rejected, u64::from(PRODUCERS) * PER_PRODUCER / 5);
    let busy: u64 = tallies.iter().map(|t| t.busy).sum();
    assert!(busy > 0, "the queue was small enough to be full at times");
}

const SMALL: SequencerConfig = SequencerConfig {
    queue_capacity: 8,
    max_batch: 64,
    max_in_flight: 32,
    max_pending_subscriptions: 4,
    snapshot_on_shutdown: false,
};

fn run_hammer(seq: &Sequencer<Bank>) -> Vec<Tally> {
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..PRODUCERS)
            .map(|p| s.spawn(move || hammer(seq, p)))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

#[test]
fn producers_hammer_a_durable_sequencer() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        snapshot_every: 10_000,
        snapshots_kept: 2,
        ..StoreConfig::default()
    };
    let seq = Sequencer::durable(open(dir.path(), config), clock(), SMALL).unwrap();
    let tallies = run_hammer(&seq);
    let metrics = seq.handle().metrics();
    let bank = seq.shutdown().unwrap();
    check_final_state(&bank, &tallies);
    assert_eq!(metrics.applied, u64::from(PRODUCERS) * PER_PRODUCER);
    assert!(
        metrics.syncs < metrics.accepted,
        "group commit: {metrics:?}"
    );
    assert!(metrics.snapshots >= 2, "{metrics:?}");

    let recovered = open(dir.path(), config);
    assert_eq!(recovered.state.state_hash(), bank.state_hash());
    assert!(recovered.report.snapshot_seq.is_some());
}

/// Producers and reply functions side by side on a durable sequencer: each function's
/// submission is answered once, in order, with its own outcome.
#[test]
fn reply_functions_and_producers_hammer_a_durable_sequencer() {
    let dir = tempfile::tempdir().unwrap();
    let seq = Sequencer::durable(open(dir.path(), StoreConfig::default()), clock(), SMALL).unwrap();
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let seq = &seq;
        let threads: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                s.spawn(move || {
                    if p % 2 == 0 {
                        hammer_with_functions(seq, p)
                    } else {
                        hammer(seq, p)
                    }
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let metrics = seq.handle().metrics();
    let bank = seq.shutdown().unwrap();
    check_final_state(&bank, &tallies);
    assert_eq!(metrics.applied, u64::from(PRODUCERS) * PER_PRODUCER);
    let recovered = open(dir.path(), StoreConfig::default());
    assert_eq!(recovered.state.state_hash(), bank.state_hash());
}

/// A reply function that panics loses only its own answer: the engine goes on.
#[test]
fn a_panicking_reply_function_does_not_stop_the_engine() {
    let seq = Sequencer::volatile(Bank::new(4, 4), clock(), SequencerConfig::default()).unwrap();
    seq.handle()
        .submit_with(command(1, 1), |_| panic!("a caller's bug"))
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    seq.handle()
        .submit_with(command(1, 2), move |r| tx.send(r).unwrap())
        .unwrap();
    let reply = rx.recv().unwrap();
    assert!(
        matches!(reply.outcome, Outcome::Accepted { seq: 2, .. }),
        "{reply:?}"
    );
    let mut producer = seq.producer();
    assert!(matches!(
        producer.submit_wait(command(1, 3)).unwrap().outcome,
        Outcome::Accepted { seq: 3, .. }
    ));
    let bank = seq.shutdown().unwrap();
    assert_eq!(bank.seq(), 3);
}

#[test]
fn producers_hammer_a_volatile_sequencer() {
    let seq = Sequencer::volatile(
        Bank::new(PRODUCERS as usize, PRODUCERS as usize),
        clock(),
        SMALL,
    )
    .unwrap();
    let tallies = run_hammer(&seq);
    let bank = seq.shutdown().unwrap();
    check_final_state(&bank, &tallies);
}

/// Counts the records in the store's journal files.
fn journaled(dir: &Path) -> u64 {
    let mut records = 0;
    for (first, path) in list_segments(dir).unwrap() {
        let mut r = SegmentReader::open(&path, first).unwrap();
        while r.next_record().unwrap().is_some() {
            records += 1;
        }
    }
    records
}

#[test]
fn a_reply_is_sent_only_after_its_record_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let seq = durable_default(dir.path());
    let mut producer = seq.producer();
    for n in 1..=200 {
        let reply = producer.submit_wait(command(0, n)).unwrap();
        match reply.outcome {
            Outcome::Accepted { seq, .. } => assert!(journaled(dir.path()) >= seq),
            Outcome::Rejected(_) => {}
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    producer.try_submit(command(0, 201)).unwrap();
    assert_eq!(
        producer.submit_wait(command(0, 202)).err(),
        Some(SubmitError::RepliesPending)
    );
    drop(seq);
    // The sequencer answered the last submission before it stopped.
    assert!(matches!(
        producer.recv().unwrap().outcome,
        Outcome::Accepted { .. }
    ));
    assert_eq!(
        producer.try_submit(command(0, 203)).err(),
        Some(SubmitError::Stopped)
    );
}

/// A clock that jumps back every other reading.
struct Jumpy(u64);

impl Clock for Jumpy {
    fn now(&mut self) -> Timestamp {
        self.0 += 1;
        Timestamp(if self.0 % 2 == 0 {
            1_000 - self.0
        } else {
            1_000 + self.0
        })
    }
}

#[test]
fn journaled_time_comes_from_the_clock_and_never_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let seq = Sequencer::durable(
        open(dir.path(), StoreConfig::default()),
        Jumpy(0),
        SequencerConfig::default(),
    )
    .unwrap();
    let mut producer = seq.producer();
    for n in 1..=20 {
        producer.submit_wait(command(1, n)).unwrap();
    }
    let bank = seq.shutdown().unwrap();
    let mut times = Vec::new();
    for (first, path) in list_segments(dir.path()).unwrap() {
        let mut r = SegmentReader::open(&path, first).unwrap();
        while r.next_record().unwrap().is_some() {
            times.push(r.decode_time().unwrap());
        }
    }
    assert_eq!(times.len() as u64, bank.seq());
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert_eq!(times[0], Timestamp(1_001));
    let recovered = open(dir.path(), StoreConfig::default());
    assert_eq!(recovered.state.state_hash(), bank.state_hash());
}

#[test]
fn snapshots_on_request_and_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let config = SequencerConfig {
        snapshot_on_shutdown: true,
        ..SequencerConfig::default()
    };
    let seq =
        Sequencer::durable(open(dir.path(), StoreConfig::default()), clock(), config).unwrap();
    let mut producer = seq.producer();
    for n in 1..=10 {
        producer.submit_wait(command(2, n)).unwrap();
    }
    seq.handle().request_snapshot();
    for n in 11..=20 {
        producer.submit_wait(command(2, n)).unwrap();
    }
    let bank = seq.shutdown().unwrap();
    let recovered = open(dir.path(), StoreConfig::default());
    assert_eq!(recovered.report.snapshot_seq, Some(bank.seq()));
    assert_eq!(recovered.report.replayed, 0);
    assert_eq!(recovered.state.state_hash(), bank.state_hash());
}

#[test]
fn a_panicking_state_machine_still_answers_every_submission() {
    let seq = Sequencer::volatile(Bank::new(4, 4), clock(), SequencerConfig::default()).unwrap();
    let mut producer = seq.producer();
    assert!(matches!(
        producer.submit_wait(command(3, 1)).unwrap().outcome,
        Outcome::Accepted { .. }
    ));
    let mut taken = 0;
    for n in 2..=50 {
        let cmd = if n == 10 {
            BankCmd::Explode { producer: 3, n }
        } else {
            command(3, n)
        };
        match producer.try_submit(cmd) {
            Ok(_) => taken += 1,
            Err(SubmitError::Stopped) => break,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let mut answered = 0;
    let mut failed = 0;
    while let Some(reply) = producer.recv() {
        answered += 1;
        if matches!(reply.outcome, Outcome::Indeterminate | Outcome::NotApplied) {
            failed += 1;
        }
    }
    assert_eq!(answered, taken);
    assert!(failed > 0);
    assert!(matches!(seq.shutdown(), Err(SequencerError::Panicked)));
}

/// The journal fails under reply functions: each taken one is called exactly once, the failed
/// command's with `Indeterminate`, and only commands before it were accepted.
#[test]
fn a_journal_failure_answers_every_reply_function() {
    let dir = tempfile::tempdir().unwrap();
    let seq = durable_default(dir.path());
    let handle = seq.handle().clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut taken = Vec::new();
    for n in 1..=200 {
        let cmd = if n == 100 {
            BankCmd::Unjournalable {
                producer: 0,
                n,
                poison: (),
            }
        } else {
            command(0, n)
        };
        let tx = tx.clone();
        match handle.submit_with(cmd, move |r| tx.send((n, r.outcome)).unwrap()) {
            Ok(()) => taken.push(n),
            Err(SubmitError::Stopped) => break,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    drop(tx);
    let answers: Vec<(u64, Outcome<BankEvent>)> = rx.into_iter().collect();
    let mut answered: Vec<u64> = answers.iter().map(|a| a.0).collect();
    answered.sort_unstable();
    assert_eq!(
        answered, taken,
        "each taken submission answered exactly once"
    );
    let mut accepted = 0;
    for (n, outcome) in &answers {
        match outcome {
            Outcome::Accepted { .. } => {
                assert!(*n < 100, "nothing after the failure is applied");
                accepted += 1;
            }
            Outcome::Indeterminate => {}
            Outcome::Rejected(_) | Outcome::NotApplied => assert_ne!(*n, 100),
        }
    }
    assert!(
        answers
            .iter()
            .any(|(n, o)| *n == 100 && matches!(o, Outcome::Indeterminate)),
        "the failed command is indeterminate"
    );
    assert!(seq.shutdown().is_err());
    let recovered = open(dir.path(), StoreConfig::default());
    assert_eq!(recovered.state.seq(), accepted);
}

#[test]
fn a_journal_failure_stops_the_engine_and_answers_everyone() {
    let dir = tempfile::tempdir().unwrap();
    let seq = durable_default(dir.path());
    let mut producer = seq.producer();
    for n in 1..=4 {
        producer.submit_wait(command(0, n)).unwrap();
    }
    let mut poison_ticket = None;
    for n in 5..=40 {
        let cmd = if n == 8 {
            BankCmd::Unjournalable {
                producer: 0,
                n,
                poison: (),
            }
        } else {
            command(0, n)
        };
        match producer.try_submit(cmd) {
            Ok(ticket) if n == 8 => poison_ticket = Some(ticket),
            Ok(_) => {}
            Err(SubmitError::Stopped) => break,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let mut accepted = 4;
    let mut poison_answered = false;
    while let Some(reply) = producer.recv() {
        let is_poison = Some(reply.ticket) == poison_ticket;
        match reply.outcome {
            Outcome::Accepted { .. } => {
                assert!(
                    Some(reply.ticket) < poison_ticket,
                    "nothing after it is applied"
                );
                accepted += 1;
            }
            Outcome::Indeterminate => poison_answered |= is_poison,
            Outcome::Rejected(_) | Outcome::NotApplied => assert!(!is_poison),
        }
    }
    assert!(poison_answered, "the failed command is indeterminate");
    assert_eq!(
        producer.try_submit(command(0, 41)).err(),
        Some(SubmitError::Stopped)
    );
    assert_eq!(
        seq.handle().submit_with(command(0, 42), |_| {}).err(),
        Some(SubmitError::Stopped)
    );
    assert!(matches!(
        seq.shutdown(),
        Err(SequencerError::Journal(
            matching_engine::journal::JournalError::Encode { .. }
        ))
    ));
    // Exactly the commands answered as accepted survive: the failed batch never reached the file.
    let recovered = open(dir.path(), StoreConfig::default());
    assert_eq!(recovered.state.seq(), accepted);
}

#[test]
fn a_failed_fdatasync_stops_the_engine_without_accepting_the_batch() {
    for durable_batches in [0u64, 3] {
        let dir = tempfile::tempdir().unwrap();
        let mut recovered = open(dir.path(), StoreConfig::default());
        recovered.store.inject_sync_failure(durable_batches);
        let config = SequencerConfig {
            max_batch: 4,
            ..SequencerConfig::default()
        };
        let seq = Sequencer::durable(recovered, clock(), config).unwrap();
        let handle = seq.handle().clone();
        let mut producer = seq.producer();
        for n in 1..=durable_batches {
            let reply = producer.submit_wait(command(0, n * 10 + 1)).unwrap();
            assert!(matches!(reply.outcome, Outcome::Accepted { .. }));
        }
        assert!(!handle.has_stopped());
        let mut taken = 0;
        for n in 0..200 {
            match producer.try_submit(command(0, 1_000 + n)) {
                Ok(_) => taken += 1,
                Err(SubmitError::Stopped) => break,
                Err(SubmitError::Busy | SubmitError::InFlightLimit) => break,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(taken > 0);
        let mut indeterminate = 0;
        while let Some(reply) = producer.recv() {
            match reply.outcome {
                Outcome::Accepted { .. } => panic!("a command of a batch whose sync failed"),
                Outcome::Indeterminate => indeterminate += 1,
                Outcome::Rejected(_) | Outcome::NotApplied => {}
            }
        }
        assert!(indeterminate > 0, "the failed batch is indeterminate");
        assert!(handle.has_stopped(), "the engine stopped on its own");
        assert_eq!(
            producer.try_submit(command(0, 5_000)).err(),
            Some(SubmitError::Stopped)
        );
        match seq.shutdown() {
            Err(SequencerError::Journal(matching_engine::journal::JournalError::Io {
                source,
                ..
            })) => assert!(source.to_string().contains("fdatasync")),
            other => panic!("expected the sync error, got {other:?}"),
        }
        // Every acknowledged command survives; the failed batch may or may not.
        let again = open(dir.path(), StoreConfig::default());
        assert!(again.state.seq() >= durable_batches);
    }
}

#[test]
fn a_state_that_fails_its_invariant_check_is_not_snapshotted_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let config = SequencerConfig {
        snapshot_on_shutdown: true,
        ..SequencerConfig::default()
    };
    let seq =
        Sequencer::durable(open(dir.path(), StoreConfig::default()), clock(), config).unwrap();
    let mut producer = seq.producer();
    for n in 1..=5 {
        producer.submit_wait(command(2, n)).unwrap();
    }
    assert!(!seq.handle().invariants_broken());
    // Out of order: the bank's invariant breaks (as a bug in the state machine would).
    producer.submit_wait(command(2, 3)).unwrap();
    seq.handle().request_snapshot();
    producer.submit_wait(command(2, 6)).unwrap();
    assert!(seq.handle().invariants_broken());
    let bank = seq.shutdown().unwrap();
    // Neither the requested snapshot nor the one at shutdown was written: recovery replays the
    // journal, which is the record.
    let recovered = open(dir.path(), StoreConfig::default());
    assert_eq!(recovered.report.snapshot_seq, None);
    assert_eq!(recovered.state.state_hash(), bank.state_hash());
}
