//! Custody endpoints over [`Custody`]: Binance's SAPI capital endpoints (deposit address, deposit
//! history, withdraw, withdraw history), a native new-address endpoint, and operator endpoints
//! (addresses for any account, withdrawals, approvals, reconciliation, regtest mining and funding).
//!
//! * The custody service is attached after start ([`AppState::set_custody`]); until then every
//!   endpoint here answers HTTP **503** with code **-1001** ("Custody is not available."), after
//!   authentication and parameter checks.
//! * Every parameter is validated before the custody service is called; the blocking trait
//!   methods run on tokio's blocking pool.
//! * A [`CustodyError`] is answered with its own `code`, `status` and `msg`.
//! * Only `BTC` (coin and network) exists; amounts are exact decimal strings with at most 8
//!   fractional digits (no floats).
//!
//! Status numbers, as Binance documents them:
//! * deposits: `Pending` → 0 (pending), `Credited` → 1 (success), `Reorged` and `Dropped` → 7
//!   (Binance's "wrong deposit": credited, then removed from the chain by a reorg; or replaced
//!   in the mempool, never credited);
//! * withdrawals: `AwaitingApproval` → 2 (awaiting approval), `Unresolved`, `Pending` and
//!   `Processing` → 4 (processing), `Completed` → 6 (completed), `Released` → 5 (failure;
//!   `info` holds the reason).

use crate::custody::{
    Custody, CustodyError, DepositInfo, DepositState, WithdrawalInfo, WithdrawalState,
};
use crate::error::ApiError;
use crate::params::Params;
use crate::state::{ok_json, AppState, Req};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};
use std::sync::Arc;

/// The only coin and network.
pub const COIN: &str = "BTC";
/// Decimal places of a BTC amount (satoshis).
pub const BTC_DECIMALS: u8 = 8;
/// The most blocks one `regtest/mine` call may mine.
pub const MAX_MINE_BLOCKS: u64 = 1_000;
/// The most records a history answer holds (Binance's maximum `limit`).
pub const MAX_LIMIT: u32 = 1_000;
/// The most ids in a withdraw-history `idList` (Binance's limit).
pub const MAX_ID_LIST: usize = 45;

/// The answer when no custody service is attached: 503, `-1001`.
pub fn unavailable() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: -1001,
        msg: "Custody is not available.".into(),
        retry_after: None,
    }
}

/// A custody refusal or failure as the Binance error it carries (an unusable status becomes 500).
pub fn custody_error(e: CustodyError) -> ApiError {
    let status = StatusCode::from_u16(e.status)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        tracing::warn!(code = e.code, msg = %e.msg, "custody failed");
    }
    ApiError {
        status,
        code: e.code,
        msg: e.msg.into(),
        retry_after: None,
    }
}

fn custody(st: &AppState) -> Result<Arc<dyn Custody>, ApiError> {
    st.0.custody.get().cloned().ok_or_else(unavailable)
}

/// Runs a blocking custody call on tokio's blocking pool.
pub async fn call<T, F>(st: &AppState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Custody) -> Result<T, CustodyError> + Send + 'static,
{
    let c = custody(st)?;
    tokio::task::spawn_blocking(move || f(&*c))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "custody task failed");
            ApiError::internal()
        })?
        .map_err(custody_error)
}

/// Refuses (`400`, `-4032`, as custody refuses its withdrawals) when custody flagged `account`
/// for review (a credited deposit left the chain): its funds may not leave it by any path the
/// holder asks for (an internal transfer included) until an operator clears the flag. Without
/// custody there are no flags.
pub async fn refuse_flagged(st: &AppState, account: u32) -> Result<(), ApiError> {
    if st.0.custody.get().is_none() {
        return Ok(());
    }
    if call(st, move |c| c.is_flagged(account)).await? {
        return Err(ApiError::bad(
            -4032,
            "The account is flagged for review and cannot move funds out until an operator clears it.",
        ));
    }
    Ok(())
}

/// How long the order path trusts its copy of custody's flagged accounts before it asks again.
pub const FLAG_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// The accounts custody flagged, as the order path reads them: an order must not wait for
/// custody (its lock is held through a chain sync), so placements read a copy that is refreshed
/// in the background once it is [`FLAG_REFRESH`] old; only the first look-up waits for custody.
/// A flag custody sets reaches the copy at once through custody's flag hook ([`note_flagged`],
/// wired by `mediator serve`), else within about a second of an order looking; clearing one
/// (`admin_clear_flag`) drops the copy, so the next look-up reads custody again.
#[derive(Debug, Default)]
pub struct FlagCache {
    /// When the copy's reading of custody began, and the accounts.
    copy: std::sync::RwLock<Option<(std::time::Instant, Arc<std::collections::HashSet<u32>>)>>,
    /// When an operator last cleared a flag (`admin_clear_flag`): a reading that began before
    /// it may still hold the flag.
    cleared: std::sync::Mutex<Option<std::time::Instant>>,
    /// A background refresh is under way.
    refreshing: std::sync::atomic::AtomicBool,
    /// The accounts custody's hook told of ([`note_flagged`]), with when: a reading of custody
    /// that began before a flag comes back without it, and must not drop it from the copy.
    /// Entries are forgotten once [`NOTED_KEPT`] old (every reading since has the flag).
    noted: std::sync::Mutex<Vec<(std::time::Instant, u32)>>,
    /// Cancels of newly flagged accounts' orders not yet applied ([`cancel_orders_of`]): every
    /// order waits for them ([`flagged_for_orders`]), so an order arriving just after a flag
    /// cannot trade against the flagged account's resting orders first.
    cancels: std::sync::atomic::AtomicUsize,
    /// Woken when [`FlagCache::cancels`] falls to zero.
    cancelled: tokio::sync::Notify,
}

