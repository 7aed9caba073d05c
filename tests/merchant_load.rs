//! Merchant payments under a closed loop, against the real `mediator serve` (release build) with
//! its own regtest bitcoind: invoices created, paid from an exchange balance, and the
//! `invoice.settled` webhook received by a local endpoint. Prints latencies; asserts only that
//! every invoice settled and every webhook arrived (no timing assertions).
//!
//! `cargo test --release --test merchant_load -- --ignored --nocapture`
//! (env `MERCHANT_INVOICES`, default 300).

mod common;

use common::merchant::{sat, HookServer, Merchant};
use common::{free_port, Server};
use std::time::{Duration, Instant};

fn percentiles(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let at = |permille: usize| v[(v.len() * permille / 1000).min(v.len() - 1)];
    println!(
        "{name:<46} n={:<5} p50 {:>8.2?}  p90 {:>8.2?}  p99 {:>8.2?}  max {:>8.2?}",
        v.len(),
        at(500),
        at(900),
        at(990),
        v[v.len() - 1]
    );
}

#[test]
#[ignore = "a measurement: cargo test --release --test merchant_load -- --ignored --nocapture"]
fn invoices_paid_from_balance_with_webhooks() {
    let n: usize = std::env::var("MERCHANT_INVOICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), free_port());
    let hooks = HookServer::start(0);
    let shop = Merchant::create(&s);
    shop.store(&[("name", "Load Shop"), ("webhookUrl", &hooks.url())]);
    let payer = Merchant::create(&s);
    let funded = s.admin(&["regtest", "fund", &payer.account.to_string()])["amount_sat"]
        .as_u64()
        .unwrap();
    payer.wait_btc(funded);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut create, mut pay, mut page) = (Vec::new(), Vec::new(), Vec::new());
    let mut paid_at = Vec::new();
    let started = Instant::now();
    for i in 0..n {
        let order = format!("load-{i}");
        let t0 = Instant::now();
        let inv = rt
            .block_on(shop.client.signed(
                "POST",
                "/mapi/v1/merchant/invoice",
                &[
                    ("amount", "0.001"),
                    ("currency", "BTC"),
                    ("orderId", &order),
                ],
            ))
            .unwrap();
        let t1 = Instant::now();
        let id = inv["id"].as_str().unwrap().to_owned();
        let paid = rt
            .block_on(payer.client.signed(
                "POST",
                "/mapi/v1/merchant/invoice/pay",
                &[("invoiceId", &id)],
            ))
            .unwrap();
        let t2 = Instant::now();
        assert_eq!(paid["status"], "Settled", "{paid}");
        let t3 = Instant::now();
        let status = common::merchant::public_get(s.addr, &format!("/i/{id}/status"));
        page.push(t3.elapsed());
        assert_eq!(status["status"], "Settled");
        create.push(t1 - t0);
        pay.push(t2 - t1);
        paid_at.push((id, t2));
    }
    let elapsed = started.elapsed();
    // Every invoice.settled webhook arrives, once delivered.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut lag = Vec::new();
    for (id, t) in &paid_at {
        loop {
            let got = hooks.hooks().into_iter().find(|h| {
                h.header("Mediator-Event") == Some("invoice.settled")
                    && h.json()["invoice"]["id"] == id.as_str()
            });
            if let Some(h) = got {
                lag.push(h.at.saturating_duration_since(*t));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no invoice.settled webhook for {id}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let expected = sat("0.001") * n as u64;
    shop.wait_btc(expected);
    println!(
        "{n} invoices created and paid from balance in {elapsed:.2?} ({} invoices/s, closed loop, one client)",
        n as u128 * 1000 / elapsed.as_millis().max(1)
    );
    percentiles("create invoice (HTTP, durable)", create);
    percentiles("pay from balance (HTTP, durable, settled)", pay);
    percentiles("public status (GET /i/{id}/status)", page);
    percentiles("pay reply -> invoice.settled webhook received", lag);
    println!("webhook requests received: {}", hooks.hooks().len());
}
