//! Signed trading endpoints: orders, open orders, history, account, trades.

use crate::error::ApiError;
use crate::keys::{ApiKey, Perms};
use crate::market::MarketSpec;
use crate::params::Params;
use crate::readmodel::{side_str, stp_str, tif_str, OrdStatus, OrderRec, TradeRec};
use crate::state::{ok_json, AppState, Req};
use axum::extract::State;
use axum::response::Response;
use matching_engine::{
    AccountId, ClientOrderId, Command, DoneReason, Event, NewOrder, OrderId, OrderRef, OrderType,
    Price, Qty, Side, StpMode, TimeInForce,
};
use serde_json::{json, Value};

pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "storage failure");
    ApiError::internal()
}

/// Binance's order object (`GET /api/v3/order`, `openOrders`, `allOrders`).
pub fn order_json(m: &MarketSpec, o: &OrderRec) -> Value {
    json!({
        "symbol": m.symbol,
        "orderId": o.id,
        "orderListId": o.list_id.map_or(-1, |l| l as i64),
        "clientOrderId": o.client_id,
        "price": m.fmt_price(Price(o.price)),
        "origQty": m.fmt_qty(Qty(o.orig_qty)),
        "executedQty": m.fmt_qty(Qty(o.executed)),
        "cummulativeQuoteQty": m.fmt_quote(u128::from(o.cum_quote)),
        "status": o.status.as_str(),
        "timeInForce": tif_str(o.tif),
        "type": o.kind.as_str(),
        "side": side_str(o.side),
        "stopPrice": m.fmt_price(Price(o.stop)),
        "icebergQty": m.fmt_qty(Qty(0)),
        "time": o.time_ms,
        "updateTime": o.update_ms,
        "isWorking": o.working_ms.is_some(),
        "workingTime": o.working_ms.map_or(-1, |w| w as i64),
        "origQuoteOrderQty": m.fmt_quote(u128::from(o.orig_quote)),
        "selfTradePreventionMode": stp_str(o.stp),
    })
}

