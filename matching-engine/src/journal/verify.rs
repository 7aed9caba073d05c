//! Classifying a journal's defects, and the operator's explicit repair.
//!
//! [`check_journal`] reads every segment and changes nothing. For the first bad record of a
//! segment it scans the rest of the file, byte by byte, for records that are still intact (a
//! header whose length fits, whose seq is not below the lost one, and whose checksum matches):
//!
//! * in a segment other than the last one, everything was fsynced before the next segment was
//!   started, so any defect is [`SegmentStatus::Damaged`]; likewise a defect before the first
//!   seq of a later segment that is empty (a snapshot's rotation creates segment S+1 only after
//!   every record up to S was synced: an empty segment's name is proof enough);
//! * in the last segment (version 2), an intact record whose group commit started *after* the
//!   lost record proves the lost record's group was fsynced and acknowledged: damaged. Intact
//!   records of the lost record's own group (the last, unacknowledged one: a torn write can leave
//!   its pages in any order) do not: that is a [`SegmentStatus::TornTail`], which recovery cuts;
//! * in a version 1 segment groups are unknown: any intact record after the defect counts as
//!   acknowledged (recovery refuses rather than guess).
//!
//! Known limit: damage inside the last group that *was* acknowledged, with nothing written after
//! it, cannot be told from a torn write, and is cut like one.
//!
//! Segments of at most a header and no record (a rotation that failed part-way, say on a full
//! disk), or a header followed by nothing but preallocated zeros, are [`SegmentStatus::Empty`];
//! recovery removes them, except the one it appends to ([`JournalCheck::last_index`]: the last
//! segment when all are empty, or an empty last segment that starts right after the last
//! record, as a snapshot's rotation at a clean stop leaves it). Zeros after a segment's valid prefix,
//! up to its end, are preallocated space and no defect (see the journal's module docs). So a
//! *synced* tail that the disk itself later turned into zeros cannot be told from preallocated
//! space in the last segment; in an earlier segment the next segment's first seq shows the gap
//! and recovery refuses ([`RecoveryError::Gap`](crate::recovery::RecoveryError::Gap)).

use super::{
    io_err, list_segments, parse_header, record_ok, sync_dir, JournalError, RecordVersion,
    SegmentReader, TailDefect, MAX_PAYLOAD_BYTES, SEGMENT_HEADER_BYTES,
};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Acknowledged records that a bad record hides: recovery refuses to start.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Damage {
    /// The segment.
    pub segment: PathBuf,
    /// The segment's first sequence number (its name).
    pub segment_first_seq: u64,
    /// Where the segment's valid prefix ends: the offset of the first bad record.
    pub offset: u64,
    /// What is wrong there.
    pub defect: TailDefect,
    /// The sequence number the bad record should carry: the first one lost.
    pub first_lost_seq: u64,
    /// The highest sequence number known to be lost with it: the last intact record found after
    /// the damage, or the one before the next segment's first (at least `first_lost_seq`).
    pub last_lost_seq: u64,
    /// Intact records found after the damage in this segment.
    pub intact_after: u64,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "journal segment {} is damaged at offset {} ({:?}): acknowledged records {}..={} \
             would be lost",
            self.segment.display(),
            self.offset,
            self.defect,
            self.first_lost_seq,
            self.last_lost_seq
        )
    }
}

/// What [`check_journal`] found in one segment.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum SegmentStatus {
    /// Every byte belongs to a valid record.
    Clean,
    /// At most a header and no record: left by a rotation that failed part-way.
    Empty,
    /// The last segment ends in bytes of its last, unacknowledged group commit: recovery cuts
    /// them off.
    TornTail {
        /// Why the valid prefix ends.
        defect: TailDefect,
        /// Bytes after the valid prefix.
        dropped_bytes: u64,
    },
    /// Acknowledged records are damaged: recovery refuses.
    Damaged(Damage),
}

/// One segment as [`check_journal`] found it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SegmentCheck {
    /// The file.
    pub path: PathBuf,
    /// Its first sequence number (its name).
    pub first_seq: u64,
    /// Its record format, `None` when the file ends inside its header.
    pub version: Option<RecordVersion>,
    /// Its length.
    pub file_len: u64,
    /// The length of its valid prefix.
    pub valid_len: u64,
    /// Valid records in the prefix.
    pub records: u64,
    /// The last valid record's sequence number.
    pub last_seq: Option<u64>,
    /// The verdict.
    pub status: SegmentStatus,
}

/// What [`check_journal`] found.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct JournalCheck {
    /// Every segment, by first sequence number.
    pub segments: Vec<SegmentCheck>,
}

impl JournalCheck {
    /// The first damage that makes recovery refuse, if any.
    pub fn damage(&self) -> Option<&Damage> {
        self.segments.iter().find_map(|s| match &s.status {
            SegmentStatus::Damaged(d) => Some(d),
            _ => None,
        })
    }

