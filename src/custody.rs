//! The glue between the custody service (wallet crate) and the rest of the server:
//! [`EngineLedger`] is the wallet's view of the ledger (commands through the API's core, which
//! answers once they are durable and applied to the read models), and [`WalletCustody`] is the
//! API's view of custody (deposit addresses, deposits, withdrawals, reconciliation, regtest
//! mining).

use api::core::Outcome;
use api::custody::{
    AlarmInfo, BatchSummary, Custody, CustodyError, DepositAddress, DepositInfo, DepositState,
    FlaggedAccount, ReconcileInfo, RecordMismatchInfo, RecordsInfo, ReservesProofInfo,
    WithdrawalInfo, WithdrawalState,
};
use api::AppState;
use bdk_bitcoind_rpc::bitcoincore_rpc::{Client, RpcApi};
use matching_engine::config::BTC;
use matching_engine::{
    AccountId, Amount, Command, Event, IdempotencyKey, RejectCode, Withdrawal, WithdrawalId,
};
use std::sync::{Arc, Mutex, MutexGuard};
use wallet::bitcoin::{Address, FeeRate, Network, ScriptBuf, Txid};
use wallet::{
    system_now, BumpError, CustodyService, DepositStatus, LedgerError, WithdrawalError,
    WithdrawalRequest, WithdrawalStatus, WithdrawalView,
};

/// The ledger as the custody service sees it: every command goes through the API's core (the
/// sequencer) and is answered applied (durable), refused, or unknown ([`Outcome`]).
#[derive(Debug)]
pub struct EngineLedger {
    state: AppState,
    rt: tokio::runtime::Handle,
}

impl EngineLedger {
    /// Over the API's state; `rt` runs the submissions (the custody thread is not a tokio thread).
    pub fn new(state: AppState, rt: tokio::runtime::Handle) -> Self {
        Self { state, rt }
    }
}

impl wallet::Ledger for EngineLedger {
    fn submit(&self, cmd: Command) -> Result<(), LedgerError> {
        // Three answers: applied, refused (nothing changed; "not taken" is a refusal as busy),
        // or unknown (taken, no answer): the service resolves the last by asking, never assumes.
        match self.rt.block_on(self.state.submit_outcome(cmd)) {
            Outcome::Applied(_) => Ok(()),
            Outcome::Rejected(code) => Err(LedgerError::Rejected(code)),
            // Not taken (queue full, or the circuit breaker is open): nothing changed, retry.
            Outcome::Busy | Outcome::Halted => Err(LedgerError::Rejected(RejectCode::EngineBusy)),
            _ => Err(LedgerError::Unknown),
        }
    }

    fn withdrawal(&self, id: WithdrawalId) -> Result<Option<Withdrawal>, LedgerError> {
        // A read-only query through the sequencer: answered after every command before it, never
        // journaled.
        match self
            .rt
            .block_on(self.state.submit_outcome(Command::WithdrawalStatus { id }))
        {
            Outcome::Applied(reply) => reply
                .events
                .iter()
                .find_map(|e| match e {
                    Event::WithdrawalStatus {
                        id: got,
                        withdrawal,
                    } if *got == id => Some(*withdrawal),
                    _ => None,
                })
                .ok_or(LedgerError::Unknown),
            Outcome::Rejected(code) => Err(LedgerError::Rejected(code)),
            Outcome::Busy => Err(LedgerError::Rejected(RejectCode::EngineBusy)),
            _ => Err(LedgerError::Unknown),
        }
    }

    fn credited(&self, key: IdempotencyKey) -> Result<bool, LedgerError> {
        match self
            .rt
            .block_on(self.state.submit_outcome(Command::CreditStatus { key }))
        {
            Outcome::Applied(reply) => reply
                .events
                .iter()
                .find_map(|e| match e {
                    Event::CreditStatus { key: k, credited } if *k == key => Some(*credited),
                    _ => None,
                })
                .ok_or(LedgerError::Unknown),
            Outcome::Rejected(code) => Err(LedgerError::Rejected(code)),
            Outcome::Busy => Err(LedgerError::Rejected(RejectCode::EngineBusy)),
            _ => Err(LedgerError::Unknown),
        }
    }

    fn btc_liabilities(&self) -> Amount {
        // The read models hold every command the engine applied before this call (the credits
        // and completions custody just submitted included): a lagging read would show a
        // completed withdrawal still held, a shortfall that is not there, and hold payouts
        // back (`BatchPolicy::shortfall_tolerance`). Not in time: what they hold.
        if !self.rt.block_on(self.state.sync_read_model()) {
            tracing::warn!("read models behind the engine: liabilities as they hold them");
        }
        let rm = self.state.read_model().read();
        Amount(
            rm.balances
                .values()
                .filter_map(|v| v.get(BTC.0 as usize))
                .map(|&(available, held)| available + held)
                .sum(),
        )
    }

