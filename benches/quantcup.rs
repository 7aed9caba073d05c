//! The QuantCup feed replayed on our [`Book`] and on two public peers, `lobster` 0.7 and
//! `orderbook-rs` 0.15, in one criterion group with throughput in messages.
//!
//! Feed: `$MEDIATOR_FEED` if set (a path, or `seed:N` for a generated feed), else
//! `../shared/data/quantcup-orders.csv` next to the workspace, else a seeded feed of the same
//! shape ([`feed::generate`]).
//!
//! Run: `cargo bench --bench quantcup`. Besides criterion's time per replay and Melem/s
//! (ns/msg = 1e3 / Melem/s), it prints a table of ns/msg (best and median of 15 replays)
//! before the criterion group.
//!
//! Each iteration replays the whole, identical message list on a fresh book; building the book
//! (sized for the feed where the API allows) and dropping it afterwards are outside the timing,
//! and so is converting the messages to each API's types. Limits keep the feed's order number as
//! their id in every book, so a cancel names the same order everywhere.
//!
//! Before timing, each book replays the feed once and we print its fills, its filled quantity
//! and whether its fill sequence (maker, price, quantity, in order) is the same as ours; a peer
//! that differs is printed as a MISMATCH, not hidden.
//!
//! Peer notes (read from their sources):
//! * `lobster` returns a `Vec` of fills per matching order (an allocation per match) and cancels
//!   by a linear search of the level's queue; orders filled as makers stay in its id map until
//!   cancelled. `OrderBook::new(capacity, 10, false)` preallocates the order arena.
//! * `orderbook-rs` is a concurrent book (skip lists, dash maps, `Arc` orders, a submit gate) with
//!   no capacity to preallocate; it stamps each order with its clock, so it gets a `StubClock`
//!   (a counter) instead of reading the wall clock, which our book never does either.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use matching_engine::book::Book;
use matching_engine::feed::{self, FeedMsg, FeedStats, Tally};
use matching_engine::units::Side;
use orderbook_rs::prelude::{Id, StubClock, TimeInForce};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Seed and size of the generated feed used when no file is found.
const GEN_SEED: u64 = 2011;
const GEN_MESSAGES: usize = 35_759;

fn load_feed() -> (String, Vec<FeedMsg>) {
    let default = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/quantcup-orders.csv"
    );
    let var = std::env::var("MEDIATOR_FEED").ok();
    if let Some(seed) = var.as_deref().and_then(|v| v.strip_prefix("seed:")) {
        let seed = seed.parse().expect("MEDIATOR_FEED=seed:<u64>");
        return (
            format!("generated (seed {seed})"),
            feed::generate(seed, GEN_MESSAGES),
        );
    }
    let path = var.or_else(|| {
        std::path::Path::new(default)
            .exists()
            .then(|| default.to_owned())
    });
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read feed {path}: {e}"));
            let msgs = feed::parse(&text).unwrap_or_else(|e| panic!("bad feed {path}: {e}"));
            (path, msgs)
        }
        None => (
            format!("generated (seed {GEN_SEED})"),
            feed::generate(GEN_SEED, GEN_MESSAGES),
        ),
    }
}

/// Order-sensitive fingerprint of a fill sequence (maker order number, price, quantity), so the
/// check compares the fills themselves and their order, not only their count and sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint(u64);

impl Fingerprint {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn add(&mut self, maker: u64, price: u64, qty: u64) {
        for v in [maker, price, qty] {
            self.0 = (self.0 ^ v)
                .wrapping_mul(0x0000_0100_0000_01b3)
                .rotate_left(5);
        }
    }
}

// --- our book -----------------------------------------------------------------------------------

fn ours_replay(book: &mut Book<()>, msgs: &[FeedMsg]) -> Tally {
    feed::replay(book, msgs).expect("book sized for the feed")
}

fn ours_fingerprint(book: &mut Book<()>, msgs: &[FeedMsg]) -> Fingerprint {
    let mut fp = Fingerprint::new();
    for m in msgs {
        match *m {
            FeedMsg::Limit {
                id,
                side,
                price,
                qty,
                ..
            } => book
                .limit(id, side, price, qty, (), |f| {
                    fp.add(f.maker.0, f.price.0, f.qty.0)
                })
                .expect("book sized for the feed"),
            FeedMsg::Cancel { id } => {
                book.cancel(id);
            }
        }
    }
    fp
}

// --- lobster ------------------------------------------------------------------------------------

