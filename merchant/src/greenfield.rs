//! A BTCPay Server Greenfield-compatible API (`/api/v1/...`) over the same stores and invoices as
//! the signed `/mapi/v1/merchant/*` API: shop plugins that speak Greenfield (WooCommerce,
//! PrestaShop, ...) connect with a key's `greenfieldToken`.
//!
//! * **Auth.** `Authorization: token <greenfieldToken>` ([`api::keys::KeyStore::by_greenfield_token`]:
//!   derived from the master key, compared in constant time). The route's BTCPay permission
//!   ([`api::access::Greenfield`]) maps onto the key's stored permissions; a key acts on its own
//!   account's store only, whose id is the account number. No token: `401 unauthenticated`; a
//!   permission the key lacks, or another store's id: `403 missing-permission`, as BTCPay answers.
//! * **One invoice model.** A Greenfield invoice is a merchant invoice; its checkout options
//!   and archived flag live beside it (`gf_invoice`). Its metadata is the invoice's metadata
//!   (up to [`MAX_METADATA`] bytes here; the order id is `metadata.orderId`).
//! * **Webhooks.** Each store may have Greenfield webhooks (`gf_webhook`) with event filters.
//!   [`enqueue_hooks`] runs inside every [`super::webhook::enqueue`] transaction and adds one
//!   outbox delivery per webhook and BTCPay event (`InvoiceCreated`, `InvoiceReceivedPayment`,
//!   `InvoiceProcessing`, `InvoiceSettled`, `InvoicePaymentSettled`, `InvoiceExpired`,
//!   `InvoiceInvalid`), delivered by the same dispatcher (retries, SSRF guard) and signed
//!   `BTCPay-Sig: sha256=<hex HMAC-SHA256(secret, body)>`. A webhook's secret is derived
//!   (`HMAC(master, "greenfield-webhook/<account>/<webhook id>")`), shown when it is created,
//!   never stored; a secret chosen by the client is refused (422).
//! * **Refunds are pull payments.** `POST .../invoices/{id}/refund` creates a pull payment for
//!   an amount chosen by BTCPay's `refundVariant`; whoever has its link claims it
//!   (`POST /api/v1/pull-payments/{id}/payouts`, or the page `/pp/{id}`) to a Bitcoin address.
//!   A claim is reserved against the pull payment's limit in one transaction (concurrent claims
//!   never exceed it), then paid through the invoice refund path (a custody withdrawal with its
//!   limits and approvals; outcome-unknown kept reserved and resolved by its key). A pull payment
//!   of the store (not from an invoice) pays out by a custody withdrawal from the merchant's
//!   account under the key `pp-<pull payment>-<n>`.
//!
//! Errors are BTCPay's: `{"code","message"}` (4xx/5xx) or a validation list
//! `[{"path","message"}]` (422).

use super::model::{self, Marks, Status};
use super::routes::{self as r, db_error, with_db, NewInvoice};
use super::store::{self, Record, StoreSettings};
use super::webhook::{self, EventType};
use crate::MerchantState as _;
use api::access::{Access, Greenfield};
use api::error::ApiError;
use api::keys::{ApiKey, Perms};
use api::state::{AppState, ClientIp};
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The largest Greenfield request body (bytes); larger: `413`.
pub const MAX_BODY: usize = 64 * 1024;
/// The largest invoice `metadata` of a Greenfield invoice (bytes of its JSON).
pub const MAX_METADATA: usize = 32 * 1024;
/// Webhooks per store.
pub const MAX_WEBHOOKS: i64 = 20;
/// The BTCPay Server release whose Greenfield API this one follows, answered as `server/info`'s
/// `version`.
pub const BTCPAY_API_VERSION: &str = "2.0.0";
/// Payouts per pull payment.
pub const MAX_PAYOUTS: i64 = 100;
/// The longest pull payment (or refund) name, bytes: WooCommerce's plugin names its refunds
/// "Refund for order no.: <n> reason: <the reason typed in the shop>".
const MAX_NAME: usize = 512;
/// A payout's state while it waits, reserved, for the store's approval (a pull payment without
/// `autoApproveClaims`).
const AWAITING: &str = "awaiting";
/// A claim's destination that is an exchange account: `account:<number>`.
pub const ACCOUNT_PREFIX: &str = "account:";
/// The one payment method: Bitcoin on chain.
pub const BTC_CHAIN: &str = "BTC-CHAIN";
/// The Lightning payment method's id (BTCPay 2.x; 1.x called it `BTC-LightningNetwork`, which
/// stays the legacy `paymentMethod` field). Offered when the Lightning node is running.
pub const BTC_LN: &str = "BTC-LN";
/// The 1.x name of [`BTC_LN`] (the `paymentMethod` field).
pub const BTC_LN_LEGACY: &str = "BTC-LightningNetwork";

/// A payment method a client names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// On chain.
    Chain,
    /// Lightning.
    Ln,
}

/// The payment method a client's id names, as BTCPay parses it: case-insensitive, `-` or `_`
/// between the currency and the type (WooCommerce's plugin sends `BTC_CHAIN`, `BTC_LN`), the
/// 1.x names (`BTC-OnChain`, `BTC-LightningNetwork`) and the bare `BTC` too.
fn method_of(m: &str) -> Option<Method> {
    let m = m.to_ascii_uppercase().replace('_', "-");
    match m.as_str() {
        "BTC-CHAIN" | "BTC" | "BTC-ONCHAIN" => Some(Method::Chain),
        "BTC-LN" | "BTC-LIGHTNINGNETWORK" => Some(Method::Ln),
        _ => None,
    }
}

/// A payment method an invoice may ask for: on chain always, Lightning while the node runs.
fn method_ok(m: &str, lightning: bool) -> bool {
    match method_of(m) {
        Some(Method::Chain) => true,
        Some(Method::Ln) => lightning,
        None => false,
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS gf_invoice (
  invoice_id TEXT PRIMARY KEY, merchant INTEGER NOT NULL, checkout TEXT NOT NULL,
  archived INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS gf_webhook (
  id TEXT PRIMARY KEY, merchant INTEGER NOT NULL, url TEXT NOT NULL, enabled INTEGER NOT NULL,
  auto_redelivery INTEGER NOT NULL, everything INTEGER NOT NULL, events TEXT NOT NULL,
  created_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS gf_webhook_merchant ON gf_webhook (merchant);
CREATE TABLE IF NOT EXISTS gf_pull_payment (
  id TEXT PRIMARY KEY, merchant INTEGER NOT NULL, invoice_id TEXT, name TEXT NOT NULL,
  description TEXT NOT NULL, amount_sat INTEGER NOT NULL, currency TEXT NOT NULL,
  amount_display TEXT NOT NULL, created_ms INTEGER NOT NULL, archived INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS gf_pull_payment_merchant ON gf_pull_payment (merchant, created_ms);
CREATE TABLE IF NOT EXISTS gf_payout (
  pp_id TEXT NOT NULL, n INTEGER NOT NULL, id TEXT NOT NULL UNIQUE, destination TEXT NOT NULL,
  amount_sat INTEGER NOT NULL, state TEXT NOT NULL, reference TEXT, claim_key TEXT,
  created_ms INTEGER NOT NULL, PRIMARY KEY (pp_id, n), UNIQUE (pp_id, claim_key));
";

/// This process's run: random, written on each payout this process reserves (a claim) or
/// approves. A `pending` payout of another run (or of none: written by an older build) was left
/// by a crash and is resolved by its key; one of this run is being paid here and is left alone.
/// Unlike a comparison of times, a clock that steps back cannot make the monitor take a
/// payout an approval is paying (and give its reservation back meanwhile).
static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// [`RUN`], set when the schema is opened.
fn run_id() -> &'static str {
    RUN.get_or_init(|| match api::keys::random_bytes::<8>() {
        Ok(b) => hex::encode(b),
        // No randomness: the time this process opened the database is unique enough.
        Err(_) => format!("t{}", api::core::now_ms()),
    })
}

/// Adds `column` (`decl`: its type and default) to `table` unless a database from before has it.
fn add_column(conn: &Connection, table: &str, column: &str, decl: &str) -> rusqlite::Result<()> {
    let has: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
        .exists([table, column])?;
    if !has {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}

/// Creates the Greenfield tables if they do not exist (idempotent).
pub fn init_schema(conn: &Connection) -> rusqlite::Result<()> {
    run_id();
    conn.execute_batch(SCHEMA)?;
    // Databases from before payouts were followed until custody paid them or gave them back.
    add_column(conn, "gf_payout", "final", "INTEGER NOT NULL DEFAULT 0")?;
    add_column(
        conn,
        "gf_payout",
        "checked_ms",
        "INTEGER NOT NULL DEFAULT 0",
    )?;
    // Databases from before pull payments kept their claim window.
    add_column(conn, "gf_pull_payment", "starts_ms", "INTEGER")?;
    add_column(conn, "gf_pull_payment", "expires_ms", "INTEGER")?;
    // Databases from before a pull payment's claims to exchange accounts needed its creator's
    // `transfer` permission: their pull payments pay addresses only.
    add_column(
        conn,
        "gf_pull_payment",
        "accounts_ok",
        "INTEGER NOT NULL DEFAULT 0",
    )?;
    // Databases from before claims could wait for the store's approval: every pull payment
    // paid its claims when they were made; their payouts name no run (any `pending` one was
    // left by a process before this one).
    add_column(
        conn,
        "gf_pull_payment",
        "auto_approve",
        "INTEGER NOT NULL DEFAULT 1",
    )?;
    add_column(conn, "gf_payout", "run", "TEXT")?;
    Ok(())
}

// ---- errors ----

/// A Greenfield error answer.
#[derive(Debug)]
pub struct GfError {
    status: StatusCode,
    body: Value,
    retry_after: Option<u64>,
}

fn gf_err(status: StatusCode, code: &str, message: impl Into<String>) -> GfError {
    GfError {
        status,
        body: json!({"code": code, "message": message.into()}),
        retry_after: None,
    }
}

/// A refusal of the store's withdrawal address list ([`crate::allowlist`]) in BTCPay's error
/// shape: `403` with the list's stable code (`address_not_listed`, `address_in_delay`,
/// `address_list_on`); a database failure is an internal error.
fn list_refused(e: crate::allowlist::AllowListError) -> GfError {
    match e {
        crate::allowlist::AllowListError::Database(e) => db_error(e).into(),
        e => gf_err(
            StatusCode::FORBIDDEN,
            e.code(),
            format!("Refused: {e}; nothing was created or sent"),
        ),
    }
}

/// `422` with BTCPay's validation list.
fn invalid(path: &str, message: impl Into<String>) -> GfError {
    GfError {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        body: json!([{"path": path, "message": message.into()}]),
        retry_after: None,
    }
}

fn missing_permission(g: Greenfield) -> GfError {
    GfError {
        status: StatusCode::FORBIDDEN,
        body: json!({
            "code": "missing-permission",
            "message": format!("Insufficient API Permissions. Please use an API key with permission \"{}\".", g.name()),
            "missingPermission": g.name(),
        }),
        retry_after: None,
    }
}

fn unauthenticated(message: &str) -> GfError {
    gf_err(StatusCode::UNAUTHORIZED, "unauthenticated", message)
}

fn invoice_not_found() -> GfError {
    gf_err(
        StatusCode::NOT_FOUND,
        "invoice-not-found",
        "The invoice was not found",
    )
}

fn webhook_not_found() -> GfError {
    gf_err(
        StatusCode::NOT_FOUND,
        "webhook-not-found",
        "The webhook was not found",
    )
}

fn pp_not_found() -> GfError {
    gf_err(
        StatusCode::NOT_FOUND,
        "pullpayment-not-found",
        "The pull payment was not found",
    )
}

impl From<ApiError> for GfError {
    /// The signed API's errors in Greenfield's shape; `mediatorCode` keeps the stable number.
    fn from(e: ApiError) -> Self {
        let code = match e.status {
            StatusCode::TOO_MANY_REQUESTS => "too-many-requests",
            StatusCode::SERVICE_UNAVAILABLE => "service-unavailable",
            StatusCode::NOT_FOUND => "not-found",
            StatusCode::PAYLOAD_TOO_LARGE => "payload-too-large",
            s if s.is_server_error() => "generic-error",
            _ => "invalid-request",
        };
        let status = if e.status == StatusCode::UNAUTHORIZED {
            StatusCode::FORBIDDEN
        } else {
            e.status
        };
        GfError {
            status,
            body: json!({"code": code, "message": e.msg, "mediatorCode": e.code}),
            retry_after: e.retry_after,
        }
    }
}

impl IntoResponse for GfError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body)).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = axum::http::HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        r
    }
}

type GfResult = Result<Response, GfError>;

fn ok(v: Value) -> GfResult {
    Ok(axum::Json(v).into_response())
}

// ---- the request ----

/// A Greenfield request: headers, the JSON body (at most [`MAX_BODY`] bytes), the client IP and
/// the route's table entry.
#[derive(Debug)]
pub struct GfReq {
    headers: HeaderMap,
    body: axum::body::Bytes,
    ip: String,
    route: Option<&'static api::access::Route>,
    /// A store-dashboard session's principal ([`GfReq::session`]): no token to check.
    session: Option<Arc<ApiKey>>,
}

impl FromRequest<AppState> for GfReq {
    type Rejection = GfError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, GfError> {
        let (mut parts, body) = req.into_parts();
        let ClientIp(ip) = match ClientIp::from_request_parts(&mut parts, state).await {
            Ok(ip) => ip,
            Err(never) => match never {},
        };
        let route = parts
            .extensions
            .get::<&'static api::access::Route>()
            .copied();
        let body = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
            gf_err(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                format!("The request body is larger than {MAX_BODY} bytes"),
            )
        })?;
        Ok(GfReq {
            headers: parts.headers,
            body,
            ip,
            route,
            session: None,
        })
    }
}

impl GfReq {
    /// A request made by the store dashboard for a logged-in session: the same handler runs for
    /// the session's store (`key` from [`ApiKey::session`]), its store check included.
    pub(crate) fn session(key: Arc<ApiKey>, ip: String, body: Value) -> Self {
        GfReq {
            headers: HeaderMap::new(),
            body: serde_json::to_vec(&body).unwrap_or_default().into(),
            ip,
            route: None,
            session: Some(key),
        }
    }

    /// The body as a JSON object (an empty body is `{}`).
    fn json(&self) -> Result<Map<String, Value>, GfError> {
        if self.body.is_empty() {
            return Ok(Map::new());
        }
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(gf_err(
                StatusCode::BAD_REQUEST,
                "invalid-json",
                "The request body must be a JSON object",
            )),
        }
    }
}

/// The store id of an account's store (its number).
pub fn store_id(account: u32) -> String {
    account.to_string()
}

/// Authenticates a token route: charges the IP, finds the key by its token, charges the key,
/// checks the route's BTCPay permission. `store`: the path's store id, which must be the key's.
fn auth(st: &AppState, req: &GfReq, store: Option<&str>) -> Result<Arc<ApiKey>, GfError> {
    if let Some(key) = &req.session {
        // The dashboard authenticated and charged the session already.
        if store.is_some_and(|s| s != store_id(key.account)) {
            return Err(missing_permission(Greenfield::Any));
        }
        return Ok(key.clone());
    }
    let route = req.route.ok_or_else(|| {
        tracing::error!("a Greenfield handler ran without a route table entry");
        GfError::from(ApiError::internal())
    })?;
    let Access::Token(g) = route.access else {
        tracing::error!("auth() on a route that is not Access::Token");
        return Err(ApiError::internal().into());
    };
    let weight = route.weight.unwrap_or(1);
    st.charge_ip_addr(&req.ip, weight)?;
    let header = req
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| unauthenticated("Authentication is required for accessing this endpoint"))?;
    let token = header
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("token"))
        .map(|(_, t)| t.trim())
        .ok_or_else(|| unauthenticated("Authentication is required for accessing this endpoint"))?;
    let key = st
        .keys()
        .by_greenfield_token(token)
        .ok_or_else(|| unauthenticated("ApiKey authentication failed: Unknown API Key"))?;
    st.charge_key(&key, weight)?;
    if !key.perms.has(g.perms()) {
        return Err(missing_permission(g));
    }
    if let Some(s) = store {
        if s != store_id(key.account) {
            return Err(missing_permission(g));
        }
    }
    Ok(key)
}

fn now_ms() -> u64 {
    api::core::now_ms()
}

fn secs(ms: u64) -> u64 {
    ms / 1000
}

fn public_url(st: &AppState) -> String {
    st.cfg()
        .public_url
        .as_deref()
        .unwrap_or("")
        .trim_end_matches('/')
        .to_owned()
}

// ---- server and key ----

