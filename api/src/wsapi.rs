//! Binance's WebSocket API (`/ws-api/v3`): requests `{"id","method","params"}`, answers
//! `{"id","status","result"|"error","rateLimits"}`.
//!
//! **Contract: a WebSocket API method is a REST route.** Every method of [`METHODS`] names the
//! `(HTTP method, path)` of one row of [`crate::access::ROUTES`] and that row's handler function
//! (a unit test compares the names); the request is turned into that route's [`Req`]
//! (parameters as the query, `apiKey` as `X-MBX-APIKEY`, the row, the connection's client
//! address) and given to the handler directly (no HTTP request, router or middleware per call:
//! the method table is static), so it gets the row's permission and weight, the handler REST
//! runs (`order.place` is `POST /api/v3/order`: the same parsing and the same order placement),
//! the same rate limits, error codes and outcomes (`-1007` when the engine's answer is unknown,
//! after the same 30 s request timeout, which this module applies as the REST middleware does;
//! calls count in the same HTTP metrics). The only difference is the
//! signature: HMAC-SHA256 over every parameter but `signature`, sorted by name, as
//! `name=value&...` ([`ws_api_signed_payload`]; values as sent, or form-encoded as
//! python-binance signs them), checked where REST checks its own ([`WsApiCall`]).
//!
//! A connection serves up to [`crate::ApiConfig::ws_api_max_in_flight`] requests at once and
//! answers each when it is done (answers carry the request's `id` and may come out of order);
//! with that many in flight it stops reading the socket until one finishes (backpressure), and
//! it runs no further request while [`FLUSH_BYTES`] of answers wait to be written (a client
//! that does not read holds no more than that). Messages are at most [`crate::ApiConfig::ws_max_message_bytes`]; a connection
//! that answers no ping for 60 s is closed; connections count against the IP's stream cap and
//! its connection attempts ([`crate::ws`]). There is no per-connection message rate: the IP's
//! and key's request weight limit requests, as on Binance's WebSocket API.

use crate::error::ApiError;
use crate::keys::Perms;
use crate::readmodel::UserMsg;
use crate::state::{AppState, ClientIp, Req};
use crate::ws::{admit, close, closed_by_peer, limited, Alive, Liveness, SEND_TIMEOUT};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// Most active `userDataStream` subscriptions on one `/ws-api/v3` connection (Binance: 1,000).
pub const MAX_WS_API_SUBSCRIPTIONS: usize = 1_000;
/// Most subscriptions one `/ws-api/v3` connection may start over its lifetime (Binance: 65,535).
pub const MAX_WS_API_SUBSCRIPTION_IDS: u64 = 65_535;
/// Weight of a message that is not a method of [`METHODS`] (malformed, unknown, the
/// `userDataStream` requests), charged to the IP.
pub const OTHER_WEIGHT: u64 = 2;
/// Most answer bytes one connection gathers for a flush. Requests in flight are run as they
/// are polled, so those not gathered yet are not run (nor charged) until the client has read
/// what is being written: a client that pipelines large queries (`klines`, `depth`) and never
/// reads holds about this much, plus one answer, not every answer of its in-flight cap.
pub const FLUSH_BYTES: usize = 256 * 1024;

/// A REST handler called directly with a built [`Req`] (no HTTP request, router or
/// middleware in between).
pub type Handler = fn(AppState, Req) -> Pin<Box<dyn Future<Output = HandlerResult> + Send>>;

/// What a REST handler returns.
pub type HandlerResult = Result<Response, ApiError>;

/// One WebSocket API method: the REST route it is, and that route's handler.
#[derive(Debug)]
pub struct WsMethod {
    /// The `method` of a request.
    pub name: &'static str,
    /// The route's HTTP method in [`crate::access::ROUTES`].
    pub http: &'static str,
    /// The route's path in [`crate::access::ROUTES`].
    pub path: &'static str,
    /// The handler, as the route's row names it ([`crate::access::Route::handler_name`]).
    pub handler_name: &'static str,
    handler: Handler,
}

/// `m!(name, http, path, handler)`: a method served by the route's own handler function.
macro_rules! m {
    ($name:literal, $http:literal, $path:literal, $h:path) => {
        WsMethod {
            name: $name,
            http: $http,
            path: $path,
            handler_name: stringify!($h),
            handler: |st, req| Box::pin($h(State(st), req)),
        }
    };
}