    fn account_exists(&self, account: AccountId) -> bool {
        self.state.read_model().read().accounts.contains(&account.0)
    }

    fn btc_available(&self, account: AccountId) -> Result<Amount, LedgerError> {
        // Only from read models that hold every command applied before this call: a stale
        // reading would take back less than the account has (a debt that is not owed).
        if !self.rt.block_on(self.state.sync_read_model()) {
            return Err(LedgerError::Unknown);
        }
        let rm = self.state.read_model().read();
        Ok(Amount(
            rm.balances
                .get(&account.0)
                .and_then(|v| v.get(BTC.0 as usize))
                .map_or(0, |&(available, _)| available),
        ))
    }
}

/// Custody for the API, over the wallet's service (behind a mutex: custody is not on the order
/// path, and the service runs one step at a time) and the node's RPC.
pub struct WalletCustody {
    service: Arc<Mutex<CustodyService>>,
    rpc: Arc<Client>,
    network: Network,
    /// The Lightning node (the account's Lightning outflow for on-chain requests).
    lightning: std::sync::OnceLock<Arc<crate::lightning::Service>>,
    /// The Lightning node's balances, custody assets too (reconciliation).
    ln_balances: std::sync::OnceLock<Arc<dyn LightningBalances>>,
}

/// The Lightning node's balances as custody's reconciliation reads them (the node; a fake in
/// tests). They move with every payment: one report reads them once.
pub trait LightningBalances: Send + Sync {
    /// The node's balances now.
    fn balances(&self) -> lightning_custody::LnBalances;
}

impl LightningBalances for crate::lightning::Service {
    fn balances(&self) -> lightning_custody::LnBalances {
        crate::lightning::Service::balances(self)
    }
}

/// All of the node's money: on-chain, its side of the channels and closing sweeps, and its
/// withdrawals in flight.
fn ln_total(b: &lightning_custody::LnBalances) -> u64 {
    b.onchain_sat
        .saturating_add(b.channels_sat)
        .saturating_add(b.pending_close_sat)
        .saturating_add(b.withdrawals_in_flight_sat)
}

impl std::fmt::Debug for WalletCustody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalletCustody")
            .field("network", &self.network)
            .finish()
    }
}

fn internal(e: impl std::fmt::Display) -> CustodyError {
    tracing::error!(error = %e, "custody");
    CustodyError::internal("custody service error")
}

/// Binance's codes for the custody refusals: -4026-ish are withdrawal rules; -1102 / -1100 input.
fn withdrawal_error(e: WithdrawalError) -> CustodyError {
    let code = match &e {
        WithdrawalError::MalformedAddress { .. }
        | WithdrawalError::WrongNetwork { .. }
        | WithdrawalError::OwnAddress { .. } => -4007,
        WithdrawalError::Dust { .. } | WithdrawalError::BelowMinimum { .. } => -4022,
        WithdrawalError::DailyLimit { .. } => -4025,
        WithdrawalError::DenyListed { .. } => -4008,
        WithdrawalError::DuplicateKey { .. } => -4029,
        WithdrawalError::InvalidKey => -1100,
        WithdrawalError::UnknownAccount(_) => -2015,
        WithdrawalError::InsufficientBalance { .. } => -4026,
        WithdrawalError::LedgerRejected(RejectCode::EngineBusy) => {
            // Not taken: nothing changed; the caller tries again (Binance's "too much traffic").
            let mut busy = CustodyError::unknown("engine busy, try again");
            busy.code = -1008;
            return busy;
        }
        WithdrawalError::LedgerRejected(_) => -4026,
        WithdrawalError::UnknownWithdrawal(_) => -4030,
        WithdrawalError::NotAwaitingApproval(_) => -4031,
        WithdrawalError::LedgerMismatch(_) => -4026,
        WithdrawalError::AccountFlagged(_) => -4032,
        WithdrawalError::PayoutsHeld { .. } => -4039,
        WithdrawalError::NotFlagged(_) => -4033,
        WithdrawalError::InDebt { .. } => -4040,
        WithdrawalError::NoDebt(_) => -4041,
        WithdrawalError::UnknownAlarm(_) => -4036,
        WithdrawalError::ApprovalRequired { .. } => -4037,
        // Maybe held: recorded and resolved by custody; the caller asks again (same key).
        WithdrawalError::LedgerUnknown(_) => return CustodyError::unknown(e.to_string()),
        WithdrawalError::Store(_) => return internal(e),
        _ => return internal(e),
    };
    CustodyError::bad_request(code, e.to_string())
}