/// `GET /api/v1/api-keys/current`: the key as BTCPay describes one (`apiKey` is the token).
pub async fn current_key(State(st): State<AppState>, req: GfReq) -> GfResult {
    let key = auth(&st, &req, None)?;
    let token = st.keys().greenfield_token(&key.api_key);
    ok(json!({
        "apiKey": token,
        "label": key.label,
        "permissions": permissions_of(&key),
    }))
}

/// `DELETE /api/v1/api-keys/current`: the key revokes itself (a plugin disconnecting), as
/// BTCPay's; audited `key.revoke` with the key as actor. Its token and secret stop working at
/// once.
pub async fn revoke_current_key(State(st): State<AppState>, req: GfReq) -> GfResult {
    let key = auth(&st, &req, None)?;
    if req.session.is_some() {
        // A dashboard session is no key (its principal is in no key table).
        return Err(missing_permission(Greenfield::Any));
    }
    api::native::revoke_own_key(
        &st,
        &key,
        &key.api_key,
        &format!("account:{}", key.account),
        &key.api_key,
    )?;
    ok(json!({}))
}

/// BTCPay permission names of a key, scoped to its store (`name:storeId`), as BTCPay lists them:
/// those it was made with, not those they hold besides (plugins compare the list with what they
/// asked for: WooCommerce's refuses a key whose list has more). A `merchant` key, made with no
/// BTCPay name, lists every store permission it holds. A name the key cannot use (a pull-payment
/// one without `withdraw`) is not listed.
pub fn permissions_of(key: &ApiKey) -> Vec<String> {
    let merchant = key.perms.0 & Perms::MERCHANT.0 != 0;
    Greenfield::STORE
        .iter()
        .filter(|g| merchant || key.perms.0 & g.perms().0 & Perms::STORE.0 != 0)
        .filter(|g| key.perms.has(g.perms()))
        .map(|g| format!("{}:{}", g.name(), store_id(key.account)))
        .collect()
}

/// `GET /api/v1/server/info`.
pub async fn server_info(State(st): State<AppState>, req: GfReq) -> GfResult {
    auth(&st, &req, None)?;
    let custody = st.custody().is_some();
    let methods: Vec<&str> = if st.lightning().is_some() {
        vec![BTC_CHAIN, BTC_LN]
    } else {
        vec![BTC_CHAIN]
    };
    ok(json!({
        // The BTCPay API level this server speaks (2.0's payment and payout method ids), which
        // clients compare with the release that brought what they use: WooCommerce's plugin
        // offers refunds from 1.7.6 on (`cancreatenonapprovedpullpayments`). Mediator's own
        // version is `mediatorVersion`.
        "version": BTCPAY_API_VERSION,
        "mediatorVersion": env!("CARGO_PKG_VERSION"),
        "onion": null,
        "supportedPaymentMethods": methods,
        "fullySynched": custody,
        "syncStatus": [{
            "paymentMethodId": BTC_CHAIN,
            "cryptoCode": "BTC",
            "nodeInformation": null,
            "chainHeight": null,
            "syncHeight": null,
            "available": custody,
        }],
    }))
}

// ---- stores ----

fn speed_name(speed: u32) -> &'static str {
    match speed {
        0 => "HighSpeed",
        1 => "MediumSpeed",
        2 => "LowMediumSpeed",
        _ => "LowSpeed",
    }
}

fn speed_from(name: &str) -> Option<u32> {
    match name {
        "HighSpeed" => Some(0),
        "MediumSpeed" => Some(1),
        "LowMediumSpeed" => Some(2),
        "LowSpeed" => Some(6),
        _ => None,
    }
}

/// A percentage (basis points) as a JSON number: `150` → `1.5`.
fn percent_json(bps: u16) -> Value {
    let s = api::decimal::format_units(u64::from(bps), 2);
    serde_json::from_str::<Value>(&s).unwrap_or(Value::from(0))
}

/// A tolerance percentage from a JSON number or string (0..=50, two decimals at most).
fn tolerance_bps(v: &Value, path: &str) -> Result<u16, GfError> {
    let s = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => return Err(invalid(path, "a number from 0 to 50")),
    };
    r::percent_bps(&s).map_err(|_| invalid(path, "a number from 0 to 50 with at most 2 decimals"))
}

fn store_json(s: &StoreSettings) -> Value {
    json!({
        "id": store_id(s.account),
        "name": s.name,
        "website": null,
        "defaultCurrency": s.currency,
        "invoiceExpiration": u64::from(s.expiry_min) * 60,
        "monitoringExpiration": 86_400,
        "speedPolicy": speed_name(s.speed),
        "paymentTolerance": percent_json(s.tolerance_bps),
        "anyoneCanCreateInvoice": false,
        "redirectAutomatically": false,
        "lazyPaymentMethods": false,
        "defaultPaymentMethod": BTC_CHAIN,
        "archived": false,
        "receipt": {"enabled": true, "showQR": null, "showPayments": true},
    })
}

async fn settings_of(st: &AppState, account: u32) -> Result<StoreSettings, GfError> {
    Ok(with_db(st, move |c| {
        store::settings_or_default(c, account).map_err(db_error)
    })
    .await?)
}

/// `GET /api/v1/stores`: the key's own store.
pub async fn list_stores(State(st): State<AppState>, req: GfReq) -> GfResult {
    let key = auth(&st, &req, None)?;
    let s = settings_of(&st, key.account).await?;
    ok(json!([store_json(&s)]))
}

/// `GET /api/v1/stores/{storeId}`.
pub async fn get_store(
    State(st): State<AppState>,
    Path(store): Path<String>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store))?;
    ok(store_json(&settings_of(&st, key.account).await?))
}

/// The store settings a Greenfield body changes (others unchanged); validated first.
fn apply_store_body(
    st: &AppState,
    s: &mut StoreSettings,
    b: &Map<String, Value>,
) -> Result<(), GfError> {
    if let Some(v) = b.get("name") {
        let n = v.as_str().unwrap_or("");
        if n.trim().is_empty() || n.len() > 64 || n.chars().any(char::is_control) {
            return Err(invalid("name", "1 to 64 printable characters"));
        }
        s.name = n.to_owned();
    }
    if let Some(v) = b.get("defaultCurrency").filter(|v| !v.is_null()) {
        let c = v.as_str().unwrap_or("").to_ascii_uppercase();
        r::check_currency(st, &c)
            .map_err(|_| invalid("defaultCurrency", "BTC or the exchange's quote currency"))?;
        s.currency = c;
    }
    if let Some(v) = b.get("invoiceExpiration").filter(|v| !v.is_null()) {
        let e = v
            .as_u64()
            .filter(|e| e % 60 == 0 && (60..=r::MAX_EXPIRY_MIN * 60).contains(e));
        let e = e.ok_or_else(|| {
            invalid(
                "invoiceExpiration",
                "whole minutes in seconds, 60 to 604800",
            )
        })?;
        s.expiry_min = (e / 60) as u32;
    }
    if let Some(v) = b.get("speedPolicy").filter(|v| !v.is_null()) {
        s.speed = v.as_str().and_then(speed_from).ok_or_else(|| {
            invalid(
                "speedPolicy",
                "HighSpeed, MediumSpeed, LowMediumSpeed or LowSpeed",
            )
        })?;
    }
    if let Some(v) = b.get("paymentTolerance").filter(|v| !v.is_null()) {
        s.tolerance_bps = tolerance_bps(v, "paymentTolerance")?;
    }
    Ok(())
}

/// `POST /api/v1/stores`: an account has one store; this configures it the first time (a
/// second store is refused: `422`).
pub async fn create_store(State(st): State<AppState>, req: GfReq) -> GfResult {
    let key = auth(&st, &req, None)?;
    let b = req.json()?;
    if b.get("name").is_none() {
        return Err(invalid("name", "name is missing"));
    }
    let account = key.account;
    let mut s = StoreSettings::default_for(account);
    apply_store_body(&st, &mut s, &b)?;
    let s = with_db(&st, move |c| {
        if store::settings(c, account).map_err(db_error)?.is_some() {
            return Ok(None);
        }
        store::put_settings(c, &s).map_err(db_error)?;
        Ok(Some(s))
    })
    .await?
    .ok_or_else(|| {
        invalid(
            "name",
            "this account already has its store (one store per account): use PUT /api/v1/stores/{storeId}",
        )
    })?;
    ok(store_json(&s))
}

/// `PUT /api/v1/stores/{storeId}`.
pub async fn put_store(
    State(st): State<AppState>,
    Path(store_path): Path<String>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let b = req.json()?;
    // Read, change and write in one go: the row also holds what other requests change on their
    // own (the webhook secret's version, the point of sale's token), and a write of a copy read
    // before one of them would undo it.
    let (st2, account) = (st.clone(), key.account);
    let s = with_db(&st, move |c| {
        let mut s = store::settings_or_default(c, account).map_err(db_error)?;
        if let Err(e) = apply_store_body(&st2, &mut s, &b) {
            return Ok(Err(e));
        }
        store::put_settings(c, &s).map_err(db_error)?;
        Ok(Ok(s))
    })
    .await??;
    ok(store_json(&s))
}

/// `GET /api/v1/stores/{storeId}/payment-methods`: Bitcoin on chain, and Lightning (`BTC-LN`,
/// enabled while the node runs).
pub async fn store_payment_methods(
    State(st): State<AppState>,
    Path(store_path): Path<String>,
    req: GfReq,
) -> GfResult {
    auth(&st, &req, Some(&store_path))?;
    ok(json!([{
        "enabled": true,
        "paymentMethodId": BTC_CHAIN,
        "cryptoCode": "BTC",
        "config": {"accountDerivation": null, "label": "Mediator custody (an address per invoice)"},
    }, {
        "enabled": st.lightning().is_some(),
        "paymentMethodId": BTC_LN,
        "cryptoCode": "BTC",
        "config": {"connectionString": "Internal Node", "disableBOLT11PaymentOption": false},
    }]))
}

// ---- invoices ----

/// A Greenfield invoice's own part: checkout options (JSON object) and the archived flag.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    /// `checkout` as given (validated) at creation.
    pub checkout: Map<String, Value>,
    /// Archived (`DELETE`): hidden from lists unless `includeArchived`.
    pub archived: bool,
}

/// Stores a Greenfield invoice's checkout options (in the creating transaction).
pub fn insert_invoice_extra(
    conn: &Connection,
    invoice_id: &str,
    merchant: u32,
    checkout: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO gf_invoice (invoice_id, merchant, checkout, archived) VALUES (?1, ?2, ?3, 0)",
        params![invoice_id, merchant, checkout],
    )?;
    Ok(())
}

/// The Greenfield part of an invoice (defaults for an invoice made by the signed API).
pub fn extra(conn: &Connection, invoice_id: &str) -> rusqlite::Result<Extra> {
    let row: Option<(String, bool)> = conn
        .query_row(
            "SELECT checkout, archived FROM gf_invoice WHERE invoice_id = ?1",
            [invoice_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(match row {
        Some((c, archived)) => Extra {
            checkout: serde_json::from_str::<Map<String, Value>>(&c).unwrap_or_default(),
            archived,
        },
        None => Extra::default(),
    })
}

/// The redirect options of an invoice for the checkout page: `(redirectURL, redirectAutomatically)`.
pub fn redirect_of(conn: &Connection, invoice_id: &str) -> rusqlite::Result<(Value, bool)> {
    let e = extra(conn, invoice_id)?;
    Ok((
        e.checkout
            .get("redirectURL")
            .cloned()
            .unwrap_or(Value::Null),
        e.checkout
            .get("redirectAutomatically")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    ))
}

fn metadata_of(rec: &Record) -> Map<String, Value> {
    let mut m = rec
        .metadata
        .as_deref()
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .and_then(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .unwrap_or_default();
    if let Some(o) = &rec.order_id {
        m.entry("orderId").or_insert_with(|| json!(o));
    }
    m
}

fn additional_status(rec: &Record) -> &'static str {
    let m = rec.inv.marks;
    // Settled, then payments it counted were reversed (double-spent): BTCPay's `Invalid`, an
    // invoice whose payments failed. Otherwise marked settled, or marked invalid.
    if m.has(Marks::MARKED) {
        "Marked"
    } else if m.has(Marks::REVERSED) {
        "Invalid"
    } else if rec.inv.status == Status::Invalid {
        "Marked"
    } else if m.has(Marks::PAID_LATE) {
        "PaidLate"
    } else if m.has(Marks::PAID_OVER) {
        "PaidOver"
    } else if m.has(Marks::PAID_PARTIAL) {
        "PaidPartial"
    } else {
        "None"
    }
}

/// BTCPay's `InvoiceData` of an invoice.
pub fn invoice_json(st: &AppState, rec: &Record, extra: &Extra, now_ms: u64) -> Value {
    let i = &rec.inv;
    let d = i.derive(now_ms);
    let paid = match &i.quote {
        // The paid part in the invoice's currency, at its locked rate.
        Some(q) => {
            let units = u128::from(d.paid_sat) * u128::from(q.rate_units) / 100_000_000;
            let dec = r::quote_decimals(st, &q.asset);
            api::decimal::format_units(u64::try_from(units).unwrap_or(u64::MAX), dec)
        }
        None => r::btc(d.paid_sat),
    };
    let manual: Vec<&str> = match d.status {
        Status::New | Status::Expired => vec!["Settled", "Invalid"],
        Status::Processing | Status::Invalid => vec!["Settled"],
        Status::Settled => vec![],
    };
    let mut checkout = json!({
        "speedPolicy": speed_name(i.speed),
        "paymentMethods": if rec.lightning.is_some() { vec![BTC_CHAIN, BTC_LN] } else { vec![BTC_CHAIN] },
        "defaultPaymentMethod": BTC_CHAIN,
        "lazyPaymentMethods": false,
        "expirationMinutes": (i.expires_ms.saturating_sub(i.created_ms)) / 60_000,
        "monitoringMinutes": 1440,
        "paymentTolerance": percent_json(i.tolerance_bps),
        "redirectURL": null,
        "redirectAutomatically": false,
        "defaultLanguage": null,
    });
    for (k, v) in &extra.checkout {
        checkout[k] = v.clone();
    }
    json!({
        "id": i.id,
        "storeId": store_id(i.merchant),
        "amount": i.amount_asked,
        "paidAmount": paid,
        "currency": i.currency,
        "type": "Standard",
        "checkoutLink": format!("{}/i/{}", public_url(st), i.id),
        "createdTime": secs(i.created_ms),
        "expirationTime": secs(i.expires_ms),
        "monitoringExpiration": secs(i.expires_ms) + 86_400,
        "status": d.status.as_str(),
        "additionalStatus": additional_status(rec),
        "availableStatusesForManualMarking": manual,
        "archived": extra.archived,
        "metadata": Value::Object(metadata_of(rec)),
        "checkout": checkout,
        "receipt": {"enabled": true, "showQR": null, "showPayments": true},
    })
}

async fn own_invoice(
    st: &AppState,
    merchant: u32,
    id: String,
) -> Result<(Record, String, Extra), GfError> {
    if !r::valid_public_id(&id) {
        return Err(invoice_not_found());
    }
    let found = with_db(st, move |c| {
        let Some((rec, name)) = r::load_with_name(c, &id)? else {
            return Ok(None);
        };
        let e = extra(c, &id).map_err(db_error)?;
        Ok(Some((rec, name, e)))
    })
    .await?;
    match found {
        Some((rec, name, e)) if rec.inv.merchant == merchant => Ok((rec, name, e)),
        _ => Err(invoice_not_found()),
    }
}

/// A decimal amount from a JSON string or number.
fn decimal_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// An invoice's `checkout`, read.
struct Checkout {
    /// The options a client may set, validated, as stored.
    options: Map<String, Value>,
    /// `expirationMinutes`.
    expiry: Option<u64>,
    /// `paymentMethods` leaves Lightning out: the invoice gets no BOLT11 part and lists only
    /// `BTC-CHAIN`, as asked (WooCommerce's plugin invalidates an invoice whose methods differ
    /// from its gateway's).
    on_chain_only: bool,
}

/// Reads an invoice's `checkout` (store settings it overrides go into `s`).
fn checkout_options(
    b: &Map<String, Value>,
    s: &mut StoreSettings,
    lightning: bool,
) -> Result<Checkout, GfError> {
    let mut out = Map::new();
    let mut expiry = None;
    let mut on_chain_only = false;
    let Some(c) = b.get("checkout").filter(|v| !v.is_null()) else {
        return Ok(Checkout {
            options: out,
            expiry,
            on_chain_only,
        });
    };
    let c = c
        .as_object()
        .ok_or_else(|| invalid("checkout", "an object"))?;
    if let Some(v) = c.get("speedPolicy").filter(|v| !v.is_null()) {
        s.speed = v.as_str().and_then(speed_from).ok_or_else(|| {
            invalid(
                "checkout.speedPolicy",
                "HighSpeed, MediumSpeed, LowMediumSpeed or LowSpeed",
            )
        })?;
    }
    if let Some(v) = c.get("paymentTolerance").filter(|v| !v.is_null()) {
        s.tolerance_bps = tolerance_bps(v, "checkout.paymentTolerance")?;
    }
    if let Some(v) = c.get("expirationMinutes").filter(|v| !v.is_null()) {
        expiry = Some(
            v.as_u64()
                .filter(|m| (1..=r::MAX_EXPIRY_MIN).contains(m))
                .ok_or_else(|| invalid("checkout.expirationMinutes", "1 to 10080"))?,
        );
    }
    if let Some(v) = c.get("paymentMethods").filter(|v| !v.is_null()) {
        let ok = v.as_array().is_some_and(|a| {
            a.iter()
                .all(|m| m.as_str().is_some_and(|m| method_ok(m, lightning)))
        });
        if !ok {
            return Err(invalid(
                "checkout.paymentMethods",
                if lightning {
                    "only BTC-CHAIN and BTC-LN are offered"
                } else {
                    "only BTC-CHAIN is offered"
                },
            ));
        }
        on_chain_only = v.as_array().is_some_and(|a| {
            !a.iter()
                .any(|m| m.as_str().and_then(method_of) == Some(Method::Ln))
        });
    }
    if let Some(v) = c.get("redirectURL").filter(|v| !v.is_null()) {
        let u = v.as_str().unwrap_or("");
        let good = (u.starts_with("https://") || u.starts_with("http://"))
            && u.len() <= 2048
            && !u.chars().any(|c| c.is_control() || c.is_whitespace());
        if !good {
            return Err(invalid(
                "checkout.redirectURL",
                "an http(s) URL of at most 2048 characters",
            ));
        }
        out.insert("redirectURL".into(), json!(u));
    }
    if let Some(v) = c.get("redirectAutomatically").filter(|v| !v.is_null()) {
        let a = v
            .as_bool()
            .ok_or_else(|| invalid("checkout.redirectAutomatically", "true or false"))?;
        out.insert("redirectAutomatically".into(), json!(a));
    }
    if let Some(v) = c.get("defaultLanguage").filter(|v| !v.is_null()) {
        let l = v
            .as_str()
            .filter(|l| l.len() <= 16 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        out.insert(
            "defaultLanguage".into(),
            json!(l.ok_or_else(|| invalid("checkout.defaultLanguage", "a language tag"))?),
        );
    }
    Ok(Checkout {
        options: out,
        expiry,
        on_chain_only,
    })
}

/// Metadata as stored (a JSON object) and the order id it names.
fn metadata_param(b: &Map<String, Value>) -> Result<(Option<String>, Option<String>), GfError> {
    let Some(m) = b.get("metadata").filter(|v| !v.is_null()) else {
        return Ok((None, None));
    };
    let obj = m
        .as_object()
        .ok_or_else(|| invalid("metadata", "a JSON object"))?;
    let text = serde_json::to_string(m).map_err(|_| invalid("metadata", "a JSON object"))?;
    if text.len() > MAX_METADATA {
        return Err(invalid(
            "metadata",
            format!("at most {MAX_METADATA} bytes of JSON"),
        ));
    }
    let order = match obj.get("orderId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err(invalid("metadata.orderId", "a string")),
    };
    // The invoice's order id column takes the short ones (the metadata keeps any).
    let order =
        order.filter(|o| !o.is_empty() && o.len() <= 64 && !o.chars().any(char::is_control));
    Ok((Some(text), order))
}

/// `POST /api/v1/stores/{storeId}/invoices`.
pub async fn create_invoice(
    State(st): State<AppState>,
    Path(store_path): Path<String>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let b = req.json()?;
    let amount = b
        .get("amount")
        .filter(|v| !v.is_null())
        .ok_or_else(|| {
            invalid(
                "amount",
                "amount is required (top-up invoices are not offered)",
            )
        })
        .and_then(|v| decimal_of(v).ok_or_else(|| invalid("amount", "a decimal number")))?;
    let mut settings = settings_of(&st, key.account).await?;
    let currency = match b.get("currency").filter(|v| !v.is_null()) {
        Some(v) => Some(
            v.as_str()
                .map(str::to_ascii_uppercase)
                .ok_or_else(|| invalid("currency", "a currency code"))?,
        ),
        None => None,
    };
    let (metadata, order_id) = metadata_param(&b)?;
    let Checkout {
        options,
        expiry,
        on_chain_only,
    } = checkout_options(&b, &mut settings, st.lightning().is_some())?;
    let checkout = serde_json::to_string(&options).map_err(|_| ApiError::internal())?;
    let rec = r::new_invoice(
        &st,
        &settings,
        NewInvoice {
            amount,
            currency,
            message: order_id.as_ref().map(|o| format!("Order {o}")),
            order_id,
            metadata,
            expiry_min: expiry,
            metadata_max: MAX_METADATA,
            greenfield_checkout: Some(checkout),
            on_chain_only,
            ..NewInvoice::default()
        },
    )
    .await
    .map_err(|e| match e.code {
        -1152 => invalid("currency", "BTC or the exchange's quote currency"),
        -1153 => invalid("amount", "more than zero"),
        -1111 | -1100 | -1013 => invalid("amount", e.msg.to_string()),
        _ => GfError::from(e),
    })?;
    let id = rec.inv.id.clone();
    let e = with_db(&st, move |c| extra(c, &id).map_err(db_error)).await?;
    ok(invoice_json(&st, &rec, &e, now_ms()))
}

/// `GET /api/v1/stores/{storeId}/invoices/{invoiceId}`.
pub async fn get_invoice(
    State(st): State<AppState>,
    Path((store_path, id)): Path<(String, String)>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let (rec, _, e) = own_invoice(&st, key.account, id).await?;
    ok(invoice_json(&st, &rec, &e, now_ms()))
}

/// The query string's pairs (repeated names kept, `status=A&status=B`).
fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((
                api::params::percent_decode(k)?,
                api::params::percent_decode(v)?,
            ))
        })
        .collect()
}

