//! The store dashboard: a web page for the shop owner (`/dashboard/...`).
//!
//! * **Login.** A per-store password (set by the operator: `mediator dashboard password`,
//!   stored as an Argon2id PHC string) or a one-time login link (`mediator dashboard link`:
//!   32 random bytes, stored as their SHA-256, single use, [`LINK_TTL_MS`]). Attempts are
//!   rate-limited per client IP and per store ([`LOGINS_PER_MIN`]); a failure never says which
//!   part was wrong. A browser that logged in to a store gets a device cookie ([`DEVICE_COOKIE`],
//!   OWASP's "device cookies": random, stored as its SHA-256, [`DEVICE_TTL_MS`], at most
//!   [`DEVICES_PER_STORE`] per store): its password attempts count against that device instead
//!   of the store's budget, so wrong passwords sent by someone else do not lock the owner out.
//! * **Sessions.** A random id (32 bytes) in the cookie [`COOKIE`] (`HttpOnly; SameSite=Strict;
//!   Path=/`, `Secure` unless `public_url` is plain `http://`), stored server-side as its SHA-256
//!   with an expiry ([`SESSION_TTL_MS`]); logout deletes it; a new password deletes all of the
//!   store's sessions.
//! * **CSRF.** Every state-changing form carries the session's synchronizer token (random,
//!   stored with the session, compared in constant time) and, when the browser sends `Origin`,
//!   it must be this server's. A refused form changes nothing.
//! * **One implementation of each action.** Pages call the Greenfield handlers
//!   ([`super::greenfield`]) for the session's store through [`GfReq::session`] (invoices,
//!   store settings, refunds, pull payments, webhook redelivery) and the key functions of
//!   [`api::native`] for API tokens; the point-of-sale switch calls the signed merchant API's
//!   store update ([`super::routes::update_store`]); a withdrawal goes through the signed API's
//!   own path ([`api::capital::apply_withdrawal`]).
//! * **Withdrawals need the password again** (step-up, ADR 0015): the form carries the store
//!   password, checked like a login (10 failed attempts a minute per session, 30 per store),
//!   so a session cookie alone, or a one-time link's session without the password, moves no
//!   money. The form also carries a random idempotency key (`withdrawOrderId`): submitting it
//!   twice, or again after a lost answer, requests one withdrawal and shows it.
//! * **Secrets stay out of URLs.** A message that holds one (a refund's claim link, a bearer
//!   credential) is kept server-side for the session as a one-time message ([`put_flash`]) and
//!   shown by the page the form redirects to. So is every other message a form's answer
//!   shows: a page never shows text from its URL as the server's.

pub mod authorize;
pub mod passwords;

use super::greenfield::{self as gf, GfReq, RawQuery};
use super::routes::{db_error, with_db};
use crate::MerchantState as _;
use api::error::ApiError;
use api::keys::{ApiKey, Perms};
use api::state::{AppState, ClientIp};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use passwords::{dummy_phc, hash_password, verify_password};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::sync::Arc;

/// The session cookie's name.
pub const COOKIE: &str = "mediator_dashboard";
/// How long a session lives after login.
pub const SESSION_TTL_MS: u64 = 8 * 3_600_000;
/// How long a one-time login link is valid.
pub const LINK_TTL_MS: u64 = 15 * 60_000;
/// Login attempts per minute per client IP, and per store (per device for a browser with a
/// device cookie of the store).
pub const LOGINS_PER_MIN: u64 = 10;
/// The cookie of a browser that logged in to a store before (sent to the login form only).
pub const DEVICE_COOKIE: &str = "mediator_device";
/// How long a device cookie is honoured (180 days).
pub const DEVICE_TTL_MS: u64 = 180 * 24 * 3_600_000;
/// The newest device cookies kept per store; older ones become browsers never seen.
pub const DEVICES_PER_STORE: i64 = 20;
/// Password length bounds (characters).
pub const PASSWORD_LEN: std::ops::RangeInclusive<usize> = 12..=128;
/// The largest form body accepted.
const MAX_FORM: usize = 16 * 1024;
/// The permissions of a dashboard session's principal: the store owner (refunds are pull
/// payments, which Greenfield gives `merchant` + `withdraw`).
const SESSION_PERMS: Perms = Perms::MERCHANT.with(Perms::WITHDRAW);
/// The permissions a dashboard may give a new API token.
const TOKEN_PERMS: Perms = Perms::READ.with(Perms::MERCHANT).with(Perms::WITHDRAW);

/// Creates the dashboard's tables.
pub fn init_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS dashboard_password (
            merchant INTEGER PRIMARY KEY, phc TEXT NOT NULL, set_ms INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS dashboard_link (
            hash TEXT PRIMARY KEY, merchant INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
            used_ms INTEGER);
         CREATE TABLE IF NOT EXISTS dashboard_session (
            hash TEXT PRIMARY KEY, merchant INTEGER NOT NULL, csrf TEXT NOT NULL,
            created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS dashboard_flash (
            session TEXT PRIMARY KEY, msg TEXT NOT NULL, created_ms INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS dashboard_device (
            hash TEXT PRIMARY KEY, merchant INTEGER NOT NULL, created_ms INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS dashboard_once (
            hash TEXT PRIMARY KEY, merchant INTEGER NOT NULL, created_ms INTEGER NOT NULL);",
    )
}

fn now_ms() -> u64 {
    api::core::now_ms()
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn random_hex() -> Result<String, ApiError> {
    api::keys::random_bytes::<32>()
        .map(hex::encode)
        .map_err(|_| ApiError::internal())
}

/// Equal in constant time (for equal lengths; a length difference is not secret).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---- operator commands (admin API) ----

/// `POST /mapi/v1/admin/dashboardPassword` (ADMIN): `account`, `password` (12 to 128
/// characters). Replaces the store's password, logs out its sessions, voids its unused login
/// links and forgets its device cookies.
pub async fn admin_set_password(
    State(st): State<AppState>,
    req: api::state::Req,
) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let account = account_param(&st, &mut p)?;
    let password = p.req("password")?;
    p.finish()?;
    if !PASSWORD_LEN.contains(&password.chars().count()) {
        return Err(ApiError::illegal("password", "12 to 128 characters"));
    }
    let phc = st
        .merchant()
        .passwords
        .run(move || hash_password(&password))
        .await
        .map_err(|passwords::Busy| ApiError::busy())??;
    // Who and which store, never the password (nor its hash); recorded before it is set, and
    // a failed entry sets nothing (a password grants access: none without its record).
    st.audit_by(
        "admin",
        &key.api_key,
        "dashboard.password",
        json!({ "account": account }),
    )?;
    with_db(&st, move |c| {
        let tx = c.transaction().map_err(db_error)?;
        tx.execute(
            "INSERT INTO dashboard_password (merchant, phc, set_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(merchant) DO UPDATE SET phc = ?2, set_ms = ?3",
            params![account, phc, now_ms()],
        )
        .map_err(db_error)?;
        tx.execute(
            "DELETE FROM dashboard_session WHERE merchant = ?1",
            params![account],
        )
        .map_err(db_error)?;
        // A login link issued before, not used yet, would log in past the change.
        tx.execute(
            "DELETE FROM dashboard_link WHERE merchant = ?1 AND used_ms IS NULL",
            params![account],
        )
        .map_err(db_error)?;
        // And the browsers that logged in before (a new password is often a suspected
        // compromise): each logs in once more within the store's budget.
        tx.execute(
            "DELETE FROM dashboard_device WHERE merchant = ?1",
            params![account],
        )
        .map_err(db_error)?;
        tx.commit().map_err(db_error)
    })
    .await?;
    Ok(api::state::ok_json(&ctx, json!({ "account": account })))
}

/// `POST /mapi/v1/admin/dashboardLink` (ADMIN): `account`. A one-time login link, valid
/// [`LINK_TTL_MS`]; only its hash is kept.
pub async fn admin_login_link(
    State(st): State<AppState>,
    req: api::state::Req,
) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let account = account_param(&st, &mut p)?;
    p.finish()?;
    let token = random_hex()?;
    let hash = sha256_hex(&token);
    let expires = now_ms().saturating_add(LINK_TTL_MS);
    // Never the link's token nor its hash (the hash is what a login looks up); recorded before
    // the link exists, and a failed entry makes none.
    st.audit_by(
        "admin",
        &key.api_key,
        "dashboard.link",
        json!({ "account": account, "expireTime": expires }),
    )?;
    with_db(&st, move |c| {
        c.execute(
            "INSERT INTO dashboard_link (hash, merchant, expires_ms) VALUES (?1, ?2, ?3)",
            params![hash, account, expires],
        )
        .map_err(db_error)
    })
    .await?;
    let base = st
        .cfg()
        .public_url
        .as_deref()
        .unwrap_or("")
        .trim_end_matches('/');
    Ok(api::state::ok_json(
        &ctx,
        json!({
            "account": account,
            "link": format!("{base}/dashboard/login?link={token}"),
            "expireTime": expires,
        }),
    ))
}

fn account_param(st: &AppState, p: &mut api::params::Params) -> Result<u32, ApiError> {
    let a = p
        .req("account")?
        .parse::<u32>()
        .map_err(|_| ApiError::invalid_value("account"))?;
    if !st.read_model().read().accounts.contains(&a) {
        return Err(ApiError::bad(-1130, "Unknown account."));
    }
    Ok(a)
}

// ---- sessions ----

/// A logged-in dashboard request: the store's account and the session's CSRF token.
#[derive(Debug)]
pub struct Session {
    account: u32,
    csrf: String,
    hash: String,
    ip: String,
    headers: HeaderMap,
}

/// Why a dashboard request was refused (an HTML page or a redirect; nothing changed).
#[derive(Debug)]
pub enum Refusal {
    /// No live session: GET goes to the login page, anything else is `401`.
    LoggedOut {
        /// A GET request (redirect).
        get: bool,
        /// Where the login sends the browser back to ([`authorize`]'s page only).
        next: Option<String>,
    },
    /// A page with this status and message.
    Page(StatusCode, String),
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        let status = e.status;
        Refusal::Page(status, e.msg.to_string())
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::LoggedOut {
                get: true,
                next: Some(next),
            } => redirect(&format!("/dashboard/login?next={}", pct(&next))),
            Refusal::LoggedOut { get: true, .. } => redirect("/dashboard/login"),
            Refusal::LoggedOut { get: false, .. } => page(
                StatusCode::UNAUTHORIZED,
                "Logged out",
                None,
                "<p class=err>Your session ended. <a href=\"/dashboard/login\">Log in</a> again.</p>",
            ),
            Refusal::Page(status, msg) => page(
                status,
                "Refused",
                None,
                &format!(
                    "<p class=err>{}</p><p><a href=\"/dashboard\">Back to the dashboard</a></p>",
                    esc(&msg)
                ),
            ),
        }
    }
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    cookie_named(headers, COOKIE)
}

