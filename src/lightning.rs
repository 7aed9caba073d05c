//! The Lightning node in `mediator serve` (the `lightning-custody` crate) and the operator's
//! `mediator ln ...` commands.
//!
//! [`LnApi`] is the API's view of the node ([`api::lightning::Lightning`]); [`start`] opens the
//! node beside the wallet (seed in `<data-dir>/wallet/lightning.seed`, data in
//! `<data-dir>/lightning/`), resolves what a previous run left unfinished, and starts its loop.

use crate::admin::Admin;
use crate::config::ServeConfig;
use crate::custody::EngineLedger;
use anyhow::{anyhow, Context};
use api::custody::CustodyError;
use api::lightning::{
    Lightning, LnBalanceInfo, LnChannelInfo, LnInvoiceInfo, LnPaymentInfo, LnPaymentState,
    LnReceived,
};
use lightning_custody::{
    now_ms, ChainRpc, LightningConfig, LightningService, LnWithdrawal, LnWithdrawalStatus, Runner,
};
use matching_engine::{AccountId, Amount};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use wallet::{RpcAuth, RpcConfig};

/// The service as `serve` runs it.
pub type Service = LightningService<Arc<EngineLedger>>;

/// The default peer-to-peer port (BOLT's 9735), on loopback unless configured.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9735);

/// A running node and its loop.
#[derive(Debug)]
pub struct Running {
    /// The service.
    pub service: Arc<Service>,
    runner: Runner,
}

impl Running {
    /// Stops the loop, then the node.
    pub fn stop(self) {
        self.runner.stop();
        self.service.stop();
    }
}

/// Opens and starts the node when `[lightning]` enables it (on regtest by default); `attach`
/// gets the service once open, before its first step (custody's rules and alarm sink);
/// `on_credit` is called after each loop step that credited a payment.
pub fn start(
    cfg: &ServeConfig,
    rpc: &RpcConfig,
    ledger: Arc<EngineLedger>,
    attach: impl FnOnce(&Arc<Service>),
    on_credit: impl Fn() + Send + 'static,
) -> anyhow::Result<Option<Running>> {
    let k = &cfg.lightning;
    let enabled = k
        .enabled
        .unwrap_or(cfg.network == wallet::bitcoin::Network::Regtest);
    if !enabled {
        return Ok(None);
    }
    let chain = match &rpc.auth {
        RpcAuth::CookieFile(p) => ChainRpc::from_cookie(&rpc.url, p),
        RpcAuth::UserPass { user, password } => ChainRpc::from_url(&rpc.url, user, password),
        _ => Err("unsupported rpc authentication".to_owned()),
    }
    .map_err(|e| anyhow!("lightning chain source: {e}"))?;
    let mut c = LightningConfig::new(
        cfg.network,
        &cfg.data_dir,
        k.listen.unwrap_or(DEFAULT_LISTEN),
        chain,
    );
    if let Some(v) = k.anchor_channels {
        c.anchor_channels = v;
    }
    if let Some(v) = k.withdrawal_fee_sat {
        c.withdrawal_fee = Amount(v);
    }
    if let Some(v) = k.min_withdrawal_sat {
        c.min_withdrawal = Amount(v);
    }
    if let Some(v) = k.max_withdrawal_sat {
        c.max_withdrawal = Amount(v);
    }
    if let Some(v) = k.min_deposit_sat {
        c.min_deposit = Amount(v);
    }
    if let Some(v) = k.max_deposit_sat {
        c.max_deposit = Amount(v);
    }
    if let Some(v) = k.invoice_expiry_secs {
        c.invoice_expiry_secs = v;
    }
    let started = std::time::Instant::now();
    let service = Arc::new(LightningService::open(c, ledger).context("lightning node")?);
    // Custody's rules and alarm sink before the first step: what a previous run left in the
    // node's event queue is handled (and acknowledged, never seen again) by that step, and an
    // alarm it raises must reach the operator, not only the log.
    attach(&service);
    // What a previous run left unfinished, before anyone can send.
    service
        .step(now_ms())
        .map_err(|e| anyhow!("lightning: resolving unfinished payments: {e}"))?;
    // Every open deposit once (the loop's steps look at recently expired ones only).
    service
        .resolve_pending()
        .map_err(|e| anyhow!("lightning: resolving open deposits: {e}"))?;
    tracing::info!(
        node_id = %service.node().node_id(),
        ms = started.elapsed().as_millis() as u64,
        "lightning node up"
    );
    // A step that credited something wakes `on_credit` (the merchant monitor: a Lightning
    // payment settles its invoice at once, not at the next poll).
    // Woken by the node's events; every 500 ms at least (refused credits, withdrawals the
    // ledger did not answer; the open-deposit sweep runs every `OPEN_DEPOSIT_SWEEP_MS`).
    let runner = Runner::spawn_with(service.clone(), Duration::from_millis(500), move |r| {
        if !r.credited.is_empty() {
            on_credit();
        }
    })?;
    Ok(Some(Running { service, runner }))
}

