//! The journal: an append-only log of every accepted command, in sequence order.
//!
//! # File layout
//!
//! The journal is a series of *segment* files named `journal-<first_seq>.log` (`first_seq` padded
//! to 20 decimal digits so that names sort like numbers). A new segment starts after each snapshot
//! (see [`crate::recovery::Store::snapshot`]), so whole old segments can be deleted.
//!
//! Every segment starts with a 16-byte header, then records back to back. All integers are
//! little-endian. The header's magic names the record format: `MEDJRNL2` (written by this code)
//! or `MEDJRNL1` (written before group commits were recorded; still read, never appended to).
//!
//! ```text
//! segment header (16 bytes)
//!   0..8    magic       b"MEDJRNL2" (or b"MEDJRNL1")
//!   8..16   first_seq   u64, the sequence number of the segment's first record
//!
//! record, version 2 (24 + len bytes)
//!   0..4    len         u32, payload length in bytes, 1..=MAX_PAYLOAD_BYTES
//!   4..12   seq         u64, the command's sequence number (StateMachine::seq after it)
//!   12..20  group       u64, the seq of the first record of this record's group commit
//!   20..24  crc         u32, CRC-32 (IEEE) of bytes 0..20 followed by the payload
//!   24..    payload     postcard encoding of (Timestamp, S::Command)
//!
//! record, version 1 (16 + len bytes)
//!   0..4 len, 4..12 seq, 12..16 crc of bytes 0..12 and the payload, 16.. payload
//! ```
//!
//! The checksum covers the header fields as well as the payload, so a damaged length is caught
//! even when it still points inside the file.
//!
//! # Preallocation
//!
//! A writer may be asked to *preallocate* ([`JournalWriter::preallocate`]): it then keeps zero
//! bytes written and synced ahead of its records, and writes each group commit over them. A file
//! whose length does not change needs no metadata in its `fdatasync` (on ext4, no journal
//! commit of the file system): on this project's test VM that made each group commit's
//! `fdatasync` about 3x faster and halved its CPU time (PostgreSQL zero-fills its WAL segments
//! for the same reason; `fallocate` would not do, as writing into an unwritten extent changes
//! metadata again). The valid prefix then ends at the first record header that is all zeros,
//! with nothing but zeros after it: the reader reports that as a clean end, not a defect. Zeros
//! are not a record (a record's length is at least 1), so a zero tail hides nothing.
//!
//! # Durability
//!
//! [`JournalWriter::append`] only encodes into a memory buffer: **nothing is durable until
//! [`JournalWriter::sync`] returns `Ok`**, which writes the buffer and calls `fdatasync`
//! (`File::sync_data`). A segment's creation is made durable by an fsync of the file and of its
//! directory before any record is appended to it. The records appended between two syncs are one
//! *group commit*; each carries the seq of its group's first record. After a failed write or sync
//! the writer is poisoned and never syncs again: the page cache may have dropped the data, and
//! only recovery (which re-reads and re-syncs the file) may decide what is durable.
//!
//! # Torn tails and damage
//!
//! [`SegmentReader`] stops at the first record that is short (the file ends inside it), has a
//! length of zero or above [`MAX_PAYLOAD_BYTES`], fails its checksum, or does not carry the next
//! sequence number, and reports where the valid prefix ends ([`SegmentReader::valid_len`]).
//! What that means is decided by [`check_journal`] (see `verify.rs`): group `g + 1` is only
//! written after group `g`'s `fdatasync` returned, so a valid record *of a later group* after the
//! bad one proves that the bad record was acknowledged. Then the journal is [`Damaged`]:
//! recovery refuses to start and changes nothing; an operator decides with
//! `mediator journal verify` and `mediator journal repair`. Otherwise the bad bytes belong to the
//! last, unacknowledged group (a torn write) and recovery cuts them off.

use crate::units::Timestamp;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

mod verify;

pub use verify::{
    check_journal, repair_truncate, Damage, JournalCheck, Repair, SegmentCheck, SegmentStatus,
};

