//! `mediator serve`: everything in one process with embedded defaults. Start-up order: the
//! node (started here on regtest when none is configured), the API's storage, journal recovery
//! through the history's floor (the read models and the history rows a crash kept from SQLite are
//! rebuilt from the replay), the engine thread, the custody service, the Lightning node attached
//! to it, custody's loop, then the HTTP
//! listeners: the public one (`listen`) and the admin one (`admin_listen`: `/mapi/v1/admin/*`,
//! `/metrics`).
//! The Lightning node (`[lightning]`, on by default on regtest) starts after the custody service
//! and before custody's loop (whose reconciliation counts the node's funds), and stops before it.
//! SIGINT/SIGTERM: stop accepting, finish in-flight requests, stop custody, flush and stop the
//! engine (journal synced), stop the node we started. If the engine stops on its own (a journal
//! write or `fdatasync` failed) the same shutdown runs and the process exits non-zero.

use crate::bitcoind::{find_bitcoind, ManagedNode};
use crate::config::ServeConfig;
use crate::custody::{EngineLedger, WalletCustody};
use anyhow::{anyhow, Context};
use bdk_bitcoind_rpc::bitcoincore_rpc::{Auth, Client};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wallet::bitcoin::{FeeRate, Network};
use wallet::{CustodyConfig, CustodyService, Passphrase, RpcAuth, RpcConfig, Runner};