/// The value of cookie `name` if it is one of ours (64 hex digits).
fn cookie_named(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The hash of the request's device cookie if the server issued it to a browser that logged in
/// to `account` and it has not expired.
async fn known_device(
    st: &AppState,
    headers: &HeaderMap,
    account: u32,
) -> Result<Option<String>, ApiError> {
    let Some(id) = cookie_named(headers, DEVICE_COOKIE) else {
        return Ok(None);
    };
    let hash = sha256_hex(&id);
    let since = now_ms().saturating_sub(DEVICE_TTL_MS);
    with_db(st, move |c| {
        c.query_row(
            "SELECT 1 FROM dashboard_device WHERE hash = ?1 AND merchant = ?2 AND created_ms > ?3",
            params![hash, account, since],
            |_| Ok(()),
        )
        .optional()
        .map(|found| found.map(|()| hash))
        .map_err(db_error)
    })
    .await
}

impl FromRequestParts<AppState> for Session {
    type Rejection = Refusal;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        st: &AppState,
    ) -> Result<Self, Refusal> {
        let ClientIp(ip) = match ClientIp::from_request_parts(parts, st).await {
            Ok(ip) => ip,
            Err(never) => match never {},
        };
        // The route's weight from the permission table (1 for every dashboard row).
        let weight = parts
            .extensions
            .get::<&'static api::access::Route>()
            .and_then(|r| r.weight)
            .unwrap_or(1);
        st.charge_ip_addr(&ip, weight)?;
        let get = parts.method == axum::http::Method::GET;
        // An app's authorization request comes back to its page after the login.
        let next = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .filter(|p| get && safe_next(p).is_some());
        let logged_out = || Refusal::LoggedOut {
            get,
            next: next.clone(),
        };
        let id = cookie_value(&parts.headers).ok_or_else(logged_out)?;
        let hash = sha256_hex(&id);
        let h2 = hash.clone();
        let now = now_ms();
        let row = with_db(st, move |c| {
            c.query_row(
                "SELECT merchant, csrf, expires_ms FROM dashboard_session WHERE hash = ?1",
                params![h2],
                |r| {
                    Ok((
                        r.get::<_, u32>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, u64>(2)?,
                    ))
                },
            )
            .optional()
            .map_err(db_error)
        })
        .await?;
        match row {
            Some((account, csrf, expires)) if expires > now => Ok(Session {
                account,
                csrf,
                hash,
                ip,
                headers: parts.headers.clone(),
            }),
            Some(_) => {
                with_db(st, move |c| {
                    c.execute(
                        "DELETE FROM dashboard_session WHERE hash = ?1",
                        params![hash],
                    )
                    .map_err(db_error)
                })
                .await?;
                Err(logged_out())
            }
            None => Err(logged_out()),
        }
    }
}

impl Session {
    fn principal(&self) -> Arc<ApiKey> {
        Arc::new(ApiKey::session(self.account, SESSION_PERMS))
    }

    /// The audit log's actor for what this session does: `dashboard:<account>`.
    fn actor(&self) -> String {
        format!("dashboard:{}", self.account)
    }

    /// The session's public id in the audit log (`by`): `session:` and the first 16 hex digits
    /// of the stored hash of its cookie. Never the cookie: the hash's prefix names the session
    /// without letting anyone present it.
    fn audit_id(&self) -> String {
        format!("session:{}", self.hash.get(..16).unwrap_or(&self.hash))
    }

    fn gf(&self, body: Value) -> GfReq {
        GfReq::session(self.principal(), self.ip.clone(), body)
    }

    fn store(&self) -> String {
        gf::store_id(self.account)
    }

    /// The CSRF checks of a state-changing form: `Origin` (when sent) is this server, and the
    /// form's `csrf` is the session's token.
    fn check_form(&self, st: &AppState, form: &Form) -> Result<(), Refusal> {
        if !same_origin(st, &self.headers) {
            return Err(Refusal::Page(
                StatusCode::FORBIDDEN,
                "This form came from another site; nothing was changed.".into(),
            ));
        }
        let sent = form.get("csrf").unwrap_or("");
        if !ct_eq(sent.as_bytes(), self.csrf.as_bytes()) {
            return Err(Refusal::Page(
                StatusCode::FORBIDDEN,
                "This form is out of date (missing or wrong form token); reload the page and try \
                 again. Nothing was changed."
                    .into(),
            ));
        }
        Ok(())
    }
}

/// True when the request sends no `Origin`, or one whose host is this request's `Host` (or the
/// configured `public_url`'s origin).
fn same_origin(st: &AppState, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if let Some(public) = st.cfg().public_url.as_deref() {
        let public = public.trim_end_matches('/');
        let public_origin = public
            .find("://")
            .and_then(|i| public[i + 3..].find('/').map(|j| &public[..i + 3 + j]))
            .unwrap_or(public);
        if origin.eq_ignore_ascii_case(public_origin) {
            return true;
        }
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, h)| h);
    matches!((host, origin_host), (Some(h), Some(o)) if h.eq_ignore_ascii_case(o))
}

/// A urlencoded form (first value of each name).
#[derive(Debug, Default)]
pub struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &[u8]) -> Result<Self, Refusal> {
        let s = std::str::from_utf8(body).map_err(|_| bad("The form is not UTF-8."))?;
        let mut out = Vec::new();
        for p in s.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let k = api::params::percent_decode(k).ok_or_else(|| bad("A malformed form."))?;
            let v = api::params::percent_decode(v).ok_or_else(|| bad("A malformed form."))?;
            out.push((k, v));
        }
        Ok(Form(out))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self, name: &str) -> &str {
        self.get(name).map(str::trim).unwrap_or("")
    }

    /// The `password` field as typed, never trimmed: a password is compared exactly as it was
    /// set, by the login, the withdrawal and every step-up alike (a trimmed step-up refused a
    /// password with a space at an end that the login took, and counted the owner's own
    /// retries towards the limit that locks withdrawals too).
    fn password(&self) -> &str {
        self.get("password").unwrap_or("")
    }
}

impl<S: Send + Sync> axum::extract::FromRequest<S> for Form {
    type Rejection = Refusal;

    async fn from_request(req: axum::extract::Request, _: &S) -> Result<Self, Refusal> {
        let body = axum::body::to_bytes(req.into_body(), MAX_FORM)
            .await
            .map_err(|_| {
                Refusal::Page(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "The form is too large.".into(),
                )
            })?;
        Form::parse(&body)
    }
}

fn bad(msg: &str) -> Refusal {
    Refusal::Page(StatusCode::BAD_REQUEST, msg.to_owned())
}

// ---- the Greenfield handlers, called for the session ----

/// The JSON of a Greenfield handler's answer, or its error message as a refusal.
async fn call(
    fut: impl std::future::Future<Output = Result<Response, gf::GfError>>,
) -> Result<Value, Refusal> {
    let res = match fut.await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 4 << 20)
        .await
        .map_err(|_| Refusal::from(ApiError::internal()))?;
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(v);
    }
    let msg = v["message"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| {
            v.as_array()
                .and_then(|a| a.first())
                .and_then(|e| e["message"].as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| status.to_string());
    Err(Refusal::Page(status, msg))
}

// ---- HTML ----

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn txt(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    }
}

fn pct(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(char::from(b));
        } else {
            let _ = write!(o, "%{b:02X}");
        }
    }
    o
}

const CSS: &str = include_str!("pages/dashboard.css");

fn page(status: StatusCode, title: &str, s: Option<&Session>, body: &str) -> Response {
    let nav = match s {
        Some(s) => format!(
            "<nav><a href=\"/dashboard\">Home</a><a href=\"/dashboard/invoices\">Invoices</a>\
             <a href=\"/dashboard/refunds\">Refunds</a><a href=\"/dashboard/tokens\">API tokens</a>\
             <a href=\"/dashboard/settings\">Settings</a>\
             <a href=\"/dashboard/addresses\">Withdrawal addresses</a>\
             <form method=post action=\"/dashboard/logout\" class=inline>{}\
             <button class=link>Log out</button></form></nav>",
            csrf_field(s)
        ),
        None => String::new(),
    };
    let html = format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width,initial-scale=1\">\
         <title>{} · Mediator store</title><style>{CSS}</style></head><body>\
         <header><strong>Mediator store</strong>{nav}</header><main><h1>{}</h1>{body}</main>\
         </body></html>",
        esc(title),
        esc(title)
    );
    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Not `no-referrer`: with it Chromium sends `Origin: null` on the page's own form posts,
    // which the Origin check refuses. `same-origin` still keeps a login link's token (in the
    // URL) from other sites.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

fn redirect(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn csrf_field(s: &Session) -> String {
    format!("<input type=hidden name=csrf value=\"{}\">", esc(&s.csrf))
}

/// Redirects to `path`, the page then showing `msg` once: kept server-side for the session
/// ([`put_flash`]), never in the URL, so that a page shows only the server's own messages
/// (review: `?done=` text from any link was shown as the server's own message above the
/// password fields of the withdrawal, token and address forms).
async fn done(st: &AppState, s: &Session, path: &str, msg: String) -> Result<Response, Refusal> {
    put_flash(st, s, msg).await?;
    Ok(redirect(path))
}

/// Keeps a one-time message for the session, server-side: for what must not travel in a URL
/// (browser history, logs, `Referer`), such as a refund's claim link. One per session; a
/// newer one replaces it.
async fn put_flash(st: &AppState, s: &Session, msg: String) -> Result<(), Refusal> {
    let session = s.hash.clone();
    with_db(st, move |c| {
        c.execute(
            "INSERT INTO dashboard_flash (session, msg, created_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(session) DO UPDATE SET msg = ?2, created_ms = ?3",
            params![session, msg, now_ms()],
        )
        .map_err(db_error)
    })
    .await?;
    Ok(())
}

/// The session's one-time message as HTML (taken: shown once), or nothing.
async fn take_flash(st: &AppState, s: &Session) -> Result<String, Refusal> {
    let session = s.hash.clone();
    let msg = with_db(st, move |c| {
        c.query_row(
            "DELETE FROM dashboard_flash WHERE session = ?1 RETURNING msg",
            params![session],
            |r| r.get::<_, String>(0),
        )
        .optional()
        .map_err(db_error)
    })
    .await?;
    Ok(msg
        .map(|m| format!("<p class=ok>{}</p>", esc(&m)))
        .unwrap_or_default())
}

// ---- login and logout ----

/// `next` when it is a page the login may send the browser back to, pages that change nothing
/// and that other sites link to: an app's authorization request (`/api-keys/authorize?...`)
/// and an invoice's page (`/dashboard/invoices/<id>`, where shop plugins' order links lead).
/// A path on this server and nothing else; at most 4 KiB, so the login's URL with it
/// percent-encoded stays under the head limit.
fn safe_next(next: &str) -> Option<&str> {
    let plain = next.len() <= 4096 && next.bytes().all(|b| b.is_ascii_graphic() && b != b'\\');
    let authorize = next
        .strip_prefix(authorize::PATH)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('?'));
    let invoice = next
        .strip_prefix("/dashboard/invoices/")
        .is_some_and(|id| !id.is_empty() && id.len() <= 64 && id.bytes().all(plain_id_byte));
    (plain && (authorize || invoice)).then_some(next)
}

