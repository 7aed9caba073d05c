//! Webhook deliveries to a real local HTTP server (axum on 127.0.0.1:0): signatures, retries,
//! a restart between attempts, permanent failures, the attempt limit, redelivery, a missing
//! endpoint, and one slow merchant not holding up another. No timing assertions: every wait is
//! for a condition, with a generous limit.
#![allow(missing_docs)]

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use hmac::{Hmac, Mac};
use merchant::target::TargetPolicy;
use merchant::webhook::{
    self, DeliveryStatus, DeliveryView, Dispatcher, EventType, RedeliverError, RetryPolicy,
    VerifyError, WebhookEndpoints,
};
use rusqlite::Connection;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[path = "../../tests/common/ports.rs"]
mod ports;

const SECRET: &[u8] = b"whsec_0123456789abcdef";
const LIMIT: Duration = Duration::from_secs(30);

/// One request the test server received.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
}

#[derive(Default)]
struct ServerState {
    received: Mutex<Vec<Received>>,
    /// Statuses to answer, in order; 200 once empty.
    script: Mutex<VecDeque<u16>>,
    /// Requests to `/slow` wait for this before they answer.
    gate: tokio::sync::Notify,
}

/// A recording HTTP server with scripted answers.
struct Server {
    url: String,
    state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(script: &[u16]) -> Server {
        let state = Arc::new(ServerState::default());
        state.script.lock().unwrap().extend(script);
        let app = axum::Router::new()
            .fallback(record)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Server { url, state, task }
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(
    State(s): State<Arc<ServerState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let path = uri.path().to_owned();
    s.received.lock().unwrap().push(Received {
        path: path.clone(),
        headers,
        body,
    });
    if path == "/slow" {
        s.gate.notified().await;
    }
    let status = s.script.lock().unwrap().pop_front().unwrap_or(200);
    StatusCode::from_u16(status).unwrap()
}

/// Merchants' endpoints, changeable while a dispatcher runs.
#[derive(Default)]
struct Endpoints(Mutex<HashMap<u32, (String, Vec<u8>)>>);

impl Endpoints {
    fn with(merchant: u32, url: &str) -> Arc<Endpoints> {
        let e = Arc::new(Endpoints::default());
        e.set(merchant, url);
        e
    }
    fn set(&self, merchant: u32, url: &str) {
        self.0
            .lock()
            .unwrap()
            .insert(merchant, (url.to_owned(), SECRET.to_vec()));
    }
}

impl WebhookEndpoints for Endpoints {
    fn endpoint(&self, merchant: u32) -> Option<(String, Vec<u8>)> {
        self.0.lock().unwrap().get(&merchant).cloned()
    }
}

fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        schedule: vec![Duration::from_millis(50)],
        max_attempts: 20,
        timeout: Duration::from_secs(10),
    }
}

fn open_db(path: &Path) -> Arc<Mutex<Connection>> {
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    webhook::init_schema(&conn).unwrap();
    Arc::new(Mutex::new(conn))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn invoice(id: &str) -> Value {
    json!({"id": id, "storeName": "Coffee Shop", "status": "Settled", "amountBtc": "0.00025", "marks": []})
}

fn enqueue(
    db: &Arc<Mutex<Connection>>,
    merchant: u32,
    invoice_id: &str,
    event: EventType,
) -> String {
    let conn = db.lock().unwrap();
    let tx = conn.unchecked_transaction().unwrap();
    let id = webhook::enqueue(
        &tx,
        merchant,
        invoice_id,
        event,
        &invoice(invoice_id),
        now_ms(),
    )
    .unwrap();
    tx.commit().unwrap();
    id
}

fn log(db: &Arc<Mutex<Connection>>, merchant: u32, invoice_id: &str) -> Vec<DeliveryView> {
    webhook::deliveries(&db.lock().unwrap(), merchant, invoice_id).unwrap()
}

/// Waits (polling) until `cond` holds; panics with `what` after [`LIMIT`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < LIMIT, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_status(
    db: &Arc<Mutex<Connection>>,
    merchant: u32,
    invoice_id: &str,
    status: DeliveryStatus,
) -> DeliveryView {
    wait_until(&format!("{invoice_id} is {status:?}"), || {
        log(db, merchant, invoice_id)
            .first()
            .is_some_and(|d| d.status == status)
    })
    .await;
    log(db, merchant, invoice_id).remove(0)
}

