//! Custody endpoints over a fake custody service: Binance capital shapes, permissions,
//! input checks, error mapping, and 503 before a custody service is attached.

mod common;

use api::custody::{
    Custody, CustodyError, DepositInfo, DepositState, ReconcileInfo, WithdrawalInfo,
    WithdrawalState,
};
use api::keys::Perms;
use axum::http::StatusCode;
use common::Harness;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Fake {
    withdrawals: Mutex<Vec<WithdrawalInfo>>,
}

impl Custody for Fake {
    fn deposit_address(&self, account: u32, new: bool) -> Result<String, CustodyError> {
        Ok(format!(
            "bcrt1qaccount{account}{}",
            if new { "new" } else { "" }
        ))
    }
    fn deposits(&self, account: Option<u32>) -> Result<Vec<DepositInfo>, CustodyError> {
        let d = DepositInfo {
            account: account.unwrap_or(1),
            txid: "ab".repeat(32),
            vout: 1,
            amount_sat: 150_000_000,
            address: "bcrt1qx".into(),
            state: DepositState::Credited,
            confirmations: 3,
            required_confirmations: 2,
            seen_ms: 1_700_000_000_000,
        };
        Ok(vec![d])
    }
    fn request_withdrawal(
        &self,
        account: u32,
        address: &str,
        amount_sat: u64,
        idempotency_key: &str,
    ) -> Result<WithdrawalInfo, CustodyError> {
        if amount_sat < 10_000 {
            return Err(CustodyError::bad_request(
                -4022,
                "Amount below the minimum.",
            ));
        }
        let mut v = self.withdrawals.lock().unwrap();
        if v.iter().any(|w| w.idempotency_key == idempotency_key) {
            return Err(CustodyError::bad_request(
                -4026,
                "Duplicate withdrawOrderId.",
            ));
        }
        let w = WithdrawalInfo {
            id: v.len() as u64 + 1,
            account,
            address: address.into(),
            amount_sat,
            fee_sat: 1_000,
            idempotency_key: idempotency_key.into(),
            state: WithdrawalState::AwaitingApproval,
            reason: None,
            created_ms: 1_709_251_199_999,
            txid: None,
            confirmations: 0,
        };
        v.push(w.clone());
        Ok(w)
    }
    fn withdrawals(&self, account: Option<u32>) -> Result<Vec<WithdrawalInfo>, CustodyError> {
        Ok(self
            .withdrawals
            .lock()
            .unwrap()
            .iter()
            .filter(|w| account.is_none_or(|a| a == w.account))
            .cloned()
            .collect())
    }
    fn approve_withdrawal(&self, id: u64) -> Result<WithdrawalInfo, CustodyError> {
        let mut v = self.withdrawals.lock().unwrap();
        let w = v
            .iter_mut()
            .find(|w| w.id == id)
            .ok_or_else(|| CustodyError::bad_request(-4027, "No such withdrawal."))?;
        w.state = WithdrawalState::Pending;
        Ok(w.clone())
    }
    fn withdrawal_terms(&self) -> (u64, u64) {
        (1_000, 10_000)
    }
    fn reconcile(&self) -> Result<ReconcileInfo, CustodyError> {
        Ok(ReconcileInfo {
            wallet_confirmed_sat: 10,
            wallet_pending_sat: 0,
            uncredited_deposits_sat: 0,
            withdrawals_in_flight_sat: 0,
            ledger_liabilities_sat: 10,
            fee_income_sat: 0,
            surplus_sat: 0,
            shortfall: false,
            tip_height: 321,
        })
    }
    fn regtest_mine(&self, blocks: u32) -> Result<u32, CustodyError> {
        Ok(100 + blocks)
    }
    fn regtest_fund(&self, _account: u32) -> Result<u64, CustodyError> {
        Err(CustodyError::internal("node unavailable"))
    }
}

