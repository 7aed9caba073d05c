//! Order lists (issue 9): `POST /api/v3/orderList/oco`, `GET`/`DELETE /api/v3/orderList`,
//! `GET /api/v3/openOrderList`, `GET /api/v3/allOrderList`, in Binance's shapes.
//!
//! An OCO is one engine command ([`Command::NewOco`]): both legs are placed or neither, they
//! hold once, and the first fill, trigger, cancel or expiry of a leg cancels the other.
//!
//! `POST /api/v3/orderList/oto` and `/otoco` are one engine command each ([`Command::NewOto`],
//! [`Command::NewOtoco`]): a working limit order placed now and a pending order (an OCO pair)
//! placed by the engine when the working order has filled completely; until then the pending
//! orders are `PENDING_NEW`, hold nothing and are not open. A pending order the account cannot
//! cover (or that no longer fits the book) when it is placed is refused cleanly: it ends
//! `EXPIRED` and the list `ALL_DONE`.

use crate::error::ApiError;
use crate::market::MarketSpec;
use crate::params::Params;
use crate::readmodel::{ListKind, ListRec, OrdStatus, OrderRec};
use crate::state::{ok_json, AppState, Req};
use crate::trade::{
    accepted_ms, after_events, cancel_json, internal, order_from_events, order_json,
};
use axum::extract::State;
use axum::response::Response;
use matching_engine::{
    AccountId, ClientOrderId, Command, Event, NewOco, NewOrder, NewOto, NewOtoco, OrderId,
    OrderInfo, OrderRef, OrderType, Side, StpMode, TimeInForce,
};
use serde_json::{json, Value};

const CLIENT_ID_RANGE: &str = "^[a-zA-Z0-9-_.:/]{1,36}$";

fn client_id(name: &str, v: Option<String>, st: &AppState) -> Result<ClientOrderId, ApiError> {
    match v {
        Some(c) => ClientOrderId::new(&c).map_err(|_| ApiError::illegal(name, CLIENT_ID_RANGE)),
        None => ClientOrderId::new(&st.gen_client_id()).map_err(|_| ApiError::internal()),
    }
}

/// One leg of an OCO from its `above*` or `below*` parameters.
fn parse_leg(
    st: &AppState,
    p: &mut Params,
    m: &MarketSpec,
    pre: &str,
    side: Side,
    qty: matching_engine::Qty,
    stp: StpMode,
) -> Result<NewOrder, ApiError> {
    parse_order(st, p, m, pre, side, qty, stp, &[])
}

