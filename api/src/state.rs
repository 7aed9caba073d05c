//! Application state: configuration, the shared [`AppState`] and its setup, the request
//! extractors ([`Req`], [`Ctx`], [`ClientIp`]) and the answer helpers handlers use. Below the
//! router: handlers import from here, never from [`crate::app`], which builds the router from
//! the permission table (which names the handlers).

use crate::core::{EventSink, ExchangeCore, LocalCore, Outcome};
use crate::error::ApiError;
use crate::keys::{ApiKey, KeyStore, Perms};
use crate::market::Markets;
use crate::metrics::Metrics;
use crate::params::{signed_params, signed_payload, Params};
use crate::ratelimit::{Charge, Limiter};
use crate::readmodel::ReadModel;
use crate::store::Store;
use axum::extract::{ConnectInfo, FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use matching_engine::{Command, Engine, EngineConfig};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// API settings.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Request weight per minute per IP.
    pub ip_weight_per_min: u64,
    /// Request weight per minute per API key.
    pub key_weight_per_min: u64,
    /// New orders per 10 seconds per account (Binance's `ORDERS` limit, `-1015`).
    pub orders_per_10s: u64,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers) in bytes; at least 8,192 (hyper's
    /// floor). A longer one is answered 431 and the connection closed.
    pub max_header_bytes: usize,
    /// Most concurrent connections (HTTP and WebSocket).
    pub max_connections: usize,
    /// Lifetime of a listenKey without keep-alive, in ms.
    pub listen_key_ttl_ms: u64,
    /// Messages a WebSocket may fall behind before it is disconnected.
    pub ws_queue: usize,
    /// `SO_SNDBUF` of accepted connections, bounding what a slow reader can leave in the
    /// kernel; `None` keeps the kernel's autotuning.
    pub socket_send_buffer: Option<u32>,
    /// The server's address as customers reach it (`https://pay.example.com`, no trailing
    /// slash): invoice `checkoutUrl`s (API answers and webhooks) are absolute under it. `None`
    /// gives paths (`/i/<id>`).
    pub public_url: Option<String>,
    /// Most concurrent connections from one client address (IPv4 address, or IPv6 /64). One
    /// more is answered `429` `-1034` and closed, so one address cannot hold every connection.
    pub max_connections_per_ip: usize,
    /// Time a connection has to send a complete request head, counted from when the server is
    /// ready for it: after accept, and after each response on a kept-alive connection. Bounds
    /// unfinished headers (slowloris) and idle keep-alive connections alike.
    pub header_read_timeout_ms: u64,
    /// Time a request has, once its head is read, to send its whole body (read ahead of the
    /// handler, up to `max_body_bytes`). After it the request is answered `408` `-1001` and the
    /// connection closed: no handler ran, so nothing was done.
    pub body_read_timeout_ms: u64,
    /// A connection on which no byte moved either way for this long is closed: stalled request
    /// bodies, responses and SSE streams the client stopped reading. (A WebSocket has its own
    /// ping/pong and send timeout.)
    pub idle_timeout_ms: u64,
    /// Most concurrent long-lived streams (WebSocket connections and SSE streams) per client IP.
    pub max_streams_per_ip: usize,
    /// Most concurrent SSE streams (`/i/{id}/events`) of one invoice.
    pub max_sse_per_invoice: usize,
    /// WebSocket connection attempts per client IP per 5 minutes (Binance: 300).
    pub ws_connects_per_5min: u64,
    /// Largest WebSocket frame and message a client may send, in bytes; a larger frame is
    /// refused from its header, before its payload is read.
    pub ws_max_message_bytes: usize,
    /// Requests one `/ws-api/v3` connection may have in flight; with this many the server stops
    /// reading that connection until one is answered ([`crate::wsapi`]).
    pub ws_api_max_in_flight: usize,
    /// New deposit addresses (`POST /mapi/v1/capital/deposit/address`) per account per hour
    /// (`429`, `-1003`): each one is a wallet address to watch forever.
    pub deposit_addresses_per_hour: u64,
    /// Lightning deposit invoices (`POST /mapi/v1/lightning/invoice`) per account per hour
    /// (`429`, `-1003`): each one is an invoice the node keeps and custody sweeps, for good.
    pub lightning_invoices_per_hour: u64,
    /// The checkout and point-of-sale pages' CSP `frame-ancestors`: who may embed them
    /// (`'self'`; a shop embedding its checkout adds its origin, `'self' https://shop.example`).
    pub frame_ancestors: String,
    /// Behind a reverse proxy: whose header gives the client address ([`crate::access`]).
    /// `None`: the connection's peer address, headers ignored.
    pub trusted_proxy: Option<crate::access::TrustedProxy>,
    /// Start even when the audit log's chain is broken; the override is logged
    /// (`mediator serve --audit-override`, [`crate::proofs`]).
    pub audit_override: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            ip_weight_per_min: 6_000,
            key_weight_per_min: 6_000,
            orders_per_10s: 100,
            max_body_bytes: 64 * 1024,
            max_header_bytes: 16 * 1024,
            max_connections: 4_096,
            listen_key_ttl_ms: 60 * 60 * 1000,
            ws_queue: crate::readmodel::WS_QUEUE,
            socket_send_buffer: None,
            public_url: None,
            max_connections_per_ip: 256,
            header_read_timeout_ms: 20_000,
            body_read_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            max_streams_per_ip: 128,
            max_sse_per_invoice: 16,
            ws_connects_per_5min: 300,
            ws_max_message_bytes: 64 * 1024,
            ws_api_max_in_flight: 64,
            deposit_addresses_per_hour: 20,
            lightning_invoices_per_hour: 60,
            frame_ancestors: "'self'".to_owned(),
            trusted_proxy: None,
            audit_override: false,
        }
    }
}

