//! Rejections: a trader's (or caller's) mistake is a value with a stable number, never a panic.
//! A rejected command changes nothing. The numbers are part of the wire and journal format: never
//! renumber, only add.

use serde::{Deserialize, Serialize};

/// Why a command was rejected. `#[repr(u16)]`; the discriminant is the stable code.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[repr(u16)]
#[non_exhaustive]
pub enum RejectCode {
    /// Quantity, amount or budget is zero.
    ZeroQuantity = 1,
    /// Price is zero, or not a whole number of ticks of the market.
    PriceOffTick = 2,
    /// Quantity is not a whole number of lots, below the market's minimum or above its maximum.
    QtyOffLot = 3,
    /// Price times quantity is below the market's minimum notional.
    BelowMinNotional = 4,
    /// Price is outside the market's price band.
    OutsidePriceBand = 5,
    /// No such market.
    UnknownMarket = 6,
    /// No such account.
    UnknownAccount = 7,
    /// No such open order of this account (or it is already filled, cancelled or expired).
    UnknownOrder = 8,
    /// The client order id is already used by an open order of this account.
    DuplicateClientId = 9,
    /// The account's available balance does not cover what the command would hold or move.
    InsufficientBalance = 10,
    /// A post-only order would have taken liquidity.
    PostOnlyWouldTake = 11,
    /// A fill-or-kill order could not be filled in full at once.
    FokCannotFill = 12,
    /// The market's book is full.
    BookFull = 13,
    /// The account has the largest number of open orders it may have.
    AccountOrderLimit = 14,
    /// The engine's input queue is full; try again later. Never journaled.
    EngineBusy = 15,
    /// No such asset.
    UnknownAsset = 16,
    /// No such withdrawal, or it is no longer held.
    UnknownWithdrawal = 17,
    /// A withdrawal with this id exists already.
    DuplicateWithdrawal = 18,
    /// An amount is too large to represent (overflow), or a network fee above the flat fee.
    InvalidAmount = 19,
    /// The order type and options do not go together (e.g. post-only on a market order, FOK on a
    /// stop order, GTD in the past, market order with nothing on the other side to price it).
    InvalidOrder = 20,
    /// The engine has reached its account limit.
    AccountLimit = 21,
    /// A transfer from an account to itself.
    SelfTransfer = 22,
    /// Amend of an order that cannot be amended (a stop order, or a new quantity not above the
    /// filled quantity).
    InvalidAmend = 23,
    /// The fee account cannot place orders or send transfers.
    FeeAccount = 24,
    /// A transfer's idempotency key was used by a transfer with other terms (recipient, asset or
    /// amount): nothing moved.
    TransferKeyReused = 25,
    /// A credit's idempotency key was used by a credit with other terms (account, asset or
    /// amount): nothing credited.
    CreditKeyReused = 26,
}

impl RejectCode {
    /// The stable numeric code.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// A short lower-case description.
    pub fn message(self) -> &'static str {
        match self {
            RejectCode::ZeroQuantity => "quantity or amount is zero",
            RejectCode::PriceOffTick => "price is zero or not a multiple of the tick size",
            RejectCode::QtyOffLot => "quantity is not a multiple of the lot size or out of range",
            RejectCode::BelowMinNotional => "order value is below the minimum notional",
            RejectCode::OutsidePriceBand => "price is outside the market's price band",
            RejectCode::UnknownMarket => "unknown market",
            RejectCode::UnknownAccount => "unknown account",
            RejectCode::UnknownOrder => "unknown order",
            RejectCode::DuplicateClientId => "client order id already used by an open order",
            RejectCode::InsufficientBalance => "insufficient balance",
            RejectCode::PostOnlyWouldTake => "post-only order would take liquidity",
            RejectCode::FokCannotFill => "fill-or-kill order cannot be filled in full",
            RejectCode::BookFull => "order book is full",
            RejectCode::AccountOrderLimit => "too many open orders for this account",
            RejectCode::EngineBusy => "engine busy, try again",
            RejectCode::UnknownAsset => "unknown asset",
            RejectCode::UnknownWithdrawal => "unknown withdrawal",
            RejectCode::DuplicateWithdrawal => "duplicate withdrawal id",
            RejectCode::InvalidAmount => "invalid amount",
            RejectCode::InvalidOrder => "invalid order parameters",
            RejectCode::AccountLimit => "account limit reached",
            RejectCode::SelfTransfer => "transfer to the same account",
            RejectCode::InvalidAmend => "order cannot be amended this way",
            RejectCode::FeeAccount => "the fee account cannot do this",
            RejectCode::TransferKeyReused => "idempotency key already used for another transfer",
            RejectCode::CreditKeyReused => "idempotency key already used for another credit",
        }
    }
}

impl std::fmt::Display for RejectCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message(), self.code())
    }
}
