//! One error type per operation. Messages are lower-case; variants are stable (`#[non_exhaustive]`).

use bdk_wallet::bitcoin::{Network, Txid};
use bdk_wallet::rusqlite;
use matching_engine::units::{AccountId, Amount, WithdrawalId};
use matching_engine::RejectCode;
use std::path::PathBuf;

/// The service's own SQLite tables failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A row holds a value this version cannot read.
    #[error("database holds an invalid value: {0}")]
    Corrupt(String),
}

/// [`CustodyService::open`](crate::CustodyService::open) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The data directory could not be made.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The secret could not be created or loaded.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// The wallet database belongs to another network.
    #[error("wallet database is for {found}, but the service runs on {expected}")]
    NetworkMismatch {
        /// The database's network.
        found: Network,
        /// The configured network.
        expected: Network,
    },
    /// The wallet database was made with other descriptors than the secret gives.
    #[error("wallet database descriptor ({keychain}) does not match the wallet secret")]
    DescriptorMismatch {
        /// `external` or `internal`.
        keychain: &'static str,
    },
    /// Loading or creating the BDK wallet failed otherwise.
    #[error("wallet database: {0}")]
    Wallet(String),
    /// The service's tables failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The deny-list could not be read or has a line that is not an address of this network.
    #[error("deny-list {path}: {reason}")]
    DenyList {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A withdrawal left half-recorded by a crash could not be recovered.
    #[error("recovering withdrawal {id}: ledger rejected the hold: {code}")]
    Recovery {
        /// Withdrawal.
        id: WithdrawalId,
        /// Ledger's rejection.
        code: RejectCode,
    },
}

