//! Verifiable custody through the API: a published liabilities proof, each user's inclusion
//! proof (verified with the `reserves` crate, as the CLI and third parties do), the audit log of
//! operator actions (no secrets, a valid chain, its head in the proof), start-up refusal on a
//! broken chain and the logged override, and the browser verification page.

mod common;

use axum::http::StatusCode;
use common::Harness;
use matching_engine::EngineConfig;
use reserves::auditlog;
use reserves::liabilities::{self, InclusionProof};

fn units(h: &Harness, asset: &str, s: &str) -> u64 {
    let d = h.state.markets().asset(asset).unwrap().decimals;
    api::decimal::parse_units(s, d).unwrap()
}

#[tokio::test]
async fn every_user_verifies_their_inclusion_in_the_published_liabilities() {
    let h = Harness::new();
    let r = h
        .signed("GET", "/mapi/v1/reserves/my-proof", "asset=USD", &h.admin)
        .await;
    assert_eq!(r.code(), -1130, "before any publish: {}", r.json);

    let balances = ["100.00", "0.01", "2500.50"];
    let mut users = Vec::new();
    for b in balances {
        users.push(h.trader("0", b).await);
    }
    let (_, poor) = h.trader("0", "0").await;
    let published = h
        .ok("POST", "/mapi/v1/admin/reserves/liabilities", "", &h.admin)
        .await;
    let usd = published["assets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["asset"] == "USD")
        .unwrap()
        .clone();
    let expected_total: u64 = balances.iter().map(|b| units(&h, "USD", b)).sum();
    assert_eq!(usd["total"], expected_total.to_string());
    assert_eq!(usd["accounts"], 3);

    for ((account, key), b) in users.iter().zip(balances) {
        let v = h
            .ok("GET", "/mapi/v1/reserves/my-proof", "asset=USD", key)
            .await;
        let p = InclusionProof::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
        assert_eq!(p.account, *account);
        assert_eq!(liabilities::verify_for(&p, *account), Ok(()));
        let other = users.iter().find(|u| u.0 != *account).unwrap().0;
        assert_eq!(
            liabilities::verify_for(&p, other).map_err(|e| e.code()),
            Err("account_mismatch")
        );
        assert_eq!(p.balance, units(&h, "USD", b));
        assert_eq!(p.total, expected_total);
        assert_eq!(hex::encode(p.root), usd["root"].as_str().unwrap());
        assert_eq!(
            hex::encode(p.audit_head.unwrap()),
            published["auditHead"].as_str().unwrap()
        );
        assert_eq!(p.proof_id, published["proofId"].as_u64().unwrap());
    }
    // No balance, no leaf; an unknown asset is refused.
    let r = h
        .signed("GET", "/mapi/v1/reserves/my-proof", "asset=USD", &poor)
        .await;
    assert_eq!(r.code(), -1130, "{}", r.json);
    let r = h
        .signed(
            "GET",
            "/mapi/v1/reserves/my-proof",
            "asset=DOGE",
            &users[0].1,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.json);

    // The audit log holds the actions, a valid chain, and no secret.
    let path = h.dir.path().join(api::proofs::AUDIT_FILE);
    let rep = auditlog::verify_file(&path).unwrap();
    assert!(rep.ok() && rep.breaks.is_empty(), "{:?}", rep.breaks);
    let text = std::fs::read_to_string(&path).unwrap();
    for (_, key) in &users {
        assert!(!text.contains(&key.1), "a secret key is in the audit log");
        assert!(
            text.contains(&key.0),
            "the key creation is logged by its public id"
        );
    }
    let actions: Vec<String> = auditlog::tail(&path, 1000)
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    for a in [
        "server.start",
        "account.create",
        "key.create",
        "credit",
        "reserves.liabilities.publish",
    ] {
        assert!(
            actions.iter().any(|x| x == a),
            "{a} missing from {actions:?}"
        );
    }
    assert_eq!(actions.last().unwrap(), "reserves.liabilities.publish");

    // A second publication: a fresh id (above the audit log's seq, so never reused even if
    // reserves.sqlite were lost), fresh nonces, the new audit head.
    let first = h
        .ok(
            "GET",
            "/mapi/v1/reserves/my-proof",
            "asset=USD",
            &users[0].1,
        )
        .await;
    let again = h
        .ok("POST", "/mapi/v1/admin/reserves/liabilities", "", &h.admin)
        .await;
    assert!(again["proofId"].as_u64() > published["proofId"].as_u64());
    // Its intent entry (the first of the two entries it wrote) came right after every seq that
    // existed when the id was chosen.
    let two = auditlog::tail(&path, 2).unwrap();
    assert_eq!(two[0].action, "reserves.liabilities.publish.intent");
    assert_eq!(two[1].action, "reserves.liabilities.publish");
    assert_eq!(two[1].params["intent"], two[0].seq);
    assert!(again["proofId"].as_u64().unwrap() >= two[0].seq);
    let second = h
        .ok(
            "GET",
            "/mapi/v1/reserves/my-proof",
            "asset=USD",
            &users[0].1,
        )
        .await;
    assert_ne!(first["nonce"], second["nonce"]);
    assert_eq!(second["audit_head"], again["auditHead"]);
    assert_eq!(first["balance"], second["balance"]);
}

#[test]
fn start_up_refuses_a_broken_audit_chain_unless_overridden_and_logs_the_override() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(api::proofs::AUDIT_FILE);
    {
        let log = auditlog::AuditLog::open(&path, false, "system", 1).unwrap();
        for i in 0..4 {
            log.append(
                i,
                "admin",
                "account.create",
                serde_json::json!({ "account": i }),
            )
            .unwrap();
        }
    }
    let mut lines: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.remove(2);
    std::fs::write(
        &path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();

    let err = api::open_local(
        dir.path(),
        EngineConfig::default(),
        api::ApiConfig::default(),
    )
    .expect_err("a broken chain must refuse start-up");
    let msg = err.to_string();
    assert!(
        msg.contains("broken") && msg.contains("--audit-override"),
        "{msg}"
    );

    let cfg = api::ApiConfig {
        audit_override: true,
        ..api::ApiConfig::default()
    };
    let st = api::open_local(dir.path(), EngineConfig::default(), cfg).unwrap();
    drop(st);
    let rep = auditlog::verify_file(&path).unwrap();
    assert!(rep.ok(), "{:?}", rep.breaks);
    let entries = auditlog::tail(&path, 10).unwrap();
    let ov = entries
        .iter()
        .find(|e| e.action == auditlog::OVERRIDE_ACTION)
        .unwrap();
    assert_eq!(ov.actor, "operator");
    assert_eq!(ov.params["break_lines"], serde_json::json!([3]));
}

fn fast() -> api::ApiConfig {
    api::ApiConfig {
        ip_weight_per_min: 1_000_000,
        key_weight_per_min: 1_000_000,
        ..api::ApiConfig::default()
    }
}

/// A log cut back before the audit head of a proof the server published (its last entries
/// removed: a valid, shorter chain) is refused at start-up like a broken chain, since the
/// server holds the proofs and their heads; with the override it starts, the override names the
/// missing head, and later starts accept that acknowledged loss.
#[tokio::test]
async fn start_up_refuses_a_log_cut_before_a_published_proofs_head_unless_overridden() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let h = Harness::in_dir(dir, fast());
    h.trader("0", "5.00").await;
    let published = h
        .ok("POST", "/mapi/v1/admin/reserves/liabilities", "", &h.admin)
        .await;
    let head = published["auditHead"].as_str().unwrap().to_owned();
    assert!(h.state.read_model().wait_persisted().await);
    std::mem::forget(h.dir);
    drop(h.router);
    drop(h.state);

    let log = path.join(api::proofs::AUDIT_FILE);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| hex::encode(auditlog::line_hash(l.as_bytes())) == head)
        .expect("the published head is a line of the log");
    let cut: String = lines[..at].iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&log, &cut).unwrap();
    assert!(
        auditlog::verify_file(&log).unwrap().ok(),
        "a log cut at the tail is a valid chain"
    );

    let err = api::open_local(&path, EngineConfig::default(), fast())
        .expect_err("a log without a published proof's head must refuse start-up");
    let msg = err.to_string();
    assert!(
        msg.contains(&head) && msg.contains("--audit-override"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        cut,
        "refusal changes nothing"
    );

    let overridden = api::ApiConfig {
        audit_override: true,
        ..fast()
    };
    drop(api::open_local(&path, EngineConfig::default(), overridden).unwrap());
    let entries = auditlog::tail(&log, usize::MAX).unwrap();
    let ov = entries
        .iter()
        .find(|e| e.action == auditlog::OVERRIDE_ACTION)
        .expect("the override is logged");
    assert_eq!(ov.actor, "operator");
    assert_eq!(ov.params["missing_heads"], serde_json::json!([head]));
    // Acknowledged once, in the chain: the next start needs no override.
    drop(api::open_local(&path, EngineConfig::default(), fast()).unwrap());
    assert!(auditlog::verify_file(&log).unwrap().ok());
}

