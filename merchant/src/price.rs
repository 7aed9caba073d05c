//! The reference price that sets the BTC amount of a quote-currency invoice and the worst price
//! a settlement conversion accepts.
//!
//! [`reference`] takes the last trade between two *different* accounts (a self-trade says
//! nothing about the market and costs its maker nothing), and only:
//! * when that trade is at most `max_trade_age_ms` old (else *stale*);
//! * when the book has a bid and an ask no more than `max_spread_bps` apart (relative to the
//!   mid; else *too wide*);
//! * when each side holds at least `min_depth_sat` within `max_spread_bps` of the mid (else *too
//!   thin*: one sweep of a thin book does not set a price);
//!
//! and clamps it into `[best bid, best ask]`. With an operator-configured external index
//! ([`IndexSource`]: a file or URL holding one decimal price), a reference more than
//! `index_max_deviation_bps` from the index, or an index that cannot be read or is stale, is
//! refused too. A refusal is `-1157` (503) naming the reason; nothing is created.
//!
//! The index is read through an [`IndexCache`]: one read (file or fetch) serves every caller for
//! `index_cache_ms` (capped by `index_max_age_ms`), concurrent callers wait for the one read in
//! flight (single flight), and a cached price is never used once its own age (a file's
//! modification time, or the fetch) passes `index_max_age_ms`. A failed read is cached too, so
//! an anonymous page (the point of sale) cannot make the server hit the index at request rate.
//!
//! [`worst_sell_ticks`] is the lowest price a conversion sells at: the reference less
//! `slippage_bps`, rounded up to the tick. The conversion is a limit IOC sell at that price, so
//! it never fills below it; what does not fill is retried on the next monitor tick.

use api::readmodel::MarketState;
use std::path::PathBuf;
use std::time::Duration;

/// Where the operator's external index price comes from: one decimal number (quote per BTC,
/// e.g. `50123.45`), whitespace around it ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexSource {
    /// A file the operator's own job rewrites; its modification time is the price's age.
    File(PathBuf),
    /// An `http(s)` URL answering the number (fetched at use, 2 s timeout, at most 64 bytes).
    Url(String),
}

/// The limits of [`reference`] and [`worst_sell_ticks`]. Defaults: trades up to 5 minutes old,
/// spread at most 2 %, 0.01 BTC a side, 1 % slippage, no index (index deviation 2 %, index age
/// 5 minutes, an index read reused for 2 s, when one is set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceLimits {
    /// The oldest last trade that still gives a price, in ms.
    pub max_trade_age_ms: u64,
    /// The widest spread (ask − bid, over the mid) in basis points; also the band in which
    /// depth is counted.
    pub max_spread_bps: u64,
    /// The least BTC (satoshis) each side of the book must hold within the band.
    pub min_depth_sat: u64,
    /// How far below the reference a conversion may sell, in basis points.
    pub slippage_bps: u64,
    /// The operator's external index, if any.
    pub index: Option<IndexSource>,
    /// The largest distance from the index, in basis points.
    pub index_max_deviation_bps: u64,
    /// The oldest index file that is used, in ms.
    pub index_max_age_ms: u64,
    /// How long one read of the index serves every caller ([`IndexCache`]), in ms; never
    /// longer than `index_max_age_ms`. `0` reads the index on every use.
    pub index_cache_ms: u64,
}

impl Default for PriceLimits {
    fn default() -> Self {
        Self {
            max_trade_age_ms: 5 * 60 * 1000,
            max_spread_bps: 200,
            min_depth_sat: 1_000_000,
            slippage_bps: 100,
            index: None,
            index_max_deviation_bps: 200,
            index_max_age_ms: 5 * 60 * 1000,
            index_cache_ms: 2_000,
        }
    }
}