impl WalletCustody {
    /// Over a running service and its node.
    pub fn new(service: Arc<Mutex<CustodyService>>, rpc: Arc<Client>, network: Network) -> Self {
        Self {
            service,
            rpc,
            network,
            lightning: std::sync::OnceLock::new(),
            ln_balances: std::sync::OnceLock::new(),
        }
    }

    /// Counts the Lightning node's balances in [`Custody::reconcile`] from now on.
    pub fn set_lightning(self: &Arc<Self>, ln: Arc<crate::lightning::Service>) {
        self.count_lightning_assets(ln.clone());
        ln.set_policy(Arc::new(OutflowRules(Arc::downgrade(self))));
        ln.set_alarms(Arc::new(CustodyAlarms(Arc::downgrade(self))));
        let _ = self.lightning.set(ln);
    }

    /// Counts `ln`'s balances as custody assets, in the loop's reconciliation and in
    /// [`Custody::reconcile`] (part of [`set_lightning`](Self::set_lightning)).
    pub fn count_lightning_assets(&self, ln: Arc<dyn LightningBalances>) {
        self.lock()
            .set_other_assets(Arc::new(LightningAssets(ln.clone())));
        let _ = self.ln_balances.set(ln);
    }

    fn lock(&self) -> MutexGuard<'_, CustodyService> {
        self.service.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn withdrawal_info(&self, s: &CustodyService, w: &WithdrawalView) -> WithdrawalInfo {
        self.withdrawal_infos(s, std::slice::from_ref(w))
            .pop()
            .expect("one withdrawal in, one out")
    }

    /// The API's view of `ws`: each with the transaction that pays it (the confirmed version of
    /// its batch once completed, never a fee bump that lost to it) and its confirmations, read
    /// in one pass over the wallet.
    fn withdrawal_infos(&self, s: &CustodyService, ws: &[WithdrawalView]) -> Vec<WithdrawalInfo> {
        let txids: Vec<Option<Txid>> = ws
            .iter()
            .map(|w| {
                w.batch_id
                    .and_then(|b| s.batch_payment_txid(b).ok().flatten())
            })
            .collect();
        let confirmations = s.confirmations_of(&txids.iter().flatten().copied().collect());
        ws.iter()
            .zip(txids)
            .map(|(w, txid)| self.withdrawal_row(w, txid, &confirmations))
            .collect()
    }

    fn withdrawal_row(
        &self,
        w: &WithdrawalView,
        txid: Option<Txid>,
        confirmations: &std::collections::HashMap<Txid, u32>,
    ) -> WithdrawalInfo {
        let confirmations = txid
            .and_then(|t| confirmations.get(&t).copied())
            .unwrap_or(0);
        WithdrawalInfo {
            id: w.id.0,
            account: w.account.0,
            address: w.address.clone(),
            amount_sat: w.amount.0,
            fee_sat: w.fee.0,
            idempotency_key: w.idempotency_key.clone(),
            state: match w.status {
                WithdrawalStatus::AwaitingApproval => WithdrawalState::AwaitingApproval,
                // `new`: the hold's answer is being resolved; it may still be refused and the
                // row removed (a caller must not take it for a withdrawal that will be paid).
                WithdrawalStatus::New => WithdrawalState::Unresolved,
                // `releasing`: held until the release's answer is known.
                WithdrawalStatus::Pending | WithdrawalStatus::Releasing => WithdrawalState::Pending,
                WithdrawalStatus::Batched => WithdrawalState::Processing,
                WithdrawalStatus::Completed => WithdrawalState::Completed,
                WithdrawalStatus::Released => WithdrawalState::Released,
                // A state added to the wallet later shows as pending until mapped here.
                _ => WithdrawalState::Pending,
            },
            reason: w.reason.clone(),
            created_ms: w.created_ms,
            txid: txid.map(|t| t.to_string()),
            confirmations,
        }
    }

    fn ensure_regtest(&self) -> Result<(), CustodyError> {
        if self.network == Network::Regtest {
            Ok(())
        } else {
            Err(CustodyError::bad_request(-1002, "only on regtest"))
        }
    }
}

/// An address nobody needs to spend from: blocks mined for maturity or confirmations pay it.
fn throwaway(network: Network) -> Address {
    Address::p2wsh(&ScriptBuf::from_bytes(vec![0x51]), network)
}

impl Custody for WalletCustody {
    fn deposit_address(&self, account: u32, new: bool) -> Result<DepositAddress, CustodyError> {
        let mut s = self.lock();
        let account = AccountId(account);
        if !new {
            match s.deposit_addresses(account) {
                Ok(v) if !v.is_empty() => {
                    return Ok(DepositAddress {
                        address: v[v.len() - 1].clone(),
                        made: false,
                    })
                }
                Ok(_) => {}
                Err(e) => return Err(deposit_address_error(e)),
            }
        }
        s.new_deposit_address(account, system_now())
            .map(|a| DepositAddress {
                address: a.to_string(),
                made: true,
            })
            .map_err(deposit_address_error)
    }

