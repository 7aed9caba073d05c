//! Merchant payments: stores, invoices (BIP21 address per invoice), payments from the chain or
//! from an exchange balance, refunds, conversion to the quote asset, signed webhooks, checkout
//! and point-of-sale pages.
//!
//! A product composed over the `api` shell (docs/adr/0014-merchant-crate-over-the-api-shell.md): its handlers take
//! `State<api::AppState>` like the trader gateway's and find their [`Merchant`] in the state's
//! extension slot ([`of`], [`MerchantState`]); its routes are one more permission table
//! ([`ROUTES`], [`SURFACE`]) that the shell's router and access checks serve with
//! `api::access::ROUTES` ([`app`], [`public_app`], [`admin_app`]). Start-up: [`attach`] after
//! the API opened, then [`start`] the monitor once custody is attached.
//!
//! * [`model`]: the pure invoice state machine (statuses, marks, tolerance, the events of each
//!   transition).
//! * [`store`]: SQLite (`<data_dir>/merchant.sqlite`, WAL, `synchronous=FULL`): store settings,
//!   invoices, payments, refunds, and (through [`webhook::init_schema`]) the webhook outbox.
//! * [`routes`]: the signed `/mapi/v1/merchant/*` endpoints and the public `/i/{id}` and
//!   `/pos/{token}` endpoints.
//! * [`monitor`]: the task that joins custody's deposits to invoices, expires invoices, converts
//!   settled BTC, and publishes invoice changes to the checkout pages (SSE).
//! * [`greenfield`]: the BTCPay Greenfield-compatible API (`/api/v1/...`, `Authorization: token`)
//!   over the same invoices, its webhooks (`BTCPay-Sig`) and refunds as pull payments.
//! * [`dashboard`]: the store owner's pages (`/dashboard`): password or one-time-link login,
//!   hashed sessions, CSRF; its actions run the Greenfield handlers for the session's store.
//! * [`webhook`]: signing, the outbox and the dispatcher; [`qr`]: BIP21 URIs and QR codes;
//!   [`pages`]: the checkout and point-of-sale pages; [`table`]: the permission table;
//!   [`openapi`]: the endpoints' `/openapi.json` entries.
//!
//! **Invariants.**
//! * A status change and the webhook events it causes are committed in one SQLite transaction
//!   (outbox): a crash loses neither, nor delivers one without the other.
//! * A payment is never lost: custody credits every output paying an invoice address to the
//!   merchant's account, whatever the invoice's status; the invoice records it (late ones
//!   marked `PaidLate`), and it stays refundable.
//! * Webhook secrets are derived from the API master key (`HMAC(master, "webhook/<account>/
//!   <version>")`), never stored; rotating bumps the version.
//! * Money is integers: satoshis, quote units, rates in quote units per BTC. No floats.
//! * `api` does not know this crate: every merchant route is a row of [`ROUTES`], served only
//!   when the binary composes [`SURFACE`] with the shell's.

#![warn(missing_docs)]

pub mod allowlist;
pub mod dashboard;
pub mod greenfield;
pub mod model;
pub mod monitor;
pub mod openapi;
pub mod outcome;
pub mod pages;
pub mod price;
pub mod qr;
pub mod routes;
pub mod store;
pub mod table;
pub mod target;
pub mod webhook;

pub use monitor::{spawn, start, MonitorHandle};
pub use table::ROUTES;

use api::AppState;

use std::sync::{Arc, Mutex};

/// The merchant settings (`[merchant]` in the server's file), given to [`attach`].
#[derive(Clone, Debug)]
pub struct MerchantConfig {
    /// Where webhooks may go (internal addresses refused unless allowed) and the resolver.
    pub webhook_targets: target::TargetPolicy,
    /// `redeliver` calls per merchant per minute (`429`, `-1003` beyond).
    pub redeliveries_per_min: u64,
    /// The reference price of quote-currency invoices and conversions.
    pub price: price::PriceLimits,
    /// How long after it was added an address on a store's withdrawal allow-list becomes
    /// usable (and the list stays on after its last removal), ms ([`allowlist`]).
    pub withdraw_address_delay_ms: u64,
    /// BOLT11 parts a store's invoices get per hour; past it, invoices are on chain only
    /// (`lightningUnavailable` says why): each part is an invoice the node keeps for good.
    pub lightning_parts_per_hour: u64,
    /// Invoices a store's point-of-sale page (`POST /pos/{token}/invoice`, public to whoever
    /// has the link) makes per hour; past it `429` `-1003`: each is a wallet address custody
    /// reveals and watches for good, a webhook per hook, and a BOLT11 part of the store's hour.
    pub pos_invoices_per_hour: u64,
}

