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
    let w = generate(1, n);
    let mut engine = engine_after(&w.setup);
    let mut events = Vec::with_capacity(4096);
    let rejected = timed(&mut engine, &w.mix, w.setup.len() as u64, &mut events);
    println!("{n} commands, {rejected} rejected");
}
