//! `mediator serve` as a user runs it: the real binary with its own regtest bitcoind, driven
//! through the admin commands and the signed HTTP API.
//!
//! * end to end: fund an account by mining to its deposit address, credit USD, trade between
//!   two accounts, withdraw, and check balances against the chain;
//! * crash: place orders concurrently, SIGKILL the server mid-load, restart it: every
//!   acknowledged order is there and balances are conserved.
//!
//! Needs bitcoind (`BITCOIND_EXE`, `PATH`, or `scripts/test.sh` finds it).

mod common;

use api::client::Client;
use bdk_bitcoind_rpc::bitcoincore_rpc::{json::ScanTxOutRequest, RpcApi};
use common::{free_port, http_get, Server};
use serde_json::Value;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn client(s: &Server, key: &Value) -> Client {
    Client::new(
        s.addr,
        key["apiKey"].as_str().unwrap(),
        key["secretKey"].as_str().unwrap(),
    )
}

fn call(c: &Client, method: &str, path: &str, params: &[(&str, &str)]) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(c.signed(method, path, params))
        .unwrap_or_else(|e| panic!("{method} {path} {params:?}: {e}"))
}

/// `(free, locked)` of `asset` in satoshi-like units (8 decimals), from `GET /api/v3/account`.
fn balance(c: &Client, asset: &str) -> (u64, u64) {
    let v = call(c, "GET", "/api/v3/account", &[]);
    let units = |s: &str| -> u64 {
        let (i, f) = s.split_once('.').unwrap_or((s, ""));
        let f = format!("{f:0<8}");
        i.parse::<u64>().unwrap() * 100_000_000 + f[..8].parse::<u64>().unwrap()
    };
    v["balances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["asset"] == asset)
        .map(|b| {
            (
                units(b["free"].as_str().unwrap()),
                units(b["locked"].as_str().unwrap()),
            )
        })
        .unwrap_or((0, 0))
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn fund_trade_withdraw_end_to_end_on_regtest() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        dir.path(),
        free_port(),
        &["--frame-ancestors", "'self' https://shop.example"],
    );
    // The checkout page carries its security headers, with the configured embedders.
    let page = http_get(s.addr, "/i/0a1b2c").to_ascii_lowercase();
    assert!(page.starts_with("http/1.1 200"), "{page}");
    assert!(page.contains("x-content-type-options: nosniff"), "{page}");
    assert!(
        page.contains("frame-ancestors 'self' https://shop.example\r\n"),
        "{page}"
    );
    let a1 = s.admin(&["account", "create"])["account"]
        .as_u64()
        .unwrap()
        .to_string();
    let a2 = s.admin(&["account", "create"])["account"]
        .as_u64()
        .unwrap()
        .to_string();
    let k1 = s.admin(&[
        "apikey",
        "create",
        "--account",
        &a1,
        "--permissions",
        "read,trade,withdraw",
    ]);
    let k2 = s.admin(&[
        "apikey",
        "create",
        "--account",
        &a2,
        "--permissions",
        "read,trade,withdraw",
    ]);
    let (c1, c2) = (client(&s, &k1), client(&s, &k2));

    // Fund account 1 with BTC by mining to its deposit address; credit account 2 with USD.
    let funded = s.admin(&["regtest", "fund", &a1])["amount_sat"]
        .as_u64()
        .unwrap();
    assert!(funded > 0);
    wait_until("the deposit credit", 60, || balance(&c1, "BTC").0 == funded);
    s.admin(&["credit", &a2, "USD", "100000", "--reference", "wire-1"]);
    // The same reference again credits nothing.
    assert_eq!(
        s.admin(&["credit", &a2, "USD", "100000", "--reference", "wire-1"])["duplicate"],
        true
    );
    assert_eq!(balance(&c2, "USD"), (100_000 * 100_000_000, 0));
    // BTC comes only from the chain: an operator credit of BTC is refused, nothing changes.
    let refused = std::process::Command::new(common::BIN)
        .args(["credit", &a2, "BTC", "1", "--reference", "made-up"])
        .args(["--server", &s.admin_addr.to_string()])
        .arg("--data-dir")
        .arg(&s.dir)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("-1130"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(balance(&c2, "BTC"), (0, 0));

    // Trade 1 BTC at 50,000.00: account 1 sells (maker), account 2 buys (taker).
    let o = [
        ("symbol", "BTCUSD"),
        ("type", "LIMIT"),
        ("timeInForce", "GTC"),
    ];
    let sell = [
        &o[..],
        &[("side", "SELL"), ("quantity", "1"), ("price", "50000")],
    ]
    .concat();
    let r = call(&c1, "POST", "/api/v3/order", &sell);
    assert_eq!(r["status"], "NEW");
    let buy = [
        &o[..],
        &[
            ("side", "BUY"),
            ("quantity", "1"),
            ("price", "50000"),
            ("newOrderRespType", "FULL"),
        ],
    ]
    .concat();
    let r = call(&c2, "POST", "/api/v3/order", &buy);
    assert_eq!(r["status"], "FILLED", "{r}");
    let btc = 100_000_000u64;
    let usd = 100_000_000u64;
    // Maker fee 10 bps, taker fee 20 bps, both in USD.
    assert_eq!(balance(&c1, "BTC"), (funded - btc, 0));
    assert_eq!(balance(&c1, "USD"), (50_000 * usd - 50 * usd, 0));
    assert_eq!(balance(&c2, "BTC"), (btc, 0));
    assert_eq!(
        balance(&c2, "USD"),
        (100_000 * usd - 50_000 * usd - 100 * usd, 0)
    );

    // Withdraw 0.5 BTC to an address outside the exchange.
    let dest = wallet::bitcoin::Address::p2wsh(
        &wallet::bitcoin::ScriptBuf::from_bytes(vec![0x51, 0x51, 0x87]),
        wallet::bitcoin::Network::Regtest,
    )
    .to_string();
    let w = call(
        &c2,
        "POST",
        "/sapi/v1/capital/withdraw/apply",
        &[
            ("coin", "BTC"),
            ("address", &dest),
            ("amount", "0.5"),
            ("withdrawOrderId", "w-1"),
        ],
    );
    let id = w["id"].as_str().unwrap().to_owned();
    let fee = 10_000u64;
    assert_eq!(
        balance(&c2, "BTC"),
        (btc - btc / 2 - fee, btc / 2 + fee),
        "amount + fee held"
    );
    // The batcher pays it within a few seconds; mine until it confirms and completes.
    wait_until("the withdrawal to complete", 90, || {
        s.admin(&["regtest", "mine", "1"]);
        let h = call(&c2, "GET", "/sapi/v1/capital/withdraw/history", &[]);
        h.as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == id.as_str() && x["status"] == 6)
    });
    assert_eq!(balance(&c2, "BTC"), (btc - btc / 2 - fee, 0));
    let on_chain = s
        .rpc()
        .scan_tx_out_set_blocking(&[ScanTxOutRequest::Single(format!("addr({dest})"))])
        .unwrap();
    assert_eq!(
        on_chain.total_amount.to_sat(),
        btc / 2,
        "the chain paid exactly the withdrawal"
    );

    let rec = s.admin(&["reconcile"]);
    assert_eq!(rec["shortfall"], false, "{rec}");
    assert!(rec["surplus_sat"].as_i64().unwrap() >= 0);
    // Custody health is on /metrics, on the admin listener only.
    let public = http_get(s.addr, "/metrics");
    assert!(public.starts_with("HTTP/1.1 404"), "{public}");
    wait_until("the custody gauges", 30, || {
        let m = http_get(s.admin_addr, "/metrics");
        m.lines()
            .any(|l| l.starts_with("mediator_wallet_sync_height ") && !l.ends_with(" 0"))
            && m.contains("mediator_reconciliation_gap_sats ")
    });

    let node = s.bitcoind_pid().expect("the managed node wrote its pid");
    let status = s.terminate();
    assert!(status.success(), "clean shutdown on SIGTERM: {status}");
    assert!(
        !Path::new(&format!("/proc/{node}")).exists(),
        "the node it started is stopped"
    );
}

