//! A crash between recording a withdrawal request and the ledger's hold is resolved on open.
//! (No bitcoind needed: opening does not connect.)

mod support;

use bdk_wallet::bitcoin::Network;
use bdk_wallet::rusqlite::{params, Connection};
use matching_engine::config::BTC;
use matching_engine::units::{Amount, IdempotencyKey, WithdrawalId};
use matching_engine::Command;
use std::sync::Arc;
use support::EngineLedger;
use wallet::{CustodyConfig, CustodyService, RpcAuth, RpcConfig, WithdrawalStatus, DATABASE_FILE};

const ADDRESS: &str = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080";

fn config(dir: &std::path::Path) -> CustodyConfig {
    let rpc = RpcConfig {
        url: "http://127.0.0.1:9".into(),
        auth: RpcAuth::UserPass {
            user: "u".into(),
            password: "p".into(),
        },
    };
    let mut c = CustodyConfig::new(Network::Regtest, dir, rpc);
    c.withdrawal.flat_fee = Amount(1_000);
    c
}

/// What `request_withdrawal` writes before it asks the ledger for the hold (no Lightning
/// outflow counted).
fn record_new(dir: &std::path::Path, id: u64, account: u32, amount: u64, key: &str) {
    let db = Connection::open(dir.join(DATABASE_FILE)).unwrap();
    db.execute(
        "INSERT INTO mediator_withdrawal (id, account, address, amount_sat, fee_sat,
         idempotency_key, status, created_ms, other_used_sat)
         VALUES (?1, ?2, ?3, ?4, 1000, ?5, 'new', 1, 0)",
        params![id as i64, account, ADDRESS, amount as i64, key],
    )
    .unwrap();
}

#[test]
fn unacknowledged_requests_are_held_once_or_dropped_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(EngineLedger::default());
    let alice = ledger.create_account();
    let credit = Command::Credit {
        account: alice,
        asset: BTC,
        amount: Amount(100_000),
        key: IdempotencyKey::reference("funding"),
    };
    ledger.raw(credit).unwrap();
    drop(CustodyService::open(config(dir.path()), ledger.clone()).unwrap());

    // 1: crashed before the hold. 2: crashed after the hold, before recording it.
    // 3: the hold would be refused (more than the balance): the request was never acknowledged.
    record_new(dir.path(), 1, alice.0, 10_000, "one");
    record_new(dir.path(), 2, alice.0, 20_000, "two");
    let hold = Command::WithdrawHold {
        account: alice,
        asset: BTC,
        amount: Amount(20_000),
        fee: Amount(1_000),
        id: WithdrawalId(2),
    };
    ledger.raw(hold).unwrap();
    record_new(dir.path(), 3, alice.0, 500_000, "three");

    let svc = CustodyService::open(config(dir.path()), ledger.clone()).unwrap();
    let status = |id| svc.withdrawal(WithdrawalId(id)).unwrap().map(|w| w.status);
    assert_eq!(status(1), Some(WithdrawalStatus::Pending));
    assert_eq!(status(2), Some(WithdrawalStatus::Pending));
    assert_eq!(
        status(3),
        None,
        "dropped: the ledger refused it and nobody was told otherwise"
    );
    assert_eq!(
        ledger.btc(alice),
        (100_000 - 32_000, 32_000),
        "each hold taken exactly once"
    );
}