/// What a parsed new-order request holds.
struct Parsed {
    order: NewOrder,
    resp: RespType,
    market: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RespType {
    Ack,
    Result,
    Full,
}

fn not_required(name: &str) -> ApiError {
    ApiError::bad(-1106, format!("Parameter '{name}' sent when not required."))
}

fn parse_new_order(st: &AppState, key: &ApiKey, p: &mut Params) -> Result<Parsed, ApiError> {
    let sym = p.req("symbol")?;
    let side = match p.req("side")?.as_str() {
        "BUY" => Side::Buy,
        "SELL" => Side::Sell,
        _ => return Err(ApiError::bad(-1117, "Invalid side.")),
    };
    let ty = p.req("type")?;
    let m = st.markets().by_symbol(&sym)?;
    let tif = p.opt("timeInForce")?;
    let qty = p.opt("quantity")?;
    let quote = p.opt("quoteOrderQty")?;
    let price = p.opt("price")?;
    let stop = p.opt("stopPrice")?;
    let client = p.opt("newClientOrderId")?;
    let resp = p.opt("newOrderRespType")?;
    for unsupported in [
        "icebergQty",
        "trailingDelta",
        "pegPriceType",
        "pegOffsetValue",
        "pegOffsetType",
    ] {
        if p.opt(unsupported)?.is_some() {
            return Err(ApiError::bad(-1014, "Unsupported order combination."));
        }
    }
    let stp = match p.opt("selfTradePreventionMode")?.as_deref() {
        None | Some("EXPIRE_TAKER") => StpMode::ExpireTaker,
        Some("NONE") => StpMode::None,
        Some("EXPIRE_MAKER") => StpMode::ExpireMaker,
        Some("EXPIRE_BOTH") => StpMode::ExpireBoth,
        Some(_) => return Err(ApiError::invalid_value("selfTradePreventionMode")),
    };
    let parse_tif = |t: Option<String>| -> Result<TimeInForce, ApiError> {
        match t.as_deref() {
            None => Err(ApiError::missing("timeInForce")),
            Some("GTC") => Ok(TimeInForce::Gtc),
            Some("IOC") => Ok(TimeInForce::Ioc),
            Some("FOK") => Ok(TimeInForce::Fok),
            Some(_) => Err(ApiError::bad(-1115, "Invalid timeInForce.")),
        }
    };
    let need_qty = |q: &Option<String>| -> Result<Qty, ApiError> {
        m.parse_qty(
            "quantity",
            q.as_deref().ok_or_else(|| ApiError::missing("quantity"))?,
        )
    };
    let need_price = |name: &str, v: &Option<String>| -> Result<Price, ApiError> {
        m.parse_price(name, v.as_deref().ok_or_else(|| ApiError::missing(name))?)
    };
    let forbid = |name: &str, v: &Option<String>| -> Result<(), ApiError> {
        if v.is_some() {
            Err(not_required(name))
        } else {
            Ok(())
        }
    };
    let (order_type, tif, post_only, default_resp) = match ty.as_str() {
        "LIMIT" => {
            forbid("stopPrice", &stop)?;
            forbid("quoteOrderQty", &quote)?;
            let t = parse_tif(tif)?;
            let (pr, q) = (need_price("price", &price)?, need_qty(&qty)?);
            m.check_notional(pr, q)?;
            (
                OrderType::Limit { price: pr, qty: q },
                t,
                false,
                RespType::Full,
            )
        }
        "LIMIT_MAKER" => {
            forbid("stopPrice", &stop)?;
            forbid("quoteOrderQty", &quote)?;
            forbid("timeInForce", &tif)?;
            let (pr, q) = (need_price("price", &price)?, need_qty(&qty)?);
            m.check_notional(pr, q)?;
            (
                OrderType::Limit { price: pr, qty: q },
                TimeInForce::Gtc,
                true,
                RespType::Ack,
            )
        }
        "MARKET" => {
            forbid("price", &price)?;
            forbid("stopPrice", &stop)?;
            forbid("timeInForce", &tif)?;
            let ot = match (&qty, &quote) {
                (Some(_), None) => OrderType::Market {
                    qty: need_qty(&qty)?,
                },
                (None, Some(qq)) => OrderType::MarketBudget {
                    budget: m.parse_quote("quoteOrderQty", qq)?,
                },
                (Some(_), Some(_)) => return Err(ApiError::bad_combination()),
                (None, None) => return Err(ApiError::bad(
                    -1102,
                    "Param 'quantity' or 'quoteOrderQty' must be sent, but both were empty/null!",
                )),
            };
            (ot, TimeInForce::Ioc, false, RespType::Full)
        }
        "STOP_LOSS" | "TAKE_PROFIT" => {
            forbid("price", &price)?;
            forbid("quoteOrderQty", &quote)?;
            forbid("timeInForce", &tif)?;
            let (sp, q) = (need_price("stopPrice", &stop)?, need_qty(&qty)?);
            let ot = if ty == "STOP_LOSS" {
                OrderType::StopMarket { stop: sp, qty: q }
            } else {
                OrderType::TakeProfitMarket { stop: sp, qty: q }
            };
            (ot, TimeInForce::Gtc, false, RespType::Ack)
        }
        "STOP_LOSS_LIMIT" | "TAKE_PROFIT_LIMIT" => {
            forbid("quoteOrderQty", &quote)?;
            let t = parse_tif(tif)?;
            let (sp, pr, q) = (
                need_price("stopPrice", &stop)?,
                need_price("price", &price)?,
                need_qty(&qty)?,
            );
            m.check_notional(pr, q)?;
            let ot = if ty == "STOP_LOSS_LIMIT" {
                OrderType::StopLimit {
                    stop: sp,
                    price: pr,
                    qty: q,
                }
            } else {
                OrderType::TakeProfitLimit {
                    stop: sp,
                    price: pr,
                    qty: q,
                }
            };
            (ot, t, false, RespType::Ack)
        }
        _ => return Err(ApiError::bad(-1116, "Invalid orderType.")),
    };
    let resp = match resp.as_deref() {
        None => default_resp,
        Some("ACK") => RespType::Ack,
        Some("RESULT") => RespType::Result,
        Some("FULL") => RespType::Full,
        Some(_) => return Err(ApiError::invalid_value("newOrderRespType")),
    };
    let client = match client {
        Some(c) => ClientOrderId::new(&c)
            .map_err(|_| ApiError::illegal("newClientOrderId", "^[a-zA-Z0-9-_.:/]{1,36}$"))?,
        None => ClientOrderId::new(&st.gen_client_id()).map_err(|_| ApiError::internal())?,
    };
    Ok(Parsed {
        order: NewOrder {
            account: AccountId(key.account),
            market: m.id,
            side,
            order_type,
            tif,
            post_only,
            stp,
            client_id: Some(client),
        },
        resp,
        market: usize::from(m.id.0),
    })
}

/// The new order's state after its own command, from the command's events.
pub(crate) fn order_from_events(
    events: &[Event],
    id: OrderId,
    ms: u64,
) -> Option<(OrderRec, Vec<TradeRec>)> {
    let mut rec: Option<OrderRec> = None;
    let mut fills = Vec::new();
    for ev in events {
        match *ev {
            Event::OrderNew {
                info,
                order_type,
                tif,
                post_only,
                stp,
            } if info.order == id => {
                rec = Some(OrderRec::placed(info, &order_type, tif, post_only, stp, ms));
            }
            Event::Trade {
                trade,
                market,
                price,
                qty,
                taker_side,
                maker_order,
                taker_order,
                maker_account,
                taker_account,
                maker_fee,
                taker_fee,
                notional,
                taker_remaining,
                ..
            } if taker_order == id => {
                if let Some(o) = rec.as_mut() {
                    o.executed += qty.0;
                    o.cum_quote = o.cum_quote.saturating_add(notional.0);
                    o.status = if taker_remaining.is_zero() && o.orig_quote == 0 {
                        OrdStatus::Filled
                    } else {
                        OrdStatus::PartiallyFilled
                    };
                    if o.orig_quote != 0 {
                        o.orig_qty = o.executed;
                    }
                }
                fills.push(TradeRec {
                    id: trade.0,
                    market: market.0,
                    price: price.0,
                    qty: qty.0,
                    quote: notional.0,
                    taker_side,
                    maker_order: maker_order.0,
                    taker_order: taker_order.0,
                    maker_account: maker_account.0,
                    taker_account: taker_account.0,
                    maker_fee: maker_fee.0,
                    taker_fee: taker_fee.0,
                    time_ms: ms,
                });
            }
            Event::OrderTriggered { info, .. } if info.order == id => {
                if let Some(o) = rec.as_mut() {
                    o.working_ms = Some(ms);
                }
            }
            Event::OrderDone { info, reason, .. } if info.order == id => {
                if let Some(o) = rec.as_mut() {
                    o.status = OrdStatus::done(reason, o.orig_quote != 0, o.executed > 0);
                }
            }
            _ => {}
        }
    }
    rec.map(|r| (r, fills))
}

/// An order's record (as the read models hold it, maybe from before the command) as the
/// command's own `events` leave it: the status, filled quantity and quote filled of its
/// `OrderDone` (the engine counts an order's quote filled since it was placed, or since a
/// format-3 snapshot was upgraded: the larger of it and the record's is the answer), the
/// price, quantity and filled quantity of its `OrderAmended` (an amended order is open: `NEW`,
/// or `PARTIALLY_FILLED` once something filled), and for a pending order of an OTO/OTOCO list
/// the end of its list (`OtoDone`: `CANCELED` with a cancelled working order, else `EXPIRED`,
/// as the read models record it). Answers about a command are built from its reply, which is
/// authoritative, because the read models may lag the engine.
pub(crate) fn after_events(mut o: OrderRec, events: &[Event], ms: u64) -> OrderRec {
    for ev in events {
        match *ev {
            Event::OrderDone {
                info,
                reason,
                filled,
                quote,
                ..
            } if info.order.0 == o.id => {
                let budget = o.orig_quote != 0;
                if !budget {
                    o.executed = filled.0;
                }
                o.cum_quote = o.cum_quote.max(quote.0);
                o.status = OrdStatus::done(reason, budget, filled.0 > 0);
                o.update_ms = ms;
            }
            Event::OrderAmended {
                info,
                price,
                qty,
                remaining,
                ..
            } if info.order.0 == o.id => {
                // The engine's invariant: the amended total is the filled quantity plus what
                // stays open, and something stays open.
                let filled = qty.0.checked_sub(remaining.0);
                debug_assert!(filled.is_some() && !remaining.is_zero(), "{ev:?}");
                o.price = price.0;
                o.orig_qty = qty.0;
                o.executed = filled.unwrap_or(o.executed);
                o.status = if o.executed > 0 {
                    OrdStatus::PartiallyFilled
                } else {
                    OrdStatus::New
                };
                o.update_ms = ms;
            }
            Event::OtoDone { list, outcome, .. }
                if o.status == OrdStatus::PendingNew && o.list_id == Some(list.0) =>
            {
                o.status = match outcome {
                    matching_engine::OtoOutcome::Cancelled(DoneReason::Cancelled) => {
                        OrdStatus::Canceled
                    }
                    matching_engine::OtoOutcome::Placed => continue,
                    _ => OrdStatus::Expired,
                };
                o.update_ms = ms;
            }
            _ => {}
        }
    }
    o
}

/// Places a parsed order; the Binance answer for its response type, built from the order's own
/// events: it does not wait for the read models ([`AppState::submit_ahead`]).
async fn place(st: &AppState, parsed: &Parsed) -> Result<Value, ApiError> {
    let reply = st.submit_ahead(Command::NewOrder(parsed.order)).await?;
    if let Err(code) = reply.result {
        return Err(ApiError::new_order_rejected(code));
    }
    let (id, ms) = reply
        .events
        .iter()
        .find_map(|e| match e {
            Event::Accepted { order, time, .. } => order.map(|o| (o, time.as_millis())),
            _ => None,
        })
        .ok_or_else(ApiError::internal)?;
    let m = &st.markets().markets[parsed.market];
    let (o, fills) = order_from_events(&reply.events, id, ms).ok_or_else(ApiError::internal)?;
    let mut v = json!({
        "symbol": m.symbol,
        "orderId": o.id,
        "orderListId": o.list_id.map_or(-1, |l| l as i64),
        "clientOrderId": o.client_id,
        "transactTime": ms,
    });
    if parsed.resp != RespType::Ack {
        let full = order_json(m, &o);
        if let (Some(obj), Value::Object(f)) = (v.as_object_mut(), full) {
            for k in [
                "price",
                "origQty",
                "executedQty",
                "origQuoteOrderQty",
                "cummulativeQuoteQty",
                "status",
                "timeInForce",
                "type",
                "side",
                "workingTime",
                "selfTradePreventionMode",
            ] {
                if let Some(x) = f.get(k) {
                    obj.insert(k.to_owned(), x.clone());
                }
            }
            if o.stop != 0 {
                obj.insert("stopPrice".into(), f["stopPrice"].clone());
            }
        }
    }
    if parsed.resp == RespType::Full {
        let fills: Vec<Value> = fills
            .iter()
            .map(|t| {
                json!({
                    "price": m.fmt_price(Price(t.price)),
                    "qty": m.fmt_qty(Qty(t.qty)),
                    "commission": m.fmt_quote(u128::from(t.taker_fee)),
                    "commissionAsset": m.quote.symbol,
                    "tradeId": t.id,
                })
            })
            .collect();
        v["fills"] = Value::Array(fills);
    }
    Ok(v)
}

fn with_order_count(mut res: Response, orders: u64) -> Response {
    res.headers_mut().insert(
        "x-mbx-order-count-10s",
        axum::http::HeaderValue::from(orders),
    );
    res
}

/// `POST /api/v3/order`.
pub async fn new_order(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let parsed = parse_new_order(&st, &key, &mut p)?;
    p.finish()?;
    let orders = st.charge_order(key.account)?;
    let v = place(&st, &parsed).await?;
    Ok(with_order_count(ok_json(&ctx, v), orders))
}

/// Cancels one order; Binance's cancel answer.
///
/// The answer is the order's record (price, type, time in force, ...) with the cancel's
/// outcome from its own events ([`after_events`]). The engine's events do not carry the
/// order's static fields, so the record must exist: when the read models do not hold the order,
/// they are first waited for until they hold every command the engine applied before this one
/// ([`AppState::sync_read_model`]); not in time, `-1008` and nothing is sent (sending the cancel
/// and then failing to describe it would tell the client a cancel that happened failed). Held
/// after the wait or never placed: the engine answers (`-2011` for an unknown order). The same
/// wait comes first when a client order id names a finished order (the id may have been reused
/// by an order the read models do not hold yet). Should the cancelled order still be missing
/// after the cancel, the read models are waited for again, then `-1007`: never `-1000` for a
/// cancel that happened.
async fn cancel(
    st: &AppState,
    account: u32,
    m: &MarketSpec,
    named: Named,
    cancel_client: &str,
) -> Result<Value, ApiError> {
    let r = named.r;
    let mut before = lookup(st, account, m, r)?;
    // A client order id held by a finished order may have been reused by a newer order the
    // read models have not applied yet (the engine cancels that one): wait for them as for an
    // order they do not hold.
    let stale = matches!(r, OrderRef::Client(_)) && before.as_ref().is_some_and(|o| !o.is_open());
    if before.is_none() || stale {
        if !st.sync_read_model().await {
            return Err(ApiError::busy());
        }
        before = lookup(st, account, m, r)?;
    }
    // An id sent with another order's client order id names no order: refused, nothing sent.
    // The read models hold every order the engine applied before the wait above, and an
    // order's client order id never changes.
    if named.check.is_some() && !before.as_ref().is_some_and(|o| named.matches(o)) {
        return Err(ApiError::cancel_rejected(
            matching_engine::RejectCode::UnknownOrder,
        ));
    }
    let reply = st
        .submit(Command::Cancel {
            account: AccountId(account),
            market: m.id,
            order: r,
        })
        .await?;
    // The order the engine cancelled is the one it names in its answer: the pending order of
    // an OTO list is cancelled by cancelling the list's working order, whose `OrderDone` is
    // then the only one among the events (review: the answer described the working order).
    if let Err(code) = reply.result {
        return Err(ApiError::cancel_rejected(code));
    }
    let named = reply.events.iter().find_map(|e| match e {
        Event::Accepted { order, .. } => *order,
        _ => None,
    });
    let id = named
        .map(|o| o.0)
        .or_else(|| done_ids(&reply.events).first().copied())
        .ok_or_else(ApiError::internal)?;
    // The order as the read models hold it now (they may not have applied the cancel yet), or
    // as they held it before the cancel, with the cancel's outcome from its own events.
    let mut o = st
        .read_model()
        .find_order(account, id)
        .map_err(internal)?
        .or(before.filter(|o| o.id == id));
    if o.is_none() {
        // The engine cancelled another order than the one looked up (a client order id reused
        // by an order the read models had not seen yet): the cancel happened, so wait for them
        // to hold it and look again; not in time, its outcome is unknown to this answer
        // (`-1007`, the client looks the order up), never an error after a done cancel.
        if !st.read_model().wait_for(reply.seq).await {
            return Err(ApiError::outcome_unknown());
        }
        o = st.read_model().find_order(account, id).map_err(internal)?;
    }
    let o = o.ok_or_else(ApiError::outcome_unknown)?;
    let ms = accepted_ms(&reply.events);
    Ok(cancel_json(
        m,
        &after_events(o, &reply.events, ms),
        cancel_client,
        ms,
    ))
}

fn err_json(e: &ApiError) -> Value {
    json!({"code": e.code, "msg": e.msg})
}

/// `POST /api/v3/order/cancelReplace` (ccxt's `editOrder`): cancels an order, then places a
/// new one (two engine commands; `STOP_ON_FAILURE` skips the new order when the cancel fails,
/// `ALLOW_FAILURE` places it anyway). A half whose outcome is unknown makes the answer `-1007`
/// (503; `data` names that half `UNKNOWN`), never `-2021`/`-2022`.
pub async fn cancel_replace(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let mode = p.req("cancelReplaceMode")?;
    let allow_failure = match mode.as_str() {
        "STOP_ON_FAILURE" => false,
        "ALLOW_FAILURE" => true,
        _ => return Err(ApiError::invalid_value("cancelReplaceMode")),
    };
    let r = Named::read(&mut p, "cancelOrderId", "cancelOrigClientOrderId")?;
    let cancel_client = match p.opt("cancelNewClientOrderId")? {
        Some(c) => {
            ClientOrderId::new(&c).map_err(|_| {
                ApiError::illegal("cancelNewClientOrderId", "^[a-zA-Z0-9-_.:/]{1,36}$")
            })?;
            c
        }
        None => st.gen_client_id(),
    };
    let parsed = parse_new_order(&st, &key, &mut p)?;
    p.finish()?;
    let orders = st.charge_order(key.account)?;
    let m = &st.markets().markets[parsed.market];
    let cancelled = cancel(&st, key.account, m, r, &cancel_client).await;
    let placed = if cancelled.is_ok() || allow_failure {
        Some(place(&st, &parsed).await)
    } else {
        None
    };
    // A half whose outcome is unknown (`-1007`: it may have been applied) makes the whole
    // answer unknown, never a failure: a client told that its replacement failed places it
    // again, one told that its cancel failed believes the order still works.
    let half = |r: Option<&Result<Value, ApiError>>| match r {
        None => ("NOT_ATTEMPTED", Value::Null),
        Some(Ok(v)) => ("SUCCESS", v.clone()),
        Some(Err(e)) if e.code == -1007 => ("UNKNOWN", err_json(e)),
        Some(Err(e)) => ("FAILURE", err_json(e)),
    };
    let ((cr, cv), (nr, nv)) = (half(Some(&cancelled)), half(placed.as_ref()));
    if cr == "UNKNOWN" || nr == "UNKNOWN" {
        let e = ApiError::outcome_unknown();
        let mut res = ok_json(
            &ctx,
            json!({
                "code": e.code,
                "msg": e.msg,
                "data": {
                    "cancelResult": cr,
                    "newOrderResult": nr,
                    "cancelResponse": cv,
                    "newOrderResponse": nv,
                },
            }),
        );
        *res.status_mut() = e.status;
        return Ok(with_order_count(res, orders));
    }
    let (status, body) = match (&cancelled, &placed) {
        (Ok(c), Some(Ok(n))) => {
            return Ok(with_order_count(
                ok_json(
                    &ctx,
                    json!({
                        "cancelResult": "SUCCESS",
                        "newOrderResult": "SUCCESS",
                        "cancelResponse": c,
                        "newOrderResponse": n,
                    }),
                ),
                orders,
            ))
        }
        (Err(ce), None) => (
            axum::http::StatusCode::BAD_REQUEST,
            json!({
                "code": -2022,
                "msg": "Order cancel-replace failed.",
                "data": {
                    "cancelResult": "FAILURE",
                    "newOrderResult": "NOT_ATTEMPTED",
                    "cancelResponse": err_json(ce),
                    "newOrderResponse": null,
                },
            }),
        ),
        (Err(ce), Some(Err(ne))) => (
            axum::http::StatusCode::BAD_REQUEST,
            json!({
                "code": -2022,
                "msg": "Order cancel-replace failed.",
                "data": {
                    "cancelResult": "FAILURE",
                    "newOrderResult": "FAILURE",
                    "cancelResponse": err_json(ce),
                    "newOrderResponse": err_json(ne),
                },
            }),
        ),
        _ => (
            axum::http::StatusCode::CONFLICT,
            json!({
                "code": -2021,
                "msg": "Order cancel-replace partially failed.",
                "data": {
                    "cancelResult": cr,
                    "newOrderResult": nr,
                    "cancelResponse": cv,
                    "newOrderResponse": nv,
                },
            }),
        ),
    };
    let mut res = ok_json(&ctx, body);
    *res.status_mut() = status;
    Ok(with_order_count(res, orders))
}

/// `POST /api/v3/order/test`: validates like a new order, sends nothing to the engine.
pub async fn test_order(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    parse_new_order(&st, &key, &mut p)?;
    p.finish()?;
    Ok(ok_json(&ctx, json!({})))
}

/// An order named by a request: by id or by client order id; with both, the id names it and
/// the client order id must be that order's (Binance: "the orderId is searched first, then the
/// origClientOrderId from that result is checked against that order"), else the request is
/// refused as for an unknown order.
#[derive(Debug, Clone, Copy)]
struct Named {
    r: OrderRef,
    /// The client order id sent with an `orderId`, to check against the order found.
    check: Option<ClientOrderId>,
}

impl Named {
    /// Reads `<id_name>` / `<client_name>` (`orderId` / `origClientOrderId`).
    fn read(p: &mut Params, id_name: &str, client_name: &str) -> Result<Self, ApiError> {
        let id = p.opt_u64(id_name)?;
        let client = p
            .opt(client_name)?
            .map(|c| {
                ClientOrderId::new(&c)
                    .map_err(|_| ApiError::illegal(client_name, "^[a-zA-Z0-9-_.:/]{1,36}$"))
            })
            .transpose()?;
        match (id, client) {
            (Some(id), check) => Ok(Self {
                r: OrderRef::Id(OrderId(id)),
                check,
            }),
            (None, Some(c)) => Ok(Self {
                r: OrderRef::Client(c),
                check: None,
            }),
            (None, None) => Err(ApiError::bad(
                -1102,
                format!(
                    "Param '{client_name}' or '{id_name}' must be sent, but both were empty/null!"
                ),
            )),
        }
    }

