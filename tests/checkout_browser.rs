//! The checkout and point-of-sale pages in headless Chromium against the real thing: `mediator
//! serve` with its own regtest bitcoind, a merchant set up through the admin commands and the
//! signed API, invoices paid on chain by a BDK wallet.
//!
//! * checkout: a BTC invoice on a desktop window and a USD invoice (priced by a trade) on a
//!   390×844 phone window show the QR and the amount; after the payment both turn to
//!   Processing and, one block later, Settled, without a reload;
//! * point of sale: the cashier types an amount on the keypad, charges, the customer pays the
//!   address the page shows, and the page turns paid.
//! * modal checkout: a shop's page on another site opens the invoice over itself with
//!   `/modal/btcpay.js` and hears `loaded`, `New`, `Processing` and `Settled` from the frame.
//!
//! Screenshots go to `$MEDIATOR_ARTIFACTS` (else the test target's temp dir); their paths are
//! printed. Needs bitcoind (`BITCOIND_EXE`) and Chromium (`scripts/install-browser.sh`, or
//! `MEDIATOR_SKIP_BROWSER=1` to skip).

#[path = "../api/tests/browser/mod.rs"]
mod browser;
mod common;

use api::client::Client;
use browser::Browser;
use common::payer::Payer;
use common::{free_port, Server};
use serde_json::{json, Value};
use std::time::Duration;

/// How long the chain side may take: mempool → custody → monitor → SSE → page.
const CHAIN: Duration = Duration::from_secs(90);

/// The page's state, for failure messages.
const DESCRIBE: &str = "var s = document.getElementById('status'); \
    return {status: s && s.dataset.status, text: s && s.innerText, \
            body: document.body.innerText.slice(0, 600)};";

/// Signed calls with a blocking face (the browser and the payer are blocking too).
struct Api {
    client: Client,
    rt: tokio::runtime::Runtime,
}