/// A setup failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// Database.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Keys.
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    /// Markets.
    #[error(transparent)]
    Market(#[from] crate::market::MarketSpecError),
    /// Engine configuration.
    #[error("engine configuration: {0}")]
    Engine(String),
    /// Files and threads.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The proofs database ([`crate::proofs`]).
    #[error("proofs database: {0}")]
    Proofs(#[from] rusqlite::Error),
    /// The audit log is broken or unwritable ([`crate::proofs`]).
    #[error("{0}")]
    Audit(String),
}

/// Everything the handlers share. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState(pub(crate) Arc<Inner>);

#[derive(Debug)]
pub(crate) struct Inner {
    pub core: Arc<dyn ExchangeCore>,
    pub rm: Arc<ReadModel>,
    pub markets: Arc<Markets>,
    pub keys: KeyStore,
    pub store: Arc<Store>,
    pub ip_limiter: Limiter,
    pub key_limiter: Limiter,
    pub order_limiter: Limiter,
    /// WebSocket and SSE stream caps and connection attempts ([`crate::ratelimit::StreamLimits`]).
    pub streams: crate::ratelimit::StreamLimits,
    pub address_limiter: Limiter,
    /// Lightning deposit invoices per account per hour ([`ApiConfig::lightning_invoices_per_hour`]).
    pub ln_invoice_limiter: Limiter,
    pub listen_keys: RwLock<HashMap<String, crate::ws::ListenKey>>,
    pub metrics: Metrics,
    pub cfg: ApiConfig,
    pub data_dir: PathBuf,
    pub applier: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    id_seed: u64,
    id_counter: AtomicU64,
    /// The custody service, attached after start ([`AppState::set_custody`]).
    pub custody: std::sync::OnceLock<Arc<dyn crate::custody::Custody>>,
    /// The Lightning node, attached after start ([`AppState::set_lightning`]).
    pub lightning: std::sync::OnceLock<crate::lightning::Handle>,
    /// The withdrawal policy, installed at start-up ([`AppState::set_withdrawal_policy`]).
    pub withdrawal_policy: std::sync::OnceLock<crate::policy::Handle>,
    /// The accounts custody flagged, as the order path reads them ([`crate::capital::FlagCache`]).
    pub flags: crate::capital::FlagCache,
    /// The products composed over this shell (e.g. merchant payments), each attached once at
    /// start-up ([`AppState::attach`]).
    pub extensions: Extensions,
    /// The audit log and the liabilities proofs ([`crate::proofs`]).
    pub proofs: crate::proofs::Proofs,
    /// Ticker and average-price stream events, made once a second for all subscribers.
    pub stats: crate::ws::StatsCache,
}

impl std::fmt::Debug for dyn ExchangeCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExchangeCore")
    }
}

/// The API opened on its data directory, waiting for its core.
#[derive(Debug)]
pub struct PendingApi {
    rm: Arc<ReadModel>,
    markets: Arc<Markets>,
    keys: KeyStore,
    store: Arc<Store>,
    cfg: ApiConfig,
    data_dir: PathBuf,
    applier: std::thread::JoinHandle<()>,
    proofs: crate::proofs::Proofs,
}

/// Opens the API's storage in `data_dir` (`api.sqlite`, `api-master.key`) and starts the
/// read-model applier thread. Returns the sink the core must publish every event batch to.
pub fn open(
    data_dir: &Path,
    engine_config: &EngineConfig,
    cfg: ApiConfig,
) -> Result<(PendingApi, EventSink), SetupError> {
    std::fs::create_dir_all(data_dir)?;
    let store = Arc::new(Store::open(&data_dir.join("api.sqlite"))?);
    let master = crate::keys::load_or_create_master(&data_dir.join("api-master.key"))?;
    let keys = KeyStore::load(master, &store)?;
    let proofs = crate::proofs::Proofs::open(data_dir, crate::proofs::nonce_secret(&keys), &cfg)?;
    let markets = Arc::new(Markets::new(engine_config)?);
    let rm = Arc::new(ReadModel::new(markets.clone(), store.clone(), cfg.ws_queue));
    let broken = rm.broken.clone();
    let (tx, rx) = crossbeam::channel::bounded::<crate::core::SinkInput>(65_536);
    let rm2 = rm.clone();
    let applier = std::thread::Builder::new()
        .name("read-model".into())
        .spawn(move || {
            sched_hint::request_short_slice("read-model");
            rm2.run(rx)
        })?;
    Ok((
        PendingApi {
            rm,
            markets,
            keys,
            store,
            cfg,
            data_dir: data_dir.to_owned(),
            applier,
            proofs,
        },
        EventSink { tx, broken },
    ))
}

impl PendingApi {
    /// Seeds the read models from a recovered engine, before the core starts (see
    /// [`crate::readmodel::ReadModel::seed`]).
    pub fn seed(&self, engine: &Engine) -> Result<(), SetupError> {
        Ok(self.rm.seed(engine)?)
    }

    /// The read models, before the core starts: for the start-up replay from the history's
    /// floor ([`crate::readmodel::ReadModel::regenerate`]) that `start_node` runs instead of
    /// [`PendingApi::seed`].
    pub fn read_model(&self) -> &ReadModel {
        &self.rm
    }

