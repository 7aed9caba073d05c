//! Replay from a floor: pruning keeps the state at the floor a consumer of the events committed
//! ([`Store::retain_from`]), and [`Store::open_from`] shows the consumer that state and the events
//! of every command after it, the same events as when the commands first ran.

use crate::bank::{workload, Bank, BankEvent};
use matching_engine::journal::list_segments;
use matching_engine::recovery::{Recovered, Replayed, Store, StoreConfig};
use matching_engine::snapshot::list_snapshots;
use matching_engine::{StateMachine, Timestamp};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const CONFIG: StoreConfig = StoreConfig {
    snapshot_every: 0,
    snapshots_kept: 2,
    preallocate: true,
};

/// One replayed command: sequence number, time, events.
type Step = (u64, Timestamp, Vec<BankEvent>);

/// Applies 80 commands of the bank's workload, journals the accepted ones, and takes a snapshot
/// after each sequence number in `snapshot_at`; pruning keeps `floor` reachable when one is
/// given. Returns the final hash and every accepted command with the events it produced.
fn run(dir: &Path, snapshot_at: &[u64], floor: Option<Arc<AtomicU64>>) -> ([u8; 32], Vec<Step>) {
    let Recovered {
        mut state,
        mut store,
        ..
    } = Store::open(dir, CONFIG, || Bank::new(4, 1)).unwrap();
    if let Some(floor) = floor {
        store.retain_from(floor);
    }
    let mut steps = Vec::new();
    for (i, cmd) in workload(80, 0).iter().enumerate() {
        let now = Timestamp(10 * i as u64 + 7);
        let mut events = Vec::new();
        if state.apply(cmd, now, &mut events).is_ok() {
            store.append(state.seq(), now, cmd).unwrap();
            store.sync().unwrap();
            steps.push((state.seq(), now, events));
            if snapshot_at.contains(&state.seq()) {
                store.snapshot(&state).unwrap();
            }
        }
    }
    (state.state_hash(), steps)
}

/// Recovers from `floor`: the recovered state, the state's hash at the floor (if shown) and the
/// commands shown after it.
fn open_from(dir: &Path, floor: u64) -> (Recovered<Bank>, Option<[u8; 32]>, Vec<Step>) {
    let (mut at_floor, mut steps) = (None, Vec::new());
    let r = Store::open_from(
        dir,
        CONFIG,
        || Bank::new(4, 1),
        floor,
        |step| match step {
            Replayed::Floor(state) => {
                assert_eq!(state.seq(), floor);
                assert!(
                    at_floor.is_none() && steps.is_empty(),
                    "the floor comes first, once"
                );
                at_floor = Some(state.state_hash());
            }
            Replayed::Command { seq, time, events } => {
                assert!(at_floor.is_some(), "commands only after the floor");
                steps.push((seq, time, events.to_vec()));
            }
        },
    )
    .unwrap();
    (r, at_floor, steps)
}

fn snapshot_seqs(dir: &Path) -> Vec<u64> {
    list_snapshots(dir)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

fn segment_firsts(dir: &Path) -> Vec<u64> {
    list_segments(dir)
        .unwrap()
        .into_iter()
        .map(|(f, _)| f)
        .collect()
}

/// The hash of the bank after the first `seq` accepted commands.
fn hash_at(seq: u64) -> [u8; 32] {
    let dir = tempfile::tempdir().unwrap();
    let (_, steps) = run(dir.path(), &[], None);
    let mut state = Bank::new(4, 1);
    let cmds = workload(80, 0);
    let mut i = 0;
    while state.seq() < seq {
        let mut events = Vec::new();
        let _ = state.apply(&cmds[i], Timestamp(10 * i as u64 + 7), &mut events);
        i += 1;
    }
    assert!(steps.iter().any(|(s, ..)| *s == seq));
    state.state_hash()
}

#[test]
fn pruning_keeps_the_snapshot_and_journal_at_the_floor() {
    let dir = tempfile::tempdir().unwrap();
    let floor = Arc::new(AtomicU64::new(15));
    let (hash, steps) = run(dir.path(), &[10, 20, 30, 40], Some(floor.clone()));
    // Without a floor only 30 and 40 would be left (see `snapshots_rotate_and_prune_the_journal`).
    assert_eq!(snapshot_seqs(dir.path()), vec![10, 20, 30, 40]);
    assert_eq!(segment_firsts(dir.path()), vec![11, 21, 31, 41]);

    let (r, at_floor, shown) = open_from(dir.path(), 15);
    assert_eq!(r.report.snapshot_seq, Some(10));
    assert_eq!(r.report.floor, Some(15));
    assert_eq!(at_floor, Some(hash_at(15)));
    let expected: Vec<Step> = steps.iter().filter(|(s, ..)| *s > 15).cloned().collect();
    assert!(!expected.is_empty());
    assert_eq!(
        shown, expected,
        "the events of every command after the floor, as first run"
    );
    assert_eq!(r.state.state_hash(), hash);

    // The floor advances: the next snapshot prunes what it no longer needs.
    drop(r);
    floor.store(35, Ordering::Release);
    let Recovered {
        state, mut store, ..
    } = Store::open(dir.path(), CONFIG, || Bank::new(4, 1)).unwrap();
    store.retain_from(floor);
    store.snapshot(&state).unwrap();
    let last = state.seq();
    assert_eq!(snapshot_seqs(dir.path()), vec![30, 40, last]);
    assert_eq!(segment_firsts(dir.path())[0], 31);
    let (r, at_floor, shown) = open_from(dir.path(), 35);
    assert_eq!(
        (r.report.snapshot_seq, r.report.floor),
        (Some(30), Some(35))
    );
    assert_eq!(at_floor, Some(hash_at(35)));
    assert_eq!(shown.len() as u64, last - 35);
}

#[test]
fn a_floor_older_than_every_snapshot_keeps_the_journal_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let floor = Arc::new(AtomicU64::new(5));
    let (hash, steps) = run(dir.path(), &[10, 20, 30], Some(floor));
    assert_eq!(snapshot_seqs(dir.path()), vec![10, 20, 30]);
    assert_eq!(segment_firsts(dir.path())[0], 1);
    let (r, at_floor, shown) = open_from(dir.path(), 5);
    assert_eq!((r.report.snapshot_seq, r.report.floor), (None, Some(5)));
    assert_eq!(at_floor, Some(hash_at(5)));
    assert_eq!(shown, steps[5..].to_vec());
    assert_eq!(r.state.state_hash(), hash);
}