/// A byte of an id the dashboard puts in a path (`[A-Za-z0-9_-]`).
fn plain_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn login_form(link: Option<&str>, error: Option<&str>, next: Option<&str>) -> String {
    let mut b = String::new();
    if let Some(e) = error {
        let _ = write!(b, "<p class=err>{}</p>", esc(e));
    }
    let next = next.and_then(safe_next);
    if let Some(n) = next {
        // The session cookie is `SameSite=Strict`: an app's link to the authorization page
        // arrives without it, a click on this server's own link sends it.
        let _ = write!(
            b,
            "<p>{} <a href=\"{}\">Already logged in in this browser? Continue</a></p>",
            if n.starts_with(authorize::PATH) {
                "An application asks for an API key of your store. Log in to see what it asks for."
            } else {
                "Log in to see this invoice."
            },
            esc(n)
        );
    }
    let next_field = next
        .map(|n| format!("<input type=hidden name=next value=\"{}\">", esc(n)))
        .unwrap_or_default();
    match link {
        Some(token) => {
            let _ = write!(
                b,
                "<form method=post action=\"/dashboard/login\"><p>This one-time link logs you \
                 in once.</p><input type=hidden name=link value=\"{}\">{next_field}\
                 <button>Log in</button></form>",
                esc(token)
            );
        }
        None => {
            let _ = write!(
                b,
                "<form method=post action=\"/dashboard/login\">{next_field}\
                 <label>Store id<input name=store inputmode=numeric autocomplete=username required></label>\
                 <label>Password<input name=password type=password autocomplete=current-password required></label>\
                 <button>Log in</button></form>\
                 <p class=muted>No password yet? Ask the operator for a one-time login link.</p>"
            );
        }
    }
    b
}

/// `GET /dashboard/login` (`?link=<token>`: a button that spends the one-time link; opening
/// the link changes nothing).
pub async fn login_page(RawQuery(q): RawQuery) -> Response {
    let query = Form::parse(q.as_deref().unwrap_or("").as_bytes()).unwrap_or(Form(Vec::new()));
    page(
        StatusCode::OK,
        "Log in",
        None,
        &login_form(query.get("link"), None, query.get("next")),
    )
}

/// `POST /dashboard/login`: `store` + `password`, or `link`. Sets the session cookie.
pub async fn login(
    State(st): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    form: Form,
) -> Response {
    match try_login(&st, &ip, &headers, &form).await {
        Ok(r) => r,
        Err(Refusal::Page(status, msg)) => page(
            status,
            "Log in",
            None,
            // A refused link is not offered again: the password form instead.
            &login_form(None, Some(&msg), form.get("next")),
        ),
        Err(e) => e.into_response(),
    }
}

const LOGIN_FAILED: &str = "Wrong store id or password.";
const LINK_FAILED: &str = "This login link is not valid: it is wrong, used or expired.";

async fn try_login(
    st: &AppState,
    ip: &str,
    headers: &HeaderMap,
    form: &Form,
) -> Result<Response, Refusal> {
    if !same_origin(st, headers) {
        return Err(Refusal::Page(
            StatusCode::FORBIDDEN,
            "This form came from another site.".into(),
        ));
    }
    st.charge_ip_addr(ip, 1)?;
    let limiter = st
        .merchant()
        .logins
        .get_or_init(|| api::ratelimit::Limiter::new(LOGINS_PER_MIN));
    let limited = |who: &str| {
        matches!(
            limiter.charge(who, 1, now_ms()),
            api::ratelimit::Charge::Limited { .. }
        )
    };
    if limited(&format!("ip:{ip}")) {
        return Err(Refusal::Page(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many login attempts; wait a minute and try again.".into(),
        ));
    }
    // The store and its password hash as the login saw it (`None`: no password): the session
    // is written only while the hash is still that one (below).
    let (account, seen) = if let Some(token) = form.get("link").filter(|t| !t.is_empty()) {
        let hash = sha256_hex(token.trim());
        let now = now_ms();
        // Spent in the same statement that checks it: used twice, only one wins.
        let found = with_db(st, move |c| {
            let tx = c.transaction().map_err(db_error)?;
            let account = tx
                .query_row(
                    "UPDATE dashboard_link SET used_ms = ?2
                     WHERE hash = ?1 AND used_ms IS NULL AND expires_ms > ?2 RETURNING merchant",
                    params![hash, now],
                    |r| r.get::<_, u32>(0),
                )
                .optional()
                .map_err(db_error)?;
            let found = match account {
                Some(a) => Some((a, stored_phc(&tx, a)?)),
                None => None,
            };
            tx.commit().map_err(db_error)?;
            Ok(found)
        })
        .await?;
        found.ok_or_else(|| Refusal::Page(StatusCode::UNAUTHORIZED, LINK_FAILED.into()))?
    } else {
        let fail = || Refusal::Page(StatusCode::UNAUTHORIZED, LOGIN_FAILED.into());
        let store = form.text("store").to_owned();
        // Keyed by the store the text names ("7", "07" and "+7" are one store), so spelling it
        // differently buys no more attempts.
        let store_key = store
            .parse::<u32>()
            .map_or_else(|_| format!("text:{store}"), |a| a.to_string());
        // A browser that logged in to this store before spends its own budget: wrong
        // passwords from anyone else cannot lock it out.
        let device = match store.parse::<u32>() {
            Ok(a) => known_device(st, headers, a).await?,
            Err(_) => None,
        };
        let budget = match &device {
            Some(hash) => format!("device:{hash}"),
            None => format!("store:{store_key}"),
        };
        if limited(&budget) {
            return Err(Refusal::Page(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many login attempts; wait a minute and try again.".into(),
            ));
        }
        let password = form.get("password").unwrap_or("").to_owned();
        let account = store.parse::<u32>().ok();
        let phc = match account {
            Some(a) => with_db(st, move |c| stored_phc(c, a)).await?,
            None => None,
        };
        let seen = phc.clone();
        let good = st
            .merchant()
            .passwords
            .run(move || {
                let against = match &phc {
                    Some(p) => p.as_str(),
                    None => dummy_phc(),
                };
                verify_password(&password, against)
            })
            .await
            .map_err(|passwords::Busy| busy_checking())?;
        match account {
            Some(a) if good && seen.is_some() => (a, seen),
            _ => return Err(fail()),
        }
    };
    let id = random_hex()?;
    let csrf = random_hex()?;
    let hash = sha256_hex(&id);
    let now = now_ms();
    // A device cookie for a browser that has none of this store yet.
    let device = match known_device(st, headers, account).await? {
        Some(_) => None,
        None => Some(random_hex()?),
    };
    let device_hash = device.as_deref().map(sha256_hex);
    let opened = with_db(st, move |c| {
        let tx = c.transaction().map_err(db_error)?;
        tx.execute(
            "DELETE FROM dashboard_session WHERE expires_ms <= ?1",
            params![now],
        )
        .map_err(db_error)?;
        tx.execute(
            "DELETE FROM dashboard_flash WHERE session NOT IN (SELECT hash FROM dashboard_session)",
            [],
        )
        .map_err(db_error)?;
        // Only while the store's password is the one the login checked: a change in between
        // (which logs out the store's sessions in its own transaction) must not be outlived by
        // a session it could not see yet. The hash has a fresh salt each time, so setting the
        // same password again is a change too.
        let opened = tx
            .execute(
                "INSERT INTO dashboard_session (hash, merchant, csrf, created_ms, expires_ms)
                 SELECT ?1, ?2, ?3, ?4, ?5
                 WHERE (SELECT phc FROM dashboard_password WHERE merchant = ?2) IS ?6",
                params![
                    hash,
                    account,
                    csrf,
                    now,
                    now.saturating_add(SESSION_TTL_MS),
                    seen
                ],
            )
            .map_err(db_error)?
            == 1;
        if !opened {
            return Ok(false);
        }
        if let Some(d) = device_hash {
            tx.execute(
                "INSERT INTO dashboard_device (hash, merchant, created_ms) VALUES (?1, ?2, ?3)",
                params![d, account, now],
            )
            .map_err(db_error)?;
            // The newest few per store, none expired.
            tx.execute(
                "DELETE FROM dashboard_device WHERE created_ms <= ?1 OR (merchant = ?2 AND hash NOT IN
                   (SELECT hash FROM dashboard_device WHERE merchant = ?2
                    ORDER BY created_ms DESC, hash LIMIT ?3))",
                params![
                    now.saturating_sub(DEVICE_TTL_MS),
                    account,
                    DEVICES_PER_STORE
                ],
            )
            .map_err(db_error)?;
        }
        tx.commit().map_err(db_error)?;
        Ok(true)
    })
    .await?;
    if !opened {
        return Err(Refusal::Page(
            StatusCode::UNAUTHORIZED,
            "The store's password changed while you were logging in; log in with the new one."
                .into(),
        ));
    }
    let mut r = redirect(form.get("next").and_then(safe_next).unwrap_or("/dashboard"));
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL_MS / 1000,
        secure_attr(st)
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    if let Some(d) = device {
        let cookie = format!(
            "{DEVICE_COOKIE}={d}; Path=/dashboard/login; HttpOnly; SameSite=Strict; Max-Age={}{}",
            DEVICE_TTL_MS / 1000,
            secure_attr(st)
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    Ok(r)
}

/// The store's password hash, if it has a password.
fn stored_phc(c: &Connection, account: u32) -> Result<Option<String>, ApiError> {
    c.query_row(
        "SELECT phc FROM dashboard_password WHERE merchant = ?1",
        params![account],
        |r| r.get::<_, String>(0),
    )
    .optional()
    .map_err(db_error)
}

/// A login refused because no password check was free in time ([`passwords::PASSWORD_WAIT`]):
/// nothing was checked or counted.
fn busy_checking() -> Refusal {
    Refusal::Page(
        StatusCode::SERVICE_UNAVAILABLE,
        "The server is busy checking passwords; try again in a moment.".into(),
    )
}

/// `; Secure` unless the server is configured to be reached over plain HTTP (`public_url`
/// starting `http://`, e.g. a localhost setup).
fn secure_attr(st: &AppState) -> &'static str {
    match st.cfg().public_url.as_deref() {
        Some(u) if u.starts_with("http://") => "",
        _ => "; Secure",
    }
}