/// How long a flag told by custody's hook is added to the readings of custody that began before
/// it: longer than any reading takes (custody answers within its lock, or fails).
const NOTED_KEPT: std::time::Duration = std::time::Duration::from_secs(60);

/// Custody flagged `account` just now (its flag hook, `wallet::FlagHook`, in `mediator serve`):
/// the order path's copy takes it at once, not at its next refresh (without a copy yet, the
/// first look-up reads custody), and the account's open orders are cancelled (on `rt`), copy or
/// not: a flag custody told of while the order path had no copy (after a start, after any
/// clear) left them on the book. Never waits (the hook runs under custody's lock).
pub fn note_flagged(st: &AppState, account: u32, rt: &tokio::runtime::Handle) {
    {
        let mut noted = st.0.flags.noted.lock().unwrap_or_else(|e| e.into_inner());
        noted.retain(|(at, _)| at.elapsed() < NOTED_KEPT);
        noted.push((std::time::Instant::now(), account));
    }
    {
        let mut copy = st.0.flags.copy.write().unwrap_or_else(|e| e.into_inner());
        if let Some((_, set)) = copy.as_mut() {
            if !set.contains(&account) {
                let mut next = (**set).clone();
                next.insert(account);
                *set = Arc::new(next);
            }
        }
    }
    let st2 = st.clone();
    let pending = CancelsPending::new(st);
    rt.spawn(async move {
        cancel_orders(&st2, &[account]).await;
        drop(pending);
    });
}

/// One cancel of flagged accounts' orders under way ([`FlagCache::cancels`]); dropped when it
/// is over, applied or given up.
struct CancelsPending(AppState);

impl CancelsPending {
    fn new(st: &AppState) -> Self {
        st.0.flags
            .cancels
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        CancelsPending(st.clone())
    }
}

impl Drop for CancelsPending {
    fn drop(&mut self) {
        let flags = &self.0 .0.flags;
        if flags
            .cancels
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            flags.cancelled.notify_waiters();
        }
    }
}

/// How many times a flagged account's cancel is sent when the engine is busy or does not
/// answer, 100 ms apart (a repeated cancel-all is harmless).
const CANCEL_TRIES: u32 = 50;