#[test]
fn sigkill_mid_load_loses_no_acknowledged_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), free_port());
    let a = s.admin(&["account", "create"])["account"]
        .as_u64()
        .unwrap()
        .to_string();
    let key = s.admin(&[
        "apikey",
        "create",
        "--account",
        &a,
        "--permissions",
        "read,trade",
    ]);
    s.admin(&["credit", &a, "USD", "10000000", "--reference", "seed"]);
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let c = client(&s, &key);
            let (acked, stop) = (acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let price = format!("{}", 1_000 + (t * 1_000 + i) % 5_000);
                    let r = rt.block_on(c.signed(
                        "POST",
                        "/api/v3/order",
                        &[
                            ("symbol", "BTCUSD"),
                            ("side", "BUY"),
                            ("type", "LIMIT"),
                            ("timeInForce", "GTC"),
                            ("quantity", "0.001"),
                            ("price", &price),
                        ],
                    ));
                    match r {
                        Ok(v) => acked.lock().unwrap().push(v["orderId"].as_u64().unwrap()),
                        Err(_) => break, // the server is gone
                    }
                }
            })
        })
        .collect();
    wait_until("some orders", 30, || acked.lock().unwrap().len() >= 50);
    s.kill();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let s = Server::start(dir.path(), free_port());
    let c = client(&s, &key);
    let open = call(&c, "GET", "/api/v3/openOrders", &[("symbol", "BTCUSD")]);
    let ids: std::collections::BTreeSet<u64> = open
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["orderId"].as_u64().unwrap())
        .collect();
    for id in &acked {
        assert!(
            ids.contains(id),
            "acknowledged order {id} lost in the crash"
        );
    }
    // Nothing half-applied: what is locked is exactly what the open orders hold, and the total is
    // what was credited (no trades happened: all orders are bids).
    let (free, locked) = balance(&c, "USD");
    assert_eq!(free + locked, 10_000_000 * 100_000_000, "USD conserved");
    let held: u64 = open
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let price: u64 = o["price"]
                .as_str()
                .unwrap()
                .split('.')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            // 0.001 BTC at `price` USD, plus the 20 bps fee allowance, in 1e-8 USD.
            let notional = price * 100_000;
            notional + notional * 20 / 10_000
        })
        .sum();
    assert_eq!(locked, held, "locked funds equal what the open orders hold");
    assert!(s.terminate().success());
}
