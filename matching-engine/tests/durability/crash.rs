//! Property: whatever the workload, the snapshot cadence, the point where the last journal
//! segment is cut and whether the newest snapshot is damaged, recovery gives exactly the state
//! after the longest prefix of whole records, as a reference run recorded it.

use crate::bank::{Bank, BankCmd};
use matching_engine::journal::{list_segments, SegmentReader, SEGMENT_HEADER_BYTES};
use matching_engine::recovery::{Recovered, Store, StoreConfig};
use matching_engine::snapshot::list_snapshots;
use matching_engine::{StateMachine, Timestamp};
use proptest::prelude::*;
use std::fs::OpenOptions;

fn command() -> impl Strategy<Value = BankCmd> {
    (0u8..3, 0u32..4, 0u32..4, 1u64..50).prop_map(|(kind, a, b, amount)| match kind {
        0 | 1 => BankCmd::Deposit {
            account: a,
            amount,
            producer: 0,
            n: 0,
        },
        _ => BankCmd::Transfer {
            from: a,
            to: b,
            amount,
            producer: 0,
            n: 0,
        },
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn recovery_after_a_crash_matches_the_reference_run(
        cmds in prop::collection::vec(command(), 1..100),
        snapshot_every in 0u64..25,
        cut_per_mille in 0u64..=1000,
        damage_newest_snapshot in any::<bool>(),
        preallocate in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { snapshot_every, snapshots_kept: 2, preallocate };
        let genesis = || Bank::new(4, 1);
        let Recovered { mut state, mut store, .. } =
            Store::open(dir.path(), config, genesis).unwrap();
        let mut hashes = vec![state.state_hash()];
        let mut events = Vec::new();
        for (i, cmd) in cmds.iter().enumerate() {
            let now = Timestamp(i as u64 * 3 + 1);
            if state.apply(cmd, now, &mut events).is_ok() {
                store.append(state.seq(), now, cmd).unwrap();
                store.sync().unwrap();
                hashes.push(state.state_hash());
                if store.snapshot_due(state.seq()) {
                    store.snapshot(&state).unwrap();
                }
            }
        }
        drop(store);

        // Tear the last segment's written bytes somewhere, and find its whole records before
        // the tear. Without preallocation the file ends there (an append that did not reach the
        // disk); with it, zeros follow up to the preallocated end (an overwrite that did not).
        let (first_seq, last) = list_segments(dir.path()).unwrap().pop().unwrap();
        let file_len = std::fs::metadata(&last).unwrap().len();
        let mut reader = SegmentReader::open(&last, first_seq).unwrap();
        while reader.next_record().unwrap().is_some() {}
        let len = reader.valid_len();
        prop_assert_eq!(reader.zero_tail(), preallocate && file_len > len);
        let cut = len * cut_per_mille / 1000;
        let before = std::fs::read(&last).unwrap();
        let mut reader = SegmentReader::open(&last, first_seq).unwrap();
        let mut whole = 0;
        while reader.next_record().unwrap().is_some() {
            let end = reader.valid_len();
            // Zeroing the end of a record that already ends in zeros leaves it whole.
            let zeroed_intact = || {
                preallocate
                    && cut >= SEGMENT_HEADER_BYTES
                    && before[cut as usize..end as usize].iter().all(|&b| b == 0)
            };
            if end <= cut || zeroed_intact() {
                whole += 1;
            }
        }
        drop(reader);
        let file = OpenOptions::new().write(true).open(&last).unwrap();
        // A preallocated segment's header was synced before any zero followed it: a cut inside
        // the header is a crash while the segment was created, which leaves the file short.
        if preallocate && cut >= SEGMENT_HEADER_BYTES {
            use std::os::unix::fs::FileExt;
            let zeros = vec![0u8; (file_len - cut) as usize];
            file.write_all_at(&zeros, cut).unwrap();
        } else {
            file.set_len(cut).unwrap();
        }
        drop(file);

        if damage_newest_snapshot {
            if let Some((_, newest)) = list_snapshots(dir.path()).unwrap().pop() {
                let mut bytes = std::fs::read(&newest).unwrap();
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0x40;
                std::fs::write(&newest, &bytes).unwrap();
            }
        }

        let recovered = Store::open(dir.path(), config, genesis).unwrap();
        let expected = first_seq - 1 + whole;
        prop_assert_eq!(recovered.state.seq(), expected);
        prop_assert_eq!(recovered.state.state_hash(), hashes[expected as usize]);
        // Recovering again from what the first recovery left gives the same state.
        drop(recovered);
        let again = Store::open(dir.path(), config, genesis).unwrap();
        prop_assert_eq!(again.state.state_hash(), hashes[expected as usize]);
        prop_assert!(again.report.truncated.is_none());
    }
}
