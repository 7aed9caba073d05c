//! The order and trade history after a crash that left the SQLite history behind the journal.
//!
//! A crash between the journal's fsync and the history's commit is simulated without killing
//! anything: another connection holds SQLite's write lock, so the history thread cannot commit
//! while trading goes on (handlers answer from memory, as after every group commit); the data
//! directory is then copied (journal, snapshots and the history as committed: a crash image) and
//! a node started on the copy. Snapshots are taken every few commands, so pruning runs while the
//! history is behind. After the restart every acknowledged order is found by id and by client id,
//! every trade is in `myTrades`, the views equal what the crashed node served, balances plus
//! commissions are conserved to the unit, and the history gap is 0.

mod common;

use api::keys::sign;
use axum::body::Body;
use axum::http::Request;
use common::{now_ms, Rng};
use http_body_util::BodyExt;
use matching_engine::recovery::StoreConfig;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use tower::ServiceExt;

const ACCOUNTS: usize = 6;
const BTC_EACH: u64 = 10;
const USD_EACH: u64 = 1_000_000;

struct Server {
    node: api::Node,
    router: axum::Router,
}

fn boot(dir: &Path) -> Server {
    let cfg = api::NodeConfig {
        store: StoreConfig {
            snapshot_every: 8,
            snapshots_kept: 2,
            ..StoreConfig::default()
        },
        ..api::NodeConfig::default()
    };
    let node = api::start_node(dir, cfg).unwrap();
    Server {
        router: api::app(node.state.clone()),
        node,
    }
}

type Key = (String, String);

async fn try_call(s: &Server, method: &str, path: &str, params: &str, key: &Key) -> (u16, Value) {
    let q = format!(
        "{params}{}timestamp={}",
        if params.is_empty() { "" } else { "&" },
        now_ms()
    );
    let signed = format!("{q}&signature={}", sign(&key.1, &q));
    let req = if method == "POST" {
        Request::post(path)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("X-MBX-APIKEY", &key.0)
            .body(Body::from(signed))
    } else {
        Request::builder()
            .method(method)
            .uri(format!("{path}?{signed}"))
            .header("X-MBX-APIKEY", &key.0)
            .body(Body::empty())
    };
    let res = s.router.clone().oneshot(req.unwrap()).await.unwrap();
    let status = res.status().as_u16();
    let v = serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    (status, v)
}

async fn call(s: &Server, method: &str, path: &str, params: &str, key: &Key) -> Value {
    let (status, v) = try_call(s, method, path, params, key).await;
    assert_eq!(status, 200, "{method} {path} {params}: {v}");
    v
}

fn admin_key(s: &Server) -> Key {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&s.node.admin_key.path).unwrap()).unwrap();
    (
        v["apiKey"].as_str().unwrap().to_owned(),
        v["secretKey"].as_str().unwrap().to_owned(),
    )
}

/// Creates the trading accounts, credits them, and returns their keys.
async fn setup(s: &Server) -> Vec<Key> {
    let admin = admin_key(s);
    let mut keys = Vec::new();
    for _ in 0..ACCOUNTS {
        let a = call(s, "POST", "/mapi/v1/admin/account", "", &admin).await["account"]
            .as_u64()
            .unwrap();
        let k = call(
            s,
            "POST",
            "/mapi/v1/admin/apiKey",
            &format!("account={a}&permissions=read,trade"),
            &admin,
        )
        .await;
        for (asset, amount) in [("BTC", BTC_EACH), ("USD", USD_EACH)] {
            call(
                s,
                "POST",
                "/mapi/v1/admin/credit",
                &format!("account={a}&asset={asset}&amount={amount}&reference=r{a}{asset}"),
                &admin,
            )
            .await;
        }
        keys.push((
            k["apiKey"].as_str().unwrap().to_owned(),
            k["secretKey"].as_str().unwrap().to_owned(),
        ));
    }
    keys
}

