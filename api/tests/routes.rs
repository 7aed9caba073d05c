//! The permission tables (`api::access::ROUTES` and `merchant::ROUTES`, as `mediator serve`
//! composes them: `merchant::SURFACES`) against the router: every route the router serves has
//! an entry, each listener serves its own, and every route answered with every permission set
//! is either allowed or refused with `-2015` having changed nothing.

#[path = "../../merchant/tests/common/mod.rs"]
mod common;

use api::access::{Access, Listener, Route};
use api::keys::Perms;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::Harness;
use merchant::MerchantState as _;
use tower::ServiceExt;

/// Every row of the composed tables.
fn routes() -> impl Iterator<Item = &'static Route> {
    merchant::SURFACES.iter().flat_map(|s| s.routes.iter())
}

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

/// A concrete URI for a router path (`/i/{id}` → `/i/abc`).
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|s| if s.starts_with('{') { "abc" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

/// (status, code, msg) of an unauthenticated request through `router`.
async fn probe(router: &axum::Router, method: &str, uri: &str) -> (StatusCode, i64, String) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    let res = router.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    (
        status,
        v["code"].as_i64().unwrap_or(0),
        // Binance's `msg`, or a Greenfield error's `message`.
        v["msg"]
            .as_str()
            .or(v["message"].as_str())
            .unwrap_or("")
            .to_owned(),
    )
}

/// The table entry of `method` and `path` (placeholder names aside: `{stream}` = `{streams}`).
fn entry(method: &str, path: &str) -> Option<&'static api::access::Route> {
    routes().find(|r| r.method.eq_ignore_ascii_case(method) && concrete(r.path) == concrete(path))
}

fn is_fallback(r: &(StatusCode, i64, String)) -> bool {
    r.0 == StatusCode::NOT_FOUND && r.1 == 0 && r.2.is_empty()
}

#[tokio::test]
async fn every_served_route_has_a_table_entry_and_its_listener() {
    let h = Harness::new();
    let all = merchant::app(h.state.clone());
    let public = merchant::public_app(h.state.clone());
    let admin = merchant::admin_app(h.state.clone());
    let mut paths: Vec<&str> = routes().map(|r| r.path).collect();
    // Every documented operation is in the table.
    let doc = h.get("/openapi.json").await.json;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            assert!(
                entry(method, path).is_some(),
                "{method} {path} is documented but has no table entry"
            );
        }
        paths.push(path);
    }
    for path in paths {
        let uri = concrete(path);
        for method in METHODS {
            let r = probe(&all, method, &uri).await;
            match entry(method, path) {
                Some(e) => {
                    assert!(!is_fallback(&r), "{method} {path}: {r:?}");
                    assert_ne!(r.0, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                    let (on, off) = match e.listener {
                        Listener::Public => (&public, &admin),
                        Listener::Admin => (&admin, &public),
                    };
                    let r = probe(on, method, &uri).await;
                    assert!(!is_fallback(&r), "{method} {path} on its listener: {r:?}");
                    assert_ne!(r.0, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                    let r = probe(off, method, &uri).await;
                    assert!(
                        is_fallback(&r) || r.0 == StatusCode::METHOD_NOT_ALLOWED,
                        "{method} {path} is served on the other listener: {r:?}"
                    );
                }
                // Served without an entry: a route registered around the table.
                None => assert!(
                    is_fallback(&r) || r.0 == StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is served but has no table entry: {r:?}"
                ),
            }
        }
    }
}

/// Routes are registered through the tables only: no `.route(` anywhere else in the shell or in
/// the merchant crate.
#[test]
fn no_route_is_registered_outside_the_table() {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    walk(&root.join("src"), &mut files);
    walk(&root.join("../merchant/src"), &mut files);
    assert!(files.len() > 10);
    for f in files {
        if f.ends_with("access.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for needle in [".route(", ".nest(", ".route_service("] {
            assert!(
                !text.contains(needle),
                "{} registers a route outside api::access::ROUTES ({needle})",
                f.display()
            );
        }
    }
}

/// The shell does not know the merchant crate: no `merchant::` path in `api/src` (doc comments
/// aside) and no `merchant` among api's dependencies (a dev-dependency for these tests only).
#[test]
fn the_shell_does_not_name_the_merchant_crate() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stack = vec![root.join("src")];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                seen += 1;
                let text = std::fs::read_to_string(&p).unwrap();
                for (i, line) in text.lines().enumerate() {
                    let code = line.trim_start();
                    if code.starts_with("//") {
                        continue;
                    }
                    assert!(
                        !code.contains("merchant::"),
                        "{}:{} names the merchant crate: {line}",
                        p.display(),
                        i + 1
                    );
                }
            }
        }
    }
    assert!(seen > 10);
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .unwrap()
        .split("[dev-dependencies]")
        .next()
        .unwrap();
    assert!(!deps.contains("merchant"), "api depends on merchant");
}

