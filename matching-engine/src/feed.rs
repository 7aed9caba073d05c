//! Order feeds for replay and benchmarks: the QuantCup CSV format and a seeded generator of
//! feeds of the same shape.
//!
//! The QuantCup 2011 feed (`trader_id,side,price,qty`, one message a row after an optional
//! header) is the one public feed on which several matching engines have published figures:
//! * `price > 0`: a new limit order; `side` is `Bid` or `Ask`, `price` in ticks, `qty` in lots.
//!   Limits are numbered 1, 2, 3, ... in the order they appear.
//! * `price == 0`: a cancel; `qty` is the number of the order to cancel. It may be filled
//!   already, or not placed yet: then the cancel does nothing.
//!
//! Like the rest of this crate, the module does no I/O: [`parse`] takes the text, the caller
//! reads the file.

use crate::book::{Book, BookFullError, Fill};
use crate::units::{OrderId, Price, Qty, Side};
use std::fmt;

/// One message of a feed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeedMsg {
    /// A new limit order.
    Limit {
        /// The order's number in the feed (1, 2, 3, ... in order of appearance).
        id: OrderId,
        /// The trader who sent it (informational; the books do not use it).
        trader: u32,
        /// Buy or sell.
        side: Side,
        /// Limit price in ticks, at least 1.
        price: Price,
        /// Quantity in lots, at least 1.
        qty: Qty,
    },
    /// Cancel the order with this number (a no-op when it is not resting).
    Cancel {
        /// The order's number in the feed.
        id: OrderId,
    },
}

/// The header row of a QuantCup feed (accepted, not required, as the first line).
pub const HEADER: &str = "trader_id,side,price,qty";

/// What is wrong with one line of a feed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FeedLineError {
    /// Not exactly four comma-separated fields.
    FieldCount(usize),
    /// The trader id is not a `u32`.
    Trader(String),
    /// The side is neither `Bid` nor `Ask`.
    Side(String),
    /// The price is not a `u64`.
    Price(String),
    /// The quantity (or, for a cancel, the order number) is not a `u64`.
    Qty(String),
    /// A limit order with quantity zero.
    ZeroQty,
    /// A cancel of order number zero (orders are numbered from 1).
    ZeroOrder,
}

impl fmt::Display for FeedLineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FieldCount(n) => write!(f, "expected 4 fields, found {n}"),
            Self::Trader(s) => write!(f, "trader id {s:?} is not an unsigned integer"),
            Self::Side(s) => write!(f, "side {s:?} is neither \"Bid\" nor \"Ask\""),
            Self::Price(s) => write!(f, "price {s:?} is not an unsigned integer"),
            Self::Qty(s) => write!(f, "quantity {s:?} is not an unsigned integer"),
            Self::ZeroQty => f.write_str("limit order with quantity zero"),
            Self::ZeroOrder => f.write_str("cancel of order number zero"),
        }
    }
}

/// A feed that does not parse: the 1-based line number and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
#[non_exhaustive]
pub struct ParseFeedError {
    /// 1-based line number in the text.
    pub line: usize,
    /// What is wrong with the line.
    pub reason: FeedLineError,
}

/// Parses a QuantCup feed. Blank lines are skipped; a first line equal to [`HEADER`] is skipped.
pub fn parse(text: &str) -> Result<Vec<FeedMsg>, ParseFeedError> {
    let mut msgs = Vec::with_capacity(text.len() / 14);
    let mut next_id = 1u64;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || (i == 0 && line == HEADER) {
            continue;
        }
        let msg = parse_line(line, next_id).map_err(|reason| ParseFeedError {
            line: i + 1,
            reason,
        })?;
        if let FeedMsg::Limit { .. } = msg {
            next_id += 1;
        }
        msgs.push(msg);
    }
    Ok(msgs)
}

fn parse_line(line: &str, next_id: u64) -> Result<FeedMsg, FeedLineError> {
    let mut fields = [""; 4];
    let mut n = 0;
    for field in line.split(',') {
        if n < 4 {
            fields[n] = field.trim();
        }
        n += 1;
    }
    if n != 4 {
        return Err(FeedLineError::FieldCount(n));
    }
    let [trader, side, price, qty] = fields;
    let trader: u32 = trader
        .parse()
        .map_err(|_| FeedLineError::Trader(trader.to_owned()))?;
    let side = match side {
        "Bid" => Side::Buy,
        "Ask" => Side::Sell,
        other => return Err(FeedLineError::Side(other.to_owned())),
    };
    let price: u64 = price
        .parse()
        .map_err(|_| FeedLineError::Price(price.to_owned()))?;
    let qty: u64 = qty
        .parse()
        .map_err(|_| FeedLineError::Qty(qty.to_owned()))?;
    if price == 0 {
        if qty == 0 {
            return Err(FeedLineError::ZeroOrder);
        }
        return Ok(FeedMsg::Cancel { id: OrderId(qty) });
    }
    if qty == 0 {
        return Err(FeedLineError::ZeroQty);
    }
    Ok(FeedMsg::Limit {
        id: OrderId(next_id),
        trader,
        side,
        price: Price(price),
        qty: Qty(qty),
    })
}

