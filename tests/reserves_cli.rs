//! `mediator reserves verify-inclusion FILE`, `mediator audit verify` and `mediator audit tail`
//! as an operator or a user runs them: the built binary on files in a temp dir. Honest input
//! verifies (exit 0); dishonest or bad input is a clear error (exit 2), never a panic.

use reserves::auditlog::AuditLog;
use reserves::liabilities::Tree;
use std::path::Path;
use std::process::{Command, Output};

fn mediator(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mediator"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("MEDIATOR_CONFIG")
        .output()
        .expect("run mediator")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn verify_inclusion_case_table() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tree::build(&[9; 32], 4, "BTC", &[(1, 50_000), (2, 7), (5, 1_000_000)]).unwrap();
    let good = t.prove(5, Some([3; 32])).unwrap().to_json().to_string();
    let mut inflated: serde_json::Value = serde_json::from_str(&good).unwrap();
    inflated["path"][0]["sum"] = serde_json::json!("999999");
    let mut left_out: serde_json::Value = serde_json::from_str(&good).unwrap();
    let other = Tree::build(&[9; 32], 4, "BTC", &[(1, 50_000), (2, 7)]).unwrap();
    left_out["root"] = serde_json::json!(hex::encode(other.root().hash));
    left_out["total"] = serde_json::json!(other.root().sum.to_string());
    let mut relabelled: serde_json::Value = t.prove(2, None).unwrap().to_json();
    relabelled["account"] = serde_json::json!(5);
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("honest", good.clone().into_bytes(), None),
        (
            "another account's leaf relabelled as mine",
            relabelled.to_string().into_bytes(),
            Some("root_mismatch"),
        ),
        (
            "inflated sum at a node",
            inflated.to_string().into_bytes(),
            Some("root_mismatch"),
        ),
        (
            "account left out of the tree",
            left_out.to_string().into_bytes(),
            Some("root_mismatch"),
        ),
        (
            "truncated file",
            good.as_bytes()[..good.len() / 3].to_vec(),
            Some("malformed"),
        ),
        ("empty file", Vec::new(), Some("malformed")),
        ("binary junk", vec![0xff, 0x00, 0xfe], Some("reading")),
    ];
    for (name, bytes, code) in cases {
        let f = dir.path().join(format!("{}.json", name.replace(' ', "_")));
        std::fs::write(&f, &bytes).unwrap();
        let o = mediator(
            dir.path(),
            &[
                "reserves",
                "verify-inclusion",
                f.to_str().unwrap(),
                "--account",
                "5",
            ],
        );
        let out = text(&o);
        assert!(!out.contains("panicked"), "{name}: {out}");
        match code {
            None => {
                assert!(o.status.success(), "{name}: {out}");
                assert!(out.contains("OK: balance 1000000"), "{name}: {out}");
            }
            Some(code) => {
                assert_eq!(o.status.code(), Some(2), "{name}: {out}");
                assert!(out.contains(code), "{name}: expected {code}: {out}");
            }
        }
    }
    let o = mediator(
        dir.path(),
        &[
            "reserves",
            "verify-inclusion",
            "/nonexistent/proof.json",
            "--account",
            "5",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("reading"), "{}", text(&o));
    // The honest proof of account 5 is not account 2's: the user of account 2 refuses it (the
    // exchange cannot show two users with equal balances one leaf), and the account is required.
    let honest = dir.path().join("honest.json");
    let o = mediator(
        dir.path(),
        &[
            "reserves",
            "verify-inclusion",
            honest.to_str().unwrap(),
            "--account",
            "2",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("account_mismatch"), "{}", text(&o));
    let o = mediator(
        dir.path(),
        &["reserves", "verify-inclusion", honest.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--account"), "{}", text(&o));
}

#[test]
fn audit_verify_and_tail_show_an_action_announced_without_outcome() {
    // The server announced an approval and died before its outcome: the record of an action
    // that may have happened is there, and both commands point at it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("api")).unwrap();
    let path = dir.path().join("api").join("audit.log");
    {
        let log = AuditLog::open(&path, false, "system", 1).unwrap();
        let done = log
            .intent(
                2,
                "admin",
                "withdrawal.reject",
                serde_json::json!({ "id": 3 }),
            )
            .unwrap();
        log.outcome(
            3,
            &done,
            reserves::auditlog::Outcome::Done,
            serde_json::json!({ "id": 3 }),
        )
        .unwrap();
        log.intent(
            4,
            "admin",
            "withdrawal.approve",
            serde_json::json!({ "id": 4 }),
        )
        .unwrap();
    }
    let o = mediator(dir.path(), &["audit", "verify"]);
    assert!(
        o.status.success(),
        "an open intent is not a break: {}",
        text(&o)
    );
    let out = text(&o);
    assert!(
        out.contains("line 3: intent 3 (withdrawal.approve) has no outcome"),
        "{out}"
    );
    assert!(!out.contains("intent 1 "), "{out}");
    let o = mediator(dir.path(), &["--json", "audit", "verify"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["open_intents"],
        serde_json::json!([{ "line": 3, "seq": 3, "action": "withdrawal.approve" }])
    );
    let o = mediator(dir.path(), &["audit", "tail"]);
    let out = text(&o);
    let marked: Vec<&str> = out
        .lines()
        .filter(|l| l.ends_with("[no outcome]"))
        .collect();
    assert_eq!(marked.len(), 1, "{out}");
    assert!(marked[0].contains("withdrawal.approve.intent"), "{out}");
}

#[test]
fn audit_verify_and_tail_find_a_removed_entry() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("api")).unwrap();
    let path = dir.path().join("api").join("audit.log");
    let o = mediator(dir.path(), &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(2), "no log: {}", text(&o));
    {
        let log = AuditLog::open(&path, false, "system", 1).unwrap();
        for i in 0..5u64 {
            log.append(
                10 + i,
                "admin",
                "withdrawal.approve",
                serde_json::json!({ "id": i }),
            )
            .unwrap();
        }
    }
    let o = mediator(dir.path(), &["audit", "verify"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("5 entries, last seq 5"), "{}", text(&o));
    let o = mediator(dir.path(), &["--json", "audit", "tail", "-n", "2"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [4, 5]
    );

    let mut ls: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    ls.remove(1);
    std::fs::write(
        &path,
        ls.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let o = mediator(dir.path(), &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("line 2") && out.contains("--audit-override"),
        "{out}"
    );
}

const SERVE: &[&str] = &[
    "serve",
    "--listen",
    "127.0.0.1:0",
    "--admin-listen",
    "127.0.0.2:0",
    "--bitcoind-rpc-url",
    "http://127.0.0.1:9",
    "--bitcoind-rpc-user",
    "u",
    "--bitcoind-rpc-password",
    "p",
];

#[test]
fn serve_refuses_a_broken_audit_chain_and_the_override_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("api")).unwrap();
    let path = dir.path().join("api").join("audit.log");
    {
        let log = AuditLog::open(&path, false, "system", 1).unwrap();
        for i in 0..3u64 {
            log.append(
                10 + i,
                "admin",
                "credit",
                serde_json::json!({ "account": i }),
            )
            .unwrap();
        }
    }
    let tampered = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"account\":1", "\"account\":9");
    std::fs::write(&path, &tampered).unwrap();

    let o = mediator(dir.path(), SERVE);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains("is broken") && out.contains("--audit-override"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        tampered,
        "refusal changes nothing"
    );

    // With the override it starts (this test stops it once the override is logged) and the
    // override is in the chain.
    let mut child = Command::new(env!("CARGO_BIN_EXE_mediator"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(SERVE)
        .arg("--audit-override")
        .env_remove("MEDIATOR_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run mediator serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let logged = loop {
        let now = std::fs::read_to_string(&path).unwrap_or_default();
        if now.contains("\"server.start\"") && now.contains("audit.override") {
            break true;
        }
        if std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        logged,
        "the override was not logged: {}",
        std::fs::read_to_string(&path).unwrap()
    );
    let o = mediator(dir.path(), &["audit", "verify"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("acknowledged by an operator override"),
        "{}",
        text(&o)
    );
    let o = mediator(dir.path(), &["audit", "tail"]);
    assert!(text(&o).contains("audit.override"), "{}", text(&o));
}

/// `scripts/verify_reserves.py` (the independent verifier) with `args`.
fn python(args: &[&str]) -> Output {
    Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/verify_reserves.py"
        ))
        .args(args)
        .output()
        .expect("run python3 scripts/verify_reserves.py")
}

/// A proof document naming `head` as its audit head (the rest is not read by `audit verify`).
fn proof_naming(dir: &Path, head: &[u8; 32]) -> std::path::PathBuf {
    let doc = serde_json::json!({
        "version": 1, "network": "regtest", "message": "m", "block_hash": "00".repeat(32),
        "block_height": 1, "psbt": "", "reserves_sat": 0, "liabilities_proof_id": 1,
        "liabilities": {}, "audit_head": hex::encode(head), "created": 0,
    });
    let p = dir.join("por.json");
    std::fs::write(&p, doc.to_string()).unwrap();
    p
}

/// The history a published proof saw (the chain up to its audit head) cannot be rewritten
/// afterwards and passed off with an override: a break before the head acknowledged only by an
/// override after it fails `audit verify --proof`, with both verifiers. An override the proof
/// itself saw (before its head) is part of that history and passes.
#[test]
fn audit_verify_refuses_history_before_a_proofs_head_rewritten_and_overridden_after_it() {
    let credit = |log: &AuditLog, account: u64| {
        log.append(
            10 + account,
            "admin",
            "credit",
            serde_json::json!({ "account": account }),
        )
        .unwrap()
        .1
    };
    let check = |name: &str, data_dir: &Path, proof: &Path, want: Option<&str>| {
        let log = data_dir.join("api").join("audit.log");
        let p = proof.to_str().unwrap();
        let rust = mediator(data_dir, &["audit", "verify", "--proof", p]);
        let py = python(&["audit", log.to_str().unwrap(), "--proof", p]);
        for (who, o) in [("rust", rust), ("python", py)] {
            let out = text(&o);
            assert!(
                !out.contains("panicked") && !out.contains("Traceback"),
                "{name} ({who}): {out}"
            );
            match want {
                None => assert!(o.status.success(), "{name} ({who}) refused: {out}"),
                Some(code) => {
                    assert_eq!(o.status.code(), Some(2), "{name} ({who}) accepted: {out}");
                    assert!(out.contains(code), "{name} ({who}): expected {code}: {out}");
                }
            }
        }
    };

    // Rewritten after the proof.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("api")).unwrap();
    let path = dir.path().join("api").join("audit.log");
    let head = {
        let log = AuditLog::open(&path, false, "system", 1).unwrap();
        credit(&log, 0);
        credit(&log, 1);
        let head = credit(&log, 2);
        credit(&log, 3);
        head
    };
    let proof = proof_naming(dir.path(), &head);
    check("honest", dir.path(), &proof, None);
    let rewritten = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"account\":1", "\"account\":9");
    std::fs::write(&path, rewritten).unwrap();
    AuditLog::open(&path, true, "operator", 99).unwrap();
    let o = mediator(dir.path(), &["audit", "verify"]);
    assert!(
        o.status.success() && text(&o).contains("acknowledged by an operator override"),
        "without a proof the override acknowledges the break: {}",
        text(&o)
    );
    check(
        "rewritten before the head, overridden after it",
        dir.path(),
        &proof,
        Some("broken_chain"),
    );

    // Overridden before the proof: the history the proof saw, unchanged since.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("api")).unwrap();
    let path = dir.path().join("api").join("audit.log");
    {
        let log = AuditLog::open(&path, false, "system", 1).unwrap();
        credit(&log, 0);
        credit(&log, 1);
        credit(&log, 2);
    }
    let rewritten = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"account\":1", "\"account\":9");
    std::fs::write(&path, rewritten).unwrap();
    let head = {
        let log = AuditLog::open(&path, true, "operator", 99).unwrap();
        let head = credit(&log, 4);
        credit(&log, 5);
        head
    };
    let proof = proof_naming(dir.path(), &head);
    check("overridden before the proof", dir.path(), &proof, None);

    // An override naming a line after itself (planted in advance) acknowledges nothing.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("api")).unwrap();
    let path = dir.path().join("api").join("audit.log");
    let head = {
        let log = AuditLog::open(&path, false, "system", 1).unwrap();
        credit(&log, 0);
        log.append(
            11,
            "operator",
            reserves::auditlog::OVERRIDE_ACTION,
            serde_json::json!({ "break_lines": [4] }),
        )
        .unwrap();
        credit(&log, 1);
        credit(&log, 3);
        credit(&log, 4)
    };
    let rewritten = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"account\":1", "\"account\":9");
    std::fs::write(&path, rewritten).unwrap();
    let proof = proof_naming(dir.path(), &head);
    check(
        "an override planted before the break it names",
        dir.path(),
        &proof,
        Some("broken_chain"),
    );
}

