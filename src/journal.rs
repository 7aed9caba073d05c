//! `mediator journal verify` and `mediator journal repair`: the operator's view of the engine's
//! journal (`<data-dir>/journal`), offline.
//!
//! `verify` reads every segment and snapshot and changes nothing. It succeeds when `serve` would
//! start (a clean journal, or a torn tail of the last, unacknowledged group commit that recovery
//! cuts), and fails (exit code 2) when a bad record hides acknowledged records: then it prints
//! the segment, offset and lost sequence numbers, and the repair command.
//!
//! `repair --truncate-at SEGMENT:OFFSET` cuts the journal at the damage `verify` reported, and
//! only there, losing the records it names (unless a snapshot holds them). It refuses without
//! `--confirm-data-loss`. Before cutting it copies the cut bytes, and moves every later segment,
//! into `<data-dir>/journal/repair-SEGMENT-OFFSET/`, and it appends a line to
//! `<data-dir>/journal/repair.log`. Run it with the server stopped. A snapshot holds the cut
//! records only if it reads as recovery reads it; when the snapshots that would hold them are
//! damaged, repair refuses and changes nothing.

use anyhow::{anyhow, bail, Context};
use matching_engine::journal::{
    check_journal, parse_segment_file_name, repair_truncate, Damage, JournalCheck, RecordVersion,
    SegmentStatus,
};
use matching_engine::snapshot::{list_snapshots, read_snapshot};
use matching_engine::Engine;
use serde_json::{json, Value};
use std::path::Path;

/// The journal directory under a data directory.
pub fn journal_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("journal")
}

