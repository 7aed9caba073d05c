//! [`LightningService`]: the node, its records and the ledger, one step at a time.

use crate::config::LightningConfig;
use crate::error::{InvoiceError, OpenError, OperatorError, PayError};
use crate::store::{
    LnDeposit, LnWithdrawal, LnWithdrawalStatus as S, NewWithdrawal, Reader, Store, StoreError,
};
use crate::{deposit_key, engine_withdrawal_id, seed};
use ldk_node::bitcoin::hashes::Hash;
use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::config::Config;
use ldk_node::lightning::chain::channelmonitor::BalanceSource;
use ldk_node::lightning::ln::msgs::SocketAddress;
use ldk_node::lightning::routing::router::RouteParametersConfig;
use ldk_node::lightning_invoice::{Bolt11Invoice, Bolt11InvoiceDescription, Currency, Description};
use ldk_node::lightning_types::payment::PaymentHash;
use ldk_node::payment::{PaymentDetails, PaymentDirection, PaymentStatus};
use ldk_node::{
    Builder, Event, LightningBalance, Node, NodeError, PendingSweepBalance, UserChannelId,
};
use matching_engine::config::BTC;
use matching_engine::{AccountId, Amount, Command, RejectCode, WithdrawalState};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use wallet::{Ledger, LedgerError};

/// What one [`LightningService::step`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Deposits credited (payment hashes).
    pub credited: Vec<[u8; 32]>,
    /// Withdrawals completed (row ids).
    pub completed: Vec<u64>,
    /// Withdrawals released (row ids).
    pub released: Vec<u64>,
}

/// The node's money, as reconciliation counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LnBalances {
    /// The node's on-chain wallet (provable on chain like the custody wallet's).
    pub onchain_sat: u64,
    /// Our side of the channels (claimable on close; not provable by BIP-127), without what a
    /// close already paid to the node's wallet, which `onchain_sat` counts from the mempool on:
    /// a cooperative close (its balance before and after the closing transaction confirms)
    /// and a channel no longer open whose closing transaction is not yet in a block. A
    /// force-closed channel's commitment in the mempool is then counted nowhere until it
    /// confirms: assets are understated for a block or so (a shortfall shown, the safe side),
    /// never counted twice.
    pub channels_sat: u64,
    /// Funds from closed channels the node will sweep to its wallet and has not broadcast
    /// yet. A sweep broadcast or confirmed pays the wallet, which counts it (not here too).
    pub pending_close_sat: u64,
    /// Part of `onchain_sat` kept as the anchor channels' reserve.
    pub anchor_reserve_sat: u64,
    /// Amount plus fee of the withdrawals whose payment may be on its way, out of
    /// `channels_sat` (`sending`, `completing`; held in the ledger): ours until they complete,
    /// as an on-chain batch in flight is. Counted so that a payment in flight (its routing fee is capped at its fee) is
    /// never a shortfall. Read from the store after the node's balances.
    pub withdrawals_in_flight_sat: u64,
}

impl LnBalances {
    /// All of it, satoshis (checked).
    pub fn total_sat(&self) -> Option<u64> {
        self.onchain_sat
            .checked_add(self.channels_sat)?
            .checked_add(self.pending_close_sat)?
            .checked_add(self.withdrawals_in_flight_sat)
    }
}

/// A channel, for `mediator ln channels`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelView {
    /// Our id for it (`ln close` takes it).
    pub user_channel_id: u128,
    /// The peer.
    pub counterparty: String,
    /// Capacity.
    pub capacity_sat: u64,
    /// What we can send now.
    pub outbound_msat: u64,
    /// What we can receive now.
    pub inbound_msat: u64,
    /// Funding confirmed and the channel is ready.
    pub ready: bool,
    /// Ready and the peer is connected.
    pub usable: bool,
    /// We opened it.
    pub outbound: bool,
}

/// Mediator's Lightning node and its two user products (see the crate docs).
pub struct LightningService<L: Ledger> {
    node: Node,
    store: Mutex<Store>,
    /// The store read without its lock (see [`Reader`]): the withdrawals in flight that
    /// [`balances`](Self::balances) counts, under custody's lock.
    reader: Mutex<Reader>,
    ledger: L,
    cfg: LightningConfig,
    policy: std::sync::OnceLock<std::sync::Arc<dyn PayPolicy>>,
    alarms: std::sync::OnceLock<std::sync::Arc<dyn AlarmSink>>,
    /// When the next sweep of open deposits through the node's payment store is due (ms).
    next_sweep_ms: AtomicU64,
    /// Bumped (and waiters woken) whenever a withdrawal reaches a final state in `step`.
    settled: tokio::sync::watch::Sender<u64>,
    /// When this service started, seconds since the epoch: a withdrawal in doubt is released
    /// by height only once the node has followed the chain since then.
    started_s: u64,
}

/// Where the service's alarms go (money that moved in one place and not the other): in
/// `mediator serve`, custody's alarm table, the one the operator sees in `mediator alarms`, the
/// admin API and `/metrics` (`mediator_custody_alarms`), beside on-chain reconciliation's. An
/// alarm is raised once per `(kind, subject)` until an operator clears it. Without a sink the
/// alarm is only logged (`target: "mediator_alarm"`, always logged too).
pub trait AlarmSink: Send + Sync {
    /// Raises an alarm of a stable `kind` about `subject` (e.g. `lightning payment <hash>`).
    fn raise(&self, kind: &str, subject: &str, message: &str);
}

/// How often [`LightningService::step`] looks every open deposit up in the node's payment store
/// (a payment whose event was lost); the node's events are handled at every step.
pub const OPEN_DEPOSIT_SWEEP_MS: u64 = 10_000;

/// Open deposits read per page of the sweep (the store's lock is held for one page's read).
const SWEEP_PAGE: usize = 256;

/// Custody's withdrawal rules that a Lightning withdrawal obeys too: the caller (`mediator
/// serve`: the on-chain custody service) refuses a flagged account and counts Lightning amounts
/// in the same 24-hour limit as on-chain ones. Without it, money out over Lightning would skip
/// every rule custody applies to money out on chain.
pub trait PayPolicy: Send + Sync {
    /// Refuses (`Err((code, reason))`, the API code) a withdrawal of `amount` by `account` when
    /// `lightning_used` was already sent over Lightning in the last 24 hours.
    fn check(
        &self,
        account: AccountId,
        amount: Amount,
        lightning_used: Amount,
        now_ms: u64,
    ) -> Result<(), (i32, String)>;
}

/// How many blocks a withdrawal in doubt stays held at least after the height it was found at
/// ([`LightningService::resolve_unrecorded`]): the longest CLTV delta a route of ours may have
/// (LDK's default cap, which `pay` keeps; it includes the payee's final delta), and a day of
/// blocks for a timeout transaction to confirm if the channel had to close. A channel balance
/// that still names the payment keeps it held past that.
pub const IN_DOUBT_BLOCKS: u32 =
    ldk_node::lightning::routing::router::DEFAULT_MAX_TOTAL_CLTV_EXPIRY_DELTA + 144;

/// 24 hours, the withdrawal limit's window.
const DAY_MS: u64 = 24 * 60 * 60 * 1000;

impl<L: Ledger> std::fmt::Debug for LightningService<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LightningService")
            .field("node_id", &self.node.node_id())
            .field("network", &self.cfg.network)
            .finish_non_exhaustive()
    }
}

