//! The merchant monitor: a tokio task that, every `poll` (or at once when a handler asks),
//! runs one [`tick`]:
//! 1. custody's deposits (on the blocking pool), joined to invoices by address: new payments,
//!    confirmations, credits and reorgs → invoice transitions (each committed with its webhooks
//!    in one transaction, then published to the checkout pages);
//!    1b. BOLT11 parts that the Lightning service has credited (by payment hash) → a
//!    `lightning` payment, final at once (settles the invoice whatever its speed policy);
//! 2. invoices past their expiry → `Expired`;
//! 3. settled invoices of merchants who convert: a limit IOC sell of the received BTC (rounded
//!    down to the market's lot) at the worst acceptable price (the reference price of
//!    [`super::price`] less the configured slippage, so it never fills below that) once every
//!    counted chain payment is credited; what did not fill, or could not be priced (stale, thin
//!    or wide book), is retried on the next tick.
//!
//! It owns the webhook dispatcher: it wakes it after anything was enqueued (by itself or by a
//! handler, through [`super::Merchant::enqueued`]) and shuts it down last.

use super::model::{Payment, Source};
use super::routes::{commit, with_db};
use super::store::{self, ConvState, Record};
use super::webhook::{Dispatcher, RetryPolicy};
use crate::MerchantState as _;
use api::core::Outcome;
use api::custody::DepositState;
use api::error::ApiError;
use api::AppState;
use matching_engine::{
    AccountId, ClientOrderId, Command, Event, NewOrder, OrderType, Price, Qty, Side, StpMode,
    TimeInForce,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The most of the node's credits read per tick, in the order they were applied, after the last
/// one handled (`monitor_cursor` `ln_credits`): every BOLT11 payment is recorded on its
/// invoice, however late the ledger took its credit.
pub const LN_CREDITS_PER_TICK: u32 = 1_000;
const LN_CREDITS: &str = "ln_credits";

/// What one tick did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Invoices whose stored state changed.
    pub changed: usize,
    /// Webhook events enqueued.
    pub events: usize,
    /// Market sells submitted.
    pub sells: usize,
}

/// The running monitor.
#[derive(Debug)]
pub struct MonitorHandle {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl MonitorHandle {
    /// Stops the monitor (after its current tick), then the dispatcher.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Starts the webhook dispatcher (default retry policy, endpoints from the store settings) and
/// the monitor. Call after custody is attached ([`AppState::set_custody`]); until then ticks do
/// expiry and conversion only.
pub fn start(state: &AppState, poll: Duration) -> MonitorHandle {
    let dispatcher = Dispatcher::spawn_with_targets(
        state.merchant().db.clone(),
        Arc::new(super::Endpoints::new(state.clone())),
        RetryPolicy::default(),
        state.merchant().cfg.webhook_targets.clone(),
    );
    spawn(state.clone(), poll, Some(dispatcher))
}

/// Spawns the monitor task on the current tokio runtime.
pub fn spawn(state: AppState, poll: Duration, dispatcher: Option<Dispatcher>) -> MonitorHandle {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let m = state.merchant();
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                _ = m.enqueued.notified() => {
                    if let Some(d) = &dispatcher { d.wake(); }
                    continue;
                }
                _ = m.kick.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
            match tick(&state, api::core::now_ms()).await {
                Ok(r) if r.events > 0 => {
                    if let Some(d) = &dispatcher {
                        d.wake();
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "merchant monitor tick failed"),
            }
        }
        if let Some(d) = dispatcher {
            d.shutdown().await;
        }
    });
    MonitorHandle { stop, task }
}

/// Records a BOLT11 payment on invoice `id` (once: a payment already there changes nothing).
async fn record_lightning(
    state: &AppState,
    id: String,
    payment: Payment,
    now_ms: u64,
    report: &mut TickReport,
) -> Result<(), ApiError> {
    let Some((rec, name)) = load(state, id).await? else {
        return Ok(());
    };
    let mut next = rec.clone();
    let events = next.inv.observe(&[payment], now_ms);
    if next != rec {
        report.changed += 1;
        report.events += events.len();
        commit(state, next, events, name).await?;
    }
    Ok(())
}

