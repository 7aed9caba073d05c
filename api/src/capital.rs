//! Custody endpoints in Binance's capital shapes (deposit address, deposit history, withdraw
//! apply, withdraw history) and the operator's custody endpoints, over [`Custody`]. The custody
//! service blocks (disk, RPC): every call runs on tokio's blocking pool.

use crate::app::{ok_json, AppState, Req};
use crate::custody::{
    Custody, CustodyError, DepositInfo, DepositState, WithdrawalInfo, WithdrawalState,
};
use crate::error::ApiError;
use crate::keys::Perms;
use crate::params::Params;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};
use std::sync::Arc;

const SAT: u8 = 8;

impl From<CustodyError> for ApiError {
    fn from(e: CustodyError) -> Self {
        ApiError {
            status: StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
            code: e.code,
            msg: e.msg.into(),
            retry_after: None,
        }
    }
}

fn custody(st: &AppState) -> Result<Arc<dyn Custody>, ApiError> {
    st.0.custody.get().cloned().ok_or_else(|| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: -1001,
        msg: "Custody service unavailable.".into(),
        retry_after: Some(5),
    })
}

async fn blocking<T: Send + 'static>(
    st: &AppState,
    f: impl FnOnce(&dyn Custody) -> Result<T, CustodyError> + Send + 'static,
) -> Result<T, ApiError> {
    let c = custody(st)?;
    tokio::task::spawn_blocking(move || f(c.as_ref()))
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(ApiError::from)
}

/// `coin` must be BTC and `network`, if sent, BTC.
fn coin(p: &mut Params, required: bool) -> Result<(), ApiError> {
    match p.opt("coin")? {
        Some(c) if c == "BTC" => {}
        Some(_) => return Err(ApiError::bad(-4003, "Coin is not supported.")),
        None if required => return Err(ApiError::missing("coin")),
        None => {}
    }
    match p.opt("network")?.as_deref() {
        None | Some("BTC") => Ok(()),
        Some(_) => Err(ApiError::bad(-4004, "Network is not supported.")),
    }
}

fn sats(v: u64) -> String {
    crate::decimal::format_units(v, SAT)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC), Binance's `applyTime` format.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = crate::readmodel::civil_date((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

fn deposit_json(d: &DepositInfo) -> Value {
    json!({
        "id": format!("{}:{}", d.txid, d.vout),
        "amount": sats(d.amount_sat),
        "coin": "BTC",
        "network": "BTC",
        // Binance: 0 pending, 1 success, 7 wrong deposit.
        "status": match d.state { DepositState::Pending => 0, DepositState::Credited => 1, DepositState::Reorged => 7 },
        "address": d.address,
        "addressTag": "",
        "txId": format!("{}:{}", d.txid, d.vout),
        "insertTime": d.seen_ms,
        "transferType": 0,
        "confirmTimes": format!("{}/{}", d.confirmations, d.required_confirmations),
        "unlockConfirm": d.required_confirmations,
        "walletType": 0,
    })
}

fn withdrawal_json(w: &WithdrawalInfo) -> Value {
    json!({
        "id": w.id.to_string(),
        "amount": sats(w.amount_sat),
        "transactionFee": sats(w.fee_sat),
        "coin": "BTC",
        // Binance: 2 awaiting approval, 4 processing, 6 completed, 1 cancelled.
        "status": match w.state {
            WithdrawalState::AwaitingApproval => 2,
            WithdrawalState::Pending | WithdrawalState::Processing => 4,
            WithdrawalState::Completed => 6,
            WithdrawalState::Released => 1,
        },
        "address": w.address,
        "txId": w.txid.clone().unwrap_or_default(),
        "applyTime": utc(w.created_ms),
        "network": "BTC",
        "transferType": 0,
        "withdrawOrderId": w.idempotency_key,
        "info": w.reason.clone().unwrap_or_default(),
        "confirmNo": w.confirmations,
        "walletType": 0,
        "txKey": "",
    })
}

fn time_filter(p: &mut Params) -> Result<(Option<u64>, Option<u64>, usize, usize), ApiError> {
    let start = p.opt_u64("startTime")?;
    let end = p.opt_u64("endTime")?;
    let offset = p.opt_u64("offset")?.unwrap_or(0) as usize;
    let limit = p.limit(1000, 1000)? as usize;
    Ok((start, end, offset, limit))
}