/// A fake bitcoind on loopback, for fault injection: answers each JSON-RPC call of the
/// verifiers with `answer(method, params)`. One thread; connections served in turn, each until
/// the client closes it.
fn fake_node(
    answer: impl Fn(&str, &[serde_json::Value]) -> serde_json::Value + Send + 'static,
) -> String {
    use std::io::{BufRead as _, Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
            'requests: loop {
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break 'requests;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let params = req["params"].as_array().cloned().unwrap_or_default();
                let result = answer(req["method"].as_str().unwrap(), &params);
                let reply = serde_json::json!({ "result": result, "error": null, "id": req["id"] })
                    .to_string();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    reply.len()
                );
                if conn
                    .write_all(head.as_bytes())
                    .and_then(|()| conn.write_all(reply.as_bytes()))
                    .is_err()
                {
                    break;
                }
            }
        }
    });
    url
}

/// The block hash the fake node gives height `h`.
fn fake_hash(h: u64) -> String {
    format!("{h:064x}")
}

/// The binding message of a document at block `height` (hash [`fake_hash`]) whose only
/// liabilities are BTC, root and audit head all zeros, total 0, liabilities proof 1.
fn zero_liabilities_message(height: u32) -> String {
    let liabilities = std::collections::BTreeMap::from([(
        "BTC".to_owned(),
        reserves::por::AssetLiabilities {
            root: "00".repeat(32),
            total: "0".into(),
            leaves: 1,
        },
    )]);
    let hash = fake_hash(u64::from(height));
    reserves::por::default_message(height, &hash, 1, &liabilities, &"00".repeat(32))
}