fn lobster_msgs(msgs: &[FeedMsg]) -> Vec<lobster::OrderType> {
    msgs.iter()
        .map(|m| match *m {
            FeedMsg::Limit {
                id,
                side,
                price,
                qty,
                ..
            } => lobster::OrderType::Limit {
                id: u128::from(id.0),
                side: match side {
                    Side::Buy => lobster::Side::Bid,
                    Side::Sell => lobster::Side::Ask,
                },
                qty: qty.0,
                price: price.0,
            },
            FeedMsg::Cancel { id } => lobster::OrderType::Cancel {
                id: u128::from(id.0),
            },
        })
        .collect()
}

fn lobster_book(stats: &FeedStats) -> lobster::OrderBook {
    lobster::OrderBook::new(stats.limits as usize, 10, false)
}

fn lobster_replay(book: &mut lobster::OrderBook, msgs: &[lobster::OrderType]) -> Tally {
    lobster_run(book, msgs, |_, _, _| {})
}

fn lobster_run(
    book: &mut lobster::OrderBook,
    msgs: &[lobster::OrderType],
    mut on_fill: impl FnMut(u64, u64, u64),
) -> Tally {
    let mut tally = Tally::default();
    for m in msgs {
        match book.execute(*m) {
            lobster::OrderEvent::Filled { fills, .. }
            | lobster::OrderEvent::PartiallyFilled { fills, .. } => {
                for f in &fills {
                    tally.add_fill(f.qty);
                    on_fill(f.order_2 as u64, f.price, f.qty);
                }
            }
            // lobster answers `Canceled` whether or not the order rested.
            _ => {}
        }
    }
    tally
}

// --- orderbook-rs -------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum ObMsg {
    Limit {
        id: Id,
        side: orderbook_rs::prelude::Side,
        price: u128,
        qty: u64,
    },
    Cancel {
        id: Id,
    },
}

fn ob_msgs(msgs: &[FeedMsg]) -> Vec<ObMsg> {
    msgs.iter()
        .map(|m| match *m {
            FeedMsg::Limit {
                id,
                side,
                price,
                qty,
                ..
            } => ObMsg::Limit {
                id: Id::Sequential(id.0),
                side: match side {
                    Side::Buy => orderbook_rs::prelude::Side::Buy,
                    Side::Sell => orderbook_rs::prelude::Side::Sell,
                },
                price: u128::from(price.0),
                qty: qty.0,
            },
            FeedMsg::Cancel { id } => ObMsg::Cancel {
                id: Id::Sequential(id.0),
            },
        })
        .collect()
}

type ObBook = orderbook_rs::OrderBook<()>;

fn ob_book() -> ObBook {
    ObBook::with_clock("QUANTCUP", Arc::new(StubClock::new()))
}

/// The timed replay: the plain submit and cancel calls, results only checked for errors.
fn ob_replay(book: &ObBook, msgs: &[ObMsg]) -> u64 {
    let mut errors = 0;
    for m in msgs {
        match *m {
            ObMsg::Limit {
                id,
                side,
                price,
                qty,
            } => {
                errors += u64::from(
                    book.add_limit_order(id, price, qty, side, TimeInForce::Gtc, None)
                        .is_err(),
                );
            }
            ObMsg::Cancel { id } => {
                errors += u64::from(book.cancel_order(id).is_err());
            }
        }
    }
    errors
}

/// The checking replay: the same calls in their result-returning form, tallied.
fn ob_tally(book: &ObBook, msgs: &[ObMsg]) -> (Tally, Fingerprint, u64) {
    let mut tally = Tally::default();
    let mut fp = Fingerprint::new();
    let mut errors = 0;
    for m in msgs {
        match *m {
            ObMsg::Limit {
                id,
                side,
                price,
                qty,
            } => {
                match book.add_limit_order_with_result(id, price, qty, side, TimeInForce::Gtc, None)
                {
                    Ok((_, Some(result))) => {
                        for t in result.match_result.trades().as_vec() {
                            let maker = match t.maker_order_id() {
                                Id::Sequential(n) => n,
                                _ => u64::MAX,
                            };
                            let price = u64::try_from(t.price().as_u128()).unwrap_or(u64::MAX);
                            tally.add_fill(t.quantity().as_u64());
                            fp.add(maker, price, t.quantity().as_u64());
                        }
                    }
                    Ok((_, None)) => {}
                    Err(_) => errors += 1,
                }
            }
            ObMsg::Cancel { id } => match book.cancel_order(id) {
                Ok(Some(_)) => tally.cancelled += 1,
                Ok(None) => {}
                Err(_) => errors += 1,
            },
        }
    }
    (tally, fp, errors)
}

// --- verification and benchmark -----------------------------------------------------------------

