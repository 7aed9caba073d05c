//! Market data for readers that must never lock or slow the engine.
//!
//! A [`MarketDataPublisher`] runs beside the engine (on the engine thread after each durable batch,
//! or on a fan-out consumer): it keeps every market's aggregated depth from [`Event::Depth`] diffs
//! and the last trade from [`Event::Trade`], and publishes an immutable [`MarketSnapshot`] per
//! market through an `ArcSwap`. Readers ([`MarketDataReader`], cheap to clone, any thread) load
//! the current `Arc` without locks; a snapshot never changes once published.
//!
//! Architecture invariant: a published snapshot's levels equal the engine's book at the snapshot's
//! depth sequence number; a gap in the depth sequence is an error, never silently skipped.

use crate::engine::Engine;
use crate::event::Event;
use crate::units::{MarketId, Price, Qty, Side, Timestamp, TradeId};
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The last trade of a market.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastTrade {
    /// Trade id.
    pub trade: TradeId,
    /// Price.
    pub price: Price,
    /// Quantity.
    pub qty: Qty,
    /// The taker's side.
    pub taker_side: Side,
    /// Time of the command that made it.
    pub time: Timestamp,
}

/// An immutable view of one market.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MarketSnapshot {
    /// Depth sequence number this view is at.
    pub seq: u64,
    /// Bids, best first, at most the publisher's depth.
    pub bids: Vec<(Price, Qty)>,
    /// Asks, best first, at most the publisher's depth.
    pub asks: Vec<(Price, Qty)>,
    /// Last trade.
    pub last_trade: Option<LastTrade>,
}

impl MarketSnapshot {
    /// Best bid.
    pub fn best_bid(&self) -> Option<(Price, Qty)> {
        self.bids.first().copied()
    }
    /// Best ask.
    pub fn best_ask(&self) -> Option<(Price, Qty)> {
        self.asks.first().copied()
    }
}

/// A depth diff did not follow the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("depth sequence gap in market {market}: expected {expected}, got {got}")]
#[non_exhaustive]
pub struct DepthGapError {
    /// Market.
    pub market: MarketId,
    /// Sequence number expected.
    pub expected: u64,
    /// Sequence number received.
    pub got: u64,
}

#[derive(Debug, Default)]
struct DepthBook {
    bids: BTreeMap<Price, Qty>,
    asks: BTreeMap<Price, Qty>,
    seq: u64,
    last_trade: Option<LastTrade>,
    changed: bool,
}

/// Keeps depth from events and publishes snapshots. One writer.
#[derive(Debug)]
pub struct MarketDataPublisher {
    books: Vec<DepthBook>,
    slots: Arc<[ArcSwap<MarketSnapshot>]>,
    depth: usize,
    time: Timestamp,
}

/// Loads published snapshots, lock-free. Clone it into every reader thread.
#[derive(Debug, Clone)]
pub struct MarketDataReader {
    slots: Arc<[ArcSwap<MarketSnapshot>]>,
}

impl MarketDataReader {
    /// The current snapshot of a market (`None` for an unknown market).
    pub fn snapshot(&self, market: MarketId) -> Option<Arc<MarketSnapshot>> {
        self.slots.get(market.0 as usize).map(|s| s.load_full())
    }
    /// Number of markets.
    pub fn markets(&self) -> usize {
        self.slots.len()
    }
}

impl MarketDataPublisher {
    /// Starts from the engine's current books (e.g. right after recovery), publishing `depth`
    /// levels per side.
    pub fn from_engine(engine: &Engine, depth: usize) -> Self {
        let n = engine.config().markets.len();
        let books: Vec<DepthBook> = (0..n)
            .map(|i| {
                let m = MarketId(i as u16);
                let book = engine.book(m).expect("market exists");
                DepthBook {
                    bids: book.levels(Side::Buy).collect(),
                    asks: book.levels(Side::Sell).collect(),
                    seq: engine.depth_seq(m),
                    last_trade: engine.last_price(m).map(|price| LastTrade {
                        trade: TradeId(0),
                        price,
                        qty: Qty(0),
                        taker_side: Side::Buy,
                        time: engine.now(),
                    }),
                    changed: true,
                }
            })
            .collect();
        let slots: Arc<[ArcSwap<MarketSnapshot>]> = (0..n)
            .map(|_| ArcSwap::from_pointee(MarketSnapshot::default()))
            .collect();
        let mut p = Self {
            books,
            slots,
            depth,
            time: engine.now(),
        };
        p.publish();
        p
    }

    /// A reader of what this publisher publishes.
    pub fn reader(&self) -> MarketDataReader {
        MarketDataReader {
            slots: self.slots.clone(),
        }
    }

