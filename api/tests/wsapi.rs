//! Binance's WebSocket API (`/ws-api/v3`) over a real socket: every method answers in Binance's
//! shape (`{"id","status","result","rateLimits"}`), and is refused the way its REST route is: a
//! bad signature (`-1022`), a key without the route's permission (`-2015`), bad parameters
//! (`-1100`, `-1102`, `-1104`, `-1117`, `-1130`), an unknown outcome (`-1007`), the IP's
//! weight limit (`-1003`); nothing changes on a refusal.

mod common;
mod wsclient;

use api::access::Access;
use api::keys::Perms;
use api::wsapi::METHODS;
use api::ApiConfig;
use common::Harness;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use wsclient::{signed, start, Key, Ws};

fn code(a: &Value) -> i64 {
    a["error"]["code"].as_i64().unwrap_or(0)
}

fn limit(price: &str, side: &str) -> Value {
    json!({"symbol": "BTCUSD", "side": side, "type": "LIMIT", "timeInForce": "GTC",
           "quantity": "0.01", "price": price})
}

async fn open_count(ws: &mut Ws, key: &Key) -> usize {
    ws.ok("openOrders.status", json!({"symbol": "BTCUSD"}), key)
        .await
        .as_array()
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_answers_in_binance_shape() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (_, maker) = h.trader("1", "100000").await;
    let (_, taker) = h.trader("1", "100000").await;
    let mut ws = Ws::connect(addr).await;

    // Public methods.
    assert_eq!(ws.call("ping", json!({})).await["result"], json!({}));
    let t = ws.call("time", json!({})).await;
    assert!(t["result"]["serverTime"].as_u64().unwrap() > 0, "{t}");
    let rl = &t["rateLimits"][0];
    assert_eq!(
        (rl["rateLimitType"].as_str(), rl["interval"].as_str()),
        (Some("REQUEST_WEIGHT"), Some("MINUTE")),
        "{t}"
    );
    let info = ws.call("exchangeInfo", json!({"symbol": "BTCUSD"})).await;
    assert_eq!(info["result"]["symbols"][0]["symbol"], "BTCUSD", "{info}");

    // Trading: order.place goes through POST /api/v3/order.
    let ask = ws.ok("order.place", limit("30000", "SELL"), &maker).await;
    assert_eq!(ask["status"], "NEW", "{ask}");
    let placed = ws
        .signed(
            "order.place",
            json!({"symbol": "BTCUSD", "side": "SELL", "type": "LIMIT", "timeInForce": "GTC",
                   "quantity": "0.01", "price": "31000", "newClientOrderId": "ws-ask-2"}),
            &maker,
        )
        .await;
    assert_eq!(placed["status"], 200, "{placed}");
    let orders = placed["rateLimits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rateLimitType"] == "ORDERS")
        .cloned()
        .unwrap_or_else(|| panic!("ORDERS in rateLimits: {placed}"));
    assert_eq!(
        (orders["intervalNum"].as_u64(), orders["count"].as_u64()),
        (Some(10), Some(2))
    );
    let test = ws.ok("order.test", limit("1000", "BUY"), &taker).await;
    assert_eq!(test, json!({}));
    let st = ws
        .ok(
            "order.status",
            json!({"symbol": "BTCUSD", "origClientOrderId": "ws-ask-2"}),
            &maker,
        )
        .await;
    assert_eq!(
        (st["status"].as_str(), st["price"].as_str()),
        (Some("NEW"), Some("31000.00000000"))
    );
    assert_eq!(open_count(&mut ws, &maker).await, 2);
    let buy = ws.ok("order.place", limit("30000", "BUY"), &taker).await;
    assert_eq!(buy["status"], "FILLED", "{buy}");
    let replaced = ws
        .ok(
            "order.cancelReplace",
            json!({"symbol": "BTCUSD", "cancelReplaceMode": "STOP_ON_FAILURE",
                   "cancelOrigClientOrderId": "ws-ask-2", "side": "SELL", "type": "LIMIT",
                   "timeInForce": "GTC", "quantity": "0.02", "price": "32000"}),
            &maker,
        )
        .await;
    assert_eq!(replaced["cancelResult"], "SUCCESS", "{replaced}");
    let new_id = replaced["newOrderResponse"]["orderId"].as_u64().unwrap();
    let c = ws
        .ok(
            "order.cancel",
            json!({"symbol": "BTCUSD", "orderId": new_id}),
            &maker,
        )
        .await;
    assert_eq!(c["status"], "CANCELED", "{c}");
    ws.ok("order.place", limit("33000", "SELL"), &maker).await;
    ws.ok("order.place", limit("34000", "SELL"), &maker).await;
    let all = ws
        .ok("openOrders.cancelAll", json!({"symbol": "BTCUSD"}), &maker)
        .await;
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    assert_eq!(open_count(&mut ws, &maker).await, 0);
    let hist = ws
        .ok("allOrders", json!({"symbol": "BTCUSD"}), &maker)
        .await;
    assert_eq!(hist.as_array().unwrap().len(), 5, "{hist}");
    let trades = ws.ok("myTrades", json!({"symbol": "BTCUSD"}), &taker).await;
    assert_eq!(trades[0]["price"], "30000.00000000", "{trades}");
    let acct = ws.ok("account.status", json!({}), &taker).await;
    assert_eq!(acct["canTrade"], true, "{acct}");
    let btc = acct["balances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["asset"] == "BTC")
        .unwrap();
    assert_eq!(btc["free"], "1.01000000", "{acct}");
    let comm = ws
        .ok("account.commission", json!({"symbol": "BTCUSD"}), &taker)
        .await;
    assert_eq!(comm["symbol"], "BTCUSD", "{comm}");
    ws.ok("account.rateLimits.orders", json!({}), &taker).await;

    // Market data after the trade.
    let d = ws
        .call("depth", json!({"symbol": "BTCUSD", "limit": 5}))
        .await;
    assert!(d["result"]["lastUpdateId"].as_u64().is_some(), "{d}");
    let tr = ws.call("trades.recent", json!({"symbol": "BTCUSD"})).await;
    assert_eq!(tr["result"][0]["price"], "30000.00000000", "{tr}");
    let k = ws
        .call("klines", json!({"symbol": "BTCUSD", "interval": "1m"}))
        .await;
    assert_eq!(k["result"][0][4], "30000.00000000", "{k}");
    let p = ws.call("ticker.price", json!({"symbol": "BTCUSD"})).await;
    assert_eq!(p["result"]["price"], "30000.00000000", "{p}");
    let ps = ws
        .call("ticker.price", json!({"symbols": ["BTCUSD"]}))
        .await;
    assert_eq!(ps["result"][0]["symbol"], "BTCUSD", "{ps}");
    let b = ws.call("ticker.book", json!({"symbol": "BTCUSD"})).await;
    assert_eq!(b["result"]["symbol"], "BTCUSD", "{b}");

    // returnRateLimits=false leaves the rate limits out (and is covered by the signature).
    let quiet = ws
        .signed("account.status", json!({"returnRateLimits": false}), &taker)
        .await;
    assert_eq!(quiet["status"], 200, "{quiet}");
    assert!(quiet.get("rateLimits").is_none(), "{quiet}");
    let _ = stop.send(());
}