    /// The index of the segment recovery appends to: the last one that is not empty, or the
    /// last one if all are; or an empty last segment that starts right after that one's last
    /// record (what a snapshot's rotation leaves when nothing was appended after it, as at a
    /// clean stop): the journal goes on in it, as it would have.
    pub fn last_index(&self) -> Option<usize> {
        let last = self.segments.len().checked_sub(1)?;
        let Some(written) = self
            .segments
            .iter()
            .rposition(|s| s.status != SegmentStatus::Empty)
        else {
            return Some(last);
        };
        let w = &self.segments[written];
        let continues = written < last
            && self.segments[last].status == SegmentStatus::Empty
            && w.status == SegmentStatus::Clean
            && w.last_seq.map(|l| l + 1) == Some(self.segments[last].first_seq);
        Some(if continues { last } else { written })
    }
}

/// Reads every segment in `dir` and classifies it (see the module docs). Changes nothing. A
/// segment header that is present in full but wrong is an error.
pub fn check_journal(dir: &Path) -> Result<JournalCheck, JournalError> {
    let segments = list_segments(dir)?;
    let mut lens = Vec::with_capacity(segments.len());
    let mut written = Vec::with_capacity(segments.len());
    for (_, path) in &segments {
        let len = std::fs::metadata(path).map_err(io_err(path))?.len();
        lens.push(len);
        written.push(len > SEGMENT_HEADER_BYTES && !zeros_after_header(path)?);
    }
    // Empty segments (a header, then nothing or preallocated zeros) do not count when deciding
    // which segment is the last.
    let last = written.iter().rposition(|&w| w);
    let mut check = JournalCheck::default();
    for (i, ((first_seq, path), &file_len)) in segments.iter().zip(&lens).enumerate() {
        let is_last = last.is_none_or(|l| i >= l);
        let next_first = segments.get(i + 1).map(|(f, _)| *f);
        check.segments.push(check_segment(
            path, *first_seq, file_len, is_last, next_first,
        )?);
    }
    Ok(check)
}

fn check_segment(
    path: &Path,
    first_seq: u64,
    file_len: u64,
    is_last: bool,
    next_first: Option<u64>,
) -> Result<SegmentCheck, JournalError> {
    let mut reader = SegmentReader::open(path, first_seq)?;
    let mut records = 0;
    let mut last_seq = None;
    while let Some(record) = reader.next_record()? {
        records += 1;
        last_seq = Some(record.seq);
    }
    let version = (reader.defect() != Some(TailDefect::ShortHeader)).then(|| reader.version());
    let valid_len = reader.valid_len();
    let status = match reader.defect() {
        _ if records == 0 && (file_len <= SEGMENT_HEADER_BYTES || reader.zero_tail()) => {
            SegmentStatus::Empty
        }
        None => SegmentStatus::Clean,
        Some(defect) => {
            let first_lost_seq = reader.next_seq();
            let after = match version {
                Some(version) => scan_after(path, version, valid_len, file_len, first_lost_seq)?,
                None => Scan::default(),
            };
            let acknowledged = match version {
                _ if !is_last => true,
                // A later segment, even an empty one, starts after this defect: a rotation
                // creates segment S+1 only after every record up to S was synced (and so
                // acknowledged), so what is lost here was acknowledged.
                _ if next_first.is_some_and(|n| first_lost_seq < n) => true,
                Some(RecordVersion::V2) => after.later_group,
                _ => after.intact > 0,
            };
            if acknowledged {
                let last_lost_seq = after
                    .max_seq
                    .into_iter()
                    .chain(next_first.map(|f| f.saturating_sub(1)))
                    .fold(first_lost_seq, u64::max);
                SegmentStatus::Damaged(Damage {
                    segment: path.to_path_buf(),
                    segment_first_seq: first_seq,
                    offset: valid_len,
                    defect,
                    first_lost_seq,
                    last_lost_seq,
                    intact_after: after.intact,
                })
            } else {
                SegmentStatus::TornTail {
                    defect,
                    dropped_bytes: file_len - valid_len,
                }
            }
        }
    };
    Ok(SegmentCheck {
        path: path.to_path_buf(),
        first_seq,
        version,
        file_len,
        valid_len,
        records,
        last_seq,
        status,
    })
}

/// True when every byte after the segment header is zero (a segment that was preallocated and
/// never written to).
fn zeros_after_header(path: &Path) -> Result<bool, JournalError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    file.seek(SeekFrom::Start(SEGMENT_HEADER_BYTES))
        .map_err(io_err(path))?;
    let mut chunk = [0u8; 8 * 1024];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => return Ok(true),
            Ok(n) if chunk[..n].iter().all(|&b| b == 0) => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(path)(e)),
        }
    }
}

