//! A WebSocket fan-out measurement (ignored by default; run in release):
//! `cargo test --release -p api --test wsfanout -- --ignored --nocapture`
//! (env `WS_SUBSCRIBERS`, default 1000; `WS_ORDERS`, default 2000; `WS_RATE` orders/s, default
//! 500). Each subscriber needs two file descriptors (client and server end of one socket):
//! with `ulimit -n` below ~2,100 run it as `ulimit -n 4096; cargo test ...`.
//!
//! Boots the API over the durable sequencer (journal with fdatasync) on 127.0.0.1:0, opens N
//! `/ws/btcusd@depth` connections, then places M resting buys from one signed client (one API key, 8
//! keep-alive connections), paced at the given rate, each at its own price (10000 + i), so that
//! every depth diff names the orders it carries. For every (subscriber, diff) it records:
//! - **submit lag**: receive instant − the instant order i was written to the socket (the
//!   earliest order in the diff; monotonic clock, µs). This is the end-to-end figure and
//!   includes HTTP, the journal's fdatasync, the read model and the fan-out;
//! - **ack lag**: receive instant − the instant the client read the order's HTTP answer (µs);
//!   negative when the diff overtook the answer, counted apart and recorded as 0;
//! - **event lag**: receive wall clock − the diff's `E` (the engine's batch time, whole ms, so
//!   this is up to 1 ms high).
//!
//! Subscribers run in the server's process on a runtime of their own (one worker thread); the
//! order client runs on the server's runtime (two workers). All share the machine's two cores.

mod common;

use api::keys::{sign, Perms};
use common::now_ms;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use matching_engine::recovery::StoreConfig;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

const BASE_PRICE: u64 = 10_000;
/// Keep-alive HTTP connections the paced orders are spread over.
const ORDER_CONNECTIONS: u32 = 8;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

async fn request(
    r: &mut BufReader<tokio::net::TcpStream>,
    method: &str,
    path: &str,
    body: &str,
    key: &str,
) -> (u16, String) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nX-MBX-APIKEY: {key}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    r.get_mut().write_all(req.as_bytes()).await.unwrap();
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let status: u16 = line[9..12].parse().unwrap();
    let mut len = 0usize;
    loop {
        line.clear();
        r.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.unwrap();
    (status, String::from_utf8(buf).unwrap())
}

/// The digits after `"E":`.
fn event_ms(s: &str) -> Option<u64> {
    let i = s.find("\"E\":")? + 4;
    let d: String = s[i..].chars().take_while(char::is_ascii_digit).collect();
    d.parse().ok()
}