/// The API's view of the node.
#[derive(Debug)]
pub struct LnApi(pub Arc<Service>);

fn refused(code: i32, msg: String) -> CustodyError {
    if code == -1000 {
        tracing::error!(error = %msg, "lightning");
        return CustodyError::internal("lightning node error");
    }
    if code == -1007 {
        return CustodyError::unknown(msg);
    }
    CustodyError::bad_request(code, msg)
}

fn state_of(s: LnWithdrawalStatus) -> LnPaymentState {
    match s {
        LnWithdrawalStatus::Completed => LnPaymentState::Completed,
        LnWithdrawalStatus::Released | LnWithdrawalStatus::Refused => LnPaymentState::Released,
        _ => LnPaymentState::Pending,
    }
}

fn payment_info(w: &LnWithdrawal) -> LnPaymentInfo {
    LnPaymentInfo {
        id: w.id,
        account: w.account,
        payment_hash: hex::encode(w.payment_hash),
        amount_sat: w.amount_sat,
        fee_sat: w.fee_sat,
        state: state_of(w.status),
        reason: w.reason.clone(),
    }
}

fn internal(e: impl std::fmt::Display) -> CustodyError {
    tracing::error!(error = %e, "lightning");
    CustodyError::internal("lightning node error")
}

impl Lightning for LnApi {
    fn deposit_invoice(
        &self,
        account: u32,
        amount_sat: u64,
    ) -> Result<LnInvoiceInfo, CustodyError> {
        let d = self
            .0
            .deposit_invoice(AccountId(account), Amount(amount_sat), now_ms())
            .map_err(|e| refused(e.code(), e.to_string()))?;
        Ok(LnInvoiceInfo {
            invoice: d.bolt11,
            payment_hash: hex::encode(d.payment_hash),
            amount_sat: d.amount_sat,
            expires_ms: d.expires_ms,
        })
    }

    fn merchant_invoice(
        &self,
        account: u32,
        amount_sat: u64,
        description: &str,
        expiry_secs: u32,
    ) -> Result<LnInvoiceInfo, CustodyError> {
        let d = self
            .0
            .merchant_invoice(
                AccountId(account),
                Amount(amount_sat),
                description,
                expiry_secs,
                now_ms(),
            )
            .map_err(|e| refused(e.code(), e.to_string()))?;
        Ok(LnInvoiceInfo {
            invoice: d.bolt11,
            payment_hash: hex::encode(d.payment_hash),
            amount_sat: d.amount_sat,
            expires_ms: d.expires_ms,
        })
    }

    fn received(&self, payment_hash: &str) -> Result<Option<LnReceived>, CustodyError> {
        let mut h = [0u8; 32];
        hex::decode_to_slice(payment_hash, &mut h)
            .map_err(|_| CustodyError::bad_request(-1100, "bad payment hash"))?;
        Ok(self
            .0
            .received(&h)
            .map_err(internal)?
            .map(|(amount_sat, time_ms)| LnReceived {
                amount_sat,
                time_ms,
            }))
    }

    fn credited_after(&self, after: u64, limit: u32) -> Result<Vec<(u64, String)>, CustodyError> {
        Ok(self
            .0
            .credited_after(after, limit)
            .map_err(internal)?
            .into_iter()
            .map(|(seq, h)| (seq, hex::encode(h)))
            .collect())
    }

    fn pay(&self, account: u32, invoice: &str) -> Result<LnPaymentInfo, CustodyError> {
        let w = self
            .0
            .pay(AccountId(account), invoice, now_ms())
            .map_err(|e| refused(e.code(), e.to_string()))?;
        Ok(payment_info(&w))
    }

    fn payment(&self, account: u32, id: u64) -> Result<Option<LnPaymentInfo>, CustodyError> {
        Ok(self
            .0
            .withdrawal(id)
            .map_err(internal)?
            .filter(|w| w.account == account)
            .map(|w| payment_info(&w)))
    }

    fn payment_of_invoice(
        &self,
        account: u32,
        invoice: &str,
    ) -> Result<Option<LnPaymentInfo>, CustodyError> {
        Ok(self
            .0
            .withdrawal_of_invoice(AccountId(account), invoice)
            .map_err(internal)?
            .map(|w| payment_info(&w)))
    }

