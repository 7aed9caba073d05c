//! Property tests for the journal and snapshot decoders on damaged and arbitrary bytes, the
//! normal-suite companions of the `journal_record` and `snapshot` cargo-fuzz targets in `fuzz/`:
//! never a panic, only the valid prefix is read, and an inconsistent snapshot is an error.

use matching_engine::journal::{
    check_journal, segment_file_name, JournalWriter, SegmentReader, SEGMENT_MAGIC,
};
use matching_engine::snapshot::{read_snapshot, write_snapshot};
use matching_engine::{
    AccountId, Amount, AssetConfig, AssetId, Command, Engine, EngineConfig, IdempotencyKey, Limits,
    MarketConfig, Price, Qty, StateMachine, Timestamp,
};
use proptest::prelude::*;

fn engine() -> Engine {
    let asset = |s: &str| AssetConfig {
        symbol: s.into(),
        decimals: 8,
    };
    Engine::new(EngineConfig {
        assets: vec![asset("BTC"), asset("USD")],
        markets: vec![MarketConfig {
            symbol: "BTCUSD".into(),
            base: AssetId(0),
            quote: AssetId(1),
            lot_size: 1,
            tick_size: 1,
            min_qty: Qty(1),
            min_notional: Amount(1),
            min_price: Price(1),
            max_price: Price(10_000),
            max_qty: Qty(1_000),
            maker_fee_bps: 10,
            taker_fee_bps: 20,
        }],
        limits: Limits {
            max_orders_per_book: 100,
            max_open_orders_per_account: 10,
            max_accounts: 10,
        },
    })
    .expect("valid config")
}

/// An engine with one account, and its snapshot written in `dir`.
fn snapshot_of_one_account(dir: &std::path::Path) -> (Engine, std::path::PathBuf) {
    let mut e = engine();
    e.apply(&Command::CreateAccount, Timestamp(1), &mut Vec::new())
        .expect("create");
    let path = write_snapshot(dir, &e).expect("write");
    (e, path)
}

/// A segment of a few real commands, as the writer leaves it.
fn segment(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let mut w = JournalWriter::create(dir, 1).expect("create");
    let cmds = [
        Command::CreateAccount,
        Command::CreateAccount,
        Command::Credit {
            account: AccountId(1),
            asset: AssetId(1),
            amount: Amount(1_000),
            key: IdempotencyKey([7; 36]),
        },
    ];
    for (i, c) in cmds.iter().enumerate() {
        w.append(i as u64 + 1, Timestamp(i as u64), c)
            .expect("append");
        if i == 1 {
            w.sync().expect("sync");
        }
    }
    w.sync().expect("sync");
    let path = w.path().to_path_buf();
    drop(w);
    let bytes = std::fs::read(&path).expect("read");
    (path, bytes)
}

fn read_all(path: &std::path::Path) -> Option<(u64, u64)> {
    let mut r = SegmentReader::open(path, 1).ok()?;
    let mut n = 0;
    while r.next_record().expect("read").is_some() {
        let _ = r.decode::<Command>();
        let _ = r.decode_time();
        n += 1;
    }
    Some((n, r.valid_len()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn damaged_journal_segments_read_their_valid_prefix(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, mut bytes) = segment(dir.path());
        let (n_good, len_good) = read_all(&path).expect("intact");
        prop_assert_eq!(n_good, 3);
        for (at, x) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        std::fs::write(&path, &bytes).expect("write");
        if let Some((n, len)) = read_all(&path) {
            prop_assert!(n <= n_good && len <= len_good && len <= bytes.len() as u64);
        }
        let _ = check_journal(dir.path());
    }

    #[test]
    fn arbitrary_journal_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = SEGMENT_MAGIC.to_vec();
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&tail);
        let path = dir.path().join(segment_file_name(1));
        std::fs::write(&path, &bytes).expect("write");
        let _ = read_all(&path);
        let _ = check_journal(dir.path());
    }

    #[test]
    fn damaged_snapshots_are_refused_or_restore_exactly(
        flip in proptest::option::of((any::<prop::sample::Index>(), 1u8..)),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (e, path) = snapshot_of_one_account(dir.path());
        let mut bytes = std::fs::read(&path).expect("read");
        if let Some((at, x)) = flip {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        std::fs::write(&path, &bytes).expect("write");
        match read_snapshot::<Engine>(&path, e.seq()) {
            Ok(restored) => {
                prop_assert!(flip.is_none() && cut.is_none(), "damage went unnoticed");
                prop_assert_eq!(restored.state_hash(), e.state_hash());
            }
            Err(_) => prop_assert!(flip.is_some() || cut.is_some()),
        }
    }

    #[test]
    fn damaged_snapshot_payloads_restore_or_are_refused(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        junk in proptest::collection::vec(any::<u8>(), 0..100),
    ) {
        // Past the checksum: what `Engine::restore` sees when the header and hash are right.
        let mut e = engine();
        for _ in 0..2 {
            e.apply(&Command::CreateAccount, Timestamp(1), &mut Vec::new()).expect("create");
        }
        let mut payload = postcard::to_stdvec(&e.snapshot()).expect("encode");
        for (at, x) in &flips {
            let i = at.index(payload.len());
            payload[i] ^= x;
        }
        for bytes in [payload, junk] {
            if let Ok(snapshot) = postcard::from_bytes::<<Engine as StateMachine>::Snapshot>(&bytes) {
                if let Ok(restored) = Engine::restore(snapshot) {
                    prop_assert!(restored.validate().is_ok());
                    let again = Engine::restore(restored.snapshot()).expect("own snapshot");
                    prop_assert_eq!(again.state_hash(), restored.state_hash());
                }
            }
        }
    }
}

