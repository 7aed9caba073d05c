//! The durable store of one state machine: a directory of journal segments and snapshots, and
//! recovery from it.
//!
//! ```text
//! <dir>/snapshot-<seq>.bin   full state at seq (see crate::snapshot)
//! <dir>/journal-<first>.log  records first, first+1, ... (see crate::journal)
//! ```
//!
//! Recovery ([`Store::open`]):
//! 1. check the journal ([`check_journal`], read-only): if a bad record hides acknowledged
//!    records ([`Damage`]: any defect in a segment other than the last, or one followed by a
//!    later group commit in the last), refuse with [`RecoveryError::Damaged`] **before anything
//!    on disk is changed**; the operator uses `mediator journal verify` and `repair`;
//! 2. load the newest snapshot that passes its checks, including the state machine's own
//!    invariants ([`StateMachine::restore`]); a snapshot that fails them is renamed to
//!    `*.corrupt` (kept for inspection) and the next older one is tried; with none, start from
//!    the caller's genesis state. A snapshot after which the journal has a hole (left by
//!    `journal repair` cutting records a newer snapshot holds) is passed over while another
//!    start can replay to the end;
//! 3. replay every journal record with a sequence number above the state's through
//!    [`StateMachine::apply`] with its journaled time. A record that is rejected on replay, or
//!    that does not move [`StateMachine::seq`] to its own number, is a divergence: an error, never
//!    skipped;
//! 4. cut the last segment's torn tail (bytes of its last, unacknowledged group commit), remove
//!    empty segments left by a rotation that failed part-way, and fsync the tail that is kept
//!    (a crashed process may have left it in the page cache only); a last segment in the old
//!    record format (version 1) is not appended to: a new segment starts;
//! 5. the store is then ready to append the next sequence number.
//!
//! Pruning: after each snapshot the journal moves to a new segment, then every snapshot but the
//! newest [`StoreConfig::snapshots_kept`] and every segment whose records all precede the oldest
//! kept snapshot are deleted, so recovery can always fall back one snapshot.
//!
//! **Replay from a floor** ([`Store::open_from`]): a consumer of the events that persists them
//! on its own (the API's SQLite history) may be behind the journal after a crash. It names the
//! last sequence number it committed, the *floor*; recovery then starts from the newest snapshot
//! at or below the floor (or genesis), shows the consumer the state at the floor, and hands it
//! the events of every command above the floor as the replay produces them (the same events as
//! when the commands first ran: the state machine is deterministic). So that the floor stays
//! reachable, the consumer tells the store its committed floor ([`Store::retain_from`]) and
//! pruning keeps the newest snapshot at or below it, everything newer, and the journal after it
//! (the journal from the first record when no snapshot is that old). A floor older than anything
//! kept (files from before the floor was kept, or damage) is not reachable: recovery says so
//! ([`RecoveryReport::floor`] is `None`) and restores from the newest snapshot as `open` does.

use crate::journal::{
    check_journal, list_segments, sync_dir, Damage, JournalCheck, JournalError, JournalWriter,
    RecordVersion, SegmentReader, SegmentStatus, TailDefect,
};
use crate::snapshot::{
    list_snapshot_leftovers, list_snapshots, read_snapshot, write_snapshot, SnapshotError,
};
use crate::units::Timestamp;
use crate::{RejectCode, StateMachine};
use std::io;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How a [`Store`] takes and keeps snapshots.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct StoreConfig {
    /// Take a snapshot every this many accepted commands (checked after each group commit);
    /// zero: only on request.
    pub snapshot_every: u64,
    /// How many snapshots to keep, at least 2 so recovery can fall back one.
    pub snapshots_kept: usize,
    /// Keep zero-filled space synced ahead of the journal's records, so that a group commit's
    /// `fdatasync` does not change the file's length (see [`JournalWriter::preallocate`]).
    /// On by default; tests that cut journal files at byte offsets turn it off.
    pub preallocate: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            snapshot_every: 100_000,
            snapshots_kept: 2,
            preallocate: true,
        }
    }
}