impl Api {
    fn new(s: &Server, key: &Value) -> Api {
        Api {
            client: Client::new(
                s.addr,
                key["apiKey"].as_str().unwrap(),
                key["secretKey"].as_str().unwrap(),
            ),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    fn call(&self, method: &str, path: &str, params: &[(&str, &str)]) -> Value {
        self.rt
            .block_on(self.client.signed(method, path, params))
            .unwrap_or_else(|e| panic!("{method} {path} {params:?}: {e}"))
    }
}

fn account(s: &Server) -> String {
    s.admin(&["account", "create"])["account"]
        .as_u64()
        .unwrap()
        .to_string()
}

fn key(s: &Server, account: &str, permissions: &str) -> Value {
    s.admin(&[
        "apikey",
        "create",
        "--account",
        account,
        "--permissions",
        permissions,
    ])
}

/// A BTCUSD price: one trade of 0.01 BTC at 50,000 between a seller funded on chain (a real
/// deposit, so custody's books balance) and a buyer credited with USD.
fn make_usd_price(s: &Server) {
    let (seller, buyer) = (account(s), account(s));
    let (sk, bk) = (
        Api::new(s, &key(s, &seller, "read,trade")),
        Api::new(s, &key(s, &buyer, "read,trade")),
    );
    s.admin(&["regtest", "fund", &seller]);
    s.admin(&["credit", &buyer, "USD", "2000", "--reference", "price-usd"]);
    let deadline = std::time::Instant::now() + CHAIN;
    while free_btc(&sk) < 2_000_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the seller's deposit was not credited"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A USD invoice needs a trade between two accounts inside a deep, narrow book (the
    // reference price, api/README.md): 0.02 BTC asked at 50,000, half of it bought, and 0.01
    // BTC bid at 49,900.
    let order = |side: &'static str, quantity: &'static str, price: &'static str| {
        vec![
            ("symbol", "BTCUSD"),
            ("type", "LIMIT"),
            ("timeInForce", "GTC"),
            ("side", side),
            ("quantity", quantity),
            ("price", price),
        ]
    };
    assert_eq!(
        sk.call("POST", "/api/v3/order", &order("SELL", "0.02", "50000"))["status"],
        "NEW"
    );
    let r = bk.call("POST", "/api/v3/order", &order("BUY", "0.01", "50000"));
    assert_eq!(r["status"], "FILLED", "{r}");
    let r = bk.call("POST", "/api/v3/order", &order("BUY", "0.01", "49900"));
    assert_eq!(r["status"], "NEW", "{r}");
}

/// The free BTC balance, in satoshis.
fn free_btc(a: &Api) -> u64 {
    let v = a.call("GET", "/api/v3/account", &[]);
    v["balances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["asset"] == "BTC")
        .map_or(0, |b| sats(b["free"].as_str().unwrap()))
}

/// A merchant account with a MERCHANT key and its store saved (`settings` on top of a name and
/// speed policy 1); the store settings as answered.
fn merchant(s: &Server, name: &str, settings: &[(&str, &str)]) -> (Api, Value) {
    let a = account(s);
    let m = Api::new(s, &key(s, &a, "read,trade,merchant"));
    let mut params = vec![("name", name), ("speedPolicy", "1")];
    params.extend_from_slice(settings);
    let store = m.call("POST", "/mapi/v1/merchant/store", &params);
    assert_eq!(store["name"], name, "{store}");
    assert_eq!(store["speedPolicy"], 1, "{store}");
    (m, store)
}

/// An exact BTC decimal ("0.00025") in satoshis.
fn sats(btc: &str) -> u64 {
    let (i, f) = btc.split_once('.').unwrap_or((btc, ""));
    assert!(f.len() <= 8, "{btc}");
    i.parse::<u64>().unwrap() * 100_000_000 + format!("{f:0<8}").parse::<u64>().unwrap()
}

fn status_is(status: &str) -> String {
    format!("return document.getElementById('status').dataset.status === '{status}';")
}

const QR_LOADED: &str =
    "var q = document.getElementById('qr'); return q.complete && q.naturalWidth > 0;";

/// A checkout page open on one invoice.
struct Checkout {
    b: Browser,
    invoice: Value,
    /// Screenshot names start with this.
    name: &'static str,
}

impl Checkout {
    /// Opens `/i/<id>` in a `width`×`height` window and checks what a payer needs to see.
    fn open(
        s: &Server,
        invoice: Value,
        name: &'static str,
        (width, height): (u32, u32),
        quote: Option<&str>,
    ) -> anyhow::Result<Checkout> {
        let b = Browser::start(1280, 900)?;
        // The window's --window-size has a desktop minimum width; resize sets any size.
        b.resize(width, height)?;
        let id = invoice["id"].as_str().unwrap();
        b.goto(&format!("http://{}/i/{id}", s.addr))?;
        b.wait_for("the New invoice", &status_is("New"), DESCRIBE)?;
        b.wait_for("the QR image", QR_LOADED, DESCRIBE)?;
        let shown = b.eval(
            "return {btc: document.getElementById('amount-btc').textContent, \
                     quote: document.getElementById('amount-quote').textContent, \
                     quoteHidden: document.getElementById('amount-quote').hidden, \
                     store: document.getElementById('store-name').textContent, \
                     wallet: document.getElementById('open-wallet').getAttribute('href'), \
                     address: document.getElementById('address').value, \
                     width: window.innerWidth, \
                     scrollWidth: document.documentElement.scrollWidth};",
        )?;
        assert_eq!(shown["btc"], invoice["amountBtc"], "{shown}");
        assert_eq!(shown["address"], invoice["address"], "{shown}");
        assert_eq!(shown["wallet"], invoice["bip21"], "{shown}");
        assert_eq!(shown["store"], invoice["storeName"], "{shown}");
        match quote {
            Some(q) => assert_eq!(shown["quote"], q, "{shown}"),
            None => assert_eq!(shown["quoteHidden"], true, "{shown}"),
        }
        assert!(
            shown["scrollWidth"].as_u64() <= shown["width"].as_u64(),
            "wider than the window: {shown}"
        );
        b.screenshot(&format!("{name}-new.png"))?;
        // A marker that a reload would wipe out.
        b.eval("window.__mediatorMarker = 'still here'; return true;")?;
        Ok(Checkout { b, invoice, name })
    }

    fn sats(&self) -> u64 {
        sats(self.invoice["amountBtc"].as_str().unwrap())
    }

    fn address(&self) -> &str {
        self.invoice["address"].as_str().unwrap()
    }

    /// Waits for `status` (over the page's live updates), checks the page did not reload and
    /// keeps a screenshot.
    fn wait_status(&self, status: &str, text: &str) -> anyhow::Result<()> {
        let b = &self.b;
        b.wait_for_within(CHAIN, status, &status_is(status), DESCRIBE)?;
        let shown = b.eval("return document.getElementById('status').innerText;")?;
        assert!(shown.as_str().unwrap().contains(text), "{shown}");
        assert_eq!(
            b.eval("return window.__mediatorMarker;")?,
            "still here",
            "the page reloaded"
        );
        b.screenshot(&format!("{}-{}.png", self.name, status.to_lowercase()))?;
        Ok(())
    }
}

#[test]
fn checkout_page_on_the_real_server_turns_paid_without_reload() {
    if !browser::required() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A panicking test drops the server, which kills it and its bitcoind.
    let server = Server::start(dir.path(), free_port());
    let s = &server;
    make_usd_price(s);
    let (m, _) = merchant(s, "Corner Café", &[("defaultCurrency", "USD")]);
    let btc_invoice = m.call(
        "POST",
        "/mapi/v1/merchant/invoice",
        &[
            ("amount", "0.00025"),
            ("currency", "BTC"),
            ("orderId", "42"),
        ],
    );
    assert_eq!(btc_invoice["amountBtc"], "0.00025", "{btc_invoice}");
    assert_eq!(btc_invoice["status"], "New", "{btc_invoice}");
    // 12.50 USD at the last trade price, 50,000: 0.00025 BTC.
    let usd_invoice = m.call(
        "POST",
        "/mapi/v1/merchant/invoice",
        &[("amount", "12.50"), ("orderId", "43")],
    );
    assert_eq!(usd_invoice["currency"], "USD", "{usd_invoice}");
    assert_eq!(usd_invoice["amountBtc"], "0.00025", "{usd_invoice}");

    let mut payer = Payer::new(7);
    payer.fund(&s.rpc());

    // Both pages open at once: the BTC invoice on a desktop, the USD one on a phone.
    let desk = Checkout::open(s, btc_invoice, "checkout-real", (1280, 900), None).unwrap();
    let phone = Checkout::open(
        s,
        usd_invoice,
        "checkout-real-phone",
        (390, 844),
        Some("12.50 USD  ·  1 BTC = 50,000.00 USD"),
    )
    .unwrap();

    // The customer pays both exactly; seen in the mempool → Processing.
    let rpc = s.rpc();
    for page in [&desk, &phone] {
        payer.pay(&rpc, page.address(), page.sats());
    }
    for page in [&desk, &phone] {
        page.wait_status("Processing", "Payment received").unwrap();
    }
    // One confirmation (speed policy 1) → Settled.
    s.admin(&["regtest", "mine", "1"]);
    for page in [&desk, &phone] {
        page.wait_status("Settled", "Paid").unwrap();
    }
    // The pay area is gone once paid; the payment is listed.
    let after = desk
        .b
        .eval(
            "return [document.getElementById('pay-area').hidden, \
                     document.getElementById('payment-list').innerText];",
        )
        .unwrap();
    assert_eq!(after[0], true, "{after}");
    assert!(
        after[1].as_str().unwrap().contains("0.00025 BTC"),
        "{after}"
    );
    drop((desk, phone));
    let status = server.terminate();
    assert!(status.success(), "clean shutdown: {status}");
}

#[test]
fn pos_page_on_the_real_server_charges_and_turns_paid() {
    if !browser::required() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A panicking test drops the server, which kills it and its bitcoind.
    let server = Server::start(dir.path(), free_port());
    let s = &server;
    make_usd_price(s);
    let (_m, store) = merchant(
        s,
        "Corner Café",
        &[("defaultCurrency", "USD"), ("posEnabled", "true")],
    );
    assert_eq!(store["posEnabled"], true, "{store}");
    let pos_url = store["posUrl"].as_str().expect("a POS URL").to_owned();
    // A cashier types USD in cents (the market's price tick), not the ledger's 8 decimals.
    let info: Value =
        serde_json::from_str(&http(s, "GET", &format!("{pos_url}/info"), "", 200)).unwrap();
    assert_eq!(info["decimals"], 2, "{info}");
    let refused = http(
        s,
        "POST",
        &format!("{pos_url}/invoice"),
        r#"{"amount":"12.509"}"#,
        400,
    );
    assert!(refused.contains("-1111"), "{refused}");
    let mut payer = Payer::new(8);
    payer.fund(&s.rpc());

    let b = Browser::start(1024, 900).unwrap();
    b.resize(390, 844).unwrap();
    b.goto(&format!("http://{}{pos_url}", s.addr)).unwrap();
    b.wait_for(
        "the keypad",
        "return !document.getElementById('sale').hidden;",
        DESCRIBE,
    )
    .unwrap();
    assert_eq!(
        b.eval("return document.getElementById('currency').textContent;")
            .unwrap(),
        "USD"
    );
    // 1 2 . 5 0 and a third decimal that a cash currency refuses.
    b.eval(
        "for (const k of ['1','2','.','5','0','9']) \
           document.querySelector(`[data-key=\"${k}\"]`).click(); return true;",
    )
    .unwrap();
    let typed = b
        .eval(
            "return [document.getElementById('amount-input').value, \
                     document.getElementById('charge').disabled];",
        )
        .unwrap();
    assert_eq!(typed, json!(["12.50", false]));
    b.screenshot("pos-real-keypad.png").unwrap();

    b.eval("document.getElementById('charge').click(); return true;")
        .unwrap();
    b.wait_for(
        "the invoice QR",
        &format!(
            "return document.getElementById('status').dataset.status === 'New' \
                    && (function () {{ {QR_LOADED} }})();"
        ),
        DESCRIBE,
    )
    .unwrap();
    // The invoice the page made: its id from the QR's URL, its address from the public status.
    let src = b
        .eval("return document.getElementById('qr').getAttribute('src');")
        .unwrap();
    let id = src.as_str().unwrap()["/i/".len()..]
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let inv: Value =
        serde_json::from_str(&http(s, "GET", &format!("/i/{id}/status"), "", 200)).unwrap();
    assert_eq!(inv["status"], "New", "{inv}");
    assert_eq!(inv["amount"], "12.50", "{inv}");
    assert_eq!(inv["currency"], "USD", "{inv}");
    assert_eq!(inv["amountBtc"], "0.00025", "{inv}");
    let shown = b
        .eval(
            "return [document.getElementById('amount-btc').textContent, \
                     document.getElementById('charge-fiat').textContent];",
        )
        .unwrap();
    assert_eq!(shown, json!(["0.00025", "12.50 USD"]));
    b.eval("window.__mediatorMarker = 'still here'; return true;")
        .unwrap();
    b.screenshot("pos-real-invoice.png").unwrap();

    let rpc = s.rpc();
    payer.pay(&rpc, inv["address"].as_str().unwrap(), sats("0.00025"));
    b.wait_for_within(CHAIN, "Processing", &status_is("Processing"), DESCRIBE)
        .unwrap();
    // Received, not final: the mark is there, amber until the confirmation.
    assert_eq!(
        b.eval("var m = document.getElementById('paid-mark'); return [m.hidden, m.dataset.tone];")
            .unwrap(),
        json!([false, "warn"])
    );
    b.screenshot("pos-real-processing.png").unwrap();
    s.admin(&["regtest", "mine", "1"]);
    b.wait_for_within(CHAIN, "Settled", &status_is("Settled"), DESCRIBE)
        .unwrap();
    let paid = b
        .eval(
            "return [document.getElementById('paid-mark').hidden, \
                     document.getElementById('qr-wrap').hidden, window.__mediatorMarker];",
        )
        .unwrap();
    assert_eq!(paid, json!([false, true, "still here"]));
    assert_eq!(
        b.eval("return document.getElementById('paid-mark').dataset.tone;")
            .unwrap(),
        "ok"
    );
    b.screenshot("pos-real-paid.png").unwrap();
    drop(b);
    let status = server.terminate();
    assert!(status.success(), "clean shutdown: {status}");
}

/// A plain request to a public endpoint (no signature): the body, after checking the status.
fn http(s: &Server, method: &str, path: &str, body: &str, status: u16) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = String::new();
    c.read_to_string(&mut r).unwrap();
    let (head, body) = r.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with(&format!("HTTP/1.1 {status}")),
        "{method} {path}: {head}\n{body}"
    );
    body.to_owned()
}