/// `POST /dashboard/logout`: deletes the session.
pub async fn logout(
    State(st): State<AppState>,
    s: Session,
    form: Form,
) -> Result<Response, Refusal> {
    s.check_form(&st, &form)?;
    let hash = s.hash.clone();
    with_db(&st, move |c| {
        c.execute(
            "DELETE FROM dashboard_session WHERE hash = ?1",
            params![hash],
        )
        .map_err(db_error)?;
        c.execute(
            "DELETE FROM dashboard_flash WHERE session = ?1",
            params![hash],
        )
        .map_err(db_error)
    })
    .await?;
    let mut r = redirect("/dashboard/login");
    let cookie = format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        secure_attr(&st)
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

// ---- pages ----

/// `GET /dashboard`: the store, its point-of-sale link, balances and withdrawals (read-only).
pub async fn home(State(st): State<AppState>, s: Session) -> Result<Response, Refusal> {
    let store = call(gf::get_store(
        State(st.clone()),
        Path(s.store()),
        s.gf(json!({})),
    ))
    .await?;
    let account = s.account;
    let settings = with_db(&st, move |c| {
        super::store::settings_or_default(c, account).map_err(db_error)
    })
    .await?;
    let base = st
        .cfg()
        .public_url
        .as_deref()
        .unwrap_or("")
        .trim_end_matches('/');
    let waiting = gf::awaiting_count(&st, account).await?;
    let mut b = take_flash(&st, &s).await?;
    // Claims that wait for the owner (a shop plugin's refunds): said first, since nobody is paid
    // until the owner acts.
    if waiting > 0 {
        let _ = write!(
            b,
            "<p class=err><a href=\"/dashboard/refunds\">{waiting} payout{} await{} your \
             approval</a>.</p>",
            if waiting == 1 { "" } else { "s" },
            if waiting == 1 { "s" } else { "" },
        );
    }
    let _ = write!(
        b,
        "<section><h2>{}</h2><p>Store id <code>{}</code> · currency {}</p>",
        esc(&txt(&store["name"])),
        esc(&txt(&store["id"])),
        esc(&txt(&store["defaultCurrency"]))
    );
    match &settings.pos_token {
        Some(t) => {
            let _ = write!(
                b,
                "<p>Point of sale: <a class=addr href=\"{base}/pos/{t}\">{base}/pos/{t}</a></p>",
                base = esc(base),
                t = esc(t)
            );
        }
        None => b.push_str(
            "<p class=muted>The point of sale is off (turn it on in \
             <a href=\"/dashboard/settings\">Settings</a>).</p>",
        ),
    }
    b.push_str("</section><section><h2>Balance</h2><table><tr><th>Asset<th>Free<th>Locked");
    let balances = st
        .read_model()
        .read()
        .balances
        .get(&account)
        .cloned()
        .unwrap_or_default();
    for (i, (free, locked)) in balances.iter().enumerate() {
        if let Some(a) = st.markets().assets.get(i) {
            let _ = write!(
                b,
                "<tr><td>{}<td class=num>{}<td class=num>{}",
                esc(&a.symbol),
                api::decimal::format_units(*free, a.decimals),
                api::decimal::format_units(*locked, a.decimals)
            );
        }
    }
    b.push_str("</table></section><section><h2>Withdrawals</h2>");
    match st.custody() {
        None => b.push_str("<p class=muted>Custody is not attached.</p>"),
        Some(c) => {
            let (fee_sat, min_sat) = c.withdrawal_terms();
            let _ = write!(
                b,
                "<form method=post action=\"/dashboard/withdraw\">{}\
                 <input type=hidden name=key value=\"{}\">\
                 <label>Bitcoin address<input name=address maxlength=128 autocomplete=off \
                 spellcheck=false required></label>\
                 <label>Amount (BTC)<input name=amount inputmode=decimal required></label>\
                 <label>Store password (again, to confirm)<input name=password type=password \
                 autocomplete=current-password required></label>\
                 <button>Request withdrawal</button></form>\
                 <p class=muted>Fee {} BTC, minimum {} BTC. The same path as the signed API's \
                 <code>withdraw/apply</code>: custody's limits, approvals and address checks apply. \
                 Submitting this form twice requests one withdrawal.</p>",
                csrf_field(&s),
                esc(&new_withdraw_key()?),
                api::decimal::format_units(fee_sat, 8),
                api::decimal::format_units(min_sat, 8)
            );
            let ws = tokio::task::spawn_blocking(move || c.withdrawals(Some(account)))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            if ws.is_empty() {
                b.push_str("<p class=muted>No withdrawals.</p>");
            } else {
                b.push_str("<table><tr><th>Id<th>Amount BTC<th>Address<th>State");
                for w in ws.iter().rev().take(50) {
                    let _ = write!(
                        b,
                        "<tr><td>{}<td class=num>{}<td class=addr>{}<td>{}",
                        w.id,
                        api::decimal::format_units(w.amount_sat, 8),
                        esc(&w.address),
                        esc(&format!("{:?}", w.state))
                    );
                }
                b.push_str("</table>");
            }
        }
    }
    b.push_str("</section>");
    Ok(page(StatusCode::OK, "Store", Some(&s), &b))
}

const STATUSES: [&str; 5] = ["New", "Processing", "Settled", "Expired", "Invalid"];

fn date_secs(d: &str, end: bool) -> Option<u64> {
    // YYYY-MM-DD (the browser's date input) → unix seconds at the day's start (or end).
    let mut it = d.split('-');
    let (y, m, day) = (
        it.next()?.parse::<i64>().ok()?,
        it.next()?.parse::<i64>().ok()?,
        it.next()?.parse::<i64>().ok()?,
    );
    // Four-digit years, as the date input sends (a larger one would overflow the day count).
    if it.next().is_some()
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || !(1970..=9999).contains(&y)
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let start = u64::try_from(days.checked_mul(86_400)?).ok()?;
    Some(if end { start + 86_399 } else { start })
}

fn time_str(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// `GET /dashboard/invoices`: `q` (an invoice id or an order id), `status`, `from`, `to`
/// (dates) — through Greenfield's invoice list.
pub async fn invoices(
    State(st): State<AppState>,
    s: Session,
    RawQuery(q): RawQuery,
) -> Result<Response, Refusal> {
    let form = Form::parse(q.as_deref().unwrap_or("").as_bytes())?;
    let search = form.text("q").to_owned();
    let status = form.text("status").to_owned();
    let (from, to) = (form.text("from").to_owned(), form.text("to").to_owned());
    let mut gq = vec!["take=200".to_owned()];
    if STATUSES.contains(&status.as_str()) {
        gq.push(format!("status={status}"));
    }
    if let Some(t) = date_secs(&from, false) {
        gq.push(format!("startDate={t}"));
    }
    if let Some(t) = date_secs(&to, true) {
        gq.push(format!("endDate={t}"));
    }
    let mut rows: Vec<Value> = Vec::new();
    if !search.is_empty() {
        // An invoice id, or else an order id.
        if let Ok(v) = call(gf::get_invoice(
            State(st.clone()),
            Path((s.store(), search.clone())),
            s.gf(json!({})),
        ))
        .await
        {
            rows.push(v);
        }
        gq.push(format!("orderId={}", pct(&search)));
    }
    if rows.is_empty() {
        let v = call(gf::list_invoices(
            State(st.clone()),
            Path(s.store()),
            RawQuery(Some(gq.join("&"))),
            s.gf(json!({})),
        ))
        .await?;
        rows = v.as_array().cloned().unwrap_or_default();
    }
    let mut b = String::from("<form method=get class=filters>");
    let _ = write!(
        b,
        "<label>Search<input name=q value=\"{}\" placeholder=\"invoice id or order id\"></label>\
         <label>Status<select name=status><option value=\"\">Any</option>",
        esc(&search)
    );
    for st_name in STATUSES {
        let sel = if st_name == status { " selected" } else { "" };
        let _ = write!(b, "<option{sel}>{st_name}</option>");
    }
    let _ = write!(
        b,
        "</select></label><label>From<input type=date name=from value=\"{}\"></label>\
         <label>To<input type=date name=to value=\"{}\"></label><button>Filter</button></form>",
        esc(&from),
        esc(&to)
    );
    if rows.is_empty() {
        b.push_str("<p class=muted>No invoices match.</p>");
    }
    b.push_str("<ul class=cards>");
    for v in &rows {
        let id = txt(&v["id"]);
        let _ = write!(
            b,
            "<li><a href=\"/dashboard/invoices/{}\"><span class=\"badge {}\">{}</span> \
             <b>{} {}</b><br><span class=muted>{} · order {}</span></a></li>",
            pct(&id),
            esc(&txt(&v["status"]).to_ascii_lowercase()),
            esc(&txt(&v["status"])),
            esc(&txt(&v["amount"])),
            esc(&txt(&v["currency"])),
            time_str(v["createdTime"].as_u64().unwrap_or(0)),
            esc(&txt(&v["metadata"]["orderId"]))
        );
    }
    b.push_str("</ul>");
    Ok(page(StatusCode::OK, "Invoices", Some(&s), &b))
}

/// `GET /invoices/{id}` (BTCPay's path of the owner's invoice page, which shop plugins link
/// from their orders): a redirect to the dashboard's page of the invoice. Changes nothing.
pub async fn invoice_link(Path(id): Path<String>) -> Response {
    let plain = !id.is_empty() && id.len() <= 64 && id.bytes().all(plain_id_byte);
    if plain {
        redirect(&format!("/dashboard/invoices/{id}"))
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

/// `GET /dashboard/invoices/{id}`: the invoice, its payments, webhook deliveries (redeliver),
/// its refunds, and the refund form.
pub async fn invoice(
    State(st): State<AppState>,
    s: Session,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let inv = call(gf::get_invoice(
        State(st.clone()),
        Path((s.store(), id.clone())),
        s.gf(json!({})),
    ))
    .await?;
    let pms = call(gf::invoice_payment_methods(
        State(st.clone()),
        Path((s.store(), id.clone())),
        s.gf(json!({})),
    ))
    .await?;
    let (merchant, iid) = (s.account, id.clone());
    let (deliveries, refunds) = with_db(&st, move |c| {
        let mut q = c
            .prepare(
                "SELECT id, hook, event, status, attempts, created_ms FROM webhook_deliveries
                 WHERE merchant = ?1 AND invoice_id = ?2 ORDER BY created_ms DESC LIMIT 100",
            )
            .map_err(db_error)?;
        let d = q
            .query_map(params![merchant, iid], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, u32>(4)?,
                    r.get::<_, u64>(5)?,
                ))
            })
            .map_err(db_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db_error)?;
        let mut q = c
            .prepare(
                "SELECT id, amount_sat FROM gf_pull_payment WHERE merchant = ?1 AND invoice_id = ?2
                 ORDER BY created_ms DESC",
            )
            .map_err(db_error)?;
        let r = q
            .query_map(params![merchant, iid], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?))
            })
            .map_err(db_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db_error)?;
        Ok((d, r))
    })
    .await?;
    let mut b = take_flash(&st, &s).await?;
    let _ = write!(
        b,
        "<section><p><span class=\"badge {}\">{}</span> {}</p><dl>\
         <dt>Amount<dd>{} {}<dt>Order id<dd>{}<dt>Created<dd>{}<dt>Expires<dd>{}\
         <dt>Checkout<dd><a href=\"{}\">open the checkout page</a></dl></section>",
        esc(&txt(&inv["status"]).to_ascii_lowercase()),
        esc(&txt(&inv["status"])),
        esc(&Some(txt(&inv["additionalStatus"]))
            .filter(|a| a != "None")
            .unwrap_or_default()),
        esc(&txt(&inv["amount"])),
        esc(&txt(&inv["currency"])),
        esc(&txt(&inv["metadata"]["orderId"])),
        time_str(inv["createdTime"].as_u64().unwrap_or(0)),
        time_str(inv["expirationTime"].as_u64().unwrap_or(0)),
        esc(&txt(&inv["checkoutLink"]))
    );
    b.push_str("<section><h2>Payments</h2>");
    let mut any = false;
    for pm in pms.as_array().into_iter().flatten() {
        let _ = write!(
            b,
            "<p class=muted>To <span class=addr>{}</span> · paid {} of {} BTC</p>",
            esc(&txt(&pm["destination"])),
            esc(&txt(&pm["totalPaid"])),
            esc(&txt(&pm["amount"]))
        );
        for p in pm["payments"].as_array().into_iter().flatten() {
            any = true;
            let _ = write!(
                b,
                "<p>{} BTC · {} · {}<br><span class=addr>{}</span></p>",
                esc(&txt(&p["value"])),
                esc(&txt(&p["status"])),
                time_str(p["receivedDate"].as_u64().unwrap_or(0)),
                esc(&txt(&p["id"]))
            );
        }
    }
    if !any {
        b.push_str("<p class=muted>No payments yet.</p>");
    }
    b.push_str("</section><section><h2>Webhook deliveries</h2>");
    if deliveries.is_empty() {
        b.push_str("<p class=muted>None.</p>");
    }
    for (did, hook, event, status, attempts, created) in &deliveries {
        let _ = write!(
            b,
            "<div class=row><span>{} · <b>{}</b> · {} attempt(s) · {}</span>",
            esc(event),
            esc(status),
            attempts,
            time_str(created / 1000)
        );
        if let Some(h) = hook {
            let _ = write!(
                b,
                "<form method=post action=\"/dashboard/invoices/{}/redeliver\">{}\
                 <input type=hidden name=hook value=\"{}\"><input type=hidden name=delivery value=\"{}\">\
                 <button>Redeliver</button></form>",
                pct(&id),
                csrf_field(&s),
                esc(h),
                esc(did)
            );
        }
        b.push_str("</div>");
    }
    b.push_str("</section><section><h2>Refunds</h2>");
    // A claim link pays whoever holds it: shown once, by the message after the refund was made
    // (with the password), never again here (a session alone is no right to move money).
    for (_, sat) in &refunds {
        let _ = write!(
            b,
            "<p>{} BTC · its claim link was shown when the refund was made</p>",
            api::decimal::format_units(*sat, 8),
        );
    }
    let _ = write!(
        b,
        "<form method=post action=\"/dashboard/invoices/{}/refund\">{}\
         <label>Amount<select name=variant>\
         <option value=RateThen>What was paid (rate at the time)</option>\
         <option value=CurrentRate>Invoice amount at today's rate</option>\
         <option value=OverpaidAmount>Only the overpayment</option>\
         <option value=Custom>Custom amount</option></select></label>\
         <label>Custom amount<input name=amount inputmode=decimal></label>\
         <label>Custom currency<input name=currency value=BTC></label>\
         <label>Store password (again, to confirm)<input name=password type=password \
         autocomplete=current-password required></label>\
         <button>Create refund</button></form>\
         <p class=muted>A refund is a pull payment: send its claim page to the customer, who \
         enters an address; the payout goes through custody's withdrawal limits and approvals.</p>\
         </section>",
        pct(&id),
        csrf_field(&s)
    );
    Ok(page(StatusCode::OK, &format!("Invoice {id}"), Some(&s), &b))
}

