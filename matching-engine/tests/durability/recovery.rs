//! Snapshots plus journal: recovery reaches the state from before the stop, falls back past a
//! corrupt snapshot, and refuses a journal that does not replay.

use crate::bank::{workload, Bank, BankCmd};
use matching_engine::journal::{list_segments, segment_file_name, JournalWriter};
use matching_engine::recovery::{Recovered, RecoveryError, Store, StoreConfig};
use matching_engine::snapshot::{list_snapshots, snapshot_file_name};
use matching_engine::{RejectCode, StateMachine, Timestamp};
use std::path::Path;

const CONFIG: StoreConfig = StoreConfig {
    snapshot_every: 0,
    snapshots_kept: 2,
    preallocate: true,
};

fn open(dir: &Path) -> Result<Recovered<Bank>, RecoveryError> {
    Store::open(dir, CONFIG, || Bank::new(4, 1))
}

/// Applies `cmds` and journals the accepted ones (one sync per command), taking a snapshot after
/// each accepted sequence number in `snapshot_at`. Returns the hash at the end.
fn run(dir: &Path, cmds: &[BankCmd], snapshot_at: &[u64]) -> [u8; 32] {
    let Recovered {
        mut state,
        mut store,
        ..
    } = open(dir).unwrap();
    let mut events = Vec::new();
    for (i, cmd) in cmds.iter().enumerate() {
        let now = Timestamp(10 * i as u64 + 7);
        if state.apply(cmd, now, &mut events).is_ok() {
            store.append(state.seq(), now, cmd).unwrap();
            store.sync().unwrap();
            if snapshot_at.contains(&state.seq()) {
                store.snapshot(&state).unwrap();
            }
        }
    }
    state.state_hash()
}

fn snapshot_seqs(dir: &Path) -> Vec<u64> {
    list_snapshots(dir)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

#[test]
fn snapshot_plus_journal_gives_the_hash_from_before_the_stop_twice() {
    let dir = tempfile::tempdir().unwrap();
    let before = run(dir.path(), &workload(60, 0), &[20, 40]);
    let first = open(dir.path()).unwrap();
    assert_eq!(first.report.snapshot_seq, Some(40));
    assert!(first.report.replayed > 0);
    assert_eq!(first.state.state_hash(), before);
    let seq = first.state.seq();
    drop(first);
    // Replay is deterministic: a second recovery from the same files gives the same state.
    let second = open(dir.path()).unwrap();
    assert_eq!(second.state.seq(), seq);
    assert_eq!(second.state.state_hash(), before);
    assert_eq!(second.state.disorder(), 0);
    assert_eq!(second.state.last_n(0), 60);
    assert_eq!(
        second.state.total(),
        (0..4).map(|a| second.state.balance(a)).sum::<u64>()
    );
}

#[test]
fn a_corrupt_newest_snapshot_falls_back_to_the_older_one() {
    let dir = tempfile::tempdir().unwrap();
    let before = run(dir.path(), &workload(60, 0), &[20, 40]);
    let newest = dir.path().join(snapshot_file_name(40));
    let mut bytes = std::fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&newest, &bytes).unwrap();

    let r = open(dir.path()).unwrap();
    assert_eq!(r.report.snapshot_seq, Some(20));
    assert_eq!(r.report.corrupt_snapshots.len(), 1);
    assert_eq!(r.state.state_hash(), before);
    assert_eq!(snapshot_seqs(dir.path()), vec![20]);
}

#[test]
fn snapshots_rotate_and_prune_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let before = run(dir.path(), &workload(80, 0), &[10, 30, 50]);
    assert_eq!(snapshot_seqs(dir.path()), vec![30, 50]);
    let firsts: Vec<u64> = list_segments(dir.path())
        .unwrap()
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    assert_eq!(firsts, vec![31, 51]);
    let r = open(dir.path()).unwrap();
    assert_eq!(r.state.state_hash(), before);
}

