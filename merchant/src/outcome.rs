//! Money that merchant payments move, with every outcome known.
//!
//! A balance payment (`invoice/pay`) and a refund each move money through a boundary that can
//! lose its answer: the engine (a transfer) or custody (a withdrawal). Each is written down
//! *before* it is executed, under an idempotency key derived from what is written:
//! * a balance payment as a [`store::PayIntent`] (key `merchant/pay/<invoice>/<payer>/<due>/<n>`,
//!   `n` the payer's payments already recorded on the invoice: a second payment of the same
//!   amount due, after a chain payment left the chain, has a key of its own),
//! * a refund as a reserved [`store::Refund`] (key `merchant/refund/<invoice>/<n>` for a
//!   transfer, `refund-<invoice>-<n>` for a custody withdrawal; `n` is never reused).
//!
//! The answer is one of *done*, *refused* (nothing moved: the intent is dropped, the
//! reservation given back) or *unknown* (the record stays). An unknown outcome, and a record
//! that a crash left behind, is resolved by [`resolve`] (run by every monitor tick) by asking
//! the other side about the key: the engine answers a repeated transfer key as a duplicate
//! without moving anything again, custody lists its withdrawals by key. Nothing is ever
//! assumed done or not done.

use super::model::Payment;
use super::routes::{commit, with_db};
use super::store::{self, PayIntent, Record, Refund};
use crate::MerchantState as _;
use api::capital::custody_error;
use api::core::Outcome;
use api::custody::{
    Custody, CustodyError, WithdrawalInfo, WithdrawalState, DUPLICATE_WITHDRAWAL_KEY,
};
use api::error::ApiError;
use api::AppState;
use matching_engine::{AccountId, Amount, Command, IdempotencyKey};
use std::sync::Arc;

/// What became of one movement of money.
#[derive(Debug)]
pub enum Moved {
    /// Done; a reference to show (`transfer:<seq>` or `withdrawal:<id>`).
    Done(String),
    /// Refused: nothing moved.
    Refused(ApiError),
    /// No answer: it may or may not have moved.
    Unknown,
}

/// Runs `fut` to completion in its own task, even if the caller's future is dropped (the client
/// went away, or the request timed out): work that moves money must never stop half-way.
pub async fn to_completion<T: Send + 'static>(
    fut: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(fut).await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "merchant task failed");
        Err(ApiError::internal())
    })
}

pub(crate) fn btc_asset(st: &AppState) -> Result<matching_engine::AssetId, ApiError> {
    Ok(st.markets().asset("BTC").ok_or_else(ApiError::internal)?.id)
}

/// The engine transfer of a balance payment.
pub fn pay_command(st: &AppState, intent: &PayIntent, merchant: u32) -> Result<Command, ApiError> {
    Ok(Command::Transfer {
        from: AccountId(intent.payer),
        to: AccountId(merchant),
        asset: btc_asset(st)?,
        amount: Amount(intent.amount_sat),
        key: IdempotencyKey::reference(&format!("merchant/{}", intent.pid)),
    })
}

/// Submits an engine transfer: done (`transfer:<seq>`), refused (rejected, or not taken: a full
/// queue or an open circuit breaker), or unknown.
///
/// `resolving`: the transfer repeats an earlier one whose outcome is unknown, to learn it (the
/// engine answers a repeated key as done, once). Then only the engine's answer is final: "not
/// taken" (busy, halted) says nothing about the earlier attempt, so it stays unknown and the
/// caller must not cancel what it reserved.
pub(crate) async fn transfer(st: &AppState, cmd: Command, resolving: bool) -> Moved {
    match st.submit_outcome(cmd).await {
        Outcome::Applied(reply) => Moved::Done(format!("transfer:{}", reply.applied_seq())),
        Outcome::Rejected(matching_engine::RejectCode::EngineBusy) if resolving => Moved::Unknown,
        Outcome::Rejected(code) => Moved::Refused(ApiError::command_rejected(code)),
        Outcome::Busy | Outcome::Halted if resolving => Moved::Unknown,
        Outcome::Busy => Moved::Refused(ApiError::busy()),
        Outcome::Halted => Moved::Refused(ApiError::halted()),
        _ => Moved::Unknown,
    }
}

