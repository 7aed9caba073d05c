//! Merchant endpoints: signed `/mapi/v1/merchant/*` (MERCHANT permission; `invoice/pay` TRANSFER;
//! a refund to an `address` also WITHDRAW: see [`api::access::ROUTES`])
//! and the public checkout (`/i/{id}...`) and point-of-sale (`/pos/{token}...`) endpoints.
//!
//! Every parameter is validated before anything changes; SQLite work runs on tokio's blocking
//! pool. Merchant error codes are `-1150..=-1163` (see `api/README.md`).

use super::model::{self, Invoice, Marks, Quote, Status};
use super::outcome;
use super::store::{self, ConvState, Conversion, LnPart, Record, Refund, StoreSettings};
use super::webhook::{self, EventType};
use crate::MerchantState as _;
use api::capital::{btc_amount, custody_error, unavailable, BTC_DECIMALS};
use api::error::ApiError;
use api::params::Params;
use api::state::{ok_json, AppState, ClientIp, Req};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use rusqlite::Connection;
use serde_json::{json, Value};

/// Longest invoice lifetime, minutes (7 days).
pub const MAX_EXPIRY_MIN: u64 = 10_080;
/// Longest `metadata` (the API's parameter value limit).
pub const MAX_METADATA: usize = api::params::MAX_VALUE_LEN;
/// Most invoices one list answer holds.
pub const MAX_LIST: u32 = 1_000;

// ---- errors ----

fn err(status: StatusCode, code: i32, msg: &'static str) -> ApiError {
    ApiError {
        status,
        code,
        msg: msg.into(),
        retry_after: None,
    }
}

/// `-1150` (404): no such invoice (of this merchant).
pub fn unknown_invoice() -> ApiError {
    err(StatusCode::NOT_FOUND, -1150, "Unknown invoice.")
}
pub(crate) fn unknown_currency() -> ApiError {
    ApiError::bad(-1152, "Unknown currency.")
}
fn zero_amount() -> ApiError {
    ApiError::bad(-1153, "Amount must be more than zero.")
}
/// `-1013`: an amount above [`model::MAX_AMOUNT_SAT`] (21,000,000 BTC).
pub(crate) fn too_much() -> ApiError {
    ApiError::filter("amount above 21000000 BTC")
}
fn bad_expiry() -> ApiError {
    ApiError::bad(-1154, "expiryMinutes must be 1..=10080.")
}
pub(crate) fn wrong_status(s: Status) -> ApiError {
    ApiError::bad(
        -1155,
        format!("Not allowed while the invoice is {}.", s.as_str()),
    )
}
pub(crate) fn refund_too_large() -> ApiError {
    ApiError::bad(-1156, "Refund is more than the refundable amount.")
}
/// `-1157` (503): no reference price ([`super::price`]), with the reason when there is one.
fn no_price(why: Option<super::price::PriceError>) -> ApiError {
    let msg = match why {
        Some(e) => format!("No reliable market price to convert the amount: {e}."),
        None => "No market price to convert the amount.".to_owned(),
    };
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: -1157,
        msg: msg.into(),
        retry_after: None,
    }
}
fn bad_metadata() -> ApiError {
    ApiError::bad(-1158, "metadata must be JSON of at most 1024 bytes.")
}
fn not_payer() -> ApiError {
    ApiError::bad(
        -1159,
        "toAccount did not pay this invoice from its balance (or is already refunded).",
    )
}
fn unknown_pos() -> ApiError {
    err(StatusCode::NOT_FOUND, -1161, "Unknown point of sale.")
}
fn expired() -> ApiError {
    ApiError::bad(-1162, "Invoice expired.")
}
fn bad_settings(msg: &'static str) -> ApiError {
    ApiError::bad(-1163, msg)
}

pub(crate) fn db_error(e: rusqlite::Error) -> ApiError {
    tracing::error!(error = %e, "merchant database failed");
    ApiError::internal()
}

/// Runs `f` on the merchant database on tokio's blocking pool.
pub(crate) async fn with_db<T, F>(st: &AppState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> Result<T, ApiError> + Send + 'static,
{
    let db = st.merchant().db.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = db.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut c)
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "merchant database task failed");
        ApiError::internal()
    })?
}

fn now_ms() -> u64 {
    api::core::now_ms()
}

// ---- views ----

/// BTC with trailing zeros trimmed (`"0.00025"`, `"0"`).
pub fn btc(sat: u64) -> String {
    trim(api::decimal::format_units(sat, BTC_DECIMALS))
}