#[tokio::test]
async fn the_verification_page_is_self_contained_with_a_hashed_script() {
    let h = Harness::new();
    let r = h.get("/reserves/verify").await;
    assert_eq!(r.status, StatusCode::OK);
    let csp = r.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let body = r.json.as_str().unwrap();
    assert!(body.contains("crypto.subtle.digest"));
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "no external resource"
    );
}

#[tokio::test]
async fn openapi_lists_the_reserves_routes() {
    let h = Harness::new();
    let doc = h.get("/openapi.json").await.json;
    let mine = &doc["paths"]["/mapi/v1/reserves/my-proof"]["get"];
    assert_eq!(mine["x-permission"], "read", "{mine}");
    let publish = &doc["paths"]["/mapi/v1/admin/reserves/liabilities"]["post"];
    assert_eq!(publish["x-permission"], "admin", "{publish}");
}

#[tokio::test]
async fn proof_of_reserves_routes_refuse_cleanly_and_change_nothing() {
    let h = Harness::new();
    // Nothing published yet: a clear refusal, and an empty list.
    let r = h.get("/mapi/v1/reserves/latest").await;
    assert_eq!(r.code(), -1130, "{}", r.json);
    let r = h.get("/mapi/v1/reserves/latest?id=7").await;
    assert_eq!(r.code(), -1130, "{}", r.json);
    let r = h.get("/mapi/v1/reserves/proofs").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json, serde_json::json!([]));
    for bad in ["limit=0", "limit=101", "limit=x", "id=-1"] {
        let uri = if bad.starts_with("id") {
            format!("/mapi/v1/reserves/latest?{bad}")
        } else {
            format!("/mapi/v1/reserves/proofs?{bad}")
        };
        let r = h.get(&uri).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.json);
    }
    // A message out of bounds is refused before anything is published.
    let long = "m".repeat(reserves::por::MAX_NOTE + 1);
    let before = std::fs::read(h.dir.path().join(api::proofs::AUDIT_FILE)).unwrap();
    for m in [String::new(), long] {
        let r = h
            .signed(
                "POST",
                "/mapi/v1/admin/reserves/prove",
                &format!("message={m}"),
                &h.admin,
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.json);
    }
    assert_eq!(
        std::fs::read(h.dir.path().join(api::proofs::AUDIT_FILE)).unwrap(),
        before,
        "a refused prove logs nothing"
    );
    // The routes are documented with their permissions.
    let doc = h.get("/openapi.json").await.json;
    for public in ["/mapi/v1/reserves/latest", "/mapi/v1/reserves/proofs"] {
        let op = &doc["paths"][public]["get"];
        assert!(
            op.is_object() && op.get("security").is_none(),
            "{public}: {op}"
        );
    }
    assert_eq!(
        doc["paths"]["/mapi/v1/admin/reserves/prove"]["post"]["x-permission"],
        "admin"
    );
}

