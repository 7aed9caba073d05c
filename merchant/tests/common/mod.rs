//! Test harness of merchant payments: the API harness (`api/tests/common`) over a state with
//! merchant payments attached ([`merchant::attach`]) and a router that serves the trader
//! gateway's and the merchant endpoints ([`merchant::app`]). [`Harness`] derefs to the API's,
//! so its fields and request helpers are the same.
#![allow(dead_code, missing_docs)]

#[path = "../../../api/tests/common/mod.rs"]
pub mod base;

pub use base::*;

use api::{ApiConfig, AppState};
use std::sync::Arc;

/// The merchant settings of test harnesses: the defaults, with a resolver that knows
/// `shop.example` (a public address; nothing is sent to it) and `localhost`, and nothing else,
/// so no test resolves a name through the network.
pub fn test_merchant_config() -> merchant::MerchantConfig {
    let resolve = |host: &str, port: u16| -> std::io::Result<Vec<std::net::SocketAddr>> {
        let ip: std::net::IpAddr = match host {
            "shop.example" => [93, 184, 216, 34].into(),
            "localhost" => [127, 0, 0, 1].into(),
            _ => return Err(std::io::ErrorKind::NotFound.into()),
        };
        Ok(vec![std::net::SocketAddr::new(ip, port)])
    };
    merchant::MerchantConfig {
        webhook_targets: merchant::target::TargetPolicy::default().with_resolver(Arc::new(resolve)),
        ..Default::default()
    }
}

/// The API harness with merchant payments.
pub struct Harness(pub base::Harness);

impl std::ops::Deref for Harness {
    type Target = base::Harness;
    fn deref(&self) -> &base::Harness {
        &self.0
    }
}

impl std::ops::DerefMut for Harness {
    fn deref_mut(&mut self) -> &mut base::Harness {
        &mut self.0
    }
}

impl Harness {
    pub fn new() -> Self {
        Self::with_merchant(base::Harness::new(), test_merchant_config())
    }

    pub fn with_config(cfg: ApiConfig) -> Self {
        Self::with_configs(cfg, test_merchant_config())
    }

    /// API and merchant settings both chosen by the test.
    pub fn with_configs(cfg: ApiConfig, merchant: merchant::MerchantConfig) -> Self {
        Self::with_merchant(base::Harness::with_config(cfg), merchant)
    }

    pub fn in_dir(dir: tempfile::TempDir, cfg: ApiConfig) -> Self {
        Self::with_merchant(base::Harness::in_dir(dir, cfg), test_merchant_config())
    }

    pub fn lossy() -> (Self, Arc<Lossy>) {
        let (h, core) = base::Harness::lossy();
        (Self::with_merchant(h, test_merchant_config()), core)
    }

    pub fn lossy_with(cfg: ApiConfig) -> (Self, Arc<Lossy>) {
        let (h, core) = base::Harness::lossy_with(cfg);
        (Self::with_merchant(h, test_merchant_config()), core)
    }

    pub fn over(dir: tempfile::TempDir, state: AppState) -> Self {
        Self::with_merchant(base::Harness::over(dir, state), test_merchant_config())
    }

    /// `h` with merchant payments attached to its state and both surfaces served.
    pub fn with_merchant(mut h: base::Harness, merchant: merchant::MerchantConfig) -> Self {
        merchant::attach(&h.state, merchant).unwrap();
        h.router = merchant::app(h.state.clone());
        Self(h)
    }
}

/// Places a limit order of `qty` BTC at `price` on BTCUSD from a fresh trader (enough of both
/// assets); its key.
pub async fn place(h: &Harness, side: &str, price: &str, qty: &str) -> (String, String) {
    let (_, k) = h.trader("10", "10000000").await;
    h.ok(
        "POST",
        "/api/v3/order",
        &format!(
            "symbol=BTCUSD&side={side}&type=LIMIT&timeInForce=GTC&quantity={qty}&price={price}"
        ),
        &k,
    )
    .await;
    k
}

/// A market a reference price can come from: `depth` BTC bid at `bid` and asked at `ask` (new
/// traders), and a trade of 0.001 BTC at `ask` between two different accounts.
pub async fn market(h: &Harness, bid: &str, ask: &str, depth: &str) {
    place(h, "SELL", ask, depth).await;
    place(h, "BUY", bid, depth).await;
    place(h, "BUY", ask, "0.001").await;
}