fn trim(s: String) -> String {
    if !s.contains('.') {
        return s;
    }
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

pub(crate) fn quote_decimals(st: &AppState, asset: &str) -> u8 {
    st.markets().asset(asset).map_or(8, |a| a.decimals)
}

/// The BIP21 URI of an invoice: the amount still due (the whole amount when nothing was paid),
/// and `lightning=<bolt11>` (a unified URI) while its BOLT11 part can pay it: nothing paid yet
/// and status `New` (the BOLT11 is for the whole amount).
pub fn bip21(rec: &Record) -> String {
    let due = rec.inv.due_sat();
    let mut uri = super::qr::bip21_uri(
        &rec.address,
        due,
        rec.label.as_deref(),
        rec.message.as_deref(),
    );
    // Only while the unified URI still fits a QR code (it always does for the description
    // lengths made here; a long label and message leave the on-chain URI alone).
    if let Some(b) =
        payable_bolt11(rec).filter(|b| uri.len() + b.len() + 11 <= super::qr::QR_DATA_MAX_BYTES)
    {
        uri.push(if uri.contains('?') { '&' } else { '?' });
        uri.push_str("lightning=");
        uri.push_str(b);
    }
    uri
}

/// The BOLT11 part while it can pay the invoice (nothing paid yet, status `New`).
pub fn payable_bolt11(rec: &Record) -> Option<&str> {
    let l = rec.lightning.as_ref()?;
    let open = rec.inv.status == Status::New && rec.inv.payments.is_empty();
    // BOLT11 is bech32: alphanumeric, nothing to escape in a URI.
    (open && l.bolt11.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(l.bolt11.as_str())
}

/// The `lightning` object of the invoice JSON: the BOLT11 part (and its payment hash), or
/// `null` with `lightningUnavailable` saying why.
fn lightning_json(rec: &Record) -> Value {
    match &rec.lightning {
        Some(l) => json!({
            "bolt11": l.bolt11,
            "paymentHash": l.payment_hash,
            "payable": payable_bolt11(rec).is_some(),
        }),
        None => Value::Null,
    }
}

/// The PublicInvoice JSON (what the checkout page sees; no order id or metadata).
pub fn public_json(st: &AppState, rec: &Record, store_name: &str, now_ms: u64) -> Value {
    let i = &rec.inv;
    let d = i.derive(now_ms);
    let (quote_asset, amount_quote, rate) = match &i.quote {
        Some(q) => {
            let dec = quote_decimals(st, &q.asset);
            (
                Value::from(q.asset.clone()),
                Value::from(trim(api::decimal::format_units(q.amount_units, dec))),
                Value::from(trim(api::decimal::format_units(q.rate_units, dec))),
            )
        }
        None => (Value::Null, Value::Null, Value::Null),
    };
    json!({
        "id": i.id,
        "storeName": store_name,
        "status": i.status.as_str(),
        "marks": i.marks.names(),
        "currency": i.currency,
        "amount": i.amount_asked,
        "amountBtc": btc(i.amount_sat),
        "quoteAsset": quote_asset,
        "amountQuote": amount_quote,
        "rate": rate,
        "paidBtc": btc(d.paid_sat),
        "dueBtc": btc(i.amount_sat.saturating_sub(d.paid_sat)),
        "address": rec.address,
        "bip21": bip21(rec),
        "lightning": lightning_json(rec),
        "checkoutUrl": format!("{}/i/{}", st.cfg().public_url.as_deref().unwrap_or(""), i.id),
        "confirmationsRequired": i.speed,
        "createdTime": i.created_ms,
        "expireTime": i.expires_ms,
        "serverTime": now_ms,
        "payments": i.payments.iter().filter(|p| !p.reorged).map(|p| json!({
            "amountBtc": btc(p.amount_sat),
            "confirmations": if p.is_off_chain() { Value::Null } else { Value::from(p.confirmations) },
            "source": p.source_name(),
            "time": p.seen_ms,
        })).collect::<Vec<_>>(),
    })
}

/// The merchant's view (also the webhook body's `invoice`): the public view plus order id,
/// metadata, payment details, refunds and conversion.
pub fn merchant_json(st: &AppState, rec: &Record, store_name: &str, now_ms: u64) -> Value {
    let mut v = public_json(st, rec, store_name, now_ms);
    let i = &rec.inv;
    v["merchant"] = json!(i.merchant);
    v["orderId"] = json!(rec.order_id);
    v["metadata"] = rec
        .metadata
        .as_deref()
        .and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or(Value::Null);
    v["tolerancePercent"] = json!(trim(api::decimal::format_units(
        u64::from(i.tolerance_bps),
        2
    )));
    v["lightningUnavailable"] = json!(rec.lightning_note);
    v["refundedBtc"] = json!(btc(i.refunded_sat));
    v["receivedBtc"] = json!(btc(i.received_sat()));
    v["payments"] = Value::Array(
        i.payments
            .iter()
            .map(|p| {
                let (payer, outpoint, hash) = match &p.source {
                    model::Source::Chain { outpoint } => (None, Some(outpoint.clone()), None),
                    model::Source::Balance { payer } => (Some(*payer), None, None),
                    model::Source::Lightning { payment_hash } => {
                        (None, None, Some(payment_hash.clone()))
                    }
                };
                json!({
                    "amountBtc": btc(p.amount_sat),
                    "source": p.source_name(),
                    "payerAccount": payer,
                    "outpoint": outpoint,
                    "paymentHash": hash,
                    "confirmations": if p.is_off_chain() { Value::Null } else { Value::from(p.confirmations) },
                    "credited": p.credited,
                    "reorged": p.reorged,
                    "reversed": p.reversed,
                    "late": !i.on_time(p),
                    "time": p.seen_ms,
                })
            })
            .collect(),
    );
    v["conversion"] = match rec.conv.state {
        ConvState::None => Value::Null,
        s => json!({
            "state": format!("{s:?}").to_lowercase(),
            "soldBtc": btc(rec.conv.sold_sat),
            "quoteReceived": i.quote.as_ref().map_or_else(
                || api::decimal::format_units(rec.conv.quote_units, quote_decimals(st, "USD")),
                |q| api::decimal::format_units(rec.conv.quote_units, quote_decimals(st, &q.asset)),
            ),
            "error": rec.conv.error,
        }),
    };
    v
}

fn settings_json(s: &StoreSettings) -> Value {
    json!({
        "account": s.account,
        "name": s.name,
        "defaultCurrency": s.currency,
        "webhookUrl": s.webhook_url,
        "webhookSecretVersion": s.secret_version,
        "tolerancePercent": trim(api::decimal::format_units(u64::from(s.tolerance_bps), 2)),
        "speedPolicy": s.speed,
        "invoiceExpiryMinutes": s.expiry_min,
        "settlement": if s.convert { "convert" } else { "keep_btc" },
        "posEnabled": s.pos_token.is_some(),
        "posUrl": s.pos_token.as_ref().map(|t| format!("/pos/{t}")),
    })
}

/// Loads an invoice and its store's name.
pub(crate) fn load_with_name(
    conn: &Connection,
    id: &str,
) -> Result<Option<(Record, String)>, ApiError> {
    let Some(rec) = store::load(conn, id).map_err(db_error)? else {
        return Ok(None);
    };
    let name = store::settings_or_default(conn, rec.inv.merchant)
        .map_err(db_error)?
        .name;
    Ok(Some((rec, name)))
}

// ---- parameters ----

fn text_param(
    p: &mut Params,
    name: &str,
    max: usize,
    range: &str,
) -> Result<Option<String>, ApiError> {
    match p.opt(name)? {
        Some(v) if v.len() > max || v.chars().any(|c| c.is_control()) => {
            Err(ApiError::illegal(name, range))
        }
        v => Ok(v),
    }
}

fn id_param(p: &mut Params, name: &str) -> Result<String, ApiError> {
    let v = p.req(name)?;
    if v.len() > 64 || !v.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(ApiError::illegal(name, "^[A-Za-z0-9]{1,64}$"));
    }
    Ok(v)
}

/// A currency: `BTC` or the quote asset of a market whose base is BTC.
pub(crate) fn check_currency(st: &AppState, c: &str) -> Result<(), ApiError> {
    if c == "BTC"
        || st
            .markets()
            .markets
            .iter()
            .any(|m| m.base.symbol == "BTC" && m.quote.symbol == c)
    {
        Ok(())
    } else {
        Err(unknown_currency())
    }
}

/// The reference BTC price in `quote` now ([`super::price`]): the last trade between two
/// different accounts, fresh, inside a book that is deep and narrow enough, and near the
/// operator's external index if one is configured; in quote units per BTC, with the market's
/// index. Refused with `-1157` naming the reason.
pub async fn current_rate(st: &AppState, quote: &str) -> Result<(u64, usize), ApiError> {
    let (i, m) = st
        .markets()
        .markets
        .iter()
        .enumerate()
        .find(|(_, m)| m.base.symbol == "BTC" && m.quote.symbol == quote)
        .ok_or_else(unknown_currency)?;
    let lim = &st.merchant().cfg.price;
    let ticks = {
        let rm = st.read_model().read();
        let ms = rm.markets.get(i).ok_or_else(|| no_price(None))?;
        super::price::reference(ms, m.cfg.lot_size, now_ms(), lim).map_err(|e| no_price(Some(e)))?
    };
    let rate = ticks
        .checked_mul(m.price_units_per_tick)
        .filter(|r| *r > 0)
        .ok_or_else(|| no_price(None))?;
    if let Some(src) = &lim.index {
        // Cached (single flight, bounded age): an anonymous page cannot make the server read
        // the index at request rate.
        let index = st
            .merchant()
            .price_index
            .get(src, m.quote.decimals, lim, now_ms())
            .await
            .map_err(|e| no_price(Some(e)))?;
        super::price::check_index(rate, index, lim).map_err(|e| no_price(Some(e)))?;
    }
    Ok((rate, i))
}

/// An amount in `currency` → (satoshis due, quote part).
pub(crate) async fn amount_in(
    st: &AppState,
    currency: &str,
    amount: &str,
) -> Result<(u64, Option<Quote>), ApiError> {
    check_currency(st, currency)?;
    let decimals = if currency == "BTC" {
        BTC_DECIMALS
    } else {
        quote_decimals(st, currency)
    };
    let units = api::decimal::parse_units(amount, decimals).map_err(|e| match e {
        api::decimal::DecimalError::TooPrecise => ApiError::precision("amount"),
        _ => ApiError::illegal("amount", api::market::DECIMAL_RANGE),
    })?;
    if units == 0 {
        return Err(zero_amount());
    }
    if currency == "BTC" {
        return if units > model::MAX_AMOUNT_SAT {
            Err(too_much())
        } else {
            Ok((units, None))
        };
    }
    let (rate, _) = current_rate(st, currency).await?;
    let sat = model::quote_to_sat(units, rate).ok_or_else(|| ApiError::invalid_value("amount"))?;
    if sat > model::MAX_AMOUNT_SAT {
        return Err(too_much());
    }
    Ok((
        sat,
        Some(Quote {
            asset: currency.to_owned(),
            amount_units: units,
            rate_units: rate,
        }),
    ))
}

/// What a new invoice is asked for.
#[derive(Default)]
pub(crate) struct NewInvoice {
    pub(crate) amount: String,
    pub(crate) currency: Option<String>,
    pub(crate) order_id: Option<String>,
    pub(crate) metadata: Option<String>,
    pub(crate) expiry_min: Option<u64>,
    pub(crate) idem_key: Option<String>,
    pub(crate) label: Option<String>,
    pub(crate) message: Option<String>,
    /// The longest `metadata` (bytes): [`MAX_METADATA`] for the signed API (a parameter), up to
    /// [`super::greenfield::MAX_METADATA`] for a Greenfield JSON body. 0 means [`MAX_METADATA`].
    pub(crate) metadata_max: usize,
    /// A Greenfield invoice's checkout options (JSON), stored with it in one transaction.
    pub(crate) greenfield_checkout: Option<String>,
    /// No Lightning part (the client's `paymentMethods` left it out).
    pub(crate) on_chain_only: bool,
}

pub(crate) fn random_id() -> Result<String, ApiError> {
    api::keys::random_bytes::<16>()
        .map(hex::encode)
        .map_err(|_| ApiError::internal())
}

/// The BOLT11 description of a merchant invoice: the store's name and the order id (or the
/// invoice id when there is none).
/// At most [`LN_DESCRIPTION_MAX_BYTES`] (cut on a character boundary), so the BOLT11 stays short
/// enough for a unified QR code.
pub(crate) fn ln_description(store_name: &str, order_id: Option<&str>, invoice_id: &str) -> String {
    let mut d = match order_id {
        Some(o) => format!("{store_name} order {o}"),
        None => format!("{store_name} invoice {invoice_id}"),
    };
    if d.len() > LN_DESCRIPTION_MAX_BYTES {
        let mut end = LN_DESCRIPTION_MAX_BYTES;
        while !d.is_char_boundary(end) {
            end -= 1;
        }
        d.truncate(end);
    }
    d
}

/// The longest BOLT11 description of a merchant invoice, bytes.
pub const LN_DESCRIPTION_MAX_BYTES: usize = 200;

/// The BOLT11 part of a new invoice, or why there is none. Never an error: without a node, or
/// without the inbound liquidity, the invoice is on chain only and says so
/// (`lightningUnavailable`). The BOLT11 expiry is what is left until `expires_ms`, rounded
/// down (the node still takes a payment up to about two hours past it, LDK's margin: recorded
/// as `PaidLate`).
async fn lightning_part(
    st: &AppState,
    merchant: u32,
    amount_sat: u64,
    description: String,
    expires_ms: u64,
) -> (Option<LnPart>, Option<String>) {
    let Some(ln) = st.lightning() else {
        return (
            None,
            Some("Lightning is not running on this server.".into()),
        );
    };
    // Each part is an invoice the node keeps for good (and sweeps until it expires): a store's
    // public point-of-sale page must not make them without bound.
    let m = st.merchant();
    let parts = m.ln_parts.get_or_init(|| {
        api::ratelimit::Limiter::with_window(m.cfg.lightning_parts_per_hour, 3_600_000)
    });
    if let api::ratelimit::Charge::Limited { .. } = parts.charge(&merchant.to_string(), 1, now_ms())
    {
        tracing::info!(
            merchant,
            "invoice without lightning: the hour's BOLT11 parts are made"
        );
        return (
            None,
            Some(
                "This store made as many Lightning invoices as it may this hour; pay on chain."
                    .into(),
            ),
        );
    }
    let secs = expires_ms.saturating_sub(now_ms()) / 1000;
    let secs = u32::try_from(secs).unwrap_or(u32::MAX);
    let made = tokio::task::spawn_blocking(move || {
        ln.merchant_invoice(merchant, amount_sat, &description, secs)
    })
    .await;
    match made {
        Ok(Ok(i)) => (
            Some(LnPart {
                bolt11: i.invoice,
                payment_hash: i.payment_hash,
            }),
            None,
        ),
        Ok(Err(e)) => {
            tracing::info!(merchant, code = e.code, error = %e.msg, "invoice without lightning");
            let why = if e.code == -4611 {
                "The Lightning node has not enough inbound liquidity for this amount."
            } else {
                "The Lightning node could not make an invoice."
            };
            (None, Some(why.into()))
        }
        Err(e) => {
            tracing::error!(error = %e, "lightning task failed");
            (
                None,
                Some("The Lightning node could not make an invoice.".into()),
            )
        }
    }
}

/// The terms a request asked for, to tell a retry of it (answered with the invoice it made)
/// from another request under the same idempotency key (refused): what it left out (the store's
/// defaults) matches anything.
#[derive(Clone)]
struct Terms {
    amount: String,
    currency: Option<String>,
    order_id: Option<String>,
    metadata: Option<String>,
    expiry_min: Option<u64>,
    label: Option<String>,
    message: Option<String>,
}

impl Terms {
    fn of(req: &NewInvoice) -> Self {
        Self {
            amount: req.amount.clone(),
            currency: req.currency.clone(),
            order_id: req.order_id.clone(),
            metadata: req.metadata.clone(),
            expiry_min: req.expiry_min,
            label: req.label.clone(),
            message: req.message.clone(),
        }
    }

    fn made(&self, rec: &Record) -> bool {
        let given =
            |asked: &Option<String>, stored: &Option<String>| asked.is_none() || asked == stored;
        rec.inv.amount_asked == self.amount
            && self
                .currency
                .as_ref()
                .is_none_or(|c| c.eq_ignore_ascii_case(&rec.inv.currency))
            && rec.order_id == self.order_id
            && rec.metadata == self.metadata
            && self.expiry_min.is_none_or(|m| {
                rec.inv.expires_ms.saturating_sub(rec.inv.created_ms) == m.saturating_mul(60_000)
            })
            && given(&self.label, &rec.label)
            && given(&self.message, &rec.message)
    }
}

/// `400 -1164`: the idempotency key names an invoice made with other terms (a changed cart
/// sent under the order's key must not be answered with the old amount's invoice).
fn key_reused() -> ApiError {
    ApiError::bad(-1164, "idempotencyKey was used for another invoice.")
}

/// Validates, gets a fresh address from custody, stores the invoice and its `invoice.created`
/// webhook in one transaction. The same idempotency key with the same terms returns the
/// existing invoice; with other terms it is refused ([`key_reused`]).
pub(crate) async fn new_invoice(
    st: &AppState,
    settings: &StoreSettings,
    req: NewInvoice,
) -> Result<Record, ApiError> {
    let merchant = settings.account;
    let terms = Terms::of(&req);
    if let Some(k) = req.idem_key.clone() {
        let found = with_db(st, move |c| {
            let id = store::by_idem(c, merchant, &k).map_err(db_error)?;
            id.map(|id| store::load(c, &id).map_err(db_error))
                .transpose()
        })
        .await?;
        if let Some(Some(rec)) = found {
            if !terms.made(&rec) {
                return Err(key_reused());
            }
            return Ok(rec);
        }
    }
    let currency = req.currency.unwrap_or_else(|| settings.currency.clone());
    let (amount_sat, quote) = amount_in(st, &currency, &req.amount).await?;
    let expiry = req.expiry_min.unwrap_or(u64::from(settings.expiry_min));
    if !(1..=MAX_EXPIRY_MIN).contains(&expiry) {
        return Err(bad_expiry());
    }
    let metadata_max = if req.metadata_max == 0 {
        MAX_METADATA
    } else {
        req.metadata_max
    };
    if let Some(m) = &req.metadata {
        if m.len() > metadata_max || serde_json::from_str::<Value>(m).is_err() {
            return Err(bad_metadata());
        }
    }
    let custody = st.custody().ok_or_else(unavailable)?;
    let address = tokio::task::spawn_blocking(move || custody.invoice_address(merchant))
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(custody_error)?;
    let now = now_ms();
    let id = random_id()?;
    let expires_ms = now + expiry * 60_000;
    let (lightning, lightning_note) = if req.on_chain_only {
        (None, None)
    } else {
        lightning_part(
            st,
            merchant,
            amount_sat,
            ln_description(&settings.name, req.order_id.as_deref(), &id),
            expires_ms,
        )
        .await
    };
    let label = req.label.or_else(|| Some(settings.name.clone()));
    let message = req
        .message
        .or_else(|| req.order_id.as_ref().map(|o| format!("Order {o}")));
    let rec = Record {
        inv: Invoice {
            id,
            merchant,
            amount_sat,
            currency,
            amount_asked: req.amount,
            quote,
            speed: settings.speed,
            tolerance_bps: settings.tolerance_bps,
            created_ms: now,
            expires_ms,
            status: Status::New,
            marks: Marks::default(),
            invalid_ms: None,
            payments: vec![],
            refunded_sat: 0,
        },
        order_id: req.order_id,
        metadata: req.metadata,
        label,
        message,
        address,
        idem_key: req.idem_key,
        conv: Conversion {
            state: if settings.convert {
                ConvState::Wanted
            } else {
                ConvState::None
            },
            sold_sat: 0,
            quote_units: 0,
            client_id: None,
            error: None,
        },
        lightning,
        lightning_note,
    };
    let body = merchant_json(st, &rec, &settings.name, now);
    let rec2 = rec.clone();
    let checkout = req.greenfield_checkout;
    let out = with_db(st, move |c| {
        let tx = c.transaction().map_err(db_error)?;
        match store::insert(&tx, &rec2) {
            Ok(()) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation
                    && rec2.idem_key.is_some() =>
            {
                drop(tx);
                // A concurrent request with the same key won: answer its invoice.
                let id = store::by_idem(c, merchant, rec2.idem_key.as_deref().unwrap_or(""))
                    .map_err(db_error)?
                    .ok_or_else(ApiError::internal)?;
                let won = store::load(c, &id)
                    .map_err(db_error)?
                    .ok_or_else(ApiError::internal)?;
                return if terms.made(&won) {
                    Ok(won)
                } else {
                    Err(key_reused())
                };
            }
            Err(e) => return Err(db_error(e)),
        }
        if let Some(checkout) = &checkout {
            super::greenfield::insert_invoice_extra(&tx, &rec2.inv.id, merchant, checkout)
                .map_err(db_error)?;
        }
        webhook::enqueue(
            &tx,
            merchant,
            &rec2.inv.id,
            EventType::InvoiceCreated,
            &body,
            now,
        )
        .map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        Ok(rec2)
    })
    .await?;
    st.merchant().enqueued.notify_one();
    Ok(out)
}

// ---- signed endpoints ----

/// `GET /mapi/v1/merchant/store` (MERCHANT): the store settings (defaults until saved).
pub async fn get_store(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, p, ctx) = st.signed(&req)?;
    p.finish()?;
    let a = key.account;
    let s = with_db(&st, move |c| {
        store::settings_or_default(c, a).map_err(db_error)
    })
    .await?;
    Ok(ok_json(&ctx, settings_json(&s)))
}