/// The WebSocket API's methods (printed in `api/README.md`, "WebSocket API", with each row's
/// weight and permission from [`crate::access::ROUTES`]).
pub static METHODS: &[WsMethod] = {
    use crate::{catalog as cat, public as p, trade as t};
    &[
        m!("ping", "GET", "/api/v3/ping", p::ping),
        m!("time", "GET", "/api/v3/time", p::time),
        m!(
            "exchangeInfo",
            "GET",
            "/api/v3/exchangeInfo",
            p::exchange_info
        ),
        m!("depth", "GET", "/api/v3/depth", p::depth),
        m!("trades.recent", "GET", "/api/v3/trades", p::trades),
        m!(
            "trades.historical",
            "GET",
            "/api/v3/historicalTrades",
            p::historical_trades
        ),
        m!(
            "trades.aggregate",
            "GET",
            "/api/v3/aggTrades",
            p::agg_trades
        ),
        m!("klines", "GET", "/api/v3/klines", p::klines),
        m!("uiKlines", "GET", "/api/v3/uiKlines", p::klines),
        m!("avgPrice", "GET", "/api/v3/avgPrice", p::avg_price),
        m!("ticker.24hr", "GET", "/api/v3/ticker/24hr", p::ticker_24hr),
        m!(
            "ticker.tradingDay",
            "GET",
            "/api/v3/ticker/tradingDay",
            p::ticker_trading_day
        ),
        m!("ticker", "GET", "/api/v3/ticker", p::ticker_window),
        m!(
            "ticker.price",
            "GET",
            "/api/v3/ticker/price",
            p::ticker_price
        ),
        m!(
            "ticker.book",
            "GET",
            "/api/v3/ticker/bookTicker",
            p::book_ticker
        ),
        m!("order.place", "POST", "/api/v3/order", t::new_order),
        m!("order.test", "POST", "/api/v3/order/test", t::test_order),
        m!("order.status", "GET", "/api/v3/order", t::get_order),
        m!("order.cancel", "DELETE", "/api/v3/order", t::cancel_order),
        m!(
            "order.cancelReplace",
            "POST",
            "/api/v3/order/cancelReplace",
            t::cancel_replace
        ),
        m!(
            "order.amend.keepPriority",
            "PUT",
            "/api/v3/order/amend/keepPriority",
            t::amend_keep_priority
        ),
        m!(
            "openOrders.status",
            "GET",
            "/api/v3/openOrders",
            t::open_orders
        ),
        m!(
            "openOrders.cancelAll",
            "DELETE",
            "/api/v3/openOrders",
            t::cancel_open_orders
        ),
        m!("allOrders", "GET", "/api/v3/allOrders", t::all_orders),
        m!("myTrades", "GET", "/api/v3/myTrades", t::my_trades),
        m!("account.status", "GET", "/api/v3/account", t::account),
        m!(
            "account.commission",
            "GET",
            "/api/v3/account/commission",
            cat::account_commission
        ),
        m!(
            "account.rateLimits.orders",
            "GET",
            "/api/v3/rateLimit/order",
            cat::rate_limit_order
        ),
    ]
};

/// The method called `name` and its row of the permission table.
pub fn method(name: &str) -> Option<(&'static WsMethod, &'static crate::access::Route)> {
    let m = METHODS.iter().find(|m| m.name == name)?;
    Some((m, crate::access::find(m.http, m.path)?))
}

/// A WebSocket API request's origin and signature, given to the REST handler as a request
/// extension (only this module creates one: nothing from the network can). [`crate::state::Req`]
/// takes the client address from it, and [`AppState::signed`] checks the signature over
/// [`WsApiCall::payloads`] instead of the query string.
#[derive(Debug, Clone)]
pub struct WsApiCall {
    /// The WebSocket connection's client address.
    pub ip: String,
    /// What the HMAC may cover: the sorted parameters as sent, and (when different) the same
    /// form-encoded. Empty for an unsigned request.
    pub payloads: Vec<String>,
    /// The `signature` sent.
    pub signature: String,
}

impl WsApiCall {
    /// True when the signature is `key`'s HMAC of one of the payloads (constant-time compare).
    pub fn verify(&self, key: &crate::keys::ApiKey) -> bool {
        self.payloads
            .iter()
            .any(|p| key.verify(p.as_bytes(), &self.signature))
    }
}