    /// True unless a client order id was sent with the id and `o` has another (an order's client
    /// order id never changes, so the read models' record is enough to tell).
    fn matches(&self, o: &OrderRec) -> bool {
        self.check.is_none_or(|c| o.client_id == c.as_str())
    }
}

/// Reads `orderId` / `origClientOrderId`.
fn order_ref(p: &mut Params) -> Result<Named, ApiError> {
    Named::read(p, "orderId", "origClientOrderId")
}

/// The order `r` names in market `m` (a client order id is looked up in that market).
fn lookup(
    st: &AppState,
    account: u32,
    m: &MarketSpec,
    r: OrderRef,
) -> Result<Option<OrderRec>, ApiError> {
    let rm = st.read_model();
    match r {
        OrderRef::Id(id) => rm.find_order(account, id.0),
        OrderRef::Client(c) => rm.find_order_by_client(account, Some(m.id.0), c.as_str()),
    }
    .map_err(internal)
}

/// `GET /api/v3/order`.
pub async fn get_order(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let sym = p.req("symbol")?;
    let r = order_ref(&mut p)?;
    p.finish()?;
    let m = st.markets().by_symbol(&sym)?;
    let o = lookup(&st, key.account, m, r.r)?
        .filter(|o| o.market == m.id.0 && r.matches(o))
        .ok_or_else(ApiError::no_such_order)?;
    Ok(ok_json(&ctx, order_json(m, &o)))
}

pub(crate) fn cancel_json(m: &MarketSpec, o: &OrderRec, cancel_client: &str, ms: u64) -> Value {
    json!({
        "symbol": m.symbol,
        "origClientOrderId": o.client_id,
        "orderId": o.id,
        "orderListId": o.list_id.map_or(-1, |l| l as i64),
        "clientOrderId": cancel_client,
        "transactTime": ms,
        "price": m.fmt_price(Price(o.price)),
        "origQty": m.fmt_qty(Qty(o.orig_qty)),
        "executedQty": m.fmt_qty(Qty(o.executed)),
        "origQuoteOrderQty": m.fmt_quote(u128::from(o.orig_quote)),
        "cummulativeQuoteQty": m.fmt_quote(u128::from(o.cum_quote)),
        "status": o.status.as_str(),
        "timeInForce": tif_str(o.tif),
        "type": o.kind.as_str(),
        "side": side_str(o.side),
        "stopPrice": m.fmt_price(Price(o.stop)),
        "selfTradePreventionMode": stp_str(o.stp),
    })
}

fn done_ids(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::OrderDone {
                info,
                reason: DoneReason::Cancelled,
                ..
            } => Some(info.order.0),
            _ => None,
        })
        .collect()
}

