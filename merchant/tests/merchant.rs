//! Merchant payments through `oneshot`: invoices over a fake `Custody` whose deposits the test
//! scripts, monitor ticks driven with explicit times, balance payments, refunds, conversion.

mod common;

use merchant::MerchantState as _;

use axum::http::StatusCode;
use common::custody::Fake;
use common::{market, place, Harness};
use merchant::monitor::tick;
use merchant::{store, webhook};
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::Arc;

type Key = (String, String);

struct M {
    h: Harness,
    fake: Arc<Fake>,
    account: u32,
    key: Key,
    /// The same account's key with `withdraw` too (refunds to an address).
    wkey: Key,
}

async fn setup() -> M {
    setup_on(Harness::new()).await
}

async fn setup_on(h: Harness) -> M {
    let fake = Arc::new(Fake::default());
    h.state.set_custody(fake.clone()).ok().unwrap();
    let (account, _) = h.trader("0", "0").await;
    let k = h
        .ok(
            "POST",
            "/mapi/v1/admin/apiKey",
            &format!("account={account}&permissions=read,merchant&label=shop"),
            &h.admin,
        )
        .await;
    let key = (
        k["apiKey"].as_str().unwrap().to_owned(),
        k["secretKey"].as_str().unwrap().to_owned(),
    );
    let wkey = h
        .state
        .create_key(
            account,
            api::keys::Perms::parse("read,merchant,withdraw").unwrap(),
            "refunds",
        )
        .unwrap();
    M {
        h,
        fake,
        account,
        key,
        wkey,
    }
}

impl M {
    async fn invoice(&self, params: &str) -> Value {
        self.h
            .ok("POST", "/mapi/v1/merchant/invoice", params, &self.key)
            .await
    }
    async fn get(&self, id: &str) -> Value {
        self.h
            .ok(
                "GET",
                "/mapi/v1/merchant/invoice",
                &format!("invoiceId={id}"),
                &self.key,
            )
            .await
    }
    async fn tick(&self, now: u64) {
        tick(&self.h.state, now).await.unwrap();
    }
    fn events(&self, id: &str) -> Vec<String> {
        let db = self.h.state.merchant().db.lock().unwrap();
        webhook::deliveries(&db, self.account, id)
            .unwrap()
            .into_iter()
            .map(|d| d.event.as_str().to_owned())
            .collect()
    }
    /// An invoice of 0.001 BTC paid in full by a confirmed chain payment, seen by a tick at
    /// `now + 1`: its id.
    async fn paid_invoice(&self, now: u64) -> String {
        let inv = self.invoice("amount=0.001").await;
        self.fake
            .pay(self.account, &s(&inv, "address"), 1, 100_000, 1, now);
        self.tick(now + 1).await;
        s(&inv, "id")
    }
    /// A refund of `amount` BTC of invoice `id` to an address (custody's withdrawal path).
    async fn refund_to_address(&self, id: &str, amount: &str) -> common::Resp {
        self.h
            .signed(
                "POST",
                "/mapi/v1/merchant/invoice/refund",
                &format!("invoiceId={id}&amount={amount}&address=bcrt1qdest"),
                &self.wkey,
            )
            .await
    }
    /// How many `invoice.refunded` webhooks invoice `id` has.
    fn refunded_events(&self, id: &str) -> usize {
        self.events(id)
            .iter()
            .filter(|e| *e == "invoice.refunded")
            .count()
    }
    fn count(&self) -> usize {
        let db = self.h.state.merchant().db.lock().unwrap();
        store::list(&db, self.account, None, 0, u64::MAX, 1000)
            .unwrap()
            .len()
    }
}

fn s(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn marks(v: &Value) -> Vec<String> {
    v["marks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn chain_payment_lifecycles() {
    let m = setup().await;
    let now = common::now_ms();
    // Exact payment, policy 1: Processing at 0 conf, Settled at 1.
    let inv = m.invoice("amount=0.001&orderId=42").await;
    let (id, addr) = (s(&inv, "id"), s(&inv, "address"));
    assert_eq!(s(&inv, "status"), "New");
    assert_eq!(s(&inv, "amountBtc"), "0.001");
    assert_eq!(
        s(&inv, "bip21"),
        format!(
            "bitcoin:{addr}?amount=0.001&label=Store%20{}&message=Order%2042",
            m.account
        )
    );
    m.fake.pay(m.account, &addr, 1, 100_000, 0, now);
    m.tick(now + 1).await;
    let v = m.get(&id).await;
    assert_eq!(
        (s(&v, "status"), s(&v, "paidBtc"), s(&v, "dueBtc")),
        ("Processing".into(), "0.001".into(), "0".into())
    );
    m.fake.pay(m.account, &addr, 1, 100_000, 1, now);
    m.tick(now + 2).await;
    assert_eq!(s(&m.get(&id).await, "status"), "Settled");
    assert_eq!(
        m.events(&id),
        [
            "invoice.created",
            "invoice.payment_received",
            "invoice.processing",
            "invoice.settled"
        ]
    );
    // Public status has no order id, same status.
    let p = m.h.get(&format!("/i/{id}/status")).await;
    assert_eq!(
        (p.status, s(&p.json, "status")),
        (StatusCode::OK, "Settled".into())
    );
    assert!(p.json.get("orderId").is_none());

    // Partial, then topped up: PaidPartial, then Processing; both payments add up.
    let inv = m.invoice("amount=0.002").await;
    let (id, addr) = (s(&inv, "id"), s(&inv, "address"));
    m.fake.pay(m.account, &addr, 2, 50_000, 0, now);
    m.tick(now + 3).await;
    let v = m.get(&id).await;
    assert_eq!(
        (s(&v, "status"), marks(&v), s(&v, "dueBtc")),
        (
            "New".into(),
            vec!["PaidPartial".to_owned()],
            "0.0015".into()
        )
    );
    m.fake.pay(m.account, &addr, 3, 150_000, 1, now + 5);
    m.fake.pay(m.account, &addr, 2, 50_000, 1, now);
    m.tick(now + 6).await;
    let v = m.get(&id).await;
    assert_eq!(
        (s(&v, "status"), marks(&v), s(&v, "paidBtc")),
        ("Settled".into(), Vec::<String>::new(), "0.002".into())
    );

    // Overpaid.
    let inv = m.invoice("amount=0.001").await;
    m.fake
        .pay(m.account, &s(&inv, "address"), 4, 130_000, 1, now);
    m.tick(now + 7).await;
    let v = m.get(&s(&inv, "id")).await;
    assert_eq!(
        (s(&v, "status"), marks(&v)),
        ("Settled".into(), vec!["PaidOver".to_owned()])
    );

    // Expired, then paid late: Expired + PaidLate, still recorded (and refundable).
    let inv = m.invoice("amount=0.001&expiryMinutes=1").await;
    let id = s(&inv, "id");
    let expire = inv["expireTime"].as_u64().unwrap();
    m.tick(expire).await;
    assert_eq!(s(&m.get(&id).await, "status"), "Expired");
    m.fake
        .pay(m.account, &s(&inv, "address"), 5, 100_000, 1, expire + 10);
    m.tick(expire + 20).await;
    let v = m.get(&id).await;
    assert_eq!(
        (s(&v, "status"), marks(&v), s(&v, "receivedBtc")),
        (
            "Expired".into(),
            vec!["PaidLate".to_owned()],
            "0.001".into()
        )
    );
    assert_eq!(
        m.events(&id),
        [
            "invoice.created",
            "invoice.expired",
            "invoice.payment_received"
        ]
    );
}

#[tokio::test]
async fn zero_conf_policy_settles_at_once() {
    let m = setup().await;
    m.h.ok(
        "POST",
        "/mapi/v1/merchant/store",
        "speedPolicy=0&name=Coffee",
        &m.key,
    )
    .await;
    let inv = m.invoice("amount=0.0005").await;
    assert_eq!(inv["confirmationsRequired"], 0);
    assert_eq!(s(&inv, "storeName"), "Coffee");
    let now = common::now_ms();
    m.fake
        .pay(m.account, &s(&inv, "address"), 9, 50_000, 0, now);
    m.tick(now + 1).await;
    assert_eq!(s(&m.get(&s(&inv, "id")).await, "status"), "Settled");
}

#[tokio::test]
async fn balance_payment_settles_at_once_and_moves_funds_exactly() {
    let m = setup().await;
    let (_, payer) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    let inv = m.invoice("amount=0.00123").await;
    let id = s(&inv, "id");
    let r =
        m.h.ok(
            "POST",
            "/mapi/v1/merchant/invoice/pay",
            &format!("invoiceId={id}"),
            &payer,
        )
        .await;
    assert_eq!(s(&r, "status"), "Settled");
    assert_eq!(s(&r, "paidFromBalanceBtc"), "0.00123");
    assert_eq!(m.h.balance(&payer, "BTC").await.0, "0.99877000");
    assert_eq!(m.h.balance(&m.key, "BTC").await.0, "0.00123000");
    assert_eq!(
        m.events(&id),
        [
            "invoice.created",
            "invoice.payment_received",
            "invoice.processing",
            "invoice.settled"
        ]
    );
    // Paying again is refused and moves nothing.
    let again =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/pay",
            &format!("invoiceId={id}"),
            &payer,
        )
        .await;
    assert_eq!(again.code(), -1155, "{}", again.json);
    assert_eq!(m.h.balance(&payer, "BTC").await.0, "0.99877000");

    // Refund part back to the paying account, then above what is left: refused.
    let inv_v = m.get(&id).await;
    let payer_id = inv_v["payments"][0]["payerAccount"].as_u64().unwrap();
    m.h.ok(
        "POST",
        "/mapi/v1/merchant/invoice/refund",
        &format!("invoiceId={id}&amount=0.001&toAccount={payer_id}"),
        &m.key,
    )
    .await;
    assert_eq!(m.h.balance(&payer, "BTC").await.0, "0.99977000");
    assert_eq!(m.h.balance(&m.key, "BTC").await.0, "0.00023000");
    let over =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/refund",
            &format!("invoiceId={id}&amount=0.00024&toAccount={payer_id}"),
            &m.key,
        )
        .await;
    assert_eq!(over.code(), -1156, "{}", over.json);
    assert_eq!(m.h.balance(&m.key, "BTC").await.0, "0.00023000");
    let v = m.get(&id).await;
    assert_eq!(s(&v, "refundedBtc"), "0.001");
    assert_eq!(v["refunds"].as_array().unwrap().len(), 1);
    assert_eq!(m.events(&id).last().unwrap(), "invoice.refunded");
}

