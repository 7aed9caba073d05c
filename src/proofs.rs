//! `mediator reserves ...` and `mediator audit ...`: verifiable custody from the command line.
//!
//! * `reserves verify-inclusion FILE`: checks an inclusion proof (the JSON answered by
//!   `GET /mapi/v1/reserves/my-proof`) offline; exit 0 when it verifies, 2 with the reason (and
//!   its stable code) when it does not or the file is not a proof.
//! * `reserves publish-liabilities`: asks the running server to publish a liabilities proof.
//! * `audit verify`: re-walks `<data-dir>/api/audit.log` offline; exit 2 on an unacknowledged break.
//! * `audit tail [-n N]`: the last entries (`--json`: one JSON entry per line, as stored).

use anyhow::{bail, Context};
use reserves::auditlog;
use reserves::liabilities::{self, InclusionProof};
use std::path::Path;

/// The largest proof file read (a depth-40 path is ~6 KiB).
const MAX_PROOF_FILE: u64 = 1 << 20;

/// `mediator reserves verify-inclusion FILE`.
pub fn verify_inclusion(file: &Path, json: bool) -> anyhow::Result<()> {
    let meta = std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?;
    if meta.len() > MAX_PROOF_FILE {
        bail!(
            "{}: not a proof (larger than {MAX_PROOF_FILE} bytes)",
            file.display()
        );
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let result = InclusionProof::from_json(&text).and_then(|p| liabilities::verify(&p).map(|()| p));
    match result {
        Ok(p) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": true, "proof_id": p.proof_id, "asset": p.asset,
                        "balance": p.balance.to_string(), "total": p.total.to_string(),
                        "root": hex::encode(p.root), "audit_head": p.audit_head.map(hex::encode),
                    })
                );
            } else {
                println!(
                    "OK: balance {} (base units) of {} is included in liabilities proof {}\n\
                     root  {}\ntotal {}{}",
                    p.balance,
                    p.asset,
                    p.proof_id,
                    hex::encode(p.root),
                    p.total,
                    p.audit_head
                        .map(|h| format!("\naudit head {}", hex::encode(h)))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": false, "code": e.code(), "error": e.to_string() })
                );
            }
            bail!(
                "{}: inclusion proof FAILED ({}): {e}",
                file.display(),
                e.code()
            )
        }
    }
}

/// `mediator reserves publish-liabilities`.
pub fn publish_liabilities(a: &crate::admin::Admin) -> anyhow::Result<()> {
    let v = a.call("POST", "/mapi/v1/admin/reserves/liabilities", &[])?;
    a.print(&v, |v| {
        let mut out = format!(
            "liabilities proof {} published; audit head {}; commitment {}",
            v["proofId"],
            v["auditHead"].as_str().unwrap_or(""),
            v["commitment"].as_str().unwrap_or("")
        );
        for x in v["assets"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "\n{:<6} total {} over {} accounts, root {}",
                x["asset"].as_str().unwrap_or(""),
                x["total"].as_str().unwrap_or(""),
                x["accounts"],
                x["root"].as_str().unwrap_or("")
            ));
        }
        out
    });
    Ok(())
}

/// `<data-dir>/api/audit.log`: the API's storage lives in `<data-dir>/api` (`api::start_node`).
fn audit_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("api").join(api::proofs::AUDIT_FILE)
}

/// `mediator audit verify`.
pub fn audit_verify(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let path = audit_path(data_dir);
    if !path.exists() {
        bail!("no audit log at {}", path.display());
    }
    let r = auditlog::verify_file(&path).with_context(|| format!("reading {}", path.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}: {} entries, last seq {}, head {}",
            path.display(),
            r.lines,
            r.last_seq,
            hex::encode(r.head)
        );
        for b in &r.breaks {
            println!("  {b}");
        }
    }
    let bad = r.unacknowledged().count();
    if bad > 0 {
        bail!(
            "the audit chain is broken ({bad} unacknowledged break(s)); `mediator serve` refuses \
             to start without --audit-override (which is logged)"
        );
    }
    Ok(())
}

/// `mediator audit tail`.
pub fn audit_tail(data_dir: &Path, n: usize, json: bool) -> anyhow::Result<()> {
    let path = audit_path(data_dir);
    let entries =
        auditlog::tail(&path, n).with_context(|| format!("reading {}", path.display()))?;
    for e in entries {
        if json {
            println!("{}", serde_json::to_string(&e)?);
        } else {
            println!("{}", auditlog::render(&e));
        }
    }
    Ok(())
}
