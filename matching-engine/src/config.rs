//! Assets and markets are configuration, fixed when the engine is created (and stored in its
//! snapshots). The default is one market, `BTCUSD`.

use crate::units::{Amount, AssetId, Price, Qty};
use serde::{Deserialize, Serialize};

/// An asset the ledger keeps balances of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssetConfig {
    /// Symbol, e.g. `BTC`.
    pub symbol: String,
    /// Decimal places of the smallest unit: an [`Amount`] of 1 is `10^-decimals` of the asset.
    pub decimals: u8,
}

/// A market: base asset traded against quote asset.
///
/// Conversions: `qty` lots are `qty * lot_size` base units; at `price` ticks they cost
/// `price * qty * tick_size` quote units. For the default `BTCUSD` (BTC and USD both with 8
/// decimals) a lot is 1,000 sat (0.00001 BTC) and `tick_size` is 10, so one tick is 0.01 USD per BTC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketConfig {
    /// Symbol, e.g. `BTCUSD`.
    pub symbol: String,
    /// The asset bought and sold.
    pub base: AssetId,
    /// The asset prices are in.
    pub quote: AssetId,
    /// Base units in one lot.
    pub lot_size: u64,
    /// Quote units that one lot costs per tick of price.
    pub tick_size: u64,
    /// Smallest order quantity, in lots.
    pub min_qty: Qty,
    /// Smallest notional (`price * qty * tick_size`), in quote units.
    pub min_notional: Amount,
    /// Lowest price a limit or stop order may have, in ticks (at least 1).
    pub min_price: Price,
    /// Highest price a limit or stop order may have, in ticks. Bounds the book's price index.
    pub max_price: Price,
    /// Largest order quantity, in lots.
    pub max_qty: Qty,
    /// Maker fee in basis points of the notional, charged in the quote asset.
    pub maker_fee_bps: u16,
    /// Taker fee in basis points of the notional, charged in the quote asset.
    pub taker_fee_bps: u16,
}

impl MarketConfig {
    /// Base units of `qty` lots, `None` on overflow.
    #[inline]
    pub fn base_amount(&self, qty: Qty) -> Option<Amount> {
        qty.0.checked_mul(self.lot_size).map(Amount)
    }

    /// Quote units of `qty` lots at `price`, `None` on overflow.
    #[inline]
    pub fn notional(&self, price: Price, qty: Qty) -> Option<Amount> {
        price
            .0
            .checked_mul(qty.0)?
            .checked_mul(self.tick_size)
            .map(Amount)
    }

    /// A fee of `bps` basis points on `notional`, rounded down (so that fees of partial fills never
    /// add up to more than the fee of the whole).
    #[inline]
    pub fn fee(notional: Amount, bps: u16) -> Amount {
        // The same value either way; a product that fits in 64 bits (every realistic one) is
        // divided in 64 bits, by a multiply, not by the 128-bit division routine.
        match notional.0.checked_mul(u64::from(bps)) {
            Some(p) => Amount(p / 10_000),
            None => Amount(((u128::from(notional.0) * u128::from(bps)) / 10_000) as u64),
        }
    }

    /// The larger of the maker and taker fee: what a bid holds as fee allowance.
    #[inline]
    pub fn max_fee_bps(&self) -> u16 {
        self.maker_fee_bps.max(self.taker_fee_bps)
    }
}

/// Limits that bound the engine's memory and work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Open orders (resting and stop) in one market's book.
    pub max_orders_per_book: u32,
    /// Open orders of one account across all markets.
    pub max_open_orders_per_account: u32,
    /// Accounts (the fee account included).
    pub max_accounts: u32,
}

/// The engine's whole configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Assets, indexed by [`AssetId`].
    pub assets: Vec<AssetConfig>,
    /// Markets, indexed by [`crate::units::MarketId`].
    pub markets: Vec<MarketConfig>,
    /// Limits.
    pub limits: Limits,
}

/// The asset id of BTC in the default configuration.
pub const BTC: AssetId = AssetId(0);
/// The asset id of USD in the default configuration.
pub const USD: AssetId = AssetId(1);

