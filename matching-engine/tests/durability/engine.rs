//! The real engine through the durable sequencer: concurrent producers, GTD expiries that precede
//! a rejected command, shutdown, and recovery to the same state hash.

use matching_engine::config::{BTC, USD};
use matching_engine::recovery::{Recovered, Store, StoreConfig};
use matching_engine::sequencer::{Outcome, Sequencer, SequencerConfig, StepClock};
use matching_engine::*;

fn order(a: u32, side: Side, price: u64, qty: u64, tif: TimeInForce) -> Command {
    Command::NewOrder(NewOrder {
        account: AccountId(a),
        market: MarketId(0),
        side,
        order_type: OrderType::Limit {
            price: Price(price),
            qty: Qty(qty),
        },
        tif,
        post_only: false,
        stp: StpMode::None,
        client_id: None,
    })
}

#[test]
fn engine_recovers_to_the_same_hash_including_expiries_before_rejections() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        snapshot_every: 150,
        snapshots_kept: 2,
        ..StoreConfig::default()
    };
    let genesis = || Engine::new(EngineConfig::default()).unwrap();
    let recovered = Store::open(dir.path(), config, genesis).unwrap();
    // Each clock reading advances 1 ms, so time is a pure function of the command order.
    let clock = StepClock {
        next: Timestamp(1_000_000_000),
        step: 1_000_000,
    };
    let seq = Sequencer::durable(recovered, clock, SequencerConfig::default()).unwrap();
    let mut events = seq.subscribe(1 << 16).unwrap();
    let mut p = seq.producer();
    for i in 1..=4u32 {
        p.submit_wait(Command::CreateAccount).unwrap();
        for (asset, amount) in [(BTC, 1u64 << 36), (USD, 1u64 << 52)] {
            let key = IdempotencyKey::reference(&format!("fund-{i}-{}", asset.0));
            let r = p
                .submit_wait(Command::Credit {
                    account: AccountId(i),
                    asset,
                    amount: Amount(amount),
                    key,
                })
                .unwrap();
            assert!(matches!(r.outcome, Outcome::Accepted { .. }), "{r:?}");
        }
    }
    // Two producers trade concurrently.
    let handle = seq.handle().clone();
    let threads: Vec<_> = (0..2u32)
        .map(|t| {
            let mut p = handle.producer();
            std::thread::spawn(move || {
                let mut accepted = 0;
                for i in 0..300u64 {
                    let side = if (i + u64::from(t)) % 2 == 0 {
                        Side::Buy
                    } else {
                        Side::Sell
                    };
                    let price = 5_000_000 + (i * 7919 % 200) - 100;
                    let r = p
                        .submit_wait(order(
                            1 + t * 2 + (i % 2) as u32,
                            side,
                            price,
                            5 + i % 20,
                            TimeInForce::Gtc,
                        ))
                        .unwrap();
                    if matches!(r.outcome, Outcome::Accepted { .. }) {
                        accepted += 1;
                    }
                }
                accepted
            })
        })
        .collect();
    let accepted: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(accepted > 500, "most orders are accepted: {accepted}");
    // Last: a GTD bid that expires a few clock readings from now, then only rejected commands.
    // Nothing accepted follows, so unless the rejected command that carried the expiry was
    // journaled, recovery would bring the order back and the hash would differ.
    let now = engine_now(&mut p);
    let expiry = now + 5_000_000;
    let gtd = match p
        .submit_wait(order(
            1,
            Side::Buy,
            4_000_000,
            10,
            TimeInForce::Gtd(Timestamp(expiry)),
        ))
        .unwrap()
        .outcome
    {
        Outcome::Accepted { events, .. } => match events[0] {
            Event::Accepted {
                order: Some(id), ..
            } => id,
            ref e => panic!("{e:?}"),
        },
        o => panic!("{o:?}"),
    };
    // Rejected commands until the expiry time has passed; the one at that time carries it.
    let mut rejected_with_expiry = false;
    for _ in 0..20 {
        let r = p
            .submit_wait(Command::Cancel {
                account: AccountId(2),
                market: MarketId(0),
                order: OrderRef::Id(OrderId(999_999)),
            })
            .unwrap();
        assert!(matches!(
            r.outcome,
            Outcome::Rejected(RejectCode::UnknownOrder)
        ));
    }
    drop(p);
    let engine = seq.shutdown().unwrap();
    assert!(
        engine.order(MarketId(0), gtd).is_none(),
        "the GTD order expired"
    );
    // The expiry was published (it happened inside a rejected command).
    while let Ok(Some(batch)) = events.try_recv() {
        if batch.events.iter().any(|e| matches!(e, Event::OrderDone { info, reason: DoneReason::Expired, .. } if info.order == gtd)) {
            rejected_with_expiry = true;
        }
    }
    assert!(rejected_with_expiry, "the expiry's events were published");
    engine.check_invariants();
    let hash = engine.state_hash();
    let again = Store::open(dir.path(), config, genesis).unwrap();
    assert_eq!(
        again.state.state_hash(),
        hash,
        "recovery reaches the state from before the stop"
    );
    assert_eq!(again.state.seq(), engine.seq());
    assert!(
        again.report.snapshot_seq.is_some(),
        "snapshots were taken every 150 commands"
    );
    again.state.check_invariants();
}

