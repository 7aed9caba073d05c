//! Public market-data endpoints (Binance spot v3 shapes).

use crate::error::ApiError;
use crate::market::MarketSpec;
use crate::params::Params;
use crate::readmodel::{interval_index, Kline, MarketState, TradeRec, INTERVALS};
use crate::state::{ok_json, AppState, Ctx, Req};
use axum::extract::State;
use axum::response::Response;
use matching_engine::{Price, Qty};
use serde_json::{json, Value};

/// `GET /api/v3/ping`.
pub async fn ping(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (p, ctx) = st.public(&req, 1)?;
    p.finish()?;
    Ok(ok_json(&ctx, json!({})))
}

/// `GET /api/v3/time`.
pub async fn time(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (p, ctx) = st.public(&req, 1)?;
    p.finish()?;
    Ok(ok_json(
        &ctx,
        json!({ "serverTime": crate::core::now_ms() }),
    ))
}

/// Resolves `symbol` / `symbols` (a JSON array) into markets; `None` means all.
fn resolve(
    st: &AppState,
    one: Option<String>,
    many: Option<String>,
) -> Result<Option<Vec<&MarketSpec>>, ApiError> {
    match (one, many) {
        (Some(_), Some(_)) => Err(ApiError::bad(
            -1101,
            "Parameter 'symbol' and 'symbols' cannot be sent together.",
        )),
        (Some(s), None) => Ok(Some(vec![st.markets().by_symbol(&s)?])),
        (None, Some(list)) => {
            let names: Vec<String> = serde_json::from_str(&list).map_err(|_| {
                ApiError::illegal(
                    "symbols",
                    "^\\[\"[A-Z0-9-_.]{1,20}\"(,\"[A-Z0-9-_.]{1,20}\"){0,}\\]$",
                )
            })?;
            if names.is_empty() || names.len() > 100 {
                return Err(ApiError::invalid_value("symbols"));
            }
            names
                .iter()
                .map(|n| st.markets().by_symbol(n))
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        }
        (None, None) => Ok(None),
    }
}

fn symbols<'a>(st: &'a AppState, p: &mut Params) -> Result<Option<Vec<&'a MarketSpec>>, ApiError> {
    let one = p.opt("symbol")?;
    let many = p.opt("symbols")?;
    resolve(st, one, many)
}

fn symbol_info(m: &MarketSpec) -> Value {
    json!({
        "symbol": m.symbol,
        "status": "TRADING",
        "baseAsset": m.base.symbol,
        "baseAssetPrecision": m.base.decimals,
        "quoteAsset": m.quote.symbol,
        "quotePrecision": m.quote.decimals,
        "quoteAssetPrecision": m.quote.decimals,
        "baseCommissionPrecision": m.base.decimals,
        "quoteCommissionPrecision": m.quote.decimals,
        "orderTypes": [
            "LIMIT",
            "LIMIT_MAKER",
            "MARKET",
            "STOP_LOSS",
            "STOP_LOSS_LIMIT",
            "TAKE_PROFIT",
            "TAKE_PROFIT_LIMIT"
        ],
        "icebergAllowed": false,
        "ocoAllowed": true,
        "otoAllowed": true,
        "quoteOrderQtyMarketAllowed": true,
        "allowTrailingStop": false,
        "cancelReplaceAllowed": true,
        "amendAllowed": true,
        "isSpotTradingAllowed": true,
        "isMarginTradingAllowed": false,
        "filters": m.filters(),
        "permissions": [],
        "permissionSets": [["SPOT"]],
        "defaultSelfTradePreventionMode": "EXPIRE_TAKER",
        "allowedSelfTradePreventionModes": ["NONE", "EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
    })
}

/// `GET /api/v3/exchangeInfo`.
pub async fn exchange_info(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (mut p, ctx) = st.public(&req, 20)?;
    let sel = symbols(&st, &mut p)?;
    p.skip("permissions");
    p.skip("showPermissionSets");
    p.skip("symbolStatus");
    p.finish()?;
    let list: Vec<Value> = match sel {
        Some(v) => v.into_iter().map(symbol_info).collect(),
        None => st.markets().markets.iter().map(symbol_info).collect(),
    };
    Ok(ok_json(
        &ctx,
        json!({
            "timezone": "UTC",
            "serverTime": crate::core::now_ms(),
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": st.0.cfg.ip_weight_per_min},
                {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": st.0.cfg.orders_per_10s},
            ],
            "exchangeFilters": [],
            "symbols": list,
        }),
    ))
}

fn levels<'a>(
    m: &MarketSpec,
    it: impl Iterator<Item = (&'a Price, &'a Qty)>,
    n: usize,
) -> Vec<[String; 2]> {
    it.take(n)
        .map(|(p, q)| [m.fmt_price(*p), m.fmt_qty(*q)])
        .collect()
}