    fn invoice_address(&self, account: u32) -> Result<String, CustodyError> {
        self.lock()
            .new_invoice_address(AccountId(account), system_now())
            .map(|a| a.to_string())
            .map_err(deposit_address_error)
    }

    fn deposits(&self, account: Option<u32>) -> Result<Vec<DepositInfo>, CustodyError> {
        let s = self.lock();
        let required = s.config().deposit_confirmations;
        let deposits = s.deposits(account.map(AccountId)).map_err(internal)?;
        Ok(deposits
            .into_iter()
            .map(|d| {
                // From any transaction the wallet saw: a dropped deposit keeps its address.
                let address = s
                    .output(d.outpoint)
                    .and_then(|out| Address::from_script(&out.script_pubkey, self.network).ok())
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                DepositInfo {
                    account: d.account.0,
                    txid: d.outpoint.txid.to_string(),
                    vout: d.outpoint.vout,
                    amount_sat: d.amount.0,
                    address,
                    state: match d.status {
                        DepositStatus::Pending => DepositState::Pending,
                        DepositStatus::Credited => DepositState::Credited,
                        DepositStatus::Reorged => DepositState::Reorged,
                        DepositStatus::Dropped => DepositState::Dropped,
                        DepositStatus::Reversing | DepositStatus::Reversed => {
                            DepositState::Reversed
                        }
                        // Crediting, crediting again: credited once the answer is known.
                        _ => DepositState::Pending,
                    },
                    confirmations: d.confirmations,
                    required_confirmations: required,
                    seen_ms: d.first_seen_ms,
                }
            })
            .collect())
    }

    fn request_withdrawal(
        &self,
        account: u32,
        address: &str,
        amount_sat: u64,
        idempotency_key: &str,
    ) -> Result<WithdrawalInfo, CustodyError> {
        let now = system_now();
        // The account's Lightning outflow counts in the daily limit and the approval threshold
        // (as on-chain amounts count for a Lightning pay: `OutflowRules`). Lock order: the
        // Lightning store (held while custody decides), then custody.
        let request = |other_used: Amount| {
            let mut s = self.lock();
            let req = WithdrawalRequest {
                account: AccountId(account),
                address: address.to_owned(),
                amount: Amount(amount_sat),
                idempotency_key: idempotency_key.to_owned(),
                other_used,
            };
            let w = s.request_withdrawal(req, now).map_err(withdrawal_error)?;
            Ok(self.withdrawal_info(&s, &w))
        };
        match self.lightning.get() {
            Some(ln) => ln
                .with_day_outflow(AccountId(account), now.as_millis(), request)
                .map_err(internal)?,
            None => request(Amount(0)),
        }
    }

    fn withdrawals(&self, account: Option<u32>) -> Result<Vec<WithdrawalInfo>, CustodyError> {
        let s = self.lock();
        let ws = match account {
            // One account's rows only (indexed), not every account's filtered under the lock.
            Some(a) => s.withdrawals_of(AccountId(a)),
            None => s.withdrawals(),
        }
        .map_err(withdrawal_error)?;
        Ok(self.withdrawal_infos(&s, &ws))
    }

    fn withdrawal_by_key(
        &self,
        account: u32,
        key: &str,
    ) -> Result<Option<WithdrawalInfo>, CustodyError> {
        let s = self.lock();
        let w = s
            .withdrawal_by_key(AccountId(account), key)
            .map_err(withdrawal_error)?;
        Ok(w.map(|w| self.withdrawal_info(&s, &w)))
    }

    fn approve_withdrawal(&self, id: u64) -> Result<WithdrawalInfo, CustodyError> {
        let mut s = self.lock();
        s.approve_withdrawal(WithdrawalId(id))
            .map_err(withdrawal_error)?;
        let w = s
            .withdrawal(WithdrawalId(id))
            .map_err(withdrawal_error)?
            .ok_or_else(|| CustodyError::bad_request(-4030, "unknown withdrawal"))?;
        Ok(self.withdrawal_info(&s, &w))
    }

    fn reject_withdrawal(&self, id: u64, reason: &str) -> Result<WithdrawalInfo, CustodyError> {
        let mut s = self.lock();
        s.reject_withdrawal(WithdrawalId(id), reason)
            .map_err(withdrawal_error)?;
        let w = s
            .withdrawal(WithdrawalId(id))
            .map_err(withdrawal_error)?
            .ok_or_else(|| CustodyError::bad_request(-4030, "unknown withdrawal"))?;
        Ok(self.withdrawal_info(&s, &w))
    }