/// Query strings of list endpoints (the router gives us the raw query).
#[derive(Debug, Default)]
pub struct RawQuery(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for RawQuery {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(RawQuery(parts.uri.query().map(str::to_owned)))
    }
}

/// `GET /api/v1/stores/{storeId}/invoices`: `status` (repeatable), `orderId` (repeatable),
/// `startDate`/`endDate` (unix seconds), `skip`, `take` (default 100, at most 1000),
/// `includeArchived`; newest first.
pub async fn list_invoices(
    State(st): State<AppState>,
    Path(store_path): Path<String>,
    RawQuery(q): RawQuery,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let (mut statuses, mut orders) = (Vec::new(), Vec::new());
    let (mut start, mut end, mut skip, mut take, mut archived) =
        (0u64, u64::MAX, 0u32, 100u32, false);
    for (k, v) in query_pairs(q.as_deref()) {
        let num = |path: &str| v.parse::<u64>().map_err(|_| invalid(path, "a number"));
        match k.as_str() {
            "status" => statuses
                .push(Status::parse(&v).ok_or_else(|| invalid("status", "an invoice status"))?),
            // Once each: a repeated order id is one look-up, and its invoices listed once; the
            // first MAX_LIST are looked up.
            "orderId" if orders.len() < r::MAX_LIST as usize && !orders.contains(&v) => {
                orders.push(v.clone())
            }
            "startDate" => start = num("startDate")?.saturating_mul(1000),
            "endDate" => end = num("endDate")?.saturating_mul(1000).saturating_add(999),
            "skip" => {
                skip = u32::try_from(num("skip")?).map_err(|_| invalid("skip", "a number"))?
            }
            "take" => {
                take = u32::try_from(num("take")?)
                    .ok()
                    .filter(|t| (1..=r::MAX_LIST).contains(t))
                    .ok_or_else(|| invalid("take", "1 to 1000"))?
            }
            "includeArchived" => archived = v == "true",
            _ => {}
        }
    }
    let account = key.account;
    // Nothing past the first 10,000 matching invoices is listed (a page that far in would read
    // the whole list for each request).
    let want = skip.saturating_add(take).min(10 * r::MAX_LIST) as usize;
    let skip = skip as usize;
    let take = want.saturating_sub(skip);
    if take == 0 {
        return ok(Value::Array(Vec::new()));
    }
    let by_order = orders;
    // The stored statuses that may show as a wanted one: a `New` invoice shows `Expired` once
    // its time is up, before the monitor stores it so (nothing else changes by time alone).
    let mut stored = statuses.clone();
    if stored.contains(&Status::Expired) && !stored.contains(&Status::New) {
        stored.push(Status::New);
    }
    let now = now_ms();
    let shown =
        move |rec: &Record| statuses.is_empty() || statuses.contains(&rec.inv.derive(now).status);
    // The filters choose what `skip` and `take` count. At most `take` records and one page of
    // the list are held (review: up to `skip + take`, 10,000, were).
    let rows = with_db(&st, move |c| {
        let filter = |order_id| store::ListFilter {
            order_id,
            statuses: &stored,
            hide_archived: !archived,
            start_ms: start,
            end_ms: end,
        };
        let mut recs: Vec<Record> = Vec::with_capacity(take.min(r::MAX_LIST as usize));
        if by_order.is_empty() {
            let mut skipped = 0usize;
            store::visit_kept(c, account, &filter(None), &shown, |rec| {
                if skipped < skip {
                    skipped += 1;
                } else {
                    recs.push(rec);
                }
                recs.len() < take
            })
            .map_err(db_error)?;
        } else {
            // By order id: each looked up directly (however old the invoice), not filtered out
            // of the newest page. First the newest `skip + take` across the order ids by
            // (created, id) alone, kept as each order id's are read; then those asked for.
            let mut keys: Vec<(u64, String)> = Vec::new();
            for o in &by_order {
                let mut n = 0usize;
                store::visit_kept(c, account, &filter(Some(o)), &shown, |rec| {
                    keys.push((rec.inv.created_ms, rec.inv.id));
                    n += 1;
                    n < want
                })
                .map_err(db_error)?;
                keys.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
                keys.truncate(want);
            }
            for (_, id) in keys.into_iter().skip(skip).take(take) {
                if let Some(rec) = store::load(c, &id).map_err(db_error)? {
                    recs.push(rec);
                }
            }
        }
        let mut out = Vec::with_capacity(recs.len());
        for rec in recs {
            let e = extra(c, &rec.inv.id).map_err(db_error)?;
            out.push((rec, e));
        }
        Ok(out)
    })
    .await?;
    let v: Vec<Value> = rows
        .iter()
        .map(|(rec, e)| invoice_json(&st, rec, e, now))
        .collect();
    ok(Value::Array(v))
}

/// `PUT /api/v1/stores/{storeId}/invoices/{invoiceId}`: replaces the metadata.
pub async fn update_invoice(
    State(st): State<AppState>,
    Path((store_path, id)): Path<(String, String)>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let b = req.json()?;
    let (metadata, order_id) = metadata_param(&b)?;
    let metadata = metadata.ok_or_else(|| invalid("metadata", "metadata is missing"))?;
    let _guard = st.merchant().invoice_lock.lock().await;
    let (mut rec, _, e) = own_invoice(&st, key.account, id).await?;
    let iid = rec.inv.id.clone();
    let (m2, o2) = (metadata.clone(), order_id.clone());
    with_db(&st, move |c| {
        c.execute(
            "UPDATE invoice SET metadata = ?2, order_id = ?3 WHERE id = ?1",
            params![iid, m2, o2],
        )
        .map_err(db_error)
    })
    .await?;
    rec.metadata = Some(metadata);
    rec.order_id = order_id;
    ok(invoice_json(&st, &rec, &e, now_ms()))
}

/// `DELETE /api/v1/stores/{storeId}/invoices/{invoiceId}`: archives it (it keeps working; lists
/// hide it unless `includeArchived=true`).
pub async fn archive_invoice(
    State(st): State<AppState>,
    Path((store_path, id)): Path<(String, String)>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let (rec, _, _) = own_invoice(&st, key.account, id).await?;
    let (iid, merchant) = (rec.inv.id.clone(), rec.inv.merchant);
    with_db(&st, move |c| {
        c.execute(
            "INSERT INTO gf_invoice (invoice_id, merchant, checkout, archived) VALUES (?1, ?2, '{}', 1)
             ON CONFLICT(invoice_id) DO UPDATE SET archived = 1",
            params![iid, merchant],
        )
        .map_err(db_error)
    })
    .await?;
    Ok(StatusCode::OK.into_response())
}

fn payment_json(p: &Value, address: &str, speed: u64) -> Value {
    let confirmations = p["confirmations"].as_u64();
    let settled = p["source"] == "balance"
        || p["source"] == "lightning"
        || confirmations.is_some_and(|c| c >= speed);
    let id = p["outpoint"]
        .as_str()
        .or(p["paymentHash"].as_str())
        .map_or_else(|| "balance".to_owned(), str::to_owned);
    json!({
        "id": id,
        "receivedDate": p["time"].as_u64().unwrap_or(0) / 1000,
        "value": p["amountBtc"],
        "fee": "0",
        "status": if p["reorged"] == true { "Invalid" } else if settled { "Settled" } else { "Processing" },
        "destination": address,
    })
}

/// `GET /api/v1/stores/{storeId}/invoices/{invoiceId}/payment-methods`.
pub async fn invoice_payment_methods(
    State(st): State<AppState>,
    Path((store_path, id)): Path<(String, String)>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let (rec, name, _) = own_invoice(&st, key.account, id).await?;
    let now = now_ms();
    let m = r::merchant_json(&st, &rec, &name, now);
    let i = &rec.inv;
    let d = i.derive(now);
    let rate = match &i.quote {
        Some(q) => api::decimal::format_units(q.rate_units, r::quote_decimals(&st, &q.asset)),
        None => "1".to_owned(),
    };
    let of = |source: &str| -> Vec<Value> {
        m["payments"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| (p["source"] == "lightning") == (source == "lightning"))
                    .map(|p| payment_json(p, &rec.address, u64::from(i.speed)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let payments = of("chain");
    let mut methods = vec![json!({
        "paymentMethodId": BTC_CHAIN,
        "paymentMethod": "BTC",
        "cryptoCode": "BTC",
        "currency": "BTC",
        "destination": rec.address,
        "paymentLink": r::bip21(&rec),
        "rate": rate,
        "paymentMethodPaid": r::btc(d.paid_sat),
        "totalPaid": r::btc(d.paid_sat),
        "due": r::btc(i.amount_sat.saturating_sub(d.paid_sat)),
        "amount": r::btc(i.amount_sat),
        "paymentMethodFee": "0",
        "networkFee": "0",
        "payments": payments,
        "activated": true,
        "additionalData": {},
    })];
    if let Some(l) = &rec.lightning {
        let ln_paid: u64 = rec
            .inv
            .payments
            .iter()
            .filter(|p| matches!(p.source, super::model::Source::Lightning { .. }))
            .map(|p| p.amount_sat)
            .sum();
        methods.push(json!({
            "paymentMethodId": BTC_LN,
            "paymentMethod": BTC_LN_LEGACY,
            "cryptoCode": "BTC",
            "currency": "BTC",
            "destination": l.bolt11,
            "paymentLink": format!("lightning:{}", l.bolt11),
            "rate": rate,
            "paymentMethodPaid": r::btc(ln_paid),
            "totalPaid": r::btc(d.paid_sat),
            "due": r::btc(i.amount_sat.saturating_sub(d.paid_sat)),
            "amount": r::btc(i.amount_sat),
            "paymentMethodFee": "0",
            "networkFee": "0",
            "payments": of("lightning"),
            "activated": r::payable_bolt11(&rec).is_some(),
            "additionalData": {"paymentHash": l.payment_hash},
        }));
    }
    ok(Value::Array(methods))
}

/// `POST /api/v1/stores/{storeId}/invoices/{invoiceId}/status` with `{"status":"Settled"|"Invalid"}`.
pub async fn mark_status(
    State(st): State<AppState>,
    Path((store_path, id)): Path<(String, String)>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let b = req.json()?;
    let want = b.get("status").and_then(Value::as_str).unwrap_or("");
    if !matches!(want, "Settled" | "Invalid") {
        return Err(invalid("status", "Settled or Invalid"));
    }
    let _guard = st.merchant().invoice_lock.lock().await;
    let (mut rec, name, e) = own_invoice(&st, key.account, id).await?;
    let now = now_ms();
    let mut events = rec.inv.observe(&[], now);
    let more = if want == "Settled" {
        rec.inv.mark_settled(now)
    } else {
        rec.inv.mark_invalid(now)
    };
    // BTCPay answers a refused marking as a validation error on `status` (422), as
    // `MarkInvoiceStatus` does (review: this was a 400 `invalid-state`).
    let more = more.map_err(|model::TransitionError::WrongStatus(s)| {
        invalid(
            "status",
            format!(
                "Status can only be marked to invalid or settled within certain conditions: \
                 a {} invoice cannot be marked {want}",
                s.as_str()
            ),
        )
    })?;
    events.extend(more);
    let rec = r::commit(&st, rec, events, name).await?;
    ok(invoice_json(&st, &rec, &e, now))
}

// ---- webhooks ----

/// The BTCPay events a Mediator event becomes (in order).
fn btcpay_events(e: EventType) -> &'static [&'static str] {
    match e {
        EventType::InvoiceCreated => &["InvoiceCreated"],
        EventType::PaymentReceived => &["InvoiceReceivedPayment"],
        EventType::InvoiceProcessing => &["InvoiceProcessing"],
        EventType::InvoiceSettled => &["InvoicePaymentSettled", "InvoiceSettled"],
        EventType::InvoiceExpired => &["InvoiceExpired"],
        EventType::InvoiceInvalid => &["InvoiceInvalid"],
        EventType::InvoiceRefunded | EventType::InvoiceRefundCancelled => &[],
    }
}

/// Every event a Greenfield webhook may ask for.
pub const EVENTS: [&str; 7] = [
    "InvoiceCreated",
    "InvoiceReceivedPayment",
    "InvoiceProcessing",
    "InvoiceSettled",
    "InvoicePaymentSettled",
    "InvoiceExpired",
    "InvoiceInvalid",
];

struct Hook {
    id: String,
    url: String,
    enabled: bool,
    auto_redelivery: bool,
    everything: bool,
    events: Vec<String>,
}

impl Hook {
    fn wants(&self, event: &str) -> bool {
        self.enabled && (self.everything || self.events.iter().any(|e| e == event))
    }

    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "enabled": self.enabled,
            "automaticRedelivery": self.auto_redelivery,
            "url": self.url,
            "authorizedEvents": {"everything": self.everything, "specificEvents": self.events},
        })
    }
}