#[tokio::test]
async fn refund_to_address_goes_through_custody() {
    let m = setup().await;
    let now = common::now_ms();
    let inv = m.invoice("amount=0.001").await;
    let id = s(&inv, "id");
    // Not refundable while New.
    let r =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/refund",
            &format!("invoiceId={id}&amount=0.0001&address=bcrt1qdest"),
            &m.wkey,
        )
        .await;
    assert_eq!(r.code(), -1155);
    m.fake
        .pay(m.account, &s(&inv, "address"), 1, 100_000, 1, now);
    m.tick(now + 1).await;
    let over =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/refund",
            &format!("invoiceId={id}&amount=0.00100001&address=bcrt1qdest"),
            &m.wkey,
        )
        .await;
    assert_eq!(over.code(), -1156);
    // toAccount is only for balance payers.
    let r =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/refund",
            &format!("invoiceId={id}&amount=0.0001&toAccount=1"),
            &m.key,
        )
        .await;
    assert_eq!(r.code(), -1159);
    assert!(m.fake.withdrawals.lock().unwrap().is_empty());
    let ok =
        m.h.ok(
            "POST",
            "/mapi/v1/merchant/invoice/refund",
            &format!("invoiceId={id}&amount=0.0004&address=bcrt1qdest"),
            &m.wkey,
        )
        .await;
    assert_eq!(s(&ok, "reference"), "withdrawal:100");
    let ws = m.fake.withdrawals.lock().unwrap().clone();
    assert_eq!(ws.len(), 1);
    assert_eq!(
        (ws[0].account, ws[0].address.as_str(), ws[0].amount_sat),
        (m.account, "bcrt1qdest", 40_000)
    );
    assert_eq!(s(&m.get(&id).await, "refundedBtc"), "0.0004");
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let m = setup().await;
    let (_, trader) = m.h.trader("0", "0").await;
    let cases: &[(&str, i64)] = &[
        ("amount=0", -1153),
        ("amount=-1", -1100),
        ("amount=0.000000001", -1111),
        ("amount=1&currency=EUR", -1152),
        ("amount=1.001&currency=USD", -1157), // no price yet
        ("amount=1&expiryMinutes=0", -1154),
        ("amount=1&expiryMinutes=10081", -1154),
        ("amount=1&metadata=%7Bnot-json", -1158),
    ];
    for (params, code) in cases {
        let r =
            m.h.signed("POST", "/mapi/v1/merchant/invoice", params, &m.key)
                .await;
        assert_eq!(r.code(), *code, "{params}: {}", r.json);
    }
    // A key without the merchant permission.
    let r =
        m.h.signed("POST", "/mapi/v1/merchant/invoice", "amount=1", &trader)
            .await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, -2015));
    assert_eq!(m.count(), 0);
    assert_eq!(*m.fake.addresses.lock().unwrap(), 0, "no address was taken");
    // Another merchant's invoice is unknown.
    let inv = m.invoice("amount=1").await;
    let r =
        m.h.signed(
            "GET",
            "/mapi/v1/merchant/invoice",
            &format!("invoiceId={}", s(&inv, "id")),
            &m.h.admin,
        )
        .await;
    assert_eq!(r.code(), -2015);
    let unknown = m.h.get("/i/00ff/status").await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (StatusCode::NOT_FOUND, -1150)
    );
}

#[tokio::test]
async fn no_custody_is_a_clear_503() {
    let h = Harness::new();
    let (account, _) = h.trader("0", "0").await;
    let k = h
        .ok(
            "POST",
            "/mapi/v1/admin/apiKey",
            &format!("account={account}&permissions=merchant"),
            &h.admin,
        )
        .await;
    let key = (
        k["apiKey"].as_str().unwrap().to_owned(),
        k["secretKey"].as_str().unwrap().to_owned(),
    );
    let r = h
        .signed("POST", "/mapi/v1/merchant/invoice", "amount=1", &key)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::SERVICE_UNAVAILABLE, -1001)
    );
}

/// Review finding: the same key with other terms (a shop using its order number as the key,
/// the cart changed from 0.01 to 0.02 BTC) answered the earlier invoice, `200`, for the old
/// amount: a client that did not compare showed it and the order was paid for half. A retry
/// (the same terms; what it left out matches the store's defaults) gets the invoice it made;
/// other terms are refused `-1164` and make nothing (failed on the old code: 200).
#[tokio::test]
async fn idempotency_key_returns_the_same_invoice_and_refuses_other_terms() {
    let m = setup().await;
    let a = m
        .invoice("amount=0.01&idempotencyKey=order-7&orderId=7&expiryMinutes=30")
        .await;
    let b = m
        .invoice("amount=0.01&idempotencyKey=order-7&orderId=7&expiryMinutes=30")
        .await;
    assert_eq!(s(&a, "id"), s(&b, "id"));
    assert_eq!(s(&b, "amountBtc"), "0.01");
    for other in [
        "amount=0.02&idempotencyKey=order-7&orderId=7&expiryMinutes=30",
        "amount=0.01&idempotencyKey=order-7&orderId=8&expiryMinutes=30",
        "amount=0.01&idempotencyKey=order-7&orderId=7&expiryMinutes=31",
        "amount=0.01&idempotencyKey=order-7&orderId=7&expiryMinutes=30&currency=USD",
        "amount=0.01&idempotencyKey=order-7&orderId=7&expiryMinutes=30&metadata=%7B%7D",
    ] {
        let r =
            m.h.signed("POST", "/mapi/v1/merchant/invoice", other, &m.key)
                .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, -1164),
            "{other}: {}",
            r.json
        );
    }
    assert_eq!(m.count(), 1, "nothing made");
    let c = m.invoice("amount=0.01&idempotencyKey=order-8").await;
    assert_ne!(s(&a, "id"), s(&c, "id"));
    assert_ne!(s(&a, "address"), s(&c, "address"));
    assert_eq!(m.count(), 2);
}

#[tokio::test]
async fn quote_currency_invoice_locks_the_rate() {
    let m = setup().await;
    market(&m.h, "39900", "40000", "1").await;
    let inv = m.invoice("amount=12.50&currency=USD").await;
    assert_eq!(
        (
            s(&inv, "currency"),
            s(&inv, "amount"),
            s(&inv, "rate"),
            s(&inv, "amountBtc"),
            s(&inv, "amountQuote")
        ),
        (
            "USD".into(),
            "12.50".into(),
            "40000".into(),
            "0.0003125".into(),
            "12.5".into()
        )
    );
    // The price moves up (the new bid takes the old ask, 2 BTC leave 1.001 resting); the
    // invoice keeps its rate and amount.
    market(&m.h, "49900", "50000", "2").await;
    let v = m.get(&s(&inv, "id")).await;
    assert_eq!(
        (s(&v, "rate"), s(&v, "amountBtc")),
        ("40000".into(), "0.0003125".into())
    );
    let fresh = m.invoice("amount=12.50&currency=USD").await;
    assert_eq!(
        (s(&fresh, "rate"), s(&fresh, "amountBtc")),
        ("50000".into(), "0.00025".into())
    );
}

/// Regression (issue 8 §4): a USD invoice took the last trade at any age (self-trades too),
/// else the mid of any book. Now the price must come from a trade between two accounts inside a
/// deep, narrow book; else `-1157` naming why, and no invoice.
#[tokio::test]
async fn usd_invoice_without_a_reliable_price_is_refused_and_nothing_changes() {
    // (what, the market, a word the message names)
    let only_self_trades = |h: Harness| async move {
        // A deep, narrow book without trades, then one small self-trade (STP NONE).
        place(&h, "SELL", "50100", "1").await;
        place(&h, "BUY", "49900", "1").await;
        let (_, k) = h.trader("1", "100000").await;
        for side in ["SELL", "BUY"] {
            h.ok(
                "POST",
                "/api/v3/order",
                &format!("symbol=BTCUSD&side={side}&type=LIMIT&timeInForce=GTC&quantity=0.001&price=50000&selfTradePreventionMode=NONE"),
                &k,
            )
            .await;
        }
        h
    };
    let no_book = |h: Harness| async move {
        // One trade that sweeps a thin book: nothing left on either side.
        place(&h, "SELL", "50000", "0.001").await;
        place(&h, "BUY", "50000", "0.001").await;
        h
    };
    let thin = |h: Harness| async move {
        market(&h, "49900", "50000", "0.005").await;
        h
    };
    let wide = |h: Harness| async move {
        market(&h, "40000", "60000", "1").await;
        h
    };
    for (what, h, word) in [
        (
            "only self-trades",
            only_self_trades(Harness::new()).await,
            "self-trades",
        ),
        ("no book", no_book(Harness::new()).await, "no bid or no ask"),
        ("thin book", thin(Harness::new()).await, "too thin"),
        ("wide book", wide(Harness::new()).await, "spread"),
    ] {
        let m = setup_on(h).await;
        let r =
            m.h.signed(
                "POST",
                "/mapi/v1/merchant/invoice",
                "amount=12.50&currency=USD",
                &m.key,
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::SERVICE_UNAVAILABLE, -1157),
            "{what}: {}",
            r.json
        );
        assert!(r.msg().contains(word), "{what}: {}", r.msg());
        assert_eq!(m.count(), 0, "{what}: no invoice");
        // A BTC invoice needs no price.
        m.invoice("amount=0.001").await;
    }
}

/// A stale last trade gives no price (`-1157`); a fresh one does. The limit is set to 1 ms here
/// so the test need not wait minutes.
#[tokio::test]
async fn usd_invoice_with_a_stale_last_trade_is_refused() {
    let mut merchant = common::test_merchant_config();
    merchant.price.max_trade_age_ms = 1;
    let h = Harness::with_configs(
        api::ApiConfig {
            orders_per_10s: 1_000_000,
            ip_weight_per_min: 1_000_000,
            key_weight_per_min: 1_000_000,
            ..api::ApiConfig::default()
        },
        merchant,
    );
    let m = setup_on(h).await;
    market(&m.h, "49900", "50000", "1").await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let r =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice",
            "amount=12.50&currency=USD",
            &m.key,
        )
        .await;
    assert_eq!(r.code(), -1157, "{}", r.json);
    assert!(r.msg().contains("old"), "{}", r.msg());
    assert_eq!(m.count(), 0);
}

