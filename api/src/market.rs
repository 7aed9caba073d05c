//! Markets as the API sees them: Binance symbols, decimal strings and filters, converted exactly
//! to the engine's ticks, lots and amounts.

use crate::decimal::{format_units, parse_units, DecimalError};
use crate::error::ApiError;
use matching_engine::{Amount, AssetId, EngineConfig, MarketConfig, MarketId, Price, Qty};

/// The legal range Binance quotes in `-1100` errors for decimal parameters.
pub const DECIMAL_RANGE: &str = "^([0-9]{1,20})(\\.[0-9]{1,20})?$";

/// An asset: symbol and decimals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetSpec {
    /// Engine id.
    pub id: AssetId,
    /// Symbol, e.g. `BTC`.
    pub symbol: String,
    /// Decimal places of its smallest unit.
    pub decimals: u8,
}

/// A market with everything needed to convert decimal strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarketSpec {
    /// Engine id.
    pub id: MarketId,
    /// Symbol, e.g. `BTCUSD`.
    pub symbol: String,
    /// Lower-case symbol for stream names.
    pub stream_symbol: String,
    /// Base asset.
    pub base: AssetSpec,
    /// Quote asset.
    pub quote: AssetSpec,
    /// The engine's configuration of the market.
    pub cfg: MarketConfig,
    /// Quote units per whole base unit that one tick of price is.
    pub price_units_per_tick: u64,
}

/// A configuration the API cannot express in decimal strings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("market {0}: one tick is not a whole number of quote units per base unit")]
#[non_exhaustive]
pub struct MarketSpecError(pub String);

/// All markets and assets.
#[derive(Debug, Clone)]
pub struct Markets {
    /// Assets by id.
    pub assets: Vec<AssetSpec>,
    /// Markets by id.
    pub markets: Vec<MarketSpec>,
}

impl Markets {
    /// Builds the specs from the engine's configuration.
    pub fn new(config: &EngineConfig) -> Result<Self, MarketSpecError> {
        let assets: Vec<AssetSpec> = config
            .assets
            .iter()
            .enumerate()
            .map(|(i, a)| AssetSpec {
                id: AssetId(i as u16),
                symbol: a.symbol.clone(),
                decimals: a.decimals,
            })
            .collect();
        let mut markets = Vec::new();
        for (i, m) in config.markets.iter().enumerate() {
            let base = assets[usize::from(m.base.0)].clone();
            let quote = assets[usize::from(m.quote.0)].clone();
            let whole = 10u128.pow(u32::from(base.decimals));
            let num = u128::from(m.tick_size) * whole;
            let per_tick = num / u128::from(m.lot_size);
            if num % u128::from(m.lot_size) != 0 || per_tick == 0 || per_tick > u128::from(u64::MAX)
            {
                return Err(MarketSpecError(m.symbol.clone()));
            }
            markets.push(MarketSpec {
                id: MarketId(i as u16),
                symbol: m.symbol.clone(),
                stream_symbol: m.symbol.to_ascii_lowercase(),
                base,
                quote,
                cfg: m.clone(),
                price_units_per_tick: per_tick as u64,
            });
        }
        Ok(Self { assets, markets })
    }

    /// The market with this Binance symbol (exact, upper case).
    pub fn by_symbol(&self, symbol: &str) -> Result<&MarketSpec, ApiError> {
        self.markets
            .iter()
            .find(|m| m.symbol == symbol)
            .ok_or_else(ApiError::invalid_symbol)
    }

    /// The asset with this symbol.
    pub fn asset(&self, symbol: &str) -> Option<&AssetSpec> {
        self.assets.iter().find(|a| a.symbol == symbol)
    }

    /// The market with this id.
    pub fn get(&self, id: MarketId) -> &MarketSpec {
        &self.markets[usize::from(id.0)]
    }

    /// Formats an amount of an asset.
    pub fn fmt_amount(&self, asset: AssetId, amount: u64) -> String {
        format_units(amount, self.assets[usize::from(asset.0)].decimals)
    }
}

fn decimal_err(name: &str, e: DecimalError) -> ApiError {
    match e {
        DecimalError::TooPrecise => ApiError::precision(name),
        DecimalError::Malformed | DecimalError::TooLarge => ApiError::illegal(name, DECIMAL_RANGE),
    }
}

impl MarketSpec {
    /// Parses a price (`price`, `stopPrice`) into ticks. Off-tick or out-of-range prices fail
    /// `PRICE_FILTER`, as on Binance.
    pub fn parse_price(&self, name: &str, s: &str) -> Result<Price, ApiError> {
        let units = parse_units(s, self.quote.decimals).map_err(|e| decimal_err(name, e))?;
        if units == 0 {
            return Err(ApiError::bad(-1013, "Invalid price."));
        }
        if units % self.price_units_per_tick != 0 {
            return Err(ApiError::filter("PRICE_FILTER"));
        }
        let ticks = Price(units / self.price_units_per_tick);
        if ticks < self.cfg.min_price || ticks > self.cfg.max_price {
            return Err(ApiError::filter("PRICE_FILTER"));
        }
        Ok(ticks)
    }

    /// Parses a base quantity into lots. Off-step or out-of-range quantities fail `LOT_SIZE`.
    pub fn parse_qty(&self, name: &str, s: &str) -> Result<Qty, ApiError> {
        let units = parse_units(s, self.base.decimals).map_err(|e| decimal_err(name, e))?;
        if units == 0 {
            return Err(ApiError::bad(-1013, "Invalid quantity."));
        }
        if units % self.cfg.lot_size != 0 {
            return Err(ApiError::filter("LOT_SIZE"));
        }
        let lots = Qty(units / self.cfg.lot_size);
        if lots < self.cfg.min_qty || lots > self.cfg.max_qty {
            return Err(ApiError::filter("LOT_SIZE"));
        }
        Ok(lots)
    }