async fn mine(h: &Harness, key: &(String, String)) -> common::Resp {
    h.signed("GET", "/mapi/v1/reserves/my-proof", "asset=USD", key)
        .await
}

/// Makes the stored snapshot of every liabilities proof unreadable (a BLOB where the server
/// reads TEXT): a request that still reads it fails.
fn spoil_stored_snapshots(dir: &std::path::Path) {
    let db = rusqlite::Connection::open(dir.join(api::proofs::PROOFS_DB)).unwrap();
    let n = db
        .execute("UPDATE liabilities SET snapshot = x'00'", [])
        .unwrap();
    assert!(n > 0, "no liabilities proof stored");
}

#[tokio::test]
async fn my_proof_answers_from_memory_and_picks_up_a_new_publication() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let h = Harness::in_dir(
        dir,
        api::ApiConfig {
            ip_weight_per_min: 1_000_000,
            key_weight_per_min: 1_000_000,
            ..api::ApiConfig::default()
        },
    );
    let (_, key) = h.trader("0", "42.00").await;
    let (_, other) = h.trader("0", "7.00").await;
    let first = h
        .ok("POST", "/mapi/v1/admin/reserves/liabilities", "", &h.admin)
        .await;
    let a = mine(&h, &key).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json);
    assert_eq!(a.json["proof_id"], first["proofId"]);

    // The stored snapshot can no longer be read: answers come from memory, unchanged, for every
    // account, as often as asked.
    spoil_stored_snapshots(&path);
    for _ in 0..5 {
        let again = mine(&h, &key).await;
        assert_eq!(
            (again.status, &again.json),
            (StatusCode::OK, &a.json),
            "my-proof read the stored snapshot again"
        );
    }
    let b = mine(&h, &other).await;
    assert_eq!(b.status, StatusCode::OK, "{}", b.json);
    assert_eq!(b.json["root"], a.json["root"]);
    assert_eq!(h.state.liabilities_snapshot_loads(), 0, "publish filled it");

    // A new publication is answered at once (its own id, nonces and audit head).
    let second = h
        .ok("POST", "/mapi/v1/admin/reserves/liabilities", "", &h.admin)
        .await;
    let c = mine(&h, &key).await;
    assert_eq!(c.status, StatusCode::OK, "{}", c.json);
    assert_eq!(c.json["proof_id"], second["proofId"]);
    assert_eq!(c.json["audit_head"], second["auditHead"]);
    assert_ne!(c.json["nonce"], a.json["nonce"]);
    assert_eq!(c.json["balance"], a.json["balance"]);
    assert!(h.state.read_model().wait_persisted().await);
    let before_restart = c.json.clone();
    std::mem::forget(h.dir);
    drop(h.router);
    drop(h.state);

    // After a restart the latest publication is read once, rebuilt, and answers the same proof.
    let state = api::open_local(
        &path,
        EngineConfig::default(),
        api::ApiConfig {
            ip_weight_per_min: 1_000_000,
            key_weight_per_min: 1_000_000,
            ..api::ApiConfig::default()
        },
    )
    .unwrap();
    let h2 = Harness {
        router: api::app(state.clone()),
        state,
        dir: tempfile::tempdir().unwrap(),
        admin: (String::new(), String::new()),
    };
    let d = mine(&h2, &key).await;
    assert_eq!((d.status, &d.json), (StatusCode::OK, &before_restart));
    assert_eq!(h2.state.liabilities_snapshot_loads(), 1);
    spoil_stored_snapshots(&path);
    let e = mine(&h2, &key).await;
    assert_eq!((e.status, &e.json), (StatusCode::OK, &before_restart));
    assert_eq!(h2.state.liabilities_snapshot_loads(), 1);
    drop(h2);

    // A publication whose stored snapshot does not rebuild to its published roots (made by an
    // older leaf format, or under another master key) is not answered against a root nobody
    // published.
    let db = rusqlite::Connection::open(path.join(api::proofs::PROOFS_DB)).unwrap();
    let roots: String = db
        .query_row(
            "SELECT roots FROM liabilities ORDER BY proof_id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let mut roots: serde_json::Value = serde_json::from_str(&roots).unwrap();
    let snapshot = serde_json::json!([["USD", [[1, 4200]]]]).to_string();
    for r in roots.as_array_mut().unwrap() {
        r["root"] = serde_json::json!("00".repeat(32));
    }
    db.execute(
        "UPDATE liabilities SET roots = ?1, snapshot = ?2",
        rusqlite::params![roots.to_string(), snapshot],
    )
    .unwrap();
    drop(db);
    let state = api::open_local(
        &path,
        EngineConfig::default(),
        api::ApiConfig {
            ip_weight_per_min: 1_000_000,
            key_weight_per_min: 1_000_000,
            ..api::ApiConfig::default()
        },
    )
    .unwrap();
    let h3 = Harness {
        router: api::app(state.clone()),
        state,
        dir: tempfile::tempdir().unwrap(),
        admin: (String::new(), String::new()),
    };
    let f = mine(&h3, &key).await;
    assert_eq!(f.code(), -1130, "{}", f.json);
    assert!(f.msg().contains("older format"), "{}", f.json);
    drop(h3);
    let _ = std::fs::remove_dir_all(&path);
}
#[tokio::test]
async fn a_publication_is_recorded_even_if_the_log_dies_right_after_it() {
    // The audit log stops accepting writes after `k` more appends: at every `k`, either nothing
    // was published (`my-proof` has nothing to answer), or the log holds a record of it.
    for k in 0..=2 {
        let h = Harness::new();
        let (_, key) = h.trader("0", "5.00").await;
        let log = h.dir.path().join(api::proofs::AUDIT_FILE);
        h.state.audit_log().fail_appends_after(k);
        let r = h
            .signed("POST", "/mapi/v1/admin/reserves/liabilities", "", &h.admin)
            .await;
        let answer = mine(&h, &key).await;
        let published = answer.status == StatusCode::OK;
        let entries = auditlog::tail(&log, usize::MAX).unwrap();
        let recorded: Vec<_> = entries
            .iter()
            .filter(|e| e.action.starts_with("reserves.liabilities.publish"))
            .collect();
        assert!(
            !published || !recorded.is_empty(),
            "log dead after {k}: proof {} is answered and the log has no record of it",
            answer.json["proof_id"]
        );
        let report = auditlog::verify_file(&log).unwrap();
        match k {
            0 => {
                assert!(!published, "{}", answer.json);
                assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
                assert!(recorded.is_empty());
            }
            // Published, the outcome entry lost: answered as published (regression: it was
            // `-1000`, which invites publishing again), the intent stays open.
            1 => {
                assert!(published);
                assert_eq!(r.status, StatusCode::OK, "{}", r.json);
                assert_eq!(r.json["proofId"], answer.json["proof_id"]);
                assert_eq!(recorded.len(), 1);
                assert_eq!(recorded[0].action, "reserves.liabilities.publish.intent");
                assert_eq!(recorded[0].params["proofId"], answer.json["proof_id"]);
                assert_eq!(report.open_intents.len(), 1, "{:?}", report.open_intents);
            }
            _ => {
                assert!(published);
                assert_eq!(r.status, StatusCode::OK, "{}", r.json);
                assert_eq!(recorded.len(), 2);
                assert_eq!(recorded[1].params["outcome"], "done");
                assert_eq!(recorded[1].params["proofId"], r.json["proofId"]);
                assert!(report.open_intents.is_empty());
                // The published proof names the head just before its intent.
                assert_eq!(
                    hex::encode(auditlog::line_hash(
                        std::fs::read_to_string(&log)
                            .unwrap()
                            .lines()
                            .nth(recorded[0].seq as usize - 2)
                            .unwrap()
                            .as_bytes()
                    )),
                    r.json["auditHead"].as_str().unwrap()
                );
            }
        }
    }
}

