//! Lightning for users and the operator: deposit invoices (`POST /mapi/v1/lightning/invoice`),
//! withdrawals by paying a BOLT11 invoice (`POST /mapi/v1/lightning/pay`, `withdraw`), their
//! status, and the node's channels and balances on the admin listener.
//!
//! The application implements [`Lightning`] over the `lightning-custody` crate (ldk-node); the
//! API never sees its types, only strings and satoshis. Every method is blocking: handlers call
//! it on tokio's blocking pool. A refusal is a [`CustodyError`] with a stable code (`-46xx`,
//! `-4026` insufficient balance, `-2015` unknown account) and means nothing changed.

use crate::capital::{btc_amount, custody_error, BTC_DECIMALS};
use crate::custody::CustodyError;
use crate::error::ApiError;
use crate::state::{ok_json, AppState, Req};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// The longest BOLT11 invoice accepted (BOLT11 has no hard limit; real ones are < 1,000 chars).
pub const MAX_INVOICE_LEN: usize = crate::params::MAX_INVOICE_VALUE_LEN;
/// How long `pay` waits for the payment's outcome before it answers `pending`.
pub const PAY_WAIT: Duration = Duration::from_secs(10);

/// A deposit invoice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LnInvoiceInfo {
    /// The BOLT11 invoice.
    pub invoice: String,
    /// Its payment hash (hex).
    pub payment_hash: String,
    /// Amount, satoshis.
    pub amount_sat: u64,
    /// Expiry, ms since the epoch.
    pub expires_ms: u64,
}

/// A payment received for an invoice of ours and credited to its account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LnReceived {
    /// Satoshis credited.
    pub amount_sat: u64,
    /// When the node recorded the payment, ms since the epoch.
    pub time_ms: u64,
}

/// A Lightning withdrawal's state as users see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LnPaymentState {
    /// Held; the payment is under way (or its outcome is being resolved).
    Pending,
    /// Paid; amount + fee left the balance.
    Completed,
    /// Not paid; the hold was given back.
    Released,
}

/// A Lightning withdrawal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LnPaymentInfo {
    /// Id.
    pub id: u64,
    /// Owner.
    pub account: u32,
    /// The invoice's payment hash (hex).
    pub payment_hash: String,
    /// Amount paid, satoshis.
    pub amount_sat: u64,
    /// Fee charged, satoshis.
    pub fee_sat: u64,
    /// State.
    pub state: LnPaymentState,
    /// Why it was released.
    pub reason: Option<String>,
}

/// A channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LnChannelInfo {
    /// Our id for it (`ln close` takes it), decimal.
    pub channel_id: String,
    /// The peer's node id.
    pub counterparty: String,
    /// Capacity, satoshis.
    pub capacity_sat: u64,
    /// What we can send, msat.
    pub outbound_msat: u64,
    /// What we can receive, msat.
    pub inbound_msat: u64,
    /// Confirmed and ready.
    pub ready: bool,
    /// Ready and the peer connected.
    pub usable: bool,
    /// We opened it.
    pub outbound: bool,
}

/// The node's balances (channel funds listed apart: they cannot be proven on chain).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LnBalanceInfo {
    /// The node's id.
    pub node_id: String,
    /// The node's on-chain wallet.
    pub onchain_sat: u64,
    /// Our side of the channels.
    pub channels_sat: u64,
    /// Closed channels' funds still being swept.
    pub pending_close_sat: u64,
    /// Part of `onchain_sat` kept as the anchor reserve.
    pub anchor_reserve_sat: u64,
}

