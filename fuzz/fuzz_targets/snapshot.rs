//! Snapshot reading on any bytes: never a panic (the `StateMachine::restore` contract: an
//! inconsistent snapshot is an error). The first byte picks the input's shape: a raw snapshot
//! file, or a payload behind a valid header (so the decoder and `Engine::restore` see arbitrary
//! payloads past the checksum). A restored state is canonical: its snapshot restores to the same
//! state hash, and it passes its own invariant check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matching_engine::snapshot::{
    read_snapshot, snapshot_file_name, SNAPSHOT_HEADER_BYTES, SNAPSHOT_MAGIC, SNAPSHOT_VERSION,
};
use matching_engine::{Engine, StateMachine};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::OnceLock;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("mediator-fuzz-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    })
}

fn with_header(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + payload.len());
    out.extend_from_slice(&SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(payload));
    out.extend_from_slice(payload);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // The sequence number the header claims: the payload's own when it decodes (so a good
    // payload gets past the last check), else 0.
    let claimed = postcard::from_bytes::<<Engine as StateMachine>::Snapshot>(rest)
        .map(|s| Engine::restore(s).map(|e| e.seq()).unwrap_or(0))
        .unwrap_or(0);
    let (bytes, seq) = if mode & 1 == 0 {
        (rest.to_vec(), 0)
    } else {
        (with_header(claimed, rest), claimed)
    };
    let path = scratch().join(snapshot_file_name(seq));
    std::fs::write(&path, &bytes).expect("write snapshot");
    if let Ok(engine) = read_snapshot::<Engine>(&path, seq) {
        assert_eq!(engine.seq(), seq);
        engine
            .validate()
            .expect("a restored state passes its invariant check");
        let (hash, snapshot) = (engine.state_hash(), engine.snapshot());
        let encoded = postcard::to_stdvec(&snapshot).expect("encode");
        // One engine at a time: a book arena may take up to 1 GiB (MAX_PREALLOCATED_BYTES).
        drop(engine);
        let again = Engine::restore(snapshot).expect("a state's own snapshot restores");
        assert_eq!(again.state_hash(), hash);
        assert_eq!(
            postcard::to_stdvec(&again.snapshot()).expect("encode"),
            encoded
        );
    }
});
