//! Snapshots: a full copy of the state at one sequence number, so recovery replays only the
//! journal after it.
//!
//! # File layout
//!
//! `snapshot-<seq>.bin` (`seq` padded to 20 decimal digits). All integers are little-endian.
//!
//! ```text
//!   0..8    magic        b"MEDSNAP1"
//!   8..12   version      u32, SNAPSHOT_VERSION
//!   12..20  seq          u64, StateMachine::seq of the state (equal to the name's)
//!   20..28  payload_len  u64
//!   28..60  sha256       SHA-256 of bytes 0..28 and the payload (formats 1-4: of the payload)
//!   60..    payload      postcard encoding of S::Snapshot
//! ```
//!
//! Since format 5 the checksum covers the header's fields too, so that a damaged version field
//! cannot make a snapshot read as an older format (which [`StateMachine::upgrade_snapshot_payload`]
//! would then convert). The other fields are also checked against the file's name and length.
//!
//! # Durability
//!
//! [`write_snapshot`] writes `snapshot-<seq>.bin.tmp`, fsyncs it, renames it to its final name and
//! fsyncs the directory: when it returns `Ok` the snapshot is durable, and a crash at any point
//! leaves either no snapshot file or a complete one (a stray `.tmp` is ignored, and removed once a
//! later snapshot is written: [`list_snapshot_leftovers`]).
//! A snapshot that fails any check on reading (including [`StateMachine::restore`]'s check of the
//! state's invariants) is skipped by recovery, which falls back to the previous one.

use crate::journal::fsync_dir;
use crate::StateMachine;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The magic bytes that open every snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"MEDSNAP1";
/// The snapshot format version written and accepted. Older versions are accepted when
/// [`StateMachine::upgrade_snapshot_payload`] knows them (the engine: version 1, before order
/// lists; version 2, before OTO/OTOCO lists; version 3, before each resting order's quote
/// filled; version 4, whose checksum did not cover the header; version 5, before transfer
/// terms; version 6, before transfers' sequence numbers).
pub const SNAPSHOT_VERSION: u32 = 7;
/// Length of the snapshot header in bytes.
pub const SNAPSHOT_HEADER_BYTES: usize = 60;

const SNAPSHOT_PREFIX: &str = "snapshot-";
const SNAPSHOT_SUFFIX: &str = ".bin";

/// An error while writing or reading a snapshot.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// An I/O operation failed.
    #[error("snapshot i/o on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The state could not be encoded.
    #[error("cannot encode snapshot {seq}: {source}")]
    Encode {
        /// The state's sequence number.
        seq: u64,
        /// The underlying error.
        source: postcard::Error,
    },
    /// The file is not a valid snapshot.
    #[error("{path} is not a valid snapshot: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// The file's format version is one this build cannot read: newer than
    /// [`SNAPSHOT_VERSION`], or older and not one the state machine upgrades
    /// ([`StateMachine::upgrade_snapshot_payload`]). The version is shared by every state
    /// machine: a payload that did not change across a bump still needs its state machine to
    /// say so (an upgrade that changes nothing).
    #[error("{path} has snapshot format version {found}, {}", version_why(.found, .current))]
    Version {
        /// The file.
        path: PathBuf,
        /// The version in its header.
        found: u32,
        /// The version this build writes ([`SNAPSHOT_VERSION`]).
        current: u32,
    },
    /// The file is intact but its contents break the state's invariants
    /// ([`StateMachine::restore`] refused them).
    #[error("{path} holds an inconsistent state: {reason}")]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// What the state machine found.
        reason: String,
    },
}

