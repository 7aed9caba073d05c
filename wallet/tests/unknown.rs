//! The ledger's third answer, *unknown*: a command that may have been applied is resolved by
//! asking the ledger (its record of the withdrawal, or the same idempotent command again), never
//! by assuming. No bitcoind needed: none of these steps connects.

mod support;

use bdk_wallet::rusqlite::{params, Connection};
use matching_engine::config::BTC;
use matching_engine::units::{Amount, WithdrawalId};
use matching_engine::{Command, WithdrawalState};
use std::sync::Arc;
use support::offline::{config, funded, now, request, ADDRESS, FEE};
use support::{EngineLedger, Fault};
use wallet::{CustodyService, WithdrawalError, WithdrawalStatus, DATABASE_FILE};

/// Defect: a hold applied but answered *unknown* deleted the row (funds frozen with no record),
/// and the next request of anyone reused its id and failed with `DuplicateWithdrawal`.
#[test]
fn an_unknown_hold_keeps_its_row_and_the_next_request_gets_a_fresh_id() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(EngineLedger::default());
    let alice = funded(&ledger, 100_000, "a");
    let bob = funded(&ledger, 100_000, "b");
    let mut svc = CustodyService::open(config(dir.path()), ledger.clone()).unwrap();

    ledger.fault_next(Fault::ApplyThenUnknown);
    ledger.fail_lookups(true);
    let r = svc.request_withdrawal(request(alice, 10_000, "alice-1"), now());
    assert!(r.is_err(), "the outcome is not known: {r:?}");
    assert_eq!(ledger.btc(alice), (89_000, 11_000), "the ledger holds it");
    let kept = svc.withdrawals().unwrap();
    assert_eq!(kept.len(), 1, "the row of a hold that may exist is kept");
    assert_eq!(kept[0].status, WithdrawalStatus::New);
    let alices = kept[0].id;

    let w = svc
        .request_withdrawal(request(bob, 20_000, "bob-1"), now())
        .expect("another user's request is not blocked");
    assert_ne!(w.id, alices, "ids are never reused");
    assert_eq!(w.status, WithdrawalStatus::Pending);
    assert_eq!(ledger.btc(bob), (79_000, 21_000));

    // The engine answers again: the unknown hold is resolved by asking, on open.
    ledger.fail_lookups(false);
    drop(svc);
    let svc = CustodyService::open(config(dir.path()), ledger.clone()).unwrap();
    assert_eq!(
        svc.withdrawal(alices).unwrap().map(|w| w.status),
        Some(WithdrawalStatus::Pending)
    );
    assert_eq!(ledger.btc(alice), (89_000, 11_000), "held exactly once");
}

/// Ids come from AUTOINCREMENT: a refused request's id is not handed out again.
#[test]
fn withdrawal_ids_are_never_reused_after_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(EngineLedger::default());
    let alice = funded(&ledger, 100_000, "a");
    let mut svc = CustodyService::open(config(dir.path()), ledger.clone()).unwrap();
    let first = svc
        .request_withdrawal(request(alice, 10_000, "k1"), now())
        .unwrap();
    let refused = svc.request_withdrawal(request(alice, 500_000, "k2"), now());
    assert!(matches!(
        refused,
        Err(WithdrawalError::InsufficientBalance { .. })
    ));
    let third = svc
        .request_withdrawal(request(alice, 10_000, "k3"), now())
        .unwrap();
    assert_eq!(first.id, WithdrawalId(1));
    assert_eq!(
        third.id,
        WithdrawalId(3),
        "the refused request's id 2 stays used"
    );
}

