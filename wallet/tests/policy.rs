//! Withdrawal policy without a chain: idempotency keys per account, flagged accounts, approval by
//! the running 24-hour total and the exchange-wide limit. No bitcoind needed.

mod support;

use bdk_wallet::bitcoin::Network;
use matching_engine::config::BTC;
use matching_engine::units::{AccountId, Amount, IdempotencyKey};
use matching_engine::Command;
use std::sync::Arc;
use support::EngineLedger;
use wallet::{
    CustodyConfig, CustodyService, RpcAuth, RpcConfig, WithdrawalError, WithdrawalRequest,
};

const ADDRESS: &str = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080";
const FEE: u64 = 1_000;

fn config(dir: &std::path::Path) -> CustodyConfig {
    let rpc = RpcConfig {
        url: "http://127.0.0.1:9".into(),
        auth: RpcAuth::UserPass {
            user: "u".into(),
            password: "p".into(),
        },
    };
    let mut c = CustodyConfig::new(Network::Regtest, dir, rpc);
    c.withdrawal.flat_fee = Amount(FEE);
    c.withdrawal.min_amount = Amount(1_000);
    c
}

fn funded(ledger: &EngineLedger, sats: u64, key: &str) -> AccountId {
    let a = ledger.create_account();
    ledger
        .raw(Command::Credit {
            account: a,
            asset: BTC,
            amount: Amount(sats),
            key: IdempotencyKey::reference(key),
        })
        .unwrap();
    a
}

fn request(account: AccountId, amount: u64, key: &str) -> WithdrawalRequest {
    WithdrawalRequest {
        account,
        address: ADDRESS.into(),
        amount: Amount(amount),
        idempotency_key: key.into(),
    }
}

fn now() -> matching_engine::units::Timestamp {
    wallet::system_now()
}

/// Defect: idempotency keys were global, so one account's `withdrawOrderId` blocked another's
/// (and anyone could pre-empt a merchant's `refund-<invoice>-<n>`).
#[test]
fn idempotency_keys_are_per_account() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(EngineLedger::default());
    let alice = funded(&ledger, 100_000, "a");
    let bob = funded(&ledger, 100_000, "b");
    let mut svc = CustodyService::open(config(dir.path()), ledger.clone()).unwrap();
    let a = svc
        .request_withdrawal(request(alice, 10_000, "refund-inv1-1"), now())
        .unwrap();
    let b = svc
        .request_withdrawal(request(bob, 10_000, "refund-inv1-1"), now())
        .expect("another account's key does not block this one");
    assert_ne!(a.id, b.id);
    let again = svc.request_withdrawal(request(alice, 10_000, "refund-inv1-1"), now());
    assert!(
        matches!(again, Err(WithdrawalError::DuplicateKey { existing, .. }) if existing == a.id),
        "{again:?}"
    );
}