/// An error of recovery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoveryError {
    /// An I/O operation on the store's directory failed.
    #[error("store i/o on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Reading or repairing the journal failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Reading a snapshot failed for a reason other than its content.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A journaled command was rejected on replay: the state machine is not deterministic, or
    /// the journal does not belong to this state.
    #[error("replay diverged: journaled command {seq} was rejected with {code}")]
    Divergence {
        /// The command's sequence number.
        seq: u64,
        /// What it was rejected with.
        code: RejectCode,
    },
    /// A replayed command was accepted but the state's sequence number is not the record's.
    #[error("replay diverged: record {seq} left the state at sequence number {state_seq}")]
    SeqMismatch {
        /// The record's sequence number.
        seq: u64,
        /// The state's after applying it.
        state_seq: u64,
    },
    /// The journal misses records the state needs.
    #[error(
        "journal gap: the state needs record {expected} but the next segment starts at {found}"
    )]
    Gap {
        /// The next sequence number the state needs.
        expected: u64,
        /// The first sequence number of the next segment.
        found: u64,
    },
    /// A bad record hides acknowledged records (see [`crate::journal`]). Nothing was changed.
    #[error(
        "{0}; nothing was changed. Inspect with `mediator journal verify`; an operator may cut \
         the journal there with `mediator journal repair`"
    )]
    Damaged(Damage),
}

/// An error while taking a snapshot.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Syncing the journal or starting its next segment failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Writing the snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Deleting an old file failed.
    #[error("cannot prune {path}: {source}")]
    Prune {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// The cut-off tail of the last journal segment.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TruncatedTail {
    /// The segment.
    pub segment: PathBuf,
    /// Its length after the cut.
    pub valid_len: u64,
    /// Bytes cut off.
    pub dropped_bytes: u64,
    /// Why the valid prefix ended there.
    pub defect: TailDefect,
}

/// What recovery found.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct RecoveryReport {
    /// The sequence number of the snapshot the state was restored from, `None` for genesis.
    pub snapshot_seq: Option<u64>,
    /// Journal records applied on top of it.
    pub replayed: u64,
    /// The journal tail that was cut off, if any.
    pub truncated: Option<TruncatedTail>,
    /// Snapshots that failed their checks, renamed to `*.corrupt`.
    pub corrupt_snapshots: Vec<PathBuf>,
    /// Empty segments (left by a rotation that failed part-way) that were removed.
    pub removed_segments: Vec<PathBuf>,
    /// The time of the last journaled command, if the journal has any.
    pub last_time: Option<Timestamp>,
    /// [`Store::open_from`]: the floor the replay passed through (the visitor was shown the state
    /// there and the events of every command after it); `None` when no floor was asked for or it
    /// was not reachable.
    pub floor: Option<u64>,
}

/// What [`Store::open_from`] shows its visitor during recovery.
pub enum Replayed<'a, S: StateMachine> {
    /// The state at the floor (`seq()` equals it), before any command above it. Shown at most
    /// once, and only when the floor is reachable.
    Floor(&'a S),
    /// A journaled command above the floor was replayed.
    Command {
        /// Its sequence number.
        seq: u64,
        /// Its journaled time.
        time: Timestamp,
        /// The events the replay produced: the events it produced when it first ran.
        events: &'a [S::Event],
    },
}

impl<S: StateMachine> std::fmt::Debug for Replayed<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Replayed::Floor(state) => f.debug_tuple("Floor").field(&state.seq()).finish(),
            Replayed::Command { seq, time, events } => f
                .debug_struct("Command")
                .field("seq", seq)
                .field("time", time)
                .field("events", &events.len())
                .finish(),
        }
    }
}

/// A recovered state, ready to go on.
#[derive(Debug)]
pub struct Recovered<S: StateMachine> {
    /// The state after the snapshot and the journal.
    pub state: S,
    /// The store, ready to append record `state.seq() + 1`.
    pub store: Store<S>,
    /// What recovery found.
    pub report: RecoveryReport,
}