pub(crate) fn percent_bps(s: &str) -> Result<u16, ApiError> {
    let v = api::decimal::parse_units(s, 2).map_err(|e| match e {
        api::decimal::DecimalError::TooPrecise => ApiError::precision("tolerancePercent"),
        _ => ApiError::illegal("tolerancePercent", api::market::DECIMAL_RANGE),
    })?;
    if v > 5_000 {
        return Err(bad_settings("tolerancePercent must be 0..=50."));
    }
    Ok(v as u16)
}

/// `POST /mapi/v1/merchant/store` (MERCHANT): changes the settings sent (others unchanged).
/// Setting a webhook URL when no secret exists yet creates version 1 and answers it once as
/// `webhookSecret`.
pub async fn post_store(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let name = text_param(&mut p, "name", 64, "1..64 printable characters")?;
    let currency = p.opt("defaultCurrency")?;
    let url = p.opt("webhookUrl")?;
    let tol = p
        .opt("tolerancePercent")?
        .map(|t| percent_bps(&t))
        .transpose()?;
    let speed = p.opt_u64("speedPolicy")?;
    let expiry = p.opt_u64("invoiceExpiryMinutes")?;
    let settlement = p.opt("settlement")?;
    let pos = p.opt("posEnabled")?;
    p.finish()?;
    let convert = match settlement.as_deref() {
        None => None,
        Some("keep_btc") => Some(false),
        Some("convert") => Some(true),
        Some(_) => return Err(bad_settings("settlement must be keep_btc or convert.")),
    };
    let pos = match pos.as_deref() {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return Err(ApiError::illegal("posEnabled", "true|false")),
    };
    let update = StoreUpdate {
        name,
        currency,
        url,
        tol,
        speed,
        expiry,
        convert,
        pos,
    };
    let account = key.account;
    let (s, new_secret) = update_store(&st, account, update).await?;
    let mut v = settings_json(&s);
    if new_secret {
        v["webhookSecret"] = json!(super::webhook_secret(&st, account, s.secret_version));
    }
    Ok(ok_json(&ctx, v))
}