/// The smallest and largest order index among the bid levels of a depth diff (price 10000 + i),
/// scanned without a JSON parser to keep the subscribers cheap.
fn bid_orders(s: &str) -> Option<(u32, u32)> {
    let mut rest = &s[s.find("\"b\":[")? + 5..];
    let (mut lo, mut hi) = (u32::MAX, 0u32);
    while let Some(r) = rest.strip_prefix("[\"") {
        let end = r.find('.')?;
        let price: u64 = r[..end].parse().ok()?;
        let i = u32::try_from(price.checked_sub(BASE_PRICE)?).ok()?;
        lo = lo.min(i);
        hi = hi.max(i);
        rest = &r[r.find(']')? + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    (lo != u32::MAX).then_some((lo, hi))
}

/// One received diff: receive instant, receive wall clock (µs), `E` (ms), first and last order.
type Rec = (Instant, u64, u64, u32, u32);

struct Sub {
    recs: Vec<Rec>,
    slow_closed: bool,
    other_end: Option<String>,
    saw_last: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run in release with --ignored --nocapture"]
async fn depth_fanout_to_many_subscribers() {
    let subscribers = env("WS_SUBSCRIBERS", 1000) as usize;
    let orders = env("WS_ORDERS", 2000) as u32;
    let rate = env("WS_RATE", 500).max(1);
    let dir = tempfile::tempdir().unwrap();
    // Every order rests, so one account holds them all.
    let mut engine = matching_engine::EngineConfig::default();
    engine.limits.max_open_orders_per_account = orders + 16;
    let node = api::start_node(
        dir.path(),
        api::NodeConfig {
            engine,
            api: api::ApiConfig {
                ip_weight_per_min: u64::MAX / 4,
                key_weight_per_min: u64::MAX / 4,
                orders_per_10s: u64::MAX / 4,
                max_connections: subscribers + 64,
                // Every subscriber connects from 127.0.0.1.
                max_connections_per_ip: subscribers + 64,
                max_streams_per_ip: subscribers,
                ws_connects_per_5min: subscribers as u64,
                ..Default::default()
            },
            store: StoreConfig {
                snapshot_every: 0,
                snapshots_kept: 2,
                ..StoreConfig::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let state = node.state.clone();
    let admin = state
        .create_key(0, Perms(Perms::ADMIN.0 | Perms::READ.0), "admin")
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve(listener, state.clone(), async {
        let _ = stop_rx.await;
    }));
    // The admin routes are on their own listener.
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin_listener.local_addr().unwrap();
    tokio::spawn(api::serve_admin(
        admin_listener,
        state.clone(),
        std::future::pending(),
    ));

    let signed = |params: &str, secret: &str| {
        let sep = if params.is_empty() { "" } else { "&" };
        let q = format!("{params}{sep}timestamp={}&recvWindow=60000", now_ms());
        format!("{q}&signature={}", sign(secret, &q))
    };
    // One funded trading account (through the admin listener).
    let mut admin_http = BufReader::new(tokio::net::TcpStream::connect(admin_addr).await.unwrap());
    let (s, a) = request(
        &mut admin_http,
        "POST",
        "/mapi/v1/admin/account",
        &signed("", &admin.1),
        &admin.0,
    )
    .await;
    assert_eq!(s, 200, "{a}");
    let acct = serde_json::from_str::<serde_json::Value>(&a).unwrap()["account"]
        .as_u64()
        .unwrap();
    let (_, k) = request(
        &mut admin_http,
        "POST",
        "/mapi/v1/admin/apiKey",
        &signed(&format!("account={acct}&permissions=read,trade"), &admin.1),
        &admin.0,
    )
    .await;
    let k: serde_json::Value = serde_json::from_str(&k).unwrap();
    let (s, b) = request(
        &mut admin_http,
        "POST",
        "/mapi/v1/admin/credit",
        &signed(
            &format!("account={acct}&asset=USD&amount=1000000000&reference=ws{acct}"),
            &admin.1,
        ),
        &admin.0,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let key = (
        k["apiKey"].as_str().unwrap().to_owned(),
        k["secretKey"].as_str().unwrap().to_owned(),
    );

    // The subscribers, on a runtime of their own (one thread) so that they do not queue in
    // front of the server's tasks.
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let connected = Arc::new(AtomicUsize::new(0));
    let t_connect = Instant::now();
    let socks = clients
        .spawn(async move {
            let mut socks = Vec::with_capacity(subscribers);
            for _ in 0..subscribers {
                // tungstenite zero-fills its whole read buffer (128 KiB by default) on every
                // read poll (snapview/tungstenite-rs#547); the subscribers read small diffs.
                let cfg = WebSocketConfig::default().read_buffer_size(4 * 1024);
                let (ws, _) = tokio_tungstenite::connect_async_with_config(
                    format!("ws://{addr}/ws/btcusd@depth"),
                    Some(cfg),
                    false,
                )
                .await
                .expect("WebSocket connect (raise ulimit -n?)");
                socks.push(ws);
            }
            socks
        })
        .await
        .unwrap();
    let connect_s = t_connect.elapsed().as_secs_f64();
    let budget = Duration::from_secs(u64::from(orders) / rate + 60);
    let mut subs = Vec::with_capacity(subscribers);
    for mut ws in socks {
        let connected = connected.clone();
        subs.push(clients.spawn(async move {
            connected.fetch_add(1, Ordering::Relaxed);
            let mut sub = Sub {
                recs: Vec::with_capacity(orders as usize + 16),
                slow_closed: false,
                other_end: None,
                saw_last: false,
            };
            let deadline = tokio::time::Instant::now() + budget;
            loop {
                let m = match tokio::time::timeout_at(deadline, ws.next()).await {
                    Err(_) => {
                        sub.other_end = Some("timed out".into());
                        break;
                    }
                    Ok(None) => {
                        sub.other_end = Some("stream ended".into());
                        break;
                    }
                    Ok(Some(Err(e))) => {
                        sub.other_end = Some(e.to_string());
                        break;
                    }
                    Ok(Some(Ok(m))) => m,
                };
                match m {
                    Message::Text(t) => {
                        let at = Instant::now();
                        let wall = wall_us();
                        let s = t.as_str();
                        if let (Some(e), Some((lo, hi))) = (event_ms(s), bid_orders(s)) {
                            sub.recs.push((at, wall, e, lo, hi));
                            if hi + 1 >= orders {
                                sub.saw_last = true;
                                break;
                            }
                        }
                    }
                    Message::Close(c) => {
                        sub.slow_closed = c.as_ref().is_some_and(|f| {
                            f.code == CloseCode::Policy && f.reason.contains("slow")
                        });
                        sub.other_end = Some(format!("closed: {c:?}"));
                        break;
                    }
                    _ => {}
                }
            }
            drop(ws);
            sub
        }));
    }
    // Every connection has subscribed to the market channel before the first order.
    while connected.load(Ordering::Relaxed) < subscribers {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The orders, paced: order i is due at start + i / rate and goes out on connection
    // i % ORDER_CONNECTIONS, so that one slow answer (a journal sync) does not hold back the next.
    let t_orders = Instant::now();
    let tick = Duration::from_secs_f64(1.0 / rate as f64);
    let mut senders = Vec::new();
    for c in 0..ORDER_CONNECTIONS {
        let key = key.clone();
        senders.push(tokio::spawn(async move {
            let mut http = BufReader::new(tokio::net::TcpStream::connect(addr).await.unwrap());
            let mut out = Vec::new();
            for i in (c..orders).step_by(ORDER_CONNECTIONS as usize) {
                tokio::time::sleep_until((t_orders + tick * i).into()).await;
                let price = BASE_PRICE + u64::from(i);
                let p = format!("symbol=BTCUSD&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.001&price={price}&newOrderRespType=ACK");
                let body = {
                    let q = format!("{p}&timestamp={}", now_ms());
                    format!("{q}&signature={}", sign(&key.1, &q))
                };
                let t0 = Instant::now();
                let (s, b) = request(&mut http, "POST", "/api/v3/order", &body, &key.0).await;
                let t1 = Instant::now();
                assert_eq!(s, 200, "{b}");
                out.push((i, t0, t1));
            }
            out
        }));
    }
    let mut submit = vec![t_orders; orders as usize];
    let mut ack = vec![t_orders; orders as usize];
    let mut place = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for s in senders {
        for (i, t0, t1) in s.await.unwrap() {
            place.saturating_record((t1 - t0).as_micros() as u64);
            submit[i as usize] = t0;
            ack[i as usize] = t1;
        }
    }
    let orders_s = t_orders.elapsed().as_secs_f64();

    let mut results = Vec::with_capacity(subscribers);
    for s in subs {
        results.push(s.await.unwrap());
    }
    let drain_s = t_orders.elapsed().as_secs_f64() - orders_s;
    let (_, metrics) = request(&mut admin_http, "GET", "/metrics", "", &key.0).await;

    let new_h = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
    let (mut h_submit, mut h_ack, mut h_event) = (new_h(), new_h(), new_h());
    let mut before_ack = 0u64;
    let mut delivered = 0u64;
    let (mut min_msgs, mut max_msgs) = (usize::MAX, 0usize);
    let mut slow = 0usize;
    let mut other_end = Vec::new();
    let mut missed_last = 0usize;
    let mut orders_per_msg = 0u64;
    for r in &results {
        min_msgs = min_msgs.min(r.recs.len());
        max_msgs = max_msgs.max(r.recs.len());
        slow += usize::from(r.slow_closed);
        missed_last += usize::from(!r.saw_last);
        if let (false, Some(e)) = (r.slow_closed, &r.other_end) {
            other_end.push(e.clone());
        }
        for &(at, wall, e, lo, hi) in &r.recs {
            delivered += 1;
            orders_per_msg += u64::from(hi - lo + 1);
            let i = lo as usize;
            h_submit.saturating_record(at.duration_since(submit[i]).as_micros() as u64);
            match at.checked_duration_since(ack[i]) {
                Some(d) => h_ack.saturating_record(d.as_micros() as u64),
                None => {
                    before_ack += 1;
                    h_ack.saturating_record(0);
                }
            }
            h_event.saturating_record(wall.saturating_sub(e * 1000));
        }
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let line = |name: &str, h: &Histogram<u64>| {
        println!(
            "  {name:<12} p50={:.2}ms p99={:.2}ms p99.9={:.2}ms max={:.2}ms",
            ms(h, 0.5),
            ms(h, 0.99),
            ms(h, 0.999),
            h.max() as f64 / 1000.0
        );
    };
    println!(
        "subscribers={subscribers} (connected in {connect_s:.1}s) orders={orders} target_rate={rate}/s \
         achieved={:.0}/s in {orders_s:.1}s, drain after last order {drain_s:.2}s",
        f64::from(orders) / orders_s
    );
    println!(
        "delivered={delivered} diffs (per subscriber min={min_msgs} max={max_msgs}; {:.2} orders per diff, mean order-index span {:.1}); \
         slow-consumer disconnects={slow}; other ends={}; missed the last order={missed_last}",
        f64::from(orders) / max_msgs.max(1) as f64,
        orders_per_msg as f64 / delivered.max(1) as f64,
        other_end.len()
    );
    if let Some(e) = other_end.first() {
        println!("  first other end: {e}");
    }
    line("place (HTTP)", &place);
    line("submit lag", &h_submit);
    line("ack lag", &h_ack);
    println!("    (diff arrived before the order's HTTP answer: {before_ack})");
    line("event (E)", &h_event);
    // Slow disconnects count only backlog overflows and timed-out sends, not the hang-ups at the end.
    println!("  server metrics after the subscribers hung up:");
    for l in metrics.lines().filter(|l| l.starts_with("mediator_ws_")) {
        println!("  {l}");
    }

    let _ = stop_tx.send(());
    let _ = server.await;
    drop(state);
    node.shutdown().unwrap();
    clients.shutdown_background();
}
