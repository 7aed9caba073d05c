//! The point-of-sale page in headless Chromium: the cashier types an amount on the keypad (the
//! store's decimals are enforced), charges, sees the invoice QR, then sees it turn paid live.

#[path = "../../api/tests/browser/mod.rs"]
mod browser;
#[path = "../../tests/common/ports.rs"]
mod ports;

use ports::free_port;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use browser::Browser;
use futures_util::stream::{self, Stream};
use merchant::pages::POS_HTML;
use merchant::qr::{bip21_uri, qr_svg};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

const TOKEN: &str = "posTok3nAbc";
const ID: &str = "Inv9PosAbcDef";
const ADDRESS: &str = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080";

#[derive(Clone)]
struct Scripted {
    invoice: watch::Sender<Value>,
    charged: Arc<Mutex<Vec<Value>>>,
}

fn invoice(status: &str) -> Value {
    json!({
        "id": ID, "storeName": "Corner Café", "status": status, "marks": [],
        "currency": "USD", "amount": "12.5",
        "amountBtc": "0.00025", "quoteAsset": "USD", "amountQuote": "12.50", "rate": "50000.00",
        "paidBtc": "0", "dueBtc": "0.00025", "address": ADDRESS,
        "bip21": bip21_uri(ADDRESS, 25_000, Some("Corner Café"), None),
        "checkoutUrl": format!("/i/{ID}"), "confirmationsRequired": 0,
        "createdTime": 0, "expireTime": 900_000, "serverTime": 0, "payments": [],
    })
}

async fn page(Path(token): Path<String>) -> Response {
    if token != TOKEN {
        return StatusCode::NOT_FOUND.into_response();
    }
    Html(POS_HTML).into_response()
}

async fn info() -> Json<Value> {
    Json(json!({"storeName": "Corner Café", "currency": "USD", "decimals": 2}))
}

async fn charge(State(s): State<Scripted>, Json(body): Json<Value>) -> Response {
    s.charged.lock().unwrap().push(body);
    (StatusCode::CREATED, Json(s.invoice.borrow().clone())).into_response()
}

async fn qr() -> Response {
    let svg = qr_svg(&bip21_uri(ADDRESS, 25_000, Some("Corner Café"), None));
    ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response()
}

async fn events(State(s): State<Scripted>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut rx = s.invoice.subscribe();
    rx.mark_changed();
    Sse::new(stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let data = rx.borrow_and_update().to_string();
        Some((Ok(Event::default().data(data)), rx))
    }))
}

const DESCRIBE: &str = "return document.body.innerText.slice(0, 600);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pos_page_charges_an_amount_and_shows_it_paid() {
    if !browser::required() {
        return;
    }
    let (tx, _rx) = watch::channel(invoice("New"));
    let s = Scripted {
        invoice: tx,
        charged: Arc::new(Mutex::new(Vec::new())),
    };
    let app = Router::new()
        .route("/pos/{token}", get(page))
        .route("/pos/{token}/info", get(info))
        .route("/pos/{token}/invoice", post(charge))
        .route("/i/{id}/qr.svg", get(qr))
        .route("/i/{id}/events", get(events))
        .with_state(s.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(axum::serve(listener, app).into_future());
    let url = format!("http://{addr}/pos/{TOKEN}");
    let scripted = s.clone();
    tokio::task::spawn_blocking(move || drive(&url, &scripted))
        .await
        .expect("browser thread")
        .expect("browser scenario");
    assert_eq!(*s.charged.lock().unwrap(), vec![json!({"amount": "12.50"})]);
    server.abort();
}

fn drive(url: &str, s: &Scripted) -> anyhow::Result<()> {
    let b = Browser::start(1024, 900)?;
    // A phone-sized viewport (a window's --window-size has a desktop minimum width).
    b.resize(390, 844)?;
    b.goto(url)?;
    b.wait_for(
        "the keypad",
        "return !document.getElementById('sale').hidden;",
        DESCRIBE,
    )?;
    // 1 2 . 5 0 and a third decimal that USD's 2 decimals refuse.
    b.eval(
        "for (const k of ['1','2','.','5','0','9']) \
           document.querySelector(`[data-key=\"${k}\"]`).click(); return true;",
    )?;
    let typed = b.eval(
        "return [document.getElementById('amount-input').value, \
                 document.getElementById('charge').disabled];",
    )?;
    assert_eq!(typed, json!(["12.50", false]));
    b.screenshot("pos-keypad.png")?;

    b.eval("document.getElementById('charge').click(); return true;")?;
    b.wait_for(
        "the invoice QR",
        "var q = document.getElementById('qr'); \
         return document.getElementById('status').dataset.status === 'New' \
                && q.complete && q.naturalWidth > 0;",
        DESCRIBE,
    )?;
    assert_eq!(
        b.eval("return document.getElementById('amount-btc').textContent;")?,
        "0.00025"
    );
    b.screenshot("pos-invoice.png")?;

    s.invoice.send_replace(invoice("Settled"));
    b.wait_for(
        "Settled",
        "return document.getElementById('status').dataset.status === 'Settled';",
        DESCRIBE,
    )?;
    b.screenshot("pos-paid.png")?;

    b.eval("document.getElementById('new-sale').click(); return true;")?;
    let reset = b.eval(
        "return [document.getElementById('amount-input').value, \
                 document.getElementById('charge').disabled, \
                 document.getElementById('sale').hidden];",
    )?;
    assert_eq!(reset, json!(["", true, false]));
    Ok(())
}