/// Found by the `snapshot` fuzz target: a snapshot (checksum intact) whose configuration asks for
/// an order arena of 2^32 orders made `Engine::restore` allocate it up front, and the process
/// aborted out of memory instead of refusing the snapshot (recovery then falls back to an older
/// one).
#[test]
fn a_snapshot_whose_books_do_not_fit_in_memory_is_refused() {
    let mut s = engine().snapshot();
    s.config.limits.max_orders_per_book = u32::MAX;
    assert!(Engine::restore(s).is_err());
}

/// The same bound on a configuration: books that would preallocate more than
/// `MAX_PREALLOCATED_BYTES` (an arena that large, or many markets with the widest price range)
/// are a configuration error, not an out-of-memory abort at start-up.
#[test]
fn a_config_whose_books_do_not_fit_in_memory_is_refused() {
    let base = engine().snapshot().config;
    let mut c = base.clone();
    c.limits.max_orders_per_book = u32::MAX;
    assert!(Engine::new(c).is_err());
    let mut c = base.clone();
    let mut wide = c.markets[0].clone();
    wide.max_price = Price(u64::from(u32::MAX));
    c.markets = vec![wide; 4_000];
    assert!(Engine::new(c).is_err());
    // The default configuration and the test one fit.
    Engine::new(EngineConfig::default()).expect("default");
    Engine::new(base).expect("test config");
}

/// Every byte of a snapshot's header is checked: any change to any one of them (each of the 255
/// values it can be XORed with) is refused. The version field was not covered by the checksum
/// before format 5: a format-4 snapshot whose version read 1, 2 or 3 (XOR 5, 6 or 7) was upgraded
/// as that older format and restored (`damaged_snapshots_are_refused_or_restore_exactly` found
/// it; its seed is in `decoders.proptest-regressions`).
#[test]
fn every_change_to_a_snapshot_header_byte_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (e, path) = snapshot_of_one_account(dir.path());
    let good = std::fs::read(&path).expect("read");
    for i in 0..matching_engine::snapshot::SNAPSHOT_HEADER_BYTES {
        for x in 1..=255u8 {
            let mut bytes = good.clone();
            bytes[i] ^= x;
            std::fs::write(&path, &bytes).expect("write");
            assert!(
                read_snapshot::<Engine>(&path, e.seq()).is_err(),
                "header byte {i} XOR {x} went unnoticed"
            );
        }
    }
    std::fs::write(&path, &good).expect("write");
    let restored: Engine = read_snapshot(&path, e.seq()).expect("the intact snapshot");
    assert_eq!(restored.state_hash(), e.state_hash());
}

/// A format-4 snapshot (what the build before format 5 wrote: the same payload, its checksum of
/// the payload only) still restores exactly; stamped format 5 with that checksum it is refused.
#[test]
fn a_format_4_snapshot_still_restores() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().expect("tempdir");
    let (e, path) = snapshot_of_one_account(dir.path());
    let mut bytes = std::fs::read(&path).expect("read");
    let n = matching_engine::snapshot::SNAPSHOT_HEADER_BYTES;
    let payload_hash = Sha256::digest(&bytes[n..]);
    bytes[8..12].copy_from_slice(&4u32.to_le_bytes());
    bytes[28..60].copy_from_slice(&payload_hash);
    std::fs::write(&path, &bytes).expect("write");
    let restored: Engine = read_snapshot(&path, e.seq()).expect("format 4");
    assert_eq!(restored.state_hash(), e.state_hash());
    bytes[8..12].copy_from_slice(&5u32.to_le_bytes());
    std::fs::write(&path, &bytes).expect("write");
    assert!(read_snapshot::<Engine>(&path, e.seq()).is_err());
}
