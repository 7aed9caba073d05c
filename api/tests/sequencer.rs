//! The API over the durable sequencer: trading through it, then a restart that recovers the
//! engine from its journal and the read models from the engine and SQLite.

mod common;

use api::keys::sign;
use axum::body::Body;
use axum::http::Request;
use common::now_ms;
use http_body_util::BodyExt;
use serde_json::Value;
use std::path::Path;
use tower::ServiceExt;

struct Server {
    node: api::Node,
    router: axum::Router,
}

fn boot(dir: &Path) -> Server {
    let node = api::start_node(dir, api::NodeConfig::default()).unwrap();
    Server {
        router: api::app(node.state.clone()),
        node,
    }
}

async fn call(s: &Server, method: &str, path: &str, params: &str, key: &(String, String)) -> Value {
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
    let status = res.status();
    let v: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(status, 200, "{method} {path} {params}: {v}");
    v
}

async fn public(s: &Server, uri: &str) -> Value {
    let res = s
        .router
        .clone()
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trading_through_the_sequencer_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = boot(dir.path());
    // The admin key file written on first start works.
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&s.node.admin_key.path).unwrap()).unwrap();
    assert!(s.node.admin_key.created);
    let admin = (
        v["apiKey"].as_str().unwrap().to_owned(),
        v["secretKey"].as_str().unwrap().to_owned(),
    );
    let mut keys = Vec::new();
    for (btc, usd) in [("0", "100000"), ("1", "0")] {
        let a = call(&s, "POST", "/mapi/v1/admin/account", "", &admin).await["account"]
            .as_u64()
            .unwrap();
        let k = call(
            &s,
            "POST",
            "/mapi/v1/admin/apiKey",
            &format!("account={a}&permissions=read,trade"),
            &admin,
        )
        .await;
        for (asset, amt) in [("BTC", btc), ("USD", usd)] {
            if amt != "0" {
                call(
                    &s,
                    "POST",
                    "/mapi/v1/admin/credit",
                    &format!("account={a}&asset={asset}&amount={amt}&reference=r{a}{asset}"),
                    &admin,
                )
                .await;
            }
        }
        keys.push((
            k["apiKey"].as_str().unwrap().to_owned(),
            k["secretKey"].as_str().unwrap().to_owned(),
        ));
    }
    let (buyer, seller) = (keys[0].clone(), keys[1].clone());
    let sell = call(&s, "POST", "/api/v3/order", "symbol=BTCUSD&side=SELL&type=LIMIT&timeInForce=GTC&quantity=0.01&price=30000&newClientOrderId=rest", &seller).await;
    let buy = call(
        &s,
        "POST",
        "/api/v3/order",
        "symbol=BTCUSD&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.004&price=30000",
        &buyer,
    )
    .await;
    assert_eq!(buy["status"], "FILLED");
    // Concurrent orders share group commits and all get answers.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let r = s.router.clone();
        let k = buyer.clone();
        tasks.push(tokio::spawn(async move {
            let q = format!("symbol=BTCUSD&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.001&price={}&timestamp={}", 20000 + i, now_ms());
            let body = format!("{q}&signature={}", sign(&k.1, &q));
            let res = r
                .oneshot(
                    Request::post("/api/v3/order")
                        .header("content-type", "application/x-www-form-urlencoded")
                        .header("X-MBX-APIKEY", &k.0)
                        .body(Body::from(body))
                        .unwrap(),
                )
                .await
                .unwrap();
            res.status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    call(&s, "DELETE", "/api/v3/openOrders", "symbol=BTCUSD", &buyer).await;
    let before_acct = call(&s, "GET", "/api/v3/account", "", &seller).await["balances"].clone();
    let before_depth = public(&s, "/api/v3/depth?symbol=BTCUSD").await;
    assert_eq!(
        before_depth["asks"],
        serde_json::json!([["30000.00000000", "0.00600000"]])
    );
    drop(s.router);
    s.node.shutdown().unwrap();

    // Restart on the same directory.
    let s = boot(dir.path());
    assert!(!s.node.admin_key.created);
    assert_eq!(
        call(&s, "GET", "/api/v3/account", "", &seller).await["balances"],
        before_acct
    );
    assert_eq!(
        public(&s, "/api/v3/depth?symbol=BTCUSD").await,
        before_depth
    );
    let open = call(&s, "GET", "/api/v3/openOrders", "symbol=BTCUSD", &seller).await;
    assert_eq!(open[0]["orderId"], sell["orderId"]);
    assert_eq!(
        (open[0]["status"].as_str(), open[0]["executedQty"].as_str()),
        (Some("PARTIALLY_FILLED"), Some("0.00400000"))
    );
    assert_eq!(open[0]["clientOrderId"], "rest");
    let all = call(&s, "GET", "/api/v3/allOrders", "symbol=BTCUSD", &buyer).await;
    assert_eq!(all.as_array().unwrap().len(), 51);
    assert_eq!(
        public(&s, "/api/v3/trades?symbol=BTCUSD")
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // The admin client (what the `mediator` admin commands use) over a real socket, on the
    // admin listener.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve_admin(listener, s.node.state.clone(), async {
        let _ = stopped.await;
    }));
    let admin_client = api::client::Client::from_key_file(addr, &s.node.admin_key.path).unwrap();
    let acct = admin_client
        .signed("POST", "/mapi/v1/admin/account", &[])
        .await
        .unwrap();
    let acct = acct["account"].as_u64().unwrap().to_string();
    let c = admin_client
        .signed(
            "POST",
            "/mapi/v1/admin/credit",
            &[
                ("account", &acct),
                ("asset", "USD"),
                ("amount", "10.5"),
                ("reference", "wire #7"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        (c["amount"].as_str(), c["reference"].as_str()),
        (Some("10.50000000"), Some("wire #7"))
    );
    let e = admin_client
        .signed(
            "POST",
            "/mapi/v1/admin/credit",
            &[
                ("account", &acct),
                ("asset", "EUR"),
                ("amount", "1"),
                ("reference", "x"),
            ],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            api::client::ClientError::Api {
                status: 400,
                code: -1130,
                ..
            }
        ),
        "{e}"
    );
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    // The history is complete: nothing journaled is missing from SQLite.
    let res = s
        .router
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(
        text.contains("\nmediator_history_gap_commands 0\n"),
        "{text}"
    );
    // Trading goes on against the recovered book.
    let buy = call(
        &s,
        "POST",
        "/api/v3/order",
        "symbol=BTCUSD&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.006&price=30000",
        &buyer,
    )
    .await;
    assert_eq!(buy["status"], "FILLED");
    let o = call(
        &s,
        "GET",
        "/api/v3/order",
        "symbol=BTCUSD&origClientOrderId=rest",
        &seller,
    )
    .await;
    assert_eq!(o["status"], "FILLED");
    let d = public(&s, "/api/v3/depth?symbol=BTCUSD").await;
    assert!(d["lastUpdateId"].as_u64().unwrap() > before_depth["lastUpdateId"].as_u64().unwrap());
    drop(s.router);
    s.node.shutdown().unwrap();
}

/// Each handler gets its own command's reply with 600 in flight at once (each submission
/// carries its own reply function into the engine's queue; the engine's per-producer in-flight
/// limit, 2 here, does not apply to them): accepted and rejected commands alternate, so a reply
/// given to the wrong handler shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_command_gets_its_own_reply_with_many_in_flight() {
    use matching_engine::Command;
    let dir = tempfile::tempdir().unwrap();
    let cfg = api::NodeConfig {
        sequencer: matching_engine::sequencer::SequencerConfig {
            max_in_flight: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let node = api::start_node(dir.path(), cfg).unwrap();
    let mut tasks = Vec::new();
    for i in 0..600u32 {
        let st = node.state.clone();
        tasks.push(tokio::spawn(async move {
            let cmd = if i % 2 == 0 {
                Command::CreateAccount
            } else {
                // No such account: rejected.
                Command::CancelAll {
                    account: matching_engine::AccountId(4_000_000_000 + i),
                    market: None,
                }
            };
            (i, st.submit(cmd).await.unwrap())
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        let (i, reply) = t.await.unwrap();
        assert_eq!(reply.result.is_ok(), i % 2 == 0, "command {i}: {reply:?}");
        accepted += usize::from(reply.result.is_ok());
    }
    assert_eq!(accepted, 300);
    node.shutdown().unwrap();
}