/// What the API needs from the Lightning node.
pub trait Lightning: Send + Sync + std::fmt::Debug {
    /// A BOLT11 invoice crediting `account` once when paid.
    fn deposit_invoice(&self, account: u32, amount_sat: u64)
        -> Result<LnInvoiceInfo, CustodyError>;
    /// A merchant invoice's BOLT11 part: `amount_sat` to the merchant's `account`, credited
    /// once when paid (like a deposit), expiring in `expiry_secs`, with `description`.
    fn merchant_invoice(
        &self,
        account: u32,
        amount_sat: u64,
        description: &str,
        expiry_secs: u32,
    ) -> Result<LnInvoiceInfo, CustodyError>;
    /// What was received for an invoice of ours (payment hash, hex), once it is credited.
    fn received(&self, payment_hash: &str) -> Result<Option<LnReceived>, CustodyError>;
    /// Invoices of ours credited after position `after` (0: from the first), in the order the
    /// credits were applied, at most `limit`: `(position, payment hash as hex)`. A reader that
    /// keeps the last position it handled sees every credit once, however late it came (the
    /// merchant's monitor records BOLT11 payments on their invoices this way).
    fn credited_after(&self, after: u64, limit: u32) -> Result<Vec<(u64, String)>, CustodyError>;
    /// Holds amount + fee of `account` and pays `invoice`.
    fn pay(&self, account: u32, invoice: &str) -> Result<LnPaymentInfo, CustodyError>;
    /// A withdrawal of `account` by id.
    fn payment(&self, account: u32, id: u64) -> Result<Option<LnPaymentInfo>, CustodyError>;
    /// The withdrawal of `account` paying `invoice` that [`pay`](Self::pay) would answer a retry
    /// with (not refused or released), if any.
    fn payment_of_invoice(
        &self,
        account: u32,
        invoice: &str,
    ) -> Result<Option<LnPaymentInfo>, CustodyError>;
    /// Changes (its value is a counter) whenever a withdrawal may have become final: `pay`
    /// waits on it asynchronously, holding no thread, and looks its withdrawal up again at each
    /// change, for at most [`PAY_WAIT`]. `None` (the default): `pay` answers at once.
    fn settled(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
    /// The node's channels.
    fn channels(&self) -> Result<Vec<LnChannelInfo>, CustodyError>;
    /// The node's balances.
    fn balance(&self) -> Result<LnBalanceInfo, CustodyError>;
    /// Opens a channel to `NODEID@HOST:PORT`; answers its id.
    fn open_channel(&self, peer: &str, amount_sat: u64) -> Result<String, CustodyError>;
    /// Closes a channel cooperatively.
    fn close_channel(&self, channel_id: &str) -> Result<(), CustodyError>;
    /// A new address of the node's on-chain wallet (to fund channels).
    fn onchain_address(&self) -> Result<String, CustodyError>;
}

fn unavailable() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: -1001,
        msg: "Lightning is not available.".into(),
        retry_after: None,
    }
}

/// The attached node, or `503` / `-1001`.
fn lightning(st: &AppState) -> Result<Handle, ApiError> {
    st.0.lightning.get().cloned().ok_or_else(unavailable)
}

async fn call<T, F>(st: &AppState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Lightning) -> Result<T, CustodyError> + Send + 'static,
{
    call_on(lightning(st)?, f).await
}

/// `f` on `ln`, on the blocking pool (every [`Lightning`] method is a short blocking call).
async fn call_on<T, F>(ln: Handle, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Lightning) -> Result<T, CustodyError> + Send + 'static,
{
    tokio::task::spawn_blocking(move || f(&*ln))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "lightning task failed");
            ApiError::internal()
        })?
        .map_err(custody_error)
}

fn to_json<T: Serialize>(v: &T) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|e| {
        tracing::error!(error = %e, "serializing lightning data failed");
        ApiError::internal()
    })
}

fn payment_json(p: &LnPaymentInfo) -> Value {
    json!({
        "id": p.id.to_string(),
        "paymentHash": p.payment_hash,
        "amount": crate::decimal::format_units(p.amount_sat, BTC_DECIMALS),
        "fee": crate::decimal::format_units(p.fee_sat, BTC_DECIMALS),
        "status": p.state,
        "reason": p.reason,
    })
}

/// `POST /mapi/v1/lightning/invoice` (READ, as a deposit address): `amount` (BTC) →
/// `{"invoice", "paymentHash", "amount", "expireTime"}`.
pub async fn invoice(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let amount = btc_amount(&mut p, "amount")?;
    p.finish()?;
    let account = key.account;
    lightning(&st)?;
    charge_invoice(&st, account)?;
    let i = call(&st, move |l| l.deposit_invoice(account, amount)).await?;
    Ok(ok_json(
        &ctx,
        json!({
            "invoice": i.invoice,
            "paymentHash": i.payment_hash,
            "amount": crate::decimal::format_units(i.amount_sat, BTC_DECIMALS),
            "expireTime": i.expires_ms,
        }),
    ))
}