// ----- single-entry actions: who can do what, and money addresses -----

/// The audit log's entries after `base` (a seq) whose action is `action`, and the whole file.
fn entries_after(h: &Harness, base: u64, action: &str) -> (Vec<auditlog::Entry>, String) {
    let path = h.dir.path().join(api::proofs::AUDIT_FILE);
    let rep = auditlog::verify_file(&path).unwrap();
    assert!(rep.ok(), "{:?}", rep.breaks);
    let found = auditlog::tail(&path, usize::MAX)
        .unwrap()
        .into_iter()
        .filter(|e| e.seq > base && e.action == action)
        .collect();
    (found, std::fs::read_to_string(&path).unwrap())
}

/// Review finding: `account.create` named no credential ("admin" only). It is one entry with
/// the account and `by`, the admin key's public id; the admin's secret is not in the log.
#[tokio::test]
async fn an_account_creation_is_one_audit_entry_naming_who_did_it() {
    let h = Harness::new();
    let base = h.state.audit_head().0;
    let r = h.ok("POST", "/mapi/v1/admin/account", "", &h.admin).await;
    let (found, text) = entries_after(&h, base, "account.create");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].actor, "admin");
    assert_eq!(found[0].params["account"], r["account"]);
    assert_eq!(found[0].params["by"], h.admin.0.as_str(), "{:?}", found[0]);
    assert!(
        !text.contains(&h.admin.1),
        "the admin's secret is in the audit log"
    );
}