/// `GET /ws-api/v3`: see the module documentation.
pub async fn ws_api(
    State(st): State<AppState>,
    ClientIp(ip): ClientIp,
    conn: Option<axum::Extension<crate::app::ConnInProgress>>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let guard = admit(&st, &ip)?;
    let conn = conn.map(|axum::Extension(c)| c);
    Ok(limited(&st, ws)
        .on_upgrade(move |socket| async move {
            st.0.metrics.ws_connections.fetch_add(1, Ordering::Relaxed);
            run_ws_api(&st, socket, &ip, conn).await;
            st.0.metrics.ws_connections.fetch_sub(1, Ordering::Relaxed);
            drop(guard);
        })
        .into_response())
}

/// The `userDataStream` subscriptions of one `/ws-api/v3` connection: one per account (a
/// second is `-2035`, as Binance), at most [`MAX_WS_API_SUBSCRIPTIONS`] active and
/// [`MAX_WS_API_SUBSCRIPTION_IDS`] over the connection's life (`-1034`).
#[derive(Debug, Default)]
struct Subscriptions {
    /// (subscription id, account, the API key that subscribed: a revoked key ends it)
    active: Vec<(u64, u32, String)>,
    next_id: u64,
}

impl Subscriptions {
    fn add(&mut self, account: u32, api_key: &str) -> Result<u64, ApiError> {
        if self.active.iter().any(|(_, a, _)| *a == account) {
            return Err(ApiError::bad(
                -2035,
                "User Data Stream subscription already active.",
            ));
        }
        if self.active.len() >= MAX_WS_API_SUBSCRIPTIONS {
            return Err(crate::ratelimit::too_many_connections(
                format!("Too many subscriptions on this connection; current limit is {MAX_WS_API_SUBSCRIPTIONS}."),
                None,
            ));
        }
        if self.next_id >= MAX_WS_API_SUBSCRIPTION_IDS {
            return Err(crate::ratelimit::too_many_connections(
                format!("Maximum subscription ID reached for this connection ({MAX_WS_API_SUBSCRIPTION_IDS}); reconnect."),
                None,
            ));
        }
        let sid = self.next_id;
        self.next_id += 1;
        self.active.push((sid, account, api_key.to_owned()));
        Ok(sid)
    }
}

fn ws_error(id: &Value, e: &ApiError) -> String {
    json!({"id": id, "status": e.status.as_u16(), "error": {"code": e.code, "msg": e.msg}})
        .to_string()
}

fn param_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A WebSocket API request, parsed without any state.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    /// The `id`, echoed in the answer (`null` when absent).
    pub id: Value,
    /// The `method`, when it is a string.
    pub method: Option<String>,
    /// The `params` object (empty when absent or not an object).
    pub params: serde_json::Map<String, Value>,
}

/// Parses a WebSocket API request (`-1100` when it is not JSON).
pub fn parse_api_request(text: &str) -> Result<ApiRequest, ApiError> {
    let v = serde_json::from_str::<Value>(text)
        .map_err(|_| ApiError::bad(-1100, "Malformed request."))?;
    let Value::Object(mut o) = v else {
        return Ok(ApiRequest {
            id: Value::Null,
            method: None,
            params: serde_json::Map::new(),
        });
    };
    Ok(ApiRequest {
        id: o.remove("id").unwrap_or(Value::Null),
        method: match o.remove("method") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        },
        params: match o.remove("params") {
            Some(Value::Object(p)) => p,
            _ => serde_json::Map::new(),
        },
    })
}

/// The bytes a signed WebSocket API request's HMAC covers, and its `signature`: every other
/// parameter as `name=value`, sorted by name, joined with `&` (a value that is not a string,
/// number or boolean: `-1130`; no string `signature`: `-1102`).
pub fn ws_api_signed_payload(
    params: &serde_json::Map<String, Value>,
) -> Result<(String, &str), ApiError> {
    let sig = params
        .get("signature")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::missing("signature"))?;
    // Written straight from the values (no copy of each): a request is signed at every call.
    let mut pairs: Vec<(&String, &Value)> =
        params.iter().filter(|(k, _)| *k != "signature").collect();
    // Already in order unless serde_json keeps insertion order (its `preserve_order` feature).
    pairs.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut payload = String::with_capacity(256);
    for (i, (k, v)) in pairs.into_iter().enumerate() {
        if i > 0 {
            payload.push('&');
        }
        payload.push_str(k);
        payload.push('=');
        match v {
            Value::String(s) => payload.push_str(s),
            Value::Number(n) => {
                let _ = write!(payload, "{n}");
            }
            Value::Bool(b) => payload.push_str(if *b { "true" } else { "false" }),
            _ => return Err(ApiError::invalid_value(k)),
        }
    }
    Ok((payload, sig))
}