/// The engine's time after one more (rejected) command: clock readings are 1 ms apart.
fn engine_now(p: &mut matching_engine::sequencer::Producer<Engine>) -> u64 {
    let r = p.submit_wait(Command::Tick).unwrap();
    match r.outcome {
        Outcome::Accepted { events, .. } => match events[0] {
            Event::Accepted { time, .. } => time.0,
            ref e => panic!("{e:?}"),
        },
        o => panic!("{o:?}"),
    }
}

/// Rewrites the snapshot at `path` with `tamper` applied to its decoded contents, with a valid
/// header and checksum: only its meaning is wrong.
fn tamper_snapshot(path: &std::path::Path, tamper: impl FnOnce(&mut EngineSnapshot)) {
    use matching_engine::snapshot::SNAPSHOT_HEADER_BYTES;
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).unwrap();
    let (header, payload) = bytes.split_at(SNAPSHOT_HEADER_BYTES);
    let mut s: EngineSnapshot = postcard::from_bytes(payload).unwrap();
    tamper(&mut s);
    let payload = postcard::to_stdvec(&s).unwrap();
    let mut header = header.to_vec();
    header[20..28].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    // Format 5's checksum: the header's fields, then the payload.
    let digest = Sha256::new()
        .chain_update(&header[..28])
        .chain_update(&payload)
        .finalize();
    header[28..60].copy_from_slice(&digest);
    header.extend_from_slice(&payload);
    std::fs::write(path, header).unwrap();
}