/// With an operator index (a file), a market price too far from it, or an index that is missing
/// or unreadable, is `-1157`; near it, the invoice is created at the market's reference.
#[tokio::test]
async fn usd_invoice_is_checked_against_the_operators_index() {
    let index_dir = tempfile::tempdir().unwrap();
    let file = index_dir.path().join("btcusd.txt");
    let mut merchant = common::test_merchant_config();
    merchant.price.index = Some(merchant::price::IndexSource::File(file.clone()));
    // Each step rewrites the file and expects the next invoice to see it: no reuse of a read.
    merchant.price.index_cache_ms = 0;
    let h = Harness::with_configs(
        api::ApiConfig {
            orders_per_10s: 1_000_000,
            ip_weight_per_min: 1_000_000,
            key_weight_per_min: 1_000_000,
            ..api::ApiConfig::default()
        },
        merchant,
    );
    let m = setup_on(h).await;
    market(&m.h, "49900", "50000", "1").await;
    let create = || async {
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice",
            "amount=12.50&currency=USD",
            &m.key,
        )
        .await
    };
    let r = create().await;
    assert_eq!(r.code(), -1157, "no index file: {}", r.json);
    assert!(r.msg().contains("index"), "{}", r.msg());
    std::fs::write(&file, "not a price\n").unwrap();
    assert_eq!(create().await.code(), -1157, "unreadable index");
    std::fs::write(&file, "45000.00\n").unwrap();
    let r = create().await;
    assert_eq!(r.code(), -1157, "11 % from the index: {}", r.json);
    assert!(r.msg().contains("from the external index"), "{}", r.msg());
    assert_eq!(m.count(), 0);
    std::fs::write(&file, "49500.5\n").unwrap();
    let r = create().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(s(&r.json, "rate"), "50000");
    assert_eq!(m.count(), 1);
}

/// A local price index over HTTP (`127.0.0.1`) that answers `price` to every request and
/// counts them.
fn index_server(price: &'static str) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/btcusd", listener.local_addr().unwrap());
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 2048];
            let _ = conn.read(&mut buf);
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{price}",
                price.len()
            );
        }
    });
    (url, hits)
}

/// Defect (issue 11 §4): `current_rate` fetched the operator's index on every call, including
/// from the anonymous point-of-sale page, so any visitor made the server hit the price source at
/// request rate. Now one fetch serves every caller for a short time (one at a time): 30 invoices
/// (sequential, concurrent, and from the point of sale) fetch the index once.
#[tokio::test]
async fn the_price_index_is_fetched_once_for_many_invoices() {
    let (url, hits) = index_server("50000.00");
    let mut merchant = common::test_merchant_config();
    merchant.price.index = Some(merchant::price::IndexSource::Url(url));
    // Long enough that the whole test runs inside one cache period on a slow machine.
    merchant.price.index_cache_ms = 60_000;
    let h = Harness::with_configs(
        api::ApiConfig {
            orders_per_10s: 1_000_000,
            ip_weight_per_min: 1_000_000,
            key_weight_per_min: 1_000_000,
            ..api::ApiConfig::default()
        },
        merchant,
    );
    let m = setup_on(h).await;
    market(&m.h, "49900", "50000", "1").await;
    for _ in 0..10 {
        let inv = m.invoice("amount=12.50&currency=USD").await;
        assert_eq!(s(&inv, "rate"), "50000");
    }
    let concurrent = (0..10).map(|_| async {
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice",
            "amount=12.50&currency=USD",
            &m.key,
        )
        .await
    });
    for r in futures_util::future::join_all(concurrent).await {
        assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    }
    let st =
        m.h.ok(
            "POST",
            "/mapi/v1/merchant/store",
            "posEnabled=true&defaultCurrency=USD",
            &m.key,
        )
        .await;
    let pos = s(&st, "posUrl");
    for _ in 0..10 {
        let r =
            m.h.raw(
                "POST",
                &format!("{pos}/invoice"),
                r#"{"amount":"5.00"}"#,
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    }
    assert_eq!(m.count(), 30);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the index was fetched once per invoice"
    );
}

/// Regression (issue 8 §4): conversion was a market sell into whatever bid there was. Now it is
/// a limit IOC sell at the reference less 1 % (the default slippage): below that nothing is
/// sold and the next tick tries again.
#[tokio::test]
async fn conversion_never_sells_below_the_worst_acceptable_price() {
    let m = setup().await;
    m.h.ok(
        "POST",
        "/mapi/v1/merchant/store",
        "settlement=convert",
        &m.key,
    )
    .await;
    // Reference 50,000 (the trade, inside [49,400, 50,000]); worst acceptable 49,500.
    market(&m.h, "49400", "50000", "1").await;
    let (_, payer) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    let inv = m.invoice("amount=0.002").await;
    let id = s(&inv, "id");
    m.h.ok(
        "POST",
        "/mapi/v1/merchant/invoice/pay",
        &format!("invoiceId={id}"),
        &payer,
    )
    .await;
    for _ in 0..2 {
        m.tick(common::now_ms()).await;
        let conv = m.get(&id).await["conversion"].clone();
        assert_eq!(
            (s(&conv, "state"), s(&conv, "soldBtc")),
            ("wanted".into(), "0".into()),
            "{conv}"
        );
    }
    assert_eq!(m.h.balance(&m.key, "BTC").await.0, "0.00200000");
    // A bid at or above the limit comes back: sold there.
    place(&m.h, "BUY", "49800", "1").await;
    m.tick(common::now_ms()).await;
    let conv = m.get(&id).await["conversion"].clone();
    assert_eq!(
        (s(&conv, "state"), s(&conv, "soldBtc")),
        ("done".into(), "0.002".into()),
        "{conv}"
    );
    let notional = 200_000u128 * 49_800; // 0.002 BTC at 49,800, quote units (8 decimals)
    let fee = notional * 20 / 10_000;
    assert_eq!(
        s(&conv, "quoteReceived"),
        api::decimal::format_units((notional - fee) as u64, 8)
    );
}

/// Regression (issue 8 §3): `webhookUrl` could be aimed at the server's own network. Every
/// spelling of an internal address is refused (`-1163`) and the settings stay unchanged.
#[tokio::test]
async fn webhook_url_aimed_inside_is_refused_on_setting() {
    let m = setup().await;
    for url in [
        "http://127.0.0.1/",
        "http://127.0.0.1:8081/mapi/v1/admin/account",
        "http://10.1.2.3/",
        "http://192.168.0.10/",
        "http://172.20.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0:22/",
        "http://[::1]/",
        "http://[fc00::1]/",
        "http://[fd00:ec2::254]/",
        "http://[fe80::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://017700000001/",
        "http://0x7f000001/",
        "http://127.1/",
        "http://localhost:8081/",
    ] {
        let enc: String = url
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let r =
            m.h.signed(
                "POST",
                "/mapi/v1/merchant/store",
                &format!("webhookUrl={enc}"),
                &m.key,
            )
            .await;
        assert_eq!(r.code(), -1163, "{url}: {}", r.json);
        let st = m.h.ok("GET", "/mapi/v1/merchant/store", "", &m.key).await;
        assert!(st["webhookUrl"].is_null(), "{url}: {st}");
    }
}

/// Regression (issue 8 §3): `redeliver` was unlimited (thousands of probes a minute). Now 10 a
/// minute per merchant, then `429` `-1003`.
#[tokio::test]
async fn redeliver_is_rate_limited() {
    let m = setup().await;
    for i in 0..10 {
        let r =
            m.h.signed(
                "POST",
                "/mapi/v1/merchant/webhook/redeliver",
                "deliveryId=nope",
                &m.key,
            )
            .await;
        assert_eq!(r.code(), -1160, "call {i}");
    }
    let r =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/webhook/redeliver",
            "deliveryId=nope",
            &m.key,
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::TOO_MANY_REQUESTS, -1003),
        "{}",
        r.json
    );
}

#[tokio::test]
async fn convert_preference_sells_received_btc() {
    let m = setup().await;
    m.h.ok(
        "POST",
        "/mapi/v1/merchant/store",
        "settlement=convert&defaultCurrency=USD",
        &m.key,
    )
    .await;
    // A bid to sell into: 1 BTC at 50,000; asked at 50,500, last traded there.
    market(&m.h, "50000", "50500", "1").await;
    let (_, payer) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    let inv = m.invoice("amount=100").await; // USD, the store's default; rate = the last trade
    assert_eq!(s(&inv, "currency"), "USD");
    let id = s(&inv, "id");
    let sat = api::decimal::parse_units(&s(&inv, "amountBtc"), 8).unwrap();
    // 100 USD at 50,500, rounded up to the satoshi.
    assert_eq!(sat, 198_020);
    m.h.ok(
        "POST",
        "/mapi/v1/merchant/invoice/pay",
        &format!("invoiceId={id}"),
        &payer,
    )
    .await;
    m.tick(common::now_ms()).await;
    let v = m.get(&id).await;
    let conv = &v["conversion"];
    assert_eq!(s(conv, "state"), "done", "{v}");
    // Sold the received BTC rounded down to the lot (1,000 sat) at 50,000, taker fee 0.2 %.
    let lots_sat = sat / 1_000 * 1_000;
    assert_eq!(s(conv, "soldBtc"), merchant::routes::btc(lots_sat));
    let notional = lots_sat as u128 * 50_000; // quote units: 8 decimals
    let fee = notional * 20 / 10_000;
    let want = api::decimal::format_units((notional - fee) as u64, 8);
    assert_eq!(s(conv, "quoteReceived"), want);
    assert_eq!(m.h.balance(&m.key, "USD").await.0, want);
    assert_eq!(
        m.h.balance(&m.key, "BTC").await.0,
        api::decimal::format_units(sat - lots_sat, 8)
    );
}