/// Counts one deposit invoice of `account` against its hourly limit (`429`, `-1003`), as a new
/// deposit address is counted: each is kept by the node and swept by custody for good.
fn charge_invoice(st: &AppState, account: u32) -> Result<(), ApiError> {
    crate::capital::charge_per_account_hour(
        st,
        &st.0.ln_invoice_limiter,
        account,
        "Lightning invoices",
    )
}

/// `POST /mapi/v1/lightning/pay` (WITHDRAW): `invoice` (BOLT11 with an amount) → the withdrawal,
/// after its outcome or after [`PAY_WAIT`] (`pending`; ask `GET /mapi/v1/lightning/pay?id=`).
/// The withdrawal policy is asked before the node ([`crate::policy`]: `403`, `-4038`, nothing
/// held). The same account paying the same invoice again is a retry (its answer was lost): it is
/// answered with its withdrawal, and a policy turned on since does not turn that answer into a
/// refusal (the node is asked for the invoice's withdrawal before the refusal stands).
pub async fn pay(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let invoice = p.req("invoice")?;
    if invoice.len() > MAX_INVOICE_LEN || !invoice.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(ApiError::illegal("invoice", "^[A-Za-z0-9]{1,2048}$"));
    }
    p.finish()?;
    let account = key.account;
    lightning(&st)?;
    if let Err(refused) =
        crate::policy::check(&st, account, crate::policy::Destination::Lightning).await
    {
        let w = call(&st, move |l| l.payment_of_invoice(account, &invoice))
            .await?
            .ok_or(refused)?;
        let w = wait_outcome(lightning(&st)?, w, tokio::time::sleep(PAY_WAIT)).await?;
        return Ok(ok_json(&ctx, payment_json(&w)));
    }
    let w = call(&st, move |l| l.pay(account, &invoice)).await?;
    let w = wait_outcome(lightning(&st)?, w, tokio::time::sleep(PAY_WAIT)).await?;
    Ok(ok_json(&ctx, payment_json(&w)))
}

/// `w` once it is no longer pending, or as it is when `deadline` completes (`pay` passes a
/// [`PAY_WAIT`] sleep; tests pass a deadline they release). Woken by the node's
/// [`Lightning::settled`] (not by polling) and waiting asynchronously: a pending payment holds
/// no thread, only each look-up runs (briefly) on the blocking pool.
async fn wait_outcome(
    ln: Handle,
    mut w: LnPaymentInfo,
    deadline: impl std::future::Future<Output = ()>,
) -> Result<LnPaymentInfo, ApiError> {
    if w.state != LnPaymentState::Pending {
        return Ok(w);
    }
    let Some(mut settled) = ln.settled() else {
        return Ok(w);
    };
    let (account, id) = (w.account, w.id);
    tokio::pin!(deadline);
    loop {
        // Marked seen before the look-up: a settlement after it wakes the wait below.
        settled.borrow_and_update();
        let ln = ln.clone();
        // The payment was sent: a failed look-up answers it as still pending (with its id, for
        // `GET pay`), never as an error the client would read as "not paid".
        match call_on(ln, move |l| l.payment(account, id)).await {
            Ok(Some(now)) => w = now,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(account, id, error = ?e, "looking up a sent lightning payment");
                return Ok(w);
            }
        }
        if w.state != LnPaymentState::Pending {
            return Ok(w);
        }
        tokio::select! {
            _ = &mut deadline => return Ok(w),
            changed = settled.changed() => {
                if changed.is_err() {
                    // The node is gone: answer what we have.
                    return Ok(w);
                }
            }
        }
    }
}

/// `GET /mapi/v1/lightning/pay` (READ): `id` → the account's withdrawal.
pub async fn pay_status(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let id = p.opt_u64("id")?.ok_or_else(|| ApiError::missing("id"))?;
    p.finish()?;
    let account = key.account;
    match call(&st, move |l| l.payment(account, id)).await? {
        Some(w) => Ok(ok_json(&ctx, payment_json(&w))),
        None => Err(ApiError::bad(-4030, "Unknown withdrawal.")),
    }
}