    fn bump_withdrawal(&self, id: u64, fee_rate_sat_vb: u64) -> Result<BatchSummary, CustodyError> {
        let mut s = self.lock();
        let w = s
            .withdrawal(WithdrawalId(id))
            .map_err(withdrawal_error)?
            .ok_or_else(|| CustodyError::bad_request(-4030, "unknown withdrawal"))?;
        let batch = match (w.status, w.batch_id) {
            (WithdrawalStatus::Batched, Some(b)) => b,
            _ => {
                return Err(CustodyError::bad_request(
                    -4034,
                    "withdrawal is not in a batch in flight",
                ))
            }
        };
        let rate = FeeRate::from_sat_per_vb(fee_rate_sat_vb)
            .ok_or_else(|| CustodyError::bad_request(-1100, "invalid fee rate"))?;
        s.bump_fee(batch, rate, system_now()).map_err(|e| match e {
            BumpError::FeeBudgetExceeded { .. }
            | BumpError::Build { .. }
            | BumpError::NotInFlight(_) => CustodyError::bad_request(-4035, e.to_string()),
            other => internal(other),
        })?;
        let b = s
            .batches()
            .map_err(internal)?
            .into_iter()
            .find(|b| b.id == batch)
            .ok_or_else(|| internal("bumped batch not found"))?;
        Ok(batch_summary(b))
    }

    fn flagged_accounts(&self) -> Result<Vec<FlaggedAccount>, CustodyError> {
        let s = self.lock();
        let debts: std::collections::HashMap<AccountId, Amount> =
            s.debts().map_err(internal)?.into_iter().collect();
        Ok(s.flagged_accounts()
            .map_err(internal)?
            .into_iter()
            .map(|(a, reason)| FlaggedAccount {
                account: a.0,
                reason,
                debt_sat: debts.get(&a).map_or(0, |d| d.0),
            })
            .collect())
    }

    fn clear_flag(&self, account: u32) -> Result<(), CustodyError> {
        self.lock()
            .clear_flag(AccountId(account), system_now())
            .map_err(withdrawal_error)
    }

    fn abandon_batch(&self, batch: u64) -> Result<Vec<u64>, CustodyError> {
        self.lock()
            .abandon_batch(batch, system_now())
            .map(|ids| ids.into_iter().map(|i| i.0).collect())
            .map_err(|e| match e {
                wallet::AbandonError::NotInFlight(_) | wallet::AbandonError::MayConfirm { .. } => {
                    CustodyError::bad_request(-4042, e.to_string())
                }
                other => internal(other),
            })
    }

    fn write_off_debt(&self, account: u32) -> Result<u64, CustodyError> {
        self.lock()
            .write_off_debt(AccountId(account), system_now())
            .map(|a| a.0)
            .map_err(withdrawal_error)
    }

    fn batches(&self) -> Result<Vec<BatchSummary>, CustodyError> {
        Ok(self
            .lock()
            .batches()
            .map_err(internal)?
            .into_iter()
            .map(batch_summary)
            .collect())
    }

    fn reconcile_records(&self) -> Result<RecordsInfo, CustodyError> {
        let r = self.lock().reconcile_records().map_err(internal)?;
        Ok(RecordsInfo {
            deposits_checked: r.deposits_checked,
            withdrawals_checked: r.withdrawals_checked,
            unanswered: r.unanswered,
            mismatches: r
                .mismatches
                .into_iter()
                .map(|m| RecordMismatchInfo {
                    kind: m.kind.to_owned(),
                    subject: m.subject,
                    detail: m.detail,
                })
                .collect(),
        })
    }

    fn clear_alarm(&self, id: u64) -> Result<(), CustodyError> {
        self.lock()
            .clear_alarm(id, system_now())
            .map_err(withdrawal_error)
    }

    fn alarms(&self) -> Result<Vec<AlarmInfo>, CustodyError> {
        Ok(self
            .lock()
            .alarms(false)
            .map_err(internal)?
            .into_iter()
            .map(|a| AlarmInfo {
                id: a.id,
                kind: a.kind,
                subject: a.subject,
                message: a.message,
                at_ms: a.at_ms,
            })
            .collect())
    }

    fn withdrawal_terms(&self) -> (u64, u64) {
        let s = self.lock();
        let p = &s.config().withdrawal;
        (p.flat_fee.0, p.min_amount.0)
    }