/// The magic bytes that open every journal segment written by this code (record version 2).
pub const SEGMENT_MAGIC: [u8; 8] = *b"MEDJRNL2";
/// The magic bytes of a segment written before group commits were recorded (record version 1).
pub const SEGMENT_MAGIC_V1: [u8; 8] = *b"MEDJRNL1";
/// Length of a segment header in bytes.
pub const SEGMENT_HEADER_BYTES: u64 = 16;
/// Length of a version 2 record header (`len`, `seq`, `group`, `crc`) in bytes.
pub const RECORD_HEADER_BYTES: usize = 24;
/// Length of a version 1 record header (`len`, `seq`, `crc`) in bytes.
pub const RECORD_HEADER_BYTES_V1: usize = 16;
/// The largest payload a record may have. A larger `len` is taken as corruption.
pub const MAX_PAYLOAD_BYTES: u32 = 1 << 20;
/// The first zero-filled extent a preallocating writer keeps ahead of its records; each later
/// extension doubles what the file holds, up to [`PREALLOCATE_MAX_STEP`] at a time.
pub const PREALLOCATE_FIRST_STEP: u64 = 1 << 20;
/// The most a preallocating writer adds at a time.
pub const PREALLOCATE_MAX_STEP: u64 = 16 << 20;

const SEGMENT_PREFIX: &str = "journal-";
const SEGMENT_SUFFIX: &str = ".log";

/// An error of the journal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// An I/O operation on a journal file failed.
    #[error("journal i/o on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A command could not be encoded.
    #[error("cannot encode journal record {seq}: {source}")]
    Encode {
        /// The record's sequence number.
        seq: u64,
        /// The underlying error.
        source: postcard::Error,
    },
    /// A record passed its checksum but its payload does not decode: the file was written by a
    /// different command type or version. Never truncated away.
    #[error("journal record {seq} in {path} does not decode: {source}")]
    Decode {
        /// The segment file.
        path: PathBuf,
        /// The record's sequence number.
        seq: u64,
        /// The underlying error.
        source: postcard::Error,
    },
    /// A record larger than [`MAX_PAYLOAD_BYTES`] was appended.
    #[error("journal record {seq} is {len} bytes, above the limit of {MAX_PAYLOAD_BYTES}")]
    RecordTooLarge {
        /// The record's sequence number.
        seq: u64,
        /// Its payload length.
        len: usize,
    },
    /// A segment header is not a journal header, or disagrees with the file name.
    #[error("{path} is not a valid journal segment: {reason}")]
    BadSegment {
        /// The segment file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// An earlier write or sync failed: the file's tail is unknown and the writer refuses to go on.
    #[error("journal writer is poisoned by an earlier failure")]
    Poisoned,
    /// A repair was refused; nothing was changed.
    #[error("journal repair refused, nothing changed: {reason}")]
    RepairRefused {
        /// Why.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The file name of the segment whose first record is `first_seq`.
pub fn segment_file_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:020}{SEGMENT_SUFFIX}")
}

/// The `first_seq` of a segment file name, `None` when the name is not a segment's.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segments in `dir`, as `(first_seq, path)`, sorted by `first_seq`.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        if let Some(first_seq) = name.to_str().and_then(parse_segment_file_name) {
            segments.push((first_seq, entry.path()));
        }
    }
    segments.sort_unstable_by_key(|(first_seq, _)| *first_seq);
    Ok(segments)
}

/// Fsyncs a directory, making the creation, renaming or removal of its entries durable.
pub fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    fsync_dir(dir).map_err(io_err(dir))
}

pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The record format of a segment, named by its header's magic.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum RecordVersion {
    /// `MEDJRNL1`: no group commits recorded.
    V1,
    /// `MEDJRNL2`: every record carries its group commit's first seq.
    V2,
}

impl RecordVersion {
    /// Length of a record header of this version.
    pub fn header_bytes(self) -> usize {
        match self {
            RecordVersion::V1 => RECORD_HEADER_BYTES_V1,
            RecordVersion::V2 => RECORD_HEADER_BYTES,
        }
    }

    fn crc_at(self) -> usize {
        self.header_bytes() - 4
    }
}

fn crc_of(version: RecordVersion, header: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[..version.crc_at()]);
    hasher.update(payload);
    hasher.finalize()
}

/// The fields of a record header that passed the length check.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct RawHeader {
    pub(crate) len: u32,
    pub(crate) seq: u64,
    pub(crate) group: Option<u64>,
    pub(crate) crc: u32,
}

