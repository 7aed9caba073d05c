//! `mediator serve` configuration: built-in defaults, then a TOML file, then environment
//! variables, then command-line flags — each overriding the one before.
//!
//! ```toml
//! data_dir = "./mediator-data"
//! listen = "127.0.0.1:8080"
//! admin_listen = "127.0.0.1:8081"         # /mapi/v1/admin/* and /metrics: keep it private
//! network = "regtest"              # regtest | testnet | signet | bitcoin
//! public_url = "https://pay.example.com"   # how customers reach the server [default: http://<listen>]
//!
//! [bitcoind]                       # leave out on regtest: serve starts its own node
//! rpc_url = "http://127.0.0.1:18443"
//! cookie_file = "/home/me/.bitcoin/regtest/.cookie"   # or rpc_user + rpc_password
//!
//! [custody]
//! deposit_confirmations = 1        # default 1 on regtest, 3 elsewhere
//! poll_interval_ms = 1000
//! withdrawal_fee_sat = 10000
//! min_withdrawal_sat = 10000
//! daily_limit_sat = 1000000000
//! approval_threshold_sat = 100000000   # of the account's running 24-hour total
//! hot_wallet_daily_limit_sat = 5000000000   # all accounts, 24 hours; past it: approval
//! deny_list = "deny.txt"
//! batch_interval_secs = 10
//! batch_max_requests = 100
//! fallback_fee_rate_sat_vb = 2
//! shortfall_tolerance_sat = 0      # no batch while the ledger owes more than the wallet by more
//!
//! [limits]                         # connection and stream limits (api/README.md, "Limits")
//! max_connections = 4096
//! max_connections_per_ip = 256
//! header_read_timeout_ms = 20000
//! body_read_timeout_ms = 30000   # a request's body, once its head is read (408 -1001 after)
//! idle_timeout_ms = 60000
//! max_streams_per_ip = 128
//! max_sse_per_invoice = 16
//! ws_connects_per_5min = 300
//! ws_max_message_bytes = 65536
//! ws_api_max_in_flight = 64      # requests in flight per /ws-api/v3 connection
//!
//! [checkout]
//! frame_ancestors = "'self' https://shop.example.com"   # who may embed checkout/POS pages
//!
//! [merchant]                       # api/README.md, "Webhooks" and "Merchant payments"
//! allow_private_webhooks = false   # true: webhooks may go to internal addresses (own network, tests)
//! redeliveries_per_min = 10        # webhook redeliver calls per merchant per minute
//! lightning_parts_per_hour = 600   # BOLT11 parts a store's invoices get an hour (then on chain only)
//! pos_invoices_per_hour = 600      # invoices a store's point-of-sale page makes an hour (then 429)
//! price_max_trade_age_ms = 300000  # a USD invoice needs a trade (two accounts) this recent
//! price_max_spread_bps = 200       # ... a book no wider than this ...
//! price_min_depth_sat = 1000000    # ... holding this much a side within that band
//! conversion_slippage_bps = 100    # conversions sell no lower than the reference less this
//! price_index_file = "/var/lib/mediator/btcusd.txt"   # or price_index_url: one decimal price
//! price_index_max_deviation_bps = 200
//! price_index_max_age_ms = 300000
//! price_index_cache_ms = 2000      # one index read serves every caller this long (0: every use)
//! withdraw_address_delay_ms = 86400000   # a store's new allow-listed withdrawal address waits this long
//!
//! [lightning]                      # README.md, "Lightning"; on by default on regtest only
//! enabled = true
//! listen = "127.0.0.1:9735"        # the node's peer-to-peer address
//! anchor_channels = true
//! withdrawal_fee_sat = 10          # held and charged per withdrawal; the routing fee's cap
//! min_withdrawal_sat = 1
//! max_withdrawal_sat = 4000000
//! min_deposit_sat = 1
//! max_deposit_sat = 4000000
//! invoice_expiry_secs = 3600
//!
//! [trusted_proxy]                  # behind a reverse proxy: whose header names the client
//! header = "x-forwarded-for"       # the last address in it is the one the proxy saw
//! addresses = ["127.0.0.1"]        # the proxy's own addresses; anyone else's header is ignored
//! ```

use anyhow::{bail, Context};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The node to use instead of starting one.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BitcoindConfig {
    /// RPC URL.
    pub rpc_url: Option<String>,
    /// Cookie file (preferred).
    pub cookie_file: Option<PathBuf>,
    /// RPC user.
    pub rpc_user: Option<String>,
    /// RPC password.
    pub rpc_password: Option<String>,
}

/// Custody knobs (see the wallet crate).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CustodyKnobs {
    /// Confirmations before a deposit is credited.
    pub deposit_confirmations: Option<u32>,
    /// Custody loop period.
    pub poll_interval_ms: Option<u64>,
    /// Flat withdrawal fee.
    pub withdrawal_fee_sat: Option<u64>,
    /// Smallest withdrawal.
    pub min_withdrawal_sat: Option<u64>,
    /// 24-hour limit per account.
    pub daily_limit_sat: Option<u64>,
    /// Above this (the account's running 24-hour total), a withdrawal waits for approval.
    pub approval_threshold_sat: Option<u64>,
    /// Exchange-wide 24-hour total above which every withdrawal waits for approval.
    pub hot_wallet_daily_limit_sat: Option<u64>,
    /// File of denied addresses.
    pub deny_list: Option<PathBuf>,
    /// Batch every this many seconds...
    pub batch_interval_secs: Option<u64>,
    /// ...or this many requests.
    pub batch_max_requests: Option<usize>,
    /// Fee rate when the node has no estimate.
    pub fallback_fee_rate_sat_vb: Option<u32>,
    /// No withdrawal batch while the ledger owes more than custody holds by more than this
    /// (`wallet::BatchPolicy::shortfall_tolerance`) [default: 0].
    pub shortfall_tolerance_sat: Option<u64>,
}