/// A depth snapshot: `lastUpdateId` is the market's depth sequence, consistent with the `U`/`u`
/// of `@depth` diffs.
pub fn depth_json(m: &MarketSpec, s: &MarketState, n: usize) -> Value {
    json!({
        "lastUpdateId": s.depth_seq,
        "bids": levels(m, s.bids.iter().rev(), n),
        "asks": levels(m, s.asks.iter(), n),
    })
}

/// `GET /api/v3/depth`.
pub async fn depth(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    // 1 before the parameters are read (a request that fails them costs that), the rest after.
    let (mut p, _) = st.public(&req, 1)?;
    let sym = p.req("symbol")?;
    let limit = p.limit(100, 5000)?;
    p.finish()?;
    let weight: u64 = match limit {
        0..=100 => 5,
        101..=500 => 25,
        501..=1000 => 50,
        _ => 250,
    };
    let (_, ctx) = st.public(&req, weight.saturating_sub(1))?;
    let m = st.markets().by_symbol(&sym)?;
    let rm = st.read_model().read();
    Ok(ok_json(
        &ctx,
        depth_json(m, &rm.markets[usize::from(m.id.0)], limit as usize),
    ))
}

fn trade_json(m: &MarketSpec, t: &crate::readmodel::TradeRec) -> Value {
    json!({
        "id": t.id,
        "price": m.fmt_price(Price(t.price)),
        "qty": m.fmt_qty(Qty(t.qty)),
        "quoteQty": m.fmt_quote(u128::from(t.quote)),
        "time": t.time_ms,
        "isBuyerMaker": t.taker_side == matching_engine::Side::Sell,
        "isBestMatch": true,
    })
}

/// `GET /api/v3/trades`.
pub async fn trades(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (mut p, ctx) = st.public(&req, 25)?;
    let sym = p.req("symbol")?;
    let limit = p.limit(500, 1000)? as usize;
    p.finish()?;
    let m = st.markets().by_symbol(&sym)?;
    let rm = st.read_model().read();
    let ts = &rm.markets[usize::from(m.id.0)].trades;
    let skip = ts.len().saturating_sub(limit);
    let v: Vec<Value> = ts.iter().skip(skip).map(|t| trade_json(m, t)).collect();
    Ok(ok_json(&ctx, Value::Array(v)))
}

/// `GET /api/v3/historicalTrades` (API key, no signature): trades from `fromId`, or the latest.
pub async fn historical_trades(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.keyed(&req, 25)?;
    let sym = p.req("symbol")?;
    let limit = p.limit(500, 1000)?;
    let from = p.opt_u64("fromId")?;
    p.finish()?;
    let m = st.markets().by_symbol(&sym)?;
    let rm = st.read_model();
    let rows = match from {
        Some(f) => rm.market_trades_from(m.id.0, f, limit),
        None => {
            let r = rm.read();
            let ts = &r.markets[usize::from(m.id.0)].trades;
            if ts.len() >= limit as usize || ts.len() < 1_000 {
                let skip = ts.len().saturating_sub(limit as usize);
                Ok(ts.iter().skip(skip).cloned().collect())
            } else {
                drop(r);
                rm.store.recent_trades(m.id.0, limit)
            }
        }
    }
    .map_err(|e| {
        tracing::error!(error = %e, "storage failure");
        ApiError::internal()
    })?;
    Ok(ok_json(
        &ctx,
        Value::Array(rows.iter().map(|t| trade_json(m, t)).collect()),
    ))
}