/// Cancels the open orders of newly flagged `accounts`, each until the engine applied it (or
/// refused it: nothing open), sent again while it is busy or does not answer; given up after
/// [`CANCEL_TRIES`] (logged as an error for the operator).
async fn cancel_orders(st: &AppState, accounts: &[u32]) {
    for &account in accounts {
        let mut tries = 0;
        loop {
            tries += 1;
            let cmd = matching_engine::Command::CancelAll {
                account: matching_engine::AccountId(account),
                market: None,
            };
            let outcome = st.submit_outcome(cmd).await;
            match outcome {
                crate::core::Outcome::Applied(_) | crate::core::Outcome::Rejected(_) => {
                    tracing::warn!(account, "flagged account: its open orders cancelled");
                    break;
                }
                other if tries >= CANCEL_TRIES => {
                    tracing::error!(
                        account,
                        outcome = ?other,
                        "flagged account: its open orders could not be cancelled; cancel them"
                    );
                    break;
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    }
}

/// Waits (at most [`CANCEL_WAIT`]) for the cancels of flagged accounts' orders under way: an
/// order must not trade against them first. One atomic read when there are none.
async fn wait_for_cancels(st: &AppState) {
    use std::sync::atomic::Ordering;
    let flags = &st.0.flags;
    if flags.cancels.load(Ordering::Acquire) == 0 {
        return;
    }
    let wait = async {
        loop {
            let woken = flags.cancelled.notified();
            if flags.cancels.load(Ordering::Acquire) == 0 {
                return;
            }
            woken.await;
        }
    };
    if tokio::time::timeout(CANCEL_WAIT, wait).await.is_err() {
        tracing::error!("flagged accounts' cancels still under way; the order goes on");
    }
}

/// The longest an order waits for flagged accounts' cancels ([`wait_for_cancels`]).
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads custody's flagged accounts into the cache, and cancels the open orders of each account
/// it had not seen flagged (orders placed before the flag would otherwise still sell the
/// account's funds when they fill; every account after a start or a clear, harmlessly).
async fn refresh_flags(st: &AppState) -> Result<Arc<std::collections::HashSet<u32>>, ApiError> {
    let began = std::time::Instant::now();
    let v = call(st, |c| c.flagged_accounts()).await?;
    let mut set: std::collections::HashSet<u32> = v.iter().map(|f| f.account).collect();
    // Flags custody told of after this reading began: it may have been taken before them.
    set.extend(
        st.0.flags
            .noted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(at, _)| *at >= began)
            .map(|(_, a)| *a),
    );
    let set = Arc::new(set);
    let cleared = *st.0.flags.cleared.lock().unwrap_or_else(|e| e.into_inner());
    let before = {
        let mut copy = st.0.flags.copy.write().unwrap_or_else(|e| e.into_inner());
        // A reading older than the copy's, or than an operator's clear, is dropped: readings
        // overlap (the first look-ups, a background refresh), and an older one stored last
        // put back a flag just cleared, or hid one set since; its cancel took orders the
        // account placed after the clear.
        if let Some((_, current)) = copy.as_ref().filter(|(at, _)| *at > began) {
            return Ok(current.clone());
        }
        if cleared.is_some_and(|c| c > began) {
            return Ok(set);
        }
        copy.replace((began, set.clone()))
    };
    let new: Vec<u32> = set
        .iter()
        .copied()
        .filter(|a| before.as_ref().is_none_or(|(_, b)| !b.contains(a)))
        .collect();
    if !new.is_empty() {
        // Before this reading's caller goes on: the order that found the flag must not trade
        // against the account's resting orders ahead of their cancel.
        let _pending = CancelsPending::new(st);
        cancel_orders(st, &new).await;
    }
    Ok(set)
}

/// Whether `account` may not place orders: custody flagged it (see [`FlagCache`]). Without
/// custody there are no flags. If custody cannot be asked and no copy was ever read, the account
/// is let through (logged): flags are rare, and custody refuses a flagged account's withdrawals
/// itself.
pub async fn flagged_for_orders(st: &AppState, account: u32) -> bool {
    let flagged = match flagged_by_copy(st, account) {
        Some(flagged) => flagged,
        None => first_look_up(st, account).await,
    };
    wait_for_cancels(st).await;
    flagged
}

/// The order path's answer from its copy, without waiting (`None`: no copy yet). A copy
/// [`FLAG_REFRESH`] old is still used, and one background refresh is started.
fn flagged_by_copy(st: &AppState, account: u32) -> Option<bool> {
    use std::sync::atomic::Ordering;
    if st.0.custody.get().is_none() {
        return Some(false);
    }
    let flags = &st.0.flags;
    let (stale, flagged) = {
        let copy = flags.copy.read().unwrap_or_else(|e| e.into_inner());
        let (at, set) = copy.as_ref()?;
        (at.elapsed() >= FLAG_REFRESH, set.contains(&account))
    };
    if stale
        && flags
            .refreshing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    {
        let st = st.clone();
        tokio::spawn(async move {
            if let Err(e) = refresh_flags(&st).await {
                tracing::warn!(
                    code = e.code,
                    "reading flagged accounts failed; the last copy stays"
                );
            }
            st.0.flags.refreshing.store(false, Ordering::Release);
        });
    }
    Some(flagged)
}

/// The first look-up waits for custody (concurrent first look-ups each ask). A boxed future:
/// reading the flags may cancel orders through [`AppState::submit_outcome`], which calls
/// [`flagged_for_orders`].
fn first_look_up(
    st: &AppState,
    account: u32,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
    Box::pin(async move {
        match refresh_flags(st).await {
            Ok(set) => set.contains(&account),
            Err(e) => {
                tracing::error!(
                    code = e.code,
                    account,
                    "reading flagged accounts failed; the order goes through"
                );
                false
            }
        }
    })
}

/// `coin` (required) must be `BTC`.
fn coin_param(p: &mut Params) -> Result<(), ApiError> {
    if p.req("coin")? != COIN {
        return Err(ApiError::invalid_value("coin"));
    }
    Ok(())
}

/// `coin` (optional) must be `BTC` when sent.
fn opt_coin_param(p: &mut Params) -> Result<(), ApiError> {
    match p.opt("coin")? {
        Some(c) if c != COIN => Err(ApiError::invalid_value("coin")),
        _ => Ok(()),
    }
}

/// `network` (optional) must be `BTC` when sent.
fn network_param(p: &mut Params) -> Result<(), ApiError> {
    match p.opt("network")? {
        Some(n) if n != COIN => Err(ApiError::invalid_value("network")),
        _ => Ok(()),
    }
}

/// An exact BTC amount in satoshis, above zero, at most 8 decimals.
pub fn btc_amount(p: &mut Params, name: &str) -> Result<u64, ApiError> {
    let s = p.req(name)?;
    let v = crate::decimal::parse_units(&s, BTC_DECIMALS).map_err(|e| match e {
        crate::decimal::DecimalError::TooPrecise => ApiError::precision(name),
        _ => ApiError::illegal(name, crate::market::DECIMAL_RANGE),
    })?;
    if v == 0 {
        return Err(ApiError::invalid_value(name));
    }
    Ok(v)
}

fn account_param(st: &AppState, p: &mut Params, name: &str) -> Result<u32, ApiError> {
    let v = p.opt_u64(name)?.ok_or_else(|| ApiError::missing(name))?;
    let a = u32::try_from(v).map_err(|_| ApiError::invalid_value(name))?;
    if !st.read_model().read().accounts.contains(&a) {
        return Err(ApiError::bad(-1130, "Unknown account."));
    }
    Ok(a)
}

fn bool_param(p: &mut Params, name: &str) -> Result<bool, ApiError> {
    match p.opt(name)?.as_deref() {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(ApiError::illegal(name, "true|false")),
    }
}

/// `[startTime, endTime]` (both optional, inclusive), `offset`, `limit` (1..=1000, default 1000).
struct Window {
    start: u64,
    end: u64,
    offset: usize,
    limit: usize,
}

impl Window {
    fn parse(p: &mut Params) -> Result<Self, ApiError> {
        let start = p.opt_u64("startTime")?.unwrap_or(0);
        let end = p.opt_u64("endTime")?.unwrap_or(u64::MAX);
        if start > end {
            return Err(ApiError::invalid_value("startTime"));
        }
        let offset = p.opt_u64("offset")?.unwrap_or(0);
        let offset = usize::try_from(offset).map_err(|_| ApiError::invalid_value("offset"))?;
        let limit = p.limit(MAX_LIMIT, MAX_LIMIT)? as usize;
        Ok(Self {
            start,
            end,
            offset,
            limit,
        })
    }

    fn contains(&self, ms: u64) -> bool {
        (self.start..=self.end).contains(&ms)
    }

    fn page(&self, v: Vec<Value>) -> Value {
        Value::Array(v.into_iter().skip(self.offset).take(self.limit).collect())
    }
}

/// Binance's deposit status of a deposit state.
pub fn deposit_status(s: DepositState) -> u8 {
    match s {
        DepositState::Pending => 0,
        DepositState::Credited => 1,
        DepositState::Reorged | DepositState::Reversed | DepositState::Dropped => 7,
    }
}

/// Binance's withdraw status of a withdrawal state.
pub fn withdraw_status(s: WithdrawalState) -> u8 {
    match s {
        WithdrawalState::AwaitingApproval => 2,
        WithdrawalState::Unresolved | WithdrawalState::Pending | WithdrawalState::Processing => 4,
        WithdrawalState::Completed => 6,
        WithdrawalState::Released => 5,
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of ms since the epoch, as Binance's `applyTime`.
pub fn utc_datetime(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn deposit_json(d: &DepositInfo) -> Value {
    json!({
        "id": format!("{}:{}", d.txid, d.vout),
        "amount": crate::decimal::format_units(d.amount_sat, BTC_DECIMALS),
        "coin": COIN,
        "network": COIN,
        "status": deposit_status(d.state),
        "address": d.address,
        "addressTag": "",
        "txId": d.txid,
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
        "amount": crate::decimal::format_units(w.amount_sat, BTC_DECIMALS),
        "transactionFee": crate::decimal::format_units(w.fee_sat, BTC_DECIMALS),
        "coin": COIN,
        "status": withdraw_status(w.state),
        "address": w.address,
        "txId": w.txid.clone().unwrap_or_default(),
        "applyTime": utc_datetime(w.created_ms),
        "network": COIN,
        "transferType": 0,
        "withdrawOrderId": w.idempotency_key,
        "info": w.reason.clone().unwrap_or_default(),
        "confirmNo": w.confirmations,
        "walletType": 0,
        "txKey": "",
    })
}

fn address_json(address: String) -> Value {
    json!({"coin": COIN, "address": address, "tag": "", "url": ""})
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|e| {
        tracing::error!(error = %e, "serializing custody data failed");
        ApiError::internal()
    })
}

/// `GET /sapi/v1/capital/deposit/address` (READ): the account's current deposit address.
pub async fn deposit_address(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    coin_param(&mut p)?;
    network_param(&mut p)?;
    p.finish()?;
    let account = key.account;
    let a = call(&st, move |c| c.deposit_address(account, false)).await?;
    // The account's first address is made on first use: audited like a new one.
    if a.made {
        st.audit_done_by(
            &format!("account:{account}"),
            &key.api_key,
            "deposit.address.new",
            json!({ "account": account, "address": &a.address }),
        );
    }
    Ok(ok_json(&ctx, address_json(a.address)))
}

/// `POST /mapi/v1/capital/deposit/address` (READ): a new deposit address (old ones keep
/// working). At most `deposit_addresses_per_hour` per account (`429`, `-1003`): every address
/// is one the wallet watches for good.
pub async fn new_deposit_address(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    coin_param(&mut p)?;
    network_param(&mut p)?;
    p.finish()?;
    custody(&st)?;
    let account = key.account;
    charge_new_address(&st, account)?;
    let a = call(&st, move |c| c.deposit_address(account, true))
        .await?
        .address;
    // The wallet watches the address now: answered even if its entry cannot be written (a
    // `-1000` would make the client ask for yet another one).
    st.audit_done_by(
        &format!("account:{account}"),
        &key.api_key,
        "deposit.address.new",
        json!({ "account": account, "address": &a }),
    );
    Ok(ok_json(&ctx, address_json(a)))
}

/// Counts one new deposit address of `account` against its hourly limit (`429`, `-1003`).
fn charge_new_address(st: &AppState, account: u32) -> Result<(), ApiError> {
    charge_per_account_hour(st, &st.0.address_limiter, account, "new deposit addresses")
}

/// Counts one `what` (something custody keeps for good: a deposit address, a Lightning invoice)
/// of `account` against `limiter`, its hourly limit (`429`, `-1003`, with `Retry-After`).
pub(crate) fn charge_per_account_hour(
    st: &AppState,
    limiter: &crate::ratelimit::Limiter,
    account: u32,
    what: &str,
) -> Result<(), ApiError> {
    match limiter.charge(&account.to_string(), 1, crate::core::now_ms()) {
        crate::ratelimit::Charge::Ok(_) => Ok(()),
        crate::ratelimit::Charge::Limited { retry_after, .. } => {
            st.0.metrics
                .rate_limited
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                code: -1003,
                msg: format!(
                    "Too many {what}; current limit is {} per account per HOUR.",
                    limiter.limit()
                )
                .into(),
                retry_after: Some(retry_after),
            })
        }
    }
}

/// `GET /sapi/v1/capital/deposit/hisrec` (READ): the account's deposits, newest first.
pub async fn deposit_history(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    opt_coin_param(&mut p)?;
    let status = p.opt_u64("status")?;
    let tx = p.opt("txId")?;
    let w = Window::parse(&mut p)?;
    p.finish()?;
    let account = key.account;
    let mut ds = call(&st, move |c| c.deposits(Some(account))).await?;
    ds.retain(|d| {
        d.account == account
            && w.contains(d.seen_ms)
            && status.is_none_or(|s| s == u64::from(deposit_status(d.state)))
            && tx.as_deref().is_none_or(|t| t == d.txid)
    });
    ds.sort_by(|a, b| (b.seen_ms, &b.txid, b.vout).cmp(&(a.seen_ms, &a.txid, a.vout)));
    Ok(ok_json(&ctx, w.page(ds.iter().map(deposit_json).collect())))
}

/// `POST /sapi/v1/capital/withdraw/apply` (WITHDRAW): requests a withdrawal; idempotent by
/// `withdrawOrderId` (generated when not sent). Checked and executed by [`apply_withdrawal`].
pub async fn withdraw_apply(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    coin_param(&mut p)?;
    network_param(&mut p)?;
    let address = p.req("address")?;
    check_address(&address)?;
    let amount = btc_amount(&mut p, "amount")?;
    let order_id = match p.opt("withdrawOrderId")? {
        Some(id) => {
            check_withdraw_order_id(&id)?;
            id
        }
        None => st.gen_client_id(),
    };
    p.finish()?;
    let w = apply_withdrawal(&st, key.account, address, amount, order_id).await?;
    Ok(ok_json(&ctx, json!({"id": w.id.to_string()})))
}

/// The syntax of a withdrawal address (custody then checks it for its network).
pub fn check_address(address: &str) -> Result<(), ApiError> {
    if address.is_empty()
        || address.len() > 128
        || !address.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(ApiError::illegal("address", "^[A-Za-z0-9]{1,128}$"));
    }
    Ok(())
}

/// The syntax of a withdrawal's idempotency key (`withdrawOrderId`).
pub fn check_withdraw_order_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::illegal("withdrawOrderId", "^[!-~]{1,64}$"));
    }
    Ok(())
}

