//! Native endpoints (no Binance equivalent), in the same style (`/mapi/v1/...`, signed, Binance
//! error format): internal transfers, API key management, and operator (admin) endpoints.

use crate::error::ApiError;
use crate::keys::Perms;
use crate::params::Params;
use crate::state::{ok_json, AppState, Req};
use axum::extract::State;
use axum::response::Response;
use matching_engine::{AccountId, Amount, Command, Event, IdempotencyKey};
use serde_json::json;

fn asset_amount(
    st: &AppState,
    p: &mut Params,
) -> Result<(matching_engine::AssetId, u8, Amount), ApiError> {
    let asset = p.req("asset")?;
    let a = st
        .markets()
        .asset(&asset)
        .ok_or_else(|| ApiError::bad(-1130, "Invalid asset."))?
        .clone();
    let amount = p.req("amount")?;
    let v = crate::decimal::parse_units(&amount, a.decimals).map_err(|e| match e {
        crate::decimal::DecimalError::TooPrecise => ApiError::precision("amount"),
        _ => ApiError::illegal("amount", crate::market::DECIMAL_RANGE),
    })?;
    if v == 0 {
        return Err(ApiError::invalid_value("amount"));
    }
    Ok((a.id, a.decimals, Amount(v)))
}

fn account_param(p: &mut Params, name: &str) -> Result<AccountId, ApiError> {
    let v = p.opt_u64(name)?.ok_or_else(|| ApiError::missing(name))?;
    u32::try_from(v)
        .map(AccountId)
        .map_err(|_| ApiError::invalid_value(name))
}

fn reference(p: &mut Params, name: &str) -> Result<String, ApiError> {
    let r = p.req(name)?;
    if r.len() > 128 || !r.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(ApiError::illegal(name, "^[ -~]{1,128}$"));
    }
    Ok(r)
}

fn duplicate(events: &[Event]) -> bool {
    events.iter().any(|e| {
        matches!(
            e,
            Event::Accepted {
                duplicate: true,
                ..
            }
        )
    })
}

/// `POST /mapi/v1/transfer` (TRANSFER, not TRADE: funds leave the account): moves `amount` of `asset` to `toAccount` at once.
/// Idempotent by `clientTranId` (per sending account): the same id with other terms is `-1164`
/// (the engine's `TransferKeyReused`), nothing moved. The withdrawal policy is asked first
/// ([`crate::policy`], destination the other account: `403`, `-4038`, nothing submitted), and a
/// flagged account is refused (`-4032`, [`crate::capital::refuse_flagged`]). Both rules can
/// change after a transfer was applied, and a retry is how a client whose answer was lost learns
/// the outcome: before a refusal stands, the engine is asked whether the key was applied
/// ([`Command::TransferStatus`]), and a retry of an applied transfer is answered with its
/// outcome (its `tranId`, `duplicate`), never with "refused".
pub async fn transfer(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let to = account_param(&mut p, "toAccount")?;
    let (asset, decimals, amount) = asset_amount(&st, &mut p)?;
    let tran = reference(&mut p, "clientTranId")?;
    p.finish()?;
    let k = IdempotencyKey::reference(&format!("transfer/{}/{tran}", key.account));
    if let Err(refused) = transfer_rules(&st, key.account, to.0).await {
        if !transfer_applied(&st, k).await? {
            return Err(refused);
        }
        // Applied before the rule refused: the engine answers the retry (a duplicate with the
        // transfer's own `tranId`, or `-1164` for other terms); nothing moves.
    }
    let reply = st
        .submit(Command::Transfer {
            from: AccountId(key.account),
            to,
            asset,
            amount,
            key: k,
        })
        .await?;
    if let Err(code) = reply.result {
        return Err(ApiError::command_rejected(code));
    }
    Ok(ok_json(
        &ctx,
        json!({
            "tranId": reply.applied_seq(),
            "clientTranId": tran,
            "fromAccount": key.account,
            "toAccount": to.0,
            "asset": st.markets().assets[usize::from(asset.0)].symbol,
            "amount": crate::decimal::format_units(amount.0, decimals),
            "duplicate": duplicate(&reply.events),
        }),
    ))
}

/// The rules a new transfer from `from` to `to` must pass: the withdrawal policy, and no flag
/// (a flagged account's funds may be a deposit the chain took back: they stay until reviewed).
async fn transfer_rules(st: &AppState, from: u32, to: u32) -> Result<(), ApiError> {
    crate::policy::check(st, from, crate::policy::Destination::Account(to)).await?;
    crate::capital::refuse_flagged(st, from).await
}

/// Whether the engine applied a transfer under `key` (a read-only query, never journaled).
async fn transfer_applied(st: &AppState, key: IdempotencyKey) -> Result<bool, ApiError> {
    let reply = st.submit(Command::TransferStatus { key }).await?;
    reply
        .events
        .iter()
        .find_map(|e| match e {
            Event::TransferStatus {
                key: k,
                transferred,
            } if *k == key => Some(*transferred),
            _ => None,
        })
        .ok_or_else(|| {
            tracing::error!("the engine did not answer a transfer query");
            ApiError::internal()
        })
}