/// An order from its prefixed parameters (`above*`, `working*`, `pending*`, ...): the OCO leg
/// types, and `extra` of `LIMIT` and `MARKET`.
#[allow(clippy::too_many_arguments)]
fn parse_order(
    st: &AppState,
    p: &mut Params,
    m: &MarketSpec,
    pre: &str,
    side: Side,
    qty: matching_engine::Qty,
    stp: StpMode,
    extra: &[&str],
) -> Result<NewOrder, ApiError> {
    let name = |s: &str| format!("{pre}{s}");
    let ty = p.req(&name("Type"))?;
    let price = p.opt(&name("Price"))?;
    let stop = p.opt(&name("StopPrice"))?;
    let tif = p.opt(&name("TimeInForce"))?;
    let client = p.opt(&name("ClientOrderId"))?;
    for unsupported in [
        "IcebergQty",
        "TrailingDelta",
        "PegPriceType",
        "PegOffsetType",
        "PegOffsetValue",
    ] {
        if p.opt(&name(unsupported))?.is_some() {
            return Err(ApiError::bad(-1014, "Unsupported order combination."));
        }
    }
    // Strategy tags are accepted and not kept.
    p.skip(&name("StrategyId"));
    p.skip(&name("StrategyType"));
    let need = |n: &str, v: &Option<String>| -> Result<matching_engine::Price, ApiError> {
        m.parse_price(n, v.as_deref().ok_or_else(|| ApiError::missing(n))?)
    };
    let forbid = |n: &str, v: &Option<String>| -> Result<(), ApiError> {
        match v {
            Some(_) => Err(ApiError::bad(
                -1106,
                format!("Parameter '{n}' sent when not required."),
            )),
            None => Ok(()),
        }
    };
    let parse_tif = |v: &Option<String>| -> Result<TimeInForce, ApiError> {
        match v.as_deref() {
            None => Err(ApiError::missing(&name("TimeInForce"))),
            Some("GTC") => Ok(TimeInForce::Gtc),
            Some("IOC") => Ok(TimeInForce::Ioc),
            // A stop-limit leg that fills in full or not at all once triggered: not offered
            // (as for single stop orders).
            Some("FOK") => Err(ApiError::bad(-1014, "Unsupported order combination.")),
            Some(_) => Err(ApiError::bad(-1115, "Invalid timeInForce.")),
        }
    };
    let (order_type, tif, post_only) = match ty.as_str() {
        "LIMIT" if extra.contains(&"LIMIT") => {
            forbid(&name("StopPrice"), &stop)?;
            let t = match tif.as_deref() {
                Some("FOK") => TimeInForce::Fok,
                _ => parse_tif(&tif)?,
            };
            let pr = need(&name("Price"), &price)?;
            m.check_notional(pr, qty)?;
            (OrderType::Limit { price: pr, qty }, t, false)
        }
        "MARKET" if extra.contains(&"MARKET") => {
            forbid(&name("Price"), &price)?;
            forbid(&name("StopPrice"), &stop)?;
            forbid(&name("TimeInForce"), &tif)?;
            (OrderType::Market { qty }, TimeInForce::Ioc, false)
        }
        "LIMIT_MAKER" => {
            forbid(&name("StopPrice"), &stop)?;
            forbid(&name("TimeInForce"), &tif)?;
            let pr = need(&name("Price"), &price)?;
            m.check_notional(pr, qty)?;
            (OrderType::Limit { price: pr, qty }, TimeInForce::Gtc, true)
        }
        "STOP_LOSS" | "TAKE_PROFIT" => {
            forbid(&name("Price"), &price)?;
            forbid(&name("TimeInForce"), &tif)?;
            let sp = need(&name("StopPrice"), &stop)?;
            let t = if ty == "STOP_LOSS" {
                OrderType::StopMarket { stop: sp, qty }
            } else {
                OrderType::TakeProfitMarket { stop: sp, qty }
            };
            (t, TimeInForce::Gtc, false)
        }
        "STOP_LOSS_LIMIT" | "TAKE_PROFIT_LIMIT" => {
            let t = parse_tif(&tif)?;
            let (sp, pr) = (
                need(&name("StopPrice"), &stop)?,
                need(&name("Price"), &price)?,
            );
            m.check_notional(pr, qty)?;
            let ot = if ty == "STOP_LOSS_LIMIT" {
                OrderType::StopLimit {
                    stop: sp,
                    price: pr,
                    qty,
                }
            } else {
                OrderType::TakeProfitLimit {
                    stop: sp,
                    price: pr,
                    qty,
                }
            };
            (ot, t, false)
        }
        _ => return Err(ApiError::invalid_value(&name("Type"))),
    };
    Ok(NewOrder {
        account: AccountId(0),
        market: m.id,
        side,
        order_type,
        tif,
        post_only,
        stp,
        client_id: Some(client_id(&name("ClientOrderId"), client, st)?),
    })
}

fn parse_oco(st: &AppState, account: u32, p: &mut Params) -> Result<(NewOco, usize), ApiError> {
    let sym = p.req("symbol")?;
    let m = st.markets().by_symbol(&sym)?;
    let side = match p.req("side")?.as_str() {
        "BUY" => Side::Buy,
        "SELL" => Side::Sell,
        _ => return Err(ApiError::bad(-1117, "Invalid side.")),
    };
    let qty = m.parse_qty("quantity", &p.req("quantity")?)?;
    let list_client = p.opt("listClientOrderId")?;
    let stp = match p.opt("selfTradePreventionMode")?.as_deref() {
        None | Some("EXPIRE_TAKER") => StpMode::ExpireTaker,
        Some("NONE") => StpMode::None,
        Some("EXPIRE_MAKER") => StpMode::ExpireMaker,
        Some("EXPIRE_BOTH") => StpMode::ExpireBoth,
        Some(_) => return Err(ApiError::invalid_value("selfTradePreventionMode")),
    };
    match p.opt("newOrderRespType")?.as_deref() {
        None | Some("ACK") | Some("RESULT") | Some("FULL") => {}
        Some(_) => return Err(ApiError::invalid_value("newOrderRespType")),
    }
    let mut above = parse_leg(st, p, m, "above", side, qty, stp)?;
    let mut below = parse_leg(st, p, m, "below", side, qty, stp)?;
    above.account = AccountId(account);
    below.account = AccountId(account);
    if above.client_id == below.client_id {
        return Err(ApiError::bad(-1014, "Unsupported order combination."));
    }
    Ok((
        NewOco {
            legs: [above, below],
            list_client_id: Some(client_id("listClientOrderId", list_client, st)?),
        },
        usize::from(m.id.0),
    ))
}