/// Everything a refused request could have changed.
async fn fingerprint(h: &Harness, observer: &(String, String)) -> String {
    // Behind every order answered ahead of the read models, as a request would be.
    h.state.fence().await;
    let rm = format!("{:?}", {
        let s = h.state.read_model().read();
        let mut b: Vec<_> = s.balances.iter().map(|(a, v)| (*a, v.clone())).collect();
        b.sort();
        (b, s.accounts.clone())
    });
    let keys = h.ok("GET", "/mapi/v1/apiKey", "", observer).await;
    let orders = h.ok("GET", "/api/v3/openOrders", "", observer).await;
    let merchant = {
        let db = h.state.merchant().db.lock().unwrap();
        let tables: Vec<String> = db
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        tables
            .iter()
            .map(|t| {
                let n: i64 = db
                    .query_row(&format!("SELECT count(*) FROM \"{t}\""), [], |r| r.get(0))
                    .unwrap();
                format!("{t}={n}")
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    format!("{rm}\n{keys}\n{orders}\n{merchant}")
}

#[tokio::test]
async fn every_route_with_every_permission_set_is_allowed_or_refused_unchanged() {
    let h = Harness::new();
    let (acct, observer) = h.trader_with("1", "1000", "read,keys").await;
    let (store, store_observer) = h.trader_with("1", "1000", "read,keys").await;
    // Mediator's own permissions on one account: none, all, each alone and all but each (16
    // keys). BTCPay's store permissions on another: each alone, and each with `withdraw`
    // (which the routes that pay out or list pull payments also ask for): 26 keys. Each under
    // the 30 an account may hold, beside its observer.
    let own = || {
        Perms::NAMES
            .into_iter()
            .filter(|(_, p)| p.0 & Perms::STORE.0 == 0)
    };
    let all = Perms(own().fold(0, |b, (_, p)| b | p.0));
    let mut sets = vec![Perms::NONE, all];
    for (_, p) in own() {
        sets.push(p);
        sets.push(Perms(all.0 & !p.0));
    }
    assert_eq!(sets.len(), 16);
    let mut keys = Vec::new();
    for p in &sets {
        let key = h.state.create_key(acct, *p, "probe").unwrap();
        keys.push((*p, key, acct, &observer));
    }
    for (_, p) in Perms::NAMES
        .into_iter()
        .filter(|(_, p)| p.0 & Perms::STORE.0 != 0)
    {
        for p in [p, p.with(Perms::WITHDRAW)] {
            let key = h.state.create_key(store, p, "probe").unwrap();
            keys.push((p, key, store, &store_observer));
        }
    }
    assert_eq!(keys.len(), 16 + 26);
    let mut checked = 0;
    for route in routes() {
        let (need, signed) = match route.access {
            Access::Public => continue,
            Access::Session => {
                // The dashboard without a session cookie: GET goes to the login page, anything
                // else is 401; nothing changed either way.
                let uri = concrete(route.path);
                let before = fingerprint(&h, &observer).await;
                let req = Request::builder()
                    .method(route.method)
                    .uri(&uri)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Body::from("csrf=x"))
                    .unwrap();
                let res = h.router.clone().oneshot(req).await.unwrap();
                let what = format!("{} {uri}: {}", route.method, res.status());
                if route.method == "GET" {
                    assert_eq!(res.status(), StatusCode::SEE_OTHER, "{what}");
                    // The pages other sites link to (an app's authorization, an invoice's
                    // page) come back to themselves after the login.
                    let login = match route.path {
                        "/api-keys/authorize" => "/dashboard/login?next=%2Fapi-keys%2Fauthorize",
                        "/dashboard/invoices/{id}" => {
                            "/dashboard/login?next=%2Fdashboard%2Finvoices%2Fabc"
                        }
                        _ => "/dashboard/login",
                    };
                    assert_eq!(res.headers()["location"], login, "{what}");
                } else {
                    assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{what}");
                }
                assert_eq!(fingerprint(&h, &observer).await, before, "changed: {what}");
                checked += 1;
                continue;
            }
            Access::Key(p) => (p, false),
            Access::Signed(p) => (p, true),
            // A key revoking itself would end the probes' keys for the routes after it:
            // `greenfield.rs a_token_with_btcpay_store_permissions_does_what_they_name_and_no_more`
            // runs it (any live key may).
            Access::Token(_)
                if route.method == "DELETE" && route.path == "/api/v1/api-keys/current" =>
            {
                continue
            }
            Access::Token(g) => {
                // Greenfield: the key's token, its own store; refused is 403
                // missing-permission naming BTCPay's permission, with nothing changed.
                for (perms, key, account, observer) in &keys {
                    let uri = route
                        .path
                        .split('/')
                        .map(|s| match s {
                            "{storeId}" => account.to_string(),
                            s if s.starts_with('{') => "abc".to_owned(),
                            s => s.to_owned(),
                        })
                        .collect::<Vec<_>>()
                        .join("/");
                    let before = fingerprint(&h, observer).await;
                    let token = h.state.greenfield_token(&key.0);
                    let req = Request::builder()
                        .method(route.method)
                        .uri(&uri)
                        .header("Authorization", format!("token {token}"))
                        .body(Body::empty())
                        .unwrap();
                    let res = h.router.clone().oneshot(req).await.unwrap();
                    let status = res.status();
                    let bytes = http_body_util::BodyExt::collect(res.into_body())
                        .await
                        .unwrap()
                        .to_bytes();
                    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                    let what = format!(
                        "{} {uri} with {:?}: {status} {v}",
                        route.method,
                        perms.names()
                    );
                    assert_ne!(status, StatusCode::UNAUTHORIZED, "{what}");
                    if perms.has(g.perms()) {
                        assert_ne!(v["code"], "missing-permission", "refused: {what}");
                    } else {
                        assert_eq!(status, StatusCode::FORBIDDEN, "allowed: {what}");
                        assert_eq!(v["missingPermission"], g.name(), "{what}");
                        assert_eq!(fingerprint(&h, observer).await, before, "changed: {what}");
                    }
                    checked += 1;
                }
                continue;
            }
        };
        // Each route as is, and with the parameter that needs one more permission.
        let mut variants = vec![(String::new(), need)];
        if let Some((param, extra)) = route.also {
            variants.push((format!("{param}=bcrt1qx"), need.with(extra)));
        }
        for (params, need) in &variants {
            for (perms, key, _, observer) in &keys {
                let before = fingerprint(&h, observer).await;
                let r = if signed {
                    h.signed(route.method, route.path, params, key).await
                } else {
                    h.raw(route.method, route.path, "", Some(&key.0)).await
                };
                let what = format!(
                    "{} {} {params} with {:?}: {} {}",
                    route.method,
                    route.path,
                    perms.names(),
                    r.status,
                    r.json
                );
                if perms.has(*need) {
                    assert_ne!(r.code(), -2015, "refused: {what}");
                    assert_ne!(r.status, StatusCode::UNAUTHORIZED, "{what}");
                } else {
                    assert_eq!(
                        (r.status, r.code()),
                        (StatusCode::UNAUTHORIZED, -2015),
                        "allowed: {what}"
                    );
                    assert_eq!(fingerprint(&h, observer).await, before, "changed: {what}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 40 * keys.len(), "{checked}");
}

/// The README's row of a route.
fn readme_row(r: &api::access::Route) -> String {
    let names = |p: Perms| {
        if p == Perms::NONE {
            "any key".to_owned()
        } else {
            p.names().join(",")
        }
    };
    let mut access = match r.access {
        Access::Public => "public".to_owned(),
        Access::Session => "session (dashboard cookie + CSRF)".to_owned(),
        Access::Key(p) => format!("key: {}", names(p)),
        Access::Signed(p) => format!("signed: **{}**", names(p)),
        Access::Token(g) if g.name().is_empty() => "token: any key".to_owned(),
        // The store permission, or `merchant` (which holds every store permission), and the
        // other bits the route asks for besides (`withdraw` for pull payments).
        Access::Token(g) => {
            let besides = Perms(g.perms().0 & !Perms::STORE.0);
            let with = Perms::MERCHANT.with(besides);
            if besides == Perms::NONE {
                format!("token: `{}` (or **{}**)", g.name(), names(with))
            } else {
                format!(
                    "token: `{}` + **{}** (or **{}**)",
                    g.name(),
                    names(besides),
                    names(with)
                )
            }
        }
    };
    if let Some((param, p)) = r.also {
        access.push_str(&format!(" (+ **{}** with `{param}`)", names(p)));
    }
    let weight = r
        .weight
        .map(|w| w.to_string())
        .unwrap_or_else(|| "by handler".into());
    let listener = match r.listener {
        Listener::Public => "public",
        Listener::Admin => "admin",
    };
    format!(
        "| `{}` | `{}` | {access} | {weight} | {listener} |",
        r.method, r.path
    )
}

#[test]
fn readme_prints_the_permission_table() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let rows: Vec<String> = routes().map(readme_row).collect();
    let missing: Vec<&String> = rows.iter().filter(|r| !readme.contains(*r)).collect();
    assert!(
        missing.is_empty(),
        "api/README.md's permission table is out of date; it should read:\n{}",
        rows.join("\n")
    );
}
