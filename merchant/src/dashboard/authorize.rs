//! BTCPay's "authorize app" flow (`/api-keys/authorize`): a shop plugin sends the store owner's
//! browser to this server with the BTCPay permissions it wants; the owner, logged in to the
//! dashboard, sees what is asked and where the key goes, and approves; the new key's Greenfield
//! token goes back to the plugin by a form post, as BTCPay sends it (`apiKey`, `userId`,
//! `permissions[]` as `name:storeId`). A plugin then needs nothing but this server's URL.
//!
//! * **Nothing happens on a GET.** The page shows the request; only its form, with the
//!   session's CSRF token and a same-site `Origin`, makes a key.
//! * **The owner sees where the key goes**: the redirect's origin, in the page's heading and on
//!   the button. Only absolute `http`/`https` URLs without user info are accepted
//!   (`https://shop.example@evil.example` would read as the shop).
//! * **What is asked is what is granted**, as BTCPay's `strict` (the default): the key holds
//!   exactly the BTCPay names asked for that exist here. With `strict=false` the owner may
//!   leave some out. Names this server has no route for, or scoped to another store, are shown
//!   as not granted; the plugin sees their absence in `permissions[]`.
//! * **Money out is the owner's explicit choice** (ADR 0015): pull payments whose claims are
//!   paid when made pay any address, so the permissions that make, list or pay them
//!   (`cancreatepullpayments`, `canmanagepullpayments`, `canviewpullpayments`,
//!   `canmanagepayouts`, and `withdraw`, which they and `canmodifystoresettings` need for it)
//!   are granted only when the owner ticks "also allow
//!   refunds", even under `strict`, and only with the store password, never while the
//!   withdrawal address list is on, as the token page does. Unticked, the app gets the rest and
//!   sees in `permissions[]` what was left out. `cancreatenonapprovedpullpayments` (what
//!   WooCommerce asks for its refund button) is granted as asked: its refunds' claims wait for
//!   the owner's approval on the dashboard, with the password.
//! * **A plain `http` redirect** to a host other than loopback is allowed (shops on a local
//!   network) but the page warns that the key travels unencrypted.
//! * **One key per page shown.** The form carries a random one-time token (`once`), spent (its
//!   SHA-256 in `dashboard_once`) in the step that makes the key, after the password check: the
//!   form posted again (back, reload, a double click) makes no second key. A spent token whose
//!   key could not be made (the store's 30 keys) needs the page opened again.
//! * Not done: `applicationIdentifier` (BTCPay offers an existing key of the same app again);
//!   every approval makes a new key (at most [`api::keys::MAX_KEYS_PER_ACCOUNT`] per store).

use super::{
    bad, csrf_field, esc, now_ms, page, random_hex, refuse_while_list_on, sha256_hex, step_up,
    Form, Refusal, Session, StepUp,
};
use crate::greenfield::{self as gf, RawQuery};
use crate::routes::{db_error, with_db};
use api::access::Greenfield;
use api::keys::Perms;
use api::state::AppState;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use reqwest::Url;
use rusqlite::params;
use std::fmt::Write as _;

/// The flow's path, as BTCPay serves it.
pub const PATH: &str = "/api-keys/authorize";

/// The most permission values one request may carry.
const MAX_ASKED: usize = 32;

/// An app's request, parsed from the page's query or its form (the same fields).
struct Ask {
    /// `applicationName`, as a key label (printable ASCII, at most 64).
    app: String,
    /// `redirect`: where the key is posted.
    redirect: Option<Url>,
    /// `strict` (default true): all asked permissions or none.
    strict: bool,
    /// The asked permissions that exist here, in BTCPay's order.
    known: Vec<Greenfield>,
    /// The asked values that do not (shown, not granted).
    unknown: Vec<String>,
}

impl Ask {
    fn parse(f: &Form, store: &str) -> Result<Ask, Refusal> {
        let app: String = f
            .text("applicationName")
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(64)
            .collect();
        let redirect = match f.text("redirect") {
            "" => None,
            r => Some(redirect_url(r)?),
        };
        let strict = !f.text("strict").eq_ignore_ascii_case("false");
        let asked: Vec<&str> =
            f.0.iter()
                .filter(|(k, _)| is_permissions(k))
                .map(|(_, v)| v.trim())
                .filter(|v| !v.is_empty())
                .collect();
        if asked.len() > MAX_ASKED || asked.iter().any(|v| v.len() > 128) {
            return Err(bad("Too many or too long permissions asked for."));
        }
        let mut known = Vec::new();
        let mut unknown = Vec::new();
        for v in asked {
            let (name, scope) = match v.split_once(':') {
                Some((n, s)) => (n, Some(s)),
                None => (v, None),
            };
            let found = Greenfield::STORE
                .into_iter()
                .find(|g| g.name().eq_ignore_ascii_case(name))
                .filter(|_| scope.is_none_or(|s| s == store));
            match found {
                Some(g) if !known.contains(&g) => known.push(g),
                Some(_) => {}
                None => unknown.push(v.to_owned()),
            }
        }
        known.sort_by_key(|g| Greenfield::STORE.iter().position(|x| x == g));
        Ok(Ask {
            app,
            redirect,
            strict,
            known,
            unknown,
        })
    }