fn hook_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Hook> {
    let events: String = r.get(5)?;
    Ok(Hook {
        id: r.get(0)?,
        url: r.get(1)?,
        enabled: r.get(2)?,
        auto_redelivery: r.get(3)?,
        everything: r.get(4)?,
        events: events
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

const HOOK_COLS: &str = "id, url, enabled, auto_redelivery, everything, events";

fn hooks(conn: &Connection, merchant: u32) -> rusqlite::Result<Vec<Hook>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {HOOK_COLS} FROM gf_webhook WHERE merchant = ?1 ORDER BY created_ms, id"
    ))?;
    let v = stmt
        .query_map([merchant], hook_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(v)
}

fn hook(conn: &Connection, merchant: u32, id: &str) -> rusqlite::Result<Option<Hook>> {
    conn.query_row(
        &format!("SELECT {HOOK_COLS} FROM gf_webhook WHERE merchant = ?1 AND id = ?2"),
        params![merchant, id],
        hook_row,
    )
    .optional()
}

/// A Greenfield webhook's secret: `hex(HMAC(master, "greenfield-webhook/<account>/<id>"))`.
pub fn hook_secret(st: &AppState, merchant: u32, id: &str) -> String {
    st.keys()
        .derive_purpose(&format!("greenfield-webhook/{merchant}/{id}"))
}

/// A Greenfield webhook's URL and signing secret, if it exists and is enabled.
pub fn hook_endpoint(
    st: &AppState,
    conn: &Connection,
    merchant: u32,
    id: &str,
) -> Option<(String, Vec<u8>)> {
    let h = hook(conn, merchant, id).ok()??;
    if !h.enabled {
        return None;
    }
    Some((h.url, hook_secret(st, merchant, id).into_bytes()))
}

/// The body of a BTCPay webhook event about an invoice (`invoice`: the merchant view,
/// [`super::routes::merchant_json`]).
fn event_body(
    delivery_id: &str,
    hook_id: &str,
    event: &str,
    invoice: &Value,
    payment: Option<&Value>,
    now_ms: u64,
) -> Value {
    let marks: Vec<&str> = invoice["marks"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut metadata = match &invoice["metadata"] {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    if let Some(o) = invoice["orderId"].as_str() {
        metadata.entry("orderId").or_insert_with(|| json!(o));
    }
    let mut b = json!({
        "deliveryId": delivery_id,
        "webhookId": hook_id,
        "originalDeliveryId": delivery_id,
        "isRedelivery": false,
        "type": event,
        "timestamp": now_ms / 1000,
        "storeId": invoice["merchant"].as_u64().map(|m| m.to_string()),
        "invoiceId": invoice["id"],
        "metadata": metadata,
    });
    let speed = invoice["confirmationsRequired"].as_u64().unwrap_or(1);
    let address = invoice["address"].as_str().unwrap_or("");
    match event {
        "InvoiceReceivedPayment" | "InvoicePaymentSettled" => {
            if let Some(p) = payment {
                b["afterExpiration"] = json!(p["late"] == true);
                let ln = p["source"] == "lightning";
                b["paymentMethodId"] = json!(if ln { BTC_LN } else { BTC_CHAIN });
                b["paymentMethod"] = json!(if ln { BTC_LN_LEGACY } else { "BTC" });
                b["payment"] = payment_json(p, address, speed);
            }
        }
        "InvoiceProcessing" => b["overPaid"] = json!(marks.contains(&"PaidOver")),
        "InvoiceSettled" => {
            b["overPaid"] = json!(marks.contains(&"PaidOver"));
            b["manuallyMarked"] = json!(marks.contains(&"Marked"));
        }
        "InvoiceExpired" => b["partiallyPaid"] = json!(marks.contains(&"PaidPartial")),
        // Not marked by the merchant: its payments were reversed (double-spent).
        "InvoiceInvalid" => b["manuallyMarked"] = json!(!marks.contains(&"Reversed")),
        _ => {}
    }
    b
}

/// Adds the deliveries of `event` to the store's Greenfield webhooks that want it, in the
/// caller's transaction ([`super::webhook::enqueue`] calls it). `InvoiceReceivedPayment` is
/// about the newest payment; `InvoicePaymentSettled` goes once per payment that counts.
pub fn enqueue_hooks(
    conn: &Connection,
    merchant: u32,
    invoice_id: &str,
    event: EventType,
    invoice: &Value,
    payment_from_end: usize,
    now_ms: u64,
) -> rusqlite::Result<()> {
    let names = btcpay_events(event);
    if names.is_empty() {
        return Ok(());
    }
    let hooks = hooks(conn, merchant)?;
    if hooks.is_empty() {
        return Ok(());
    }
    let payments: Vec<Value> = invoice["payments"]
        .as_array()
        .map(|a| a.iter().filter(|p| p["reorged"] != true).cloned().collect())
        .unwrap_or_default();
    for h in &hooks {
        for name in names {
            if !h.wants(name) {
                continue;
            }
            let per_payment: Vec<Option<&Value>> = match *name {
                "InvoiceReceivedPayment" => {
                    vec![payments
                        .len()
                        .checked_sub(payment_from_end)
                        .and_then(|i| payments.get(i))]
                }
                "InvoicePaymentSettled" => payments
                    .iter()
                    .filter(|p| p["late"] != true)
                    .take(crate::model::MAX_PAYMENT_EVENTS)
                    .map(Some)
                    .collect(),
                _ => vec![None],
            };
            for p in per_payment {
                let id = webhook::new_delivery_id()?;
                let body = event_body(&id, &h.id, name, invoice, p, now_ms);
                let bytes = serde_json::to_vec(&body)
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                let d = webhook::HookDelivery {
                    merchant,
                    invoice_id,
                    hook: &h.id,
                    id: &id,
                    event: name,
                    body: &bytes,
                };
                webhook::enqueue_hook(conn, d, now_ms)?;
            }
        }
    }
    Ok(())
}

/// A webhook's fields from a create (`secret`: `None`) or update body. Its `secret` is derived,
/// never chosen: a body may only repeat the one the webhook has (WooCommerce's plugin sends the
/// secret it keeps with an update), compared in constant time.
fn hook_body(b: &Map<String, Value>, h: &mut Hook, secret: Option<&str>) -> Result<(), GfError> {
    let creating = secret.is_none();
    let sent = b
        .get("secret")
        .filter(|s| !s.is_null() && *s != "")
        .map(|s| s.as_str().unwrap_or_default());
    let repeated =
        |s: &str| secret.is_some_and(|k| crate::dashboard::ct_eq(s.as_bytes(), k.as_bytes()));
    if sent.is_some_and(|s| !repeated(s)) {
        return Err(invalid(
            "secret",
            "Mediator derives webhook secrets (never stored): leave secret out and read it from the answer",
        ));
    }
    match b.get("url").filter(|v| !v.is_null()) {
        Some(v) => h.url = v.as_str().unwrap_or("").to_owned(),
        None if creating => return Err(invalid("url", "url is missing")),
        None => {}
    }
    if let Some(v) = b.get("enabled").filter(|v| !v.is_null()) {
        h.enabled = v
            .as_bool()
            .ok_or_else(|| invalid("enabled", "true or false"))?;
    }
    if let Some(v) = b.get("automaticRedelivery").filter(|v| !v.is_null()) {
        h.auto_redelivery = v
            .as_bool()
            .ok_or_else(|| invalid("automaticRedelivery", "true or false"))?;
    }
    if let Some(a) = b.get("authorizedEvents").filter(|v| !v.is_null()) {
        if let Some(v) = a.get("everything").filter(|v| !v.is_null()) {
            h.everything = v
                .as_bool()
                .ok_or_else(|| invalid("authorizedEvents.everything", "true or false"))?;
        }
        if let Some(v) = a.get("specificEvents").filter(|v| !v.is_null()) {
            let list = v
                .as_array()
                .ok_or_else(|| invalid("authorizedEvents.specificEvents", "a list of events"))?;
            let mut events = Vec::new();
            for e in list {
                let name = e.as_str().filter(|n| EVENTS.contains(n)).ok_or_else(|| {
                    invalid(
                        "authorizedEvents.specificEvents",
                        format!("events offered: {}", EVENTS.join(", ")),
                    )
                })?;
                if !events.iter().any(|x| x == name) {
                    events.push(name.to_owned());
                }
            }
            h.events = events;
        }
    }
    Ok(())
}

/// Checks a webhook URL as the store's own webhook URL is checked (resolved now, and again
/// before every delivery: [`super::target`]).
async fn check_url(st: &AppState, merchant: u32, url: &str) -> Result<(), GfError> {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.len() <= 512
        && !url.chars().any(|c| c.is_control() || c.is_whitespace());
    if !ok {
        return Err(invalid("url", "an http(s) URL of at most 512 characters"));
    }
    let (u, targets) = (url.to_owned(), st.merchant().cfg.webhook_targets.clone());
    let checked =
        super::target::check_bounded(u, targets, super::target::Purpose::Settings { merchant })
            .await;
    match checked {
        Ok(_) => Ok(()),
        Err(super::target::TargetError::Busy) => Err(gf_err(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "Too many webhook URL checks at once; try again shortly",
        )),
        Err(super::target::TargetError::BadUrl) => {
            Err(invalid("url", "an http(s) URL of at most 512 characters"))
        }
        Err(super::target::TargetError::Unresolved) => {
            Err(invalid("url", "the host does not resolve"))
        }
        Err(_) => Err(invalid(
            "url",
            "must not point to a loopback, private, link-local or other internal address",
        )),
    }
}

/// `GET /api/v1/stores/{storeId}/webhooks`.
pub async fn list_webhooks(
    State(st): State<AppState>,
    Path(store_path): Path<String>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let a = key.account;
    let v = with_db(&st, move |c| hooks(c, a).map_err(db_error)).await?;
    ok(Value::Array(v.iter().map(Hook::json).collect()))
}

/// `POST /api/v1/stores/{storeId}/webhooks`: the answer holds the secret (only here).
pub async fn create_webhook(
    State(st): State<AppState>,
    Path(store_path): Path<String>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let b = req.json()?;
    let mut h = Hook {
        id: r::random_id()?,
        url: String::new(),
        enabled: true,
        auto_redelivery: true,
        everything: true,
        events: vec![],
    };
    hook_body(&b, &mut h, None)?;
    check_url(&st, key.account, &h.url).await?;
    let a = key.account;
    let (id, url, events) = (h.id.clone(), h.url.clone(), h.events.join(","));
    let (en, ar, ev) = (h.enabled, h.auto_redelivery, h.everything);
    let made = with_db(&st, move |c| {
        let n: i64 = c
            .query_row("SELECT count(*) FROM gf_webhook WHERE merchant = ?1", [a], |r| r.get(0))
            .map_err(db_error)?;
        if n >= MAX_WEBHOOKS {
            return Ok(false);
        }
        c.execute(
            "INSERT INTO gf_webhook (id, merchant, url, enabled, auto_redelivery, everything, events, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![id, a, url, en, ar, ev, events, now_ms()],
        )
        .map_err(db_error)?;
        Ok(true)
    })
    .await?;
    if !made {
        return Err(invalid(
            "url",
            format!("at most {MAX_WEBHOOKS} webhooks per store"),
        ));
    }
    let mut v = h.json();
    v["secret"] = json!(hook_secret(&st, a, &h.id));
    ok(v)
}

async fn own_hook(st: &AppState, merchant: u32, id: String) -> Result<Hook, GfError> {
    if !r::valid_public_id(&id) {
        return Err(webhook_not_found());
    }
    with_db(st, move |c| hook(c, merchant, &id).map_err(db_error))
        .await?
        .ok_or_else(webhook_not_found)
}

/// `GET /api/v1/stores/{storeId}/webhooks/{webhookId}`.
pub async fn get_webhook(
    State(st): State<AppState>,
    Path((store_path, id)): Path<(String, String)>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    ok(own_hook(&st, key.account, id).await?.json())
}

/// `PUT /api/v1/stores/{storeId}/webhooks/{webhookId}`.
pub async fn update_webhook(
    State(st): State<AppState>,
    Path((store_path, id)): Path<(String, String)>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let b = req.json()?;
    let mut h = own_hook(&st, key.account, id).await?;
    let secret = hook_secret(&st, key.account, &h.id);
    hook_body(&b, &mut h, Some(&secret))?;
    check_url(&st, key.account, &h.url).await?;
    let a = key.account;
    let (id, url, events) = (h.id.clone(), h.url.clone(), h.events.join(","));
    let (en, ar, ev) = (h.enabled, h.auto_redelivery, h.everything);
    with_db(&st, move |c| {
        c.execute(
            "UPDATE gf_webhook SET url = ?3, enabled = ?4, auto_redelivery = ?5, everything = ?6,
             events = ?7 WHERE id = ?1 AND merchant = ?2",
            params![id, a, url, en, ar, ev, events],
        )
        .map_err(db_error)
    })
    .await?;
    ok(h.json())
}

/// `DELETE /api/v1/stores/{storeId}/webhooks/{webhookId}`: its pending deliveries fail.
pub async fn delete_webhook(
    State(st): State<AppState>,
    Path((store_path, id)): Path<(String, String)>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let h = own_hook(&st, key.account, id).await?;
    let a = key.account;
    with_db(&st, move |c| {
        let tx = c.transaction().map_err(db_error)?;
        tx.execute(
            "DELETE FROM gf_webhook WHERE id = ?1 AND merchant = ?2",
            params![h.id, a],
        )
        .map_err(db_error)?;
        tx.execute(
            "UPDATE webhook_deliveries SET status = 'failed' WHERE hook = ?1 AND status = 'pending'",
            [&h.id],
        )
        .map_err(db_error)?;
        tx.commit().map_err(db_error)
    })
    .await?;
    Ok(StatusCode::OK.into_response())
}

/// BTCPay's `WebhookDeliveryData` of an outbox row.
fn delivery_json(
    id: &str,
    created_ms: i64,
    status: &str,
    last: Option<(i64, Option<u16>, Option<String>)>,
) -> Value {
    let (time, code, error) = last.unwrap_or((created_ms, None, None));
    let gf_status = match (status, code) {
        ("delivered", _) => "HttpSuccess",
        (_, Some(_)) => "HttpError",
        _ => "Failed",
    };
    json!({
        "id": id,
        "timestamp": created_ms / 1000,
        "deliveryTime": time / 1000,
        "httpCode": code,
        "errorMessage": error,
        "status": gf_status,
        "pending": status == "pending",
    })
}

/// `GET /api/v1/stores/{storeId}/webhooks/{webhookId}/deliveries` (`count`, default 50), newest first.
pub async fn webhook_deliveries(
    State(st): State<AppState>,
    Path((store_path, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let mut count = 50u32;
    for (k, v) in query_pairs(q.as_deref()) {
        if k == "count" {
            count = v
                .parse::<u32>()
                .ok()
                .filter(|c| (1..=r::MAX_LIST).contains(c))
                .ok_or_else(|| invalid("count", "1 to 1000"))?;
        }
    }
    let h = own_hook(&st, key.account, id).await?;
    let a = key.account;
    let v = with_db(&st, move |c| {
        let mut stmt = c
            .prepare(
                "SELECT d.id, d.created_ms, d.status,
                   (SELECT time_ms FROM webhook_attempts t WHERE t.delivery_id = d.id ORDER BY n DESC LIMIT 1),
                   (SELECT http_status FROM webhook_attempts t WHERE t.delivery_id = d.id ORDER BY n DESC LIMIT 1),
                   (SELECT error FROM webhook_attempts t WHERE t.delivery_id = d.id ORDER BY n DESC LIMIT 1)
                 FROM webhook_deliveries d WHERE d.merchant = ?1 AND d.hook = ?2
                 ORDER BY d.created_ms DESC, d.rowid DESC LIMIT ?3",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map(params![a, h.id, count], |r| {
                let id: String = r.get(0)?;
                let created: i64 = r.get(1)?;
                let status: String = r.get(2)?;
                let t: Option<i64> = r.get(3)?;
                let last = t.map(|t| -> rusqlite::Result<_> { Ok((t, r.get(4)?, r.get(5)?)) });
                Ok(delivery_json(&id, created, &status, last.transpose()?))
            })
            .map_err(db_error)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_error)?;
        Ok(rows)
    })
    .await?;
    ok(Value::Array(v))
}

/// `POST /api/v1/stores/{storeId}/webhooks/{webhookId}/deliveries/{deliveryId}/redeliver`: a new
/// delivery of the same event (`isRedelivery`, `originalDeliveryId`); answers its id as a JSON
/// string. Limited like the signed API's redeliver (per merchant per minute).
pub async fn redeliver(
    State(st): State<AppState>,
    Path((store_path, id, delivery)): Path<(String, String, String)>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let h = own_hook(&st, key.account, id).await?;
    let merchant = key.account;
    let limiter = st
        .merchant()
        .redeliveries
        .get_or_init(|| api::ratelimit::Limiter::new(st.merchant().cfg.redeliveries_per_min));
    if let api::ratelimit::Charge::Limited { retry_after, .. } =
        limiter.charge(&merchant.to_string(), 1, now_ms())
    {
        let mut e = gf_err(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-requests",
            "Too many redeliveries; try again later",
        );
        e.retry_after = Some(retry_after);
        return Err(e);
    }
    let not_found = || {
        gf_err(
            StatusCode::NOT_FOUND,
            "delivery-not-found",
            "The delivery was not found",
        )
    };
    let new_id = with_db(&st, move |c| {
        let row: Option<(String, String, Vec<u8>)> = c
            .query_row(
                "SELECT invoice_id, event, body FROM webhook_deliveries
                 WHERE id = ?1 AND merchant = ?2 AND hook = ?3",
                params![delivery, merchant, h.id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(db_error)?;
        let Some((invoice_id, event, body)) = row else {
            return Ok(None);
        };
        let mut v: Value = serde_json::from_slice(&body).map_err(|_| ApiError::internal())?;
        let id = webhook::new_delivery_id().map_err(db_error)?;
        let original = v["originalDeliveryId"].clone();
        v["deliveryId"] = json!(id);
        v["isRedelivery"] = json!(true);
        v["originalDeliveryId"] = if original.is_null() {
            json!(delivery)
        } else {
            original
        };
        v["timestamp"] = json!(now_ms() / 1000);
        let bytes = serde_json::to_vec(&v).map_err(|_| ApiError::internal())?;
        let d = webhook::HookDelivery {
            merchant,
            invoice_id: &invoice_id,
            hook: &h.id,
            id: &id,
            event: &event,
            body: &bytes,
        };
        webhook::enqueue_hook(c, d, now_ms()).map_err(db_error)?;
        Ok(Some(id))
    })
    .await?
    .ok_or_else(not_found)?;
    st.merchant().enqueued.notify_one();
    ok(json!(new_id))
}

// ---- pull payments and refunds ----

/// A pull payment: an amount (satoshis) that whoever holds its id may claim to an address.
#[derive(Debug, Clone)]
pub struct PullPayment {
    /// Id (unguessable: the link is the right to claim).
    pub id: String,
    /// The merchant paying it.
    pub merchant: u32,
    /// The invoice it refunds, if any.
    pub invoice_id: Option<String>,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// The limit, satoshis.
    pub amount_sat: u64,
    /// Created, ms.
    pub created_ms: u64,
    /// Archived.
    pub archived: bool,
    /// Claims accepted from, ms (`None`: from its creation).
    pub starts_ms: Option<u64>,
    /// Claims accepted until, ms (`None`: for good).
    pub expires_ms: Option<u64>,
    /// Its claims may name an exchange account (`account:<n>`, paid by an engine transfer, not
    /// through custody's limits and approvals): only when the key that made it held the
    /// `transfer` permission, as a transfer itself needs. A refund's pull payment pays an
    /// account only if that account paid the invoice from its balance (as a signed refund).
    pub accounts_ok: bool,
    /// Its claims are paid when made (`autoApproveClaims`); otherwise each waits, reserved, in
    /// `awaiting` until the store approves it (then paid) or cancels it (then given back).
    pub auto_approve: bool,
}

const PP_COLS: &str = "id, merchant, invoice_id, name, description, amount_sat, created_ms, \
     archived, starts_ms, expires_ms, accounts_ok, auto_approve";

fn pp_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PullPayment> {
    Ok(PullPayment {
        id: r.get(0)?,
        merchant: r.get(1)?,
        invoice_id: r.get(2)?,
        name: r.get(3)?,
        description: r.get(4)?,
        amount_sat: r.get(5)?,
        created_ms: r.get(6)?,
        archived: r.get(7)?,
        starts_ms: r.get(8)?,
        expires_ms: r.get(9)?,
        accounts_ok: r.get(10)?,
        auto_approve: r.get(11)?,
    })
}

fn load_pp(conn: &Connection, id: &str) -> rusqlite::Result<Option<PullPayment>> {
    conn.query_row(
        &format!("SELECT {PP_COLS} FROM gf_pull_payment WHERE id = ?1"),
        [id],
        pp_row,
    )
    .optional()
}

fn insert_pp(conn: &Connection, p: &PullPayment) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO gf_pull_payment (id, merchant, invoice_id, name, description, amount_sat,
           currency, amount_display, created_ms, archived, starts_ms, expires_ms, accounts_ok,
           auto_approve)
           VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'BTC', ?7, ?8, 0, ?9, ?10, ?11, ?12)",
        params![
            p.id,
            p.merchant,
            p.invoice_id,
            p.name,
            p.description,
            p.amount_sat,
            r::btc(p.amount_sat),
            p.created_ms,
            p.starts_ms,
            p.expires_ms,
            p.accounts_ok,
            p.auto_approve
        ],
    )?;
    Ok(())
}

fn pp_json(st: &AppState, p: &PullPayment) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "description": p.description,
        "currency": "BTC",
        "amount": r::btc(p.amount_sat),
        "period": null,
        "BOLT11Expiration": "30",
        "autoApproveClaims": p.auto_approve,
        "archived": p.archived,
        "viewLink": format!("{}/pp/{}", public_url(st), p.id),
        "startsAt": p.starts_ms.unwrap_or(p.created_ms) / 1000,
        "expiresAt": p.expires_ms.map(|t| t / 1000),
    })
}

