//! Mediator's Lightning node: [`ldk-node`](ldk_node) inside `mediator serve`, on the same
//! bitcoind over RPC as the on-chain custody, and its two products for users:
//!
//! * **deposits**: a BOLT11 invoice for an account ([`LightningService::deposit_invoice`]); the
//!   node claims the payment, and the service credits the account through the ledger with
//!   `Credit` keyed by the payment hash ([`deposit_key`]), so a repeated event or a restart never
//!   credits twice;
//! * **withdrawals**: paying a user's BOLT11 invoice ([`LightningService::pay`]): the row is
//!   stored, `amount + fee` is held in the ledger (`WithdrawHold`), the row is marked `sending`,
//!   and only then is the payment handed to the node, whose payment id is the payment hash. On
//!   success the hold completes (`WithdrawComplete`, the routing fee as the network fee); on
//!   failure it is released (`WithdrawRelease`); an outcome lost to a crash is resolved by asking
//!   the node about the payment hash, never by paying again.
//!
//! It reaches the ledger only through [`wallet::Ledger`], the same boundary as on-chain custody,
//! with the same three answers (applied, refused, unknown). The service never spawns threads and
//! never reads the clock: every call takes `now_ms`; [`Runner`] is the one loop that drives
//! [`LightningService::step`]. (ldk-node itself runs its own tokio runtime and background tasks:
//! that is the library's design, kept inside this crate.)
//!
//! **Architecture invariants**
//! * The seed exists only in [`seed`] and in ldk-node's key manager; never logged.
//! * A withdrawal's hold exists before its payment is handed to the node, and its row says
//!   `sending` (durably) before that too: a row that never reached `sending` was never sent and
//!   is released on restart; a `sending` row is resolved by payment hash only.
//! * At most one withdrawal per payment hash may be live (not refused, not released): an invoice
//!   is never paid twice by us; ldk-node refuses a second send of the same payment id too.
//! * Lightning withdrawal ids in the engine are [`engine_withdrawal_id`] of the row id (bit 62
//!   set): disjoint from on-chain withdrawal ids (SQLite AUTOINCREMENT from 1).
//! * A deposit is credited at most once, as `Credit` with [`deposit_key`] of its payment hash,
//!   and recorded as credited after the ledger answered. What the node received is recorded
//!   first and retried at every step until the ledger applies it, with no time limit.
//! * Custody's rules ([`PayPolicy`]) are asked before a withdrawal's row or hold exists; a
//!   refusal changes nothing. Discrepancies go to custody's alarms ([`AlarmSink`]), not only to
//!   the log.

#![warn(missing_docs)]

mod config;
mod error;
mod node_log;
mod runner;
pub mod seed;
mod service;
mod store;

pub use config::{ChainRpc, LightningConfig};
pub use error::{InvoiceError, OpenError, OperatorError, PayError};
pub use runner::{now_ms, Runner};
pub use service::{
    AlarmSink, ChannelView, LightningService, LnBalances, PayPolicy, StepReport, IN_DOUBT_BLOCKS,
    MAX_DESCRIPTION_BYTES, OPEN_DEPOSIT_GRACE_MS, OPEN_DEPOSIT_SWEEP_MS,
};
pub use store::{LnDeposit, LnWithdrawal, LnWithdrawalStatus, StoreError, DATABASE_FILE};

/// Re-exported so that callers name the same types as the node.
pub use ldk_node;

use matching_engine::{IdempotencyKey, WithdrawalId};

/// Bit set in every Lightning withdrawal's engine id (on-chain ids count up from 1).
pub const LN_WITHDRAWAL_ID_BIT: u64 = 1 << 62;

/// The engine's withdrawal id of a Lightning withdrawal row.
pub fn engine_withdrawal_id(row: u64) -> WithdrawalId {
    assert!(row < LN_WITHDRAWAL_ID_BIT, "withdrawal row id out of range");
    WithdrawalId(LN_WITHDRAWAL_ID_BIT | row)
}

/// The credit key of a Lightning deposit: the payment hash, then `0xFFFF_FFFE` (an outpoint key
/// ends in a little-endian output index, never this large; a reference key ends in
/// `0xFFFF_FFFF`).
pub fn deposit_key(payment_hash: &[u8; 32]) -> IdempotencyKey {
    let mut k = [0u8; 36];
    k[..32].copy_from_slice(payment_hash);
    k[32..].copy_from_slice(&0xFFFF_FFFEu32.to_le_bytes());
    IdempotencyKey(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_ids_never_collide_with_on_chain_ones() {
        let h = [9u8; 32];
        assert_ne!(deposit_key(&h), IdempotencyKey::outpoint(h, 7));
        assert_ne!(deposit_key(&h), IdempotencyKey::outpoint(h, u32::MAX));
        assert_ne!(deposit_key(&[0u8; 32]), IdempotencyKey::reference(""));
        assert_eq!(engine_withdrawal_id(5), WithdrawalId((1 << 62) | 5));
    }
}
