//! `mediator serve` as a user runs it: the real binary with its own regtest bitcoind, driven
//! through the admin commands and the signed HTTP API.
//!
//! * end to end: fund an account by mining to its deposit address, credit USD, trade between
//!   two accounts, withdraw, and check balances against the chain;
//! * crash: place orders concurrently, SIGKILL the server mid-load, restart it: every
//!   acknowledged order is there and balances are conserved.
//! * crash under crossing load: six accounts trade with each other, SIGKILL at several points,
//!   restart each time: every acknowledged order is found by id and client order id, every fill
//!   is in `myTrades`, balances reconcile with credits and trades to the unit, the gap is 0.
//!
//! Needs bitcoind (`BITCOIND_EXE`, `PATH`, or `scripts/test.sh` finds it).

mod common;

use api::client::Client;
use bdk_bitcoind_rpc::bitcoincore_rpc::{json::ScanTxOutRequest, RpcApi};
use common::{free_port, http_get, Server};
use serde_json::Value;
use std::collections::BTreeMap;
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
    // The operator revokes a key (one reported stolen, say): its requests stop at once.
    let k3 = s.admin(&[
        "apikey",
        "create",
        "--account",
        &a1,
        "--permissions",
        "read",
    ]);
    let c3 = client(&s, &k3);
    assert_eq!(balance(&c3, "BTC"), (0, 0));
    s.admin(&[
        "apikey",
        "revoke",
        "--api-key",
        k3["apiKey"].as_str().unwrap(),
    ]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match rt.block_on(c3.signed("GET", "/api/v3/account", &[])) {
        Err(api::client::ClientError::Api { status, .. }) => assert_eq!(status, 401),
        other => panic!("a revoked key was answered: {other:?}"),
    }

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

/// Units (1e-8) of a decimal string with at most 8 decimals.
fn units(s: &str) -> u64 {
    let (i, f) = s.split_once('.').unwrap_or((s, ""));
    let f = format!("{f:0<8}");
    i.parse::<u64>().unwrap() * 100_000_000 + f[..8].parse::<u64>().unwrap()
}

/// A small deterministic generator (SplitMix64) for the order flow of one account.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// An order acknowledged with HTTP 200: account index, order id, client order id, and the
/// trades it took (trade id, price, qty, commission as strings, as answered).
#[derive(Clone, Debug)]
struct Acked {
    account: usize,
    order_id: u64,
    client_id: String,
    fills: Vec<(u64, String, String, String)>,
}

/// Every page of a signed list endpoint that takes `fromId`-style paging in `cursor`.
fn all_pages(c: &Client, path: &str, cursor: &str, id: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut from = 0u64;
    loop {
        let from_s = from.to_string();
        let page = call(
            c,
            "GET",
            path,
            &[("symbol", "BTCUSD"), (cursor, &from_s), ("limit", "1000")],
        );
        let page = page.as_array().unwrap().clone();
        let n = page.len();
        if let Some(last) = page.last() {
            from = last[id].as_u64().unwrap() + 1;
        }
        out.extend(page);
        if n < 1000 {
            return out;
        }
    }
}

/// After a restart: every acknowledged order is found by id and by client order id (the orders
/// of `check_each` one by one; all of them in `allOrders`), every fill is in the taker's
/// `myTrades`, each account's balances are what its credits and its `myTrades` make them to the
/// unit, the fee account holds exactly the commissions, and the history gap is 0.
fn check_history(
    s: &Server,
    clients: &[Client],
    admin: &Client,
    acked: &[Acked],
    check_each: &[Acked],
    funded: &[(u64, u64)],
) {
    let metrics = http_get(s.admin_addr, "/metrics");
    assert!(
        metrics.contains("\nmediator_history_gap_commands 0\n"),
        "the history misses commands: {}",
        metrics
            .lines()
            .find(|l| l.starts_with("mediator_history_gap_commands"))
            .unwrap_or("no gauge")
    );
    for a in check_each {
        let c = &clients[a.account];
        let id = a.order_id.to_string();
        let by_id = block_on(c.signed(
            "GET",
            "/api/v3/order",
            &[("symbol", "BTCUSD"), ("orderId", &id)],
        ))
        .unwrap_or_else(|e| panic!("acknowledged order {} not found: {e}", a.order_id));
        assert_eq!(by_id["clientOrderId"], a.client_id.as_str());
        let by_cid = block_on(c.signed(
            "GET",
            "/api/v3/order",
            &[("symbol", "BTCUSD"), ("origClientOrderId", &a.client_id)],
        ))
        .unwrap_or_else(|e| panic!("acknowledged order {} not found: {e}", a.client_id));
        assert_eq!(by_cid["orderId"], a.order_id);
    }
    let mut fees = 0u64;
    for (i, c) in clients.iter().enumerate() {
        let orders: BTreeMap<u64, Value> = all_pages(c, "/api/v3/allOrders", "orderId", "orderId")
            .into_iter()
            .map(|o| (o["orderId"].as_u64().unwrap(), o))
            .collect();
        for a in acked.iter().filter(|a| a.account == i) {
            let o = orders
                .get(&a.order_id)
                .unwrap_or_else(|| panic!("acknowledged order {} not in allOrders", a.order_id));
            assert_eq!(o["clientOrderId"], a.client_id.as_str());
        }
        let trades = all_pages(c, "/api/v3/myTrades", "fromId", "id");
        let by_id: BTreeMap<u64, &Value> = trades
            .iter()
            .filter(|t| !t["isMaker"].as_bool().unwrap())
            .map(|t| (t["id"].as_u64().unwrap(), t))
            .collect();
        for a in acked.iter().filter(|a| a.account == i) {
            for (tid, price, qty, fee) in &a.fills {
                let t = by_id.get(tid).unwrap_or_else(|| {
                    panic!("trade {tid} of order {} not in myTrades", a.order_id)
                });
                assert_eq!(
                    (&t["price"], &t["qty"], &t["commission"], &t["orderId"]),
                    (
                        &Value::from(price.as_str()),
                        &Value::from(qty.as_str()),
                        &Value::from(fee.as_str()),
                        &Value::from(a.order_id)
                    )
                );
            }
        }
        // Balances from credits and trades alone.
        let (mut btc, mut usd) = (i128::from(funded[i].0), i128::from(funded[i].1));
        for t in &trades {
            assert_eq!(t["commissionAsset"], "USD");
            let (qty, quote) = (
                i128::from(units(t["qty"].as_str().unwrap())),
                i128::from(units(t["quoteQty"].as_str().unwrap())),
            );
            let fee = units(t["commission"].as_str().unwrap());
            fees += fee;
            if t["isBuyer"].as_bool().unwrap() {
                btc += qty;
                usd -= quote;
            } else {
                btc -= qty;
                usd += quote;
            }
            usd -= i128::from(fee);
        }
        let (bf, bl) = balance(c, "BTC");
        let (uf, ul) = balance(c, "USD");
        assert_eq!(
            (i128::from(bf + bl), i128::from(uf + ul)),
            (btc, usd),
            "account {i}: balances (BTC, USD) against credits and myTrades"
        );
    }
    let (ff, fl) = balance(admin, "USD");
    assert_eq!(
        ff + fl,
        fees,
        "the fee account holds exactly the commissions"
    );
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Six accounts place crossing orders concurrently (limit orders around one price, some IOC
/// and market orders); the server is SIGKILLed mid-load, at a different point each round, and
/// restarted on the same directory. After each restart the history is complete
/// ([`check_history`]). Rounds: (seed, acknowledged orders before the kill, extra delay in ms).
#[test]
fn sigkill_under_crossing_load_keeps_the_history_complete() {
    const ROUNDS: [(u64, usize, u64); 4] = [(1, 40, 0), (2, 150, 3), (3, 90, 11), (4, 250, 1)];
    const ACCOUNTS: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), free_port());
    let mut keys = Vec::new();
    let mut funded = Vec::new();
    for i in 0..ACCOUNTS {
        let a = s.admin(&["account", "create"])["account"]
            .as_u64()
            .unwrap()
            .to_string();
        keys.push(s.admin(&[
            "apikey",
            "create",
            "--account",
            &a,
            "--permissions",
            "read,trade",
        ]));
        let sat = s.admin(&["regtest", "fund", &a])["amount_sat"]
            .as_u64()
            .unwrap();
        s.admin(&[
            "credit",
            &a,
            "USD",
            "1000000",
            "--reference",
            &format!("usd-{i}"),
        ]);
        funded.push((sat, 1_000_000 * 100_000_000));
    }
    let mut clients: Vec<Client> = keys.iter().map(|k| client(&s, k)).collect();
    for (i, c) in clients.iter().enumerate() {
        wait_until("the deposit credits", 60, || {
            balance(c, "BTC").0 == funded[i].0
        });
    }

    let mut acked: Vec<Acked> = Vec::new();
    for (round, (seed, kill_after, delay_ms)) in ROUNDS.into_iter().enumerate() {
        let this_round = Arc::new(Mutex::new(Vec::<Acked>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = clients
            .iter()
            .cloned()
            .enumerate()
            .map(|(account, c)| {
                let (this_round, stop) = (this_round.clone(), stop.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    let mut rng = Rng(seed * 1_000 + account as u64);
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let side = if rng.below(2) == 0 { "BUY" } else { "SELL" };
                        let qty = format!("0.00{}", 1 + rng.below(9));
                        let price = (29_995 + rng.below(11)).to_string();
                        let cid = format!("r{round}a{account}n{n}");
                        let mut p = vec![
                            ("symbol", "BTCUSD"),
                            ("side", side),
                            ("quantity", qty.as_str()),
                            ("newClientOrderId", cid.as_str()),
                            ("newOrderRespType", "FULL"),
                        ];
                        match rng.below(8) {
                            0 => p.push(("type", "MARKET")),
                            k => p.extend([
                                ("type", "LIMIT"),
                                ("timeInForce", if k == 1 { "IOC" } else { "GTC" }),
                                ("price", price.as_str()),
                            ]),
                        }
                        match rt.block_on(c.signed("POST", "/api/v3/order", &p)) {
                            Ok(v) => {
                                let fills = v["fills"]
                                    .as_array()
                                    .unwrap()
                                    .iter()
                                    .map(|f| {
                                        (
                                            f["tradeId"].as_u64().unwrap(),
                                            f["price"].as_str().unwrap().to_owned(),
                                            f["qty"].as_str().unwrap().to_owned(),
                                            f["commission"].as_str().unwrap().to_owned(),
                                        )
                                    })
                                    .collect();
                                this_round.lock().unwrap().push(Acked {
                                    account,
                                    order_id: v["orderId"].as_u64().unwrap(),
                                    client_id: cid,
                                    fills,
                                });
                            }
                            // The order limit (-1015) or a market order into an empty book:
                            // nothing was placed.
                            Err(api::client::ClientError::Api { status, .. })
                                if status == 429 || status == 400 =>
                            {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            // The server is gone (or its answer is): not acknowledged.
                            Err(_) => break,
                        }
                    }
                })
            })
            .collect();
        wait_until("orders to kill under", 60, || {
            this_round.lock().unwrap().len() >= kill_after
        });
        std::thread::sleep(Duration::from_millis(delay_ms));
        s.kill();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        let this_round = this_round.lock().unwrap().clone();
        acked.extend(this_round.iter().cloned());

        s = Server::start(dir.path(), free_port());
        clients = keys.iter().map(|k| client(&s, k)).collect();
        let admin = Client::from_key_file(s.addr, &dir.path().join("api/admin-key.json")).unwrap();
        check_history(&s, &clients, &admin, &acked, &this_round, &funded);
    }
    assert!(
        acked.iter().any(|a| !a.fills.is_empty()),
        "the workload traded"
    );
    assert!(s.terminate().success());
}

/// Defect: a withdrawal whose batch was fee-bumped, but whose original transaction is the one
/// that confirmed (a miner had it), showed the bump's txid in its history, with 0
/// confirmations: a transaction that is in no block, for a withdrawal shown completed.
#[test]
fn a_withdrawal_paid_by_the_original_of_a_bumped_batch_shows_that_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), free_port());
    let a = s.admin(&["account", "create"])["account"]
        .as_u64()
        .unwrap()
        .to_string();
    let k = s.admin(&[
        "apikey",
        "create",
        "--account",
        &a,
        "--permissions",
        "read,withdraw",
    ]);
    let c = client(&s, &k);
    let funded = s.admin(&["regtest", "fund", &a])["amount_sat"]
        .as_u64()
        .unwrap();
    wait_until("the deposit credit", 60, || balance(&c, "BTC").0 == funded);
    let dest = wallet::bitcoin::Address::p2wsh(
        &wallet::bitcoin::ScriptBuf::from_bytes(vec![0x51, 0x51, 0x87]),
        wallet::bitcoin::Network::Regtest,
    )
    .to_string();
    let w = call(
        &c,
        "POST",
        "/sapi/v1/capital/withdraw/apply",
        &[
            ("coin", "BTC"),
            ("address", &dest),
            ("amount", "0.5"),
            ("withdrawOrderId", "w-bump"),
        ],
    );
    let id = w["id"].as_str().unwrap().to_owned();
    let rpc = s.rpc();
    wait_until("the batch in the mempool", 60, || {
        !rpc.get_raw_mempool().unwrap().is_empty()
    });
    let original = rpc.get_raw_mempool().unwrap()[0];
    let raw = rpc.get_raw_transaction_hex(&original, None).unwrap();
    s.admin(&["withdrawal", "bump", &id, "--fee-rate", "20"]);
    wait_until("the bump replaces it", 30, || {
        let m = rpc.get_raw_mempool().unwrap();
        !m.is_empty() && !m.contains(&original)
    });
    // A miner had the original: it confirms, and the bump is gone.
    let _: Value = rpc
        .call(
            "generateblock",
            &[dest.clone().into(), serde_json::json!([raw])],
        )
        .unwrap();
    let entry = || {
        call(&c, "GET", "/sapi/v1/capital/withdraw/history", &[])
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id.as_str())
            .cloned()
            .unwrap()
    };
    wait_until("the withdrawal to complete", 60, || entry()["status"] == 6);
    let x = entry();
    assert_eq!(x["txId"], original.to_string(), "{x}");
    assert_eq!(x["confirmNo"], 1, "{x}");
}