fn text_field(b: &Map<String, Value>, name: &str, max: usize) -> Result<Option<String>, GfError> {
    match b.get(name).filter(|v| !v.is_null()) {
        None => Ok(None),
        Some(v) => {
            let s = v.as_str().ok_or_else(|| invalid(name, "a string"))?;
            if s.len() > max || s.chars().any(char::is_control) {
                return Err(invalid(name, format!("at most {max} printable characters")));
            }
            Ok(Some(s.to_owned()))
        }
    }
}

fn payout_method_ok(b: &Map<String, Value>, names: &[&str]) -> Result<(), GfError> {
    for n in names {
        if let Some(v) = b.get(*n).filter(|v| !v.is_null()) {
            // Claims are paid on chain: a list naming it is taken (Lightning beside it, as
            // WooCommerce's plugin sends for a store with Lightning, is not offered for claims
            // and is left out of the answer's `payoutMethods`).
            let ok = match v {
                Value::String(s) => method_of(s) == Some(Method::Chain),
                Value::Array(a) => {
                    let methods: Vec<Option<Method>> =
                        a.iter().map(|m| m.as_str().and_then(method_of)).collect();
                    // Empty: no restriction, as before.
                    methods.is_empty()
                        || (methods.iter().all(Option::is_some)
                            && methods.contains(&Some(Method::Chain)))
                }
                _ => false,
            };
            if !ok {
                return Err(invalid(n, "only BTC-CHAIN is offered"));
            }
        }
    }
    Ok(())
}

/// `basis points` off an amount: `amount × (10000 − bps) / 10000`, rounded down.
fn less_percent(amount_sat: u64, bps: u64) -> u64 {
    let keep = u128::from(model::BPS.saturating_sub(bps));
    u64::try_from(u128::from(amount_sat) * keep / u128::from(model::BPS)).unwrap_or(0)
}

/// `POST /api/v1/stores/{storeId}/invoices/{invoiceId}/refund`: a pull payment refunding the
/// invoice. `refundVariant`: `RateThen` (the BTC the invoice asked, at its rate), `CurrentRate`
/// (the invoice's currency amount at today's reference price), `Fiat` (the same, converted now),
/// `OverpaidAmount` (what was paid over the invoice's amount), `Custom` (`customAmount` in
/// `customCurrency`); `subtractPercentage` takes a part off. Never more than what is refundable
/// (credited − refunded): `422`.
pub async fn refund(
    State(st): State<AppState>,
    Path((store_path, id)): Path<(String, String)>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let b = req.json()?;
    payout_method_ok(&b, &["payoutMethodId", "paymentMethod"])?;
    let name = text_field(&b, "name", MAX_NAME)?;
    let description = text_field(&b, "description", 1024)?;
    let variant = b
        .get("refundVariant")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                "refundVariant",
                "RateThen, CurrentRate, Fiat, OverpaidAmount or Custom",
            )
        })?
        .to_owned();
    let subtract = match b.get("subtractPercentage").filter(|v| !v.is_null()) {
        None => 0,
        Some(v) => {
            let s = decimal_of(v).ok_or_else(|| invalid("subtractPercentage", "0 to 100"))?;
            api::decimal::parse_units(&s, 2)
                .ok()
                .filter(|b| *b <= 10_000)
                .ok_or_else(|| invalid("subtractPercentage", "0 to 100, two decimals at most"))?
        }
    };
    let (rec, _, _) = own_invoice(&st, key.account, id).await?;
    let i = &rec.inv;
    let refundable = i
        .refundable_sat()
        .map_err(|model::TransitionError::WrongStatus(s)| {
            gf_err(
                StatusCode::BAD_REQUEST,
                "non-refundable",
                format!("A {} invoice cannot be refunded yet", s.as_str()),
            )
        })?;
    let at_current_rate = || async {
        match &i.quote {
            Some(q) => {
                let (rate, _) = r::current_rate(&st, &q.asset).await?;
                model::quote_to_sat(q.amount_units, rate)
                    .ok_or_else(|| ApiError::invalid_value("amount"))
            }
            None => Ok(i.amount_sat),
        }
    };
    let amount = match variant.as_str() {
        "RateThen" => i.amount_sat.min(i.received_sat()),
        "CurrentRate" | "Fiat" => at_current_rate().await?,
        "OverpaidAmount" => {
            if !i.marks.has(Marks::PAID_OVER) {
                return Err(invalid("refundVariant", "Invoice is not overpaid"));
            }
            i.derive(now_ms()).paid_sat.saturating_sub(i.amount_sat)
        }
        "Custom" => {
            let amount = b
                .get("customAmount")
                .and_then(decimal_of)
                .ok_or_else(|| invalid("customAmount", "customAmount is missing"))?;
            let currency = b
                .get("customCurrency")
                .and_then(Value::as_str)
                .unwrap_or("BTC")
                .to_ascii_uppercase();
            let (sat, _) =
                r::amount_in(&st, &currency, &amount)
                    .await
                    .map_err(|e| match e.code {
                        -1152 => invalid("customCurrency", "BTC or the exchange's quote currency"),
                        -1157 => GfError::from(e),
                        _ => invalid("customAmount", e.msg.to_string()),
                    })?;
            sat
        }
        _ => {
            return Err(invalid(
                "refundVariant",
                "RateThen, CurrentRate, Fiat, OverpaidAmount or Custom",
            ))
        }
    };
    let amount = less_percent(amount, subtract);
    if amount == 0 {
        return Err(invalid("refundVariant", "the refund amount is zero"));
    }
    if amount > refundable {
        return Err(invalid(
            "refundVariant",
            format!(
                "the refund ({} BTC) is more than the refundable {} BTC",
                r::btc(amount),
                r::btc(refundable)
            ),
        ));
    }
    // Its claims would move a flagged store's funds out: none is handed out until reviewed.
    api::capital::refuse_flagged(&st, key.account).await?;
    let p = PullPayment {
        id: r::random_id()?,
        merchant: key.account,
        invoice_id: Some(rec.inv.id.clone()),
        name: name.unwrap_or_else(|| format!("Refund {}", rec.inv.id)),
        description: description.unwrap_or_default(),
        amount_sat: amount,
        created_ms: now_ms(),
        archived: false,
        starts_ms: None,
        expires_ms: None,
        accounts_ok: false,
        // As BTCPay: its claims are paid when made only if the key may create pull payments
        // that pay out (`cancreatepullpayments`, here with `withdraw`); a shop plugin's
        // `cancreatenonapprovedpullpayments` key makes one whose claims wait for the store.
        auto_approve: key.perms.has(Greenfield::CreatePullPayments.perms()),
    };
    insert_pp_while_list_off(&st, p.clone(), "a refund (its claim names any address)").await?;
    ok(pp_json(&st, &p))
}

/// Inserts a pull payment unless the store's withdrawal address list is on (checked in the
/// same database lock): a pull payment's claim names any address, which the list forbids
/// (`403` `address_list_on`, nothing created).
async fn insert_pp_while_list_off(
    st: &AppState,
    p: PullPayment,
    what: &'static str,
) -> Result<(), GfError> {
    let now = now_ms();
    with_db(st, move |c| {
        if let Err(e) = crate::allowlist::check_list_off(c, p.merchant, what, now) {
            return Ok(Err(e));
        }
        insert_pp(c, &p).map_err(db_error)?;
        Ok(Ok(()))
    })
    .await?
    .map_err(list_refused)
}

/// `POST /api/v1/stores/{storeId}/pull-payments`: `name`, `description`, `amount`, `currency`
/// (`BTC`, `SATS`, or the exchange's quote currency, converted to BTC now at the reference
/// price), `payoutMethods` (`BTC-CHAIN`), `startsAt`, `expiresAt`, `autoApproveClaims` (default
/// `false`, as BTCPay: each claim waits for the store's approval; `true` needs
/// `cancreatepullpayments` with `withdraw`, else `403 missing-permission`).
pub async fn create_pull_payment(
    State(st): State<AppState>,
    Path(store_path): Path<String>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let b = req.json()?;
    payout_method_ok(&b, &["payoutMethods", "paymentMethods"])?;
    let name = text_field(&b, "name", MAX_NAME)?;
    let description = text_field(&b, "description", 1024)?;
    let (starts_ms, expires_ms) = claim_window(&b)?;
    let auto_approve = auto_approve_of(&b)?;
    if auto_approve && !key.perms.has(Greenfield::CreatePullPayments.perms()) {
        return Err(missing_permission(Greenfield::CreatePullPayments));
    }
    let currency = b
        .get("currency")
        .filter(|v| !v.is_null())
        .map(|v| {
            v.as_str()
                .ok_or_else(|| invalid("currency", "a currency code"))
        })
        .transpose()?
        .unwrap_or("BTC")
        .trim()
        .to_ascii_uppercase();
    let amount = b
        .get("amount")
        .and_then(decimal_of)
        .ok_or_else(|| invalid("amount", "amount is missing"))?;
    let amount = pull_payment_sat(&st, &currency, &amount).await?;
    // Its claims would move a flagged store's funds out: none is handed out until reviewed.
    api::capital::refuse_flagged(&st, key.account).await?;
    let p = PullPayment {
        id: r::random_id()?,
        merchant: key.account,
        invoice_id: None,
        name: name.unwrap_or_default(),
        description: description.unwrap_or_default(),
        amount_sat: amount,
        created_ms: now_ms(),
        archived: false,
        starts_ms,
        expires_ms,
        accounts_ok: key.perms.has(api::keys::Perms::TRANSFER),
        auto_approve,
    };
    insert_pp_while_list_off(
        &st,
        p.clone(),
        "a pull payment (its claim names any address)",
    )
    .await?;
    ok(pp_json(&st, &p))
}

