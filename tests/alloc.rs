//! No heap allocation per order in steady state: a counting global allocator shows that replaying
//! a feed on a book created and warmed up beforehand allocates nothing.
//!
//! Where a fresh [`Book`] does allocate: `Book::new` allocates the order arena (`capacity`
//! slots), the page table and the upper bitmap layers, and reserves the id index for
//! `min(capacity, 4096)` orders. Later, on the order path: each price-level page of 4,096 levels
//! the first time a price in it is used (two allocations), and the id index when more orders
//! rest at once than it has room for (a doubling and rehash, a few times at most). Warming up
//! (one replay, then cancelling everything) does both; the index never shrinks, so a replay after
//! that allocates zero times.

// Reason: `#[global_allocator]` needs an `unsafe impl GlobalAlloc`. This one only forwards each
// call unchanged to `std::alloc::System` and counts it in a thread-local counter; the safety
// contract is the caller's and `System`'s, which we pass through as is.
#![allow(unsafe_code)]

#[path = "../benches/support/exchange_mix.rs"]
mod exchange_mix;

use matching_engine::book::Book;
use matching_engine::feed::{self, FeedMsg, FeedStats};
use matching_engine::units::OrderId;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

struct Counting;

thread_local! {
    /// Allocations (alloc, alloc_zeroed, realloc) made by this thread. Per thread, so that tests
    /// running in parallel and the harness do not disturb each other's counts.
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: the thread-local may already be gone while a thread shuts down.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above; `ptr` came from this allocator, that is from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by this thread while running `f`.
fn allocations<R>(f: impl FnOnce() -> R) -> (u64, R) {
    let before = ALLOCS.with(Cell::get);
    let r = f();
    (ALLOCS.with(Cell::get) - before, r)
}

/// The feeds to check: a generated one always, the shared QuantCup feed when it is there.
fn feeds() -> Vec<(String, Vec<FeedMsg>)> {
    let mut feeds = vec![("generated".to_owned(), feed::generate(5, 40_000))];
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/quantcup-orders.csv"
    );
    if let Ok(text) = std::fs::read_to_string(path) {
        feeds.push((
            "quantcup".to_owned(),
            feed::parse(&text).expect("shared feed parses"),
        ));
    }
    feeds
}

/// Level pages of 4,096 prices that a feed's limits touch.
fn pages_used(msgs: &[FeedMsg]) -> usize {
    let pages: BTreeSet<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            FeedMsg::Limit { price, .. } => Some(price.0 >> 12),
            FeedMsg::Cancel { .. } => None,
        })
        .collect();
    pages.len()
}

/// Doublings of the id index from 4,096 to the most orders resting at once in these feeds.
const INDEX_GROWTHS_MAX: u64 = 4;

fn cancel_all(book: &mut Book<()>, limits: u32) {
    for id in 1..=u64::from(limits) {
        book.cancel(OrderId(id));
    }
    assert!(book.is_empty());
}

#[test]
fn book_replay_allocates_nothing_after_warm_up() {
    for (name, msgs) in feeds() {
        let stats = FeedStats::of(&msgs);
        let mut book = stats.book();

        // A fresh book allocates its level pages, once each (two allocations a page: the `Page`
        // box and its boxed slice of levels), and grows its id index a few times at most.
        let (first, tally) = allocations(|| feed::replay(&mut book, &msgs).unwrap());
        let pages = pages_used(&msgs) as u64;
        assert!(
            (1..=2 * pages + INDEX_GROWTHS_MAX).contains(&first),
            "{name}: {first} allocations, {pages} pages"
        );
        let (n, ()) = allocations(|| cancel_all(&mut book, stats.limits));
        assert_eq!(n, 0, "{name}: cancelling everything");

        // Steady state: every further replay allocates zero times, so zero per message.
        for round in 0..3 {
            let (n, again) = allocations(|| feed::replay(&mut book, &msgs).unwrap());
            assert_eq!(
                n,
                0,
                "{name}: round {round}: {n} allocations for {} msgs",
                msgs.len()
            );
            assert_eq!(again, tally, "{name}: same fills every round");
            cancel_all(&mut book, stats.limits);
        }
        book.check_invariants();
    }
}

#[test]
fn the_counter_sees_allocations() {
    let (n, v) = allocations(|| vec![1u8; 16]);
    assert_eq!((n, v.len()), (1, 16));
}

#[test]
fn engine_mix_allocates_nothing_after_warm_up() {
    // Warm up on the first half of the mix (level pages, the events `Vec`, scratch buffers reach
    // their working sizes), then count every command of the second half.
    const HALF: usize = 20_000;
    let w = exchange_mix::generate(3, 2 * HALF);
    let (warm, steady) = w.mix.split_at(HALF);
    let mut engine = exchange_mix::engine_after(&w.setup);
    let mut events = Vec::with_capacity(4096);
    let first = w.setup.len() as u64;
    exchange_mix::apply_all(&mut engine, warm, first, &mut events);

    let mut by_kind = BTreeMap::<exchange_mix::Kind, (u64, u64)>::new();
    let mut rejects = BTreeMap::new();
    for (i, cmd) in steady.iter().enumerate() {
        let now = matching_engine::Timestamp(exchange_mix::T0.0 + first + (HALF + i) as u64);
        let (n, r) = allocations(|| {
            events.clear();
            engine.apply(cmd, now, &mut events)
        });
        let e = by_kind.entry(exchange_mix::kind(cmd)).or_default();
        e.0 += 1;
        e.1 += n;
        if let Err(code) = r {
            *rejects.entry(format!("{code:?}")).or_insert(0u32) += 1;
        }
    }
    engine.check_invariants();
    let total: u64 = by_kind.values().map(|&(_, n)| n).sum();
    assert_eq!(
        total, 0,
        "(commands, allocations) by kind: {by_kind:?}; rejects {rejects:?}"
    );
    let book = engine.book(matching_engine::MarketId(0)).unwrap();
    assert!(
        (500..2_000).contains(&book.len()),
        "book keeps its size: {}",
        book.len()
    );
}