/// The one path by which an account's own withdrawal is requested (the signed API's
/// `withdraw/apply` and the store dashboard's withdrawal form): the address and key are checked
/// ([`check_address`], [`check_withdraw_order_id`]), the circuit breaker refuses (`-1000`,
/// nothing recorded), the withdrawal policy is asked ([`crate::policy`]: `403`, `-4038`,
/// nothing recorded), and custody applies the rest (address for its network, minimum and
/// fee, limits, approvals, deny list, balance, key unique per account: a repeated key is
/// `-4029` and pays nothing).
///
/// A key custody already holds is answered by custody even when the policy now refuses the
/// address: a retry of a withdrawal requested before the policy changed (a store's list turned
/// on since) learns of that withdrawal (`-4029`), never "refused, nothing recorded".
pub async fn apply_withdrawal(
    st: &AppState,
    account: u32,
    address: String,
    amount_sat: u64,
    order_id: String,
) -> Result<WithdrawalInfo, ApiError> {
    check_address(&address)?;
    check_withdraw_order_id(&order_id)?;
    if amount_sat == 0 {
        return Err(ApiError::invalid_value("amount"));
    }
    if st.breaker_open() {
        return Err(ApiError::halted());
    }
    let to = crate::policy::Destination::Address(address.clone());
    if let Err(e) = crate::policy::ask(st, account, to).await {
        let k = order_id.clone();
        // Looked up only when refused: the common path makes no extra custody call. A key
        // already used (a withdrawal made before the list was on) answers as custody answers a
        // repeated key, `-4029`, and nothing goes to custody with the refused address (were the
        // key freed in between, that request would pass).
        return match call(st, move |c| c.withdrawal_by_key(account, &k)).await? {
            None => Err(crate::policy::policy_error(e)),
            Some(w) => Err(ApiError {
                status: axum::http::StatusCode::BAD_REQUEST,
                code: crate::custody::DUPLICATE_WITHDRAWAL_KEY,
                msg: format!(
                    "withdrawOrderId {} was used before (withdrawal {}): nothing new was requested",
                    w.idempotency_key, w.id
                )
                .into(),
                retry_after: None,
            }),
        };
    }
    call(st, move |c| {
        c.request_withdrawal(account, &address, amount_sat, &order_id)
    })
    .await
}