/// `payload` (`name=value&...`, values as sent) with each value form-encoded as Python's
/// `urlencode` does (python-binance signs that): `None` when that changes nothing.
fn form_encoded(params: &serde_json::Map<String, Value>) -> Option<String> {
    let plain = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'~'))
    };
    let changes = params
        .iter()
        .any(|(k, v)| k != "signature" && matches!(v, Value::String(s) if !plain(s)));
    if !changes {
        // Numbers and booleans print the same either way.
        return None;
    }
    let mut pairs: Vec<(&String, String)> = params
        .iter()
        .filter(|(k, _)| *k != "signature")
        .filter_map(|(k, v)| param_str(v).map(|s| (k, s)))
        .collect();
    pairs.sort();
    let mut out = String::with_capacity(128);
    let mut changed = false;
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        for b in v.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' => {
                    out.push(char::from(b))
                }
                b' ' => {
                    changed = true;
                    out.push('+');
                }
                _ => {
                    changed = true;
                    let _ = write!(out, "%{b:02X}");
                }
            }
        }
    }
    changed.then_some(out)
}

/// A request's parameters as the REST route reads them, parsed as a query string is
/// ([`crate::params::Params::from_pairs`]: the same name and value checks) without writing and decoding one:
/// `apiKey` goes to the header and `returnRateLimits` is the WebSocket API's own; arrays
/// (`symbols`) are their JSON text, as REST takes them; `null` is left out; an object is `-1130`.
fn params_of(params: serde_json::Map<String, Value>) -> Result<crate::params::Params, ApiError> {
    let mut pairs = Vec::with_capacity(params.len());
    // Taken apart, not copied: each name and string value moves into its pair.
    for (k, v) in params {
        if k == "apiKey" || k == "returnRateLimits" {
            continue;
        }
        let s = match v {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Array(_) => v.to_string(),
            Value::Null => continue,
            Value::Object(_) => return Err(ApiError::invalid_value(&k)),
        };
        pairs.push((k, s));
    }
    crate::params::Params::from_pairs(pairs)
}

/// The REST request a WebSocket API request is, for its route (see the module documentation):
/// the parameters as the query, `apiKey` as `X-MBX-APIKEY`, the route's row, the connection's
/// address and the signature, as [`Req::from_request`](crate::state::Req) makes them for REST.
fn to_req(
    route: &'static crate::access::Route,
    params: serde_json::Map<String, Value>,
    ip: &str,
) -> Result<Req, ApiError> {
    let mut call = WsApiCall {
        ip: ip.to_owned(),
        payloads: Vec::new(),
        signature: String::new(),
    };
    // What needs the parameters as sent, before they are taken apart; the errors in the order
    // REST finds them (the parameters, then the signature, then the key).
    let signed = (matches!(route.access, crate::access::Access::Signed(_))
        && params.contains_key("signature"))
    .then(|| {
        ws_api_signed_payload(&params)
            .map(|(payload, sig)| (payload, sig.to_owned(), form_encoded(&params)))
    });
    let api_key = params.get("apiKey").map(|k| {
        k.as_str()
            .and_then(|k| HeaderValue::from_str(k).ok())
            .ok_or_else(ApiError::key_format)
    });
    let parsed = params_of(params)?;
    if let Some(signed) = signed {
        let (payload, sig, enc) = signed?;
        call.signature = sig;
        call.payloads.push(payload);
        call.payloads.extend(enc);
    }
    let mut headers = axum::http::HeaderMap::new();
    if let Some(h) = api_key {
        headers.insert("x-mbx-apikey", h?);
    }
    Ok(Req {
        headers,
        query: String::new(),
        body: String::new(),
        ip: ip.to_owned(),
        route: Some(route),
        ws: Some(call),
        params: Some(parsed),
        arrived_ms: crate::core::now_ms(),
    })
}