fn hash_bytes(h: &PaymentHash) -> [u8; 32] {
    h.0
}

/// [`LightningService::outcome`] of a withdrawal sent after an attempt that failed with its
/// record last updated at `prior_failed_s` (`None`: the first attempt), from the node's
/// `record` of the invoice. A withdrawal `in_doubt` (see
/// [`LightningService::resolve_unrecorded`]) takes no failed record for its end: it may be the
/// one the refused second send left, while the first send is still on its way.
fn outcome_of(
    prior_failed_s: Option<u64>,
    in_doubt: bool,
    record: Option<&PaymentDetails>,
) -> Outcome {
    match record {
        None => Outcome::Unrecorded,
        Some(p) if p.direction != PaymentDirection::Outbound => Outcome::NotOurs,
        Some(p) => match p.status {
            PaymentStatus::Pending => Outcome::Pending,
            PaymentStatus::Succeeded => Outcome::Succeeded {
                fee_paid_msat: p.fee_paid_msat,
            },
            PaymentStatus::Failed
                if in_doubt || prior_failed_s.is_some_and(|t| p.latest_update_timestamp <= t) =>
            {
                Outcome::Unrecorded
            }
            PaymentStatus::Failed => Outcome::Failed,
        },
    }
}

/// What the node's payment store says of one withdrawal's attempt
/// ([`LightningService::outcome`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// No record of this attempt (none at all, or an earlier attempt's failure).
    Unrecorded,
    /// An inbound payment under this hash: not a withdrawal's.
    NotOurs,
    Pending,
    Succeeded {
        fee_paid_msat: Option<u64>,
    },
    /// This attempt failed: nothing is in flight.
    Failed,
}

fn ceil_sat(msat: u64) -> u64 {
    msat.div_ceil(1000)
}

/// How long after its expiry [`LightningService::step`] still looks an open deposit up in the
/// node's payment store (a payment whose event was lost); [`LightningService::resolve_pending`]
/// (start-up) looks at all of them. The node takes a payment up to two hours past an invoice's
/// expiry (LDK's margin, counted in block-header time, which may run up to two hours ahead of
/// the clock), so six hours.
pub const OPEN_DEPOSIT_GRACE_MS: u64 = 6 * 3_600_000;

/// What [`LightningService::credit`] made of a received payment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Receipt {
    /// Credited now.
    Credited,
    /// Nothing left that the node's event is needed for: credited before, recorded as received
    /// (retried from our store), or not ours to credit (an alarm said so).
    Kept,
    /// Nothing of ours records it (the store could not be read or written): the event that
    /// brought it must not be acknowledged.
    Unrecorded,
}