/// A change of a store's settings; what is `None` stays as it is.
#[derive(Debug, Default)]
pub(crate) struct StoreUpdate {
    pub(crate) name: Option<String>,
    pub(crate) currency: Option<String>,
    pub(crate) url: Option<String>,
    pub(crate) tol: Option<u16>,
    pub(crate) speed: Option<u64>,
    pub(crate) expiry: Option<u64>,
    pub(crate) convert: Option<bool>,
    /// On: a point-of-sale link (a new random token unless one exists); off: none.
    pub(crate) pos: Option<bool>,
}

/// Checks and saves a store update for `account`: the one path of the signed API's
/// `POST /mapi/v1/merchant/store` and the dashboard's point-of-sale switch. Refused: nothing
/// saved. Answers the new settings and whether a webhook secret was created (version 1).
pub(crate) async fn update_store(
    st: &AppState,
    account: u32,
    u: StoreUpdate,
) -> Result<(StoreSettings, bool), ApiError> {
    let StoreUpdate {
        name,
        currency,
        url,
        tol,
        speed,
        expiry,
        convert,
        pos,
    } = u;
    if let Some(c) = &currency {
        check_currency(st, c)?;
    }
    if let Some(u) = &url {
        let ok = (u.starts_with("https://") || u.starts_with("http://"))
            && u.len() <= 512
            && !u.chars().any(|c| c.is_control() || c.is_whitespace());
        if !ok {
            return Err(bad_settings(
                "webhookUrl must be an http(s) URL of at most 512 characters.",
            ));
        }
        // Resolved and checked now, and again before every delivery (super::target).
        let (u, targets) = (u.clone(), st.merchant().cfg.webhook_targets.clone());
        let checked = super::target::check_bounded(
            u,
            targets,
            super::target::Purpose::Settings { merchant: account },
        )
        .await;
        match checked {
            Ok(_) => {}
            Err(super::target::TargetError::Busy) => return Err(ApiError::busy()),
            Err(super::target::TargetError::BadUrl) => {
                return Err(bad_settings(
                    "webhookUrl must be an http(s) URL of at most 512 characters.",
                ))
            }
            Err(super::target::TargetError::Unresolved) => {
                return Err(bad_settings("webhookUrl's host does not resolve."))
            }
            Err(_) => {
                return Err(bad_settings(
                    "webhookUrl must not point to a loopback, private, link-local or other internal address.",
                ))
            }
        }
    }
    let speed = match speed {
        Some(s) if !model::SPEED_POLICIES.contains(&(s as u32)) || s > 6 => {
            return Err(bad_settings("speedPolicy must be 0, 1, 2 or 6."))
        }
        s => s.map(|s| s as u32),
    };
    if expiry.is_some_and(|e| !(1..=MAX_EXPIRY_MIN).contains(&e)) {
        return Err(bad_expiry());
    }
    let pos_token = random_id()?;
    with_db(st, move |c| {
        let mut s = store::settings_or_default(c, account).map_err(db_error)?;
        let mut new_secret = false;
        if let Some(n) = name {
            s.name = n;
        }
        if let Some(cur) = currency {
            s.currency = cur;
        }
        if let Some(u) = url {
            s.webhook_url = Some(u);
            if s.secret_version == 0 {
                s.secret_version = 1;
                new_secret = true;
            }
        }
        if let Some(t) = tol {
            s.tolerance_bps = t;
        }
        if let Some(sp) = speed {
            s.speed = sp;
        }
        if let Some(e) = expiry {
            s.expiry_min = e as u32;
        }
        if let Some(cv) = convert {
            s.convert = cv;
        }
        match pos {
            Some(true) if s.pos_token.is_none() => s.pos_token = Some(pos_token),
            Some(false) => s.pos_token = None,
            _ => {}
        }
        store::put_settings(c, &s).map_err(db_error)?;
        Ok((s, new_secret))
    })
    .await
}

