//! Mediator's matching engine: a deterministic, single-writer state machine holding the order
//! books of every market and the ledger of every account.
//!
//! Commands in, events out, time passed in: [`Engine::apply`] never reads a clock, does no I/O,
//! and gives the same events for the same commands, byte for byte. That is what makes journal
//! replay ([`journal`]) and seeded simulation possible.
//!
//! Architecture invariants:
//! * A rejected command changes nothing.
//! * Per asset, the sum of all balances (available + held, fee account included) equals credits
//!   minus completed withdrawals; no balance is ever negative (asserted in debug builds).
//! * Books are never crossed; trades happen at the maker's price.

#![warn(missing_docs)]

pub mod bench;
pub mod book;
pub mod command;
pub mod config;
pub mod engine;
pub mod event;
pub mod fanout;
pub mod feed;
pub mod journal;
mod ledger;
pub mod market_data;
pub mod recovery;
pub mod reject;
pub mod sequencer;
pub mod snapshot;
pub mod units;

pub use command::{
    Command, NewOco, NewOrder, NewOto, NewOtoco, OrderRef, OrderType, StpMode, TimeInForce, Trigger,
};
pub use config::{AssetConfig, EngineConfig, Limits, MarketConfig};
pub use engine::{
    CreditTerms, Engine, EngineSnapshot, OrderList, OrderMeta, OrderView, OtoList, OtoOutcome,
    Pending, TransferTerms, Withdrawal, WithdrawalState, FEE_ACCOUNT,
};
pub use event::{DoneReason, Event, OrderInfo};
pub use reject::RejectCode;
pub use units::{
    AccountId, Amount, AssetId, ClientOrderId, IdempotencyKey, ListId, MarketId, OrderId, Price,
    Qty, Side, Timestamp, TradeId, WithdrawalId,
};

/// Why [`StateMachine::restore`] refused a snapshot.
pub type RestoreError = Box<dyn std::error::Error + Send + Sync>;

/// A deterministic state machine that the sequencer drives and the journal replays.
///
/// `apply` must be a pure function of the state, the command and `now`: no clock, no randomness,
/// no I/O. A rejected command must leave the state unchanged.
pub trait StateMachine {
    /// Input.
    type Command: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + 'static;
    /// Output.
    type Event: Clone + Send + Sync + std::fmt::Debug + 'static;
    /// A full copy of the state, canonical: equal states give equal snapshots.
    type Snapshot: serde::Serialize + serde::de::DeserializeOwned;

    /// Applies one command at time `now`, appending its events to `out`. `Ok` when accepted, `Err`
    /// when rejected. A command is journaled iff it advanced [`StateMachine::seq`] by one (the
    /// only other allowed outcome is no change): an accepted idempotent duplicate may leave it,
    /// and a rejected command may advance it when time-driven changes at `now` (GTD expiries)
    /// preceded the rejection; its events are then published too.
    fn apply(
        &mut self,
        cmd: &Self::Command,
        now: Timestamp,
        out: &mut Vec<Self::Event>,
    ) -> Result<(), RejectCode>;
    /// The number of accepted commands so far (the journal sequence number of the last one).
    fn seq(&self) -> u64;
    /// A canonical copy of the whole state.
    fn snapshot(&self) -> Self::Snapshot;
    /// Rebuilds the state from a snapshot, checking its invariants: a snapshot whose contents are
    /// inconsistent is an error (recovery then falls back to an older snapshot), never a panic.
    fn restore(snapshot: Self::Snapshot) -> Result<Self, RestoreError>
    where
        Self: Sized;
    /// SHA-256 of the canonical encoding of the state.
    fn state_hash(&self) -> [u8; 32];
    /// Turns the payload of a snapshot written in an older format `version` into one of the
    /// current format, in place; false when that version is not known. The default knows none.
    fn upgrade_snapshot_payload(version: u32, payload: &mut Vec<u8>) -> bool {
        let _ = (version, payload);
        false
    }
    /// Checks the state's invariants (in release builds too): the sequencer runs it before every
    /// snapshot, and a server after recovery. The default checks nothing.
    fn validate(&self) -> Result<(), RestoreError> {
        Ok(())
    }
}