    /// Applies events (in engine order). Depth diffs must be gap-free per market.
    pub fn apply(&mut self, events: &[Event]) -> Result<(), DepthGapError> {
        for e in events {
            match *e {
                Event::Accepted { time, .. } => self.time = time,
                Event::Depth {
                    market,
                    seq,
                    side,
                    price,
                    qty,
                } => {
                    let b = &mut self.books[market.0 as usize];
                    if seq != b.seq + 1 {
                        return Err(DepthGapError {
                            market,
                            expected: b.seq + 1,
                            got: seq,
                        });
                    }
                    b.seq = seq;
                    let levels = match side {
                        Side::Buy => &mut b.bids,
                        Side::Sell => &mut b.asks,
                    };
                    if qty.is_zero() {
                        levels.remove(&price);
                    } else {
                        levels.insert(price, qty);
                    }
                    b.changed = true;
                }
                Event::Trade {
                    trade,
                    market,
                    price,
                    qty,
                    taker_side,
                    ..
                } => {
                    let b = &mut self.books[market.0 as usize];
                    b.last_trade = Some(LastTrade {
                        trade,
                        price,
                        qty,
                        taker_side,
                        time: self.time,
                    });
                    b.changed = true;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Publishes a new snapshot of every market that changed since the last publish.
    pub fn publish(&mut self) {
        for (i, b) in self.books.iter_mut().enumerate() {
            if !b.changed {
                continue;
            }
            b.changed = false;
            let snap = MarketSnapshot {
                seq: b.seq,
                bids: b
                    .bids
                    .iter()
                    .rev()
                    .take(self.depth)
                    .map(|(p, q)| (*p, *q))
                    .collect(),
                asks: b
                    .asks
                    .iter()
                    .take(self.depth)
                    .map(|(p, q)| (*p, *q))
                    .collect(),
                last_trade: b.last_trade,
            };
            self.slots[i].store(Arc::new(snap));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, NewOrder, OrderType, StpMode, TimeInForce};
    use crate::config::{BTC, USD};
    use crate::units::{AccountId, Amount, IdempotencyKey};
    use crate::EngineConfig;

    fn order(a: u32, side: Side, price: u64, qty: u64) -> Command {
        Command::NewOrder(NewOrder {
            account: AccountId(a),
            market: MarketId(0),
            side,
            order_type: OrderType::Limit {
                price: Price(price),
                qty: Qty(qty),
            },
            tif: TimeInForce::Gtc,
            post_only: false,
            stp: StpMode::None,
            client_id: None,
        })
    }

    #[test]
    fn published_snapshots_follow_the_engine_book() {
        let mut e = Engine::new(EngineConfig::default()).unwrap();
        let mut out = Vec::new();
        let mut now = 1;
        let mut run = |e: &mut Engine, c: Command, out: &mut Vec<Event>| {
            now += 1;
            e.apply(&c, Timestamp(now), out).unwrap();
        };
        for i in 1..=2u8 {
            run(&mut e, Command::CreateAccount, &mut out);
            for (asset, amount) in [(BTC, 100_000_000u64), (USD, 10_000_000 * 100_000_000)] {
                let key = IdempotencyKey::reference(&format!("{i}-{asset:?}"));
                let c = Command::Credit {
                    account: AccountId(u32::from(i)),
                    asset,
                    amount: Amount(amount),
                    key,
                };
                run(&mut e, c, &mut out);
            }
        }
        out.clear();
        let mut p = MarketDataPublisher::from_engine(&e, 10);
        let reader = p.reader();
        let before = reader.snapshot(MarketId(0)).unwrap();
        assert!(before.bids.is_empty() && before.asks.is_empty());
        for c in [
            order(1, Side::Buy, 5_000_000, 10),
            order(1, Side::Buy, 4_999_900, 5),
            order(2, Side::Sell, 5_000_100, 7),
            order(2, Side::Sell, 4_999_950, 12),
        ] {
            out.clear();
            run(&mut e, c, &mut out);
            p.apply(&out).unwrap();
            p.publish();
            let s = reader.snapshot(MarketId(0)).unwrap();
            let book = e.book(MarketId(0)).unwrap();
            assert_eq!(s.bids, book.levels(Side::Buy).collect::<Vec<_>>());
            assert_eq!(s.asks, book.levels(Side::Sell).collect::<Vec<_>>());
            assert_eq!(s.seq, e.depth_seq(MarketId(0)));
        }
        let s = reader.snapshot(MarketId(0)).unwrap();
        assert_eq!(
            s.last_trade.map(|t| (t.price, t.qty)),
            Some((Price(5_000_000), Qty(10)))
        );
        // The earlier snapshot is untouched: snapshots are immutable.
        assert!(before.bids.is_empty());
    }

    #[test]
    fn a_gap_in_depth_diffs_is_an_error() {
        let e = Engine::new(EngineConfig::default()).unwrap();
        let mut p = MarketDataPublisher::from_engine(&e, 5);
        let d = |seq| Event::Depth {
            market: MarketId(0),
            seq,
            side: Side::Buy,
            price: Price(10),
            qty: Qty(1),
        };
        p.apply(&[d(1)]).unwrap();
        assert_eq!(
            p.apply(&[d(3)]),
            Err(DepthGapError {
                market: MarketId(0),
                expected: 2,
                got: 3
            })
        );
    }

    #[test]
    fn readers_on_other_threads_see_whole_snapshots() {
        let e = Engine::new(EngineConfig::default()).unwrap();
        let mut p = MarketDataPublisher::from_engine(&e, 5);
        let reader = p.reader();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let s = reader.snapshot(MarketId(0)).unwrap();
                    // Each level i was published together with seq i: a torn view would differ.
                    if let Some(&(price, qty)) = s.bids.first() {
                        assert_eq!(price.0, s.seq);
                        assert_eq!(qty.0, s.seq);
                    }
                    assert!(s.seq >= seen, "snapshots go forward");
                    seen = s.seq;
                }
                seen
            })
        };
        for seq in 1..=20_000u64 {
            p.apply(&[Event::Depth {
                market: MarketId(0),
                seq,
                side: Side::Buy,
                price: Price(seq),
                qty: Qty(seq),
            }])
            .unwrap();
            p.publish();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = r.join().unwrap();
        assert!(seen <= 20_000);
        assert_eq!(reader_seq(&p), 20_000);
    }

    fn reader_seq(p: &MarketDataPublisher) -> u64 {
        p.reader().snapshot(MarketId(0)).unwrap().seq
    }
}