/// `POST /mapi/v1/merchant/webhook/secret` (MERCHANT): a new webhook secret (the old one stops
/// signing at once); answered only here.
pub async fn rotate_secret(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, p, ctx) = st.signed(&req)?;
    p.finish()?;
    let account = key.account;
    let version = with_db(&st, move |c| {
        let mut s = store::settings_or_default(c, account).map_err(db_error)?;
        s.secret_version += 1;
        store::put_settings(c, &s).map_err(db_error)?;
        Ok(s.secret_version)
    })
    .await?;
    Ok(ok_json(
        &ctx,
        json!({
            "webhookSecretVersion": version,
            "webhookSecret": super::webhook_secret(&st, account, version),
        }),
    ))
}

/// `POST /mapi/v1/merchant/invoice` (MERCHANT): a new invoice with its own address.
pub async fn create_invoice(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let amount = p.req("amount")?;
    let currency = p.opt("currency")?;
    let order_id = text_param(&mut p, "orderId", 64, "1..64 characters")?;
    let metadata = p.opt("metadata")?;
    let expiry_min = p.opt_u64("expiryMinutes")?;
    let idem_key = text_param(&mut p, "idempotencyKey", 64, "1..64 characters")?;
    let label = text_param(&mut p, "label", 128, "1..128 characters")?;
    let message = text_param(&mut p, "message", 128, "1..128 characters")?;
    p.finish()?;
    let account = key.account;
    let settings = with_db(&st, move |c| {
        store::settings_or_default(c, account).map_err(db_error)
    })
    .await?;
    let rec = new_invoice(
        &st,
        &settings,
        NewInvoice {
            amount,
            currency,
            order_id,
            metadata,
            expiry_min,
            idem_key,
            label,
            message,
            ..NewInvoice::default()
        },
    )
    .await?;
    Ok(ok_json(
        &ctx,
        merchant_json(&st, &rec, &settings.name, now_ms()),
    ))
}

async fn own_invoice(
    st: &AppState,
    merchant: u32,
    id: String,
) -> Result<(Record, String), ApiError> {
    let found = with_db(st, move |c| load_with_name(c, &id)).await?;
    match found {
        Some((rec, name)) if rec.inv.merchant == merchant => Ok((rec, name)),
        _ => Err(unknown_invoice()),
    }
}

/// `GET /mapi/v1/merchant/invoice?invoiceId=` (MERCHANT).
pub async fn get_invoice(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let id = id_param(&mut p, "invoiceId")?;
    p.finish()?;
    let (rec, name) = own_invoice(&st, key.account, id).await?;
    let mut v = merchant_json(&st, &rec, &name, now_ms());
    let iid = rec.inv.id.clone();
    let refunds = with_db(&st, move |c| store::refunds(c, &iid).map_err(db_error)).await?;
    v["refunds"] = refunds_json(&refunds);
    Ok(ok_json(&ctx, v))
}

fn refunds_json(rs: &[Refund]) -> Value {
    Value::Array(
        rs.iter()
            .map(|r| {
                json!({
                    "n": r.n,
                    "amountBtc": btc(r.amount_sat),
                    "toAccount": r.to_account,
                    "address": r.to_address,
                    "state": r.state,
                    "reference": r.reference,
                    "time": r.created_ms,
                })
            })
            .collect(),
    )
}

/// `GET /mapi/v1/merchant/invoices` (MERCHANT): `status`, `startTime`, `endTime`, `limit`
/// (1..=1000, default 100); newest first.
pub async fn list_invoices(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let status = match p.opt("status")? {
        None => None,
        Some(s) => Some(Status::parse(&s).ok_or_else(|| ApiError::invalid_value("status"))?),
    };
    let start = p.opt_u64("startTime")?.unwrap_or(0);
    let end = p.opt_u64("endTime")?.unwrap_or(u64::MAX);
    if start > end {
        return Err(ApiError::invalid_value("startTime"));
    }
    let limit = p.limit(100, MAX_LIST)?;
    p.finish()?;
    let account = key.account;
    let (recs, name) = with_db(&st, move |c| {
        let recs = store::list(c, account, status, start, end, limit).map_err(db_error)?;
        let name = store::settings_or_default(c, account)
            .map_err(db_error)?
            .name;
        Ok((recs, name))
    })
    .await?;
    let now = now_ms();
    Ok(ok_json(
        &ctx,
        Value::Array(
            recs.iter()
                .map(|r| merchant_json(&st, r, &name, now))
                .collect(),
        ),
    ))
}

/// Saves a transition with its webhooks, then tells the checkout pages and the dispatcher.
pub(crate) async fn commit(
    st: &AppState,
    rec: Record,
    events: Vec<EventType>,
    name: String,
) -> Result<Record, ApiError> {
    let now = now_ms();
    let body = merchant_json(st, &rec, &name, now);
    let public = public_json(st, &rec, &name, now).to_string();
    let r2 = rec.clone();
    with_db(st, move |c| {
        store::commit_transition(c, &r2, &events, &body, now).map_err(db_error)
    })
    .await?;
    st.merchant().publish(&rec.inv.id, public);
    st.merchant().enqueued.notify_one();
    Ok(rec)
}

/// `POST /mapi/v1/merchant/invoice/invalid` (MERCHANT): marks a `New` or `Expired` invoice
/// invalid.
pub async fn mark_invalid(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let id = id_param(&mut p, "invoiceId")?;
    p.finish()?;
    let _guard = st.merchant().invoice_lock.lock().await;
    let (mut rec, name) = own_invoice(&st, key.account, id).await?;
    let now = now_ms();
    // Bring it up to date first (an invoice past its expiry is Expired).
    let mut events = rec.inv.observe(&[], now);
    let more = rec
        .inv
        .mark_invalid(now)
        .map_err(|model::TransitionError::WrongStatus(s)| wrong_status(s))?;
    events.extend(more);
    let rec = commit(&st, rec, events, name.clone()).await?;
    Ok(ok_json(&ctx, merchant_json(&st, &rec, &name, now)))
}

/// `POST /mapi/v1/merchant/invoice/pay` (TRANSFER: funds leave the account): pays what is still due on a `New` invoice
/// from the caller's BTC balance, in one engine transfer (idempotent by invoice, payer and
/// amount); the invoice settles at once. Runs to completion even if the client goes away; an
/// outcome the engine did not answer is `-1007`, resolved by the monitor (see
/// [`super::outcome`]), and the same request again completes that payment, never a second one
/// (also after the amount due changed, or the payer's store turned its withdrawal address list
/// on; an engine that cannot answer leaves it unknown, `-1007`).
pub async fn pay(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let id = id_param(&mut p, "invoiceId")?;
    p.finish()?;
    let payer = key.account;
    let st2 = st.clone();
    let v = outcome::to_completion(async move { pay_invoice(&st2, payer, id).await }).await?;
    Ok(ok_json(&ctx, v))
}