/// `[lightning]`: the Lightning node (`lightning/`, README.md "Lightning"). Unset keys keep
/// `lightning_custody::LightningConfig::new`'s defaults.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LightningKnobs {
    /// Run the node [default: on regtest only].
    pub enabled: Option<bool>,
    /// Peer-to-peer listen address [default: 127.0.0.1:9735].
    pub listen: Option<SocketAddr>,
    /// Negotiate anchor channels [default: true].
    pub anchor_channels: Option<bool>,
    /// Flat fee per withdrawal, also the routing fee's cap [default: 10].
    pub withdrawal_fee_sat: Option<u64>,
    /// Smallest withdrawal [default: 1].
    pub min_withdrawal_sat: Option<u64>,
    /// Largest withdrawal [default: 4000000].
    pub max_withdrawal_sat: Option<u64>,
    /// Smallest deposit invoice [default: 1].
    pub min_deposit_sat: Option<u64>,
    /// Largest deposit invoice [default: 4000000].
    pub max_deposit_sat: Option<u64>,
    /// Deposit invoices' expiry [default: 3600].
    pub invoice_expiry_secs: Option<u32>,
}

impl LightningKnobs {
    /// Each key from `self`, else from `other`.
    pub fn or(self, other: Self) -> Self {
        Self {
            enabled: self.enabled.or(other.enabled),
            listen: self.listen.or(other.listen),
            anchor_channels: self.anchor_channels.or(other.anchor_channels),
            withdrawal_fee_sat: self.withdrawal_fee_sat.or(other.withdrawal_fee_sat),
            min_withdrawal_sat: self.min_withdrawal_sat.or(other.min_withdrawal_sat),
            max_withdrawal_sat: self.max_withdrawal_sat.or(other.max_withdrawal_sat),
            min_deposit_sat: self.min_deposit_sat.or(other.min_deposit_sat),
            max_deposit_sat: self.max_deposit_sat.or(other.max_deposit_sat),
            invoice_expiry_secs: self.invoice_expiry_secs.or(other.invoice_expiry_secs),
        }
    }
}

/// Connection and stream limits of the HTTP server (`[limits]`; flags `--max-connections` ...,
/// environment `MEDIATOR_MAX_CONNECTIONS` ...). Unset keys keep [`api::ApiConfig`]'s defaults;
/// api/README.md ("Limits") describes each.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct LimitKnobs {
    /// Most concurrent connections [default: 4096].
    #[arg(long, env = "MEDIATOR_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most concurrent connections per client address (IPv4, IPv6 /64) [default: 256].
    #[arg(long, env = "MEDIATOR_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Milliseconds to send a complete request head, also the keep-alive idle time [default: 20000].
    #[arg(long, env = "MEDIATOR_HEADER_READ_TIMEOUT_MS")]
    pub header_read_timeout_ms: Option<u64>,
    /// Milliseconds to send a request's whole body once its head is read [default: 30000].
    #[arg(long, env = "MEDIATOR_BODY_READ_TIMEOUT_MS")]
    pub body_read_timeout_ms: Option<u64>,
    /// Milliseconds without a byte either way before a connection is closed [default: 60000].
    #[arg(long, env = "MEDIATOR_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Most concurrent WebSocket and SSE streams per client IP [default: 128].
    #[arg(long, env = "MEDIATOR_MAX_STREAMS_PER_IP")]
    pub max_streams_per_ip: Option<usize>,
    /// Most concurrent SSE streams of one invoice [default: 16].
    #[arg(long, env = "MEDIATOR_MAX_SSE_PER_INVOICE")]
    pub max_sse_per_invoice: Option<usize>,
    /// WebSocket connection attempts per client IP per 5 minutes [default: 300].
    #[arg(long = "ws-connects-per-5min", env = "MEDIATOR_WS_CONNECTS_PER_5MIN")]
    pub ws_connects_per_5min: Option<u64>,
    /// Largest WebSocket frame and message from a client, in bytes [default: 65536].
    #[arg(long, env = "MEDIATOR_WS_MAX_MESSAGE_BYTES")]
    pub ws_max_message_bytes: Option<usize>,
    /// Requests in flight per `/ws-api/v3` connection; with this many the connection is not
    /// read until one is answered [default: 64].
    #[arg(long, env = "MEDIATOR_WS_API_MAX_IN_FLIGHT")]
    pub ws_api_max_in_flight: Option<usize>,
}

impl LimitKnobs {
    /// `self`'s keys, then `under`'s.
    fn or(self, under: Self) -> Self {
        Self {
            max_connections: self.max_connections.or(under.max_connections),
            max_connections_per_ip: self.max_connections_per_ip.or(under.max_connections_per_ip),
            header_read_timeout_ms: self.header_read_timeout_ms.or(under.header_read_timeout_ms),
            body_read_timeout_ms: self.body_read_timeout_ms.or(under.body_read_timeout_ms),
            idle_timeout_ms: self.idle_timeout_ms.or(under.idle_timeout_ms),
            max_streams_per_ip: self.max_streams_per_ip.or(under.max_streams_per_ip),
            max_sse_per_invoice: self.max_sse_per_invoice.or(under.max_sse_per_invoice),
            ws_connects_per_5min: self.ws_connects_per_5min.or(under.ws_connects_per_5min),
            ws_max_message_bytes: self.ws_max_message_bytes.or(under.ws_max_message_bytes),
            ws_api_max_in_flight: self.ws_api_max_in_flight.or(under.ws_api_max_in_flight),
        }
    }