/// `GET /sapi/v1/capital/withdraw/history` (READ): the account's withdrawals, newest first.
pub async fn withdraw_history(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    opt_coin_param(&mut p)?;
    let order_id = p.opt("withdrawOrderId")?;
    let status = p.opt_u64("status")?;
    let ids = match p.opt("idList")? {
        None => None,
        Some(l) => {
            let ids = l
                .split(',')
                .map(|s| s.trim().parse::<u64>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| ApiError::illegal("idList", "^[0-9]+(,[0-9]+)*$"))?;
            if ids.len() > MAX_ID_LIST {
                return Err(ApiError::invalid_value("idList"));
            }
            Some(ids)
        }
    };
    let w = Window::parse(&mut p)?;
    p.finish()?;
    let account = key.account;
    // By its key: the one withdrawal (an indexed look-up), not the account's list.
    let by_key = order_id.clone();
    let mut ws = call(&st, move |c| match by_key {
        Some(k) => Ok(c.withdrawal_by_key(account, &k)?.into_iter().collect()),
        None => c.withdrawals(Some(account)),
    })
    .await?;
    ws.retain(|x| {
        x.account == account
            && w.contains(x.created_ms)
            && status.is_none_or(|s| s == u64::from(withdraw_status(x.state)))
            && order_id.as_deref().is_none_or(|o| o == x.idempotency_key)
            && ids.as_ref().is_none_or(|l| l.contains(&x.id))
    });
    ws.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(b.id.cmp(&a.id)));
    Ok(ok_json(
        &ctx,
        w.page(ws.iter().map(withdrawal_json).collect()),
    ))
}