/// `POST /dashboard/invoices/{id}/redeliver`: `hook`, `delivery` — Greenfield's redeliver.
pub async fn redeliver(
    State(st): State<AppState>,
    s: Session,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, Refusal> {
    s.check_form(&st, &form)?;
    let hook = form.text("hook").to_owned();
    let delivery = form.text("delivery").to_owned();
    call(gf::redeliver(
        State(st.clone()),
        Path((s.store(), hook, delivery)),
        s.gf(json!({})),
    ))
    .await?;
    done(
        &st,
        &s,
        &format!("/dashboard/invoices/{}", pct(&id)),
        "Redelivery queued.".into(),
    )
    .await
}

/// `POST /dashboard/invoices/{id}/refund`: `variant`, `amount`, `currency`, `password` (step-up)
/// — Greenfield's refund (a pull payment). Its claim link pays the store's money to any
/// address, so, like a withdrawal, it needs the store's password again (ADR 0015).
pub async fn refund(
    State(st): State<AppState>,
    s: Session,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, Refusal> {
    s.check_form(&st, &form)?;
    step_up(&st, &s, form.password(), StepUp::Refund).await?;
    // Its claim link pays any address: none while the withdrawal address list is on.
    refuse_while_list_on(&st, s.account, "a refund", StepUp::Refund.nothing()).await?;
    let mut body = Map::new();
    body.insert("refundVariant".into(), json!(form.text("variant")));
    if form.text("variant") == "Custom" {
        body.insert("customAmount".into(), json!(form.text("amount")));
        let c = form.text("currency");
        body.insert(
            "customCurrency".into(),
            json!(if c.is_empty() { "BTC" } else { c }),
        );
    }
    let pp = call(gf::refund(
        State(st.clone()),
        Path((s.store(), id.clone())),
        s.gf(Value::Object(body)),
    ))
    .await?;
    // The claim link is a bearer credential: shown by the page, never put in its URL.
    put_flash(
        &st,
        &s,
        format!(
            "Refund of {} BTC created: {}",
            txt(&pp["amount"]),
            txt(&pp["viewLink"])
        ),
    )
    .await?;
    Ok(redirect(&format!("/dashboard/invoices/{}", pct(&id))))
}

/// `GET /dashboard/refunds`: the payouts waiting for the owner's approval (claims on refunds
/// and pull payments made by a shop plugin's `cancreatenonapprovedpullpayments` token), each
/// with its pull payment's name, description, limit and invoice, to approve (with the
/// password) or cancel; then the store's pull payments.
pub async fn refunds(State(st): State<AppState>, s: Session) -> Result<Response, Refusal> {
    let waiting = gf::awaiting_payouts(&st, s.account).await?;
    let v = call(gf::list_pull_payments(
        State(st.clone()),
        Path(s.store()),
        RawQuery(None),
        s.gf(json!({})),
    ))
    .await?;
    // Only the server's own messages here (never one from the URL: the password is typed on
    // this page).
    let mut b = take_flash(&st, &s).await?;
    b.push_str("<section><h2>Payouts awaiting your approval</h2>");
    if waiting.is_empty() {
        b.push_str("<p class=muted>None.</p>");
    }
    for p in &waiting {
        let id = pct(&p.id);
        let what = match &p.invoice_id {
            Some(i) => format!(
                "refund of invoice <a href=\"/dashboard/invoices/{}\">{}</a>",
                pct(i),
                esc(i)
            ),
            None => "pull payment".to_owned(),
        };
        let _ = write!(
            b,
            "<div class=row><span><b>{} BTC</b> to <span class=addr>{}</span> · claimed {}<br>\
             {what} “{}” (up to {} BTC){}</span>\
             <form method=post action=\"/dashboard/payouts/{id}/approve\">{csrf}\
             <input type=password name=password placeholder=\"store password\" \
             autocomplete=current-password required><button>Approve and pay</button></form>\
             <form method=post action=\"/dashboard/payouts/{id}/cancel\">{csrf}\
             <button>Cancel</button></form></div>",
            crate::routes::btc(p.amount_sat),
            esc(&p.destination),
            time_str(p.created_ms / 1000),
            esc(&p.name),
            crate::routes::btc(p.limit_sat),
            if p.description.is_empty() {
                String::new()
            } else {
                format!("<br><span class=muted>{}</span>", esc(&p.description))
            },
            csrf = csrf_field(&s),
        );
    }
    b.push_str("</section><section><h2>Refunds and pull payments</h2><ul class=cards>");
    let list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        b.push_str("<li class=muted>No refunds or pull payments yet.</li>");
    }
    // No claim links (they pay whoever holds them; shown once, when made): each is archived
    // by a handle, a hash of its id.
    for p in &list {
        let _ = write!(
            b,
            "<li><b>{} BTC</b> · {}{}             <form method=post action=\"/dashboard/pull-payments/{}/archive\">{}             <button>Archive: no more claims</button></form></li>",
            esc(&txt(&p["amount"])),
            esc(&txt(&p["name"])),
            if p["autoApproveClaims"] == false {
                " · claims wait for your approval"
            } else {
                ""
            },
            pp_handle(&txt(&p["id"])),
            csrf_field(&s),
        );
    }
    b.push_str(
        "</ul><p class=muted>Create a refund from an invoice's page; its claim link is shown \
         once, then.</p></section>",
    );
    Ok(page(
        StatusCode::OK,
        "Refunds and pull payments",
        Some(&s),
        &b,
    ))
}

/// `POST /dashboard/payouts/{id}/approve`: `password` (step-up) — Greenfield's approval of a
/// payout awaiting it ([`gf::approve_payout`]): the claim is paid to the address its claimant
/// gave, so it needs the store's password again, as a withdrawal.
pub async fn approve_payout(
    State(st): State<AppState>,
    s: Session,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, Refusal> {
    s.check_form(&st, &form)?;
    step_up(&st, &s, form.password(), StepUp::Payout).await?;
    let p = call(gf::approve_payout(
        State(st.clone()),
        Path((s.store(), id)),
        s.gf(json!({"revision": 0})),
    ))
    .await?;
    put_flash(
        &st,
        &s,
        format!(
            "Payout of {} BTC to {} approved: {}.",
            txt(&p["payoutAmount"]),
            txt(&p["destination"]),
            txt(&p["state"])
        ),
    )
    .await?;
    Ok(redirect("/dashboard/refunds"))
}

/// A pull payment's handle on the dashboard: the first 32 hex digits of the SHA-256 of its id
/// (the id is the right to claim it, and is never put on a page after it was shown once).
pub(crate) fn pp_handle(id: &str) -> String {
    sha256_hex(&format!("mediator/dashboard-pull-payment/v1/{id}"))[..32].to_owned()
}

/// `POST /dashboard/pull-payments/{handle}/archive`: archives a pull payment of the store
/// ([`gf::archive_pull_payment`]: no claim after it, its claims waiting for approval cancelled).
/// No password: it only stops money going out. An unknown handle: 404, nothing changed.
pub async fn archive_pull_payment(
    State(st): State<AppState>,
    s: Session,
    Path(handle): Path<String>,
    form: Form,
) -> Result<Response, Refusal> {
    s.check_form(&st, &form)?;
    let v = call(gf::list_pull_payments(
        State(st.clone()),
        Path(s.store()),
        RawQuery(None),
        s.gf(json!({})),
    ))
    .await?;
    let Some(p) = v
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| pp_handle(&txt(&p["id"])) == handle)
    else {
        return Err(Refusal::Page(
            StatusCode::NOT_FOUND,
            "No such pull payment.".into(),
        ));
    };
    call(gf::archive_pull_payment(
        State(st.clone()),
        Path((s.store(), txt(&p["id"]))),
        s.gf(json!({})),
    ))
    .await?;
    put_flash(
        &st,
        &s,
        format!(
            "Pull payment “{}” archived: it takes no more claims; its claims waiting for your              approval are cancelled.",
            txt(&p["name"])
        ),
    )
    .await?;
    Ok(redirect("/dashboard/refunds"))
}

/// `POST /dashboard/payouts/{id}/cancel`: cancels a payout awaiting approval (its amount may be
/// claimed again).
pub async fn cancel_payout(
    State(st): State<AppState>,
    s: Session,
    Path(id): Path<String>,
    form: Form,
) -> Result<Response, Refusal> {
    s.check_form(&st, &form)?;
    call(gf::cancel_payout(
        State(st.clone()),
        Path((s.store(), id)),
        s.gf(json!({})),
    ))
    .await?;
    put_flash(&st, &s, "Payout cancelled.".to_owned()).await?;
    Ok(redirect("/dashboard/refunds"))
}

/// `GET /dashboard/settings`: the store settings form.
pub async fn settings(State(st): State<AppState>, s: Session) -> Result<Response, Refusal> {
    let v = call(gf::get_store(
        State(st.clone()),
        Path(s.store()),
        s.gf(json!({})),
    ))
    .await?;
    let mut b = take_flash(&st, &s).await?;
    let _ = write!(
        b,
        "<form method=post action=\"/dashboard/settings\">{}\
         <label>Name<input name=name value=\"{}\" maxlength=64 required></label>\
         <label>Currency<input name=currency value=\"{}\"></label>\
         <label>Invoice expiry (minutes)<input name=expiry inputmode=numeric value=\"{}\"></label>\
         <label>Payment tolerance (%)<input name=tolerance inputmode=decimal value=\"{}\"></label>\
         <label>Speed<select name=speed>",
        csrf_field(&s),
        esc(&txt(&v["name"])),
        esc(&txt(&v["defaultCurrency"])),
        v["invoiceExpiration"].as_u64().unwrap_or(0) / 60,
        esc(&txt(&v["paymentTolerance"]))
    );
    for sp in ["HighSpeed", "MediumSpeed", "LowMediumSpeed", "LowSpeed"] {
        let sel = if v["speedPolicy"] == sp {
            " selected"
        } else {
            ""
        };
        let _ = write!(b, "<option{sel}>{sp}</option>");
    }
    b.push_str("</select></label><button>Save</button></form>");
    let account = s.account;
    let settings = with_db(&st, move |c| {
        super::store::settings_or_default(c, account).map_err(db_error)
    })
    .await?;
    b.push_str("<h2>Point of sale</h2>");
    let (switch_to, label) = match &settings.pos_token {
        Some(t) => {
            let base = st
                .cfg()
                .public_url
                .as_deref()
                .unwrap_or("")
                .trim_end_matches('/');
            let _ = write!(
                b,
                "<p>On: <a class=\"addr pos-link\" href=\"{base}/pos/{t}\">{base}/pos/{t}</a></p>",
                base = esc(base),
                t = esc(t)
            );
            ("off", "Turn the point of sale off")
        }
        None => {
            b.push_str(
                "<p class=muted>Off. Turned on, the store gets a public page where a cashier \
                 types an amount and the customer pays its invoice.</p>",
            );
            ("on", "Turn the point of sale on")
        }
    };
    let _ = write!(
        b,
        "<form method=post action=\"/dashboard/settings/pos\">{}\
         <input type=hidden name=pos value={switch_to}><button>{label}</button></form>",
        csrf_field(&s)
    );
    Ok(page(StatusCode::OK, "Store settings", Some(&s), &b))
}

/// `POST /dashboard/settings/pos`: `pos` (`on` or `off`) — the signed merchant API's store
/// update ([`super::routes::update_store`], `posEnabled`) for the session's store.
pub async fn save_pos(
    State(st): State<AppState>,
    s: Session,
    form: Form,
) -> Result<Response, Refusal> {
    s.check_form(&st, &form)?;
    // The signed API's route needs `merchant`; so does the session.
    if !s.principal().perms.has(Perms::MERCHANT) {
        return Err(Refusal::Page(
            StatusCode::FORBIDDEN,
            "This session may not change the store.".into(),
        ));
    }
    let on = match form.text("pos") {
        "on" => true,
        "off" => false,
        _ => return Err(bad("Choose on or off for the point of sale.")),
    };
    super::routes::update_store(
        &st,
        s.account,
        super::routes::StoreUpdate {
            pos: Some(on),
            ..Default::default()
        },
    )
    .await?;
    let msg = if on {
        "Point of sale turned on."
    } else {
        "Point of sale turned off."
    };
    done(&st, &s, "/dashboard/settings", msg.into()).await
}

/// The prefix of the idempotency keys (`withdrawOrderId`) of dashboard withdrawal forms.
const WITHDRAW_KEY_PREFIX: &str = "dash-";

/// A new withdrawal form's idempotency key: [`WITHDRAW_KEY_PREFIX`] and 32 random hex digits.
fn new_withdraw_key() -> Result<String, Refusal> {
    let r = api::keys::random_bytes::<16>().map_err(|_| ApiError::internal())?;
    Ok(format!("{WITHDRAW_KEY_PREFIX}{}", hex::encode(r)))
}

/// What a step-up guards: names it in the refusals, which say that nothing was done.
#[derive(Clone, Copy)]
enum StepUp {
    /// A withdrawal (`POST /dashboard/withdraw`).
    Withdrawal,
    /// A token with `withdraw` (`POST /dashboard/tokens`).
    WithdrawToken,
    /// A refund: a pull payment whose claim link pays to any address.
    Refund,
    /// A change to the withdrawal address allow-list ([`crate::allowlist`]).
    AddressList,
    /// Approving a payout (paid to the address its claimant gave).
    Payout,
}

impl StepUp {
    fn what(self) -> &'static str {
        match self {
            Self::Withdrawal => "withdrawal",
            Self::WithdrawToken => "token with withdraw",
            Self::Refund => "refund",
            Self::AddressList => "change to the withdrawal addresses",
            Self::Payout => "payout approval",
        }
    }
    fn nothing(self) -> &'static str {
        match self {
            Self::Withdrawal => "Nothing was sent.",
            Self::WithdrawToken => "No token was created.",
            Self::Refund => "No refund was created.",
            Self::AddressList => "The list was not changed.",
            Self::Payout => "Nothing was paid.",
        }
    }
}