async fn pay_invoice(st: &AppState, payer: u32, id: String) -> Result<Value, ApiError> {
    let _guard = st.merchant().invoice_lock.lock().await;
    let (rec, name) = with_db(st, {
        let id = id.clone();
        move |c| load_with_name(c, &id)
    })
    .await?
    .ok_or_else(unknown_invoice)?;
    let now = now_ms();
    // A payment of this payer on this invoice whose outcome is not known yet (its answer was
    // lost, or a crash came between): this request completes that one, as the monitor would,
    // whatever the invoice's status, amount due or the payer's policy say now. It may have moved
    // already, so it is never paid a second time under a new amount due, and an answer that
    // says nothing about it (busy, halted) leaves it to be resolved, never dropped.
    let pending = with_db(st, {
        let id = rec.inv.id.clone();
        move |c| store::pay_intent_of(c, &id, payer).map_err(db_error)
    })
    .await?;
    if let Some(intent) = pending {
        return match outcome::execute_payment(st, &intent, rec.inv.merchant, true).await {
            outcome::Moved::Done(reference) => {
                paid_answer(st, rec, name, &intent, &reference, now).await
            }
            outcome::Moved::Refused(e) => {
                // Refused by the engine under the payment's own key: it never happened.
                let pid = intent.pid.clone();
                with_db(st, move |c| {
                    store::delete_pay_intent(c, &pid).map_err(db_error)
                })
                .await?;
                Err(e)
            }
            outcome::Moved::Unknown => Err(ApiError::outcome_unknown()),
        };
    }
    // Another account's payment of this invoice whose outcome is not known yet may have paid
    // it: a second payer is refused until the monitor (or that payer's retry) resolves it, or
    // the invoice could be paid twice.
    let other = with_db(st, {
        let id = rec.inv.id.clone();
        move |c| store::other_pay_intent(c, &id, payer).map_err(db_error)
    })
    .await?;
    if other {
        return Err(ApiError {
            status: axum::http::StatusCode::CONFLICT,
            ..ApiError::bad(
                -1165,
                "Another account's payment of this invoice is being resolved; try again shortly.",
            )
        });
    }
    match rec.inv.derive(now).status {
        Status::New => {}
        Status::Expired => return Err(expired()),
        s => return Err(wrong_status(s)),
    }
    let due = rec.inv.due_sat();
    if due == 0 {
        return Err(wrong_status(Status::Processing));
    }
    // Paying from a balance moves the payer's money to another account: the payer's policy
    // (a store's withdrawal address list) is asked first, nothing written when it refuses.
    api::policy::check(
        st,
        payer,
        api::policy::Destination::Account(rec.inv.merchant),
    )
    .await?;
    // A flagged payer's funds (maybe a deposit the chain took back) stay until reviewed.
    api::capital::refuse_flagged(st, payer).await?;
    // One id (and engine key) per payment of this payer on this invoice: the same payer may be
    // asked the same amount due again (a chain payment that made the invoice paid left the
    // chain), and that payment must not reuse the first one's key (the engine would answer it
    // as a duplicate, and nothing would move). `n` counts this payer's payments recorded here:
    // a retry after a lost answer either completes the intent above or, the payment recorded,
    // finds nothing due; only a payment recorded since gives a new id.
    let n = rec
        .inv
        .payments
        .iter()
        .filter(|p| p.source == model::Source::Balance { payer })
        .count();
    let intent = store::PayIntent {
        pid: format!("pay/{}/{payer}/{due}/{n}", rec.inv.id),
        invoice_id: rec.inv.id.clone(),
        payer,
        amount_sat: due,
        created_ms: now,
    };
    // Written down first: a crash or a lost answer from here on is resolved by the monitor.
    let i2 = intent.clone();
    with_db(st, move |c| {
        store::insert_pay_intent(c, &i2).map_err(db_error)
    })
    .await?;
    let reference = match outcome::execute_payment(st, &intent, rec.inv.merchant, false).await {
        outcome::Moved::Done(reference) => reference,
        outcome::Moved::Refused(e) => {
            let pid = intent.pid.clone();
            with_db(st, move |c| {
                store::delete_pay_intent(c, &pid).map_err(db_error)
            })
            .await?;
            return Err(e);
        }
        outcome::Moved::Unknown => return Err(ApiError::outcome_unknown()),
    };
    paid_answer(st, rec, name, &intent, &reference, now).await
}

/// Records an executed balance payment on its invoice and answers it.
async fn paid_answer(
    st: &AppState,
    rec: Record,
    name: String,
    intent: &store::PayIntent,
    reference: &str,
    now: u64,
) -> Result<Value, ApiError> {
    let rec = outcome::record_payment(st, rec, name.clone(), intent, now).await?;
    let mut v = public_json(st, &rec, &name, now);
    v["paidFromBalanceBtc"] = json!(btc(intent.amount_sat));
    v["tranId"] = json!(reference
        .strip_prefix("transfer:")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0));
    Ok(v)
}

/// `POST /mapi/v1/merchant/invoice/refund` (MERCHANT): `invoiceId`, `amount` (BTC), and
/// `address` (through custody's withdrawal path, the merchant pays its fee; the key also needs
/// WITHDRAW) or `toAccount` (a transfer back to an account that paid from its balance); optional
/// `idempotencyKey` (the same key again answers the same refund). Only credited payments are
/// refundable. Runs to completion even if the client goes away; an unanswered execution keeps its
/// reservation and answers `-1007` (resolved by the monitor, or by the same request with the same
/// key).
pub async fn refund(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let id = id_param(&mut p, "invoiceId")?;
    let amount = btc_amount(&mut p, "amount")?;
    let address = p.opt("address")?;
    let to_account = p.opt_u64("toAccount")?;
    let idem = p.opt("idempotencyKey")?;
    p.finish()?;
    if let Some(a) = &address {
        if a.len() > 128 || !a.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(ApiError::illegal("address", "^[A-Za-z0-9]{1,128}$"));
        }
    }
    if let Some(k) = &idem {
        if k.is_empty() || k.len() > 64 || !k.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ApiError::illegal("idempotencyKey", "^[!-~]{1,64}$"));
        }
    }
    let to_account = to_account
        .map(|a| u32::try_from(a).map_err(|_| ApiError::invalid_value("toAccount")))
        .transpose()?;
    if address.is_some() == to_account.is_some() {
        return Err(ApiError::bad_combination());
    }
    let custody = match &address {
        Some(_) => Some(st.custody().ok_or_else(unavailable)?),
        None => None,
    };
    let ask = RefundAsk {
        merchant: key.account,
        id,
        amount,
        address,
        to_account,
        idem,
    };
    let st2 = st.clone();
    let v = outcome::to_completion(async move { refund_invoice(&st2, ask, custody).await }).await?;
    Ok(ok_json(&ctx, v))
}

pub(crate) struct RefundAsk {
    pub(crate) merchant: u32,
    pub(crate) id: String,
    pub(crate) amount: u64,
    pub(crate) address: Option<String>,
    /// Sent to an account only if that account paid the invoice from its balance (a refund
    /// is no transfer to whomever: that takes the `transfer` permission).
    pub(crate) to_account: Option<u32>,
    pub(crate) idem: Option<String>,
}

/// A refund not yet reserved, or the live one under the merchant's idempotency key.
enum Reserved {
    New(Record, String, Refund),
    Existing(Record, String, Refund),
}