/// `GET /api/v3/aggTrades`: each trade is its own aggregate (ccxt's default `fetchTrades`).
pub async fn agg_trades(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (mut p, ctx) = st.public(&req, 4)?;
    let sym = p.req("symbol")?;
    let from = p.opt_u64("fromId")?;
    let start = p.opt_u64("startTime")?;
    let end = p.opt_u64("endTime")?;
    let limit = p.limit(500, 1000)? as usize;
    p.finish()?;
    if let (Some(s), Some(e)) = (start, end) {
        if e < s || e - s > 3_600_000 {
            return Err(ApiError::invalid_value("endTime"));
        }
    }
    let m = st.markets().by_symbol(&sym)?;
    let in_window = |t: &TradeRec| {
        from.is_none_or(|f| t.id >= f)
            && start.is_none_or(|s| t.time_ms >= s)
            && end.is_none_or(|e| t.time_ms <= e)
    };
    // From `fromId`, or from the first trade at `startTime`: the whole history (SQLite and
    // memory), not only the last trades kept in memory (review: an older `fromId` answered
    // from the oldest trade in memory, an older window `[]`, so a client paging through the
    // history, as ccxt's `fetchTrades(since)` does, lost trades without knowing).
    let first = match (from, start) {
        (Some(f), _) => Some(f),
        (None, Some(s)) => st
            .read_model()
            .market_trade_at_or_after(m.id.0, s)
            .map_err(|e| {
                tracing::error!(error = %e, "trade history failed");
                ApiError::internal()
            })?
            .or(Some(u64::MAX)),
        (None, None) => None,
    };
    let sel: Vec<TradeRec> = match first {
        Some(u64::MAX) => Vec::new(),
        Some(f) => st
            .read_model()
            .market_trades_from(m.id.0, f, u32::try_from(limit).unwrap_or(u32::MAX))
            .map_err(|e| {
                tracing::error!(error = %e, "trade history failed");
                ApiError::internal()
            })?
            .into_iter()
            .filter(|t| in_window(t))
            .collect(),
        // The newest, up to `endTime` when sent: from memory (which holds the newest).
        None => {
            let rm = st.read_model().read();
            let sel: Vec<TradeRec> = rm.markets[usize::from(m.id.0)]
                .trades
                .iter()
                .filter(|t| in_window(t))
                .cloned()
                .collect();
            let skip = sel.len().saturating_sub(limit);
            sel.into_iter().skip(skip).collect()
        }
    };
    let v: Vec<Value> = sel
        .iter()
        .take(limit)
        .map(|t| {
            json!({
                "a": t.id, "p": m.fmt_price(Price(t.price)), "q": m.fmt_qty(Qty(t.qty)),
                "f": t.id, "l": t.id, "T": t.time_ms,
                "m": t.taker_side == matching_engine::Side::Sell, "M": true,
            })
        })
        .collect();
    Ok(ok_json(&ctx, Value::Array(v)))
}

/// The volume-weighted price of the last 5 minutes of trades (the last trade's price when there
/// were none) and the last trade's time: `avgPrice` and the `@avgPrice` stream.
pub fn average_price(m: &MarketSpec, ms: &MarketState, now: u64) -> (String, u64) {
    // Every trade of the last five minutes, by second (a trade in the second that began five
    // minutes ago counts whole).
    let (quote, lots) = ms
        .avg_window
        .iter()
        .filter(|(sec, _, _)| (sec + 1) * 1000 + crate::readmodel::AVG_WINDOW_SECS * 1000 > now)
        .fold((0u128, 0u128), |(q, l), (_, dq, dl)| {
            (q.saturating_add(*dq), l.saturating_add(*dl))
        });
    let qd = u32::from(m.quote.decimals);
    let price = if lots == 0 {
        m.fmt_price(Price(ms.trades.back().map_or(0, |t| t.price)))
    } else {
        let quote = i128::try_from(quote).unwrap_or(i128::MAX);
        let base = i128::try_from(lots)
            .unwrap_or(i128::MAX)
            .saturating_mul(i128::from(m.cfg.lot_size));
        let whole = 10i128.pow(u32::from(m.base.decimals));
        ratio(
            quote.saturating_mul(whole),
            base.saturating_mul(10i128.pow(qd)),
            qd,
        )
    };
    (price, ms.trades.back().map_or(0, |t| t.time_ms))
}

