//! The custody boundary: what the API needs from the custody service (deposit addresses,
//! deposits, withdrawals, approvals, reconciliation, and on regtest, mining). The application
//! implements [`Custody`] over the wallet crate; the API never sees keys or bitcoin types, only
//! strings and satoshis.
//!
//! Every method is blocking (the custody service does disk and RPC I/O): handlers call it on
//! tokio's blocking pool.

use serde::Serialize;

/// A deposit's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DepositState {
    /// Seen in the mempool or with fewer confirmations than required; not credited.
    Pending,
    /// Credited to the account.
    Credited,
    /// Credited, then removed from the chain by a reorg; the account is flagged.
    Reorged,
    /// Credited, then double-spent: the credit was taken back from the account (what its
    /// balance held; the rest is its debt, paid by its next deposits).
    Reversed,
    /// Seen, never credited, and its transaction left the mempool unconfirmed (replaced by a
    /// fee bump, or double-spent): not a payment on its way. Pending again if it comes back.
    Dropped,
}

/// A deposit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DepositInfo {
    /// Beneficiary account.
    pub account: u32,
    /// Transaction id (hex).
    pub txid: String,
    /// Output index.
    pub vout: u32,
    /// Amount in satoshis.
    pub amount_sat: u64,
    /// The deposit address paid.
    pub address: String,
    /// State.
    pub state: DepositState,
    /// Confirmations now.
    pub confirmations: u32,
    /// Confirmations required for the credit.
    pub required_confirmations: u32,
    /// When first seen, ms since the epoch.
    pub seen_ms: u64,
}

/// A withdrawal's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WithdrawalState {
    /// Recorded, its ledger hold not known yet (the engine's answer was lost or not given):
    /// it may still be refused, and the record then removed (its key free again). Not a
    /// withdrawal that will be paid until it leaves this state.
    Unresolved,
    /// Held, waiting for an operator's approval.
    AwaitingApproval,
    /// Held, waiting for the next batch.
    Pending,
    /// In a signed (broadcast) batch transaction.
    Processing,
    /// Paid and confirmed.
    Completed,
    /// Given back to the account (see `reason`).
    Released,
}

/// A withdrawal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WithdrawalInfo {
    /// Id.
    pub id: u64,
    /// Owner.
    pub account: u32,
    /// Destination address.
    pub address: String,
    /// Amount paid out, satoshis.
    pub amount_sat: u64,
    /// Flat fee charged to the account, satoshis.
    pub fee_sat: u64,
    /// The caller's idempotency key (Binance's `withdrawOrderId`).
    pub idempotency_key: String,
    /// State.
    pub state: WithdrawalState,
    /// Why it was released, if it was.
    pub reason: Option<String>,
    /// When requested, ms since the epoch.
    pub created_ms: u64,
    /// The paying transaction, once batched.
    pub txid: Option<String>,
    /// Confirmations of the paying transaction.
    pub confirmations: u32,
}

/// Wallet assets against ledger liabilities, in satoshis.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReconcileInfo {
    /// Confirmed wallet balance.
    pub wallet_confirmed_sat: u64,
    /// Unconfirmed and immature wallet balance.
    pub wallet_pending_sat: u64,
    /// Deposits in the wallet not yet credited.
    pub uncredited_deposits_sat: u64,
    /// Withdrawals that left the wallet (on-chain batches) or may be on their way (Lightning
    /// payments not final) but are not completed in the ledger.
    pub withdrawals_in_flight_sat: u64,
    /// All BTC balances in the ledger (held included).
    pub ledger_liabilities_sat: u64,
    /// Withdrawal fee income kept by the exchange.
    pub fee_income_sat: u64,
    /// The Lightning node's on-chain wallet (0 without a node); counted in `surplus_sat`.
    pub lightning_onchain_sat: u64,
    /// The Lightning node's side of its channels and closing sweeps (0 without a node); counted
    /// in `surplus_sat`, but not provable on chain (BIP-127): listed apart.
    pub lightning_channels_sat: u64,
    /// Assets minus liabilities (negative: shortfall).
    pub surplus_sat: i64,
    /// True on a shortfall.
    pub shortfall: bool,
    /// Chain height the wallet has synced to.
    pub tip_height: u32,
}

