//! Admin commands: each talks to the running server's admin endpoints (on its admin listener,
//! `admin_listen`, which `--server` names; default `127.0.0.1:8081`), signed with the admin key
//! that `mediator serve` wrote into the data directory, and prints a short summary (or the JSON
//! answer with `--json`).

use anyhow::{anyhow, Context};
use api::client::{Client, ClientError};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;

/// Where the server is and how to talk to it.
#[derive(Debug)]
pub struct Admin {
    client: Client,
    json: bool,
    rt: tokio::runtime::Runtime,
}

impl Admin {
    /// A client for the server at `server`, with the admin key in `data_dir/api/admin-key.json`.
    pub fn new(server: SocketAddr, data_dir: &Path, json: bool) -> anyhow::Result<Self> {
        let key = data_dir.join("api").join("admin-key.json");
        let client = Client::from_key_file(server, &key)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| {
                format!(
                    "reading the admin key {} (is the data directory right?)",
                    key.display()
                )
            })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self { client, json, rt })
    }

    /// A signed admin call.
    pub fn call(&self, method: &str, path: &str, params: &[(&str, &str)]) -> anyhow::Result<Value> {
        self.rt
            .block_on(self.client.signed(method, path, params))
            .map_err(|e| match e {
                ClientError::Api { status, code, msg } => {
                    anyhow!("server refused ({status}, code {code}): {msg}")
                }
                other => anyhow!("cannot reach the server: {other}"),
            })
    }

    /// Prints `v` as JSON, or `summary(v)`.
    pub fn print(&self, v: &Value, summary: impl FnOnce(&Value) -> String) {
        if self.json {
            println!("{v}");
        } else {
            println!("{}", summary(v));
        }
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `mediator account create`.
pub fn account_create(a: &Admin) -> anyhow::Result<()> {
    let v = a.call("POST", "/mapi/v1/admin/account", &[])?;
    a.print(&v, |v| format!("account {} created", s(&v["account"])));
    Ok(())
}

/// `mediator apikey create --account A --permissions P [--label L]`.
pub fn apikey_create(
    a: &Admin,
    account: u32,
    permissions: &str,
    label: Option<&str>,
) -> anyhow::Result<()> {
    let account = account.to_string();
    let mut params = vec![("account", account.as_str()), ("permissions", permissions)];
    if let Some(l) = label {
        params.push(("label", l));
    }
    let v = a.call("POST", "/mapi/v1/admin/apiKey", &params)?;
    a.print(&v, |v| {
        format!(
            "api key for account {}: {}\nsecret (shown once): {}\ngreenfield token (shown once): {}\npermissions: {}",
            s(&v["account"]),
            s(&v["apiKey"]),
            s(&v["secretKey"]),
            s(&v["greenfieldToken"]),
            v["permissions"]
        )
    });
    Ok(())
}

/// `mediator apikey revoke --api-key K`: any account's key, on the admin listener.
pub fn apikey_revoke(a: &Admin, api_key: &str) -> anyhow::Result<()> {
    let v = a.call("DELETE", "/mapi/v1/admin/apiKey", &[("apiKey", api_key)])?;
    a.print(&v, |_| format!("revoked api key {api_key}"));
    Ok(())
}

/// `mediator dashboard password --account A` (the password on stdin's first line).
pub fn dashboard_password(a: &Admin, account: u32) -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']);
    let account = account.to_string();
    let params = [("account", account.as_str()), ("password", password)];
    let v = a.call("POST", "/mapi/v1/admin/dashboardPassword", &params)?;
    a.print(&v, |v| {
        format!("dashboard password set for store {}", s(&v["account"]))
    });
    Ok(())
}

/// `mediator dashboard link --account A`.
pub fn dashboard_link(a: &Admin, account: u32) -> anyhow::Result<()> {
    let account = account.to_string();
    let v = a.call(
        "POST",
        "/mapi/v1/admin/dashboardLink",
        &[("account", account.as_str())],
    )?;
    a.print(&v, |v| {
        format!(
            "one-time login link for store {} (valid 15 minutes, single use):\n{}",
            s(&v["account"]),
            s(&v["link"])
        )
    });
    Ok(())
}

/// `mediator deposit-address A [--new]`.
pub fn deposit_address(a: &Admin, account: u32, new: bool) -> anyhow::Result<()> {
    let account = account.to_string();
    let mut params = vec![("account", account.as_str())];
    if new {
        params.push(("new", "true"));
    }
    let v = a.call("POST", "/mapi/v1/admin/depositAddress", &params)?;
    a.print(&v, |v| s(&v["address"]));
    Ok(())
}