pub(crate) fn accepted_ms(events: &[Event]) -> u64 {
    events
        .iter()
        .find_map(|e| match e {
            Event::Accepted { time, .. } => Some(time.as_millis()),
            _ => None,
        })
        .unwrap_or_else(crate::core::now_ms)
}

/// `DELETE /api/v3/order`.
pub async fn cancel_order(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let sym = p.req("symbol")?;
    let r = order_ref(&mut p)?;
    let cancel_client = match p.opt("newClientOrderId")? {
        Some(c) => {
            ClientOrderId::new(&c)
                .map_err(|_| ApiError::illegal("newClientOrderId", "^[a-zA-Z0-9-_.:/]{1,36}$"))?;
            c
        }
        None => st.gen_client_id(),
    };
    p.finish()?;
    let m = st.markets().by_symbol(&sym)?;
    let v = cancel(&st, key.account, m, r, &cancel_client).await?;
    Ok(ok_json(&ctx, v))
}

/// `PUT /api/v3/order/amend/keepPriority`: lowers an open limit order's quantity in place,
/// keeping its time priority. The client order id stays the order's own: `newClientOrderId`, if
/// sent, must equal it (the engine keeps one id per order).
///
/// The engine checks the keep-priority condition itself ([`Command::AmendKeepPriority`]) against
/// the order as it stands when the amend applies: of two amends in flight at once, the second
/// cannot raise the quantity the first lowered (it is refused, `-2010`).
pub async fn amend_keep_priority(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let sym = p.req("symbol")?;
    let named = order_ref(&mut p)?;
    let r = named.r;
    let new_client = p.opt("newClientOrderId")?;
    let new_qty = p.req("newQty")?;
    p.finish()?;
    let m = st.markets().by_symbol(&sym)?;
    let qty = m.parse_qty("newQty", &new_qty)?;
    // The order as the read models hold it. They may lag the engine, but a stale record cannot
    // turn this amend into an increase: the engine itself refuses a `newQty` that is not below
    // the order's quantity as it holds it (`InvalidAmend`, nothing changed). So the read models
    // are caught up first ([`AppState::sync_read_model`]; not in time: `-1008`, nothing sent)
    // only when they do not show the order open with a quantity above `newQty`, or when the
    // engine refused: then the answer says why as of every command before this one.
    let usable = |o: &Option<OrderRec>| {
        o.as_ref()
            .is_some_and(|o| o.market == m.id.0 && o.is_open() && qty.0 < o.orig_qty)
    };
    let mut current = lookup(&st, key.account, m, r)?;
    let mut synced = false;
    let reply = loop {
        if !usable(&current) && !synced {
            if !st.sync_read_model().await {
                return Err(ApiError::busy());
            }
            synced = true;
            current = lookup(&st, key.account, m, r)?;
        }
        let o = current
            .as_ref()
            .filter(|o| o.market == m.id.0 && o.is_open() && named.matches(o))
            .ok_or_else(|| ApiError::bad(-2013, "Order does not exist."))?;
        if let Some(c) = &new_client {
            if *c != o.client_id {
                return Err(ApiError::bad(-1014, "Unsupported order combination."));
            }
        }
        if qty.0 >= o.orig_qty {
            return Err(ApiError::invalid_value("newQty"));
        }
        let reply = st
            .submit(Command::AmendKeepPriority {
                account: AccountId(key.account),
                market: m.id,
                order: OrderRef::Id(OrderId(o.id)),
                new_qty: qty,
            })
            .await?;
        match reply.result {
            Ok(()) => break reply,
            // Refused as the engine holds the order: say why as of the commands before. An
            // unknown order too: a client order id the read models still give to an order the
            // engine closed may belong to a newer order they do not hold yet.
            Err(
                matching_engine::RejectCode::InvalidAmend
                | matching_engine::RejectCode::UnknownOrder,
            ) if !synced => {
                current = None;
            }
            Err(matching_engine::RejectCode::UnknownOrder) => return Err(ApiError::no_such_order()),
            Err(other) => return Err(ApiError::new_order_rejected(other)),
        }
    };
    let current = current.expect("an amend was sent for it");
    // The order as the read models hold it after the amend when they have applied it (the
    // reply waited for them: fills before it count in `cumulativeQuoteQty`); if they lag, the
    // order as they held it, with the amend's outcome from its own events.
    let ms = accepted_ms(&reply.events);
    let rm = st.read_model();
    let o = match rm.find_order(key.account, current.id) {
        Ok(Some(fresh)) if rm.applied() >= reply.seq => fresh,
        _ => after_events(current.clone(), &reply.events, ms),
    };
    Ok(ok_json(
        &ctx,
        json!({
            "transactTime": ms,
            "executionId": reply.seq,
            "amendedOrder": {
                "symbol": m.symbol,
                "orderId": o.id,
                "orderListId": -1,
                "origClientOrderId": current.client_id,
                "clientOrderId": o.client_id,
                "price": m.fmt_price(Price(o.price)),
                "qty": m.fmt_qty(Qty(o.orig_qty)),
                "executedQty": m.fmt_qty(Qty(o.executed)),
                "preventedQty": m.fmt_qty(Qty(0)),
                "quoteOrderQty": m.fmt_quote(u128::from(o.orig_quote)),
                "cumulativeQuoteQty": m.fmt_quote(u128::from(o.cum_quote)),
                "status": o.status.as_str(),
                "timeInForce": tif_str(o.tif),
                "type": o.kind.as_str(),
                "side": side_str(o.side),
                "workingTime": o.working_ms.map_or(-1, |w| w as i64),
                "selfTradePreventionMode": stp_str(o.stp),
            },
        }),
    ))
}