/// Parses a record header of `version` (`header` is at least `version.header_bytes()` long).
pub(crate) fn parse_header(version: RecordVersion, header: &[u8]) -> RawHeader {
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    RawHeader {
        len: u32_at(0),
        seq: u64_at(4),
        group: (version == RecordVersion::V2).then(|| u64_at(12)),
        crc: u32_at(version.crc_at()),
    }
}

/// True when a record with this header and payload is intact.
pub(crate) fn record_ok(version: RecordVersion, header: &[u8], payload: &[u8]) -> bool {
    let raw = parse_header(version, header);
    crc_of(version, header, payload) == raw.crc && raw.group.is_none_or(|g| g <= raw.seq)
}

fn segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
    header[0..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..16].copy_from_slice(&first_seq.to_le_bytes());
    header
}

/// The record version of a full segment header, `None` when the magic is not a journal's.
pub(crate) fn header_version(header: &[u8]) -> Option<RecordVersion> {
    match header[0..8].try_into().expect("8 bytes") {
        SEGMENT_MAGIC => Some(RecordVersion::V2),
        SEGMENT_MAGIC_V1 => Some(RecordVersion::V1),
        _ => None,
    }
}

/// Appends records to one segment.
///
/// Durability contract: [`append`](Self::append) buffers in memory; a record is durable only once
/// a later [`sync`](Self::sync) has returned `Ok`. After any failed write or sync the writer is
/// poisoned (every later call fails with [`JournalError::Poisoned`]): the state of the file's tail
/// is unknown, and only recovery may decide it. A failed `fdatasync` is never retried (the kernel
/// may have dropped the dirty pages and would report the retry as a success).
///
/// Always writes record version 2; the records appended between two syncs form a group commit.
#[derive(Debug)]
pub struct JournalWriter {
    file: File,
    path: PathBuf,
    first_seq: u64,
    /// Sequence number the next appended record must carry.
    next_seq: u64,
    /// The seq of the first record appended since the last sync: the current group's.
    group: Option<u64>,
    /// Encoded records not yet written to the file.
    buf: Vec<u8>,
    /// Bytes of the file known to be written (header and whole records).
    file_len: u64,
    /// The file's length when preallocating: zeros from `file_len` up to it (see the module
    /// docs); `None` when this writer does not preallocate.
    allocated: Option<u64>,
    poisoned: bool,
    /// Test seam: syncs left before one fails (see [`JournalWriter::inject_sync_failure`]).
    sync_failure_after: Option<u64>,
}

impl JournalWriter {
    /// Creates the segment for `first_seq` in `dir`, and makes its creation durable (fsync of the
    /// file and of `dir`). Fails if the file exists. When it fails after creating the file (a full
    /// disk while writing the header, say) it removes the file again, as far as it can; a leftover
    /// holds no record and recovery removes it.
    pub fn create(dir: &Path, first_seq: u64) -> Result<Self, JournalError> {
        assert!(first_seq >= 1, "sequence numbers start at 1");
        let path = dir.join(segment_file_name(first_seq));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let written = file
            .write_all(&segment_header(first_seq))
            .and_then(|()| file.sync_all())
            .map_err(io_err(&path))
            .and_then(|()| sync_dir(dir));
        if let Err(e) = written {
            drop(file);
            if std::fs::remove_file(&path).is_ok() {
                let _ = fsync_dir(dir);
            }
            return Err(e);
        }
        Ok(Self::new(
            file,
            path,
            first_seq,
            first_seq,
            SEGMENT_HEADER_BYTES,
        ))
    }

    fn new(file: File, path: PathBuf, first_seq: u64, next_seq: u64, file_len: u64) -> Self {
        Self {
            file,
            path,
            first_seq,
            next_seq,
            group: None,
            buf: Vec::with_capacity(64 * 1024),
            file_len,
            allocated: None,
            poisoned: false,
            sync_failure_after: None,
        }
    }