/// Failed step-up passwords a minute per store, all its sessions together: looser than the
/// per-session limit ([`LOGINS_PER_MIN`]), so one session sending wrong passwords does not
/// lock the owner's session out.
pub const STEP_UP_FAILURES_PER_MIN_STORE: u64 = 30;

/// Step-up for what moves the store's money or guards it (a withdrawal, a `withdraw` token, a
/// refund, a change to the address list): the store's password again, checked like a login.
/// Only failed attempts count, apart from the logins: [`LOGINS_PER_MIN`] a minute per session
/// and [`STEP_UP_FAILURES_PER_MIN_STORE`] per store; a session or store past its count is
/// refused before the password is checked. A success counts nothing, so a session that sends
/// wrong passwords locks out itself, not the owner's session. A store without a password (a
/// session from a one-time link) can do none of these from the dashboard.
async fn step_up(st: &AppState, s: &Session, password: &str, act: StepUp) -> Result<(), Refusal> {
    let limiter = st
        .merchant()
        .step_ups
        .get_or_init(|| api::ratelimit::Limiter::new(STEP_UP_FAILURES_PER_MIN_STORE));
    let (by_session, by_store) = (
        format!("step-up:session:{}", s.hash),
        format!("step-up:store:{}", s.account),
    );
    // The store's step-ups take turns from the check below to the count of a failure.
    let turn = st
        .merchant()
        .step_up_turns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(s.account)
        .or_default()
        .clone();
    let _turn = turn.lock().await;
    // Weight 0 reads the count without adding to it.
    let used = |key: &str| match limiter.charge(key, 0, now_ms()) {
        api::ratelimit::Charge::Ok(used) | api::ratelimit::Charge::Limited { used, .. } => used,
    };
    if used(&by_session) >= LOGINS_PER_MIN || used(&by_store) >= STEP_UP_FAILURES_PER_MIN_STORE {
        return Err(Refusal::Page(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "Too many password attempts; wait a minute and try again. {}",
                act.nothing()
            ),
        ));
    }
    let account = s.account;
    let phc = with_db(st, move |c| stored_phc(c, account)).await?;
    let Some(phc) = phc else {
        return Err(Refusal::Page(
            StatusCode::FORBIDDEN,
            format!(
                "A {} needs the store's password, and this store has none: ask the operator to \
                 set one (mediator dashboard password). {}",
                act.what(),
                act.nothing()
            ),
        ));
    };
    let password = password.to_owned();
    let checked = phc.clone();
    let good = st
        .merchant()
        .passwords
        .run(move || verify_password(&password, &phc))
        .await
        .map_err(|passwords::Busy| {
            Refusal::Page(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "The server is busy checking passwords; try again in a moment. {}",
                    act.nothing()
                ),
            )
        })?;
    if !good {
        let now = now_ms();
        limiter.charge(&by_session, 1, now);
        limiter.charge(&by_store, 1, now);
        return Err(Refusal::Page(
            StatusCode::UNAUTHORIZED,
            format!("Wrong password. {}", act.nothing()),
        ));
    }
    // The password may have changed while it was checked (a change logs out every session of
    // the store): the step-up stands only if the store's hash is still the one checked and
    // the session still open (review: a session that knew the old password finished its
    // withdrawal after the owner had changed it to shut that session out).
    let session = s.hash.clone();
    let still = with_db(st, move |c| {
        let open = c
            .query_row(
                "SELECT 1 FROM dashboard_session WHERE hash = ?1",
                params![session],
                |_| Ok(()),
            )
            .optional()
            .map_err(db_error)?
            .is_some();
        Ok(open && stored_phc(c, account)?.as_deref() == Some(checked.as_str()))
    })
    .await?;
    if !still {
        return Err(Refusal::Page(
            StatusCode::UNAUTHORIZED,
            format!(
                "The store's password changed meanwhile; log in again. {}",
                act.nothing()
            ),
        ));
    }
    Ok(())
}