/// `GET /api/v3/avgPrice`: volume-weighted price of the last 5 minutes of trades.
pub async fn avg_price(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (mut p, ctx) = st.public(&req, 2)?;
    let sym = p.req("symbol")?;
    p.finish()?;
    let m = st.markets().by_symbol(&sym)?;
    let rm = st.read_model().read();
    let (price, close) = average_price(m, &rm.markets[usize::from(m.id.0)], crate::core::now_ms());
    Ok(ok_json(
        &ctx,
        json!({ "mins": 5, "price": price, "closeTime": close }),
    ))
}

/// Formats `num/den` as a signed decimal with `dec` places (statistics only, not money).
fn ratio(num: i128, den: i128, dec: u32) -> String {
    if den == 0 {
        return ratio(0, 1, dec);
    }
    let scale = 10i128.pow(dec);
    let v = num * scale / den;
    let sign = if v < 0 { "-" } else { "" };
    let a = v.unsigned_abs();
    let s = scale as u128;
    if dec == 0 {
        return format!("{sign}{a}");
    }
    format!("{sign}{}.{:0w$}", a / s, a % s, w = dec as usize)
}

/// Statistics over the klines that close at or after `from` (the 1-minute klines while they
/// reach back that far, 1-hour klines beyond: 1,500 of each are kept), Binance's rolling-window
/// ticker shape (`GET /api/v3/ticker`, `ticker/tradingDay`); `mini` drops `priceChange`,
/// `priceChangePercent` and `weightedAvgPrice` as `type=MINI` does.
pub fn window_stats(m: &MarketSpec, s: &MarketState, from: u64, now: u64, mini: bool) -> Value {
    let iv = if now.saturating_sub(from) <= MINUTE_KLINES_REACH_MS {
        1
    } else {
        interval_index("1h").unwrap_or(1)
    };
    let ks: Vec<&Kline> = s.klines[iv].iter().filter(|k| k.close_ms >= from).collect();
    let open = ks.first().map_or(0, |k| k.open);
    let close = ks.last().map_or(0, |k| k.close);
    let high = ks.iter().map(|k| k.high).max().unwrap_or(0);
    let low = ks.iter().map(|k| k.low).min().unwrap_or(0);
    let vol: u128 = ks.iter().map(|k| k.volume).sum();
    let qvol: u128 = ks.iter().map(|k| k.quote).sum();
    let count: u64 = ks.iter().map(|k| k.trades).sum();
    let first_id = ks.first().map_or(-1, |k| k.first_id as i64);
    let last_id = ks.last().map_or(-1, |k| k.last_id as i64);
    let base_units = vol * u128::from(m.cfg.lot_size);
    let mut v = json!({
        "symbol": m.symbol,
        "openPrice": m.fmt_price(Price(open)),
        "highPrice": m.fmt_price(Price(high)),
        "lowPrice": m.fmt_price(Price(low)),
        "lastPrice": m.fmt_price(Price(close)),
        "volume": m.fmt_base(base_units),
        "quoteVolume": m.fmt_quote(qvol),
        "openTime": ks.first().map_or(from, |k| k.open_ms),
        "closeTime": now,
        "firstId": first_id,
        "lastId": last_id,
        "count": count,
    });
    if !mini {
        let change = i128::from(close) - i128::from(open);
        let ppt = m.price_units_per_tick as i128;
        let qd = u32::from(m.quote.decimals);
        let whole = 10i128.pow(u32::from(m.base.decimals));
        let extra = json!({
            "priceChange": ratio(change * ppt, 10i128.pow(qd), qd),
            "priceChangePercent": ratio(change * 100, i128::from(open), 3),
            "weightedAvgPrice": ratio(qvol as i128 * whole, base_units as i128 * 10i128.pow(qd), qd),
        });
        if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
    }
    v
}

/// How far back the kept 1-minute klines reach (1,500 minutes, 25 hours).
const MINUTE_KLINES_REACH_MS: u64 = 1_500 * 60_000;