/// `reserves verify --rpc` when a block arrives while it asks the node: the tip it read first
/// is not the block `gettxout` answers at, so `confirmations` counted from that tip makes a
/// UTXO created in the block after the stated one look created at it. The fake node's tip is
/// 101 when asked, and 102 when it answers `gettxout` for the proof's only UTXO: created at 101
/// (2 confirmations at 102), after the stated block 100. Both verifiers refuse it
/// (`utxo_after_block`).
#[test]
fn a_block_arriving_during_reserves_verify_does_not_pass_a_younger_utxo() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use wallet::bitcoin::hashes::Hash as _;
    use wallet::bitcoin::secp256k1::{Message, Secp256k1, SecretKey};
    use wallet::bitcoin::sighash::{EcdsaSighashType, SighashCache};
    use wallet::bitcoin::{
        Address, Amount, CompressedPublicKey, Network, OutPoint, TxOut, Txid, Witness,
    };
    let dir = tempfile::tempdir().unwrap();
    // A signed proof over one UTXO of our key at block 100 (the fake node vouches for it).
    let secp = Secp256k1::new();
    let sk = SecretKey::from_slice(&[5; 32]).unwrap();
    let spk = Address::p2wpkh(&CompressedPublicKey(sk.public_key(&secp)), Network::Regtest)
        .script_pubkey();
    let utxo = TxOut {
        value: Amount::from_sat(100_000_000),
        script_pubkey: spk.clone(),
    };
    let op = OutPoint {
        txid: Txid::from_byte_array([0x11; 32]),
        vout: 0,
    };
    let message = &zero_liabilities_message(100);
    let input = wallet::bitcoin::psbt::Input {
        witness_utxo: Some(utxo.clone()),
        ..Default::default()
    };
    let mut psbt = reserves::por::proof_psbt(message, vec![(op, input)]).unwrap();
    let sighash = SighashCache::new(&psbt.unsigned_tx)
        .p2wpkh_signature_hash(1, &spk, utxo.value, EcdsaSighashType::All)
        .unwrap();
    let sig = wallet::bitcoin::ecdsa::Signature {
        signature: secp.sign_ecdsa(&Message::from_digest(sighash.to_byte_array()), &sk),
        sighash_type: EcdsaSighashType::All,
    };
    psbt.inputs[1].final_script_witness = Some(Witness::p2wpkh(&sig, &sk.public_key(&secp)));
    let doc = serde_json::json!({
        "version": 1, "network": "regtest", "message": message,
        "block_hash": fake_hash(100), "block_height": 100,
        "psbt": reserves::por::psbt_base64(&psbt.serialize()), "reserves_sat": 100_000_000,
        "liabilities_proof_id": 1,
        "liabilities": { "BTC": { "root": "00".repeat(32), "total": "0", "leaves": 1 } },
        "audit_head": "00".repeat(32), "created": 0,
    });
    let file = dir.path().join("por.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let cookie = dir.path().join(".cookie");
    std::fs::write(&cookie, "__cookie__:x").unwrap();

    let run = |who: &str| {
        let tip = Arc::new(AtomicU64::new(101));
        let t = tip.clone();
        let spk_hex = hex::encode(spk.as_bytes());
        let url = fake_node(move |method, params| match method {
            "getblockchaininfo" => serde_json::json!({
                "chain": "regtest", "blocks": t.load(Ordering::SeqCst),
                "headers": t.load(Ordering::SeqCst),
                "bestblockhash": fake_hash(t.load(Ordering::SeqCst)), "difficulty": 1.0,
                "mediantime": 0, "verificationprogress": 1.0, "initialblockdownload": false,
                "chainwork": "00", "size_on_disk": 0, "pruned": false, "warnings": "",
            }),
            "getnetworkinfo" => serde_json::json!({ "version": 280000 }),
            "getblockcount" => serde_json::json!(t.load(Ordering::SeqCst)),
            "getblockhash" => serde_json::json!(fake_hash(params[0].as_u64().unwrap())),
            "getblockheader" => {
                let h = u64::from_str_radix(params[0].as_str().unwrap(), 16).unwrap();
                serde_json::json!({ "hash": fake_hash(h), "height": h })
            }
            "gettxout" => {
                // Block 102 arrives now; the UTXO was created in block 101.
                t.store(102, Ordering::SeqCst);
                serde_json::json!({
                    "bestblock": fake_hash(102), "confirmations": 2, "value": 1.0,
                    "scriptPubKey": { "asm": "", "hex": spk_hex, "type": "witness_v0_keyhash" },
                    "coinbase": false,
                })
            }
            other => panic!("the fake node does not answer {other}"),
        });
        let (f, c) = (file.to_str().unwrap(), cookie.to_str().unwrap());
        let o = if who == "rust" {
            mediator(
                dir.path(),
                &["reserves", "verify", f, "--rpc", &url, "--cookie", c],
            )
        } else {
            python(&["por", f, "--rpc", &url, "--cookie", c])
        };
        let out = text(&o);
        assert!(
            !out.contains("panicked") && !out.contains("Traceback"),
            "{who}: {out}"
        );
        assert_eq!(o.status.code(), Some(2), "({who}) accepted: {out}");
        assert!(out.contains("(utxo_after_block)"), "{who}: {out}");
    };
    run("rust");
    run("python");
}

