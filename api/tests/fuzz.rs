//! Bad input of any kind: random parameter names and values on every endpoint get a Binance
//! error (4xx), never a 5xx or a panic, and change nothing.

mod common;

use common::Harness;
use proptest::prelude::*;
use std::sync::OnceLock;

struct Fixture {
    rt: tokio::runtime::Runtime,
    h: Harness,
    key: (String, String),
}

/// One server for all cases (a fresh one per case would dominate the run time).
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let h = Harness::new();
        let (_, key) = rt.block_on(h.trader_with("1", "1000", "read,trade,transfer,keys"));
        Fixture { rt, h, key }
    })
}

const PATHS: &[(&str, &str)] = &[
    ("GET", "/api/v3/depth"),
    ("GET", "/api/v3/trades"),
    ("GET", "/api/v3/aggTrades"),
    ("GET", "/api/v3/klines"),
    ("GET", "/api/v3/ticker/24hr"),
    ("GET", "/api/v3/ticker/price"),
    ("GET", "/api/v3/ticker"),
    ("GET", "/api/v3/ticker/tradingDay"),
    ("GET", "/api/v3/avgPrice"),
    ("GET", "/api/v3/historicalTrades"),
    ("GET", "/api/v3/allOrderList"),
    ("GET", "/api/v3/exchangeInfo"),
    ("POST", "/api/v3/order"),
    ("POST", "/api/v3/order/test"),
    ("POST", "/api/v3/order/cancelReplace"),
    ("DELETE", "/api/v3/order"),
    ("GET", "/api/v3/order"),
    ("GET", "/api/v3/allOrders"),
    ("GET", "/api/v3/myTrades"),
    ("DELETE", "/api/v3/openOrders"),
    ("POST", "/mapi/v1/transfer"),
    ("POST", "/mapi/v1/apiKey"),
];

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("BTCUSD".to_owned()),
        Just("BUY".to_owned()),
        Just("LIMIT".to_owned()),
        Just("GTC".to_owned()),
        "[0-9]{1,25}",
        "-?[0-9]{0,6}\\.[0-9]{0,12}",
        "[0-9]e[0-9]",
        "%[0-9A-Fa-f]{2}",
        "[ -~]{0,12}",
        "\\PC{0,8}",
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "symbol",
            "side",
            "type",
            "timeInForce",
            "quantity",
            "price",
            "stopPrice",
            "quoteOrderQty",
            "newClientOrderId",
            "orderId",
            "origClientOrderId",
            "limit",
            "interval",
            "startTime",
            "endTime",
            "fromId",
            "symbols",
            "cancelReplaceMode",
            "selfTradePreventionMode",
            "newOrderRespType",
            "toAccount",
            "asset",
            "amount",
            "clientTranId",
            "permissions",
            "recvWindow",
            "windowSize",
            "timeZone",
        ])
        .prop_map(str::to_owned),
        "[A-Za-z]{1,8}",
    ]
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn random_parameters_never_break_anything(
        which in 0..PATHS.len(),
        params in prop::collection::vec((name(), value()), 0..8),
        raw in any::<bool>(),
    ) {
        let f = fixture();
        let (h, key) = (&f.h, &f.key);
        f.rt.block_on(async {
            let before = (h.balance(key, "BTC").await, h.balance(key, "USD").await);
            let (method, path) = PATHS[which];
            let q: Vec<String> = params
                .iter()
                .map(|(k, v)| if raw { format!("{k}={v}") } else { format!("{k}={}", encode(v)) })
                .collect();
            let q = q.join("&");
            // Characters that cannot be in a URI at all never reach the server.
            prop_assume!(axum::http::Uri::try_from(format!("{path}?{q}")).is_ok());
            let r = h.signed(method, path, &q, key).await;
            prop_assert!(r.status.as_u16() < 500, "{method} {path}?{q}: {} {}", r.status, r.json);
            if r.status.as_u16() != 200 {
                prop_assert!(r.json["code"].as_i64().is_some_and(|c| c < 0), "{}", r.json);
                prop_assert!(r.json["msg"].as_str().is_some());
                prop_assert_eq!((h.balance(key, "BTC").await, h.balance(key, "USD").await), before);
            }
            let r = h.raw(method, &format!("{path}?{q}"), "", None).await;
            prop_assert!(r.status.as_u16() < 500, "unsigned {method} {path}?{q}: {}", r.status);
            Ok(())
        })?;
    }
}
