//! `mediator reserves ...` and `mediator audit ...`: verifiable custody from the command line.
//!
//! * `reserves verify-inclusion FILE --account ID`: checks an inclusion proof (the JSON answered
//!   by `GET /mapi/v1/reserves/my-proof`) offline, for the user's own account id (the leaf is
//!   bound to it); exit 0 when it verifies, 2 with the reason (and its stable code) when it does
//!   not or the file is not a proof.
//! * `reserves publish-liabilities`: asks the running server to publish a liabilities proof.
//! * `audit verify`: re-walks `<data-dir>/api/audit.log` offline; exit 2 on an unacknowledged
//!   break; lists the intents without outcome (actions that may have been taken before a crash).
//! * `audit tail [-n N]`: the last entries (`--json`: one JSON entry per line, as stored); an
//!   intent without outcome is marked `[no outcome]`.

use anyhow::{bail, Context};
use reserves::auditlog;
use reserves::liabilities::{self, InclusionProof};
use std::path::Path;

/// The largest proof file read (a depth-40 path is ~6 KiB).
const MAX_PROOF_FILE: u64 = 1 << 20;

/// `mediator reserves verify-inclusion FILE --account ID`.
pub fn verify_inclusion(
    file: &Path,
    account: u32,
    against: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let meta = std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?;
    if meta.len() > MAX_PROOF_FILE {
        bail!(
            "{}: not a proof (larger than {MAX_PROOF_FILE} bytes)",
            file.display()
        );
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let result = InclusionProof::from_json(&text)
        .and_then(|p| liabilities::verify_for(&p, account).map(|()| p));
    let result = match (result, against) {
        (Ok(p), Some(doc)) => match root_in_document(&p, doc) {
            Ok(()) => Ok(p),
            Err(msg) => {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "ok": false, "code": "not_published", "error": msg })
                    );
                }
                bail!(
                    "{}: inclusion proof FAILED (not_published): {msg}",
                    file.display()
                );
            }
        },
        (r, _) => r,
    };
    match result {
        Ok(p) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": true, "proof_id": p.proof_id, "account": p.account, "asset": p.asset,
                        "balance": p.balance.to_string(), "total": p.total.to_string(),
                        "root": hex::encode(p.root), "audit_head": p.audit_head.map(hex::encode),
                    })
                );
            } else {
                println!(
                    "OK: balance {} (base units) of {} of account {} is included in liabilities \
                     proof {}\nroot  {}\ntotal {}{}",
                    p.balance,
                    p.asset,
                    p.account,
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

/// The published proof of reserves `doc` names this inclusion proof's root and total for its
/// asset (same liabilities proof id): else the tree the user is in is not the published one (an
/// account left out of the published tree, say).
fn root_in_document(p: &InclusionProof, doc: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(doc).map_err(|e| format!("{}: {e}", doc.display()))?;
    let d = reserves::por::ProofDocument::from_json(&text).map_err(|e| e.to_string())?;
    if d.liabilities_proof_id != p.proof_id {
        return Err(format!(
            "the inclusion proof is from liabilities proof {}, the proof of reserves names {}",
            p.proof_id, d.liabilities_proof_id
        ));
    }
    match d.liabilities.get(&p.asset) {
        Some(l) if l.root == hex::encode(p.root) && l.total == p.total.to_string() => Ok(()),
        Some(l) => Err(format!(
            "the proof of reserves publishes {} root {} total {}, not this proof's root {} total {}",
            p.asset,
            l.root,
            l.total,
            hex::encode(p.root),
            p.total
        )),
        None => Err(format!("the proof of reserves has no {} liabilities", p.asset)),
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
pub fn audit_verify(
    data_dir: &Path,
    proofs: &[std::path::PathBuf],
    json: bool,
) -> anyhow::Result<()> {
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
        for i in &r.open_intents {
            println!("  {i}");
        }
    }
    let bad = r.unacknowledged().count();
    for doc in proofs {
        let text =
            std::fs::read_to_string(doc).with_context(|| format!("reading {}", doc.display()))?;
        let d = reserves::por::ProofDocument::from_json(&text)
            .map_err(|e| anyhow::anyhow!("{}: {} ({})", doc.display(), e, e.code()))?;
        match head_line(&path, &d.audit_head)? {
            Some((line, end)) => {
                // The history the proof saw: the chain up to its head, overrides after the head
                // not counted (a break they acknowledge was made after the proof).
                let f = std::fs::File::open(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let seen = auditlog::verify(std::io::BufReader::new(std::io::Read::take(f, end)))
                    .with_context(|| format!("reading {}", path.display()))?;
                if let Some(b) = seen.unacknowledged().next() {
                    bail!(
                        "{}: the chain breaks before the proof's audit head (line {line}), at {b}, \
                         acknowledged only after the proof if at all (broken_chain): the history \
                         the proof saw was rewritten",
                        doc.display()
                    );
                }
                println!(
                    "{}: its audit head is line {line} of the log",
                    doc.display()
                )
            }
            None => bail!(
                "{}: the log has no line hashing to the proof's audit head {} (head_missing): \
                 the history the proof saw was rewritten or cut",
                doc.display(),
                d.audit_head
            ),
        }
    }
    if bad > 0 {
        bail!(
            "the audit chain is broken ({bad} unacknowledged break(s)); `mediator serve` refuses \
             to start without --audit-override (which is logged)"
        );
    }
    Ok(())
}

/// The 1-based line of the log whose SHA-256 is `head` (hex), if any, and the byte offset just
/// past it (its newline included): [`auditlog::head_line`] (lines bounded by its `MAX_LINE`).
fn head_line(path: &Path, head: &str) -> anyhow::Result<Option<(u64, u64)>> {
    let mut h = [0u8; 32];
    if hex::decode_to_slice(head, &mut h).is_err() {
        // Not a SHA-256 in hex: no line hashes to it.
        return Ok(None);
    }
    auditlog::head_line(path, &h).with_context(|| format!("reading {}", path.display()))
}

/// `mediator audit tail`.
pub fn audit_tail(data_dir: &Path, n: usize, json: bool) -> anyhow::Result<()> {
    let path = audit_path(data_dir);
    let entries =
        auditlog::tail(&path, n).with_context(|| format!("reading {}", path.display()))?;
    // Intents no later entry closes: marked, so an action that may have been taken before a
    // crash stands out.
    let open: Vec<u64> = auditlog::verify_file(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .open_intents
        .iter()
        .map(|i| i.seq)
        .collect();
    for e in entries {
        if json {
            println!("{}", serde_json::to_string(&e)?);
        } else if open.contains(&e.seq) {
            println!("{} [no outcome]", auditlog::render(&e));
        } else {
            println!("{}", auditlog::render(&e));
        }
    }
    Ok(())
}

// ----- the BIP-127 proof of reserves (docs/proof-of-reserves.md) -----

/// `mediator reserves prove [--message NOTE]`: the running server publishes a liabilities proof
/// and a proof of reserves; prints the document (`--json`) or a summary.
pub fn prove(a: &crate::admin::Admin, message: Option<&str>) -> anyhow::Result<()> {
    let params: Vec<(&str, &str)> = message.map(|m| ("message", m)).into_iter().collect();
    let v = a.call("POST", "/mapi/v1/admin/reserves/prove", &params)?;
    a.print(&v, |v| {
        let mut out = format!(
            "proof of reserves {} published: {} sat at block {} {}\nliabilities proof {}, audit head {}\nmessage: {}",
            v["id"],
            v["reserves_sat"],
            v["block_height"],
            v["block_hash"].as_str().unwrap_or(""),
            v["liabilities_proof_id"],
            v["audit_head"].as_str().unwrap_or(""),
            v["message"].as_str().unwrap_or(""),
        );
        let ln = &v["lightning_unproven"];
        if ln.is_object() {
            out.push_str(&format!(
                "\nlightning (NOT proven, not in the reserves above): on chain {} sat, in channels {} sat, closing {} sat",
                ln["onchain_sat"], ln["channels_sat"], ln["pending_close_sat"]
            ));
        }
        out
    });
    Ok(())
}

/// How far past the stated block `verify` looks for the spend of a UTXO that is gone at the
/// tip (about four weeks of blocks); beyond it, "unspent at the stated block" cannot be shown.
pub const MAX_SCAN_BLOCKS: u32 = 4032;

/// How one reserve input was found unspent at the stated block.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum UtxoStatus {
    /// In the UTXO set at the tip, and the tip is the stated block.
    UnspentAtBlock,
    /// In the UTXO set at the tip (after the stated block), created at or before the block: an
    /// outpoint spent once is gone for good, so it was unspent at the block too.
    UnspentAtTip {
        /// The height it was created at.
        created_height: u32,
    },
    /// Gone at the tip: found spent in a block after the stated one (its value and script
    /// checked against that block's record of the spent output).
    SpentLater {
        /// The block that spent it.
        spent_height: u32,
    },
}

/// `mediator reserves verify FILE [--network NET] [--rpc URL --cookie FILE]`.
pub fn verify_reserves(
    file: &Path,
    network: Option<&str>,
    rpc: Option<(&str, &Path)>,
    json: bool,
) -> anyhow::Result<()> {
    match check_reserves(file, network, rpc) {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "OK: {} sat in {} UTXOs, BTC liabilities {} sat, at block {} {}",
                    report["reserves_sat"],
                    report["utxos"],
                    report["btc_liabilities"].as_str().unwrap_or(""),
                    report["block_height"],
                    report["block_hash"].as_str().unwrap_or("")
                );
                match report["node"].as_str() {
                    Some(n) => println!("node: {n}"),
                    None => println!(
                        "NOT CHECKED against a node: pass --rpc URL --cookie FILE to check \
                         that every UTXO existed unspent at the block"
                    ),
                }
            }
            Ok(())
        }
        Err((code, msg)) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": false, "code": code, "error": msg })
                );
            }
            bail!(
                "{}: proof of reserves FAILED ({code}): {msg}",
                file.display()
            )
        }
    }
}