    /// Makes this writer keep zero-filled, synced space ahead of its records (see the module docs)
    /// and fills the first extent now: group commits that fit overwrite zeros and the file's
    /// length stays put. Best effort: when zeros cannot be written or synced (a full disk, say),
    /// preallocation is off for this writer (logged) and it appends as without it; no record is
    /// at risk. Fails only on a poisoned writer.
    pub fn preallocate(&mut self) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        if self.allocated.is_some() {
            return Ok(());
        }
        match self.file.metadata() {
            // Anything past the written records is zeros by now (`create` and `open_at` cut
            // the rest), so the extension starts at the file's end.
            Ok(m) => {
                self.allocated = Some(m.len().max(self.file_len));
                self.extend_to(self.file_len + self.buf.len() as u64 + 1);
            }
            Err(error) => tracing::warn!(
                path = %self.path.display(), %error,
                "journal preallocation failed: appending without it"
            ),
        }
        Ok(())
    }

    /// Zero-fills the file from its allocated end until it holds at least `need` bytes (one
    /// step: the file's length again, at least [`PREALLOCATE_FIRST_STEP`], at most
    /// [`PREALLOCATE_MAX_STEP`]) and syncs it.
    fn extend_to(&mut self, need: u64) {
        use std::os::unix::fs::FileExt;
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let Some(allocated) = self.allocated else {
            return;
        };
        if need <= allocated {
            return;
        }
        let step = allocated.clamp(PREALLOCATE_FIRST_STEP, PREALLOCATE_MAX_STEP);
        let target = need.max(allocated + step);
        let mut at = allocated;
        let result = (|| {
            while at < target {
                let n = (target - at).min(ZEROS.len() as u64) as usize;
                self.file.write_all_at(&ZEROS[..n], at)?;
                at += n as u64;
            }
            self.file.sync_data()
        })();
        match result {
            Ok(()) => self.allocated = Some(target),
            // Zeros that did not reach the disk put no record at risk (none is written yet, and
            // every earlier one was synced): preallocation stops for this writer, which goes on
            // appending as it did before preallocation existed. A short disk is then noticed by
            // the records' own write or sync, not 16 MiB early.
            Err(error) => {
                tracing::warn!(
                    path = %self.path.display(), %error,
                    "journal preallocation failed: appending without it"
                );
                self.allocated = None;
            }
        }
    }

    /// Cuts preallocated zeros after the records and syncs the file, as before a rotation: an
    /// older segment then ends with its last record, as a build before preallocation expects.
    pub fn trim(&mut self) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        let len = self.file.metadata().map_err(io_err(&self.path))?.len();
        if len > self.file_len {
            self.file
                .set_len(self.file_len)
                .and_then(|()| self.file.sync_all())
                .map_err(io_err(&self.path))?;
        }
        if self.allocated.is_some() {
            self.allocated = Some(self.file_len);
        }
        Ok(())
    }

    /// Test seam: after `after` more successful syncs, the next one fails as an `fdatasync` error
    /// would (the records are written, the sync reports an error, the writer is poisoned).
    #[doc(hidden)]
    pub fn inject_sync_failure(&mut self, after: u64) {
        self.sync_failure_after = Some(after);
    }

    /// Opens an existing version 2 segment for appending after its valid prefix of `valid_len`
    /// bytes, whose last record is `next_seq - 1` (as found by [`SegmentReader`]). Anything after
    /// `valid_len` is cut off. The file is fsynced either way (and its directory): what a crashed
    /// process wrote may still sit in the page cache only, and must be durable before anything
    /// that depends on it is acknowledged. A segment shorter than its header (a crash while it was
    /// created) gets its header written anew.
    pub fn open_at(
        path: &Path,
        first_seq: u64,
        valid_len: u64,
        next_seq: u64,
    ) -> Result<Self, JournalError> {
        assert!(first_seq >= 1 && next_seq >= first_seq);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        let len = file.metadata().map_err(io_err(path))?.len();
        let valid_len = if valid_len < SEGMENT_HEADER_BYTES {
            assert_eq!(
                next_seq, first_seq,
                "a segment without header has no records"
            );
            file.set_len(0)
                .and_then(|()| file.write_all(&segment_header(first_seq)))
                .and_then(|()| file.sync_all())
                .map_err(io_err(path))?;
            SEGMENT_HEADER_BYTES
        } else {
            assert!(valid_len <= len, "valid prefix longer than the file");
            if valid_len < len {
                file.set_len(valid_len).map_err(io_err(path))?;
            }
            file.sync_all().map_err(io_err(path))?;
            valid_len
        };
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        file.seek(SeekFrom::Start(valid_len))
            .map_err(io_err(path))?;
        Ok(Self::new(
            file,
            path.to_path_buf(),
            first_seq,
            next_seq,
            valid_len,
        ))
    }

    /// The segment file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sequence number of the segment's first record.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The sequence number the next record must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// True when no record was ever appended to this segment.
    pub fn is_empty(&self) -> bool {
        self.next_seq == self.first_seq
    }

    /// True when appended records wait for [`sync`](Self::sync).
    pub fn has_unsynced(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Encodes `(now, cmd)` as record `seq` into the write buffer. Not durable: see
    /// [`sync`](Self::sync). `seq` must be the next sequence number (asserted).
    pub fn append<C: Serialize>(
        &mut self,
        seq: u64,
        now: Timestamp,
        cmd: &C,
    ) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        assert_eq!(seq, self.next_seq, "journal records must be gap-free");
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
        if let Err(source) = postcard::to_io(&(now, cmd), &mut self.buf) {
            self.buf.truncate(start);
            return Err(JournalError::Encode { seq, source });
        }
        let len = self.buf.len() - start - RECORD_HEADER_BYTES;
        if len == 0 || len > MAX_PAYLOAD_BYTES as usize {
            self.buf.truncate(start);
            return Err(JournalError::RecordTooLarge { seq, len });
        }
        let group = *self.group.get_or_insert(seq);
        let (header, payload) = self.buf[start..].split_at_mut(RECORD_HEADER_BYTES);
        header[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        header[4..12].copy_from_slice(&seq.to_le_bytes());
        header[12..20].copy_from_slice(&group.to_le_bytes());
        let crc = crc_of(RecordVersion::V2, header, payload);
        header[20..24].copy_from_slice(&crc.to_le_bytes());
        self.next_seq += 1;
        Ok(())
    }

    /// Writes the buffered records and waits for `fdatasync`. When this returns `Ok`, every record
    /// appended so far is durable. A no-op when nothing is buffered.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let injected = match &mut self.sync_failure_after {
            Some(0) => true,
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        };
        let end = self.file_len + self.buf.len() as u64;
        if self.allocated.is_some_and(|a| end > a) {
            self.extend_to(end);
        }
        // Positioned: the file's length is not where records end when it is preallocated.
        let result = std::os::unix::fs::FileExt::write_all_at(&self.file, &self.buf, self.file_len)
            .and_then(|()| {
                if injected {
                    Err(io::Error::other("injected fdatasync failure"))
                } else {
                    self.file.sync_data()
                }
            });
        if let Err(source) = result {
            self.poisoned = true;
            return Err(JournalError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.file_len += self.buf.len() as u64;
        self.buf.clear();
        self.group = None;
        Ok(())
    }

    /// Bytes of the segment written so far (header included), not counting the buffer.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
}