/// `POST /mapi/v1/admin/depositAddress` (ADMIN): an account's deposit address (a new one with
/// `new=true`).
pub async fn admin_deposit_address(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let account = account_param(&st, &mut p, "account")?;
    let new = bool_param(&mut p, "new")?;
    p.finish()?;
    let a = call(&st, move |c| c.deposit_address(account, new)).await?;
    // A new one, or the account's first, made on first use.
    if a.made {
        st.audit_done_by(
            "admin",
            &key.api_key,
            "deposit.address.new",
            json!({ "account": account, "address": &a.address }),
        );
    }
    Ok(ok_json(
        &ctx,
        json!({"account": account, "address": a.address}),
    ))
}

/// `GET /mapi/v1/admin/withdrawals` (ADMIN): withdrawals of one account or all.
pub async fn admin_withdrawals(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req)?;
    let account = match p.opt_u64("account")? {
        None => None,
        Some(v) => Some(u32::try_from(v).map_err(|_| ApiError::invalid_value("account"))?),
    };
    p.finish()?;
    let ws = call(&st, move |c| c.withdrawals(account)).await?;
    Ok(ok_json(&ctx, to_json(&ws)?))
}

/// `POST /mapi/v1/admin/withdrawals/approve` (ADMIN): approves a withdrawal that waits for
/// approval. Logged before (`withdrawal.approve.intent`) and after (`withdrawal.approve` with
/// its outcome), so a crash in between leaves the record of an approval that may have happened.
pub async fn admin_approve(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req)?;
    let id = p.opt_u64("id")?.ok_or_else(|| ApiError::missing("id"))?;
    p.finish()?;
    custody(&st)?;
    let w = st
        .audited(
            "withdrawal.approve",
            json!({ "id": id }),
            call(&st, move |c| c.approve_withdrawal(id)),
            |w| Ok(json!({ "id": id, "withdrawal": to_json(w)? })),
        )
        .await?;
    Ok(ok_json(&ctx, to_json(&w)?))
}

/// The longest release reason (bytes).
pub const MAX_REASON: usize = 200;
/// The highest fee rate a bump may ask, sat/vB (the batch's flat fees bound the fee anyway).
pub const MAX_FEE_RATE: u64 = 10_000;