    /// Attaches the core.
    pub fn start(self, core: Arc<dyn ExchangeCore>) -> AppState {
        let seed = crate::keys::random_bytes::<8>()
            .map(u64::from_le_bytes)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        AppState(Arc::new(Inner {
            core,
            rm: self.rm,
            markets: self.markets,
            keys: self.keys,
            store: self.store,
            ip_limiter: Limiter::new(self.cfg.ip_weight_per_min),
            key_limiter: Limiter::new(self.cfg.key_weight_per_min),
            order_limiter: Limiter::with_window(self.cfg.orders_per_10s, 10_000),
            streams: crate::ratelimit::StreamLimits::new(&self.cfg),
            address_limiter: Limiter::with_window(self.cfg.deposit_addresses_per_hour, 3_600_000),
            ln_invoice_limiter: Limiter::with_window(
                self.cfg.lightning_invoices_per_hour,
                3_600_000,
            ),
            listen_keys: RwLock::new(HashMap::new()),
            metrics: Metrics::default(),
            cfg: self.cfg,
            data_dir: self.data_dir,
            applier: std::sync::Mutex::new(Some(self.applier)),
            id_seed: seed,
            id_counter: AtomicU64::new(0),
            custody: std::sync::OnceLock::new(),
            lightning: std::sync::OnceLock::new(),
            withdrawal_policy: std::sync::OnceLock::new(),
            flags: crate::capital::FlagCache::default(),
            extensions: Extensions::default(),
            proofs: self.proofs,
            stats: crate::ws::StatsCache::default(),
        }))
    }
}

/// An API over an in-process [`LocalCore`] (no journal): for tests and demos.
pub fn open_local(
    data_dir: &Path,
    engine_config: EngineConfig,
    cfg: ApiConfig,
) -> Result<AppState, SetupError> {
    let (pending, sink) = open(data_dir, &engine_config, cfg)?;
    let engine = Engine::new(engine_config).map_err(|e| SetupError::Engine(e.to_string()))?;
    let core = LocalCore::spawn(engine, sink, 65_536)?;
    Ok(pending.start(Arc::new(core)))
}

/// The admin key written on first start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminKeyFile {
    /// Where it is.
    pub path: PathBuf,
    /// True when it was created now.
    pub created: bool,
}

