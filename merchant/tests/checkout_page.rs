//! The checkout page in headless Chromium against a scripted server: it shows the amount and the
//! QR code, and its status follows the server's events from New to Processing to Settled without
//! a reload. Screenshots (desktop and phone) are kept as artifacts.

#[path = "../../api/tests/browser/mod.rs"]
mod browser;
#[path = "../../tests/common/ports.rs"]
mod ports;

use ports::free_port;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use browser::Browser;
use futures_util::stream::{self, Stream};
use merchant::pages::CHECKOUT_HTML;
use merchant::qr::{bip21_uri, qr_svg};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

const ID: &str = "7Hq3kP9xYz2mVb5nRt8wLc";
const ADDRESS: &str = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080";
const AMOUNT_SAT: u64 = 25_000;

/// What the page may see of the scripted invoice, and how often it asked.
#[derive(Clone)]
struct Scripted {
    invoice: watch::Sender<Value>,
    status_requests: Arc<AtomicUsize>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

fn bip21() -> String {
    bip21_uri(ADDRESS, AMOUNT_SAT, Some("Coffee Shop"), Some("Invoice 42"))
}

/// A PublicInvoice as in the merchant contract.
fn invoice(status: &str, paid: &str, due: &str, confirmations: u32) -> Value {
    let now = now_ms();
    let payments = if paid == "0" {
        json!([])
    } else {
        json!([{"amountBtc": paid, "confirmations": confirmations, "source": "chain", "time": now}])
    };
    json!({
        "id": ID, "storeName": "Coffee Shop", "status": status, "marks": [],
        "currency": "USD", "amount": "12.50",
        "amountBtc": "0.00025", "quoteAsset": "USD", "amountQuote": "12.50", "rate": "50000.00",
        "paidBtc": paid, "dueBtc": due,
        "address": ADDRESS, "bip21": bip21(), "checkoutUrl": format!("/i/{ID}"),
        "confirmationsRequired": 1,
        "createdTime": now - 60_000, "expireTime": now + 14 * 60_000, "serverTime": now,
        "payments": payments,
    })
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"code": -1150, "msg": "Unknown invoice."})),
    )
        .into_response()
}

async fn page(Path(id): Path<String>) -> Response {
    if id != ID {
        return not_found();
    }
    Html(CHECKOUT_HTML).into_response()
}

async fn status(State(s): State<Scripted>, Path(id): Path<String>) -> Response {
    s.status_requests.fetch_add(1, Ordering::SeqCst);
    if id != ID {
        return not_found();
    }
    Json(s.invoice.borrow().clone()).into_response()
}

async fn qr(Path(id): Path<String>) -> Response {
    if id != ID {
        return not_found();
    }
    ([(header::CONTENT_TYPE, "image/svg+xml")], qr_svg(&bip21())).into_response()
}

/// SSE: the invoice at connect, then every change.
async fn events(
    State(s): State<Scripted>,
    Path(_id): Path<String>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut rx = s.invoice.subscribe();
    rx.mark_changed();
    let updates = stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let data = rx.borrow_and_update().to_string();
        Some((Ok(Event::default().data(data)), rx))
    });
    Sse::new(updates).keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
}

fn app(s: Scripted) -> Router {
    Router::new()
        .route("/i/{id}", get(page))
        .route("/i/{id}/status", get(status))
        .route("/i/{id}/events", get(events))
        .route("/i/{id}/qr.svg", get(qr))
        .with_state(s)
}

/// Reads the page's state for failure messages.
const DESCRIBE: &str = "var s = document.getElementById('status'); \
    return {status: s && s.dataset.status, text: s && s.innerText, \
            body: document.body.innerText.slice(0, 600)};";

fn status_is(status: &str) -> String {
    format!("return document.getElementById('status').dataset.status === '{status}';")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_page_goes_live_from_new_to_settled_without_reload() {
    if !browser::required() {
        return;
    }
    let (tx, _rx) = watch::channel(invoice("New", "0", "0.00025", 0));
    let scripted = Scripted {
        invoice: tx,
        status_requests: Arc::new(AtomicUsize::new(0)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(axum::serve(listener, app(scripted.clone())).into_future());
    let url = format!("http://{addr}/i/{ID}");

    let s = scripted.clone();
    tokio::task::spawn_blocking(move || drive(&url, &s))
        .await
        .expect("browser thread")
        .expect("browser scenario");
    server.abort();
}

fn drive(url: &str, s: &Scripted) -> anyhow::Result<()> {
    let b = Browser::start(1280, 900)?;
    b.goto(url)?;

    // New: amount, quote amount, countdown, and a QR image that actually loaded.
    b.wait_for("the New invoice", &status_is("New"), DESCRIBE)?;
    b.wait_for(
        "the QR image",
        "var q = document.getElementById('qr'); return q.complete && q.naturalWidth > 0;",
        DESCRIBE,
    )?;
    let shown = b.eval(
        "return {btc: document.getElementById('amount-btc').textContent, \
                 quote: document.getElementById('amount-quote').textContent, \
                 timer: document.getElementById('timer').textContent, \
                 store: document.getElementById('store-name').textContent, \
                 wallet: document.getElementById('open-wallet').getAttribute('href'), \
                 address: document.getElementById('address').value};",
    )?;
    assert_eq!(shown["btc"], "0.00025", "{shown}");
    assert!(
        shown["quote"].as_str().unwrap().contains("12.50 USD"),
        "{shown}"
    );
    assert!(
        shown["timer"].as_str().unwrap().starts_with("Expires in 1"),
        "{shown}"
    );
    assert_eq!(shown["store"], "Coffee Shop");
    assert_eq!(shown["wallet"], json!(bip21()));
    assert_eq!(shown["address"], ADDRESS);
    b.screenshot("checkout-new.png")?;

    // Phone size: nothing wider than the screen.
    b.resize(390, 844)?;
    b.wait_for(
        "a phone-sized layout without horizontal scrolling",
        "return window.innerWidth <= 400 && \
                document.documentElement.scrollWidth <= window.innerWidth;",
        "return [window.innerWidth, document.documentElement.scrollWidth];",
    )?;
    b.screenshot("checkout-phone.png")?;
    b.resize(1280, 900)?;

    // A marker that a reload would wipe out.
    b.eval("window.__mediatorMarker = 'still here'; return true;")?;

    // Payment seen: Processing, pushed over SSE only.
    s.invoice
        .send_replace(invoice("Processing", "0.00025", "0", 0));
    b.wait_for("Processing", &status_is("Processing"), DESCRIBE)?;
    let text = b.eval("return document.getElementById('status').innerText;")?;
    assert!(
        text.as_str().unwrap().contains("Payment received"),
        "{text}"
    );
    b.screenshot("checkout-processing.png")?;

    // Confirmed: Settled.
    s.invoice
        .send_replace(invoice("Settled", "0.00025", "0", 1));
    b.wait_for("Settled", &status_is("Settled"), DESCRIBE)?;
    let text = b.eval("return document.getElementById('status').innerText;")?;
    assert!(text.as_str().unwrap().contains("Paid"), "{text}");
    assert_eq!(
        b.eval("return window.__mediatorMarker;")?,
        "still here",
        "the page reloaded"
    );
    // The updates came over SSE: the page asked for the status once, at load.
    assert_eq!(s.status_requests.load(Ordering::SeqCst), 1);
    b.screenshot("checkout.png")?;
    b.resize(390, 844)?;
    b.screenshot("checkout-phone-settled.png")?;
    Ok(())
}