/// A shop's page on 127.0.0.2 (another site than the server's), as WooCommerce's modal checkout
/// writes it: loads `/modal/btcpay.js` from the server, opens the invoice with
/// `btcpay.showInvoice` and keeps the frame's messages.
fn modal_shop(server: std::net::SocketAddr, invoice_id: &str) -> u16 {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let page = format!(
        "<!doctype html><title>Shop</title><p>Your order</p>\
         <script src=\"http://{server}/modal/btcpay.js\"></script>\
         <script>window.msgs = []; window.left = 0; window.stale = 0;\
         btcpay.setApiUrlPrefix('http://{server}');\
         btcpay.onModalReceiveMessage(function () {{ window.stale += 1; }});\
         btcpay.onModalReceiveMessage(function (e) {{ window.msgs.push(e.data); }});\
         btcpay.onModalWillLeave(function () {{ window.left += 1; }});\
         btcpay.showInvoice('{invoice_id}');</script>"
    );
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let page = page.clone();
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let Ok(read) = conn.try_clone() else { return };
                let mut r = BufReader::new(read);
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).is_err() || line.trim().is_empty() {
                        break;
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = std::io::Write::write_all(&mut conn, answer.as_bytes());
            });
        }
    });
    port
}

/// WooCommerce's modal checkout: the shop's page (another site) opens the checkout over itself
/// with `/modal/btcpay.js`; the framed page (`view=modal`, which any site may frame) tells the
/// shop "loaded" and each status, `New`, then `Processing` and `Settled` as the customer pays,
/// without a reload; a message the shop's own page forges is not taken for the frame's.
#[test]
fn modal_checkout_opens_over_a_shops_page_and_tells_it_the_invoice_is_paid() {
    if !browser::required() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), free_port());
    let s = &server;
    let (m, _) = merchant(s, "Modal Shop", &[]);
    let invoice = m.call(
        "POST",
        "/mapi/v1/merchant/invoice",
        &[("amount", "0.0003"), ("currency", "BTC"), ("orderId", "77")],
    );
    let id = invoice["id"].as_str().unwrap().to_owned();
    let shop = modal_shop(s.addr, &id);
    let b = Browser::start(1280, 900).unwrap();
    const SHOP: &str = "return {msgs: window.msgs, left: window.left, stale: window.stale, \
        frames: document.querySelectorAll('iframe[name=btcpay]').length};";
    b.goto(&format!("http://127.0.0.2:{shop}/")).unwrap();
    let told = |status: &str| {
        format!(
            "return (window.msgs || []).some(function (m) {{ \
               return m && m.invoiceId === '{id}' && m.status === '{status}'; }});"
        )
    };
    b.wait_for(
        "the frame's loaded message",
        "return (window.msgs || []).indexOf('loaded') >= 0;",
        SHOP,
    )
    .unwrap();
    b.wait_for("the New invoice", &told("New"), SHOP).unwrap();
    b.screenshot("modal-checkout-new.png").unwrap();
    // A "close" posted by the shop's page itself is not the frame's.
    // Its listener runs after btcpay.js's (added later), so once it has seen the message,
    // btcpay.js has too.
    b.eval(
        "window.addEventListener('message', function (e) { \
           if (e.data === 'close' && e.source === window) window.forged = true; }); \
         window.postMessage('close', '*'); return true;",
    )
    .unwrap();
    b.wait_for(
        "the forged message handled",
        "return window.forged === true;",
        SHOP,
    )
    .unwrap();
    let shown = b.eval(SHOP).unwrap();
    assert_eq!(shown["frames"], 1, "{shown}");
    assert_eq!(shown["left"], 0, "{shown}");
    // The customer pays: seen in the mempool, then one block.
    let mut payer = Payer::new(11);
    let rpc = s.rpc();
    payer.fund(&rpc);
    payer.pay(&rpc, invoice["address"].as_str().unwrap(), sats("0.0003"));
    b.wait_for_within(CHAIN, "Processing", &told("Processing"), SHOP)
        .unwrap();
    s.admin(&["regtest", "mine", "1"]);
    b.wait_for_within(CHAIN, "Settled", &told("Settled"), SHOP)
        .unwrap();
    b.screenshot("modal-checkout-settled.png").unwrap();
    // The shop closes it.
    b.eval("btcpay.hideFrame(); return true;").unwrap();
    let shown = b.eval(SHOP).unwrap();
    assert_eq!(
        (shown["frames"].clone(), shown["left"].clone()),
        (json!(0), json!(1)),
        "{shown}"
    );
    // A handler registered again replaces the one before (as BTCPay's setters do).
    assert_eq!(shown["stale"], 0, "{shown}");
    drop(b);
    let status = server.terminate();
    assert!(status.success(), "clean shutdown: {status}");
}
