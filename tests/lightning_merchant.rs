//! Merchant invoices over Lightning through `mediator serve`: the real binary with its own regtest
//! bitcoind and Lightning node, a second ldk-node in the test as the customer. An invoice carries
//! a BOLT11 part (same amount, expiry no later than the invoice's, description from the store
//! and order) and a unified BIP21 URI; paying it settles the invoice at once, credits the
//! merchant exactly once, and sends both kinds of webhook; a second payment and a payment after
//! expiry are refused by the nodes (a second payment also when a second customer's node, which
//! never paid it, sends it: the server's node fails it back); without inbound liquidity the
//! invoice is on chain only and says so.
//!
//! The same from the checkout page in headless Chromium: both methods offered, each QR code
//! (decoded from the pixels the page drew) a unified BIP21 URI with `lightning=` or the BOLT11.
//!
//! Needs bitcoind (`BITCOIND_EXE`, `PATH`, or `scripts/test.sh` finds it).

#[path = "../api/tests/browser/mod.rs"]
mod browser;
mod common;

use bdk_bitcoind_rpc::bitcoincore_rpc::RpcApi;
use common::greenfield::{http, ok};
use common::ln::{drain, mine_to};
use common::merchant::{client, wait_until, HookServer, Merchant};
use common::{free_port, Server};
use lightning_custody::ldk_node::lightning::events::PaymentFailureReason;
use lightning_custody::ldk_node::lightning_invoice::{Bolt11Invoice, Bolt11InvoiceDescriptionRef};
use lightning_custody::ldk_node::Node;
use serde_json::{json, Value};
use std::str::FromStr;
use std::time::{Duration, Instant};

fn customer(s: &Server, dir: &std::path::Path) -> Node {
    common::ln::customer(s, dir, 44)
}

fn wait(what: &str, secs: u64, f: impl FnMut() -> bool) {
    assert!(wait_until(secs, f), "timed out waiting for {what}");
}

/// The server, its merchant, and a customer with a 4,000,000-sat channel to Mediator's node
/// (Mediator's inbound liquidity). Before the channel, one invoice is made and returned: it has
/// no Lightning part.
struct World {
    s: Server,
    m: Merchant,
    /// The merchant's key (to sign again after a restart).
    key: Value,
    cust: Node,
    no_ln_invoice: Value,
}

/// The server's and the customer's data directories (made first, so they outlive both).
fn dirs() -> (tempfile::TempDir, tempfile::TempDir) {
    (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap())
}

