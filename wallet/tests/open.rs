//! Startup checks of secret and database (no bitcoind needed: opening does not connect).

use bdk_wallet::bitcoin::Network;
use std::path::Path;
use std::sync::Arc;
use wallet::keys::{KeyError, SECRET_FILE};
use wallet::{CustodyConfig, CustodyService, Ledger, OpenError, RpcAuth, RpcConfig, DATABASE_FILE};

struct NoLedger;

impl Ledger for NoLedger {
    fn submit(&self, _: matching_engine::Command) -> Result<(), wallet::LedgerError> {
        Err(wallet::LedgerError::Rejected(
            matching_engine::RejectCode::UnknownAccount,
        ))
    }
    fn withdrawal(
        &self,
        _: matching_engine::WithdrawalId,
    ) -> Result<Option<matching_engine::Withdrawal>, wallet::LedgerError> {
        Ok(None)
    }
    fn credited(&self, _: matching_engine::IdempotencyKey) -> Result<bool, wallet::LedgerError> {
        Ok(false)
    }
    fn btc_liabilities(&self) -> matching_engine::units::Amount {
        matching_engine::units::Amount::ZERO
    }
    fn account_exists(&self, a: matching_engine::units::AccountId) -> bool {
        a.0 == 1
    }
    fn btc_available(
        &self,
        _: matching_engine::units::AccountId,
    ) -> Result<matching_engine::units::Amount, wallet::LedgerError> {
        Ok(matching_engine::units::Amount::ZERO)
    }
}

fn config(network: Network, dir: &Path) -> CustodyConfig {
    let rpc = RpcConfig {
        url: "http://127.0.0.1:9".into(),
        auth: RpcAuth::UserPass {
            user: "u".into(),
            password: "p".into(),
        },
    };
    CustodyConfig::new(network, dir, rpc)
}

fn open(network: Network, dir: &Path) -> Result<CustodyService, OpenError> {
    CustodyService::open(config(network, dir), Arc::new(NoLedger))
}

#[test]
fn reopening_keeps_deposit_addresses_and_never_reuses_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let now = matching_engine::units::Timestamp::from_millis(1);
    let account = matching_engine::units::AccountId(1);
    let mut s = open(Network::Regtest, dir.path()).unwrap();
    let first = s.new_deposit_address(account, now).unwrap();
    assert!(first.to_string().starts_with("bcrt1q"));
    assert!(matches!(
        s.new_deposit_address(matching_engine::units::AccountId(2), now),
        Err(wallet::DepositAddressError::UnknownAccount(_))
    ));
    drop(s);
    let mut s = open(Network::Regtest, dir.path()).unwrap();
    assert_eq!(
        s.deposit_addresses(account).unwrap(),
        vec![first.to_string()]
    );
    let second = s.new_deposit_address(account, now).unwrap();
    assert_ne!(first, second);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join(SECRET_FILE))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let db = std::fs::read(dir.path().join(DATABASE_FILE)).unwrap();
    let db = String::from_utf8_lossy(&db);
    assert!(
        db.contains("tpub") && !db.contains("tprv"),
        "no private key in the database"
    );
}

#[test]
fn a_secret_of_another_network_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(Network::Bitcoin, dir.path()).unwrap());
    let err = open(Network::Regtest, dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::Key(KeyError::NetworkMismatch {
                found: Network::Bitcoin,
                ..
            })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("bitcoin"), "{err}");
}

#[test]
fn a_changed_descriptor_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(Network::Regtest, dir.path()).unwrap());
    // Another secret (as if the file was swapped) against the old database.
    std::fs::remove_file(dir.path().join(SECRET_FILE)).unwrap();
    let err = open(Network::Regtest, dir.path()).unwrap_err();
    assert!(
        matches!(err, OpenError::DescriptorMismatch { .. }),
        "{err:?}"
    );
}

#[test]
fn a_database_of_another_network_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(Network::Regtest, dir.path()).unwrap());
    // The same key on testnet (same tpub descriptors) against the regtest database.
    let path = dir.path().join(SECRET_FILE);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("network regtest", "network testnet");
    std::fs::write(&path, text).unwrap();
    assert!(dir.path().join(DATABASE_FILE).exists());
    let err = open(Network::Testnet, dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::NetworkMismatch {
                found: Network::Regtest,
                expected: Network::Testnet
            }
        ),
        "{err:?}"
    );
}

/// Defect: a `wallet.tmp` left by a crash during the first start (before the rename) made every
/// later start fail (`create_new`). No secret exists then, so nothing used the half-written one.
#[test]
fn a_stale_secret_temp_file_from_a_crashed_first_start_does_not_block_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join(SECRET_FILE).with_extension("tmp");
    std::fs::write(&tmp, b"half-written").unwrap();
    let s = open(Network::Regtest, dir.path()).expect("starts despite the stale temp file");
    drop(s);
    assert!(!tmp.exists(), "the stale temp file is gone");
    assert!(dir.path().join(SECRET_FILE).exists());
    // And the secret it made is the one used from now on.
    drop(open(Network::Regtest, dir.path()).unwrap());
}
