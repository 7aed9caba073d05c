//! The store dashboard in headless Chromium on a phone-sized viewport against the real
//! `mediator serve` on regtest: the operator sets a password (`mediator dashboard password`,
//! on stdin), the shop owner logs in, finds a paid invoice, redelivers its webhook, creates a
//! refund from it and an API token (shown once, and it works), logs out, and logs in again with
//! a one-time link (`mediator dashboard link`) that works once. Screenshots in the artifacts dir.
//!
//! Needs bitcoind (`BITCOIND_EXE`) and Chromium (`scripts/install-browser.sh`, or
//! `MEDIATOR_SKIP_BROWSER=1` to skip).

#[path = "../api/tests/browser/mod.rs"]
mod browser;
mod common;

use browser::Browser;
use common::greenfield::{http, ok};
use common::payer::Payer;
use common::{free_port, Server, BIN};
use serde_json::json;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const CHAIN: Duration = Duration::from_secs(90);
const PASSWORD: &str = "a long shop owner password";

const DESCRIBE: &str = "return {url: location.href, body: document.body.innerText.slice(0, 800)};";

/// `mediator dashboard password --account A` with the password on stdin.
fn set_password(s: &Server, account: u64) {
    let mut child = Command::new(BIN)
        .args(["dashboard", "password", "--account", &account.to_string()])
        .args(["--server", &s.admin_addr.to_string()])
        .arg("--data-dir")
        .arg(&s.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "dashboard password: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("password set"));
}

#[test]
fn a_shop_owner_logs_in_on_a_phone_redelivers_a_webhook_refunds_and_makes_a_token() {
    if !browser::required() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let server = Server::start_with(dir.path(), port, &["--public-url", &base]);
    let s = &server;
    let account = s.admin(&["account", "create"])["account"].as_u64().unwrap();
    let key = s.admin(&[
        "apikey",
        "create",
        "--account",
        &account.to_string(),
        "--permissions",
        "read,merchant,withdraw",
    ]);
    let token = key["greenfieldToken"].as_str().unwrap().to_owned();
    let t = Some(token.as_str());
    // A webhook to a port nobody listens on: its deliveries are recorded (and retried).
    let hook = ok(
        http(
            s.addr,
            "POST",
            &format!("/api/v1/stores/{account}/webhooks"),
            t,
            Some(&json!({"url": format!("http://127.0.0.1:{}/hook", free_port())}).to_string()),
        ),
        "webhook",
    );
    let hook_id = hook["id"].as_str().unwrap().to_owned();
    let inv = ok(
        http(
            s.addr,
            "POST",
            &format!("/api/v1/stores/{account}/invoices"),
            t,
            Some(
                &json!({"amount": "0.0004", "currency": "BTC", "metadata": {"orderId": "A-1001"}})
                    .to_string(),
            ),
        ),
        "invoice",
    );
    let id = inv["id"].as_str().unwrap().to_owned();
    let pm = ok(
        http(
            s.addr,
            "GET",
            &format!("/api/v1/stores/{account}/invoices/{id}/payment-methods"),
            t,
            None,
        ),
        "payment methods",
    );
    let address = pm[0]["destination"].as_str().unwrap().to_owned();
    let mut payer = Payer::new(41);
    payer.fund(&s.rpc());
    payer.pay(&s.rpc(), &address, 40_000);
    s.admin(&["regtest", "mine", "1"]);
    let settled = common::merchant::wait_until(CHAIN.as_secs(), || {
        let (_, v) = http(
            s.addr,
            "GET",
            &format!("/api/v1/stores/{account}/invoices/{id}"),
            t,
            None,
        );
        v["status"] == "Settled"
    });
    assert!(settled, "the invoice never settled");
    set_password(s, account);

    let b = Browser::start(1280, 900).unwrap();
    b.resize(390, 844).unwrap();
    // Log in.
    b.goto(&format!("{base}/dashboard")).unwrap();
    b.wait_for(
        "the login form",
        "return location.pathname === '/dashboard/login' && !!document.querySelector('input[name=password]');",
        DESCRIBE,
    )
    .unwrap();
    b.screenshot("dashboard-login.png").unwrap();
    b.eval(&format!(
        "document.querySelector('input[name=store]').value = '{account}'; \
         document.querySelector('input[name=password]').value = '{PASSWORD}'; \
         document.querySelector('form').submit(); return true;"
    ))
    .unwrap();
    b.wait_for(
        "the store's home page",
        "return location.pathname === '/dashboard' && document.body.innerText.includes('Balance');",
        DESCRIBE,
    )
    .unwrap();
    // Phone-first: nothing wider than the viewport.
    let wide = b
        .eval("return document.documentElement.scrollWidth <= window.innerWidth;")
        .unwrap();
    assert_eq!(wide, true, "the page scrolls sideways on a phone");
    b.screenshot("dashboard-home.png").unwrap();

    // Invoices: search by order id, open the invoice.
    b.goto(&format!("{base}/dashboard/invoices?q=A-1001"))
        .unwrap();
    b.wait_for(
        "the invoice in the list",
        &format!("return !!document.querySelector('a[href=\"/dashboard/invoices/{id}\"]');"),
        DESCRIBE,
    )
    .unwrap();
    b.screenshot("dashboard-invoices.png").unwrap();
    b.eval(&format!(
        "document.querySelector('a[href=\"/dashboard/invoices/{id}\"]').click(); return true;"
    ))
    .unwrap();
    b.wait_for(
        "the invoice page with its deliveries",
        "return document.body.innerText.includes('InvoiceSettled') && \
                !!document.querySelector('form[action$=\"/redeliver\"] button');",
        DESCRIBE,
    )
    .unwrap();
    b.screenshot("dashboard-invoice.png").unwrap();

    // Redeliver the first delivery shown.
    let deliveries = |what: &str| {
        ok(
            http(
                s.addr,
                "GET",
                &format!("/api/v1/stores/{account}/webhooks/{hook_id}/deliveries"),
                t,
                None,
            ),
            what,
        )
        .as_array()
        .unwrap()
        .len()
    };
    let before = deliveries("deliveries before");
    b.eval("document.querySelector('form[action$=\"/redeliver\"] button').click(); return true;")
        .unwrap();
    b.wait_for(
        "the redelivery confirmed",
        "return document.body.innerText.includes('Redelivery queued.');",
        DESCRIBE,
    )
    .unwrap();
    assert_eq!(deliveries("deliveries after"), before + 1);

    // A refund of 0.0001 BTC from the invoice, with the store password again (step-up).
    b.eval(&format!(
        "var f = document.querySelector('form[action$=\"/refund\"]'); \
         f.querySelector('select[name=variant]').value = 'Custom'; \
         f.querySelector('input[name=amount]').value = '0.0001'; \
         f.querySelector('input[name=password]').value = '{PASSWORD}'; \
         f.querySelector('button').click(); return true;"
    ))
    .unwrap();
    b.wait_for(
        "the refund created",
        "return document.body.innerText.includes('Refund of 0.0001 BTC created');",
        DESCRIBE,
    )
    .unwrap();
    // The claim link (a bearer credential) is on the page, never in its URL (history, logs).
    let url = b.eval("return location.href;").unwrap();
    let url = url.as_str().unwrap().to_owned();
    assert!(!url.contains("/pp/") && !url.contains("done="), "{url}");
    b.screenshot("dashboard-refund.png").unwrap();
    let pps = ok(
        http(
            s.addr,
            "GET",
            &format!("/api/v1/stores/{account}/pull-payments"),
            t,
            None,
        ),
        "pull payments",
    );
    assert_eq!(pps.as_array().unwrap().len(), 1);
    assert_eq!(pps[0]["amount"], "0.0001");

    // The point of sale: switched on from the settings page; its link opens the cashier's page.
    b.goto(&format!("{base}/dashboard/settings")).unwrap();
    b.wait_for(
        "the point-of-sale switch",
        "return !!document.querySelector('form[action=\"/dashboard/settings/pos\"] button');",
        DESCRIBE,
    )
    .unwrap();
    b.eval("document.querySelector('form[action=\"/dashboard/settings/pos\"] button').click(); return true;")
        .unwrap();
    b.wait_for(
        "the point of sale on, with its link",
        "return document.body.innerText.includes('Point of sale turned on.') && \
                !!document.querySelector('a.pos-link');",
        DESCRIBE,
    )
    .unwrap();
    b.screenshot("dashboard-pos.png").unwrap();
    let pos = b
        .eval("return document.querySelector('a.pos-link').getAttribute('href');")
        .unwrap();
    let pos = pos.as_str().unwrap().to_owned();
    assert!(pos.starts_with(&format!("{base}/pos/")), "{pos}");
    b.goto(&pos).unwrap();
    b.wait_for(
        "the point-of-sale page",
        "var f = document.getElementById('sale'); return !!f && !f.hidden;",
        DESCRIBE,
    )
    .unwrap();

    // A withdrawal: refused for another network's address and beyond the balance (custody's
    // own checks, as the signed API), then requested with the password again.
    let to = payer.receive_address().to_string();
    let withdraw = |address: &str, amount: &str, expect: &str, what: &str| {
        b.goto(&format!("{base}/dashboard")).unwrap();
        b.wait_for(
            "the withdrawal form",
            "return !!document.querySelector('form[action=\"/dashboard/withdraw\"]');",
            DESCRIBE,
        )
        .unwrap();
        b.eval(&format!(
            "var f = document.querySelector('form[action=\"/dashboard/withdraw\"]'); \
             f.querySelector('input[name=address]').value = '{address}'; \
             f.querySelector('input[name=amount]').value = '{amount}'; \
             f.querySelector('input[name=password]').value = '{PASSWORD}'; \
             f.querySelector('button').click(); return true;"
        ))
        .unwrap();
        b.wait_for(
            what,
            &format!("return document.body.innerText.includes('{expect}');"),
            DESCRIBE,
        )
        .unwrap();
    };
    withdraw(
        "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",
        "0.0001",
        "Refused (-4007)",
        "a mainnet address refused on regtest",
    );
    withdraw(
        &to,
        "0.001",
        "Refused (-4026)",
        "more than the balance refused",
    );
    withdraw(
        &to,
        "0.0001",
        "of 0.00010000 BTC requested",
        "the withdrawal requested",
    );
    b.screenshot("dashboard-withdrawal.png").unwrap();
    b.wait_for(
        "the withdrawal listed",
        &format!("return document.body.innerText.includes('{to}');"),
        DESCRIBE,
    )
    .unwrap();
    let wide = b
        .eval("return document.documentElement.scrollWidth <= window.innerWidth;")
        .unwrap();
    assert_eq!(
        wide, true,
        "the home page with its links scrolls sideways on a phone"
    );

    // An API token: shown once, and it works.
    b.goto(&format!("{base}/dashboard/tokens")).unwrap();
    b.wait_for(
        "the token form",
        "return !!document.querySelector('form[action=\"/dashboard/tokens\"]');",
        DESCRIBE,
    )
    .unwrap();
    b.eval(
        "var f = document.querySelector('form[action=\"/dashboard/tokens\"]'); \
         f.querySelector('input[name=label]').value = 'woocommerce'; \
         f.querySelector('button').click(); return true;",
    )
    .unwrap();
    b.wait_for(
        "the new token",
        "return document.body.innerText.includes('Copy it now');",
        DESCRIBE,
    )
    .unwrap();
    b.screenshot("dashboard-token.png").unwrap();
    let new_token = b
        .eval("return document.querySelector('code.secret').textContent;")
        .unwrap();
    let new_token = new_token.as_str().unwrap().to_owned();
    let current = ok(
        http(
            s.addr,
            "GET",
            "/api/v1/api-keys/current",
            Some(&new_token),
            None,
        ),
        "the new token",
    );
    assert_eq!(current["label"], "woocommerce");

    // Log out: the dashboard asks for a login again.
    b.eval("document.querySelector('form[action=\"/dashboard/logout\"]').submit(); return true;")
        .unwrap();
    b.wait_for(
        "the login page after logout",
        "return location.pathname === '/dashboard/login';",
        DESCRIBE,
    )
    .unwrap();
    b.goto(&format!("{base}/dashboard/tokens")).unwrap();
    b.wait_for(
        "still logged out",
        "return location.pathname === '/dashboard/login';",
        DESCRIBE,
    )
    .unwrap();

    // A one-time link from the CLI: opening it logs in only after the button; a second use fails.
    let link = s.admin(&["dashboard", "link", "--account", &account.to_string()]);
    let link = link["link"].as_str().unwrap().to_owned();
    assert!(
        link.starts_with(&format!("{base}/dashboard/login?link=")),
        "{link}"
    );
    for (what, expect) in [
        ("the link logs in", "return location.pathname === '/dashboard' && document.body.innerText.includes('Balance');"),
        ("the link refused the second time", "return document.body.innerText.includes('wrong, used or expired');"),
    ] {
        b.goto(&link).unwrap();
        b.wait_for(
            "the link's button",
            "return !!document.querySelector('input[name=link]');",
            DESCRIBE,
        )
        .unwrap();
        b.eval("document.querySelector('form').submit(); return true;")
            .unwrap();
        b.wait_for(what, expect, DESCRIBE).unwrap();
    }
    b.screenshot("dashboard-link-used.png").unwrap();
}

/// A shop's side of BTCPay's "authorize app" flow on 127.0.0.2 (another site than the server's
/// 127.0.0.1, as a real shop is): `GET /` is a page linking to the authorization URL,
/// `POST /callback` keeps the body it is sent. Each connection has its own thread and a read
/// timeout, so an idle or speculative browser connection holds nothing up.
/// `authorize` builds the authorization URL from the shop's port (its callback's).
fn shop(authorize: impl FnOnce(u16) -> String) -> (u16, std::sync::mpsc::Receiver<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let authorize = std::sync::Arc::new(authorize(port));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let (tx, authorize) = (tx.clone(), authorize.clone());
            std::thread::spawn(move || shop_answer(conn, &authorize, &tx));
        }
    });
    (port, rx)
}

