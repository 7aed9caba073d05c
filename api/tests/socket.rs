//! Real-socket tests on 127.0.0.1:0: HTTP/1.1 and WebSocket streams (depth diffs that follow
//! Binance's snapshot + diff synchronisation, trades, partial depth, user data).

mod common;

use api::keys::sign;
use common::{now_ms, Harness};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

async fn start(h: &Harness) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let state = h.state.clone();
    tokio::spawn(async move {
        api::serve(listener, state, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (addr, tx)
}

/// The admin listener (`/mapi/v1/admin/*`, `/metrics`) on its own port.
async fn start_admin(h: &Harness) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = h.state.clone();
    tokio::spawn(async move {
        api::serve_admin(listener, state, std::future::pending())
            .await
            .unwrap();
    });
    addr
}

/// One HTTP/1.1 request over a fresh connection.
async fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    body: &str,
    key: Option<&str>,
) -> (u16, Value) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    common::http_on(s, addr, method, target, body, key).await
}

async fn signed_post(
    addr: SocketAddr,
    path: &str,
    params: &str,
    key: &(String, String),
) -> (u16, Value) {
    let q = format!("{params}&timestamp={}", now_ms());
    let body = format!("{q}&signature={}", sign(&key.1, &q));
    http(addr, "POST", path, &body, Some(&key.0)).await
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message within 5 s")
            .expect("stream open")
            .expect("no error");
        if let Message::Text(t) = m {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_websocket_depth_trades_and_user_data() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (_, buyer) = h.trader("0", "100000").await;
    let (_, seller) = h.trader("1", "0").await;

    let (status, v) = http(addr, "GET", "/api/v3/ping", "", None).await;
    assert_eq!((status, v), (200, serde_json::json!({})));
    let (status, v) = http(addr, "GET", "/api/v3/depth?symbol=NOPE", "", None).await;
    assert_eq!((status, v["code"].as_i64()), (400, Some(-1121)));

    // Subscribe before any order: raw diff stream, combined streams, user data, SUBSCRIBE.
    let (mut depth, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/btcusd@depth"))
        .await
        .unwrap();
    let (mut combined, _) = tokio_tungstenite::connect_async(format!(
        "ws://{addr}/stream?streams=btcusd@trade/btcusd@bookTicker"
    ))
    .await
    .unwrap();
    let (_, lk) = http(addr, "POST", "/api/v3/userDataStream", "", Some(&seller.0)).await;
    let lk = lk["listenKey"].as_str().unwrap().to_owned();
    let (mut user, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/{lk}"))
        .await
        .unwrap();
    let (mut sub, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    sub.send(Message::Text(
        r#"{"method":"SUBSCRIBE","params":["btcusd@depth5@100ms","btcusd@kline_1m"],"id":7}"#
            .into(),
    ))
    .await
    .unwrap();
    assert_eq!(
        next_json(&mut sub).await,
        serde_json::json!({"result": null, "id": 7})
    );
    sub.send(Message::Text(
        r#"{"method":"SUBSCRIBE","params":["btcusd@nope"],"id":8}"#.into(),
    ))
    .await
    .unwrap();
    loop {
        let m = next_json(&mut sub).await;
        if m["id"] == 8 {
            assert_eq!(m["error"]["code"], 2);
            break;
        }
    }
    assert!(
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/btcusd@nope"))
            .await
            .is_err()
    );

    // A resting sell: one depth diff.
    let (status, o) = signed_post(
        addr,
        "/api/v3/order",
        "symbol=BTCUSD&side=SELL&type=LIMIT&timeInForce=GTC&quantity=0.01&price=30000",
        &seller,
    )
    .await;
    assert_eq!(status, 200, "{o}");
    let d = next_json(&mut depth).await;
    assert_eq!(d["e"], "depthUpdate");
    assert_eq!(d["s"], "BTCUSD");
    assert_eq!(
        d["a"],
        serde_json::json!([["30000.00000000", "0.01000000"]])
    );
    let first_u = d["u"].as_u64().unwrap();
    assert_eq!(d["U"].as_u64().unwrap(), 1);
    // Snapshot after the diff: lastUpdateId is the diff's u.
    let (_, snap) = http(addr, "GET", "/api/v3/depth?symbol=BTCUSD", "", None).await;
    assert_eq!(snap["lastUpdateId"].as_u64().unwrap(), first_u);

    // A trade: next diff continues the sequence without a gap.
    let (status, f) = signed_post(
        addr,
        "/api/v3/order",
        "symbol=BTCUSD&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.004&price=30000",
        &buyer,
    )
    .await;
    assert_eq!((status, f["status"].as_str()), (200, Some("FILLED")));
    let d2 = next_json(&mut depth).await;
    assert_eq!(d2["U"].as_u64().unwrap(), first_u + 1);
    assert_eq!(
        d2["a"],
        serde_json::json!([["30000.00000000", "0.00600000"]])
    );

    let mut got_trade = false;
    let mut got_book = false;
    while !(got_trade && got_book) {
        let m = next_json(&mut combined).await;
        match m["stream"].as_str().unwrap() {
            "btcusd@trade" => {
                assert_eq!(m["data"]["e"], "trade");
                assert_eq!(m["data"]["p"], "30000.00000000");
                assert_eq!(m["data"]["q"], "0.00400000");
                assert_eq!(m["data"]["m"], false);
                got_trade = true;
            }
            "btcusd@bookTicker" => {
                got_book = m["data"]["a"] == "30000.00000000";
            }
            other => panic!("unexpected stream {other}"),
        }
    }

    // User data: NEW, then TRADE for the seller, with balances.
    let mut reports = Vec::new();
    let mut positions = 0;
    while reports.len() < 2 || positions < 2 {
        let m = next_json(&mut user).await;
        match m["e"].as_str().unwrap() {
            "executionReport" => reports.push(m),
            "outboundAccountPosition" => positions += 1,
            other => panic!("unexpected event {other}: {m}"),
        }
    }
    assert_eq!(
        (reports[0]["x"].as_str(), reports[0]["X"].as_str()),
        (Some("NEW"), Some("NEW"))
    );
    assert_eq!(
        (reports[1]["x"].as_str(), reports[1]["X"].as_str()),
        (Some("TRADE"), Some("PARTIALLY_FILLED"))
    );
    assert_eq!(reports[1]["l"], "0.00400000");
    assert_eq!(reports[1]["L"], "30000.00000000");
    assert_eq!(reports[1]["m"], true);
    assert_eq!(reports[1]["N"], "USD");

    // Partial depth and kline pushes on the SUBSCRIBE connection.
    let mut got_partial = false;
    let mut got_kline = false;
    while !(got_partial && got_kline) {
        let m = next_json(&mut sub).await;
        if m.get("lastUpdateId").is_some() && m["asks"][0][1] == "0.00600000" {
            got_partial = true;
        }
        if m["e"] == "kline" {
            assert_eq!(m["k"]["i"], "1m");
            got_kline = m["k"]["n"] == 1;
        }
    }
    sub.send(Message::Text(
        r#"{"method":"LIST_SUBSCRIPTIONS","id":9}"#.into(),
    ))
    .await
    .unwrap();
    loop {
        let m = next_json(&mut sub).await;
        if m["id"] == 9 {
            assert_eq!(m["result"].as_array().unwrap().len(), 2);
            break;
        }
    }
    // The WebSocket API: user data without a listenKey.
    let (mut wsapi, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws-api/v3"))
        .await
        .unwrap();
    let ts = now_ms();
    let payload = format!("apiKey={}&recvWindow=5000&timestamp={ts}", buyer.0);
    let req = serde_json::json!({
        "id": "s1",
        "method": "userDataStream.subscribe.signature",
        "params": {"apiKey": buyer.0, "timestamp": ts, "recvWindow": 5000, "signature": sign(&buyer.1, &payload)},
    });
    wsapi
        .send(Message::Text(req.to_string().into()))
        .await
        .unwrap();
    let ack = next_json(&mut wsapi).await;
    assert_eq!(
        (ack["id"].as_str(), ack["status"].as_u64()),
        (Some("s1"), Some(200)),
        "{ack}"
    );
    let sid = ack["result"]["subscriptionId"].as_u64().unwrap();
    let bad = serde_json::json!({
        "id": 2, "method": "userDataStream.subscribe.signature",
        "params": {"apiKey": buyer.0, "timestamp": ts, "signature": sign("wrong", &payload)},
    });
    wsapi
        .send(Message::Text(bad.to_string().into()))
        .await
        .unwrap();
    let nack = next_json(&mut wsapi).await;
    assert_eq!(
        (nack["status"].as_u64(), nack["error"]["code"].as_i64()),
        (Some(400), Some(-1022))
    );
    let (status, _) = signed_post(
        addr,
        "/api/v3/order",
        "symbol=BTCUSD&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.001&price=29000",
        &buyer,
    )
    .await;
    assert_eq!(status, 200);
    loop {
        let m = next_json(&mut wsapi).await;
        assert_eq!(m["subscriptionId"].as_u64(), Some(sid));
        if m["event"]["e"] == "executionReport" {
            assert_eq!(m["event"]["x"], "NEW");
            assert_eq!(m["event"]["p"], "29000.00000000");
            break;
        }
    }
    let admin = start_admin(&h).await;
    let (_, metrics_status) = (0, http(admin, "GET", "/metrics", "", None).await.0);
    assert_eq!(metrics_status, 200);
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_websocket_consumer_is_disconnected_without_slowing_others() {
    let h = Harness::with_config(api::ApiConfig {
        ws_queue: 1024,
        orders_per_10s: 1_000_000,
        socket_send_buffer: Some(4096),
        ..Default::default()
    });
    let (addr, stop) = start(&h).await;
    let (_, buyer) = h.trader("0", "10000000").await;
    // A reader that never reads, with a tiny receive buffer.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let (mut slow, _) =
        tokio_tungstenite::client_async(format!("ws://{addr}/ws/btcusd@depth"), stream)
            .await
            .unwrap();
    let (mut fast, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/btcusd@depth"))
        .await
        .unwrap();
    // Many depth diffs: place and cancel, each changes a level.
    let pairs = 2_000u64;
    let reader = tokio::spawn(async move {
        let mut last_u = 0;
        while last_u < 2 * pairs {
            let m = next_json(&mut fast).await;
            assert_eq!(
                m["U"].as_u64().unwrap(),
                last_u + 1,
                "no gap for a fast reader"
            );
            last_u = m["u"].as_u64().unwrap();
        }
        last_u
    });
    let post = |path: &'static str, method: &'static str, params: String| {
        let router = h.router.clone();
        let key = buyer.clone();
        async move {
            let q = format!("{params}&timestamp={}", now_ms());
            let signed = format!("{q}&signature={}", sign(&key.1, &q));
            let req = if method == "POST" {
                axum::http::Request::post(path)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .header("X-MBX-APIKEY", &key.0)
                    .body(axum::body::Body::from(signed))
            } else {
                axum::http::Request::delete(format!("{path}?{signed}"))
                    .header("X-MBX-APIKEY", &key.0)
                    .body(axum::body::Body::empty())
            };
            let res = tower::ServiceExt::oneshot(router, req.unwrap())
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
        }
    };
    for i in 0..pairs {
        let price = 10_000 + i;
        post(
            "/api/v3/order",
            "POST",
            format!("symbol=BTCUSD&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.0001&price={price}&newClientOrderId=c{i}&newOrderRespType=ACK"),
        )
        .await;
        post(
            "/api/v3/order",
            "DELETE",
            format!("symbol=BTCUSD&origClientOrderId=c{i}"),
        )
        .await;
    }
    assert_eq!(reader.await.unwrap(), 2 * pairs);
    // The slow reader was cut off with a reason, after at most what the buffers held.
    let mut close = None;
    let mut n = 0u64;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
        match m {
            Message::Close(f) => {
                close = f;
                break;
            }
            _ => n += 1,
        }
    }
    // The close frame itself may not fit in the full socket; when it arrives it says why.
    if let Some(f) = close {
        assert_eq!(u16::from(f.code), 1008);
        assert!(
            f.reason.as_str().starts_with("slow consumer"),
            "{}",
            f.reason
        );
    }
    assert!(n < 2 * pairs, "the slow reader got {n} messages");
    let (_, m) = http(start_admin(&h).await, "GET", "/metrics", "", None).await;
    assert!(
        m.as_str()
            .unwrap()
            .contains("mediator_ws_slow_disconnects_total 1"),
        "{m}"
    );
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kline_stream_sends_the_closed_candle() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (_, buyer) = h.trader("0", "100000").await;
    let (_, seller) = h.trader("1", "0").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/btcusd@kline_1s"))
        .await
        .unwrap();
    let trade = |price: u32| {
        let (b, s) = (buyer.clone(), seller.clone());
        async move {
            signed_post(addr, "/api/v3/order", &format!("symbol=BTCUSD&side=SELL&type=LIMIT&timeInForce=GTC&quantity=0.001&price={price}"), &s).await;
            let (st, v) = signed_post(addr, "/api/v3/order", &format!("symbol=BTCUSD&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.001&price={price}"), &b).await;
            assert_eq!((st, v["status"].as_str()), (200, Some("FILLED")));
        }
    };
    trade(30000).await;
    let first = next_json(&mut ws).await;
    assert_eq!(
        (first["k"]["i"].as_str(), first["k"]["c"].as_str()),
        (Some("1s"), Some("30000.00000000"))
    );
    let open = first["k"]["t"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    trade(30001).await;
    // Under load the first push may already be the final one.
    let mut closed = first["k"]["x"] == true;
    let mut next = false;
    while !(closed && next) {
        let m = next_json(&mut ws).await;
        let t = m["k"]["t"].as_u64().unwrap();
        if t == open && m["k"]["x"] == true {
            closed = true;
        }
        if t > open && m["k"]["c"] == "30001.00000000" {
            next = true;
        }
    }
    let _ = stop.send(());
}

/// `<symbol>@ticker` and `<symbol>@miniTicker` in Binance's shape (ccxt.pro's `watchTicker`
/// subscribes `@ticker`; its `watchTickers` on a symbol list `@miniTicker`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticker_streams_have_binance_shape() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (_, buyer) = h.trader("0", "100000").await;
    let (_, seller) = h.trader("1", "0").await;
    signed_post(
        addr,
        "/api/v3/order",
        "symbol=BTCUSD&side=SELL&type=LIMIT&timeInForce=GTC&quantity=0.002&price=30000",
        &seller,
    )
    .await;
    let (st, v) = signed_post(
        addr,
        "/api/v3/order",
        "symbol=BTCUSD&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.001&price=30000",
        &buyer,
    )
    .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("FILLED")));
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{addr}/stream?streams=btcusd@ticker/btcusd@miniTicker"
    ))
    .await
    .unwrap();
    let (mut full, mut mini) = (None, None);
    while full.is_none() || mini.is_none() {
        let m = next_json(&mut ws).await;
        match m["stream"].as_str().unwrap() {
            "btcusd@ticker" => full = Some(m["data"].clone()),
            "btcusd@miniTicker" => mini = Some(m["data"].clone()),
            s => panic!("unexpected stream {s}"),
        }
    }
    let (full, mini) = (full.unwrap(), mini.unwrap());
    assert_eq!(full["e"], "24hrTicker");
    assert_eq!(full["s"], "BTCUSD");
    assert_eq!(full["c"], "30000.00000000");
    assert_eq!(full["Q"], "0.00100000");
    assert_eq!(full["a"], "30000.00000000");
    assert_eq!(full["A"], "0.00100000");
    assert_eq!(full["b"], "0.00000000");
    assert_eq!(full["v"], "0.00100000");
    assert_eq!(full["q"], "30.00000000");
    assert_eq!(full["n"], 1);
    for k in ["E", "O", "C", "F", "L"] {
        assert!(full[k].is_i64(), "{k} is a number: {full}");
    }
    for k in ["p", "P", "w", "x", "o", "h", "l", "B"] {
        assert!(full[k].is_string(), "{k} is a string: {full}");
    }
    assert_eq!(mini["e"], "24hrMiniTicker");
    assert_eq!(
        (mini["s"].as_str(), mini["c"].as_str(), mini["o"].as_str()),
        (
            Some("BTCUSD"),
            Some("30000.00000000"),
            Some("30000.00000000")
        )
    );
    for k in ["h", "l", "v", "q"] {
        assert!(mini[k].is_string(), "{k}: {mini}");
    }
    assert!(
        mini.get("b").is_none() && mini.get("p").is_none(),
        "mini has no book: {mini}"
    );
    let _ = stop.send(());
}

/// A client's close frame is answered at once (RFC 6455 closing handshake), not with a dropped
/// connection (which a client sees as a reset and may wait on until its close timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_streams_name_each_connections_own_stream() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (_, buyer) = h.trader("0", "100000").await;
    // The first two share one serialized frame; the third names the stream differently.
    let mut conns = Vec::new();
    for name in ["btcusd@depth", "btcusd@depth", "btcusd@depth@100ms"] {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://{addr}/stream?streams={name}"))
                .await
                .unwrap();
        // An answer means the connection's loop runs, subscribed.
        ws.send(Message::Text(
            r#"{"method":"LIST_SUBSCRIPTIONS","id":1}"#.into(),
        ))
        .await
        .unwrap();
        assert_eq!(next_json(&mut ws).await["result"][0], name);
        conns.push((name, ws));
    }
    let (status, _) = signed_post(
        addr,
        "/api/v3/order",
        "symbol=BTCUSD&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.001&price=10000",
        &buyer,
    )
    .await;
    assert_eq!(status, 200);
    let mut data = Vec::new();
    for (name, ws) in &mut conns {
        let m = next_json(ws).await;
        assert_eq!(m["stream"], *name);
        assert_eq!(m["data"]["e"], "depthUpdate");
        data.push(m["data"].clone());
    }
    assert!(data.iter().all(|d| *d == data[0]), "{data:?}");
    let _ = stop.send(());
}

/// The value of one metric line (`name value`).
async fn metric(addr: SocketAddr, name: &str) -> Option<u64> {
    let (_, m) = http(addr, "GET", "/metrics", "", None).await;
    m.as_str()?.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|v| v.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_hang_up_are_not_counted_as_slow_consumers() {
    let h = Harness::with_config(api::ApiConfig {
        orders_per_10s: 1_000_000,
        ..Default::default()
    });
    let (addr, stop) = start(&h).await;
    let (_, buyer) = h.trader("0", "10000000").await;
    let mut subscribers = Vec::new();
    for _ in 0..20 {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/btcusd@depth"))
            .await
            .unwrap();
        subscribers.push(ws);
    }
    for i in 0..60u64 {
        if i == 20 {
            // Hang up mid-stream without a close frame: the server's next sends fail at once.
            subscribers.clear();
        }
        let (status, _) = signed_post(
            addr,
            "/api/v3/order",
            &format!("symbol=BTCUSD&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.0001&price={}&newOrderRespType=ACK", 10_000 + i),
            &buyer,
        )
        .await;
        assert_eq!(status, 200);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let admin = start_admin(&h).await;
    while metric(admin, "mediator_ws_connections").await != Some(0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections not closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(admin, "mediator_ws_slow_disconnects_total").await,
        Some(0),
        "a client that hung up is not a slow consumer"
    );
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_is_answered_with_a_close_frame() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    for path in [
        "/ws/btcusd@trade",
        "/stream?streams=btcusd@depth",
        "/ws/1",
        "/ws-api/v3",
    ] {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
            .await
            .unwrap();
        ws.send(Message::Close(None)).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(m) = ws.next().await {
                if let Ok(Message::Close(_)) = m {
                    return true;
                }
                if m.is_err() {
                    return false;
                }
            }
            false
        })
        .await;
        assert_eq!(
            answer,
            Ok(true),
            "{path}: the server echoes the close frame"
        );
    }
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_that_send_too_fast_are_closed_with_a_reason() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    for i in 0..30 {
        let m = format!(r#"{{"method":"LIST_SUBSCRIPTIONS","id":{i}}}"#);
        if ws.send(Message::Text(m.into())).await.is_err() {
            break;
        }
    }
    let mut reason = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        if let Message::Close(Some(f)) = m {
            reason = Some((u16::from(f.code), f.reason.as_str().to_owned()));
            break;
        }
    }
    let (code, text) = reason.expect("a close frame");
    assert_eq!(code, 1008);
    assert!(text.starts_with("too many messages"), "{text}");
    let _ = stop.send(());
}

#[tokio::test]
async fn public_listener_serves_no_admin_endpoint_and_no_metrics() {
    let h = Harness::new();
    let (addr, _stop) = start(&h).await;
    let (status, _) = http(addr, "GET", "/metrics", "", None).await;
    assert_eq!(status, 404, "/metrics on the public listener");
    let q = format!("timestamp={}", now_ms());
    let body = format!("{q}&signature={}", sign(&h.admin.1, &q));
    let (status, v) = http(
        addr,
        "POST",
        "/mapi/v1/admin/account",
        &body,
        Some(&h.admin.0),
    )
    .await;
    assert_eq!((status, v), (404, serde_json::json!("")));
    // The public API is there; the admin routes are on the admin listener.
    assert_eq!(http(addr, "GET", "/api/v3/ping", "", None).await.0, 200);
    let admin = start_admin(&h).await;
    assert_eq!(http(admin, "GET", "/metrics", "", None).await.0, 200);
    let q = format!("timestamp={}", now_ms());
    let body = format!("{q}&signature={}", sign(&h.admin.1, &q));
    let (status, v) = http(
        admin,
        "POST",
        "/mapi/v1/admin/account",
        &body,
        Some(&h.admin.0),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["account"].as_u64().is_some(), "{v}");
    assert_eq!(http(admin, "GET", "/api/v3/ping", "", None).await.0, 404);
}

/// `<s>@aggTrade`, `!ticker@arr`, `!miniTicker@arr` and `<s>@avgPrice` (issue 9): Binance's
/// event shapes, from a real trade. Before they existed, subscribing answered `-1100`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agg_trade_all_tickers_and_avg_price_streams() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (_, buyer) = h.trader("0", "100000").await;
    let (_, seller) = h.trader("1", "0").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{addr}/stream?streams=btcusd@aggTrade/!ticker@arr/!miniTicker@arr/btcusd@avgPrice"
    ))
    .await
    .unwrap();
    signed_post(
        addr,
        "/api/v3/order",
        "symbol=BTCUSD&side=SELL&type=LIMIT&timeInForce=GTC&quantity=0.002&price=30000",
        &seller,
    )
    .await;
    let (st, v) = signed_post(
        addr,
        "/api/v3/order",
        "symbol=BTCUSD&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.001&price=30000",
        &buyer,
    )
    .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("FILLED")));
    let (mut agg, mut full, mut mini, mut avg) = (None, None, None, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while agg.is_none() || full.is_none() || mini.is_none() || avg.is_none() {
        assert!(std::time::Instant::now() < deadline, "all four streams");
        let m = next_json(&mut ws).await;
        let d = m["data"].clone();
        match m["stream"].as_str().unwrap() {
            "btcusd@aggTrade" => agg = Some(d),
            // The first arrays may predate the trade: keep the one that shows it.
            "!ticker@arr" if d[0]["n"] == 1 => full = Some(d),
            "!miniTicker@arr" if d[0]["c"] == "30000.00000000" => mini = Some(d),
            "btcusd@avgPrice" if d["w"] == "30000.00000000" => avg = Some(d),
            "!ticker@arr" | "!miniTicker@arr" | "btcusd@avgPrice" => {}
            s => panic!("unexpected stream {s}"),
        }
    }
    let agg = agg.unwrap();
    assert_eq!(agg["e"], "aggTrade");
    assert_eq!(agg["s"], "BTCUSD");
    assert_eq!(
        (agg["p"].as_str(), agg["q"].as_str()),
        (Some("30000.00000000"), Some("0.00100000"))
    );
    assert_eq!(agg["a"], agg["f"]);
    assert_eq!(agg["f"], agg["l"]);
    assert_eq!(
        agg["m"], false,
        "the buyer took: the buyer is not the maker"
    );
    for k in ["E", "T", "a"] {
        assert!(agg[k].is_u64(), "{k}: {agg}");
    }
    let full = full.unwrap();
    let t = &full.as_array().unwrap()[0];
    assert_eq!(
        (t["e"].as_str(), t["s"].as_str()),
        (Some("24hrTicker"), Some("BTCUSD"))
    );
    assert_eq!(t["a"], "30000.00000000");
    let mini = mini.unwrap();
    let t = &mini.as_array().unwrap()[0];
    assert_eq!(t["e"], "24hrMiniTicker");
    assert!(t.get("b").is_none(), "mini has no book: {t}");
    let avg = avg.unwrap();
    assert_eq!(
        (avg["e"].as_str(), avg["s"].as_str(), avg["i"].as_str()),
        (Some("avgPrice"), Some("BTCUSD"), Some("5m"))
    );
    assert!(avg["T"].as_u64().unwrap() > 0 && avg["E"].is_u64(), "{avg}");
    let _ = stop.send(());
}

