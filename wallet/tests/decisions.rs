//! Custody's own automatic decisions reach the decision log (the server's audit log) when they
//! are made: a withdrawal approved by policy (not one waiting for an operator), an alarm raised,
//! and the reconciliation result once and again only when it changes.

mod support;

use matching_engine::units::{AccountId, Amount};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{Customer, World};
use wallet::bitcoin::Address;
use wallet::{DecisionLog, WithdrawalRequest, WithdrawalStatus};

/// One recorded decision: (action, params).
type Entry = (String, Vec<(String, String)>);

#[derive(Default)]
struct Recorded(Mutex<Vec<Entry>>);

impl DecisionLog for Recorded {
    fn record(&self, action: &str, params: &[(&str, String)]) -> Result<(), String> {
        self.0.lock().unwrap().push((
            action.to_owned(),
            params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        ));
        Ok(())
    }
}

impl Recorded {
    fn of(&self, action: &str) -> Vec<Vec<(String, String)>> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(a, _)| a == action)
            .map(|(_, p)| p.clone())
            .collect()
    }
}

fn param<'a>(p: &'a [(String, String)], k: &str) -> &'a str {
    p.iter()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.as_str())
        .unwrap()
}

fn request(account: AccountId, to: &Address, amount: u64, key: &str) -> WithdrawalRequest {
    WithdrawalRequest {
        account,
        address: to.to_string(),
        amount: Amount(amount),
        idempotency_key: key.to_owned(),
        other_used: Amount(0),
    }
}

#[test]
fn automatic_decisions_are_recorded_when_made() {
    let mut w = World::new();
    let mut c = w.config();
    c.withdrawal.flat_fee = Amount(10_000);
    c.withdrawal.min_amount = Amount(1_000);
    c.withdrawal.approval_threshold = Amount(400_000);
    c.batch.interval = Duration::from_secs(60);
    let alice = w.ledger.create_account();
    let mut svc = w.open(c);
    let log = Arc::new(Recorded::default());
    svc.set_decision_log(log.clone());
    let addr = svc.new_deposit_address(alice, w.clock.now()).unwrap();
    let mut customer = Customer::new(21);
    customer.fund(&w.node, 1);
    customer.pay(&w.node, &[(&addr, 2_000_000)]);
    w.node.mine(1);
    svc.step(w.clock.now()).unwrap();
    let rec = log.of("custody.reconcile");
    assert_eq!(rec.len(), 1, "the first result is recorded: {rec:?}");
    svc.step(w.clock.now()).unwrap();
    assert_eq!(
        log.of("custody.reconcile").len(),
        1,
        "an unchanged result is not repeated"
    );

    let mut receiver = Customer::new(22);
    let small = svc
        .request_withdrawal(
            request(alice, &receiver.address(), 100_000, "s"),
            w.clock.now(),
        )
        .unwrap();
    assert_eq!(small.status, WithdrawalStatus::Pending);
    // Recorded before request_withdrawal returned (before the API's reply).
    let approved = log.of("custody.withdrawal.auto_approve");
    assert_eq!(approved.len(), 1, "{approved:?}");
    assert_eq!(param(&approved[0], "id"), small.id.to_string());
    assert_eq!(param(&approved[0], "amount_sat"), "100000");
    let big = svc
        .request_withdrawal(
            request(alice, &receiver.address(), 500_000, "b"),
            w.clock.now(),
        )
        .unwrap();
    assert_eq!(big.status, WithdrawalStatus::AwaitingApproval);
    assert_eq!(
        log.of("custody.withdrawal.auto_approve").len(),
        1,
        "one waiting for an operator is not approved by policy"
    );

    // The ledger releases the small one behind custody's back; it is paid anyway: an alarm,
    // and the reconciliation changes (a shortfall).
    let r = svc.step(w.clock.advance(Duration::from_secs(61))).unwrap();
    assert_eq!(r.batch.unwrap().withdrawals, vec![small.id]);
    w.ledger
        .raw(matching_engine::Command::WithdrawRelease { id: small.id })
        .unwrap();
    w.node.mine(1);
    svc.step(w.clock.now()).unwrap();
    let alarms = log.of("custody.alarm.raise");
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert_eq!(param(&alarms[0], "kind"), "withdrawal_not_completed");
    let rec = log.of("custody.reconcile");
    assert!(rec.len() >= 2, "{rec:?}");
    assert_eq!(param(rec.last().unwrap(), "shortfall"), "true", "{rec:?}");
}