    fn settled(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.0.settled())
    }

    fn channels(&self) -> Result<Vec<LnChannelInfo>, CustodyError> {
        Ok(self
            .0
            .channels()
            .into_iter()
            .map(|c| LnChannelInfo {
                channel_id: c.user_channel_id.to_string(),
                counterparty: c.counterparty,
                capacity_sat: c.capacity_sat,
                outbound_msat: c.outbound_msat,
                inbound_msat: c.inbound_msat,
                ready: c.ready,
                usable: c.usable,
                outbound: c.outbound,
            })
            .collect())
    }

    fn balance(&self) -> Result<LnBalanceInfo, CustodyError> {
        let b = self.0.balances();
        Ok(LnBalanceInfo {
            node_id: self.0.node().node_id().to_string(),
            onchain_sat: b.onchain_sat,
            channels_sat: b.channels_sat,
            pending_close_sat: b.pending_close_sat,
            anchor_reserve_sat: b.anchor_reserve_sat,
        })
    }

    fn open_channel(&self, peer: &str, amount_sat: u64) -> Result<String, CustodyError> {
        self.0
            .open_channel(peer, amount_sat)
            .map(|id| id.to_string())
            .map_err(|e| CustodyError::bad_request(-4612, e.to_string()))
    }

    fn close_channel(&self, channel_id: &str) -> Result<(), CustodyError> {
        let id: u128 = channel_id
            .parse()
            .map_err(|_| CustodyError::bad_request(-1100, "bad channelId"))?;
        self.0
            .close_channel(id)
            .map_err(|e| CustodyError::bad_request(-4612, e.to_string()))
    }

    fn onchain_address(&self) -> Result<String, CustodyError> {
        self.0.onchain_address().map_err(internal)
    }
}

// ---- `mediator ln ...` ----------------------------------------------------------------------

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

/// `mediator ln open-channel NODEID@HOST:PORT AMOUNT_SAT`.
pub fn open_channel(a: &Admin, peer: &str, amount_sat: u64) -> anyhow::Result<()> {
    let amount = amount_sat.to_string();
    let v = a.call(
        "POST",
        "/mapi/v1/admin/lightning/channel/open",
        &[("peer", peer), ("amountSat", amount.as_str())],
    )?;
    a.print(&v, |v| {
        format!(
            "channel {} opening; ready after 6 confirmations",
            s(&v["channelId"])
        )
    });
    Ok(())
}

/// `mediator ln channels`.
pub fn channels(a: &Admin) -> anyhow::Result<()> {
    let v = a.call("GET", "/mapi/v1/admin/lightning/channels", &[])?;
    a.print(&v, |v| {
        let rows = v.as_array().cloned().unwrap_or_default();
        let mut out = format!("{} channels", rows.len());
        for c in rows {
            out.push_str(&format!(
                "\n{} peer {} capacity {} sat, can send {} msat, can receive {} msat{}{}",
                s(&c["channel_id"]),
                s(&c["counterparty"]),
                s(&c["capacity_sat"]),
                s(&c["outbound_msat"]),
                s(&c["inbound_msat"]),
                if c["usable"].as_bool() == Some(true) {
                    ", usable"
                } else if c["ready"].as_bool() == Some(true) {
                    ", ready (peer offline)"
                } else {
                    ", pending"
                },
                if c["outbound"].as_bool() == Some(true) {
                    ", opened by us"
                } else {
                    ""
                }
            ));
        }
        out
    });
    Ok(())
}

/// `mediator ln balance`.
pub fn balance(a: &Admin) -> anyhow::Result<()> {
    let v = a.call("GET", "/mapi/v1/admin/lightning/balance", &[])?;
    a.print(&v, |v| {
        format!(
            "node {}: on chain {} sat (anchor reserve {} sat); in channels {} sat; closing {} sat",
            s(&v["node_id"]),
            s(&v["onchain_sat"]),
            s(&v["anchor_reserve_sat"]),
            s(&v["channels_sat"]),
            s(&v["pending_close_sat"])
        )
    });
    Ok(())
}

/// `mediator ln close CHANNEL_ID`.
pub fn close(a: &Admin, channel_id: &str) -> anyhow::Result<()> {
    let v = a.call(
        "POST",
        "/mapi/v1/admin/lightning/channel/close",
        &[("channelId", channel_id)],
    )?;
    a.print(&v, |_| format!("channel {channel_id} closing"));
    Ok(())
}

/// `mediator ln address`.
pub fn address(a: &Admin) -> anyhow::Result<()> {
    let v = a.call("POST", "/mapi/v1/admin/lightning/address", &[])?;
    a.print(&v, |v| s(&v["address"]));
    Ok(())
}