/// 24h rolling statistics from the 1-minute klines (`ticker/24hr`, `@ticker`, `@miniTicker`).
pub fn ticker(m: &MarketSpec, s: &MarketState, now: u64, mini: bool) -> Value {
    let from = now.saturating_sub(86_400_000);
    let mut v = window_stats(m, s, from, now, mini);
    if !mini {
        let (bid, ask) = s.best();
        let last = s.trades.back();
        let extra = json!({
            "prevClosePrice": v["openPrice"].clone(),
            "lastQty": m.fmt_qty(Qty(last.map_or(0, |t| t.qty))),
            "bidPrice": m.fmt_price(bid.map_or(Price(0), |b| b.0)),
            "bidQty": m.fmt_qty(bid.map_or(Qty(0), |b| b.1)),
            "askPrice": m.fmt_price(ask.map_or(Price(0), |a| a.0)),
            "askQty": m.fmt_qty(ask.map_or(Qty(0), |a| a.1)),
        });
        if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
    }
    v
}

/// Charges 1 of a request's weight before its parameters are read (the rest once they say how
/// much), so a request that fails them costs that much too, as Binance charges it; an address
/// past its limit is refused here.
fn charged_1(st: &AppState, req: &Req) -> Result<Params, ApiError> {
    Ok(st.public(req, 1)?.0)
}

fn single_or_list(
    st: &AppState,
    req: &Req,
    mut p: Params,
    w_one: u64,
    w_list: impl Fn(Option<usize>) -> u64,
    f: impl Fn(&MarketSpec, &MarketState) -> Value,
) -> Result<(Value, Ctx), ApiError> {
    let sym = p.opt("symbol")?;
    let list = p.opt("symbols")?;
    p.finish()?;
    let single = sym.is_some();
    let sel = resolve(st, sym, list)?;
    // The caller charged 1 before reading the parameters ([`charged_1`]); the rest by what is
    // asked: one symbol, a list of `n` (`Some(n)`), or every market (`None`).
    let weight = if single {
        w_one
    } else {
        w_list(sel.as_ref().map(Vec::len))
    };
    let (_, ctx) = st.public(req, weight.saturating_sub(1))?;
    let rm = st.read_model().read();
    let one = |m: &MarketSpec| f(m, &rm.markets[usize::from(m.id.0)]);
    let v = match sel {
        Some(ms) if single => one(ms[0]),
        Some(ms) => Value::Array(ms.into_iter().map(one).collect()),
        None => Value::Array(st.markets().markets.iter().map(one).collect()),
    };
    Ok((v, ctx))
}

/// `GET /api/v3/ticker/24hr`.
pub async fn ticker_24hr(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let mut p = charged_1(&st, &req)?;
    let mini = p
        .opt("type")?
        .map(|t| match t.as_str() {
            "FULL" => Ok(false),
            "MINI" => Ok(true),
            _ => Err(ApiError::invalid_value("type")),
        })
        .transpose()?
        .unwrap_or(false);
    let now = crate::core::now_ms();
    // Binance's weights: 2 for a symbol or 1-20 listed, 40 for 21-100, 80 for every market
    // (review: any list cost 80).
    let by_count = |n: Option<usize>| match n {
        Some(0..=20) => 2,
        Some(21..=100) => 40,
        _ => 80,
    };
    let (v, ctx) = single_or_list(&st, &req, p, 2, by_count, |m, s| ticker(m, s, now, mini))?;
    Ok(ok_json(&ctx, v))
}

/// `GET /api/v3/ticker/price`.
pub async fn ticker_price(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (v, ctx) = single_or_list(
        &st,
        &req,
        charged_1(&st, &req)?,
        2,
        |_| 4,
        |m, s| {
            json!({
                "symbol": m.symbol,
                "price": m.fmt_price(Price(s.trades.back().map_or(0, |t| t.price))),
            })
        },
    )?;
    Ok(ok_json(&ctx, v))
}

/// `GET /api/v3/ticker/bookTicker`.
pub async fn book_ticker(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (v, ctx) = single_or_list(
        &st,
        &req,
        charged_1(&st, &req)?,
        2,
        |_| 4,
        |m, s| {
            let (bid, ask) = s.best();
            json!({
                "symbol": m.symbol,
                "bidPrice": m.fmt_price(bid.map_or(Price(0), |b| b.0)),
                "bidQty": m.fmt_qty(bid.map_or(Qty(0), |b| b.1)),
                "askPrice": m.fmt_price(ask.map_or(Price(0), |a| a.0)),
                "askQty": m.fmt_qty(ask.map_or(Qty(0), |a| a.1)),
            })
        },
    )?;
    Ok(ok_json(&ctx, v))
}