/// Defect: a snapshot whose writing stopped before its rename (a crash, a full disk) left its
/// `.tmp` file for ever (only a snapshot of the same sequence number overwrote it): up to a
/// whole state's size of disk per stop. Snapshots older than the newest one written are removed
/// when the store prunes.
#[test]
fn a_snapshot_left_half_written_is_removed_when_a_later_one_is_written() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), &workload(30, 0), &[10]);
    let stray = dir.path().join(format!("{}.tmp", snapshot_file_name(20)));
    std::fs::write(&stray, b"MEDSNAP1 half written").unwrap();
    let unrelated = dir.path().join("notes.tmp");
    std::fs::write(&unrelated, b"not ours").unwrap();
    let Recovered {
        state, mut store, ..
    } = open(dir.path()).unwrap();
    assert!(stray.exists(), "recovery alone removes nothing");
    store.snapshot(&state).unwrap();
    assert!(!stray.exists(), "the half-written snapshot is gone");
    assert!(unrelated.exists(), "other files are left alone");
}

#[test]
fn snapshot_every_n_is_due_after_n_accepted_commands() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        snapshot_every: 5,
        snapshots_kept: 2,
        ..StoreConfig::default()
    };
    let r = Store::open(dir.path(), config, || Bank::new(4, 1)).unwrap();
    assert!(!r.store.snapshot_due(4));
    assert!(r.store.snapshot_due(5));
}

#[test]
fn a_missing_segment_is_a_gap_not_a_silent_loss() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), &workload(60, 0), &[20, 40]);
    // Lose the newest snapshot and the segment that leads from the older one to it.
    std::fs::remove_file(dir.path().join(snapshot_file_name(40))).unwrap();
    std::fs::remove_file(dir.path().join(segment_file_name(21))).unwrap();
    match open(dir.path()) {
        Err(RecoveryError::Gap { expected, found }) => assert_eq!((expected, found), (21, 41)),
        other => panic!("expected a gap, got {other:?}"),
    }
}

#[test]
fn a_journaled_command_that_is_rejected_on_replay_is_divergence() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut w = JournalWriter::create(dir.path(), 1).unwrap();
        let overdraft = BankCmd::Transfer {
            from: 0,
            to: 1,
            amount: 5,
            producer: 0,
            n: 1,
        };
        w.append(1, Timestamp(1), &overdraft).unwrap();
        w.sync().unwrap();
    }
    match open(dir.path()) {
        Err(RecoveryError::Divergence { seq, code }) => {
            assert_eq!((seq, code), (1, RejectCode::InsufficientBalance))
        }
        other => panic!("expected divergence, got {other:?}"),
    }
}

#[test]
fn replay_uses_the_journaled_time() {
    // The bank folds each command's time into its state, so a replay with other times would give
    // another hash: equal hashes show the journaled times were used.
    let dir = tempfile::tempdir().unwrap();
    let before = run(dir.path(), &workload(10, 0), &[]);
    let r = open(dir.path()).unwrap();
    assert_eq!(r.state.state_hash(), before);
    assert_eq!(r.report.last_time, Some(Timestamp(10 * 9 + 7)));
}