/// The independent verifier answers hostile documents with a verdict or a clear error (exit 2
/// and a code), never a traceback: a proof of reserves for `inclusion --against` that is not an
/// object or whose liabilities are not, and an audit entry whose params are not an object.
#[test]
fn the_python_verifier_answers_hostile_documents_without_a_traceback() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tree::build(&[9; 32], 4, "BTC", &[(5, 1_000)]).unwrap();
    let mine = dir.path().join("mine.json");
    std::fs::write(&mine, t.prove(5, None).unwrap().to_json().to_string()).unwrap();
    let against = dir.path().join("por.json");
    for (name, doc) in [
        ("a list", "[]"),
        (
            "liabilities a list",
            r#"{"liabilities_proof_id": 4, "liabilities": []}"#,
        ),
        (
            "liabilities.BTC a string",
            r#"{"liabilities_proof_id": 4, "liabilities": {"BTC": "x"}}"#,
        ),
    ] {
        std::fs::write(&against, doc).unwrap();
        let o = python(&[
            "inclusion",
            mine.to_str().unwrap(),
            "--account",
            "5",
            "--against",
            against.to_str().unwrap(),
        ]);
        let out = text(&o);
        assert!(!out.contains("Traceback"), "{name}: {out}");
        assert_eq!(o.status.code(), Some(2), "{name} accepted: {out}");
        assert!(out.contains("(not_published)"), "{name}: {out}");
    }

    let log = dir.path().join("audit.log");
    {
        let l = AuditLog::open(&log, false, "system", 1).unwrap();
        l.append(
            2,
            "operator",
            reserves::auditlog::OVERRIDE_ACTION,
            serde_json::json!(["not", "an", "object"]),
        )
        .unwrap();
        l.append(3, "admin", "credit", serde_json::json!(7))
            .unwrap();
    }
    let o = python(&["audit", log.to_str().unwrap()]);
    let out = text(&o);
    assert!(!out.contains("Traceback"), "{out}");
    assert!(o.status.success(), "a valid chain: {out}");
}