/// `mediator journal verify`.
pub fn verify(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let dir = journal_dir(data_dir);
    if !dir.is_dir() {
        bail!("no journal at {}", dir.display());
    }
    let check = check_journal(&dir).with_context(|| format!("reading {}", dir.display()))?;
    let snapshots = snapshot_lines(&dir)?;
    if json {
        let report = json!({
            "journal": dir.display().to_string(),
            "ok": check.damage().is_none(),
            "segments": check.segments.iter().map(segment_json).collect::<Vec<_>>(),
            "damage": check.damage().map(damage_json),
            "snapshots": snapshots,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&dir, &check, &snapshots);
    }
    match check.damage() {
        None => Ok(()),
        Some(d) => Err(anyhow!(
            "{d}; `mediator serve` refuses to start. To cut the journal there (losing those \
             records unless a snapshot holds them): mediator journal repair --truncate-at {}:{} \
             --confirm-data-loss",
            d.segment_first_seq,
            d.offset
        )),
    }
}

/// `mediator journal repair --truncate-at SEGMENT:OFFSET [--confirm-data-loss]`.
pub fn repair(data_dir: &Path, truncate_at: &str, confirm: bool) -> anyhow::Result<()> {
    // Never beside a running server (which writes the journal), nor another repair.
    let _lock = crate::datadir::lock(data_dir, "journal repair")?;
    let dir = journal_dir(data_dir);
    let (segment, offset) = parse_cut(truncate_at)?;
    let check = check_journal(&dir).with_context(|| format!("reading {}", dir.display()))?;
    let Some(damage) = check.damage() else {
        bail!(
            "the journal in {} has no damage to repair; nothing changed",
            dir.display()
        );
    };
    if (damage.segment_first_seq, damage.offset) != (segment, offset) {
        bail!(
            "the damage is at {}:{}, not at {segment}:{offset} (see `mediator journal verify`); \
             nothing changed",
            damage.segment_first_seq,
            damage.offset
        );
    }
    if !confirm {
        bail!(
            "{damage}. Repairing cuts {} at offset {offset} and loses records {}..={} unless a \
             snapshot holds them; re-run with --confirm-data-loss to do it; nothing changed",
            damage.segment.display(),
            damage.first_lost_seq,
            damage.last_lost_seq
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let done = repair_truncate::<Engine>(&dir, segment, offset, now)?;
    print!("mediator: {}", done.log_line);
    println!(
        "mediator: logged to {}; check with `mediator journal verify`",
        dir.join("repair.log").display()
    );
    Ok(())
}

/// `SEGMENT:OFFSET`, SEGMENT a first sequence number or a segment's file name.
fn parse_cut(s: &str) -> anyhow::Result<(u64, u64)> {
    let (segment, offset) = s
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--truncate-at wants SEGMENT:OFFSET, got {s:?}"))?;
    let segment = match segment.parse::<u64>() {
        Ok(first_seq) => first_seq,
        Err(_) => {
            let name = Path::new(segment)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            parse_segment_file_name(name)
                .ok_or_else(|| anyhow!("{segment:?} is not a segment's first seq or file name"))?
        }
    };
    let offset = offset
        .parse::<u64>()
        .map_err(|_| anyhow!("{offset:?} is not a byte offset"))?;
    Ok((segment, offset))
}

fn snapshot_lines(dir: &Path) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for (seq, path) in list_snapshots(dir)? {
        let verdict = match read_snapshot::<Engine>(&path, seq) {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.to_string(),
        };
        out.push(json!({ "seq": seq, "path": path.display().to_string(), "status": verdict }));
    }
    Ok(out)
}

fn version_name(v: Option<RecordVersion>) -> &'static str {
    match v {
        Some(RecordVersion::V1) => "v1",
        Some(RecordVersion::V2) => "v2",
        None => "-",
        Some(_) => "?",
    }
}

fn damage_json(d: &Damage) -> Value {
    json!({
        "segment": d.segment.display().to_string(),
        "segmentFirstSeq": d.segment_first_seq,
        "offset": d.offset,
        "defect": format!("{:?}", d.defect),
        "firstLostSeq": d.first_lost_seq,
        "lastLostSeq": d.last_lost_seq,
        "intactRecordsAfter": d.intact_after,
        "repair": format!("mediator journal repair --truncate-at {}:{} --confirm-data-loss",
            d.segment_first_seq, d.offset),
    })
}

fn segment_json(s: &matching_engine::journal::SegmentCheck) -> Value {
    let status = match &s.status {
        SegmentStatus::Clean => json!({ "kind": "clean" }),
        SegmentStatus::Empty => json!({ "kind": "empty" }),
        SegmentStatus::TornTail {
            defect,
            dropped_bytes,
        } => json!({
            "kind": "tornTail",
            "offset": s.valid_len,
            "defect": format!("{defect:?}"),
            "droppedBytes": dropped_bytes,
        }),
        SegmentStatus::Damaged(d) => json!({ "kind": "damaged", "damage": damage_json(d) }),
        _ => json!({ "kind": "unknown" }),
    };
    json!({
        "path": s.path.display().to_string(),
        "firstSeq": s.first_seq,
        "version": version_name(s.version),
        "fileBytes": s.file_len,
        "validBytes": s.valid_len,
        "records": s.records,
        "lastSeq": s.last_seq,
        "status": status,
    })
}

fn print_text(dir: &Path, check: &JournalCheck, snapshots: &[Value]) {
    println!("journal {}", dir.display());
    for s in &check.segments {
        let name = s.path.file_name().unwrap_or_default().to_string_lossy();
        let seqs = match s.last_seq {
            Some(last) => format!("{}..={last}", s.first_seq),
            None => "none".to_owned(),
        };
        let status = match &s.status {
            SegmentStatus::Clean => "clean".to_owned(),
            SegmentStatus::Empty => "empty (no record; recovery removes it)".to_owned(),
            SegmentStatus::TornTail {
                defect,
                dropped_bytes,
            } => format!(
                "torn tail at offset {} ({defect:?}, {dropped_bytes} bytes of the last \
                 unacknowledged group commit): recovery cuts it",
                s.valid_len
            ),
            SegmentStatus::Damaged(d) => format!(
                "DAMAGED at offset {} ({:?}): acknowledged records {}..={} follow",
                d.offset, d.defect, d.first_lost_seq, d.last_lost_seq
            ),
            _ => "unknown".to_owned(),
        };
        println!(
            "  {name}  {}  records {seqs}  {} of {} bytes valid  {status}",
            version_name(s.version),
            s.valid_len,
            s.file_len
        );
    }
    for s in snapshots {
        println!(
            "  snapshot {}  {}",
            s["seq"],
            s["status"].as_str().unwrap_or("")
        );
    }
    match check.damage() {
        None => println!("journal ok: `mediator serve` recovers it"),
        Some(_) => println!("journal DAMAGED: `mediator serve` refuses to start"),
    }
}