    /// Refuses values that would lock everyone out or cut healthy connections.
    fn check(&self) -> anyhow::Result<()> {
        let counts = [
            ("max_connections", self.max_connections.map(|v| v as u64)),
            (
                "max_connections_per_ip",
                self.max_connections_per_ip.map(|v| v as u64),
            ),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
            (
                "max_streams_per_ip",
                self.max_streams_per_ip.map(|v| v as u64),
            ),
            (
                "max_sse_per_invoice",
                self.max_sse_per_invoice.map(|v| v as u64),
            ),
            ("ws_connects_per_5min", self.ws_connects_per_5min),
            (
                "ws_api_max_in_flight",
                self.ws_api_max_in_flight.map(|v| v as u64),
            ),
        ];
        for (name, v) in counts {
            if v == Some(0) {
                bail!("limits.{name} must be at least 1");
            }
        }
        let request_ms = api::app::REQUEST_TIMEOUT.as_millis() as u64;
        if self.idle_timeout_ms.is_some_and(|v| v <= request_ms) {
            bail!("limits.idle_timeout_ms must be more than the request timeout ({request_ms} ms)");
        }
        // A body that stops must get its `408` before the idle check closes the connection
        // without an answer.
        let defaults = api::ApiConfig::default();
        let body = self
            .body_read_timeout_ms
            .unwrap_or(defaults.body_read_timeout_ms);
        let idle = self.idle_timeout_ms.unwrap_or(defaults.idle_timeout_ms);
        if body >= idle {
            bail!("limits.body_read_timeout_ms ({body}) must be less than limits.idle_timeout_ms ({idle})");
        }
        if self.ws_max_message_bytes.is_some_and(|v| v < 1024) {
            bail!("limits.ws_max_message_bytes must be at least 1024");
        }
        Ok(())
    }

    /// Sets the keys that are set on `api`.
    pub fn apply(&self, api: &mut api::ApiConfig) {
        let Self {
            max_connections,
            max_connections_per_ip,
            header_read_timeout_ms,
            body_read_timeout_ms,
            idle_timeout_ms,
            max_streams_per_ip,
            max_sse_per_invoice,
            ws_connects_per_5min,
            ws_max_message_bytes,
            ws_api_max_in_flight,
        } = self.clone();
        api.max_connections = max_connections.unwrap_or(api.max_connections);
        api.max_connections_per_ip = max_connections_per_ip.unwrap_or(api.max_connections_per_ip);
        api.header_read_timeout_ms = header_read_timeout_ms.unwrap_or(api.header_read_timeout_ms);
        api.body_read_timeout_ms = body_read_timeout_ms.unwrap_or(api.body_read_timeout_ms);
        api.idle_timeout_ms = idle_timeout_ms.unwrap_or(api.idle_timeout_ms);
        api.max_streams_per_ip = max_streams_per_ip.unwrap_or(api.max_streams_per_ip);
        api.max_sse_per_invoice = max_sse_per_invoice.unwrap_or(api.max_sse_per_invoice);
        api.ws_connects_per_5min = ws_connects_per_5min.unwrap_or(api.ws_connects_per_5min);
        api.ws_max_message_bytes = ws_max_message_bytes.unwrap_or(api.ws_max_message_bytes);
        api.ws_api_max_in_flight = ws_api_max_in_flight.unwrap_or(api.ws_api_max_in_flight);
    }
}