/// Executes a balance payment's transfer (`resolving`: see [`transfer`]).
pub async fn execute_payment(
    st: &AppState,
    intent: &PayIntent,
    merchant: u32,
    resolving: bool,
) -> Moved {
    let cmd = match pay_command(st, intent, merchant) {
        Ok(c) => c,
        Err(e) => return Moved::Refused(e),
    };
    transfer(st, cmd, resolving).await
}

/// Records an executed balance payment on its invoice (with its webhooks), then drops the
/// intent. Idempotent: a payment already on the invoice is not added twice.
pub async fn record_payment(
    st: &AppState,
    mut rec: Record,
    name: String,
    intent: &PayIntent,
    now_ms: u64,
) -> Result<Record, ApiError> {
    let known = rec.inv.payments.iter().any(|p| p.id == intent.pid);
    let rec = if known {
        rec
    } else {
        let payment = Payment::balance(
            intent.pid.clone(),
            intent.payer,
            intent.amount_sat,
            intent.created_ms,
        );
        let events = rec.inv.observe(&[payment], now_ms);
        commit(st, rec, events, name).await?
    };
    let pid = intent.pid.clone();
    with_db(st, move |c| store::delete_pay_intent(c, &pid).map_err(db)).await?;
    if rec.conv.state == store::ConvState::Wanted {
        st.merchant().kick.notify_one();
    }
    Ok(rec)
}

/// The custody idempotency key of a refund to an address.
pub fn refund_withdrawal_key(r: &Refund) -> String {
    format!("refund-{}-{}", r.invoice_id, r.n)
}

/// The engine transfer of a refund to an account.
fn refund_transfer(st: &AppState, r: &Refund, merchant: u32, to: u32) -> Result<Command, ApiError> {
    Ok(Command::Transfer {
        from: AccountId(merchant),
        to: AccountId(to),
        asset: btc_asset(st)?,
        amount: Amount(r.amount_sat),
        key: IdempotencyKey::reference(&format!("merchant/refund/{}/{}", r.invoice_id, r.n)),
    })
}

/// True for a custody answer that does not say whether anything happened.
fn custody_unknown(e: &CustodyError) -> bool {
    e.status >= 500
}

/// Custody's record of the withdrawal under `key` from `merchant` to `address`, if it has one.
/// `Err` when custody could not be asked. A record under the key with another account, amount
/// or address is a conflict: an alarm, and never done (it counts as unknown: the refund or
/// payout stays reserved for the operator). The keys are predictable, so a holder of a
/// `withdraw` key of the store could take one first, to its own address: the address is
/// compared as custody stores it ([`crate::allowlist::same_address`]).
fn custody_record(
    custody: &dyn Custody,
    merchant: u32,
    key: &str,
    address: &str,
    amount_sat: u64,
) -> Result<Option<WithdrawalInfo>, ()> {
    let found = custody.withdrawal_by_key(merchant, key).map_err(|e| {
        tracing::warn!(code = e.code, msg = %e.msg, "custody could not look the key up");
    })?;
    match found {
        Some(w)
            if w.account == merchant
                && w.idempotency_key == key
                && w.amount_sat == amount_sat
                && crate::allowlist::same_address(&w.address, address) =>
        {
            Ok(Some(w))
        }
        Some(w) => {
            tracing::error!(
                key,
                withdrawal = w.id,
                "conflict: a withdrawal under a merchant payout's key does not match the payout \
                 (account, amount or address); not done"
            );
            Err(())
        }
        None => Ok(None),
    }
}

