//! A load measurement (ignored by default; run in release):
//! `cargo test --release -p api --test load -- --ignored --nocapture`
//!
//! Boots the API over the durable sequencer (journal with fdatasync) on 127.0.0.1:0 and drives,
//! one after the other in the same run and on the same server, signed `POST /api/v3/order` over
//! keep-alive HTTP/1.1 connections and signed `order.place` over WebSocket API connections
//! (`/ws-api/v3`), one account per connection, alternating buys and sells at one price
//! (self-trades allowed) so that books stay small. A REST connection has one request in flight
//! (HTTP/1.1); a WebSocket connection keeps `LOAD_WS_WINDOW` (default 1) in flight. The load
//! generator shares the machine's cores with the server. `LOAD_CONNECTIONS` (64),
//! `LOAD_SECONDS` (10 per phase), `LOAD_ONLY` (`rest` or `ws`), `LOAD_API_DIR` (a directory
//! for the API's SQLite history, e.g. on another disk or `/dev/shm`; default: beside the
//! journal).
//!
//! `LOAD_WORKERS` sets the runtime's worker threads (default: one per core, as `mediator
//! serve`). Each phase prints orders/s, p50/p99 and the process's CPU time (user + system, what
//! `getrusage(RUSAGE_SELF)` counts, read from `/proc/self/stat`) per order, client included,
//! and that CPU time split by thread name (`/proc/self/task/*/stat`): a measure that other
//! processes on the machine disturb far less than the wall-clock rate. And it prints how the
//! latency tail lines up with the history thread's SQLite writes (its `debug` events, target
//! `api::readmodel::HISTORY_WRITE_TARGET`): their count, size and duration, the share of the
//! phase they covered, and the p99 of the orders that completed in one against the others'.

mod common;

/// The allocator `mediator serve` runs with (`src/main.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use api::keys::{sign, Perms};
use common::now_ms;
use futures_util::{SinkExt, StreamExt};
use matching_engine::recovery::StoreConfig;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

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

#[test]
#[ignore = "a measurement; run in release with --ignored --nocapture"]
fn signed_order_placement_rest_and_ws_api() {
    {
        use tracing_subscriber::layer::SubscriberExt;
        let only_writes = tracing_subscriber::filter::filter_fn(|m| {
            m.target() == api::readmodel::HISTORY_WRITE_TARGET
        });
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(
            tracing_subscriber::Layer::with_filter(HistoryWrites, only_writes),
        ))
        .expect("the only subscriber");
    }
    // `mediator serve`'s runtime: one worker per core (2 here) unless `LOAD_WORKERS` says.
    let workers = std::env::var("LOAD_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        // As `mediator serve` (src/serve.rs).
        .on_thread_unpark(|| sched_hint::request_short_slice_once("tokio-rt-worker"))
        .build()
        .unwrap()
        .block_on(measure());
}