/// The node's credits applied since the last one handled, in order: each one of an invoice's
/// BOLT11 part not yet recorded is recorded, then the cursor moves past it. A credit whose
/// amount the node cannot tell yet stops the reading (read again next tick).
async fn lightning_credits(
    state: &AppState,
    ln: api::lightning::Handle,
    now_ms: u64,
    report: &mut TickReport,
) -> Result<(), ApiError> {
    let after = with_db(state, |c| store::cursor(c, LN_CREDITS).map_err(db)).await?;
    let ln2 = ln.clone();
    let credits =
        tokio::task::spawn_blocking(move || ln2.credited_after(after, LN_CREDITS_PER_TICK))
            .await
            .map_err(|_| ApiError::internal())?;
    let credits = match credits {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e.msg, "lightning credits not read; next tick");
            return Ok(());
        }
    };
    // The cursor moves once, past the last credit handled (handling one again changes nothing).
    let mut handled = after;
    for (position, hash) in credits {
        let h = hash.clone();
        let id = with_db(state, move |c| {
            store::lightning_unpaid_by_hash(c, &h).map_err(db)
        })
        .await?;
        if let Some(id) = id {
            let (ln2, h) = (ln.clone(), hash.clone());
            let got = tokio::task::spawn_blocking(move || ln2.received(&h))
                .await
                .map_err(|_| ApiError::internal())?;
            match got {
                Ok(Some(r)) => {
                    let payment = Payment::lightning(&hash, r.amount_sat, r.time_ms);
                    record_lightning(state, id, payment, now_ms, report).await?;
                }
                Ok(None) => {
                    tracing::warn!(payment_hash = %hash, "a credit the node listed has no receipt yet");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e.msg, "lightning received");
                    break;
                }
            }
        }
        handled = position;
    }
    if handled > after {
        with_db(state, move |c| {
            store::set_cursor(c, LN_CREDITS, handled).map_err(db)
        })
        .await?;
    }
    Ok(())
}

/// One pass at `now_ms` (also called directly by tests).
pub async fn tick(state: &AppState, now_ms: u64) -> Result<TickReport, ApiError> {
    let mut report = TickReport::default();
    let _guard = state.merchant().invoice_lock.lock().await;
    // 0. Balance payments and refunds whose outcome is unknown (or a crash interrupted).
    let resolved = super::outcome::resolve(state, now_ms).await?;
    report.changed += resolved.payments + resolved.refunds_done + resolved.refunds_cancelled;
    report.events += resolved.payments + resolved.refunds_done;
    // Greenfield payouts whose outcome is unknown follow (super::greenfield::resolve_all).
    super::greenfield::resolve_all(state).await?;
    // Refunds and payouts custody took, until it pays them or gives them back.
    super::outcome::follow_refunds(state).await?;
    super::greenfield::follow_payouts(state).await?;
    // 1. Payments from custody.
    if let Some(custody) = state.custody() {
        let deposits = tokio::task::spawn_blocking(move || custody.deposits(None))
            .await
            .map_err(|_| ApiError::internal())?
            .map_err(api::capital::custody_error)?;
        let by_invoice = with_db(state, move |c| {
            let mut m: BTreeMap<String, (u32, Vec<Payment>)> = BTreeMap::new();
            for d in deposits {
                let Some(id) = store::by_address(c, &d.address).map_err(db)? else {
                    continue;
                };
                let outpoint = format!("{}:{}", d.txid, d.vout);
                let e = m.entry(id).or_insert((d.account, Vec::new()));
                if e.0 != d.account {
                    continue;
                }
                e.1.push(Payment {
                    id: outpoint.clone(),
                    source: Source::Chain { outpoint },
                    amount_sat: d.amount_sat,
                    confirmations: d.confirmations,
                    credited: d.state == DepositState::Credited,
                    // Gone from the chain, or replaced in the mempool: not a payment.
                    reorged: matches!(
                        d.state,
                        DepositState::Reorged | DepositState::Reversed | DepositState::Dropped
                    ),
                    // Double-spent after it was credited: custody took the credit back.
                    reversed: d.state == DepositState::Reversed,
                    // Replaced in the mempool before any credit.
                    dropped: d.state == DepositState::Dropped,
                    seen_ms: d.seen_ms,
                });
            }
            Ok(m)
        })
        .await?;
        for (id, (account, payments)) in by_invoice {
            let Some((rec, name)) = load(state, id).await? else {
                continue;
            };
            if rec.inv.merchant != account {
                continue;
            }
            let mut next = rec.clone();
            let events = next.inv.observe(&payments, now_ms);
            if next != rec {
                report.changed += 1;
                report.events += events.len();
                commit(state, next, events, name).await?;
            }
        }
    }
    // 1b. Lightning payments: BOLT11 parts the node's service has credited to the merchant,
    // from its credits in the order they were applied (every one, however late).
    if let Some(ln) = state.lightning() {
        lightning_credits(state, ln, now_ms, &mut report).await?;
    }
    // 2. Expiry.
    let due = with_db(state, move |c| store::due_for_expiry(c, now_ms).map_err(db)).await?;
    for id in due {
        let Some((mut rec, name)) = load(state, id).await? else {
            continue;
        };
        let events = rec.inv.observe(&[], now_ms);
        if !events.is_empty() {
            report.changed += 1;
            report.events += events.len();
            commit(state, rec, events, name).await?;
        }
    }
    // 3. Conversions.
    let wanted = with_db(state, |c| store::conversions_wanted(c).map_err(db)).await?;
    for id in wanted {
        let Some((rec, name)) = load(state, id).await? else {
            continue;
        };
        if convert(state, rec, name).await? {
            report.sells += 1;
        }
    }
    Ok(report)
}