impl Default for EngineConfig {
    /// One market, `BTCUSD`: lot 0.00001 BTC, tick 0.01 USD, prices from 0.01 to 10,000,000.00 USD,
    /// minimum notional 1 USD, fees 10 bps maker and 20 bps taker.
    fn default() -> Self {
        Self {
            assets: vec![
                AssetConfig {
                    symbol: "BTC".into(),
                    decimals: 8,
                },
                AssetConfig {
                    symbol: "USD".into(),
                    decimals: 8,
                },
            ],
            markets: vec![MarketConfig {
                symbol: "BTCUSD".into(),
                base: BTC,
                quote: USD,
                lot_size: 1_000,
                tick_size: 10,
                min_qty: Qty(1),
                min_notional: Amount(100_000_000),
                min_price: Price(1),
                max_price: Price(1_000_000_000),
                max_qty: Qty(100_000_000),
                maker_fee_bps: 10,
                taker_fee_bps: 20,
            }],
            limits: Limits {
                max_orders_per_book: 1 << 18,
                max_open_orders_per_account: 200,
                max_accounts: 1 << 20,
            },
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A market names an asset that does not exist, or the same asset twice.
    #[error("market {0} has an unknown or repeated asset")]
    BadAsset(String),
    /// A zero lot size, tick size, or min price, or `min_price > max_price`, or a price index too
    /// large (`max_price` above 2^32).
    #[error("market {0} has an invalid lot size, tick size or price range")]
    BadMarket(String),
    /// More than 65,535 assets or markets, or none.
    #[error("too many or too few assets or markets")]
    Count,
    /// The books would allocate more than [`MAX_PREALLOCATED_BYTES`] up front (order arenas of
    /// `max_orders_per_book` each, and price-level directories up to each `max_price`).
    #[error(
        "the books would preallocate {0} bytes, more than the {MAX_PREALLOCATED_BYTES}-byte limit"
    )]
    TooLarge(u64),
    /// An asset with more than [`MAX_DECIMALS`] decimal places (its amounts could not be
    /// formatted or scaled in 64-bit units).
    #[error("asset {0} has more than 18 decimals")]
    BadDecimals(String),
}

/// The most decimal places an asset may have: 10^18 fits in a `u64`, and every scaling of an
/// amount by a power of ten stays within `u128`.
pub const MAX_DECIMALS: u8 = 18;

/// The most memory the books of one engine may allocate up front (1 GiB): a larger
/// configuration (or a damaged snapshot's) is refused instead of aborting out of memory. The
/// default configuration takes about 34 MiB.
pub const MAX_PREALLOCATED_BYTES: u64 = 1 << 30;

impl EngineConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.assets.is_empty()
            || self.assets.len() > usize::from(u16::MAX)
            || self.markets.len() > usize::from(u16::MAX)
        {
            return Err(ConfigError::Count);
        }
        if let Some(a) = self.assets.iter().find(|a| a.decimals > MAX_DECIMALS) {
            return Err(ConfigError::BadDecimals(a.symbol.clone()));
        }
        for m in &self.markets {
            let n = self.assets.len();
            if usize::from(m.base.0) >= n || usize::from(m.quote.0) >= n || m.base == m.quote {
                return Err(ConfigError::BadAsset(m.symbol.clone()));
            }
            if m.lot_size == 0
                || m.tick_size == 0
                || m.min_price.0 == 0
                || m.min_price > m.max_price
                || m.max_price.0 > u64::from(u32::MAX)
                || m.min_qty.0 == 0
                || m.max_qty < m.min_qty
                || m.maker_fee_bps > 10_000
                || m.taker_fee_bps > 10_000
            {
                return Err(ConfigError::BadMarket(m.symbol.clone()));
            }
        }
        let bytes = self.markets.iter().fold(0u64, |sum, m| {
            sum.saturating_add(
                crate::book::Book::<crate::engine::OrderMeta>::preallocated_bytes(
                    m.max_price,
                    self.limits.max_orders_per_book,
                ),
            )
        });
        if bytes > MAX_PREALLOCATED_BYTES {
            return Err(ConfigError::TooLarge(bytes));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzzing review: asset decimals were unbounded, and the API scales amounts by
    /// `10^decimals` in `u128` (more than 38 decimals panicked there).
    #[test]
    fn assets_with_more_than_18_decimals_are_refused() {
        let mut c = EngineConfig::default();
        c.assets[0].decimals = MAX_DECIMALS;
        assert_eq!(c.validate(), Ok(()));
        c.assets[0].decimals = 39;
        let symbol = c.assets[0].symbol.clone();
        assert_eq!(c.validate(), Err(ConfigError::BadDecimals(symbol)));
    }
}