fn key_json(k: &crate::keys::ApiKey) -> serde_json::Value {
    json!({
        "apiKey": k.api_key,
        "account": k.account,
        "permissions": k.perms.names(),
        "label": k.label,
        "createTime": k.created_ms,
    })
}

/// `GET /mapi/v1/apiKey` (KEYS): the account's keys (never secrets). The id of a key with a
/// permission the caller lacks is shown masked (`masked_key_id`): a key's id is enough to open
/// its user data stream (`POST /api/v3/userDataStream` asks for the id alone, as Binance's
/// does), so listing it in full let a key holding `keys` alone read the account's orders and
/// balances through a `read` key's stream. A caller sees in full the keys it could have made
/// itself (at most its own permissions, as `POST /mapi/v1/apiKey`).
pub async fn list_keys(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, p, ctx) = st.signed(&req)?;
    p.finish()?;
    let v: Vec<_> =
        st.0.keys
            .of_account(key.account)
            .iter()
            .map(|k| {
                let mut v = key_json(k);
                if !key.perms.has(k.perms) {
                    v["apiKey"] = json!(masked_key_id(&k.api_key));
                }
                v
            })
            .collect();
    Ok(ok_json(&ctx, serde_json::Value::Array(v)))
}

/// A key id shown to a caller who may not use it: its first 8 characters and `...` (enough to
/// tell keys apart; the rest, 56 hex digits, is not guessable).
pub fn masked_key_id(id: &str) -> String {
    format!("{}...", id.get(..8).unwrap_or_default())
}

/// The public fields of a key, as answered and as audited (never the secret).
pub(crate) fn row_json(k: &crate::store::KeyRow) -> serde_json::Value {
    json!({
        "apiKey": k.api_key,
        "account": k.account,
        "permissions": Perms(k.perms).names(),
        "label": k.label,
        "createTime": k.created_ms,
    })
}

/// Creates a key of `account` with `perms` for `actor` (audited: `key.create`, with `by`, the
/// public id of the credential that asked, see [`crate::state::AppState::audit_by`]) and
/// answers it as `POST /mapi/v1/keys` does (with the secret, shown once). The audit entry is
/// written before the key exists: if it cannot be, no key is made and the answer (`-1000`) is
/// the truth (it was: made, unrecorded, and answered `-1000`, so a retry made a second one).
pub fn create_key(
    st: &AppState,
    actor: &str,
    by: &str,
    account: u32,
    perms: Perms,
    label: &str,
) -> Result<serde_json::Value, ApiError> {
    let (k, secret) = st.0.keys.create(
        &st.0.store,
        account,
        perms,
        label,
        crate::core::now_ms(),
        |row| st.audit_by(actor, by, "key.create", row_json(row)),
    )?;
    let mut v = key_json(&k);
    v["secretKey"] = json!(secret);
    // The same key for Greenfield clients (`Authorization: token ...`), derived like the
    // secret and shown only here.
    v["greenfieldToken"] = json!(st.0.keys.greenfield_token(&k.api_key));
    Ok(v)
}

fn perms_param(p: &mut Params) -> Result<Perms, ApiError> {
    Perms::parse(&p.req("permissions")?).ok_or_else(|| ApiError::invalid_value("permissions"))
}

fn label_param(p: &mut Params) -> Result<String, ApiError> {
    let l = p.opt("label")?.unwrap_or_default();
    if l.len() > 64 || !l.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(ApiError::illegal("label", "^[ -~]{0,64}$"));
    }
    Ok(l)
}

/// `POST /mapi/v1/apiKey` (KEYS): creates a key for the caller's own account with at most the caller's
/// permissions. The secret is in this answer only.
pub async fn create_own_key(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let perms = perms_param(&mut p)?;
    let label = label_param(&mut p)?;
    p.finish()?;
    if !key.perms.has(perms) {
        return Err(ApiError::key_rejected());
    }
    Ok(ok_json(
        &ctx,
        create_key(
            &st,
            &format!("account:{}", key.account),
            &key.api_key,
            key.account,
            perms,
            &label,
        )?,
    ))
}

/// `DELETE /mapi/v1/apiKey` (KEYS): revokes one of the account's keys.
pub async fn revoke_key(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let target = p.req("apiKey")?;
    p.finish()?;
    revoke_own_key(
        &st,
        &key,
        &target,
        &format!("account:{}", key.account),
        &key.api_key,
    )?;
    Ok(ok_json(&ctx, json!({})))
}

/// Revokes `target` if it is `owner`'s account's key; `-2008` otherwise (also when `owner`
/// holds `admin`: the operator revokes other accounts' keys on the admin listener only,
/// [`admin_revoke_key`]). Audited (`key.revoke`) as `actor`, `by` naming the credential that
/// asked.
pub fn revoke_own_key(
    st: &AppState,
    owner: &crate::keys::ApiKey,
    target: &str,
    actor: &str,
    by: &str,
) -> Result<(), ApiError> {
    revoke_key_of(st, Some(owner.account), target, actor, by)
}