/// `GET /sapi/v1/capital/deposit/address` (READ).
pub async fn deposit_address(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req, Perms::READ, 10)?;
    coin(&mut p, true)?;
    p.skip("amount");
    p.finish()?;
    let account = key.account;
    let address = blocking(&st, move |c| c.deposit_address(account, false)).await?;
    Ok(ok_json(
        &ctx,
        json!({"address": address, "coin": "BTC", "tag": "", "url": ""}),
    ))
}

/// `GET /sapi/v1/capital/deposit/hisrec` (READ).
pub async fn deposit_history(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req, Perms::READ, 1)?;
    coin(&mut p, false)?;
    let status = p.opt_u64("status")?;
    let (start, end, offset, limit) = time_filter(&mut p)?;
    p.skip("txId");
    p.skip("includeSource");
    p.finish()?;
    let account = key.account;
    let mut v = blocking(&st, move |c| c.deposits(Some(account))).await?;
    v.sort_by_key(|d| std::cmp::Reverse(d.seen_ms));
    let out: Vec<Value> = v
        .iter()
        .filter(|d| start.is_none_or(|s| d.seen_ms >= s) && end.is_none_or(|e| d.seen_ms <= e))
        .map(deposit_json)
        .filter(|j| status.is_none_or(|s| j["status"] == s))
        .skip(offset)
        .take(limit)
        .collect();
    Ok(ok_json(&ctx, Value::Array(out)))
}

/// `POST /sapi/v1/capital/withdraw/apply` (WITHDRAW): `{"id": "..."}`.
pub async fn withdraw_apply(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req, Perms::WITHDRAW, 900)?;
    coin(&mut p, true)?;
    let address = p.req("address")?;
    let amount = p.req("amount")?;
    let order_id = p.opt("withdrawOrderId")?;
    p.skip("addressTag");
    p.skip("transactionFeeFlag");
    p.skip("name");
    p.skip("walletType");
    p.finish()?;
    if address.len() > 100 || !address.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(ApiError::illegal("address", "^[A-Za-z0-9]{1,100}$"));
    }
    let amount_sat = crate::decimal::parse_units(&amount, SAT).map_err(|e| match e {
        crate::decimal::DecimalError::TooPrecise => ApiError::precision("amount"),
        _ => ApiError::illegal("amount", crate::market::DECIMAL_RANGE),
    })?;
    if amount_sat == 0 {
        return Err(ApiError::invalid_value("amount"));
    }
    let idem = match order_id {
        Some(o) if o.len() <= 64 && o.bytes().all(|b| b.is_ascii_graphic()) => o,
        Some(_) => return Err(ApiError::illegal("withdrawOrderId", "^[!-~]{1,64}$")),
        None => st.gen_client_id(),
    };
    let account = key.account;
    let w = blocking(&st, move |c| {
        c.request_withdrawal(account, &address, amount_sat, &idem)
    })
    .await?;
    Ok(ok_json(&ctx, json!({"id": w.id.to_string()})))
}

/// `GET /sapi/v1/capital/withdraw/history` (READ).
pub async fn withdraw_history(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req, Perms::READ, 18_000 / 1_000)?;
    coin(&mut p, false)?;
    let status = p.opt_u64("status")?;
    let order_id = p.opt("withdrawOrderId")?;
    let ids: Option<Vec<String>> = p
        .opt("idList")?
        .map(|l| l.split(',').map(str::to_owned).collect());
    let (start, end, offset, limit) = time_filter(&mut p)?;
    p.finish()?;
    let account = key.account;
    let mut v = blocking(&st, move |c| c.withdrawals(Some(account))).await?;
    v.sort_by_key(|w| std::cmp::Reverse(w.created_ms));
    let out: Vec<Value> = v
        .iter()
        .filter(|w| {
            start.is_none_or(|s| w.created_ms >= s)
                && end.is_none_or(|e| w.created_ms <= e)
                && order_id.as_ref().is_none_or(|o| *o == w.idempotency_key)
                && ids.as_ref().is_none_or(|l| l.contains(&w.id.to_string()))
        })
        .map(withdrawal_json)
        .filter(|j| status.is_none_or(|s| j["status"] == s))
        .skip(offset)
        .take(limit)
        .collect();
    Ok(ok_json(&ctx, Value::Array(out)))
}