    /// The app's name as the page shows it.
    fn who(&self) -> &str {
        if self.app.is_empty() {
            "An application"
        } else {
            &self.app
        }
    }
}

/// A `permissions` field as clients send them: repeated `permissions` (BTCPay's own clients),
/// `permissions[]`, or `permissions[0]`, `permissions[1]`, ... (PHP's `http_build_query`).
fn is_permissions(key: &str) -> bool {
    key == "permissions"
        || key
            .strip_prefix("permissions[")
            .and_then(|k| k.strip_suffix(']'))
            .is_some_and(|i| i.bytes().all(|b| b.is_ascii_digit()))
}

/// `GET /api-keys/authorize/` (plugins write the path with a slash, which BTCPay serves too):
/// a redirect to [`PATH`] with the same query.
pub async fn with_slash(RawQuery(q): RawQuery) -> Response {
    let to = match q {
        Some(q) if !q.is_empty() => format!("{PATH}?{q}"),
        _ => PATH.to_owned(),
    };
    let mut r = StatusCode::PERMANENT_REDIRECT.into_response();
    if let Ok(v) = HeaderValue::from_str(&to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// An absolute `http`/`https` URL with a host and no user info.
fn redirect_url(r: &str) -> Result<Url, Refusal> {
    let refused = || bad("The application's redirect is not an http(s) address; no key was made.");
    if r.len() > 2048 {
        return Err(refused());
    }
    let url = Url::parse(r).map_err(|_| refused())?;
    let ok = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some()
        && url.username().is_empty()
        && url.password().is_none();
    if ok {
        Ok(url)
    } else {
        Err(refused())
    }
}

/// `scheme://host[:port]` of a URL: what the owner is shown.
fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// True when the permission is a pull-payment one that pays out (needs `withdraw`): not
/// `cancreatenonapprovedpullpayments`, whose claims wait for the owner's approval.
fn pays_out(g: Greenfield) -> bool {
    g.perms().has(Perms::WITHDRAW)
}

/// True when the permission would pay out with `withdraw` beside it: a pull-payment or payout
/// one that pays out (or lists pull payments' ids), or one that holds them
/// (`canmodifystoresettings`).
fn could_pay_out(g: Greenfield) -> bool {
    let out = Perms::MANAGE_PULL_PAYMENTS
        .with(Perms::CREATE_PULL_PAYMENTS)
        .with(Perms::MANAGE_PAYOUTS);
    pays_out(g) || Perms(g.perms().0 & Perms::STORE.0).implied().0 & out.0 != 0
}

/// True for a redirect whose token would cross a network unencrypted.
fn cleartext(url: &Url) -> bool {
    let host = url.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    url.scheme() == "http" && !loopback
}

/// The form's fields that carry the request from the page to its post.
fn carried(a: &Ask) -> String {
    let mut b = String::new();
    for (k, v) in [
        ("applicationName", a.app.as_str()),
        ("redirect", a.redirect.as_ref().map_or("", Url::as_str)),
        ("strict", if a.strict { "true" } else { "false" }),
    ] {
        let _ = write!(b, "<input type=hidden name={k} value=\"{}\">", esc(v));
    }
    for g in &a.known {
        let _ = write!(
            b,
            "<input type=hidden name=permissions value=\"{}\">",
            esc(g.name())
        );
    }
    b
}

/// `GET /api-keys/authorize`: what the app asks for, where the key goes, and the form that
/// approves it. Changes nothing.
pub async fn authorize_page(
    State(_st): State<AppState>,
    s: Session,
    RawQuery(q): RawQuery,
) -> Result<Response, Refusal> {
    let f = Form::parse(q.as_deref().unwrap_or("").as_bytes())?;
    let a = Ask::parse(&f, &s.store())?;
    let mut b = String::new();
    let dest = match &a.redirect {
        Some(u) => format!("<b class=addr>{}</b>", esc(&origin(u))),
        None => "this page (shown once)".to_owned(),
    };
    let _ = write!(
        b,
        "<p><b>{}</b> asks for an API key of store <b>{}</b>. The key will be sent to {dest}.</p>",
        esc(a.who()),
        esc(&s.store())
    );
    if a.known.is_empty() {
        b.push_str(
            "<p class=err>It asks for no permission this server has: the key could do nothing. \
             No key is made.</p><p><a href=\"/dashboard\">Back to the dashboard</a></p>",
        );
        return Ok(page(
            StatusCode::OK,
            "Authorize an application",
            Some(&s),
            &b,
        ));
    }
    let once = random_hex()?;
    let _ = write!(
        b,
        "<form method=post action=\"{}\">{}{}<input type=hidden name=once value=\"{once}\">\
         <fieldset><legend>Permissions</legend>",
        super::authorize::PATH,
        csrf_field(&s),
        carried(&a)
    );
    for g in &a.known {
        let extra = if pays_out(*g) {
            " (only if refunds are allowed below)"
        } else if *g == Greenfield::CreateNonApprovedPullPayments {
            " (refunds whose claims wait for your approval on the dashboard)"
        } else {
            ""
        };
        if a.strict {
            let _ = write!(b, "<p><code>{}</code>{extra}</p>", esc(g.name()));
        } else {
            let _ = write!(
                b,
                "<label class=check><input type=checkbox name=grant value=\"{}\" checked> \
                 <code>{}</code>{extra}</label>",
                esc(g.name()),
                esc(g.name())
            );
        }
    }
    b.push_str("</fieldset>");
    if !a.unknown.is_empty() {
        let _ = write!(
            b,
            "<p class=muted>Not available here, not granted: {}</p>",
            esc(&a.unknown.join(", "))
        );
    }
    if a.known.iter().any(|g| could_pay_out(*g)) {
        b.push_str(
            "<fieldset><legend>Refunds</legend><label class=check><input type=checkbox \
             name=refunds value=1> Also allow refunds and pull payments: money out, paid to \
             any address whoever holds a refund's link gives</label>\
             <label>Store password (needed only with refunds)<input type=password \
             name=password autocomplete=current-password></label></fieldset>",
        );
    }
    if a.redirect.as_ref().is_some_and(cleartext) {
        b.push_str(
            "<p class=err>The application's address is plain http: the key will cross the \
             network unencrypted. Authorize only on a network you trust.</p>",
        );
    }
    let button = match &a.redirect {
        Some(u) => format!("Authorize and send the key to {}", esc(&origin(u))),
        None => "Authorize".to_owned(),
    };
    let _ = write!(
        b,
        "<button>{button}</button></form><p><a href=\"/dashboard\">Cancel</a></p>"
    );
    Ok(page(
        StatusCode::OK,
        "Authorize an application",
        Some(&s),
        &b,
    ))
}

/// `POST /api-keys/authorize`: makes the key (audited `key.create`, as the token page) and
/// sends its Greenfield token to the app's redirect by a form post (`apiKey`, `userId`,
/// `permissions[]`), or shows it once.
pub async fn authorize(
    State(st): State<AppState>,
    s: Session,
    form: Form,
) -> Result<Response, Refusal> {
    s.check_form(&st, &form)?;
    let a = Ask::parse(&form, &s.store())?;
    let granted: Vec<Greenfield> = if a.strict {
        a.known.clone()
    } else {
        let ticked: Vec<&str> = form
            .0
            .iter()
            .filter(|(k, _)| k == "grant")
            .map(|(_, v)| v.as_str())
            .collect();
        a.known
            .iter()
            .copied()
            .filter(|g| ticked.contains(&g.name()))
            .collect()
    };
    // Money out only when the owner ticked it, even under `strict`.
    let refunds = form.get("refunds").is_some();
    let granted: Vec<Greenfield> = granted
        .into_iter()
        .filter(|g| refunds || !pays_out(*g))
        .collect();
    if granted.is_empty() {
        return Err(bad("No permission was granted; no key was made."));
    }
    let mut perms = Perms::NONE;
    for g in &granted {
        perms = perms.with(Perms(g.perms().0 & Perms::STORE.0));
    }
    if refunds && granted.iter().any(|g| could_pay_out(*g)) {
        perms = perms.with(Perms::WITHDRAW);
    }
    if perms.has(Perms::WITHDRAW) {
        step_up(&st, &s, form.password(), StepUp::WithdrawToken).await?;
        refuse_while_list_on(
            &st,
            s.account,
            "a key for refunds",
            StepUp::WithdrawToken.nothing(),
        )
        .await?;
    }
    let once = spend_once(&st, &s, form.text("once")).await?;
    let label = if a.app.is_empty() {
        "authorized app".to_owned()
    } else {
        a.app.clone()
    };
    let v = match api::native::create_key(&st, &s.actor(), &s.audit_id(), s.account, perms, &label)
    {
        Ok(v) => v,
        Err(e) => {
            // No key was made (the store's 30 keys, a failed write): the page may be posted
            // again.
            unspend_once(&st, once).await;
            return Err(e.into());
        }
    };
    let token = super::txt(&v["greenfieldToken"]);
    let key = st
        .keys()
        .get(&super::txt(&v["apiKey"]))
        .ok_or_else(|| Refusal::from(api::error::ApiError::internal()))?;
    let listed = gf::permissions_of(&key);
    let Some(url) = &a.redirect else {
        let b = format!(
            "<p class=ok>Key created for {}. Copy its token now: it is not shown again.</p>\
             <dl class=stack><dt>Greenfield token (<code>Authorization: token ...</code>)<dd>\
             <code class=secret>{}</code><dt>Store id<dd><code>{}</code><dt>Permissions<dd>{}</dl>",
            esc(a.who()),
            esc(&token),
            esc(&s.store()),
            esc(&listed.join(", "))
        );
        return Ok(page(StatusCode::OK, "Application authorized", Some(&s), &b));
    };
    // BTCPay's post back: the token as `apiKey`, the store owner as `userId` (here the store's
    // account), each permission as `name:storeId`.
    let mut b = format!(
        "<p class=ok>Key created for {}. Sending it to <b class=addr>{}</b>...</p>\
         <form method=post action=\"{}\" id=back>\
         <input type=hidden name=apiKey value=\"{}\"><input type=hidden name=userId value=\"{}\">",
        esc(a.who()),
        esc(&origin(url)),
        esc(url.as_str()),
        esc(&token),
        esc(&s.store())
    );
    for p in &listed {
        let _ = write!(
            b,
            "<input type=hidden name=\"permissions[]\" value=\"{}\">",
            esc(p)
        );
    }
    let _ = write!(
        b,
        "<button>Continue to {}</button></form><script>{SUBMIT}</script>",
        esc(&origin(url))
    );
    let mut r = page(StatusCode::OK, "Application authorized", Some(&s), &b);
    // The dashboard's policy allows forms to this server only and no script: this page posts
    // to the app, by itself (the one script, by hash) or by its button. No `form-action`: a
    // browser applies it to the app's own redirects after the post too (an `http` callback
    // sending on to `https` would be blocked); the page holds no content but its own.
    let csp = format!(
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{}'; \
         frame-ancestors 'none'; base-uri 'none'",
        api::page::sha256_base64(SUBMIT.as_bytes())
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
    }
    Ok(r)
}

/// How long spent one-time tokens are kept: a session's life, after which the page's form is
/// refused anyway (its CSRF token died with the session).
const ONCE_KEPT_MS: u64 = super::SESSION_TTL_MS;

/// Spent one-time tokens kept per store at most (the newest), so a session posting forms of
/// its own making cannot grow the table without bound.
const ONCE_PER_STORE: i64 = 256;

/// Spends the form's one-time token (answers the hash spent): refused when it is missing or
/// was spent before (this page made its key already).
async fn spend_once(st: &AppState, s: &Session, once: &str) -> Result<String, Refusal> {
    if once.len() != 64 || !once.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(
            "This form is incomplete; open the application's link again. No key was made.",
        ));
    }
    let (hash, account, now) = (sha256_hex(once), s.account, now_ms());
    let h2 = hash.clone();
    let fresh = with_db(st, move |c| {
        c.execute(
            "DELETE FROM dashboard_once WHERE created_ms < ?1 OR (merchant = ?2 AND hash NOT IN
               (SELECT hash FROM dashboard_once WHERE merchant = ?2
                ORDER BY created_ms DESC, hash LIMIT ?3))",
            params![now.saturating_sub(ONCE_KEPT_MS), account, ONCE_PER_STORE],
        )
        .map_err(db_error)?;
        c.execute(
            "INSERT INTO dashboard_once (hash, merchant, created_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(hash) DO NOTHING",
            params![h2, account, now],
        )
        .map_err(db_error)
    })
    .await?;
    if fresh == 1 {
        Ok(hash)
    } else {
        Err(Refusal::Page(
            StatusCode::CONFLICT,
            "This authorization was posted before and made its key then; no second key was made. \
             If the application did not get it (a double click shows this page instead), revoke \
             it on the API tokens page and start again from the application."
                .into(),
        ))
    }
}

/// Gives a spent token back (its key could not be made). A failure only leaves the page
/// refused: it is logged.
async fn unspend_once(st: &AppState, hash: String) {
    let r = with_db(st, move |c| {
        c.execute("DELETE FROM dashboard_once WHERE hash = ?1", params![hash])
            .map_err(db_error)
    })
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %e.msg, "a one-time form token could not be given back");
    }
}

/// The post-back page's one script: submits its form.
const SUBMIT: &str = "document.getElementById('back').submit()";