/// Why a segment's valid prefix ends before its end of file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum TailDefect {
    /// The file ends inside the segment header.
    ShortHeader,
    /// The file ends inside a record.
    ShortRecord,
    /// A record's length is zero or above [`MAX_PAYLOAD_BYTES`].
    BadLength,
    /// A record's checksum does not match.
    BadChecksum,
    /// A record does not carry the next sequence number.
    BadSeq,
}

/// One record read from a segment.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RecordInfo {
    /// Sequence number.
    pub seq: u64,
    /// Offset of the record in the file.
    pub offset: u64,
    /// The seq of the first record of its group commit (`None` in a version 1 segment).
    pub group: Option<u64>,
}

/// Reads the records of one segment, in order, checking each (see the module docs).
#[derive(Debug)]
pub struct SegmentReader {
    reader: BufReader<File>,
    path: PathBuf,
    version: RecordVersion,
    group: Option<u64>,
    first_seq: u64,
    next_seq: u64,
    valid_len: u64,
    defect: Option<TailDefect>,
    /// The valid prefix is followed by zeros only (preallocated space), up to the file's end.
    zero_tail: bool,
    done: bool,
    payload: Vec<u8>,
}

impl SegmentReader {
    /// Opens the segment at `path`, which must start with `first_seq` (from its name). A header
    /// that is present in full but wrong is an error; a short header is a torn tail.
    pub fn open(path: &Path, first_seq: u64) -> Result<Self, JournalError> {
        let file = File::open(path).map_err(io_err(path))?;
        let reader = BufReader::with_capacity(256 * 1024, file);
        let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
        let mut this = Self {
            reader,
            path: path.to_path_buf(),
            version: RecordVersion::V2,
            group: None,
            first_seq,
            next_seq: first_seq,
            valid_len: 0,
            defect: None,
            zero_tail: false,
            done: false,
            payload: Vec::new(),
        };
        match read_full(&mut this.reader, &mut header).map_err(io_err(path))? {
            Filled::Short(_) => {
                this.defect = Some(TailDefect::ShortHeader);
                this.done = true;
            }
            Filled::Full => {
                let Some(version) = header_version(&header) else {
                    return Err(JournalError::BadSegment {
                        path: path.to_path_buf(),
                        reason: "bad magic",
                    });
                };
                this.version = version;
                if header[8..16] != first_seq.to_le_bytes() {
                    return Err(JournalError::BadSegment {
                        path: path.to_path_buf(),
                        reason: "first sequence number disagrees with the file name",
                    });
                }
                this.valid_len = SEGMENT_HEADER_BYTES;
            }
        }
        Ok(this)
    }