/// Why there is no reference price. The messages end up in the `-1157` answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PriceError {
    /// No trade between two different accounts in the recent trades.
    #[error("no trade between two different accounts (self-trades are not counted)")]
    NoTrade,
    /// The last such trade is too old.
    #[error("the last trade is {age_s} s old (limit {limit_s} s)")]
    Stale {
        /// Its age.
        age_s: u64,
        /// The limit.
        limit_s: u64,
    },
    /// The book lacks a bid or an ask.
    #[error("the book has no bid or no ask")]
    OneSided,
    /// The spread is too wide.
    #[error("the spread is {spread_bps} bps (limit {limit_bps} bps)")]
    TooWide {
        /// The spread.
        spread_bps: u64,
        /// The limit.
        limit_bps: u64,
    },
    /// A side holds too little near the mid.
    #[error("the book is too thin: less than {min_sat} sat on each side within {band_bps} bps of the mid")]
    TooThin {
        /// The least depth.
        min_sat: u64,
        /// The band.
        band_bps: u64,
    },
    /// The external index cannot be read, does not parse, or is stale.
    #[error("the external index price is unavailable")]
    IndexUnavailable,
    /// The reference is too far from the index.
    #[error(
        "the market price is {deviation_bps} bps from the external index (limit {limit_bps} bps)"
    )]
    IndexDeviates {
        /// The distance.
        deviation_bps: u64,
        /// The limit.
        limit_bps: u64,
    },
}

/// The reference price in ticks of market `ms` at `now_ms` (see the module docs). `lot_sat` is
/// the market's lot size in satoshis.
pub fn reference(
    ms: &MarketState,
    lot_sat: u64,
    now_ms: u64,
    lim: &PriceLimits,
) -> Result<u64, PriceError> {
    let (Some((bid, _)), Some((ask, _))) = ms.best() else {
        return Err(PriceError::OneSided);
    };
    let (bid, ask) = (u128::from(bid.0), u128::from(ask.0));
    let mid = (bid + ask) / 2;
    if mid == 0 {
        return Err(PriceError::OneSided);
    }
    let spread_bps = (ask.saturating_sub(bid) * 10_000).div_ceil(mid);
    if spread_bps > u128::from(lim.max_spread_bps) {
        return Err(PriceError::TooWide {
            spread_bps: u64::try_from(spread_bps).unwrap_or(u64::MAX),
            limit_bps: lim.max_spread_bps,
        });
    }
    let band = mid * u128::from(lim.max_spread_bps) / 10_000;
    let (low, high) = (mid.saturating_sub(band), mid + band);
    let lots_bid: u128 = ms
        .bids
        .iter()
        .rev()
        .take_while(|(p, _)| u128::from(p.0) >= low)
        .map(|(_, q)| u128::from(q.0))
        .sum();
    let lots_ask: u128 = ms
        .asks
        .iter()
        .take_while(|(p, _)| u128::from(p.0) <= high)
        .map(|(_, q)| u128::from(q.0))
        .sum();
    let min = u128::from(lim.min_depth_sat);
    if lots_bid * u128::from(lot_sat) < min || lots_ask * u128::from(lot_sat) < min {
        return Err(PriceError::TooThin {
            min_sat: lim.min_depth_sat,
            band_bps: lim.max_spread_bps,
        });
    }
    let last = ms
        .trades
        .iter()
        .rev()
        .find(|t| t.maker_account != t.taker_account)
        .ok_or(PriceError::NoTrade)?;
    let age = now_ms.saturating_sub(last.time_ms);
    if age > lim.max_trade_age_ms {
        return Err(PriceError::Stale {
            age_s: age / 1000,
            limit_s: lim.max_trade_age_ms / 1000,
        });
    }
    let price = u128::from(last.price).clamp(bid, ask);
    Ok(u64::try_from(price).unwrap_or(u64::MAX))
}

/// Checks `rate` (quote units per BTC) against the index price `index` (same units).
pub fn check_index(rate: u64, index: u64, lim: &PriceLimits) -> Result<(), PriceError> {
    if index == 0 {
        return Err(PriceError::IndexUnavailable);
    }
    let deviation_bps = u128::from(rate.abs_diff(index)) * 10_000 / u128::from(index);
    if deviation_bps > u128::from(lim.index_max_deviation_bps) {
        return Err(PriceError::IndexDeviates {
            deviation_bps: u64::try_from(deviation_bps).unwrap_or(u64::MAX),
            limit_bps: lim.index_max_deviation_bps,
        });
    }
    Ok(())
}

