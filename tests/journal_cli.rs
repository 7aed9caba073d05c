//! `mediator journal verify|repair` and `mediator serve` on a damaged journal, as an operator runs
//! them: the built binary on a data directory in a temp dir. No bitcoind: `serve` is pointed at
//! an RPC URL nobody answers, and refuses before it would use it.

use matching_engine::journal::{segment_file_name, SegmentReader};
use matching_engine::recovery::{Store, StoreConfig};
use matching_engine::{Command as EngineCmd, Engine, EngineConfig, Timestamp};
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn genesis() -> Engine {
    Engine::new(EngineConfig::default()).unwrap()
}

/// A journal of `n` accepted commands, each its own (acknowledged) group commit. Returns the
/// record offsets.
fn journal(data_dir: &Path, n: u64) -> Vec<u64> {
    let dir = data_dir.join("journal");
    let mut r = Store::open(&dir, StoreConfig::default(), genesis).unwrap();
    let mut events = Vec::new();
    for i in 0..n {
        let now = Timestamp(1_000 + i);
        r.state
            .apply(&EngineCmd::CreateAccount, now, &mut events)
            .unwrap();
        r.store
            .append(r.state.seq(), now, &EngineCmd::CreateAccount)
            .unwrap();
        r.store.sync().unwrap();
    }
    drop(r);
    let mut reader = SegmentReader::open(&dir.join(segment_file_name(1)), 1).unwrap();
    let mut starts = Vec::new();
    while let Some(info) = reader.next_record().unwrap() {
        starts.push(info.offset);
    }
    starts
}

#[test]
fn verify_and_serve_refuse_a_damaged_journal_and_repair_makes_it_start() {
    let data = tempfile::tempdir().unwrap();
    let starts = journal(data.path(), 8);
    let segment = data.path().join("journal").join(segment_file_name(1));

    let ok = mediator(data.path(), &["journal", "verify"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains("journal ok"));

    // Damage the payload of the fourth record; four acknowledged records follow it.
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[starts[3] as usize + 25] ^= 0x01;
    std::fs::write(&segment, &bytes).unwrap();
    let at = format!("1:{}", starts[3]);

    let out = mediator(data.path(), &["journal", "verify"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stdout).contains("DAMAGED"));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("offset {}", starts[3])), "{err}");
    assert!(err.contains("records 4..=8"), "{err}");
    assert!(err.contains(&format!("--truncate-at {at}")), "{err}");

    let out = mediator(data.path(), &["--json", "journal", "verify"]);
    assert_eq!(out.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["damage"]["offset"], starts[3]);
    assert_eq!(report["damage"]["firstLostSeq"], 4);
    assert_eq!(report["damage"]["lastLostSeq"], 8);

    // serve refuses, names the damage and points at verify; nothing changes.
    let out = mediator(
        data.path(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--bitcoind-rpc-url",
            "http://127.0.0.1:9",
            "--bitcoind-rpc-user",
            "u",
            "--bitcoind-rpc-password",
            "p",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains(&segment.display().to_string()), "{err}");
    assert!(err.contains(&format!("offset {}", starts[3])), "{err}");
    assert!(
        err.contains("4..=8") && err.contains("mediator journal verify"),
        "{err}"
    );
    assert_eq!(std::fs::read(&segment).unwrap(), bytes);

    // Repair refuses without the flag, or anywhere but at the damage.
    let wrong = format!("1:{}", starts[4]);
    for args in [
        &["journal", "repair", "--truncate-at", &at][..],
        &[
            "journal",
            "repair",
            "--truncate-at",
            &wrong,
            "--confirm-data-loss",
        ][..],
    ] {
        let out = mediator(data.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(text(&out.stderr).contains("nothing changed"), "{args:?}");
        assert_eq!(std::fs::read(&segment).unwrap(), bytes);
    }

    // The segment may be named by its file name too.
    let by_name = format!("{}:{}", segment_file_name(1), starts[3]);
    let out = mediator(
        data.path(),
        &[
            "journal",
            "repair",
            "--truncate-at",
            &by_name,
            "--confirm-data-loss",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let log = std::fs::read_to_string(data.path().join("journal/repair.log")).unwrap();
    assert!(log.contains("records 4..=8"), "{log}");
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        &bytes[..starts[3] as usize]
    );

    let ok = mediator(data.path(), &["journal", "verify"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let r = Store::open(
        &data.path().join("journal"),
        StoreConfig::default(),
        genesis,
    )
    .unwrap();
    assert_eq!(r.state.seq(), 3);
}

/// A journal of `n` accepted commands (each its own group commit) with a snapshot after
/// `snapshot_at` (the journal goes on in a new segment). Returns the record offsets of the first
/// segment.
fn journal_with_snapshot(data_dir: &Path, n: u64, snapshot_at: u64) -> Vec<u64> {
    let dir = data_dir.join("journal");
    let mut r = Store::open(&dir, StoreConfig::default(), genesis).unwrap();
    let mut events = Vec::new();
    for i in 0..n {
        let now = Timestamp(1_000 + i);
        r.state
            .apply(&EngineCmd::CreateAccount, now, &mut events)
            .unwrap();
        r.store
            .append(r.state.seq(), now, &EngineCmd::CreateAccount)
            .unwrap();
        r.store.sync().unwrap();
        if r.state.seq() == snapshot_at {
            r.store.snapshot(&r.state).unwrap();
        }
    }
    drop(r);
    let mut reader = SegmentReader::open(&dir.join(segment_file_name(1)), 1).unwrap();
    let mut starts = Vec::new();
    while let Some(info) = reader.next_record().unwrap() {
        starts.push(info.offset);
    }
    starts
}

/// Every file under `dir` with its bytes, sorted by path.
fn tree(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(tree(&p));
        } else {
            let bytes = std::fs::read(&p).unwrap();
            out.push((p, bytes));
        }
    }
    out.sort();
    out
}

/// `journal repair` keeps the later segments when a snapshot holds the records it cuts. It
/// relied on the snapshot's file name: a damaged snapshot (here a flipped payload byte: its
/// SHA-256 no longer matches) named after the damaged segment let it cut acknowledged records
/// that nothing held any more. It reads the snapshot as recovery would, refuses, names it and
/// changes nothing.
#[test]
fn repair_refuses_when_the_snapshot_that_would_hold_the_cut_records_is_damaged() {
    let data = tempfile::tempdir().unwrap();
    let starts = journal_with_snapshot(data.path(), 8, 4);
    let dir = data.path().join("journal");
    let segment = dir.join(segment_file_name(1));
    let snapshot = dir.join(matching_engine::snapshot::snapshot_file_name(4));
    assert!(dir.join(segment_file_name(5)).exists());

    // Damage record 2 of the first segment (records 1..=4; the snapshot at 4 holds them) and
    // one payload byte of that snapshot.
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[starts[1] as usize + 25] ^= 0x01;
    std::fs::write(&segment, &bytes).unwrap();
    let mut snap = std::fs::read(&snapshot).unwrap();
    let last = snap.len() - 1;
    snap[last] ^= 0x10;
    std::fs::write(&snapshot, &snap).unwrap();

    let before = tree(&dir);
    let at = format!("1:{}", starts[1]);
    let out = mediator(
        data.path(),
        &[
            "journal",
            "repair",
            "--truncate-at",
            &at,
            "--confirm-data-loss",
        ],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nothing changed"), "{err}");
    assert!(
        err.contains(&snapshot.display().to_string()) && err.contains("checksum"),
        "{err}"
    );
    assert_eq!(tree(&dir), before, "repair changed files");
}