/// Unknown stream names are still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_stream_names_are_refused() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    for bad in ["btcusd@aggTrades", "!ticker@all", "nope@avgPrice"] {
        match tokio_tungstenite::connect_async(format!("ws://{addr}/ws/{bad}")).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 400, "{bad}");
                let body: Value = serde_json::from_slice(r.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["code"], -1100, "{bad}: {body}");
            }
            other => panic!("{bad}: {:?}", other.map(|_| ())),
        }
    }
    let _ = stop.send(());
}

/// Issue 9: an OCO's user-data stream sends `listStatus` when the list starts (EXEC_STARTED,
/// after both legs' NEW reports, which carry the list id in `g`) and when it ends (ALL_DONE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oco_list_status_on_the_user_data_stream() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (_, holder) = h.trader("1", "0").await;
    let (_, lk) = http(addr, "POST", "/api/v3/userDataStream", "", Some(&holder.0)).await;
    let lk = lk["listenKey"].as_str().unwrap().to_owned();
    let (mut user, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/{lk}"))
        .await
        .unwrap();
    let (status, r) = signed_post(
        addr,
        "/api/v3/orderList/oco",
        "symbol=BTCUSD&side=SELL&quantity=0.01&listClientOrderId=L1&aboveType=LIMIT_MAKER&abovePrice=31000&belowType=STOP_LOSS&belowStopPrice=29000",
        &holder,
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let list = r["orderListId"].as_u64().unwrap();
    let mut news = 0;
    let started = loop {
        let m = next_json(&mut user).await;
        match m["e"].as_str().unwrap() {
            "executionReport" => {
                assert_eq!(
                    (m["x"].as_str(), m["g"].as_u64()),
                    (Some("NEW"), Some(list))
                );
                news += 1;
            }
            "listStatus" => break m,
            _ => {}
        }
    };
    assert_eq!(news, 2, "both legs reported before the list");
    assert_eq!(
        (
            started["g"].as_u64(),
            started["c"].as_str(),
            started["l"].as_str(),
            started["L"].as_str(),
            started["C"].as_str(),
            started["O"].as_array().map(Vec::len)
        ),
        (
            Some(list),
            Some("OCO"),
            Some("EXEC_STARTED"),
            Some("EXECUTING"),
            Some("L1"),
            Some(2)
        )
    );
    let q = format!("symbol=BTCUSD&orderListId={list}&timestamp={}", now_ms());
    let body = format!("{q}&signature={}", sign(&holder.1, &q));
    let (status, c) = http(addr, "DELETE", "/api/v3/orderList", &body, Some(&holder.0)).await;
    assert_eq!(status, 200, "{c}");
    let done = loop {
        let m = next_json(&mut user).await;
        if m["e"] == "listStatus" {
            break m;
        }
    };
    assert_eq!(
        (done["l"].as_str(), done["L"].as_str()),
        (Some("ALL_DONE"), Some("ALL_DONE"))
    );
    let _ = stop.send(());
}

/// Issue 9: an OTO on the user-data stream: the working order's NEW report, then `listStatus`
/// (OTO, EXEC_STARTED, both orders); a cancel of the pending order cancels the list: the working
/// order's and the pending order's CANCELED reports, then `listStatus` ALL_DONE.
#[tokio::test]
async fn oto_list_status_on_the_user_data_stream() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (_, holder) = h.trader("0", "100000").await;
    let (_, lk) = http(addr, "POST", "/api/v3/userDataStream", "", Some(&holder.0)).await;
    let lk = lk["listenKey"].as_str().unwrap().to_owned();
    let (mut user, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/{lk}"))
        .await
        .unwrap();
    let (status, r) = signed_post(
        addr,
        "/api/v3/orderList/oto",
        "symbol=BTCUSD&listClientOrderId=O1&workingType=LIMIT&workingSide=BUY&workingPrice=20000&workingQuantity=0.01&workingTimeInForce=GTC&pendingType=LIMIT_MAKER&pendingSide=SELL&pendingPrice=22000&pendingQuantity=0.01",
        &holder,
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let list = r["orderListId"].as_u64().unwrap();
    let pending = r["orderReports"][1]["orderId"].as_u64().unwrap();
    let mut news = 0;
    let started = loop {
        let m = next_json(&mut user).await;
        match m["e"].as_str().unwrap() {
            "executionReport" => {
                assert_eq!(
                    (m["x"].as_str(), m["g"].as_u64()),
                    (Some("NEW"), Some(list))
                );
                news += 1;
            }
            "listStatus" => break m,
            _ => {}
        }
    };
    assert_eq!(news, 1, "the working order reported before the list");
    assert_eq!(
        (
            started["c"].as_str(),
            started["l"].as_str(),
            started["C"].as_str(),
            started["O"].as_array().map(Vec::len)
        ),
        (Some("OTO"), Some("EXEC_STARTED"), Some("O1"), Some(2))
    );
    let q = format!("symbol=BTCUSD&orderId={pending}&timestamp={}", now_ms());
    let body = format!("{q}&signature={}", sign(&holder.1, &q));
    let (status, c) = http(addr, "DELETE", "/api/v3/order", &body, Some(&holder.0)).await;
    assert_eq!(status, 200, "{c}");
    let mut cancelled = Vec::new();
    let done = loop {
        let m = next_json(&mut user).await;
        match m["e"].as_str().unwrap() {
            "executionReport" => cancelled.push((
                m["i"].as_u64().unwrap(),
                m["X"].as_str().unwrap().to_owned(),
            )),
            "listStatus" => break m,
            _ => {}
        }
    };
    assert_eq!(cancelled.len(), 2, "{cancelled:?}");
    assert!(
        cancelled.iter().all(|(_, x)| x == "CANCELED"),
        "{cancelled:?}"
    );
    assert!(cancelled.iter().any(|(i, _)| *i == pending));
    assert_eq!(
        (done["l"].as_str(), done["L"].as_str()),
        (Some("ALL_DONE"), Some("ALL_DONE"))
    );
    let _ = stop.send(());
}

/// Defect: a listenKey outlived the API key that obtained it. After the key was revoked, its
/// open `/ws/<listenKey>` stream went on receiving the account's order and balance events, and
/// another key of the account asking for a listenKey was handed the same one and extended it,
/// so the revoked key's holder could read the account for as long as the owner's own client
/// kept its stream alive. The WebSocket API ends a revoked key's subscription
/// (`wsapi.rs`: `a_revoked_keys_user_data_subscription_ends`); a listenKey that a revoked key
/// was handed now ends the same way (`listenKeyExpired`), and the account's other keys get a
/// new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_keys_listen_key_ends() {
    let h = Harness::new();
    let (addr, stop) = start(&h).await;
    let (account, revoked) = h.trader_with("1", "0", "read,trade,keys").await;
    let k = h
        .ok(
            "POST",
            "/mapi/v1/admin/apiKey",
            &format!("account={account}&permissions=read&label=owner"),
            &h.admin,
        )
        .await;
    let owner = k["apiKey"].as_str().unwrap().to_owned();
    let (_, lk) = http(addr, "POST", "/api/v3/userDataStream", "", Some(&revoked.0)).await;
    let lk = lk["listenKey"].as_str().unwrap().to_owned();
    let (mut user, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/{lk}"))
        .await
        .unwrap();
    // The account's other key is handed the account's live listenKey (Binance's rule).
    let (_, again) = http(addr, "POST", "/api/v3/userDataStream", "", Some(&owner)).await;
    assert_eq!(again["listenKey"].as_str(), Some(lk.as_str()));
    let r = h
        .signed(
            "DELETE",
            "/mapi/v1/apiKey",
            &format!("apiKey={}", revoked.0),
            &revoked,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    // The open stream ends at once, not when the listenKey would have expired.
    let m = next_json(&mut user).await;
    assert_eq!(
        (m["e"].as_str(), m["listenKey"].as_str()),
        (Some("listenKeyExpired"), Some(lk.as_str())),
        "{m}"
    );
    // The listenKey is gone: keeping it alive is refused, and the owner's key gets a new one.
    let q = format!("listenKey={lk}");
    let (status, body) = http(addr, "PUT", "/api/v3/userDataStream", &q, Some(&owner)).await;
    assert_eq!(
        (status, body["code"].as_i64()),
        (400, Some(-1125)),
        "{body}"
    );
    let (_, fresh) = http(addr, "POST", "/api/v3/userDataStream", "", Some(&owner)).await;
    let fresh = fresh["listenKey"].as_str().unwrap();
    assert_ne!(fresh, lk);
    let _ = stop.send(());
}

/// Review finding: every market-data WebSocket subscribed to every account's user events:
/// one anonymous `/ws/<s>@trade` socket made the read model build each account's execution
/// reports, woke every market socket on them, and cut a market-only client off as "slow" when
/// other accounts' events overflowed its queue. A socket listens to user events only while it
/// has a user data stream. Failed on the old code (one receiver per market socket).
#[tokio::test]
async fn a_market_socket_does_not_listen_to_user_events() {
    let h = Harness::new();
    let (addr, _stop) = start(&h).await;
    let (_, seller) = h.trader("1", "0").await;
    let receivers = || h.state.read_model().user_tx.receiver_count();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/btcusd@trade"))
        .await
        .unwrap();
    let ask = |ws_id: u32, method: &str, param: &str| {
        Message::Text(
            format!(r#"{{"method":"{method}","params":["{param}"],"id":{ws_id}}}"#).into(),
        )
    };
    // Answered: the connection's loop runs.
    ws.send(ask(1, "SUBSCRIBE", "btcusd@depth")).await.unwrap();
    assert_eq!(next_json(&mut ws).await["id"], 1);
    assert_eq!(receivers(), 0, "a market socket listens to user events");
    // With a user data stream it does, and stops when the stream is gone.
    let (_, lk) = http(addr, "POST", "/api/v3/userDataStream", "", Some(&seller.0)).await;
    let lk = lk["listenKey"].as_str().unwrap().to_owned();
    ws.send(ask(2, "SUBSCRIBE", &lk)).await.unwrap();
    assert_eq!(next_json(&mut ws).await["id"], 2);
    assert_eq!(receivers(), 1);
    ws.send(ask(3, "UNSUBSCRIBE", &lk)).await.unwrap();
    assert_eq!(next_json(&mut ws).await["id"], 3);
    assert_eq!(receivers(), 0);
    // A socket opened on the listen key listens from the start.
    let (mut user, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/{lk}"))
        .await
        .unwrap();
    user.send(ask(4, "LIST_SUBSCRIPTIONS", "")).await.unwrap();
    let _ = next_json(&mut user).await;
    assert_eq!(receivers(), 1);
}