/// `DELETE /mapi/v1/admin/apiKey` (ADMIN): revokes any account's key (`apiKey`), e.g. one its
/// owner reported stolen; `-2008` for a key that is not live. Audited (`key.revoke`) as
/// `admin`.
pub async fn admin_revoke_key(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (by, mut p, ctx) = st.signed(&req)?;
    let target = p.req("apiKey")?;
    p.finish()?;
    revoke_key_of(&st, None, &target, "admin", &by.api_key)?;
    Ok(ok_json(&ctx, json!({})))
}

/// Revokes `target` if it is live and of `account` (any account: `None`); `-2008` otherwise.
fn revoke_key_of(
    st: &AppState,
    account: Option<u32>,
    target: &str,
    actor: &str,
    by: &str,
) -> Result<(), ApiError> {
    let Some(account) =
        st.0.keys
            .get(target)
            .filter(|k| account.is_none_or(|a| k.account == a))
            .map(|k| k.account)
    else {
        return Err(ApiError::bad(-2008, "Invalid Api-Key ID."));
    };
    st.0.keys.revoke(&st.0.store, target).map_err(|e| {
        tracing::error!(error = %e, "revoking an API key failed");
        ApiError::internal()
    })?;
    crate::ws::forget_listen_keys_of(st, target);
    // Revoked whatever the log says: a revocation is never held back, and once done it is
    // answered as done (a failed entry is in the server log).
    st.audit_done_by(
        actor,
        by,
        "key.revoke",
        json!({ "apiKey": target, "account": account }),
    );
    Ok(())
}

/// `POST /mapi/v1/admin/account` (ADMIN): opens an account.
pub async fn admin_create_account(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    let (key, p, ctx) = st.signed(&req)?;
    p.finish()?;
    let reply = st.submit(Command::CreateAccount).await?;
    if let Err(code) = reply.result {
        return Err(ApiError::command_rejected(code));
    }
    let account = reply
        .events
        .iter()
        .find_map(|e| match e {
            Event::Accepted { account, .. } => *account,
            _ => None,
        })
        .ok_or_else(ApiError::internal)?;
    // The account exists now: answered as done even if its entry cannot be written.
    st.audit_done_by(
        "admin",
        &key.api_key,
        "account.create",
        json!({ "account": account.0 }),
    );
    Ok(ok_json(&ctx, json!({ "account": account.0 })))
}

/// `POST /mapi/v1/admin/apiKey` (ADMIN): creates a key for any existing account.
pub async fn admin_create_key(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (by, mut p, ctx) = st.signed(&req)?;
    let account = account_param(&mut p, "account")?;
    let perms = perms_param(&mut p)?;
    let label = label_param(&mut p)?;
    p.finish()?;
    if !st.read_model().read().accounts.contains(&account.0) {
        return Err(ApiError::bad(-1130, "Unknown account."));
    }
    Ok(ok_json(
        &ctx,
        create_key(&st, "admin", &by.api_key, account.0, perms, &label)?,
    ))
}

/// `POST /mapi/v1/admin/credit` (ADMIN): records an operator deposit (e.g. quote currency
/// received off-chain). Idempotent by `reference`. Logged before (`credit.intent`) and after
/// (`credit` with its outcome and `duplicate`).
pub async fn admin_credit(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req)?;
    let account = account_param(&mut p, "account")?;
    let (asset, decimals, amount) = asset_amount(&st, &mut p)?;
    let r = reference(&mut p, "reference")?;
    p.finish()?;
    // With custody attached, BTC exists in the ledger only as deposits the wallet holds: an
    // operator credit would be a liability with no coins behind it (a reconciliation shortfall).
    if st.0.custody.get().is_some() && st.markets().assets[usize::from(asset.0)].symbol == "BTC" {
        return Err(ApiError::bad(
            -1130,
            "BTC is held by custody: it is credited by on-chain deposits, not by an operator.",
        ));
    }
    // Money: announced before it is submitted (`credit.intent`), its outcome logged after.
    let announced =
        json!({ "account": account.0, "asset": asset.0, "amount": amount.0, "reference": &r });
    let credit = async {
        let reply = st
            .submit(Command::Credit {
                account,
                asset,
                amount,
                key: IdempotencyKey::reference(&r),
            })
            .await?;
        match reply.result {
            Ok(()) => Ok(duplicate(&reply.events)),
            Err(code) => Err(ApiError::command_rejected(code)),
        }
    };
    let dup = st
        .audited("credit", announced.clone(), credit, |dup| {
            let mut v = announced.clone();
            v["duplicate"] = json!(dup);
            Ok(v)
        })
        .await?;
    Ok(ok_json(
        &ctx,
        json!({
            "account": account.0,
            "asset": st.markets().assets[usize::from(asset.0)].symbol,
            "amount": crate::decimal::format_units(amount.0, decimals),
            "reference": r,
            "duplicate": dup,
        }),
    ))
}