    /// Reads the next valid record, `None` at the end of the valid prefix (see
    /// [`defect`](Self::defect) for why it ended). The payload is then in
    /// [`payload`](Self::payload).
    pub fn next_record(&mut self) -> Result<Option<RecordInfo>, JournalError> {
        if self.done {
            return Ok(None);
        }
        let mut header = [0u8; RECORD_HEADER_BYTES];
        let header = &mut header[..self.version.header_bytes()];
        let filled = read_full(&mut self.reader, header).map_err(io_err(&self.path))?;
        let read = match filled {
            Filled::Full => header.len(),
            Filled::Short(n) => n,
        };
        // Preallocated space (see the module docs): zeros to the end of the file are a clean end.
        if read > 0 && header[..read].iter().all(|&b| b == 0) && self.rest_is_zero()? {
            self.zero_tail = true;
            self.done = true;
            return Ok(None);
        }
        let defect = match filled {
            Filled::Short(0) => None,
            Filled::Short(_) => Some(TailDefect::ShortRecord),
            Filled::Full => self.check_record(header)?,
        };
        match defect {
            None if filled == Filled::Full => {
                let info = RecordInfo {
                    seq: self.next_seq,
                    offset: self.valid_len,
                    group: self.group,
                };
                self.valid_len += (header.len() + self.payload.len()) as u64;
                self.next_seq += 1;
                Ok(Some(info))
            }
            defect => {
                self.defect = defect;
                self.done = true;
                Ok(None)
            }
        }
    }

