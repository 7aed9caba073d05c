//! Mediator's custody and settlement: the only place where private keys exist.
//!
//! A [`CustodyService`] owns one BDK wallet (BIP84, `wpkh`) persisted in SQLite next to the
//! service's own tables (deposit addresses, deposits, withdrawals, batches), and follows a
//! `bitcoind` over RPC with `bdk_bitcoind_rpc`'s [`Emitter`](bdk_bitcoind_rpc::Emitter). It talks
//! to the exchange's ledger only through the [`Ledger`] trait, with the engine's own commands:
//! `Credit` (keyed by outpoint), `WithdrawHold`, `WithdrawRelease` and `WithdrawComplete`, and two
//! read-only lookups (the engine's record of a withdrawal, whether a credit key was applied). Each
//! command is answered applied, refused or unknown ([`LedgerError`]); an unknown answer is
//! resolved by a lookup or by the same idempotent command again, never by assuming.
//!
//! The service is a library: it never spawns threads and never reads the clock on its own. Every
//! step takes `now` and is driven by the caller ([`CustodyService::step`] runs them all, in order);
//! [`Runner`] is the one explicit loop that calls it on a thread with the system clock.
//!
//! **Architecture invariants**
//! * Private keys live in [`keys`] and in the BDK signers; they are never persisted in the
//!   database (BDK stores public descriptors only), never logged, and their `Debug` is redacted.
//! * A deposit is credited through the ledger at most once while it stays in the chain: the
//!   ledger's credit is idempotent by outpoint, and the service records the credit after the
//!   ledger accepted it. A credited deposit whose transaction was double-spent is reversed (a
//!   hold completed at once, id [`reversal_id`]); credited again only if it is confirmed again
//!   ([`recredit_key`]).
//! * A signed withdrawal batch is committed to SQLite before it is broadcast, and only one batch
//!   is in flight at a time, so a crash between signing and broadcast can never pay twice.
//! * Ledger and wallet stay conserved to the satoshi: a batch's network fee is split across its
//!   withdrawals, each share at most that withdrawal's flat fee (the batch fee is capped so).

#![warn(missing_docs)]

mod config;
mod error;
pub mod keys;
mod ledger;
mod runner;
mod service;
mod store;

pub use config::{BatchPolicy, CustodyConfig, RpcAuth, RpcConfig, WithdrawalPolicy};
pub use error::{
    AbandonError, BatchError, BumpError, DepositAddressError, DepositError, OpenError, ProveError,
    StepError, StoreError, SyncError, WithdrawalError,
};
pub use keys::{KeyError, Passphrase};
pub use ledger::{Ledger, LedgerError};
pub use runner::{system_now, Runner};
pub use service::{
    BatchInfo, BatchView, CustodyService, DecisionLog, DepositEvent, DepositReport, DepositView,
    FlagHook, OtherAssets, Reconciliation, RecordMismatch, RecordsReport, ReservesProof,
    StepReport, SyncReport, WithdrawalReport, WithdrawalRequest, DATABASE_FILE,
};
pub use store::{Alarm, DepositStatus, WithdrawalStatus, WithdrawalView};

/// Re-exported so that callers name the same `bitcoin` types as the wallet.
pub use bdk_wallet::bitcoin;

use bdk_wallet::bitcoin::hashes::{sha256, Hash, HashEngine};
use bdk_wallet::bitcoin::OutPoint;
use matching_engine::{IdempotencyKey, WithdrawalId};

/// Bit set in the engine id of every reversal of a deposit credit (on-chain withdrawal ids count
/// up from 1; Lightning's carry bit 62).
pub const REVERSAL_ID_BIT: u64 = 1 << 61;

/// The engine's withdrawal id of a reversal row.
pub fn reversal_id(row: u64) -> WithdrawalId {
    assert!(row < REVERSAL_ID_BIT, "reversal row id out of range");
    WithdrawalId(REVERSAL_ID_BIT | row)
}

/// The credit key of a reversed deposit credited again after its `n`-th reversal: a hash of the
/// outpoint and `n`, then `0xFFFF_FFFD` (an outpoint key ends in a little-endian output index,
/// never this large; Lightning's end in `0xFFFF_FFFE`, references in `0xFFFF_FFFF`).
pub fn recredit_key(outpoint: OutPoint, n: u32) -> IdempotencyKey {
    let mut e = sha256::Hash::engine();
    e.input(b"mediator/recredit");
    e.input(&outpoint.txid.to_byte_array());
    e.input(&outpoint.vout.to_le_bytes());
    e.input(&n.to_le_bytes());
    let mut k = [0u8; 36];
    k[..32].copy_from_slice(&sha256::Hash::from_engine(e).to_byte_array());
    k[32..].copy_from_slice(&0xFFFF_FFFDu32.to_le_bytes());
    IdempotencyKey(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reversal_ids_and_recredit_keys_never_collide_with_others() {
        let op = OutPoint::new(bitcoin::Txid::from_byte_array([7; 32]), 3);
        assert_ne!(recredit_key(op, 1), recredit_key(op, 2));
        assert_ne!(
            recredit_key(op, 1),
            IdempotencyKey::outpoint([7; 32], 3),
            "never the deposit's own key"
        );
        assert_ne!(
            recredit_key(op, 1),
            IdempotencyKey::outpoint([7; 32], u32::MAX)
        );
        assert_eq!(reversal_id(5), WithdrawalId((1 << 61) | 5));
        assert_eq!(reversal_id(5).0 & (1 << 62), 0, "not a Lightning id");
    }
}
