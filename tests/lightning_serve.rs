//! Lightning through `mediator serve` as an operator and a user meet it: the real binary with its
//! own regtest bitcoind and Lightning node, a second ldk-node in the test as the customer, the
//! operator's `mediator ln ...` commands and the signed user endpoints.
//!
//! Needs bitcoind (`BITCOIND_EXE`, `PATH`, or `scripts/test.sh` finds it).

mod common;

use api::client::{Client, ClientError};
use common::ln::{drain, mine_to};
use common::{free_port, Server};
use lightning_custody::ldk_node::bitcoin::hashes::Hash;
use lightning_custody::ldk_node::lightning::ln::channelmanager::PaymentId;
use lightning_custody::ldk_node::lightning_invoice::{
    Bolt11Invoice, Bolt11InvoiceDescription, Description,
};
use lightning_custody::ldk_node::payment::{PaymentDirection, PaymentStatus};
use lightning_custody::ldk_node::Node;
use serde_json::Value;
use std::str::FromStr;
use std::time::{Duration, Instant};

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn call(c: &Client, method: &str, path: &str, params: &[(&str, &str)]) -> Result<Value, i64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match rt.block_on(c.signed(method, path, params)) {
        Ok(v) => Ok(v),
        Err(ClientError::Api { code, .. }) => Err(code),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

fn btc(c: &Client) -> (u64, u64) {
    let v = call(c, "GET", "/api/v3/account", &[]).unwrap();
    let units = |s: &str| -> u64 {
        let (i, f) = s.split_once('.').unwrap_or((s, ""));
        let f = format!("{f:0<8}");
        i.parse::<u64>().unwrap() * 100_000_000 + f[..8].parse::<u64>().unwrap()
    };
    v["balances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["asset"] == "BTC")
        .map(|b| {
            (
                units(b["free"].as_str().unwrap()),
                units(b["locked"].as_str().unwrap()),
            )
        })
        .unwrap_or((0, 0))
}

fn customer(s: &Server, dir: &std::path::Path) -> Node {
    common::ln::customer(s, dir, 43)
}

/// The operator funds the node and opens a channel (`ln address`, `ln open-channel`), the
/// customer opens one back; a user deposits over Lightning (credited exactly once) and withdraws
/// (debited amount + fee exactly); refusals carry their codes and change nothing; reconciliation
/// counts the node's balances; a restart keeps the node's identity (the seed, mode 0600).
#[test]
fn deposit_and_withdraw_over_lightning_through_serve() {
    let dir = tempfile::tempdir().unwrap();
    let cdir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), free_port());
    let node_id = s.admin(&["ln", "balance"])["node_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let seed = dir.path().join("wallet/lightning.seed");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&seed).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let ln_address = s.admin(&["ln", "address"])["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let cust = customer(&s, cdir.path());
    let cust_address = cust.onchain_payment().new_address().unwrap().to_string();
    mine_to(&s, 1, &ln_address);
    mine_to(&s, 101, &cust_address);
    // A sync already under way when the blocks came is not waited for again: sync until the
    // customer's coinbase shows as spendable.
    wait_until("the customer's on-chain funds", 60, || {
        cust.sync_wallets().unwrap();
        cust.list_balances().spendable_onchain_balance_sats > 4_100_000
    });
    wait_until("the node's on-chain funds", 60, || {
        s.admin(&["ln", "balance"])["onchain_sat"].as_u64() == Some(5_000_000_000)
    });

    // Channels: the customer to Mediator (inbound), the operator to the customer (outbound).
    common::ln::open_channels(&s, &cust, &node_id, &cust_address);

    let a = s.admin(&["account", "create"])["account"]
        .as_u64()
        .unwrap()
        .to_string();
    let k = s.admin(&[
        "apikey",
        "create",
        "--account",
        &a,
        "--permissions",
        "read,withdraw",
    ]);
    let c = Client::new(
        s.addr,
        k["apiKey"].as_str().unwrap(),
        k["secretKey"].as_str().unwrap(),
    );

    // Deposit 0.002 BTC.
    let inv = call(
        &c,
        "POST",
        "/mapi/v1/lightning/invoice",
        &[("amount", "0.002")],
    )
    .unwrap();
    let bolt11 = Bolt11Invoice::from_str(inv["invoice"].as_str().unwrap()).unwrap();
    assert_eq!(bolt11.amount_milli_satoshis(), Some(200_000_000));
    cust.bolt11_payment().send(&bolt11, None).unwrap();
    wait_until("the deposit credit", 60, || btc(&c) == (200_000, 0));

    // Withdraw 30,000 sat to the customer's invoice: debited 30,000 + the 10-sat fee.
    let out = cust
        .bolt11_payment()
        .receive(
            30_000_000,
            &Bolt11InvoiceDescription::Direct(Description::new("cash out".into()).unwrap()),
            3600,
        )
        .unwrap();
    let w = call(
        &c,
        "POST",
        "/mapi/v1/lightning/pay",
        &[("invoice", &out.to_string())],
    )
    .unwrap();
    assert_eq!(w["status"], "completed", "{w}");
    assert_eq!(w["amount"], "0.00030000");
    assert_eq!(w["fee"], "0.00000010");
    assert_eq!(btc(&c), (200_000 - 30_010, 0));
    let got = cust
        .payment(&PaymentId(out.payment_hash().to_byte_array()))
        .unwrap();
    assert_eq!(
        (got.direction, got.status, got.amount_msat),
        (
            PaymentDirection::Inbound,
            PaymentStatus::Succeeded,
            Some(30_000_000)
        )
    );
    let id = w["id"].as_str().unwrap();
    assert_eq!(
        call(&c, "GET", "/mapi/v1/lightning/pay", &[("id", id)]).unwrap()["status"],
        "completed"
    );

    // Refusals: each its code, nothing changed.
    let before = btc(&c);
    let again = call(
        &c,
        "POST",
        "/mapi/v1/lightning/pay",
        &[("invoice", &out.to_string())],
    );
    // The same invoice again (a retry after a lost reply): the same withdrawal, nothing twice.
    let again = again.unwrap();
    assert_eq!(again["id"].as_str(), Some(id));
    assert_eq!(again["status"], "completed");
    assert_eq!(btc(&c), before);
    let garbage = call(
        &c,
        "POST",
        "/mapi/v1/lightning/pay",
        &[("invoice", "lnbcrt1garbage")],
    );
    assert_eq!(garbage.unwrap_err(), -4601);
    let too_much = cust
        .bolt11_payment()
        .receive(
            190_000_000,
            &Bolt11InvoiceDescription::Direct(Description::new("too much".into()).unwrap()),
            3600,
        )
        .unwrap();
    let r = call(
        &c,
        "POST",
        "/mapi/v1/lightning/pay",
        &[("invoice", &too_much.to_string())],
    );
    assert_eq!(r.unwrap_err(), -4026);
    assert_eq!(btc(&c), before);

    // Reconciliation counts the node: channel funds listed apart, no shortfall.
    let r = s.admin(&["reconcile"]);
    assert!(r["lightning_channels_sat"].as_u64().unwrap() > 0, "{r}");
    assert!(r["lightning_onchain_sat"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["shortfall"], false, "{r}");

    // A restart keeps the node's identity and its records.
    assert!(s.terminate().success());
    let log = dir.path().join("api").join(api::proofs::AUDIT_FILE);
    let last_seq = reserves::auditlog::tail(&log, 1).unwrap()[0].seq;
    let s = Server::start(dir.path(), free_port());
    start_up_reconciliation_counts_the_lightning_node(&log, last_seq);
    assert_eq!(s.admin(&["ln", "balance"])["node_id"], node_id.as_str());
    let c = Client::new(
        s.addr,
        k["apiKey"].as_str().unwrap(),
        k["secretKey"].as_str().unwrap(),
    );
    assert_eq!(btc(&c), before);
    assert_eq!(
        call(&c, "GET", "/mapi/v1/lightning/pay", &[("id", id)]).unwrap()["status"],
        "completed"
    );
    cust.stop().unwrap();
}

/// Regression: the restarted server's first custody reconciliations (`custody.reconcile` in the
/// audit log, after entry `last_seq`) find no shortfall. Before, custody's loop started before
/// the Lightning node was attached: its first steps counted the node's funds as 0 and logged a
/// false "reconciliation shortfall" on every restart with Lightning-held funds.
fn start_up_reconciliation_counts_the_lightning_node(log: &std::path::Path, last_seq: u64) {
    let mut after = Vec::new();
    wait_until("the first reconciliation after the restart", 60, || {
        after = reserves::auditlog::tail(log, usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|e| e.seq > last_seq && e.action == "custody.reconcile")
            .collect();
        !after.is_empty()
    });
    for e in &after {
        assert_eq!(e.params["shortfall"], "false", "{e:?}");
    }
}

/// Custody's rules and alarms reach Lightning in `mediator serve` (`[custody]` from a config
/// file): a payment that would wait for approval on chain is refused (-4037) and nothing leaves
/// the node; a flagged account is refused (-4032); a payment the node receives for no invoice of
/// ours (a keysend) is a custody alarm the operator sees in `mediator alarms` (and
/// `mediator_custody_alarms`), where on-chain reconciliation's alarms are. Before, the approval
/// threshold did not apply to Lightning and Lightning's alarms were only log lines.
#[test]
fn lightning_obeys_custody_rules_and_its_alarms_reach_the_operator_through_serve() {
    let dir = tempfile::tempdir().unwrap();
    let cdir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mediator.toml");
    std::fs::write(&conf, "[custody]\napproval_threshold_sat = 50000\n").unwrap();
    let s = Server::start_with(
        dir.path(),
        free_port(),
        &["--config", conf.to_str().unwrap()],
    );
    let node_id = s.admin(&["ln", "balance"])["node_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ln_address = s.admin(&["ln", "address"])["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let cust = customer(&s, cdir.path());
    let cust_address = cust.onchain_payment().new_address().unwrap().to_string();
    mine_to(&s, 1, &ln_address);
    mine_to(&s, 101, &cust_address);
    wait_until("the customer's on-chain funds", 60, || {
        cust.sync_wallets().unwrap();
        cust.list_balances().spendable_onchain_balance_sats > 4_100_000
    });
    let m_pk = common::ln::open_channels(&s, &cust, &node_id, &cust_address);
    let user = |name: &str| {
        let a = s.admin(&["account", "create"])["account"]
            .as_u64()
            .unwrap()
            .to_string();
        let k = s.admin(&[
            "apikey",
            "create",
            "--account",
            &a,
            "--permissions",
            "read,withdraw",
        ]);
        let c = Client::new(
            s.addr,
            k["apiKey"].as_str().unwrap(),
            k["secretKey"].as_str().unwrap(),
        );
        let inv = call(
            &c,
            "POST",
            "/mapi/v1/lightning/invoice",
            &[("amount", "0.001")],
        )
        .unwrap();
        let bolt11 = Bolt11Invoice::from_str(inv["invoice"].as_str().unwrap()).unwrap();
        cust.bolt11_payment().send(&bolt11, None).unwrap();
        wait_until(name, 60, || btc(&c) == (100_000, 0));
        (a.parse::<u32>().unwrap(), c)
    };
    let cust_invoice = |sat: u64| {
        cust.bolt11_payment()
            .receive(
                sat * 1000,
                &Bolt11InvoiceDescription::Direct(Description::new("cash out".into()).unwrap()),
                3600,
            )
            .unwrap()
    };
    let received = |inv: &Bolt11Invoice| {
        cust.payment(&PaymentId(inv.payment_hash().to_byte_array()))
            .is_some_and(|p| {
                p.direction == PaymentDirection::Inbound && p.status == PaymentStatus::Succeeded
            })
    };

    // Approval threshold 50,000 sat: 30,000 goes out; 30,000 more would wait on chain: refused.
    let (_, alice) = user("alice's deposit");
    let first = cust_invoice(30_000);
    let w = call(
        &alice,
        "POST",
        "/mapi/v1/lightning/pay",
        &[("invoice", &first.to_string())],
    )
    .unwrap();
    assert_eq!(w["status"], "completed", "{w}");
    let before = btc(&alice);
    let second = cust_invoice(30_000);
    let r = call(
        &alice,
        "POST",
        "/mapi/v1/lightning/pay",
        &[("invoice", &second.to_string())],
    );
    assert_eq!(r.unwrap_err(), -4037);
    assert_eq!(btc(&alice), before, "nothing held");
    std::thread::sleep(Duration::from_secs(1));
    drain(&cust);
    assert!(!received(&second), "nothing left the node");

    // A flagged account (a credited deposit left the chain) cannot withdraw over Lightning.
    let (bob_id, bob) = user("bob's deposit");
    {
        let db = bdk_wallet::rusqlite::Connection::open(
            dir.path().join("wallet").join(wallet::DATABASE_FILE),
        )
        .unwrap();
        db.busy_timeout(Duration::from_secs(10)).unwrap();
        db.execute(
            "INSERT INTO mediator_flagged_account (account, reason, at_ms) VALUES (?1, 'reorg', 1)",
            [bob_id],
        )
        .unwrap();
    }
    let small = cust_invoice(1_000);
    let r = call(
        &bob,
        "POST",
        "/mapi/v1/lightning/pay",
        &[("invoice", &small.to_string())],
    );
    assert_eq!(r.unwrap_err(), -4032);
    assert_eq!(btc(&bob), (100_000, 0));
    std::thread::sleep(Duration::from_secs(1));
    drain(&cust);
    assert!(!received(&small), "nothing left the node");

    // A payment for no invoice of ours: nobody is credited, and the operator sees an alarm.
    let alarms = s.admin(&["alarms"]);
    assert_eq!(alarms.as_array().map(Vec::len), Some(0), "{alarms}");
    cust.spontaneous_payment()
        .send(7_000_000, m_pk, None)
        .unwrap();
    wait_until("the unknown payment's alarm", 60, || {
        drain(&cust);
        s.admin(&["alarms"])
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "lightning_payment_unknown")
    });
    assert_eq!(btc(&alice), before);
    assert_eq!(btc(&bob), (100_000, 0));

    // Both ways: alice's 30,000 over Lightning counts for an on-chain withdrawal too, so 30,000
    // more on chain (60,000 > 50,000) waits for approval (before: auto-approved, `Pending`).
    let dest = wallet::bitcoin::Address::p2wsh(
        &wallet::bitcoin::ScriptBuf::from_bytes(vec![0x51, 0x51, 0x87]),
        wallet::bitcoin::Network::Regtest,
    )
    .to_string();
    let w = call(
        &alice,
        "POST",
        "/sapi/v1/capital/withdraw/apply",
        &[
            ("coin", "BTC"),
            ("address", &dest),
            ("amount", "0.0003"),
            ("withdrawOrderId", "after-lightning"),
        ],
    )
    .unwrap();
    let id = w["id"].as_str().unwrap().to_owned();
    let h = call(&alice, "GET", "/sapi/v1/capital/withdraw/history", &[]).unwrap();
    let row = h
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == id.as_str())
        .cloned();
    assert_eq!(
        row.as_ref().map(|x| x["status"].clone()),
        Some(2.into()),
        "{h}"
    );
    cust.stop().unwrap();
}