/// The `rateLimits` of an answer: the REST answer's headers, or, when it has none (an error),
/// the IP's weight used so far.
fn rate_limits(st: &AppState, ip: &str, headers: &axum::http::HeaderMap) -> String {
    let num = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let mut out = String::from("[");
    let used = num("x-mbx-used-weight-1m").unwrap_or_else(|| {
        match st.0.ip_limiter.charge(ip, 0, crate::core::now_ms()) {
            crate::ratelimit::Charge::Ok(n) => n,
            crate::ratelimit::Charge::Limited { used, .. } => used,
        }
    });
    {
        let n = used;
        let _ = write!(
            out,
            "{{\"rateLimitType\":\"REQUEST_WEIGHT\",\"interval\":\"MINUTE\",\"intervalNum\":1,\"limit\":{},\"count\":{n}}}",
            st.0.cfg.ip_weight_per_min
        );
    }
    if let Some(n) = num("x-mbx-order-count-10s") {
        if out.len() > 1 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"rateLimitType\":\"ORDERS\",\"interval\":\"SECOND\",\"intervalNum\":10,\"limit\":{},\"count\":{n}}}",
            st.0.cfg.orders_per_10s
        );
    }
    out.push(']');
    out
}

/// Serves one method by its route's handler, with what the REST middleware adds (the request
/// timeout, `-1007` after it; the HTTP metrics); the answer's text.
async fn call(
    st: AppState,
    id: Value,
    method: &'static WsMethod,
    route: &'static crate::access::Route,
    params: serde_json::Map<String, Value>,
    ip: String,
) -> String {
    let with_limits = params.get("returnRateLimits") != Some(&Value::Bool(false));
    let empty = axum::http::HeaderMap::new();
    let req = match to_req(route, params, &ip) {
        Ok(r) => r,
        Err(e) => {
            // Not a request REST could express: charged like any other malformed message.
            let e = st.charge_ip_addr(&ip, OTHER_WEIGHT).err().unwrap_or(e);
            let body = json!({"code": e.code, "msg": e.msg}).to_string();
            let limits = with_limits.then(|| rate_limits(&st, &ip, &empty));
            return answer(&id, e.status, &body, limits.as_deref());
        }
    };
    let t0 = std::time::Instant::now();
    let span = tracing::info_span!("ws_api_request", method = method.name);
    // Behind every order answered so far, as REST requests are ([`crate::app`]), except a new
    // order.
    let fenced = !(route.method == "POST" && route.path == crate::app::NEW_ORDER_PATH);
    let run = async {
        if fenced {
            st.fence().await;
        }
        (method.handler)(st.clone(), req).await
    };
    let run = tracing::Instrument::instrument(run, span.clone());
    let res = match tokio::time::timeout(crate::app::REQUEST_TIMEOUT, run).await {
        Ok(Ok(res)) => res,
        Ok(Err(e)) => e.into_response(),
        Err(_) => {
            span.in_scope(|| tracing::warn!("request timed out"));
            ApiError::outcome_unknown().into_response()
        }
    };
    st.0.metrics.http(res.status(), t0.elapsed());
    let (parts, body) = res.into_parts();
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(_) => return ws_error(&id, &ApiError::internal()),
    };
    let Ok(body) = std::str::from_utf8(&body) else {
        return ws_error(&id, &ApiError::internal());
    };
    let limits = with_limits.then(|| rate_limits(&st, &ip, &parts.headers));
    answer(&id, parts.status, body, limits.as_deref())
}

/// `{"id":..,"status":..,"result"|"error":<body>[,"rateLimits":..]}` around a REST answer's
/// body (not parsed again: the bytes are copied).
fn answer(id: &Value, status: StatusCode, body: &str, limits: Option<&str>) -> String {
    let body = if body.is_empty() { "{}" } else { body };
    let id = id.to_string();
    let kind = if status == StatusCode::OK {
        "result"
    } else {
        "error"
    };
    let mut out = String::with_capacity(body.len() + id.len() + 200);
    let _ = write!(
        out,
        "{{\"id\":{id},\"status\":{},\"{kind}\":{body}",
        status.as_u16()
    );
    if let Some(l) = limits {
        out.push_str(",\"rateLimits\":");
        out.push_str(l);
    }
    out.push('}');
    out
}