/// An acknowledged order: account index, order id, client order id.
type Acked = (usize, u64, String);

/// Places `n` crossing orders from random accounts (limit orders around one price, some IOC and
/// market orders, some cancels); returns the acknowledged ones and the trade ids seen in fills.
async fn trade(
    s: &Server,
    keys: &[Key],
    rng: &mut Rng,
    tag: &str,
    n: usize,
    acked: &mut Vec<Acked>,
) -> u64 {
    let mut fills = 0;
    for i in 0..n {
        let a = rng.below(keys.len() as u64) as usize;
        if rng.below(10) == 0 {
            // Cancel one of this account's open orders, if it has one.
            let open = call(s, "GET", "/api/v3/openOrders", "symbol=BTCUSD", &keys[a]).await;
            if let Some(o) = open.as_array().unwrap().first() {
                let id = o["orderId"].as_u64().unwrap();
                call(
                    s,
                    "DELETE",
                    "/api/v3/order",
                    &format!("symbol=BTCUSD&orderId={id}"),
                    &keys[a],
                )
                .await;
                continue;
            }
        }
        let side = if rng.below(2) == 0 { "BUY" } else { "SELL" };
        let qty = format!("0.00{}", 1 + rng.below(9));
        let price = 29_990 + rng.below(21);
        let kind = match rng.below(8) {
            0 => format!("type=MARKET&quantity={qty}"),
            1 => format!("type=LIMIT&timeInForce=IOC&quantity={qty}&price={price}"),
            _ => format!("type=LIMIT&timeInForce=GTC&quantity={qty}&price={price}"),
        };
        let cid = format!("{tag}-{i}");
        let (status, v) = try_call(
            s,
            "POST",
            "/api/v3/order",
            &format!(
                "symbol=BTCUSD&side={side}&{kind}&newClientOrderId={cid}&newOrderRespType=FULL"
            ),
            &keys[a],
        )
        .await;
        if status == 200 {
            fills += v["fills"].as_array().map_or(0, |f| f.len() as u64);
            acked.push((a, v["orderId"].as_u64().unwrap(), cid));
        } else {
            // A market order into an empty side is refused: nothing was placed.
            assert!(kind.starts_with("type=MARKET"), "{side} {kind}: {v}");
        }
    }
    fills
}