/// `GET /api/v3/openOrders`.
pub async fn open_orders(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    // The weight is chosen without validating anything (a request that fails validation is
    // charged too: reading `symbol` first answered an empty one `-1105` at no cost, an
    // unmetered loop on the WebSocket API); `signed_weighted` charges, then checks.
    let weight = match req.params() {
        Ok(p) if p.has("symbol") => 6,
        _ => 80,
    };
    let (key, mut p, ctx) = st.signed_weighted(&req, weight)?;
    let sym = p.opt("symbol")?;
    p.finish()?;
    let market = sym
        .map(|s| st.markets().by_symbol(&s).map(|m| m.id.0))
        .transpose()?;
    let rm = st.read_model().read();
    let v: Vec<Value> = rm
        .open_by_account
        .get(&key.account)
        .into_iter()
        .flatten()
        .filter_map(|id| rm.open.get(id))
        .filter(|o| market.is_none_or(|m| o.market == m))
        .map(|o| order_json(st.markets().get(matching_engine::MarketId(o.market)), o))
        .collect();
    Ok(ok_json(&ctx, Value::Array(v)))
}

/// `DELETE /api/v3/openOrders`.
pub async fn cancel_open_orders(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let sym = p.req("symbol")?;
    p.finish()?;
    let m = st.markets().by_symbol(&sym)?;
    let reply = st
        .submit(Command::CancelAll {
            account: AccountId(key.account),
            market: Some(m.id),
        })
        .await?;
    if let Err(code) = reply.result {
        return Err(ApiError::cancel_rejected(code));
    }
    let ids = done_ids(&reply.events);
    if ids.is_empty() {
        return Err(ApiError::bad(-2011, "Unknown order sent."));
    }
    let ms = accepted_ms(&reply.events);
    // Each report from the order as the read models hold it with the cancel's outcome from its
    // own events (they may not have applied the cancel yet, and `submit` answers after 5 s
    // without them). An order they do not hold yet (placed just before, answered ahead of
    // them) is waited for; not in time, the answer is `-1007`, never a list without it: the
    // orders were cancelled (review: a lagging read model made a done cancel read `NEW`, and
    // left out an order it did not hold, `[]` answering "nothing cancelled").
    let mut v = Vec::with_capacity(ids.len());
    for id in ids {
        let mut o = st
            .read_model()
            .find_order(key.account, id)
            .map_err(internal)?;
        if o.is_none() {
            if !st.read_model().wait_for(reply.seq).await {
                return Err(ApiError::outcome_unknown());
            }
            o = st
                .read_model()
                .find_order(key.account, id)
                .map_err(internal)?;
        }
        let o = o.ok_or_else(ApiError::outcome_unknown)?;
        let c = st.gen_client_id();
        v.push(cancel_json(m, &after_events(o, &reply.events, ms), &c, ms));
    }
    Ok(ok_json(&ctx, Value::Array(v)))
}