/// A new pull payment's limit in satoshis: `amount` in `currency` (`BTC`, `SATS`, or the quote
/// currency at today's reference price: the pull payment is in BTC from then on, so a claim
/// later is paid the BTC fixed now, whatever the price does meanwhile).
async fn pull_payment_sat(st: &AppState, currency: &str, amount: &str) -> Result<u64, GfError> {
    let range = || {
        invalid(
            "amount",
            "more than zero, at most 21000000 BTC, 8 decimals at most",
        )
    };
    match currency {
        "BTC" => api::decimal::parse_units(amount, api::capital::BTC_DECIMALS)
            .ok()
            .filter(|a| (1..=model::MAX_AMOUNT_SAT).contains(a))
            .ok_or_else(range),
        "SATS" => api::decimal::parse_units(amount, 0)
            .ok()
            .filter(|a| (1..=model::MAX_AMOUNT_SAT).contains(a))
            .ok_or_else(|| invalid("amount", "a whole number of satoshis, more than zero")),
        _ => r::amount_in(st, currency, amount)
            .await
            .map(|(sat, _)| sat)
            .map_err(|e| match e.code {
                -1152 => invalid("currency", "BTC, SATS or the exchange's quote currency"),
                // No reference price now: BTCPay's "rate-unavailable".
                -1157 => GfError::from(e),
                _ => invalid("amount", e.msg.to_string()),
            }),
    }
}

/// A new pull payment's claim window from `startsAt` and `expiresAt` (unix seconds, or null:
/// from now, for good).
fn claim_window(b: &Map<String, Value>) -> Result<(Option<u64>, Option<u64>), GfError> {
    // At most year 9999: every instant in ms fits the database's signed integers.
    const MAX_SECS: u64 = 253_402_300_799;
    let secs = |name: &str| -> Result<Option<u64>, GfError> {
        match b.get(name).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|s| *s <= MAX_SECS)
                .map(|s| Some(s * 1000))
                .ok_or_else(|| invalid(name, "unix time in seconds")),
        }
    };
    let (starts, expires) = (secs("startsAt")?, secs("expiresAt")?);
    if let (Some(e), s) = (expires, starts.unwrap_or_else(now_ms)) {
        if e <= s {
            return Err(invalid("expiresAt", "expiresAt must be after startsAt"));
        }
    }
    Ok((starts, expires))
}

/// `autoApproveClaims`: absent or null is `false`, as BTCPay's default (claims wait for the
/// store's approval).
fn auto_approve_of(b: &Map<String, Value>) -> Result<bool, GfError> {
    match b.get("autoApproveClaims") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(a)) => Ok(*a),
        Some(_) => Err(invalid("autoApproveClaims", "a boolean")),
    }
}

/// `GET /api/v1/stores/{storeId}/pull-payments` (`includeArchived`), newest first.
pub async fn list_pull_payments(
    State(st): State<AppState>,
    Path(store_path): Path<String>,
    RawQuery(q): RawQuery,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let archived = query_pairs(q.as_deref())
        .iter()
        .any(|(k, v)| k == "includeArchived" && v == "true");
    let a = key.account;
    let v = with_db(&st, move |c| {
        let mut stmt = c
            .prepare(&format!(
                "SELECT {PP_COLS} FROM gf_pull_payment WHERE merchant = ?1 AND (?2 OR archived = 0)
                 ORDER BY created_ms DESC LIMIT 1000"
            ))
            .map_err(db_error)?;
        let rows = stmt
            .query_map(params![a, archived], pp_row)
            .map_err(db_error)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_error)?;
        Ok(rows)
    })
    .await?;
    ok(Value::Array(v.iter().map(|p| pp_json(&st, p)).collect()))
}

async fn public_pp(st: &AppState, ip: &str, id: String) -> Result<PullPayment, GfError> {
    st.charge_ip_addr(ip, 1)?;
    if !r::valid_public_id(&id) {
        return Err(pp_not_found());
    }
    with_db(st, move |c| load_pp(c, &id).map_err(db_error))
        .await?
        .ok_or_else(pp_not_found)
}

/// `GET /api/v1/pull-payments/{pullPaymentId}` (public: the id is the right).
pub async fn get_pull_payment(
    ClientIp(ip): ClientIp,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> GfResult {
    let p = public_pp(&st, &ip, id).await?;
    let pid = p.id.clone();
    let claimed = with_db(&st, move |c| claimed_sat(c, &pid).map_err(db_error)).await?;
    let mut v = pp_json(&st, &p);
    v["claimedAmount"] = json!(r::btc(claimed));
    v["remainingAmount"] = json!(r::btc(p.amount_sat.saturating_sub(claimed)));
    ok(v)
}

/// A payout (a claim on a pull payment).
#[derive(Debug, Clone)]
struct Payout {
    pp_id: String,
    n: u32,
    id: String,
    destination: String,
    amount_sat: u64,
    /// `pending` (reserved, being paid), `unknown` (no answer yet), `done`, `cancelled`.
    state: String,
    reference: Option<String>,
    claim_key: Option<String>,
    created_ms: u64,
    /// The run ([`RUN`]) that reserved or approved it last (`None`: an older build).
    run: Option<String>,
}

impl Payout {
    /// Left `pending` by a crash of another run (no task of this process is paying it).
    fn left_pending(&self) -> bool {
        self.state == "pending" && self.run.as_deref() != Some(run_id())
    }
}

const PAYOUT_COLS: &str = "pp_id, n, id, destination, amount_sat, state, reference, claim_key, \
     created_ms, run";
/// How many columns [`PAYOUT_COLS`] names (a query selecting more reads them from here on).
const PAYOUT_NCOLS: usize = 10;

fn payout_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Payout> {
    Ok(Payout {
        pp_id: r.get(0)?,
        n: r.get(1)?,
        id: r.get(2)?,
        destination: r.get(3)?,
        amount_sat: r.get(4)?,
        state: r.get(5)?,
        reference: r.get(6)?,
        claim_key: r.get(7)?,
        created_ms: r.get(8)?,
        run: r.get(9)?,
    })
}

fn payouts(conn: &Connection, pp_id: &str) -> rusqlite::Result<Vec<Payout>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {PAYOUT_COLS} FROM gf_payout WHERE pp_id = ?1 ORDER BY n"
    ))?;
    let v = stmt
        .query_map([pp_id], payout_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(v)
}

/// Satoshis claimed (every payout not cancelled: paid, being paid, or of unknown outcome).
fn claimed_sat(conn: &Connection, pp_id: &str) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT COALESCE(SUM(amount_sat), 0) FROM gf_payout WHERE pp_id = ?1 AND state != 'cancelled'",
        [pp_id],
        |r| r.get(0),
    )
}

fn set_payout(
    conn: &Connection,
    p: &Payout,
    state: &str,
    reference: Option<&str>,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE gf_payout SET state = ?3, reference = COALESCE(?4, reference) WHERE pp_id = ?1 AND n = ?2",
        params![p.pp_id, p.n, state, reference],
    )?;
    Ok(())
}

fn payout_json(p: &Payout, withdrawal: Option<&api::custody::WithdrawalInfo>) -> Value {
    use api::custody::WithdrawalState as W;
    // Only a withdrawal to the payout's destination is its own: one under its key to another
    // address (a conflict, see `outcome::custody_record`) shows neither its state nor its proof.
    let withdrawal =
        withdrawal.filter(|w| crate::allowlist::same_address(&w.address, &p.destination));
    let state = match (p.state.as_str(), withdrawal.map(|w| w.state)) {
        ("cancelled", _) => "Cancelled",
        (AWAITING, _) => "AwaitingApproval",
        // An engine transfer to an exchange account is final when done.
        ("done", _) if p.destination.starts_with(ACCOUNT_PREFIX) => "Completed",
        ("done", Some(W::Released)) => "Cancelled",
        ("done", Some(W::AwaitingApproval)) => "AwaitingApproval",
        ("done", Some(W::Completed)) => "Completed",
        ("done", Some(W::Processing)) => "InProgress",
        _ => "AwaitingPayment",
    };
    json!({
        "id": p.id,
        "revision": 0,
        "pullPaymentId": p.pp_id,
        "date": p.created_ms / 1000,
        "destination": p.destination,
        "originalCurrency": "BTC",
        "originalAmount": r::btc(p.amount_sat),
        "payoutCurrency": "BTC",
        "payoutAmount": r::btc(p.amount_sat),
        "payoutMethodId": BTC_CHAIN,
        "paymentMethod": "BTC",
        "cryptoCode": "BTC",
        "amount": r::btc(p.amount_sat),
        "paymentMethodAmount": r::btc(p.amount_sat),
        "state": state,
        "paymentProof": withdrawal.and_then(|w| w.txid.as_ref()).map(|t| json!({"proofType": "PayoutTransactionOnChainBlob", "transactionId": t})),
        "metadata": {"reference": p.reference},
    })
}

/// Custody's withdrawals of `merchant` under `keys` (its payouts' keys, for their states), each
/// looked up by its key: one pull payment's payouts, at most two look-ups each (a store
/// payout's key and the one an older build used), never a list of custody's withdrawals (these
/// endpoints are public). A key custody cannot answer is left out (the payout shows without its
/// proof).
async fn withdrawals_by_key(
    st: &AppState,
    merchant: u32,
    keys: Vec<String>,
) -> std::collections::HashMap<String, api::custody::WithdrawalInfo> {
    debug_assert!(keys.len() <= 2 * usize::try_from(MAX_PAYOUTS).unwrap_or(usize::MAX / 2));
    let Some(c) = st.custody() else {
        return Default::default();
    };
    tokio::task::spawn_blocking(move || {
        keys.into_iter()
            .filter_map(|k| {
                let w = c.withdrawal_by_key(merchant, &k).ok().flatten()?;
                Some((k, w))
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// The custody keys a payout's withdrawal may have, the one it is paid under first: its invoice
/// refund's (`refund-<invoice>-<n>`), or its own and the one an older build used.
fn payout_key(conn: &Connection, pp: &PullPayment, p: &Payout) -> rusqlite::Result<Vec<String>> {
    match &pp.invoice_id {
        Some(iid) => Ok(store::refund_by_key(conn, iid, &refund_key(p))?
            .map(|r| super::outcome::refund_withdrawal_key(&r))
            .into_iter()
            .collect()),
        None => Ok(vec![store_payout_key(p), legacy_store_payout_key(p)]),
    }
}

/// The withdrawal of the first of `keys` custody has.
fn first_of<'a>(
    keys: &[String],
    ws: &'a std::collections::HashMap<String, api::custody::WithdrawalInfo>,
) -> Option<&'a api::custody::WithdrawalInfo> {
    keys.iter().find_map(|k| ws.get(k))
}

fn refund_key(p: &Payout) -> String {
    format!("pp/{}/{}", p.pp_id, p.n)
}

/// A store payout's custody key: `pp-<32 hex of SHA-256 of the pull payment's id>-<n>`. Never
/// the id itself: a store's `read` key sees its withdrawals' keys (`withdrawOrderId`), and the
/// id is the right to claim what remains.
fn store_payout_key(p: &Payout) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("mediator/store-payout/v1/{}", p.pp_id).as_bytes());
    format!("pp-{}-{}", &hex::encode(h)[..32], p.n)
}

/// The key an older build paid a store payout under (`pp-<pull payment id>-<n>`): looked up, to
/// resolve a payout it left unknown, never used for a new request.
fn legacy_store_payout_key(p: &Payout) -> String {
    format!("pp-{}-{}", p.pp_id, p.n)
}

/// `GET /api/v1/pull-payments/{pullPaymentId}/payouts` (public). Payouts whose outcome was
/// unknown are resolved first (by their keys).
pub async fn list_payouts(
    ClientIp(ip): ClientIp,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> GfResult {
    let pp = public_pp(&st, &ip, id).await?;
    resolve_payouts(&st, &pp).await?;
    let pp2 = pp.clone();
    let rows = with_db(&st, move |c| {
        let ps = payouts(c, &pp2.id).map_err(db_error)?;
        let mut out = Vec::new();
        for p in ps {
            let k = payout_key(c, &pp2, &p).map_err(db_error)?;
            out.push((p, k));
        }
        Ok(out)
    })
    .await?;
    let keys = rows.iter().flat_map(|(_, k)| k.iter().cloned()).collect();
    let ws = withdrawals_by_key(&st, pp.merchant, keys).await;
    ok(Value::Array(
        rows.iter()
            .map(|(p, k)| payout_json(p, first_of(k, &ws)))
            .collect(),
    ))
}

/// Resolves the payouts of every pull payment that has one whose outcome is not known (run by
/// each monitor tick, after the invoice refunds were resolved); at most 100 pull payments a
/// tick. Answers how many pull payments it looked at.
pub async fn resolve_all(st: &AppState) -> Result<usize, ApiError> {
    let pps = with_db(st, move |c| {
        let mut stmt = c
            .prepare(&format!(
                "SELECT {PP_COLS} FROM gf_pull_payment WHERE id IN (
                   SELECT DISTINCT pp_id FROM gf_payout
                   WHERE state = 'unknown'
                      OR (state = 'pending' AND (run IS NULL OR run != ?1)) LIMIT 100)"
            ))
            .map_err(db_error)?;
        let rows = stmt
            .query_map([run_id()], pp_row)
            .map_err(db_error)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_error)?;
        Ok(rows)
    })
    .await?;
    for pp in &pps {
        if let Err(e) = resolve_payouts(st, pp).await {
            // Never the id itself: it is the right to claim (ADR 0016). Named by the handle
            // the owner's refunds page shows.
            tracing::warn!(
                pull_payment = %super::dashboard::pp_handle(&pp.id),
                status = %e.status,
                "payouts not resolved yet"
            );
        }
    }
    Ok(pps.len())
}