/// `verify_reserves.py inclusion` refuses a field it does not check (docs/liabilities-proof.md:
/// unknown fields are an error), as the Rust verifier and the page do.
#[test]
fn the_python_inclusion_verifier_refuses_unknown_fields() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tree::build(&[9; 32], 4, "BTC", &[(1, 50_000), (5, 1_000)]).unwrap();
    let good = t.prove(5, None).unwrap().to_json();
    let file = dir.path().join("mine.json");
    let mut unit = good.clone();
    unit["unit"] = serde_json::json!("mBTC");
    let mut note = good.clone();
    note["path"][0]["note"] = serde_json::json!("x");
    for (name, v, want) in [
        ("honest", good, None),
        ("an unknown field", unit, Some("(malformed)")),
        ("an unknown field in a path step", note, Some("(malformed)")),
    ] {
        std::fs::write(&file, v.to_string()).unwrap();
        let f = file.to_str().unwrap();
        let rust = mediator(
            dir.path(),
            &["reserves", "verify-inclusion", f, "--account", "5"],
        );
        let py = python(&["inclusion", f, "--account", "5"]);
        for (who, o) in [("rust", rust), ("python", py)] {
            let out = text(&o);
            match want {
                None => assert!(o.status.success(), "{name} ({who}): {out}"),
                Some(code) => {
                    assert_eq!(o.status.code(), Some(2), "{name} ({who}) accepted: {out}");
                    assert!(out.contains(code), "{name} ({who}): {out}");
                }
            }
        }
    }
}