/// Review finding: key creation and revocation named no credential, and a revocation not the
/// key's account. Each is one entry: the key's public id, account, permissions, `by` (the key
/// that asked); never the secret nor the Greenfield token.
#[tokio::test]
async fn key_creation_and_revocation_are_audit_entries_without_secrets() {
    let h = Harness::new();
    let (acct, user) = h.trader_with("0", "0", "read,trade,keys").await;
    // By the admin, for an account.
    let base = h.state.audit_head().0;
    let made = h
        .ok(
            "POST",
            "/mapi/v1/admin/apiKey",
            &format!("account={acct}&permissions=read&label=bot"),
            &h.admin,
        )
        .await;
    let (found, _) = entries_after(&h, base, "key.create");
    assert_eq!(found.len(), 1, "{found:?}");
    let e = &found[0];
    assert_eq!(e.actor, "admin");
    assert_eq!(e.params["apiKey"], made["apiKey"]);
    assert_eq!(e.params["account"], acct);
    assert_eq!(e.params["permissions"], serde_json::json!(["read"]));
    assert_eq!(e.params["label"], "bot");
    assert_eq!(e.params["by"], h.admin.0.as_str(), "{e:?}");
    // By the account's own key, for itself.
    let base = h.state.audit_head().0;
    let own = h
        .ok(
            "POST",
            "/mapi/v1/apiKey",
            "permissions=read,trade&label=mine",
            &user,
        )
        .await;
    let (found, _) = entries_after(&h, base, "key.create");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].actor, format!("account:{acct}"));
    assert_eq!(found[0].params["apiKey"], own["apiKey"]);
    assert_eq!(found[0].params["by"], user.0.as_str(), "{:?}", found[0]);
    // Revoked by the account's key.
    let base = h.state.audit_head().0;
    let target = own["apiKey"].as_str().unwrap();
    h.ok(
        "DELETE",
        "/mapi/v1/apiKey",
        &format!("apiKey={target}"),
        &user,
    )
    .await;
    let (found, text) = entries_after(&h, base, "key.revoke");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].actor, format!("account:{acct}"));
    assert_eq!(found[0].params["apiKey"], target);
    assert_eq!(found[0].params["account"], acct, "{:?}", found[0]);
    assert_eq!(found[0].params["by"], user.0.as_str());
    // No secret of any of these keys.
    for v in [&made, &own] {
        for secret in ["secretKey", "greenfieldToken"] {
            let s = v[secret].as_str().unwrap();
            assert!(
                !s.is_empty() && !text.contains(s),
                "{secret} is in the audit log"
            );
        }
    }
    assert!(!text.contains(&user.1));
}