    fn prove_reserves(
        &self,
        message: &(dyn Fn(u32, &str) -> Result<String, CustodyError> + Sync),
    ) -> Result<ReservesProofInfo, CustodyError> {
        // Held from before the caller's liabilities snapshot (taken in `message`) until the
        // UTXOs are listed: the step loop credits and completes under this lock, so both
        // sides of the proof are one moment.
        let mut s = self.lock();
        let now = system_now();
        // At the node's tip: sync first (the step loop may be a poll interval behind).
        s.sync_once(now).map_err(|e| {
            tracing::warn!(error = %e, "proof of reserves: sync failed");
            CustodyError::unknown(format!("cannot reach bitcoind: {e}"))
        })?;
        // A batch paid at the tip is completed now: its holds leave the liabilities as its
        // coins left the UTXO set. One still short of its confirmations (or of its ledger
        // answer) makes the two sides disagree: refused until it completes.
        s.process_withdrawals(now).map_err(internal)?;
        if let Some((batch, txid)) = s.confirming_batch().map_err(internal)? {
            return Err(CustodyError::bad_request(
                -1130,
                format!(
                    "withdrawal batch {batch} ({txid}) is in a block but not completed yet: \
                     its coins are spent while its withdrawals are still owed; prove again \
                     once it completes"
                ),
            ));
        }
        let text = message(s.tip_height(), &s.tip_hash().to_string())?;
        let p = s.prove_reserves(&text).map_err(|e| match e {
            wallet::ProveError::NoUtxos => CustodyError::bad_request(-1130, e.to_string()),
            wallet::ProveError::Proof(ref p) if p.code() == "bad_message" => {
                CustodyError::bad_request(-1130, e.to_string())
            }
            e => internal(e),
        })?;
        Ok(ReservesProofInfo {
            network: self.network.to_string(),
            message: text,
            block_hash: p.block_hash.to_string(),
            block_height: p.block_height,
            psbt: p.psbt.serialize(),
            reserves_sat: p.reserves.0,
            utxos: p.utxos,
        })
    }

    fn reconcile(&self) -> Result<ReconcileInfo, CustodyError> {
        let s = self.lock();
        // The Lightning node's money is ours too: its on-chain wallet (provable on chain) and
        // its side of the channels with closing sweeps (not provable by BIP-127), listed apart.
        // Read once: the wallet's total and the breakdown below are the same moment.
        let ln = self.ln_balances.get().map(|l| l.balances());
        let r = match &ln {
            Some(b) => s.reconcile_counting(Amount(ln_total(b))),
            None => s.reconcile(),
        }
        .map_err(internal)?;
        let ln_onchain = ln.map_or(0, |b| b.onchain_sat);
        let ln_channels = ln.map_or(0, |b| b.channels_sat.saturating_add(b.pending_close_sat));
        // The wallet's reconciliation counts them (the same reading).
        let surplus_sat = r.surplus_sat;
        Ok(ReconcileInfo {
            wallet_confirmed_sat: r.wallet_confirmed.0,
            wallet_pending_sat: r.wallet_pending.0,
            uncredited_deposits_sat: r.uncredited_deposits.0,
            withdrawals_in_flight_sat: r
                .withdrawals_in_flight
                .0
                .saturating_add(ln.map_or(0, |b| b.withdrawals_in_flight_sat)),
            ledger_liabilities_sat: r.ledger_liabilities.0,
            fee_income_sat: r.fee_income.0,
            lightning_onchain_sat: ln_onchain,
            lightning_channels_sat: ln_channels,
            surplus_sat,
            shortfall: surplus_sat < 0,
            tip_height: s.tip_height(),
        })
    }

    fn regtest_mine(&self, blocks: u32) -> Result<u32, CustodyError> {
        self.ensure_regtest()?;
        self.rpc
            .generate_to_address(u64::from(blocks), &throwaway(self.network))
            .map_err(internal)?;
        let height = self.rpc.get_block_count().map_err(internal)?;
        Ok(u32::try_from(height).unwrap_or(u32::MAX))
    }

    fn regtest_fund(&self, account: u32) -> Result<u64, CustodyError> {
        self.ensure_regtest()?;
        let address = self.deposit_address(account, false)?.address;
        let address: Address = address
            .parse::<Address<_>>()
            .map_err(internal)?
            .require_network(self.network)
            .map_err(internal)?;
        let hashes = self
            .rpc
            .generate_to_address(1, &address)
            .map_err(internal)?;
        let block = self.rpc.get_block(&hashes[0]).map_err(internal)?;
        let paid: u64 = block.txdata[0]
            .output
            .iter()
            .filter(|o| o.script_pubkey == address.script_pubkey())
            .map(|o| o.value.to_sat())
            .sum();
        // A coinbase can be spent after 100 more blocks: mine them, so the credit is spendable.
        self.rpc
            .generate_to_address(100, &throwaway(self.network))
            .map_err(internal)?;
        Ok(paid)
    }
}