/// Runs the server until SIGINT or SIGTERM.
pub fn run(cfg: ServeConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))?;
    }
    // Before anything in the directory is opened, held until this returns.
    let _lock = crate::datadir::lock(&cfg.data_dir, "serve")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // The workers answer requests: a short slice lets a woken one in sooner (`sched_hint`).
        .on_thread_unpark(|| sched_hint::request_short_slice_once("tokio-rt-worker"))
        .build()?;

    // 1. The node.
    let (managed, rpc) = match &cfg.bitcoind {
        Some(b) => {
            let auth = match (&b.cookie_file, &b.rpc_user, &b.rpc_password) {
                (Some(c), _, _) => RpcAuth::CookieFile(c.clone()),
                (None, Some(user), Some(password)) => RpcAuth::UserPass {
                    user: user.clone(),
                    password: password.clone(),
                },
                _ => unreachable!("checked when the configuration was resolved"),
            };
            let url = b
                .rpc_url
                .clone()
                .expect("checked when the configuration was resolved");
            (None, RpcConfig { url, auth })
        }
        None => {
            let exe = find_bitcoind().ok_or_else(|| {
                anyhow!(
                    "no bitcoind found: set BITCOIND_EXE, put bitcoind on PATH, or build one with \
                     scripts/build-bitcoind.sh"
                )
            })?;
            let node = ManagedNode::start(&exe, &cfg.data_dir.join("bitcoind"))?;
            tracing::info!(exe = %exe.display(), rpc = node.rpc_url(), "started regtest bitcoind");
            let rpc = RpcConfig {
                url: node.rpc_url().to_owned(),
                auth: RpcAuth::CookieFile(node.cookie_file().to_owned()),
            };
            (Some(node), rpc)
        }
    };

    // 2. Engine (journal recovery first) and API.
    let mut node_cfg = api::NodeConfig::default();
    node_cfg.api.public_url = Some(cfg.public_url.clone());
    cfg.limits.apply(&mut node_cfg.api);
    node_cfg.api.frame_ancestors = cfg.frame_ancestors.clone();
    node_cfg.api.trusted_proxy = cfg.trusted_proxy.clone();
    node_cfg.api.audit_override = cfg.audit_override;
    // A clean stop writes a snapshot: the next start (an upgraded build included) replays no
    // journal written before it.
    node_cfg.sequencer.snapshot_on_shutdown = true;
    let node = api::start_node(&cfg.data_dir, node_cfg)?;
    // Merchant payments over the API (`<data_dir>/merchant.sqlite`), before anything serves.
    let mut merchant_cfg = merchant::MerchantConfig::default();
    cfg.merchant.apply(&mut merchant_cfg);
    merchant::attach(&node.state, merchant_cfg)?;
    tracing::info!(
        snapshot = ?node.recovery.snapshot_seq,
        replayed = node.recovery.replayed,
        "engine recovered"
    );

    // 3. Custody.
    let custody_cfg = custody_config(&cfg, rpc.clone());
    let ledger = Arc::new(EngineLedger::new(node.state.clone(), rt.handle().clone()));
    let mut service = CustodyService::open(custody_cfg.clone(), ledger.clone())
        .map_err(|e| anyhow!("custody service: {e}"))?;
    service.set_decision_log(Arc::new(crate::custody::AuditDecisions(node.state.clone())));
    // A flag reaches the order path at once (the account's orders cancelled), not at the next
    // refresh of its copy.
    let (flags_to, flags_rt) = (node.state.clone(), rt.handle().clone());
    service.set_flag_hook(Arc::new(move |account| {
        api::capital::note_flagged(&flags_to, account.0, &flags_rt)
    }));
    let service = Arc::new(Mutex::new(service));
    let client = Arc::new(rpc_client(&rpc)?);
    let custody = Arc::new(WalletCustody::new(service.clone(), client, cfg.network));
    node.state
        .set_custody(custody.clone())
        .map_err(|_| anyhow!("custody attached twice"))?;
    // The Lightning node (on regtest by default), on the same bitcoind and ledger.
    let kick = node.state.clone();
    let attach = {
        let custody = custody.clone();
        move |ln: &Arc<crate::lightning::Service>| custody.set_lightning(ln.clone())
    };
    let lightning = crate::lightning::start(&cfg, &rpc, ledger.clone(), attach, move || {
        merchant::of(&kick).kick.notify_one()
    })?;
    if let Some(ln) = &lightning {
        node.state
            .set_lightning(Arc::new(crate::lightning::LnApi(ln.service.clone())))
            .map_err(|_| anyhow!("lightning attached twice"))?;
        println!(
            "mediator: lightning node {} on {}",
            ln.service.node().node_id(),
            ln.service.config().listen
        );
    }
    // Custody's loop only now: its first step already counts the Lightning node's funds
    // (`set_lightning`). Started before, it reconciled without them and reported a false
    // shortfall on every restart with Lightning-held funds.
    let runner = Runner::spawn(service.clone())?;
    let gauges = spawn_gauges(node.state.clone(), custody, custody_cfg.poll_interval);
    // Merchant payments: the monitor (custody deposits → invoices) and the webhook dispatcher.
    let merchant = {
        let _rt = rt.enter();
        merchant::start(&node.state, custody_cfg.poll_interval)
    };

    // 4. HTTP: the public listener, and the admin one (`/mapi/v1/admin/*`, `/metrics`).
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(cfg.listen))
        .with_context(|| format!("binding {}", cfg.listen))?;
    let admin_listener = rt
        .block_on(tokio::net::TcpListener::bind(cfg.admin_listen))
        .with_context(|| format!("binding the admin listener {}", cfg.admin_listen))?;
    let addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    println!("mediator: admin endpoints and /metrics on http://{admin_addr}");
    println!(
        "mediator: serving on http://{addr} (network {})",
        cfg.network
    );
    println!("mediator: admin key in {}", node.admin_key.path.display());
    println!("mediator: data directory {}", cfg.data_dir.display());
    let engine_stopped = engine_stopped(node.sequencer.handle().clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let stop_tx = Arc::new(stop_tx);
    let served = rt.block_on(async {
        let on_signal = stop_tx.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown_signal() => {},
                () = engine_stopped => {
                    tracing::error!("the engine stopped (journal failure): shutting down");
                }
            }
            let _ = on_signal.send(true);
        });
        // The trader gateway's routes and merchant payments' (merchant::SURFACES).
        let (admin_state, admin_stopped) = (node.state.clone(), stopped());
        let admin = tokio::spawn(async move {
            let router = merchant::admin_app(admin_state.clone());
            api::app::serve_router(admin_listener, router, &admin_state, admin_stopped).await
        });
        let router = merchant::public_app(node.state.clone());
        let public = api::app::serve_router(listener, router, &node.state, stopped()).await;
        // Whatever ended the public listener ends the admin one too.
        let _ = stop_tx.send(true);
        let admin = admin.await.map_err(std::io::Error::other).and_then(|r| r);
        public.and(admin)
    });

    // 5. Stop in reverse order.
    println!("mediator: shutting down");
    rt.block_on(merchant.shutdown());
    gauges.stop();
    if let Some(ln) = lightning {
        ln.stop();
    }
    runner.stop();
    drop(service);
    let engine = node.shutdown();
    drop(rt);
    if let Some(n) = managed {
        n.stop()?;
    }
    served?;
    engine.map_err(|e| anyhow!("engine shutdown: {e}"))?;
    println!("mediator: stopped cleanly");
    Ok(())
}