/// Merchant payments (`[merchant]`; flags `--allow-private-webhooks` ..., environment
/// `MEDIATOR_ALLOW_PRIVATE_WEBHOOKS=1` ...). Unset keys keep [`merchant::MerchantConfig`]'s
/// defaults; api/README.md ("Webhooks", "Merchant payments") describes each.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct MerchantKnobs {
    /// Let webhooks go to loopback, private and other internal addresses (a shop's own
    /// network, tests) [default: false].
    #[arg(
        long,
        env = "MEDIATOR_ALLOW_PRIVATE_WEBHOOKS",
        value_parser = clap::builder::BoolishValueParser::new(),
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub allow_private_webhooks: Option<bool>,
    /// Webhook redeliver calls per merchant per minute [default: 10].
    #[arg(long, env = "MEDIATOR_REDELIVERIES_PER_MIN")]
    pub redeliveries_per_min: Option<u64>,
    /// Oldest last trade that prices a quote-currency invoice, ms [default: 300000].
    #[arg(long, env = "MEDIATOR_PRICE_MAX_TRADE_AGE_MS")]
    pub price_max_trade_age_ms: Option<u64>,
    /// Widest book spread that still gives a price, basis points [default: 200].
    #[arg(long, env = "MEDIATOR_PRICE_MAX_SPREAD_BPS")]
    pub price_max_spread_bps: Option<u64>,
    /// Least depth a side within the spread band, satoshis [default: 1000000].
    #[arg(long, env = "MEDIATOR_PRICE_MIN_DEPTH_SAT")]
    pub price_min_depth_sat: Option<u64>,
    /// How far below the reference a conversion may sell, basis points [default: 100].
    #[arg(long, env = "MEDIATOR_CONVERSION_SLIPPAGE_BPS")]
    pub conversion_slippage_bps: Option<u64>,
    /// A file holding the operator's external BTC price (one decimal number) [default: none].
    #[arg(long, env = "MEDIATOR_PRICE_INDEX_FILE")]
    pub price_index_file: Option<PathBuf>,
    /// An http(s) URL answering the operator's external BTC price [default: none].
    #[arg(long, env = "MEDIATOR_PRICE_INDEX_URL")]
    pub price_index_url: Option<String>,
    /// Largest distance from the external index, basis points [default: 200].
    #[arg(long, env = "MEDIATOR_PRICE_INDEX_MAX_DEVIATION_BPS")]
    pub price_index_max_deviation_bps: Option<u64>,
    /// Oldest index file that is used, ms [default: 300000].
    #[arg(long, env = "MEDIATOR_PRICE_INDEX_MAX_AGE_MS")]
    pub price_index_max_age_ms: Option<u64>,
    /// How long one read of the index serves every caller, ms; at most
    /// `price_index_max_age_ms`; 0 reads it on every use [default: 2000].
    #[arg(long, env = "MEDIATOR_PRICE_INDEX_CACHE_MS")]
    pub price_index_cache_ms: Option<u64>,
    /// How long after it is added an address on a store's dashboard withdrawal allow-list
    /// becomes usable (and the list stays on after its last removal), ms; at most 30 days
    /// [default: 86400000, 24 h].
    #[arg(long, env = "MEDIATOR_WITHDRAW_ADDRESS_DELAY_MS")]
    pub withdraw_address_delay_ms: Option<u64>,
    /// BOLT11 parts a store's invoices get an hour; past it, invoices are on chain only
    /// (each part is an invoice the node keeps for good) [default: 600].
    #[arg(long, env = "MEDIATOR_LIGHTNING_PARTS_PER_HOUR")]
    pub lightning_parts_per_hour: Option<u64>,
    /// Invoices a store's point-of-sale page makes an hour; past it `429` (each is a wallet
    /// address watched for good) [default: 600].
    #[arg(long, env = "MEDIATOR_POS_INVOICES_PER_HOUR")]
    pub pos_invoices_per_hour: Option<u64>,
}

impl MerchantKnobs {
    /// `self`'s keys, then `under`'s.
    fn or(self, under: Self) -> Self {
        Self {
            allow_private_webhooks: self.allow_private_webhooks.or(under.allow_private_webhooks),
            redeliveries_per_min: self.redeliveries_per_min.or(under.redeliveries_per_min),
            price_max_trade_age_ms: self.price_max_trade_age_ms.or(under.price_max_trade_age_ms),
            price_max_spread_bps: self.price_max_spread_bps.or(under.price_max_spread_bps),
            price_min_depth_sat: self.price_min_depth_sat.or(under.price_min_depth_sat),
            conversion_slippage_bps: self
                .conversion_slippage_bps
                .or(under.conversion_slippage_bps),
            price_index_file: self.price_index_file.or(under.price_index_file),
            price_index_url: self.price_index_url.or(under.price_index_url),
            price_index_max_deviation_bps: self
                .price_index_max_deviation_bps
                .or(under.price_index_max_deviation_bps),
            price_index_max_age_ms: self.price_index_max_age_ms.or(under.price_index_max_age_ms),
            price_index_cache_ms: self.price_index_cache_ms.or(under.price_index_cache_ms),
            withdraw_address_delay_ms: self
                .withdraw_address_delay_ms
                .or(under.withdraw_address_delay_ms),
            lightning_parts_per_hour: self
                .lightning_parts_per_hour
                .or(under.lightning_parts_per_hour),
            pos_invoices_per_hour: self.pos_invoices_per_hour.or(under.pos_invoices_per_hour),
        }
    }