fn db(e: rusqlite::Error) -> ApiError {
    tracing::error!(error = %e, "merchant database failed");
    ApiError::internal()
}

async fn load(state: &AppState, id: String) -> Result<Option<(Record, String)>, ApiError> {
    with_db(state, move |c| {
        let Some(rec) = store::load(c, &id).map_err(db)? else {
            return Ok(None);
        };
        let name = store::settings_or_default(c, rec.inv.merchant)
            .map_err(db)?
            .name;
        Ok(Some((rec, name)))
    })
    .await
}

async fn save(state: &AppState, rec: Record, name: String) -> Result<(), ApiError> {
    commit(state, rec, Vec::new(), name).await.map(|_| ())
}

/// Sells what a settled invoice brought in and is not sold yet. True when a sell was submitted.
///
/// Crash safety: the client order id is stored before the sell is submitted; a stored id found
/// on the next tick is looked up in the order history (its fills recorded, the quote received
/// then estimated from the taker fee rate) instead of selling again.
async fn convert(state: &AppState, mut rec: Record, name: String) -> Result<bool, ApiError> {
    let Some(m) = state
        .markets()
        .markets
        .iter()
        .find(|m| {
            m.base.symbol == "BTC"
                && rec
                    .inv
                    .quote
                    .as_ref()
                    .is_none_or(|q| q.asset == m.quote.symbol)
        })
        .cloned()
    else {
        rec.conv.state = ConvState::Failed;
        rec.conv.error = Some("no market to sell BTC in".into());
        save(state, rec, name).await?;
        return Ok(false);
    };
    let merchant = rec.inv.merchant;
    if let Some(cid) = rec.conv.client_id.take() {
        // The sell may be applied and not yet in the read models: never read "not found" from a
        // model that lags the engine (it would sell again).
        if !state.sync_read_model().await {
            rec.conv.client_id = Some(cid);
            return Err(ApiError::outcome_unknown());
        }
        let found = state
            .read_model()
            .find_order_by_client(merchant, Some(m.id.0), &cid)
            .map_err(|e| {
                tracing::error!(error = %e, "order history failed");
                ApiError::internal()
            })?;
        if let Some(o) = found.filter(|o| !o.is_open()) {
            let fee = u128::from(o.cum_quote) * u128::from(m.cfg.taker_fee_bps) / 10_000;
            rec.conv.sold_sat += o.executed * m.cfg.lot_size;
            rec.conv.quote_units += o.cum_quote - fee as u64;
        }
        save(state, rec.clone(), name.clone()).await?;
    }
    // Wait until every counted chain payment is credited to the merchant's account.
    let pending = rec
        .inv
        .payments
        .iter()
        .any(|p| !p.reorged && !p.credited && rec.inv.on_time(p) && !p.is_balance());
    if pending {
        return Ok(false);
    }
    let credited: u64 = rec
        .inv
        .payments
        .iter()
        .filter(|p| !p.reorged && p.credited)
        .map(|p| p.amount_sat)
        .sum();
    let to_sell = credited
        .saturating_sub(rec.inv.refunded_sat)
        .saturating_sub(rec.conv.sold_sat);
    let lots = to_sell / m.cfg.lot_size;
    if lots == 0 {
        rec.conv.state = ConvState::Done;
        save(state, rec, name).await?;
        return Ok(false);
    }
    // The worst acceptable price: the reference less the slippage allowance. No reference (stale,
    // thin or wide book, index disagrees): nothing is sold now; the next tick tries again.
    let rate = match super::routes::current_rate(state, &m.quote.symbol).await {
        Ok((rate, _)) => rate,
        Err(e) if e.code == -1157 => {
            let why = Some(e.msg.to_string());
            if rec.conv.error != why {
                rec.conv.error = why;
                save(state, rec, name).await?;
            }
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    let limit = super::price::worst_sell_ticks(
        rate / m.price_units_per_tick,
        state.merchant().cfg.price.slippage_bps,
    );
    rec.conv.error = None;
    let cid = state.gen_client_id();
    rec.conv.client_id = Some(cid.clone());
    save(state, rec.clone(), name.clone()).await?;
    let client = ClientOrderId::new(&cid).map_err(|_| ApiError::internal())?;
    let reply = state
        .submit_outcome(Command::NewOrder(NewOrder {
            account: AccountId(merchant),
            market: m.id,
            side: Side::Sell,
            order_type: OrderType::Limit {
                price: Price(limit),
                qty: Qty(lots),
            },
            tif: TimeInForce::Ioc,
            post_only: false,
            stp: StpMode::ExpireTaker,
            client_id: Some(client),
        }))
        .await;
    let reply = match reply {
        Outcome::Applied(r) => r,
        Outcome::Rejected(matching_engine::RejectCode::EngineBusy) | Outcome::Busy => {
            // Not taken: nothing was sold; try again next tick.
            rec.conv.client_id = None;
            save(state, rec, name).await?;
            return Ok(false);
        }
        Outcome::Restricted => {
            // Custody flagged the merchant's account: nothing was sold; try again once an
            // operator clears it (the invoice says why meanwhile).
            rec.conv.client_id = None;
            rec.conv.error = Some("the account is flagged for review".to_owned());
            save(state, rec, name).await?;
            return Ok(false);
        }
        Outcome::Rejected(code) => {
            rec.conv.client_id = None;
            rec.conv.state = ConvState::Failed;
            rec.conv.error = Some(code.message().to_owned());
            save(state, rec, name).await?;
            return Ok(true);
        }
        _ => {
            // Unknown: the client order id stays stored, so the next tick looks the order up
            // instead of selling again.
            tracing::warn!(invoice = %rec.inv.id, "conversion sell outcome unknown");
            return Err(ApiError::outcome_unknown());
        }
    };
    rec.conv.client_id = None;
    match reply.result {
        Err(code) => {
            rec.conv.state = ConvState::Failed;
            rec.conv.error = Some(code.message().to_owned());
        }
        Ok(()) => {
            let order = reply.events.iter().find_map(|e| match e {
                Event::Accepted { order, .. } => *order,
                _ => None,
            });
            for e in &reply.events {
                if let Event::Trade {
                    taker_order,
                    qty,
                    notional,
                    taker_fee,
                    ..
                } = e
                {
                    if Some(*taker_order) == order {
                        rec.conv.sold_sat += qty.0 * m.cfg.lot_size;
                        rec.conv.quote_units += notional.0 - taker_fee.0;
                    }
                }
            }
            let left = credited
                .saturating_sub(rec.inv.refunded_sat)
                .saturating_sub(rec.conv.sold_sat);
            if left < m.cfg.lot_size {
                rec.conv.state = ConvState::Done;
            }
        }
    }
    save(state, rec, name).await?;
    Ok(true)
}