/// Follows payouts paid out through custody (`done`, to an address) until custody pays them or
/// gives them back (run by every monitor tick after
/// [`super::outcome::follow_refunds`]): paid → nothing more to follow; given back (the
/// withdrawal released) → `cancelled`, so that its amount can be claimed again. Before, it
/// stayed `done` and counted against the pull payment's limit for good while nobody was paid.
/// A store payout asks custody about its key; an invoice refund's payout follows its refund.
/// At most [`super::outcome::FOLLOW_PER_TICK`] a call, those looked at longest ago first.
/// Returns how many were given back.
pub async fn follow_payouts(st: &AppState) -> Result<usize, ApiError> {
    use super::outcome::{custody_record_of, followed, Followed};
    let _turn = st.merchant().payout_lock.lock().await;
    let open = with_db(st, move |c| {
        let cols = PAYOUT_COLS
            .split(", ")
            .map(|c| format!("p.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut stmt = c
            .prepare_cached(&format!(
                "SELECT {cols}, pp.merchant, pp.invoice_id FROM gf_payout p
                 JOIN gf_pull_payment pp ON pp.id = p.pp_id
                 WHERE p.state = 'done' AND p.final = 0 AND p.destination NOT LIKE 'account:%'
                 ORDER BY p.checked_ms, p.created_ms, p.n LIMIT ?1"
            ))
            .map_err(db_error)?;
        let rows = stmt
            .query_map([super::outcome::FOLLOW_PER_TICK], |r| {
                Ok((
                    payout_row(r)?,
                    r.get::<_, u32>(PAYOUT_NCOLS)?,
                    r.get::<_, Option<String>>(PAYOUT_NCOLS + 1)?,
                ))
            })
            .map_err(db_error)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_error)?;
        Ok(rows)
    })
    .await?;
    let mut given_back = 0;
    for (p, merchant, invoice_id) in open {
        let end = match invoice_id {
            Some(iid) => {
                let key = refund_key(&p);
                let state = with_db(st, move |c| {
                    store::refund_state_by_key(c, &iid, &key).map_err(db_error)
                })
                .await?;
                match state {
                    Some((s, _)) if s == "cancelled" => Some(Followed::GivenBack),
                    Some((s, true)) if s == "done" => Some(Followed::Paid),
                    _ => None,
                }
            }
            None => {
                // Custody's record under the key, or the one an older build used.
                let mut found = Ok(None);
                for key in [store_payout_key(&p), legacy_store_payout_key(&p)] {
                    found = custody_record_of(
                        st.custody(),
                        merchant,
                        key,
                        p.destination.clone(),
                        p.amount_sat,
                    )
                    .await;
                    if !matches!(found, Ok(None)) {
                        break;
                    }
                }
                match found {
                    Ok(Some(w)) => followed(w.state),
                    // No withdrawal under its keys: only one an older build took for done
                    // while its hold was unresolved, and custody removed (never paid). Not
                    // given back blindly: left claimed for the operator, no longer followed.
                    Ok(None) => {
                        tracing::error!(payout = %p.id, "a done payout has no custody withdrawal; left claimed");
                        Some(Followed::Paid)
                    }
                    Err(()) => None,
                }
            }
        };
        let Some(end) = end else {
            // Not at its end yet: the others come first next time (oldest look first).
            let (pp_id, n, now) = (p.pp_id.clone(), p.n, now_ms());
            with_db(st, move |c| {
                c.execute(
                    "UPDATE gf_payout SET checked_ms = ?3 WHERE pp_id = ?1 AND n = ?2",
                    params![pp_id, n, now as i64],
                )
                .map_err(db_error)
            })
            .await?;
            continue;
        };
        let state = if end == Followed::GivenBack {
            tracing::warn!(payout = %p.id, "payout released by custody: given back");
            given_back += 1;
            "cancelled"
        } else {
            "done"
        };
        with_db(st, move |c| {
            c.execute(
                "UPDATE gf_payout SET state = ?3, final = 1
                 WHERE pp_id = ?1 AND n = ?2 AND state = 'done'",
                params![p.pp_id, p.n, state],
            )
            .map_err(db_error)
        })
        .await?;
    }
    Ok(given_back)
}

/// Brings payouts whose outcome is not known (`unknown`, or `pending` from before this process
/// opened the database: a crash) up to date: an invoice refund's from its refund row (which the
/// monitor resolves), a store payout's by asking custody about its key (or repeating its
/// transfer).
///
/// One resolution at a time (`payout_lock`, held from reading the payouts to writing their
/// answers): two at once could each repeat a payout, one refused (the store's balance short
/// then) and one paid, and the refusal written last made a paid payout `cancelled` and its
/// amount claimable again. In turn, the second reads what the first wrote.
async fn resolve_payouts(st: &AppState, pp: &PullPayment) -> Result<(), GfError> {
    let _turn = st.merchant().payout_lock.lock().await;
    let pp2 = pp.clone();
    let open = with_db(st, move |c| {
        let ps = payouts(c, &pp2.id).map_err(db_error)?;
        let mut out = Vec::new();
        // `pending` of another run: left by a crash between the reservation (or the approval)
        // and the payment; one of this run is being paid.
        let open = |p: &Payout| p.state == "unknown" || p.left_pending();
        for p in ps.into_iter().filter(open) {
            let refund = match &pp2.invoice_id {
                Some(iid) => store::refund_by_key(c, iid, &refund_key(&p)).map_err(db_error)?,
                None => None,
            };
            out.push((p, refund));
        }
        Ok(out)
    })
    .await?;
    for (p, refund) in open {
        let settled: Option<(&str, Option<String>)> = match (&pp.invoice_id, refund) {
            (Some(_), Some(r)) if r.state == "done" => Some(("done", r.reference.clone())),
            (Some(_), Some(r)) if r.state == "cancelled" => Some(("cancelled", None)),
            // Reserved on the invoice but not answered: the monitor resolves the refund.
            (Some(_), Some(_)) => None,
            // No refund row: the claim never reached the invoice (nothing moved).
            (Some(_), None) => Some(("cancelled", None)),
            (None, _) => match match to_account(&p) {
                // The same transfer again: the engine answers a repeated key as done, once.
                Some(to) => store_transfer(st, pp, &p, to, true).await,
                None => execute_store_payout(st, pp, &p, true).await,
            } {
                super::outcome::Moved::Done(reference) => Some(("done", Some(reference))),
                super::outcome::Moved::Refused(_) => Some(("cancelled", None)),
                super::outcome::Moved::Unknown => None,
            },
        };
        if let Some((state, reference)) = settled {
            let state = state.to_owned();
            with_db(st, move |c| {
                set_payout(c, &p, &state, reference.as_deref()).map_err(db_error)
            })
            .await?;
        }
    }
    Ok(())
}

/// The exchange account a payout goes to, if its destination is `account:<n>`.
fn to_account(p: &Payout) -> Option<u32> {
    account_of(&p.destination)
}

/// The exchange account a claim's destination names (`account:<n>`), if it names one.
fn account_of(destination: &str) -> Option<u32> {
    destination
        .strip_prefix(ACCOUNT_PREFIX)
        .and_then(|n| n.parse().ok())
}

/// A store pull payment's payout to an exchange account: one engine transfer from the merchant,
/// idempotent by `merchant/pp/<pull payment>/<n>` (repeating it to learn an unknown outcome moves
/// nothing twice).
async fn store_transfer(
    st: &AppState,
    pp: &PullPayment,
    p: &Payout,
    to: u32,
    resolving: bool,
) -> super::outcome::Moved {
    use matching_engine::{AccountId, Amount, Command, IdempotencyKey};
    let asset = match super::outcome::btc_asset(st) {
        Ok(a) => a,
        Err(e) => return super::outcome::Moved::Refused(e),
    };
    let cmd = Command::Transfer {
        from: AccountId(pp.merchant),
        to: AccountId(to),
        asset,
        amount: Amount(p.amount_sat),
        key: IdempotencyKey::reference(&format!("merchant/pp/{}/{}", p.pp_id, p.n)),
    };
    super::outcome::transfer(st, cmd, resolving).await
}

/// A store pull payment's payout: a custody withdrawal from the merchant's account under the
/// key [`store_payout_key`] (`ask_first`: look for custody's record, under that key or the one an
/// older build used, before requesting).
async fn execute_store_payout(
    st: &AppState,
    pp: &PullPayment,
    p: &Payout,
    ask_first: bool,
) -> super::outcome::Moved {
    use super::outcome::Moved;
    if ask_first {
        // An older build's request under the old key is this payout's too.
        let legacy = super::outcome::custody_record_of(
            st.custody(),
            pp.merchant,
            legacy_store_payout_key(p),
            p.destination.clone(),
            p.amount_sat,
        )
        .await;
        match legacy {
            Ok(Some(w)) => return super::outcome::done_or_unknown(&w),
            Ok(None) => {}
            Err(()) => return Moved::Unknown,
        }
    }
    super::outcome::custody_withdrawal(
        st.custody(),
        pp.merchant,
        p.destination.clone(),
        p.amount_sat,
        store_payout_key(p),
        ask_first,
    )
    .await
}

/// `POST /api/v1/pull-payments/{pullPaymentId}/payouts` (public: the id is the right to
/// claim): `destination` (a Bitcoin address), `amount` (BTC; default: what remains),
/// `payoutMethodId` (`BTC-CHAIN`). An `Idempotency-Key` header (1..64 printable characters)
/// makes a repeat answer the same payout. The claim is reserved against the limit in one
/// transaction (`422` beyond it), then paid: through the invoice's refund path for a refund,
/// by a custody withdrawal for a store pull payment. Refused by custody (e.g. a bad address):
/// `400` and the reservation is given back. No answer: `503` and the payout stays reserved,
/// resolved by its key.
pub async fn claim(
    ClientIp(ip): ClientIp,
    State(st): State<AppState>,
    Path(id): Path<String>,
    req: GfReq,
) -> GfResult {
    st.charge_ip_addr(&ip, 9)?;
    let pp = public_pp(&st, &ip, id).await?;
    let b = req.json()?;
    payout_method_ok(&b, &["payoutMethodId", "paymentMethod"])?;
    let destination = b
        .get("destination")
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or("");
    let destination = destination.strip_prefix("bitcoin:").unwrap_or(destination);
    if let Some(n) = destination.strip_prefix(ACCOUNT_PREFIX) {
        // An exchange account: paid by an engine transfer (no chain transaction, no fee).
        if !n.parse::<u32>().is_ok_and(|a| a > 0) || n.starts_with('0') {
            return Err(invalid("destination", "account:<account number>"));
        }
    } else if destination.is_empty()
        || destination.len() > 128
        || !destination.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(invalid(
            "destination",
            "a Bitcoin address, or account:<number> for an exchange account",
        ));
    }
    let destination = destination.to_owned();
    let amount = match b.get("amount").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => Some(
            decimal_of(v)
                .and_then(|s| api::decimal::parse_units(&s, api::capital::BTC_DECIMALS).ok())
                .filter(|a| *a > 0)
                .ok_or_else(|| invalid("amount", "more than zero, 8 decimals at most"))?,
        ),
    };
    let claim_key = match req.headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|k| {
                    !k.is_empty() && k.len() <= 64 && k.bytes().all(|b| b.is_ascii_graphic())
                })
                .ok_or_else(|| invalid("Idempotency-Key", "1 to 64 printable characters"))?
                .to_owned(),
        ),
    };
    // Runs to completion even if the client goes away (money moves).
    let st2 = st.clone();
    tokio::spawn(async move { claim_and_pay(&st2, pp, destination, amount, claim_key).await })
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "claim task failed");
            Err(ApiError::internal().into())
        })
}

enum Reserved {
    New(Payout),
    Existing(Payout),
    OverLimit(u64),
    TooMany,
    KeyReused,
    /// Outside the pull payment's claim window (`not-started` or `expired`, and why).
    Closed(&'static str, &'static str),
    /// The store's withdrawal address list refused the destination: nothing reserved.
    Refused(crate::allowlist::AllowListError),
}

async fn claim_and_pay(
    st: &AppState,
    pp: PullPayment,
    destination: String,
    amount: Option<u64>,
    claim_key: Option<String>,
) -> GfResult {
    let now = now_ms();
    let pp2 = pp.clone();
    let id = r::random_id()?;
    // A flagged store's funds (maybe a deposit the chain took back) stay until reviewed.
    // Custody is asked here (it cannot be asked inside the transaction); the answer refuses a
    // new claim only, after the key's look-up, so a claim made before the flag is answered.
    let flag = api::capital::refuse_flagged(st, pp.merchant).await;
    // Check the limit and reserve, in one transaction (the database serializes claims).
    let reserved = with_db(st, move |c| {
        let tx = c.transaction().map_err(db_error)?;
        if let Some(k) = &claim_key {
            let found = tx
                .query_row(
                    &format!("SELECT {PAYOUT_COLS} FROM gf_payout WHERE pp_id = ?1 AND claim_key = ?2"),
                    params![pp2.id, k],
                    payout_row,
                )
                .optional()
                .map_err(db_error)?;
            if let Some(p) = found {
                let same = p.destination == destination && amount.is_none_or(|a| a == p.amount_sat);
                return Ok(if same { Reserved::Existing(p) } else { Reserved::KeyReused });
            }
        }
        // Archived, read in this transaction (an archive between the page's look-up and here
        // takes no claim), after the key's look-up: a claim repeated after the archive (its
        // first answer lost) is answered with its payout, as after the expiry below.
        let archived: bool = tx
            .query_row(
                "SELECT archived FROM gf_pull_payment WHERE id = ?1",
                [&pp2.id],
                |r| r.get(0),
            )
            .map_err(db_error)?;
        if archived {
            return Ok(Reserved::Closed("archived", "The pull payment is archived"));
        }
        // The claim window, after the key's look-up: a claim repeated after the expiry (its
        // first answer lost) is answered with its payout, not told nothing was claimed.
        if pp2.starts_ms.is_some_and(|s| now < s) {
            return Ok(Reserved::Closed("not-started", "The pull payment has not started yet"));
        }
        if pp2.expires_ms.is_some_and(|e| now >= e) {
            return Ok(Reserved::Closed("expired", "The pull payment has expired"));
        }
        flag?;
        // A new claim moves the store's money out: the store's list decides where to (after
        // the key's look-up above, so a claim made before the list was on is still answered).
        let to = match account_of(&destination) {
            Some(a) => api::policy::Destination::Account(a),
            None => api::policy::Destination::Address(destination.clone()),
        };
        if let Err(e) = crate::allowlist::check_destination(&tx, pp2.merchant, &to, now) {
            return Ok(Reserved::Refused(e));
        }
        // An exchange account is paid by an engine transfer: only from a pull payment made by a
        // key that may transfer (a refund's checks its payer when it is paid).
        if pp2.invoice_id.is_none() && !pp2.accounts_ok && account_of(&destination).is_some() {
            return Ok(Reserved::Closed(
                "account-not-allowed",
                "This pull payment pays Bitcoin addresses only: paying an exchange account takes \
                 a pull payment made by a key with the transfer permission",
            ));
        }
        let claimed = claimed_sat(&tx, &pp2.id).map_err(db_error)?;
        let remaining = pp2.amount_sat.saturating_sub(claimed);
        let amount = amount.unwrap_or(remaining);
        if amount == 0 || amount > remaining {
            return Ok(Reserved::OverLimit(remaining));
        }
        let (n, count): (u32, i64) = tx
            .query_row(
                "SELECT COALESCE(MAX(n), 0) + 1, count(*) FROM gf_payout WHERE pp_id = ?1",
                [&pp2.id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(db_error)?;
        if count >= MAX_PAYOUTS {
            return Ok(Reserved::TooMany);
        }
        let p = Payout {
            pp_id: pp2.id.clone(),
            n,
            id,
            destination,
            amount_sat: amount,
            // Reserved either way; paid now, or when the store approves it.
            state: if pp2.auto_approve { "pending" } else { AWAITING }.into(),
            reference: None,
            claim_key,
            created_ms: now,
            run: Some(run_id().to_owned()),
        };
        tx.execute(
            "INSERT INTO gf_payout (pp_id, n, id, destination, amount_sat, state, claim_key, created_ms,
               run)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![p.pp_id, p.n, p.id, p.destination, p.amount_sat, p.state, p.claim_key, p.created_ms,
                    p.run],
        )
        .map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        Ok(Reserved::New(p))
    })
    .await?;
    let p = match reserved {
        Reserved::New(p) => p,
        Reserved::Existing(p) if p.state == "unknown" || p.state == "pending" => {
            resolve_payouts(st, &pp).await?;
            let (pid, n) = (p.pp_id.clone(), p.n);
            let now_p = with_db(st, move |c| {
                c.query_row(
                    &format!("SELECT {PAYOUT_COLS} FROM gf_payout WHERE pp_id = ?1 AND n = ?2"),
                    params![pid, n],
                    payout_row,
                )
                .map_err(db_error)
            })
            .await?;
            return ok(payout_json(&now_p, None));
        }
        Reserved::Existing(p) => return ok(payout_json(&p, None)),
        // BTCPay's `overdraft` (400), as its `HandleClaimResult` answers it; a shop's client
        // tells it from a malformed amount (422) by the code (review: this was a 422).
        Reserved::OverLimit(remaining) => {
            return Err(gf_err(
                StatusCode::BAD_REQUEST,
                "overdraft",
                format!(
                    "The payout amount is more than the {} BTC that remain to claim",
                    r::btc(remaining)
                ),
            ))
        }
        Reserved::TooMany => {
            return Err(invalid(
                "amount",
                format!("at most {MAX_PAYOUTS} payouts per pull payment"),
            ))
        }
        Reserved::Closed(code, message) => {
            return Err(gf_err(StatusCode::BAD_REQUEST, code, message));
        }
        Reserved::KeyReused => {
            return Err(invalid(
                "Idempotency-Key",
                "this key was used for another claim of this pull payment",
            ))
        }
        Reserved::Refused(e) => return Err(list_refused(e)),
    };
    if p.state == AWAITING {
        // Reserved; paid when the store approves it.
        return ok(payout_json(&p, None));
    }
    let moved = pay_payout(st, &pp, &p).await;
    record_payout(st, &pp, p, moved).await
}

/// Pays a reserved payout (`pending`): through the invoice's refund path for a refund's pull
/// payment, by an engine transfer to an exchange account, or by a custody withdrawal.
async fn pay_payout(st: &AppState, pp: &PullPayment, p: &Payout) -> super::outcome::Moved {
    use super::outcome::Moved;
    let account = to_account(p);
    match &pp.invoice_id {
        Some(iid) => {
            let custody = st.custody();
            let ask = r::RefundAsk {
                merchant: pp.merchant,
                id: iid.clone(),
                amount: p.amount_sat,
                address: account.is_none().then(|| p.destination.clone()),
                to_account: account,
                // An account only if it paid the invoice from its balance, as a signed refund:
                // the claim's link is no `transfer` permission.
                idem: Some(refund_key(p)),
            };
            match r::refund_invoice(st, ask, custody).await {
                Ok(v) => Moved::Done(v["reference"].as_str().unwrap_or("").to_owned()),
                // Unknown, or failed after the money may have moved (a 5xx: e.g. the refund's
                // record could not be written after its transfer): the claim stays reserved and
                // `resolve_payouts` waits on the refund row. Only a refusal frees it.
                Err(e) if e.code == -1007 || e.status.as_u16() >= 500 => Moved::Unknown,
                Err(e) => Moved::Refused(e),
            }
        }
        None => match account {
            Some(to) => store_transfer(st, pp, p, to, false).await,
            None => execute_store_payout(st, pp, p, false).await,
        },
    }
}

/// Records what paying a payout did (`done`, `cancelled`: the reservation given back, or
/// `unknown`: kept, resolved by its key) and answers it.
async fn record_payout(
    st: &AppState,
    pp: &PullPayment,
    p: Payout,
    moved: super::outcome::Moved,
) -> GfResult {
    use super::outcome::Moved;
    let (state, reference, answer) = match moved {
        Moved::Done(reference) => ("done", Some(reference), Ok(())),
        Moved::Refused(e) => ("cancelled", None, Err(e)),
        Moved::Unknown => ("unknown", None, Err(ApiError::outcome_unknown())),
    };
    let p2 = p.clone();
    let ref2 = reference.clone();
    with_db(st, move |c| {
        set_payout(c, &p2, state, ref2.as_deref()).map_err(db_error)
    })
    .await?;
    match answer {
        Ok(()) => {
            let p = Payout {
                state: state.into(),
                reference,
                ..p
            };
            let pp2 = pp.clone();
            let p2 = p.clone();
            let k = with_db(st, move |c| payout_key(c, &pp2, &p2).map_err(db_error)).await?;
            let ws = withdrawals_by_key(st, pp.merchant, k.clone()).await;
            ok(payout_json(&p, first_of(&k, &ws)))
        }
        Err(e) if e.code == -1007 => Err(gf_err(
            StatusCode::SERVICE_UNAVAILABLE,
            "outcome-unknown",
            "The payout was sent for payment but no answer came back; it stays reserved and is \
             resolved by its key. List the payouts (or repeat the claim with the same \
             Idempotency-Key) to learn its outcome",
        )),
        Err(e) => Err(GfError {
            status: StatusCode::BAD_REQUEST,
            body: json!({"code": "payout-refused", "message": e.msg, "mediatorCode": e.code}),
            retry_after: None,
        }),
    }
}

// ---- the store's payouts: approval ----

fn payout_not_found() -> GfError {
    gf_err(
        StatusCode::NOT_FOUND,
        "payout-not-found",
        "The payout was not found",
    )
}

fn invalid_state() -> GfError {
    gf_err(
        StatusCode::BAD_REQUEST,
        "invalid-state",
        "The payout is not awaiting approval",
    )
}

/// One of `merchant`'s payouts by its id, with its pull payment (another store's, or none:
/// `404 payout-not-found`, as BTCPay answers).
async fn store_payout_of(
    st: &AppState,
    merchant: u32,
    id: String,
) -> Result<(PullPayment, Payout), GfError> {
    if !r::valid_public_id(&id) {
        return Err(payout_not_found());
    }
    with_db(st, move |c| {
        let p = c
            .query_row(
                &format!("SELECT {PAYOUT_COLS} FROM gf_payout WHERE id = ?1"),
                [&id],
                payout_row,
            )
            .optional()
            .map_err(db_error)?;
        let Some(p) = p else { return Ok(None) };
        let pp = load_pp(c, &p.pp_id).map_err(db_error)?;
        Ok(pp.filter(|pp| pp.merchant == merchant).map(|pp| (pp, p)))
    })
    .await?
    .ok_or_else(payout_not_found)
}

/// Payouts with their custody withdrawals' states (none looked up for one still awaiting
/// approval or cancelled before it was paid: it has none).
async fn payouts_json(
    st: &AppState,
    merchant: u32,
    rows: Vec<(PullPayment, Payout)>,
) -> Result<Vec<Value>, GfError> {
    let keyed = with_db(st, move |c| {
        let mut out = Vec::new();
        for (pp, p) in rows {
            let k = if p.state == AWAITING || (p.state == "cancelled" && p.reference.is_none()) {
                Vec::new()
            } else {
                payout_key(c, &pp, &p).map_err(db_error)?
            };
            out.push((p, k));
        }
        Ok(out)
    })
    .await?;
    let keys = keyed.iter().flat_map(|(_, k)| k.iter().cloned()).collect();
    let ws = withdrawals_by_key(st, merchant, keys).await;
    Ok(keyed
        .iter()
        .map(|(p, k)| payout_json(p, first_of(k, &ws)))
        .collect())
}

/// `GET /api/v1/stores/{storeId}/payouts` (`includeCancelled`, default false): the store's
/// payouts, newest first, at most [`MAX_PAYOUTS`] (those awaiting approval among them).
pub async fn store_payouts(
    State(st): State<AppState>,
    Path(store_path): Path<String>,
    RawQuery(q): RawQuery,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let cancelled = query_pairs(q.as_deref())
        .iter()
        .any(|(k, v)| k == "includeCancelled" && v == "true");
    let merchant = key.account;
    let rows = with_db(&st, move |c| {
        let mut stmt = c
            .prepare(&format!(
                "SELECT {PAYOUT_COLS} FROM gf_payout
                 WHERE pp_id IN (SELECT id FROM gf_pull_payment WHERE merchant = ?1)
                   AND (?2 OR state != 'cancelled')
                 ORDER BY created_ms DESC, n DESC LIMIT ?3"
            ))
            .map_err(db_error)?;
        let ps = stmt
            .query_map(params![merchant, cancelled, MAX_PAYOUTS], payout_row)
            .map_err(db_error)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_error)?;
        let mut pps: std::collections::HashMap<String, PullPayment> = Default::default();
        let mut out = Vec::new();
        for p in ps {
            if !pps.contains_key(&p.pp_id) {
                if let Some(pp) = load_pp(c, &p.pp_id).map_err(db_error)? {
                    pps.insert(pp.id.clone(), pp);
                }
            }
            if let Some(pp) = pps.get(&p.pp_id) {
                out.push((pp.clone(), p));
            }
        }
        Ok(out)
    })
    .await?;
    let listed = payouts_json(&st, merchant, rows).await?;
    ok(Value::Array(pp_ids_for(&key, listed)))
}