fn parse_side(p: &mut Params, name: &str) -> Result<Side, ApiError> {
    match p.req(name)?.as_str() {
        "BUY" => Ok(Side::Buy),
        "SELL" => Ok(Side::Sell),
        _ => Err(ApiError::bad(-1117, "Invalid side.")),
    }
}

/// The parameters an OTO and an OTOCO share: the symbol, the list's client id, self-trade
/// prevention, the response type and the working order (`LIMIT` or `LIMIT_MAKER`).
fn parse_working<'a>(
    st: &'a AppState,
    account: u32,
    p: &mut Params,
) -> Result<(&'a MarketSpec, NewOrder, ClientOrderId, StpMode), ApiError> {
    let sym = p.req("symbol")?;
    let m = st.markets().by_symbol(&sym)?;
    let list_client = p.opt("listClientOrderId")?;
    let stp = match p.opt("selfTradePreventionMode")?.as_deref() {
        None | Some("EXPIRE_TAKER") => StpMode::ExpireTaker,
        Some("NONE") => StpMode::None,
        Some("EXPIRE_MAKER") => StpMode::ExpireMaker,
        Some("EXPIRE_BOTH") => StpMode::ExpireBoth,
        Some(_) => return Err(ApiError::invalid_value("selfTradePreventionMode")),
    };
    match p.opt("newOrderRespType")?.as_deref() {
        None | Some("ACK") | Some("RESULT") | Some("FULL") => {}
        Some(_) => return Err(ApiError::invalid_value("newOrderRespType")),
    }
    let side = parse_side(p, "workingSide")?;
    let qty = m.parse_qty("workingQuantity", &p.req("workingQuantity")?)?;
    let ty = p.req("workingType")?;
    if ty != "LIMIT" && ty != "LIMIT_MAKER" {
        return Err(ApiError::invalid_value("workingType"));
    }
    let mut w = parse_order(st, p, m, "working", side, qty, stp, &["LIMIT"])?;
    w.account = AccountId(account);
    Ok((m, w, client_id("listClientOrderId", list_client, st)?, stp))
}

fn distinct_clients(orders: &[&NewOrder]) -> Result<(), ApiError> {
    for (i, a) in orders.iter().enumerate() {
        if orders[..i].iter().any(|b| b.client_id == a.client_id) {
            return Err(ApiError::bad(-1014, "Unsupported order combination."));
        }
    }
    Ok(())
}

fn parse_oto(st: &AppState, account: u32, p: &mut Params) -> Result<(NewOto, usize), ApiError> {
    let (m, working, list_client_id, stp) = parse_working(st, account, p)?;
    let side = parse_side(p, "pendingSide")?;
    let qty = m.parse_qty("pendingQuantity", &p.req("pendingQuantity")?)?;
    let mut pending = parse_order(st, p, m, "pending", side, qty, stp, &["LIMIT", "MARKET"])?;
    pending.account = AccountId(account);
    distinct_clients(&[&working, &pending])?;
    Ok((
        NewOto {
            working,
            pending,
            list_client_id: Some(list_client_id),
        },
        usize::from(m.id.0),
    ))
}

fn parse_otoco(st: &AppState, account: u32, p: &mut Params) -> Result<(NewOtoco, usize), ApiError> {
    let (m, working, list_client_id, stp) = parse_working(st, account, p)?;
    let side = parse_side(p, "pendingSide")?;
    let qty = m.parse_qty("pendingQuantity", &p.req("pendingQuantity")?)?;
    let mut above = parse_leg(st, p, m, "pendingAbove", side, qty, stp)?;
    let mut below = parse_leg(st, p, m, "pendingBelow", side, qty, stp)?;
    above.account = AccountId(account);
    below.account = AccountId(account);
    distinct_clients(&[&working, &above, &below])?;
    Ok((
        NewOtoco {
            working,
            pending: [above, below],
            list_client_id: Some(list_client_id),
        },
        usize::from(m.id.0),
    ))
}