/// `POST /dashboard/withdraw`: `address`, `amount` (BTC), `password` (step-up), `key` (the
/// form's idempotency key) — the signed API's `withdraw/apply` path
/// ([`api::capital::apply_withdrawal`]) for the session's store account. A key already used
/// by this account answers its withdrawal when address and amount match (a double submit, or
/// a retry after a lost answer: one withdrawal), and is refused otherwise.
pub async fn withdraw(
    State(st): State<AppState>,
    s: Session,
    form: Form,
) -> Result<Response, Refusal> {
    s.check_form(&st, &form)?;
    // Every session holds `withdraw` (`SESSION_PERMS`, ADR 0010): the gate is the store's
    // password, verified below on every withdrawal (ADR 0015).
    let key = form.text("key").to_owned();
    if !key.starts_with(WITHDRAW_KEY_PREFIX) {
        return Err(bad(
            "This form has no withdrawal key; reload the page. Nothing was sent.",
        ));
    }
    let address = form.text("address").to_owned();
    let amount = api::decimal::parse_units(form.text("amount"), 8)
        .ok()
        .filter(|a| *a > 0)
        .ok_or_else(|| {
            bad("The amount is a BTC amount above zero with at most 8 decimals. Nothing was sent.")
        })?;
    step_up(
        &st,
        &s,
        form.get("password").unwrap_or(""),
        StepUp::Withdrawal,
    )
    .await?;
    let account = s.account;
    // A form sent before (a double submit, or a retry after no clear answer) is answered by its
    // withdrawal first: the list may have changed since, and its refusal would say "Nothing
    // was sent" about a withdrawal that exists.
    let sent_before = already_sent(&st, account, &key, &address, amount)
        .await
        .map_err(|e| {
            Refusal::Page(
                e.status,
                format!(
                    "Refused ({}): custody could not be asked about this form: {}. Nothing was \
                     sent.",
                    e.code,
                    e.msg.trim_end_matches('.')
                ),
            )
        })?;
    if let Some(answer) = sent_before {
        return done(&st, &s, "/dashboard", answer?).await;
    }
    // The store's allow-list, when it has one (only a listed address past its delay), is
    // asked by `apply_withdrawal` itself, as for the signed API (`403`, `-4038`, the list's code).
    let sent =
        api::capital::apply_withdrawal(&st, account, address.clone(), amount, key.clone()).await;
    let w =
        match sent {
            Ok(w) => w,
            Err(e) if e.code == api::custody::DUPLICATE_WITHDRAWAL_KEY => {
                // Taken between the look-up above and this request: answered the same way.
                match already_sent(&st, account, &key, &address, amount).await? {
                    Some(answer) => return done(&st, &s, "/dashboard", answer?).await,
                    None => return Err(Refusal::Page(
                        StatusCode::CONFLICT,
                        "This form was already used for another withdrawal; reload the page to \
                         request a new one. Nothing was sent."
                            .into(),
                    )),
                }
            }
            // Anything but a definite refusal (the breaker, custody not attached) may have moved:
            // a failed custody task (`-1000` with 500) may have recorded the withdrawal.
            Err(e)
                if e.status.is_server_error()
                    && !(e.status == StatusCode::SERVICE_UNAVAILABLE
                        && matches!(e.code, -1000 | -1001)) =>
            {
                tracing::warn!(
                    account,
                    code = e.code,
                    "dashboard withdrawal: no clear answer"
                );
                return Err(Refusal::Page(
                    e.status,
                    "Custody gave no clear answer: the withdrawal may or may not have been \
                 requested. Sending this same form again is safe (it requests at most one \
                 withdrawal), or check the list of withdrawals."
                        .into(),
                ));
            }
            Err(e) => {
                return Err(Refusal::Page(
                    e.status,
                    format!(
                        "Refused ({}): {}. Nothing was sent.",
                        e.code,
                        e.msg.trim_end_matches('.')
                    ),
                ))
            }
        };
    let msg = format!(
        "Withdrawal {} of {} BTC requested ({:?}).",
        w.id,
        api::decimal::format_units(w.amount_sat, 8),
        w.state
    );
    done(&st, &s, "/dashboard", msg).await
}

/// The answer to a withdrawal form whose key this account already used, if it did: its
/// withdrawal when address and amount match ("already requested": one withdrawal however often
/// the form is sent; the message to show), `409` when they do not (nothing sent). `None`: the
/// key is unused.
async fn already_sent(
    st: &AppState,
    account: u32,
    key: &str,
    address: &str,
    amount: u64,
) -> Result<Option<Result<String, Refusal>>, ApiError> {
    let k = key.to_owned();
    let found = api::capital::call(st, move |c| c.withdrawal_by_key(account, &k)).await?;
    Ok(match found {
        None => None,
        Some(w)
            if w.account == account
                && w.idempotency_key == key
                && crate::allowlist::same_address(&w.address, address)
                && w.amount_sat == amount =>
        {
            Some(Ok(format!(
                "This form already requested withdrawal {} of {} BTC; it is not sent twice.",
                w.id,
                api::decimal::format_units(w.amount_sat, 8)
            )))
        }
        Some(_) => Some(Err(Refusal::Page(
            StatusCode::CONFLICT,
            "This form was already used for another withdrawal; reload the page to request a \
             new one. Nothing was sent."
                .into(),
        ))),
    })
}

/// Refuses what would move the store's money around its withdrawal address list (a token with
/// `withdraw`, a refund's pull payment: both pay any address) while the list is on
/// ([`crate::allowlist::is_on`], including its delay after the last removal): `403`
/// `address_list_on`, with `nothing` (what was not done).
async fn refuse_while_list_on(
    st: &AppState,
    account: u32,
    what: &str,
    nothing: &str,
) -> Result<(), Refusal> {
    let now = now_ms();
    let on = with_db(st, move |c| {
        crate::allowlist::is_on(c, account, now).map_err(db_error)
    })
    .await?;
    if on {
        return Err(Refusal::Page(
            StatusCode::FORBIDDEN,
            format!(
                "Refused ({LIST_ON_CODE}): this store's withdrawal address list is on, and {what} \
                 could pay any address; withdraw to a listed address instead, or empty the list \
                 (it stays on for its delay after the last removal). {nothing}"
            ),
        ));
    }
    Ok(())
}

/// The stable code of [`refuse_while_list_on`].
const LIST_ON_CODE: &str = "address_list_on";

/// `POST /dashboard/settings`: Greenfield's store update.
pub async fn save_settings(
    State(st): State<AppState>,
    s: Session,
    form: Form,
) -> Result<Response, Refusal> {
    s.check_form(&st, &form)?;
    let expiry = form
        .text("expiry")
        .parse::<u64>()
        .map_err(|_| bad("The invoice expiry is a whole number of minutes."))?;
    let body = json!({
        "name": form.text("name"),
        "defaultCurrency": form.text("currency"),
        "invoiceExpiration": expiry.saturating_mul(60),
        "paymentTolerance": form.text("tolerance"),
        "speedPolicy": form.text("speed"),
    });
    call(gf::put_store(
        State(st.clone()),
        Path(s.store()),
        s.gf(body),
    ))
    .await?;
    done(&st, &s, "/dashboard/settings", "Settings saved.".into()).await
}

/// `GET /dashboard/tokens`: the store's API keys (never secrets) and the create form.
pub async fn tokens(State(st): State<AppState>, s: Session) -> Result<Response, Refusal> {
    let mut b = take_flash(&st, &s).await?;
    b.push_str("<ul class=cards>");
    let keys = st.keys().of_account(s.account);
    if keys.is_empty() {
        b.push_str("<li class=muted>No API keys.</li>");
    }
    for k in &keys {
        let label = esc(if k.label.is_empty() {
            "(no label)"
        } else {
            &k.label
        });
        let perms = esc(&k.perms.names().join(", "));
        if TOKEN_PERMS.has(k.perms) {
            let _ = write!(
                b,
                "<li><b>{label}</b> · {perms}<br><span class=addr>{}</span>\
                 <form method=post action=\"/dashboard/tokens/revoke\">{}\
                 <input type=hidden name=apiKey value=\"{}\"><button class=danger>Revoke</button></form></li>",
                esc(&k.api_key),
                csrf_field(&s),
                esc(&k.api_key)
            );
        } else {
            // A key with more than the dashboard grants (a trading bot's): its id opens its
            // user data stream, so it is not shown, and it is managed with a `keys` key.
            let _ = write!(
                b,
                "<li><b>{label}</b> · {perms}<br><span class=addr>{}</span>\
                 <span class=muted>managed with an API key holding the keys permission</span></li>",
                esc(&api::native::masked_key_id(&k.api_key))
            );
        }
    }
    let _ = write!(
        b,
        "</ul><h2>New token</h2><form method=post action=\"/dashboard/tokens\">{}\
         <label>Label<input name=label maxlength=64></label>\
         <fieldset><legend>Permissions</legend>\
         <label class=check><input type=checkbox name=read value=1 checked> read</label>\
         <label class=check><input type=checkbox name=merchant value=1 checked> merchant \
         (invoices, webhooks, store)</label>\
         <label class=check><input type=checkbox name=withdraw value=1> withdraw (refunds, pull \
         payments)</label></fieldset>{}<label>Store password (needed for withdraw)<input \
         type=password name=password autocomplete=current-password></label>\
         <button>Create token</button></form>",
        csrf_field(&s),
        store_perm_boxes()
    );
    Ok(page(StatusCode::OK, "API tokens", Some(&s), &b))
}

