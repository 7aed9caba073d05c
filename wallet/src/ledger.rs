//! The custody service's only view of the exchange's ledger.

use matching_engine::command::Command;
use matching_engine::units::{AccountId, Amount, IdempotencyKey, WithdrawalId};
use matching_engine::{RejectCode, Withdrawal};

/// Why a ledger command is not known to be applied: the two answers besides *applied*.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// Certainly not applied: the ledger refused it and changed nothing. A command that was never
    /// taken (the engine's queue was full) is `Rejected(RejectCode::EngineBusy)`.
    #[error("ledger refused the command: {0}")]
    Rejected(RejectCode),
    /// Maybe applied: the command was taken but its answer was lost (the engine stopped, the
    /// journal failed). Resolved by asking the ledger about the command's key or id
    /// ([`Ledger::withdrawal`], or the same idempotent command again), never by assuming.
    #[error("ledger outcome unknown")]
    Unknown,
}

/// The exchange's ledger, as the custody service needs it. The application implements it over the
/// engine's sequencer; tests implement it over an in-memory engine.
///
/// **Contract.** [`submit`](Ledger::submit) answers one of three: `Ok` once the command is applied
/// and durable (journaled); `Err(Rejected)` when it changed nothing; `Err(Unknown)` when it may or
/// may not have been applied. The service only submits `Credit`, `WithdrawHold`,
/// `WithdrawRelease` and `WithdrawComplete` (a deposit's reversal is a hold with no fee completed
/// at once), and relies on:
/// * `Credit` is idempotent by key: a repeated key is accepted (as a duplicate) and changes nothing,
///   so an unknown credit is resolved by crediting again;
/// * `WithdrawHold` with an id that exists is rejected with [`RejectCode::DuplicateWithdrawal`],
///   which counts as the hold only when [`withdrawal`](Ledger::withdrawal) shows the same account
///   and amounts;
/// * `WithdrawRelease`/`WithdrawComplete` of a withdrawal no longer held is rejected with
///   [`RejectCode::UnknownWithdrawal`]; what became of it is then asked with
///   [`withdrawal`](Ledger::withdrawal) (released, completed, or never held).
pub trait Ledger: Send + Sync {
    /// Applies one command.
    fn submit(&self, cmd: Command) -> Result<(), LedgerError>;
    /// The ledger's record of a withdrawal (`None`: it never held one with this id). Read-only;
    /// the answer reflects every command the ledger answered before it.
    fn withdrawal(&self, id: WithdrawalId) -> Result<Option<Withdrawal>, LedgerError>;
    /// True when the ledger applied a credit with this key. Read-only (reconciliation).
    fn credited(&self, key: IdempotencyKey) -> Result<bool, LedgerError>;
    /// Sum of all BTC balances in sats, available and held, the fee account included.
    fn btc_liabilities(&self) -> Amount;
    /// The account's available BTC, reflecting every command the ledger answered before it
    /// (`Unknown` when that cannot be promised). Read-only (a reversal takes at most this).
    fn btc_available(&self, account: AccountId) -> Result<Amount, LedgerError>;
    /// True when the account exists.
    fn account_exists(&self, account: AccountId) -> bool;
}

impl<T: Ledger + ?Sized> Ledger for std::sync::Arc<T> {
    fn submit(&self, cmd: Command) -> Result<(), LedgerError> {
        (**self).submit(cmd)
    }
    fn withdrawal(&self, id: WithdrawalId) -> Result<Option<Withdrawal>, LedgerError> {
        (**self).withdrawal(id)
    }
    fn credited(&self, key: IdempotencyKey) -> Result<bool, LedgerError> {
        (**self).credited(key)
    }
    fn btc_liabilities(&self) -> Amount {
        (**self).btc_liabilities()
    }
    fn btc_available(&self, account: AccountId) -> Result<Amount, LedgerError> {
        (**self).btc_available(account)
    }
    fn account_exists(&self, account: AccountId) -> bool {
        (**self).account_exists(account)
    }
}