/// What custody's record of a withdrawal says of the movement: done once custody holds the
/// amount, unknown while its hold is unresolved (custody may still be refused the hold and
/// remove the record: a refund taken for done then would never be paid, its amount reserved for
/// good), refused when custody already released it (nothing will be paid: the reservation is
/// given back, and no `invoice.refunded` is sent for it).
pub(crate) fn done_or_unknown(w: &WithdrawalInfo) -> Moved {
    match w.state {
        WithdrawalState::Unresolved => Moved::Unknown,
        WithdrawalState::Released => Moved::Refused(ApiError::bad(
            -4043,
            format!(
                "custody released withdrawal {}: {}",
                w.id,
                w.reason.as_deref().unwrap_or("no reason given")
            ),
        )),
        _ => Moved::Done(format!("withdrawal:{}", w.id)),
    }
}

/// Custody's record of the withdrawal under `key` ([`custody_record`]), asked on the blocking
/// pool: `Err` when custody is absent or could not answer, or the record is a conflict.
pub(crate) async fn custody_record_of(
    custody: Option<Arc<dyn Custody>>,
    merchant: u32,
    key: String,
    address: String,
    amount_sat: u64,
) -> Result<Option<WithdrawalInfo>, ()> {
    let Some(c) = custody else {
        return Err(());
    };
    tokio::task::spawn_blocking(move || {
        custody_record(c.as_ref(), merchant, &key, &address, amount_sat)
    })
    .await
    .unwrap_or(Err(()))
}

/// The one way merchant payments move money out through custody (refunds to an address and
/// store pull-payment payouts): a withdrawal of `amount_sat` from `merchant` to `address` under
/// the idempotency `key`. `ask_first`: look for custody's record of the key before requesting
/// (resolving an unknown outcome). A key already taken is answered by custody's record of it:
/// done when it matches, unknown otherwise; a 5xx is unknown; any other refusal is refused.
/// Without custody: refused, or unknown when resolving.
pub(crate) async fn custody_withdrawal(
    custody: Option<Arc<dyn Custody>>,
    merchant: u32,
    address: String,
    amount_sat: u64,
    key: String,
    ask_first: bool,
) -> Moved {
    let Some(c) = custody else {
        return if ask_first {
            Moved::Unknown
        } else {
            Moved::Refused(api::capital::unavailable())
        };
    };
    let task = tokio::task::spawn_blocking(move || {
        if ask_first {
            match custody_record(c.as_ref(), merchant, &key, &address, amount_sat) {
                Ok(Some(w)) => return done_or_unknown(&w),
                Ok(None) => {}
                Err(()) => return Moved::Unknown,
            }
        }
        match c.request_withdrawal(merchant, &address, amount_sat, &key) {
            Ok(w) => done_or_unknown(&w),
            Err(e) if custody_unknown(&e) => Moved::Unknown,
            // The key is taken: by this payout's own earlier attempt, or not at all.
            Err(e) if e.code == DUPLICATE_WITHDRAWAL_KEY => {
                match custody_record(c.as_ref(), merchant, &key, &address, amount_sat) {
                    Ok(Some(w)) => done_or_unknown(&w),
                    _ => Moved::Unknown,
                }
            }
            Err(e) => Moved::Refused(custody_error(e)),
        }
    });
    task.await.unwrap_or(Moved::Unknown)
}

/// Executes a reserved refund (the first time, or again to resolve it: the key makes a repeat
/// harmless). `ask_first`: look for custody's record before requesting (resolution).
pub async fn execute_refund(
    st: &AppState,
    r: &Refund,
    merchant: u32,
    custody: Option<Arc<dyn Custody>>,
    ask_first: bool,
) -> Moved {
    match (r.to_account, &r.to_address) {
        (Some(to), _) => {
            let cmd = match refund_transfer(st, r, merchant, to) {
                Ok(c) => c,
                Err(e) => return Moved::Refused(e),
            };
            transfer(st, cmd, ask_first).await
        }
        (None, Some(addr)) => {
            custody_withdrawal(
                custody,
                merchant,
                addr.clone(),
                r.amount_sat,
                refund_withdrawal_key(r),
                ask_first,
            )
            .await
        }
        (None, None) => Moved::Refused(ApiError::internal()),
    }
}