/// `type`: `FULL` (the default) or `MINI`; true for `MINI`.
fn mini_param(p: &mut Params) -> Result<bool, ApiError> {
    p.opt("type")?
        .map(|t| match t.as_str() {
            "FULL" => Ok(false),
            "MINI" => Ok(true),
            _ => Err(ApiError::invalid_value("type")),
        })
        .transpose()
        .map(|m| m.unwrap_or(false))
}

/// The markets of `symbol` or `symbols` (one of them is required here) and their weight: 4 per
/// symbol, at most 200 (Binance's rule for `ticker` and `ticker/tradingDay`).
fn windowed_selection<'a>(
    st: &'a AppState,
    p: &mut Params,
) -> Result<(Vec<&'a MarketSpec>, bool, u64), ApiError> {
    let one = p.opt("symbol")?;
    let many = p.opt("symbols")?;
    let single = one.is_some();
    if !single && many.is_none() {
        return Err(ApiError::missing("symbol"));
    }
    let ms = resolve(st, one, many)?.unwrap_or_default();
    let weight = (4 * ms.len() as u64).min(200);
    Ok((ms, single, weight))
}

/// Statistics of `ms` over `[from, now]`: one object for `symbol`, an array for `symbols`.
fn windowed_answer(
    st: &AppState,
    ms: &[&MarketSpec],
    single: bool,
    from: u64,
    now: u64,
    mini: bool,
) -> Value {
    let rm = st.read_model().read();
    let one = |m: &MarketSpec| window_stats(m, &rm.markets[usize::from(m.id.0)], from, now, mini);
    match ms {
        [m] if single => one(m),
        _ => Value::Array(ms.iter().map(|m| one(m)).collect()),
    }
}

/// A rolling window's length: `1m`..`59m`, `1h`..`23h`, `1d`..`7d` (Binance's `windowSize`).
pub fn window_ms(s: &str) -> Option<u64> {
    let split = s.len().checked_sub(1)?;
    // Not `split_at`: the byte before the last is not a character boundary in `1é` (review:
    // such a `windowSize` panicked the handler, and on the WebSocket API took the connection
    // down with every answer in flight).
    let (n, unit) = s.split_at_checked(split)?;
    if n.is_empty() || n.len() > 2 || !n.bytes().all(|b| b.is_ascii_digit()) || n.starts_with('0') {
        return None;
    }
    let n: u64 = n.parse().ok()?;
    let (max, unit_ms) = match unit {
        "m" => (59, 60_000),
        "h" => (23, 3_600_000),
        "d" => (7, 86_400_000),
        _ => return None,
    };
    (1..=max).contains(&n).then_some(n * unit_ms)
}

/// `GET /api/v3/ticker`: rolling-window statistics (`windowSize`, default `1d`; `type`).
pub async fn ticker_window(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let mut p = charged_1(&st, &req)?;
    let (ms, single, weight) = windowed_selection(&st, &mut p)?;
    let window = match p.opt("windowSize")? {
        Some(w) => window_ms(&w).ok_or_else(|| ApiError::invalid_value("windowSize"))?,
        None => 86_400_000,
    };
    let mini = mini_param(&mut p)?;
    p.finish()?;
    let (_, ctx) = st.public(&req, weight.saturating_sub(1))?;
    let now = crate::core::now_ms();
    let v = windowed_answer(&st, &ms, single, now.saturating_sub(window), now, mini);
    Ok(ok_json(&ctx, v))
}

/// A `timeZone` as minutes east of UTC: hours (`8`, `-1`) or hours and minutes (`-1:00`,
/// `05:45`), within [-12:00, +14:00] (Binance's range); `0` when not sent.
pub fn time_zone_minutes(s: &str) -> Option<i64> {
    let (neg, rest) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
    let digits = |x: &str| !x.is_empty() && x.len() <= 2 && x.bytes().all(|b| b.is_ascii_digit());
    if !digits(h) || !digits(m) {
        return None;
    }
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    if m >= 60 {
        return None;
    }
    let total = if neg { -(h * 60 + m) } else { h * 60 + m };
    (-12 * 60..=14 * 60).contains(&total).then_some(total)
}