impl Default for MerchantConfig {
    fn default() -> Self {
        Self {
            webhook_targets: target::TargetPolicy::default(),
            redeliveries_per_min: 10,
            price: price::PriceLimits::default(),
            withdraw_address_delay_ms: allowlist::DEFAULT_DELAY_MS,
            lightning_parts_per_hour: 600,
            pos_invoices_per_hour: 600,
        }
    }
}

/// The merchant database: one connection, shared (handlers use it on the blocking pool).
pub type MerchantDb = Arc<Mutex<rusqlite::Connection>>;

/// A changed invoice for the checkout pages: `(invoice id, PublicInvoice JSON)`.
pub type InvoiceUpdate = Arc<(String, String)>;

/// How many invoice updates a slow SSE client may fall behind before it misses some (it then
/// reloads the status).
pub const UPDATES_QUEUE: usize = 1_024;

/// The merchant part of the application state (attached to [`AppState`] by [`attach`]).
pub struct Merchant {
    /// The settings.
    pub cfg: MerchantConfig,
    /// The database.
    pub db: MerchantDb,
    /// Invoice changes, for `GET /i/{id}/events`.
    pub updates: tokio::sync::broadcast::Sender<InvoiceUpdate>,
    /// Woken after a handler enqueued webhooks, so the monitor wakes the dispatcher at once.
    pub enqueued: tokio::sync::Notify,
    /// The monitor asked to run a tick now (e.g. after a balance payment needs conversion).
    pub kick: tokio::sync::Notify,
    /// Serializes the read-check-change of invoices by handlers (pay, refund, invalid) and the
    /// monitor, so two of them never act on the same stale state.
    pub invoice_lock: tokio::sync::Mutex<()>,
    /// Serializes the resolution of Greenfield payouts whose outcome is unknown (the payout
    /// list, a repeated claim and the monitor each resolve them), so one never writes its answer
    /// over a later one's. Taken after `invoice_lock` when both are held, never before it.
    pub payout_lock: tokio::sync::Mutex<()>,
    /// BOLT11 parts made per store, an hour's window (set up on first use from
    /// [`MerchantConfig::lightning_parts_per_hour`]).
    pub ln_parts: std::sync::OnceLock<api::ratelimit::Limiter>,
    /// Point-of-sale invoices per store, an hour's window (set up on first use from
    /// [`MerchantConfig::pos_invoices_per_hour`]).
    pub pos_invoices: std::sync::OnceLock<api::ratelimit::Limiter>,
    /// `redeliver` calls per merchant (set up on first use from [`MerchantConfig`]).
    pub redeliveries: std::sync::OnceLock<api::ratelimit::Limiter>,
    /// Dashboard login attempts per client IP and per store ([`dashboard`]).
    pub logins: std::sync::OnceLock<api::ratelimit::Limiter>,
    /// The dashboard's Argon2 runs, a few at a time process-wide
    /// ([`dashboard::passwords`]).
    pub passwords: dashboard::passwords::PasswordWork,
    /// Failed dashboard step-up passwords per session and per store ([`dashboard`]).
    pub step_ups: std::sync::OnceLock<api::ratelimit::Limiter>,
    /// One step-up at a time per store, from the check of its failure counts to the count of
    /// its failure (else guesses sent together all pass the check at zero).
    pub step_up_turns: Mutex<std::collections::HashMap<u32, Arc<tokio::sync::Mutex<()>>>>,
    /// The external index price, read at most once per `index_cache_ms` ([`price`]).
    pub price_index: price::IndexCache,
}

impl std::fmt::Debug for Merchant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merchant").finish_non_exhaustive()
    }
}

impl Merchant {
    /// Opens (creating) `<data_dir>/merchant.sqlite`.
    pub fn open(data_dir: &std::path::Path, cfg: MerchantConfig) -> Result<Self, rusqlite::Error> {
        let conn = store::open(&data_dir.join("merchant.sqlite"))?;
        Ok(Self {
            cfg,
            db: Arc::new(Mutex::new(conn)),
            updates: tokio::sync::broadcast::channel(UPDATES_QUEUE).0,
            enqueued: tokio::sync::Notify::new(),
            kick: tokio::sync::Notify::new(),
            invoice_lock: tokio::sync::Mutex::new(()),
            payout_lock: tokio::sync::Mutex::new(()),
            ln_parts: std::sync::OnceLock::new(),
            pos_invoices: std::sync::OnceLock::new(),
            redeliveries: std::sync::OnceLock::new(),
            logins: std::sync::OnceLock::new(),
            passwords: dashboard::passwords::PasswordWork::default(),
            step_ups: std::sync::OnceLock::new(),
            step_up_turns: Mutex::new(std::collections::HashMap::new()),
            price_index: price::IndexCache::default(),
        })
    }