/// The longest BOLT11 description (the tagged field holds 639 bytes).
pub const MAX_DESCRIPTION_BYTES: usize = 639;

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl<L: Ledger> LightningService<L> {
    /// Loads (or creates) the seed, builds and starts the node on bitcoind RPC, and opens the
    /// records. Resolve left-over withdrawals with [`step`](Self::step) before serving.
    pub fn open(cfg: LightningConfig, ledger: L) -> Result<Self, OpenError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| OpenError::Dir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        let (seed, created) = seed::load_or_create(&cfg.seed_dir)?;
        if created {
            tracing::info!(dir = %cfg.seed_dir.display(), "created the lightning seed");
        }
        let mut config = Config {
            network: cfg.network,
            storage_dir_path: cfg.data_dir.join("ldk").to_string_lossy().into_owned(),
            listening_addresses: Some(vec![SocketAddress::from(cfg.listen)]),
            ..Default::default()
        };
        if !cfg.anchor_channels {
            config.anchor_channels_config = None;
        }
        let mut builder = Builder::from_config(config);
        builder.set_entropy_seed_bytes(seed.0);
        drop(seed);
        builder.set_chain_source_bitcoind_rpc(
            cfg.rpc.host.clone(),
            cfg.rpc.port,
            cfg.rpc.user.clone(),
            cfg.rpc.password.clone(),
        );
        builder.set_custom_logger(std::sync::Arc::new(crate::node_log::NodeLog::new(
            cfg.network,
        )));
        let node = builder.build().map_err(OpenError::Build)?;
        node.start().map_err(|source| OpenError::Start {
            listen: cfg.listen,
            source,
        })?;
        let store = Store::open(&cfg.data_dir)?;
        let reader = Reader::open(&cfg.data_dir)?;
        tracing::info!(node_id = %node.node_id(), listen = %cfg.listen, "lightning node started");
        Ok(Self {
            node,
            store: Mutex::new(store),
            reader: Mutex::new(reader),
            ledger,
            cfg,
            policy: std::sync::OnceLock::new(),
            alarms: std::sync::OnceLock::new(),
            next_sweep_ms: AtomicU64::new(0),
            settled: tokio::sync::watch::channel(0).0,
            started_s: crate::runner::now_ms() / 1000,
        })
    }

    /// Sends every later alarm to `sink` as well as to the log ([`AlarmSink`]); false when one
    /// is set already.
    pub fn set_alarms(&self, sink: std::sync::Arc<dyn AlarmSink>) -> bool {
        self.alarms.set(sink).is_ok()
    }

    /// An alarm: logged (`mediator_alarm`) and raised in the sink, if any.
    fn alarm(&self, kind: &str, subject: &str, message: &str) {
        tracing::error!(target: "mediator_alarm", kind, subject, message, "lightning alarm");
        if let Some(sink) = self.alarms.get() {
            sink.raise(kind, subject, message);
        }
    }

    /// Sets custody's withdrawal rules ([`PayPolicy`]) every later withdrawal obeys; false when
    /// one is set already.
    pub fn set_policy(&self, policy: std::sync::Arc<dyn PayPolicy>) -> bool {
        self.policy.set(policy).is_ok()
    }

    /// Runs `f` with what `account` sent over Lightning in the 24 hours before `now_ms` (its
    /// withdrawals not refused or released, as the pay path counts them for [`PayPolicy`]),
    /// the store locked meanwhile: no payment slips in between the count and what `f` decides.
    /// For custody's on-chain withdrawals, which count Lightning amounts in the same daily limit
    /// and approval threshold. Lock order: the Lightning store, then whatever `f` locks (custody),
    /// as in `pay`; `f` must never call back into this service.
    pub fn with_day_outflow<R>(
        &self,
        account: AccountId,
        now_ms: u64,
        f: impl FnOnce(Amount) -> R,
    ) -> Result<R, StoreError> {
        let store = self.lock();
        let used = store.withdrawn_since(account.0, now_ms.saturating_sub(DAY_MS))?;
        let r = f(Amount(used));
        drop(store);
        Ok(r)
    }

    /// Stops the node (channel state is persisted by ldk-node as it goes).
    pub fn stop(&self) {
        if let Err(e) = self.node.stop() {
            tracing::warn!(error = %e, "stopping the lightning node");
        }
    }

    /// The node (for the operator's commands and tests).
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The configuration.
    pub fn config(&self) -> &LightningConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- deposits -------------------------------------------------------------------------

    /// A BOLT11 invoice for `amount` to `account`, credited once when paid.
    pub fn deposit_invoice(
        &self,
        account: AccountId,
        amount: Amount,
        now_ms: u64,
    ) -> Result<LnDeposit, InvoiceError> {
        if amount < self.cfg.min_deposit {
            return Err(InvoiceError::BelowMinimum {
                amount_sat: amount.0,
                min_sat: self.cfg.min_deposit.0,
            });
        }
        if amount > self.cfg.max_deposit {
            return Err(InvoiceError::AboveMaximum {
                amount_sat: amount.0,
                max_sat: self.cfg.max_deposit.0,
            });
        }
        let description = format!("Mediator deposit to account {}", account.0);
        self.receive(
            account,
            amount,
            &description,
            self.cfg.invoice_expiry_secs,
            now_ms,
        )
    }

    /// A merchant invoice's BOLT11 part: an invoice for `amount` to the merchant's `account`,
    /// expiring after `expiry_secs` (the caller passes what is left of the merchant invoice's
    /// lifetime, rounded down; the node still takes a payment up to about two hours past it,
    /// LDK's margin, which the merchant records as late), with `description` (cut to BOLT11's
    /// 639 bytes). It is stored and credited exactly like a deposit invoice (`Credit` keyed by [`deposit_key`], once). The user
    /// deposit bounds do not apply (the merchant sets the amount); liquidity does.
    pub fn merchant_invoice(
        &self,
        account: AccountId,
        amount: Amount,
        description: &str,
        expiry_secs: u32,
        now_ms: u64,
    ) -> Result<LnDeposit, InvoiceError> {
        if amount.0 == 0 {
            return Err(InvoiceError::BelowMinimum {
                amount_sat: 0,
                min_sat: 1,
            });
        }
        if expiry_secs == 0 {
            return Err(InvoiceError::Expired);
        }
        self.receive(account, amount, description, expiry_secs, now_ms)
    }

    fn receive(
        &self,
        account: AccountId,
        amount: Amount,
        description: &str,
        expiry_secs: u32,
        now_ms: u64,
    ) -> Result<LnDeposit, InvoiceError> {
        if !self.ledger.account_exists(account) {
            return Err(InvoiceError::UnknownAccount);
        }
        let need_msat = amount
            .0
            .checked_mul(1000)
            .ok_or(InvoiceError::AboveMaximum {
                amount_sat: amount.0,
                max_sat: self.cfg.max_deposit.0,
            })?;
        let can_msat = self
            .node
            .list_channels()
            .iter()
            .filter(|c| c.is_channel_ready)
            .map(|c| c.inbound_capacity_msat)
            .fold(0u64, u64::saturating_add);
        if can_msat < need_msat {
            tracing::info!(can_msat, need_msat, "invoice refused: inbound liquidity");
            return Err(InvoiceError::InsufficientInboundLiquidity {
                can_msat,
                need_msat,
            });
        }
        let description = Description::new(cut(description, MAX_DESCRIPTION_BYTES).to_owned())
            .expect("cut to the BOLT11 limit");
        let invoice = self
            .node
            .bolt11_payment()
            .receive(
                need_msat,
                &Bolt11InvoiceDescription::Direct(description),
                expiry_secs,
            )
            .map_err(InvoiceError::Node)?;
        let expires_ms = invoice.expires_at().map_or(u64::MAX, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
        });
        let d = LnDeposit {
            payment_hash: invoice.payment_hash().to_byte_array(),
            account: account.0,
            amount_sat: amount.0,
            bolt11: invoice.to_string(),
            created_ms: now_ms,
            expires_ms: expires_ms.min(i64::MAX as u64),
            credited_sat: None,
        };
        self.lock().insert_deposit(&d)?;
        Ok(d)
    }

    /// A deposit (or merchant) invoice by payment hash.
    pub fn deposit(&self, payment_hash: &[u8; 32]) -> Result<Option<LnDeposit>, StoreError> {
        self.lock().deposit(payment_hash)
    }

    /// Credits a received payment to its deposit invoice's account, once ([`Receipt`]). A
    /// payment to a hash we have no deposit for is logged (the node's balance grew; it shows as
    /// a reconciliation surplus), never credited to anyone.
    fn credit(&self, store: &Store, hash: &[u8; 32], amount_msat: u64) -> Receipt {
        let d = match store.deposit(hash) {
            Ok(Some(d)) => d,
            Ok(None) => {
                // One open alarm for all of them (a subject per payment let anyone with a route
                // to the node add an alarm row per 1-sat keysend); each is in the log.
                tracing::error!(
                    payment_hash = %hex::encode(hash),
                    amount_msat,
                    "lightning payment for no deposit invoice; credited to nobody"
                );
                self.alarm(
                    "lightning_payment_unknown",
                    "lightning payments for no invoice of ours",
                    &format!(
                        "{amount_msat} msat received for payment {} and no deposit invoice; \
                         credited to nobody (a reconciliation surplus); later ones while this \
                         alarm is open are in the log (payment_hash)",
                        hex::encode(hash)
                    ),
                );
                return Receipt::Kept;
            }
            Err(e) => {
                tracing::warn!(error = %e, "lightning store");
                return Receipt::Unrecorded;
            }
        };
        if d.credited_sat.is_some() {
            return Receipt::Kept;
        }
        // What arrived, in whole satoshis (an overpayment is credited; a fraction stays with us).
        let sat = amount_msat / 1000;
        if sat == 0 {
            return Receipt::Kept;
        }
        // Received, durably, before the ledger is asked: a credit the ledger refuses (the
        // breaker open) or does not answer is retried at every step until it is applied,
        // however long after the invoice's expiry (`received_uncredited`).
        let recorded = match store.mark_received(hash, amount_msat) {
            Ok(()) => Receipt::Kept,
            Err(e) => {
                tracing::warn!(error = %e, "lightning store (received; its event is kept)");
                Receipt::Unrecorded
            }
        };
        let cmd = Command::Credit {
            account: AccountId(d.account),
            asset: BTC,
            amount: Amount(sat),
            key: deposit_key(hash),
        };
        // Idempotent by key: an unknown answer is resolved by the same credit next step.
        match self.ledger.submit(cmd) {
            Ok(()) => match store.mark_credited(hash, sat) {
                Ok(()) => Receipt::Credited,
                Err(e) => {
                    tracing::warn!(error = %e, "lightning store (credit is applied; retried)");
                    recorded
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, payment_hash = %hex::encode(hash), "lightning credit");
                recorded
            }
        }
    }

    /// Invoices of ours credited after position `after` (0: from the first), in the order the
    /// credits were applied, at most `limit`: `(position, payment hash)`. A reader that keeps
    /// the last position it handled sees every credit once, however late it came.
    pub fn credited_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
        self.lock().credited_after(after, limit)
    }

    /// What the node received for an invoice of ours, once credited: `(satoshis credited,
    /// when the node recorded the payment, ms since the epoch)`. `None` until credited (or for
    /// a hash that is not ours).
    pub fn received(&self, payment_hash: &[u8; 32]) -> Result<Option<(u64, u64)>, StoreError> {
        let Some(d) = self.lock().deposit(payment_hash)? else {
            return Ok(None);
        };
        let Some(sat) = d.credited_sat else {
            return Ok(None);
        };
        let pid = ldk_node::lightning::ln::channelmanager::PaymentId(*payment_hash);
        let at_ms = self
            .node
            .payment(&pid)
            .map(|p| p.latest_update_timestamp.saturating_mul(1000))
            // No record (never for a credited deposit): its creation, before any payment.
            .unwrap_or(d.created_ms);
        Ok(Some((sat, at_ms)))
    }

    // ---- withdrawals ----------------------------------------------------------------------

    /// Pays `bolt11` for `account`: `amount + fee` held first, released exactly if the payment
    /// fails, completed when it succeeds (see the crate docs). Answers with the withdrawal as it
    /// is once handed to the node (`sending`); [`step`](Self::step) finishes it.
    pub fn pay(
        &self,
        account: AccountId,
        bolt11: &str,
        now_ms: u64,
    ) -> Result<LnWithdrawal, PayError> {
        let invoice =
            Bolt11Invoice::from_str(bolt11.trim()).map_err(|_| PayError::MalformedInvoice)?;
        let expected = Currency::from(self.cfg.network);
        if invoice.currency() != expected {
            return Err(PayError::WrongNetwork {
                expected: format!("{expected:?}"),
                found: format!("{:?}", invoice.currency()),
            });
        }
        let hash = invoice.payment_hash().to_byte_array();
        self.wait_past_a_failure(hash);
        let store = self.lock();
        // The same account paying the same invoice again is a retry (its reply was lost): it
        // gets its withdrawal back, with its id and state, and nothing is sent twice. Asked
        // before every check that can change between the two calls (the invoice's expiry, the
        // limits): a retry after them is answered with what the first call did, not refused as
        // if nothing had happened.
        if let Some(w) = store.live_withdrawal_by_hash(&hash)? {
            return if w.account == account.0 {
                Ok(w)
            } else {
                Err(PayError::AlreadyPaid)
            };
        }
        if invoice.would_expire(Duration::from_millis(now_ms)) {
            return Err(PayError::Expired);
        }
        let msat = invoice.amount_milli_satoshis().ok_or(PayError::NoAmount)?;
        if msat % 1000 != 0 {
            return Err(PayError::FractionalAmount { msat });
        }
        let amount = Amount(msat / 1000);
        if amount < self.cfg.min_withdrawal {
            return Err(PayError::BelowMinimum {
                amount_sat: amount.0,
                min_sat: self.cfg.min_withdrawal.0,
            });
        }
        if amount > self.cfg.max_withdrawal {
            return Err(PayError::AboveMaximum {
                amount_sat: amount.0,
                max_sat: self.cfg.max_withdrawal.0,
            });
        }
        if invoice.recover_payee_pub_key() == self.node.node_id() {
            return Err(PayError::OwnInvoice);
        }
        let fee = self.cfg.withdrawal_fee;
        let fee_msat = fee.0.checked_mul(1000).ok_or(PayError::AboveMaximum {
            amount_sat: amount.0,
            max_sat: self.cfg.max_withdrawal.0,
        })?;
        let need_msat = msat.checked_add(fee_msat).ok_or(PayError::AboveMaximum {
            amount_sat: amount.0,
            max_sat: self.cfg.max_withdrawal.0,
        })?;

        let node_payment = self
            .node
            .payment(&ldk_node::lightning::ln::channelmanager::PaymentId(hash));
        if node_payment
            .as_ref()
            .is_some_and(|p| p.status != PaymentStatus::Failed)
        {
            return Err(PayError::AlreadyPaid);
        }
        // Paid again after a failed attempt: the node's record is that attempt's until the new
        // one's replaces it ([`Self::outcome`]).
        let prior_failed_s = node_payment.map(|p| p.latest_update_timestamp);
        if !self.ledger.account_exists(account) {
            return Err(PayError::UnknownAccount);
        }
        if let Some(policy) = self.policy.get() {
            let used = store.withdrawn_since(account.0, now_ms.saturating_sub(DAY_MS))?;
            policy
                .check(account, amount, Amount(used), now_ms)
                .map_err(|(code, reason)| PayError::Refused { code, reason })?;
        }
        let can_msat = self
            .node
            .list_channels()
            .iter()
            .filter(|c| c.is_channel_ready)
            .map(|c| c.outbound_capacity_msat)
            .fold(0u64, u64::saturating_add);
        if can_msat < need_msat {
            tracing::info!(
                can_msat,
                need_msat,
                "withdrawal refused: outbound liquidity"
            );
            return Err(PayError::InsufficientLiquidity {
                can_msat,
                need_msat,
            });
        }

        // 1. The row, then the hold.
        let id = store
            .insert_withdrawal(&NewWithdrawal {
                account: account.0,
                payment_hash: &hash,
                bolt11: &invoice.to_string(),
                amount_sat: amount.0,
                fee_sat: fee.0,
                created_ms: now_ms,
                prior_failed_s,
            })?
            .ok_or(PayError::AlreadyPaid)?;
        let wid = engine_withdrawal_id(id);
        let hold = Command::WithdrawHold {
            account,
            asset: BTC,
            amount,
            fee,
            id: wid,
        };
        match self.ledger.submit(hold) {
            Ok(()) => {}
            Err(LedgerError::Rejected(code)) => {
                store.transition(id, S::New, S::Refused, None, Some(code.message()))?;
                return Err(match code {
                    RejectCode::InsufficientBalance => PayError::InsufficientBalance,
                    RejectCode::UnknownAccount => PayError::UnknownAccount,
                    RejectCode::EngineBusy => PayError::Busy,
                    other => PayError::LedgerRejected(other),
                });
            }
            Err(_) => match self.ledger.withdrawal(wid) {
                Ok(Some(w))
                    if w.account == account
                        && w.amount == amount
                        && w.fee == fee
                        && w.state == WithdrawalState::Held => {}
                Ok(None) => {
                    store.transition(id, S::New, S::Refused, None, Some("hold not taken"))?;
                    return Err(PayError::Busy);
                }
                // Still unknown (or a record that does not match: an alarm for `step`).
                _ => return Err(PayError::Unknown { id }),
            },
        }
        store.transition(id, S::New, S::Held, None, None)?;

        // 2. `sending`, durably, before the node has it.
        store.transition(id, S::Held, S::Sending, None, None)?;
        let params = RouteParametersConfig {
            max_total_routing_fee_msat: Some(fee_msat),
            ..Default::default()
        };
        match self.node.bolt11_payment().send(&invoice, Some(params)) {
            Ok(_) | Err(NodeError::DuplicatePayment) => {}
            // Refused before any HTLC left: no route within the fee cap, expired, bad invoice.
            Err(e @ (NodeError::PaymentSendingFailed | NodeError::InvalidInvoice)) => {
                let reason = if e == NodeError::PaymentSendingFailed {
                    "no route"
                } else {
                    "invalid invoice"
                };
                store.transition(id, S::Sending, S::Releasing, None, Some(reason))?;
                let w = store.withdrawal(id)?.expect("the row exists");
                self.finish(&store, &w);
                return Err(if e == NodeError::PaymentSendingFailed {
                    PayError::NoRoute
                } else {
                    PayError::MalformedInvoice
                });
            }
            // The node is not running (stopping for a shutdown while this pay waited): ldk-node
            // answers so before it touches its store or channels, so nothing was sent, as
            // `resolve_unrecorded` reads it too. Released at once and answered busy, never held
            // in doubt (for days, then sent again unasked) (review).
            Err(NodeError::NotRunning) => {
                store.transition(id, S::Sending, S::Releasing, None, Some("node not running"))?;
                let w = store.withdrawal(id)?.expect("the row exists");
                self.finish(&store, &w);
                return Err(PayError::Busy);
            }
            // Maybe sent: stays `sending`, resolved by payment hash (and sent again under the
            // same payment id if the node has no record of it), so the outcome is unknown to
            // this answer: `-1007`, never an error (it was `-1000`, and then it was paid).
            Err(e) => {
                tracing::warn!(error = %e, id, "lightning withdrawal: the send's outcome is unknown");
                return Err(PayError::Unknown { id });
            }
        }
        // Handed to the node: a store that cannot read the row back leaves this answer
        // unknown too, never an error for a payment on its way.
        match store.withdrawal(id) {
            Ok(Some(w)) => Ok(w),
            Ok(None) | Err(_) => Err(PayError::Unknown { id }),
        }
    }

    /// A withdrawal by row id.
    pub fn withdrawal(&self, id: u64) -> Result<Option<LnWithdrawal>, StoreError> {
        self.lock().withdrawal(id)
    }

    /// The withdrawal of `account` paying `bolt11`, if it has one that is not refused or
    /// released: what [`pay`](Self::pay) answers a retry with. A gateway asks it before a
    /// refusal by a rule that may have changed since the first attempt (a withdrawal policy),
    /// so that a client resolving a lost answer learns the payment, never "refused". A string
    /// that is no invoice has none.
    pub fn withdrawal_of_invoice(
        &self,
        account: AccountId,
        bolt11: &str,
    ) -> Result<Option<LnWithdrawal>, StoreError> {
        let Ok(invoice) = Bolt11Invoice::from_str(bolt11.trim()) else {
            return Ok(None);
        };
        let hash = invoice.payment_hash().to_byte_array();
        Ok(self
            .lock()
            .live_withdrawal_by_hash(&hash)?
            .filter(|w| w.account == account.0))
    }

    /// Submits the completion or release a `completing` / `releasing` row is waiting for, and
    /// records it. `true` when the row reached its final state now.
    fn finish(&self, store: &Store, w: &LnWithdrawal) -> bool {
        let wid = engine_withdrawal_id(w.id);
        let (cmd, want, to) = match w.status {
            S::Completing => (
                Command::WithdrawComplete {
                    id: wid,
                    network_fee: Amount(w.routing_fee_sat.unwrap_or(0)),
                },
                WithdrawalState::Completed,
                S::Completed,
            ),
            S::Releasing => (
                Command::WithdrawRelease { id: wid },
                WithdrawalState::Released,
                S::Released,
            ),
            _ => return false,
        };
        let done = match self.ledger.submit(cmd) {
            Ok(()) => true,
            Err(LedgerError::Rejected(RejectCode::EngineBusy)) => false,
            Err(LedgerError::Rejected(RejectCode::UnknownWithdrawal)) | Err(_) => {
                match self.ledger.withdrawal(wid) {
                    Ok(Some(r)) if r.state == want => true,
                    Ok(Some(r)) if r.state == WithdrawalState::Held => false,
                    Ok(r) => {
                        self.alarm(
                            "lightning_withdrawal_mismatch",
                            &format!("lightning withdrawal {}", w.id),
                            &format!(
                                "the node's outcome wants the ledger's record {want:?}; the \
                                 ledger has {r:?}"
                            ),
                        );
                        false
                    }
                    Err(_) => false,
                }
            }
        };
        done && store
            .transition(w.id, w.status, to, None, None)
            .unwrap_or(false)
    }

    /// Resolves one unfinished withdrawal after a restart or a lost answer.
    fn resolve(&self, store: &Store, w: &LnWithdrawal) -> Result<(), StoreError> {
        let wid = engine_withdrawal_id(w.id);
        match w.status {
            S::New => match self.ledger.withdrawal(wid) {
                Ok(None) => {
                    store.transition(w.id, S::New, S::Refused, None, Some("hold not taken"))?;
                }
                Ok(Some(r)) if r.state == WithdrawalState::Held => {
                    // Held but never handed to the node: give it back.
                    store.transition(w.id, S::New, S::Releasing, None, Some("not sent"))?;
                }
                Ok(Some(r)) => self.alarm(
                    "lightning_withdrawal_mismatch",
                    &format!("lightning withdrawal {}", w.id),
                    &format!("never held here (state new), yet the ledger's record is {r:?}"),
                ),
                Err(_) => {}
            },
            S::Held => {
                store.transition(w.id, S::Held, S::Releasing, None, Some("not sent"))?;
            }
            S::Sending => match self.outcome(w) {
                Outcome::Succeeded { fee_paid_msat } => {
                    let fee = self.routing_fee_sat(w, fee_paid_msat);
                    store.transition(w.id, S::Sending, S::Completing, Some(fee), None)?;
                }
                Outcome::Failed => {
                    store.transition(
                        w.id,
                        S::Sending,
                        S::Releasing,
                        None,
                        Some("payment failed"),
                    )?;
                }
                Outcome::Pending | Outcome::NotOurs => {}
                Outcome::Unrecorded => self.resolve_unrecorded(store, w)?,
            },
            _ => {}
        }
        Ok(())
    }

    /// A `sending` withdrawal the node has no record of ([`Outcome::Unrecorded`]).
    ///
    /// The send never reached the node (a stop between `sending` and the call), or reached
    /// LDK's channel manager and not ldk-node's store (a stop in between, or a failed write of
    /// the record: the record is missing, or still an earlier attempt's). Nothing tells the two
    /// apart, and either answer to a second send under the same payment id leaves it open:
    /// - refused (`PaymentSendingFailed`): LDK looks for a route and at the invoice's expiry
    ///   before it looks for a duplicate, so with the invoice expired, or the channel's
    ///   liquidity taken by the first send's HTLC, it is refused whether or not the first send
    ///   is on its way. Releasing then let a first HTLC still held by the payee be claimed
    ///   later: the payee paid, the account not debited.
    /// - accepted (`Ok`, a new payment), or a duplicate (`DuplicatePayment`, the first send in
    ///   flight): LDK forgets a payment when it queues its failure, before ldk-node handles
    ///   that event, which then marks *any* record of the id failed. A second send accepted in
    ///   between would be released by the first send's failure while its own HTLC is on its
    ///   way (and sending again after each duplicate answer opens that window).
    ///
    /// So the withdrawal is sent again once at most and is *in doubt* from then on: it stays
    /// `sending` (held, counted in flight) with an alarm; it completes when the node reports it
    /// paid (a failed record does not end it, [`outcome_of`]), and is released once the chain
    /// is [`IN_DOUBT_BLOCKS`] past the height it was found at (at or after the first send's),
    /// the node has followed the chain since this service started, and no channel balance
    /// names its payment hash. The mark is written before the send, so that a stop or a failed
    /// write after it changes nothing; it is taken off only when the node did not run (nothing
    /// sent). The send waits for every ready channel to be usable (just after a start the peers
    /// are still reconnecting, and a send refused for that alone would hold the withdrawal for
    /// nothing), at most [`LightningConfig::reconnect_grace_secs`] after the start; with no
    /// channel usable then, the withdrawal is held in doubt without a send.
    fn resolve_unrecorded(&self, store: &Store, w: &LnWithdrawal) -> Result<(), StoreError> {
        let status = self.node.status();
        let height = status.current_best_block.height;
        if let Some(until) = w.doubt_until_height {
            let followed = status
                .latest_lightning_wallet_sync_timestamp
                .is_some_and(|t| t >= self.started_s);
            if height >= until && followed && !self.htlc_in_balances(&w.payment_hash) {
                store.transition(
                    w.id,
                    S::Sending,
                    S::Releasing,
                    None,
                    Some("in doubt: no record of the payment, and its HTLCs' time has run out"),
                )?;
            }
            return Ok(());
        }
        let channels = self.node.list_channels();
        let ready = channels.iter().filter(|c| c.is_channel_ready);
        let all_usable = ready.clone().count() > 0 && ready.clone().all(|c| c.is_usable);
        let any_usable = channels.iter().any(|c| c.is_usable);
        let grace_over = crate::runner::now_ms() / 1000
            >= self.started_s.saturating_add(self.cfg.reconnect_grace_secs);
        if !all_usable && !grace_over {
            return Ok(());
        }
        let until = height.saturating_add(IN_DOUBT_BLOCKS);
        if !store.mark_in_doubt(w.id, until)? {
            return Ok(());
        }
        // Raised before the send: a stop right after it must not leave the hold unexplained
        // (a withdrawal in doubt is never looked at again until its deadline).
        let subject = format!("lightning withdrawal {}", w.id);
        self.alarm(
            "lightning_withdrawal_in_doubt",
            &subject,
            &format!(
                "the node has no record of the payment; it is sent again under the same id once \
                 (if a channel is usable). An HTLC of the first send may still be claimed, so \
                 the hold stays until the node reports it paid or block {until}"
            ),
        );
        let sent = match Bolt11Invoice::from_str(&w.bolt11) {
            Ok(inv) if any_usable => {
                let params = RouteParametersConfig {
                    max_total_routing_fee_msat: Some(w.fee_sat.saturating_mul(1000)),
                    ..Default::default()
                };
                Some(self.node.bolt11_payment().send(&inv, Some(params)))
            }
            _ => None,
        };
        match &sent {
            // The node was not running: nothing was sent, and nothing is in doubt yet.
            Some(Err(NodeError::NotRunning)) => store.clear_doubt(w.id)?,
            Some(Ok(_)) => tracing::warn!(%subject, "in doubt: sent again, taken as a new payment"),
            Some(Err(e)) => tracing::warn!(%subject, error = %e, "in doubt: sent again, refused"),
            None => tracing::warn!(%subject, "in doubt: not sent again, no channel is usable"),
        }
        Ok(())
    }

    /// Whether a channel's balance still names `hash` (an HTLC of ours or theirs, in a channel
    /// open or closed, that a transaction on chain may still claim).
    fn htlc_in_balances(&self, hash: &[u8; 32]) -> bool {
        use ldk_node::LightningBalance as B;
        self.node
            .list_balances()
            .lightning_balances
            .iter()
            .any(|b| match b {
                B::ContentiousClaimable { payment_hash, .. }
                | B::MaybeTimeoutClaimableHTLC { payment_hash, .. }
                | B::MaybePreimageClaimableHTLC { payment_hash, .. } => payment_hash.0 == *hash,
                _ => false,
            })
    }

    /// What the node's payment store says of this withdrawal's attempt. The node keeps one
    /// record per invoice (the payment id is the payment hash), and an invoice whose attempt
    /// failed may be paid again: until the record changes after the new attempt's send, a
    /// record marked failed no later than `prior_failed_s` is the earlier attempt's and says
    /// nothing of this one (`Unrecorded`). Without this, the earlier attempt's failure (its
    /// event still queued, or the record a stop left behind) released a new attempt that was
    /// still on its way, and its success then paid the invoice out of released funds.
    fn outcome(&self, w: &LnWithdrawal) -> Outcome {
        let pid = ldk_node::lightning::ln::channelmanager::PaymentId(w.payment_hash);
        outcome_of(
            w.prior_failed_s,
            w.doubt_until_height.is_some(),
            self.node.payment(&pid).as_ref(),
        )
    }

    fn routing_fee_sat(&self, w: &LnWithdrawal, fee_paid_msat: Option<u64>) -> u64 {
        let fee = ceil_sat(fee_paid_msat.unwrap_or(0));
        if fee > w.fee_sat {
            // The node enforces the cap (`max_total_routing_fee_msat`); more is a bug upstream.
            self.alarm(
                "lightning_routing_fee_above_cap",
                &format!("lightning withdrawal {}", w.id),
                &format!(
                    "routing fee {fee} sat above the cap {} sat; the ledger records the cap",
                    w.fee_sat
                ),
            );
            return w.fee_sat;
        }
        fee
    }

    // ---- the loop -------------------------------------------------------------------------

    /// Handles the node's events, then resolves every unfinished deposit and withdrawal by
    /// payment hash (so an event lost to a crash changes nothing: the node's payment store is
    /// the source of truth), then submits the pending ledger commands.
    pub fn step(&self, now_ms: u64) -> Result<StepReport, StoreError> {
        let store = self.lock();
        let mut report = StepReport::default();
        while let Some(event) = self.node.next_event() {
            match &event {
                Event::PaymentReceived {
                    payment_hash,
                    amount_msat,
                    ..
                } => {
                    let h = hash_bytes(payment_hash);
                    match self.credit(&store, &h, *amount_msat) {
                        Receipt::Credited => report.credited.push(h),
                        Receipt::Kept => {}
                        // Nothing of ours holds the receipt: the node keeps the event and
                        // delivers it again (the sweep looks at recent invoices only).
                        Receipt::Unrecorded => {
                            tracing::warn!(
                                payment_hash = %hex::encode(h),
                                "lightning payment received, not recorded yet; its event is kept"
                            );
                            break;
                        }
                    }
                }
                Event::PaymentSuccessful {
                    payment_hash,
                    fee_paid_msat,
                    ..
                } => match store.live_withdrawal_by_hash(&hash_bytes(payment_hash))? {
                    Some(w) if w.status == S::Sending => {
                        let fee = self.routing_fee_sat(&w, *fee_paid_msat);
                        store.transition(w.id, S::Sending, S::Completing, Some(fee), None)?;
                    }
                    Some(_) => {}
                    // Paid, and no withdrawal of ours may be paying it: money left that the
                    // ledger released (or never held).
                    None => self.alarm(
                        "lightning_payment_without_withdrawal",
                        &format!("lightning payment {}", hex::encode(payment_hash.0)),
                        "the node paid an invoice no unfinished or completed withdrawal holds",
                    ),
                },
                // Released only if the node's record says this attempt failed: the event may be
                // an earlier attempt's, queued before the invoice was paid again
                // ([`Self::outcome`]); `resolve` below settles the rest.
                Event::PaymentFailed {
                    payment_hash: Some(payment_hash),
                    reason,
                    ..
                } => {
                    if let Some(w) = store.live_withdrawal_by_hash(&hash_bytes(payment_hash))? {
                        if w.status == S::Sending && self.outcome(&w) == Outcome::Failed {
                            let why = format!("payment failed: {reason:?}");
                            store.transition(w.id, S::Sending, S::Releasing, None, Some(&why))?;
                        }
                    }
                }
                Event::ChannelReady {
                    user_channel_id,
                    counterparty_node_id,
                    ..
                } => tracing::info!(
                    channel = user_channel_id.0,
                    peer = ?counterparty_node_id,
                    "lightning channel ready"
                ),
                Event::ChannelClosed {
                    user_channel_id,
                    reason,
                    ..
                } => tracing::info!(
                    channel = user_channel_id.0,
                    ?reason,
                    "lightning channel closed"
                ),
                other => tracing::debug!(event = ?other, "lightning event"),
            }
            if let Err(e) = self.node.event_handled() {
                tracing::warn!(error = %e, "lightning event not acknowledged; redelivered");
                break;
            }
        }
        drop(store);
        // Every open deposit through the node's payment store (a lost event) only every
        // `OPEN_DEPOSIT_SWEEP_MS`, and only those expired at most `OPEN_DEPOSIT_GRACE_MS` ago
        // (the node refuses a payment that long after the expiry; every merchant invoice leaves
        // one open row behind). Received-but-uncredited deposits and unfinished withdrawals:
        // every step.
        let sweep = now_ms >= self.next_sweep_ms.load(Ordering::Relaxed);
        let more = if sweep {
            self.next_sweep_ms.store(
                now_ms.saturating_add(OPEN_DEPOSIT_SWEEP_MS),
                Ordering::Relaxed,
            );
            self.resolve_pending_since(now_ms.saturating_sub(OPEN_DEPOSIT_GRACE_MS))?
        } else {
            self.resolve_unfinished()?
        };
        report.credited.extend(more.credited);
        report.completed.extend(more.completed);
        report.released.extend(more.released);
        if !report.completed.is_empty() || !report.released.is_empty() {
            // Always stored (even with no receiver now), so later subscribers start from it.
            self.settled.send_modify(|g| *g = g.wrapping_add(1));
        }
        Ok(report)
    }

    /// A receiver whose value (a counter) changes whenever a [`step`](Self::step) brings a
    /// withdrawal to a final state (completed, released): the API's `pay` waits on it
    /// asynchronously (no thread parked) and looks its withdrawal up again at each change.
    pub fn settled(&self) -> tokio::sync::watch::Receiver<u64> {
        self.settled.subscribe()
    }

    /// Retries the credits of received-but-uncredited deposits, resolves every unfinished
    /// withdrawal and submits the ledger commands they wait for (no payment-store sweep).
    fn resolve_unfinished(&self) -> Result<StepReport, StoreError> {
        let store = self.lock();
        let mut report = StepReport::default();
        self.retry_received(&store, &mut report)?;
        self.settle_withdrawals(&store, &mut report)?;
        Ok(report)
    }

    fn retry_received(&self, store: &Store, report: &mut StepReport) -> Result<(), StoreError> {
        for (hash, msat) in store.received_uncredited()? {
            if self.credit(store, &hash, msat) == Receipt::Credited {
                report.credited.push(hash);
            }
        }
        Ok(())
    }

    fn settle_withdrawals(&self, store: &Store, report: &mut StepReport) -> Result<(), StoreError> {
        for w in store.unfinished_withdrawals()? {
            self.resolve(store, &w)?;
        }
        for w in store.unfinished_withdrawals()? {
            let status = w.status;
            if self.finish(store, &w) {
                match status {
                    S::Completing => report.completed.push(w.id),
                    _ => report.released.push(w.id),
                }
            }
        }
        Ok(())
    }

    /// Without looking at the node's events: credits every open deposit the node's payment
    /// store says was received, resolves every unfinished withdrawal by payment hash, and
    /// submits the ledger commands they wait for. [`step`](Self::step) ends with it; after a
    /// crash it alone settles what the lost events would have.
    pub fn resolve_pending(&self) -> Result<StepReport, StoreError> {
        self.resolve_pending_since(0)
    }

    /// [`resolve_pending`](Self::resolve_pending) over the open deposits that expire after
    /// `since_ms` only, and every deposit received but not credited yet whatever its expiry
    /// (all unfinished withdrawals).
    pub fn resolve_pending_since(&self, since_ms: u64) -> Result<StepReport, StoreError> {
        let mut report = StepReport::default();
        self.retry_received(&self.lock(), &mut report)?;
        // A page at a time, the store's lock taken for each page's read and each credit, not
        // over the whole sweep (up to a week of unexpired merchant invoices): invoices made and
        // payments sent meanwhile wait for a page, not for all of them.
        let mut after = None;
        loop {
            let page = self
                .lock()
                .open_deposits_page(since_ms, after, SWEEP_PAGE)?;
            for d in &page {
                let pid = ldk_node::lightning::ln::channelmanager::PaymentId(d.payment_hash);
                let Some(p) = self.node.payment(&pid) else {
                    continue;
                };
                if p.direction != PaymentDirection::Inbound || p.status != PaymentStatus::Succeeded
                {
                    continue;
                }
                if let Some(msat) = p.amount_msat {
                    if self.credit(&self.lock(), &d.payment_hash, msat) == Receipt::Credited {
                        report.credited.push(d.payment_hash);
                    }
                }
            }
            match page.last() {
                Some(last) if page.len() == SWEEP_PAGE => {
                    after = Some((last.expires_ms, last.payment_hash));
                }
                _ => break,
            }
        }
        self.settle_withdrawals(&self.lock(), &mut report)?;
        Ok(report)
    }

    // ---- the operator -----------------------------------------------------------------------

    /// Opens a channel of `amount_sat` to `NODEID@HOST:PORT`, from the node's on-chain funds.
    pub fn open_channel(&self, peer: &str, amount_sat: u64) -> Result<u128, OperatorError> {
        let (id, addr) = peer
            .split_once('@')
            .ok_or_else(|| OperatorError::Input("expected NODEID@HOST:PORT".into()))?;
        let node_id = PublicKey::from_str(id)
            .map_err(|_| OperatorError::Input(format!("bad node id {id}")))?;
        let address = SocketAddress::from_str(addr)
            .map_err(|_| OperatorError::Input(format!("bad address {addr}")))?;
        self.node
            .open_channel(node_id, address, amount_sat, None, None)
            .map(|u| u.0)
            .map_err(OperatorError::Node)
    }

    /// Closes a channel cooperatively (by [`ChannelView::user_channel_id`]).
    pub fn close_channel(&self, user_channel_id: u128) -> Result<(), OperatorError> {
        let c = self
            .node
            .list_channels()
            .into_iter()
            .find(|c| c.user_channel_id.0 == user_channel_id)
            .ok_or_else(|| OperatorError::UnknownChannel(user_channel_id.to_string()))?;
        self.node
            .close_channel(&UserChannelId(user_channel_id), c.counterparty_node_id)
            .map_err(OperatorError::Node)
    }

    /// The channels.
    pub fn channels(&self) -> Vec<ChannelView> {
        self.node
            .list_channels()
            .into_iter()
            .map(|c| ChannelView {
                user_channel_id: c.user_channel_id.0,
                counterparty: c.counterparty_node_id.to_string(),
                capacity_sat: c.channel_value_sats,
                outbound_msat: c.outbound_capacity_msat,
                inbound_msat: c.inbound_capacity_msat,
                ready: c.is_channel_ready,
                usable: c.is_usable,
                outbound: c.is_outbound,
            })
            .collect()
    }

    /// Waits (at most a second, before any lock) until the node's clock is past the second of
    /// an earlier failed attempt at the invoice `hash`. ldk-node stamps its payment records in
    /// whole seconds, and a new attempt is told from the earlier one by a later stamp
    /// ([`outcome_of`]): an attempt sent and failed again within the earlier failure's second
    /// read as no record of its own, and was held in doubt for about eight days and sent again
    /// (review). Only a retry of a payment that just failed waits.
    fn wait_past_a_failure(&self, hash: [u8; 32]) {
        let Some(failed_s) = self
            .node
            .payment(&ldk_node::lightning::ln::channelmanager::PaymentId(hash))
            .filter(|p| p.status == PaymentStatus::Failed)
            .map(|p| p.latest_update_timestamp)
        else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let next = Duration::from_secs(failed_s.saturating_add(1));
        if let Some(wait) = next.checked_sub(now) {
            std::thread::sleep(wait.min(Duration::from_millis(1100)));
        }
    }

    /// The node's balances.
    pub fn balances(&self) -> LnBalances {
        let open: std::collections::HashSet<_> = self
            .node
            .list_channels()
            .into_iter()
            .map(|c| c.channel_id)
            .collect();
        let b = self.node.list_balances();
        // Money a close paid to the node's wallet stays in LDK's balances (until 6
        // confirmations) and the sweeper's (until about four weeks): counted once, in the
        // wallet (review: a closed channel's balance was counted twice, hiding a shortfall of
        // that size).
        let in_wallet = b
            .lightning_balances
            .iter()
            .map(|l| match l {
                LightningBalance::ClaimableOnChannelClose {
                    channel_id,
                    amount_satoshis,
                    ..
                } if !open.contains(channel_id) => *amount_satoshis,
                LightningBalance::ClaimableAwaitingConfirmations {
                    amount_satoshis,
                    source: BalanceSource::CoopClose,
                    ..
                } => *amount_satoshis,
                _ => 0,
            })
            .fold(0u64, u64::saturating_add);
        let pending_close_sat = b
            .pending_balances_from_channel_closures
            .iter()
            .map(|p| match p {
                PendingSweepBalance::PendingBroadcast {
                    amount_satoshis, ..
                } => *amount_satoshis,
                PendingSweepBalance::BroadcastAwaitingConfirmation { .. }
                | PendingSweepBalance::AwaitingThresholdConfirmations { .. } => 0,
            })
            .fold(0u64, u64::saturating_add);
        // After the node's balances: a withdrawal that becomes final in between was completed
        // (or released) in the ledger first, so it is counted on one side at most as it should.
        let reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        let in_flight = match reader.withdrawals_in_flight() {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "reading the withdrawals in flight");
                crate::store::InFlight::default()
            }
        };
        drop(reader);
        // A withdrawal in doubt counts only while the node shows its money out of the
        // channels: a record of it pending or paid (its send again), or an HTLC under its hash
        // (the first send's). Otherwise its money is in the channels' balance, and counting it
        // too hid a shortfall of its size for up to IN_DOUBT_BLOCKS (review).
        let out_of_channels = |hash: &[u8; 32]| {
            let pid = ldk_node::lightning::ln::channelmanager::PaymentId(*hash);
            let recorded_out = self.node.payment(&pid).is_some_and(|p| {
                p.direction == PaymentDirection::Outbound
                    && matches!(p.status, PaymentStatus::Pending | PaymentStatus::Succeeded)
            });
            recorded_out
                || b.lightning_balances.iter().any(|l| match l {
                    LightningBalance::ContentiousClaimable { payment_hash, .. }
                    | LightningBalance::MaybeTimeoutClaimableHTLC { payment_hash, .. }
                    | LightningBalance::MaybePreimageClaimableHTLC { payment_hash, .. } => {
                        payment_hash.0 == *hash
                    }
                    _ => false,
                })
        };
        let withdrawals_in_flight_sat = in_flight
            .in_doubt
            .iter()
            .filter(|(hash, _)| out_of_channels(hash))
            .fold(in_flight.sure_sat, |sum, (_, sat)| sum.saturating_add(*sat));
        LnBalances {
            onchain_sat: b.total_onchain_balance_sats,
            channels_sat: b.total_lightning_balance_sats.saturating_sub(in_wallet),
            pending_close_sat,
            anchor_reserve_sat: b.total_anchor_channels_reserve_sats,
            withdrawals_in_flight_sat,
        }
    }

    /// A fresh on-chain address of the node's wallet (to fund channels).
    pub fn onchain_address(&self) -> Result<String, OperatorError> {
        self.node
            .onchain_payment()
            .new_address()
            .map(|a| a.to_string())
            .map_err(OperatorError::Node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldk_node::lightning::ln::channelmanager::PaymentId;
    use ldk_node::payment::PaymentKind;

    fn record(status: PaymentStatus, at_s: u64) -> PaymentDetails {
        PaymentDetails {
            id: PaymentId([9; 32]),
            kind: PaymentKind::Bolt11 {
                hash: PaymentHash([9; 32]),
                preimage: None,
                secret: None,
            },
            amount_msat: Some(1_000_000),
            fee_paid_msat: Some(2_000),
            direction: PaymentDirection::Outbound,
            status,
            latest_update_timestamp: at_s,
        }
    }

    /// A second attempt at an invoice whose first failed at second 100: the node's failed
    /// record is the first attempt's until it was updated after it (the second attempt's own
    /// record was never written: a stop between the node's send and its store); only a later
    /// failure releases. Success and pending are always this attempt's (an invoice is paid
    /// again only after a failure). A first attempt takes the record as it is.
    #[test]
    fn a_failed_record_no_newer_than_the_earlier_attempt_says_nothing_of_a_later_one() {
        use PaymentStatus::*;
        let r = |status, at| Some(record(status, at));
        assert_eq!(
            outcome_of(Some(100), false, r(Failed, 100).as_ref()),
            Outcome::Unrecorded
        );
        assert_eq!(
            outcome_of(Some(100), false, r(Failed, 99).as_ref()),
            Outcome::Unrecorded
        );
        assert_eq!(
            outcome_of(Some(100), false, r(Failed, 101).as_ref()),
            Outcome::Failed
        );
        assert_eq!(
            outcome_of(None, false, r(Failed, 5).as_ref()),
            Outcome::Failed
        );
        assert_eq!(
            outcome_of(Some(100), false, r(Pending, 100).as_ref()),
            Outcome::Pending
        );
        assert_eq!(
            outcome_of(Some(100), false, r(Succeeded, 100).as_ref()),
            Outcome::Succeeded {
                fee_paid_msat: Some(2_000)
            }
        );
        assert_eq!(outcome_of(Some(100), false, None), Outcome::Unrecorded);
        let mut inbound = record(Succeeded, 200);
        inbound.direction = PaymentDirection::Inbound;
        assert_eq!(outcome_of(None, false, Some(&inbound)), Outcome::NotOurs);
    }

    /// A withdrawal in doubt takes no failed record for its end, however new (the refused
    /// second send leaves one, and a stop may come before anything else is written): only a
    /// success ends it, or the deadline.
    #[test]
    fn a_withdrawal_in_doubt_takes_no_failed_record_for_its_end() {
        use PaymentStatus::*;
        let r = |status, at| Some(record(status, at));
        for prior in [None, Some(100)] {
            assert_eq!(
                outcome_of(prior, true, r(Failed, 500).as_ref()),
                Outcome::Unrecorded
            );
            assert_eq!(
                outcome_of(prior, true, r(Succeeded, 500).as_ref()),
                Outcome::Succeeded {
                    fee_paid_msat: Some(2_000)
                }
            );
            assert_eq!(
                outcome_of(prior, true, r(Pending, 500).as_ref()),
                Outcome::Pending
            );
            assert_eq!(outcome_of(prior, true, None), Outcome::Unrecorded);
        }
    }
}
