//! A small driver of the exchange-mix workload for instruction counting (no criterion):
//! generates the workload, builds the engine, then applies the mix once inside `timed`.
//!
//! Run: `cargo build --profile bench -p matching-engine --example exchange_mix_profile`, then
//! `valgrind --tool=callgrind --toggle-collect='*timed*' target/release/examples/exchange_mix_profile 20000`
//! and divide the instructions collected by the command count.

#[path = "../../benches/support/exchange_mix.rs"]
#[allow(dead_code)]
mod exchange_mix;

use exchange_mix::{apply_all, engine_after, generate};
use matching_engine::{Command, Engine, Event};
use std::hint::black_box;

#[inline(never)]
fn timed(engine: &mut Engine, mix: &[Command], first: u64, events: &mut Vec<Event>) -> u64 {
    apply_all(engine, black_box(mix), first, events)
}

fn main() {
    let n = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000usize);
    let reps = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1usize);
    let w = generate(1, n);
    let mut events = Vec::with_capacity(4096);
    // With a repetition count, also the best wall time of `reps` runs on fresh engines (a quick
    // check between criterion runs; under valgrind, use 1).
    let mut best = std::time::Duration::MAX;
    let mut rejected = 0;
    for _ in 0..reps {
        let mut engine = engine_after(&w.setup);
        let start = std::time::Instant::now();
        rejected = timed(&mut engine, &w.mix, w.setup.len() as u64, &mut events);
        best = best.min(start.elapsed());
    }
    // Tenths of a nanosecond, in integers (the workspace lints float arithmetic).
    let tenths = best.as_nanos() * 10 / n.max(1) as u128;
    println!(
        "{n} commands, {rejected} rejected; best of {reps}: {}.{} ns per command",
        tenths / 10,
        tenths % 10
    );
}