/// An account flagged for review (a credited deposit left the chain): it cannot withdraw until
/// an operator clears it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlaggedAccount {
    /// The account.
    pub account: u32,
    /// Why.
    pub reason: String,
    /// What the account owes custody (sat): reversals of double-spent deposits its balance
    /// could not cover, less what its later deposits paid. Its next deposits pay it first.
    pub debt_sat: u64,
}

/// A withdrawal batch, for operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BatchSummary {
    /// Batch id.
    pub id: u64,
    /// `inflight`, `confirmed` or `alarm`.
    pub status: String,
    /// When signed, ms since the epoch.
    pub created_ms: u64,
    /// Its transactions (hex), the original first, then fee bumps.
    pub txids: Vec<String>,
    /// Network fee of the newest transaction, satoshis.
    pub fee_sat: u64,
    /// The most a fee bump may pay: the sum of its withdrawals' flat fees, satoshis.
    pub fee_budget_sat: u64,
    /// Its withdrawals.
    pub withdrawals: Vec<u64>,
    /// The transaction that confirmed.
    pub confirmed_txid: Option<String>,
    /// Times in a row the node refused it.
    pub refusals: u32,
    /// The node's last refusal.
    pub last_error: Option<String>,
}

/// One record that differs between custody and the ledger or the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecordMismatchInfo {
    /// Stable kind, e.g. `deposit_missing_in_ledger`.
    pub kind: String,
    /// Which record: `deposit TXID:VOUT` or `withdrawal ID`.
    pub subject: String,
    /// What differs.
    pub detail: String,
}

/// The two-sided reconciliation of the records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecordsInfo {
    /// Deposits compared.
    pub deposits_checked: usize,
    /// Completed withdrawals compared.
    pub withdrawals_checked: usize,
    /// Ledger queries that got no answer.
    pub unanswered: usize,
    /// Every mismatch.
    pub mismatches: Vec<RecordMismatchInfo>,
}

/// Something an operator must look at (money moved in one place and not the other, a request
/// that cannot be funded, a batch the node refuses, a reconciliation mismatch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AlarmInfo {
    /// Id.
    pub id: u64,
    /// Stable kind, e.g. `withdrawal_not_completed`.
    pub kind: String,
    /// What it is about, e.g. `withdrawal 7`.
    pub subject: String,
    /// Details.
    pub message: String,
    /// When raised, ms since the epoch.
    pub at_ms: u64,
}

/// A signed BIP-127 proof of reserves over the custody wallet's UTXOs (`reserves::por`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservesProofInfo {
    /// `bitcoin`, `testnet`, `signet` or `regtest`.
    pub network: String,
    /// The message the proof commits to.
    pub message: String,
    /// The block the UTXOs are taken at, hex.
    pub block_hash: String,
    /// Its height.
    pub block_height: u32,
    /// The finalized proof PSBT, serialized (BIP-174 bytes).
    pub psbt: Vec<u8>,
    /// The UTXOs' sum, satoshis.
    pub reserves_sat: u64,
    /// How many UTXOs.
    pub utxos: usize,
}

/// A refusal or failure of the custody service. `code` is a Binance-style error code (negative)
/// and `status` the HTTP status to answer with; `msg` is safe to show to the caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg} ({code})")]
#[non_exhaustive]
pub struct CustodyError {
    /// Binance-style error code.
    pub code: i32,
    /// HTTP status.
    pub status: u16,
    /// Message for the caller.
    pub msg: String,
}