pub(crate) async fn refund_invoice(
    st: &AppState,
    ask: RefundAsk,
    custody: Option<std::sync::Arc<dyn api::custody::Custody>>,
) -> Result<Value, ApiError> {
    let _guard = st.merchant().invoice_lock.lock().await;
    let now = now_ms();
    let merchant = ask.merchant;
    // A flagged merchant's funds (maybe a deposit the chain took back) stay until reviewed.
    // Custody is asked here (it cannot be asked inside the transaction); the answer refuses a
    // new refund only, after the key's look-up, so a refund asked before the flag is answered.
    let flag = api::capital::refuse_flagged(st, merchant).await;
    // Check and reserve in one transaction.
    let reserved = with_db(st, move |c| {
        let (mut rec, name) = match load_with_name(c, &ask.id)? {
            Some((r, n)) if r.inv.merchant == merchant => (r, n),
            _ => return Err(unknown_invoice()),
        };
        if let Some(k) = &ask.idem {
            if let Some(r) = store::refund_by_key(c, &rec.inv.id, k).map_err(db_error)? {
                if r.amount_sat != ask.amount
                    || r.to_account != ask.to_account
                    || r.to_address != ask.address
                {
                    return Err(ApiError::bad(
                        -1164,
                        "idempotencyKey was used for another refund of this invoice.",
                    ));
                }
                return Ok(Reserved::Existing(rec, name, r));
            }
        }
        flag?;
        // A new refund moves the store's money out: its list decides where to (after the
        // key's look-up above, so a refund requested before the list was on is answered).
        let to = match (&ask.address, ask.to_account) {
            (Some(a), _) => api::policy::Destination::Address(a.clone()),
            (None, Some(acct)) => api::policy::Destination::Account(acct),
            (None, None) => return Err(ApiError::bad_combination()),
        };
        crate::allowlist::check_destination(c, merchant, &to, now)
            .map_err(crate::allowlist::api_error)?;
        let refundable = rec
            .inv
            .refundable_sat()
            .map_err(|model::TransitionError::WrongStatus(s)| wrong_status(s))?;
        if ask.amount > refundable {
            return Err(refund_too_large());
        }
        let done = store::refunds(c, &rec.inv.id).map_err(db_error)?;
        if let Some(acct) = ask.to_account {
            let paid: u64 = rec
                .inv
                .payments
                .iter()
                .filter(|p| p.source == model::Source::Balance { payer: acct })
                .map(|p| p.amount_sat)
                .sum();
            let back: u64 = done
                .iter()
                .filter(|r| r.to_account == Some(acct))
                .map(|r| r.amount_sat)
                .sum();
            if ask.amount > paid.saturating_sub(back) {
                return Err(not_payer());
            }
        }
        let n = store::next_refund_n(c, &rec.inv.id).map_err(db_error)?;
        let tx = c.transaction().map_err(db_error)?;
        let r = Refund {
            invoice_id: rec.inv.id.clone(),
            n,
            amount_sat: ask.amount,
            to_account: ask.to_account,
            to_address: ask.address,
            state: "pending".into(),
            reference: None,
            created_ms: now,
            idem_key: ask.idem,
        };
        store::reserve_refund(&tx, &mut rec, &r).map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        Ok(Reserved::New(rec, name, r))
    })
    .await?;
    let (rec, name, r) = match reserved {
        Reserved::Existing(rec, _, r) if r.state == "done" => {
            return Ok(refund_json(&rec, &r, r.reference.as_deref().unwrap_or("")));
        }
        // A live refund under the same key whose outcome is not known yet: ask again.
        Reserved::Existing(rec, name, r) => {
            let custody = custody.or_else(|| st.custody());
            let moved = outcome::execute_refund(st, &r, merchant, custody, true).await;
            return finish_refund_answer(st, &rec, &name, &r, moved, now).await;
        }
        Reserved::New(rec, name, r) => (rec, name, r),
    };
    let moved = outcome::execute_refund(st, &r, merchant, custody, false).await;
    finish_refund_answer(st, &rec, &name, &r, moved, now).await
}

async fn finish_refund_answer(
    st: &AppState,
    rec: &Record,
    name: &str,
    r: &Refund,
    moved: outcome::Moved,
    now: u64,
) -> Result<Value, ApiError> {
    outcome::settle_refund(st, rec, name, r, &moved, now).await?;
    match moved {
        outcome::Moved::Done(reference) => Ok(refund_json(rec, r, &reference)),
        outcome::Moved::Refused(e) => Err(e),
        outcome::Moved::Unknown => Err(ApiError::outcome_unknown()),
    }
}

fn refund_json(rec: &Record, r: &Refund, reference: &str) -> Value {
    json!({
        "invoiceId": rec.inv.id,
        "n": r.n,
        "amountBtc": btc(r.amount_sat),
        "reference": reference,
        "refundedBtc": btc(rec.inv.refunded_sat),
    })
}

/// `GET /mapi/v1/merchant/webhook/deliveries?invoiceId=` (MERCHANT).
pub async fn deliveries(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let id = id_param(&mut p, "invoiceId")?;
    p.finish()?;
    let merchant = key.account;
    let v = with_db(&st, move |c| {
        let d = webhook::deliveries(c, merchant, &id).map_err(db_error)?;
        serde_json::to_value(d).map_err(|_| ApiError::internal())
    })
    .await?;
    Ok(ok_json(&ctx, v))
}

/// `POST /mapi/v1/merchant/webhook/redeliver?deliveryId=` (MERCHANT): delivers again, due now.
/// At most `redeliveries_per_min` calls per merchant per minute (`429`, `-1003`), counted
/// whether or not the delivery exists.
pub async fn redeliver(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let id = text_param(&mut p, "deliveryId", 64, "1..64 characters")?
        .ok_or_else(|| ApiError::missing("deliveryId"))?;
    p.finish()?;
    let merchant = key.account;
    let limiter = st
        .merchant()
        .redeliveries
        .get_or_init(|| api::ratelimit::Limiter::new(st.merchant().cfg.redeliveries_per_min));
    if let api::ratelimit::Charge::Limited { retry_after, .. } =
        limiter.charge(&merchant.to_string(), 1, now_ms())
    {
        return Err(ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: -1003,
            msg: format!(
                "Too many redeliveries; the limit is {} per minute per merchant.",
                limiter.limit()
            )
            .into(),
            retry_after: Some(retry_after),
        });
    }
    let v = with_db(&st, move |c| {
        match webhook::redeliver(c, merchant, &id, now_ms()) {
            Ok(d) => serde_json::to_value(d).map_err(|_| ApiError::internal()),
            Err(webhook::RedeliverError::Db(e)) => Err(db_error(e)),
            Err(_) => Err(ApiError::bad(-1160, "Unknown delivery.")),
        }
    })
    .await?;
    st.merchant().enqueued.notify_one();
    Ok(ok_json(&ctx, v))
}

// ---- public endpoints ----

/// A page with its security headers: CSP (see [`super::pages::content_security_policy`]),
/// `nosniff`, no referrer (the path holds the invoice id or point-of-sale token).
pub(crate) fn html(st: &AppState, body: &'static str) -> Response {
    html_framed(body, &st.cfg().frame_ancestors)
}

/// [`html`] with the embedding allowed to `frame_ancestors`.
fn html_framed(body: &'static str, frame_ancestors: &str) -> Response {
    let csp = super::pages::content_security_policy(body, frame_ancestors);
    let mut r = (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response();
    match header::HeaderValue::from_str(&csp) {
        Ok(v) => {
            r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
        }
        // A frame_ancestors value that is not a header value: refuse embedding at all.
        Err(_) => {
            tracing::error!("frame_ancestors is not a valid header value; denying framing");
            let csp = super::pages::content_security_policy(body, "'none'");
            if let Ok(v) = header::HeaderValue::from_str(&csp) {
                r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
            }
        }
    }
    r
}

pub(crate) fn valid_public_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

async fn public_invoice(st: &AppState, ip: &str, id: String) -> Result<(Record, String), ApiError> {
    st.charge_ip_addr(ip, 1)?;
    if !valid_public_id(&id) {
        return Err(unknown_invoice());
    }
    with_db(st, move |c| load_with_name(c, &id))
        .await?
        .ok_or_else(unknown_invoice)
}

/// `GET /i/{id}`: the checkout page. With `view=modal` (BTCPay's modal checkout, opened over a
/// shop's page by `/modal/btcpay.js`) any site may frame it, as BTCPay's checkout: the page
/// changes nothing (it shows an invoice, copies its address, opens a wallet), and the framing
/// site knows the invoice it asked for; without, embedding follows `frame_ancestors`.
pub async fn checkout_page(
    ClientIp(ip): ClientIp,
    State(st): State<AppState>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    st.charge_ip_addr(&ip, 1)?;
    let modal = q
        .as_deref()
        .unwrap_or("")
        .split('&')
        .any(|kv| kv == "view=modal");
    Ok(if modal {
        html_framed(super::pages::CHECKOUT_HTML, "*")
    } else {
        html(&st, super::pages::CHECKOUT_HTML)
    })
}

/// `GET /modal/btcpay.js`: the modal checkout's script, with BTCPay's `window.btcpay` interface
/// (`showInvoice`, `onModalReceiveMessage`, `hideFrame`, ...), for shop plugins that open the
/// checkout over their own page.
pub async fn modal_js(
    ClientIp(ip): ClientIp,
    State(st): State<AppState>,
) -> Result<Response, ApiError> {
    st.charge_ip_addr(&ip, 1)?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        super::pages::MODAL_JS,
    )
        .into_response())
}