/// Review finding: the admin key `serve` writes on first start was made without an audit entry.
/// It is `key.create` by `system` (`by`: `start-up`), with its public id and file; the secret
/// in that file is not in the log.
#[tokio::test]
async fn the_admin_key_made_at_start_up_is_an_audit_entry_without_its_secret() {
    let h = Harness::new();
    let base = h.state.audit_head().0;
    let f = h.state.ensure_admin_key().unwrap();
    assert!(f.created);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&f.path).unwrap()).unwrap();
    let (found, text) = entries_after(&h, base, "key.create");
    assert_eq!(found.len(), 1, "{found:?}");
    let e = &found[0];
    assert_eq!(e.actor, "system");
    assert_eq!(e.params["by"], "start-up");
    assert_eq!(e.params["apiKey"], v["apiKey"]);
    assert_eq!(e.params["account"], 0);
    assert!(e.params["permissions"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("admin")));
    assert!(!text.contains(v["secretKey"].as_str().unwrap()));
    // Found again at the next start: nothing made, nothing logged.
    let base = h.state.audit_head().0;
    assert!(!h.state.ensure_admin_key().unwrap().created);
    assert!(entries_after(&h, base, "key.create").0.is_empty());
}

/// Defect: a key whose `key.create` entry could not be written was made anyway (usable by
/// whoever had its secret, with no record of it) and answered `-1000`, so a retry made a
/// second one. The entry is now written before the key exists: a dead log makes no key.
#[tokio::test]
async fn a_key_whose_audit_entry_cannot_be_written_is_not_made() {
    let h = Harness::new();
    let (acct, user) = h.trader_with("0", "0", "read,trade,keys").await;
    let before = h.state.keys().of_account(acct).len();
    h.state.audit_log().fail_appends_after(0);
    for (path, params, key) in [
        (
            "/mapi/v1/admin/apiKey",
            format!("account={acct}&permissions=read&label=bot"),
            &h.admin,
        ),
        (
            "/mapi/v1/apiKey",
            "permissions=read&label=mine".to_owned(),
            &user,
        ),
    ] {
        let r = h.signed("POST", path, &params, key).await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.json);
        assert_eq!(r.json["code"], -1000);
        assert_eq!(
            h.state.keys().of_account(acct).len(),
            before,
            "{path}: a key was made without its audit entry"
        );
    }
}