    /// Publishes an invoice change to the checkout pages (no subscriber is fine).
    pub fn publish(&self, id: &str, public_json: String) {
        let _ = self.updates.send(Arc::new((id.to_owned(), public_json)));
    }
}

/// The webhook endpoints of every merchant, from their store settings and the derived secret.
#[derive(Clone, Debug)]
pub struct Endpoints {
    state: AppState,
}

impl Endpoints {
    /// Endpoints over the application's merchant database and master key.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

impl webhook::WebhookEndpoints for Endpoints {
    fn endpoint(&self, merchant: u32) -> Option<(String, Vec<u8>)> {
        let s = {
            let conn = self
                .state
                .merchant()
                .db
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            store::settings(&conn, merchant).ok()??
        };
        let url = s.webhook_url?;
        if s.secret_version == 0 {
            return None;
        }
        Some((
            url,
            webhook_secret(&self.state, merchant, s.secret_version).into_bytes(),
        ))
    }

    fn hook_endpoint(&self, merchant: u32, hook: &str) -> Option<(String, Vec<u8>)> {
        let conn = self
            .state
            .merchant()
            .db
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        greenfield::hook_endpoint(&self.state, &conn, merchant, hook)
    }
}

/// The webhook secret of a merchant at a version: `hex(HMAC-SHA256(master,
/// "webhook/<account>/<version>"))`. The HMAC key for signing deliveries is this string's bytes.
pub fn webhook_secret(state: &AppState, merchant: u32, version: u32) -> String {
    state
        .keys()
        .derive_purpose(&format!("webhook/{merchant}/{version}"))
}

/// Why [`attach`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// `merchant.sqlite` could not be opened or migrated.
    #[error("merchant database: {0}")]
    Database(#[from] rusqlite::Error),
    /// The state already has its merchant part (or no free extension slot).
    #[error("merchant payments are already attached to this API")]
    AlreadyAttached,
}

/// Opens `<data_dir>/merchant.sqlite` (the API's data directory) and attaches merchant payments
/// to `state`, before a router that serves [`ROUTES`] takes requests. At most once per state.
/// Installs the stores' withdrawal address lists as the API's withdrawal policy
/// ([`allowlist::ListPolicy`]): every money-out path of a store's account asks its list.
pub fn attach(state: &AppState, cfg: MerchantConfig) -> Result<(), AttachError> {
    let merchant = Merchant::open(state.data_dir(), cfg)?;
    let policy = allowlist::ListPolicy::new(merchant.db.clone());
    state
        .attach(merchant)
        .map_err(|_| AttachError::AlreadyAttached)?;
    state
        .set_withdrawal_policy(Arc::new(policy))
        .map_err(|_| AttachError::AlreadyAttached)
}

/// The merchant part of `state`.
///
/// # Panics
/// When [`attach`] was not called: serving a merchant route without it is a start-up bug.
pub fn of(state: &AppState) -> &Merchant {
    state
        .extension::<Merchant>()
        .expect("merchant::attach runs before merchant routes are served")
}

/// `state.merchant()`: [`of`] as a method, for the handlers.
pub trait MerchantState {
    /// The merchant part ([`of`]).
    fn merchant(&self) -> &Merchant;
}

impl MerchantState for AppState {
    fn merchant(&self) -> &Merchant {
        of(self)
    }
}

/// What this crate serves over the shell: [`ROUTES`] and their OpenAPI entries.
pub static SURFACE: api::Surface = api::Surface {
    routes: table::ROUTES,
    openapi: openapi::OPS,
};

/// The trader gateway and merchant payments, as `mediator serve` composes them.
pub static SURFACES: [&api::Surface; 2] = [&api::SURFACE, &SURFACE];

/// The router of every endpoint, the trader gateway's and merchant payments', both listeners'
/// (tests and single-listener embedding). The state must have had [`attach`].
pub fn app(state: AppState) -> axum::Router {
    api::app_with(state, &SURFACES)
}

/// The public listener's routes of both ([`api::public_app_with`]).
pub fn public_app(state: AppState) -> axum::Router {
    api::public_app_with(state, &SURFACES)
}

/// The admin listener's routes of both ([`api::admin_app_with`]).
pub fn admin_app(state: AppState) -> axum::Router {
    api::admin_app_with(state, &SURFACES)
}
