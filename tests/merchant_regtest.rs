//! Merchant payments end to end: the real `mediator serve` with its own regtest bitcoind, a
//! merchant driving the signed `/mapi/v1/merchant/*` endpoints, and a customer's BDK wallet
//! ([`common::payer::Payer`]) paying invoice addresses on the server's node.
//!
//! Every case checks the invoice (merchant view and the public `/i/{id}/status`), its marks and
//! paid/due amounts, and the merchant's BTC balance in the ledger (`GET /api/v3/account`).
//! Regtest credits a deposit after 1 confirmation, so a payment shows in the balance only after
//! its first block, whatever the store's speed policy.
//!
//! Each test starts its own server (they run in parallel); waits are on conditions with
//! generous deadlines, never on time. Needs bitcoind (`BITCOIND_EXE`, `PATH`).

mod common;

use bdk_bitcoind_rpc::bitcoincore_rpc::{Client as Rpc, RpcApi};
use common::merchant::{marks, public_get, sat_of, wait_until, HookServer, Merchant};
use common::payer::{self, Payer};
use common::{free_port, Server};
use serde_json::Value;
use std::collections::BTreeSet;

/// A running server with one merchant and a funded customer. Dropping it (also when a test
/// fails) kills the server and its node.
struct Env {
    port: u16,
    server: Option<Server>,
    m: Merchant,
    rpc: Rpc,
    payer: Payer,
    started: std::time::Instant,
    /// Last: fields drop in order, and the server (its Lightning node writes to this directory
    /// until it is killed) must be gone before the directory is deleted.
    dir: tempfile::TempDir,
}

impl Env {
    /// Starts a server, creates the merchant with `settings` and funds a payer.
    fn start(seed: u8, settings: &[(&str, &str)]) -> Env {
        let started = std::time::Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let s = Server::start(dir.path(), port);
        let m = Merchant::create(&s);
        if !settings.is_empty() {
            m.store(settings);
        }
        let rpc = s.rpc();
        let mut payer = Payer::new(seed);
        payer.fund(&rpc);
        Env {
            dir,
            port,
            server: Some(s),
            m,
            rpc,
            payer,
            started,
        }
    }