fn time_range(p: &mut Params) -> Result<(Option<u64>, Option<u64>), ApiError> {
    let s = p.opt_u64("startTime")?;
    let e = p.opt_u64("endTime")?;
    if let (Some(s), Some(e)) = (s, e) {
        if e < s {
            return Err(ApiError::invalid_value("endTime"));
        }
        if e - s > 24 * 3_600_000 {
            return Err(ApiError::bad(
                -1127,
                "More than 24 hours between startTime and endTime.",
            ));
        }
    }
    Ok((s, e))
}

/// `GET /api/v3/allOrders`.
pub async fn all_orders(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let sym = p.req("symbol")?;
    let from = p.opt_u64("orderId")?;
    let (s, e) = time_range(&mut p)?;
    let limit = p.limit(500, 1000)?;
    p.finish()?;
    let m = st.markets().by_symbol(&sym)?;
    let rows = st
        .read_model()
        .orders_history(key.account, m.id.0, from, s, e, limit)
        .map_err(internal)?;
    let v: Vec<Value> = rows.iter().map(|o| order_json(m, o)).collect();
    Ok(ok_json(&ctx, Value::Array(v)))
}

/// `GET /api/v3/account`.
pub async fn account(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let omit_zero = match p.opt("omitZeroBalances")?.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::invalid_value("omitZeroBalances")),
    };
    p.finish()?;
    let mk = st.markets();
    let (maker, taker) = mk
        .markets
        .first()
        .map_or((0, 0), |m| (m.cfg.maker_fee_bps, m.cfg.taker_fee_bps));
    let rm = st.read_model().read();
    let bal = rm.balances.get(&key.account);
    let balances: Vec<Value> = mk
        .assets
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let (f, l) = bal.and_then(|b| b.get(i).copied()).unwrap_or((0, 0));
            if omit_zero && f == 0 && l == 0 {
                return None;
            }
            Some(json!({
                "asset": a.symbol,
                "free": crate::decimal::format_units(f, a.decimals),
                "locked": crate::decimal::format_units(l, a.decimals),
            }))
        })
        .collect();
    let rate = |bps: u16| crate::decimal::format_units(u64::from(bps) * 10_000, 8);
    Ok(ok_json(
        &ctx,
        json!({
            "makerCommission": maker,
            "takerCommission": taker,
            "buyerCommission": 0,
            "sellerCommission": 0,
            "commissionRates": {
                "maker": rate(maker),
                "taker": rate(taker),
                "buyer": "0.00000000",
                "seller": "0.00000000",
            },
            "canTrade": key.perms.has(Perms::TRADE),
            "canWithdraw": key.perms.has(Perms::WITHDRAW),
            "canDeposit": true,
            "brokered": false,
            "requireSelfTradePrevention": false,
            "preventSor": false,
            "updateTime": crate::core::now_ms(),
            "accountType": "SPOT",
            "balances": balances,
            "permissions": ["SPOT"],
            "uid": key.account,
        }),
    ))
}