impl AppState {
    /// Creates an admin key (on the fee account 0) if no admin key exists, and writes it to
    /// `admin-key.json` (mode 0600) in the data directory: into a new file created 0600, synced,
    /// then renamed over the old one, so the secret is never in a file with a wider mode (an
    /// existing file's mode is not inherited).
    pub fn ensure_admin_key(&self) -> Result<AdminKeyFile, SetupError> {
        let path = self.0.data_dir.join("admin-key.json");
        let has = self
            .0
            .keys
            .of_account(0)
            .iter()
            .any(|k| k.perms.has(Perms::ADMIN));
        if has && path.exists() {
            // Found readable by others (a copy, a restore, a hand edit): private again.
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&path)?.permissions().mode();
                if mode & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the admin key file was readable by others; set to 0600");
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                }
            }
            return Ok(AdminKeyFile {
                path,
                created: false,
            });
        }
        // An admin key made at start-up is a key creation like any other: in the audit log
        // (by its public id, never the secret) before the key exists and its file hands it out.
        let (k, secret) = self.0.keys.create(
            &self.0.store,
            0,
            Perms(Perms::ADMIN.0 | Perms::READ.0),
            "admin",
            crate::core::now_ms(),
            |row| {
                let mut v = crate::native::row_json(row);
                v["file"] = serde_json::json!(path.display().to_string());
                self.audit_by("system", "start-up", "key.create", v)
                    .map_err(|e| {
                        SetupError::Audit(format!("logging the admin key's creation: {}", e.msg))
                    })
            },
        )?;
        let body = serde_json::json!({"apiKey": k.api_key, "secretKey": secret}).to_string();
        write_private(&path, body.as_bytes())?;
        Ok(AdminKeyFile {
            path,
            created: true,
        })
    }

    /// Creates an API key directly (operator tooling and tests; audited as `key.create` by
    /// `system`, `by`: `direct`). Returns (apiKey, secret).
    pub fn create_key(
        &self,
        account: u32,
        perms: Perms,
        label: &str,
    ) -> Result<(String, String), SetupError> {
        let (k, s) = self.0.keys.create(
            &self.0.store,
            account,
            perms,
            label,
            crate::core::now_ms(),
            |row| {
                self.audit_by(
                    "system",
                    "direct",
                    "key.create",
                    crate::native::row_json(row),
                )
                .map_err(|e| SetupError::Audit(format!("logging a key's creation: {}", e.msg)))
            },
        )?;
        Ok((k.api_key.clone(), s))
    }

    /// The Greenfield token of a key (`Authorization: token ...`; derived, never stored).
    pub fn greenfield_token(&self, api_key: &str) -> String {
        self.0.keys.greenfield_token(api_key)
    }

    /// The read-model thread, to join at shutdown: it writes the last history rows and exits once
    /// its input ends (the durable core's fan-out closed when the sequencer shut down, or a
    /// core without a fan-out dropped its [`EventSink`]).
    pub fn take_read_model_thread(&self) -> Option<std::thread::JoinHandle<()>> {
        self.0
            .applier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Attaches the custody service behind the `/sapi/v1/capital/*` and custody admin endpoints
    /// (see [`crate::capital`]); until then they answer `503` / `-1001`. At most once: a second
    /// call gives its argument back.
    pub fn set_custody(
        &self,
        custody: Arc<dyn crate::custody::Custody>,
    ) -> Result<(), Arc<dyn crate::custody::Custody>> {
        self.0.custody.set(custody)
    }

    /// Attaches the Lightning node behind `/mapi/v1/lightning/*` and the Lightning admin
    /// endpoints ([`crate::lightning`]); until then they answer `503` / `-1001`. At most once.
    pub fn set_lightning(
        &self,
        ln: crate::lightning::Handle,
    ) -> Result<(), crate::lightning::Handle> {
        self.0.lightning.set(ln)
    }

    /// Installs the withdrawal policy asked on every money-out path of an account
    /// ([`crate::policy`]), at start-up, before requests are served; until then (and without
    /// one) every withdrawal is allowed as far as the policy goes. At most once.
    pub fn set_withdrawal_policy(
        &self,
        policy: crate::policy::Handle,
    ) -> Result<(), crate::policy::Handle> {
        self.0.withdrawal_policy.set(policy)
    }

    /// The installed withdrawal policy, if any.
    pub fn withdrawal_policy(&self) -> Option<crate::policy::Handle> {
        self.0.withdrawal_policy.get().cloned()
    }

    /// Submits a command and waits until the read models have applied it (read-your-writes).
    /// A rejection is `Ok` with `reply.result = Err(code)`; `Busy` is `-1008`; an outcome that is
    /// unknown is `-1007` (never a plain failure: the command may have been applied). See
    /// [`AppState::submit_outcome`].
    pub async fn submit(&self, cmd: Command) -> Result<crate::core::Reply, ApiError> {
        Self::reply_of(self.submit_outcome(cmd).await)
    }

    fn reply_of(outcome: Outcome) -> Result<crate::core::Reply, ApiError> {
        match outcome {
            Outcome::Applied(reply) => Ok(reply),
            Outcome::Rejected(code) => Ok(crate::core::Reply {
                result: Err(code),
                events: Vec::new(),
                seq: 0,
            }),
            Outcome::Busy => Err(ApiError::busy()),
            Outcome::Unknown => Err(ApiError::outcome_unknown()),
            Outcome::Halted => Err(ApiError::halted()),
            Outcome::Restricted => Err(ApiError::account_restricted()),
        }
    }

    /// What the ledger auditor found, once it tripped the circuit breaker ([`crate::audit`]).
    pub fn halted(&self) -> Option<&crate::audit::Violation> {
        self.0.rm.halted.get()
    }

    /// True when the circuit breaker is open: the ledger auditor found a violation, or the
    /// engine's own invariant check failed (after recovery, or before a snapshot). Commands that
    /// move money are refused until an operator restarts the server.
    pub fn breaker_open(&self) -> bool {
        self.halted().is_some()
            || self.0.rm.engine_invalid.get().is_some()
            || self.0.core.invariants_broken()
    }

    /// Waits until the read models hold every command the engine applied before this call, and
    /// says whether they do. A read-only query ([`Command::CreditStatus`]: never journaled,
    /// changes nothing) goes through the engine's queue behind every earlier command; its reply
    /// carries the engine's sequence number, which the read models are then waited for. Callers
    /// that resolve an *unknown* outcome from the read models (the merchant conversion looks
    /// its sell up by client order id) call this first: a lookup in a lagging read model would
    /// take "not there yet" for "never happened" and act twice.
    pub async fn sync_read_model(&self) -> bool {
        let probe = Command::CreditStatus {
            key: matching_engine::IdempotencyKey([0; 36]),
        };
        match self.0.core.submit(probe).await {
            Ok(reply) => self.0.rm.wait_for(reply.seq).await,
            Err(_) => false,
        }
    }

    /// Submits a command and reports what became of it: applied, rejected, not taken, or
    /// unknown ([`Outcome`]). An applied command is reported as applied even when the read
    /// models are slow to show it: their lag is logged, never turned into a failure (the reply
    /// is durable and authoritative). Callers that move money resolve `Unknown` by idempotency
    /// key.
    pub async fn submit_outcome(&self, cmd: Command) -> Outcome {
        self.submit_outcome_as(cmd, true).await
    }

    /// [`AppState::submit`] without waiting for the read models: for a command whose answer is
    /// built from its own events alone (a new order). The command is noted as answered ahead
    /// of the read models ([`crate::readmodel::ReadModel::answered_ahead`]) before this returns,
    /// and every request that reads them waits for them first ([`AppState::fence`]), so a
    /// client still reads its own answered orders. One wake-up and one thread hop fewer per
    /// order than waiting here (the WebSocket API load test, alternated pairs: +1.5% to
    /// +9.6% orders per second).
    pub async fn submit_ahead(&self, cmd: Command) -> Result<crate::core::Reply, ApiError> {
        Self::reply_of(self.submit_outcome_as(cmd, false).await)
    }

    /// Waits until the read models hold every command answered ahead of them
    /// ([`AppState::submit_ahead`]); runs before every request but a new order (the REST
    /// middleware in [`crate::app`], [`crate::wsapi`]'s methods). Not in time (5 s, or the read
    /// models lost events): logged, and the request goes on with what they hold.
    pub async fn fence(&self) {
        // Read models that lost events were logged when they broke (and refuse commands).
        if !self.0.rm.fence().await && !self.0.rm.broken.load(Ordering::Relaxed) {
            tracing::warn!("read models behind an answered command; reading what they hold");
        }
    }

    async fn submit_outcome_as(&self, cmd: Command, wait: bool) -> Outcome {
        if self.breaker_open() && moves_money(&cmd) {
            return Outcome::Halted;
        }
        // Read models that lost events cannot show what a command did: refuse before taking it
        // (nothing changes) rather than apply it and fail to answer.
        if self.0.rm.broken.load(Ordering::Relaxed) {
            tracing::error!("read models lost events: refusing commands until a restart");
            return Outcome::Halted;
        }
        if let Some(account) = exposure_of(&cmd) {
            if crate::capital::flagged_for_orders(self, account).await {
                return Outcome::Restricted;
            }
        }
        let t0 = Instant::now();
        let reply = match self.0.core.submit(cmd).await {
            Ok(reply) => reply,
            Err(crate::core::CoreError::Busy) => return Outcome::Busy,
            Err(other) => {
                tracing::error!(error = %other, "engine unavailable: command outcome unknown");
                return Outcome::Unknown;
            }
        };
        if let Err(code) = reply.result {
            return Outcome::Rejected(code);
        }
        if !wait {
            self.0.rm.answered_ahead(reply.seq);
        } else if !self.0.rm.wait_for(reply.seq).await {
            tracing::warn!(
                seq = reply.seq,
                "read model did not catch up with an applied command; answering from the durable reply"
            );
        }
        self.0.metrics.engine_latency.record(t0.elapsed());
        Outcome::Applied(reply)
    }

    /// Sets a gauge shown on `/metrics` (e.g. `mediator_wallet_sync_height`,
    /// `mediator_reconciliation_gap_sats`), for the parts of the server outside this crate.
    /// `name` must be a valid Prometheus metric name.
    pub fn set_gauge(&self, name: &'static str, help: &'static str, value: i64) {
        self.0
            .metrics
            .external
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, (help, value));
    }

    /// A fresh client order id ([`client_id`] of the process's seed, a counter and the clock).
    pub fn gen_client_id(&self) -> String {
        let n = self.0.id_counter.fetch_add(1, Ordering::Relaxed);
        client_id(self.0.id_seed, n, crate::core::now_ms())
    }
}