fn version_why(found: &u32, current: &u32) -> String {
    if found > current {
        format!("newer than this build's version {current}: written by a newer build")
    } else {
        format!("older than this build's version {current}, and this state cannot upgrade it")
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The file name of the snapshot at `seq`.
pub fn snapshot_file_name(seq: u64) -> String {
    format!("{SNAPSHOT_PREFIX}{seq:020}{SNAPSHOT_SUFFIX}")
}

/// The `seq` of a snapshot file name, `None` when the name is not a snapshot's.
pub fn parse_snapshot_file_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SNAPSHOT_PREFIX)?
        .strip_suffix(SNAPSHOT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The snapshots in `dir`, as `(seq, path)`, sorted by `seq`, newest last. Unchecked.
pub fn list_snapshots(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SnapshotError> {
    let mut snapshots = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if let Some(seq) = entry
            .file_name()
            .to_str()
            .and_then(parse_snapshot_file_name)
        {
            snapshots.push((seq, entry.path()));
        }
    }
    snapshots.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(snapshots)
}

/// Half-written snapshots in `dir` (`snapshot-<seq>.bin.tmp`, left by a write that stopped before
/// its rename), as `(seq, path)`.
pub fn list_snapshot_leftovers(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SnapshotError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if let Some(seq) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(parse_snapshot_file_name)
        {
            out.push((seq, entry.path()));
        }
    }
    Ok(out)
}

/// Writes a snapshot of `state` into `dir` durably (see the module docs) and returns its path.
pub fn write_snapshot<S: StateMachine>(dir: &Path, state: &S) -> Result<PathBuf, SnapshotError> {
    let seq = state.seq();
    let payload = postcard::to_stdvec(&state.snapshot())
        .map_err(|source| SnapshotError::Encode { seq, source })?;
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    header[0..8].copy_from_slice(&SNAPSHOT_MAGIC);
    header[8..12].copy_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    header[12..20].copy_from_slice(&seq.to_le_bytes());
    header[20..28].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let digest = checksum(SNAPSHOT_VERSION, &header, &payload);
    header[28..60].copy_from_slice(&digest);

    let path = dir.join(snapshot_file_name(seq));
    let tmp = dir.join(format!("{}.tmp", snapshot_file_name(seq)));
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(&header)
        .and_then(|()| file.write_all(&payload))
        .and_then(|()| file.sync_all())
        .map_err(io_err(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    fsync_dir(dir).map_err(io_err(dir))?;
    Ok(path)
}

/// The SHA-256 a snapshot of format `version` carries: of the header's fields (bytes 0..28) and
/// the payload since format 5, of the payload alone before.
fn checksum(version: u32, header: &[u8], payload: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    if version >= 5 {
        h.update(&header[..28]);
    }
    h.update(payload);
    h.finalize().into()
}

/// Reads and checks the snapshot at `path`, which must be at `seq` (from its name), and restores
/// the state from it.
pub fn read_snapshot<S: StateMachine>(path: &Path, seq: u64) -> Result<S, SnapshotError> {
    let invalid = |reason| SnapshotError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    if bytes.len() < SNAPSHOT_HEADER_BYTES {
        return Err(invalid("shorter than its header"));
    }
    let (header, payload) = bytes.split_at(SNAPSHOT_HEADER_BYTES);
    if header[0..8] != SNAPSHOT_MAGIC {
        return Err(invalid("bad magic"));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    let unreadable = || SnapshotError::Version {
        path: path.to_path_buf(),
        found: version,
        current: SNAPSHOT_VERSION,
    };
    if version > SNAPSHOT_VERSION {
        return Err(unreadable());
    }
    if header[12..20] != seq.to_le_bytes() {
        return Err(invalid("sequence number disagrees with the file name"));
    }
    if header[20..28] != (payload.len() as u64).to_le_bytes() {
        return Err(invalid("payload length disagrees with the file length"));
    }
    // An older format the state machine cannot read is refused as such (before the checksum,
    // which that format may compute otherwise).
    let mut upgraded;
    let decoded = if version == SNAPSHOT_VERSION {
        payload
    } else {
        upgraded = payload.to_vec();
        if !S::upgrade_snapshot_payload(version, &mut upgraded) {
            return Err(unreadable());
        }
        &upgraded[..]
    };
    if header[28..60] != checksum(version, header, payload)[..] {
        return Err(invalid("checksum mismatch"));
    }
    let payload = decoded;
    let snapshot: S::Snapshot =
        postcard::from_bytes(payload).map_err(|_| invalid("payload does not decode"))?;
    let state = S::restore(snapshot).map_err(|e| SnapshotError::Inconsistent {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if state.seq() != seq {
        return Err(invalid("restored state has another sequence number"));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_roundtrip() {
        assert_eq!(snapshot_file_name(3), "snapshot-00000000000000000003.bin");
        assert_eq!(parse_snapshot_file_name(&snapshot_file_name(42)), Some(42));
        assert_eq!(
            parse_snapshot_file_name("snapshot-00000000000000000003.bin.tmp"),
            None
        );
        assert_eq!(parse_snapshot_file_name("snapshot-3.bin"), None);
    }
}