/// Custody's automatic decisions go to the server's audit log, actor `custody`
/// ([`wallet::DecisionLog`]): appended and fsynced before `record` returns.
#[derive(Debug)]
pub struct AuditDecisions(pub AppState);

impl wallet::DecisionLog for AuditDecisions {
    fn record(&self, action: &str, params: &[(&str, String)]) -> Result<(), String> {
        let params: serde_json::Map<String, serde_json::Value> = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(v.as_str())))
            .collect();
        self.0
            .audit_as("custody", action, serde_json::Value::Object(params))
            .map_err(|e| format!("{e:?}"))
    }
}

fn batch_summary(b: wallet::BatchView) -> BatchSummary {
    BatchSummary {
        id: b.id,
        status: b.status,
        created_ms: b.created_ms,
        txids: b.txids.iter().map(|t| t.to_string()).collect(),
        fee_sat: b.fee.0,
        fee_budget_sat: b.fee_budget.0,
        withdrawals: b.withdrawals.iter().map(|w| w.0).collect(),
        confirmed_txid: b.confirmed_txid.map(|t| t.to_string()),
        refusals: b.refusals,
        last_error: b.last_error,
    }
}

fn deposit_address_error(e: wallet::DepositAddressError) -> CustodyError {
    match e {
        wallet::DepositAddressError::UnknownAccount(a) => {
            CustodyError::bad_request(-2015, format!("unknown account {a}"))
        }
        other => internal(other),
    }
}

/// Custody's withdrawal rules for Lightning withdrawals ([`lightning_custody::PayPolicy`]):
/// flagged accounts and the 24-hour limit, Lightning and on-chain amounts together. Weak: the
/// Lightning service must not keep custody alive.
struct OutflowRules(std::sync::Weak<WalletCustody>);

impl lightning_custody::PayPolicy for OutflowRules {
    fn check(
        &self,
        account: AccountId,
        amount: Amount,
        lightning_used: Amount,
        now_ms: u64,
    ) -> Result<(), (i32, String)> {
        let Some(custody) = self.0.upgrade() else {
            return Err((-1000, "custody is stopping".into()));
        };
        let r = custody
            .lock()
            .check_outflow(account, amount, lightning_used, now_ms);
        r.map_err(|e| {
            let e = withdrawal_error(e);
            (e.code, e.msg)
        })
    }
}

/// The Lightning service's alarms as custody alarms ([`lightning_custody::AlarmSink`]): the
/// operator sees them in `mediator alarms` and `/metrics` beside on-chain ones. Weak, as
/// [`OutflowRules`]. Lock order: the Lightning store, then custody (never the reverse).
struct CustodyAlarms(std::sync::Weak<WalletCustody>);

impl lightning_custody::AlarmSink for CustodyAlarms {
    fn raise(&self, kind: &str, subject: &str, message: &str) {
        let Some(custody) = self.0.upgrade() else {
            return;
        };
        let r = custody.lock().raise_alarm(kind, subject, message);
        if let Err(e) = r {
            tracing::error!(error = %e, kind, subject, "could not record a lightning alarm");
        }
    }
}

/// The Lightning node's money as custody's other assets: its on-chain wallet, its side of the
/// channels and closing sweeps ([`wallet::OtherAssets`]).
struct LightningAssets(Arc<dyn LightningBalances>);

impl wallet::OtherAssets for LightningAssets {
    fn sats(&self) -> u64 {
        ln_total(&self.0.balances())
    }
}

#[cfg(test)]
mod tests {
    use super::EngineLedger;
    use matching_engine::config::BTC;
    use matching_engine::{
        AccountId, Amount, Command, EngineConfig, IdempotencyKey, RejectCode, WithdrawalId,
        WithdrawalState,
    };
    use wallet::{Ledger, LedgerError};