/// A client order id (22 characters of `[A-Za-z0-9]`, like Binance's): `now_ms` in base 62
/// (8 characters, so ids sort by time), then 14 characters mixed from `seed` and the counter
/// `n`. Ids that sort by time land at the end of the SQLite index `(account, client_id)` instead
/// of on a random page: one commit of the history rewrites a few pages per account, not one page
/// per order.
pub fn client_id(seed: u64, n: u64, now_ms: u64) -> String {
    const A: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut s = String::with_capacity(22);
    let mut t = now_ms;
    let mut prefix = [0u8; 8];
    for c in prefix.iter_mut().rev() {
        *c = A[(t % 62) as usize];
        t /= 62;
    }
    s.extend(prefix.iter().map(|&b| char::from(b)));
    let mut x = seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut y = n ^ seed.rotate_left(17);
    for i in 0..14 {
        let v = if i < 7 { &mut x } else { &mut y };
        // splitmix64 step
        *v = v.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *v;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        s.push(char::from(A[(z % 62) as usize]));
    }
    s
}

/// The account a command would give new exposure (an order, an order list, an amend that may
/// raise a price or quantity): what a flagged account may not do. Transfers are refused where
/// they are asked for (`native::transfer`), not here: a transfer's retry is how a caller
/// learns its outcome, so the refusal stands only after the engine said the key was not applied.
fn exposure_of(cmd: &Command) -> Option<u32> {
    match cmd {
        Command::NewOrder(o) => Some(o.account.0),
        Command::NewOco(l) => Some(l.legs[0].account.0),
        Command::NewOto(l) => Some(l.working.account.0),
        Command::NewOtoco(l) => Some(l.working.account.0),
        Command::Amend { account, .. } => Some(account.0),
        _ => None,
    }
}

/// True for the commands the circuit breaker stops: everything that can move money or take
/// on new exposure. Cancels, releases of held withdrawals, account creation, the clock and the
/// read-only queries pass, and so do keep-priority amends (they only lower a quantity).
fn moves_money(cmd: &Command) -> bool {
    !matches!(
        cmd,
        Command::Cancel { .. }
            | Command::CancelAll { .. }
            // Only lowers an order's quantity: it takes on no exposure.
            | Command::AmendKeepPriority { .. }
            | Command::WithdrawRelease { .. }
            | Command::CreateAccount
            | Command::Tick
            | Command::WithdrawalStatus { .. }
            | Command::CreditStatus { .. }
            | Command::TransferStatus { .. }
    )
}

