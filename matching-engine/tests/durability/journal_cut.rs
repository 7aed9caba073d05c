//! Cut or damage the journal anywhere: recovery gives exactly the state of the longest prefix of
//! whole records, and cuts the file there.

use crate::bank::{workload, Bank, BankCmd};
use matching_engine::journal::{segment_file_name, TailDefect, SEGMENT_HEADER_BYTES};
use matching_engine::recovery::{Recovered, Store, StoreConfig};
use matching_engine::{StateMachine, Timestamp};
use std::fs::OpenOptions;
use std::path::Path;

fn genesis() -> Bank {
    Bank::new(4, 1)
}

fn open(dir: &Path) -> Recovered<Bank> {
    Store::open(dir, StoreConfig::default(), genesis).expect("recovers")
}

/// A journal written and synced one command at a time.
struct Written {
    /// The segment's bytes.
    bytes: Vec<u8>,
    /// `ends[k]`: file length after `k` accepted commands (`ends[0]` is the header).
    ends: Vec<u64>,
    /// `hashes[k]`: state hash after `k` accepted commands.
    hashes: Vec<[u8; 32]>,
}

fn write(cmds: &[BankCmd]) -> Written {
    let dir = tempfile::tempdir().unwrap();
    let Recovered {
        mut state,
        mut store,
        ..
    } = open(dir.path());
    let path = dir.path().join(segment_file_name(1));
    let mut ends = vec![SEGMENT_HEADER_BYTES];
    let mut hashes = vec![state.state_hash()];
    let mut events = Vec::new();
    for (i, cmd) in cmds.iter().enumerate() {
        let now = Timestamp(1_000 + i as u64);
        if state.apply(cmd, now, &mut events).is_ok() {
            store.append(state.seq(), now, cmd).unwrap();
            store.sync().unwrap();
            ends.push(std::fs::metadata(&path).unwrap().len());
            hashes.push(state.state_hash());
        }
    }
    Written {
        bytes: std::fs::read(&path).unwrap(),
        ends,
        hashes,
    }
}

/// Puts `bytes` as the only segment of a fresh directory.
fn dir_with(bytes: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(segment_file_name(1)), bytes).unwrap();
    dir
}

#[test]
fn cut_at_every_offset_recovers_the_longest_whole_prefix() {
    let cmds = workload(40, 0);
    let w = write(&cmds);
    assert!(w.ends.len() > 30, "most commands are accepted");
    assert_eq!(*w.ends.last().unwrap(), w.bytes.len() as u64);

    for cut in 0..=w.bytes.len() as u64 {
        let dir = dir_with(&w.bytes[..cut as usize]);
        let Recovered {
            mut state,
            mut store,
            report,
        } = open(dir.path());
        // The longest prefix of whole records that fits in `cut` bytes.
        let k = w.ends.iter().rposition(|&end| end <= cut).unwrap_or(0);
        assert_eq!(state.seq(), k as u64, "cut at {cut}");
        assert_eq!(state.state_hash(), w.hashes[k], "cut at {cut}");
        let path = dir.path().join(segment_file_name(1));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            w.ends[k],
            "cut at {cut}"
        );
        assert_eq!(report.replayed, k as u64);
        if cut >= SEGMENT_HEADER_BYTES {
            assert_eq!(report.truncated.is_some(), cut != w.ends[k], "cut at {cut}");
        }

        // The store goes on from the cut as if the lost commands had never been sent.
        if cut % 13 == 0 {
            let mut events = Vec::new();
            let extra = BankCmd::Deposit {
                account: 1,
                amount: 5,
                producer: 0,
                n: 1_000,
            };
            state.apply(&extra, Timestamp(9), &mut events).unwrap();
            store.append(state.seq(), Timestamp(9), &extra).unwrap();
            store.sync().unwrap();
            drop(store);
            let again = open(dir.path());
            assert_eq!(again.state.seq(), k as u64 + 1);
            assert_eq!(again.state.state_hash(), state.state_hash());
            assert_eq!(again.report.truncated, None);
        }
    }
}

#[test]
fn a_flipped_byte_in_the_last_record_is_detected() {
    let w = write(&workload(12, 0));
    let accepted = w.ends.len() - 1;
    let last_start = w.ends[accepted - 1];
    for at in last_start..w.bytes.len() as u64 {
        let mut bytes = w.bytes.clone();
        bytes[at as usize] ^= 0xA5;
        let dir = dir_with(&bytes);
        let r = open(dir.path());
        assert_eq!(r.state.seq(), accepted as u64 - 1, "flip at {at}");
        assert_eq!(r.state.state_hash(), w.hashes[accepted - 1], "flip at {at}");
        let tail = r.report.truncated.expect("the damage is reported");
        assert_eq!(tail.valid_len, last_start);
        assert!(
            matches!(
                tail.defect,
                TailDefect::BadChecksum | TailDefect::BadLength | TailDefect::ShortRecord
            ),
            "flip at {at}: {:?}",
            tail.defect
        );
        let len = std::fs::metadata(dir.path().join(segment_file_name(1)))
            .unwrap()
            .len();
        assert_eq!(len, last_start);
    }
}

#[test]
fn a_damaged_middle_record_ends_the_valid_prefix_there() {
    let w = write(&workload(12, 0));
    let mut bytes = w.bytes.clone();
    // Damage the payload of the fourth record.
    bytes[w.ends[3] as usize + 17] ^= 1;
    let dir = dir_with(&bytes);
    let r = open(dir.path());
    assert_eq!(r.state.seq(), 3);
    assert_eq!(r.state.state_hash(), w.hashes[3]);
    assert_eq!(r.report.truncated.unwrap().defect, TailDefect::BadChecksum);
}

#[test]
fn a_record_with_the_wrong_sequence_number_ends_the_valid_prefix() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut w = matching_engine::journal::JournalWriter::create(dir.path(), 1).unwrap();
        let cmd = BankCmd::Deposit {
            account: 0,
            amount: 1,
            producer: 0,
            n: 1,
        };
        w.append(1, Timestamp(1), &cmd).unwrap();
        w.sync().unwrap();
    }
    // Append a second, well-formed record numbered 3 by writing a segment for 3 and copying it.
    let other = tempfile::tempdir().unwrap();
    {
        let mut w = matching_engine::journal::JournalWriter::create(other.path(), 3).unwrap();
        let cmd = BankCmd::Deposit {
            account: 0,
            amount: 1,
            producer: 0,
            n: 2,
        };
        w.append(3, Timestamp(2), &cmd).unwrap();
        w.sync().unwrap();
    }
    let record = std::fs::read(other.path().join(segment_file_name(3))).unwrap();
    let path = dir.path().join(segment_file_name(1));
    let good_len = std::fs::metadata(&path).unwrap().len();
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, &record[SEGMENT_HEADER_BYTES as usize..]).unwrap();
    drop(f);
    let r = open(dir.path());
    assert_eq!(r.state.seq(), 1);
    assert_eq!(r.report.truncated.unwrap().defect, TailDefect::BadSeq);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
}
