//! Configuration of the custody service. Plain data; the application fills it from its own config
//! and environment.

use crate::keys::Passphrase;
use bdk_wallet::bitcoin::{FeeRate, Network};
use matching_engine::units::Amount;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// How to authenticate to bitcoind's RPC.
#[derive(Clone)]
#[non_exhaustive]
pub enum RpcAuth {
    /// bitcoind's `.cookie` file; read again on every (re)connect, so a restarted node is found.
    CookieFile(PathBuf),
    /// `rpcuser` / `rpcpassword`.
    UserPass {
        /// User.
        user: String,
        /// Password (redacted in `Debug`).
        password: String,
    },
}

impl fmt::Debug for RpcAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RpcAuth::CookieFile(p) => f.debug_tuple("CookieFile").field(p).finish(),
            RpcAuth::UserPass { user, .. } => f
                .debug_struct("UserPass")
                .field("user", user)
                .field("password", &"[redacted]")
                .finish(),
        }
    }
}

/// Where bitcoind's RPC is.
#[derive(Clone, Debug)]
pub struct RpcConfig {
    /// URL, e.g. `http://127.0.0.1:18443`.
    pub url: String,
    /// Authentication.
    pub auth: RpcAuth,
}

/// Rules for withdrawal requests.
#[derive(Clone, Debug)]
pub struct WithdrawalPolicy {
    /// Flat fee charged to the user per withdrawal, in sats. The network fee share of a withdrawal
    /// never exceeds it; the rest is the exchange's income (account 0).
    pub flat_fee: Amount,
    /// Smallest amount a user may withdraw, in sats (the dust limit of the destination applies too).
    pub min_amount: Amount,
    /// Largest total an account may withdraw in any 24 hours, in sats (released requests excluded).
    pub daily_limit: Amount,
    /// A request wait for [`approve_withdrawal`](crate::CustodyService::approve_withdrawal) when
    /// the account's running 24-hour total (this request and every one not released in the 24
    /// hours before it) passes this amount, in sats.
    pub approval_threshold: Amount,
    /// The hot wallet's exchange-wide 24-hour limit, in sats: a request that brings the total of
    /// all accounts' requests in 24 hours (released ones excluded) above it waits for approval.
    pub hot_wallet_daily_limit: Amount,
    /// A file of denied destination addresses, one a line (`#` starts a comment).
    pub deny_list: Option<PathBuf>,
}

impl Default for WithdrawalPolicy {
    fn default() -> Self {
        Self {
            flat_fee: Amount(10_000),
            min_amount: Amount(10_000),
            daily_limit: Amount(10 * 100_000_000),
            approval_threshold: Amount(100_000_000),
            hot_wallet_daily_limit: Amount(50 * 100_000_000),
            deny_list: None,
        }
    }
}

/// When and how withdrawals are batched.
#[derive(Clone, Debug)]
pub struct BatchPolicy {
    /// A batch is made when the oldest pending request has waited this long...
    pub interval: Duration,
    /// ...or when this many requests are pending. Also the most a batch pays.
    pub max_requests: usize,
    /// Confirmation target for `estimatesmartfee`.
    pub confirmation_target: u16,
    /// Fee rate used when the node has no estimate (as on regtest).
    pub fallback_fee_rate: FeeRate,
    /// No batch is made while the ledger owes more than the wallet holds by more than this (a
    /// reconciliation shortfall, [`Reconciliation`](crate::Reconciliation)): requests wait,
    /// held in the ledger, under the alarm `reconciliation_shortfall`. 0 by default: any
    /// shortfall holds payouts back until it is covered, or accepted with a larger tolerance.
    pub shortfall_tolerance: Amount,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            max_requests: 100,
            confirmation_target: 6,
            fallback_fee_rate: FeeRate::from_sat_per_vb_u32(2),
            shortfall_tolerance: Amount(0),
        }
    }
}

/// Everything the custody service needs.
#[derive(Clone, Debug)]
pub struct CustodyConfig {
    /// The chain. A key or wallet database of another network is a startup error.
    pub network: Network,
    /// Holds `wallet.secret` (mode 0600) and `wallet.sqlite`.
    pub data_dir: PathBuf,
    /// bitcoind RPC.
    pub rpc: RpcConfig,
    /// Optional BIP39 passphrase: the seed is derived from mnemonic and passphrase, so the secret
    /// file alone cannot spend.
    pub passphrase: Option<Passphrase>,
    /// Confirmations before a deposit is credited (at least 1).
    pub deposit_confirmations: u32,
    /// Confirmations before a withdrawal batch completes its withdrawals in the ledger (at least 1).
    pub withdrawal_confirmations: u32,
    /// How often [`Runner`](crate::Runner) runs a step.
    pub poll_interval: Duration,
    /// Blocks below this height are not fetched (the wallet's birthday; 0 on regtest). Used only
    /// while the wallet has not synced past it.
    pub sync_start_height: u32,
    /// Withdrawal rules.
    pub withdrawal: WithdrawalPolicy,
    /// Batching rules.
    pub batch: BatchPolicy,
}

impl CustodyConfig {
    /// A configuration with defaults: 1 deposit confirmation on regtest, 3 elsewhere; 1 withdrawal
    /// confirmation; a 5-second poll.
    pub fn new(network: Network, data_dir: impl Into<PathBuf>, rpc: RpcConfig) -> Self {
        let deposit_confirmations = if network == Network::Regtest { 1 } else { 3 };
        Self {
            network,
            data_dir: data_dir.into(),
            rpc,
            passphrase: None,
            deposit_confirmations,
            withdrawal_confirmations: 1,
            poll_interval: Duration::from_secs(5),
            sync_start_height: 0,
            withdrawal: WithdrawalPolicy::default(),
            batch: BatchPolicy::default(),
        }
    }
}