type Fail = (&'static str, String);

fn check_reserves(
    file: &Path,
    network: Option<&str>,
    rpc: Option<(&str, &Path)>,
) -> Result<serde_json::Value, Fail> {
    use reserves::por::{self, ProofDocument};
    let read = |e: std::io::Error| ("reading", format!("{}: {e}", file.display()));
    let meta = std::fs::metadata(file).map_err(read)?;
    if meta.len() > por::MAX_DOCUMENT as u64 {
        return Err((
            "malformed",
            format!("larger than {} bytes", por::MAX_DOCUMENT),
        ));
    }
    let bytes = std::fs::read(file).map_err(read)?;
    let text = String::from_utf8(bytes).map_err(|_| ("malformed", "not UTF-8".to_owned()))?;
    let fail = |e: por::PorError| (e.code(), e.to_string());
    let doc = ProofDocument::from_json(&text).map_err(fail)?;
    let expected = match network {
        Some(n) => Some(
            n.parse::<wallet::bitcoin::Network>()
                .map_err(|_| ("wrong_network", format!("unknown network {n}")))?,
        ),
        None => None,
    };
    let report = por::verify_document(&doc, expected).map_err(fail)?;
    let mut out = serde_json::json!({
        "ok": true,
        "network": doc.network,
        "block_height": doc.block_height,
        "block_hash": doc.block_hash,
        "reserves_sat": doc.reserves_sat,
        "utxos": report.checked.inputs.len(),
        "btc_liabilities": report.btc_liabilities.to_string(),
        "message_binds": report.message_binds,
        "liabilities_proof_id": doc.liabilities_proof_id,
        "audit_head": doc.audit_head,
    });
    if let Some((url, cookie)) = rpc {
        let statuses = check_against_node(&doc, &report, url, cookie)?;
        let later = statuses
            .iter()
            .filter(|s| matches!(s, UtxoStatus::SpentLater { .. }))
            .count();
        out["node"] = serde_json::json!(format!(
            "every UTXO existed unspent at block {} ({} spent since)",
            doc.block_height, later
        ));
        out["inputs"] = serde_json::to_value(&statuses).unwrap_or_default();
    }
    Ok(out)
}

#[derive(serde::Deserialize)]
struct Header {
    height: u32,
}
#[derive(serde::Deserialize)]
struct Block3 {
    tx: Vec<Tx3>,
}
#[derive(serde::Deserialize)]
struct Tx3 {
    txid: wallet::bitcoin::Txid,
    vin: Vec<Vin3>,
}
#[derive(serde::Deserialize)]
struct Vin3 {
    txid: Option<wallet::bitcoin::Txid>,
    vout: Option<u32>,
    prevout: Option<Prevout3>,
}
#[derive(serde::Deserialize)]
struct Prevout3 {
    #[serde(with = "wallet::bitcoin::amount::serde::as_btc")]
    value: wallet::bitcoin::Amount,
    #[serde(rename = "scriptPubKey")]
    script_pubkey: Spk3,
}
#[derive(serde::Deserialize)]
struct Spk3 {
    hex: String,
}

/// Each reserve input against the node: the stated block is in its best chain at the stated
/// height, the network is the node's, and each UTXO (value and script as the PSBT claims) was
/// unspent at that block ([`UtxoStatus`]). `gettxout` answers for the tip only, so a UTXO gone
/// at the tip is looked for in the blocks after the stated one (at most [`MAX_SCAN_BLOCKS`]):
/// found spent there and not created there, it was unspent at the block; created there, it did
/// not exist at the block; not found, it was spent at or before the block (or never existed):
/// the proof fails.
fn check_against_node(
    doc: &reserves::por::ProofDocument,
    report: &reserves::por::DocumentReport,
    url: &str,
    cookie: &Path,
) -> Result<Vec<UtxoStatus>, Fail> {
    use bdk_bitcoind_rpc::bitcoincore_rpc::{Auth, Client, RpcApi};
    use std::collections::{HashMap, HashSet};
    let node = |e: bdk_bitcoind_rpc::bitcoincore_rpc::Error| ("node", e.to_string());
    let client = Client::new(url, Auth::CookieFile(cookie.to_owned())).map_err(node)?;
    let info = client.get_blockchain_info().map_err(node)?;
    if info.chain != report.network {
        return Err((
            "wrong_network",
            format!(
                "the proof is for {}, the node runs {}",
                report.network, info.chain
            ),
        ));
    }
    let at = client
        .get_block_hash(u64::from(doc.block_height))
        .map_err(|e| {
            (
                "block_not_in_chain",
                format!("no block at height {}: {e}", doc.block_height),
            )
        })?;
    if at != report.block_hash {
        return Err((
            "block_not_in_chain",
            format!(
                "the node's block at height {} is {at}, not {} (reorged away or never there)",
                doc.block_height, doc.block_hash
            ),
        ));
    }
    let mut statuses: Vec<Option<UtxoStatus>> = vec![None; report.checked.inputs.len()];
    let mut gone: HashMap<wallet::bitcoin::OutPoint, usize> = HashMap::new();
    // The height of each block `gettxout` answered at: its `confirmations` count from there,
    // not from a tip read before (a block may arrive in between).
    let mut heights: HashMap<wallet::bitcoin::BlockHash, u32> = HashMap::new();
    for (i, (op, claimed)) in report.checked.inputs.iter().enumerate() {
        match client
            .get_tx_out(&op.txid, op.vout, Some(false))
            .map_err(node)?
        {
            Some(r) => {
                let tip = match heights.get(&r.bestblock) {
                    Some(&h) => h,
                    None => {
                        let h: Header = client
                            .call(
                                "getblockheader",
                                &[
                                    serde_json::json!(r.bestblock.to_string()),
                                    serde_json::json!(true),
                                ],
                            )
                            .map_err(node)?;
                        heights.insert(r.bestblock, h.height);
                        h.height
                    }
                };
                if r.value != claimed.value
                    || r.script_pub_key.hex != claimed.script_pubkey.as_bytes()
                {
                    return Err((
                        "utxo_mismatch",
                        format!("{op}: the chain's output is not the one the PSBT signs for"),
                    ));
                }
                let created = tip.saturating_sub(r.confirmations).saturating_add(1);
                if r.confirmations == 0 || created > doc.block_height {
                    return Err((
                        "utxo_after_block",
                        format!("{op} was created at height {created}, after the stated block"),
                    ));
                }
                statuses[i] = Some(if tip == doc.block_height {
                    UtxoStatus::UnspentAtBlock
                } else {
                    UtxoStatus::UnspentAtTip {
                        created_height: created,
                    }
                });
            }
            None => {
                gone.insert(*op, i);
            }
        }
    }
    if !gone.is_empty() {
        let tip = u32::try_from(client.get_block_count().map_err(node)?).unwrap_or(u32::MAX);
        // A gone UTXO's transaction mined after the stated block: it did not exist at the block,
        // even though it is found spent after it (coins moved after the block and counted in
        // both places, say).
        let gone_txids: HashSet<wallet::bitcoin::Txid> = gone.keys().map(|op| op.txid).collect();
        let mut made_after = HashSet::new();
        let last = tip.min(doc.block_height.saturating_add(MAX_SCAN_BLOCKS));
        for h in doc.block_height.saturating_add(1)..=last {
            if gone.is_empty() {
                break;
            }
            let hash = client.get_block_hash(u64::from(h)).map_err(node)?;
            let block: Block3 = client
                .call(
                    "getblock",
                    &[serde_json::json!(hash.to_string()), serde_json::json!(3)],
                )
                .map_err(node)?;
            // A block lists a transaction before any of its spends.
            for tx in &block.tx {
                if gone_txids.contains(&tx.txid) {
                    made_after.insert(tx.txid);
                }
            }
            for vin in block.tx.iter().flat_map(|t| &t.vin) {
                let (Some(txid), Some(vout)) = (vin.txid, vin.vout) else {
                    continue; // coinbase
                };
                let op = wallet::bitcoin::OutPoint { txid, vout };
                if made_after.contains(&txid) && gone.contains_key(&op) {
                    return Err((
                        "utxo_after_block",
                        format!(
                            "{op} was created after the stated block {} (and spent since)",
                            doc.block_height
                        ),
                    ));
                }
                if let Some(i) = gone.remove(&op) {
                    let claimed = &report.checked.inputs[i].1;
                    let matches = vin.prevout.as_ref().is_some_and(|p| {
                        p.value == claimed.value
                            && hex::decode(&p.script_pubkey.hex).ok().as_deref()
                                == Some(claimed.script_pubkey.as_bytes())
                    });
                    if !matches {
                        return Err((
                            "utxo_mismatch",
                            format!("{op}: the chain's output is not the one the PSBT signs for"),
                        ));
                    }
                    statuses[i] = Some(UtxoStatus::SpentLater { spent_height: h });
                }
            }
        }
        if let Some((op, _)) = gone.iter().next() {
            let why = if tip > doc.block_height.saturating_add(MAX_SCAN_BLOCKS) {
                format!(
                    "{op} is spent now and not spent in the {MAX_SCAN_BLOCKS} blocks after the \
                     stated block: it was spent at or before it, or later than this verifier looks"
                )
            } else {
                format!(
                    "{op} is not unspent at the stated block {}: spent at or before it, or it \
                     never existed",
                    doc.block_height
                )
            };
            return Err(("spent_at_block", why));
        }
    }
    Ok(statuses
        .into_iter()
        .map(|s| s.expect("every input has a status"))
        .collect())
}