/// BTCPay's store permissions, by name: a shop plugin's token may hold only those it asks for
/// instead of `merchant` (which holds them all, and the native merchant API besides).
fn store_perms() -> impl Iterator<Item = (&'static str, Perms)> {
    Perms::NAMES
        .into_iter()
        .filter(|(_, p)| p.0 & Perms::STORE.0 != 0)
}

/// The token form's store-permission checkboxes (none checked).
fn store_perm_boxes() -> String {
    let mut b = String::from(
        "<fieldset><legend>Or only these store permissions (BTCPay's names, for a shop plugin; \
         leave merchant unchecked; those that list pull payments or pay out also need withdraw)</legend>",
    );
    for (name, _) in store_perms() {
        let _ = write!(
            b,
            "<label class=check><input type=checkbox name=\"{name}\" value=1> <code>{name}</code></label>"
        );
    }
    b.push_str("</fieldset>");
    b
}

/// `POST /dashboard/tokens`: a new key for the store's account; its secret and Greenfield
/// token are shown on this answer only.
pub async fn create_token(
    State(st): State<AppState>,
    s: Session,
    form: Form,
) -> Result<Response, Refusal> {
    s.check_form(&st, &form)?;
    let mut perms = Perms::NONE;
    let own = [
        ("read", Perms::READ),
        ("merchant", Perms::MERCHANT),
        ("withdraw", Perms::WITHDRAW),
    ];
    for (name, p) in own.into_iter().chain(store_perms()) {
        if form.get(name).is_some() {
            perms = perms.with(p);
        }
    }
    if perms == Perms::NONE || !TOKEN_PERMS.has(perms) {
        return Err(bad("Choose at least one permission."));
    }
    // A `withdraw` token moves money (refunds and pull payments to any address): like a
    // withdrawal, it needs the store password again, not the session alone (ADR 0015).
    if perms.has(Perms::WITHDRAW) {
        step_up(&st, &s, form.password(), StepUp::WithdrawToken).await?;
        // Its signed API never consults the withdrawal address list: none while it is on.
        refuse_while_list_on(
            &st,
            s.account,
            "a token with withdraw",
            StepUp::WithdrawToken.nothing(),
        )
        .await?;
    }
    let label = form.text("label").to_owned();
    if label.len() > 64 || !label.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(bad("The label is at most 64 printable ASCII characters."));
    }
    let v = api::native::create_key(&st, &s.actor(), &s.audit_id(), s.account, perms, &label)?;
    let b = format!(
        "<p class=ok>Token created. Copy it now: it is not shown again.</p><dl class=stack>\
         <dt>Greenfield token (<code>Authorization: token ...</code>)<dd><code class=secret>{}</code>\
         <dt>API key<dd><code>{}</code><dt>Secret key (signed API)<dd><code class=secret>{}</code>\
         <dt>Permissions<dd>{}</dl><p><a href=\"/dashboard/tokens\">Back to the tokens</a></p>",
        esc(&txt(&v["greenfieldToken"])),
        esc(&txt(&v["apiKey"])),
        esc(&txt(&v["secretKey"])),
        esc(&perms.names().join(", "))
    );
    Ok(page(StatusCode::OK, "New API token", Some(&s), &b))
}

/// `POST /dashboard/tokens/revoke`: `apiKey` (one of the store's own).
pub async fn revoke_token(
    State(st): State<AppState>,
    s: Session,
    form: Form,
) -> Result<Response, Refusal> {
    s.check_form(&st, &form)?;
    let target = form.text("apiKey").to_owned();
    // Only the kind of key the dashboard makes: a session is no `keys` permission.
    if st
        .keys()
        .get(&target)
        .is_some_and(|k| k.account == s.account && !TOKEN_PERMS.has(k.perms))
    {
        return Err(Refusal::Page(
            StatusCode::FORBIDDEN,
            "This key has permissions the dashboard does not grant; revoke it with an API key holding the keys permission.".into(),
        ));
    }
    api::native::revoke_own_key(&st, &s.principal(), &target, &s.actor(), &s.audit_id())?;
    done(&st, &s, "/dashboard/tokens", "Token revoked.".into()).await
}

// ---- the withdrawal address allow-list (crate::allowlist, ADR 0015 addendum) ----

/// A delay in words (`24 h`, `90 min`, `0 min`).
fn delay_str(ms: u64) -> String {
    if ms >= 3_600_000 && ms % 3_600_000 == 0 {
        format!("{} h", ms / 3_600_000)
    } else {
        format!("{} min", ms.div_ceil(60_000))
    }
}

/// An allow-list refusal as a page (`403`, or `409` for a change), with its stable code and
/// `nothing` (what was not done); a database failure is an internal error.
fn list_refusal(e: crate::allowlist::AllowListError, nothing: &str) -> Refusal {
    use crate::allowlist::AllowListError as E;
    let status = match &e {
        E::NotListed { .. } | E::Pending { .. } | E::ListOn { .. } => StatusCode::FORBIDDEN,
        E::AlreadyListed { .. } | E::Full => StatusCode::CONFLICT,
        E::Database(_) => return Refusal::from(db_error_of(e)),
    };
    let why = match &e {
        E::NotListed { address } => format!(
            "this store withdraws only to the addresses on its withdrawal address list, and {address} is not on it"
        ),
        E::Pending { address, active_ms } => format!(
            "{address} is on the withdrawal address list but usable only from {} UTC (a new address waits before it can be used)",
            time_str(active_ms / 1000)
        ),
        other => other.to_string(),
    };
    Refusal::Page(status, format!("Refused ({}): {why}. {nothing}", e.code()))
}

fn db_error_of(e: crate::allowlist::AllowListError) -> ApiError {
    tracing::error!(error = %e, "withdrawal address list");
    ApiError::internal()
}

/// `GET /dashboard/addresses`: the store's withdrawal address allow-list, the add form and a
/// remove form per address (both need the store password).
pub async fn addresses(State(st): State<AppState>, s: Session) -> Result<Response, Refusal> {
    let (account, now) = (s.account, now_ms());
    let (listed, on) = with_db(&st, move |c| {
        let l = crate::allowlist::list(c, account).map_err(db_error)?;
        let on = crate::allowlist::is_on(c, account, now).map_err(db_error)?;
        Ok((l, on))
    })
    .await?;
    let delay = delay_str(st.merchant().cfg.withdraw_address_delay_ms);
    let mut b = take_flash(&st, &s).await?;
    let _ = write!(
        b,
        "<p>Once this list has an address, withdrawals from the dashboard go only to the          addresses on it. A new address can be used {delay} after it is added; a removed one          at once, and the list stays on for {delay} after its last removal. Adding or removing          an address needs the store password.</p><p><b>{}</b></p><ul class=cards>",
        if on {
            "The list is on: withdrawals go only to usable listed addresses."
        } else {
            "The list is off: withdrawals may go to any address."
        }
    );
    if listed.is_empty() {
        b.push_str("<li class=muted>No addresses.</li>");
    }
    for l in &listed {
        let state = if l.active_ms <= now {
            "usable".to_owned()
        } else {
            format!("usable from {} UTC", time_str(l.active_ms / 1000))
        };
        let _ = write!(
            b,
            "<li><span class=addr>{}</span> · {}             <form method=post action=\"/dashboard/addresses/remove\">{}             <input type=hidden name=address value=\"{}\">             <label>Store password<input name=password type=password              autocomplete=current-password required></label>             <button class=danger>Remove</button></form></li>",
            esc(&l.address),
            esc(&state),
            csrf_field(&s),
            esc(&l.address)
        );
    }
    let _ = write!(
        b,
        "</ul><h2>Add an address</h2><form method=post action=\"/dashboard/addresses\">{}\
         <label>Address<input name=address maxlength=128 required></label>\
         <label>Store password<input name=password type=password \
         autocomplete=current-password required></label><button>Add</button></form>",
        csrf_field(&s)
    );
    Ok(page(StatusCode::OK, "Withdrawal addresses", Some(&s), &b))
}

/// `POST /dashboard/addresses`: `address`, `password` (step-up). Adds the address to the
/// store's allow-list, usable after the delay; audited (`dashboard.withdraw_address.add`).
pub async fn add_address(
    State(st): State<AppState>,
    s: Session,
    form: Form,
) -> Result<Response, Refusal> {
    s.check_form(&st, &form)?;
    let address = form.text("address").trim().to_owned();
    if api::capital::check_address(&address).is_err() {
        return Err(bad(
            "Refused (address_invalid): an address is 1 to 128 letters and digits. The list was \
             not changed.",
        ));
    }
    step_up(&st, &s, form.password(), StepUp::AddressList).await?;
    let (account, now) = (s.account, now_ms());
    let delay = st.merchant().cfg.withdraw_address_delay_ms;
    // The audit entry is appended before the addition is committed (the operator relies on
    // seeing every addition): a failed append adds nothing.
    let (st2, actor, by) = (st.clone(), s.actor(), s.audit_id());
    let added = with_db(&st, move |c| {
        crate::allowlist::add_with(c, account, &address, now, delay, |added| {
            st2.audit_by(
                &actor,
                &by,
                "dashboard.withdraw_address.add",
                json!({ "account": account, "address": &added.address, "active_ms": added.active_ms }),
            )
        })
    })
    .await?
    .map_err(|e| list_refusal(e, "The list was not changed."))?;
    let msg = format!(
        "Address {} added; usable from {} UTC.",
        added.address,
        time_str(added.active_ms / 1000)
    );
    done(&st, &s, "/dashboard/addresses", msg).await
}

/// `POST /dashboard/addresses/remove`: `address`, `password` (step-up). Removes the address
/// from the store's allow-list at once (the list stays on for the delay); audited
/// (`dashboard.withdraw_address.remove`).
pub async fn remove_address(
    State(st): State<AppState>,
    s: Session,
    form: Form,
) -> Result<Response, Refusal> {
    s.check_form(&st, &form)?;
    let address = form.text("address").to_owned();
    step_up(&st, &s, form.password(), StepUp::AddressList).await?;
    let (account, now) = (s.account, now_ms());
    let delay = st.merchant().cfg.withdraw_address_delay_ms;
    // As for an addition: the audit entry first, then the commit; a failed append removes
    // nothing.
    let (st2, actor, by) = (st.clone(), s.actor(), s.audit_id());
    let removed = with_db(&st, move |c| {
        crate::allowlist::remove_with(c, account, &address, now, delay, |address| {
            st2.audit_by(
                &actor,
                &by,
                "dashboard.withdraw_address.remove",
                json!({ "account": account, "address": address }),
            )
        })
    })
    .await?
    .map_err(|e| list_refusal(e, "The list was not changed."))?;
    if !removed {
        return Err(Refusal::Page(
            StatusCode::NOT_FOUND,
            "That address is not on the list. The list was not changed.".into(),
        ));
    }
    done(&st, &s, "/dashboard/addresses", "Address removed.".into()).await
}
