//! The inclusion-proof verification page (`GET /reserves/verify`) in headless Chromium, served by
//! the real router with its CSP: honest proofs verify in the browser and the same dishonest or
//! malformed ones the Rust verifier rejects are rejected with the same code. Checks that the
//! page's JavaScript and `reserves::liabilities::verify_for` implement one format, the account
//! bound into the leaf included.

mod browser;
mod common;
#[path = "../../tests/common/ports.rs"]
mod ports;

use ports::free_port;

use browser::Browser;
use common::Harness;
use reserves::liabilities::{self, InclusionProof, Tree};
use serde_json::{json, Value};
use std::future::IntoFuture;

const STATUS: &str = "return document.getElementById('result').dataset.status;";
const DONE: &str = "return document.getElementById('result').dataset.status !== '';";

/// The account whose proof the cases start from: what its user types in the page.
const MINE: u32 = 5;

fn cases() -> Vec<(&'static str, String, u32)> {
    let b = [
        (1u32, 50_000u64),
        (2, 7),
        (5, 1_000_000),
        (6, 18_000_000_000_000_000_000),
    ];
    let t = Tree::build(&[9; 32], 4, "BTC", &b).unwrap();
    let good = t.prove(5, Some([3; 32])).unwrap().to_json();
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v.to_string()
    };
    let other = Tree::build(&[9; 32], 4, "BTC", &b[..2]).unwrap().root();
    let big = t.prove(6, None).unwrap().to_json().to_string();
    let cases = vec![
        ("honest", good.to_string()),
        (
            "inflated sum at a node",
            edit(&|v| v["path"][0]["sum"] = json!("999999")),
        ),
        (
            "total inflated",
            edit(&|v| v["total"] = json!("18000000000001050008")),
        ),
        (
            "wrong nonce",
            edit(&|v| v["nonce"] = json!("00".repeat(32))),
        ),
        (
            "account left out",
            edit(&|v| {
                v["root"] = json!(hex::encode(other.hash));
                v["total"] = json!(other.sum.to_string());
            }),
        ),
        (
            "index flipped",
            edit(&|v| v["index"] = json!(v["index"].as_u64().unwrap() ^ 1)),
        ),
        ("bad hex", edit(&|v| v["root"] = json!("zz"))),
        ("negative balance", edit(&|v| v["balance"] = json!("-5"))),
        ("version 1", edit(&|v| v["version"] = json!(1))),
        ("another account's leaf relabelled as mine", {
            let mut v = t.prove(2, None).unwrap().to_json();
            v["account"] = json!(MINE);
            v.to_string()
        }),
        ("account not a u32", edit(&|v| v["account"] = json!(-1))),
        ("truncated", good.to_string()[..40].to_owned()),
        // A field no verifier checks (a unit, say) is refused, not silently ignored.
        ("an unknown field", edit(&|v| v["unit"] = json!("mBTC"))),
        (
            "an unknown field in a path step",
            edit(&|v| v["path"][0]["note"] = json!("x")),
        ),
    ];
    let mut out: Vec<_> = cases.into_iter().map(|(n, t)| (n, t, MINE)).collect();
    out.push(("honest, a balance above 2^53", big, 6));
    // The proof of account 5, shown to the user of account 2 (the exchange's shared leaf).
    out.push(("a proof for another account", good.to_string(), 2));
    out
}

fn rust_code(text: &str, mine: u32) -> String {
    match InclusionProof::from_json(text).and_then(|p| liabilities::verify_for(&p, mine)) {
        Ok(()) => "ok".into(),
        Err(e) => e.code().into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_the_rust_verifier_agree_case_table() {
    if !browser::required() {
        return;
    }
    let h = Harness::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(axum::serve(listener, h.router.clone()).into_future());
    let url = format!("http://{addr}/reserves/verify");
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let b = Browser::start(1000, 800)?;
        b.goto(&url)?;
        for (name, text, mine) in cases() {
            let expected = rust_code(&text, mine);
            if name.starts_with("honest") {
                assert_eq!(expected, "ok", "{name}");
            } else {
                assert_ne!(expected, "ok", "{name}");
            }
            b.eval(&format!(
                "document.getElementById('result').dataset.status = ''; \
                 document.getElementById('account').value = '{mine}'; \
                 document.getElementById('proof').value = {}; \
                 document.getElementById('go').click(); return true;",
                serde_json::to_string(&text)?
            ))?;
            b.wait_for(name, DONE, STATUS)?;
            let got = b.eval(STATUS)?;
            assert_eq!(
                got,
                json!(expected),
                "{name}: the page says {got}, Rust says {expected}"
            );
        }
        b.screenshot("reserves-verify.png")?;
        Ok(())
    })
    .await
    .expect("browser thread")
    .expect("browser scenario");
    server.abort();
}