    /// The wallet's ledger over the API's core: applied, refused, and the two read-only lookups
    /// (the engine's withdrawal record and credit keys) through the same queue, never journaled.
    #[test]
    fn engine_ledger_answers_three_ways_and_looks_up_through_the_api_core() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state = rt
            .block_on(async {
                api::open_local(
                    dir.path(),
                    EngineConfig::default(),
                    api::ApiConfig::default(),
                )
            })
            .unwrap();
        let ledger = EngineLedger::new(state, rt.handle().clone());
        ledger.submit(Command::CreateAccount).unwrap();
        let alice = AccountId(1);
        assert!(ledger.account_exists(alice));
        let key = IdempotencyKey::reference("deposit-1");
        assert_eq!(ledger.credited(key), Ok(false));
        let credit = Command::Credit {
            account: alice,
            asset: BTC,
            amount: Amount(50_000),
            key,
        };
        ledger.submit(credit.clone()).unwrap();
        ledger.submit(credit).unwrap(); // a duplicate is applied (and changes nothing)
        assert_eq!(ledger.credited(key), Ok(true));
        let hold = Command::WithdrawHold {
            account: alice,
            asset: BTC,
            amount: Amount(20_000),
            fee: Amount(1_000),
            id: WithdrawalId(9),
        };
        ledger.submit(hold.clone()).unwrap();
        assert_eq!(
            ledger.submit(hold),
            Err(LedgerError::Rejected(RejectCode::DuplicateWithdrawal))
        );
        let rec = ledger.withdrawal(WithdrawalId(9)).unwrap().unwrap();
        assert_eq!(
            (rec.account, rec.amount, rec.fee, rec.state),
            (alice, Amount(20_000), Amount(1_000), WithdrawalState::Held)
        );
        assert_eq!(ledger.withdrawal(WithdrawalId(10)), Ok(None));
        ledger
            .submit(Command::WithdrawRelease {
                id: WithdrawalId(9),
            })
            .unwrap();
        assert_eq!(
            ledger.withdrawal(WithdrawalId(9)).unwrap().map(|w| w.state),
            Some(WithdrawalState::Released)
        );
        assert_eq!(ledger.btc_liabilities(), Amount(50_000));
    }

    /// A Lightning node whose balances change on every reading (a payment moving money between
    /// any two readings).
    struct Drifting(std::sync::atomic::AtomicU64);

    impl super::LightningBalances for Drifting {
        fn balances(&self) -> lightning_custody::LnBalances {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            lightning_custody::LnBalances {
                onchain_sat: 1_000 * n,
                channels_sat: 100 * n,
                pending_close_sat: 10 * n,
                anchor_reserve_sat: 0,
                withdrawals_in_flight_sat: 5 * n,
            }
        }
    }

    /// Defect: `reconcile` read the node's balances twice, once in the wallet's total
    /// (`LightningAssets`) and once for the report's breakdown: a payment in between made a
    /// report whose surplus did not add up from its own lines. Read once now. Failed on the old
    /// code (the surplus counted the first reading, the lines showed the second).
    #[test]
    fn a_reconciliation_report_counts_one_reading_of_the_lightning_balances() {
        use api::custody::Custody as _;
        use bdk_bitcoind_rpc::bitcoincore_rpc::{Auth, Client};
        use std::sync::{Arc, Mutex};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state = rt
            .block_on(async {
                api::open_local(
                    &dir.path().join("engine"),
                    EngineConfig::default(),
                    api::ApiConfig::default(),
                )
            })
            .unwrap();
        let ledger = Arc::new(EngineLedger::new(state, rt.handle().clone()));
        ledger.submit(Command::CreateAccount).unwrap();
        let credit = Command::Credit {
            account: AccountId(1),
            asset: BTC,
            amount: Amount(50_000),
            key: IdempotencyKey::reference("deposit-1"),
        };
        ledger.submit(credit).unwrap();
        // Nothing connects: neither opening the wallet nor reconciling asks bitcoind.
        let rpc = wallet::RpcConfig {
            url: "http://127.0.0.1:9".into(),
            auth: wallet::RpcAuth::UserPass {
                user: "u".into(),
                password: "p".into(),
            },
        };
        let cfg = wallet::CustodyConfig::new(
            wallet::bitcoin::Network::Regtest,
            dir.path().join("custody"),
            rpc,
        );
        let service = wallet::CustodyService::open(cfg, ledger).unwrap();
        let client = Client::new("http://127.0.0.1:9", Auth::None).unwrap();
        let custody = Arc::new(super::WalletCustody::new(
            Arc::new(Mutex::new(service)),
            Arc::new(client),
            wallet::bitcoin::Network::Regtest,
        ));
        let node = Arc::new(Drifting(std::sync::atomic::AtomicU64::new(0)));
        custody.count_lightning_assets(node.clone());
        for i in 1..=3u64 {
            let r = custody.reconcile().unwrap();
            let assets = i128::from(r.wallet_confirmed_sat) + i128::from(r.wallet_pending_sat)
                - i128::from(r.uncredited_deposits_sat)
                + i128::from(r.withdrawals_in_flight_sat)
                + i128::from(r.lightning_onchain_sat)
                + i128::from(r.lightning_channels_sat);
            assert_eq!(
                i128::from(r.surplus_sat),
                assets - i128::from(r.ledger_liabilities_sat),
                "the surplus adds up from the report's own lines: {r:?}"
            );
            assert_eq!(r.ledger_liabilities_sat, 50_000);
            assert_eq!(
                node.0.load(std::sync::atomic::Ordering::SeqCst),
                i,
                "one reading per report"
            );
        }
    }
}