/// Review finding: the Python verifier read amounts with `str.isdigit()`, true for other
/// scripts' digits and for superscripts: `"١٥٠"` was read as 150 (the Rust verifier refuses it:
/// the two disagreed on one document) and `"²"` ended in a traceback (exit 1) instead of a
/// clear refusal. Both answer `bad_amount` (exit 2) now.
#[test]
fn both_verifiers_refuse_an_amount_written_in_other_digits() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tree::build(&[9; 32], 4, "BTC", &[(1, 50_000), (5, 150)]).unwrap();
    let good = t.prove(5, None).unwrap().to_json();
    let file = dir.path().join("mine.json");
    for digits in [
        "\u{661}\u{665}\u{660}",
        "\u{b2}",
        "\u{ff11}\u{ff15}\u{ff10}",
    ] {
        let mut v = good.clone();
        v["balance"] = serde_json::json!(digits);
        std::fs::write(&file, v.to_string()).unwrap();
        let f = file.to_str().unwrap();
        let rust = mediator(
            dir.path(),
            &["reserves", "verify-inclusion", f, "--account", "5"],
        );
        let py = python(&["inclusion", f, "--account", "5"]);
        for (who, o) in [("rust", rust), ("python", py)] {
            let out = text(&o);
            assert!(!out.contains("Traceback"), "{digits} ({who}): {out}");
            assert_eq!(o.status.code(), Some(2), "{digits} ({who}): {out}");
            assert!(out.contains("(bad_amount)"), "{digits} ({who}): {out}");
        }
    }
}