/// `POST /mapi/v1/admin/withdrawals/reject` (ADMIN): refuses a withdrawal not batched yet with a
/// `reason` (1 to 200 bytes); the hold is given back.
pub async fn admin_reject(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req)?;
    let id = p.opt_u64("id")?.ok_or_else(|| ApiError::missing("id"))?;
    let reason = p.req("reason")?;
    if reason.is_empty() || reason.len() > MAX_REASON {
        return Err(ApiError::invalid_value("reason"));
    }
    p.finish()?;
    custody(&st)?;
    let announced = json!({ "id": id, "reason": &reason });
    let w = st
        .audited(
            "withdrawal.reject",
            announced,
            call(&st, move |c| c.reject_withdrawal(id, &reason)),
            |w| Ok(json!({ "id": id, "withdrawal": to_json(w)? })),
        )
        .await?;
    Ok(ok_json(&ctx, to_json(&w)?))
}

/// `POST /mapi/v1/admin/withdrawals/bump` (ADMIN): bumps the fee of the batch paying withdrawal
/// `id` to `feeRate` sat/vB (1..=10000), within the batch's flat fees.
pub async fn admin_bump(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req)?;
    let id = p.opt_u64("id")?.ok_or_else(|| ApiError::missing("id"))?;
    let rate = p
        .opt_u64("feeRate")?
        .ok_or_else(|| ApiError::missing("feeRate"))?;
    if !(1..=MAX_FEE_RATE).contains(&rate) {
        return Err(ApiError::invalid_value("feeRate"));
    }
    p.finish()?;
    custody(&st)?;
    let b = st
        .audited(
            "withdrawal.bump",
            json!({ "id": id, "feeRate": rate }),
            call(&st, move |c| c.bump_withdrawal(id, rate)),
            |b| Ok(json!({ "id": id, "feeRate": rate, "batch": to_json(b)? })),
        )
        .await?;
    Ok(ok_json(&ctx, to_json(&b)?))
}

/// `GET /mapi/v1/admin/accounts/flagged` (ADMIN): accounts flagged for review.
pub async fn admin_flagged(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, p, ctx) = st.signed(&req)?;
    p.finish()?;
    let v = call(&st, |c| c.flagged_accounts()).await?;
    Ok(ok_json(&ctx, to_json(&v)?))
}

/// `POST /mapi/v1/admin/accounts/clearFlag` (ADMIN): clears an account's flag. Logged before
/// (`account.clear_flag.intent`) and after (`account.clear_flag` with its outcome).
pub async fn admin_clear_flag(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req)?;
    let account = p
        .opt_u64("account")?
        .ok_or_else(|| ApiError::missing("account"))?;
    let account = u32::try_from(account).map_err(|_| ApiError::invalid_value("account"))?;
    p.finish()?;
    custody(&st)?;
    st.audited(
        "account.clear_flag",
        json!({ "account": account }),
        call(&st, move |c| c.clear_flag(account)),
        |_| Ok(json!({ "account": account })),
    )
    .await?;
    // The order path's copy is dropped: its next look-up reads custody again; a reading that
    // began before now is not stored.
    *st.0.flags.cleared.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
    *st.0.flags.copy.write().unwrap_or_else(|e| e.into_inner()) = None;
    Ok(ok_json(
        &ctx,
        json!({ "account": account, "cleared": true }),
    ))
}

/// `POST /mapi/v1/admin/batches/abandon` (ADMIN): abandons a batch in flight that can never
/// confirm (every version refused by the node for missing inputs): its withdrawals go out in the
/// next batch. Logged before (`batch.abandon.intent`) and after.
pub async fn admin_abandon_batch(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req)?;
    let id = p.opt_u64("id")?.ok_or_else(|| ApiError::missing("id"))?;
    p.finish()?;
    custody(&st)?;
    let ids = st
        .audited(
            "batch.abandon",
            json!({ "id": id }),
            call(&st, move |c| c.abandon_batch(id)),
            |ids| Ok(json!({ "id": id, "withdrawals": ids })),
        )
        .await?;
    Ok(ok_json(&ctx, json!({ "id": id, "withdrawals": ids })))
}

/// `POST /mapi/v1/admin/accounts/writeOffDebt` (ADMIN): writes an account's debt to custody off
/// (what a reversed deposit left that its balance did not cover; the exchange bears it), so its
/// flag can be cleared. Logged before (`account.write_off_debt.intent`) and after.
pub async fn admin_write_off_debt(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req)?;
    let account = p
        .opt_u64("account")?
        .ok_or_else(|| ApiError::missing("account"))?;
    let account = u32::try_from(account).map_err(|_| ApiError::invalid_value("account"))?;
    p.finish()?;
    custody(&st)?;
    let sat = st
        .audited(
            "account.write_off_debt",
            json!({ "account": account }),
            call(&st, move |c| c.write_off_debt(account)),
            |sat| Ok(json!({ "account": account, "written_off_sat": sat })),
        )
        .await?;
    Ok(ok_json(
        &ctx,
        json!({ "account": account, "written_off_sat": sat }),
    ))
}