/// Intact records found after a defect.
#[derive(Clone, Copy, Default, Debug)]
struct Scan {
    intact: u64,
    max_seq: Option<u64>,
    /// An intact record of a group commit that started after the lost record.
    later_group: bool,
}

/// Scans `path` from `from` (the bad record) to its end for intact records whose seq is at
/// least `first_lost`.
fn scan_after(
    path: &Path,
    version: RecordVersion,
    from: u64,
    file_len: u64,
    first_lost: u64,
) -> Result<Scan, JournalError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    file.seek(SeekFrom::Start(from)).map_err(io_err(path))?;
    let mut bytes = Vec::with_capacity(usize::try_from(file_len - from).unwrap_or(0));
    file.read_to_end(&mut bytes).map_err(io_err(path))?;
    let header_len = version.header_bytes();
    let mut scan = Scan::default();
    // The bad record itself is skipped: whatever it claims is not to be trusted.
    let mut at = 1;
    while at + header_len <= bytes.len() {
        let header = &bytes[at..at + header_len];
        let raw = parse_header(version, header);
        // A record `k` places after the lost one needs at least `k` records of room before it.
        let room = (at / (header_len + 1)) as u64 + 1;
        let plausible = raw.len >= 1
            && raw.len <= MAX_PAYLOAD_BYTES
            && raw.seq >= first_lost
            && raw.seq - first_lost <= room
            && at + header_len + raw.len as usize <= bytes.len();
        if plausible {
            let end = at + header_len + raw.len as usize;
            if record_ok(version, header, &bytes[at + header_len..end]) {
                scan.intact += 1;
                scan.max_seq = scan.max_seq.max(Some(raw.seq));
                scan.later_group |= raw.group.is_some_and(|g| g > first_lost);
                at = end;
                continue;
            }
        }
        at += 1;
    }
    Ok(scan)
}

/// What [`repair_truncate`] did.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Repair {
    /// The damage it cut at.
    pub damage: Damage,
    /// Bytes cut from the damaged segment (copied to the backup first).
    pub cut_bytes: u64,
    /// Later segments moved into the backup directory (none when a snapshot holds every record
    /// cut: recovery replays the later segments from it).
    pub moved_segments: Vec<PathBuf>,
    /// The oldest snapshot at or after the damaged segment's last record that reads as recovery
    /// reads it, if any: it holds every record cut, so nothing acknowledged is lost and the
    /// later segments are kept.
    pub held_by_snapshot: Option<u64>,
    /// Where the cut bytes and moved segments are.
    pub backup_dir: PathBuf,
    /// The line appended to `repair.log`.
    pub log_line: String,
}