/// A thread that copies custody health into `/metrics` every poll interval: the wallet's sync
/// height, the reconciliation surplus (negative: a shortfall, also logged as an error) and the
/// number of custody alarms not cleared.
struct Gauges {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl Gauges {
    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.handle.join();
    }
}

fn spawn_gauges(state: api::AppState, custody: Arc<WalletCustody>, every: Duration) -> Gauges {
    use api::custody::Custody;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            match custody.reconcile() {
                Ok(r) => {
                    state.set_gauge(
                        "mediator_wallet_sync_height",
                        "Chain height the custody wallet has synced to.",
                        i64::from(r.tip_height),
                    );
                    state.set_gauge(
                        "mediator_reconciliation_gap_sats",
                        "Wallet assets minus ledger liabilities, satoshis (negative: shortfall).",
                        r.surplus_sat,
                    );
                    if r.shortfall {
                        tracing::error!(surplus_sat = r.surplus_sat, "custody shortfall");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reconciliation failed"),
            }
            if let Ok(alarms) = custody.alarms() {
                state.set_gauge(
                    "mediator_custody_alarms",
                    "Custody alarms not cleared (see `mediator alarms`); anything above 0 needs an operator.",
                    i64::try_from(alarms.len()).unwrap_or(i64::MAX),
                );
            }
            let start = std::time::Instant::now();
            while start.elapsed() < every && !flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    Gauges { stop, handle }
}

fn rpc_client(rpc: &RpcConfig) -> anyhow::Result<Client> {
    let auth = match &rpc.auth {
        RpcAuth::CookieFile(p) => Auth::CookieFile(p.clone()),
        RpcAuth::UserPass { user, password } => Auth::UserPass(user.clone(), password.clone()),
        _ => return Err(anyhow!("unsupported rpc authentication")),
    };
    Client::new(&rpc.url, auth).map_err(|e| anyhow!("bitcoind rpc: {e}"))
}

fn custody_config(cfg: &ServeConfig, rpc: RpcConfig) -> CustodyConfig {
    let mut c = CustodyConfig::new(cfg.network, cfg.data_dir.join("wallet"), rpc);
    let k = &cfg.custody;
    c.passphrase = Passphrase::from_env("MEDIATOR_WALLET_PASSPHRASE");
    if let Some(n) = k.deposit_confirmations {
        c.deposit_confirmations = n.max(1);
    }
    c.poll_interval = Duration::from_millis(k.poll_interval_ms.unwrap_or(
        if cfg.network == Network::Regtest {
            1_000
        } else {
            5_000
        },
    ));
    if let Some(v) = k.withdrawal_fee_sat {
        c.withdrawal.flat_fee = matching_engine::Amount(v);
    }
    if let Some(v) = k.min_withdrawal_sat {
        c.withdrawal.min_amount = matching_engine::Amount(v);
    }
    if let Some(v) = k.daily_limit_sat {
        c.withdrawal.daily_limit = matching_engine::Amount(v);
    }
    if let Some(v) = k.approval_threshold_sat {
        c.withdrawal.approval_threshold = matching_engine::Amount(v);
    }
    if let Some(v) = k.hot_wallet_daily_limit_sat {
        c.withdrawal.hot_wallet_daily_limit = matching_engine::Amount(v);
    }
    c.withdrawal.deny_list = k.deny_list.clone();
    c.batch.interval = Duration::from_secs(k.batch_interval_secs.unwrap_or(
        if cfg.network == Network::Regtest {
            5
        } else {
            60
        },
    ));
    if let Some(v) = k.batch_max_requests {
        c.batch.max_requests = v.max(1);
    }
    if let Some(v) = k.fallback_fee_rate_sat_vb {
        c.batch.fallback_fee_rate = FeeRate::from_sat_per_vb_u32(v);
    }
    if let Some(v) = k.shortfall_tolerance_sat {
        c.batch.shortfall_tolerance = matching_engine::Amount(v);
    }
    c
}

/// Resolves when the engine thread stops on its own (a journal write or `fdatasync` failed): the
/// server then shuts down and exits non-zero (no retry of a failed fsync; a restart recovers).
async fn engine_stopped(
    handle: matching_engine::sequencer::SequencerHandle<matching_engine::Engine>,
) {
    while !handle.has_stopped() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