/// Verifies a signed `userDataStream` request; returns the key.
fn ws_signed(
    st: &AppState,
    params: &serde_json::Map<String, Value>,
) -> Result<std::sync::Arc<crate::keys::ApiKey>, ApiError> {
    let api_key = params
        .get("apiKey")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::missing("apiKey"))?;
    let key = st.find_key(api_key)?;
    // `timestamp` and `recvWindow` read as a REST request's and every routed method's are
    // (`crate::params::signed_params`: `-1102`, `-1100`), and nothing else sent (`-1104`)
    // (review: this read them with its own, looser rules, `+` signs and all).
    let (mut p, ts, recv) = crate::params::signed_params(params_of(params.clone())?)?;
    st.check_time(ts, recv)?;
    p.req("signature")?;
    let (payload, sig) = ws_api_signed_payload(params)?;
    if !key.verify(payload.as_bytes(), sig)
        && !form_encoded(params).is_some_and(|p| key.verify(p.as_bytes(), sig))
    {
        return Err(ApiError::bad_signature());
    }
    st.charge_key(&key, OTHER_WEIGHT)?;
    if !key.perms.has(Perms::READ) {
        return Err(ApiError::key_rejected());
    }
    p.finish()?;
    Ok(key)
}

type Pending = Pin<Box<dyn Future<Output = String> + Send>>;

/// Answers a message that is not a routed method at once (`None`: a routed method, queued).
fn handle(
    st: &AppState,
    ip: &str,
    text: &str,
    subs: &mut Subscriptions,
    inflight: &FuturesUnordered<Pending>,
) -> Option<String> {
    let ApiRequest { id, method, params } = match parse_api_request(text) {
        Ok(r) => r,
        Err(e) => {
            return Some(match st.charge_ip_addr(ip, OTHER_WEIGHT) {
                Err(e) => ws_error(&Value::Null, &e),
                Ok(_) => ws_error(&Value::Null, &e),
            })
        }
    };
    if let Some((m, route)) = method.as_deref().and_then(self::method) {
        inflight.push(Box::pin(call(
            st.clone(),
            id,
            m,
            route,
            params,
            ip.to_owned(),
        )));
        return None;
    }
    if let Err(e) = st.charge_ip_addr(ip, OTHER_WEIGHT) {
        return Some(ws_error(&id, &e));
    }
    Some(match method.as_deref() {
        Some("userDataStream.subscribe.signature") => {
            match ws_signed(st, &params).and_then(|key| subs.add(key.account, &key.api_key)) {
                Ok(sid) => {
                    json!({"id": id, "status": 200, "result": {"subscriptionId": sid}}).to_string()
                }
                Err(e) => ws_error(&id, &e),
            }
        }
        Some("userDataStream.unsubscribe") => {
            // Absent: every subscription ends. Present, it must be a subscription id: a
            // string or a negative one ended them all, answered 200 (review).
            match params.get("subscriptionId").map(Value::as_u64) {
                None => subs.active.clear(),
                Some(Some(sid)) => subs.active.retain(|(s, _, _)| *s != sid),
                Some(None) => {
                    return Some(ws_error(
                        &id,
                        &ApiError::bad(
                            -1100,
                            "Illegal characters found in parameter 'subscriptionId'; legal range is '^[0-9]{1,20}$'.",
                        ),
                    ))
                }
            }
            json!({"id": id, "status": 200, "result": {}}).to_string()
        }
        _ => ws_error(&id, &ApiError::bad(-1100, "Unknown or unsupported method.")),
    })
}

/// Writes `out` (one flush); false when the connection is over.
async fn write_all(socket: &mut WebSocket, out: &mut Vec<String>) -> bool {
    let r = tokio::time::timeout(SEND_TIMEOUT, async {
        for t in out.drain(..) {
            socket.feed(Message::Text(t.into())).await?;
        }
        socket.flush().await
    })
    .await;
    out.clear();
    matches!(r, Ok(Ok(())))
}