/// A directory holding the journal and snapshots of one state machine `S`.
///
/// Durability contract: [`append`](Self::append) buffers; commands are durable once
/// [`sync`](Self::sync) returns `Ok` (see [`JournalWriter`]). [`snapshot`](Self::snapshot) syncs
/// the journal first, so a snapshot is never ahead of the journal.
#[derive(Debug)]
pub struct Store<S: StateMachine> {
    dir: PathBuf,
    config: StoreConfig,
    journal: JournalWriter,
    last_snapshot_seq: u64,
    /// The floor pruning keeps replayable (see [`Store::retain_from`]).
    retain_floor: Option<Arc<AtomicU64>>,
    _state: PhantomData<fn() -> S>,
}

/// Shows `visit` the state when it reaches the floor still to reach, once.
fn reach_floor<S: StateMachine>(
    floor: &mut Option<u64>,
    state: &S,
    visit: &mut dyn FnMut(Replayed<'_, S>),
    report: &mut RecoveryReport,
) {
    if *floor == Some(state.seq()) {
        visit(Replayed::Floor(state));
        report.floor = floor.take();
    }
}

impl<S: StateMachine> Store<S> {
    /// Recovers the state from `dir` (created if missing), starting from `genesis()` when no valid
    /// snapshot exists, as described in the [module docs](self).
    pub fn open(
        dir: &Path,
        config: StoreConfig,
        genesis: impl FnOnce() -> S,
    ) -> Result<Recovered<S>, RecoveryError> {
        Self::recover(dir, config, genesis, None, &mut |_| {})
    }

    /// Recovers like [`open`](Self::open), but from the newest snapshot at or below `floor` (or
    /// genesis), and shows `visit` the state at `floor` and then every command replayed above it
    /// with its events (see the [module docs](self)). When the floor is not reachable (older than
    /// the kept files, or beyond the journal's end), `visit` is shown no command, the state is
    /// `open`'s, and [`RecoveryReport::floor`] is `None`; a floor equal to the journal's end shows
    /// `visit` the final state and no command.
    pub fn open_from(
        dir: &Path,
        config: StoreConfig,
        genesis: impl FnOnce() -> S,
        floor: u64,
        mut visit: impl FnMut(Replayed<'_, S>),
    ) -> Result<Recovered<S>, RecoveryError> {
        Self::recover(dir, config, genesis, Some(floor), &mut visit)
    }

    fn recover(
        dir: &Path,
        config: StoreConfig,
        genesis: impl FnOnce() -> S,
        floor: Option<u64>,
        visit: &mut dyn FnMut(Replayed<'_, S>),
    ) -> Result<Recovered<S>, RecoveryError> {
        assert!(config.snapshots_kept >= 2, "keep at least two snapshots");
        std::fs::create_dir_all(dir).map_err(|source| RecoveryError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        // 1. Read-only: refuse before changing anything when acknowledged records are damaged.
        let check = check_journal(dir)?;
        if let Some(damage) = check.damage() {
            tracing::error!(%damage, "refusing to recover a damaged journal");
            return Err(RecoveryError::Damaged(damage.clone()));
        }

        // 2. The newest snapshot that passes its checks (renamed later, once replay succeeded).
        let mut report = RecoveryReport::default();
        let mut restored = None;
        let mut corrupt = Vec::new();
        let mut snapshots = list_snapshots(dir)?;
        if let Some(floor) = floor {
            // Newest first: the snapshots at or below the floor; then, unless the journal still
            // starts at its first record (genesis reaches the floor), the newer ones.
            let from_genesis = list_segments(dir)?
                .first()
                .is_none_or(|(first, _)| *first == 1);
            let below = snapshots.iter().filter(|(seq, _)| *seq <= floor).count();
            let above = snapshots.split_off(below);
            if !(from_genesis && contiguous_from(&check, 0)) {
                snapshots = above.into_iter().chain(snapshots).collect();
            }
        }
        // A snapshot the journal cannot be replayed from to its end (a hole after it, left by
        // `journal repair` cutting records a newer snapshot holds) is passed over when another
        // start can: a newer snapshot is tried, and a floor below it is out of reach. When none
        // can, the replay reports the gap.
        let holes_matter = contiguous_from(&check, 0)
            || snapshots
                .iter()
                .any(|(seq, _)| contiguous_from(&check, *seq));
        for (seq, path) in snapshots.into_iter().rev() {
            if holes_matter && !contiguous_from(&check, seq) {
                tracing::warn!(
                    path = %path.display(),
                    "the journal after this snapshot has a hole; trying another"
                );
                continue;
            }
            match read_snapshot::<S>(&path, seq) {
                Ok(state) => {
                    report.snapshot_seq = Some(seq);
                    restored = Some(state);
                    break;
                }
                Err(SnapshotError::Invalid { reason, .. }) => {
                    tracing::warn!(path = %path.display(), reason, "skipping corrupt snapshot");
                    corrupt.push(path);
                }
                Err(SnapshotError::Inconsistent { reason, .. }) => {
                    tracing::warn!(path = %path.display(), reason, "skipping inconsistent snapshot");
                    corrupt.push(path);
                }
                // Not damaged: written by a newer build (a rollback) or a format this build no
                // longer upgrades. Skipped but kept as it is, so the build that wrote it can
                // still use it after rolling forward again.
                Err(e @ SnapshotError::Version { .. }) => {
                    tracing::warn!(error = %e, "skipping a snapshot this build cannot read");
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut state = restored.unwrap_or_else(genesis);
        let snapshot_seq = state.seq();
        // From here on `floor` is the floor still to reach (shown to `visit` when reached).
        let mut floor = match floor {
            Some(f) if f < snapshot_seq => {
                tracing::error!(
                    floor = f,
                    snapshot_seq,
                    "the replay floor is older than every kept snapshot and the journal: the \
                     events after it cannot be regenerated"
                );
                None
            }
            other => other,
        };
        reach_floor(&mut floor, &state, visit, &mut report);

        // 3. Replay.
        let last_index = check.last_index();
        let mut last = None;
        let mut events = Vec::new();
        for (i, segment) in check.segments.iter().enumerate() {
            let (first_seq, path) = (segment.first_seq, &segment.path);
            if segment.status == SegmentStatus::Empty && Some(i) != last_index {
                continue;
            }
            if first_seq > state.seq() + 1 {
                return Err(RecoveryError::Gap {
                    expected: state.seq() + 1,
                    found: first_seq,
                });
            }
            let mut reader = SegmentReader::open(path, first_seq)?;
            while let Some(record) = reader.next_record()? {
                if record.seq <= state.seq() {
                    report.last_time = Some(reader.decode_time()?);
                    continue;
                }
                debug_assert_eq!(record.seq, state.seq() + 1);
                let (time, cmd) = reader.decode::<S::Command>()?;
                events.clear();
                // Every journaled command changed the state when it ran (see `StateMachine`), so
                // it must again; it may still have been rejected after time-driven changes.
                let result = state.apply(&cmd, time, &mut events);
                if let (Err(code), true) = (result, state.seq() != record.seq) {
                    return Err(RecoveryError::Divergence {
                        seq: record.seq,
                        code,
                    });
                }
                if state.seq() != record.seq {
                    return Err(RecoveryError::SeqMismatch {
                        seq: record.seq,
                        state_seq: state.seq(),
                    });
                }
                report.replayed += 1;
                report.last_time = Some(time);
                if report.floor.is_some() {
                    visit(Replayed::Command {
                        seq: record.seq,
                        time,
                        events: &events,
                    });
                }
                reach_floor(&mut floor, &state, visit, &mut report);
            }
            debug_assert_eq!(reader.valid_len(), segment.valid_len);
            if let SegmentStatus::TornTail {
                defect,
                dropped_bytes,
            } = segment.status
            {
                report.truncated = Some(TruncatedTail {
                    segment: path.clone(),
                    valid_len: segment.valid_len,
                    dropped_bytes,
                    defect,
                });
            }
            if Some(i) == last_index {
                last = Some((segment.clone(), reader.next_seq()));
            }
        }

        // 4. Changes on disk: set corrupt snapshots aside, remove empty segments, cut the tail.
        for path in corrupt {
            let mut renamed = path.clone().into_os_string();
            renamed.push(".corrupt");
            std::fs::rename(&path, &renamed).map_err(|source| RecoveryError::Io {
                path: path.clone(),
                source,
            })?;
            report.corrupt_snapshots.push(PathBuf::from(renamed));
        }
        for (i, segment) in check.segments.iter().enumerate() {
            if segment.status == SegmentStatus::Empty && Some(i) != last_index {
                tracing::warn!(path = %segment.path.display(), "removing an empty journal segment");
                std::fs::remove_file(&segment.path).map_err(|source| RecoveryError::Io {
                    path: segment.path.clone(),
                    source,
                })?;
                report.removed_segments.push(segment.path.clone());
            }
        }
        if !report.removed_segments.is_empty() {
            sync_dir(dir)?;
        }
        let mut journal = None;
        if let Some((segment, next_seq)) = last {
            let (path, first_seq, valid_len) =
                (&segment.path, segment.first_seq, segment.valid_len);
            if let Some(tail) = &report.truncated {
                tracing::warn!(
                    path = %path.display(), valid_len, dropped_bytes = tail.dropped_bytes,
                    defect = ?tail.defect, "cutting off the journal's torn tail"
                );
            }
            let appendable = segment.version != Some(RecordVersion::V1);
            journal = Some(if next_seq == state.seq() + 1 && appendable {
                JournalWriter::open_at(path, first_seq, valid_len, next_seq)?
            } else {
                // The journal ends before the snapshot (it can only have lost synced records to
                // outside damage), or the segment has the old record format: keep its valid
                // records, start a new segment after the state.
                if next_seq != state.seq() + 1 {
                    tracing::warn!(path = %path.display(), next_seq, snapshot_seq, "journal ends before the snapshot");
                }
                if next_seq == first_seq {
                    std::fs::remove_file(path).map_err(|source| RecoveryError::Io {
                        path: path.clone(),
                        source,
                    })?;
                } else if segment.version == Some(RecordVersion::V1) {
                    cut_v1(path, valid_len)?;
                } else {
                    drop(JournalWriter::open_at(
                        path, first_seq, valid_len, next_seq,
                    )?);
                }
                JournalWriter::create(dir, state.seq() + 1)?
            });
        }
        if let Some(f) = floor {
            tracing::error!(
                floor = f,
                seq = state.seq(),
                "the replay floor is beyond the journal's end"
            );
        }
        let mut journal = match journal {
            Some(journal) => journal,
            None => JournalWriter::create(dir, state.seq() + 1)?,
        };
        if config.preallocate {
            journal.preallocate()?;
        }
        assert_eq!(journal.next_seq(), state.seq() + 1);
        let store = Store {
            dir: dir.to_path_buf(),
            config,
            journal,
            last_snapshot_seq: snapshot_seq,
            retain_floor: None,
            _state: PhantomData,
        };
        Ok(Recovered {
            state,
            store,
            report,
        })
    }

    /// From now on pruning keeps the state at `floor` reachable by [`open_from`](Self::open_from):
    /// the newest snapshot at or below the value `floor` holds when a snapshot is taken, every
    /// newer one, and the journal after it (from the first record when no snapshot is that
    /// old). Whoever persists the events stores its committed sequence number there after each
    /// commit. While it does not advance, nothing older than it is deleted.
    pub fn retain_from(&mut self, floor: Arc<AtomicU64>) {
        self.retain_floor = Some(floor);
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The store's configuration.
    pub fn config(&self) -> StoreConfig {
        self.config
    }

    /// The sequence number of the last snapshot taken or recovered from (0: none).
    pub fn last_snapshot_seq(&self) -> u64 {
        self.last_snapshot_seq
    }

    /// The sequence number the next appended command must carry.
    pub fn next_seq(&self) -> u64 {
        self.journal.next_seq()
    }

    /// Buffers accepted command `seq` with its time. Not durable until [`sync`](Self::sync).
    pub fn append(
        &mut self,
        seq: u64,
        now: Timestamp,
        cmd: &S::Command,
    ) -> Result<(), JournalError> {
        self.journal.append(seq, now, cmd)
    }

    /// Makes every appended command durable (write + `fdatasync`).
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.journal.sync()
    }

    /// True when [`StoreConfig::snapshot_every`] commands were accepted since the last snapshot.
    pub fn snapshot_due(&self, seq: u64) -> bool {
        self.config.snapshot_every > 0
            && seq
                >= self
                    .last_snapshot_seq
                    .saturating_add(self.config.snapshot_every)
    }

    /// Syncs the journal, writes a durable snapshot of `state` (whose last command must be the
    /// last appended), starts a new journal segment and prunes old files. On error the store
    /// stays usable: the journal is intact.
    pub fn snapshot(&mut self, state: &S) -> Result<PathBuf, StoreError> {
        self.journal.sync()?;
        assert_eq!(
            self.journal.next_seq(),
            state.seq() + 1,
            "a snapshot must be of the journaled state"
        );
        let path = write_snapshot(&self.dir, state)?;
        self.last_snapshot_seq = state.seq();
        if !self.journal.is_empty() {
            // The old segment ends with its last record (no preallocated zeros): what an older
            // build expects of every segment but the last, and 16 MiB less kept per segment.
            self.journal.trim()?;
            let mut journal = JournalWriter::create(&self.dir, state.seq() + 1)?;
            if self.config.preallocate {
                journal.preallocate()?;
            }
            self.journal = journal;
        }
        self.prune()?;
        Ok(path)
    }

    /// Test seam: see [`JournalWriter::inject_sync_failure`].
    #[doc(hidden)]
    pub fn inject_sync_failure(&mut self, after: u64) {
        self.journal.inject_sync_failure(after);
    }

    fn prune(&mut self) -> Result<(), StoreError> {
        let snapshots = list_snapshots(&self.dir)?;
        // Half-written snapshots no newer than the newest complete one: their writer (this
        // store, the only one) stopped before the rename and will never finish them.
        if let Some(&(newest, _)) = snapshots.last() {
            let mut removed = false;
            for (seq, path) in list_snapshot_leftovers(&self.dir)? {
                if seq <= newest {
                    std::fs::remove_file(&path).map_err(|source| StoreError::Prune {
                        path: path.clone(),
                        source,
                    })?;
                    removed = true;
                }
            }
            if removed {
                sync_dir(&self.dir)?;
            }
        }
        let Some(mut keep_from) = snapshots.len().checked_sub(self.config.snapshots_kept) else {
            return Ok(());
        };
        if let Some(floor) = &self.retain_floor {
            let floor = floor.load(Ordering::Acquire);
            match snapshots.iter().rposition(|(seq, _)| *seq <= floor) {
                Some(at_floor) => keep_from = keep_from.min(at_floor),
                // Only genesis reaches the floor: keep everything.
                None => return Ok(()),
            }
        }
        let oldest_kept = snapshots[keep_from].0;
        let remove = |path: &Path| {
            std::fs::remove_file(path).map_err(|source| StoreError::Prune {
                path: path.to_path_buf(),
                source,
            })
        };
        for (_, path) in &snapshots[..keep_from] {
            remove(path)?;
        }
        let segments = list_segments(&self.dir)?;
        for pair in segments.windows(2) {
            let ((_, path), (next_first, _)) = (&pair[0], &pair[1]);
            if *next_first <= oldest_kept + 1 && path.as_path() != self.journal.path() {
                remove(path)?;
            }
        }
        sync_dir(&self.dir)?;
        Ok(())
    }
}

/// Cuts a version 1 segment after its valid prefix and makes it durable (it is not appended to).
fn cut_v1(path: &Path, valid_len: u64) -> Result<(), RecoveryError> {
    let io = |source| RecoveryError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io)?;
    file.set_len(valid_len).map_err(io)?;
    file.sync_all().map_err(io)
}

/// True when the journal's records go on without a hole from `seq + 1` to its end, so a state at
/// `seq` can be brought to the end by replay.
fn contiguous_from(check: &JournalCheck, seq: u64) -> bool {
    let mut next = seq + 1;
    for segment in &check.segments {
        let Some(last) = segment.last_seq else {
            continue;
        };
        if last < next {
            continue;
        }
        if segment.first_seq > next {
            return false;
        }
        next = last + 1;
    }
    true
}