#[tokio::test]
async fn invalid_and_store_settings() {
    let m = setup().await;
    let inv = m.invoice("amount=0.001").await;
    let id = s(&inv, "id");
    let v =
        m.h.ok(
            "POST",
            "/mapi/v1/merchant/invoice/invalid",
            &format!("invoiceId={id}"),
            &m.key,
        )
        .await;
    assert_eq!(s(&v, "status"), "Invalid");
    let again =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/invalid",
            &format!("invoiceId={id}"),
            &m.key,
        )
        .await;
    assert_eq!(again.code(), -1155);
    assert_eq!(m.events(&id), ["invoice.created", "invoice.invalid"]);

    let st =
        m.h.ok(
            "POST",
            "/mapi/v1/merchant/store",
            "webhookUrl=https%3A%2F%2Fshop.example%2Fhook&tolerancePercent=1.5&posEnabled=true",
            &m.key,
        )
        .await;
    let secret = s(&st, "webhookSecret");
    assert_eq!(secret.len(), 64);
    assert_eq!(s(&st, "tolerancePercent"), "1.5");
    let st2 = m.h.ok("GET", "/mapi/v1/merchant/store", "", &m.key).await;
    assert!(st2.get("webhookSecret").is_none());
    let rot =
        m.h.ok("POST", "/mapi/v1/merchant/webhook/secret", "", &m.key)
            .await;
    assert_ne!(s(&rot, "webhookSecret"), secret);
    assert_eq!(rot["webhookSecretVersion"], 2);
    for bad in [
        "speedPolicy=3",
        "settlement=gold",
        "webhookUrl=ftp%3A%2F%2Fx",
        "tolerancePercent=51",
    ] {
        let r =
            m.h.signed("POST", "/mapi/v1/merchant/store", bad, &m.key)
                .await;
        assert_eq!(r.code(), -1163, "{bad}");
    }
    // Point of sale: info and an invoice in the store's currency.
    let pos = s(&st, "posUrl");
    let info = m.h.get(&format!("{pos}/info")).await;
    assert_eq!(s(&info.json, "currency"), "BTC");
    let r =
        m.h.raw(
            "POST",
            &format!("{pos}/invoice"),
            r#"{"amount":"0.0002"}"#,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(
        (
            s(&r.json, "currency"),
            s(&r.json, "amountBtc"),
            s(&r.json, "status")
        ),
        ("BTC".into(), "0.0002".into(), "New".into())
    );
    let bad =
        m.h.raw("POST", &format!("{pos}/invoice"), r#"{"amount":"0"}"#, None)
            .await;
    assert_eq!(bad.code(), -1153);
    let unknown = m.h.get("/pos/abc/info").await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (StatusCode::NOT_FOUND, -1161)
    );
}

/// Review finding: a store's point-of-sale link is public to whoever has it, and each invoice
/// it makes is a wallet address custody reveals and watches for good (plus a webhook per hook
/// and a BOLT11 part of the store's hour): a loop of `POST /pos/{token}/invoice` from many
/// addresses made them without bound. A store's point of sale makes at most
/// `pos_invoices_per_hour` (`429` `-1003` past it, with `Retry-After`, no address taken);
/// another store's is not held back, nor the store's signed API. Failed on the old code (the
/// fourth invoice was made).
#[tokio::test]
async fn a_point_of_sale_makes_a_bounded_number_of_invoices_an_hour() {
    let h = Harness::with_merchant(
        common::base::Harness::new(),
        merchant::MerchantConfig {
            pos_invoices_per_hour: 3,
            ..common::test_merchant_config()
        },
    );
    let m = setup_on(h).await;
    let st =
        m.h.ok("POST", "/mapi/v1/merchant/store", "posEnabled=true", &m.key)
            .await;
    let pos = s(&st, "posUrl");
    let make = |pos: String| {
        let h = &m.h;
        async move {
            h.raw(
                "POST",
                &format!("{pos}/invoice"),
                r#"{"amount":"0.0002"}"#,
                None,
            )
            .await
        }
    };
    // Malformed requests do not count (they would close the point of sale for the hour).
    for _ in 0..5 {
        let bad =
            m.h.raw("POST", &format!("{pos}/invoice"), r#"{"amount":"0"}"#, None)
                .await;
        assert_eq!(bad.code(), -1153);
    }
    for _ in 0..3 {
        assert_eq!(make(pos.clone()).await.status, StatusCode::CREATED);
    }
    let addresses = *m.fake.addresses.lock().unwrap();
    let r = make(pos.clone()).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::TOO_MANY_REQUESTS, -1003),
        "{}",
        r.json
    );
    assert_eq!(
        *m.fake.addresses.lock().unwrap(),
        addresses,
        "an address was taken"
    );
    // The store's signed API still makes invoices.
    m.invoice("amount=0.0001").await;
}

#[tokio::test]
async fn openapi_lists_every_merchant_route() {
    let h = Harness::new();
    let doc = h.get("/openapi.json").await.json;
    for (method, path) in [
        ("get", "/mapi/v1/merchant/store"),
        ("post", "/mapi/v1/merchant/store"),
        ("post", "/mapi/v1/merchant/webhook/secret"),
        ("post", "/mapi/v1/merchant/invoice"),
        ("get", "/mapi/v1/merchant/invoice"),
        ("get", "/mapi/v1/merchant/invoices"),
        ("post", "/mapi/v1/merchant/invoice/invalid"),
        ("post", "/mapi/v1/merchant/invoice/refund"),
        ("post", "/mapi/v1/merchant/invoice/pay"),
        ("get", "/mapi/v1/merchant/webhook/deliveries"),
        ("post", "/mapi/v1/merchant/webhook/redeliver"),
        ("get", "/i/{id}/status"),
        ("get", "/i/{id}/events"),
        ("get", "/i/{id}/qr.png"),
        ("get", "/i/{id}/qr.svg"),
        ("get", "/pos/{token}/info"),
        ("post", "/pos/{token}/invoice"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
    assert_eq!(
        doc["paths"]["/mapi/v1/merchant/invoice/pay"]["post"]["x-permission"],
        "transfer"
    );
}

// ---------------------------------------------------------------------------------------------
// Outcomes that are unknown (issue 13): a reply lost after the money moved.

#[tokio::test]
async fn a_balance_payment_whose_reply_is_lost_is_recorded_once_by_the_monitor() {
    let (h, core) = Harness::lossy();
    let m = setup_on(h).await;
    let (_, payer) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    let inv = m.invoice("amount=0.00123").await;
    let id = s(&inv, "id");
    core.lose_next(1);
    let r =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/pay",
            &format!("invoiceId={id}"),
            &payer,
        )
        .await;
    assert_eq!(r.code(), -1007, "{}", r.json);
    // The monitor asks the engine about the payment's key: it was applied, so it is recorded.
    m.tick(common::now_ms()).await;
    let v = m.get(&id).await;
    assert_eq!(
        (s(&v, "status"), s(&v, "paidBtc")),
        ("Settled".into(), "0.00123".into())
    );
    assert_eq!(m.h.balance(&payer, "BTC").await.0, "0.99877000");
    assert_eq!(m.h.balance(&m.key, "BTC").await.0, "0.00123000");
    // Paying again moves nothing; another tick records nothing twice.
    let again =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/pay",
            &format!("invoiceId={id}"),
            &payer,
        )
        .await;
    assert_eq!(again.code(), -1155, "{}", again.json);
    m.tick(common::now_ms()).await;
    assert_eq!(m.get(&id).await["payments"].as_array().unwrap().len(), 1);
    assert_eq!(m.h.balance(&payer, "BTC").await.0, "0.99877000");
}

/// Review finding: while one payer's balance payment had an unknown outcome (its answer lost,
/// the transfer applied), a second account could pay the invoice in full too: paid twice. A
/// second payer is refused (`409 -1165`, nothing moved) until the first one is resolved.
#[tokio::test]
async fn a_second_payer_waits_while_the_first_payment_is_in_doubt() {
    let (h, core) = Harness::lossy();
    let m = setup_on(h).await;
    let (_, first) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    let (_, second) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    let inv = m.invoice("amount=0.00123").await;
    let id = s(&inv, "id");
    let pay = |key: &(String, String)| {
        let (m, id, key) = (&m, id.clone(), key.clone());
        async move {
            m.h.signed(
                "POST",
                "/mapi/v1/merchant/invoice/pay",
                &format!("invoiceId={id}"),
                &key,
            )
            .await
        }
    };
    core.lose_next(1);
    assert_eq!(pay(&first).await.code(), -1007);
    let r = pay(&second).await;
    assert_eq!(
        (r.status, r.code()),
        (axum::http::StatusCode::CONFLICT, -1165),
        "{}",
        r.json
    );
    assert_eq!(m.h.balance(&second, "BTC").await.0, "1.00000000");
    // Resolved: the first paid it; the second is told it is paid, and nothing moved twice.
    m.tick(common::now_ms()).await;
    assert_eq!(pay(&second).await.code(), -1155);
    assert_eq!(m.h.balance(&first, "BTC").await.0, "0.99877000");
    assert_eq!(m.h.balance(&second, "BTC").await.0, "1.00000000");
}

/// A balance payment's retry after an unknown outcome completes that payment, even when the
/// amount due changed in between (a chain payment arrived while the monitor could not learn the
/// first one's outcome): it must not send a second transfer of the new amount due, which paid
/// the invoice twice from the payer's balance.
#[tokio::test]
async fn a_balance_payment_retried_after_the_amount_due_changed_pays_once() {
    let (h, core) = Harness::lossy();
    let m = setup_on(h).await;
    let now = common::now_ms();
    let (_, payer) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    let inv = m.invoice("amount=0.002").await;
    let (id, addr) = (s(&inv, "id"), s(&inv, "address"));
    let params = format!("invoiceId={id}");
    let pay = || {
        m.h.signed("POST", "/mapi/v1/merchant/invoice/pay", &params, &payer)
    };
    core.lose_next(1);
    let r = pay().await;
    assert_eq!(r.code(), -1007, "{}", r.json);
    // A chain payment of a quarter arrives; the monitor sees it, but its repeat of the balance
    // payment gets no answer either, so that payment is still unknown.
    m.fake.pay(m.account, &addr, 7, 50_000, 0, now);
    core.lose_next(1);
    m.tick(now + 1).await;
    assert_eq!(s(&m.get(&id).await, "dueBtc"), "0.0015");
    // The payer's retry completes the first payment; nothing more leaves the payer's balance.
    let again = pay().await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.json);
    assert_eq!(s(&again.json, "paidFromBalanceBtc"), "0.002");
    m.tick(now + 2).await;
    assert!(m.h.state.sync_read_model().await);
    assert_eq!(m.h.balance(&payer, "BTC").await.0, "0.99800000");
    let v = m.get(&id).await;
    assert_eq!(
        (s(&v, "paidBtc"), v["payments"].as_array().unwrap().len()),
        ("0.0025".into(), 2),
        "{v}"
    );
}

