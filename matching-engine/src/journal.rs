//! The journal: an append-only log of every accepted command, in sequence order.
//!
//! # File layout
//!
//! The journal is a series of *segment* files named `journal-<first_seq>.log` (`first_seq` padded
//! to 20 decimal digits so that names sort like numbers). A new segment starts after each snapshot
//! (see [`crate::recovery::Store::snapshot`]), so whole old segments can be deleted.
//!
//! Every segment starts with a 16-byte header, then records back to back. All integers are
//! little-endian.
//!
//! ```text
//! segment header (16 bytes)
//!   0..8    magic       b"MEDJRNL1"
//!   8..16   first_seq   u64, the sequence number of the segment's first record
//!
//! record (16 + len bytes)
//!   0..4    len         u32, payload length in bytes, 1..=MAX_PAYLOAD_BYTES
//!   4..12   seq         u64, the command's sequence number (StateMachine::seq after it)
//!   12..16  crc         u32, CRC-32 (IEEE) of bytes 0..12 (len and seq) followed by the payload
//!   16..    payload     postcard encoding of (Timestamp, S::Command)
//! ```
//!
//! The checksum covers `len` and `seq` as well as the payload, so a damaged length is caught even
//! when it still points inside the file.
//!
//! # Durability
//!
//! [`JournalWriter::append`] only encodes into a memory buffer: **nothing is durable until
//! [`JournalWriter::sync`] returns `Ok`**, which writes the buffer and calls `fdatasync`
//! (`File::sync_data`). A segment's creation is made durable by an fsync of the file and of its
//! directory before any record is appended to it.
//!
//! # Torn and corrupt records
//!
//! A crash can leave a partly written record at the end of the last segment. [`SegmentReader`]
//! stops at the first record that is short (the file ends inside it), has a length of zero or
//! above [`MAX_PAYLOAD_BYTES`], fails its checksum, or does not carry the next sequence number,
//! and reports where the valid prefix ends ([`SegmentReader::valid_len`]). Recovery truncates the
//! last segment there: a half-written record is never applied.

use crate::units::Timestamp;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The magic bytes that open every journal segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"MEDJRNL1";
/// Length of a segment header in bytes.
pub const SEGMENT_HEADER_BYTES: u64 = 16;
/// Length of a record header (`len`, `seq`, `crc`) in bytes.
pub const RECORD_HEADER_BYTES: usize = 16;
/// The largest payload a record may have. A larger `len` is taken as corruption.
pub const MAX_PAYLOAD_BYTES: u32 = 1 << 20;

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

fn crc_of(header: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[0..12]);
    hasher.update(payload);
    hasher.finalize()
}

fn segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
    header[0..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..16].copy_from_slice(&first_seq.to_le_bytes());
    header
}

/// Appends records to one segment.
///
/// Durability contract: [`append`](Self::append) buffers in memory; a record is durable only once
/// a later [`sync`](Self::sync) has returned `Ok`. After any failed write or sync the writer is
/// poisoned (every later call fails with [`JournalError::Poisoned`]): the state of the file's tail
/// is unknown, and only recovery may decide it.
#[derive(Debug)]
pub struct JournalWriter {
    file: File,
    path: PathBuf,
    first_seq: u64,
    /// Sequence number the next appended record must carry.
    next_seq: u64,
    /// Encoded records not yet written to the file.
    buf: Vec<u8>,
    /// Bytes of the file known to be written (header and whole records).
    file_len: u64,
    poisoned: bool,
}

impl JournalWriter {
    /// Creates the segment for `first_seq` in `dir`, and makes its creation durable (fsync of the
    /// file and of `dir`). Fails if the file exists.
    pub fn create(dir: &Path, first_seq: u64) -> Result<Self, JournalError> {
        assert!(first_seq >= 1, "sequence numbers start at 1");
        let path = dir.join(segment_file_name(first_seq));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all(&segment_header(first_seq))
            .and_then(|()| file.sync_all())
            .map_err(io_err(&path))?;
        sync_dir(dir)?;
        Ok(Self {
            file,
            path,
            first_seq,
            next_seq: first_seq,
            buf: Vec::with_capacity(64 * 1024),
            file_len: SEGMENT_HEADER_BYTES,
            poisoned: false,
        })
    }