#[test]
fn an_inconsistent_snapshot_is_refused_and_recovery_falls_back_to_the_previous_one() {
    let config = StoreConfig {
        snapshot_every: 0,
        snapshots_kept: 2,
        ..StoreConfig::default()
    };
    let genesis = || Engine::new(EngineConfig::default()).unwrap();
    type Tamper = fn(&mut EngineSnapshot);
    let cases: [(&str, Tamper); 4] = [
        ("an available balance grew", |s| {
            s.balances[2].available += 1
        }),
        ("a held balance no order holds", |s| {
            s.balances[2].held += 1;
            s.totals[0].credited += 1;
        }),
        ("an order's quantity grew", |s| {
            s.markets[0].orders[0].qty.0 += 1
        }),
        ("a crossed book", |s| {
            let ask = s.markets[0]
                .orders
                .iter()
                .find(|o| o.side == Side::Sell)
                .unwrap()
                .price;
            let bid = s.markets[0]
                .orders
                .iter_mut()
                .find(|o| o.side == Side::Buy)
                .unwrap();
            bid.price = ask;
        }),
    ];
    for (name, tamper) in cases {
        let dir = tempfile::tempdir().unwrap();
        let Recovered {
            mut state,
            mut store,
            ..
        } = Store::open(dir.path(), config, genesis).unwrap();
        let mut events = Vec::new();
        let mut run = |state: &mut Engine, store: &mut Store<Engine>, cmd: Command, t: u64| {
            if state.apply(&cmd, Timestamp(t), &mut events).is_ok() {
                store.append(state.seq(), Timestamp(t), &cmd).unwrap();
                store.sync().unwrap();
            }
        };
        let mut t = 1_000;
        for i in 1..=2u32 {
            run(&mut state, &mut store, Command::CreateAccount, t);
            for (asset, amount) in [(BTC, 1u64 << 36), (USD, 1u64 << 52)] {
                t += 1;
                let key = IdempotencyKey::reference(&format!("fund-{i}-{}", asset.0));
                let credit = Command::Credit {
                    account: AccountId(i),
                    asset,
                    amount: Amount(amount),
                    key,
                };
                run(&mut state, &mut store, credit, t);
            }
        }
        let first = state.seq();
        store.snapshot(&state).unwrap();
        for i in 0..6u64 {
            t += 1;
            let (a, side, price) = if i % 2 == 0 {
                (1, Side::Buy, 4_000_000 + i)
            } else {
                (2, Side::Sell, 6_000_000 + i)
            };
            run(
                &mut state,
                &mut store,
                order(a, side, price, 7, TimeInForce::Gtc),
                t,
            );
        }
        let second = state.seq();
        store.snapshot(&state).unwrap();
        let hash = state.state_hash();
        drop(store);
        let newest = dir
            .path()
            .join(matching_engine::snapshot::snapshot_file_name(second));
        tamper_snapshot(&newest, tamper);

        let r = Store::open(dir.path(), config, genesis).unwrap();
        assert_eq!(r.report.snapshot_seq, Some(first), "{name}");
        assert_eq!(r.report.corrupt_snapshots.len(), 1, "{name}");
        assert_eq!(r.state.state_hash(), hash, "{name}");
        r.state.check_invariants();
    }
}

/// Custody's lookup through the durable sequencer: answered after the batch is durable, with the
/// engine's record; it does not advance `seq`, so it is never journaled, and recovery reaches
/// the same state.
#[test]
fn withdrawal_status_query_is_answered_and_never_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        snapshot_every: 1_000,
        snapshots_kept: 2,
        ..StoreConfig::default()
    };
    let genesis = || Engine::new(EngineConfig::default()).unwrap();
    let recovered = Store::open(dir.path(), config, genesis).unwrap();
    let clock = StepClock {
        next: Timestamp(1_000_000_000),
        step: 1_000_000,
    };
    let seq = Sequencer::durable(recovered, clock, SequencerConfig::default()).unwrap();
    let mut p = seq.producer();
    p.submit_wait(Command::CreateAccount).unwrap();
    p.submit_wait(Command::Credit {
        account: AccountId(1),
        asset: BTC,
        amount: Amount(50_000),
        key: IdempotencyKey::reference("fund"),
    })
    .unwrap();
    let held = match p
        .submit_wait(Command::WithdrawHold {
            account: AccountId(1),
            asset: BTC,
            amount: Amount(10_000),
            fee: Amount(500),
            id: WithdrawalId(7),
        })
        .unwrap()
        .outcome
    {
        Outcome::Accepted { seq, .. } => seq,
        o => panic!("{o:?}"),
    };
    for (id, want) in [
        (
            7,
            Some((AccountId(1), Amount(10_000), WithdrawalState::Held)),
        ),
        (8, None),
    ] {
        match p
            .submit_wait(Command::WithdrawalStatus {
                id: WithdrawalId(id),
            })
            .unwrap()
            .outcome
        {
            Outcome::Accepted { seq, events } => {
                assert_eq!(seq, held, "a query does not advance seq");
                match events[..] {
                    [Event::WithdrawalStatus { withdrawal, .. }] => assert_eq!(
                        withdrawal.map(|w| (w.account, w.amount, w.state)),
                        want,
                        "record of {id}"
                    ),
                    ref other => panic!("{other:?}"),
                }
            }
            o => panic!("{o:?}"),
        }
    }
    drop(p);
    let engine = seq.shutdown().unwrap();
    assert_eq!(engine.seq(), held);
    let again = Store::open(dir.path(), config, genesis).unwrap();
    assert_eq!(
        again.state.seq(),
        held,
        "nothing after the hold was journaled"
    );
    assert_eq!(again.state.state_hash(), engine.state_hash());
}