/// The most bytes of an index file or answer that are read.
const MAX_INDEX_LEN: usize = 64;

/// Reads the index price in quote units (`decimals`) from `src`, refusing one older than
/// `max_age_ms` (a file's modification time). I/O: call from async code at the edge.
pub async fn read_index(
    src: &IndexSource,
    decimals: u8,
    max_age_ms: u64,
) -> Result<u64, PriceError> {
    read_index_aged(src, decimals, max_age_ms)
        .await
        .map(|(price, _)| price)
}

/// [`read_index`], with the price's age in ms when read (a file's; `0` for a fetch).
async fn read_index_aged(
    src: &IndexSource,
    decimals: u8,
    max_age_ms: u64,
) -> Result<(u64, u64), PriceError> {
    let (text, age_ms) = match src {
        IndexSource::File(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || -> Option<(String, u64)> {
                let meta = std::fs::metadata(&path).ok()?;
                let age = meta.modified().ok()?.elapsed().unwrap_or_default();
                if age > Duration::from_millis(max_age_ms) || meta.len() > MAX_INDEX_LEN as u64 {
                    return None;
                }
                let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
                std::fs::read_to_string(&path).ok().map(|t| (t, age_ms))
            })
            .await
            .ok()
            .flatten()
            .ok_or(PriceError::IndexUnavailable)?
        }
        IndexSource::Url(url) => (
            fetch_index(url).await.ok_or(PriceError::IndexUnavailable)?,
            0,
        ),
    };
    let price = api::decimal::parse_units(text.trim(), decimals)
        .map_err(|_| PriceError::IndexUnavailable)?;
    Ok((price, age_ms))
}

/// One read of the index, kept by [`IndexCache`].
#[derive(Debug, Clone)]
struct CachedIndex {
    decimals: u8,
    read: Result<u64, PriceError>,
    /// When it was read (the caller's clock).
    read_ms: u64,
    /// When the price itself was current: `read_ms` less its age.
    as_of_ms: u64,
}

/// The index price shared by every caller ([`IndexCache::get`]): at most one read per
/// `index_cache_ms`, and one at a time.
#[derive(Debug, Default)]
pub struct IndexCache {
    /// One entry per quote precision. Held across a read: callers wait for the read in flight
    /// instead of starting their own (single flight).
    slots: tokio::sync::Mutex<Vec<CachedIndex>>,
    reads: std::sync::atomic::AtomicU64,
}

impl IndexCache {
    /// The index price in quote units (`decimals`) at `now_ms`: the cached read while it is
    /// younger than `index_cache_ms` (capped by `index_max_age_ms`) and the price it holds is
    /// no older than `index_max_age_ms`; otherwise a new read, which is cached (a failure too).
    pub async fn get(
        &self,
        src: &IndexSource,
        decimals: u8,
        lim: &PriceLimits,
        now_ms: u64,
    ) -> Result<u64, PriceError> {
        let ttl_ms = lim.index_cache_ms.min(lim.index_max_age_ms);
        let mut slots = self.slots.lock().await;
        if let Some(c) = slots.iter().find(|c| c.decimals == decimals) {
            // A clock that went back (now before the read) does not extend a read's life.
            let fresh = now_ms
                .checked_sub(c.read_ms)
                .is_some_and(|since| since < ttl_ms);
            let young = c.read.is_err()
                || now_ms
                    .checked_sub(c.as_of_ms)
                    .is_some_and(|age| age <= lim.index_max_age_ms);
            if fresh && young {
                return c.read.clone();
            }
        }
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let read = read_index_aged(src, decimals, lim.index_max_age_ms).await;
        let entry = CachedIndex {
            decimals,
            read: read.as_ref().map(|(p, _)| *p).map_err(Clone::clone),
            read_ms: now_ms,
            as_of_ms: now_ms.saturating_sub(read.as_ref().map_or(0, |(_, age)| *age)),
        };
        slots.retain(|c| c.decimals != decimals);
        slots.push(entry.clone());
        entry.read
    }

    /// How many times the index was read (file or fetch) since start.
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }
}