/// Defect: a revocation and an account opening whose audit entries could not be written were
/// answered `-1000` though done (the key was revoked, the account open), so a retry opened a
/// second account. Both are answered as done; the failed entries are in the server log.
#[tokio::test]
async fn a_revocation_or_account_whose_audit_entry_cannot_be_written_is_answered_as_done() {
    let h = Harness::new();
    let (acct, user) = h.trader_with("0", "0", "read,trade,keys").await;
    let own = h
        .ok(
            "POST",
            "/mapi/v1/apiKey",
            "permissions=read&label=mine",
            &user,
        )
        .await;
    let target = own["apiKey"].as_str().unwrap().to_owned();
    h.state.audit_log().fail_appends_after(0);
    let r = h
        .signed(
            "DELETE",
            "/mapi/v1/apiKey",
            &format!("apiKey={target}"),
            &user,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert!(h.state.keys().get(&target).is_none(), "still live");
    assert!(
        h.state
            .keys()
            .of_account(acct)
            .iter()
            .all(|k| k.api_key != target),
        "still listed"
    );
    let r = h
        .signed("POST", "/mapi/v1/admin/account", "", &h.admin)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert!(
        r.json["account"].as_u64().unwrap() > u64::from(acct),
        "{}",
        r.json
    );
}

/// Review finding: any `read` key could make the server rebuild whole liabilities trees on
/// every `my-proof` request by asking for two older publications in turn (`proofId`), each
/// evicting the other. A publication asked for that is not in memory is rebuilt at most once
/// every 10 s server-wide (`503 -1008` meanwhile); the one kept is answered from memory.
#[tokio::test]
async fn older_publications_asked_for_in_turn_are_not_rebuilt_per_request() {
    let h = Harness::with_config(api::ApiConfig {
        ip_weight_per_min: 1_000_000,
        key_weight_per_min: 1_000_000,
        ..api::ApiConfig::default()
    });
    let (_, key) = h.trader("0", "42.00").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let p = h
            .ok("POST", "/mapi/v1/admin/reserves/liabilities", "", &h.admin)
            .await;
        ids.push(p["proofId"].as_u64().unwrap());
    }
    let ask = |id: u64| {
        let (h, key) = (&h, key.clone());
        async move {
            h.signed(
                "GET",
                "/mapi/v1/reserves/my-proof",
                &format!("asset=USD&proofId={id}"),
                &key,
            )
            .await
        }
    };
    // An id never published costs nothing: refused as unknown, it neither spends the window
    // nor takes the slot.
    let none = ask(ids[2] + 1_000).await;
    assert_eq!(none.code(), -1130, "{}", none.json);
    let first = ask(ids[0]).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.json);
    assert_eq!(first.json["proof_id"], ids[0]);
    let loads = h.state.liabilities_snapshot_loads();
    for _ in 0..5 {
        let other = ask(ids[1]).await;
        assert_eq!(other.code(), -1008, "{}", other.json);
        let wait: u64 = other.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=10).contains(&wait), "Retry-After {wait}");
        let again = ask(ids[0]).await;
        assert_eq!((again.status, &again.json), (StatusCode::OK, &first.json));
    }
    assert_eq!(
        h.state.liabilities_snapshot_loads(),
        loads,
        "no rebuild per request"
    );
    // The latest is always in memory.
    let latest = ask(ids[2]).await;
    assert_eq!(latest.json["proof_id"], ids[2]);
}
