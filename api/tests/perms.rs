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

/// Defect: `GET /mapi/v1/apiKey` listed every key's id in full, and a key's id alone opens its
/// user data stream (`POST /api/v3/userDataStream`, as Binance's: no signature). A key holding
/// `keys` alone read a `read` key's id and through it the account's orders and balances. Ids of
/// keys with a permission the caller lacks are listed masked; those it could have made itself
/// (at most its own permissions) in full. Failed on the old code (the read key's id in full).
#[tokio::test]
async fn a_keys_only_key_cannot_learn_a_wider_keys_id() {
    let h = Harness::new();
    let (acct, trader) = h.trader("0", "0").await; // read,trade
    let manager = h.state.create_key(acct, Perms::KEYS, "manager").unwrap();
    let reader = h.state.create_key(acct, Perms::READ, "viewer").unwrap();
    let master = h
        .state
        .create_key(
            acct,
            Perms::READ.with(Perms::TRADE).with(Perms::KEYS),
            "master",
        )
        .unwrap();
    let payer = h
        .state
        .create_key(acct, Perms::READ.with(Perms::WITHDRAW), "payer")
        .unwrap();
    let listed_by = |key: &(String, String)| {
        let key = key.clone();
        let h = &h;
        async move {
            let listed = h.ok("GET", "/mapi/v1/apiKey", "", &key).await;
            let ids: Vec<String> = listed
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["apiKey"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(ids.len(), 5, "{listed}");
            ids
        }
    };
    let masked = |id: &str| format!("{}...", &id[..8]);

    let ids = listed_by(&manager).await;
    assert!(ids.contains(&manager.0), "its own id in full: {ids:?}");
    for wider in [&reader.0, &trader.0, &master.0, &payer.0] {
        assert!(!ids.contains(wider), "a wider key's id in full: {ids:?}");
        assert!(ids.contains(&masked(wider)), "listed masked: {ids:?}");
    }
    // What it learned opens no stream.
    for id in ids.iter().filter(|id| **id != manager.0) {
        let r = h.raw("POST", "/api/v3/userDataStream", "", Some(id)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.json);
        assert!([-2014, -2015].contains(&r.code()), "{}", r.json);
        assert!(r.json.get("listenKey").is_none(), "{}", r.json);
    }

    // A key with read, trade and keys sees in full the keys it could have made.
    let ids = listed_by(&master).await;
    for narrower in [&reader.0, &trader.0, &manager.0, &master.0] {
        assert!(ids.contains(narrower), "{ids:?}");
    }
    assert!(ids.contains(&masked(&payer.0)), "{ids:?}");
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

/// `GET /api/v3/ping` (weight 1) from `peer`, with `X-Forwarded-For: xff`.
async fn ping_from(h: &Harness, peer: &str, xff: &str) -> StatusCode {
    use tower::ServiceExt;
    let peer: std::net::SocketAddr = format!("{peer}:40000").parse().unwrap();
    let mut req = axum::http::Request::get("/api/v3/ping")
        .header("x-forwarded-for", xff)
        .body(axum::body::Body::empty())
        .unwrap();
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(api::app::PeerAddr(peer)));
    h.router.clone().oneshot(req).await.unwrap().status()
}

#[tokio::test]
async fn client_address_comes_from_the_trusted_proxy_header_only() {
    let h = Harness::with_config(ApiConfig {
        ip_weight_per_min: 2,
        trusted_proxy: Some(api::access::TrustedProxy {
            header: "x-forwarded-for".into(),
            addresses: vec!["10.0.0.2".parse().unwrap()],
        }),
        ..ApiConfig::default()
    });
    // Behind the proxy, each client has its own budget (not the proxy's shared one); the last
    // address is the one the proxy saw, earlier ones are the client's claims.
    for _ in 0..2 {
        assert_eq!(
            ping_from(&h, "10.0.0.2", "1.2.3.4, 203.0.113.1").await,
            StatusCode::OK
        );
    }
    assert_eq!(
        ping_from(&h, "10.0.0.2", "203.0.113.1").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        ping_from(&h, "10.0.0.2", "203.0.113.2").await,
        StatusCode::OK
    );
    // Anyone else's header is ignored: a direct client is its own address, whatever it claims.
    for n in 0..2 {
        assert_eq!(
            ping_from(&h, "192.0.2.9", &format!("198.51.100.{n}")).await,
            StatusCode::OK
        );
    }
    assert_eq!(
        ping_from(&h, "192.0.2.9", "198.51.100.7").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        ping_from(&h, "10.0.0.2", "198.51.100.0").await,
        StatusCode::OK,
        "the claims spent nothing of the claimed addresses' budgets"
    );
}

#[tokio::test]
async fn without_a_trusted_proxy_forwarding_headers_are_ignored() {
    let h = Harness::with_config(ApiConfig {
        ip_weight_per_min: 2,
        ..ApiConfig::default()
    });
    for n in 0..2 {
        assert_eq!(
            ping_from(&h, "10.0.0.2", &format!("203.0.113.{n}")).await,
            StatusCode::OK
        );
    }
    assert_eq!(
        ping_from(&h, "10.0.0.2", "203.0.113.99").await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

/// Defect: the request-weight limit (and every other count by client address: WebSocket
/// streams and connection attempts, the dashboard's login throttle) was keyed by the full IPv6
/// address, so a client rotated its source address inside its /64 (what one host is given)
/// for a fresh budget at each request. A client is now its /64, as the connection cap already
/// counted it, and an IPv4-mapped IPv6 address is its IPv4 address.
#[tokio::test]
async fn an_ipv6_client_is_its_64_for_rate_limits() {
    let h = Harness::with_config(ApiConfig {
        ip_weight_per_min: 2,
        ..ApiConfig::default()
    });
    assert_eq!(ping_from(&h, "[2001:db8:1:2::1]", "").await, StatusCode::OK);
    assert_eq!(ping_from(&h, "[2001:db8:1:2::2]", "").await, StatusCode::OK);
    assert_eq!(
        ping_from(&h, "[2001:db8:1:2:ffff::3]", "").await,
        StatusCode::TOO_MANY_REQUESTS,
        "a third address of the same /64 has no budget of its own"
    );
    assert_eq!(
        ping_from(&h, "[2001:db8:1:3::1]", "").await,
        StatusCode::OK,
        "another /64 is another client"
    );
    assert_eq!(ping_from(&h, "192.0.2.1", "").await, StatusCode::OK);
    assert_eq!(
        ping_from(&h, "[::ffff:192.0.2.1]", "").await,
        StatusCode::OK
    );
    assert_eq!(
        ping_from(&h, "192.0.2.1", "").await,
        StatusCode::TOO_MANY_REQUESTS,
        "an IPv4-mapped address is its IPv4 address"
    );
}

/// Defect: `DELETE /mapi/v1/apiKey` (public listener, `keys`) revoked a key of any account when
/// the caller also held `admin`: operator power on the public address, where the admin listener
/// is meant to be the only place for it. The public route revokes the caller's own account's
/// keys only; the operator revokes any account's key on the admin listener
/// (`DELETE /mapi/v1/admin/apiKey`, audited). Failed on the old code (the other account's key
/// revoked through the public route).
#[tokio::test]
async fn an_admin_key_revokes_other_accounts_keys_only_on_the_admin_listener() {
    let h = Harness::new();
    let (ops_acct, _) = h.trader("0", "0").await;
    let (_, victim) = h.trader("0", "100").await;
    let ops = h
        .state
        .create_key(ops_acct, Perms::ADMIN.with(Perms::KEYS), "ops")
        .unwrap();
    let r = h
        .signed(
            "DELETE",
            "/mapi/v1/apiKey",
            &format!("apiKey={}", victim.0),
            &ops,
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, -2008),
        "{}",
        r.json
    );
    h.ok("GET", "/api/v3/account", "", &victim).await;

    // On the admin listener's route, the operator's key revokes it (and says so in the log).
    let r = h
        .signed(
            "DELETE",
            "/mapi/v1/admin/apiKey",
            &format!("apiKey={}", victim.0),
            &h.admin,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    let r = h.signed("GET", "/api/v3/account", "", &victim).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.json);
    // An unknown or already revoked key: -2008, nothing else changes.
    let r = h
        .signed(
            "DELETE",
            "/mapi/v1/admin/apiKey",
            &format!("apiKey={}", victim.0),
            &h.admin,
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, -2008),
        "{}",
        r.json
    );
    // The admin route is the admin permission's: a keys key of the same account is refused.
    let (acct, own) = h.trader("0", "0").await;
    let manager = h.state.create_key(acct, Perms::KEYS, "manager").unwrap();
    let r = h
        .signed(
            "DELETE",
            "/mapi/v1/admin/apiKey",
            &format!("apiKey={}", own.0),
            &manager,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.json);
    h.ok("GET", "/api/v3/account", "", &own).await;
}

/// Review finding: public requests whose weight depends on their parameters were charged only
/// after those parameters were read, so one that failed validation cost nothing, even from an
/// address past its limit: a client could send bad `depth` or `ticker` requests for ever and
/// never see a 429. Each such request costs 1 before its parameters are read (the rest of its
/// weight after), and an address past its limit is refused first. Failed on the old code (400
/// -1104 answered past the limit).
#[tokio::test]
async fn requests_that_fail_validation_are_charged_too() {
    let h = Harness::with_config(ApiConfig {
        ip_weight_per_min: 10,
        key_weight_per_min: 1_000_000,
        orders_per_10s: 1_000_000,
        ..ApiConfig::default()
    });
    let bad = [
        "/api/v3/depth?symbol=BTCUSD&x=1",
        "/api/v3/ticker/24hr?symbol=BTCUSD&x=1",
        "/api/v3/ticker/price?symbol=BTCUSD&x=1",
        "/api/v3/ticker/bookTicker?symbol=BTCUSD&x=1",
        "/api/v3/ticker?symbol=BTCUSD&x=1",
        "/api/v3/ticker/tradingDay?symbol=BTCUSD&x=1",
    ];
    let mut answers = Vec::new();
    for _ in 0..3 {
        for uri in bad {
            let r = h.get(uri).await;
            answers.push((uri, r.status, r.code()));
        }
    }
    let refused = answers
        .iter()
        .filter(|(_, s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    // Ten fit in the minute's weight; the other eight are refused.
    assert_eq!(refused, 8, "{answers:?}");
    assert!(
        answers[..10]
            .iter()
            .all(|(_, s, c)| *s == StatusCode::BAD_REQUEST && *c == -1104),
        "{answers:?}"
    );
}