/// Writes `bytes` to `path` through a fresh `0600` file in the same directory, synced and
/// renamed over `path` (then the directory synced): readers see the old file or the new one,
/// and the new one never had a wider mode.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("secret");
    let tmp = dir.join(format!(
        ".{name}.{}.tmp",
        hex::encode(crate::keys::random_bytes::<8>().map_err(std::io::Error::other)?)
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// A request as the handlers see it: raw query and form body (bounded), headers and client IP.
#[derive(Debug)]
pub struct Req {
    /// Headers.
    pub headers: HeaderMap,
    /// Raw query string.
    pub query: String,
    /// Raw body.
    pub body: String,
    /// Client IP (or `local` without a socket; see [`crate::access::client_ip`]).
    pub ip: String,
    /// The route's entry in the permission table ([`crate::access::ROUTES`]).
    pub route: Option<&'static crate::access::Route>,
    /// A WebSocket API request served by this route: its client address and signature
    /// ([`crate::wsapi`]).
    pub ws: Option<crate::wsapi::WsApiCall>,
    /// The parameters when they came parsed (the WebSocket API's, from its JSON: no query
    /// string is written and parsed again); `None`: from `query` and `body`.
    pub params: Option<Params>,
    /// When the request arrived (ms since the epoch): a signed request's `timestamp` and
    /// `recvWindow` are checked against it, as Binance checks them on receipt, not after the
    /// request waited for the read models ([`AppState::fence`]).
    pub arrived_ms: u64,
}

impl Req {
    /// The request's parameters ([`Params::parse`] of the query and the body, or the ones it
    /// came with), none read yet.
    pub fn params(&self) -> Result<Params, ApiError> {
        match &self.params {
            Some(p) => Ok(p.clone()),
            None => Params::parse(&self.query, &self.body),
        }
    }
}

/// The client address of a request ([`crate::access::client_ip`]).
fn request_ip(parts: &axum::http::request::Parts, state: &AppState) -> String {
    crate::access::client_ip(
        parts
            .extensions
            .get::<ConnectInfo<PeerAddr>>()
            .map(|c| c.0 .0.ip()),
        &parts.headers,
        state.0.cfg.trusted_proxy.as_ref(),
    )
}

/// The client's IP (or `local` without a socket), as an extractor.
#[derive(Debug, Clone)]
pub struct ClientIp(pub String);

impl axum::extract::FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(request_ip(parts, state)))
    }
}

/// The peer address of a connection (set by [`serve`]).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

impl FromRequest<AppState> for Req {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let (mut parts, body) = req.into_parts();
        let ws = parts.extensions.remove::<crate::wsapi::WsApiCall>();
        let ip = match &ws {
            Some(w) => w.ip.clone(),
            None => request_ip(&parts, state),
        };
        let route = parts
            .extensions
            .get::<&'static crate::access::Route>()
            .copied();
        let query = parts.uri.query().unwrap_or("").to_owned();
        let bytes = axum::body::to_bytes(body, state.0.cfg.max_body_bytes)
            .await
            .map_err(|_| ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: -1000,
                msg: "Request body too large.".into(),
                retry_after: None,
            })?;
        if !bytes.is_empty() {
            let ct = parts
                .headers
                .get(axum::http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !ct.is_empty() && !ct.starts_with("application/x-www-form-urlencoded") {
                return Err(ApiError::bad(
                    -1100,
                    "Illegal request body; send parameters as application/x-www-form-urlencoded.",
                ));
            }
        }
        let body = String::from_utf8(bytes.to_vec())
            .map_err(|_| ApiError::bad(-1100, "Illegal characters found in the request body."))?;
        let arrived_ms = parts
            .extensions
            .get::<crate::app::Arrived>()
            .map_or_else(crate::core::now_ms, |a| a.0);
        Ok(Req {
            headers: parts.headers,
            query,
            body,
            ip,
            route,
            ws,
            params: None,
            arrived_ms,
        })
    }
}

/// Rate-limit bookkeeping of one request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ctx {
    /// Weight used by this IP in the current minute.
    pub used: u64,
}

/// The most a signed request's `recvWindow` may be.
pub const MAX_RECV_WINDOW: u64 = 60_000;

impl AppState {
    fn charge_ip(&self, req: &Req, weight: u64) -> Result<Ctx, ApiError> {
        self.charge_ip_addr(&req.ip, weight)
    }

    /// Charges weight to a client IP.
    pub fn charge_ip_addr(&self, ip: &str, weight: u64) -> Result<Ctx, ApiError> {
        match self.0.ip_limiter.charge(ip, weight, crate::core::now_ms()) {
            Charge::Ok(used) => Ok(Ctx { used }),
            Charge::Limited { retry_after, .. } => {
                self.0.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
                Err(ApiError::rate_limited(
                    self.0.ip_limiter.limit(),
                    retry_after,
                ))
            }
        }
    }

    /// Checks `timestamp` against the server clock and `recvWindow` (`-1021`, `-1131`).
    pub fn check_time(&self, ts: u64, recv_window: Option<u64>) -> Result<(), ApiError> {
        self.check_time_at(ts, recv_window, crate::core::now_ms())
    }

    /// [`AppState::check_time`] against the time the request arrived, `now` (ms).
    pub fn check_time_at(
        &self,
        ts: u64,
        recv_window: Option<u64>,
        now: u64,
    ) -> Result<(), ApiError> {
        let recv = recv_window.unwrap_or(5_000);
        if recv > MAX_RECV_WINDOW {
            return Err(ApiError::bad(-1131, "recvWindow must be less than 60000"));
        }
        if ts > now + 1_000 {
            return Err(ApiError::bad(
                -1021,
                "Timestamp for this request was 1000ms ahead of the server's time.",
            ));
        }
        if now.saturating_sub(ts) > recv {
            return Err(ApiError::bad(
                -1021,
                "Timestamp for this request is outside of the recvWindow.",
            ));
        }
        Ok(())
    }

    /// A public request: charges weight and parses parameters.
    pub fn public(&self, req: &Req, weight: u64) -> Result<(Params, Ctx), ApiError> {
        let ctx = self.charge_ip(req, weight)?;
        Ok((req.params()?, ctx))
    }

    fn api_key(&self, req: &Req) -> Result<Arc<ApiKey>, ApiError> {
        let raw = req
            .headers
            .get("x-mbx-apikey")
            .ok_or_else(ApiError::key_format)?
            .to_str()
            .map_err(|_| ApiError::key_format())?;
        self.find_key(raw)
    }