/// [`CustodyService::sync_once`](crate::CustodyService::sync_once) failed. The connection is
/// dropped and made again on the next call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// bitcoind could not be reached or answered with an error.
    #[error("bitcoind rpc: {0}")]
    Rpc(String),
    /// A block did not connect to the wallet's chain.
    #[error("block does not connect: {0}")]
    Connect(String),
    /// Persisting the wallet failed.
    #[error("persisting wallet: {0}")]
    Persist(#[from] rusqlite::Error),
    /// The service's tables failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// [`CustodyService::new_deposit_address`](crate::CustodyService::new_deposit_address) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DepositAddressError {
    /// The ledger has no such account.
    #[error("unknown account {0}")]
    UnknownAccount(AccountId),
    /// Persisting the wallet failed.
    #[error("persisting wallet: {0}")]
    Persist(#[from] rusqlite::Error),
    /// The service's tables failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// [`CustodyService::process_deposits`](crate::CustodyService::process_deposits) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DepositError {
    /// The service's tables failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An account's debt would overflow (not possible with bitcoin amounts; refused, not
    /// wrapped).
    #[error("amount overflow")]
    Overflow,
}

/// A withdrawal request was refused. Nothing changed in ledger or wallet. Each variant has a
/// stable [`code`](WithdrawalError::code).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WithdrawalError {
    /// The address does not parse.
    #[error("malformed address {address:?}")]
    MalformedAddress {
        /// As given.
        address: String,
    },
    /// The address is valid but for another network.
    #[error("address {address} is not for {expected}")]
    WrongNetwork {
        /// As given.
        address: String,
        /// Our network.
        expected: Network,
    },
    /// The amount is below the destination's dust limit.
    #[error("amount {amount} sat is dust (limit {dust_limit} sat)")]
    Dust {
        /// Requested.
        amount: Amount,
        /// Destination's dust limit.
        dust_limit: Amount,
    },
    /// The amount is below the configured minimum.
    #[error("amount {amount} sat is below the minimum {minimum} sat")]
    BelowMinimum {
        /// Requested.
        amount: Amount,
        /// Configured minimum.
        minimum: Amount,
    },
    /// The request would pass the account's 24-hour limit.
    #[error("amount {amount} sat would pass the 24-hour limit: {used} of {limit} sat used")]
    DailyLimit {
        /// Requested.
        amount: Amount,
        /// Withdrawn (or requested) in the last 24 hours.
        used: Amount,
        /// Limit.
        limit: Amount,
    },
    /// The destination is on the deny-list.
    #[error("address {address} is deny-listed")]
    DenyListed {
        /// Destination.
        address: String,
    },
    /// A request with this idempotency key exists already.
    #[error("idempotency key {key:?} already used by withdrawal {existing}")]
    DuplicateKey {
        /// The key.
        key: String,
        /// The withdrawal that has it.
        existing: WithdrawalId,
    },
    /// The idempotency key is empty or longer than 64 bytes.
    #[error("idempotency key must have 1 to 64 bytes")]
    InvalidKey,
    /// The ledger has no such account.
    #[error("unknown account {0}")]
    UnknownAccount(AccountId),
    /// The account's available balance does not cover amount plus fee.
    #[error("insufficient balance for {amount} sat plus fee {fee} sat")]
    InsufficientBalance {
        /// Requested.
        amount: Amount,
        /// Flat fee.
        fee: Amount,
    },
    /// The ledger refused the hold for another reason.
    #[error("ledger rejected the hold: {0}")]
    LedgerRejected(RejectCode),
    /// No such withdrawal (approve, reject).
    #[error("unknown withdrawal {0}")]
    UnknownWithdrawal(WithdrawalId),
    /// The withdrawal is not waiting for approval (approve), or is batched or done (reject).
    #[error("withdrawal {0} is not awaiting approval")]
    NotAwaitingApproval(WithdrawalId),
    /// The service's tables failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The ledger's answer is not known (it may or may not have applied the hold or release).
    /// The withdrawal is recorded and the service resolves it by asking the ledger; ask for the
    /// withdrawal (or repeat the request with the same key) to learn the outcome.
    #[error("ledger outcome unknown for withdrawal {0}; it is resolved automatically")]
    LedgerUnknown(WithdrawalId),
    /// The ledger's record of this id does not match the request (another withdrawal holds it):
    /// an alarm is raised; nothing of this request is held.
    #[error("ledger record of withdrawal {0} does not match it")]
    LedgerMismatch(WithdrawalId),
    /// The account is flagged (a credited deposit left the chain) and cannot withdraw until an
    /// operator clears it.
    #[error("account {0} is flagged for review and cannot withdraw")]
    AccountFlagged(AccountId),
    /// Payouts are held back: the last reconciliation showed the ledger owing more than custody
    /// holds by more than the tolerance (`BatchPolicy::shortfall_tolerance`).
    #[error("withdrawals are paused: custody holds {short} sat less than it owes")]
    PayoutsHeld {
        /// The shortfall, in sat.
        short: Amount,
    },
    /// The account has no flag to clear.
    #[error("account {0} is not flagged")]
    NotFlagged(AccountId),
    /// The account owes custody (a reversed deposit its balance did not cover): its flag stays
    /// until its deposits or balance pay the debt.
    #[error(
        "account {account} owes {debt} sat (a reversed deposit); its flag stays until it is paid"
    )]
    InDebt {
        /// The account.
        account: AccountId,
        /// What it owes, in sat.
        debt: Amount,
    },
    /// The account owes nothing that can be written off (a collection from its balance in
    /// progress pays its part).
    #[error("account {0} owes nothing to write off")]
    NoDebt(AccountId),
    /// No alarm with this id is raised (not cleared).
    #[error("no alarm {0} to clear")]
    UnknownAlarm(u64),
    /// Money out by a path that cannot wait for an operator (Lightning: the invoice expires)
    /// would bring the account's running 24-hour total above the approval threshold, where an
    /// on-chain withdrawal waits for approval ([`crate::CustodyService::check_outflow`]).
    #[error(
        "amount {amount} sat needs an operator's approval (24-hour total {used} sat, approval \
         threshold {threshold} sat); withdraw on chain"
    )]
    ApprovalRequired {
        /// Requested.
        amount: Amount,
        /// Withdrawn (or requested) in the last 24 hours, all paths.
        used: Amount,
        /// The approval threshold.
        threshold: Amount,
    },
    /// The address is one of custody's own change addresses: paid there, the money would stay
    /// in the wallet and belong to no account.
    #[error("address {address} belongs to this exchange's wallet; it is not a destination")]
    OwnAddress {
        /// As given.
        address: String,
    },
}

impl WithdrawalError {
    /// A stable number for the wire and logs. Never renumbered.
    pub fn code(&self) -> u16 {
        match self {
            WithdrawalError::MalformedAddress { .. } => 1,
            WithdrawalError::WrongNetwork { .. } => 2,
            WithdrawalError::Dust { .. } => 3,
            WithdrawalError::BelowMinimum { .. } => 4,
            WithdrawalError::DailyLimit { .. } => 5,
            WithdrawalError::DenyListed { .. } => 6,
            WithdrawalError::DuplicateKey { .. } => 7,
            WithdrawalError::InvalidKey => 8,
            WithdrawalError::UnknownAccount(_) => 9,
            WithdrawalError::InsufficientBalance { .. } => 10,
            WithdrawalError::LedgerRejected(_) => 11,
            WithdrawalError::UnknownWithdrawal(_) => 12,
            WithdrawalError::NotAwaitingApproval(_) => 13,
            WithdrawalError::Store(_) => 14,
            WithdrawalError::LedgerUnknown(_) => 15,
            WithdrawalError::LedgerMismatch(_) => 16,
            WithdrawalError::AccountFlagged(_) => 17,
            WithdrawalError::NotFlagged(_) => 18,
            WithdrawalError::UnknownAlarm(_) => 19,
            WithdrawalError::ApprovalRequired { .. } => 20,
            WithdrawalError::OwnAddress { .. } => 21,
            WithdrawalError::PayoutsHeld { .. } => 22,
            WithdrawalError::InDebt { .. } => 23,
            WithdrawalError::NoDebt(_) => 24,
        }
    }
}