async fn fetch_index(url: &str) -> Option<String> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let resp = client.get(url).send().await.ok()?;
    if !resp.status().is_success()
        || resp
            .content_length()
            .is_some_and(|n| n > MAX_INDEX_LEN as u64)
    {
        return None;
    }
    let body = resp.bytes().await.ok()?;
    if body.len() > MAX_INDEX_LEN {
        return None;
    }
    String::from_utf8(body.to_vec()).ok()
}

/// The lowest price, in ticks, a conversion sells at: `reference_ticks` less `slippage_bps`,
/// rounded up (never below the allowance), at least one tick.
pub fn worst_sell_ticks(reference_ticks: u64, slippage_bps: u64) -> u64 {
    let keep = 10_000u128.saturating_sub(u128::from(slippage_bps));
    let t = (u128::from(reference_ticks) * keep).div_ceil(10_000);
    u64::try_from(t).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::readmodel::TradeRec;
    use matching_engine::{Price, Qty, Side};

    const LOT: u64 = 1_000;

    fn trade(price: u64, maker: u32, taker: u32, time_ms: u64) -> TradeRec {
        TradeRec {
            id: 1,
            market: 0,
            price,
            qty: 1,
            quote: 0,
            taker_side: Side::Buy,
            maker_order: 1,
            taker_order: 2,
            maker_account: maker,
            taker_account: taker,
            maker_fee: 0,
            taker_fee: 0,
            time_ms,
        }
    }

    /// A book with `lots` at each of `bids` and `asks`, and `trades` (oldest first).
    fn book(bids: &[u64], asks: &[u64], lots: u64, trades: Vec<TradeRec>) -> MarketState {
        let mut ms = MarketState::default();
        for b in bids {
            ms.bids.insert(Price(*b), Qty(lots));
        }
        for a in asks {
            ms.asks.insert(Price(*a), Qty(lots));
        }
        ms.trades = trades.into();
        ms
    }

    #[test]
    fn reference_cases() {
        let lim = PriceLimits::default();
        let now = 1_000_000_000;
        // 0.01 BTC = 1,000 lots of 1,000 sat.
        let deep = 1_000;
        let cases: Vec<(&str, MarketState, Result<u64, PriceError>)> = vec![
            (
                "fresh trade inside a healthy book",
                book(
                    &[49_900],
                    &[50_100],
                    deep,
                    vec![trade(50_000, 1, 2, now - 1_000)],
                ),
                Ok(50_000),
            ),
            (
                "a trade outside the spread is clamped to it",
                book(&[49_900], &[50_100], deep, vec![trade(60_000, 1, 2, now)]),
                Ok(50_100),
            ),
            (
                "self-trades are skipped for the last real one",
                book(
                    &[49_900],
                    &[50_100],
                    deep,
                    vec![trade(49_950, 1, 2, now), trade(50_100, 3, 3, now)],
                ),
                Ok(49_950),
            ),
            (
                "only self-trades",
                book(&[49_900], &[50_100], deep, vec![trade(50_100, 3, 3, now)]),
                Err(PriceError::NoTrade),
            ),
            (
                "stale",
                book(
                    &[49_900],
                    &[50_100],
                    deep,
                    vec![trade(50_000, 1, 2, now - 301_000)],
                ),
                Err(PriceError::Stale {
                    age_s: 301,
                    limit_s: 300,
                }),
            ),
            (
                "no ask",
                book(&[49_900], &[], deep, vec![trade(50_000, 1, 2, now)]),
                Err(PriceError::OneSided),
            ),
            (
                "too wide",
                book(&[45_000], &[55_000], deep, vec![trade(50_000, 1, 2, now)]),
                Err(PriceError::TooWide {
                    spread_bps: 2_000,
                    limit_bps: 200,
                }),
            ),
            (
                "too thin",
                book(
                    &[49_900],
                    &[50_100],
                    deep - 1,
                    vec![trade(50_000, 1, 2, now)],
                ),
                Err(PriceError::TooThin {
                    min_sat: 1_000_000,
                    band_bps: 200,
                }),
            ),
            (
                "depth outside the band does not count",
                {
                    let mut ms = book(&[49_900], &[50_100], 1, vec![trade(50_000, 1, 2, now)]);
                    ms.bids.insert(Price(40_000), Qty(deep));
                    ms.asks.insert(Price(50_200), Qty(deep));
                    ms
                },
                Err(PriceError::TooThin {
                    min_sat: 1_000_000,
                    band_bps: 200,
                }),
            ),
        ];
        for (name, ms, want) in cases {
            assert_eq!(reference(&ms, LOT, now, &lim), want, "{name}");
        }
    }

    /// One read serves callers for `index_cache_ms`; a cached price is not used past
    /// `index_max_age_ms` of its own age, nor after the clock went back; failures are cached.
    #[tokio::test]
    async fn the_index_cache_reads_once_per_ttl_and_respects_the_max_age() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("index.txt");
        std::fs::write(&file, "50000\n").unwrap();
        let src = IndexSource::File(file.clone());
        let lim = PriceLimits {
            index_cache_ms: 1_000,
            index_max_age_ms: 60_000,
            ..PriceLimits::default()
        };
        let cache = IndexCache::default();
        let t = 1_000_000;
        assert_eq!(cache.get(&src, 2, &lim, t).await, Ok(5_000_000));
        std::fs::write(&file, "51000\n").unwrap();
        for dt in [0, 1, 999] {
            assert_eq!(
                cache.get(&src, 2, &lim, t + dt).await,
                Ok(5_000_000),
                "+{dt}"
            );
        }
        assert_eq!(cache.reads(), 1);
        // The TTL passed: read again.
        assert_eq!(cache.get(&src, 2, &lim, t + 1_000).await, Ok(5_100_000));
        assert_eq!(cache.reads(), 2);
        // Another precision is its own entry.
        assert_eq!(cache.get(&src, 0, &lim, t + 1_000).await, Ok(51_000));
        assert_eq!(cache.reads(), 3);
        // The clock went back: not served from the cache.
        cache.get(&src, 2, &lim, t).await.unwrap();
        assert_eq!(cache.reads(), 4);
        // A TTL beyond the max age is capped by it: the price is never older than allowed.
        // (The file's own age, from the real clock, counts too: the margin of 5 s keeps a slow
        // machine's milliseconds between writing the file and reading it out of the result.)
        let short = PriceLimits {
            index_cache_ms: 60_000,
            index_max_age_ms: 10_000,
            ..PriceLimits::default()
        };
        let cache = IndexCache::default();
        cache.get(&src, 2, &short, t).await.unwrap();
        cache.get(&src, 2, &short, t + 5_000).await.unwrap();
        assert_eq!(cache.reads(), 1);
        cache.get(&src, 2, &short, t + 10_000).await.unwrap();
        assert_eq!(cache.reads(), 2);
        // A failure is cached for the TTL too.
        let missing = IndexSource::File(dir.path().join("missing.txt"));
        let cache = IndexCache::default();
        for dt in [0, 500] {
            assert_eq!(
                cache.get(&missing, 2, &lim, t + dt).await,
                Err(PriceError::IndexUnavailable)
            );
        }
        assert_eq!(cache.reads(), 1);
    }

    #[test]
    fn index_and_worst_price() {
        let lim = PriceLimits::default();
        assert_eq!(check_index(50_000, 50_000, &lim), Ok(()));
        assert_eq!(check_index(51_000, 50_000, &lim), Ok(()));
        assert_eq!(
            check_index(52_000, 50_000, &lim),
            Err(PriceError::IndexDeviates {
                deviation_bps: 400,
                limit_bps: 200
            })
        );
        assert!(matches!(
            check_index(40_000, 50_000, &lim),
            Err(PriceError::IndexDeviates { .. })
        ));
        assert_eq!(check_index(1, 0, &lim), Err(PriceError::IndexUnavailable));
        assert_eq!(worst_sell_ticks(50_000, 100), 49_500);
        assert_eq!(worst_sell_ticks(50_001, 100), 49_501, "rounded up");
        assert_eq!(worst_sell_ticks(50_000, 0), 50_000);
        assert_eq!(worst_sell_ticks(50_000, 20_000), 1);
    }
}