/// Payouts as a store key may see them: a pull payment's id is the right to claim what remains
/// of it (`POST /api/v1/pull-payments/{id}/payouts` pays any address), so it is shown only to a
/// key that holds `withdraw`, as listing the pull payments needs (`canviewpullpayments`). A key
/// that views payouts without it (`canviewpayouts`, `canviewstoresettings`) sees `null` there.
fn pp_ids_for(key: &ApiKey, mut payouts: Vec<Value>) -> Vec<Value> {
    if !key.perms.has(Perms::WITHDRAW) {
        for p in &mut payouts {
            if let Some(id) = p.get_mut("pullPaymentId") {
                *id = Value::Null;
            }
        }
    }
    payouts
}

/// A payout waiting for the store's approval, with what the owner needs to judge it.
#[derive(Debug, Clone)]
pub struct Awaiting {
    /// The payout's id.
    pub id: String,
    /// Where it would be paid.
    pub destination: String,
    /// Satoshis.
    pub amount_sat: u64,
    /// Claimed, ms.
    pub created_ms: u64,
    /// Its pull payment's name.
    pub name: String,
    /// Its pull payment's description.
    pub description: String,
    /// The invoice it refunds, if any.
    pub invoice_id: Option<String>,
    /// Its pull payment's limit, satoshis.
    pub limit_sat: u64,
}

/// Every payout of `merchant` waiting for approval, oldest first (at most 1,000: each is a
/// claim reserved on a pull payment of at most [`MAX_PAYOUTS`] claims).
pub async fn awaiting_payouts(st: &AppState, merchant: u32) -> Result<Vec<Awaiting>, ApiError> {
    with_db(st, move |c| {
        let mut stmt = c
            .prepare(
                "SELECT p.id, p.destination, p.amount_sat, p.created_ms, pp.name, pp.description,
                        pp.invoice_id, pp.amount_sat
                 FROM gf_payout p JOIN gf_pull_payment pp ON pp.id = p.pp_id
                 WHERE pp.merchant = ?1 AND p.state = ?2
                 ORDER BY p.created_ms, p.n LIMIT 1000",
            )
            .map_err(db_error)?;
        let rows = stmt
            .query_map(params![merchant, AWAITING], |r| {
                Ok(Awaiting {
                    id: r.get(0)?,
                    destination: r.get(1)?,
                    amount_sat: r.get(2)?,
                    created_ms: r.get(3)?,
                    name: r.get(4)?,
                    description: r.get(5)?,
                    invoice_id: r.get(6)?,
                    limit_sat: r.get(7)?,
                })
            })
            .map_err(db_error)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db_error)?;
        Ok(rows)
    })
    .await
}

/// How many payouts of `merchant` wait for approval.
pub async fn awaiting_count(st: &AppState, merchant: u32) -> Result<u64, ApiError> {
    with_db(st, move |c| {
        c.query_row(
            "SELECT count(*) FROM gf_payout p JOIN gf_pull_payment pp ON pp.id = p.pp_id
             WHERE pp.merchant = ?1 AND p.state = ?2",
            params![merchant, AWAITING],
            |r| r.get(0),
        )
        .map_err(db_error)
    })
    .await
}

/// `GET /api/v1/stores/{storeId}/payouts/{payoutId}`.
pub async fn store_payout(
    State(st): State<AppState>,
    Path((store_path, id)): Path<(String, String)>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let row = store_payout_of(&st, key.account, id).await?;
    let v = payouts_json(&st, key.account, vec![row]).await?;
    ok(pp_ids_for(&key, v)
        .into_iter()
        .next()
        .unwrap_or(Value::Null))
}

/// `POST /api/v1/stores/{storeId}/payouts/{payoutId}`: approves a payout awaiting approval
/// (`revision`, required: `0`, the only revision here; `rateRule` is not used, the pull payment
/// being in BTC) and pays it as an approved claim is paid. It leaves `awaiting` in one statement
/// that stamps this process's [`RUN`] (two approvals never both pay; the
/// monitor resolves a `pending` payout only of another run, so it never pays one an approval
/// is paying); a crash between the two leaves it `pending`, resolved by its key after the
/// restart as a claim's. Not awaiting approval: `400 invalid-state`. Runs to completion if the
/// client goes.
pub async fn approve_payout(
    State(st): State<AppState>,
    Path((store_path, id)): Path<(String, String)>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let b = req.json()?;
    let revision = b
        .get("revision")
        .and_then(Value::as_u64)
        .ok_or_else(|| invalid("revision", "The `revision` property is required"))?;
    if b.get("rateRule")
        .is_some_and(|v| !v.is_null() && !v.is_string())
    {
        return Err(invalid("rateRule", "a string"));
    }
    let (pp, p) = store_payout_of(&st, key.account, id).await?;
    if p.state != AWAITING {
        return Err(invalid_state());
    }
    if revision != 0 {
        return Err(gf_err(
            StatusCode::BAD_REQUEST,
            "old-revision",
            "The payout's revision is 0",
        ));
    }
    // A flagged store's funds stay until reviewed.
    api::capital::refuse_flagged(&st, key.account).await?;
    let st2 = st.clone();
    tokio::spawn(async move {
        // No lock held while paying (a refund's payment takes `invoice_lock`, which the monitor
        // holds while it waits for `payout_lock`): the monitor leaves a `pending` payout of this
        // run alone.
        let (pid, n, merchant) = (p.pp_id.clone(), p.n, pp.merchant);
        let to = match account_of(&p.destination) {
            Some(a) => api::policy::Destination::Account(a),
            None => api::policy::Destination::Address(p.destination.clone()),
        };
        let taken = with_db(&st2, move |c| {
            let tx = c.transaction().map_err(db_error)?;
            // The store's list as it is now, not as it was when the claim was made: an
            // approval moves the money (the list may have been turned on or tightened since).
            if let Err(e) = crate::allowlist::check_destination(&tx, merchant, &to, now_ms()) {
                return Ok(Err(e));
            }
            let n = tx
                .execute(
                    "UPDATE gf_payout SET state = 'pending', run = ?4
                     WHERE pp_id = ?1 AND n = ?2 AND state = ?3",
                    params![pid, n, AWAITING, run_id()],
                )
                .map_err(db_error)?;
            tx.commit().map_err(db_error)?;
            Ok(Ok(n))
        })
        .await?
        .map_err(list_refused)?;
        if taken != 1 {
            return Err(invalid_state());
        }
        let p = Payout {
            state: "pending".into(),
            run: Some(run_id().to_owned()),
            ..p
        };
        let moved = pay_payout(&st2, &pp, &p).await;
        record_payout(&st2, &pp, p, moved).await
    })
    .await
    .unwrap_or_else(|e| {
        tracing::error!(error = %e, "payout approval task failed");
        Err(ApiError::internal().into())
    })
}

/// `DELETE /api/v1/stores/{storeId}/payouts/{payoutId}`: cancels a payout awaiting approval; its
/// amount may be claimed again. One already approved (paid, being paid) is not cancelled here:
/// `400 invalid-state` (custody's operators may still reject its withdrawal, which the monitor
/// then shows as `Cancelled`).
pub async fn cancel_payout(
    State(st): State<AppState>,
    Path((store_path, id)): Path<(String, String)>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    let (_, p) = store_payout_of(&st, key.account, id).await?;
    let changed = with_db(&st, move |c| {
        c.execute(
            "UPDATE gf_payout SET state = 'cancelled' WHERE pp_id = ?1 AND n = ?2 AND state = ?3",
            params![p.pp_id, p.n, AWAITING],
        )
        .map_err(db_error)
    })
    .await?;
    if changed != 1 {
        return Err(invalid_state());
    }
    // BTCPay answers 200 with no body.
    Ok(StatusCode::OK.into_response())
}

/// `DELETE /api/v1/stores/{storeId}/pull-payments/{pullPaymentId}`: archives a pull payment
/// (a refund's link sent to the wrong customer, a leaked link). In one transaction with the
/// claims: it takes no claim after this, and its claims waiting for the store's approval are
/// cancelled. A payout being paid or paid stays as it is. Archiving twice answers 200 again;
/// another store's id answers 404. A claim repeated with its `Idempotency-Key` is still
/// answered with its payout.
pub async fn archive_pull_payment(
    State(st): State<AppState>,
    Path((store_path, id)): Path<(String, String)>,
    req: GfReq,
) -> GfResult {
    let key = auth(&st, &req, Some(&store_path))?;
    if !r::valid_public_id(&id) {
        return Err(pp_not_found());
    }
    let merchant = key.account;
    let found = with_db(&st, move |c| {
        let tx = c.transaction().map_err(db_error)?;
        let n = tx
            .execute(
                "UPDATE gf_pull_payment SET archived = 1 WHERE id = ?1 AND merchant = ?2",
                params![id, merchant],
            )
            .map_err(db_error)?;
        if n == 0 {
            return Ok(false);
        }
        tx.execute(
            "UPDATE gf_payout SET state = 'cancelled' WHERE pp_id = ?1 AND state = ?2",
            params![id, AWAITING],
        )
        .map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        Ok(true)
    })
    .await?;
    if !found {
        return Err(pp_not_found());
    }
    Ok(StatusCode::OK.into_response())
}

/// `GET /pp/{pullPaymentId}`: the claim page (self-contained: no external asset).
pub async fn claim_page(
    ClientIp(ip): ClientIp,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> GfResult {
    public_pp(&st, &ip, id).await?;
    Ok(r::html(&st, super::pages::CLAIM_HTML))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `InvoiceInvalid` says whether the merchant did it: `manuallyMarked` is false for an
    /// invoice whose payments custody reversed (BTCPay: "received payments which could not
    /// confirm"), true for one the merchant marked.
    #[test]
    fn an_invalid_event_says_whether_the_merchant_marked_it() {
        for (marks, manual) in [(json!([]), true), (json!(["Reversed"]), false)] {
            let invoice = json!({"id": "i", "merchant": 7, "marks": marks, "status": "Invalid"});
            let b = event_body("d", "h", "InvoiceInvalid", &invoice, None, 1_000);
            assert_eq!(b["type"], "InvoiceInvalid");
            assert_eq!(b["manuallyMarked"], manual, "{b}");
        }
    }

    #[test]
    fn payout_ncols_counts_payout_cols() {
        assert_eq!(PAYOUT_COLS.split(", ").count(), PAYOUT_NCOLS);
    }
}