fn statuses(l: &ListRec) -> (&'static str, &'static str) {
    if l.done {
        ("ALL_DONE", "ALL_DONE")
    } else {
        ("EXEC_STARTED", "EXECUTING")
    }
}

/// Binance's order list object (without `orderReports`).
fn list_json(m: &MarketSpec, l: &ListRec) -> Value {
    let (st, ost) = statuses(l);
    json!({
        "orderListId": l.id,
        "contingencyType": l.kind.as_str(),
        "listStatusType": st,
        "listOrderStatus": ost,
        "listClientOrderId": l.client_id,
        "transactionTime": l.time_ms,
        "symbol": m.symbol,
        "orders": l.legs.iter().map(|(id, c)| json!({
            "symbol": m.symbol,
            "orderId": id,
            "clientOrderId": c,
        })).collect::<Vec<_>>(),
    })
}

/// `POST /api/v3/orderList/oco`.
pub async fn new_oco(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let (oco, market) = parse_oco(&st, key.account, &mut p)?;
    p.finish()?;
    // An OCO adds two orders to the order count.
    st.charge_order(key.account)?;
    let orders = st.charge_order(key.account)?;
    let list_client_id = oco.list_client_id;
    let reply = st.submit(Command::NewOco(Box::new(oco))).await?;
    match reply.result {
        // The legs' kinds or prices do not fit an OCO around the last price.
        Err(matching_engine::RejectCode::InvalidOrder) => {
            return Err(ApiError::bad(
                -2010,
                "The relationship of the prices for the orders is not correct.",
            ))
        }
        Err(code) => return Err(ApiError::new_order_rejected(code)),
        Ok(()) => {}
    }
    let m = &st.markets().markets[market];
    let ms = accepted_ms(&reply.events);
    let (list, legs) = reply
        .events
        .iter()
        .find_map(|e| match e {
            matching_engine::Event::OrderListNew { list, legs, .. } => Some((*list, *legs)),
            _ => None,
        })
        .ok_or_else(ApiError::internal)?;
    let mut reports = Vec::new();
    let mut leg_recs = Vec::new();
    for id in legs {
        let (o, _) = order_from_events(&reply.events, id, ms).ok_or_else(ApiError::internal)?;
        let mut r = order_json(m, &o);
        if let Some(obj) = r.as_object_mut() {
            obj.insert("orderListId".into(), json!(list.0));
            obj.insert("transactTime".into(), json!(ms));
            for k in ["time", "updateTime", "isWorking", "icebergQty"] {
                obj.remove(k);
            }
            if o.stop == 0 {
                obj.remove("stopPrice");
            }
        }
        leg_recs.push((id.0, o.client_id.clone()));
        reports.push(r);
    }
    let rec = ListRec {
        kind: ListKind::Oco,
        id: list.0,
        account: key.account,
        market: m.id.0,
        client_id: list_client_id
            .map(|c| c.as_str().to_owned())
            .unwrap_or_default(),
        legs: leg_recs,
        // Placed now; a later command may have ended it already, but this answer is about
        // the placement (Binance answers EXEC_STARTED).
        done: false,
        time_ms: ms,
    };
    let mut v = list_json(m, &rec);
    v["orderReports"] = Value::Array(reports);
    let mut res = ok_json(&ctx, v);
    if let Ok(h) = axum::http::HeaderValue::from_str(&orders.to_string()) {
        res.headers_mut().insert("x-mbx-order-count-10s", h);
    }
    Ok(res)
}

/// An order report of a list's placement answer (Binance's `orderReports` entry).
fn report_json(m: &MarketSpec, o: &OrderRec, list: u64, ms: u64) -> Value {
    let mut r = order_json(m, o);
    if let Some(obj) = r.as_object_mut() {
        obj.insert("orderListId".into(), json!(list));
        obj.insert("transactTime".into(), json!(ms));
        for k in ["time", "updateTime", "isWorking", "icebergQty"] {
            obj.remove(k);
        }
        if o.stop == 0 {
            obj.remove("stopPrice");
        }
    }
    r
}