/// Everything a user can read back, per account, and the public book.
async fn views(s: &Server, keys: &[Key]) -> BTreeMap<String, Value> {
    let mut v = BTreeMap::new();
    for (i, k) in keys.iter().enumerate() {
        for (name, path, params) in [
            ("account", "/api/v3/account", ""),
            ("allOrders", "/api/v3/allOrders", "symbol=BTCUSD&limit=1000"),
            ("myTrades", "/api/v3/myTrades", "symbol=BTCUSD&limit=1000"),
            ("openOrders", "/api/v3/openOrders", "symbol=BTCUSD"),
        ] {
            let mut r = call(s, "GET", path, params, k).await;
            if name == "account" {
                // The time of the answer.
                r.as_object_mut().unwrap().remove("updateTime");
            }
            v.insert(format!("{i}/{name}"), r);
        }
    }
    let res = s
        .router
        .clone()
        .oneshot(
            Request::get("/api/v3/depth?symbol=BTCUSD&limit=1000")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    v.insert(
        "depth".into(),
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap(),
    );
    v
}

/// Units (1e-8) of a decimal string.
fn units(s: &str) -> u64 {
    let (i, f) = s.split_once('.').unwrap_or((s, ""));
    let f = format!("{f:0<8}");
    i.parse::<u64>().unwrap() * 100_000_000 + f[..8].parse::<u64>().unwrap()
}

/// Σ (free + locked) per asset over the accounts and the fee account (whose balance holds every
/// commission).
async fn totals(s: &Server, keys: &[Key]) -> BTreeMap<String, u64> {
    let mut t = BTreeMap::new();
    let admin = admin_key(s);
    for k in keys.iter().chain([&admin]) {
        let acct = call(s, "GET", "/api/v3/account", "", k).await;
        for b in acct["balances"].as_array().unwrap() {
            *t.entry(b["asset"].as_str().unwrap().to_owned())
                .or_default() +=
                units(b["free"].as_str().unwrap()) + units(b["locked"].as_str().unwrap());
        }
    }
    t
}

/// Copies a stopped-in-time data directory: the journal and snapshots, and the API's files as
/// committed (the SQLite shared-memory index is rebuilt by SQLite from the WAL).
fn crash_image(from: &Path, to: &Path) {
    for sub in ["journal", "api"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for e in std::fs::read_dir(from.join(sub)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            if e.file_type().unwrap().is_file() && !name.ends_with("-shm") {
                std::fs::copy(e.path(), to.join(sub).join(&name)).unwrap();
            }
        }
    }
}

async fn history_gap(s: &Server) -> u64 {
    s.node.state.read_model().read().history_gap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_behind_the_journal_is_regenerated_at_start_up() {
    for seed in [1u64, 2, 3] {
        let live = tempfile::tempdir().unwrap();
        let s = boot(live.path());
        let keys = setup(&s).await;
        let mut rng = Rng(seed);
        let mut acked = Vec::new();
        trade(&s, &keys, &mut rng, "before", 30, &mut acked).await;
        assert!(s.node.state.read_model().wait_persisted().await);

        // The history stops committing; trading goes on.
        let lock = rusqlite::Connection::open(live.path().join("api/api.sqlite")).unwrap();
        lock.execute_batch("BEGIN IMMEDIATE").unwrap();
        let floor = s.node.state.read_model().store.history_seq().unwrap();
        let fills = trade(&s, &keys, &mut rng, "after", 120, &mut acked).await;
        assert!(fills > 0, "seed {seed}: the workload trades");
        let before = views(&s, &keys).await;
        let crashed = tempfile::tempdir().unwrap();
        crash_image(live.path(), crashed.path());
        lock.execute_batch("ROLLBACK").unwrap();
        drop(s.router);
        s.node.shutdown().unwrap();

        // Restart on the crash image.
        let s = boot(crashed.path());
        for (a, id, cid) in &acked {
            let by_id = call(
                &s,
                "GET",
                "/api/v3/order",
                &format!("symbol=BTCUSD&orderId={id}"),
                &keys[*a],
            )
            .await;
            assert_eq!(by_id["clientOrderId"], cid.as_str(), "seed {seed}");
            let by_cid = call(
                &s,
                "GET",
                "/api/v3/order",
                &format!("symbol=BTCUSD&origClientOrderId={cid}"),
                &keys[*a],
            )
            .await;
            assert_eq!(by_cid["orderId"], *id, "seed {seed}");
        }
        let after = views(&s, &keys).await;
        for (name, v) in &before {
            assert_eq!(&after[name], v, "seed {seed}: {name} after the restart");
        }
        let t = totals(&s, &keys).await;
        assert_eq!(
            t["BTC"],
            ACCOUNTS as u64 * BTC_EACH * 100_000_000,
            "seed {seed}"
        );
        assert_eq!(
            t["USD"],
            ACCOUNTS as u64 * USD_EACH * 100_000_000,
            "seed {seed}"
        );
        assert_eq!(history_gap(&s).await, 0, "seed {seed}");
        assert_eq!(
            s.node.recovery.floor,
            Some(floor),
            "seed {seed}: the replay went through the history's floor"
        );

        // Once more, after a clean stop: nothing changes, nothing is missing.
        drop(s.router);
        s.node.shutdown().unwrap();
        let s = boot(crashed.path());
        assert_eq!(history_gap(&s).await, 0, "seed {seed}");
        let again = views(&s, &keys).await;
        assert_eq!(again, before, "seed {seed}");
        drop(s.router);
        s.node.shutdown().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_older_than_the_kept_journal_is_reported_as_a_gap() {
    // A history from before the floor was kept (or restored from an old backup): the journal
    // and snapshots no longer reach back to it. The engine's state is exact; the gap is counted.
    let live = tempfile::tempdir().unwrap();
    let s = boot(live.path());
    let keys = setup(&s).await;
    let mut rng = Rng(7);
    let mut acked = Vec::new();
    trade(&s, &keys, &mut rng, "old", 10, &mut acked).await;
    assert!(s.node.state.read_model().wait_persisted().await);
    let old = tempfile::tempdir().unwrap();
    {
        let lock = rusqlite::Connection::open(live.path().join("api/api.sqlite")).unwrap();
        lock.execute_batch("BEGIN IMMEDIATE").unwrap();
        crash_image(live.path(), old.path());
        lock.execute_batch("ROLLBACK").unwrap();
    }
    let stale = s.node.state.read_model().store.history_seq().unwrap();
    trade(&s, &keys, &mut rng, "new", 80, &mut acked).await;
    assert!(s.node.state.read_model().wait_persisted().await);
    // The history commits every `PERSIST_EVERY` (200 ms): the snapshots taken while it lagged
    // kept the journal back to its floor. Now that the floor is past `stale`, later snapshots
    // prune the files that reached back to `stale`.
    trade(&s, &keys, &mut rng, "newer", 40, &mut acked).await;
    assert!(s.node.state.read_model().wait_persisted().await);
    let before = views(&s, &keys).await;
    drop(s.router);
    s.node.shutdown().unwrap();

    let image = tempfile::tempdir().unwrap();
    crash_image(live.path(), image.path());
    std::fs::remove_dir_all(image.path().join("api")).unwrap();
    std::fs::rename(old.path().join("api"), image.path().join("api")).unwrap();
    let s = boot(image.path());
    assert_eq!(s.node.recovery.floor, None, "the floor is out of reach");
    let seq = s.node.state.read_model().applied();
    assert_eq!(history_gap(&s).await, seq - stale);
    let after = views(&s, &keys).await;
    // Open orders placed in the gap have no history record: what the engine knows of them is
    // exact, their times and quote totals are not known.
    let known = |v: &Value| -> Vec<Value> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|o| {
                let f = [
                    "orderId",
                    "clientOrderId",
                    "side",
                    "price",
                    "origQty",
                    "executedQty",
                ];
                Value::Array(f.iter().map(|f| o[*f].clone()).collect())
            })
            .collect()
    };
    for (i, _) in keys.iter().enumerate() {
        let (a, o) = (format!("{i}/account"), format!("{i}/openOrders"));
        assert_eq!(after[&a], before[&a], "{a}");
        assert_eq!(known(&after[&o]), known(&before[&o]), "{o}");
    }
    assert_eq!(after["depth"], before["depth"]);
    let t = totals(&s, &keys).await;
    assert_eq!(t["BTC"], ACCOUNTS as u64 * BTC_EACH * 100_000_000);
    assert_eq!(t["USD"], ACCOUNTS as u64 * USD_EACH * 100_000_000);
    drop(s.router);
    s.node.shutdown().unwrap();
}

/// Issue 9: an OTO waiting for its working order survives a restart (engine recovery from the
/// snapshots and journal, read model rebuilt from the engine and the history): the pending order
/// still answers PENDING_NEW in its list, and a fill of the working order after the restart
/// places it.
#[tokio::test]
async fn an_oto_list_survives_a_restart_and_places_its_pending_order_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = boot(dir.path());
    let keys = setup(&s).await;
    let r = call(
        &s,
        "POST",
        "/api/v3/orderList/oto",
        "symbol=BTCUSD&listClientOrderId=keep&workingType=LIMIT&workingSide=BUY&workingPrice=20000&workingQuantity=0.5&workingTimeInForce=GTC&pendingType=LIMIT&pendingSide=SELL&pendingPrice=22000&pendingQuantity=0.5&pendingTimeInForce=GTC&pendingClientOrderId=later",
        &keys[0],
    )
    .await;
    let list = r["orderListId"].as_u64().unwrap();
    let pending = r["orderReports"][1]["orderId"].as_u64().unwrap();
    // Enough commands after it for a snapshot (every 8) to hold the list.
    for i in 0..10 {
        call(
            &s,
            "POST",
            "/api/v3/order",
            &format!(
                "symbol=BTCUSD&side=SELL&type=LIMIT&timeInForce=GTC&quantity=0.01&price={}",
                30000 + i
            ),
            &keys[1],
        )
        .await;
    }
    drop(s.router);
    s.node.shutdown().unwrap();
    let s = boot(dir.path());
    let o = call(
        &s,
        "GET",
        "/api/v3/order",
        &format!("symbol=BTCUSD&orderId={pending}"),
        &keys[0],
    )
    .await;
    assert_eq!(
        (
            o["status"].as_str(),
            o["orderListId"].as_u64(),
            o["clientOrderId"].as_str()
        ),
        (Some("PENDING_NEW"), Some(list), Some("later"))
    );
    let q = call(
        &s,
        "GET",
        "/api/v3/orderList",
        "origClientOrderId=keep",
        &keys[0],
    )
    .await;
    assert_eq!(
        (
            q["contingencyType"].as_str(),
            q["listOrderStatus"].as_str(),
            q["orders"].as_array().map(Vec::len)
        ),
        (Some("OTO"), Some("EXECUTING"), Some(2)),
        "{q}"
    );
    // The working order fills after the restart: the pending order is placed.
    call(
        &s,
        "POST",
        "/api/v3/order",
        "symbol=BTCUSD&side=SELL&type=LIMIT&timeInForce=GTC&quantity=0.5&price=20000",
        &keys[2],
    )
    .await;
    let o = call(
        &s,
        "GET",
        "/api/v3/order",
        &format!("symbol=BTCUSD&orderId={pending}"),
        &keys[0],
    )
    .await;
    assert_eq!(
        (o["status"].as_str(), o["orderListId"].as_u64()),
        (Some("NEW"), Some(list))
    );
    let q = call(
        &s,
        "GET",
        "/api/v3/orderList",
        &format!("orderListId={list}"),
        &keys[0],
    )
    .await;
    assert_eq!(q["listOrderStatus"], "ALL_DONE");
    drop(s.router);
    s.node.shutdown().unwrap();
}

/// The fields of an order list that the history does not hold (`transactionTime`: a list placed
/// in a history gap has no time after the restart) left out.
fn list_shape(l: &Value) -> Value {
    let mut l = l.clone();
    l.as_object_mut().unwrap().remove("transactionTime");
    l
}

/// A history gap (the SQLite history older than the kept journal): the pending orders of OTO and
/// OTOCO lists placed in the gap have no row in it. They are rebuilt from the engine, which holds
/// them: the lists read as before the restart, the pending orders answer `PENDING_NEW` by id and
/// by client id, and a cancel of a list cancels them. The old code dropped them (lists of one
/// order, pending orders unknown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_orders_placed_in_a_history_gap_survive_a_restart() {
    let live = tempfile::tempdir().unwrap();
    let s = boot(live.path());
    let keys = setup(&s).await;
    let mut rng = Rng(11);
    let mut acked = Vec::new();
    trade(&s, &keys, &mut rng, "old", 10, &mut acked).await;
    assert!(s.node.state.read_model().wait_persisted().await);
    let old = tempfile::tempdir().unwrap();
    {
        let lock = rusqlite::Connection::open(live.path().join("api/api.sqlite")).unwrap();
        lock.execute_batch("BEGIN IMMEDIATE").unwrap();
        crash_image(live.path(), old.path());
        lock.execute_batch("ROLLBACK").unwrap();
    }
    // Enough commands (and history commits) for the kept journal to leave the old floor behind
    // (see `a_history_older_than_the_kept_journal_is_reported_as_a_gap`).
    trade(&s, &keys, &mut rng, "new", 80, &mut acked).await;
    assert!(s.node.state.read_model().wait_persisted().await);
    trade(&s, &keys, &mut rng, "newer", 40, &mut acked).await;
    assert!(s.node.state.read_model().wait_persisted().await);
    // Working buys far below the market: nothing trades after this.
    let oto = call(
        &s,
        "POST",
        "/api/v3/orderList/oto",
        "symbol=BTCUSD&listClientOrderId=gap-oto&workingType=LIMIT&workingSide=BUY&workingPrice=20000&workingQuantity=0.5&workingTimeInForce=GTC&pendingType=LIMIT&pendingSide=SELL&pendingPrice=22000&pendingQuantity=0.5&pendingTimeInForce=GTC&pendingClientOrderId=gap-later",
        &keys[0],
    )
    .await;
    let otoco = call(
        &s,
        "POST",
        "/api/v3/orderList/otoco",
        "symbol=BTCUSD&listClientOrderId=gap-otoco&workingType=LIMIT_MAKER&workingSide=BUY&workingPrice=19900&workingQuantity=0.01&pendingSide=SELL&pendingQuantity=0.01&pendingAboveType=LIMIT_MAKER&pendingAbovePrice=40000&pendingBelowType=STOP_LOSS&pendingBelowStopPrice=19000",
        &keys[0],
    )
    .await;
    let pending: Vec<(u64, Value)> = [&oto, &otoco]
        .iter()
        .flat_map(|r| r["orderReports"].as_array().unwrap()[1..].to_vec())
        .map(|o| (o["orderId"].as_u64().unwrap(), o))
        .collect();
    assert_eq!(pending.len(), 3);
    assert!(s.node.state.read_model().wait_persisted().await);
    let lists = call(&s, "GET", "/api/v3/openOrderList", "", &keys[0]).await;
    assert_eq!(lists.as_array().unwrap().len(), 2, "{lists}");
    drop(s.router);
    s.node.shutdown().unwrap();

    let image = tempfile::tempdir().unwrap();
    crash_image(live.path(), image.path());
    std::fs::remove_dir_all(image.path().join("api")).unwrap();
    std::fs::rename(old.path().join("api"), image.path().join("api")).unwrap();
    let s = boot(image.path());
    assert_eq!(s.node.recovery.floor, None, "the floor is out of reach");
    assert!(history_gap(&s).await > 0);
    let after = call(&s, "GET", "/api/v3/openOrderList", "", &keys[0]).await;
    let shape =
        |v: &Value| -> Vec<Value> { v.as_array().unwrap().iter().map(list_shape).collect() };
    assert_eq!(shape(&after), shape(&lists));
    for (id, placed) in &pending {
        let o = call(
            &s,
            "GET",
            "/api/v3/order",
            &format!("symbol=BTCUSD&orderId={id}"),
            &keys[0],
        )
        .await;
        for f in [
            "orderId",
            "orderListId",
            "clientOrderId",
            "status",
            "type",
            "side",
            "price",
            "stopPrice",
            "origQty",
        ] {
            // (The placement's report leaves out what does not apply.)
            if !placed[f].is_null() {
                assert_eq!(o[f], placed[f], "order {id}: {f}");
            }
        }
        assert_eq!(o["status"], "PENDING_NEW");
    }
    let by_cid = call(
        &s,
        "GET",
        "/api/v3/order",
        "symbol=BTCUSD&origClientOrderId=gap-later",
        &keys[0],
    )
    .await;
    assert_eq!(by_cid["orderId"].as_u64(), Some(pending[0].0));
    // Cancelling each list cancels its pending orders too.
    for cid in ["gap-oto", "gap-otoco"] {
        let c = call(
            &s,
            "DELETE",
            "/api/v3/orderList",
            &format!("symbol=BTCUSD&listClientOrderId={cid}"),
            &keys[0],
        )
        .await;
        assert_eq!(c["listOrderStatus"], "ALL_DONE", "{c}");
        let statuses: Vec<&str> = c["orderReports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["status"].as_str().unwrap())
            .collect();
        assert!(statuses.iter().all(|s| *s == "CANCELED"), "{c}");
    }
    for (id, _) in &pending {
        let o = call(
            &s,
            "GET",
            "/api/v3/order",
            &format!("symbol=BTCUSD&orderId={id}"),
            &keys[0],
        )
        .await;
        assert_eq!(o["status"], "CANCELED", "order {id}");
    }
    let open = call(&s, "GET", "/api/v3/openOrderList", "", &keys[0]).await;
    assert_eq!(open, Value::Array(vec![]));
    drop(s.router);
    s.node.shutdown().unwrap();
}

/// An OTOCO whose working order filled has its pending pair placed, in the engine an OCO under
/// the list's id. After a restart the list still reads as the OTOCO of three orders it was
/// (`contingencyType`, orders), and a cancel of it cancels the pair. The old code read it as an
/// OCO of two orders.
#[tokio::test]
async fn an_otoco_whose_pair_was_placed_reads_as_otoco_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = boot(dir.path());
    let keys = setup(&s).await;
    // The working buy fills at once against this sell: its pair is placed (last price 20000).
    call(
        &s,
        "POST",
        "/api/v3/order",
        "symbol=BTCUSD&side=SELL&type=LIMIT&timeInForce=GTC&quantity=0.01&price=20000",
        &keys[1],
    )
    .await;
    let r = call(
        &s,
        "POST",
        "/api/v3/orderList/otoco",
        "symbol=BTCUSD&listClientOrderId=placed&workingType=LIMIT&workingSide=BUY&workingPrice=20000&workingQuantity=0.01&workingTimeInForce=GTC&workingClientOrderId=w&pendingSide=SELL&pendingQuantity=0.01&pendingAboveType=LIMIT_MAKER&pendingAbovePrice=21000&pendingBelowType=STOP_LOSS&pendingBelowStopPrice=19000",
        &keys[0],
    )
    .await;
    let list = r["orderListId"].as_u64().unwrap();
    let ids: Vec<u64> = r["orderReports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["orderId"].as_u64().unwrap())
        .collect();
    let q = format!("orderListId={list}");
    let before = call(&s, "GET", "/api/v3/orderList", &q, &keys[0]).await;
    let listed: Vec<u64> = before["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["orderId"].as_u64().unwrap())
        .collect();
    assert_eq!(
        (before["contingencyType"].as_str(), &listed),
        (Some("OTOCO"), &ids),
        "{before}"
    );
    let open = call(&s, "GET", "/api/v3/openOrderList", "", &keys[0]).await;
    drop(s.router);
    s.node.shutdown().unwrap();

    let s = boot(dir.path());
    let after = call(&s, "GET", "/api/v3/orderList", &q, &keys[0]).await;
    assert_eq!(after, before);
    assert_eq!(
        call(&s, "GET", "/api/v3/openOrderList", "", &keys[0]).await,
        open
    );
    let c = call(
        &s,
        "DELETE",
        "/api/v3/orderList",
        &format!("symbol=BTCUSD&{q}"),
        &keys[0],
    )
    .await;
    let reports: Vec<(u64, &str)> = c["orderReports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["orderId"].as_u64().unwrap(),
                o["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        (c["contingencyType"].as_str(), c["listOrderStatus"].as_str()),
        (Some("OTOCO"), Some("ALL_DONE")),
        "{c}"
    );
    assert_eq!(
        reports,
        [
            (ids[0], "FILLED"),
            (ids[1], "CANCELED"),
            (ids[2], "CANCELED")
        ],
        "{c}"
    );
    drop(s.router);
    s.node.shutdown().unwrap();
}
