//! **SHIM — stream W's `webhook.rs` replaces this file at merge.** It has exactly the contract's
//! public signatures (see `/work/merchant-contract.md`) so the merchant core compiles and its
//! tests can see what was enqueued. The outbox table is real (enqueue/deliveries/redeliver read
//! and write it); signing is HMAC-SHA256 as specified; the dispatcher delivers nothing (W's does).

use hmac::{Hmac, Mac};
use rusqlite::{params, Connection};
use serde::Serialize;
use sha2::Sha256;
use std::sync::{Arc, Mutex};

/// The signature header's name.
pub const SIGNATURE_HEADER: &str = "Mediator-Signature";

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature_header(secret: &[u8], t_unix_s: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(format!("{t_unix_s}.").as_bytes());
    mac.update(body);
    format!(
        "t={t_unix_s},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Why a signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Malformed header, wrong signature or timestamp out of tolerance.
    #[error("signature does not verify")]
    Invalid,
}

/// Verifies a signature header.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now_unix_s: u64,
    tolerance_s: u64,
) -> Result<(), VerifyError> {
    let t: u64 = header
        .split(',')
        .find_map(|p| p.strip_prefix("t="))
        .and_then(|t| t.parse().ok())
        .ok_or(VerifyError::Invalid)?;
    if now_unix_s.abs_diff(t) > tolerance_s || signature_header(secret, t, body) != header {
        return Err(VerifyError::Invalid);
    }
    Ok(())
}

/// Webhook event types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    /// `invoice.created`
    InvoiceCreated,
    /// `invoice.payment_received`
    PaymentReceived,
    /// `invoice.processing`
    InvoiceProcessing,
    /// `invoice.settled`
    InvoiceSettled,
    /// `invoice.expired`
    InvoiceExpired,
    /// `invoice.invalid`
    InvoiceInvalid,
    /// `invoice.refunded`
    InvoiceRefunded,
}

impl EventType {
    fn wire(self) -> &'static str {
        match self {
            EventType::InvoiceCreated => "invoice.created",
            EventType::PaymentReceived => "invoice.payment_received",
            EventType::InvoiceProcessing => "invoice.processing",
            EventType::InvoiceSettled => "invoice.settled",
            EventType::InvoiceExpired => "invoice.expired",
            EventType::InvoiceInvalid => "invoice.invalid",
            EventType::InvoiceRefunded => "invoice.refunded",
        }
    }
}

/// The outbox table.
pub fn init_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS shim_webhook_outbox (
            delivery_id TEXT PRIMARY KEY, merchant INTEGER NOT NULL, invoice_id TEXT NOT NULL,
            type TEXT NOT NULL, body TEXT NOT NULL, created_ms INTEGER NOT NULL, n INTEGER NOT NULL);",
    )
}

/// Stores a delivery, due at once.
pub fn enqueue(
    conn: &Connection,
    merchant: u32,
    invoice_id: &str,
    event: EventType,
    invoice: &serde_json::Value,
    now_ms: u64,
) -> rusqlite::Result<String> {
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM shim_webhook_outbox", [], |r| r.get(0))?;
    let id = format!("d{n}");
    let body = serde_json::json!({"deliveryId": id, "type": event.wire(),
        "createdTime": now_ms, "invoice": invoice});
    conn.execute(
        "INSERT INTO shim_webhook_outbox VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            id,
            merchant,
            invoice_id,
            event.wire(),
            body.to_string(),
            now_ms as i64,
            n
        ],
    )?;
    Ok(id)
}

/// One delivery attempt.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptView {
    /// When.
    pub time: u64,
    /// HTTP status, if any.
    pub http_status: Option<u16>,
    /// Error, if any.
    pub error: Option<String>,
}

/// A delivery as the merchant sees it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryView {
    /// Id.
    pub delivery_id: String,
    /// Invoice.
    pub invoice_id: String,
    /// Event type (wire name).
    #[serde(rename = "type")]
    pub event_type: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    /// Attempts.
    pub attempts: Vec<AttemptView>,
    /// Next attempt.
    pub next_attempt_time: Option<u64>,
    /// Created.
    pub created_time: u64,
}

/// The deliveries of one invoice, oldest first.
pub fn deliveries(
    conn: &Connection,
    merchant: u32,
    invoice_id: &str,
) -> rusqlite::Result<Vec<DeliveryView>> {
    let mut s = conn.prepare(
        "SELECT delivery_id, invoice_id, type, created_ms FROM shim_webhook_outbox
         WHERE merchant = ?1 AND invoice_id = ?2 ORDER BY n",
    )?;
    let rows = s.query_map(params![merchant, invoice_id], |r| {
        Ok(DeliveryView {
            delivery_id: r.get(0)?,
            invoice_id: r.get(1)?,
            event_type: r.get(2)?,
            status: "pending".into(),
            attempts: vec![],
            next_attempt_time: Some(r.get::<_, i64>(3)? as u64),
            created_time: r.get::<_, i64>(3)? as u64,
        })
    })?;
    rows.collect()
}

/// Why a redelivery was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedeliverError {
    /// No such delivery of this merchant.
    #[error("unknown delivery")]
    Unknown,
    /// Database.
    #[error(transparent)]
    Db(#[from] rusqlite::Error),
}

/// Schedules a delivery again, due at once.
pub fn redeliver(
    conn: &Connection,
    merchant: u32,
    delivery_id: &str,
    now_ms: u64,
) -> Result<DeliveryView, RedeliverError> {
    let inv: Option<String> = conn
        .query_row(
            "SELECT invoice_id FROM shim_webhook_outbox WHERE merchant = ?1 AND delivery_id = ?2",
            params![merchant, delivery_id],
            |r| r.get(0),
        )
        .ok();
    let inv = inv.ok_or(RedeliverError::Unknown)?;
    let mut v = deliveries(conn, merchant, &inv)?
        .into_iter()
        .find(|d| d.delivery_id == delivery_id)
        .ok_or(RedeliverError::Unknown)?;
    v.next_attempt_time = Some(now_ms);
    Ok(v)
}

/// Where deliveries go.
pub trait WebhookEndpoints: Send + Sync + 'static {
    /// The merchant's webhook URL and signing secret now; `None` = no webhook configured.
    fn endpoint(&self, merchant: u32) -> Option<(String, Vec<u8>)>;
}

/// Retry schedule.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Delays between attempts; the last repeats.
    pub schedule: Vec<std::time::Duration>,
    /// Most attempts.
    pub max_attempts: u32,
    /// Per-attempt timeout.
    pub timeout: std::time::Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        use std::time::Duration;
        Self {
            schedule: vec![
                Duration::from_secs(10),
                Duration::from_secs(60),
                Duration::from_secs(600),
                Duration::from_secs(3600),
            ],
            max_attempts: 20,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The delivery task (the shim delivers nothing).
#[derive(Debug)]
pub struct Dispatcher {
    wakes: Arc<std::sync::atomic::AtomicU64>,
}

impl Dispatcher {
    /// Starts the dispatcher.
    pub fn spawn(
        _db: Arc<Mutex<Connection>>,
        _endpoints: Arc<dyn WebhookEndpoints>,
        _policy: RetryPolicy,
    ) -> Dispatcher {
        Dispatcher {
            wakes: Arc::default(),
        }
    }

    /// Looks at the outbox now.
    pub fn wake(&self) {
        self.wakes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops it.
    pub async fn shutdown(self) {}
}
