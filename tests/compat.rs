//! The project's promise, checked with the real client libraries: ccxt's `binance` class and
//! python-binance, unmodified and only configured with our URLs, work against `mediator serve`
//! (ccxt also gets `fetchMarkets: ['spot']`: the server has no futures). ccxt's defaults run:
//! `fetchCurrencies` (`capital/config/getall`) and `fetchMargins` (`margin/allPairs`) in
//! `load_markets()`; fee rates come from `asset/tradeFee`.
//!
//! Starts the real binary (with its own regtest bitcoind), creates two accounts with BTC (mined to
//! their deposit addresses) and USD, and runs `tests/compat/compat_ccxt.py` and
//! `tests/compat/compat_python_binance.py` with `python3`. Each script exits non-zero when a
//! call fails. Needs bitcoind and `python3 -m pip install ccxt python-binance` (`.ci/run` pins
//! the versions); without the libraries this test fails and says so.

mod common;

use api::client::Client;
use common::{free_port, Server};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn python_libraries_present() -> Result<(), String> {
    let out = Command::new("python3")
        .args(["-c", "import ccxt, binance"])
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn btc_free(c: &Client) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let v = rt
        .block_on(c.signed("GET", "/api/v3/account", &[]))
        .unwrap();
    v["balances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["asset"] == "BTC")
        .map(|b| b["free"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn run_script(name: &str, env: &[(&str, String)]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/compat")
        .join(name);
    let mut cmd = Command::new("python3");
    cmd.arg(&script);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run python3");
    println!("--- {name}: {}", out.status);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn ccxt_and_python_binance_work_unmodified() {
    if let Err(e) = python_libraries_present() {
        panic!(
            "this test runs the real client libraries: `python3 -m pip install ccxt python-binance` \
             (see .ci/run for the tested versions).\n`python3 -c 'import ccxt, binance'` failed: {e}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), free_port());
    let mut keys = Vec::new();
    for i in 0..2 {
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
            "read,trade,withdraw",
        ]);
        s.admin(&[
            "credit",
            &a,
            "USD",
            "1000000",
            "--reference",
            &format!("seed-{i}"),
        ]);
        s.admin(&["regtest", "fund", &a]);
        keys.push((
            k["apiKey"].as_str().unwrap().to_owned(),
            k["secretKey"].as_str().unwrap().to_owned(),
        ));
    }
    for (key, secret) in &keys {
        let c = Client::new(s.addr, key, secret);
        let deadline = Instant::now() + Duration::from_secs(60);
        while btc_free(&c).trim_start_matches(['0', '.']).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the BTC deposit was not credited"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let dest = wallet::bitcoin::Address::p2wsh(
        &wallet::bitcoin::ScriptBuf::from_bytes(vec![0x51, 0x51, 0x87]),
        wallet::bitcoin::Network::Regtest,
    )
    .to_string();
    let env = [
        ("MEDIATOR_URL", format!("http://{}", s.addr)),
        ("MEDIATOR_API_KEY", keys[0].0.clone()),
        ("MEDIATOR_API_SECRET", keys[0].1.clone()),
        ("MEDIATOR_API_KEY2", keys[1].0.clone()),
        ("MEDIATOR_API_SECRET2", keys[1].1.clone()),
        ("MEDIATOR_WITHDRAW_ADDRESS", dest),
    ];
    let ccxt = run_script("compat_ccxt.py", &env);
    let binance = run_script("compat_python_binance.py", &env);
    let status = s.terminate();
    assert!(ccxt.status.success(), "ccxt failed (output above)");
    assert!(
        binance.status.success(),
        "python-binance failed (output above)"
    );
    assert!(status.success(), "clean shutdown: {status}");
}