/// Submits an OTO or OTOCO and answers in Binance's shape: the list, the working order's
/// report as it stands after the command, and the pending orders as `PENDING_NEW` (Binance
/// answers so even when the working order filled at once and the pending ones were placed).
async fn submit_oto(
    st: &AppState,
    ctx: &crate::state::Ctx,
    account: u32,
    cmd: Command,
    market: usize,
    kind: ListKind,
    list_client_id: Option<ClientOrderId>,
) -> Result<Response, ApiError> {
    let n = if kind == ListKind::Oto { 2 } else { 3 };
    let mut orders = 0;
    for _ in 0..n {
        orders = st.charge_order(account)?;
    }
    let reply = st.submit(cmd).await?;
    match reply.result {
        Err(matching_engine::RejectCode::InvalidOrder) if kind == ListKind::Otoco => {
            return Err(ApiError::bad(
                -2010,
                "The relationship of the prices for the orders is not correct.",
            ))
        }
        Err(code) => return Err(ApiError::new_order_rejected(code)),
        Ok(()) => {}
    }
    let m = &st.markets().markets[market];
    let ms = accepted_ms(&reply.events);
    let list = reply
        .events
        .iter()
        .find_map(|e| match e {
            Event::OtoNew { list, working, .. } => Some((*list, *working)),
            _ => None,
        })
        .ok_or_else(ApiError::internal)?;
    let (list, working) = list;
    let (w, _) = order_from_events(&reply.events, working, ms).ok_or_else(ApiError::internal)?;
    let mut w = w;
    w.list_id = Some(list.0);
    let mut recs = vec![w];
    for e in &reply.events {
        if let Event::OrderPending { order, new } = *e {
            let info = OrderInfo {
                order,
                account: new.account,
                market: new.market,
                side: new.side,
                client_id: new.client_id,
            };
            let mut o =
                OrderRec::placed(info, &new.order_type, new.tif, new.post_only, new.stp, ms);
            o.status = OrdStatus::PendingNew;
            o.working_ms = None;
            o.list_id = Some(list.0);
            recs.push(o);
        }
    }
    let rec = ListRec {
        kind,
        id: list.0,
        account,
        market: m.id.0,
        client_id: list_client_id
            .map(|c| c.as_str().to_owned())
            .unwrap_or_default(),
        legs: recs.iter().map(|o| (o.id, o.client_id.clone())).collect(),
        done: false,
        time_ms: ms,
    };
    let mut v = list_json(m, &rec);
    v["orderReports"] = Value::Array(recs.iter().map(|o| report_json(m, o, list.0, ms)).collect());
    let mut res = ok_json(ctx, v);
    if let Ok(h) = axum::http::HeaderValue::from_str(&orders.to_string()) {
        res.headers_mut().insert("x-mbx-order-count-10s", h);
    }
    Ok(res)
}

/// `POST /api/v3/orderList/oto`.
pub async fn new_oto(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let (oto, market) = parse_oto(&st, key.account, &mut p)?;
    p.finish()?;
    let list_client_id = oto.list_client_id;
    let cmd = Command::NewOto(Box::new(oto));
    submit_oto(
        &st,
        &ctx,
        key.account,
        cmd,
        market,
        ListKind::Oto,
        list_client_id,
    )
    .await
}

/// `POST /api/v3/orderList/otoco`.
pub async fn new_otoco(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let (otoco, market) = parse_otoco(&st, key.account, &mut p)?;
    p.finish()?;
    let list_client_id = otoco.list_client_id;
    let cmd = Command::NewOtoco(Box::new(otoco));
    submit_oto(
        &st,
        &ctx,
        key.account,
        cmd,
        market,
        ListKind::Otoco,
        list_client_id,
    )
    .await
}

/// Reads `orderListId` or the client id parameter `client_param` (with both, the list of that
/// id only if it carries that client id).
fn find_list(
    st: &AppState,
    account: u32,
    p: &mut Params,
    client_param: &str,
) -> Result<Option<ListRec>, ApiError> {
    let id = p.opt_u64("orderListId")?;
    let client = p.opt(client_param)?;
    let rm = st.read_model();
    match (id, client) {
        // Both: the list found by id must carry that client id (Binance: "the orderListId is
        // searched first, then the listClientOrderId from that result is checked against that
        // order"); another list's is no list.
        (Some(id), Some(c)) => Ok(rm.order_list(account, id).filter(|l| l.client_id == c)),
        (Some(id), None) => Ok(rm.order_list(account, id)),
        (None, Some(c)) => Ok(rm.order_list_by_client(account, &c)),
        (None, None) => Err(ApiError::bad(
            -1102,
            format!(
                "Param '{client_param}' or 'orderListId' must be sent, but both were empty/null!"
            ),
        )),
    }
}

