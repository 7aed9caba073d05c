//! Test harness: an API over a local engine in a temporary directory. (The merchant crate's
//! tests wrap it: `merchant/tests/common/mod.rs` attaches merchant payments and serves both
//! surfaces.)
#![allow(dead_code, missing_docs)]

pub mod custody;

use api::core::BoxFuture;
use api::keys::{sign, Perms};
use api::{app, open_local, ApiConfig, AppState};
use api::{CoreError, ExchangeCore, LocalCore, Reply};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use matching_engine::{Command, EngineConfig};
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tower::ServiceExt;

/// A core that applies every command but loses the replies of the next `lose` applied ones
/// (answering "stopped": the caller cannot tell whether the command was applied).
pub struct Lossy {
    inner: LocalCore,
    /// Applied commands' replies still to pass before losing any.
    pub keep: AtomicUsize,
    /// Replies still to lose.
    pub lose: AtomicUsize,
    /// Replies lost so far.
    pub lost: AtomicUsize,
    /// While true, commands wait before they are submitted (a slow engine: requests stay in
    /// progress until it is set back to false).
    pub held: tokio::sync::watch::Sender<bool>,
}

impl Lossy {
    /// Loses the replies of the next `n` applied commands.
    pub fn lose_next(&self, n: usize) {
        self.lose_after(0, n);
    }

    /// Passes the replies of the next `keep` applied commands, then loses the next `n`.
    pub fn lose_after(&self, keep: usize, n: usize) {
        self.keep.store(keep, Ordering::SeqCst);
        self.lose.store(n, Ordering::SeqCst);
    }
}

impl ExchangeCore for Lossy {
    fn submit(&self, cmd: Command) -> BoxFuture<'_, Result<Reply, CoreError>> {
        Box::pin(async move {
            let mut held = self.held.subscribe();
            let _ = held.wait_for(|h| !*h).await;
            let reply = self.inner.submit(cmd).await?;
            let kept = reply.result.is_ok()
                && self
                    .keep
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            let lose = reply.result.is_ok()
                && !kept
                && self
                    .lose
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            if lose {
                self.lost.fetch_add(1, Ordering::SeqCst);
                return Err(CoreError::Stopped);
            }
            Ok(reply)
        })
    }
    fn config(&self) -> &EngineConfig {
        self.inner.config()
    }
}

pub struct Harness {
    pub state: AppState,
    pub router: Router,
    pub dir: tempfile::TempDir,
    pub admin: (String, String),
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub json: Value,
}

impl Resp {
    pub fn code(&self) -> i64 {
        self.json["code"].as_i64().unwrap_or(0)
    }
    pub fn msg(&self) -> &str {
        self.json["msg"].as_str().unwrap_or("")
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

impl Harness {
    pub fn new() -> Self {
        Self::with_config(ApiConfig {
            orders_per_10s: 1_000_000,
            ip_weight_per_min: 1_000_000,
            key_weight_per_min: 1_000_000,
            ..ApiConfig::default()
        })
    }

    pub fn with_config(cfg: ApiConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::in_dir(dir, cfg)
    }

    pub fn in_dir(dir: tempfile::TempDir, cfg: ApiConfig) -> Self {
        let state = open_local(dir.path(), EngineConfig::default(), cfg).unwrap();
        Self::over(dir, state)
    }

    /// An API over a core that can lose replies ([`Lossy`]): the commands whose replies are lost
    /// are applied all the same (outcome *unknown* to the caller).
    pub fn lossy() -> (Self, Arc<Lossy>) {
        Self::lossy_with(ApiConfig::default())
    }

    /// [`Harness::lossy`] with `cfg` (its rate limits opened).
    pub fn lossy_with(cfg: ApiConfig) -> (Self, Arc<Lossy>) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ApiConfig {
            orders_per_10s: 1_000_000,
            ip_weight_per_min: 1_000_000,
            key_weight_per_min: 1_000_000,
            ..cfg
        };
        let (pending, sink) = api::app::open(dir.path(), &EngineConfig::default(), cfg).unwrap();
        let engine = matching_engine::Engine::new(EngineConfig::default()).unwrap();
        let core = Arc::new(Lossy {
            inner: LocalCore::spawn(engine, sink, 65_536).unwrap(),
            keep: AtomicUsize::new(0),
            lose: AtomicUsize::new(0),
            lost: AtomicUsize::new(0),
            held: tokio::sync::watch::channel(false).0,
        });
        let state = pending.start(core.clone());
        (Self::over(dir, state), core)
    }

    pub fn over(dir: tempfile::TempDir, state: AppState) -> Self {
        let admin = state
            .create_key(0, Perms(Perms::ADMIN.0 | Perms::READ.0), "admin")
            .unwrap();
        Self {
            router: app(state.clone()),
            state,
            dir,
            admin,
        }
    }

    pub async fn raw(&self, method: &str, uri: &str, body: &str, key: Option<&str>) -> Resp {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            b = b.header("X-MBX-APIKEY", k);
        }
        if !body.is_empty() {
            b = b.header("content-type", "application/x-www-form-urlencoded");
        }
        let res = self
            .router
            .clone()
            .oneshot(b.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Resp {
            status,
            headers,
            json,
        }
    }

    pub async fn get(&self, uri: &str) -> Resp {
        self.raw("GET", uri, "", None).await
    }

    /// A signed request: parameters in the query for GET/DELETE, in the body for POST/PUT
    /// (as ccxt and python-binance send them).
    pub async fn signed(
        &self,
        method: &str,
        path: &str,
        params: &str,
        key: &(String, String),
    ) -> Resp {
        let mut q = params.to_owned();
        if !q.is_empty() {
            q.push('&');
        }
        q.push_str(&format!("timestamp={}", now_ms()));
        let sig = sign(&key.1, &q);
        let full = format!("{q}&signature={sig}");
        if method == "POST" || method == "PUT" {
            self.raw(method, path, &full, Some(&key.0)).await
        } else {
            self.raw(method, &format!("{path}?{full}"), "", Some(&key.0))
                .await
        }
    }

    pub async fn ok(
        &self,
        method: &str,
        path: &str,
        params: &str,
        key: &(String, String),
    ) -> Value {
        let r = self.signed(method, path, params, key).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{method} {path} {params}: {}",
            r.json
        );
        r.json
    }