/// The operator's repair of a damaged journal: cuts segment `segment_first_seq` at `offset`,
/// which must be exactly where [`check_journal`] reports the damage (so the cut is at a record
/// boundary and the operator has read the report). The cut bytes are copied into
/// `dir/repair-<segment_first_seq>-<offset>/` (which must not exist) before anything is cut; all
/// of it is fsynced; a line is appended to `dir/repair.log`. On any refusal nothing is changed.
///
/// When a snapshot at or after the damaged segment's last record exists (segments rotate at
/// snapshots, so an older segment is normally held by the snapshot taken at its end), it holds
/// every record cut and recovery replays the later segments from it: they are kept, and no
/// acknowledged command is lost. Otherwise the later segments could never be replayed (a gap):
/// they are moved into the backup directory too, and records from `first_lost_seq` on are lost.
///
/// A snapshot counts only if it reads as recovery reads it ([`read_snapshot`] as an `S`: header,
/// format version, SHA-256 of the payload, the state's own checks), never by its file name: the
/// oldest such one holds the cut records. When snapshot files at or after the damage exist and
/// none of them reads, the repair is refused (nothing changed): cutting would lose records the
/// operator was told a snapshot holds. Moving the damaged snapshots out of `dir` is then the
/// operator's explicit choice, after which the repair loses the records and moves the later
/// segments.
///
/// [`read_snapshot`]: crate::snapshot::read_snapshot
pub fn repair_truncate<S: crate::StateMachine>(
    dir: &Path,
    segment_first_seq: u64,
    offset: u64,
    now_unix_secs: u64,
) -> Result<Repair, JournalError> {
    let refuse = |reason: String| JournalError::RepairRefused { reason };
    let check = check_journal(dir)?;
    let Some(damage) = check.damage().cloned() else {
        return Err(refuse(format!(
            "{} has no damage that stops recovery",
            dir.display()
        )));
    };
    if (damage.segment_first_seq, damage.offset) != (segment_first_seq, offset) {
        return Err(refuse(format!(
            "the damage is at {}:{}, not at {segment_first_seq}:{offset}",
            damage.segment_first_seq, damage.offset
        )));
    }
    // Which snapshot holds the records cut, checked before anything changes.
    let held_by_snapshot = match snapshot_holding::<S>(dir, damage.last_lost_seq)? {
        Held::By(seq) => Some(seq),
        Held::Nothing => None,
        Held::Unreadable(bad) => {
            return Err(refuse(format!(
                "records {}..={} would be held by a snapshot, but none at or after {} reads: {}. \
                 Move the damaged snapshot(s) out of {} to repair without them (records {}..={} \
                 are then lost)",
                damage.first_lost_seq,
                damage.last_lost_seq,
                damage.last_lost_seq,
                bad.join("; "),
                dir.display(),
                damage.first_lost_seq,
                damage.last_lost_seq
            )))
        }
    };
    let backup_dir = dir.join(format!("repair-{segment_first_seq}-{offset}"));
    std::fs::create_dir(&backup_dir).map_err(io_err(&backup_dir))?;

    // 1. Copy the bytes to cut.
    let path = &damage.segment;
    let name = path.file_name().expect("a segment has a file name");
    let tail_path = backup_dir.join(format!("{}.from-{offset}", name.to_string_lossy()));
    let mut segment = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    segment
        .seek(SeekFrom::Start(offset))
        .map_err(io_err(path))?;
    let mut tail = Vec::new();
    segment.read_to_end(&mut tail).map_err(io_err(path))?;
    let mut copy = File::create(&tail_path).map_err(io_err(&tail_path))?;
    copy.write_all(&tail)
        .and_then(|()| copy.sync_all())
        .map_err(io_err(&tail_path))?;

    // 2. Move later segments aside, unless a snapshot holds every record cut.
    let mut moved_segments = Vec::new();
    for s in check
        .segments
        .iter()
        .filter(|s| s.first_seq > segment_first_seq && held_by_snapshot.is_none())
    {
        let to = backup_dir.join(s.path.file_name().expect("a segment has a file name"));
        std::fs::rename(&s.path, &to).map_err(io_err(&s.path))?;
        moved_segments.push(to);
    }
    sync_dir(&backup_dir)?;
    sync_dir(dir)?;

    // 3. Cut.
    segment
        .set_len(offset)
        .and_then(|()| segment.sync_all())
        .map_err(io_err(path))?;

    // 4. Log.
    let fate = match held_by_snapshot {
        Some(seq) => format!("held by snapshot {seq}, later segments kept"),
        None => format!("lost, {} later segment(s) moved", moved_segments.len()),
    };
    let log_line = format!(
        "{now_unix_secs} truncated {} at offset {offset} ({:?}): cut {} bytes, records \
         {}..={} {fate}; backup in {}\n",
        path.display(),
        damage.defect,
        tail.len(),
        damage.first_lost_seq,
        damage.last_lost_seq,
        backup_dir.display()
    );
    let log_path = dir.join("repair.log");
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_err(&log_path))?;
    log.write_all(log_line.as_bytes())
        .and_then(|()| log.sync_all())
        .map_err(io_err(&log_path))?;
    sync_dir(dir)?;
    tracing::warn!(
        segment = %path.display(), offset, cut_bytes = tail.len(),
        first_lost_seq = damage.first_lost_seq, last_lost_seq = damage.last_lost_seq,
        backup = %backup_dir.display(), "journal repaired by truncation"
    );
    Ok(Repair {
        damage,
        cut_bytes: tail.len() as u64,
        moved_segments,
        held_by_snapshot,
        backup_dir,
        log_line,
    })
}

/// What holds the records up to a damaged segment's last one.
enum Held {
    /// The oldest snapshot at or after it that reads.
    By(u64),
    /// No snapshot file at or after it.
    Nothing,
    /// Snapshot files at or after it, none of which reads: each with its error.
    Unreadable(Vec<String>),
}

/// The oldest snapshot in `dir` at or after `seq` that [`read_snapshot`] restores as an `S`,
/// exactly as recovery would (the file name alone proves nothing).
///
/// [`read_snapshot`]: crate::snapshot::read_snapshot
fn snapshot_holding<S: crate::StateMachine>(dir: &Path, seq: u64) -> Result<Held, JournalError> {
    let snapshots = crate::snapshot::list_snapshots(dir).map_err(|e| match e {
        crate::snapshot::SnapshotError::Io { path, source } => JournalError::Io { path, source },
        other => JournalError::RepairRefused {
            reason: other.to_string(),
        },
    })?;
    let mut bad = Vec::new();
    for (s, path) in snapshots.into_iter().filter(|(s, _)| *s >= seq) {
        match crate::snapshot::read_snapshot::<S>(&path, s) {
            Ok(_) => return Ok(Held::By(s)),
            Err(e) => bad.push(e.to_string()),
        }
    }
    Ok(if bad.is_empty() {
        Held::Nothing
    } else {
        Held::Unreadable(bad)
    })
}