/// `GET /mapi/v1/admin/lightning/channels` (ADMIN).
pub async fn admin_channels(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, p, ctx) = st.signed(&req)?;
    p.finish()?;
    let c = call(&st, |l| l.channels()).await?;
    Ok(ok_json(&ctx, to_json(&c)?))
}

/// `GET /mapi/v1/admin/lightning/balance` (ADMIN).
pub async fn admin_balance(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, p, ctx) = st.signed(&req)?;
    p.finish()?;
    let b = call(&st, |l| l.balance()).await?;
    Ok(ok_json(&ctx, to_json(&b)?))
}

/// `POST /mapi/v1/admin/lightning/channel/open` (ADMIN): `peer` (`NODEID@HOST:PORT`),
/// `amountSat` → `{"channelId"}`. Audited before and after (intent, outcome).
pub async fn admin_open(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req)?;
    let peer = p.req("peer")?;
    if peer.len() > 300 || !peer.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::illegal("peer", "NODEID@HOST:PORT"));
    }
    let amount = p
        .opt_u64("amountSat")?
        .ok_or_else(|| ApiError::missing("amountSat"))?;
    p.finish()?;
    // Custody's money moves into a channel: announced before (`lightning.open_channel.intent`),
    // its outcome (with the channel id) logged after.
    lightning(&st)?;
    let announced = json!({"peer": &peer, "amount_sat": amount});
    let id = st
        .audited(
            "lightning.open_channel",
            announced.clone(),
            call(&st, move |l| l.open_channel(&peer, amount)),
            |id| {
                let mut v = announced.clone();
                v["channel_id"] = json!(id);
                Ok(v)
            },
        )
        .await?;
    Ok(ok_json(&ctx, json!({"channelId": id})))
}

/// `POST /mapi/v1/admin/lightning/channel/close` (ADMIN): `channelId`. Audited before and after
/// (intent, outcome).
pub async fn admin_close(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req)?;
    let id = p.req("channelId")?;
    if id.is_empty() || id.len() > 40 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::illegal("channelId", "^[0-9]{1,40}$"));
    }
    p.finish()?;
    // Announced before (`lightning.close_channel.intent`), its outcome logged after.
    lightning(&st)?;
    let announced = json!({"channel_id": &id});
    st.audited(
        "lightning.close_channel",
        announced.clone(),
        call(&st, move |l| l.close_channel(&id)),
        |_| Ok(announced.clone()),
    )
    .await?;
    Ok(ok_json(&ctx, json!({})))
}

/// `POST /mapi/v1/admin/lightning/address` (ADMIN): a new on-chain address of the node.
pub async fn admin_address(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, p, ctx) = st.signed(&req)?;
    p.finish()?;
    let a = call(&st, |l| l.onchain_address()).await?;
    Ok(ok_json(&ctx, json!({"address": a})))
}