/// Writes a feed in the QuantCup format, header included; [`parse`] reads it back unchanged.
pub fn to_csv(msgs: &[FeedMsg]) -> String {
    use fmt::Write as _;
    let mut out = String::with_capacity(HEADER.len() + 1 + msgs.len() * 16);
    out.push_str(HEADER);
    out.push('\n');
    for m in msgs {
        // Writing to a String cannot fail.
        let _ = match *m {
            FeedMsg::Limit {
                trader,
                side,
                price,
                qty,
                ..
            } => {
                let side = if side == Side::Buy { "Bid" } else { "Ask" };
                writeln!(out, "{trader},{side},{price},{qty}")
            }
            FeedMsg::Cancel { id } => writeln!(out, "0,Bid,0,{id}"),
        };
    }
    out
}

/// Size facts about a feed, for sizing a book before a replay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeedStats {
    /// Number of limit orders (an upper bound on the orders resting at once).
    pub limits: u32,
    /// Number of cancels.
    pub cancels: u32,
    /// The highest limit price (0 when there is no limit).
    pub max_price: Price,
}

impl FeedStats {
    /// Counts a feed.
    pub fn of(msgs: &[FeedMsg]) -> Self {
        let mut s = Self::default();
        for m in msgs {
            match *m {
                FeedMsg::Limit { price, .. } => {
                    s.limits += 1;
                    s.max_price = s.max_price.max(price);
                }
                FeedMsg::Cancel { .. } => s.cancels += 1,
            }
        }
        s
    }

    /// An empty book that can replay the feed without running out of room.
    pub fn book(&self) -> Book<()> {
        Book::new(Price(self.max_price.0.max(1)), self.limits)
    }
}

/// What a replay traded: compare it across order books to check they did the same work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Number of fills (one per maker order touched).
    pub fills: u64,
    /// Total quantity filled, in lots.
    pub filled_qty: u64,
    /// Cancels that removed a resting order.
    pub cancelled: u64,
}

impl Tally {
    /// Counts one fill.
    #[inline]
    pub fn add_fill(&mut self, qty: u64) {
        self.fills += 1;
        self.filled_qty += qty;
    }
}

/// Replays `msgs` on `book` with [`Book::limit`] and [`Book::cancel`] and tallies the fills.
/// Allocates nothing when the book is sized by [`FeedStats::book`] and its level pages exist.
pub fn replay(book: &mut Book<()>, msgs: &[FeedMsg]) -> Result<Tally, BookFullError> {
    let mut tally = Tally::default();
    for m in msgs {
        match *m {
            FeedMsg::Limit {
                id,
                side,
                price,
                qty,
                ..
            } => {
                book.limit(id, side, price, qty, (), |f: Fill| tally.add_fill(f.qty.0))?;
            }
            FeedMsg::Cancel { id } => {
                if book.cancel(id).is_some() {
                    tally.cancelled += 1;
                }
            }
        }
    }
    Ok(tally)
}

/// SplitMix64: a tiny, well-mixed deterministic generator (Steele, Lea and Flood, 2014).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`), by multiply-shift (bias below 2^-32 for the small `n` here).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// True with probability `percent / 100`.
    #[inline]
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Mid price of generated feeds, in ticks (the QuantCup feed trades 4799..=4846).
pub const GEN_MID: Price = Price(4822);

/// Quantities of generated limits, as in the QuantCup feed: mostly round lots of 100..2000.
const GEN_QTYS: [u64; 12] = [
    100, 100, 100, 200, 200, 300, 400, 500, 500, 1000, 1000, 2000,
];

