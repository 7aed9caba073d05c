//! The withdrawal policy: one question asked on every path by which money leaves an account on
//! the account holder's request, before anything is recorded or submitted.
//!
//! * **Where it is asked.** The signed API's `withdraw/apply` (through
//!   [`crate::capital::apply_withdrawal`], which the store dashboard's withdrawal form calls
//!   too), an internal transfer out of the account (`POST /mapi/v1/transfer`), a Lightning
//!   payment (`POST /mapi/v1/lightning/pay`); the products over the shell ask it on their own
//!   money-out paths (merchant payouts, pull-payment claims, refunds, balance payments).
//!   Money coming *into* an account is never asked about, nor is the resolution of an earlier
//!   request whose outcome was unknown (it completes what was allowed then).
//! * **Who answers.** A product composed over the shell installs one policy at start-up
//!   ([`crate::AppState::set_withdrawal_policy`]); the merchant crate's answers from each
//!   store's withdrawal address allow-list. With none installed, everything is allowed (as
//!   before there was a policy): the `api` crate knows no store.
//! * **The answer.** Allowed; refused with a stable, lower-case code and a message (nothing
//!   is changed: the caller records nothing); or the policy could not be asked (its storage
//!   failed: answered `503`, `-1001`, nothing changed either).
//! * **Time is passed in** (`now_ms`), the policy reads no clock.
//!
//! On the signed API a refusal is **HTTP 403, `-4038`**, its `msg` starting with the policy's
//! code (`address_not_listed: ...`).

use crate::error::ApiError;
use crate::state::AppState;
use axum::http::StatusCode;
use std::sync::Arc;

/// The signed API's code of a withdrawal the policy refused (Binance's `-4xxx` withdrawal range,
/// unused by Binance's documented codes and by this API's others).
pub const POLICY_REFUSED: i32 = -4038;

/// Where money asked to leave an account would go.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Destination {
    /// An on-chain address, as the request gave it (the policy normalizes it).
    Address(String),
    /// Another account of this exchange (an internal transfer).
    Account(u32),
    /// A Lightning payment (the invoice names a node, not an address).
    Lightning,
}

/// The policy's refusal: a stable code (`address_not_listed`) and a message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRefusal {
    /// Stable, lower-case, for clients and tests.
    pub code: &'static str,
    /// What was refused and why (no secret).
    pub message: String,
}

/// Why a withdrawal was not allowed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Refused: nothing is to be changed.
    #[error("{}: {}", .0.code, .0.message)]
    Refused(PolicyRefusal),
    /// The policy could not be asked (its storage failed); nothing is to be changed.
    #[error("withdrawal policy failed: {0}")]
    Failed(String),
}

/// The question asked before money leaves `account` on its holder's request. Blocking (it may
/// read a database): [`check`] runs it on tokio's blocking pool.
pub trait WithdrawalPolicy: Send + Sync + std::fmt::Debug {
    /// Whether `account` may send money to `to` at `now_ms`.
    fn check(&self, account: u32, to: &Destination, now_ms: u64) -> Result<(), PolicyError>;
}

/// The signed API's answer to a refusal: `403`, [`POLICY_REFUSED`], `msg` = `code: message.`.
pub fn refused(r: &PolicyRefusal) -> ApiError {
    ApiError {
        status: StatusCode::FORBIDDEN,
        code: POLICY_REFUSED,
        msg: format!("{}: {}.", r.code, r.message.trim_end_matches('.')).into(),
        retry_after: None,
    }
}

/// The signed API's answer to a [`PolicyError`]: a refusal as [`refused`], a failure as `503`
/// `-1001` (logged; nothing was done).
pub fn policy_error(e: PolicyError) -> ApiError {
    match e {
        PolicyError::Refused(r) => refused(&r),
        // A definite "nothing done" (503 `-1001`, which the dashboard and clients take as a
        // refusal to try again), not a 500 that reads as an unknown outcome.
        PolicyError::Failed(why) => {
            tracing::error!(error = %why, "withdrawal policy failed");
            ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: -1001,
                msg: "The withdrawal policy could not be checked; nothing was done. Try again."
                    .into(),
                retry_after: Some(1),
            }
        }
    }
}

/// Asks the installed policy (none: allowed) whether `account` may send money to `to` now,
/// on the blocking pool. `Err(PolicyError)` as the policy answered.
pub async fn ask(st: &AppState, account: u32, to: Destination) -> Result<(), PolicyError> {
    let Some(p) = st.withdrawal_policy() else {
        return Ok(());
    };
    let now = crate::core::now_ms();
    tokio::task::spawn_blocking(move || p.check(account, &to, now))
        .await
        .unwrap_or_else(|e| Err(PolicyError::Failed(format!("policy task failed: {e}"))))
}

/// [`ask`], answered as the signed API answers ([`policy_error`]).
pub async fn check(st: &AppState, account: u32, to: Destination) -> Result<(), ApiError> {
    ask(st, account, to).await.map_err(policy_error)
}

/// The installed policy's type, as the state keeps it.
pub type Handle = Arc<dyn WithdrawalPolicy>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_403_and_a_failed_policy_a_definite_503() {
        let r = policy_error(PolicyError::Refused(PolicyRefusal {
            code: "address_not_listed",
            message: "not on the list".into(),
        }));
        assert_eq!((r.status, r.code), (StatusCode::FORBIDDEN, POLICY_REFUSED));
        assert!(r.msg.starts_with("address_not_listed: "), "{}", r.msg);
        // Review finding: a 500 read as "may or may not have happened" on the dashboard
        // although nothing was recorded; 503 with -1001 is a refusal to try again.
        let f = policy_error(PolicyError::Failed("database locked".into()));
        assert_eq!((f.status, f.code), (StatusCode::SERVICE_UNAVAILABLE, -1001));
        assert!(
            !f.msg.contains("database locked"),
            "the cause is logged, not shown"
        );
    }
}