    /// A live key by its public id (`-2014`, `-2015`). Nothing is charged: whoever knows a key
    /// id is not its owner; [`AppState::charge_key`] once the request proved it is.
    pub fn find_key(&self, raw: &str) -> Result<Arc<ApiKey>, ApiError> {
        if raw.is_empty() || raw.len() > 128 || !raw.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(ApiError::key_format());
        }
        self.0.keys.get(raw).ok_or_else(ApiError::key_rejected)
    }

    /// Charges `weight` against a key's limit (`429`, `-1003`). Call only after the request's
    /// signature verified.
    pub fn charge_key(&self, key: &ApiKey, weight: u64) -> Result<(), ApiError> {
        match self
            .0
            .key_limiter
            .charge(&key.api_key, weight, crate::core::now_ms())
        {
            Charge::Ok(_) => Ok(()),
            Charge::Limited { retry_after, .. } => {
                self.0.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
                Err(ApiError::rate_limited(
                    self.0.key_limiter.limit(),
                    retry_after,
                ))
            }
        }
    }

    /// The request's entry in the permission table (a handler reached without one is a bug:
    /// refused, nothing done).
    fn route_of(req: &Req) -> Result<&'static crate::access::Route, ApiError> {
        req.route.ok_or_else(|| {
            tracing::error!("a handler ran without a route table entry");
            ApiError::internal()
        })
    }

    /// A request with an API key but no signature (`userDataStream`, `historicalTrades`): the
    /// key must hold the route's [`crate::access::Access::Key`] permissions. The weight is
    /// charged to the IP only: without a signature the caller may not be the key's owner.
    pub fn keyed(&self, req: &Req, weight: u64) -> Result<(Arc<ApiKey>, Params, Ctx), ApiError> {
        let crate::access::Access::Key(perm) = Self::route_of(req)?.access else {
            tracing::error!("keyed() on a route that is not Access::Key");
            return Err(ApiError::internal());
        };
        let ctx = self.charge_ip(req, weight)?;
        let key = self.api_key(req)?;
        if !key.perms.has(perm) {
            return Err(ApiError::key_rejected());
        }
        Ok((key, req.params()?, ctx))
    }

    /// A signed request, checked against its route's entry in [`crate::access::ROUTES`]: the
    /// entry's weight, then the key, timestamp and recvWindow, the HMAC-SHA256 signature over
    /// the exact query string followed by the exact body (the `signature` pair removed), then
    /// the key's weight (only now: a bad signature spends nothing of the key's budget), then the
    /// entry's permission (`-2015`), before the handler reads any parameter.
    pub fn signed(&self, req: &Req) -> Result<(Arc<ApiKey>, Params, Ctx), ApiError> {
        let weight = Self::route_of(req)?.weight.ok_or_else(|| {
            tracing::error!("a signed route without a weight must use signed_weighted()");
            ApiError::internal()
        })?;
        self.signed_weighted(req, weight)
    }

    /// [`AppState::signed`] with a weight the handler computed (it depends on parameters).
    pub fn signed_weighted(
        &self,
        req: &Req,
        weight: u64,
    ) -> Result<(Arc<ApiKey>, Params, Ctx), ApiError> {
        let route = Self::route_of(req)?;
        let crate::access::Access::Signed(perm) = route.access else {
            tracing::error!("signed() on a route that is not Access::Signed");
            return Err(ApiError::internal());
        };
        let ctx = self.charge_ip(req, weight)?;
        let key = self.api_key(req)?;
        let (mut p, ts, recv) = signed_params(req.params()?)?;
        self.check_time_at(ts, recv, req.arrived_ms)?;
        p.req("signature")?;
        let verified = match &req.ws {
            // The WebSocket API signs its sorted parameters, not a query string.
            Some(ws) => ws.verify(&key),
            None => {
                let (payload, sig) = signed_payload(&req.query, &req.body)
                    .ok_or_else(|| ApiError::missing("signature"))?;
                key.verify(payload.as_bytes(), &sig)
            }
        };
        if !verified {
            return Err(ApiError::bad_signature());
        }
        self.charge_key(&key, weight)?;
        if !key.perms.has(perm) {
            return Err(ApiError::key_rejected());
        }
        if let Some((param, extra)) = route.also {
            if p.has(param) && !key.perms.has(extra) {
                return Err(ApiError::key_rejected());
            }
        }
        Ok((key, p, ctx))
    }

    /// Counts one new order of `account` against the 10-second order limit (`-1015`, 429).
    pub fn charge_order(&self, account: u32) -> Result<u64, ApiError> {
        match self
            .0
            .order_limiter
            .charge(&account.to_string(), 1, crate::core::now_ms())
        {
            Charge::Ok(n) => Ok(n),
            Charge::Limited { retry_after, .. } => {
                self.0.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
                Err(ApiError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    code: -1015,
                    msg: format!(
                        "Too many new orders; current limit is {} orders per 10 SECOND.",
                        self.0.order_limiter.limit()
                    )
                    .into(),
                    retry_after: Some(retry_after),
                })
            }
        }
    }

    /// The markets.
    pub fn markets(&self) -> &Markets {
        &self.0.markets
    }

    /// The read models.
    pub fn read_model(&self) -> &ReadModel {
        &self.0.rm
    }

    /// The settings the state was opened with.
    pub fn cfg(&self) -> &ApiConfig {
        &self.0.cfg
    }

    /// The API keys (and the master key's derived secrets).
    pub fn keys(&self) -> &KeyStore {
        &self.0.keys
    }

    /// The custody service, once attached ([`AppState::set_custody`]).
    pub fn custody(&self) -> Option<Arc<dyn crate::custody::Custody>> {
        self.0.custody.get().cloned()
    }

    /// The Lightning node, once attached ([`AppState::set_lightning`]).
    pub fn lightning(&self) -> Option<crate::lightning::Handle> {
        self.0.lightning.get().cloned()
    }

    /// The counters behind `/metrics`.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// The per-client caps on long-lived streams (WebSocket, SSE).
    pub fn streams(&self) -> &crate::ratelimit::StreamLimits {
        &self.0.streams
    }

    /// The data directory the state was opened in.
    pub fn data_dir(&self) -> &Path {
        &self.0.data_dir
    }

    /// Attaches a product's state (one value per type, e.g. merchant payments' database and
    /// queues), at start-up, before the router that serves its routes takes requests. At most
    /// once per type and [`Extensions::SLOTS`] types: otherwise the value comes back.
    pub fn attach<T: std::any::Any + Send + Sync>(&self, value: T) -> Result<(), T> {
        self.0.extensions.insert(value)
    }

    /// The value of type `T` attached with [`AppState::attach`], if any.
    pub fn extension<T: std::any::Any + Send + Sync>(&self) -> Option<&T> {
        self.0.extensions.get::<T>()
    }
}