    /// Refuses values that would make every price or every redelivery impossible, or mean
    /// nothing.
    fn check(&self) -> anyhow::Result<()> {
        if self.redeliveries_per_min == Some(0) {
            bail!("merchant.redeliveries_per_min must be at least 1");
        }
        if self.lightning_parts_per_hour == Some(0) {
            bail!("merchant.lightning_parts_per_hour must be at least 1");
        }
        if self.pos_invoices_per_hour == Some(0) {
            bail!("merchant.pos_invoices_per_hour must be at least 1");
        }
        if self.price_max_trade_age_ms == Some(0) {
            bail!("merchant.price_max_trade_age_ms must be at least 1");
        }
        for (name, v) in [
            ("price_max_spread_bps", self.price_max_spread_bps),
            ("conversion_slippage_bps", self.conversion_slippage_bps),
            (
                "price_index_max_deviation_bps",
                self.price_index_max_deviation_bps,
            ),
        ] {
            if v.is_some_and(|v| v >= 10_000) {
                bail!("merchant.{name} must be below 10000 (100 %)");
            }
        }
        // A cache longer than the index's max age would be cut to it: refused, not silently
        // shortened.
        let max_age_ms = self
            .price_index_max_age_ms
            .unwrap_or(merchant::price::PriceLimits::default().index_max_age_ms);
        if let Some(c) = self.price_index_cache_ms.filter(|&c| c > max_age_ms) {
            bail!(
                "merchant.price_index_cache_ms ({c}) must not exceed price_index_max_age_ms ({max_age_ms})"
            );
        }
        if let Some(d) = self
            .withdraw_address_delay_ms
            .filter(|&d| d > merchant::allowlist::MAX_DELAY_MS)
        {
            bail!(
                "merchant.withdraw_address_delay_ms ({d}) must not exceed {} (30 days)",
                merchant::allowlist::MAX_DELAY_MS
            );
        }
        if self.price_index_file.is_some() && self.price_index_url.is_some() {
            bail!("merchant: set price_index_file or price_index_url, not both");
        }
        if let Some(u) = &self.price_index_url {
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                bail!("merchant.price_index_url must be an http(s) URL, got {u:?}");
            }
        }
        Ok(())
    }

    /// Sets the keys that are set on `m`.
    pub fn apply(&self, m: &mut merchant::MerchantConfig) {
        if let Some(v) = self.allow_private_webhooks {
            m.webhook_targets.allow_private = v;
        }
        m.redeliveries_per_min = self.redeliveries_per_min.unwrap_or(m.redeliveries_per_min);
        let p = &mut m.price;
        p.max_trade_age_ms = self.price_max_trade_age_ms.unwrap_or(p.max_trade_age_ms);
        p.max_spread_bps = self.price_max_spread_bps.unwrap_or(p.max_spread_bps);
        p.min_depth_sat = self.price_min_depth_sat.unwrap_or(p.min_depth_sat);
        p.slippage_bps = self.conversion_slippage_bps.unwrap_or(p.slippage_bps);
        p.index_max_deviation_bps = self
            .price_index_max_deviation_bps
            .unwrap_or(p.index_max_deviation_bps);
        p.index_max_age_ms = self.price_index_max_age_ms.unwrap_or(p.index_max_age_ms);
        p.index_cache_ms = self.price_index_cache_ms.unwrap_or(p.index_cache_ms);
        m.withdraw_address_delay_ms = self
            .withdraw_address_delay_ms
            .unwrap_or(m.withdraw_address_delay_ms);
        m.lightning_parts_per_hour = self
            .lightning_parts_per_hour
            .unwrap_or(m.lightning_parts_per_hour);
        m.pos_invoices_per_hour = self
            .pos_invoices_per_hour
            .unwrap_or(m.pos_invoices_per_hour);
        if let Some(f) = &self.price_index_file {
            p.index = Some(merchant::price::IndexSource::File(f.clone()));
        }
        if let Some(u) = &self.price_index_url {
            p.index = Some(merchant::price::IndexSource::Url(u.clone()));
        }
    }
}

/// The checkout and point-of-sale pages.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CheckoutKnobs {
    /// CSP `frame-ancestors`: who may embed the pages [default: `'self'`].
    pub frame_ancestors: Option<String>,
}

/// A reverse proxy whose header gives the client address.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustedProxyKnobs {
    /// The header, e.g. `x-forwarded-for` or `x-real-ip`.
    pub header: Option<String>,
    /// The proxy's own addresses.
    pub addresses: Option<Vec<std::net::IpAddr>>,
}

/// The file's shape (every key optional).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Listen address.
    pub listen: Option<SocketAddr>,
    /// The admin listener's address (`/mapi/v1/admin/*`, `/metrics`).
    pub admin_listen: Option<SocketAddr>,
    /// Network.
    pub network: Option<String>,
    /// The server's address as customers reach it (checkout links).
    pub public_url: Option<String>,
    /// External node.
    #[serde(default)]
    pub bitcoind: BitcoindConfig,
    /// Custody.
    #[serde(default)]
    pub custody: CustodyKnobs,
    /// Connection and stream limits.
    #[serde(default)]
    pub limits: LimitKnobs,
    /// Checkout pages.
    #[serde(default)]
    pub checkout: CheckoutKnobs,
    /// Reverse proxy.
    #[serde(default)]
    pub trusted_proxy: TrustedProxyKnobs,
    /// Merchant payments: webhook targets, redeliveries, the reference price.
    #[serde(default)]
    pub merchant: MerchantKnobs,
    /// The Lightning node.
    #[serde(default)]
    pub lightning: LightningKnobs,
}

impl FileConfig {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// The resolved configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    /// Data directory (journal, snapshots, SQLite, keys, the managed node).
    pub data_dir: PathBuf,
    /// HTTP listen address (public: trading, custody, merchant API, checkout pages).
    pub listen: SocketAddr,
    /// The admin listener: `/mapi/v1/admin/*` and `/metrics` [default: 127.0.0.1:8081].
    pub admin_listen: SocketAddr,
    /// CSP `frame-ancestors` of the checkout and point-of-sale pages.
    pub frame_ancestors: String,
    /// Behind a reverse proxy: whose header gives the client address.
    pub trusted_proxy: Option<api::access::TrustedProxy>,
    /// Bitcoin network.
    pub network: wallet::bitcoin::Network,
    /// The server's address as customers reach it, without a trailing slash: invoice checkout
    /// links are absolute under it.
    pub public_url: String,
    /// External node; `None` on regtest means: start one.
    pub bitcoind: Option<BitcoindConfig>,
    /// Custody knobs.
    pub custody: CustodyKnobs,
    /// Connection and stream limits (unset: the API's defaults); apply with
    /// [`LimitKnobs::apply`].
    pub limits: LimitKnobs,
    /// Merchant settings (unset: the API's defaults); apply with [`MerchantKnobs::apply`].
    pub merchant: MerchantKnobs,
    /// `serve --audit-override`: start on a broken audit chain (logged). A flag only.
    pub audit_override: bool,
    /// The Lightning node (`[lightning]`).
    pub lightning: LightningKnobs,
}

