//! Fan-out through the sequencer: a consumer that never reads is marked lagged while a fast one
//! receives every batch in order, and the engine keeps going.

use crate::bank::{Bank, BankCmd, BankEvent};
use matching_engine::fanout::RecvError;
use matching_engine::sequencer::{Outcome, Sequencer, SequencerConfig, StepClock};
use matching_engine::Timestamp;

#[test]
fn a_slow_consumer_lags_a_fast_one_gets_every_batch() {
    let seq = Sequencer::volatile(
        Bank::new(2, 1),
        StepClock {
            next: Timestamp(1),
            step: 1,
        },
        SequencerConfig {
            queue_capacity: 16,
            max_batch: 4,
            ..SequencerConfig::default()
        },
    )
    .unwrap();
    let mut slow = seq.subscribe(2).unwrap();
    // Room for every batch this test makes (at most one per command), so the fast consumer
    // cannot lag however the two cores are shared with other tests.
    let mut fast = seq.subscribe(4096).unwrap();
    let reader = std::thread::spawn(move || {
        let mut next_seq = 1;
        let mut events = 0u64;
        loop {
            match fast.recv() {
                Ok(batch) => {
                    assert_eq!(batch.first_seq, next_seq, "in order, without gaps");
                    assert!(batch.last_seq >= batch.first_seq);
                    next_seq = batch.last_seq + 1;
                    for (i, event) in batch.events.iter().enumerate() {
                        match *event {
                            BankEvent::Deposited { seq, .. } => {
                                assert_eq!(seq, batch.first_seq + i as u64)
                            }
                            ref other => panic!("unexpected {other:?}"),
                        }
                    }
                    events += batch.events.len() as u64;
                }
                Err(RecvError::Closed) => return (next_seq - 1, events),
                Err(e) => panic!("the fast consumer must not lag: {e}"),
            }
        }
    });

    const COMMANDS: u64 = 3_000;
    let mut producer = seq.producer();
    let mut accepted = 0;
    for n in 1..=COMMANDS {
        let cmd = BankCmd::Deposit {
            account: 0,
            amount: 1,
            producer: 0,
            n,
        };
        let reply = producer.submit_wait(cmd).unwrap();
        assert!(matches!(reply.outcome, Outcome::Accepted { .. }));
        accepted += 1;
    }
    assert_eq!(accepted, COMMANDS, "the engine kept going");
    let bank = seq.shutdown().unwrap();
    assert_eq!(bank.balance(0), COMMANDS);

    let (last_seq, events) = reader.join().unwrap();
    assert_eq!((last_seq, events), (COMMANDS, COMMANDS));

    // The slow consumer keeps the two batches it had room for, then learns what it missed.
    let first = slow.try_recv().unwrap().unwrap();
    let second = slow.try_recv().unwrap().unwrap();
    assert_eq!(second.first_seq, first.last_seq + 1);
    assert_eq!(
        slow.try_recv(),
        Err(RecvError::Lagged {
            missed_from_seq: second.last_seq + 1
        })
    );
}