/// `GET /mapi/v1/admin/batches` (ADMIN): withdrawal batches, newest first.
pub async fn admin_batches(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, p, ctx) = st.signed(&req)?;
    p.finish()?;
    let v = call(&st, |c| c.batches()).await?;
    Ok(ok_json(&ctx, to_json(&v)?))
}

/// `GET /mapi/v1/admin/alarms` (ADMIN): custody alarms not cleared.
pub async fn admin_alarms(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, p, ctx) = st.signed(&req)?;
    p.finish()?;
    let v = call(&st, |c| c.alarms()).await?;
    Ok(ok_json(&ctx, to_json(&v)?))
}

/// `POST /mapi/v1/admin/alarms/clear` (ADMIN): clears an alarm by `id`. Logged before
/// (`alarm.clear.intent`) and after (`alarm.clear` with its outcome).
pub async fn admin_clear_alarm(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req)?;
    let id = p.opt_u64("id")?.ok_or_else(|| ApiError::missing("id"))?;
    p.finish()?;
    custody(&st)?;
    st.audited(
        "alarm.clear",
        json!({ "id": id }),
        call(&st, move |c| c.clear_alarm(id)),
        |_| Ok(json!({ "id": id })),
    )
    .await?;
    Ok(ok_json(&ctx, json!({ "id": id, "cleared": true })))
}

/// `GET /mapi/v1/admin/reconcile` (ADMIN): wallet assets against ledger liabilities.
pub async fn admin_reconcile(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, p, ctx) = st.signed(&req)?;
    p.finish()?;
    let r = call(&st, |c| c.reconcile()).await?;
    st.audit("reconcile", to_json(&r)?)?;
    Ok(ok_json(&ctx, to_json(&r)?))
}

/// `GET /mapi/v1/admin/reconcile/records` (ADMIN): the two-sided reconciliation of the records.
/// It raises an alarm per mismatch (custody state), so it is logged before
/// (`reconcile.records.intent`) and after (`reconcile.records` with the report as its outcome).
pub async fn admin_reconcile_records(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    let (_, p, ctx) = st.signed(&req)?;
    p.finish()?;
    custody(&st)?;
    let r = st
        .audited(
            "reconcile.records",
            json!({}),
            call(&st, |c| c.reconcile_records()),
            to_json,
        )
        .await?;
    Ok(ok_json(&ctx, to_json(&r)?))
}

/// `POST /mapi/v1/admin/regtest/mine` (ADMIN): mines `blocks` (1..=1000) blocks; answers
/// `{"tip_height": n}`.
pub async fn admin_mine(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let blocks = p
        .opt_u64("blocks")?
        .ok_or_else(|| ApiError::missing("blocks"))?;
    if !(1..=MAX_MINE_BLOCKS).contains(&blocks) {
        return Err(ApiError::invalid_value("blocks"));
    }
    p.finish()?;
    let tip = call(&st, move |c| c.regtest_mine(blocks as u32)).await?;
    st.audit_done_by(
        "admin",
        &key.api_key,
        "regtest.mine",
        json!({ "blocks": blocks, "tip_height": tip }),
    );
    Ok(ok_json(&ctx, json!({ "tip_height": tip })))
}

/// `POST /mapi/v1/admin/regtest/fund` (ADMIN): pays a coinbase to the account and credits it;
/// answers `{"account": a, "amount_sat": n, "amount": "50.00000000"}`. Logged before
/// (`regtest.fund.intent`) and after (`regtest.fund` with its outcome).
pub async fn admin_fund(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req)?;
    let account = account_param(&st, &mut p, "account")?;
    p.finish()?;
    custody(&st)?;
    let sat = st
        .audited(
            "regtest.fund",
            json!({ "account": account }),
            call(&st, move |c| c.regtest_fund(account)),
            |sat| Ok(json!({ "account": account, "amount_sat": sat })),
        )
        .await?;
    Ok(ok_json(
        &ctx,
        json!({
            "account": account,
            "amount_sat": sat,
            "amount": crate::decimal::format_units(sat, BTC_DECIMALS),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_datetime_matches_known_dates() {
        assert_eq!(utc_datetime(0), "1970-01-01 00:00:00");
        assert_eq!(utc_datetime(1_570_878_722_000), "2019-10-12 11:12:02");
        assert_eq!(utc_datetime(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc_datetime(4_102_444_799_999), "2099-12-31 23:59:59");
    }

    #[test]
    fn custody_error_keeps_code_status_and_message() {
        let e = custody_error(CustodyError::bad_request(-4026, "Amount below minimum."));
        assert_eq!(
            (e.status, e.code, e.msg.as_ref()),
            (StatusCode::BAD_REQUEST, -4026, "Amount below minimum.")
        );
        let e = custody_error(CustodyError::internal("wallet down"));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::INTERNAL_SERVER_ERROR, -1001)
        );
        let mut odd = CustodyError::internal("x");
        odd.status = 200;
        assert_eq!(custody_error(odd).status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