fn verify(msgs: &[FeedMsg], stats: &FeedStats) {
    let ours = ours_replay(&mut stats.book(), msgs);
    let ours_fp = ours_fingerprint(&mut stats.book(), msgs);
    let mut lob_fp = Fingerprint::new();
    let lob = lobster_run(&mut lobster_book(stats), &lobster_msgs(msgs), |m, p, q| {
        lob_fp.add(m, p, q)
    });
    let (ob, ob_fp, ob_errors) = ob_tally(&ob_book(), &ob_msgs(msgs));
    println!(
        "fill check ({} msgs): fills, lots filled, fill sequence (maker, price, qty)",
        msgs.len()
    );
    println!(
        "  ours          {:>8} fills {:>12} lots, {} cancels removed an order",
        ours.fills, ours.filled_qty, ours.cancelled
    );
    let peers = [
        (
            "lobster",
            lob,
            lob_fp,
            String::from(" (it does not say which cancels removed an order)"),
        ),
        (
            "orderbook-rs",
            ob,
            ob_fp,
            format!(
                ", {} cancels removed an order, {ob_errors} calls failed",
                ob.cancelled
            ),
        ),
    ];
    for (name, t, fp, note) in peers {
        let verdict = |same: bool| if same { "same" } else { "MISMATCH" };
        println!(
            "  {name:<13} {:>8} fills {:>12} lots: totals {}, sequence {}{note}",
            t.fills,
            t.filled_qty,
            verdict(t.fills == ours.fills && t.filled_qty == ours.filled_qty),
            verdict(fp == ours_fp),
        );
    }
}

/// Best and median time of `rounds` calls of `replay` (each on a fresh book from `fresh`), per
/// message, in tenths of a nanosecond.
fn best_median_tenths<B, R>(
    rounds: usize,
    msgs: usize,
    mut fresh: impl FnMut() -> B,
    mut replay: impl FnMut(&mut B) -> R,
) -> (u128, u128) {
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let mut book = fresh();
            let start = Instant::now();
            black_box(replay(&mut book));
            let t = start.elapsed();
            drop(black_box(book));
            t
        })
        .collect();
    times.sort_unstable();
    let n = msgs as u128;
    let tenths = |t: Duration| (t.as_nanos() * 10 + n / 2) / n;
    (tenths(times[0]), tenths(times[rounds / 2]))
}

/// A quick ns/msg table (criterion reports time per replay and messages per second).
fn ns_per_msg(msgs: &[FeedMsg], stats: &FeedStats, lob: &[lobster::OrderType], ob: &[ObMsg]) {
    const ROUNDS: usize = 15;
    let n = msgs.len();
    let rows = [
        (
            "mediator",
            best_median_tenths(ROUNDS, n, || stats.book(), |b| ours_replay(b, msgs)),
        ),
        (
            "lobster",
            best_median_tenths(
                ROUNDS,
                n,
                || lobster_book(stats),
                |b| lobster_replay(b, lob),
            ),
        ),
        (
            "orderbook-rs",
            best_median_tenths(ROUNDS, n, ob_book, |b| ob_replay(b, ob)),
        ),
    ];
    println!("ns/msg, {ROUNDS} fresh-book replays each:");
    println!("  {:<13} {:>8} {:>8}", "", "best", "median");
    let fmt = |t: u128| format!("{}.{}", t / 10, t % 10);
    for (name, (best, median)) in rows {
        println!("  {name:<13} {:>8} {:>8}", fmt(best), fmt(median));
    }
}

fn quantcup(c: &mut Criterion) {
    let (source, msgs) = load_feed();
    let stats = FeedStats::of(&msgs);
    println!(
        "feed: {source}: {} limits, {} cancels",
        stats.limits, stats.cancels
    );
    verify(&msgs, &stats);

    let lob = lobster_msgs(&msgs);
    let ob = ob_msgs(&msgs);
    ns_per_msg(&msgs, &stats, &lob, &ob);
    let mut group = c.benchmark_group("quantcup");
    group.throughput(Throughput::Elements(msgs.len() as u64));
    group.sample_size(30);
    group.bench_function("mediator", |b| {
        b.iter_batched(
            || stats.book(),
            |mut book| {
                black_box(ours_replay(&mut book, black_box(&msgs)));
                book
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("lobster", |b| {
        b.iter_batched(
            || lobster_book(&stats),
            |mut book| {
                black_box(lobster_replay(&mut book, black_box(&lob)));
                book
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("orderbook-rs", |b| {
        b.iter_batched(
            ob_book,
            |book| {
                black_box(ob_replay(&book, black_box(&ob)));
                book
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, quantcup);
criterion_main!(benches);