    /// A new account with a trade+read key, credited with `btc` and `usd` (decimal strings).
    pub async fn trader(&self, btc: &str, usd: &str) -> (u32, (String, String)) {
        self.trader_with(btc, usd, "read,trade").await
    }

    /// [`Harness::trader`] with a key of the given permissions (`read,trade,transfer`).
    pub async fn trader_with(
        &self,
        btc: &str,
        usd: &str,
        permissions: &str,
    ) -> (u32, (String, String)) {
        let acct = self
            .ok("POST", "/mapi/v1/admin/account", "", &self.admin)
            .await["account"]
            .as_u64()
            .unwrap() as u32;
        let k = self
            .ok(
                "POST",
                "/mapi/v1/admin/apiKey",
                &format!("account={acct}&permissions={permissions}&label=t"),
                &self.admin,
            )
            .await;
        let key = (
            k["apiKey"].as_str().unwrap().to_owned(),
            k["secretKey"].as_str().unwrap().to_owned(),
        );
        if btc != "0" {
            // BTC as custody credits a deposit (the admin credit refuses BTC once custody is
            // attached, and some tests attach a scripted custody).
            let asset = self.state.markets().asset("BTC").unwrap().id;
            let amount = api::decimal::parse_units(btc, 8).unwrap();
            let reply = self
                .state
                .submit(matching_engine::Command::Credit {
                    account: matching_engine::AccountId(acct),
                    asset,
                    amount: matching_engine::Amount(amount),
                    key: matching_engine::IdempotencyKey::reference(&format!("dep-{acct}-BTC")),
                })
                .await
                .unwrap();
            assert_eq!(reply.result, Ok(()));
        }
        if usd != "0" {
            self.ok(
                "POST",
                "/mapi/v1/admin/credit",
                &format!("account={acct}&asset=USD&amount={usd}&reference=dep-{acct}-USD"),
                &self.admin,
            )
            .await;
        }
        (acct, key)
    }

    pub async fn balance(&self, key: &(String, String), asset: &str) -> (String, String) {
        let a = self.ok("GET", "/api/v3/account", "", key).await;
        let b = a["balances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["asset"] == asset)
            .unwrap();
        (
            b["free"].as_str().unwrap().to_owned(),
            b["locked"].as_str().unwrap().to_owned(),
        )
    }
}

/// One HTTP/1.1 request over the connection `s` (then closed): (status, body as JSON or string).
pub async fn http_on(
    mut s: tokio::net::TcpStream,
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    body: &str,
    key: Option<&str>,
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(k) = key {
        req.push_str(&format!("X-MBX-APIKEY: {k}\r\n"));
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let status: u16 = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned())),
    )
}

/// A small deterministic generator (SplitMix64) for seeded tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform-ish in `0..n` (`n` at least 1).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with `percent` % chance.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}