fn shop_answer(
    mut conn: std::net::TcpStream,
    authorize: &str,
    posted: &std::sync::mpsc::Sender<String>,
) {
    use std::io::{BufRead, BufReader, Read};
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(read) = conn.try_clone() else { return };
    let mut r = BufReader::new(read);
    let mut line = String::new();
    if r.read_line(&mut line).is_err() || line.is_empty() {
        return;
    }
    let mut length = 0;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    if r.read_exact(&mut body).is_err() {
        return;
    }
    let answer = if line.starts_with("POST /callback") {
        let _ = posted.send(String::from_utf8_lossy(&body).into_owned());
        "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\nconnection: close\r\n\r\n\
         <h1>Shop connected</h1>"
            .to_owned()
    } else if line.starts_with("GET / ") {
        // The plugin's "Generate API key" button: a link the owner clicks (a navigation the
        // shop's page starts, so the browser treats it as cross-site).
        let page = format!(
            "<!doctype html><a id=generate href=\"{}\">Generate API key</a>",
            authorize.replace('&', "&amp;")
        );
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{page}",
            page.len()
        )
    } else {
        "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned()
    };
    let _ = conn.write_all(answer.as_bytes());
}

/// Percent-decodes a form value (`+` is a space).
fn form_decode(s: &str) -> String {
    let s = s.replace('+', " ");
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn a_shop_plugin_connects_with_the_servers_url_through_the_authorize_page() {
    if !browser::required() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let server = Server::start_with(dir.path(), port, &["--public-url", &base]);
    let s = &server;
    let account = s.admin(&["account", "create"])["account"].as_u64().unwrap();
    set_password(s, account);
    // The plugin knows the server's URL and nothing else: it asks for WooCommerce's
    // permissions and to be sent the key at its callback.
    let (shop_port, posted) = shop(|p| {
        format!(
            "{base}/api-keys/authorize?applicationName=WooCommerce&strict=true&selectiveStores=true\
             &redirect=http%3A%2F%2F127.0.0.2%3A{p}%2Fcallback\
             &permissions=btcpay.store.canviewinvoices&permissions=btcpay.store.cancreateinvoice\
             &permissions=btcpay.store.canviewstoresettings&permissions=btcpay.store.canmodifyinvoices"
        )
    });
    let b = Browser::start(1280, 900).unwrap();
    let log_in = || {
        b.eval(&format!(
            "document.querySelector('input[name=store]').value = '{account}'; \
             document.querySelector('input[name=password]').value = '{PASSWORD}'; \
             document.querySelector('form').submit(); return true;"
        ))
        .unwrap();
    };
    // The owner is logged in to the dashboard already.
    b.goto(&format!("{base}/dashboard")).unwrap();
    b.wait_for(
        "the login form",
        "return location.pathname === '/dashboard/login';",
        DESCRIBE,
    )
    .unwrap();
    log_in();
    b.wait_for(
        "the store's home page",
        "return location.pathname === '/dashboard';",
        DESCRIBE,
    )
    .unwrap();
    // The plugin's button: from the shop's site the `SameSite=Strict` session cookie is not
    // sent, so the login page comes, with this server's own link back to the request, which
    // sends it.
    b.goto(&format!("http://127.0.0.2:{shop_port}/")).unwrap();
    b.wait_for(
        "the shop's settings page",
        "return !!document.getElementById('generate');",
        DESCRIBE,
    )
    .unwrap();
    b.eval("document.getElementById('generate').click(); return true;")
        .unwrap();
    b.wait_for(
        "the login page, which comes back to the request",
        "return location.pathname === '/dashboard/login' && !!document.querySelector('input[name=next]');",
        DESCRIBE,
    )
    .unwrap();
    b.eval(
        "Array.from(document.querySelectorAll('a')).find(a => a.textContent.includes('Continue')).click(); return true;",
    )
    .unwrap();
    b.wait_for(
        "the authorization page",
        "return location.pathname === '/api-keys/authorize' && \
                document.body.innerText.includes('WooCommerce asks for an API key');",
        DESCRIBE,
    )
    .unwrap();
    b.screenshot("authorize-app.png").unwrap();
    b.eval(
        "document.querySelector('form[action=\"/api-keys/authorize\"] button').click(); return true;",
    )
    .unwrap();
    // The key goes back by itself (the page's script, allowed by its hash).
    b.wait_for(
        "the shop's callback page",
        "return document.body.innerText.includes('Shop connected');",
        DESCRIBE,
    )
    .unwrap();
    let body = posted
        .recv_timeout(Duration::from_secs(10))
        .expect("the shop got the key");
    let fields: Vec<(String, String)> = body
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (form_decode(k), form_decode(v)))
        .collect();
    let token = &fields.iter().find(|(k, _)| k == "apiKey").unwrap().1;
    assert!(fields.contains(&("userId".to_owned(), account.to_string())));
    let mut perms: Vec<&str> = fields
        .iter()
        .filter(|(k, _)| k == "permissions[]")
        .map(|(_, v)| v.as_str())
        .collect();
    perms.sort_unstable();
    let want: Vec<String> = [
        "btcpay.store.cancreateinvoice",
        "btcpay.store.canmodifyinvoices",
        "btcpay.store.canviewinvoices",
        "btcpay.store.canviewstoresettings",
    ]
    .iter()
    .map(|p| format!("{p}:{account}"))
    .collect();
    assert_eq!(perms, want);
    // The key works as the plugin will use it.
    let inv = ok(
        http(
            s.addr,
            "POST",
            &format!("/api/v1/stores/{account}/invoices"),
            Some(token),
            Some(&json!({"amount": "0.0001", "currency": "BTC"}).to_string()),
        ),
        "an invoice with the posted key",
    );
    assert_eq!(inv["status"], "New");
}