    /// Parses a quote amount (`quoteOrderQty`).
    pub fn parse_quote(&self, name: &str, s: &str) -> Result<Amount, ApiError> {
        let units = parse_units(s, self.quote.decimals).map_err(|e| decimal_err(name, e))?;
        if units == 0 {
            return Err(ApiError::bad(-1013, "Invalid quantity."));
        }
        if units < self.cfg.min_notional.0 {
            return Err(ApiError::filter("NOTIONAL"));
        }
        Ok(Amount(units))
    }

    /// Checks the `NOTIONAL` filter for a priced order.
    pub fn check_notional(&self, price: Price, qty: Qty) -> Result<(), ApiError> {
        match self.cfg.notional(price, qty) {
            Some(n) if n >= self.cfg.min_notional => Ok(()),
            Some(_) => Err(ApiError::filter("NOTIONAL")),
            None => Err(ApiError::filter("NOTIONAL")),
        }
    }

    /// Formats a price in ticks.
    pub fn fmt_price(&self, p: Price) -> String {
        crate::decimal::format_units_u128(
            u128::from(p.0) * u128::from(self.price_units_per_tick),
            self.quote.decimals,
        )
    }

    /// Formats a quantity in lots.
    pub fn fmt_qty(&self, q: Qty) -> String {
        crate::decimal::format_units_u128(
            u128::from(q.0) * u128::from(self.cfg.lot_size),
            self.base.decimals,
        )
    }

    /// Formats a quote amount.
    pub fn fmt_quote(&self, a: u128) -> String {
        crate::decimal::format_units_u128(a, self.quote.decimals)
    }

    /// Formats a base amount.
    pub fn fmt_base(&self, a: u128) -> String {
        crate::decimal::format_units_u128(a, self.base.decimals)
    }

    /// Binance's `filters` array for `exchangeInfo`.
    pub fn filters(&self) -> serde_json::Value {
        serde_json::json!([
            {
                "filterType": "PRICE_FILTER",
                "minPrice": self.fmt_price(self.cfg.min_price),
                "maxPrice": self.fmt_price(self.cfg.max_price),
                "tickSize": self.fmt_price(Price(1)),
            },
            {
                "filterType": "LOT_SIZE",
                "minQty": self.fmt_qty(self.cfg.min_qty),
                "maxQty": self.fmt_qty(self.cfg.max_qty),
                "stepSize": self.fmt_qty(Qty(1)),
            },
            {
                "filterType": "MARKET_LOT_SIZE",
                "minQty": self.fmt_qty(self.cfg.min_qty),
                "maxQty": self.fmt_qty(self.cfg.max_qty),
                "stepSize": self.fmt_qty(Qty(1)),
            },
            {
                "filterType": "NOTIONAL",
                "minNotional": self.fmt_quote(u128::from(self.cfg.min_notional.0)),
                "applyMinToMarket": true,
                "maxNotional": "9000000000.00000000",
                "applyMaxToMarket": false,
                "avgPriceMins": 5,
            },
            {
                "filterType": "MAX_NUM_ORDERS",
                "maxNumOrders": 200,
            },
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn btcusd() -> MarketSpec {
        Markets::new(&EngineConfig::default()).unwrap().markets[0].clone()
    }

    #[test]
    fn default_market_units() {
        let m = btcusd();
        assert_eq!(m.price_units_per_tick, 1_000_000);
        assert_eq!(m.fmt_price(Price(1)), "0.01000000");
        assert_eq!(m.fmt_qty(Qty(1)), "0.00001000");
        assert_eq!(m.parse_price("price", "30000.01"), Ok(Price(3_000_001)));
        assert_eq!(m.parse_price("price", "30000.0100"), Ok(Price(3_000_001)));
        assert_eq!(m.parse_qty("quantity", "0.00100"), Ok(Qty(100)));
        assert_eq!(m.fmt_price(Price(3_000_001)), "30000.01000000");
    }

    #[test]
    fn filter_failures() {
        let m = btcusd();
        let code = |r: Result<Price, ApiError>| r.unwrap_err();
        assert_eq!(
            code(m.parse_price("price", "30000.001")).msg,
            "Filter failure: PRICE_FILTER"
        );
        assert_eq!(
            code(m.parse_price("price", "20000000")).msg,
            "Filter failure: PRICE_FILTER"
        );
        assert_eq!(code(m.parse_price("price", "1.000000001")).code, -1111);
        assert_eq!(code(m.parse_price("price", "-1")).code, -1100);
        assert_eq!(code(m.parse_price("price", "1e3")).code, -1100);
        assert_eq!(code(m.parse_price("price", "0")).code, -1013);
        let q = m.parse_qty("quantity", "0.000015").unwrap_err();
        assert_eq!(q.msg, "Filter failure: LOT_SIZE");
        let q = m.parse_qty("quantity", "9999999999999").unwrap_err();
        assert_eq!(q.code, -1100);
        let q = m.parse_qty("quantity", "5000").unwrap_err();
        assert_eq!(q.msg, "Filter failure: LOT_SIZE");
        assert_eq!(
            m.check_notional(Price(100), Qty(1)).unwrap_err().msg,
            "Filter failure: NOTIONAL"
        );
        assert!(m.check_notional(Price(3_000_000), Qty(100)).is_ok());
        assert_eq!(
            m.parse_quote("quoteOrderQty", "0.5").unwrap_err().msg,
            "Filter failure: NOTIONAL"
        );
        assert_eq!(
            m.parse_quote("quoteOrderQty", "10"),
            Ok(Amount(1_000_000_000))
        );
    }
}