async fn measure() {
    let connections: usize = std::env::var("LOAD_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let seconds: u64 = std::env::var("LOAD_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().unwrap();
    // `LOAD_API_DIR`: the API's directory (its SQLite history) on another file system, as an
    // operator with a second disk would put it (a symbolic link `<data_dir>/api`), the journal
    // staying in the temporary directory.
    let api_dir = std::env::var_os("LOAD_API_DIR").map(|d| {
        let api = tempfile::tempdir_in(d).unwrap();
        std::os::unix::fs::symlink(api.path(), dir.path().join("api")).unwrap();
        api
    });
    let node = api::start_node(
        dir.path(),
        api::NodeConfig {
            api: api::ApiConfig {
                ip_weight_per_min: u64::MAX / 4,
                key_weight_per_min: u64::MAX / 4,
                orders_per_10s: u64::MAX / 4,
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
    // One account and key per connection, funded.
    let mut accounts = Vec::new();
    let mut admin_conn = BufReader::new(tokio::net::TcpStream::connect(admin_addr).await.unwrap());
    for i in 0..connections {
        let (s, a) = request(
            &mut admin_conn,
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
        let _ = i;
        let (_, k) = request(
            &mut admin_conn,
            "POST",
            "/mapi/v1/admin/apiKey",
            &signed(&format!("account={acct}&permissions=read,trade"), &admin.1),
            &admin.0,
        )
        .await;
        let k: serde_json::Value = serde_json::from_str(&k).unwrap();
        for (asset, amt) in [("BTC", "1000"), ("USD", "100000000")] {
            let (s, b) = request(
                &mut admin_conn,
                "POST",
                "/mapi/v1/admin/credit",
                &signed(
                    &format!("account={acct}&asset={asset}&amount={amt}&reference=l{acct}{asset}"),
                    &admin.1,
                ),
                &admin.0,
            )
            .await;
            assert_eq!(s, 200, "{b}");
        }
        accounts.push((
            k["apiKey"].as_str().unwrap().to_owned(),
            k["secretKey"].as_str().unwrap().to_owned(),
        ));
    }
    let only = std::env::var("LOAD_ONLY").unwrap_or_default();
    let window: usize = std::env::var("LOAD_WS_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let load = |f: &str| {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| f.to_owned())
    };
    if only != "ws" {
        let l0 = load("?");
        let cpu0 = Cpu::now();
        let m0 = node.sequencer.handle().metrics();
        let lat = rest_phase(addr, &accounts, seconds).await;
        group_commits("REST", m0, node.sequencer.handle().metrics(), lat.1);
        report("REST", connections, 1, &lat.0, lat.1, &l0);
        Cpu::now().since(&cpu0).print("REST", lat.0.len());
        history_writes("REST", &lat.0);
    }
    if only != "rest" {
        let l0 = load("?");
        let cpu0 = Cpu::now();
        let m0 = node.sequencer.handle().metrics();
        let lat = ws_phase(addr, &accounts, seconds, window).await;
        group_commits("WS-API", m0, node.sequencer.handle().metrics(), lat.1);
        report("WS-API", connections, window, &lat.0, lat.1, &l0);
        Cpu::now().since(&cpu0).print("WS-API", lat.0.len());
        history_writes("WS-API", &lat.0);
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    drop(state);
    node.shutdown().unwrap();
    drop(api_dir);
}

/// Prints the engine's group commits in a phase: how many, and commands per commit.
#[allow(clippy::float_arithmetic)] // rates for the printout, not money
fn group_commits(
    what: &str,
    before: matching_engine::sequencer::Metrics,
    after: matching_engine::sequencer::Metrics,
    seconds: f64,
) {
    let syncs = after.syncs - before.syncs;
    let applied = after.applied - before.applied;
    let sync_ms = (after.sync_nanos - before.sync_nanos) as f64 / 1e6;
    println!(
        "{what}: {syncs} group commits ({:.0}/s), {:.1} commands per commit, {:.0} µs per sync \
         (the engine thread in write + fdatasync {:.0}% of the time)",
        syncs as f64 / seconds,
        applied as f64 / syncs.max(1) as f64,
        sync_ms * 1e3 / syncs.max(1) as f64,
        sync_ms / 10.0 / seconds
    );
}

/// The history thread's writes seen so far: (when the write ended, how long it took, rows).
static WRITES: std::sync::Mutex<Vec<(Instant, Duration, u64)>> = std::sync::Mutex::new(Vec::new());

/// Collects the history thread's `api::readmodel::HISTORY_WRITE_TARGET` events into [`WRITES`].
struct HistoryWrites;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for HistoryWrites {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Fields {
            rows: u64,
            micros: u64,
        }
        impl tracing::field::Visit for Fields {
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                match field.name() {
                    "rows" => self.rows = value,
                    "micros" => self.micros = value,
                    _ => {}
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut f = Fields::default();
        event.record(&mut f);
        WRITES
            .lock()
            .unwrap()
            .push((Instant::now(), Duration::from_micros(f.micros), f.rows));
    }
}

/// How an order's latency relates to the history thread's SQLite writes in a phase: the share
/// of the phase they covered, and the p99 of the orders that completed during a write (or
/// within 5 ms after it: a stalled pipeline drains after the write) against the others'.
#[allow(clippy::float_arithmetic)] // shares for the printout, not money
fn history_writes(what: &str, orders: &[(Instant, Duration)]) {
    const AFTER: Duration = Duration::from_millis(5);
    let (Some(first), Some(last)) = (
        orders.iter().map(|o| o.0).min(),
        orders.iter().map(|o| o.0 + o.1).max(),
    ) else {
        return;
    };
    // (start, end + AFTER) of the writes that overlap the phase.
    let windows: Vec<(Instant, Instant, Duration, u64)> = WRITES
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.0 >= first && w.0.checked_sub(w.1).is_some_and(|s| s <= last))
        .map(|w| (w.0 - w.1, w.0 + AFTER, w.1, w.2))
        .collect();
    if windows.is_empty() {
        println!("{what}: no history write ended during the phase");
        return;
    }
    let during = |t: Instant| windows.iter().any(|w| w.0 <= t && t < w.1);
    let (mut inside, mut outside): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    for o in orders {
        if during(o.0 + o.1) {
            inside.push(o.1);
        } else {
            outside.push(o.1);
        }
    }
    let p99 = |v: &mut Vec<Duration>| {
        v.sort();
        v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let slow = orders.iter().filter(|o| o.1 >= AFTER).count();
    let slow_inside = orders
        .iter()
        .filter(|o| o.1 >= AFTER && during(o.0 + o.1))
        .count();
    let covered: Duration = windows.iter().map(|w| w.1 - w.0).sum();
    let n = windows.len() as f64;
    println!(
        "{what}: history: {} writes, {:.0} rows and {:.1} ms each; writes (+5 ms) covered {:.0}% of the phase; \
         orders completing in them {:.0}%, p99 {:.2} ms; the others p99 {:.2} ms; orders of 5 ms or more: {slow}, {:.0}% of them in a write",
        windows.len(),
        windows.iter().map(|w| w.3 as f64).sum::<f64>() / n,
        windows.iter().map(|w| w.2.as_secs_f64()).sum::<f64>() * 1e3 / n,
        100.0 * covered.as_secs_f64() / (last - first).as_secs_f64(),
        100.0 * inside.len() as f64 / orders.len() as f64,
        p99(&mut inside),
        p99(&mut outside),
        100.0 * slow_inside as f64 / slow.max(1) as f64,
    );
}

/// Clock ticks per second of `/proc`'s CPU times (`getconf CLK_TCK`: 100 on Linux).
const TICKS_PER_S: u64 = 100;

/// The process's CPU time (user + system, in clock ticks) and each live thread's, by name.
#[derive(Debug, Default)]
struct Cpu {
    total: u64,
    threads: std::collections::BTreeMap<String, u64>,
}

/// `(name, utime + stime)` of a `/proc/.../stat` line.
fn stat_ticks(path: &std::path::Path) -> Option<(String, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let name = s[open + 1..close].to_owned();
    // After the name: state (field 3) ... utime (14), stime (15).
    let f: Vec<&str> = s[close + 1..].split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((name, ticks))
}

impl Cpu {
    fn now() -> Cpu {
        let mut c = Cpu {
            total: stat_ticks(std::path::Path::new("/proc/self/stat")).map_or(0, |t| t.1),
            ..Default::default()
        };
        if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
            for e in dir.flatten() {
                if let Some((name, t)) = stat_ticks(&e.path().join("stat")) {
                    *c.threads.entry(name).or_default() += t;
                }
            }
        }
        c
    }

    fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            total: self.total.saturating_sub(before.total),
            threads: self
                .threads
                .iter()
                .map(|(n, t)| {
                    let b = before.threads.get(n).copied().unwrap_or(0);
                    (n.clone(), t.saturating_sub(b))
                })
                .filter(|(_, t)| *t > 0)
                .collect(),
        }
    }

    /// CPU µs per order, in all and by thread name.
    fn print(&self, what: &str, orders: usize) {
        // In tenths of a µs: one tick (10 ms) is 0.1 µs per order at 100,000 orders.
        let per = |ticks: u64| {
            let tenths = ticks * 10_000_000 / TICKS_PER_S / (orders.max(1) as u64);
            format!("{}.{}", tenths / 10, tenths % 10)
        };
        let mut by: Vec<_> = self.threads.iter().collect();
        by.sort_by(|a, b| b.1.cmp(a.1));
        let parts: Vec<String> = by
            .iter()
            .map(|(n, t)| format!("{n} {}", per(**t)))
            .collect();
        println!(
            "{what}: CPU {} µs/order (user+sys, client included; {} CPU-ms for {orders} orders); by thread µs/order: {}",
            per(self.total),
            self.total * 1000 / TICKS_PER_S,
            parts.join(", ")
        );
    }
}

/// Prints one row of the measurement.
#[allow(clippy::float_arithmetic)] // a rate for the printout, not money
fn report(
    what: &str,
    connections: usize,
    window: usize,
    orders: &[(Instant, Duration)],
    elapsed: f64,
    load: &str,
) {
    let mut all: Vec<Duration> = orders.iter().map(|o| o.1).collect();
    all.sort();
    let n = all.len();
    // Per mille, so that p99.9 is one too.
    let pct = |p: usize| all[(n * p / 1000).min(n - 1)];
    println!(
        "{what}: connections={connections} in_flight_per_connection={window} orders={n} seconds={elapsed:.1} orders/s={:.0} p50={:?} p99={:?} max={:?} (load average at start {load})",
        n as f64 / elapsed,
        pct(500),
        pct(990),
        all[n - 1]
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{what}: latency ms p10 {:.2} p25 {:.2} p50 {:.2} p75 {:.2} p90 {:.2} p95 {:.2} p99 {:.2} p99.9 {:.2}",
        ms(pct(100)),
        ms(pct(250)),
        ms(pct(500)),
        ms(pct(750)),
        ms(pct(900)),
        ms(pct(950)),
        ms(pct(990)),
        ms(pct(999))
    );
}

/// Signed `POST /api/v3/order` on one keep-alive connection per account for `seconds`.
async fn rest_phase(
    addr: std::net::SocketAddr,
    accounts: &[(String, String)],
    seconds: u64,
) -> (Vec<(Instant, Duration)>, f64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for key in accounts.iter().cloned() {
        tasks.push(tokio::spawn(async move {
            let mut c = BufReader::new(tokio::net::TcpStream::connect(addr).await.unwrap());
            // Grown as needed: 100,000 reserved up front (1.6 MB per connection, ~100 MB per
            // phase) put the kernel's zeroing of fresh huge pages into the CPU per order.
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let side = if i % 2 == 0 { "BUY" } else { "SELL" };
                let p = format!("symbol=BTCUSD&side={side}&type=LIMIT&timeInForce=GTC&quantity=0.001&price=30000&selfTradePreventionMode=NONE&newOrderRespType=ACK");
                let body = {
                    let q = format!("{p}&timestamp={}", now_ms());
                    format!("{q}&signature={}", sign(&key.1, &q))
                };
                let t0 = Instant::now();
                let (s, b) = request(&mut c, "POST", "/api/v3/order", &body, &key.0).await;
                lat.push((t0, t0.elapsed()));
                assert_eq!(s, 200, "{b}");
                i += 1;
            }
            lat
        }));
    }
    let t0 = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (all, t0.elapsed().as_secs_f64())
}

/// The `id` of a WebSocket API answer this server wrote (`{"id":N,"status":S,...`), and
/// whether its status is 200.
fn answer_id(text: &str) -> (u64, bool) {
    let rest = text.strip_prefix("{\"id\":").expect("an answer");
    let end = rest.find(',').expect("an id");
    let id = rest[..end].parse().expect("a numeric id");
    (id, rest[end..].starts_with(",\"status\":200,"))
}

/// Signed `order.place` on one WebSocket API connection per account for `seconds`, `window`
/// requests in flight on each.
async fn ws_phase(
    addr: std::net::SocketAddr,
    accounts: &[(String, String)],
    seconds: u64,
    window: usize,
) -> (Vec<(Instant, Duration)>, f64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for key in accounts.iter().cloned() {
        tasks.push(tokio::spawn(async move {
            // A small read buffer: tungstenite zero-fills all of it (128 KiB by default) on each
            // read, which cost the generator more CPU than the server's whole request path.
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .read_buffer_size(4 * 1024);
            let (ws, _) = tokio_tungstenite::connect_async_with_config(
                format!("ws://{addr}/ws-api/v3"),
                Some(config),
                true,
            )
            .await
            .unwrap();
            let order = |i: u64| {
                let side = if i % 2 == 0 { "BUY" } else { "SELL" };
                let ts = now_ms();
                // The parameters sorted by name, as the signature covers them.
                let payload = format!("apiKey={}&newOrderRespType=ACK&price=30000&quantity=0.001&selfTradePreventionMode=NONE&side={side}&symbol=BTCUSD&timeInForce=GTC&timestamp={ts}&type=LIMIT", key.0);
                let sig = sign(&key.1, &payload);
                format!("{{\"id\":{i},\"method\":\"order.place\",\"params\":{{\"symbol\":\"BTCUSD\",\"side\":\"{side}\",\"type\":\"LIMIT\",\"timeInForce\":\"GTC\",\"quantity\":\"0.001\",\"price\":\"30000\",\"selfTradePreventionMode\":\"NONE\",\"newOrderRespType\":\"ACK\",\"apiKey\":\"{}\",\"timestamp\":{ts},\"signature\":\"{sig}\"}}}}", key.0)
            };
            let mut lat = Vec::new();
            if window == 1 {
                // One in flight: send, then read the answer, on the one stream (no split halves
                // and their lock, no map of ids in flight).
                let mut ws = ws;
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    ws.send(tokio_tungstenite::tungstenite::Message::Text(order(i).into()))
                        .await
                        .unwrap();
                    loop {
                        let m = ws.next().await.expect("open").expect("no error");
                        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                            let (id, ok) = answer_id(t.as_str());
                            assert!(ok, "{}", t.as_str());
                            assert_eq!(id, i, "the answer to the request in flight");
                            break;
                        }
                    }
                    lat.push((t0, t0.elapsed()));
                    i += 1;
                }
                let _ = ws.close(None).await;
                return lat;
            }
            let (mut tx, mut rx) = ws.split();
            let mut sent_at: std::collections::HashMap<u64, Instant> = Default::default();
            let mut next = 0u64;
            for _ in 0..window {
                sent_at.insert(next, Instant::now());
                tx.send(tokio_tungstenite::tungstenite::Message::Text(order(next).into()))
                    .await
                    .unwrap();
                next += 1;
            }
            while !sent_at.is_empty() {
                let m = rx.next().await.expect("open").expect("no error");
                let tokio_tungstenite::tungstenite::Message::Text(t) = m else {
                    continue;
                };
                let (id, ok) = answer_id(t.as_str());
                assert!(ok, "{}", t.as_str());
                let t0 = sent_at.remove(&id).expect("an id in flight");
                lat.push((t0, t0.elapsed()));
                if Instant::now() < deadline {
                    sent_at.insert(next, Instant::now());
                    tx.send(tokio_tungstenite::tungstenite::Message::Text(order(next).into()))
                        .await
                        .unwrap();
                    next += 1;
                }
            }
            let _ = tx.close().await;
            lat
        }));
    }
    let t0 = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (all, t0.elapsed().as_secs_f64())
}