/// Defect: `DuplicateWithdrawal` counted as "held" whoever the ledger's withdrawal belonged to, so
/// after a crash one user would be paid from another's hold.
#[test]
fn a_duplicate_withdrawal_counts_only_when_the_ledger_record_matches() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(EngineLedger::default());
    let alice = funded(&ledger, 100_000, "a");
    let bob = funded(&ledger, 100_000, "b");
    drop(CustodyService::open(config(dir.path()), ledger.clone()).unwrap());
    // The ledger holds withdrawal 1 for Alice; custody's row 1 (left `new` by a crash) is Bob's.
    ledger
        .raw(Command::WithdrawHold {
            account: alice,
            asset: BTC,
            amount: Amount(30_000),
            fee: Amount(FEE),
            id: WithdrawalId(1),
        })
        .unwrap();
    let db = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
    db.execute(
        "INSERT INTO mediator_withdrawal (id, account, address, amount_sat, fee_sat,
         idempotency_key, status, created_ms) VALUES (1, ?1, ?2, 20000, ?3, 'bob', 'new', 1)",
        params![bob.0, ADDRESS, FEE as i64],
    )
    .unwrap();
    drop(db);

    let svc = CustodyService::open(config(dir.path()), ledger.clone()).unwrap();
    let row = svc.withdrawal(WithdrawalId(1)).unwrap();
    assert!(
        !matches!(
            row.as_ref().map(|w| w.status),
            Some(WithdrawalStatus::Pending | WithdrawalStatus::AwaitingApproval)
        ),
        "Bob's request must not be paid from Alice's hold: {row:?}"
    );
    assert_eq!(ledger.btc(bob), (100_000, 0), "nothing of Bob's is held");
}

/// Defect: a release applied but answered *unknown* left the row pending, so it was paid on chain
/// after the user got the funds back.
#[test]
fn a_release_applied_but_answered_unknown_is_released_not_left_pending() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(EngineLedger::default());
    let alice = funded(&ledger, 100_000, "a");
    let mut svc = CustodyService::open(config(dir.path()), ledger.clone()).unwrap();
    let w = svc
        .request_withdrawal(request(alice, 10_000, "k1"), now())
        .unwrap();
    ledger.fault_next(Fault::ApplyThenUnknown);
    let _ = svc.reject_withdrawal(w.id, "operator refused");
    assert_eq!(ledger.btc(alice), (100_000, 0), "the ledger released it");
    assert_eq!(
        ledger.record(w.id).map(|r| r.state),
        Some(WithdrawalState::Released)
    );
    let status = svc.withdrawal(w.id).unwrap().unwrap().status;
    assert_eq!(
        status,
        WithdrawalStatus::Released,
        "a released withdrawal must never be batched"
    );
}

/// A release the ledger cannot answer for stays `releasing` (never batched) and is resolved by
/// the loop (`resolve_withdrawals`, run by every step) once the ledger answers; an unknown hold
/// is resolved there too, without a restart.
#[test]
fn unresolved_releases_and_holds_are_resolved_by_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(EngineLedger::default());
    let alice = funded(&ledger, 100_000, "a");
    let mut svc = CustodyService::open(config(dir.path()), ledger.clone()).unwrap();
    let w = svc
        .request_withdrawal(request(alice, 10_000, "k1"), now())
        .unwrap();
    ledger.fault_next(Fault::LoseUnknown);
    ledger.fail_lookups(true);
    let r = svc.reject_withdrawal(w.id, "operator refused");
    assert!(
        matches!(r, Err(WithdrawalError::LedgerUnknown(id)) if id == w.id),
        "{r:?}"
    );
    let row = svc.withdrawal(w.id).unwrap().unwrap();
    assert_eq!(row.status, WithdrawalStatus::Releasing);
    assert_eq!(row.reason.as_deref(), Some("operator refused"));
    // And a hold that was never applied, answered unknown.
    ledger.fault_next(Fault::LoseUnknown);
    let lost = svc.request_withdrawal(request(alice, 20_000, "k2"), now());
    assert!(matches!(lost, Err(WithdrawalError::LedgerUnknown(_))));
    ledger.fault_next(Fault::LoseUnknown); // the release asked again, still no answer
    assert_eq!(
        svc.resolve_withdrawals().unwrap(),
        2,
        "nothing resolvable yet"
    );
    assert_eq!(ledger.btc(alice), (89_000, 11_000), "only the first hold");

    ledger.fail_lookups(false);
    assert_eq!(svc.resolve_withdrawals().unwrap(), 0);
    assert_eq!(
        svc.withdrawal(w.id).unwrap().unwrap().status,
        WithdrawalStatus::Released
    );
    let second = svc
        .withdrawals()
        .unwrap()
        .into_iter()
        .find(|v| v.idempotency_key == "k2")
        .unwrap();
    assert_eq!(second.status, WithdrawalStatus::Pending, "held once, now");
    assert_eq!(ledger.btc(alice), (79_000, 21_000));
    assert!(svc.alarms(false).unwrap().is_empty());
}