/// A feed of `messages` messages with the QuantCup feed's shape, the same for the same seed:
/// half limits, half cancels; ten traders; bids in `mid-24..=mid+4` and asks in
/// `mid-4..=mid+24` so that some limits cross; cancels name an order number within 1,000 of the
/// latest (so about half name an order not placed yet and do nothing, as in the original).
pub fn generate(seed: u64, messages: usize) -> Vec<FeedMsg> {
    let mut rng = SplitMix64::new(seed);
    let mut msgs = Vec::with_capacity(messages);
    let mut last_id = 0u64;
    while msgs.len() < messages {
        if last_id == 0 || rng.percent(50) {
            last_id += 1;
            let side = if rng.percent(50) {
                Side::Buy
            } else {
                Side::Sell
            };
            let offset = rng.below(29);
            let price = match side {
                Side::Buy => GEN_MID.0 - 24 + offset,
                Side::Sell => GEN_MID.0 - 4 + offset,
            };
            let qty = GEN_QTYS[rng.below(GEN_QTYS.len() as u64) as usize];
            msgs.push(FeedMsg::Limit {
                id: OrderId(last_id),
                trader: rng.below(10) as u32,
                side,
                price: Price(price),
                qty: Qty(qty),
            });
        } else {
            let target = (last_id + rng.below(2001)).saturating_sub(1000).max(1);
            msgs.push(FeedMsg::Cancel {
                id: OrderId(target),
            });
        }
    }
    msgs
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "trader_id,side,price,qty\n\
        8,Bid,4799,500\n\
        4,Ask,4800,800\n\
        7,Bid,0,2\n\
        \n\
        1, Ask ,4801 ,100\r\n";

    #[test]
    fn parses_limits_numbered_in_order_and_cancels_by_number() {
        let msgs = parse(GOOD).unwrap();
        assert_eq!(
            msgs,
            vec![
                FeedMsg::Limit {
                    id: OrderId(1),
                    trader: 8,
                    side: Side::Buy,
                    price: Price(4799),
                    qty: Qty(500)
                },
                FeedMsg::Limit {
                    id: OrderId(2),
                    trader: 4,
                    side: Side::Sell,
                    price: Price(4800),
                    qty: Qty(800)
                },
                FeedMsg::Cancel { id: OrderId(2) },
                FeedMsg::Limit {
                    id: OrderId(3),
                    trader: 1,
                    side: Side::Sell,
                    price: Price(4801),
                    qty: Qty(100)
                },
            ]
        );
        let stats = FeedStats::of(&msgs);
        assert_eq!(
            stats,
            FeedStats {
                limits: 3,
                cancels: 1,
                max_price: Price(4801)
            }
        );
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(parse(HEADER).unwrap(), vec![]);
    }

    #[test]
    fn bad_lines_name_their_line_and_reason() {
        let cases: &[(&str, &str, usize, FeedLineError)] = &[
            (
                "too few fields",
                "1,Bid,4799",
                2,
                FeedLineError::FieldCount(3),
            ),
            (
                "too many fields",
                "1,Bid,4799,1,1",
                2,
                FeedLineError::FieldCount(5),
            ),
            (
                "bad trader",
                "x,Bid,4799,1",
                2,
                FeedLineError::Trader("x".into()),
            ),
            (
                "negative trader",
                "-1,Bid,4799,1",
                2,
                FeedLineError::Trader("-1".into()),
            ),
            (
                "bad side",
                "1,Buy,4799,1",
                2,
                FeedLineError::Side("Buy".into()),
            ),
            (
                "bad price",
                "1,Bid,47.99,1",
                2,
                FeedLineError::Price("47.99".into()),
            ),
            (
                "bad qty",
                "1,Ask,4799,",
                2,
                FeedLineError::Qty(String::new()),
            ),
            ("zero qty", "1,Ask,4799,0", 2, FeedLineError::ZeroQty),
            (
                "cancel of order 0",
                "1,Ask,0,0",
                2,
                FeedLineError::ZeroOrder,
            ),
        ];
        for (name, line, at, reason) in cases {
            let text = format!("{HEADER}\n{line}\n1,Bid,1,1\n");
            let err = parse(&text).expect_err(name);
            assert_eq!((err.line, &err.reason), (*at, reason), "{name}");
        }
        // A header anywhere but on the first line is a bad line.
        let err = parse(&format!("1,Bid,1,1\n{HEADER}\n")).unwrap_err();
        assert_eq!(err.line, 2);
        assert_eq!(
            err.to_string(),
            "line 2: trader id \"trader_id\" is not an unsigned integer"
        );
    }

    #[test]
    fn generator_is_deterministic_and_has_the_feed_shape() {
        let a = generate(7, 10_000);
        assert_eq!(a, generate(7, 10_000));
        assert_ne!(a, generate(8, 10_000));
        assert_eq!(generate(7, 100), a[..100]);
        assert_eq!(a.len(), 10_000);
        let stats = FeedStats::of(&a);
        assert!((4_500..=5_500).contains(&stats.limits), "{stats:?}");
        assert!(stats.max_price <= Price(GEN_MID.0 + 24));
        assert_eq!(parse(&to_csv(&a)).unwrap(), a, "csv round trip");
        let mut book = stats.book();
        let tally = replay(&mut book, &a).unwrap();
        assert!(tally.fills > 100 && tally.cancelled > 100, "{tally:?}");
        book.check_invariants();
    }

    #[test]
    fn replay_tallies_fills_and_cancels() {
        let msgs = parse(GOOD).unwrap();
        let mut book = FeedStats::of(&msgs).book();
        let tally = replay(&mut book, &msgs).unwrap();
        // Order 2 (ask 800 @ 4800) rests, is cancelled; order 3 rests; nothing crosses.
        assert_eq!(
            tally,
            Tally {
                fills: 0,
                filled_qty: 0,
                cancelled: 1
            }
        );
        let mut book = Book::new(Price(10), 4);
        let crossing = [
            FeedMsg::Limit {
                id: OrderId(1),
                trader: 0,
                side: Side::Sell,
                price: Price(5),
                qty: Qty(3),
            },
            FeedMsg::Limit {
                id: OrderId(2),
                trader: 0,
                side: Side::Buy,
                price: Price(6),
                qty: Qty(5),
            },
            FeedMsg::Cancel { id: OrderId(1) },
            FeedMsg::Cancel { id: OrderId(2) },
        ];
        let tally = replay(&mut book, &crossing).unwrap();
        assert_eq!(
            tally,
            Tally {
                fills: 1,
                filled_qty: 3,
                cancelled: 1
            }
        );
        assert!(book.is_empty());
    }
}