#[test]
fn a_floor_out_of_reach_recovers_as_open_and_shows_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Pruned without a floor: only 30 and 40 and the journal after 30 are left.
    let (hash, steps) = run(dir.path(), &[10, 20, 30, 40], None);
    assert_eq!(snapshot_seqs(dir.path()), vec![30, 40]);
    let (r, at_floor, shown) = open_from(dir.path(), 15);
    assert_eq!((r.report.snapshot_seq, r.report.floor), (Some(40), None));
    assert_eq!((at_floor, shown.len()), (None, 0));
    assert_eq!(r.state.state_hash(), hash);
    drop(r);

    // Beyond the journal's end: not reachable either.
    let end = steps.last().unwrap().0;
    let (r, at_floor, _) = open_from(dir.path(), end + 1);
    assert_eq!((r.report.floor, at_floor), (None, None));
    assert_eq!(r.state.state_hash(), hash);
    drop(r);

    // At the journal's end: the final state, and no command.
    let (r, at_floor, shown) = open_from(dir.path(), end);
    assert_eq!((r.report.floor, at_floor), (Some(end), Some(hash)));
    assert!(shown.is_empty());
}

/// Found by the crash simulation (`merchant/tests/crash_sim.rs`, a history behind the journal when a
/// middle record was damaged): after `journal repair` cut a segment that a newer snapshot holds,
/// the journal has a hole before that snapshot. A floor inside the hole is out of reach:
/// recovery starts from the snapshot that holds the cut records and says the floor is out of
/// reach (the consumer reports its gap), where it used to replay from the snapshot below the
/// floor into the hole and refuse to start ("journal gap").
#[test]
fn a_floor_behind_a_repaired_hole_recovers_from_the_snapshot_that_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let (hash, _) = run(dir.path(), &[20, 40], Some(Arc::new(AtomicU64::new(0))));
    assert_eq!(segment_firsts(dir.path()), vec![1, 21, 41]);
    let seg = dir
        .path()
        .join(matching_engine::journal::segment_file_name(21));
    let mut reader = matching_engine::journal::SegmentReader::open(&seg, 21).unwrap();
    let mut offsets = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        offsets.push(r.offset);
    }
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[offsets[5] as usize + 30] ^= 0x08; // record 26
    std::fs::write(&seg, &bytes).unwrap();
    let d = matching_engine::journal::check_journal(dir.path())
        .unwrap()
        .damage()
        .cloned()
        .unwrap();
    let repair =
        matching_engine::journal::repair_truncate::<Bank>(dir.path(), 21, d.offset, 0).unwrap();
    assert_eq!(repair.held_by_snapshot, Some(40));

    let (r, at_floor, shown) = open_from(dir.path(), 23);
    assert_eq!((r.report.snapshot_seq, r.report.floor), (Some(40), None));
    assert_eq!((at_floor, shown.len()), (None, 0));
    assert_eq!(r.state.state_hash(), hash, "nothing acknowledged is lost");
    drop(r);
    // A floor below the hole is still reached from the snapshot under it.
    let (r, at_floor, _) = open_from(dir.path(), 22);
    assert_eq!(
        r.report.floor, None,
        "22..=25 replay, 26..=40 are cut: out of reach"
    );
    assert_eq!(at_floor, None);
    assert_eq!(r.state.state_hash(), hash);
}