#[tokio::test]
async fn capital_endpoints_in_binance_shapes() {
    let h = Harness::new();
    let (acct, trader) = h.trader("0", "0").await;
    let r = h
        .signed(
            "GET",
            "/sapi/v1/capital/deposit/address",
            "coin=BTC",
            &trader,
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::SERVICE_UNAVAILABLE, -1001)
    );
    assert!(h.state.set_custody(Arc::new(Fake::default())).is_ok());
    assert!(h.state.set_custody(Arc::new(Fake::default())).is_err());

    let a = h
        .ok(
            "GET",
            "/sapi/v1/capital/deposit/address",
            "coin=BTC&network=BTC",
            &trader,
        )
        .await;
    assert_eq!(a["address"], format!("bcrt1qaccount{acct}"));
    assert_eq!(
        (a["coin"].as_str(), a["tag"].as_str()),
        (Some("BTC"), Some(""))
    );
    let r = h
        .signed(
            "GET",
            "/sapi/v1/capital/deposit/address",
            "coin=ETH",
            &trader,
        )
        .await;
    assert_eq!(r.code(), -1130);
    let r = h
        .signed("GET", "/sapi/v1/capital/deposit/address", "", &trader)
        .await;
    assert_eq!(r.code(), -1102);

    let d = h
        .ok(
            "GET",
            "/sapi/v1/capital/deposit/hisrec",
            "coin=BTC",
            &trader,
        )
        .await;
    assert_eq!(
        (d[0]["amount"].as_str(), d[0]["status"].as_u64()),
        (Some("1.50000000"), Some(1))
    );
    assert_eq!(d[0]["confirmTimes"], "3/2");

    // Withdrawing needs the withdraw permission.
    let r = h
        .signed(
            "POST",
            "/sapi/v1/capital/withdraw/apply",
            "coin=BTC&address=bcrt1qdest&amount=0.5",
            &trader,
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, -2015));
    let (k, s) = h
        .state
        .create_key(acct, Perms(Perms::READ.0 | Perms::WITHDRAW.0), "w")
        .unwrap();
    let w = (k, s);
    let id = h
        .ok(
            "POST",
            "/sapi/v1/capital/withdraw/apply",
            "coin=BTC&address=bcrt1qdest&amount=0.5&withdrawOrderId=w-1",
            &w,
        )
        .await;
    assert_eq!(id["id"], "1");
    let r = h
        .signed(
            "POST",
            "/sapi/v1/capital/withdraw/apply",
            "coin=BTC&address=bcrt1qdest&amount=0.5&withdrawOrderId=w-1",
            &w,
        )
        .await;
    assert_eq!(
        (r.status, r.code(), r.msg()),
        (StatusCode::BAD_REQUEST, -4026, "Duplicate withdrawOrderId.")
    );
    for (params, code) in [
        ("coin=BTC&address=bcrt1qdest&amount=0.000000001", -1111),
        ("coin=BTC&address=bcrt1qdest&amount=-1", -1100),
        ("coin=BTC&address=bc1%20x&amount=1", -1100),
        (
            "coin=BTC&address=bcrt1qdest&amount=0.00001&withdrawOrderId=w-2",
            -4022,
        ),
        ("coin=BTC&amount=1", -1102),
    ] {
        let r = h
            .signed("POST", "/sapi/v1/capital/withdraw/apply", params, &w)
            .await;
        assert_eq!(r.code(), code, "{params}: {}", r.json);
    }
    let hist = h
        .ok("GET", "/sapi/v1/capital/withdraw/history", "coin=BTC", &w)
        .await;
    assert_eq!(hist.as_array().unwrap().len(), 1);
    assert_eq!(
        (
            hist[0]["status"].as_u64(),
            hist[0]["withdrawOrderId"].as_str()
        ),
        (Some(2), Some("w-1"))
    );
    assert_eq!(hist[0]["applyTime"], "2024-02-29 23:59:59");
    assert_eq!(hist[0]["transactionFee"], "0.00001000");

    // Operator endpoints.
    let a = h
        .ok(
            "POST",
            "/mapi/v1/admin/depositAddress",
            &format!("account={acct}&new=true"),
            &h.admin,
        )
        .await;
    assert_eq!(a["address"], format!("bcrt1qaccount{acct}new"));
    let all = h
        .ok("GET", "/mapi/v1/admin/withdrawals", "", &h.admin)
        .await;
    assert_eq!(all[0]["state"], "awaiting_approval");
    let ok = h
        .ok(
            "POST",
            "/mapi/v1/admin/withdrawals/approve",
            "id=1",
            &h.admin,
        )
        .await;
    assert_eq!(ok["state"], "pending");
    let r = h
        .signed(
            "POST",
            "/mapi/v1/admin/withdrawals/approve",
            "id=9",
            &h.admin,
        )
        .await;
    assert_eq!(r.code(), -4027);
    let rec = h.ok("GET", "/mapi/v1/admin/reconcile", "", &h.admin).await;
    assert_eq!(rec["tip_height"], 321);
    let mined = h
        .ok("POST", "/mapi/v1/admin/regtest/mine", "blocks=5", &h.admin)
        .await;
    assert_eq!(mined["tip_height"], 105);
    let r = h
        .signed("POST", "/mapi/v1/admin/regtest/mine", "blocks=0", &h.admin)
        .await;
    assert_eq!(r.code(), -1130);
    let r = h
        .signed(
            "POST",
            "/mapi/v1/admin/regtest/fund",
            &format!("account={acct}"),
            &h.admin,
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::INTERNAL_SERVER_ERROR, -1001)
    );
    let r = h
        .signed(
            "POST",
            "/mapi/v1/admin/regtest/fund",
            "account=99999",
            &h.admin,
        )
        .await;
    assert_eq!(r.code(), -1130);
    let r = h
        .signed("GET", "/mapi/v1/admin/withdrawals", "", &trader)
        .await;
    assert_eq!(r.code(), -2015);
}