/// `GET /api/v3/orderList`.
pub async fn get_list(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let l = find_list(&st, key.account, &mut p, "origClientOrderId")?;
    p.finish()?;
    let l = l.ok_or_else(|| ApiError::bad(-2011, "Order list does not exist."))?;
    let m = &st.markets().markets[usize::from(l.market)];
    Ok(ok_json(&ctx, list_json(m, &l)))
}

/// `DELETE /api/v3/orderList`: cancels both legs (one engine command: a cancel of either leg
/// cancels the list).
pub async fn cancel_list(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let sym = p.req("symbol")?;
    let l = find_list(&st, key.account, &mut p, "listClientOrderId")?;
    let cancel_client = match p.opt("newClientOrderId")? {
        Some(c) => {
            ClientOrderId::new(&c)
                .map_err(|_| ApiError::illegal("newClientOrderId", CLIENT_ID_RANGE))?;
            c
        }
        None => st.gen_client_id(),
    };
    p.finish()?;
    let m = st.markets().by_symbol(&sym)?;
    let l = l
        .filter(|l| l.market == m.id.0 && !l.done)
        .ok_or_else(|| ApiError::bad(-2011, "Order list does not exist."))?;
    // The list's orders as the read models hold them. They may lag the engine: the answer
    // takes what the cancel did from its own events (`after_events`), never from them.
    let mut recs = Vec::with_capacity(l.legs.len());
    for (id, _) in &l.legs {
        let o = st
            .read_model()
            .find_order(key.account, *id)
            .map_err(internal)?
            .ok_or_else(ApiError::internal)?;
        recs.push(o);
    }
    // The first order of the list still open or pending: a cancel of it ends the list (an
    // OTOCO whose working order filled is an OCO of its two last orders).
    let target = recs
        .iter()
        .find(|o| o.is_open() || o.status == OrdStatus::PendingNew)
        .map_or(l.legs[0].0, |o| o.id);
    let reply = st
        .submit(Command::Cancel {
            account: AccountId(key.account),
            market: m.id,
            order: OrderRef::Id(OrderId(target)),
        })
        .await?;
    if let Err(code) = reply.result {
        return Err(ApiError::cancel_rejected(code));
    }
    let ms = accepted_ms(&reply.events);
    let reports = recs
        .into_iter()
        .map(|o| cancel_json(m, &after_events(o, &reply.events, ms), &cancel_client, ms))
        .collect();
    let done = ListRec {
        done: true,
        time_ms: ms,
        ..l
    };
    let mut v = list_json(m, &done);
    v["orderReports"] = Value::Array(reports);
    Ok(ok_json(&ctx, v))
}

/// `GET /api/v3/openOrderList`.
pub async fn open_lists(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, p, ctx) = st.signed(&req)?;
    p.finish()?;
    let markets = st.markets();
    let v: Vec<Value> = st
        .read_model()
        .order_lists(key.account, true)
        .iter()
        .map(|l| list_json(&markets.markets[usize::from(l.market)], l))
        .collect();
    Ok(ok_json(&ctx, Value::Array(v)))
}

/// `GET /api/v3/allOrderList`: `fromId`, or `startTime`/`endTime`; `limit` (500, at most 1000).
pub async fn all_lists(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let from_id = p.opt_u64("fromId")?;
    let start = p.opt_u64("startTime")?;
    let end = p.opt_u64("endTime")?;
    let limit = p.limit(500, 1000)? as usize;
    p.finish()?;
    if from_id.is_some() && (start.is_some() || end.is_some()) {
        return Err(ApiError::bad_combination());
    }
    let markets = st.markets();
    let lists = st
        .read_model()
        .order_lists_page(key.account, from_id, (start, end), limit);
    let v: Vec<Value> = lists
        .iter()
        .map(|l| list_json(&markets.markets[usize::from(l.market)], l))
        .collect();
    Ok(ok_json(&ctx, Value::Array(v)))
}
