//! The custody service's only view of the exchange's ledger.

use matching_engine::command::Command;
use matching_engine::units::{AccountId, Amount};
use matching_engine::RejectCode;

/// The exchange's ledger, as the custody service needs it. The application implements it over the
/// engine's sequencer; tests implement it over an in-memory engine.
///
/// **Contract.** [`submit`](Ledger::submit) returns `Ok` only once the command is applied and
/// durable (journaled), and `Err` only when it was rejected and changed nothing. The service only
/// submits `Credit`, `WithdrawHold`, `WithdrawRelease` and `WithdrawComplete`, and relies on:
/// * `Credit` is idempotent by key: a repeated key is accepted (as a duplicate) and changes nothing;
/// * `WithdrawHold` with an id that exists is rejected with [`RejectCode::DuplicateWithdrawal`];
/// * `WithdrawRelease`/`WithdrawComplete` of a withdrawal no longer held is rejected with
///   [`RejectCode::UnknownWithdrawal`].
pub trait Ledger: Send + Sync {
    /// Applies one command.
    fn submit(&self, cmd: Command) -> Result<(), RejectCode>;
    /// Sum of all BTC balances in sats, available and held, the fee account included.
    fn btc_liabilities(&self) -> Amount;
    /// True when the account exists.
    fn account_exists(&self, account: AccountId) -> bool;
}

impl<T: Ledger + ?Sized> Ledger for std::sync::Arc<T> {
    fn submit(&self, cmd: Command) -> Result<(), RejectCode> {
        (**self).submit(cmd)
    }
    fn btc_liabilities(&self) -> Amount {
        (**self).btc_liabilities()
    }
    fn account_exists(&self, account: AccountId) -> bool {
        (**self).account_exists(account)
    }
}
