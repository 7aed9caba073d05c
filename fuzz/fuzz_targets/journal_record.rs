//! The journal's record reader and `check_journal` on any segment bytes: never a panic; whatever
//! is read back is the valid prefix, and every payload either decodes as an engine command or is
//! a decode error. The first byte picks the input's shape: raw segment bytes (header included), or
//! payloads framed as valid version 2 records (so the decoder sees arbitrary payloads past the
//! checksum).
#![no_main]

use libfuzzer_sys::fuzz_target;
use matching_engine::journal::{
    check_journal, segment_file_name, SegmentReader, MAX_PAYLOAD_BYTES, SEGMENT_MAGIC,
};
use matching_engine::Command;
use std::path::PathBuf;
use std::sync::OnceLock;

const FIRST_SEQ: u64 = 1;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("mediator-fuzz-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    })
}

/// Frames `data` as `[len: u8][payload]...` records of version 2 with correct checksums; `groups`
/// bits start a new group commit at a record.
fn framed(data: &[u8], groups: u8) -> Vec<u8> {
    let mut out = SEGMENT_MAGIC.to_vec();
    out.extend_from_slice(&FIRST_SEQ.to_le_bytes());
    let (mut seq, mut group, mut rest) = (FIRST_SEQ, FIRST_SEQ, data);
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (payload, tail) = tail.split_at(n);
        rest = tail;
        if groups & (1 << (seq % 8)) != 0 {
            group = seq;
        }
        let mut header = Vec::with_capacity(24);
        header.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        header.extend_from_slice(&seq.to_le_bytes());
        header.extend_from_slice(&group.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.update(payload);
        header.extend_from_slice(&crc.finalize().to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(payload);
        seq += 1;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        framed(rest, mode >> 1)
    };
    let dir = scratch();
    let path = dir.join(segment_file_name(FIRST_SEQ));
    std::fs::write(&path, &bytes).expect("write segment");

    if let Ok(mut reader) = SegmentReader::open(&path, FIRST_SEQ) {
        let mut expected_seq = FIRST_SEQ;
        while let Some(info) = reader.next_record().expect("reading a file on disk") {
            assert_eq!(info.seq, expected_seq);
            expected_seq += 1;
            let payload_len = reader.payload().len();
            assert!(payload_len > 0 && payload_len <= MAX_PAYLOAD_BYTES as usize);
            // Either decodes or is an error; never a panic.
            let decoded = reader.decode::<Command>();
            let time = reader.decode_time();
            if let Ok((t, _)) = &decoded {
                assert_eq!(time.as_ref().ok(), Some(t));
            }
        }
        assert!(reader.valid_len() <= bytes.len() as u64);
        if reader.zero_tail() {
            // Preallocated space: only zeros after the valid prefix, and no defect.
            assert_eq!(reader.defect(), None);
            assert!(bytes[reader.valid_len() as usize..].iter().all(|&b| b == 0));
        } else if reader.defect().is_none() {
            assert_eq!(reader.valid_len(), bytes.len() as u64);
        }
    }
    // The operator's check (and recovery's decision) on the same directory.
    let _ = check_journal(dir);
});