/// Building, signing, broadcasting or completing a batch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// bitcoind could not be reached or answered with an error.
    #[error("bitcoind rpc: {0}")]
    Rpc(String),
    /// The wallet cannot pay the batch; the withdrawals stay pending.
    #[error("wallet cannot pay the batch: {0}")]
    InsufficientFunds(String),
    /// BDK could not build the transaction.
    #[error("building the batch transaction: {0}")]
    Build(String),
    /// Signing failed or left inputs unsigned.
    #[error("signing the batch transaction: {0}")]
    Sign(String),
    /// The ledger refused a completion.
    #[error("ledger rejected completion of withdrawal {id}: {code}")]
    CompleteRejected {
        /// Withdrawal.
        id: WithdrawalId,
        /// Ledger's rejection.
        code: RejectCode,
    },
    /// Persisting the wallet failed.
    #[error("persisting wallet: {0}")]
    Persist(#[from] rusqlite::Error),
    /// The service's tables failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// [`CustodyService::bump_fee`](crate::CustodyService::bump_fee) failed; nothing changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BumpError {
    /// No such batch in flight.
    #[error("no batch {0} in flight")]
    NotInFlight(u64),
    /// The new fee would pass the sum of the withdrawals' flat fees.
    #[error("fee {fee} sat passes the batch's flat fees {budget} sat")]
    FeeBudgetExceeded {
        /// Fee of the replacement.
        fee: Amount,
        /// Sum of flat fees.
        budget: Amount,
    },
    /// BDK could not build the replacement.
    #[error("building the replacement of {txid}: {reason}")]
    Build {
        /// Replaced transaction.
        txid: Txid,
        /// Why.
        reason: String,
    },
    /// The batch failed otherwise.
    #[error(transparent)]
    Batch(#[from] BatchError),
}

impl From<rusqlite::Error> for BumpError {
    fn from(e: rusqlite::Error) -> Self {
        BumpError::Batch(BatchError::Persist(e))
    }
}

impl From<StoreError> for BumpError {
    fn from(e: StoreError) -> Self {
        BumpError::Batch(BatchError::Store(e))
    }
}

/// [`CustodyService::abandon_batch`](crate::CustodyService::abandon_batch) refused; nothing
/// changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AbandonError {
    /// No such batch in flight.
    #[error("no batch {0} in flight")]
    NotInFlight(u64),
    /// A version of the batch may still confirm (in the mempool, in the chain, or the node would
    /// take it): bump its fee or wait instead.
    #[error("batch {batch} may still confirm: {why}")]
    MayConfirm {
        /// The batch.
        batch: u64,
        /// Which version, and what the node says.
        why: String,
    },
    /// The batch failed otherwise (bitcoind away, the tables).
    #[error(transparent)]
    Batch(#[from] BatchError),
}

impl From<StoreError> for AbandonError {
    fn from(e: StoreError) -> Self {
        AbandonError::Batch(BatchError::Store(e))
    }
}

/// [`CustodyService::step`](crate::CustodyService::step) failed at one of its stages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// Chain sync.
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// Deposits.
    #[error(transparent)]
    Deposit(#[from] DepositError),
    /// Withdrawal batches.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// Resolving withdrawals whose ledger outcome was unknown.
    #[error(transparent)]
    Withdrawal(#[from] WithdrawalError),
}

/// Building a proof of reserves failed. Nothing was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProveError {
    /// The wallet has no confirmed UTXO at its tip.
    #[error("the wallet has no confirmed UTXO to prove")]
    NoUtxos,
    /// The message or the proof is not valid (see `reserves::por::PorError`).
    #[error("proof of reserves: {0}")]
    Proof(#[from] reserves::por::PorError),
    /// The wallet could not describe one of its UTXOs.
    #[error("building the proof: {0}")]
    Build(String),
    /// Signing failed or left reserve inputs unsigned.
    #[error("signing the proof: {0}")]
    Sign(String),
}
