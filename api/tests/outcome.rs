//! The three answers at the engine boundary, seen from a client: a command whose reply is lost
//! after it was applied answers `-1007` (execution status unknown), never a plain failure, and
//! the client finds its outcome by its own id (client order id, `clientTranId`).

mod common;

use axum::http::StatusCode;
use common::{Harness, Resp};
use serde_json::Value;

/// Polls a signed GET until `done` holds (the read model applies a lost-reply command's events
/// on its own schedule); panics after a generous bound.
async fn eventually(
    h: &Harness,
    path: &str,
    params: &str,
    key: &(String, String),
    done: impl Fn(&Resp) -> bool,
) -> Value {
    for _ in 0..500 {
        let r = h.signed("GET", path, params, key).await;
        if done(&r) {
            return r.json;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{path}?{params} never reached the expected state");
}

#[tokio::test]
async fn an_order_whose_reply_is_lost_answers_1007_and_is_found_by_client_order_id() {
    let (h, core) = Harness::lossy();
    let (_, k) = h.trader("1", "0").await;
    core.lose_next(1);
    let r = h
        .signed(
            "POST",
            "/api/v3/order",
            "symbol=BTCUSD&side=SELL&type=LIMIT&timeInForce=GTC&quantity=0.5&price=50000&newClientOrderId=mine-1",
            &k,
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::SERVICE_UNAVAILABLE, -1007),
        "{}",
        r.json
    );
    assert_eq!(core.lost.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The order was applied: the client finds it by its own id, and the balance holds it.
    let o = eventually(
        &h,
        "/api/v3/order",
        "symbol=BTCUSD&origClientOrderId=mine-1",
        &k,
        |r| r.status == StatusCode::OK,
    )
    .await;
    assert_eq!(
        (o["status"].as_str(), o["origQty"].as_str()),
        (Some("NEW"), Some("0.50000000"))
    );
    assert_eq!(
        h.balance(&k, "BTC").await,
        ("0.50000000".to_owned(), "0.50000000".to_owned())
    );
}

#[tokio::test]
async fn a_transfer_whose_reply_is_lost_answers_1007_and_its_retry_moves_nothing_twice() {
    let (h, core) = Harness::lossy();
    let (_, from) = h.trader("0", "1000").await;
    let (to, to_key) = h.trader("0", "0").await;
    let params = format!("toAccount={to}&asset=USD&amount=250&clientTranId=rent-1");
    core.lose_next(1);
    let r = h.signed("POST", "/mapi/v1/transfer", &params, &from).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::SERVICE_UNAVAILABLE, -1007),
        "{}",
        r.json
    );
    // The same request again resolves the unknown: applied once, the retry is a duplicate.
    let again = h.ok("POST", "/mapi/v1/transfer", &params, &from).await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(h.balance(&from, "USD").await.0, "750.00000000");
    assert_eq!(h.balance(&to_key, "USD").await.0, "250.00000000");
}