fn account_param(p: &mut Params) -> Result<Option<u32>, ApiError> {
    p.opt_u64("account")?
        .map(|a| u32::try_from(a).map_err(|_| ApiError::invalid_value("account")))
        .transpose()
}

/// `GET /mapi/v1/admin/depositAddress` (ADMIN): `account`, optional `new=true`.
pub async fn admin_deposit_address(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req, Perms::ADMIN, 1)?;
    let account = account_param(&mut p)?.ok_or_else(|| ApiError::missing("account"))?;
    let new = matches!(p.opt("new")?.as_deref(), Some("true"));
    p.finish()?;
    let address = blocking(&st, move |c| c.deposit_address(account, new)).await?;
    Ok(ok_json(
        &ctx,
        json!({"account": account, "address": address}),
    ))
}

/// `GET /mapi/v1/admin/deposits` (ADMIN): optional `account`.
pub async fn admin_deposits(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req, Perms::ADMIN, 1)?;
    let account = account_param(&mut p)?;
    p.finish()?;
    let v = blocking(&st, move |c| c.deposits(account)).await?;
    Ok(ok_json(
        &ctx,
        serde_json::to_value(v).map_err(|_| ApiError::internal())?,
    ))
}

/// `GET /mapi/v1/admin/withdrawals` (ADMIN): optional `account`.
pub async fn admin_withdrawals(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req, Perms::ADMIN, 1)?;
    let account = account_param(&mut p)?;
    p.finish()?;
    let v = blocking(&st, move |c| c.withdrawals(account)).await?;
    Ok(ok_json(
        &ctx,
        serde_json::to_value(v).map_err(|_| ApiError::internal())?,
    ))
}

/// `POST /mapi/v1/admin/approve` (ADMIN): `id` of a withdrawal awaiting approval.
pub async fn admin_approve(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req, Perms::ADMIN, 1)?;
    let id = p.opt_u64("id")?.ok_or_else(|| ApiError::missing("id"))?;
    p.finish()?;
    let w = blocking(&st, move |c| c.approve_withdrawal(id)).await?;
    Ok(ok_json(
        &ctx,
        serde_json::to_value(w).map_err(|_| ApiError::internal())?,
    ))
}

/// `GET /mapi/v1/admin/reconcile` (ADMIN).
pub async fn admin_reconcile(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, p, ctx) = st.signed(&req, Perms::ADMIN, 1)?;
    p.finish()?;
    let r = blocking(&st, |c| c.reconcile()).await?;
    st.set_gauge(
        "mediator_wallet_sync_height",
        "Chain height the wallet has synced to.",
        i64::from(r.tip_height),
    );
    st.set_gauge(
        "mediator_reconciliation_surplus_sats",
        "Wallet assets minus ledger liabilities (negative: shortfall).",
        r.surplus_sat,
    );
    Ok(ok_json(
        &ctx,
        serde_json::to_value(r).map_err(|_| ApiError::internal())?,
    ))
}

/// `POST /mapi/v1/admin/regtest/mine` (ADMIN): `blocks`.
pub async fn admin_regtest_mine(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req, Perms::ADMIN, 1)?;
    let blocks = p
        .opt_u64("blocks")?
        .ok_or_else(|| ApiError::missing("blocks"))?;
    p.finish()?;
    let blocks = u32::try_from(blocks)
        .ok()
        .filter(|b| (1..=1_000).contains(b))
        .ok_or_else(|| ApiError::invalid_value("blocks"))?;
    let height = blocking(&st, move |c| c.regtest_mine(blocks)).await?;
    Ok(ok_json(&ctx, json!({"height": height})))
}

/// `POST /mapi/v1/admin/regtest/fund` (ADMIN): `account`.
pub async fn admin_regtest_fund(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req, Perms::ADMIN, 1)?;
    let account = account_param(&mut p)?.ok_or_else(|| ApiError::missing("account"))?;
    p.finish()?;
    let sat = blocking(&st, move |c| c.regtest_fund(account)).await?;
    Ok(ok_json(
        &ctx,
        json!({"account": account, "amount": sats(sat), "amountSat": sat}),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_format() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_709_251_199_999), "2024-02-29 23:59:59");
    }
}