async fn run_ws_api(
    st: &AppState,
    mut socket: WebSocket,
    ip: &str,
    conn: Option<crate::app::ConnInProgress>,
) {
    let cap = st.0.cfg.ws_api_max_in_flight.max(1);
    // Held while requests are in progress: the connection is not shed then (their answers
    // would be lost with the actions perhaps applied).
    let mut busy: Option<crate::app::InProgress> = None;
    // Subscribed to the user events only while a `userDataStream` subscription is active: a
    // connection that only trades neither pays for every account's events nor is cut off for
    // lagging behind events it never asked for.
    let mut urx: Option<tokio::sync::broadcast::Receiver<std::sync::Arc<UserMsg>>> = None;
    let mut alive = Alive::new(crate::core::now_ms());
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut subs = Subscriptions::default();
    let mut inflight: FuturesUnordered<Pending> = FuturesUnordered::new();
    let mut out: Vec<String> = Vec::new();
    loop {
        if inflight.is_empty() {
            busy = None;
        } else if busy.is_none() {
            busy = conn.as_ref().and_then(crate::app::ConnInProgress::enter);
        }
        tokio::select! {
            Some(answer) = inflight.next(), if !inflight.is_empty() => {
                let mut bytes = answer.len();
                out.push(answer);
                // Whatever else is done goes out with the same flush, up to FLUSH_BYTES.
                while bytes < FLUSH_BYTES {
                    let Some(Some(a)) = inflight.next().now_or_never() else {
                        break;
                    };
                    bytes += a.len();
                    out.push(a);
                }
                if !write_all(&mut socket, &mut out).await {
                    break;
                }
            }
            msg = socket.recv(), if inflight.len() < cap => match msg {
                Some(Ok(m)) => {
                    alive.touch();
                    match m {
                        Message::Text(t) => {
                            // In progress before it is handled (a shed decided in between would
                            // lose its answer), until answered; a connection already shed
                            // serves nothing more.
                            let entered = match &conn {
                                Some(c) => match c.enter() {
                                    Some(g) => Some(g),
                                    None => break,
                                },
                                None => None,
                            };
                            let answered = handle(st, ip, t.as_str(), &mut subs, &inflight);
                            if !inflight.is_empty() && busy.is_none() {
                                busy = entered;
                            }
                            match (subs.active.is_empty(), urx.is_some()) {
                                (false, false) => urx = Some(st.0.rm.user_tx.subscribe()),
                                (true, true) => urx = None,
                                _ => {}
                            }
                            if let Some(a) = answered {
                                out.push(a);
                                if !write_all(&mut socket, &mut out).await {
                                    break;
                                }
                            }
                        }
                        Message::Close(_) => {
                            closed_by_peer(&mut socket).await;
                            break;
                        }
                        // A JSON API: a binary frame is no request, and one that cost no
                        // weight would let a client keep the server reading for free. Closed
                        // as RFC 6455's "unsupported data" (1003).
                        Message::Binary(_) => {
                            let _ = tokio::time::timeout(
                                Duration::from_secs(1),
                                socket.send(Message::Close(Some(axum::extract::ws::CloseFrame {
                                    code: 1003,
                                    reason: "binary frames are not supported: send JSON text frames".into(),
                                }))),
                            )
                            .await;
                            break;
                        }
                        _ => {}
                    }
                }
                None | Some(Err(_)) => break,
            },
            r = async { urx.as_mut()?.recv().await.into() }, if urx.is_some() => match r {
                None => {}
                Some(r) => match r {
                Ok(u) => {
                    let u: &UserMsg = &u;
                    for (sid, a, _) in &subs.active {
                        if *a == u.account {
                            out.push(format!("{{\"subscriptionId\":{sid},\"event\":{}}}", u.json));
                        }
                    }
                    if !out.is_empty() && !write_all(&mut socket, &mut out).await {
                        st.0.metrics.ws_slow_disconnects.fetch_add(1, Ordering::Relaxed);
                        return close(&mut socket, "slow consumer: send timed out".into()).await;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    st.0.metrics.ws_slow_disconnects.fetch_add(1, Ordering::Relaxed);
                    return close(&mut socket, format!("slow consumer: {n} messages behind")).await;
                }
                Err(RecvError::Closed) => break,
            }},
            _ = tick.tick() => match alive.check(crate::core::now_ms()) {
                // A subscription whose key was revoked ends (Binance's `eventStreamTerminated`):
                // a revoked key reads nothing more.
                _ if subs.active.iter().any(|(_, _, k)| st.0.keys.get(k).is_none()) => {
                    let now = crate::core::now_ms();
                    for (sid, _, k) in &subs.active {
                        if st.0.keys.get(k).is_none() {
                            out.push(format!("{{\"subscriptionId\":{sid},\"event\":{{\"e\":\"eventStreamTerminated\",\"E\":{now}}}}}"));
                        }
                    }
                    subs.active.retain(|(_, _, k)| st.0.keys.get(k).is_some());
                    if !write_all(&mut socket, &mut out).await {
                        break;
                    }
                }
                Liveness::Dead => return close(&mut socket, "no pong: connection idle".into()).await,
                Liveness::PingDue => {
                    if !matches!(tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Ping(Vec::new().into()))).await, Ok(Ok(()))) {
                        break;
                    }
                }
                Liveness::Fine => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_api_subscriptions_are_bounded() {
        let mut s = Subscriptions::default();
        assert_eq!(s.add(7, "k").unwrap(), 0);
        assert_eq!(s.add(7, "k").unwrap_err().code, -2035, "one per account");
        for a in 1..MAX_WS_API_SUBSCRIPTIONS as u32 {
            s.add(1_000 + a, "k").unwrap();
        }
        let e = s.add(5, "k").unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (429, -1034), "{}", e.msg);
        assert_eq!(s.active.len(), MAX_WS_API_SUBSCRIPTIONS);
        // Unsubscribing frees active places, but ids are not reused past the lifetime bound.
        let mut s = Subscriptions::default();
        for _ in 0..MAX_WS_API_SUBSCRIPTION_IDS {
            s.add(1, "k").unwrap();
            s.active.clear();
        }
        assert!(s
            .add(1, "k")
            .unwrap_err()
            .msg
            .contains("Maximum subscription ID"));
    }

    #[test]
    fn every_method_is_a_row_of_the_permission_table() {
        for (i, m) in METHODS.iter().enumerate() {
            let (_, route) = method(m.name).unwrap_or_else(|| panic!("{} has no route", m.name));
            // The handler called directly is the one the route serves.
            assert_eq!(route.handler_name, m.handler_name, "{}", m.name);
            assert_eq!(
                route.listener,
                crate::access::Listener::Public,
                "{}",
                m.name
            );
            assert!(
                METHODS[i + 1..].iter().all(|o| o.name != m.name),
                "{} twice",
                m.name
            );
        }
        assert!(method("nope").is_none());
    }

    /// The parameters a route reads from a WebSocket API request: what it would read from the
    /// REST query string with the same parameters (`params_of` checks names and values as
    /// `Params::parse` does, without writing and decoding a query string).
    #[test]
    fn params_become_the_routes_parameters() {
        let pairs = |p: &crate::params::Params| {
            p.pairs()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect::<Vec<_>>()
        };
        let p: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"apiKey":"k","symbol":"BTCUSD","quantity":"0.5","recvWindow":5000,"returnRateLimits":false,"newClientOrderId":"a b&c","signature":"ab"}"#,
        )
        .unwrap();
        let rest = crate::params::Params::parse(
            "newClientOrderId=a%20b%26c&quantity=0.5&recvWindow=5000&signature=ab&symbol=BTCUSD",
            "",
        )
        .unwrap();
        assert_eq!(pairs(&params_of(p.clone()).unwrap()), pairs(&rest));
        let (payload, sig) = ws_api_signed_payload(&p).unwrap();
        assert_eq!(sig, "ab");
        assert_eq!(
            payload,
            "apiKey=k&newClientOrderId=a b&c&quantity=0.5&recvWindow=5000&returnRateLimits=false&symbol=BTCUSD"
        );
        assert_eq!(
            form_encoded(&p).unwrap().split('&').nth(1),
            Some("newClientOrderId=a+b%26c")
        );
        let list: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"symbols":["A","B"]}"#).unwrap();
        assert_eq!(
            pairs(&params_of(list.clone()).unwrap()),
            [("symbols".to_owned(), r#"["A","B"]"#.to_owned())]
        );
        let obj: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"symbol":{"x":1}}"#).unwrap();
        assert_eq!(params_of(obj.clone()).unwrap_err().code, -1130);
        // Names and values are checked as in a query string.
        for (bad, code) in [
            (r#"{"a-b":"1"}"#.to_owned(), -1100),
            (format!(r#"{{"symbol":"{}"}}"#, "x".repeat(1025)), -1100),
        ] {
            let m: serde_json::Map<String, Value> = serde_json::from_str(&bad).unwrap();
            assert_eq!(params_of(m.clone()).unwrap_err().code, code, "{bad}");
        }
        let many: serde_json::Map<String, Value> =
            (0..33).map(|i| (format!("p{i}"), Value::from(i))).collect();
        assert_eq!(params_of(many.clone()).unwrap_err().code, -1101);
    }
}