/// The same for the payer's retry: while the circuit breaker is open its repeat of a payment
/// whose outcome is unknown is not taken, which says nothing about the first attempt; the
/// intent stays (the monitor records the payment once the engine answers), never dropped while
/// the payer's money may have moved.
#[tokio::test]
async fn a_balance_payment_retried_while_the_breaker_is_open_keeps_its_intent() {
    let (h, core) = Harness::lossy();
    let m = setup_on(h).await;
    let (_, payer) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    let inv = m.invoice("amount=0.00123").await;
    let params = format!("invoiceId={}", s(&inv, "id"));
    core.lose_next(1);
    let r =
        m.h.signed("POST", "/mapi/v1/merchant/invoice/pay", &params, &payer)
            .await;
    assert_eq!(r.code(), -1007, "{}", r.json);
    m.h.state.read_model().trip(api::audit::Violation {
        seq: 0,
        asset: 0,
        balances: 0,
        supply: 0,
    });
    let again =
        m.h.signed("POST", "/mapi/v1/merchant/invoice/pay", &params, &payer)
            .await;
    let intents = {
        let db = m.h.state.merchant().db.lock().unwrap();
        store::pay_intents(&db).unwrap().len()
    };
    assert_eq!(intents, 1, "the intent of a payment that moved was dropped");
    assert_eq!(again.code(), -1007, "{}", again.json);
}

/// Defect: resolving a payment whose reply was lost repeats its transfer to learn the outcome;
/// while the circuit breaker was open that repeat was "not taken" (halted), which was read as
/// "the payment never happened": the intent was dropped although the payer's money had moved to
/// the merchant, and the invoice was never credited. Only the engine's answer is final.
#[tokio::test]
async fn a_lost_payment_is_not_dropped_while_the_breaker_is_open() {
    let (h, core) = Harness::lossy();
    let m = setup_on(h).await;
    let (_, payer) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    let inv = m.invoice("amount=0.00123").await;
    let id = s(&inv, "id");
    core.lose_next(1);
    let r =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/pay",
            &format!("invoiceId={id}"),
            &payer,
        )
        .await;
    assert_eq!(r.code(), -1007, "{}", r.json);
    // The money moved (the reply was lost after the transfer applied). A lost reply does not
    // wait for the read models: catch them up before reading the balance.
    assert!(m.h.state.sync_read_model().await);
    assert_eq!(m.h.balance(&m.key, "BTC").await.0, "0.00123000");
    m.h.state.read_model().trip(api::audit::Violation {
        seq: 0,
        asset: 0,
        balances: 0,
        supply: 0,
    });
    assert!(m.h.state.halted().is_some());
    let out = merchant::outcome::resolve(&m.h.state, common::now_ms())
        .await
        .unwrap();
    assert_eq!((out.dropped, out.unknown), (0, 1), "{out:?}");
    let v = m.get(&id).await;
    assert_eq!(s(&v, "status"), "New", "{v}");
}