/// `mediator withdrawals [--account A]`.
pub fn withdrawals(a: &Admin, account: Option<u32>) -> anyhow::Result<()> {
    let account = account.map(|x| x.to_string());
    let params: Vec<(&str, &str)> = account.iter().map(|x| ("account", x.as_str())).collect();
    let v = a.call("GET", "/mapi/v1/admin/withdrawals", &params)?;
    a.print(&v, |v| {
        let rows = v.as_array().cloned().unwrap_or_default();
        if rows.is_empty() {
            return "no withdrawals".into();
        }
        rows.iter()
            .map(|w| {
                format!(
                    "#{} account {} {} sat to {} [{}]{}",
                    s(&w["id"]),
                    s(&w["account"]),
                    s(&w["amount_sat"]),
                    s(&w["address"]),
                    s(&w["state"]),
                    w["txid"]
                        .as_str()
                        .map(|t| format!(" tx {t}"))
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

/// `mediator approve ID`.
pub fn approve(a: &Admin, id: u64) -> anyhow::Result<()> {
    let id = id.to_string();
    let v = a.call(
        "POST",
        "/mapi/v1/admin/withdrawals/approve",
        &[("id", id.as_str())],
    )?;
    a.print(&v, |v| {
        format!("withdrawal {} approved: {}", s(&v["id"]), s(&v["state"]))
    });
    Ok(())
}

/// `mediator reconcile [--records]`.
pub fn reconcile(a: &Admin, records: bool) -> anyhow::Result<()> {
    if records {
        let v = a.call("GET", "/mapi/v1/admin/reconcile/records", &[])?;
        a.print(&v, |v| {
            let rows = v["mismatches"].as_array().cloned().unwrap_or_default();
            let mut out = format!(
                "{} deposits and {} completed withdrawals compared ({} unanswered): {} mismatches",
                s(&v["deposits_checked"]),
                s(&v["withdrawals_checked"]),
                s(&v["unanswered"]),
                rows.len()
            );
            for m in rows {
                out.push_str(&format!(
                    "\n{} {}: {}",
                    s(&m["kind"]),
                    s(&m["subject"]),
                    s(&m["detail"])
                ));
            }
            out
        });
        return Ok(());
    }
    let v = a.call("GET", "/mapi/v1/admin/reconcile", &[])?;
    a.print(&v, |v| {
        format!(
            "wallet: {} sat confirmed, {} sat pending; ledger liabilities {} sat; in flight {} sat; \
             surplus {} sat{}",
            s(&v["wallet_confirmed_sat"]),
            s(&v["wallet_pending_sat"]),
            s(&v["ledger_liabilities_sat"]),
            s(&v["withdrawals_in_flight_sat"]),
            s(&v["surplus_sat"]),
            if v["shortfall"].as_bool() == Some(true) { " — SHORTFALL" } else { "" }
        )
    });
    Ok(())
}

/// `mediator credit ACCOUNT ASSET AMOUNT --reference R`.
pub fn credit(
    a: &Admin,
    account: u32,
    asset: &str,
    amount: &str,
    reference: &str,
) -> anyhow::Result<()> {
    let account = account.to_string();
    let v = a.call(
        "POST",
        "/mapi/v1/admin/credit",
        &[
            ("account", account.as_str()),
            ("asset", asset),
            ("amount", amount),
            ("reference", reference),
        ],
    )?;
    a.print(&v, |v| {
        format!(
            "{} {} {} to account {}",
            if v["duplicate"].as_bool() == Some(true) {
                "already credited:"
            } else {
                "credited"
            },
            s(&v["amount"]),
            s(&v["asset"]),
            s(&v["account"])
        )
    });
    Ok(())
}

/// `mediator regtest mine N`.
pub fn regtest_mine(a: &Admin, blocks: u32) -> anyhow::Result<()> {
    let blocks = blocks.to_string();
    let v = a.call(
        "POST",
        "/mapi/v1/admin/regtest/mine",
        &[("blocks", blocks.as_str())],
    )?;
    a.print(&v, |v| format!("mined; tip height {}", s(&v["tip_height"])));
    Ok(())
}

/// `mediator regtest fund ACCOUNT`.
pub fn regtest_fund(a: &Admin, account: u32) -> anyhow::Result<()> {
    let account = account.to_string();
    let v = a.call(
        "POST",
        "/mapi/v1/admin/regtest/fund",
        &[("account", account.as_str())],
    )?;
    a.print(&v, |v| {
        format!(
            "mined {} sat to account {}'s deposit address; it is credited at the custody service's next poll",
            s(&v["amount_sat"]),
            s(&v["account"])
        )
    });
    Ok(())
}

/// `mediator withdrawal reject ID --reason R`.
pub fn reject(a: &Admin, id: u64, reason: &str) -> anyhow::Result<()> {
    let id = id.to_string();
    let v = a.call(
        "POST",
        "/mapi/v1/admin/withdrawals/reject",
        &[("id", id.as_str()), ("reason", reason)],
    )?;
    a.print(&v, |v| {
        format!(
            "withdrawal {} refused: {} ({})",
            s(&v["id"]),
            s(&v["state"]),
            s(&v["reason"])
        )
    });
    Ok(())
}

/// `mediator withdrawal bump ID --fee-rate N`.
pub fn bump(a: &Admin, id: u64, fee_rate: u64) -> anyhow::Result<()> {
    let id = id.to_string();
    let rate = fee_rate.to_string();
    let v = a.call(
        "POST",
        "/mapi/v1/admin/withdrawals/bump",
        &[("id", id.as_str()), ("feeRate", rate.as_str())],
    )?;
    a.print(&v, |v| {
        format!(
            "batch {} bumped: fee {} sat of at most {} sat; newest tx {}",
            s(&v["id"]),
            s(&v["fee_sat"]),
            s(&v["fee_budget_sat"]),
            v["txids"]
                .as_array()
                .and_then(|t| t.last())
                .map(s)
                .unwrap_or_default()
        )
    });
    Ok(())
}

/// `mediator accounts flagged`.
pub fn flagged(a: &Admin) -> anyhow::Result<()> {
    let v = a.call("GET", "/mapi/v1/admin/accounts/flagged", &[])?;
    a.print(&v, |v| {
        let rows = v.as_array().cloned().unwrap_or_default();
        if rows.is_empty() {
            return "no flagged accounts".into();
        }
        rows.iter()
            .map(|f| {
                let debt = f["debt_sat"].as_u64().unwrap_or(0);
                let owes = if debt > 0 {
                    format!(" (owes {debt} sat, paid first by its next deposits)")
                } else {
                    String::new()
                };
                format!("account {}: {}{owes}", s(&f["account"]), s(&f["reason"]))
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

/// `mediator account clear-flag ID`.
pub fn clear_flag(a: &Admin, account: u32) -> anyhow::Result<()> {
    let account = account.to_string();
    let v = a.call(
        "POST",
        "/mapi/v1/admin/accounts/clearFlag",
        &[("account", account.as_str())],
    )?;
    a.print(&v, |v| {
        format!("account {}: flag cleared", s(&v["account"]))
    });
    Ok(())
}

/// `mediator batch abandon ID`.
pub fn abandon_batch(a: &Admin, id: u64) -> anyhow::Result<()> {
    let id = id.to_string();
    let v = a.call(
        "POST",
        "/mapi/v1/admin/batches/abandon",
        &[("id", id.as_str())],
    )?;
    a.print(&v, |v| {
        format!(
            "batch {} abandoned; withdrawals {} go out in the next batch",
            s(&v["id"]),
            v["withdrawals"]
        )
    });
    Ok(())
}

/// `mediator account write-off-debt ID`.
pub fn write_off_debt(a: &Admin, account: u32) -> anyhow::Result<()> {
    let account = account.to_string();
    let v = a.call(
        "POST",
        "/mapi/v1/admin/accounts/writeOffDebt",
        &[("account", account.as_str())],
    )?;
    a.print(&v, |v| {
        format!(
            "account {}: {} sat written off",
            s(&v["account"]),
            s(&v["written_off_sat"])
        )
    });
    Ok(())
}

/// `mediator batches`.
pub fn batches(a: &Admin) -> anyhow::Result<()> {
    let v = a.call("GET", "/mapi/v1/admin/batches", &[])?;
    a.print(&v, |v| {
        let rows = v.as_array().cloned().unwrap_or_default();
        if rows.is_empty() {
            return "no batches".into();
        }
        rows.iter()
            .map(|b| {
                format!(
                    "batch {} [{}] {} withdrawals, fee {} of {} sat, tx {}{}",
                    s(&b["id"]),
                    s(&b["status"]),
                    b["withdrawals"].as_array().map_or(0, |w| w.len()),
                    s(&b["fee_sat"]),
                    s(&b["fee_budget_sat"]),
                    b["txids"]
                        .as_array()
                        .and_then(|t| t.last())
                        .map(s)
                        .unwrap_or_default(),
                    match b["refusals"].as_u64() {
                        Some(n) if n > 0 => {
                            format!(" (refused {n} times: {})", s(&b["last_error"]))
                        }
                        _ => String::new(),
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

/// `mediator alarms`.
pub fn alarms(a: &Admin) -> anyhow::Result<()> {
    let v = a.call("GET", "/mapi/v1/admin/alarms", &[])?;
    a.print(&v, |v| {
        let rows = v.as_array().cloned().unwrap_or_default();
        if rows.is_empty() {
            return "no alarms".into();
        }
        rows.iter()
            .map(|x| {
                format!(
                    "#{} {} ({}): {}",
                    s(&x["id"]),
                    s(&x["kind"]),
                    s(&x["subject"]),
                    s(&x["message"])
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

/// `mediator alarm clear ID`.
pub fn clear_alarm(a: &Admin, id: u64) -> anyhow::Result<()> {
    let id = id.to_string();
    let v = a.call(
        "POST",
        "/mapi/v1/admin/alarms/clear",
        &[("id", id.as_str())],
    )?;
    a.print(&v, |v| format!("alarm {} cleared", s(&v["id"])));
    Ok(())
}