fn world((dir, cdir): &(tempfile::TempDir, tempfile::TempDir)) -> World {
    let s = Server::start(dir.path(), free_port());
    let account = s.admin(&["account", "create"])["account"].as_u64().unwrap();
    let key = s.admin(&[
        "apikey",
        "create",
        "--account",
        &account.to_string(),
        "--permissions",
        "read,trade,merchant,transfer,withdraw",
    ]);
    let m = Merchant {
        account: account as u32,
        client: client(s.addr, &key),
    };
    m.store(&[("name", "Café Lumen"), ("speedPolicy", "6")]);
    // No channel yet: on chain only, and it says why.
    let no_ln_invoice = m.invoice("0.0005", &[("orderId", "C-0")]);

    let node_id = s.admin(&["ln", "balance"])["node_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The node keeps an on-chain reserve for anchor channels, also for inbound ones.
    let ln_address = s.admin(&["ln", "address"])["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let cust = customer(&s, cdir.path());
    let cust_address = cust.onchain_payment().new_address().unwrap().to_string();
    mine_to(&s, 1, &ln_address);
    mine_to(&s, 101, &cust_address);
    cust.sync_wallets().unwrap();
    wait("the node's on-chain funds", 60, || {
        s.admin(&["ln", "balance"])["onchain_sat"].as_u64() == Some(5_000_000_000)
    });
    wait("the customer's on-chain funds", 60, || {
        let _ = cust.sync_wallets();
        cust.list_balances().spendable_onchain_balance_sats > 5_000_000
    });
    let m_pk =
        lightning_custody::ldk_node::bitcoin::secp256k1::PublicKey::from_str(&node_id).unwrap();
    cust.open_channel(m_pk, s.ln_addr.into(), 4_000_000, None, None)
        .unwrap();
    wait("the funding transaction", 60, || {
        !s.rpc().get_raw_mempool().unwrap().is_empty()
    });
    mine_to(&s, 6, &cust_address);
    wait("a usable channel", 120, || {
        drain(&cust);
        let _ = cust.sync_wallets();
        let v = s.admin(&["ln", "channels"]);
        let rows = v.as_array().unwrap();
        rows.len() == 1 && rows[0]["usable"] == true
    });
    World {
        s,
        m,
        key,
        cust,
        no_ln_invoice,
    }
}

/// Waits for the customer's outbound payment to finish; true when it succeeded.
fn outcome(cust: &Node, hash: &[u8; 32]) -> bool {
    use lightning_custody::ldk_node::lightning::ln::channelmanager::PaymentId;
    use lightning_custody::ldk_node::payment::PaymentStatus;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        drain(cust);
        match cust.payment(&PaymentId(*hash)).map(|p| p.status) {
            Some(PaymentStatus::Succeeded) => return true,
            Some(PaymentStatus::Failed) => return false,
            _ => {}
        }
        assert!(Instant::now() < deadline, "the payment did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Why the customer's outbound payment `hash` failed, from its events (a success panics).
fn failure_reason(cust: &Node, hash: &[u8; 32]) -> Option<PaymentFailureReason> {
    use lightning_custody::ldk_node::Event;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "the payment did not finish");
        let Some(event) = cust.next_event() else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let found = match &event {
            Event::PaymentFailed {
                payment_hash: Some(h),
                reason,
                ..
            } if h.0 == *hash => Some(*reason),
            Event::PaymentSuccessful { payment_hash, .. } if payment_hash.0 == *hash => {
                panic!("the payment succeeded")
            }
            _ => None,
        };
        cust.event_handled().unwrap();
        if let Some(reason) = found {
            return reason;
        }
    }
}

fn hash_of(inv: &Bolt11Invoice) -> [u8; 32] {
    use lightning_custody::ldk_node::bitcoin::hashes::Hash;
    inv.payment_hash().to_byte_array()
}

#[test]
fn merchant_invoice_paid_over_lightning_settles_at_once_and_credits_exactly_once() {
    let d = dirs();
    let w = world(&d);
    let (s, m, cust) = (&w.s, &w.m, &w.cust);

    // Without inbound liquidity the invoice was made anyway: on chain only, saying so.
    let v = &w.no_ln_invoice;
    assert_eq!(v["status"], "New", "{v}");
    assert_eq!(v["lightning"], Value::Null, "{v}");
    assert!(
        v["lightningUnavailable"]
            .as_str()
            .unwrap()
            .contains("inbound liquidity"),
        "{v}"
    );
    assert!(!v["bip21"].as_str().unwrap().contains("lightning="), "{v}");

    // Webhooks: the merchant API's and a Greenfield one.
    let hooks = HookServer::start(0);
    let secret = m.store(&[("webhookUrl", &hooks.url())])["webhookSecret"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = s.admin(&[
        "apikey",
        "create",
        "--account",
        &m.account.to_string(),
        "--permissions",
        "read,merchant",
    ])["greenfieldToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let t = Some(token.as_str());
    let store = m.account.to_string();
    let gf_hooks = HookServer::start(0);
    let gf_secret = ok(
        http(
            s.addr,
            "POST",
            &format!("/api/v1/stores/{store}/webhooks"),
            t,
            Some(
                &json!({"url": gf_hooks.url(), "authorizedEvents": {"everything": true}})
                    .to_string(),
            ),
        ),
        "create webhook",
    )["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let methods = ok(
        http(
            s.addr,
            "GET",
            &format!("/api/v1/stores/{store}/payment-methods"),
            t,
            None,
        ),
        "store payment methods",
    );
    let ln_method = methods
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["paymentMethodId"] == "BTC-LN")
        .unwrap_or_else(|| panic!("{methods}"));
    assert_eq!(ln_method["enabled"], true, "{methods}");

    // The invoice: 0.001 BTC, speed policy 6 (Lightning is final at once anyway).
    let inv = m.invoice("0.001", &[("orderId", "L-1")]);
    let iid = inv["id"].as_str().unwrap().to_owned();
    let bolt11_text = inv["lightning"]["bolt11"]
        .as_str()
        .unwrap_or_else(|| panic!("{inv}"));
    let bolt11 = Bolt11Invoice::from_str(bolt11_text).unwrap();
    assert_eq!(bolt11.amount_milli_satoshis(), Some(100_000_000));
    match bolt11.description() {
        Bolt11InvoiceDescriptionRef::Direct(d) => assert_eq!(d.to_string(), "Café Lumen order L-1"),
        other => panic!("{other:?}"),
    }
    let bolt11_expires_ms = bolt11.expires_at().unwrap().as_millis() as u64;
    let expire_time = inv["expireTime"].as_u64().unwrap();
    assert!(
        bolt11_expires_ms <= expire_time,
        "{bolt11_expires_ms} > {expire_time}"
    );
    assert!(
        bolt11_expires_ms + 2_000 > expire_time,
        "aligned: {bolt11_expires_ms} vs {expire_time}"
    );
    let hash_hex = inv["lightning"]["paymentHash"].as_str().unwrap();
    assert_eq!(hash_hex, hex::encode(hash_of(&bolt11)));
    let uri = inv["bip21"].as_str().unwrap();
    assert!(
        uri.starts_with(&format!(
            "bitcoin:{}?amount=0.001&",
            inv["address"].as_str().unwrap()
        )),
        "{uri}"
    );
    assert!(uri.ends_with(&format!("&lightning={bolt11_text}")), "{uri}");
    // Greenfield: the invoice offers BTC-LN, with the BOLT11 as its destination.
    let gf = ok(
        http(
            s.addr,
            "GET",
            &format!("/api/v1/stores/{store}/invoices/{iid}/payment-methods"),
            t,
            None,
        ),
        "invoice payment methods",
    );
    let gf_ln = gf
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["paymentMethodId"] == "BTC-LN")
        .unwrap_or_else(|| panic!("{gf}"));
    assert_eq!(gf_ln["destination"], bolt11_text, "{gf}");
    assert_eq!(gf_ln["activated"], true, "{gf}");
    let gf_inv = ok(
        http(
            s.addr,
            "GET",
            &format!("/api/v1/stores/{store}/invoices/{iid}"),
            t,
            None,
        ),
        "invoice",
    );
    assert_eq!(
        gf_inv["checkout"]["paymentMethods"],
        json!(["BTC-CHAIN", "BTC-LN"]),
        "{gf_inv}"
    );

    // The customer pays: Settled with no block mined, credited exactly the amount.
    assert_eq!(m.btc(), (0, 0));
    let height = s.rpc().get_block_count().unwrap();
    cust.bolt11_payment().send(&bolt11, None).unwrap();
    assert!(outcome(cust, &hash_of(&bolt11)), "the payment failed");
    let v = m.wait_invoice(&iid, "Settled", |v| v["status"] == "Settled");
    assert_eq!(
        s.rpc().get_block_count().unwrap(),
        height,
        "no block was needed"
    );
    m.wait_btc(100_000);
    let p = &v["payments"].as_array().unwrap();
    assert_eq!(p.len(), 1, "{v}");
    assert_eq!(p[0]["source"], "lightning", "{v}");
    assert_eq!(p[0]["paymentHash"], hash_hex, "{v}");
    assert_eq!(p[0]["amountBtc"], "0.001", "{v}");
    assert_eq!(p[0]["credited"], true, "{v}");
    assert_eq!(v["lightning"]["payable"], false, "{v}");
    assert!(!v["bip21"].as_str().unwrap().contains("lightning="), "{v}");

    // The merchant API's webhooks, in order, all delivered and signed.
    let mut log = Vec::new();
    assert!(
        wait_until(60, || {
            log = m.deliveries(&iid);
            log.len() == 4 && log.iter().all(|d| d["status"] == "delivered")
        }),
        "deliveries: {log:#?}"
    );
    let types: Vec<&str> = log.iter().map(|d| d["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "invoice.created",
            "invoice.payment_received",
            "invoice.processing",
            "invoice.settled"
        ]
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let settled = hooks
        .hooks()
        .into_iter()
        .find(|h| h.header("Mediator-Event") == Some("invoice.settled"))
        .unwrap();
    let sig = settled.header("Mediator-Signature").unwrap();
    merchant::webhook::verify(secret.as_bytes(), sig, &settled.body, now, 300).unwrap();
    assert_eq!(settled.json()["invoice"]["status"], "Settled");
    // Greenfield's: received payment (BTC-LN), payment settled, invoice settled; BTCPay-Sig.
    let mut gf_types = Vec::new();
    assert!(
        wait_until(60, || {
            gf_types = gf_hooks
                .hooks()
                .iter()
                .filter(|h| h.json()["invoiceId"] == json!(iid))
                .map(|h| h.json()["type"].as_str().unwrap().to_owned())
                .collect();
            [
                "InvoiceReceivedPayment",
                "InvoicePaymentSettled",
                "InvoiceSettled",
            ]
            .iter()
            .all(|t| gf_types.iter().any(|g| g == t))
        }),
        "greenfield webhooks: {gf_types:?}"
    );
    for h in gf_hooks
        .hooks()
        .iter()
        .filter(|h| h.json()["invoiceId"] == json!(iid))
    {
        let sig = h.header("BTCPay-Sig").expect("BTCPay-Sig");
        assert!(merchant::webhook::verify_btcpay(
            gf_secret.as_bytes(),
            sig,
            &h.body
        ));
        let b = h.json();
        if b["type"] == "InvoiceReceivedPayment" || b["type"] == "InvoicePaymentSettled" {
            assert_eq!(b["paymentMethodId"], "BTC-LN", "{b}");
            assert_eq!(b["payment"]["id"], hash_hex, "{b}");
            assert_eq!(b["payment"]["status"], "Settled", "{b}");
        }
    }

    // Paid twice: refused (the customer's node will not send the same payment hash again).
    // What the server recorded, not only what the client saw: paid, credited and announced once.
    assert!(cust.bolt11_payment().send(&bolt11, None).is_err());
    std::thread::sleep(Duration::from_secs(1));
    let hooks_of = (&hooks, &gf_hooks);
    assert_paid_once(s, m, &token, &iid, hooks_of);

    // A restart credits nothing again (the credit is keyed by the payment hash).
    let account = m.account;
    let dir = w.s.dir.clone();
    let World { s, cust, key, .. } = w;
    assert!(s.terminate().success());
    let s = Server::start(&dir, free_port());
    let m = Merchant {
        account,
        client: client(s.addr, &key),
    };
    assert_paid_once(&s, &m, &token, &iid, hooks_of);

    // An expired invoice: the BOLT11 expires with it (a one-minute invoice), and the customer's
    // node refuses to pay it; nothing is credited, the invoice expires unpaid.
    // The node listens on a new port now: the customer reconnects.
    let m_pk = lightning_custody::ldk_node::bitcoin::secp256k1::PublicKey::from_str(
        s.admin(&["ln", "balance"])["node_id"].as_str().unwrap(),
    )
    .unwrap();
    cust.connect(m_pk, s.ln_addr.into(), true).unwrap();
    wait("the channel usable after the restart", 120, || {
        drain(&cust);
        s.admin(&["ln", "channels"])[0]["usable"] == true
    });
    let short = m.invoice("0.0002", &[("orderId", "L-2"), ("expiryMinutes", "1")]);
    let sid = short["id"].as_str().unwrap().to_owned();
    let sb = Bolt11Invoice::from_str(short["lightning"]["bolt11"].as_str().unwrap()).unwrap();
    assert!(sb.expires_at().unwrap().as_millis() as u64 <= short["expireTime"].as_u64().unwrap());
    m.wait_invoice(&sid, "Expired", |v| v["status"] == "Expired");
    assert!(sb.is_expired());
    let refused = cust.bolt11_payment().send(&sb, None);
    let sent = match refused {
        Err(_) => false,
        Ok(_) => outcome(&cust, &hash_of(&sb)),
    };
    assert!(!sent, "an expired BOLT11 was paid");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(m.btc(), (100_000, 0));
    let v = m.get(&sid);
    assert_eq!(v["status"], "Expired", "{v}");
    assert!(v["payments"].as_array().unwrap().is_empty(), "{v}");
    // The server's side: Greenfield's invoice expired unpaid, its BTC-LN method paid nothing,
    // the node received nothing more, and no payment event was sent for it.
    let gf = gf_invoice(&s, &m, &token, &sid);
    assert_eq!(gf["status"], "Expired", "{gf}");
    let ln = gf_ln_method(&s, &m, &token, &sid);
    assert!(ln["payments"].as_array().unwrap().is_empty(), "{ln}");
    assert_eq!(ln["due"], ln["amount"], "{ln}");
    assert_eq!(
        node_channels_sat(&s),
        100_000,
        "the node received nothing more"
    );
    wait("the expiry webhooks", 60, || {
        events(&hooks, &sid, "invoice.expired") == 1
            && events(&gf_hooks, &sid, "InvoiceExpired") == 1
    });
    for kind in ["invoice.payment_received", "invoice.settled"] {
        assert_eq!(events(&hooks, &sid, kind), 0, "{kind}");
    }
    for kind in [
        "InvoiceReceivedPayment",
        "InvoicePaymentSettled",
        "InvoiceSettled",
    ] {
        assert_eq!(events(&gf_hooks, &sid, kind), 0, "{kind}");
    }
    let types: Vec<Value> = m
        .deliveries(&sid)
        .iter()
        .map(|d| d["type"].clone())
        .collect();
    assert_eq!(types, [json!("invoice.created"), json!("invoice.expired")]);
    // And the first invoice still paid once.
    assert_paid_once(&s, &m, &token, &iid, hooks_of);

    // Proof of reserves: the custody wallet's coins proven; the node's balances reported apart,
    // unproven, not in `reserves_sat` (our side of the channel: the 100,000 sat received).
    let other = s.admin(&["account", "create"])["account"]
        .as_u64()
        .unwrap()
        .to_string();
    let funded = s.admin(&["regtest", "fund", &other])["amount_sat"]
        .as_u64()
        .unwrap();
    wait("the custody wallet's coins", 60, || {
        s.admin(&["reconcile"])["wallet_confirmed_sat"].as_u64() == Some(funded)
    });
    let custody_sat = funded;
    let doc = s.admin(&["reserves", "prove"]);
    assert_eq!(doc["reserves_sat"].as_u64(), Some(custody_sat), "{doc}");
    let ln = &doc["lightning_unproven"];
    assert_eq!(ln["channels_sat"], 100_000, "{doc}");
    assert!(ln["onchain_sat"].as_u64().unwrap() > 0, "{doc}");

    // Paid twice, by someone else: a second customer's node, which has never paid it, sends the
    // settled invoice's payment again. The server's node fails it back: the payer keeps its
    // money, and the server's records are those of one payment.
    let cdir2 = tempfile::tempdir().unwrap();
    let cust2 = common::ln::customer(&s, cdir2.path(), 45);
    let cust2_address = cust2.onchain_payment().new_address().unwrap().to_string();
    let cust_address = cust.onchain_payment().new_address().unwrap().to_string();
    // A coinbase to the second customer, matured.
    mine_to(&s, 1, &cust2_address);
    mine_to(&s, 100, &cust_address);
    wait("the second customer's on-chain funds", 60, || {
        let _ = cust2.sync_wallets();
        cust2.list_balances().spendable_onchain_balance_sats >= 2_000_000
    });
    cust2
        .open_channel(m_pk, s.ln_addr.into(), 1_000_000, None, None)
        .unwrap();
    wait("the second funding transaction", 60, || {
        !s.rpc().get_raw_mempool().unwrap().is_empty()
    });
    mine_to(&s, 6, &cust_address);
    wait("the second customer's usable channel", 120, || {
        drain(&cust2);
        let _ = cust2.sync_wallets();
        cust2.list_channels().iter().any(|c| c.is_usable)
    });
    let before = cust2.list_balances().total_lightning_balance_sats;
    drain(&cust2);
    cust2.bolt11_payment().send(&bolt11, None).unwrap();
    assert_eq!(
        failure_reason(&cust2, &hash_of(&bolt11)),
        Some(PaymentFailureReason::RecipientRejected),
        "refused by the server's node, not lost on the way"
    );
    assert_eq!(
        cust2.list_balances().total_lightning_balance_sats,
        before,
        "the second payer lost nothing"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_paid_once(&s, &m, &token, &iid, hooks_of);
    cust2.stop().unwrap();
    cust.stop().unwrap();
}

/// The distinct deliveries (by `deliveryId`: a retry of one is the same) of event `kind` about
/// invoice `id` that reached `hooks`: the merchant API's (`invoice.settled`, the invoice in the
/// body) or Greenfield's (`InvoiceSettled`, `invoiceId`).
fn events(hooks: &HookServer, id: &str, kind: &str) -> usize {
    let mut ids = std::collections::HashSet::new();
    for h in hooks.hooks() {
        let b = h.json();
        let about = b["invoiceId"] == json!(id) || b["invoice"]["id"] == json!(id);
        if about && b["type"] == kind {
            ids.insert(b["deliveryId"].to_string());
        }
    }
    ids.len()
}

/// The invoice as Greenfield reports it (the store is the merchant's account).
fn gf_invoice(s: &Server, m: &Merchant, token: &str, id: &str) -> Value {
    let store = m.account;
    ok(
        http(
            s.addr,
            "GET",
            &format!("/api/v1/stores/{store}/invoices/{id}"),
            Some(token),
            None,
        ),
        "invoice",
    )
}

/// The invoice's BTC-LN payment method as Greenfield reports it.
fn gf_ln_method(s: &Server, m: &Merchant, token: &str, id: &str) -> Value {
    let store = m.account;
    let v = ok(
        http(
            s.addr,
            "GET",
            &format!("/api/v1/stores/{store}/invoices/{id}/payment-methods"),
            Some(token),
            None,
        ),
        "invoice payment methods",
    );
    v.as_array()
        .unwrap()
        .iter()
        .find(|x| x["paymentMethodId"] == "BTC-LN")
        .cloned()
        .unwrap_or_else(|| panic!("{v}"))
}

/// The server's node's side of its channels (what it received over Lightning).
fn node_channels_sat(s: &Server) -> u64 {
    s.admin(&["ln", "balance"])["channels_sat"]
        .as_u64()
        .unwrap()
}

/// The server's records of invoice `iid` (0.001 BTC), paid once over Lightning, whatever the
/// customer's node saw: the store credited once, the node's channel side grown once, one payment
/// in the merchant API and in Greenfield, each event sent once (merchant API and Greenfield
/// webhooks, and the merchant API's delivery log). A second credit fails one of these.
fn assert_paid_once(
    s: &Server,
    m: &Merchant,
    token: &str,
    iid: &str,
    (hooks, gf_hooks): (&HookServer, &HookServer),
) {
    assert_eq!(m.btc(), (100_000, 0), "the store credited once");
    assert_eq!(node_channels_sat(s), 100_000, "the node received it once");
    let v = m.get(iid);
    assert_eq!(v["status"], "Settled", "{v}");
    assert_eq!(v["payments"].as_array().unwrap().len(), 1, "{v}");
    let gf = gf_invoice(s, m, token, iid);
    assert_eq!(gf["status"], "Settled", "{gf}");
    let ln = gf_ln_method(s, m, token, iid);
    assert_eq!(ln["payments"].as_array().unwrap().len(), 1, "{ln}");
    assert_eq!(
        ln["paymentMethodPaid"], ln["amount"],
        "paid once, not more: {ln}"
    );
    let types: Vec<Value> = m
        .deliveries(iid)
        .iter()
        .map(|d| d["type"].clone())
        .collect();
    assert_eq!(
        types,
        [
            json!("invoice.created"),
            json!("invoice.payment_received"),
            json!("invoice.processing"),
            json!("invoice.settled")
        ]
    );
    for kind in ["invoice.payment_received", "invoice.settled"] {
        assert_eq!(events(hooks, iid, kind), 1, "{kind}");
    }
    for kind in [
        "InvoiceReceivedPayment",
        "InvoicePaymentSettled",
        "InvoiceSettled",
    ] {
        assert_eq!(events(gf_hooks, iid, kind), 1, "{kind}");
    }
}

/// The page's state, for failure messages.
const DESCRIBE: &str = "var s = document.getElementById('status'); \
    return {status: s && s.dataset.status, body: document.body.innerText.slice(0, 600)};";

/// Draws the page's QR image on a canvas and returns what it encodes (decoded here with rqrr).
fn decode_page_qr(b: &browser::Browser) -> String {
    const SIDE: usize = 640;
    let px = b
        .eval(&format!(
            "var img = document.getElementById('qr'); var c = document.createElement('canvas'); \
             c.width = {SIDE}; c.height = {SIDE}; var g = c.getContext('2d'); \
             g.fillStyle = '#fff'; g.fillRect(0, 0, {SIDE}, {SIDE}); \
             g.drawImage(img, 0, 0, {SIDE}, {SIDE}); \
             var d = g.getImageData(0, 0, {SIDE}, {SIDE}).data; var out = ''; \
             for (var i = 0; i < d.length; i += 4) out += d[i] < 128 ? '1' : '0'; return out;"
        ))
        .unwrap();
    let px = px.as_str().unwrap().as_bytes().to_vec();
    assert_eq!(px.len(), SIDE * SIDE);
    let mut img = rqrr::PreparedImage::prepare_from_greyscale(SIDE, SIDE, |x, y| {
        if px[y * SIDE + x] == b'1' {
            0
        } else {
            255
        }
    });
    let grids = img.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code on the canvas");
    grids[0].decode().expect("the QR code decodes").1
}

fn qr_loaded(src_part: &str) -> String {
    format!(
        "var q = document.getElementById('qr'); return q.complete && q.naturalWidth > 0 && \
         (q.getAttribute('src') || '').indexOf('{src_part}') >= 0;"
    )
}

#[test]
fn checkout_page_offers_lightning_and_turns_paid_in_chromium() {
    if !browser::required() {
        return;
    }
    let d = dirs();
    let w = world(&d);
    let (s, m, cust) = (&w.s, &w.m, &w.cust);
    let inv = m.invoice("0.0003", &[("orderId", "B-1")]);
    let id = inv["id"].as_str().unwrap();
    let bolt11 = inv["lightning"]["bolt11"]
        .as_str()
        .unwrap_or_else(|| panic!("{inv}"));

    let b = browser::Browser::start(1280, 900).unwrap();
    b.resize(390, 844).unwrap();
    b.goto(&format!("http://{}/i/{id}", s.addr)).unwrap();
    b.wait_for(
        "the New invoice",
        "return document.getElementById('status').dataset.status === 'New';",
        DESCRIBE,
    )
    .unwrap();
    b.wait_for("the on-chain QR", &qr_loaded("qr.svg?v="), DESCRIBE)
        .unwrap();
    // Both methods offered; the on-chain tab's QR is the unified URI.
    let shown = b
        .eval(
            "return {tabs: !document.getElementById('methods').hidden, \
                     chain: document.getElementById('tab-chain').getAttribute('aria-selected'), \
                     uri: document.getElementById('uri').value, \
                     wallet: document.getElementById('open-wallet').getAttribute('href')};",
        )
        .unwrap();
    assert_eq!(shown["tabs"], true, "{shown}");
    assert_eq!(shown["chain"], "true", "{shown}");
    assert_eq!(shown["uri"], inv["bip21"], "{shown}");
    let unified = decode_page_qr(&b);
    assert_eq!(unified, inv["bip21"].as_str().unwrap());
    assert!(
        unified.starts_with("bitcoin:") && unified.ends_with(&format!("&lightning={bolt11}")),
        "{unified}"
    );
    b.screenshot("checkout-lightning-onchain-tab.png").unwrap();

    // The Lightning tab: its QR is the BOLT11, its copy field the BOLT11.
    b.eval("document.getElementById('tab-ln').click(); return true;")
        .unwrap();
    b.wait_for("the Lightning QR", &qr_loaded("m=ln"), DESCRIBE)
        .unwrap();
    let shown = b
        .eval(
            "return {bolt11: document.getElementById('bolt11').value, \
                     lnHidden: document.getElementById('pay-ln').hidden, \
                     chainHidden: document.getElementById('pay-chain').hidden, \
                     wallet: document.getElementById('open-wallet').getAttribute('href')};",
        )
        .unwrap();
    assert_eq!(shown["bolt11"], bolt11, "{shown}");
    assert_eq!(shown["lnHidden"], false, "{shown}");
    assert_eq!(shown["chainHidden"], true, "{shown}");
    assert_eq!(shown["wallet"], format!("lightning:{bolt11}"), "{shown}");
    let ln = decode_page_qr(&b);
    assert_eq!(ln, format!("LIGHTNING:{}", bolt11.to_ascii_uppercase()));
    b.screenshot("checkout-lightning-ln-tab.png").unwrap();

    // The customer pays the BOLT11 it scanned: the page turns Paid without a reload.
    let scanned = Bolt11Invoice::from_str(&ln["LIGHTNING:".len()..].to_ascii_lowercase()).unwrap();
    cust.bolt11_payment().send(&scanned, None).unwrap();
    b.wait_for_within(
        Duration::from_secs(60),
        "Settled",
        "return document.getElementById('status').dataset.status === 'Settled';",
        DESCRIBE,
    )
    .unwrap();
    let after = b
        .eval(
            "return [document.getElementById('pay-area').hidden, \
                     document.getElementById('payment-list').innerText];",
        )
        .unwrap();
    assert_eq!(after[0], true, "{after}");
    assert!(
        after[1]
            .as_str()
            .unwrap()
            .contains("0.0003 BTC (Lightning)"),
        "{after}"
    );
    b.screenshot("checkout-lightning-paid.png").unwrap();
    m.wait_btc(30_000);
    drop(b);
    w.cust.stop().unwrap();
}

/// The customer's `send` → the signed `invoice.settled` webhook received by a local endpoint,
/// over 200 merchant invoices of 1,000 sat each paid one after another (README's table).
#[test]
#[ignore = "measurement: cargo test --test lightning_merchant -- --ignored --nocapture measure"]
fn measure_send_to_settled_webhook() {
    let d = dirs();
    let w = world(&d);
    let (m, cust) = (&w.m, &w.cust);
    let hooks = HookServer::start(0);
    m.store(&[("webhookUrl", &hooks.url())]);
    let mut ms = Vec::new();
    for n in 0..200 {
        let inv = m.invoice("0.00001", &[("orderId", &format!("M-{n}"))]);
        let id = inv["id"].as_str().unwrap().to_owned();
        let b = Bolt11Invoice::from_str(inv["lightning"]["bolt11"].as_str().unwrap()).unwrap();
        let start = Instant::now();
        cust.bolt11_payment().send(&b, None).unwrap();
        let mut at = None;
        assert!(wait_until(60, || {
            drain(cust);
            at = hooks.hooks().into_iter().find_map(|h| {
                (h.header("Mediator-Event") == Some("invoice.settled")
                    && h.json()["invoice"]["id"] == json!(id))
                .then_some(h.at)
            });
            at.is_some()
        }));
        ms.push(at.unwrap().duration_since(start).as_secs_f64() * 1000.0);
    }
    m.wait_btc(200 * 1_000);
    ms.sort_by(f64::total_cmp);
    let p = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
    println!(
        "send -> invoice.settled webhook over {} payments: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        ms.len(),
        p(0.50),
        p(0.99),
        ms[ms.len() - 1]
    );
    w.cust.stop().unwrap();
}