#[tokio::test]
async fn a_refund_whose_reply_is_lost_stays_reserved_and_its_retry_pays_once() {
    let (h, core) = Harness::lossy();
    let m = setup_on(h).await;
    let (payer_id, payer) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    let inv = m.invoice("amount=0.002").await;
    let id = s(&inv, "id");
    m.h.ok(
        "POST",
        "/mapi/v1/merchant/invoice/pay",
        &format!("invoiceId={id}"),
        &payer,
    )
    .await;
    let params = format!("invoiceId={id}&amount=0.001&toAccount={payer_id}&idempotencyKey=rf-1");
    core.lose_next(1);
    let r =
        m.h.signed("POST", "/mapi/v1/merchant/invoice/refund", &params, &m.key)
            .await;
    assert_eq!(r.code(), -1007, "{}", r.json);
    // Still reserved: a second refund cannot take the same money again.
    let v = m.get(&id).await;
    assert_eq!(s(&v, "refundedBtc"), "0.001", "{v}");
    assert_eq!(s(&v["refunds"][0], "state"), "unknown");
    let over =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/refund",
            &format!("invoiceId={id}&amount=0.0011&toAccount={payer_id}"),
            &m.key,
        )
        .await;
    assert_eq!(over.code(), -1156, "{}", over.json);
    // The same request again answers the same refund, moving nothing twice.
    let again =
        m.h.ok("POST", "/mapi/v1/merchant/invoice/refund", &params, &m.key)
            .await;
    assert_eq!(
        (again["n"].as_u64(), s(&again, "refundedBtc")),
        (Some(1), "0.001".into())
    );
    assert!(s(&again, "reference").starts_with("transfer:"), "{again}");
    assert_eq!(m.h.balance(&payer, "BTC").await.0, "0.99900000");
    assert_eq!(m.h.balance(&m.key, "BTC").await.0, "0.00100000");
    m.tick(common::now_ms()).await;
    let v = m.get(&id).await;
    assert_eq!(v["refunds"].as_array().unwrap().len(), 1);
    assert_eq!(s(&v["refunds"][0], "state"), "done");
    assert_eq!(m.h.balance(&payer, "BTC").await.0, "0.99900000");
    assert_eq!(
        m.events(&id)
            .iter()
            .filter(|e| *e == "invoice.refunded")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_refund_to_an_address_whose_custody_answer_is_lost_pays_once() {
    let m = setup().await;
    let now = common::now_ms();
    let id = m.paid_invoice(now).await;
    m.fake.lose.store(1, Ordering::SeqCst);
    let r = m.refund_to_address(&id, "0.0004").await;
    assert_eq!(r.code(), -1007, "{}", r.json);
    assert_eq!(s(&m.get(&id).await, "refundedBtc"), "0.0004");
    // The monitor finds custody's withdrawal by the refund's key: done, not paid again.
    m.tick(now + 2).await;
    let v = m.get(&id).await;
    assert_eq!(
        (
            s(&v["refunds"][0], "state"),
            s(&v["refunds"][0], "reference")
        ),
        ("done".into(), "withdrawal:100".into())
    );
    // A new refund gets a new number (and key): never the lost one's.
    let r = m.refund_to_address(&id, "0.0001").await;
    assert_eq!(r.status, axum::http::StatusCode::OK, "{}", r.json);
    let ws = m.fake.withdrawals.lock().unwrap().clone();
    let keys: Vec<_> = ws
        .iter()
        .map(|w| (w.idempotency_key.clone(), w.amount_sat))
        .collect();
    assert_eq!(
        keys,
        [
            (format!("refund-{id}-1"), 40_000),
            (format!("refund-{id}-2"), 10_000)
        ]
    );
    assert_eq!(s(&m.get(&id).await, "refundedBtc"), "0.0005");
}

/// Review finding (HIGH): a refund whose custody withdrawal was recorded with its ledger hold
/// unresolved (the wallet's `new` row, which custody removes when the hold is then refused,
/// e.g. the merchant's balance spent meanwhile) was taken for done: `invoice.refunded` sent,
/// the amount reserved, and nothing ever paid once custody removed the row. It stays `unknown`
/// until custody holds the amount; a row custody removed is requested again under its key.
#[tokio::test]
async fn a_refund_whose_custody_hold_is_unresolved_is_not_done_until_held() {
    let m = setup().await;
    let now = common::now_ms();
    let id = m.paid_invoice(now).await;
    m.fake.lose.store(1, Ordering::SeqCst);
    m.fake.unresolved.store(1, Ordering::SeqCst);
    let r = m.refund_to_address(&id, "0.0004").await;
    assert_eq!(r.code(), -1007, "{}", r.json);
    // The monitor finds the row unresolved; custody then removes it (its hold refused).
    m.fake.free_after_lookup.store(1, Ordering::SeqCst);
    m.tick(now + 2).await;
    let v = m.get(&id).await;
    assert_eq!(s(&v["refunds"][0], "state"), "unknown", "{v:#}");
    assert_eq!(m.refunded_events(&id), 0);
    assert!(m.fake.withdrawals.lock().unwrap().is_empty());
    // Nothing under the key now: requested again, held this time, done once.
    m.tick(now + 3).await;
    let v = m.get(&id).await;
    assert_eq!(
        (
            s(&v["refunds"][0], "state"),
            s(&v["refunds"][0], "reference")
        ),
        ("done".into(), "withdrawal:100".into())
    );
    let ws = m.fake.withdrawals.lock().unwrap().clone();
    assert_eq!(ws.len(), 1);
    assert_eq!(ws[0].idempotency_key, format!("refund-{id}-1"));
    assert_eq!(s(&v, "refundedBtc"), "0.0004");
    assert_eq!(m.refunded_events(&id), 1);
    // Custody answering the request itself with a row still unresolved: unknown, not done.
    m.fake.unresolved.store(1, Ordering::SeqCst);
    let r = m.refund_to_address(&id, "0.0001").await;
    assert_eq!(r.code(), -1007, "{}", r.json);
    m.tick(now + 4).await;
    let v = m.get(&id).await;
    assert_eq!(s(&v["refunds"][1], "state"), "unknown", "{v:#}");
    // Released by custody before anyone learned the outcome: refused, given back.
    m.fake.withdrawals.lock().unwrap()[1].state = api::custody::WithdrawalState::Released;
    m.tick(now + 5).await;
    let v = m.get(&id).await;
    assert_eq!(v["refunds"].as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(s(&v, "refundedBtc"), "0.0004");
    assert_eq!(
        m.refunded_events(&id),
        1,
        "no invoice.refunded for a refund never paid"
    );
}

/// Review finding (MEDIUM-HIGH): a refund to an address whose withdrawal custody later
/// released (an operator rejected it, or its address was refused) stayed `done`, its amount
/// reserved for good: the money was back in the merchant's balance, the customer got nothing,
/// and a new refund of it was refused (`-1156`). The monitor follows such refunds until custody
/// pays or releases them; a released one is given back (`cancelled`) and can be refunded again.
#[tokio::test]
async fn a_refund_custody_released_is_given_back_and_can_be_refunded_again() {
    let m = setup().await;
    let now = common::now_ms();
    let id = m.paid_invoice(now).await;
    let r = m.refund_to_address(&id, "0.001").await;
    assert_eq!(r.status, axum::http::StatusCode::OK, "{}", r.json);
    // Still on its way: followed, nothing changes.
    m.tick(now + 2).await;
    assert_eq!(s(&m.get(&id).await, "refundedBtc"), "0.001");
    m.fake.withdrawals.lock().unwrap()[0].state = api::custody::WithdrawalState::Released;
    m.tick(now + 3).await;
    let v = m.get(&id).await;
    assert_eq!(s(&v, "refundedBtc"), "0", "{v:#}");
    // The merchant, told `invoice.refunded` when custody took the refund, is told it was given
    // back (once, however often the monitor looks), with the invoice as it is now.
    m.tick(now + 3).await;
    assert_eq!(cancelled_refund_bodies(&m, &id), ["0"]);
    let again = m.refund_to_address(&id, "0.001").await;
    assert_eq!(again.status, axum::http::StatusCode::OK, "{}", again.json);
    assert_eq!(s(&again.json, "reference"), "withdrawal:101");
    // Paid: followed to its end, and never given back after.
    m.fake.withdrawals.lock().unwrap()[1].state = api::custody::WithdrawalState::Completed;
    m.tick(now + 4).await;
    m.fake.withdrawals.lock().unwrap()[1].state = api::custody::WithdrawalState::Released;
    m.tick(now + 5).await;
    assert_eq!(s(&m.get(&id).await, "refundedBtc"), "0.001");
    assert_eq!(m.refund_to_address(&id, "0.0001").await.code(), -1156);
}

/// The `refundedBtc` of each `invoice.refund_cancelled` webhook body of invoice `id`, in order.
fn cancelled_refund_bodies(m: &M, id: &str) -> Vec<String> {
    let db = m.h.state.merchant().db.lock().unwrap();
    let mut st = db
        .prepare(
            "SELECT body FROM webhook_deliveries WHERE invoice_id = ?1 \
             AND hook IS NULL AND event = 'invoice.refund_cancelled' ORDER BY created_ms, rowid",
        )
        .unwrap();
    let bodies = st
        .query_map([id], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|b| serde_json::from_slice::<Value>(&b.unwrap()).unwrap())
        .collect::<Vec<_>>();
    bodies
        .iter()
        .map(|b| {
            assert_eq!(b["type"], "invoice.refund_cancelled", "{b}");
            s(&b["invoice"], "refundedBtc")
        })
        .collect()
}

/// Review finding: custody's withdrawal under a refund's key (`refund-<invoice>-<n>`, a
/// predictable key) counted as the refund's when account and amount matched, whatever its
/// address: a holder of a `withdraw` key could take the key first, to its own address, and the
/// refund showed done (`invoice.refunded` sent) while the customer got nothing. A key taken by
/// another address is a conflict now: not done, the refund stays `unknown` (reserved), no
/// webhook, however often the monitor asks again.
#[tokio::test]
async fn a_refund_key_taken_by_another_address_is_not_done() {
    let m = setup().await;
    let now = common::now_ms();
    let inv = m.invoice("amount=0.001").await;
    let id = s(&inv, "id");
    m.fake
        .pay(m.account, &s(&inv, "address"), 1, 100_000, 1, now);
    m.tick(now + 1).await;
    m.fake
        .withdrawals
        .lock()
        .unwrap()
        .push(api::custody::WithdrawalInfo {
            id: 7,
            account: m.account,
            address: "bcrt1qthemerchantsown".into(),
            amount_sat: 40_000,
            fee_sat: 0,
            idempotency_key: format!("refund-{id}-1"),
            state: api::custody::WithdrawalState::Completed,
            reason: None,
            created_ms: 0,
            txid: Some("ee".repeat(32)),
            confirmations: 3,
        });
    let r =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/refund",
            &format!("invoiceId={id}&amount=0.0004&address=bcrt1qcustomer"),
            &m.wkey,
        )
        .await;
    assert_eq!(r.code(), -1007, "{}", r.json);
    m.tick(now + 2).await;
    let v = m.get(&id).await;
    assert_eq!(s(&v["refunds"][0], "state"), "unknown", "{v}");
    assert!(
        !m.events(&id).iter().any(|e| e == "invoice.refunded"),
        "invoice.refunded sent for a refund paid to another address"
    );
    assert_eq!(m.fake.withdrawals.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn only_credited_payments_are_refundable() {
    let m = setup().await;
    m.h.ok("POST", "/mapi/v1/merchant/store", "speedPolicy=0", &m.key)
        .await;
    let inv = m.invoice("amount=0.0005").await;
    let (id, addr) = (s(&inv, "id"), s(&inv, "address"));
    let now = common::now_ms();
    m.fake.pay(m.account, &addr, 9, 50_000, 0, now);
    m.tick(now + 1).await;
    assert_eq!(s(&m.get(&id).await, "status"), "Settled");
    // Settled at 0 confirmations, but an unconfirmed payment can be replaced: not refundable.
    let r =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/refund",
            &format!("invoiceId={id}&amount=0.0001&address=bcrt1qdest"),
            &m.wkey,
        )
        .await;
    assert_eq!(r.code(), -1156, "{}", r.json);
    assert!(m.fake.withdrawals.lock().unwrap().is_empty());
    m.fake.pay(m.account, &addr, 9, 50_000, 1, now);
    m.tick(now + 2).await;
    m.h.ok(
        "POST",
        "/mapi/v1/merchant/invoice/refund",
        &format!("invoiceId={id}&amount=0.0005&address=bcrt1qdest"),
        &m.wkey,
    )
    .await;
    assert_eq!(m.fake.withdrawals.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_conversion_whose_reply_is_lost_sells_once() {
    let (h, core) = Harness::lossy();
    let m = setup_on(h).await;
    m.h.ok(
        "POST",
        "/mapi/v1/merchant/store",
        "settlement=convert&defaultCurrency=USD",
        &m.key,
    )
    .await;
    // A bid to sell into at 50,000 (the reference: 50,500, last traded; worst 49,995).
    market(&m.h, "50000", "50500", "1").await;
    let (_, payer) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    let inv = m.invoice("amount=0.002&currency=BTC").await;
    let id = s(&inv, "id");
    m.h.ok(
        "POST",
        "/mapi/v1/merchant/invoice/pay",
        &format!("invoiceId={id}"),
        &payer,
    )
    .await;
    // The sell is applied, its reply lost.
    core.lose_next(1);
    let first = tick(&m.h.state, common::now_ms()).await;
    assert!(first.is_err(), "{first:?}");
    m.tick(common::now_ms()).await;
    let v = m.get(&id).await;
    let conv = &v["conversion"];
    assert_eq!(
        (s(conv, "state"), s(conv, "soldBtc")),
        ("done".into(), "0.002".into()),
        "{v}"
    );
    let notional: u128 = 200_000 * 50_000; // sats x USD/BTC = quote units (8 decimals)
    let want = api::decimal::format_units((notional - notional * 20 / 10_000) as u64, 8);
    assert_eq!(s(conv, "quoteReceived"), want);
    assert_eq!(m.h.balance(&m.key, "USD").await.0, want);
    assert_eq!(m.h.balance(&m.key, "BTC").await.0, "0.00000000");
}

#[tokio::test]
async fn a_payment_runs_to_completion_when_the_client_goes_away() {
    let m = setup().await;
    let (_, payer) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    let inv = m.invoice("amount=0.0002").await;
    let id = s(&inv, "id");
    // The client sends the request and hangs up after the first poll.
    let gone = tokio::time::timeout(
        std::time::Duration::ZERO,
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/pay",
            &format!("invoiceId={id}"),
            &payer,
        ),
    )
    .await;
    assert!(
        gone.is_err(),
        "the request should not have finished in one poll"
    );
    let mut status = String::new();
    for _ in 0..500 {
        status = s(&m.get(&id).await, "status");
        if status == "Settled" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(status, "Settled");
    assert_eq!(m.h.balance(&payer, "BTC").await.0, "0.99980000");
    assert_eq!(m.h.balance(&m.key, "BTC").await.0, "0.00020000");
}

#[tokio::test]
async fn a_payment_intent_left_by_a_crash_is_recorded_from_the_engine() {
    let m = setup().await;
    let (payer_id, payer) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    let inv = m.invoice("amount=0.0003").await;
    let id = s(&inv, "id");
    // As if the process died after the transfer was applied and before the invoice was
    // updated: the intent is on disk, the engine has the transfer.
    let intent = store::PayIntent {
        pid: format!("pay/{id}/{payer_id}/30000"),
        invoice_id: id.clone(),
        payer: payer_id,
        amount_sat: 30_000,
        created_ms: common::now_ms(),
    };
    let cmd = merchant::outcome::pay_command(&m.h.state, &intent, m.account).unwrap();
    m.h.state.submit(cmd).await.unwrap().result.unwrap();
    store::insert_pay_intent(&m.h.state.merchant().db.lock().unwrap(), &intent).unwrap();
    m.tick(common::now_ms()).await;
    let v = m.get(&id).await;
    assert_eq!(
        (s(&v, "status"), s(&v, "paidBtc")),
        ("Settled".into(), "0.0003".into())
    );
    // Moved once: the tick's repeat of the transfer was a duplicate.
    assert_eq!(m.h.balance(&payer, "BTC").await.0, "0.99970000");
    assert_eq!(m.h.balance(&m.key, "BTC").await.0, "0.00030000");
    assert!(store::pay_intents(&m.h.state.merchant().db.lock().unwrap())
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn trade_key_cannot_pay_another_accounts_invoice() {
    let m = setup().await;
    let (_, payer) = m.h.trader("1", "0").await; // read,trade: a bot's key
    let inv = m.invoice("amount=0.001").await;
    let id = s(&inv, "id");
    let r =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/pay",
            &format!("invoiceId={id}"),
            &payer,
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, -2015),
        "{}",
        r.json
    );
    assert_eq!(m.h.balance(&payer, "BTC").await.0, "1.00000000");
    assert_eq!(m.h.balance(&m.key, "BTC").await.0, "0.00000000");
    assert_eq!(s(&m.get(&id).await, "status"), "New");
}

#[tokio::test]
async fn merchant_key_cannot_refund_to_an_address_without_withdraw() {
    let m = setup().await; // read,merchant
    let now = common::now_ms();
    let inv = m.invoice("amount=0.001").await;
    let id = s(&inv, "id");
    m.fake
        .pay(m.account, &s(&inv, "address"), 1, 100_000, 1, now);
    m.tick(now + 1).await;
    let r =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/refund",
            &format!("invoiceId={id}&amount=0.0004&address=bcrt1qthief"),
            &m.key,
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, -2015),
        "{}",
        r.json
    );
    assert!(m.fake.withdrawals.lock().unwrap().is_empty());
    let v = m.get(&id).await;
    assert_eq!(s(&v, "refundedBtc"), "0");
    assert_eq!(v["refunds"].as_array().unwrap().len(), 0);
}

/// The directive `name` of a Content-Security-Policy header.
fn csp_directive(csp: &str, name: &str) -> Option<String> {
    csp.split(';')
        .map(str::trim)
        .find_map(|d| d.strip_prefix(name).map(|v| v.trim().to_owned()))
}

#[tokio::test]
async fn checkout_and_pos_pages_send_security_headers() {
    let m = setup().await;
    let st =
        m.h.ok("POST", "/mapi/v1/merchant/store", "posEnabled=true", &m.key)
            .await;
    let inv = m.invoice("amount=0.001").await;
    for path in [format!("/i/{}", s(&inv, "id")), s(&st, "posUrl")] {
        let r = m.h.get(&path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        let h = |n: &str| {
            r.headers
                .get(n)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        assert_eq!(h("x-content-type-options"), "nosniff", "{path}");
        let csp = h("content-security-policy");
        assert_eq!(
            csp_directive(&csp, "default-src").as_deref(),
            Some("'none'"),
            "{path}: {csp}"
        );
        let script = csp_directive(&csp, "script-src").unwrap_or_default();
        assert!(
            script.starts_with("'sha256-") && !script.contains("unsafe"),
            "{path}: {csp}"
        );
        assert_eq!(
            csp_directive(&csp, "frame-ancestors").as_deref(),
            Some("'self'"),
            "{path}: {csp}"
        );
        // The hash is the page's own script's.
        let page = r.json.as_str().unwrap();
        let body = page
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map(|(js, _)| js)
            .unwrap();
        use base64::Engine as _;
        use sha2::Digest as _;
        let want = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(body));
        assert!(script.contains(&want), "{path}: {csp}");
    } // BTCPay's modal checkout: the page in `view=modal` may be framed by the shop's site (it
      // changes nothing), the plain page and the point of sale still by `frame_ancestors` only;
      // the script that opens it is served to any site.
    let modal = m.h.get(&format!("/i/{}?view=modal", s(&inv, "id"))).await;
    let csp = modal.headers["content-security-policy"].to_str().unwrap();
    assert_eq!(
        csp_directive(csp, "frame-ancestors").as_deref(),
        Some("*"),
        "{csp}"
    );
    assert_eq!(
        csp_directive(csp, "default-src").as_deref(),
        Some("'none'"),
        "{csp}"
    );
    let not_modal = m.h.get(&format!("/i/{}?view=modalx", s(&inv, "id"))).await;
    let csp = not_modal.headers["content-security-policy"]
        .to_str()
        .unwrap();
    assert_eq!(
        csp_directive(csp, "frame-ancestors").as_deref(),
        Some("'self'"),
        "{csp}"
    );
    let js = m.h.get("/modal/btcpay.js").await;
    assert_eq!(js.status, StatusCode::OK);
    assert_eq!(js.headers["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(js.headers["x-content-type-options"], "nosniff");
    let body = js.json.as_str().unwrap();
    for api in [
        "showInvoice",
        "onModalReceiveMessage",
        "hideFrame",
        "setApiUrlPrefix",
        "?view=modal",
    ] {
        assert!(body.contains(api), "{api}");
    }
}

/// Defect: an account custody flagged (a credited deposit left the chain) could not withdraw or
/// transfer, but paid a merchant invoice from its balance: the money moved to the merchant,
/// who could withdraw it. Refused as its withdrawals are (`-4032`), nothing written or moved.
#[tokio::test]
async fn a_flagged_account_cannot_pay_an_invoice_from_its_balance() {
    let m = setup().await;
    let (payer_account, payer) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    m.fake.flagged.lock().unwrap().push(payer_account);
    let inv = m.invoice("amount=0.00123").await;
    let id = s(&inv, "id");
    let r =
        m.h.signed(
            "POST",
            "/mapi/v1/merchant/invoice/pay",
            &format!("invoiceId={id}"),
            &payer,
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, -4032),
        "{}",
        r.json
    );
    assert_eq!(m.h.balance(&payer, "BTC").await.0, "1.00000000");
    assert_eq!(m.h.balance(&m.key, "BTC").await.0, "0.00000000");
    assert_eq!(s(&m.get(&id).await, "status"), "New");
}

/// Defect: a merchant account custody flagged (a credited deposit left the chain) still sent
/// refunds out on its own request, to an account (an engine transfer) or an address: the flag
/// held its withdrawals and transfers but not the money its refunds moved. A new refund is
/// refused (`-4032`), nothing reserved or moved; a refund asked before the flag is still
/// answered by its idempotency key.
#[tokio::test]
async fn a_flagged_merchant_cannot_refund() {
    let m = setup().await;
    let (payer_id, payer) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    let inv = m.invoice("amount=0.00123").await;
    let id = s(&inv, "id");
    m.h.ok(
        "POST",
        "/mapi/v1/merchant/invoice/pay",
        &format!("invoiceId={id}"),
        &payer,
    )
    .await;
    let first_params =
        format!("invoiceId={id}&amount=0.0001&toAccount={payer_id}&idempotencyKey=rf-1");
    let first =
        m.h.ok(
            "POST",
            "/mapi/v1/merchant/invoice/refund",
            &first_params,
            &m.key,
        )
        .await;
    m.fake.flagged.lock().unwrap().push(m.account);
    // The refund asked before the flag: answered, not refused, not paid twice.
    let again =
        m.h.ok(
            "POST",
            "/mapi/v1/merchant/invoice/refund",
            &first_params,
            &m.key,
        )
        .await;
    assert_eq!(
        (s(&again, "n"), s(&again, "reference")),
        (s(&first, "n"), s(&first, "reference"))
    );
    // New refunds: to an account, and to an address.
    for (params, key) in [
        (
            format!("invoiceId={id}&amount=0.0001&toAccount={payer_id}&idempotencyKey=rf-2"),
            &m.key,
        ),
        (
            format!("invoiceId={id}&amount=0.0001&address=bcrt1qcustomer"),
            &m.wkey,
        ),
    ] {
        let r =
            m.h.signed("POST", "/mapi/v1/merchant/invoice/refund", &params, key)
                .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::BAD_REQUEST, -4032),
            "{params}: {}",
            r.json
        );
    }
    assert!(m.h.state.sync_read_model().await);
    assert_eq!(m.h.balance(&payer, "BTC").await.0, "0.99887000");
    assert_eq!(m.h.balance(&m.key, "BTC").await.0, "0.00113000");
    assert!(m.fake.withdrawals.lock().unwrap().is_empty());
    let v = m.get(&id).await;
    assert_eq!(s(&v, "refundedBtc"), "0.0001");
    assert_eq!(v["refunds"].as_array().unwrap().len(), 1, "{v}");
}

/// Defect: a balance payment's id (and its engine key) was `pay/<invoice>/<payer>/<due>`, so a
/// payer asked the same amount due a second time on one invoice (a chain payment that had
/// made the invoice paid left the chain, and it went back to `New` with the same due) sent the
/// first payment's key again: the engine answered it as a duplicate, the invoice recorded
/// nothing new, and the payer got `200` and the old `tranId` while nothing moved.
#[tokio::test]
async fn a_balance_payment_asked_again_after_a_chain_payment_left_pays_again() {
    let m = setup().await;
    let now = common::now_ms();
    let (_, payer) = m.h.trader_with("1", "0", "read,trade,transfer").await;
    let inv = m.invoice("amount=0.001").await;
    let (id, addr) = (s(&inv, "id"), s(&inv, "address"));
    let params = format!("invoiceId={id}");
    m.fake.pay(m.account, &addr, 7, 50_000, 0, now);
    m.tick(now + 1).await;
    assert_eq!(s(&m.get(&id).await, "dueBtc"), "0.0005");
    let first =
        m.h.ok("POST", "/mapi/v1/merchant/invoice/pay", &params, &payer)
            .await;
    assert_eq!(s(&first, "status"), "Processing", "{first}");
    // The chain payment is dropped: the invoice is due the same 0.0005 again.
    for d in m.fake.deposits.lock().unwrap().iter_mut() {
        d.state = api::custody::DepositState::Dropped;
    }
    m.tick(now + 2).await;
    let v = m.get(&id).await;
    assert_eq!(
        (s(&v, "status"), s(&v, "dueBtc")),
        ("New".into(), "0.0005".into()),
        "{v}"
    );
    let second =
        m.h.ok("POST", "/mapi/v1/merchant/invoice/pay", &params, &payer)
            .await;
    assert_eq!(s(&second, "paidFromBalanceBtc"), "0.0005");
    assert_ne!(s(&second, "tranId"), s(&first, "tranId"));
    assert!(m.h.state.sync_read_model().await);
    assert_eq!(m.h.balance(&payer, "BTC").await.0, "0.99900000");
    assert_eq!(m.h.balance(&m.key, "BTC").await.0, "0.00100000");
    let v = m.get(&id).await;
    assert_eq!(
        (s(&v, "status"), s(&v, "paidBtc"), s(&v, "dueBtc")),
        ("Settled".into(), "0.001".into(), "0".into()),
        "{v}"
    );
    // Asked once more: nothing is due, nothing moves.
    let r =
        m.h.signed("POST", "/mapi/v1/merchant/invoice/pay", &params, &payer)
            .await;
    assert_eq!(r.code(), -1155, "{}", r.json);
    assert_eq!(m.h.balance(&payer, "BTC").await.0, "0.99900000");
}

/// A Lightning node whose one merchant invoice (`LateLn::HASH`) is paid on time and credited
/// when the test says so (the ledger held the credit back until then).
#[derive(Debug, Default)]
struct LateLn {
    /// When the node recorded the payment (ms), set once the credit was applied.
    credited_at: std::sync::Mutex<Option<u64>>,
}

impl LateLn {
    const HASH: &'static str = "7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a";
}

fn not_here<T>() -> Result<T, api::custody::CustodyError> {
    Err(api::custody::CustodyError::internal("not in this test"))
}

impl api::lightning::Lightning for LateLn {
    fn deposit_invoice(
        &self,
        _: u32,
        _: u64,
    ) -> Result<api::lightning::LnInvoiceInfo, api::custody::CustodyError> {
        not_here()
    }
    fn merchant_invoice(
        &self,
        _: u32,
        amount_sat: u64,
        _: &str,
        expiry_secs: u32,
    ) -> Result<api::lightning::LnInvoiceInfo, api::custody::CustodyError> {
        Ok(api::lightning::LnInvoiceInfo {
            invoice: "lnbcrt1late".into(),
            payment_hash: Self::HASH.into(),
            amount_sat,
            expires_ms: common::now_ms() + u64::from(expiry_secs) * 1000,
        })
    }
    fn received(
        &self,
        hash: &str,
    ) -> Result<Option<api::lightning::LnReceived>, api::custody::CustodyError> {
        let at = *self.credited_at.lock().unwrap();
        Ok(at
            .filter(|_| hash == Self::HASH)
            .map(|time_ms| api::lightning::LnReceived {
                amount_sat: 100_000,
                time_ms,
            }))
    }
    fn credited_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, String)>, api::custody::CustodyError> {
        // Once credited: position 1 this invoice's credit, 2 a user deposit's (no invoice).
        let credits = match *self.credited_at.lock().unwrap() {
            Some(_) => vec![(1, Self::HASH.to_owned()), (2, "11".repeat(32))],
            None => Vec::new(),
        };
        Ok(credits
            .into_iter()
            .filter(|(seq, _)| *seq > after)
            .take(limit as usize)
            .collect())
    }
    fn pay(
        &self,
        _: u32,
        _: &str,
    ) -> Result<api::lightning::LnPaymentInfo, api::custody::CustodyError> {
        not_here()
    }
    fn payment(
        &self,
        _: u32,
        _: u64,
    ) -> Result<Option<api::lightning::LnPaymentInfo>, api::custody::CustodyError> {
        not_here()
    }
    fn payment_of_invoice(
        &self,
        _: u32,
        _: &str,
    ) -> Result<Option<api::lightning::LnPaymentInfo>, api::custody::CustodyError> {
        not_here()
    }
    fn channels(&self) -> Result<Vec<api::lightning::LnChannelInfo>, api::custody::CustodyError> {
        not_here()
    }
    fn balance(&self) -> Result<api::lightning::LnBalanceInfo, api::custody::CustodyError> {
        not_here()
    }
    fn open_channel(&self, _: &str, _: u64) -> Result<String, api::custody::CustodyError> {
        not_here()
    }
    fn close_channel(&self, _: &str) -> Result<(), api::custody::CustodyError> {
        not_here()
    }
    fn onchain_address(&self) -> Result<String, api::custody::CustodyError> {
        not_here()
    }
}

/// Review finding: the monitor looked for a BOLT11 part's payment only while its invoice had
/// expired at most 24 hours ago, on the belief that only a restart delays a
/// credit. The Lightning service retries a credit the ledger refuses for as long as it takes:
/// a payment made on time and credited a day later was never recorded on its invoice (the
/// merchant's balance held the money; the invoice stayed unpaid, sent no webhook and could not
/// be refunded). The monitor now follows the node's credits in the order they were applied
/// (and nothing else: a scan of recent invoices asked the node about each one at every tick).
#[tokio::test]
async fn a_lightning_payment_credited_days_late_is_recorded_on_its_invoice() {
    let m = setup().await;
    let ln = Arc::new(LateLn::default());
    assert!(m.h.state.set_lightning(ln.clone()).is_ok());
    let now = common::now_ms();
    let inv = m.invoice("amount=0.001").await;
    let id = s(&inv, "id");
    assert_eq!(inv["lightning"]["paymentHash"], LateLn::HASH, "{inv}");
    m.tick(now + 1).await;
    assert_eq!(s(&m.get(&id).await, "paidBtc"), "0");
    // Paid a minute in; the ledger takes the credit two days after the invoice expired.
    let expires = inv["expireTime"].as_u64().unwrap();
    *ln.credited_at.lock().unwrap() = Some(now + 60_000);
    let later = expires + 2 * 24 * 3_600_000;
    m.tick(later).await;
    let v = m.get(&id).await;
    assert_eq!(
        (s(&v, "paidBtc"), s(&v, "status")),
        ("0.001".into(), "Settled".into()),
        "{v}"
    );
    assert!(
        m.events(&id)
            .contains(&"invoice.payment_received".to_owned()),
        "{:?}",
        m.events(&id)
    );
    // Recorded once: more ticks change nothing.
    m.tick(later + 1).await;
    m.tick(later + 2).await;
    let again = m.get(&id).await;
    assert_eq!(again["payments"].as_array().unwrap().len(), 1, "{again}");
}

/// Review finding: BOLT11 parts had no bound but the caller's request weight. Anyone with a
/// store's point-of-sale link (a public page) could make invoices in a loop, each a BOLT11
/// the node keeps for good and the Lightning service sweeps until it expires (up to a week).
/// A store makes at most `lightning_parts_per_hour` BOLT11 parts an hour; invoices past that
/// are on chain only and say why (`lightningUnavailable`). Failed on the old code (every
/// invoice had its BOLT11 part).
#[tokio::test]
async fn a_store_makes_a_bounded_number_of_bolt11_parts_an_hour() {
    let h = Harness::new();
    let cap = merchant::MerchantConfig::default().lightning_parts_per_hour;
    let m = setup_on(h).await;
    let ln = Arc::new(LateLn::default());
    assert!(m.h.state.set_lightning(ln.clone()).is_ok());
    let mut with_part = 0;
    for n in 0..=cap {
        let inv = m.invoice(&format!("amount=0.0001&orderId={n}")).await;
        if inv["lightning"].is_null() {
            assert!(
                inv["lightningUnavailable"]
                    .as_str()
                    .is_some_and(|w| w.contains("hour")),
                "{inv}"
            );
        } else {
            with_part += 1;
        }
    }
    assert_eq!(with_part, cap);
    // Another store is not held back by this one's.
    let (other, _) = m.h.trader("0", "0").await;
    let k =
        m.h.state
            .create_key(
                other,
                api::keys::Perms::parse("read,merchant").unwrap(),
                "b",
            )
            .unwrap();
    let inv =
        m.h.ok("POST", "/mapi/v1/merchant/invoice", "amount=0.0001", &k)
            .await;
    assert_eq!(inv["lightning"]["paymentHash"], LateLn::HASH, "{inv}");
}

/// From the audit against WooCommerce's plugin: it names payment methods with `_`
/// (`BTC_CHAIN`, `BTC_LN`, as BTCPay parses them) and, for a gateway without Lightning, asks for
/// on chain only; an invoice listing Lightning anyway is one it marks invalid when the customer
/// comes back. `BTC_CHAIN` was refused (422), so no invoice could be made. Now: taken, and an
/// invoice asking on chain only has no BOLT11 part and lists `BTC-CHAIN` only.
#[tokio::test]
async fn a_greenfield_invoice_takes_btcpay_method_spellings_and_leaves_lightning_out_when_asked() {
    use serde_json::json;
    use tower::ServiceExt as _;
    let m = setup().await;
    let ln = Arc::new(LateLn::default());
    assert!(m.h.state.set_lightning(ln.clone()).is_ok());
    let created =
        m.h.state
            .create_key(
                m.account,
                api::keys::Perms::parse("btcpay.store.cancreateinvoice").unwrap(),
                "woo",
            )
            .unwrap();
    let token = m.h.state.greenfield_token(&created.0);
    let create = |methods: Option<serde_json::Value>| {
        let mut body = json!({"amount": "0.001", "currency": "BTC"});
        if let Some(methods) = methods {
            body["checkout"] = json!({ "paymentMethods": methods });
        }
        let req = axum::http::Request::builder()
            .method("POST")
            .uri(format!("/api/v1/stores/{}/invoices", m.account))
            .header("Authorization", format!("token {token}"))
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        let router = m.h.router.clone();
        async move {
            let res = router.oneshot(req).await.unwrap();
            let status = res.status();
            let bytes = http_body_util::BodyExt::collect(res.into_body())
                .await
                .unwrap()
                .to_bytes();
            (
                status,
                serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
            )
        }
    };
    for (asked, listed) in [
        (None, json!(["BTC-CHAIN", "BTC-LN"])),
        (
            Some(json!(["BTC_CHAIN", "BTC_LN"])),
            json!(["BTC-CHAIN", "BTC-LN"]),
        ),
        (Some(json!(["btc-chain"])), json!(["BTC-CHAIN"])),
        (Some(json!(["BTC_CHAIN"])), json!(["BTC-CHAIN"])),
    ] {
        let (status, inv) = create(asked.clone()).await;
        assert_eq!(status, axum::http::StatusCode::OK, "{asked:?}: {inv}");
        assert_eq!(
            inv["checkout"]["paymentMethods"], listed,
            "{asked:?}: {inv}"
        );
    }
    let (status, inv) = create(Some(json!(["BTC_DOGE"]))).await;
    assert_eq!(
        status,
        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
        "{inv}"
    );
}