    /// Opens an existing segment for appending after its valid prefix of `valid_len` bytes, whose
    /// last record is `next_seq - 1` (as found by [`SegmentReader`]). Anything after `valid_len`
    /// is cut off and the cut is made durable. A segment shorter than its header (a crash while it
    /// was created) gets its header written anew.
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
                file.set_len(valid_len)
                    .and_then(|()| file.sync_all())
                    .map_err(io_err(path))?;
            }
            valid_len
        };
        file.seek(SeekFrom::Start(valid_len))
            .map_err(io_err(path))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            first_seq,
            next_seq,
            buf: Vec::with_capacity(64 * 1024),
            file_len: valid_len,
            poisoned: false,
        })
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
        let (header, payload) = self.buf[start..].split_at_mut(RECORD_HEADER_BYTES);
        header[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        header[4..12].copy_from_slice(&seq.to_le_bytes());
        let crc = crc_of(header, payload);
        header[12..16].copy_from_slice(&crc.to_le_bytes());
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
        let result = self
            .file
            .write_all(&self.buf)
            .and_then(|()| self.file.sync_data());
        if let Err(source) = result {
            self.poisoned = true;
            return Err(JournalError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.file_len += self.buf.len() as u64;
        self.buf.clear();
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
}

/// Reads the records of one segment, in order, checking each (see the module docs).
#[derive(Debug)]
pub struct SegmentReader {
    reader: BufReader<File>,
    path: PathBuf,
    first_seq: u64,
    next_seq: u64,
    valid_len: u64,
    defect: Option<TailDefect>,
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
            first_seq,
            next_seq: first_seq,
            valid_len: 0,
            defect: None,
            done: false,
            payload: Vec::new(),
        };
        match read_full(&mut this.reader, &mut header).map_err(io_err(path))? {
            Filled::Short(_) => {
                this.defect = Some(TailDefect::ShortHeader);
                this.done = true;
            }
            Filled::Full => {
                if header[0..8] != SEGMENT_MAGIC {
                    return Err(JournalError::BadSegment {
                        path: path.to_path_buf(),
                        reason: "bad magic",
                    });
                }
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
        let filled = read_full(&mut self.reader, &mut header).map_err(io_err(&self.path))?;
        let defect = match filled {
            Filled::Short(0) => None,
            Filled::Short(_) => Some(TailDefect::ShortRecord),
            Filled::Full => self.check_record(&header)?,
        };
        match defect {
            None if filled == Filled::Full => {
                let info = RecordInfo {
                    seq: self.next_seq,
                    offset: self.valid_len,
                };
                self.valid_len += (RECORD_HEADER_BYTES + self.payload.len()) as u64;
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

    fn check_record(
        &mut self,
        header: &[u8; RECORD_HEADER_BYTES],
    ) -> Result<Option<TailDefect>, JournalError> {
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let seq = u64::from_le_bytes(header[4..12].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_PAYLOAD_BYTES {
            return Ok(Some(TailDefect::BadLength));
        }
        self.payload.resize(len as usize, 0);
        if read_full(&mut self.reader, &mut self.payload).map_err(io_err(&self.path))?
            != Filled::Full
        {
            return Ok(Some(TailDefect::ShortRecord));
        }
        if crc_of(header, &self.payload) != crc {
            return Ok(Some(TailDefect::BadChecksum));
        }
        if seq != self.next_seq {
            return Ok(Some(TailDefect::BadSeq));
        }
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

    /// After the end: why the valid prefix ended before the end of the file, `None` when the
    /// whole file was valid.
    pub fn defect(&self) -> Option<TailDefect> {
        self.defect
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