/// `GET /api/v3/myTrades`.
pub async fn my_trades(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let sym = p.req("symbol")?;
    let order = p.opt_u64("orderId")?;
    let from = p.opt_u64("fromId")?;
    let (s, e) = time_range(&mut p)?;
    let limit = p.limit(500, 1000)?;
    p.finish()?;
    let m = st.markets().by_symbol(&sym)?;
    let acct = key.account;
    let rm = st.read_model();
    let rows = match order {
        // Its own trades only, found however old the order is.
        Some(o) => {
            let window = crate::readmodel::TradeWindow {
                from_id: from,
                start_ms: s,
                end_ms: e,
            };
            rm.order_trades(acct, m.id.0, o, window, limit)
        }
        None => rm.trades_history(acct, m.id.0, from, s, e, limit),
    }
    .map_err(internal)?;
    let mut v = Vec::new();
    for t in &rows {
        for (maker, oid) in [(true, t.maker_order), (false, t.taker_order)] {
            let who = if maker {
                t.maker_account
            } else {
                t.taker_account
            };
            if who != acct || order.is_some_and(|o| o != oid) {
                continue;
            }
            let is_buyer = (t.taker_side == Side::Buy) != maker;
            v.push(json!({
                "symbol": m.symbol,
                "id": t.id,
                "orderId": oid,
                "orderListId": -1,
                "price": m.fmt_price(Price(t.price)),
                "qty": m.fmt_qty(Qty(t.qty)),
                "quoteQty": m.fmt_quote(u128::from(t.quote)),
                "commission": m.fmt_quote(u128::from(if maker { t.maker_fee } else { t.taker_fee })),
                "commissionAsset": m.quote.symbol,
                "time": t.time_ms,
                "isBuyer": is_buyer,
                "isMaker": maker,
                "isBestMatch": true,
            }));
        }
    }
    v.truncate(limit as usize);
    Ok(ok_json(&ctx, Value::Array(v)))
}
