//! The Greenfield parts of the pages in headless Chromium against the real `mediator serve`
//! on regtest: an invoice made through `/api/v1` with `checkout.redirectURL` and
//! `redirectAutomatically` shows "Return to the shop", a receipt once paid, and goes back to the
//! shop by itself; a refund's claim page takes an address and pays it.
//!
//! Needs bitcoind (`BITCOIND_EXE`) and Chromium (`scripts/install-browser.sh`, or
//! `MEDIATOR_SKIP_BROWSER=1` to skip).

#[path = "../api/tests/browser/mod.rs"]
mod browser;
mod common;

use browser::Browser;
use common::greenfield::{http, ok};
use common::payer::Payer;
use common::{free_port, Server};
use serde_json::json;
use std::time::Duration;

const CHAIN: Duration = Duration::from_secs(90);

const DESCRIBE: &str = "var s = document.getElementById('status'); \
    return {status: s && s.dataset.status, url: location.href, \
            body: document.body.innerText.slice(0, 600)};";

#[test]
fn greenfield_checkout_returns_to_the_shop_with_a_receipt_and_the_claim_page_pays() {
    if !browser::required() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), free_port());
    let s = &server;
    let account = s.admin(&["account", "create"])["account"].as_u64().unwrap();
    let key = s.admin(&[
        "apikey",
        "create",
        "--account",
        &account.to_string(),
        "--permissions",
        "read,merchant,withdraw",
    ]);
    let token = key["greenfieldToken"].as_str().unwrap().to_owned();
    let t = Some(token.as_str());
    // "The shop": a page of this server, so the redirect lands somewhere that answers.
    let shop = format!("http://{}/reserves/verify?order=77", s.addr);
    let inv = ok(
        http(
            s.addr,
            "POST",
            &format!("/api/v1/stores/{account}/invoices"),
            t,
            Some(
                &json!({"amount": "0.0004", "currency": "BTC", "metadata": {"orderId": "77"},
                        "checkout": {"redirectURL": shop, "redirectAutomatically": true}})
                .to_string(),
            ),
        ),
        "invoice",
    );
    let id = inv["id"].as_str().unwrap().to_owned();
    let pm = ok(
        http(
            s.addr,
            "GET",
            &format!("/api/v1/stores/{account}/invoices/{id}/payment-methods"),
            t,
            None,
        ),
        "payment methods",
    );
    let address = pm[0]["destination"].as_str().unwrap().to_owned();

    let b = Browser::start(1280, 900).unwrap();
    b.resize(390, 844).unwrap();
    b.goto(&format!("http://{}/i/{id}", s.addr)).unwrap();
    b.wait_for(
        "the New invoice with its way back",
        "var r = document.getElementById('return'); \
         return document.getElementById('status').dataset.status === 'New' && !r.hidden;",
        DESCRIBE,
    )
    .unwrap();
    let back = b
        .eval("return document.getElementById('return').getAttribute('href');")
        .unwrap();
    assert_eq!(back, json!(shop));
    assert_eq!(
        b.eval("return document.getElementById('receipt').hidden;")
            .unwrap(),
        true
    );

    let mut payer = Payer::new(31);
    payer.fund(&s.rpc());
    payer.pay(&s.rpc(), &address, 40_000);
    s.admin(&["regtest", "mine", "1"]);
    // Settled: the receipt shows (read before the automatic redirect, 3 s later).
    b.wait_for_within(
        CHAIN,
        "the receipt",
        "return document.getElementById('status').dataset.status === 'Settled' && \
                !document.getElementById('receipt').hidden;",
        DESCRIBE,
    )
    .unwrap();
    let receipt = b
        .eval("return document.getElementById('receipt').innerText;")
        .unwrap();
    let receipt = receipt.as_str().unwrap();
    assert!(receipt.contains(&id), "{receipt}");
    assert!(receipt.contains("0.0004 BTC"), "{receipt}");
    b.screenshot("greenfield-receipt.png").unwrap();
    b.wait_for_within(
        Duration::from_secs(20),
        "the redirect to the shop",
        "return location.pathname === '/reserves/verify' && location.search === '?order=77';",
        DESCRIBE,
    )
    .unwrap();

    // A refund of half (the merchant pays the withdrawal fee from the rest): the customer opens the claim page and claims to an address.
    let wait_credit = common::merchant::wait_until(60, || {
        let (_, v) = http(
            s.addr,
            "POST",
            &format!("/api/v1/stores/{account}/invoices/{id}/refund"),
            t,
            Some(r#"{"refundVariant":"Custom","customAmount":"0.0002","customCurrency":"BTC"}"#),
        );
        v["id"].is_string()
    });
    assert!(wait_credit, "refund never became possible");
    let pps = ok(
        http(
            s.addr,
            "GET",
            &format!("/api/v1/stores/{account}/pull-payments"),
            t,
            None,
        ),
        "pull payments",
    );
    let pp = pps[0]["id"].as_str().unwrap().to_owned();
    let to = payer.receive_address().to_string();
    b.goto(&format!("http://{}/pp/{pp}", s.addr)).unwrap();
    b.wait_for(
        "the claim form",
        "return document.getElementById('remaining').textContent === '0.0002' && \
                !document.getElementById('claim').disabled;",
        DESCRIBE,
    )
    .unwrap();
    b.eval(&format!(
        "document.getElementById('destination').value = '{to}'; \
         document.getElementById('claim').click(); return true;"
    ))
    .unwrap();
    b.wait_for_within(
        Duration::from_secs(30),
        "the claim answered",
        "var m = document.getElementById('msg'); return m.dataset.tone === 'ok' && \
         document.getElementById('remaining').textContent === '0';",
        DESCRIBE,
    )
    .unwrap();
    let msg = b
        .eval("return document.getElementById('msg').textContent;")
        .unwrap();
    assert!(msg.as_str().unwrap().contains(&to), "{msg}");
    b.screenshot("greenfield-claim.png").unwrap();
    let payouts = ok(
        http(
            s.addr,
            "GET",
            &format!("/api/v1/pull-payments/{pp}/payouts"),
            None,
            None,
        ),
        "payouts",
    );
    assert_eq!(payouts.as_array().unwrap().len(), 1);
    assert_eq!(payouts[0]["destination"], json!(to));
    assert_eq!(payouts[0]["payoutAmount"], "0.0002");
}