/// Review finding: the Python verifier accepted a P2WPKH reserve input whose witness carries an
/// uncompressed public key (65 bytes; P2WPKH takes compressed keys only, and the Rust verifier
/// refuses it): the two verifiers disagreed on the same document. Both say `bad_signature`.
#[test]
fn both_verifiers_refuse_an_uncompressed_key_in_a_reserve_input() {
    use wallet::bitcoin::hashes::{hash160, Hash as _};
    use wallet::bitcoin::secp256k1::{Message, Secp256k1, SecretKey};
    use wallet::bitcoin::sighash::{EcdsaSighashType, SighashCache};
    use wallet::bitcoin::{Amount, OutPoint, ScriptBuf, TxOut, Txid, WPubkeyHash, Witness};
    let dir = tempfile::tempdir().unwrap();
    let secp = Secp256k1::new();
    let sk = SecretKey::from_slice(&[6; 32]).unwrap();
    let uncompressed = sk.public_key(&secp).serialize_uncompressed();
    let spk = ScriptBuf::new_p2wpkh(&WPubkeyHash::from_byte_array(
        hash160::Hash::hash(&uncompressed).to_byte_array(),
    ));
    let utxo = TxOut {
        value: Amount::from_sat(100_000_000),
        script_pubkey: spk.clone(),
    };
    let message = &zero_liabilities_message(100);
    let input = wallet::bitcoin::psbt::Input {
        witness_utxo: Some(utxo.clone()),
        ..Default::default()
    };
    let op = OutPoint {
        txid: Txid::from_byte_array([0x22; 32]),
        vout: 0,
    };
    let mut psbt = reserves::por::proof_psbt(message, vec![(op, input)]).unwrap();
    let sighash = SighashCache::new(&psbt.unsigned_tx)
        .p2wpkh_signature_hash(1, &spk, utxo.value, EcdsaSighashType::All)
        .unwrap();
    let sig = secp.sign_ecdsa(&Message::from_digest(sighash.to_byte_array()), &sk);
    let mut der = sig.serialize_der().to_vec();
    der.push(0x01);
    psbt.inputs[1].final_script_witness = Some(Witness::from_slice(&[der, uncompressed.to_vec()]));
    let doc = serde_json::json!({
        "version": 1, "network": "regtest", "message": message,
        "block_hash": fake_hash(100), "block_height": 100,
        "psbt": reserves::por::psbt_base64(&psbt.serialize()), "reserves_sat": 100_000_000,
        "liabilities_proof_id": 1,
        "liabilities": { "BTC": { "root": "00".repeat(32), "total": "0", "leaves": 1 } },
        "audit_head": "00".repeat(32), "created": 0,
    });
    let file = dir.path().join("por.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let f = file.to_str().unwrap();
    for (who, o) in [
        ("rust", mediator(dir.path(), &["reserves", "verify", f])),
        ("python", python(&["por", f])),
    ] {
        let out = text(&o);
        assert!(
            !out.contains("panicked") && !out.contains("Traceback"),
            "{who}: {out}"
        );
        assert_eq!(o.status.code(), Some(2), "({who}) accepted: {out}");
        assert!(out.contains("(bad_signature)"), "{who}: {out}");
    }
}

/// Review finding: a liabilities key was not checked to be an asset symbol, so a key holding
/// `; audit head <hex>; note: ...` made a second document produce the very message one
/// signature covers, naming another audit head. Both verifiers refuse such a key (`malformed`),
/// before anything else is looked at.
#[test]
fn both_verifiers_refuse_a_liabilities_key_that_is_no_asset_symbol() {
    let dir = tempfile::tempdir().unwrap();
    let zeros = "00".repeat(32);
    for key in [
        format!("USDT {zeros} 0; audit head {zeros}; note: x"),
        "BT C".to_owned(),
        "A,B".to_owned(),
        "X".repeat(17),
    ] {
        let doc = serde_json::json!({
            "version": 1, "network": "regtest", "message": "m",
            "block_hash": fake_hash(100), "block_height": 100, "psbt": "",
            "reserves_sat": 0, "liabilities_proof_id": 1,
            "liabilities": {
                "BTC": { "root": zeros, "total": "0", "leaves": 1 },
                key.clone(): { "root": zeros, "total": "0", "leaves": 1 },
            },
            "audit_head": zeros, "created": 0,
        });
        let file = dir.path().join("por.json");
        std::fs::write(&file, doc.to_string()).unwrap();
        let f = file.to_str().unwrap();
        for (who, o) in [
            ("rust", mediator(dir.path(), &["reserves", "verify", f])),
            ("python", python(&["por", f])),
        ] {
            let out = text(&o);
            assert!(!out.contains("Traceback"), "{who}: {out}");
            assert_eq!(o.status.code(), Some(2), "({who}) accepted {key:?}: {out}");
            assert!(out.contains("(malformed)"), "{who} {key:?}: {out}");
        }
    }
}

/// Defect (review): nothing kept a second process off a data directory in use. A second
/// `serve` (a restart overlapping the old process, a copied configuration) appended to the
/// live audit log and cut the live journal back to what it had read, both of which the running
/// server went on writing: acknowledged commands lost, and a log refusing the next start.
/// `serve` and `journal repair` now take the directory's lock before they open anything; a
/// second one is refused at once (exit 2) having created nothing.
#[test]
fn a_data_directory_in_use_is_refused_before_anything_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    // Another process holds the directory (as a running `serve` does).
    let held = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.path().join("mediator.lock"))
        .unwrap();
    fs4::FileExt::try_lock(&held).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mediator"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(SERVE)
        .env_remove("MEDIATOR_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve ran beside the directory's holder");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("in use by another mediator process"), "{err}");
    let made: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(made, ["mediator.lock"], "nothing else created");
    let o = mediator(
        dir.path(),
        &[
            "journal",
            "repair",
            "--truncate-at",
            "1:0",
            "--confirm-data-loss",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("in use by another mediator process"),
        "{}",
        text(&o)
    );
    // Let go, and it is the directory's again.
    drop(held);
    let o = mediator(dir.path(), &["journal", "repair", "--truncate-at", "1:0"]);
    assert!(!text(&o).contains("in use"), "{}", text(&o));
}