/// Every file name and content in `dir`.
fn tree(dir: &Path) -> Vec<(std::ffi::OsString, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn damage_in_an_older_segment_refuses_and_changes_no_file() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), &workload(60, 0), &[20, 40]);
    // Also a corrupt newest snapshot: recovery must not even set it aside.
    let newest = dir.path().join(snapshot_file_name(40));
    let mut snap = std::fs::read(&newest).unwrap();
    let last = snap.len() - 1;
    snap[last] ^= 1;
    std::fs::write(&newest, &snap).unwrap();
    let older = dir.path().join(segment_file_name(21));
    let mut bytes = std::fs::read(&older).unwrap();
    let mut reader = matching_engine::journal::SegmentReader::open(&older, 21).unwrap();
    let mut offsets = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        offsets.push((r.seq, r.offset));
    }
    let (seq, offset) = offsets[5];
    bytes[offset as usize + 30] ^= 0x08;
    std::fs::write(&older, &bytes).unwrap();
    let before = tree(dir.path());
    match open(dir.path()) {
        Err(RecoveryError::Damaged(d)) => {
            assert_eq!(d.segment, older);
            assert_eq!(d.offset, offset);
            assert_eq!(d.first_lost_seq, seq);
            assert_eq!(
                d.last_lost_seq, 40,
                "through the record before the next segment"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        tree(dir.path()),
        before,
        "no file was changed, renamed or removed"
    );
}

/// Found by the crash simulation (`merchant/tests/crash_sim.rs`, seed 5): damage in a segment that a
/// snapshot holds (the segment ends where a snapshot was taken) is repaired by cutting that
/// segment; the later segments replay from the snapshot, so the repair keeps them and no
/// acknowledged command is lost. (It used to move them aside: every command after the snapshot
/// was lost, and the repair's report did not name them.)
#[test]
fn repairing_damage_a_snapshot_holds_keeps_the_later_segments() {
    let dir = tempfile::tempdir().unwrap();
    let hash = run(dir.path(), &workload(60, 0), &[20, 40]);
    let last_seq = open(dir.path()).unwrap().state.seq();
    assert!(last_seq > 45, "commands after the last snapshot");
    let older = dir.path().join(segment_file_name(21));
    let mut bytes = std::fs::read(&older).unwrap();
    let mut reader = matching_engine::journal::SegmentReader::open(&older, 21).unwrap();
    let mut offsets = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        offsets.push(r.offset);
    }
    bytes[offsets[5] as usize + 30] ^= 0x08;
    std::fs::write(&older, &bytes).unwrap();
    let d = match open(dir.path()) {
        Err(RecoveryError::Damaged(d)) => d,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let repair = matching_engine::journal::repair_truncate::<Bank>(
        dir.path(),
        d.segment_first_seq,
        d.offset,
        0,
    )
    .unwrap();
    assert!(repair.moved_segments.is_empty(), "{repair:?}");
    let r = open(dir.path()).unwrap();
    assert_eq!(r.state.seq(), last_seq, "acknowledged commands were lost");
    assert_eq!(r.state.state_hash(), hash);
}

/// The snapshot header's version is shared by every state machine; one that knows no older
/// payload format (the bank) refuses a snapshot stamped with an older version with an error that
/// names it, and recovery falls back past it.
#[test]
fn an_older_snapshot_version_the_state_cannot_upgrade_is_refused_clearly() {
    use matching_engine::snapshot::{read_snapshot, SNAPSHOT_VERSION};
    let dir = tempfile::tempdir().unwrap();
    let before = run(dir.path(), &workload(60, 0), &[20, 40]);
    let newest = dir.path().join(snapshot_file_name(40));
    let mut bytes = std::fs::read(&newest).unwrap();
    let older = SNAPSHOT_VERSION - 1;
    bytes[8..12].copy_from_slice(&older.to_le_bytes());
    std::fs::write(&newest, &bytes).unwrap();
    let err = read_snapshot::<Bank>(&newest, 40).unwrap_err().to_string();
    assert!(
        err.contains(&format!("format version {older}")) && err.contains("cannot upgrade"),
        "{err}"
    );
    let r = open(dir.path()).unwrap();
    assert_eq!(r.report.snapshot_seq, Some(20));
    assert_eq!(r.state.state_hash(), before);
}

/// After a rollback, a snapshot written by a newer build (a newer format version) is skipped but
/// left as it is: rolling forward again can still use it. (It was renamed `*.corrupt`, as if
/// damaged.)
#[test]
fn a_snapshot_of_a_newer_format_is_skipped_and_kept_for_the_newer_build() {
    use matching_engine::snapshot::SNAPSHOT_VERSION;
    let dir = tempfile::tempdir().unwrap();
    let before = run(dir.path(), &workload(60, 0), &[20, 40]);
    let newest = dir.path().join(snapshot_file_name(40));
    let mut bytes = std::fs::read(&newest).unwrap();
    bytes[8..12].copy_from_slice(&(SNAPSHOT_VERSION + 1).to_le_bytes());
    std::fs::write(&newest, &bytes).unwrap();
    let r = open(dir.path()).unwrap();
    assert_eq!(r.report.snapshot_seq, Some(20));
    assert_eq!(r.state.state_hash(), before);
    drop(r);
    assert_eq!(
        std::fs::read(&newest).unwrap(),
        bytes,
        "the newer build's snapshot is kept as it was"
    );
}