/// The parameters each signed method needs to get past parameter checks in a request.
fn params_for(method: &str) -> Value {
    match method {
        "order.place" | "order.test" => limit("30000", "BUY"),
        "order.status" | "order.cancel" => json!({"symbol": "BTCUSD", "orderId": 1}),
        "order.cancelReplace" => json!({"symbol": "BTCUSD", "cancelReplaceMode": "STOP_ON_FAILURE",
            "cancelOrderId": 1, "side": "BUY", "type": "LIMIT", "timeInForce": "GTC",
            "quantity": "0.01", "price": "30000"}),
        "order.amend.keepPriority" => json!({"symbol": "BTCUSD", "orderId": 1, "newQty": "0.001"}),
        "openOrders.status" | "openOrders.cancelAll" | "allOrders" | "myTrades" => {
            json!({"symbol": "BTCUSD"})
        }
        "account.commission" => json!({"symbol": "BTCUSD"}),
        _ => json!({}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_signature_is_refused_by_every_signed_method_and_changes_nothing() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (_, key) = h.trader("1", "100000").await;
    let mut ws = Ws::connect(addr).await;
    let mut n = 0;
    for m in METHODS {
        let (_, route) = api::wsapi::method(m.name).unwrap();
        if !matches!(route.access, Access::Signed(_)) {
            continue;
        }
        n += 1;
        // Signed with another secret.
        let p = signed(params_for(m.name), &key, "not-the-secret");
        let a = ws.call(m.name, p).await;
        assert_eq!(
            (a["status"].as_u64(), code(&a)),
            (Some(400), -1022),
            "{}: {a}",
            m.name
        );
        // A parameter changed after signing.
        let mut p = signed(params_for(m.name), &key, &key.1);
        p["recvWindow"] = json!(5001);
        let a = ws.call(m.name, p).await;
        assert_eq!(code(&a), -1022, "{}: {a}", m.name);
    }
    assert!(n >= 12, "{n} signed methods");
    assert_eq!(open_count(&mut ws, &key).await, 0, "nothing was placed");
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_the_routes_permission_gets_2015_and_changes_nothing() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (_, read_only) = h.trader_with("1", "100000", "read").await;
    let (_, trade_only) = h.trader_with("1", "100000", "trade").await;
    let (_, both) = h.trader("1", "100000").await;
    let mut ws = Ws::connect(addr).await;
    let mut checked = 0;
    for m in METHODS {
        let (_, route) = api::wsapi::method(m.name).unwrap();
        let Access::Signed(perm) = route.access else {
            continue;
        };
        let lacking = if perm.has(Perms::TRADE) {
            &read_only
        } else if perm.has(Perms::READ) {
            &trade_only
        } else {
            panic!("{}: a permission this test does not know", m.name)
        };
        let a = ws.signed(m.name, params_for(m.name), lacking).await;
        assert_eq!(
            (a["status"].as_u64(), code(&a)),
            (Some(401), -2015),
            "{}: {a}",
            m.name
        );
        checked += 1;
    }
    assert!(checked >= 12);
    // The key with both permissions passes the same check (whatever the method then answers).
    let a = ws
        .signed("order.place", params_for("order.place"), &both)
        .await;
    assert_eq!(a["status"], 200, "{a}");
    assert_eq!(open_count(&mut ws, &read_only).await, 0);
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_get_binances_codes_and_change_nothing() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (_, key) = h.trader("1", "100000").await;
    let mut ws = Ws::connect(addr).await;
    let cases: &[(&str, &str, Value, i64)] = &[
        (
            "missing symbol",
            "order.place",
            json!({"side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01", "price": "30000"}),
            -1102,
        ),
        (
            "bad side",
            "order.place",
            json!({"symbol": "BTCUSD", "side": "UP", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01", "price": "30000"}),
            -1117,
        ),
        (
            "unknown parameter",
            "order.place",
            json!({"symbol": "BTCUSD", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.01", "price": "30000", "colour": "red"}),
            -1104,
        ),
        (
            "object parameter",
            "order.place",
            json!({"symbol": {"a": 1}, "side": "BUY"}),
            -1130,
        ),
        (
            "unknown symbol",
            "order.status",
            json!({"symbol": "XXXYYY", "orderId": 1}),
            -1121,
        ),
        (
            "no order reference",
            "order.cancel",
            json!({"symbol": "BTCUSD"}),
            -1102,
        ),
        (
            "limit above the maximum",
            "allOrders",
            json!({"symbol": "BTCUSD", "limit": 100000}),
            -1130,
        ),
    ];
    for (what, method, params, want) in cases {
        let a = ws.signed(method, params.clone(), &key).await;
        assert_eq!(code(&a), *want, "{what}: {a}");
        assert_eq!(a["status"], 400, "{what}: {a}");
        assert_eq!(
            a["rateLimits"][0]["rateLimitType"], "REQUEST_WEIGHT",
            "{what}: {a}"
        );
    }
    // Unsigned: no timestamp or signature on a signed method.
    let a = ws.call("order.place", limit("1", "BUY")).await;
    assert!([-1102, -2014].contains(&code(&a)), "{a}");
    // Public methods' parameters.
    let a = ws.call("depth", json!({})).await;
    assert_eq!(code(&a), -1102, "{a}");
    let a = ws
        .call("klines", json!({"symbol": "BTCUSD", "interval": "7m"}))
        .await;
    assert_eq!(code(&a), -1120, "{a}");
    // Not a method, not JSON.
    let a = ws.call("order.teleport", json!({})).await;
    assert_eq!(code(&a), -1100, "{a}");
    ws.send_text("{not json".into()).await;
    let a = ws.answer(&Value::Null).await;
    assert_eq!(code(&a), -1100, "{a}");
    assert_eq!(open_count(&mut ws, &key).await, 0, "nothing was placed");
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_outcome_is_unknown_is_1007_and_found_by_its_client_id() {
    let (h, lossy) = Harness::lossy();
    let (addr, stop) = start(&h).await;
    let (_, key) = h.trader("1", "100000").await;
    let mut ws = Ws::connect(addr).await;
    lossy.lose_next(1);
    let mut p = limit("30000", "SELL");
    p["newClientOrderId"] = json!("lost-reply-1");
    let a = ws.signed("order.place", p, &key).await;
    assert_eq!((a["status"].as_u64(), code(&a)), (Some(503), -1007), "{a}");
    // The command was applied; the read models show it once they caught up (no reply told
    // the handler to wait for them).
    let mut found = Value::Null;
    for _ in 0..100 {
        let a = ws
            .signed(
                "order.status",
                json!({"symbol": "BTCUSD", "origClientOrderId": "lost-reply-1"}),
                &key,
            )
            .await;
        if a["status"] == 200 {
            found = a["result"].clone();
            break;
        }
        assert_eq!(code(&a), -2013, "{a}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(found["status"], "NEW", "the order was placed: {found}");
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_limited_by_weight_not_by_messages_per_second() {
    let h = Harness::with_config(ApiConfig {
        ip_weight_per_min: 60,
        key_weight_per_min: 1_000_000,
        orders_per_10s: 1_000_000,
        ..ApiConfig::default()
    });
    let (addr, stop) = start(&h).await;
    let mut ws = Ws::connect(addr).await;
    // Binance's streams allow 5 messages a second; its WebSocket API does not count messages.
    // Twenty pings in one burst (weight 1 each) are all answered, in one pipeline.
    for i in 0..20 {
        ws.send_text(json!({"id": i, "method": "ping"}).to_string())
            .await;
    }
    for i in 0..20 {
        let a = ws.answer(&json!(i)).await;
        assert_eq!(a["status"], 200, "{a}");
    }
    // The IP's weight (60 a minute, 2 of them for the connection) runs out: -1003, as REST.
    let mut refused = None;
    for _ in 0..60 {
        let a = ws.call("ping", json!({})).await;
        if a["status"] != 200 {
            refused = Some(a);
            break;
        }
    }
    let a = refused.expect("the weight limit is reached");
    assert_eq!((a["status"].as_u64(), code(&a)), (Some(429), -1003), "{a}");
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pipelined_orders_on_one_connection_are_each_answered_once() {
    let h = Harness::with_config(ApiConfig {
        ws_api_max_in_flight: 4,
        ip_weight_per_min: 1_000_000,
        key_weight_per_min: 1_000_000,
        orders_per_10s: 1_000_000,
        ..ApiConfig::default()
    });
    let (addr, stop) = start(&h).await;
    let (_, key) = h.trader("10", "1000000").await;
    let mut ws = Ws::connect(addr).await;
    // 200 requests sent at once, 4 served at a time: every id answered exactly once.
    for i in 0..200u64 {
        let mut p = limit(&format!("{}", 40_000 + i), "SELL");
        p["newClientOrderId"] = json!(format!("pipe-{i}"));
        let p = signed(p, &key, &key.1);
        ws.send_text(json!({"id": i, "method": "order.place", "params": p}).to_string())
            .await;
    }
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 200 {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.s.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        assert_eq!(v["status"], 200, "{v}");
        assert!(
            seen.insert(v["id"].as_u64().unwrap()),
            "answered twice: {v}"
        );
    }
    assert_eq!(open_count(&mut ws, &key).await, 200);
    let _ = stop.send(());
}

/// The README's row of a method: its route, permission and weight, from the permission table.
fn readme_row(m: &api::wsapi::WsMethod) -> String {
    let (_, r) = api::wsapi::method(m.name).unwrap();
    let access = match r.access {
        Access::Public => "public".to_owned(),
        Access::Key(p) if p == Perms::NONE => "key: any key".to_owned(),
        Access::Key(p) => format!("key: {}", p.names().join(",")),
        Access::Signed(p) => format!("signed: **{}**", p.names().join(",")),
        Access::Token(_) | Access::Session => {
            panic!("{} maps to a Greenfield or dashboard route", m.name)
        }
    };
    let weight = r
        .weight
        .map(|w| w.to_string())
        .unwrap_or_else(|| "as the REST route".into());
    format!(
        "| `{}` | `{} {}` | {access} | {weight} |",
        m.name, r.method, r.path
    )
}

#[test]
fn readme_lists_every_method_with_its_weight_and_permission() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let rows: Vec<String> = METHODS.iter().map(readme_row).collect();
    let missing: Vec<&String> = rows.iter().filter(|r| !readme.contains(*r)).collect();
    assert!(
        missing.is_empty(),
        "api/README.md's WebSocket API table is out of date; it should read:\n{}",
        rows.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_user_data_subscription_is_not_cut_off_by_others_events() {
    // A backlog of one user event: any connection that took every account's events would fall
    // behind at once.
    let h = Harness::with_config(ApiConfig {
        ws_queue: 1,
        ip_weight_per_min: 1_000_000,
        key_weight_per_min: 1_000_000,
        orders_per_10s: 1_000_000,
        ..ApiConfig::default()
    });
    let (addr, stop) = start(&h).await;
    let (_, key) = h.trader("10", "1000000").await;
    let mut quiet = Ws::connect(addr).await;
    let mut busy = Ws::connect(addr).await;
    // Another connection subscribes to the account's user data, so events are produced (it
    // may well be cut off itself: it does not read them).
    let sub = busy
        .signed("userDataStream.subscribe.signature", json!({}), &key)
        .await;
    assert_eq!(sub["status"], 200, "{sub}");
    for i in 0..100u64 {
        let r = h
            .signed(
                "POST",
                "/api/v3/order",
                &format!(
                    "symbol=BTCUSD&side=SELL&type=LIMIT&timeInForce=GTC&quantity=0.01&price={}",
                    40_000 + i
                ),
                &key,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.json);
    }
    // The quiet connection, which asked for no events, is still served.
    let a = quiet.call("ping", json!({})).await;
    assert_eq!(a["status"], 200, "{a}");
    let _ = stop.send(());
}

/// A core that holds new orders until the test lets them through, counting those that reached
/// it.
struct Gated {
    inner: api::LocalCore,
    gate: tokio::sync::Semaphore,
    held: std::sync::atomic::AtomicUsize,
}

impl api::ExchangeCore for Gated {
    fn submit(
        &self,
        cmd: matching_engine::Command,
    ) -> api::core::BoxFuture<'_, Result<api::Reply, api::CoreError>> {
        Box::pin(async move {
            if matches!(cmd, matching_engine::Command::NewOrder(_)) {
                self.held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.gate.acquire().await.expect("open").forget();
            }
            self.inner.submit(cmd).await
        })
    }
    fn config(&self) -> &matching_engine::EngineConfig {
        self.inner.config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_max_in_flight_requests_is_not_read_further() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ApiConfig {
        ws_api_max_in_flight: 2,
        ip_weight_per_min: 1_000_000,
        key_weight_per_min: 1_000_000,
        orders_per_10s: 1_000_000,
        ..ApiConfig::default()
    };
    let engine_cfg = matching_engine::EngineConfig::default();
    let (pending, sink) = api::app::open(dir.path(), &engine_cfg, cfg).unwrap();
    let engine = matching_engine::Engine::new(engine_cfg).unwrap();
    let core = std::sync::Arc::new(Gated {
        inner: api::LocalCore::spawn(engine, sink, 65_536).unwrap(),
        gate: tokio::sync::Semaphore::new(0),
        held: Default::default(),
    });
    let h = Harness::over(dir, pending.start(core.clone()));
    let (addr, stop) = start(&h).await;
    let (_, key) = h.trader("10", "1000000").await;
    let mut ws = Ws::connect(addr).await;
    for i in 0..5u64 {
        let p = signed(limit(&format!("{}", 40_000 + i), "SELL"), &key, &key.1);
        ws.send_text(json!({"id": i, "method": "order.place", "params": p}).to_string())
            .await;
    }
    ws.send_text(json!({"id": "ping", "method": "ping"}).to_string())
        .await;
    let held = || core.held.load(std::sync::atomic::Ordering::SeqCst);
    let t0 = std::time::Instant::now();
    while held() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "two orders reach the core"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Two in flight: the rest (and the ping) wait unread in the socket.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(held(), 2, "at most ws_api_max_in_flight requests are taken");
    let early = tokio::time::timeout(Duration::from_millis(100), ws.s.next()).await;
    assert!(
        early.is_err(),
        "nothing is answered while both are held: {early:?}"
    );
    // Released: every request is answered, once.
    core.gate.add_permits(5);
    let mut ids = std::collections::BTreeSet::new();
    while ids.len() < 6 {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.s.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        assert_eq!(v["status"], 200, "{v}");
        assert!(ids.insert(v["id"].to_string()), "twice: {v}");
    }
    assert_eq!(held(), 5);
    let _ = stop.send(());
}

/// Defect: a `userDataStream.subscribe.signature` subscription outlived its key: after the key
/// was revoked, the connection kept receiving the account's order and balance events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_keys_user_data_subscription_ends() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (_, key) = h.trader_with("10", "1000000", "read,trade,keys").await;
    let mut ws = Ws::connect(addr).await;
    let sub = ws
        .signed("userDataStream.subscribe.signature", json!({}), &key)
        .await;
    assert_eq!(sub["status"], 200, "{sub}");
    let sid = sub["result"]["subscriptionId"].clone();
    let r = h
        .signed(
            "DELETE",
            "/mapi/v1/apiKey",
            &format!("apiKey={}", key.0),
            &key,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    // Within a few ticks: the stream is terminated.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.s.next())
            .await
            .expect("eventStreamTerminated within 10 s")
            .expect("open")
            .expect("no error");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["event"]["e"] == "eventStreamTerminated" {
                assert_eq!(v["subscriptionId"], sid);
                break;
            }
        }
    }
    let _ = stop.send(());
}

/// Review finding: binary frames were read and ignored without any charge (and kept the
/// connection alive), so a client could keep the server reading for free. A binary frame
/// closes the connection with 1003 (unsupported data); text requests are unaffected.
#[tokio::test]
async fn a_binary_frame_closes_the_connection_with_1003() {
    let h = Harness::new();
    let (addr, _stop) = start(&h).await;
    let mut ws = Ws::connect(addr).await;
    let pong = ws.call("ping", json!({})).await;
    assert_eq!(pong["status"], 200, "{pong}");
    ws.s.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), ws.s.next())
        .await
        .expect("an answer within 5 s");
    match m {
        Some(Ok(Message::Close(Some(f)))) => {
            assert_eq!(u16::from(f.code), 1003, "{f:?}")
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// Review finding: `openOrders.status` (and `GET /api/v3/openOrders`) read `symbol` to pick its
/// weight before anything was charged, so an empty one was answered `-1105` at no cost: the one
/// request on the WebSocket API a client could send without end, never reaching `-1003`. The
/// weight is chosen without validating; the request is charged, then refused (failed on the old
/// code: every answer was `-1105`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_orders_request_that_fails_validation_is_charged_too() {
    let h = Harness::with_config(ApiConfig {
        ip_weight_per_min: 100,
        key_weight_per_min: 1_000_000,
        ..ApiConfig::default()
    });
    let (addr, stop) = start(&h).await;
    let mut ws = Ws::connect(addr).await;
    let mut answers = Vec::new();
    for _ in 0..40 {
        let a = ws.call("openOrders.status", json!({"symbol": ""})).await;
        let limited = a["status"] == 429;
        answers.push((a["status"].as_u64(), code(&a)));
        if limited {
            break;
        }
    }
    assert_eq!(
        answers.first(),
        Some(&(Some(401), -2014)),
        "refused (charged first, then no key): {answers:?}"
    );
    assert_eq!(
        answers.last(),
        Some(&(Some(429), -1003)),
        "each one was charged: {answers:?}"
    );
    let _ = stop.send(());
}

/// Review finding: `userDataStream.unsubscribe` with a `subscriptionId` that is not one (a
/// string, a negative number) ended every subscription of the connection and answered 200, so
/// a client unsubscribing one account by a string id lost all its streams without a word.
/// Absent, every subscription ends; present and malformed, `-1100` and nothing ends (failed on
/// the old code: 200, and no event came).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribe_with_a_malformed_id_is_refused_and_ends_nothing() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (_, key) = h.trader("10", "1000000").await;
    let mut ws = Ws::connect(addr).await;
    let sub = ws
        .signed("userDataStream.subscribe.signature", json!({}), &key)
        .await;
    assert_eq!(sub["status"], 200, "{sub}");
    let sid = sub["result"]["subscriptionId"].clone();
    for bad in [json!("0"), json!(-1), json!(1.5), json!(null)] {
        let a = ws
            .call(
                "userDataStream.unsubscribe",
                json!({ "subscriptionId": bad }),
            )
            .await;
        assert_eq!(
            (a["status"].as_u64(), code(&a)),
            (Some(400), -1100),
            "{bad}: {a}"
        );
    }
    let r = h
        .signed(
            "POST",
            "/api/v3/order",
            "symbol=BTCUSD&side=SELL&type=LIMIT&timeInForce=GTC&quantity=0.01&price=45000",
            &key,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.s.next())
            .await
            .expect("the order's executionReport within 10 s: still subscribed")
            .expect("open")
            .expect("no error");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["event"]["e"] == "executionReport" {
                assert_eq!(v["subscriptionId"], sid, "{v}");
                break;
            }
        }
    }
    // Absent: every subscription ends.
    let a = ws.call("userDataStream.unsubscribe", json!({})).await;
    assert_eq!(a["status"], 200, "{a}");
    let _ = stop.send(());
}

/// Defect (review): `userDataStream.subscribe.signature` read `timestamp` and `recvWindow` with
/// its own rules, not REST's (and every routed method's): a `recvWindow` of `abc`, `-1` or
/// `5000.5` answered `-1130` (REST: `-1100`), a
/// `timestamp` of `+<ms>` was taken (REST: `-1102`), and a parameter it does not take was
/// ignored (REST: `-1104`). The same bad input now gets the same code, and subscribes nothing.
#[tokio::test]
async fn user_data_subscribe_reads_its_parameters_as_rest_does() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (_, key) = h.trader("0", "0").await;
    let mut ws = Ws::connect(addr).await;
    let now = common::now_ms();
    let code = |a: &Value| a["error"]["code"].as_i64();
    for bad in ["abc", "-1", "5000.5"] {
        let a = ws
            .call(
                "userDataStream.subscribe.signature",
                wsclient::signed_as_is(json!({"timestamp": now, "recvWindow": bad}), &key, &key.1),
            )
            .await;
        assert_eq!(code(&a), Some(-1100), "recvWindow {bad}: {a}");
    }
    let a = ws
        .call(
            "userDataStream.subscribe.signature",
            wsclient::signed_as_is(json!({"timestamp": format!("+{now}")}), &key, &key.1),
        )
        .await;
    assert_eq!(code(&a), Some(-1102), "{a}");
    let a = ws
        .call(
            "userDataStream.subscribe.signature",
            wsclient::signed_as_is(json!({"timestamp": now, "foo": "x"}), &key, &key.1),
        )
        .await;
    assert_eq!(code(&a), Some(-1104), "{a}");
    // As REST answers the same parameters.
    let r = h
        .signed("GET", "/api/v3/account", "recvWindow=abc", &key)
        .await;
    assert_eq!(r.json["code"], -1100, "{}", r.json);
    // Nothing was subscribed; a well-formed request still is.
    let a = ws
        .call(
            "userDataStream.subscribe.signature",
            wsclient::signed_as_is(
                json!({"timestamp": now, "recvWindow": "5000"}),
                &key,
                &key.1,
            ),
        )
        .await;
    assert_eq!(a["status"], 200, "{a}");
    assert_eq!(
        a["result"]["subscriptionId"], 0,
        "the first subscription: {a}"
    );
    let _ = stop.send(());
}