/// Attaches the node (see [`AppState::set_lightning`]).
pub type Handle = Arc<dyn Lightning>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A node whose payments never settle: every withdrawal stays pending.
    #[derive(Debug)]
    struct NeverSettles {
        /// How many times a payment was looked up (the test waits on it).
        lookups: tokio::sync::watch::Sender<usize>,
        /// Never changes (kept so the receivers never see the sender gone).
        settled: tokio::sync::watch::Sender<u64>,
    }

    fn pending(id: u64) -> LnPaymentInfo {
        LnPaymentInfo {
            id,
            account: 7,
            payment_hash: "00".repeat(32),
            amount_sat: 1_000,
            fee_sat: 0,
            state: LnPaymentState::Pending,
            reason: None,
        }
    }

    fn refused() -> CustodyError {
        CustodyError::bad_request(-1000, "not in this fake".to_owned())
    }

    impl Lightning for NeverSettles {
        fn deposit_invoice(&self, _: u32, _: u64) -> Result<LnInvoiceInfo, CustodyError> {
            Err(refused())
        }
        fn merchant_invoice(
            &self,
            _: u32,
            _: u64,
            _: &str,
            _: u32,
        ) -> Result<LnInvoiceInfo, CustodyError> {
            Err(refused())
        }
        fn received(&self, _: &str) -> Result<Option<LnReceived>, CustodyError> {
            Ok(None)
        }
        fn credited_after(&self, _: u64, _: u32) -> Result<Vec<(u64, String)>, CustodyError> {
            Ok(Vec::new())
        }
        fn pay(&self, _: u32, _: &str) -> Result<LnPaymentInfo, CustodyError> {
            Err(refused())
        }
        fn payment(&self, _: u32, id: u64) -> Result<Option<LnPaymentInfo>, CustodyError> {
            self.lookups.send_modify(|n| *n += 1);
            Ok(Some(pending(id)))
        }
        fn payment_of_invoice(
            &self,
            _: u32,
            _: &str,
        ) -> Result<Option<LnPaymentInfo>, CustodyError> {
            Ok(None)
        }
        fn settled(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
            Some(self.settled.subscribe())
        }
        fn channels(&self) -> Result<Vec<LnChannelInfo>, CustodyError> {
            Ok(Vec::new())
        }
        fn balance(&self) -> Result<LnBalanceInfo, CustodyError> {
            Err(refused())
        }
        fn open_channel(&self, _: &str, _: u64) -> Result<String, CustodyError> {
            Err(refused())
        }
        fn close_channel(&self, _: &str) -> Result<(), CustodyError> {
            Err(refused())
        }
        fn onchain_address(&self) -> Result<String, CustodyError> {
            Err(refused())
        }
    }

    /// Defect: `pay` waited for the outcome on the blocking pool (a `Condvar` inside
    /// `spawn_blocking`, up to `PAY_WAIT`), so ~512 pays to invoices that never settle filled
    /// the pool and stalled every custody call. Now the wait is async: with more pending waits
    /// than blocking threads, a blocking call still runs before any wait times out.
    ///
    /// No race with a clock: the waits' deadline is one the test releases, and only after the
    /// blocking call returned, so no wait can time out first however loaded the machine is.
    /// The one clock is a watchdog that turns a held pool (which, with that deadline, would
    /// never free up) into a failure instead of a hang; the passing run never depends on it.
    #[test]
    fn pending_pay_waits_do_not_hold_blocking_threads() {
        const BLOCKING_THREADS: usize = 2;
        const WAITS: usize = 4 * BLOCKING_THREADS;
        const WATCHDOG: Duration = Duration::from_secs(60);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(BLOCKING_THREADS)
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let (lookups_tx, mut lookups) = tokio::sync::watch::channel(0usize);
            let fake = Arc::new(NeverSettles {
                lookups: lookups_tx,
                settled: tokio::sync::watch::channel(0).0,
            });
            let ln: Handle = fake.clone();
            let (release, released) = tokio::sync::watch::channel(false);
            let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
            for id in 0..WAITS as u64 {
                let (ln, done_tx, mut released) = (ln.clone(), done_tx.clone(), released.clone());
                tokio::spawn(async move {
                    let deadline = async move {
                        let _ = released.wait_for(|r| *r).await;
                    };
                    let w = wait_outcome(ln, pending(id), deadline).await;
                    let _ = done_tx.send(w.map(|w| w.state));
                });
            }
            drop(done_tx);
            let blocking = tokio::time::timeout(WATCHDOG, async {
                // Every wait started (looked its payment up at least once) ...
                lookups.wait_for(|n| *n >= WAITS).await.unwrap();
                // ... and a blocking call still gets a thread.
                tokio::task::spawn_blocking(|| 42).await.unwrap()
            })
            .await;
            assert_eq!(
                blocking.ok(),
                Some(42),
                "the pending waits hold the blocking pool: no blocking call ran within {WATCHDOG:?}"
            );
            assert!(
                matches!(
                    done_rx.try_recv(),
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty)
                ),
                "a wait ended before its deadline"
            );
            // The waits end, pending, when their deadline comes.
            release.send(true).unwrap();
            let mut ended = 0;
            while let Some(w) = done_rx.recv().await {
                assert_eq!(w.unwrap(), LnPaymentState::Pending);
                ended += 1;
            }
            assert_eq!(ended, WAITS);
        });
    }
}