/// `GET /i/{id}/status`: the PublicInvoice JSON.
pub async fn public_status(
    ClientIp(ip): ClientIp,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (rec, name) = public_invoice(&st, &ip, id).await?;
    let mut v = public_json(&st, &rec, &name, now_ms());
    // A Greenfield invoice's way back to the shop (the checkout page's button and redirect).
    let iid = rec.inv.id.clone();
    let (url, auto) = with_db(&st, move |c| {
        super::greenfield::redirect_of(c, &iid).map_err(db_error)
    })
    .await?;
    v["redirectURL"] = url;
    v["redirectAutomatically"] = json!(auto);
    Ok(axum::Json(v).into_response())
}

/// `GET /i/{id}/events`: server-sent events, the PublicInvoice JSON at connect and on every
/// change (a client that fell behind gets the current state).
pub async fn public_events(
    ClientIp(ip): ClientIp,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let rx = st.merchant().updates.subscribe();
    let (rec, name) = public_invoice(&st, &ip, id.clone()).await?;
    // One of the IP's stream places and one of the invoice's, held by the stream until the
    // client goes (429, -1034 when either is full).
    let guard = st.streams().invoice_events(&ip, &id).inspect_err(|_| {
        st.metrics()
            .rate_limited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    })?;
    let first = public_json(&st, &rec, &name, now_ms()).to_string();
    use futures_util::StreamExt;
    let initial = futures_util::stream::once(async move {
        Ok::<_, std::convert::Infallible>(SseEvent::default().data(first))
    });
    let updates =
        futures_util::stream::unfold((rx, st, id, guard), |(mut rx, st, id, guard)| async move {
            loop {
                match rx.recv().await {
                    Ok(u) if u.0 == id => {
                        let ev = SseEvent::default().data(u.1.clone());
                        return Some((Ok(ev), (rx, st, id, guard)));
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let id2 = id.clone();
                        if let Ok(Some((rec, name))) =
                            with_db(&st, move |c| load_with_name(c, &id2)).await
                        {
                            let ev = SseEvent::default()
                                .data(public_json(&st, &rec, &name, now_ms()).to_string());
                            return Some((Ok(ev), (rx, st, id, guard)));
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
    Ok(Sse::new(initial.chain(updates))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// `GET /i/{id}/qr.png`: the QR code of the invoice's BIP21 URI.
pub async fn qr_png(
    ClientIp(ip): ClientIp,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (rec, _) = public_invoice(&st, &ip, id).await?;
    let png = super::qr::qr_png(&bip21(&rec));
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

/// `GET /i/{id}/qr.svg`: the unified BIP21 URI; with `m=ln`, `lightning:<BOLT11>` while the
/// BOLT11 part can pay the invoice (else the BIP21 URI).
pub async fn qr_svg(
    ClientIp(ip): ClientIp,
    State(st): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let (rec, _) = public_invoice(&st, &ip, id).await?;
    let ln = q
        .as_deref()
        .is_some_and(|q| q.split('&').any(|kv| kv == "m=ln"));
    let text = match payable_bolt11(&rec).filter(|_| ln) {
        // Upper case: the QR code's alphanumeric mode, as BOLT11 suggests.
        Some(b) => format!("LIGHTNING:{}", b.to_ascii_uppercase()),
        None => bip21(&rec),
    };
    let svg = super::qr::qr_svg(&text);
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

async fn pos_store(st: &AppState, ip: &str, token: String) -> Result<StoreSettings, ApiError> {
    st.charge_ip_addr(ip, 1)?;
    if !valid_public_id(&token) {
        return Err(unknown_pos());
    }
    with_db(st, move |c| {
        store::settings_by_pos(c, &token).map_err(db_error)
    })
    .await?
    .ok_or_else(unknown_pos)
}

/// `GET /pos/{token}`: the point-of-sale page.
pub async fn pos_page(
    ClientIp(ip): ClientIp,
    State(st): State<AppState>,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    pos_store(&st, &ip, token).await?;
    Ok(html(&st, super::pages::POS_HTML))
}

/// The decimals a cashier may type in `currency`: BTC's 8; for a quote asset, those of its BTC
/// market's price tick (USD ticks 0.01: 2), not the ledger's (USD has 8 there, and a point of
/// sale that takes "12.509" USD is not one a cashier expects).
fn pos_decimals(st: &AppState, currency: &str) -> u8 {
    if currency == "BTC" {
        return BTC_DECIMALS;
    }
    let mut decimals = quote_decimals(st, currency);
    if let Some(m) = st
        .markets()
        .markets
        .iter()
        .find(|m| m.base.symbol == "BTC" && m.quote.symbol == currency)
    {
        let mut per_tick = m.price_units_per_tick;
        while decimals > 0 && per_tick >= 10 && per_tick % 10 == 0 {
            per_tick /= 10;
            decimals -= 1;
        }
    }
    decimals
}

/// `GET /pos/{token}/info`: `{"storeName","currency","decimals"}` (see [`pos_decimals`]).
pub async fn pos_info(
    ClientIp(ip): ClientIp,
    State(st): State<AppState>,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    let s = pos_store(&st, &ip, token).await?;
    let decimals = pos_decimals(&st, &s.currency);
    Ok(
        axum::Json(json!({"storeName": s.name, "currency": s.currency, "decimals": decimals}))
            .into_response(),
    )
}

/// `POST /pos/{token}/invoice` with `{"amount":"12.50"}` (the store's currency): a new invoice
/// (201, PublicInvoice JSON).
pub async fn pos_invoice(
    ClientIp(ip): ClientIp,
    State(st): State<AppState>,
    Path(token): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let s = pos_store(&st, &ip, token).await?;
    st.charge_ip_addr(&ip, 10)?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::bad(-1100, "Body must be JSON {\"amount\":\"12.50\"}."))?;
    let amount = v["amount"]
        .as_str()
        .ok_or_else(|| ApiError::missing("amount"))?
        .to_owned();
    // The precision /info announced (the signed API takes the ledger's).
    if api::decimal::parse_units(&amount, pos_decimals(&st, &s.currency))
        == Err(api::decimal::DecimalError::TooPrecise)
    {
        return Err(ApiError::precision("amount"));
    }
    // Per store too (the link is public to whoever has it, from any number of addresses):
    // each invoice is a wallet address custody watches for good. Charged for a well-formed
    // request only (the amount checked first, as the invoice will check it): malformed ones
    // must not close the store's point of sale.
    amount_in(&st, &s.currency, &amount).await?;
    let m = st.merchant();
    let made = m.pos_invoices.get_or_init(|| {
        api::ratelimit::Limiter::with_window(m.cfg.pos_invoices_per_hour, 3_600_000)
    });
    if let api::ratelimit::Charge::Limited { retry_after, .. } =
        made.charge(&s.account.to_string(), 1, now_ms())
    {
        return Err(ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: -1003,
            msg: format!(
                "This point of sale made as many invoices as it may this hour ({}).",
                made.limit()
            )
            .into(),
            retry_after: Some(retry_after),
        });
    }
    let rec = new_invoice(
        &st,
        &s,
        NewInvoice {
            amount,
            currency: None,
            order_id: None,
            metadata: None,
            expiry_min: None,
            idem_key: None,
            label: None,
            message: None,
            ..NewInvoice::default()
        },
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(public_json(&st, &rec, &s.name, now_ms())),
    )
        .into_response())
}