/// Regression (review): a request answered *unknown* (`-1007`: "custody resolves it") was
/// deleted when the step resolving it found the engine busy (its queue full, or halted): a
/// command not taken was read as the ledger refusing the hold, and the request the history had
/// shown as processing vanished with no record. Not taken now is tried again at the next step,
/// as the deposits' credits are (failed on the old code: the row was gone).
#[test]
fn a_withdrawal_whose_hold_finds_the_engine_busy_is_tried_again_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(EngineLedger::default());
    let alice = funded(&ledger, 100_000, "a");
    let mut svc = CustodyService::open(config(dir.path()), ledger.clone()).unwrap();
    ledger.fault_next(Fault::LoseUnknown);
    ledger.fail_lookups(true);
    let r = svc.request_withdrawal(request(alice, 10_000, "k"), now());
    assert!(matches!(r, Err(WithdrawalError::LedgerUnknown(_))), "{r:?}");
    ledger.fail_lookups(false);
    let row = |svc: &CustodyService| {
        svc.withdrawals()
            .unwrap()
            .into_iter()
            .find(|w| w.idempotency_key == "k")
            .map(|w| w.status)
    };
    // The step asks the ledger (no record) and holds again into a busy engine: kept.
    ledger.fault_next(Fault::Busy);
    assert_eq!(
        svc.resolve_withdrawals().unwrap(),
        1,
        "not taken: unresolved"
    );
    assert_eq!(
        row(&svc),
        Some(WithdrawalStatus::New),
        "kept, to be tried again"
    );
    assert_eq!(ledger.btc(alice), (100_000, 0), "nothing held yet");
    assert_eq!(svc.resolve_withdrawals().unwrap(), 0);
    assert_eq!(row(&svc), Some(WithdrawalStatus::Pending));
    assert_eq!(ledger.btc(alice), (89_000, 11_000), "held exactly once");
    // A first request into a busy engine is answered busy at once and leaves no row.
    ledger.fault_next(Fault::Busy);
    let busy = svc.request_withdrawal(request(alice, 10_000, "k2"), now());
    assert!(
        matches!(busy, Err(WithdrawalError::LedgerRejected(_))),
        "{busy:?}"
    );
    assert!(svc
        .withdrawals()
        .unwrap()
        .iter()
        .all(|w| w.idempotency_key != "k2"));
}

/// The id conflict of `a_duplicate_withdrawal_counts_only_when_the_ledger_record_matches` is an
/// alarm the operator sees, raised once.
#[test]
fn a_ledger_id_conflict_raises_one_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(EngineLedger::default());
    let alice = funded(&ledger, 100_000, "a");
    let bob = funded(&ledger, 100_000, "b");
    drop(CustodyService::open(config(dir.path()), ledger.clone()).unwrap());
    ledger
        .raw(Command::WithdrawHold {
            account: alice,
            asset: BTC,
            amount: Amount(30_000),
            fee: Amount(FEE),
            id: WithdrawalId(1),
        })
        .unwrap();
    let db = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
    db.execute(
        "INSERT INTO mediator_withdrawal (id, account, address, amount_sat, fee_sat,
         idempotency_key, status, created_ms) VALUES (1, ?1, ?2, 20000, ?3, 'bob', 'new', 1)",
        params![bob.0, ADDRESS, FEE as i64],
    )
    .unwrap();
    drop(db);
    let mut svc = CustodyService::open(config(dir.path()), ledger.clone()).unwrap();
    let alarms = svc.alarms(false).unwrap();
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert_eq!(alarms[0].kind, "withdrawal_id_conflict");
    assert_eq!(alarms[0].subject, "withdrawal 1");
    assert_eq!(svc.withdrawal(WithdrawalId(1)).unwrap(), None);
    // Bob's next request gets a fresh id, above the conflicting one.
    let w = svc
        .request_withdrawal(request(bob, 20_000, "bob"), now())
        .unwrap();
    assert!(w.id > WithdrawalId(1));
    assert_eq!(ledger.btc(bob), (79_000, 21_000));
}