    /// True when every byte left in the file is zero. Reads to the end either way (the reader is
    /// done after it).
    fn rest_is_zero(&mut self) -> Result<bool, JournalError> {
        let mut chunk = [0u8; 8 * 1024];
        loop {
            match self.reader.read(&mut chunk) {
                Ok(0) => return Ok(true),
                Ok(n) if chunk[..n].iter().all(|&b| b == 0) => {}
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(&self.path)(e)),
            }
        }
    }

    fn check_record(&mut self, header: &[u8]) -> Result<Option<TailDefect>, JournalError> {
        let RawHeader {
            len, seq, group, ..
        } = parse_header(self.version, header);
        if len == 0 || len > MAX_PAYLOAD_BYTES {
            return Ok(Some(TailDefect::BadLength));
        }
        self.payload.resize(len as usize, 0);
        if read_full(&mut self.reader, &mut self.payload).map_err(io_err(&self.path))?
            != Filled::Full
        {
            return Ok(Some(TailDefect::ShortRecord));
        }
        if !record_ok(self.version, header, &self.payload) {
            return Ok(Some(TailDefect::BadChecksum));
        }
        if seq != self.next_seq {
            return Ok(Some(TailDefect::BadSeq));
        }
        self.group = group;
        Ok(None)
    }

    /// The payload of the record last returned by [`next_record`](Self::next_record).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Decodes the payload of the record last returned as `(time, command)`.
    pub fn decode<C: DeserializeOwned>(&self) -> Result<(Timestamp, C), JournalError> {
        postcard::from_bytes(&self.payload).map_err(|source| JournalError::Decode {
            path: self.path.clone(),
            seq: self.next_seq - 1,
            source,
        })
    }

    /// Decodes only the time of the record last returned (the payload's first field).
    pub fn decode_time(&self) -> Result<Timestamp, JournalError> {
        postcard::take_from_bytes::<Timestamp>(&self.payload)
            .map(|(time, _)| time)
            .map_err(|source| JournalError::Decode {
                path: self.path.clone(),
                seq: self.next_seq - 1,
                source,
            })
    }

    /// Length in bytes of the valid prefix read so far (header and whole valid records).
    pub fn valid_len(&self) -> u64 {
        self.valid_len
    }

    /// The sequence number the next valid record would carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The segment's first sequence number.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The segment's record format (version 2 until a full header says otherwise).
    pub fn version(&self) -> RecordVersion {
        self.version
    }

    /// After the end: why the valid prefix ended before the end of the file, `None` when the
    /// whole file was valid (or the rest of it is preallocated zeros: see
    /// [`zero_tail`](Self::zero_tail)).
    pub fn defect(&self) -> Option<TailDefect> {
        self.defect
    }

    /// After the end: true when the valid prefix is followed by zeros only, up to the end of the
    /// file (preallocated space; see the module docs). Not a defect.
    pub fn zero_tail(&self) -> bool {
        self.zero_tail
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Filled {
    Full,
    /// The file ended after this many bytes.
    Short(usize),
}

/// Reads until `buf` is full or the file ends.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<Filled> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Ok(Filled::Short(filled)),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Filled::Full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_roundtrip_and_sort() {
        assert_eq!(segment_file_name(7), "journal-00000000000000000007.log");
        assert_eq!(
            parse_segment_file_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        assert_eq!(parse_segment_file_name("journal-7.log"), None);
        assert_eq!(
            parse_segment_file_name("snapshot-00000000000000000007.bin"),
            None
        );
        assert!(segment_file_name(9) < segment_file_name(10));
    }

    #[test]
    fn records_roundtrip_and_checksum_covers_length() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = JournalWriter::create(dir.path(), 1).unwrap();
        for seq in 1..=3u64 {
            w.append(seq, Timestamp(seq * 10), &(seq as u32, "x"))
                .unwrap();
        }
        assert!(w.has_unsynced());
        w.sync().unwrap();
        assert!(!w.has_unsynced());
        let path = w.path().to_path_buf();
        let len = w.file_len();
        drop(w);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);

        let mut r = SegmentReader::open(&path, 1).unwrap();
        for seq in 1..=3u64 {
            let info = r.next_record().unwrap().unwrap();
            assert_eq!(info.seq, seq);
            let (t, (n, s)): (Timestamp, (u32, String)) = r.decode().unwrap();
            assert_eq!((t, n, s.as_str()), (Timestamp(seq * 10), seq as u32, "x"));
        }
        assert_eq!(r.next_record().unwrap(), None);
        assert_eq!(r.defect(), None);
        assert_eq!(r.valid_len(), len);

        // Shrink the first record's length field by one: the checksum catches it.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[SEGMENT_HEADER_BYTES as usize] -= 1;
        std::fs::write(&path, &bytes).unwrap();
        let mut r = SegmentReader::open(&path, 1).unwrap();
        assert_eq!(r.next_record().unwrap(), None);
        assert_eq!(r.defect(), Some(TailDefect::BadChecksum));
        assert_eq!(r.valid_len(), SEGMENT_HEADER_BYTES);
    }

    struct Unencodable;

    impl Serialize for Unencodable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("refuses"))
        }
    }

    #[test]
    fn a_failed_encoding_leaves_the_buffer_and_sequence_intact() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = JournalWriter::create(dir.path(), 1).unwrap();
        w.append(1, Timestamp(1), &7u8).unwrap();
        assert!(matches!(
            w.append(2, Timestamp(2), &Unencodable),
            Err(JournalError::Encode { seq: 2, .. })
        ));
        w.append(2, Timestamp(3), &8u8).unwrap();
        w.sync().unwrap();
        let mut r = SegmentReader::open(w.path(), 1).unwrap();
        let mut got = Vec::new();
        while r.next_record().unwrap().is_some() {
            got.push(r.decode::<u8>().unwrap());
        }
        assert_eq!(got, vec![(Timestamp(1), 7), (Timestamp(3), 8)]);
        assert_eq!(r.defect(), None);
    }

    #[test]
    fn a_failed_sync_poisons_the_writer_and_is_never_retried() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = JournalWriter::create(dir.path(), 1).unwrap();
        w.inject_sync_failure(1);
        w.append(1, Timestamp(1), &1u8).unwrap();
        w.sync().unwrap();
        w.append(2, Timestamp(2), &2u8).unwrap();
        assert!(matches!(w.sync(), Err(JournalError::Io { .. })));
        assert!(matches!(w.sync(), Err(JournalError::Poisoned)));
        assert!(matches!(
            w.append(3, Timestamp(3), &3u8),
            Err(JournalError::Poisoned)
        ));
    }

    #[test]
    fn each_record_carries_its_group_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = JournalWriter::create(dir.path(), 1).unwrap();
        for (seq, sync) in [
            (1, false),
            (2, true),
            (3, true),
            (4, false),
            (5, false),
            (6, true),
        ] {
            w.append(seq, Timestamp(seq), &seq).unwrap();
            if sync {
                w.sync().unwrap();
            }
        }
        let mut r = SegmentReader::open(w.path(), 1).unwrap();
        let mut groups = Vec::new();
        while let Some(info) = r.next_record().unwrap() {
            groups.push(info.group);
        }
        assert_eq!(r.version(), RecordVersion::V2);
        assert_eq!(groups, [1, 1, 3, 4, 4, 4].map(Some));
    }

    #[test]
    fn a_preallocating_writer_grows_in_steps_and_its_records_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = JournalWriter::create(dir.path(), 1).unwrap();
        w.preallocate().unwrap();
        let path = w.path().to_path_buf();
        let len = || std::fs::metadata(&path).unwrap().len();
        assert_eq!(len(), SEGMENT_HEADER_BYTES + PREALLOCATE_FIRST_STEP);
        let payload = vec![7u8; 100 * 1024];
        let mut lens = vec![len()];
        for seq in 1..=50u64 {
            w.append(seq, Timestamp(seq), &payload).unwrap();
            w.sync().unwrap();
            assert!(w.file_len() <= len(), "records stay inside the file");
            if *lens.last().unwrap() != len() {
                lens.push(len());
            }
        }
        // Each step adds what the file holds (at least the first step): 1, 2, 4 MiB, ...
        assert_eq!(lens.len(), 4, "{lens:?}");
        for pair in lens.windows(2) {
            assert_eq!(pair[1], 2 * pair[0], "{lens:?}");
        }
        let written = w.file_len();
        drop(w);
        let mut r = SegmentReader::open(&path, 1).unwrap();
        let mut n = 0;
        while r.next_record().unwrap().is_some() {
            n += 1;
            assert_eq!(r.decode::<Vec<u8>>().unwrap().1, payload);
        }
        assert_eq!(n, 50);
        assert_eq!((r.defect(), r.zero_tail()), (None, true));
        assert_eq!(r.valid_len(), written);

        // Reopened, the writer cuts the zeros and preallocates again after its records.
        let mut w = JournalWriter::open_at(&path, 1, written, 51).unwrap();
        assert_eq!(len(), written);
        w.preallocate().unwrap();
        assert!(len() > written);
        w.append(51, Timestamp(51), &payload).unwrap();
        w.sync().unwrap();
        let mut r = SegmentReader::open(&path, 1).unwrap();
        while r.next_record().unwrap().is_some() {}
        assert_eq!((r.next_seq(), r.zero_tail()), (52, true));
    }

    #[test]
    fn zeros_with_a_byte_after_them_are_a_defect_not_preallocated_space() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = JournalWriter::create(dir.path(), 1).unwrap();
        w.preallocate().unwrap();
        w.append(1, Timestamp(1), &1u8).unwrap();
        w.sync().unwrap();
        let end = w.file_len();
        let path = w.path().to_path_buf();
        drop(w);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] = 1;
        std::fs::write(&path, &bytes).unwrap();
        let mut r = SegmentReader::open(&path, 1).unwrap();
        while r.next_record().unwrap().is_some() {}
        assert_eq!(r.valid_len(), end);
        assert_eq!(
            (r.defect(), r.zero_tail()),
            (Some(TailDefect::BadLength), false)
        );
    }

    #[test]
    fn wrong_header_is_an_error_not_a_tail() {
        let dir = tempfile::tempdir().unwrap();
        let w = JournalWriter::create(dir.path(), 5).unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        assert!(matches!(
            SegmentReader::open(&path, 6),
            Err(JournalError::BadSegment { .. })
        ));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            SegmentReader::open(&path, 5),
            Err(JournalError::BadSegment { .. })
        ));
    }
}