    fn s(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    /// SIGTERM (a clean stop), then the server again on the same data directory and port.
    fn restart(&mut self) {
        let status = self.server.take().unwrap().terminate();
        assert!(status.success(), "mediator serve stopped with {status}");
        let s = Server::start(self.dir.path(), self.port);
        self.rpc = s.rpc();
        self.server = Some(s);
    }

    fn mine(&self, blocks: u64) {
        self.rpc
            .generate_to_address(blocks, &payer::throwaway())
            .unwrap();
    }

    fn pay(&mut self, invoice: &Value, sat: u64) {
        let address = invoice["address"].as_str().unwrap().to_owned();
        self.payer.pay(&self.rpc, &address, sat);
    }

    fn public(&self, id: &str) -> Value {
        public_get(self.s().addr, &format!("/i/{id}/status"))
    }
}

/// The server kills itself and its bitcoind when dropped (also when a test panics); this
/// prints each test's wall time.
impl Drop for Env {
    fn drop(&mut self) {
        let name = std::thread::current().name().unwrap_or("?").to_owned();
        eprintln!("{name}: {:.1} s", self.started.elapsed().as_secs_f64());
    }
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_owned()
}

fn payments(v: &Value) -> &Vec<Value> {
    v["payments"].as_array().unwrap()
}

/// Status, marks, paid and due of the merchant view, and the same in the public view.
fn assert_invoice(env: &Env, v: &Value, status: &str, want_marks: &[&str], paid: u64, due: u64) {
    for (view, v) in [("merchant", v.clone()), ("public", env.public(&id(v)))] {
        assert_eq!(v["status"], status, "{view} view: {v:#}");
        assert_eq!(marks(&v), want_marks, "{view} view marks: {v:#}");
        assert_eq!(sat_of(&v, "paidBtc"), paid, "{view} view paidBtc: {v:#}");
        assert_eq!(sat_of(&v, "dueBtc"), due, "{view} view dueBtc: {v:#}");
    }
}

#[test]
fn exact_payment_processes_from_the_mempool_and_settles_after_two_confirmations() {
    let mut env = Env::start(1, &[("speedPolicy", "2")]);
    let inv = env.m.invoice("0.001", &[("orderId", "A-1")]);
    let iid = id(&inv);
    assert_eq!(inv["confirmationsRequired"], 2);
    assert_eq!(sat_of(&inv, "amountBtc"), 100_000);
    assert_invoice(&env, &inv, "New", &[], 0, 100_000);
    assert_eq!(env.m.btc(), (0, 0));

    let height = env.rpc.get_block_count().unwrap();
    env.pay(&inv, 100_000);
    let v = env
        .m
        .wait_invoice(&iid, "Processing", |v| v["status"] == "Processing");
    assert_eq!(
        env.rpc.get_block_count().unwrap(),
        height,
        "seen in the mempool"
    );
    assert_invoice(&env, &v, "Processing", &[], 100_000, 0);
    assert_eq!(payments(&v).len(), 1);
    assert_eq!(payments(&v)[0]["confirmations"], 0);
    assert_eq!(payments(&v)[0]["credited"], false);
    assert_eq!(env.m.btc(), (0, 0), "not credited before a confirmation");

    env.mine(1);
    let v = env.m.wait_invoice(&iid, "1 confirmation", |v| {
        v["payments"][0]["confirmations"] == 1
    });
    assert_invoice(&env, &v, "Processing", &[], 100_000, 0);
    env.m.wait_btc(100_000);
    let v = env.m.get(&iid);
    assert_eq!(
        v["status"], "Processing",
        "policy 2: one block is not enough"
    );

    env.mine(1);
    let v = env
        .m
        .wait_invoice(&iid, "Settled", |v| v["status"] == "Settled");
    assert_invoice(&env, &v, "Settled", &[], 100_000, 0);
    assert_eq!(payments(&v)[0]["confirmations"], 2);
    assert_eq!(payments(&v)[0]["credited"], true);
    assert_eq!(sat_of(&v, "receivedBtc"), 100_000);
    assert_eq!(env.m.btc(), (100_000, 0));
}

#[test]
fn partial_payment_then_top_up_settles() {
    let mut env = Env::start(2, &[("speedPolicy", "1")]);
    let inv = env.m.invoice("0.001", &[]);
    let iid = id(&inv);

    env.pay(&inv, 40_000);
    let v = env
        .m
        .wait_invoice(&iid, "a payment", |v| !payments(v).is_empty());
    assert_invoice(&env, &v, "New", &["PaidPartial"], 40_000, 60_000);
    // The BIP21 URI asks for what is still due.
    assert!(
        v["bip21"].as_str().unwrap().contains("amount=0.0006"),
        "{}",
        v["bip21"]
    );
    env.mine(1);
    env.m.wait_btc(40_000);
    let v = env.m.wait_invoice(&iid, "1 confirmation", |v| {
        v["payments"][0]["confirmations"] == 1
    });
    assert_invoice(&env, &v, "New", &["PaidPartial"], 40_000, 60_000);

    env.pay(&inv, 60_000);
    let v = env
        .m
        .wait_invoice(&iid, "Processing", |v| v["status"] == "Processing");
    assert_invoice(&env, &v, "Processing", &[], 100_000, 0);
    assert_eq!(payments(&v).len(), 2);
    assert_eq!(env.m.btc(), (40_000, 0));

    env.mine(1);
    let v = env
        .m
        .wait_invoice(&iid, "Settled", |v| v["status"] == "Settled");
    assert_invoice(&env, &v, "Settled", &[], 100_000, 0);
    env.m.wait_btc(100_000);
}

/// Defect: a payment the payer replaced in the mempool (a fee bump, RBF) counted twice: custody
/// kept the replaced one `pending` for ever beside its replacement, and a half payment showed
/// the invoice paid in full (`Processing`). The replaced one is no payment (`reorged` in the
/// invoice's payments); the replacement counts once.
#[test]
fn a_payment_replaced_in_the_mempool_counts_once() {
    let mut env = Env::start(9, &[("speedPolicy", "1")]);
    let inv = env.m.invoice("0.001", &[]);
    let iid = id(&inv);
    let address = inv["address"].as_str().unwrap().to_owned();
    let first = env.payer.pay(&env.rpc, &address, 50_000);
    env.m
        .wait_invoice(&iid, "a payment", |v| !payments(v).is_empty());
    let replacement = env.payer.bump(&env.rpc, &first);
    let txid = replacement.compute_txid().to_string();
    env.m.wait_invoice(&iid, "the replacement", |v| {
        payments(v)
            .iter()
            .any(|p| p["outpoint"].as_str().is_some_and(|o| o.starts_with(&txid)))
    });
    let v = env
        .m
        .wait_invoice(&iid, "the replaced payment dropped", |v| {
            payments(v).iter().any(|p| p["reorged"] == true) || v["status"] != "New"
        });
    assert_invoice(&env, &v, "New", &["PaidPartial"], 50_000, 50_000);
    env.mine(1);
    env.m.wait_btc(50_000);
    let v = env.m.wait_invoice(&iid, "1 confirmation", |v| {
        payments(v).iter().any(|p| p["confirmations"] == 1)
    });
    assert_invoice(&env, &v, "New", &["PaidPartial"], 50_000, 50_000);
    assert_eq!(env.m.btc(), (50_000, 0));
}

#[test]
fn two_payments_adding_up_settle() {
    let mut env = Env::start(3, &[("speedPolicy", "1")]);
    let inv = env.m.invoice("0.001", &[]);
    let iid = id(&inv);

    // Two transactions, each half, both in the mempool.
    env.pay(&inv, 50_000);
    env.pay(&inv, 50_000);
    let v = env
        .m
        .wait_invoice(&iid, "Processing", |v| v["status"] == "Processing");
    assert_invoice(&env, &v, "Processing", &[], 100_000, 0);
    let outpoints: BTreeSet<&str> = payments(&v)
        .iter()
        .map(|p| p["outpoint"].as_str().unwrap())
        .collect();
    assert_eq!(outpoints.len(), 2, "two payments: {v:#}");
    assert!(payments(&v)
        .iter()
        .all(|p| sat_of(p, "amountBtc") == 50_000));
    assert_eq!(env.m.btc(), (0, 0));

    env.mine(1);
    let v = env
        .m
        .wait_invoice(&iid, "Settled", |v| v["status"] == "Settled");
    assert_invoice(&env, &v, "Settled", &[], 100_000, 0);
    env.m.wait_btc(100_000);
}

#[test]
fn overpayment_is_marked_settled_and_credited_in_full() {
    let mut env = Env::start(4, &[("speedPolicy", "1")]);
    let inv = env.m.invoice("0.001", &[]);
    let iid = id(&inv);

    env.pay(&inv, 150_000);
    let v = env
        .m
        .wait_invoice(&iid, "Processing", |v| v["status"] == "Processing");
    assert_invoice(&env, &v, "Processing", &["PaidOver"], 150_000, 0);

    env.mine(1);
    let v = env
        .m
        .wait_invoice(&iid, "Settled", |v| v["status"] == "Settled");
    assert_invoice(&env, &v, "Settled", &["PaidOver"], 150_000, 0);
    assert_eq!(sat_of(&v, "receivedBtc"), 150_000);
    env.m.wait_btc(150_000);
}

#[test]
fn payment_after_expiry_is_marked_late_and_still_credited() {
    let mut env = Env::start(5, &[("speedPolicy", "1")]);
    let inv = env.m.invoice("0.001", &[("expiryMinutes", "1")]);
    let iid = id(&inv);
    assert_eq!(
        inv["expireTime"].as_u64().unwrap() - inv["createdTime"].as_u64().unwrap(),
        60_000
    );

    let v = env
        .m
        .wait_invoice(&iid, "Expired", |v| v["status"] == "Expired");
    assert_invoice(&env, &v, "Expired", &[], 0, 100_000);

    env.pay(&inv, 100_000);
    let v = env
        .m
        .wait_invoice(&iid, "a payment", |v| !payments(v).is_empty());
    assert_invoice(&env, &v, "Expired", &["PaidLate"], 0, 100_000);
    assert_eq!(payments(&v)[0]["late"], true);
    assert_eq!(sat_of(&v, "receivedBtc"), 100_000);

    env.mine(1);
    env.m.wait_btc(100_000);
    let v = env.m.wait_invoice(&iid, "1 confirmation", |v| {
        v["payments"][0]["confirmations"] == 1
    });
    assert_invoice(&env, &v, "Expired", &["PaidLate"], 0, 100_000);
    assert_eq!(payments(&v)[0]["credited"], true);
}

#[test]
fn zero_confirmation_policy_settles_from_the_mempool() {
    let mut env = Env::start(6, &[("speedPolicy", "0")]);
    let inv = env.m.invoice("0.0005", &[]);
    let iid = id(&inv);
    assert_eq!(inv["confirmationsRequired"], 0);

    let height = env.rpc.get_block_count().unwrap();
    env.pay(&inv, 50_000);
    let v = env
        .m
        .wait_invoice(&iid, "Settled", |v| v["status"] == "Settled");
    assert_eq!(env.rpc.get_block_count().unwrap(), height, "no block mined");
    assert_invoice(&env, &v, "Settled", &[], 50_000, 0);
    assert_eq!(payments(&v)[0]["confirmations"], 0);
    // Settled, but the ledger credits a deposit only once it is confirmed.
    assert_eq!(env.m.btc(), (0, 0));

    env.mine(1);
    env.m.wait_btc(50_000);
    let v = env.m.get(&iid);
    assert_invoice(&env, &v, "Settled", &[], 50_000, 0);
}

/// Checks every recorded request's signature against its raw body.
fn verify_all(hooks: &HookServer, secret: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let all = hooks.hooks();
    assert!(!all.is_empty());
    for h in all {
        let sig = h.header("Mediator-Signature").expect("signed");
        merchant::webhook::verify(secret.as_bytes(), sig, &h.body, now, 300)
            .unwrap_or_else(|e| panic!("signature {sig}: {e}"));
        // A wrong secret or a changed body does not verify.
        assert!(merchant::webhook::verify(b"wrong", sig, &h.body, now, 300).is_err());
        let mut changed = h.body.clone();
        changed.push(b' ');
        assert!(merchant::webhook::verify(secret.as_bytes(), sig, &changed, now, 300).is_err());
        let body = h.json();
        assert_eq!(h.header("Mediator-Event"), body["type"].as_str());
        assert_eq!(h.header("Mediator-Delivery"), body["deliveryId"].as_str());
    }
}

fn types(log: &[Value]) -> Vec<&str> {
    log.iter().map(|d| d["type"].as_str().unwrap()).collect()
}

fn http_statuses(d: &Value) -> Vec<Option<u64>> {
    d["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["httpStatus"].as_u64())
        .collect()
}

#[test]
fn webhooks_are_signed_retried_and_survive_a_restart() {
    let hooks = HookServer::start(1);
    let mut env = Env::start(7, &[("speedPolicy", "1")]);
    let store = env.m.store(&[("webhookUrl", &hooks.url())]);
    let secret = store["webhookSecret"].as_str().unwrap().to_owned();
    assert_eq!(store["webhookSecretVersion"], 1);
    // Shown once.
    let again = env.m.store(&[("name", "Shop")]);
    assert!(again.get("webhookSecret").is_none(), "{again}");

    let inv = env.m.invoice("0.001", &[("orderId", "W-1")]);
    let iid = id(&inv);
    // The request answered 500 is the creation's: paid only after it, so that the payment's
    // delivery does not race it to the receiver (it did once under load).
    assert!(
        wait_until(60, || !hooks.hooks().is_empty()),
        "no webhook request"
    );
    env.pay(&inv, 100_000);
    env.m
        .wait_invoice(&iid, "Processing", |v| v["status"] == "Processing");
    env.mine(1);
    env.m
        .wait_invoice(&iid, "Settled", |v| v["status"] == "Settled");
    env.m.wait_btc(100_000);

    // Every delivery delivered; the first (answered 500) after a retry.
    let expected = [
        "invoice.created",
        "invoice.payment_received",
        "invoice.processing",
        "invoice.settled",
    ];
    let mut log = Vec::new();
    let ok = wait_until(90, || {
        log = env.m.deliveries(&iid);
        log.len() == 4 && log.iter().all(|d| d["status"] == "delivered")
    });
    assert!(ok, "deliveries: {log:#?}");
    assert_eq!(types(&log), expected, "in order of creation");
    assert!(log
        .windows(2)
        .all(|w| w[0]["createdTime"].as_u64() <= w[1]["createdTime"].as_u64()));
    assert_eq!(
        http_statuses(&log[0]),
        [Some(500), Some(200)],
        "{:#}",
        log[0]
    );
    for d in &log[1..] {
        assert_eq!(http_statuses(d), [Some(200)], "{d:#}");
    }
    let first = hooks.hooks()[0].clone();
    assert_eq!(first.answered, 500);
    assert_eq!(first.header("Mediator-Event"), Some("invoice.created"));
    // The retry carries the same body under a fresh timestamp.
    let retry = hooks.delivered(first.header("Mediator-Delivery").unwrap())[0].clone();
    assert_eq!(retry.body, first.body);
    let t = |h: &common::merchant::Hook| h.header("Mediator-Signature").unwrap()[..12].to_owned();
    assert_ne!(t(&retry), t(&first), "a fresh t on every attempt");
    assert!(first
        .header("User-Agent")
        .is_some_and(|u| u.starts_with("Mediator-Webhooks/")));
    for d in &log {
        let did = d["deliveryId"].as_str().unwrap();
        let got = hooks.delivered(did);
        assert_eq!(got.len(), 1, "{did} delivered once");
        let body = got[0].json();
        assert_eq!(body["type"], d["type"]);
        assert_eq!(body["invoice"]["id"], iid.as_str());
        assert_eq!(body["invoice"]["orderId"], "W-1");
        assert_eq!(body["createdTime"], d["createdTime"]);
    }
    let settled = hooks.delivered(log[3]["deliveryId"].as_str().unwrap())[0].json();
    assert_eq!(settled["invoice"]["status"], "Settled");
    assert_eq!(sat_of(&settled["invoice"], "paidBtc"), 100_000);
    verify_all(&hooks, &secret);

    // A delivery whose first attempt failed is delivered after a restart.
    hooks.fail_all(true);
    let inv2 = env.m.invoice("0.002", &[]);
    let iid2 = id(&inv2);
    let marked = env.m.call(
        "POST",
        "/mapi/v1/merchant/invoice/invalid",
        &[("invoiceId", &iid2)],
    );
    assert_eq!(marked["status"], "Invalid");
    let mut log2 = Vec::new();
    let ok = wait_until(60, || {
        log2 = env.m.deliveries(&iid2);
        log2.len() == 2 && !log2[1]["attempts"].as_array().unwrap().is_empty()
    });
    assert!(ok, "a first attempt: {log2:#?}");
    assert_eq!(types(&log2), ["invoice.created", "invoice.invalid"]);
    assert_eq!(http_statuses(&log2[1])[0], Some(500));
    assert_eq!(log2[1]["status"], "pending");
    let invalid_id = log2[1]["deliveryId"].as_str().unwrap().to_owned();

    env.restart();
    hooks.fail_all(false);
    let ok = wait_until(90, || !hooks.delivered(&invalid_id).is_empty());
    assert!(
        ok,
        "the delivery after the restart: {:#?}",
        env.m.deliveries(&iid2)
    );
    let log2 = env.m.deliveries(&iid2);
    assert!(log2.iter().all(|d| d["status"] == "delivered"), "{log2:#?}");
    let st = http_statuses(&log2[1]);
    assert_eq!(st.first(), Some(&Some(500)));
    assert_eq!(st.last(), Some(&Some(200)));
    let body = hooks.delivered(&invalid_id)[0].json();
    assert_eq!(body["invoice"]["status"], "Invalid");
    verify_all(&hooks, &secret);
    // The ledger and the first invoice survived the restart.
    assert_eq!(env.m.btc(), (100_000, 0));
    assert_eq!(env.m.get(&iid)["status"], "Settled");
}

#[test]
fn refund_part_of_a_settled_invoice_to_the_payer() {
    let mut env = Env::start(8, &[("speedPolicy", "1")]);
    let inv = env.m.invoice("0.001", &[]);
    let iid = id(&inv);
    let refund = |env: &Env, amount: &str, address: &str| {
        env.m.try_call(
            "POST",
            "/mapi/v1/merchant/invoice/refund",
            &[
                ("invoiceId", &iid),
                ("amount", amount),
                ("address", address),
            ],
        )
    };
    let to = env.payer.receive_address();
    let to_s = to.to_string();
    // Not refundable while New.
    match refund(&env, "0.0001", &to_s) {
        Err(api::client::ClientError::Api { code: -1155, .. }) => {}
        other => panic!("refund of a New invoice: {other:?}"),
    }

    env.pay(&inv, 100_000);
    env.mine(1);
    env.m
        .wait_invoice(&iid, "Settled", |v| v["status"] == "Settled");
    env.m.wait_btc(100_000);

    let r = refund(&env, "0.0003", &to_s).unwrap();
    assert_eq!(r["invoiceId"], iid.as_str());
    assert_eq!(sat_of(&r, "refundedBtc"), 30_000);
    assert!(
        r["reference"].as_str().unwrap().starts_with("withdrawal:"),
        "{r}"
    );
    // The merchant pays the withdrawal fee (10,000 sat by default): 40,000 held, 60,000 free.
    let (free, locked) = env.m.btc();
    assert_eq!((free, free + locked), (60_000, 100_000));

    let history = |env: &Env| -> Vec<Value> {
        env.m
            .call(
                "GET",
                "/sapi/v1/capital/withdraw/history",
                &[("coin", "BTC")],
            )
            .as_array()
            .unwrap()
            .clone()
    };
    let h = history(&env);
    assert_eq!(h.len(), 1, "{h:#?}");
    assert_eq!(h[0]["address"], to_s.as_str());
    assert_eq!(sat_of(&h[0], "amount"), 30_000);
    assert_eq!(h[0]["withdrawOrderId"], format!("refund-{iid}-1"));

    // Batched and broadcast, then confirmed: the payer has it.
    let ok = wait_until(60, || history(&env)[0]["txId"] != "");
    assert!(ok, "broadcast: {:#?}", history(&env));
    env.mine(1);
    let ok = wait_until(60, || history(&env)[0]["status"] == 6);
    assert!(ok, "completed: {:#?}", history(&env));
    env.payer.sync(&env.rpc);
    assert_eq!(env.payer.unspent_at(&to), 30_000);
    assert_eq!(env.m.btc(), (60_000, 0));

    let v = env.m.get(&iid);
    assert_eq!(sat_of(&v, "refundedBtc"), 30_000);
    assert_eq!(v["refunds"].as_array().unwrap().len(), 1);
    assert_eq!(v["refunds"][0]["state"], "done");
    assert_eq!(v["status"], "Settled");
    assert!(types(&env.m.deliveries(&iid)).contains(&"invoice.refunded"));

    // Above what remains refundable (70,000): refused, nothing changed.
    match refund(&env, "0.00070001", &to_s) {
        Err(api::client::ClientError::Api {
            status: 400,
            code: -1156,
            ..
        }) => {}
        other => panic!("refund above the refundable amount: {other:?}"),
    }
    // Within it, but more than the merchant's balance (60,000) with the fee: custody refuses,
    // and the reservation is given back.
    match refund(&env, "0.0007", &to_s) {
        Err(api::client::ClientError::Api { code: -4026, .. }) => {}
        other => panic!("refund above the balance: {other:?}"),
    }
    let v = env.m.get(&iid);
    assert_eq!(sat_of(&v, "refundedBtc"), 30_000);
    assert_eq!(v["refunds"].as_array().unwrap().len(), 1);
    assert_eq!(env.m.btc(), (60_000, 0));
    assert_eq!(history(&env).len(), 1);
    assert_eq!(
        types(&env.m.deliveries(&iid))
            .iter()
            .filter(|t| **t == "invoice.refunded")
            .count(),
        1
    );
}

/// Defect: a settled invoice whose payment a reorg took out of the chain, and whose payer then
/// spent the same coins to itself, stayed `Settled`: custody took the credit back from the
/// merchant (the deposit `reversed`) and nothing told the merchant, who would ship an order
/// nobody paid for. It becomes `Invalid` with the `Reversed` mark and an `invoice.invalid`
/// webhook; Greenfield shows additional status `Invalid` (not `Marked`: no merchant did it).
#[test]
fn a_settled_invoice_whose_payment_is_taken_back_after_a_reorg_becomes_invalid() {
    let hooks = HookServer::start(0);
    let mut env = Env::start(10, &[("speedPolicy", "1")]);
    env.m.store(&[("webhookUrl", &hooks.url())]);
    let inv = env.m.invoice("0.001", &[]);
    let iid = id(&inv);
    let address = inv["address"].as_str().unwrap().to_owned();
    let payment = env.payer.pay(&env.rpc, &address, 100_000);
    env.mine(1);
    env.m
        .wait_invoice(&iid, "Settled", |v| v["status"] == "Settled");
    env.m.wait_btc(100_000);

    // The block that confirmed it goes; the payer spends the same coins to itself, and that
    // double spend confirms.
    let tip = env.rpc.get_best_block_hash().unwrap();
    env.rpc.invalidate_block(&tip).unwrap();
    env.payer.take_back(&env.rpc, &payment, &address);
    env.mine(2);
    let v = env
        .m
        .wait_invoice(&iid, "Invalid", |v| v["status"] == "Invalid");
    assert_invoice(&env, &v, "Invalid", &["Reversed"], 0, 100_000);
    assert!(payments(&v).iter().all(|p| p["reorged"] == true), "{v:#}");
    env.m.wait_btc(0);
    assert_eq!(env.m.btc(), (0, 0), "the credit taken back");

    let mut log = Vec::new();
    let ok = wait_until(60, || {
        log = env.m.deliveries(&iid);
        log.iter()
            .any(|d| d["type"] == "invoice.invalid" && d["status"] == "delivered")
    });
    assert!(ok, "deliveries: {log:#?}");
    assert_eq!(
        types(&log),
        [
            "invoice.created",
            "invoice.payment_received",
            "invoice.processing",
            "invoice.settled",
            "invoice.invalid"
        ]
    );
    let did = log[4]["deliveryId"].as_str().unwrap();
    let body = hooks.delivered(did)[0].json();
    assert_eq!(body["invoice"]["status"], "Invalid");

    // A shop plugin reading it through Greenfield sees why.
    let token = env.s().admin(&[
        "apikey",
        "create",
        "--account",
        &env.m.account.to_string(),
        "--permissions",
        "read,merchant",
    ])["greenfieldToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/v1/stores/{}/invoices/{iid}", env.m.account);
    let g = common::greenfield::ok(
        common::greenfield::http(env.s().addr, "GET", &path, Some(&token), None),
        "greenfield invoice",
    );
    assert_eq!(g["status"], "Invalid", "{g:#}");
    assert_eq!(g["additionalStatus"], "Invalid", "{g:#}");
}