/// The start of the trading day that holds `now` in a time zone `tz_min` minutes east of UTC.
pub fn trading_day_start(now: u64, tz_min: i64) -> u64 {
    let day = 86_400_000i64;
    let local = now as i64 + tz_min * 60_000;
    (local.div_euclid(day) * day - tz_min * 60_000).max(0) as u64
}

/// `GET /api/v3/ticker/tradingDay`: statistics since the start of the day (`timeZone`, `type`).
pub async fn ticker_trading_day(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    let mut p = charged_1(&st, &req)?;
    let (ms, single, weight) = windowed_selection(&st, &mut p)?;
    let tz = match p.opt("timeZone")? {
        Some(z) => time_zone_minutes(&z).ok_or_else(|| ApiError::invalid_value("timeZone"))?,
        None => 0,
    };
    let mini = mini_param(&mut p)?;
    p.finish()?;
    let (_, ctx) = st.public(&req, weight.saturating_sub(1))?;
    let now = crate::core::now_ms();
    let v = windowed_answer(&st, &ms, single, trading_day_start(now, tz), now, mini);
    Ok(ok_json(&ctx, v))
}

/// `GET /sapi/v1/system/status`: `{"status": 0, "msg": "normal"}`, or `1` / `"system
/// maintenance"` while the ledger auditor holds the circuit breaker open (only cancels pass).
pub async fn system_status(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (p, ctx) = st.public(&req, 1)?;
    p.finish()?;
    let v = if st.breaker_open() {
        json!({"status": 1, "msg": "system maintenance"})
    } else {
        json!({"status": 0, "msg": "normal"})
    };
    Ok(ok_json(&ctx, v))
}

/// A kline as Binance's array.
pub fn kline_array(m: &MarketSpec, k: &Kline) -> Value {
    let lot = u128::from(m.cfg.lot_size);
    json!([
        k.open_ms,
        m.fmt_price(Price(k.open)),
        m.fmt_price(Price(k.high)),
        m.fmt_price(Price(k.low)),
        m.fmt_price(Price(k.close)),
        m.fmt_base(k.volume * lot),
        k.close_ms,
        m.fmt_quote(k.quote),
        k.trades,
        m.fmt_base(k.taker_buy_volume * lot),
        m.fmt_quote(k.taker_buy_quote),
        "0",
    ])
}

/// `GET /api/v3/klines`.
pub async fn klines(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (mut p, ctx) = st.public(&req, 2)?;
    let sym = p.req("symbol")?;
    let iv = p.req("interval")?;
    let start = p.opt_u64("startTime")?;
    let end = p.opt_u64("endTime")?;
    if let Some(tz) = p.opt("timeZone")? {
        if tz != "0" && tz != "+0" && tz != "0:00" {
            return Err(ApiError::invalid_value("timeZone"));
        }
    }
    let limit = p.limit(500, 1000)? as usize;
    p.finish()?;
    let m = st.markets().by_symbol(&sym)?;
    let i = interval_index(&iv).ok_or_else(|| ApiError::bad(-1120, "Invalid interval."))?;
    let _ = INTERVALS[i];
    let rm = st.read_model().read();
    let ks = &rm.markets[usize::from(m.id.0)].klines[i];
    let sel: Vec<&Kline> = ks
        .iter()
        .filter(|k| start.is_none_or(|s| k.open_ms >= s) && end.is_none_or(|e| k.open_ms <= e))
        .collect();
    let sel: Vec<Value> = if start.is_some() {
        sel.into_iter()
            .take(limit)
            .map(|k| kline_array(m, k))
            .collect()
    } else {
        let skip = sel.len().saturating_sub(limit);
        sel.into_iter()
            .skip(skip)
            .map(|k| kline_array(m, k))
            .collect()
    };
    Ok(ok_json(&ctx, Value::Array(sel)))
}

#[cfg(test)]
mod tests {
    use super::ratio;

    #[test]
    fn ratios() {
        assert_eq!(ratio(1, 3, 3), "0.333");
        assert_eq!(ratio(-5, 2, 2), "-2.50");
        assert_eq!(ratio(5, 0, 2), "0.00");
        assert_eq!(ratio(7, 1, 0), "7");
    }
}