/// The Rust verification snippet of `api/README.md` ("Webhooks"), verbatim but for its name.
#[rustfmt::skip]
fn readme_verify(secret: &[u8], header: &str, body: &[u8], now_unix_s: u64) -> bool {
    let (mut t, mut sigs) = (None, Vec::new());
    for item in header.split(',') {
        match item.split_once('=') {
            Some(("t", v)) => t = Some(v),
            Some(("v1", v)) => sigs.extend(hex::decode(v)),
            _ => {}
        }
    }
    let Some(t) = t.filter(|t| t.parse::<u64>().is_ok_and(|t| t.abs_diff(now_unix_s) <= 300)) else {
        return false;
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    sigs.iter().any(|sig| mac.clone().verify_slice(sig).is_ok()) // constant time
}

/// The signature verifies with `webhook::verify`, and also by an independent computation of
/// HMAC-SHA256(secret, "<t>.<raw body>") (so a symmetric mistake in signing and verifying fails).
fn assert_signed(r: &Received) {
    let now_s = now_ms() / 1000;
    let header = r.header(webhook::SIGNATURE_HEADER);
    assert_eq!(
        webhook::verify(SECRET, header, &r.body, now_s, 300),
        Ok(()),
        "header {header}"
    );
    let (t, v1) = header.split_once(",v1=").expect("t=..,v1=..");
    let t = t.strip_prefix("t=").expect("t first");
    assert!(
        t.parse::<u64>().unwrap().abs_diff(now_s) <= 60,
        "a fresh timestamp: {t}"
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&r.body);
    assert_eq!(v1, hex::encode(mac.finalize().into_bytes()));
    assert!(
        readme_verify(SECRET, header, &r.body, now_s),
        "the README's snippet accepts it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_arrives_signed_over_its_exact_body() {
    let server = Server::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("merchant.sqlite"));
    let d = private_dispatcher(
        db.clone(),
        Endpoints::with(7, &format!("{}/hook", server.url)),
        fast_policy(),
    );
    let id = enqueue(&db, 7, "inv-1", EventType::InvoiceSettled);
    d.wake();
    let view = wait_status(&db, 7, "inv-1", DeliveryStatus::Delivered).await;
    d.shutdown().await;

    let got = server.received();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.path, "/hook");
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.header("mediator-delivery"), id);
    assert_eq!(r.header("mediator-event"), "invoice.settled");
    assert!(
        r.header("user-agent").starts_with("Mediator-Webhooks/"),
        "{}",
        r.header("user-agent")
    );
    assert_signed(r);
    let body = r.json();
    assert_eq!(body["deliveryId"], json!(id));
    assert_eq!(body["type"], json!("invoice.settled"));
    assert_eq!(body["invoice"], invoice("inv-1"));
    assert_eq!(body.as_object().unwrap().len(), 4, "{body}");
    assert_eq!(body["createdTime"], json!(view.created_time));

    // The delivery log, as the API serializes it.
    let v = serde_json::to_value(&view).unwrap();
    assert_eq!(v["deliveryId"], json!(id));
    assert_eq!(v["invoiceId"], json!("inv-1"));
    assert_eq!(v["type"], json!("invoice.settled"));
    assert_eq!(v["status"], json!("delivered"));
    assert_eq!(v["nextAttemptTime"], Value::Null);
    assert_eq!(v["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(v["attempts"][0]["httpStatus"], json!(200));
    assert_eq!(v["attempts"][0]["error"], Value::Null);

    // What a receiver must reject, on the captured delivery.
    let header = r.header(webhook::SIGNATURE_HEADER);
    let now_s = now_ms() / 1000;
    let mut tampered = r.body.to_vec();
    let at = tampered.iter().position(|&b| b == b'S').unwrap(); // "Settled" -> "settled"
    tampered[at] = b's';
    assert_eq!(
        webhook::verify(SECRET, header, &tampered, now_s, 300),
        Err(VerifyError::Mismatch)
    );
    assert!(!readme_verify(SECRET, header, &tampered, now_s));
    assert!(!readme_verify(SECRET, header, &r.body, now_s + 301));
    assert!(!readme_verify(b"whsec_other", header, &r.body, now_s));
    assert!(!readme_verify(SECRET, "garbage", &r.body, now_s));
    assert_eq!(
        webhook::verify(b"whsec_other", header, &r.body, now_s, 300),
        Err(VerifyError::Mismatch)
    );
    assert!(matches!(
        webhook::verify(SECRET, header, &r.body, now_s + 301, 300),
        Err(VerifyError::OutsideTolerance { .. })
    ));
    assert!(matches!(
        webhook::verify(SECRET, &header.replace(",v1=", ";v1="), &r.body, now_s, 300),
        Err(VerifyError::Malformed { .. } | VerifyError::MissingSignature)
    ));
    assert!(matches!(
        webhook::verify(SECRET, "", &r.body, now_s, 300),
        Err(VerifyError::Malformed { .. })
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_500_is_retried_then_delivered_and_the_log_shows_both() {
    let server = Server::start(&[500]).await;
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("merchant.sqlite"));
    let d = private_dispatcher(db.clone(), Endpoints::with(1, &server.url), fast_policy());
    let id = enqueue(&db, 1, "inv-r", EventType::PaymentReceived);
    d.wake();
    let view = wait_status(&db, 1, "inv-r", DeliveryStatus::Delivered).await;
    d.shutdown().await;

    let statuses: Vec<_> = view.attempts.iter().map(|a| a.http_status).collect();
    assert_eq!(statuses, [Some(500), Some(200)]);
    assert_eq!(view.attempts[0].error.as_deref(), Some("HTTP 500"));
    assert_eq!(view.attempts[1].error, None);
    let got = server.received();
    assert_eq!(got.len(), 2);
    for r in &got {
        assert_eq!(r.header("mediator-delivery"), id);
        assert_eq!(r.header("mediator-event"), "invoice.payment_received");
        assert_eq!(r.body, got[0].body, "the body is fixed at enqueue");
        assert_signed(r);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retryable_statuses_are_retried() {
    let server = Server::start(&[408, 429, 503, 302]).await;
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("merchant.sqlite"));
    let d = private_dispatcher(db.clone(), Endpoints::with(1, &server.url), fast_policy());
    enqueue(&db, 1, "inv-q", EventType::InvoiceCreated);
    d.wake();
    let view = wait_status(&db, 1, "inv-q", DeliveryStatus::Delivered).await;
    d.shutdown().await;
    let statuses: Vec<_> = view.attempts.iter().map(|a| a.http_status).collect();
    assert_eq!(
        statuses,
        [Some(408), Some(429), Some(503), Some(302), Some(200)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_between_attempts_still_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("merchant.sqlite");
    // The merchant's server is down: nothing listens on this port.
    let down = {
        // Below the ephemeral range: no other socket's `bind(:0)` can start listening on it.
        format!("http://127.0.0.1:{}", ports::free_port())
    };
    let id = {
        let db = open_db(&path);
        let d = private_dispatcher(db.clone(), Endpoints::with(3, &down), fast_policy());
        let id = enqueue(&db, 3, "inv-x", EventType::InvoiceSettled);
        d.wake();
        wait_until("a failed attempt is recorded", || {
            log(&db, 3, "inv-x")
                .first()
                .is_some_and(|v| !v.attempts.is_empty())
        })
        .await;
        d.shutdown().await;
        let v = log(&db, 3, "inv-x").remove(0);
        assert_eq!(v.status, DeliveryStatus::Pending);
        assert_eq!(v.attempts[0].http_status, None);
        assert!(!v.attempts[0].error.as_deref().unwrap_or("").is_empty());
        assert!(v.next_attempt_time.is_some());
        id
        // The connection closes here: the next dispatcher has only the file.
    };

    let server = Server::start(&[]).await;
    let db = open_db(&path);
    let d = private_dispatcher(db.clone(), Endpoints::with(3, &server.url), fast_policy());
    let view = wait_status(&db, 3, "inv-x", DeliveryStatus::Delivered).await;
    d.shutdown().await;
    let got = server.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header("mediator-delivery"), id);
    assert_eq!(got[0].json()["deliveryId"], json!(id));
    assert_signed(&got[0]);
    assert!(view.attempts.len() >= 2);
    assert!(view.attempts[..view.attempts.len() - 1]
        .iter()
        .all(|a| a.http_status.is_none()));
    assert_eq!(view.attempts.last().unwrap().http_status, Some(200));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_4xx_fails_at_once() {
    let server = Server::start(&[404]).await;
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("merchant.sqlite"));
    let d = private_dispatcher(db.clone(), Endpoints::with(1, &server.url), fast_policy());
    enqueue(&db, 1, "inv-4", EventType::InvoiceExpired);
    d.wake();
    let view = wait_status(&db, 1, "inv-4", DeliveryStatus::Failed).await;
    d.shutdown().await;
    assert_eq!(view.attempts.len(), 1);
    assert_eq!(view.attempts[0].http_status, Some(404));
    assert_eq!(view.next_attempt_time, None);
    assert_eq!(server.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_attempts_then_failed() {
    let server = Server::start(&[503; 10]).await;
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("merchant.sqlite"));
    let policy = RetryPolicy {
        max_attempts: 3,
        ..fast_policy()
    };
    let d = private_dispatcher(db.clone(), Endpoints::with(1, &server.url), policy);
    enqueue(&db, 1, "inv-m", EventType::InvoiceInvalid);
    d.wake();
    let view = wait_status(&db, 1, "inv-m", DeliveryStatus::Failed).await;
    d.shutdown().await;
    let statuses: Vec<_> = view.attempts.iter().map(|a| a.http_status).collect();
    assert_eq!(statuses, [Some(503); 3]);
    assert_eq!(server.received().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn redeliver_sends_a_delivered_delivery_again() {
    let server = Server::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("merchant.sqlite"));
    let d = private_dispatcher(db.clone(), Endpoints::with(5, &server.url), fast_policy());
    let id = enqueue(&db, 5, "inv-d", EventType::InvoiceRefunded);
    d.wake();
    wait_status(&db, 5, "inv-d", DeliveryStatus::Delivered).await;

    {
        let conn = db.lock().unwrap();
        assert!(matches!(
            webhook::redeliver(&conn, 6, &id, now_ms()),
            Err(RedeliverError::Unknown)
        ));
        assert!(matches!(
            webhook::redeliver(&conn, 5, "00", now_ms()),
            Err(RedeliverError::Unknown)
        ));
        let v = webhook::redeliver(&conn, 5, &id, now_ms()).unwrap();
        assert_eq!((v.status, v.attempts.len()), (DeliveryStatus::Pending, 1));
    }
    d.wake();
    wait_until("the redelivery arrives", || server.received().len() == 2).await;
    let view = wait_status(&db, 5, "inv-d", DeliveryStatus::Delivered).await;
    d.shutdown().await;
    assert_eq!(view.attempts.len(), 2);
    let got = server.received();
    assert_eq!(got[1].header("mediator-delivery"), id);
    assert_eq!(got[1].body, got[0].body);
    assert_signed(&got[1]);
    assert_eq!(
        log(&db, 5, "inv-d").len(),
        1,
        "the same delivery, not a new one"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_endpoint_keeps_it_pending_with_a_note_until_one_is_configured() {
    let server = Server::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("merchant.sqlite"));
    let endpoints = Arc::new(Endpoints::default());
    let d = private_dispatcher(db.clone(), endpoints.clone(), fast_policy());
    enqueue(&db, 9, "inv-n", EventType::InvoiceCreated);
    d.wake();
    wait_until("an attempt without an endpoint is noted", || {
        log(&db, 9, "inv-n")
            .first()
            .is_some_and(|v| !v.attempts.is_empty())
    })
    .await;
    let v = log(&db, 9, "inv-n").remove(0);
    assert_eq!(
        v.attempts[0].error.as_deref(),
        Some("no webhook endpoint configured")
    );
    assert_eq!(v.attempts[0].http_status, None);
    endpoints.set(9, &server.url);
    wait_status(&db, 9, "inv-n", DeliveryStatus::Delivered).await;
    d.shutdown().await;
    assert_eq!(server.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_merchant_does_not_hold_up_another() {
    let server = Server::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("merchant.sqlite"));
    let endpoints = Endpoints::with(1, &format!("{}/slow", server.url));
    endpoints.set(2, &format!("{}/fast", server.url));
    let policy = RetryPolicy {
        timeout: Duration::from_secs(60),
        ..fast_policy()
    };
    let d = private_dispatcher(db.clone(), endpoints, policy);
    for i in 0..12 {
        enqueue(&db, 1, &format!("slow-{i}"), EventType::InvoiceCreated);
    }
    d.wake();
    wait_until("the slow merchant's first requests are held", || {
        server.received().iter().any(|r| r.path == "/slow")
    })
    .await;
    enqueue(&db, 2, "fast", EventType::InvoiceCreated);
    d.wake();
    wait_status(&db, 2, "fast", DeliveryStatus::Delivered).await;
    let slow_seen = server
        .received()
        .iter()
        .filter(|r| r.path == "/slow")
        .count();
    assert!(
        slow_seen <= webhook::MAX_IN_FLIGHT_PER_MERCHANT,
        "{slow_seen} slow requests in flight"
    );
    assert!((0..12).all(|i| log(&db, 1, &format!("slow-{i}"))[0].status == DeliveryStatus::Pending));

    // Release the slow endpoint: everything arrives.
    let gate = server.state.clone();
    let releaser = tokio::spawn(async move {
        loop {
            gate.gate.notify_waiters();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    for i in 0..12 {
        wait_status(&db, 1, &format!("slow-{i}"), DeliveryStatus::Delivered).await;
    }
    releaser.abort();
    d.shutdown().await;
}

/// Defect: eight deliveries were in flight at most, two per merchant, so four merchants whose
/// endpoints hang (a server that accepts and never answers, an address that drops packets)
/// held every slot until their timeouts, and every other merchant's webhooks waited behind
/// them, again after each timeout. The slots now number [`webhook::MAX_IN_FLIGHT`] (128).
#[tokio::test(flavor = "multi_thread")]
async fn four_slow_merchants_do_not_hold_up_a_fifth() {
    let server = Server::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("merchant.sqlite"));
    let endpoints = Endpoints::with(5, &format!("{}/fast", server.url));
    for m in 1..=4 {
        endpoints.set(m, &format!("{}/slow", server.url));
    }
    let policy = RetryPolicy {
        timeout: Duration::from_secs(120),
        ..fast_policy()
    };
    let d = private_dispatcher(db.clone(), endpoints, policy);
    for m in 1..=4 {
        for i in 0..3 {
            enqueue(&db, m, &format!("slow-{m}-{i}"), EventType::InvoiceCreated);
        }
    }
    d.wake();
    wait_until("every slow merchant's requests are held", || {
        server
            .received()
            .iter()
            .filter(|r| r.path == "/slow")
            .count()
            >= 4 * webhook::MAX_IN_FLIGHT_PER_MERCHANT
    })
    .await;
    enqueue(&db, 5, "fast", EventType::InvoiceCreated);
    d.wake();
    wait_status(&db, 5, "fast", DeliveryStatus::Delivered).await;
    let gate = server.state.clone();
    let releaser = tokio::spawn(async move {
        loop {
            gate.gate.notify_waiters();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    for m in 1..=4 {
        for i in 0..3 {
            wait_status(&db, m, &format!("slow-{m}-{i}"), DeliveryStatus::Delivered).await;
        }
    }
    releaser.abort();
    d.shutdown().await;
}

/// Regression (issue 8 §3): the dispatcher delivered to any address, and the log showed the
/// connect error chain (an internal port scanner). By default an internal target is refused
/// before any connection: nothing arrives, and the log says only `address not allowed`.
#[tokio::test(flavor = "multi_thread")]
async fn a_target_inside_is_refused_at_delivery_and_nothing_is_sent() {
    let server = Server::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("merchant.sqlite"));
    let urls = [
        format!("{}/hook", server.url),
        server.url.replace("127.0.0.1", "[::ffff:127.0.0.1]"),
        server.url.replace("127.0.0.1", "2130706433"),
        server.url.replace("127.0.0.1", "0x7f.1"),
        server.url.replace("127.0.0.1", "017700000001"),
    ];
    for (i, url) in urls.iter().enumerate() {
        let merchant = 20 + i as u32;
        let d = Dispatcher::spawn(db.clone(), Endpoints::with(merchant, url), fast_policy());
        let inv = format!("inv-{i}");
        enqueue(&db, merchant, &inv, EventType::InvoiceSettled);
        d.wake();
        wait_until(&format!("an attempt to {url} is recorded"), || {
            log(&db, merchant, &inv)
                .first()
                .is_some_and(|v| !v.attempts.is_empty())
        })
        .await;
        d.shutdown().await;
        let v = log(&db, merchant, &inv).remove(0);
        assert_eq!(v.status, DeliveryStatus::Pending, "{url}");
        assert_eq!(
            (v.attempts[0].http_status, v.attempts[0].error.as_deref()),
            (None, Some("address not allowed")),
            "{url}"
        );
    }
    assert!(server.received().is_empty(), "nothing reached 127.0.0.1");
}

/// Regression (issue 8 §3): the log showed the error chain ("tcp connect error: Connection
/// refused (os error 111)"), which tells open ports from closed ones. Now a short category.
#[tokio::test(flavor = "multi_thread")]
async fn the_delivery_log_shows_a_category_not_the_error_chain() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("merchant.sqlite"));
    let down = {
        // Below the ephemeral range: no other socket's `bind(:0)` can start listening on it.
        format!("http://127.0.0.1:{}", ports::free_port())
    };
    let d = private_dispatcher(db.clone(), Endpoints::with(4, &down), fast_policy());
    enqueue(&db, 4, "inv-c", EventType::InvoiceSettled);
    d.wake();
    wait_until("a failed attempt is recorded", || {
        log(&db, 4, "inv-c")
            .first()
            .is_some_and(|v| !v.attempts.is_empty())
    })
    .await;
    d.shutdown().await;
    let v = log(&db, 4, "inv-c").remove(0);
    assert_eq!(v.attempts[0].error.as_deref(), Some("connection failed"));
}

/// The dispatcher of these tests: the receiver is on 127.0.0.1, so internal targets are allowed.
fn private_dispatcher(
    db: Arc<Mutex<Connection>>,
    endpoints: Arc<dyn WebhookEndpoints>,
    policy: RetryPolicy,
) -> Dispatcher {
    Dispatcher::spawn_with_targets(db, endpoints, policy, TargetPolicy::allow_private())
}

/// A resolver that knows one name (nothing leaves the machine).
fn one_name(name: &'static str, ip: &'static str) -> TargetPolicy {
    TargetPolicy::default().with_resolver(Arc::new(move |host: &str, port| {
        if host == name {
            Ok(vec![std::net::SocketAddr::new(ip.parse().unwrap(), port)])
        } else {
            Err(std::io::Error::new(std::io::ErrorKind::NotFound, "unknown"))
        }
    }))
}

/// A host name that resolves to loopback is refused at delivery (checked again at every attempt,
/// whatever was checked when the URL was set); with the switch on, the delivery goes to exactly
/// the address checked (the name is resolved only by the test's resolver, never by the system).
#[tokio::test(flavor = "multi_thread")]
async fn a_name_that_resolves_inside_is_refused_at_delivery_and_pinned_when_allowed() {
    let server = Server::start(&[]).await;
    let port = server.url.rsplit(':').next().unwrap().to_owned();
    let url = format!("http://hooks.internal.test:{port}/hook");
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(&dir.path().join("merchant.sqlite"));
    let d = Dispatcher::spawn_with_targets(
        db.clone(),
        Endpoints::with(9, &url),
        fast_policy(),
        one_name("hooks.internal.test", "127.0.0.1"),
    );
    enqueue(&db, 9, "inv-n", EventType::InvoiceSettled);
    d.wake();
    wait_until("an attempt is recorded", || {
        log(&db, 9, "inv-n")
            .first()
            .is_some_and(|v| !v.attempts.is_empty())
    })
    .await;
    d.shutdown().await;
    let v = log(&db, 9, "inv-n").remove(0);
    assert_eq!(v.attempts[0].error.as_deref(), Some("address not allowed"));
    assert!(server.received().is_empty());

    let mut allowed = one_name("hooks.internal.test", "127.0.0.1");
    allowed.allow_private = true;
    let d = Dispatcher::spawn_with_targets(
        db.clone(),
        Endpoints::with(9, &url),
        fast_policy(),
        allowed,
    );
    d.wake();
    wait_status(&db, 9, "inv-n", DeliveryStatus::Delivered).await;
    d.shutdown().await;
    let got = server.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/hook");
    assert_eq!(got[0].header("host"), format!("hooks.internal.test:{port}"));
    assert_signed(&got[0]);

    // A name that does not resolve: a short category, retried.
    let db2 = open_db(&dir.path().join("other.sqlite"));
    let d = Dispatcher::spawn_with_targets(
        db2.clone(),
        Endpoints::with(9, "http://nowhere.test/hook"),
        fast_policy(),
        one_name("hooks.internal.test", "127.0.0.1"),
    );
    enqueue(&db2, 9, "inv-u", EventType::InvoiceSettled);
    d.wake();
    wait_until("an attempt is recorded", || {
        log(&db2, 9, "inv-u")
            .first()
            .is_some_and(|v| !v.attempts.is_empty())
    })
    .await;
    d.shutdown().await;
    let v = log(&db2, 9, "inv-u").remove(0);
    assert_eq!(
        (v.status, v.attempts[0].error.as_deref()),
        (DeliveryStatus::Pending, Some("host does not resolve"))
    );
}