/// Applies the outcome of a refund's execution to its record: done → `done` plus the
/// `invoice.refunded` webhook; refused → `cancelled`, the reservation given back; unknown →
/// `unknown`, reserved until resolved.
pub async fn settle_refund(
    st: &AppState,
    rec: &Record,
    name: &str,
    r: &Refund,
    moved: &Moved,
    now_ms: u64,
) -> Result<(), ApiError> {
    let (iid, n) = (r.invoice_id.clone(), r.n);
    match moved {
        Moved::Done(reference) => {
            let body = super::routes::merchant_json(st, rec, name, now_ms);
            let (r2, ref2) = (rec.clone(), reference.clone());
            with_db(st, move |c| {
                store::finish_refund(c, &r2, n, &ref2, &body, now_ms).map_err(db)
            })
            .await?;
            st.merchant().enqueued.notify_one();
        }
        Moved::Refused(_) => {
            with_db(st, move |c| store::cancel_refund(c, &iid, n).map_err(db)).await?;
        }
        Moved::Unknown => {
            tracing::warn!(invoice = %iid, n, "refund outcome unknown; resolved by its key");
            with_db(st, move |c| {
                store::mark_refund_unknown(c, &iid, n).map_err(db)
            })
            .await?;
        }
    }
    Ok(())
}

/// How many paid-out refunds (and payouts) one monitor tick looks at, those looked at longest
/// ago first: rows that wait long (an approval, coins) never keep the others from being seen.
pub(crate) const FOLLOW_PER_TICK: u32 = 64;

/// Where a withdrawal custody took stands for whoever reserved its amount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Followed {
    /// Paid and confirmed: nothing more to follow.
    Paid,
    /// Released (an operator rejected it, or its address was refused): the amount is back in
    /// the merchant's balance, and the reservation must be given back too.
    GivenBack,
}

/// What a withdrawal's state says of its end ([`Followed`]), if it has one yet.
pub(crate) fn followed(state: WithdrawalState) -> Option<Followed> {
    match state {
        WithdrawalState::Completed => Some(Followed::Paid),
        WithdrawalState::Released => Some(Followed::GivenBack),
        WithdrawalState::Unresolved
        | WithdrawalState::AwaitingApproval
        | WithdrawalState::Pending
        | WithdrawalState::Processing => None,
    }
}

/// Follows refunds to an address that custody took (`done`) until it pays or gives them back
/// (at most [`FOLLOW_PER_TICK`] a call, those looked at longest ago first; run by every
/// monitor tick). A refund whose withdrawal custody released is `cancelled` and its amount no
/// longer counts as refunded, so that the merchant can refund it again; before, it stayed
/// `done` and reserved for good while the customer got nothing. Returns how many were given
/// back.
pub async fn follow_refunds(st: &AppState) -> Result<usize, ApiError> {
    let Some(custody) = st.custody() else {
        return Ok(0);
    };
    let now = api::core::now_ms();
    let open = with_db(st, |c| {
        store::refunds_to_follow(c, FOLLOW_PER_TICK).map_err(db)
    })
    .await?;
    let mut given_back = 0;
    for (r, merchant) in open {
        let Some(address) = r.to_address.clone() else {
            continue;
        };
        let (iid, n) = (r.invoice_id.clone(), r.n);
        let key = refund_withdrawal_key(&r);
        let found =
            custody_record_of(Some(custody.clone()), merchant, key, address, r.amount_sat).await;
        let end = match found {
            Ok(Some(w)) => followed(w.state),
            // No withdrawal under its key: only a row an older build took for done while its
            // hold was unresolved, and custody removed (never paid). Not given back blindly:
            // left reserved for the operator, no longer followed.
            Ok(None) => {
                tracing::error!(invoice = %iid, n, "a done refund has no custody withdrawal; left reserved");
                Some(Followed::Paid)
            }
            Err(()) => None,
        };
        let Some(end) = end else {
            // Not at its end yet: the others come first next time (oldest look first).
            with_db(st, move |c| {
                store::refund_checked(c, &iid, n, now).map_err(db)
            })
            .await?;
            continue;
        };
        let back = end == Followed::GivenBack;
        if back {
            tracing::warn!(invoice = %iid, n, "refund released by custody: given back");
            given_back += 1;
        }
        let st2 = st.clone();
        let announced = with_db(st, move |c| {
            let render =
                |rec: &Record, name: &str| super::routes::merchant_json(&st2, rec, name, now);
            let back = back.then_some(store::GivenBack {
                render: &render,
                now_ms: now,
            });
            store::refund_followed(c, &iid, n, back).map_err(db)
        })
        .await?;
        if announced {
            st.merchant().enqueued.notify_one();
        }
    }
    Ok(given_back)
}