/// Parses a network name.
pub fn parse_network(s: &str) -> anyhow::Result<wallet::bitcoin::Network> {
    use wallet::bitcoin::Network;
    Ok(match s {
        "regtest" => Network::Regtest,
        "testnet" | "testnet3" => Network::Testnet,
        "testnet4" => Network::Testnet4,
        "signet" => Network::Signet,
        "bitcoin" | "mainnet" | "main" => Network::Bitcoin,
        other => bail!("unknown network {other:?} (regtest, testnet, testnet4, signet, bitcoin)"),
    })
}

impl ServeConfig {
    /// Merges defaults, `file`, then `over` (environment and flags, already merged by clap).
    pub fn resolve(file: FileConfig, over: FileConfig) -> anyhow::Result<Self> {
        let network = over
            .network
            .or(file.network)
            .unwrap_or_else(|| "regtest".into());
        let network = parse_network(&network)?;
        let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
        let b = BitcoindConfig {
            rpc_url: pick(&over.bitcoind.rpc_url, &file.bitcoind.rpc_url),
            cookie_file: over.bitcoind.cookie_file.or(file.bitcoind.cookie_file),
            rpc_user: pick(&over.bitcoind.rpc_user, &file.bitcoind.rpc_user),
            rpc_password: pick(&over.bitcoind.rpc_password, &file.bitcoind.rpc_password),
        };
        let bitcoind = if b == BitcoindConfig::default() {
            if network != wallet::bitcoin::Network::Regtest {
                bail!("on {network} a node must be configured (bitcoind.rpc_url and a cookie file or user and password)");
            }
            None
        } else {
            if b.rpc_url.is_none() {
                bail!("bitcoind.rpc_url is required when a node is configured");
            }
            if b.cookie_file.is_none() && (b.rpc_user.is_none() || b.rpc_password.is_none()) {
                bail!("bitcoind needs a cookie file, or both rpc_user and rpc_password");
            }
            Some(b)
        };
        let limits = over.limits.or(file.limits);
        limits.check()?;
        let merchant = over.merchant.or(file.merchant);
        merchant.check()?;
        let c = over.custody;
        let f = file.custody;
        let listen = over
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        let admin_listen = over
            .admin_listen
            .or(file.admin_listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8081)));
        if admin_listen == listen {
            bail!("admin_listen must differ from listen (both {listen}): the admin endpoints are not for the public listener");
        }
        if !admin_listen.ip().is_loopback() {
            tracing::warn!(%admin_listen, "the admin listener is not on a loopback address: firewall it");
        }
        let frame_ancestors = over
            .checkout
            .frame_ancestors
            .or(file.checkout.frame_ancestors)
            .unwrap_or_else(|| "'self'".to_owned());
        let frame_ancestors = frame_ancestors.trim().to_owned();
        if frame_ancestors.is_empty()
            || !frame_ancestors
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b';' && b != b',')
        {
            bail!("checkout.frame_ancestors must be CSP sources separated by spaces (e.g. \"'self' https://shop.example.com\"), got {frame_ancestors:?}");
        }
        let header = over.trusted_proxy.header.or(file.trusted_proxy.header);
        let addresses = over
            .trusted_proxy
            .addresses
            .or(file.trusted_proxy.addresses);
        let trusted_proxy = match (header, addresses) {
            (None, None) => None,
            (Some(h), Some(a)) if !a.is_empty() => {
                let h = h.trim().to_ascii_lowercase();
                if h.is_empty() || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                    bail!("trusted_proxy.header is not a header name: {h:?}");
                }
                Some(api::access::TrustedProxy {
                    header: h,
                    addresses: a,
                })
            }
            _ => bail!("trusted_proxy needs both header and addresses (the proxy's own addresses)"),
        };
        let public_url = match over.public_url.or(file.public_url) {
            Some(u) => {
                let u = u.trim_end_matches('/').to_owned();
                let rest = u
                    .strip_prefix("https://")
                    .or_else(|| u.strip_prefix("http://"));
                if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
                    bail!("public_url must be an http:// or https:// URL, got {u:?}");
                }
                u
            }
            None => format!("http://{listen}"),
        };
        Ok(Self {
            data_dir: over
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| "./mediator-data".into()),
            listen,
            admin_listen,
            frame_ancestors,
            trusted_proxy,
            network,
            public_url,
            bitcoind,
            limits,
            merchant,
            audit_override: false,
            lightning: over.lightning.or(file.lightning),
            custody: CustodyKnobs {
                deposit_confirmations: c.deposit_confirmations.or(f.deposit_confirmations),
                poll_interval_ms: c.poll_interval_ms.or(f.poll_interval_ms),
                withdrawal_fee_sat: c.withdrawal_fee_sat.or(f.withdrawal_fee_sat),
                min_withdrawal_sat: c.min_withdrawal_sat.or(f.min_withdrawal_sat),
                daily_limit_sat: c.daily_limit_sat.or(f.daily_limit_sat),
                approval_threshold_sat: c.approval_threshold_sat.or(f.approval_threshold_sat),
                hot_wallet_daily_limit_sat: c
                    .hot_wallet_daily_limit_sat
                    .or(f.hot_wallet_daily_limit_sat),
                deny_list: c.deny_list.or(f.deny_list),
                batch_interval_secs: c.batch_interval_secs.or(f.batch_interval_secs),
                batch_max_requests: c.batch_max_requests.or(f.batch_max_requests),
                fallback_fee_rate_sat_vb: c.fallback_fee_rate_sat_vb.or(f.fallback_fee_rate_sat_vb),
                shortfall_tolerance_sat: c.shortfall_tolerance_sat.or(f.shortfall_tolerance_sat),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_env_override_the_file_which_overrides_defaults() {
        let file: FileConfig = toml::from_str(
            "listen = \"127.0.0.1:9000\"\ndata_dir = \"/tmp/x\"\n[custody]\npoll_interval_ms = 50\nbatch_max_requests = 7\n",
        )
        .unwrap();
        let over = FileConfig {
            listen: Some("127.0.0.1:9100".parse().unwrap()),
            custody: CustodyKnobs {
                poll_interval_ms: Some(20),
                ..CustodyKnobs::default()
            },
            ..FileConfig::default()
        };
        let c = ServeConfig::resolve(file, over).unwrap();
        assert_eq!(c.listen.port(), 9100);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.custody.poll_interval_ms, Some(20));
        assert_eq!(c.custody.batch_max_requests, Some(7));
        assert_eq!(c.network, wallet::bitcoin::Network::Regtest);
        assert!(
            c.bitcoind.is_none(),
            "regtest without a node configured starts its own"
        );
        let d = ServeConfig::resolve(FileConfig::default(), FileConfig::default()).unwrap();
        assert_eq!(d.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(d.public_url, "http://127.0.0.1:8080");
        let shop = FileConfig {
            public_url: Some("https://pay.example.com/".into()),
            ..FileConfig::default()
        };
        let s = ServeConfig::resolve(shop, FileConfig::default()).unwrap();
        assert_eq!(s.public_url, "https://pay.example.com");
        assert_eq!(d.data_dir, PathBuf::from("./mediator-data"));
        // The admin listener, the pages' embedding and the proxy.
        assert_eq!(d.admin_listen, SocketAddr::from(([127, 0, 0, 1], 8081)));
        assert_eq!(d.frame_ancestors, "'self'");
        assert_eq!(d.trusted_proxy, None);
        let file: FileConfig = toml::from_str(
            "admin_listen = \"127.0.0.1:7001\"\n[checkout]\nframe_ancestors = \"'self' https://shop.example\"\n[trusted_proxy]\nheader = \"X-Forwarded-For\"\naddresses = [\"127.0.0.1\"]\n",
        )
        .unwrap();
        let over = FileConfig {
            admin_listen: Some("127.0.0.1:7002".parse().unwrap()),
            ..FileConfig::default()
        };
        let c = ServeConfig::resolve(file, over).unwrap();
        assert_eq!(c.admin_listen.port(), 7002);
        assert_eq!(c.frame_ancestors, "'self' https://shop.example");
        let p = c.trusted_proxy.unwrap();
        assert_eq!(p.header, "x-forwarded-for");
        assert_eq!(
            p.addresses,
            vec!["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
    }

    #[test]
    fn limits_come_from_defaults_then_file_then_flags() {
        let file: FileConfig = toml::from_str(
            "[limits]\nmax_connections_per_ip = 32\nheader_read_timeout_ms = 5000\n",
        )
        .unwrap();
        let over = FileConfig {
            limits: LimitKnobs {
                header_read_timeout_ms: Some(7000),
                ..LimitKnobs::default()
            },
            ..FileConfig::default()
        };
        let c = ServeConfig::resolve(file, over).unwrap();
        let mut api = api::ApiConfig::default();
        let defaults = api.clone();
        c.limits.apply(&mut api);
        assert_eq!(api.max_connections_per_ip, 32, "from the file");
        assert_eq!(api.header_read_timeout_ms, 7000, "flags over the file");
        assert_eq!(
            api.idle_timeout_ms, defaults.idle_timeout_ms,
            "default kept"
        );
        assert_eq!(api.max_streams_per_ip, defaults.max_streams_per_ip);
    }

    #[test]
    fn merchant_keys_come_from_defaults_then_file_then_flags() {
        let d = ServeConfig::resolve(FileConfig::default(), FileConfig::default()).unwrap();
        let mut m = merchant::MerchantConfig::default();
        d.merchant.apply(&mut m);
        assert!(
            !m.webhook_targets.allow_private,
            "private webhook targets are off by default"
        );
        assert_eq!(m.price, merchant::price::PriceLimits::default());
        let file: FileConfig = toml::from_str(
            "[merchant]\nallow_private_webhooks = true\nprice_max_spread_bps = 50\nprice_index_file = \"/x/btcusd.txt\"\nredeliveries_per_min = 3\nprice_index_cache_ms = 500\nprice_index_max_age_ms = 60000\nwithdraw_address_delay_ms = 3600000\nlightning_parts_per_hour = 50\n",
        )
        .unwrap();
        let over = FileConfig {
            merchant: MerchantKnobs {
                price_max_spread_bps: Some(75),
                conversion_slippage_bps: Some(30),
                price_index_cache_ms: Some(250),
                ..MerchantKnobs::default()
            },
            ..FileConfig::default()
        };
        let c = ServeConfig::resolve(file, over).unwrap();
        let mut m = merchant::MerchantConfig::default();
        c.merchant.apply(&mut m);
        assert!(m.webhook_targets.allow_private, "from the file");
        assert_eq!(m.redeliveries_per_min, 3);
        assert_eq!(m.price.max_spread_bps, 75, "flags over the file");
        assert_eq!(m.price.slippage_bps, 30);
        assert_eq!(m.price.index_cache_ms, 250, "flags over the file");
        assert_eq!(m.price.index_max_age_ms, 60_000, "from the file");
        assert_eq!(m.withdraw_address_delay_ms, 3_600_000, "from the file");
        assert_eq!(m.lightning_parts_per_hour, 50, "from the file");
        assert_eq!(
            m.price.index,
            Some(merchant::price::IndexSource::File("/x/btcusd.txt".into()))
        );
        assert_eq!(
            m.price.max_trade_age_ms,
            merchant::price::PriceLimits::default().max_trade_age_ms,
            "default kept"
        );
    }

    #[test]
    fn the_environment_switch_allows_private_webhooks() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            merchant: MerchantKnobs,
        }
        for (args, want) in [
            (vec!["x"], None),
            (vec!["x", "--allow-private-webhooks"], Some(true)),
            (vec!["x", "--allow-private-webhooks=1"], Some(true)),
            (vec!["x", "--allow-private-webhooks=false"], Some(false)),
        ] {
            let c = Cli::try_parse_from(&args).unwrap();
            assert_eq!(c.merchant.allow_private_webhooks, want, "{args:?}");
        }
        // MEDIATOR_ALLOW_PRIVATE_WEBHOOKS=1 reaches the same argument (clap reads the
        // environment for it); checked through the value parser clap uses for it.
        let cmd = <Cli as clap::CommandFactory>::command();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == "allow_private_webhooks")
            .unwrap();
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some("MEDIATOR_ALLOW_PRIVATE_WEBHOOKS")
        );
    }

    #[test]
    fn bad_configurations_are_clear_errors() {
        let mainnet = FileConfig {
            network: Some("bitcoin".into()),
            ..FileConfig::default()
        };
        let e = ServeConfig::resolve(mainnet, FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("node must be configured"), "{e}");
        let no_auth = FileConfig {
            bitcoind: BitcoindConfig {
                rpc_url: Some("http://127.0.0.1:1".into()),
                ..BitcoindConfig::default()
            },
            ..FileConfig::default()
        };
        let e = ServeConfig::resolve(no_auth, FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("cookie"), "{e}");
        assert!(parse_network("moon").is_err());
        for bad in ["pay.example.com", "ftp://x", "https://", "http://a b"] {
            let f = FileConfig {
                public_url: Some(bad.into()),
                ..FileConfig::default()
            };
            let e = ServeConfig::resolve(f, FileConfig::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("public_url"), "{bad}: {e}");
        }
        for (bad, what) in [
            (
                "[limits]\nmax_connections_per_ip = 0\n",
                "max_connections_per_ip",
            ),
            ("[limits]\nidle_timeout_ms = 1000\n", "idle_timeout_ms"),
            // A stopped body must get its 408 before the idle check closes it unanswered.
            (
                "[limits]\nbody_read_timeout_ms = 60000\n",
                "body_read_timeout_ms",
            ),
            (
                "[limits]\nbody_read_timeout_ms = 40000\nidle_timeout_ms = 35000\n",
                "body_read_timeout_ms",
            ),
            (
                "[limits]\nws_max_message_bytes = 10\n",
                "ws_max_message_bytes",
            ),
            (
                "listen = \"127.0.0.1:9000\"\nadmin_listen = \"127.0.0.1:9000\"\n",
                "admin_listen",
            ),
            (
                "[checkout]\nframe_ancestors = \"'self'; script-src *\"\n",
                "frame_ancestors",
            ),
            ("[checkout]\nframe_ancestors = \"\"\n", "frame_ancestors"),
            ("[trusted_proxy]\nheader = \"x-real-ip\"\n", "trusted_proxy"),
            (
                "[merchant]\nredeliveries_per_min = 0\n",
                "redeliveries_per_min",
            ),
            (
                "[merchant]\nlightning_parts_per_hour = 0\n",
                "lightning_parts_per_hour",
            ),
            (
                "[merchant]\nconversion_slippage_bps = 10000\n",
                "conversion_slippage_bps",
            ),
            (
                "[merchant]\nprice_index_file = \"a\"\nprice_index_url = \"https://x\"\n",
                "not both",
            ),
            (
                "[merchant]\nprice_index_max_age_ms = 1000\nprice_index_cache_ms = 1001\n",
                "price_index_cache_ms",
            ),
            (
                "[merchant]\nprice_index_cache_ms = 300001\n",
                "price_index_cache_ms",
            ),
            (
                "[merchant]\nprice_index_url = \"file:///etc/passwd\"\n",
                "price_index_url",
            ),
            (
                "[merchant]\nwithdraw_address_delay_ms = 2592000001\n",
                "withdraw_address_delay_ms",
            ),
            (
                "[trusted_proxy]\nheader = \"x real ip\"\naddresses = [\"10.0.0.1\"]\n",
                "header",
            ),
        ] {
            let f: FileConfig = toml::from_str(bad).unwrap();
            let e = ServeConfig::resolve(f, FileConfig::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(what), "{bad}: {e}");
        }
        assert!(toml::from_str::<FileConfig>("[limits]\nmax_conections = 5\n").is_err());
        assert!(toml::from_str::<FileConfig>("listen = 5\n").is_err());
        assert!(toml::from_str::<FileConfig>("unknown_key = 1\n").is_err());
    }
}
