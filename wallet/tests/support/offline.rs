//! Helpers for custody tests that never reach a chain: a service over the in-memory
//! [`super::EngineLedger`] whose RPC address nothing listens on.

use super::EngineLedger;
use bdk_wallet::bitcoin::Network;
use matching_engine::config::BTC;
use matching_engine::units::{AccountId, Amount, IdempotencyKey};
use matching_engine::Command;
use wallet::{CustodyConfig, RpcAuth, RpcConfig, WithdrawalRequest};

/// A regtest address to withdraw to.
pub const ADDRESS: &str = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080";
/// The flat withdrawal fee of [`config`].
pub const FEE: u64 = 1_000;

/// A regtest custody configuration (flat fee [`FEE`], minimum 1,000 sat).
pub fn config(dir: &std::path::Path) -> CustodyConfig {
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

/// A new account credited with `sats` BTC under `key`.
pub fn funded(ledger: &EngineLedger, sats: u64, key: &str) -> AccountId {
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

/// A withdrawal request to [`ADDRESS`].
pub fn request(account: AccountId, amount: u64, key: &str) -> WithdrawalRequest {
    WithdrawalRequest {
        account,
        address: ADDRESS.into(),
        amount: Amount(amount),
        idempotency_key: key.into(),
        other_used: Amount(0),
    }
}

/// The wall clock, as custody takes it.
pub fn now() -> matching_engine::units::Timestamp {
    wallet::system_now()
}
