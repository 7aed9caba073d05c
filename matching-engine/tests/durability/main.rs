//! Durability and concurrency tests of the journal, snapshots, recovery, sequencer and fan-out,
//! driven by a small deterministic bank (`bank.rs`).

mod bank;
mod bench;
mod crash;
mod engine;
mod fanout;
mod floor;
mod journal_cut;
mod recovery;
mod sequencer;