/// What [`resolve`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Balance payments found done and recorded.
    pub payments: usize,
    /// Intents found refused and dropped.
    pub dropped: usize,
    /// Refunds found done.
    pub refunds_done: usize,
    /// Refunds found refused and given back.
    pub refunds_cancelled: usize,
    /// Still unknown (asked again next time).
    pub unknown: usize,
}

/// Resolves every outcome left unknown, and every one a crash interrupted, by asking about its
/// key. The caller holds the invoice lock, which handlers hold from writing an intent or a
/// reservation down to recording its outcome: so every intent and every `pending` refund seen
/// here is one whose handler is gone.
pub async fn resolve(st: &AppState, now_ms: u64) -> Result<Resolved, ApiError> {
    let mut out = Resolved::default();
    let intents = with_db(st, |c| store::pay_intents(c).map_err(db)).await?;
    for intent in intents {
        let id = intent.invoice_id.clone();
        let Some((rec, name)) = with_db(st, move |c| load(c, &id)).await? else {
            tracing::error!(pid = %intent.pid, "a payment intent names no invoice");
            continue;
        };
        if rec.inv.payments.iter().any(|p| p.id == intent.pid) {
            record_payment(st, rec, name, &intent, now_ms).await?;
            continue;
        }
        match execute_payment(st, &intent, rec.inv.merchant, true).await {
            Moved::Done(_) => {
                record_payment(st, rec, name, &intent, now_ms).await?;
                out.payments += 1;
            }
            Moved::Refused(e) => {
                tracing::info!(pid = %intent.pid, code = e.code, "payment intent was not executed");
                let pid = intent.pid.clone();
                with_db(st, move |c| store::delete_pay_intent(c, &pid).map_err(db)).await?;
                out.dropped += 1;
            }
            Moved::Unknown => out.unknown += 1,
        }
    }
    let refunds = with_db(st, move |c| store::unresolved_refunds(c, true).map_err(db)).await?;
    for r in refunds {
        let id = r.invoice_id.clone();
        let Some((rec, name)) = with_db(st, move |c| load(c, &id)).await? else {
            continue;
        };
        let custody = st.custody();
        let moved = execute_refund(st, &r, rec.inv.merchant, custody, true).await;
        match &moved {
            Moved::Done(_) => out.refunds_done += 1,
            Moved::Refused(_) => out.refunds_cancelled += 1,
            Moved::Unknown => {
                out.unknown += 1;
                continue;
            }
        }
        // The invoice as stored now (the reservation is part of it).
        let iid = r.invoice_id.clone();
        let (rec, name) = with_db(st, move |c| load(c, &iid))
            .await?
            .unwrap_or((rec, name));
        settle_refund(st, &rec, &name, &r, &moved, now_ms).await?;
    }
    Ok(out)
}

fn load(c: &mut rusqlite::Connection, id: &str) -> Result<Option<(Record, String)>, ApiError> {
    let Some(rec) = store::load(c, id).map_err(db)? else {
        return Ok(None);
    };
    let name = store::settings_or_default(c, rec.inv.merchant)
        .map_err(db)?
        .name;
    Ok(Some((rec, name)))
}

fn db(e: rusqlite::Error) -> ApiError {
    tracing::error!(error = %e, "merchant database failed");
    ApiError::internal()
}
