//! Permissions (what each kind of key may do) and the per-key rate limit.

mod common;

use api::keys::Perms;
use api::ApiConfig;
use axum::http::StatusCode;
use common::Harness;

#[tokio::test]
async fn trade_key_cannot_transfer_to_another_account() {
    let h = Harness::new();
    let (_, ka) = h.trader("0", "100").await; // read,trade: a bot's key
    let (b, kb) = h.trader("0", "0").await;
    let r = h
        .signed(
            "POST",
            "/mapi/v1/transfer",
            &format!("toAccount={b}&asset=USD&amount=10&clientTranId=drain"),
            &ka,
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, -2015),
        "{}",
        r.json
    );
    assert_eq!(h.balance(&ka, "USD").await.0, "100.00000000");
    assert_eq!(h.balance(&kb, "USD").await.0, "0.00000000");
}

#[tokio::test]
async fn read_key_cannot_list_mint_or_revoke_keys() {
    let h = Harness::new();
    let (acct, trader) = h.trader("0", "0").await;
    let reader = h.state.create_key(acct, Perms::READ, "viewer").unwrap();
    let cases = [
        ("GET", "/mapi/v1/apiKey", String::new()),
        ("POST", "/mapi/v1/apiKey", "permissions=read".to_owned()),
        ("DELETE", "/mapi/v1/apiKey", format!("apiKey={}", trader.0)),
    ];
    for (method, path, params) in &cases {
        let r = h.signed(method, path, params, &reader).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNAUTHORIZED, -2015),
            "{method} {path}: {}",
            r.json
        );
    }
    // Nothing was revoked.
    h.ok("GET", "/api/v3/account", "", &trader).await;
}

#[tokio::test]
async fn bad_signatures_do_not_spend_the_keys_rate_limit() {
    let h = Harness::with_config(ApiConfig {
        orders_per_10s: 1_000_000,
        ip_weight_per_min: 1_000_000,
        key_weight_per_min: 40,
        ..ApiConfig::default()
    });
    let (_, k) = h.trader("0", "0").await;
    // Anyone who knows the key id, but not its secret.
    let forged = (k.0.clone(), "0".repeat(64));
    for _ in 0..20 {
        let r = h.signed("GET", "/api/v3/account", "", &forged).await;
        assert_eq!(r.code(), -1022, "{}", r.json);
    }
    // The owner's budget (40 = two account reads of weight 20) is untouched.
    for _ in 0..2 {
        let r = h.signed("GET", "/api/v3/account", "", &k).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    }
    let r = h.signed("GET", "/api/v3/account", "", &k).await;
    assert_eq!((r.status, r.code()), (StatusCode::TOO_MANY_REQUESTS, -1003));
}