impl CustodyError {
    /// A refusal of bad input (HTTP 400).
    pub fn bad_request(code: i32, msg: impl Into<String>) -> Self {
        Self {
            code,
            status: 400,
            msg: msg.into(),
        }
    }
    /// The outcome is unknown (HTTP 503, `-1007`): the request is recorded and custody resolves
    /// it; the caller asks again (the same idempotency key) to learn the outcome.
    pub fn unknown(msg: impl Into<String>) -> Self {
        Self {
            code: -1007,
            status: 503,
            msg: msg.into(),
        }
    }
    /// This custody does not offer the operation (HTTP 503, `-1001`).
    pub fn not_supported() -> Self {
        Self {
            code: -1001,
            status: 503,
            msg: "not supported by this custody service".into(),
        }
    }
    /// An internal failure (HTTP 500, Binance's -1001 style); details go to the log, not here.
    pub fn internal(msg: impl Into<String>) -> Self {
        Self {
            code: -1001,
            status: 500,
            msg: msg.into(),
        }
    }
}

/// Custody's code for a withdrawal idempotency key the account already used (`-4029`,
/// HTTP 400): nothing was requested. A caller that may have sent the key before (a retry after
/// a lost answer) asks [`Custody::withdrawal_by_key`] for the withdrawal under it and compares.
pub const DUPLICATE_WITHDRAWAL_KEY: i32 = -4029;

impl std::fmt::Debug for dyn Custody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Custody")
    }
}

/// A deposit address, and whether the call that answered it made it (an address the wallet
/// watches for good: the caller audits it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepositAddress {
    /// The address.
    pub address: String,
    /// Made by this call (a new one, or the account's first, made on first use).
    pub made: bool,
}

