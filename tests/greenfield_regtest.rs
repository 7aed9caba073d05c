//! A shop plugin's Greenfield flow against the real `mediator serve` on regtest, with raw HTTP
//! exactly as BTCPay documents it (`Authorization: token ...`, JSON bodies): the calls the
//! WooCommerce plugin makes when it connects (current key, server info, stores, payment
//! methods, create webhook), then an order (create invoice, read it and its payment methods),
//! paid on chain by a customer's wallet, the `InvoiceSettled` webhook checked against its
//! `BTCPay-Sig`, another invoice marked invalid, and a refund through a pull payment that the
//! customer claims to an address and receives. Hostile calls on the way: a wrong token,
//! another store's id, a token without the permission, an oversized body, a claim over the
//! limit. Needs bitcoind (`BITCOIND_EXE`, `PATH`).

mod common;

use bdk_bitcoind_rpc::bitcoincore_rpc::RpcApi;
use common::greenfield::{http, ok};
use common::merchant::{wait_until, HookServer, Merchant};
use common::payer::{self, Payer};
use common::{free_port, Server};
use serde_json::json;

#[test]
fn woocommerce_flow_pays_settles_signs_webhooks_and_refunds_through_a_pull_payment() {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), free_port());
    let addr = s.addr;
    // The merchant's account; the shop's key made by the admin command (its JSON shows the token).
    let m = Merchant::create(&s);
    let key = s.admin(&[
        "apikey",
        "create",
        "--account",
        &m.account.to_string(),
        "--permissions",
        "read,merchant,withdraw",
        "--label",
        "woocommerce",
    ]);
    let token = key["greenfieldToken"].as_str().unwrap().to_owned();
    let read_only = s.admin(&[
        "apikey",
        "create",
        "--account",
        &m.account.to_string(),
        "--permissions",
        "read",
    ])["greenfieldToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let t = Some(token.as_str());

    // Connect: the plugin's checks.
    let cur = ok(
        http(addr, "GET", "/api/v1/api-keys/current", t, None),
        "current key",
    );
    assert_eq!(cur["label"], "woocommerce");
    let store = m.account.to_string();
    let perms: Vec<String> = cur["permissions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    for p in [
        "btcpay.store.canviewinvoices",
        "btcpay.store.cancreateinvoice",
        "btcpay.store.webhooks.canmodifywebhooks",
        "btcpay.store.cancreatepullpayments",
    ] {
        assert!(perms.contains(&format!("{p}:{store}")), "{p}: {perms:?}");
    }
    let info = ok(
        http(addr, "GET", "/api/v1/server/info", t, None),
        "server info",
    );
    // `serve` runs a Lightning node on regtest by default.
    assert_eq!(
        info["supportedPaymentMethods"],
        json!(["BTC-CHAIN", "BTC-LN"])
    );
    assert_eq!(info["fullySynched"], true);
    let stores = ok(http(addr, "GET", "/api/v1/stores", t, None), "stores");
    assert_eq!(stores.as_array().unwrap().len(), 1);
    assert_eq!(stores[0]["id"], json!(store));
    ok(
        http(
            addr,
            "PUT",
            &format!("/api/v1/stores/{store}"),
            t,
            Some(r#"{"name":"Woo","speedPolicy":"MediumSpeed"}"#),
        ),
        "put store",
    );
    let pms = ok(
        http(
            addr,
            "GET",
            &format!("/api/v1/stores/{store}/payment-methods"),
            t,
            None,
        ),
        "payment methods",
    );
    assert_eq!(pms[0]["paymentMethodId"], "BTC-CHAIN");
    assert_eq!(pms[0]["enabled"], true);

    // Hostile: a wrong token, another store, a token without the permission, a body too large.
    let (st, v) = http(addr, "GET", "/api/v1/stores", Some(&"ab".repeat(32)), None);
    assert_eq!(
        (st, v["code"].as_str()),
        (401, Some("unauthenticated")),
        "{v}"
    );
    let other = s.admin(&["account", "create"])["account"].as_u64().unwrap();
    let (st, v) = http(
        addr,
        "GET",
        &format!("/api/v1/stores/{other}/invoices"),
        t,
        None,
    );
    assert_eq!(
        (st, v["code"].as_str()),
        (403, Some("missing-permission")),
        "{v}"
    );
    let (st, v) = http(
        addr,
        "POST",
        &format!("/api/v1/stores/{store}/invoices"),
        Some(&read_only),
        Some(r#"{"amount":"0.001","currency":"BTC"}"#),
    );
    assert_eq!(
        (st, v["missingPermission"].as_str()),
        (403, Some("btcpay.store.cancreateinvoice")),
        "{v}"
    );
    let big = json!({"amount": "0.001", "metadata": {"pad": "x".repeat(100_000)}}).to_string();
    let (st, _) = http(
        addr,
        "POST",
        &format!("/api/v1/stores/{store}/invoices"),
        t,
        Some(&big),
    );
    assert_eq!(st, 413);

    // The plugin's webhook.
    let hooks = HookServer::start(0);
    let wh = ok(
        http(
            addr,
            "POST",
            &format!("/api/v1/stores/{store}/webhooks"),
            t,
            Some(
                &json!({"url": hooks.url(), "authorizedEvents": {"everything": true}}).to_string(),
            ),
        ),
        "create webhook",
    );
    let secret = wh["secret"].as_str().unwrap().to_owned();

    // An order: the invoice, its page data and payment methods.
    let metadata = json!({"orderId": "1001", "orderUrl": "https://shop.example/order/1001", "buyerEmail": "c@example.com", "notes": "n".repeat(3_000)});
    let inv = ok(
        http(
            addr,
            "POST",
            &format!("/api/v1/stores/{store}/invoices"),
            t,
            Some(
                &json!({"amount": "0.001", "currency": "BTC", "metadata": metadata,
                        "checkout": {"redirectURL": "https://shop.example/order/1001/thanks", "redirectAutomatically": false}})
                .to_string(),
            ),
        ),
        "create invoice",
    );
    let iid = inv["id"].as_str().unwrap().to_owned();
    assert_eq!(inv["status"], "New");
    assert_eq!(inv["metadata"]["orderId"], "1001");
    let got = ok(
        http(
            addr,
            "GET",
            &format!("/api/v1/stores/{store}/invoices/{iid}"),
            t,
            None,
        ),
        "get invoice",
    );
    assert_eq!(got["checkoutLink"], inv["checkoutLink"]);
    assert_eq!(
        got["checkout"]["redirectURL"],
        "https://shop.example/order/1001/thanks"
    );
    let pm = ok(
        http(
            addr,
            "GET",
            &format!("/api/v1/stores/{store}/invoices/{iid}/payment-methods"),
            t,
            None,
        ),
        "invoice payment methods",
    );
    let destination = pm[0]["destination"].as_str().unwrap().to_owned();
    assert_eq!(pm[0]["due"], "0.001");
    assert!(pm[0]["paymentLink"]
        .as_str()
        .unwrap()
        .starts_with("bitcoin:"));

    // The customer pays on chain; one block settles it (MediumSpeed).
    let rpc = s.rpc();
    let mut customer = Payer::new(21);
    customer.fund(&rpc);
    customer.pay(&rpc, &destination, 100_000);
    rpc.generate_to_address(1, &payer::throwaway()).unwrap();
    let settled = wait_until(60, || {
        hooks
            .hooks()
            .iter()
            .any(|h| h.json()["type"] == "InvoiceSettled" && h.json()["invoiceId"] == json!(iid))
    });
    assert!(
        settled,
        "no InvoiceSettled: {:?}",
        hooks.hooks().iter().map(|h| h.json()).collect::<Vec<_>>()
    );
    let hs = hooks.hooks();
    let h = hs
        .iter()
        .find(|h| h.json()["type"] == "InvoiceSettled")
        .unwrap();
    let sig = h.header("BTCPay-Sig").expect("BTCPay-Sig header");
    assert!(
        merchant::webhook::verify_btcpay(secret.as_bytes(), sig, &h.body),
        "{sig}"
    );
    assert!(!merchant::webhook::verify_btcpay(
        b"wrong secret",
        sig,
        &h.body
    ));
    let body = h.json();
    assert_eq!(body["storeId"], json!(store));
    assert_eq!(body["metadata"]["orderId"], "1001");
    assert_eq!(body["webhookId"], wh["id"]);
    let types: Vec<String> = hs
        .iter()
        .map(|h| h.json()["type"].as_str().unwrap().to_owned())
        .collect();
    for t in [
        "InvoiceCreated",
        "InvoiceReceivedPayment",
        "InvoiceProcessing",
        "InvoicePaymentSettled",
    ] {
        assert!(types.iter().any(|x| x == t), "{t} in {types:?}");
    }
    let got = ok(
        http(
            addr,
            "GET",
            &format!("/api/v1/stores/{store}/invoices/{iid}"),
            t,
            None,
        ),
        "get invoice",
    );
    assert_eq!(got["status"], "Settled");
    let deliveries = ok(
        http(
            addr,
            "GET",
            &format!(
                "/api/v1/stores/{store}/webhooks/{}/deliveries",
                wh["id"].as_str().unwrap()
            ),
            t,
            None,
        ),
        "deliveries",
    );
    assert!(deliveries
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["status"] == "HttpSuccess"));

    // Another order, cancelled: marked invalid.
    let inv2 = ok(
        http(
            addr,
            "POST",
            &format!("/api/v1/stores/{store}/invoices"),
            t,
            Some(r#"{"amount":"0.0005","currency":"BTC","metadata":{"orderId":"1002"}}"#),
        ),
        "second invoice",
    );
    let iid2 = inv2["id"].as_str().unwrap();
    let marked = ok(
        http(
            addr,
            "POST",
            &format!("/api/v1/stores/{store}/invoices/{iid2}/status"),
            t,
            Some(r#"{"status":"Invalid"}"#),
        ),
        "mark invalid",
    );
    assert_eq!(marked["status"], "Invalid");
    assert!(wait_until(30, || hooks
        .hooks()
        .iter()
        .any(
            |h| h.json()["type"] == "InvoiceInvalid" && h.json()["manuallyMarked"] == true
        )));

    // A refund of part of the order through a pull payment, claimed by the customer.
    m.wait_btc(100_000);
    let pp = ok(
        http(
            addr,
            "POST",
            &format!("/api/v1/stores/{store}/invoices/{iid}/refund"),
            t,
            Some(
                r#"{"refundVariant":"Custom","customAmount":"0.0003","customCurrency":"BTC","payoutMethodId":"BTC-CHAIN"}"#,
            ),
        ),
        "refund",
    );
    let pp_id = pp["id"].as_str().unwrap().to_owned();
    assert_eq!(pp["amount"], "0.0003");
    let page = common::http_get(addr, &format!("/pp/{pp_id}"));
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let to = customer.receive_address();
    let payouts = format!("/api/v1/pull-payments/{pp_id}/payouts");
    let (st, v) = http(addr, "POST", &payouts, None, Some(&json!({"destination": to.to_string(), "amount": "0.00030001", "payoutMethodId": "BTC-CHAIN"}).to_string()));
    assert_eq!(
        (st, v["code"].as_str()),
        (400, Some("overdraft")),
        "a claim over the limit: {v}"
    );
    let payout = ok(
        http(
            addr,
            "POST",
            &payouts,
            None,
            Some(
                &json!({"destination": to.to_string(), "payoutMethodId": "BTC-CHAIN"}).to_string(),
            ),
        ),
        "claim",
    );
    assert_eq!(payout["payoutAmount"], "0.0003");
    assert_eq!(payout["destination"], json!(to.to_string()));
    let (st, v) = http(
        addr,
        "POST",
        &payouts,
        None,
        Some(&json!({"destination": to.to_string(), "amount": "0.00000001"}).to_string()),
    );
    assert_eq!(
        (st, v["code"].as_str()),
        (400, Some("overdraft")),
        "nothing remains: {v}"
    );
    // Batched, broadcast, mined: the customer has it; the payout is Completed.
    let state = || {
        ok(http(addr, "GET", &payouts, None, None), "payouts")[0]["state"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(
        wait_until(60, || state() == "InProgress"),
        "broadcast: {}",
        state()
    );
    rpc.generate_to_address(1, &payer::throwaway()).unwrap();
    assert!(
        wait_until(60, || state() == "Completed"),
        "completed: {}",
        state()
    );
    customer.sync(&rpc);
    assert_eq!(customer.unspent_at(&to), 30_000);
    // The signed API sees the same refund on the same invoice (one model).
    let legacy = m.get(&iid);
    assert_eq!(legacy["refundedBtc"], "0.0003");
    assert_eq!(legacy["refunds"][0]["state"], "done");
    eprintln!("greenfield flow: {:.1} s", started.elapsed().as_secs_f64());
    let _ = rpc.get_block_count();
}
