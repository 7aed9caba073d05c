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
//! * A deposit is credited through the ledger at most once: the ledger's credit is idempotent by
//!   outpoint, and the service records the credit after the ledger accepted it.
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
    BatchError, BumpError, DepositAddressError, DepositError, OpenError, ProveError, StepError,
    StoreError, SyncError, WithdrawalError,
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