/// Typed, set-once slots for the state of the products composed over the shell (like
/// `http::Extensions`, but immutable once set and read without a lock): a product crate keeps
/// its handlers on `State<AppState>` and finds its own state by type. The shell never names
/// them.
#[derive(Default)]
pub struct Extensions {
    slots: [std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>; Extensions::SLOTS],
}

impl Extensions {
    /// How many types can be attached.
    pub const SLOTS: usize = 8;

    fn insert<T: std::any::Any + Send + Sync>(&self, value: T) -> Result<(), T> {
        if self.get::<T>().is_some() {
            return Err(value);
        }
        let mut value = Some(value);
        for slot in &self.slots {
            let mut mine = false;
            slot.get_or_init(|| {
                mine = true;
                match value.take() {
                    Some(v) => Box::new(v),
                    None => unreachable!("a slot is filled once"),
                }
            });
            if mine {
                return Ok(());
            }
        }
        Err(value.expect("not taken when no slot was free"))
    }

    fn get<T: std::any::Any + Send + Sync>(&self) -> Option<&T> {
        self.slots
            .iter()
            .map_while(|s| s.get())
            .find_map(|v| v.downcast_ref::<T>())
    }
}

impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.slots.iter().take_while(|s| s.get().is_some()).count();
        f.debug_struct("Extensions").field("attached", &n).finish()
    }
}

/// A JSON answer with Binance's used-weight header.
pub fn ok_json(ctx: &Ctx, v: serde_json::Value) -> Response {
    let mut r = axum::Json(v).into_response();
    let h = HeaderValue::from(ctx.used);
    r.headers_mut().insert("x-mbx-used-weight-1m", h.clone());
    r.headers_mut().insert("x-mbx-used-weight", h);
    r
}

#[cfg(test)]
mod tests {
    use super::{client_id, Extensions};

    #[derive(Debug, PartialEq)]
    struct A(u32);
    #[derive(Debug, PartialEq)]
    struct B(&'static str);

    #[test]
    fn extensions_are_found_by_type_and_set_once() {
        let e = Extensions::default();
        assert_eq!(e.get::<A>(), None);
        assert_eq!(e.insert(A(1)), Ok(()));
        assert_eq!(e.insert(B("b")), Ok(()));
        assert_eq!(e.get::<A>(), Some(&A(1)));
        assert_eq!(e.get::<B>(), Some(&B("b")));
        // A second value of a type comes back; the first stays.
        assert_eq!(e.insert(A(2)), Err(A(2)));
        assert_eq!(e.get::<A>(), Some(&A(1)));
        // Full: the value comes back.
        let e = Extensions::default();
        macro_rules! fill {
            ($($t:ident),*) => {$(
                #[derive(Debug)]
                struct $t;
                assert!(e.insert($t).is_ok());
            )*};
        }
        fill!(C0, C1, C2, C3, C4, C5, C6, C7);
        assert_eq!(Extensions::SLOTS, 8);
        assert_eq!(e.insert(A(3)), Err(A(3)));
        assert_eq!(e.get::<A>(), None);
    }

    /// Regression: generated client ids were random, so each order's history row went to a
    /// random page of the `(account, client_id)` index and every SQLite commit rewrote about one
    /// page per order. They now sort by time (and stay 22 alphanumerics, distinct).
    #[test]
    fn generated_client_ids_sort_by_time_and_are_distinct() {
        let seed = 0x5EED_1234_ABCD_0042;
        let t0 = 1_764_500_000_000u64;
        let mut seen = std::collections::HashSet::new();
        let mut prev = String::new();
        for n in 0..20_000u64 {
            // A new millisecond every 7 ids.
            let id = client_id(seed, n, t0 + n / 7);
            assert_eq!(id.len(), 22, "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
            if n % 7 == 0 && n > 0 {
                assert!(id > prev, "{id} after {prev}");
            }
            prev.clone_from(&id);
            assert!(seen.insert(id), "a repeated id at {n}");
        }
        // Base 62 keeps the order of the numbers across digit boundaries.
        assert!(client_id(seed, 0, 61) < client_id(seed, 0, 62));
        assert!(client_id(seed, 0, 62 * 62 - 1) < client_id(seed, 0, 62 * 62));
    }
}