/// The custody service as the API sees it.
pub trait Custody: Send + Sync + 'static {
    /// The account's current deposit address (made on first use), or a new one when `new`;
    /// old addresses keep working.
    fn deposit_address(&self, account: u32, new: bool) -> Result<DepositAddress, CustodyError>;
    /// A new address for one merchant invoice of `account`: payments to it are credited to the
    /// account like deposits, but it is never returned by [`deposit_address`](Self::deposit_address).
    /// The default hands out a new deposit address (for custody that has no such distinction).
    fn invoice_address(&self, account: u32) -> Result<String, CustodyError> {
        self.deposit_address(account, true).map(|a| a.address)
    }
    /// Deposits, of one account or all.
    fn deposits(&self, account: Option<u32>) -> Result<Vec<DepositInfo>, CustodyError>;
    /// Requests a withdrawal of `amount_sat` to `address`, idempotent by `idempotency_key`
    /// (a repeated key is refused). Validated and held at once; paid by a later batch.
    fn request_withdrawal(
        &self,
        account: u32,
        address: &str,
        amount_sat: u64,
        idempotency_key: &str,
    ) -> Result<WithdrawalInfo, CustodyError>;
    /// Withdrawals, of one account or all.
    fn withdrawals(&self, account: Option<u32>) -> Result<Vec<WithdrawalInfo>, CustodyError>;
    /// The withdrawal of `account` under the idempotency key `key`, if any (keys are per
    /// account: another account's withdrawal under the same key is never answered). A look-up
    /// of one record, not a scan of the withdrawals: callers reach it from public endpoints.
    fn withdrawal_by_key(
        &self,
        account: u32,
        key: &str,
    ) -> Result<Option<WithdrawalInfo>, CustodyError>;
    /// Approves a withdrawal that waits for approval.
    fn approve_withdrawal(&self, id: u64) -> Result<WithdrawalInfo, CustodyError>;
    /// Refuses a withdrawal that is not batched yet: the hold is given back, with `reason`.
    fn reject_withdrawal(&self, id: u64, reason: &str) -> Result<WithdrawalInfo, CustodyError> {
        let _ = (id, reason);
        Err(CustodyError::not_supported())
    }
    /// Replaces the transaction of the batch paying withdrawal `id` with one paying
    /// `fee_rate_sat_vb` (RBF), within the batch's flat fees; the batch afterwards.
    fn bump_withdrawal(&self, id: u64, fee_rate_sat_vb: u64) -> Result<BatchSummary, CustodyError> {
        let _ = (id, fee_rate_sat_vb);
        Err(CustodyError::not_supported())
    }
    /// Accounts flagged for review.
    fn flagged_accounts(&self) -> Result<Vec<FlaggedAccount>, CustodyError> {
        Err(CustodyError::not_supported())
    }
    /// Whether `account` is flagged for review (its funds may not leave it). A custody that
    /// keeps no flags ([`flagged_accounts`](Self::flagged_accounts) not supported) flags none.
    fn is_flagged(&self, account: u32) -> Result<bool, CustodyError> {
        match self.flagged_accounts() {
            Ok(v) => Ok(v.iter().any(|f| f.account == account)),
            Err(e) if e == CustodyError::not_supported() => Ok(false),
            Err(e) => Err(e),
        }
    }
    /// Clears an account's flag: it may withdraw again.
    fn clear_flag(&self, account: u32) -> Result<(), CustodyError> {
        let _ = account;
        Err(CustodyError::not_supported())
    }
    /// Abandons a batch in flight that can never confirm (its inputs double-spent): its
    /// withdrawals go out in the next batch, which spends the abandoned one's unspent inputs.
    /// The withdrawals put back.
    fn abandon_batch(&self, batch: u64) -> Result<Vec<u64>, CustodyError> {
        let _ = batch;
        Err(CustodyError::not_supported())
    }
    /// Writes an account's debt to custody off (the exchange bears it); what was written off,
    /// in sat.
    fn write_off_debt(&self, account: u32) -> Result<u64, CustodyError> {
        let _ = account;
        Err(CustodyError::not_supported())
    }
    /// Withdrawal batches, newest first.
    fn batches(&self) -> Result<Vec<BatchSummary>, CustodyError> {
        Err(CustodyError::not_supported())
    }
    /// Two-sided reconciliation of the records (every credited deposit and completed withdrawal
    /// against the ledger and the chain); each mismatch by id. Raises an alarm per mismatch.
    fn reconcile_records(&self) -> Result<RecordsInfo, CustodyError> {
        Err(CustodyError::not_supported())
    }
    /// Alarms not cleared, oldest first.
    fn alarms(&self) -> Result<Vec<AlarmInfo>, CustodyError> {
        Err(CustodyError::not_supported())
    }
    /// Clears an alarm an operator dealt with.
    fn clear_alarm(&self, id: u64) -> Result<(), CustodyError> {
        let _ = id;
        Err(CustodyError::not_supported())
    }
    /// The flat withdrawal fee and the minimum amount, satoshis.
    fn withdrawal_terms(&self) -> (u64, u64);
    /// Syncs to the node's tip, completes the withdrawals paid there, and signs a BIP-127 proof
    /// of reserves over the UTXO set at that block; `message(height, block_hash_hex)` gives
    /// the message for that block (the caller names the block in it). `message` is called
    /// under custody's lock, after the sync and before the UTXOs are listed, with nothing
    /// crediting a deposit or completing a withdrawal until the proof is signed: the caller
    /// takes its liabilities snapshot inside it, so both sides are one moment (a deposit
    /// credited in between would count as reserves with no liability standing for it). Its
    /// error is returned as is, nothing signed. The wallet's keys sign; nothing else changes.
    fn prove_reserves(
        &self,
        message: &(dyn Fn(u32, &str) -> Result<String, CustodyError> + Sync),
    ) -> Result<ReservesProofInfo, CustodyError> {
        let _ = message;
        Err(CustodyError::not_supported())
    }
    /// Wallet assets against ledger liabilities.
    fn reconcile(&self) -> Result<ReconcileInfo, CustodyError>;
    /// Regtest only: mines `blocks` blocks (to a throwaway address); the new tip height.
    fn regtest_mine(&self, blocks: u32) -> Result<u32, CustodyError>;
    /// Regtest only: mines a block paying its coinbase to the account's deposit address and
    /// enough blocks after it for the coinbase to mature and the deposit to be credited; the
    /// amount paid, satoshis.
    fn regtest_fund(&self, account: u32) -> Result<u64, CustodyError>;
}
