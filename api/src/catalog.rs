//! What client libraries load before they trade, so that a client needs the server's URLs and
//! nothing else: coins and networks (`capital/config/getall`), fee rates (`asset/tradeFee`,
//! `account/commission`), the order-rate limit in use (`rateLimit/order`), and the margin pair
//! lists, which are empty (there is no margin trading here). Binance's shapes and weights.
//!
//! * Fee rates are the engine's, per market (`maker_fee_bps`, `taker_fee_bps`), as decimal
//!   fractions with 8 places (`20` bps is `"0.00200000"`); there are no special, tax or discount
//!   rates (those answer zero and `enabledForAccount: false`).
//! * Only `BTC` has a network, and only while the custody service is attached: its withdrawal
//!   fee and minimum are the custody configuration's ([`crate::custody::Custody::withdrawal_terms`]).
//!   Every other asset is credited by the operator and has no network (deposit and withdrawal
//!   disabled).

use crate::capital::{BTC_DECIMALS, COIN};
use crate::decimal::format_units;
use crate::error::ApiError;
use crate::market::MarketSpec;
use crate::state::{ok_json, AppState, Req};
use axum::extract::State;
use axum::response::Response;
use serde_json::{json, Value};

/// A fee in basis points as Binance's decimal fraction, 8 places.
pub fn rate(bps: u16) -> String {
    format_units(u64::from(bps) * 10_000, 8)
}

/// `GET /sapi/v1/capital/config/getall` (READ, weight 10): every asset with the caller's
/// balance, and `BTC`'s network with the custody's withdrawal terms.
pub async fn config_getall(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, p, ctx) = st.signed(&req)?;
    p.finish()?;
    let terms = match st.0.custody.get().cloned() {
        Some(c) => Some(
            tokio::task::spawn_blocking(move || c.withdrawal_terms())
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "custody task failed");
                    ApiError::internal()
                })?,
        ),
        None => None,
    };
    let rm = st.read_model().read();
    let bal = rm.balances.get(&key.account);
    let coins: Vec<Value> = st
        .markets()
        .assets
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let (free, locked) = bal.and_then(|b| b.get(i).copied()).unwrap_or((0, 0));
            let network = terms.filter(|_| a.symbol == COIN).map(|(fee, min)| {
                json!({
                    "coin": COIN,
                    "network": COIN,
                    "name": "Bitcoin",
                    "isDefault": true,
                    "depositEnable": true,
                    "withdrawEnable": true,
                    "withdrawFee": format_units(fee, BTC_DECIMALS),
                    "withdrawMin": format_units(min, BTC_DECIMALS),
                    "withdrawIntegerMultiple": format_units(1, BTC_DECIMALS),
                    "depositDust": format_units(1, BTC_DECIMALS),
                    "sameAddress": false,
                    "memoRegex": "",
                    "specialTips": "",
                    "depositDesc": "",
                    "withdrawDesc": "",
                    "busy": false,
                })
            });
            let enabled = network.is_some();
            json!({
                "coin": a.symbol,
                "name": a.symbol,
                "free": format_units(free, a.decimals),
                "locked": format_units(locked, a.decimals),
                "freeze": "0",
                "withdrawing": "0",
                "ipoing": "0",
                "ipoable": "0",
                "storage": "0",
                "isLegalMoney": false,
                "trading": true,
                "depositAllEnable": enabled,
                "withdrawAllEnable": enabled,
                "networkList": network.into_iter().collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(ok_json(&ctx, Value::Array(coins)))
}

/// The markets of an optional `symbol`, all without it.
fn selected(st: &AppState, symbol: Option<String>) -> Result<Vec<&MarketSpec>, ApiError> {
    match symbol {
        Some(s) => Ok(vec![st.markets().by_symbol(&s)?]),
        None => Ok(st.markets().markets.iter().collect()),
    }
}

/// `GET /sapi/v1/asset/tradeFee` (READ, weight 1): maker and taker rates per market.
pub async fn trade_fee(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req)?;
    let symbol = p.opt("symbol")?;
    p.finish()?;
    let v: Vec<Value> = selected(&st, symbol)?
        .into_iter()
        .map(|m| {
            json!({
                "symbol": m.symbol,
                "makerCommission": rate(m.cfg.maker_fee_bps),
                "takerCommission": rate(m.cfg.taker_fee_bps),
            })
        })
        .collect();
    Ok(ok_json(&ctx, Value::Array(v)))
}

/// `GET /api/v3/account/commission` (READ, weight 20): one market's rates (`symbol` required).
pub async fn account_commission(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req)?;
    let symbol = p.req("symbol")?;
    p.finish()?;
    let m = st.markets().by_symbol(&symbol)?;
    let zero = rate(0);
    let none = json!({"maker": zero, "taker": zero, "buyer": zero, "seller": zero});
    Ok(ok_json(
        &ctx,
        json!({
            "symbol": m.symbol,
            "standardCommission": {
                "maker": rate(m.cfg.maker_fee_bps),
                "taker": rate(m.cfg.taker_fee_bps),
                "buyer": zero,
                "seller": zero,
            },
            "specialCommission": none,
            "taxCommission": none,
            "discount": {
                "enabledForAccount": false,
                "enabledForSymbol": false,
                "discountAsset": "",
                "discount": zero,
            },
        }),
    ))
}

/// `GET /api/v3/rateLimit/order` (READ, weight 40): the account's new-order count in the current
/// 10-second window against its limit (the only order-rate limit here).
pub async fn rate_limit_order(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, p, ctx) = st.signed(&req)?;
    p.finish()?;
    let limiter = &st.0.order_limiter;
    // Charging nothing reads the count without changing it.
    let count = match limiter.charge(&key.account.to_string(), 0, crate::core::now_ms()) {
        crate::ratelimit::Charge::Ok(n) => n,
        crate::ratelimit::Charge::Limited { used, .. } => used,
    };
    Ok(ok_json(
        &ctx,
        json!([{
            "rateLimitType": "ORDERS",
            "interval": "SECOND",
            "intervalNum": 10,
            "limit": limiter.limit(),
            "count": count,
        }]),
    ))
}

/// `GET /sapi/v1/margin/allPairs` (API key, weight 1): no cross-margin pairs, `[]`. A `symbol`
/// names a market that must exist; a signature sent along (ccxt signs every SAPI call) is
/// accepted and not needed.
pub async fn margin_all_pairs(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, p, ctx) = st.keyed(&req, 1)?;
    no_margin(&st, p, &ctx)
}

/// `GET /sapi/v1/margin/isolated/allPairs` (READ, weight 10): no isolated-margin pairs, `[]`.
pub async fn margin_isolated_all_pairs(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    let (_, p, ctx) = st.signed(&req)?;
    no_margin(&st, p, &ctx)
}

fn no_margin(
    st: &AppState,
    mut p: crate::params::Params,
    ctx: &crate::state::Ctx,
) -> Result<Response, ApiError> {
    for unsigned in ["timestamp", "recvWindow", "signature"] {
        p.skip(unsigned);
    }
    if let Some(s) = p.opt("symbol")? {
        st.markets().by_symbol(&s)?;
    }
    p.finish()?;
    Ok(ok_json(ctx, json!([])))
}
