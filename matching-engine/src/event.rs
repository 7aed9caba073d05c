//! Events: everything the engine did, in order. A consumer holding the events can rebuild balances,
//! orders and every book exactly.

use crate::command::{NewOrder, OrderType, StpMode, TimeInForce};
use crate::engine::{OtoOutcome, Withdrawal};
use crate::reject::RejectCode;
use crate::units::{
    AccountId, Amount, AssetId, ClientOrderId, IdempotencyKey, ListId, MarketId, OrderId, Price,
    Qty, Side, Timestamp, TradeId, WithdrawalId,
};
use serde::{Deserialize, Serialize};

/// Why an order left the book (or never entered it).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum DoneReason {
    /// Completely filled.
    Filled,
    /// Cancelled by its owner (cancel or cancel-all).
    Cancelled,
    /// An IOC or market order's unfilled rest.
    IocRemainder,
    /// A GTD order reached its expiry time.
    Expired,
    /// Expired by self-trade prevention.
    SelfTrade,
    /// A market order (or triggered stop-market) that could not be paid for or priced.
    InsufficientBalance,
}

/// A change of one order's state.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct OrderInfo {
    /// Order id.
    pub order: OrderId,
    /// Owner.
    pub account: AccountId,
    /// Market.
    pub market: MarketId,
    /// Side.
    pub side: Side,
    /// Client order id, if any.
    pub client_id: Option<ClientOrderId>,
}

/// Something that happened.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Event {
    /// The command was accepted: the first event of the command's own events (only the events of
    /// GTD orders that expired at the command's time come before it). `order` is the new order's
    /// id for `NewOrder`, `account` the new account for `CreateAccount`.
    Accepted {
        /// Engine sequence number of the command (gap-free over accepted commands).
        seq: u64,
        /// Time of the command.
        time: Timestamp,
        /// The new order, if the command created one.
        order: Option<OrderId>,
        /// The new account, if the command created one.
        account: Option<AccountId>,
        /// True when an idempotent command had been applied already (and changed nothing now).
        duplicate: bool,
        /// For a duplicate transfer: the sequence number of the command that applied it, so that
        /// a retry answers the transfer's own id (`None` for other commands, and for a transfer
        /// key restored from a snapshot older than format 7).
        original: Option<u64>,
    },
    /// The command was rejected and changed nothing: its only event (after the events of GTD
    /// orders that expired at its time, if any).
    Rejected {
        /// Why.
        code: RejectCode,
    },
    /// An order was accepted into the engine (it may trade at once, rest, or wait as a stop).
    OrderNew {
        /// Which order.
        info: OrderInfo,
        /// Type, price and quantity as placed.
        order_type: OrderType,
        /// Time in force.
        tif: TimeInForce,
        /// Post-only.
        post_only: bool,
        /// Self-trade prevention.
        stp: StpMode,
    },
    /// A stop order was triggered by the last trade price and now acts as its limit or market order.
    OrderTriggered {
        /// Which order.
        info: OrderInfo,
        /// The last trade price that triggered it.
        last_price: Price,
    },
    /// A resting order was amended.
    OrderAmended {
        /// Which order.
        info: OrderInfo,
        /// Its (possibly new) limit price.
        price: Price,
        /// Its new total quantity (filled included).
        qty: Qty,
        /// Its open quantity now.
        remaining: Qty,
        /// True when it kept its time priority.
        kept_priority: bool,
    },
    /// A trade. Trades happen at the maker's price.
    Trade {
        /// Trade id.
        trade: TradeId,
        /// Market.
        market: MarketId,
        /// Price (the maker's).
        price: Price,
        /// Quantity.
        qty: Qty,
        /// The taker's side.
        taker_side: Side,
        /// Resting order.
        maker_order: OrderId,
        /// Incoming order.
        taker_order: OrderId,
        /// Resting order's owner.
        maker_account: AccountId,
        /// Incoming order's owner.
        taker_account: AccountId,
        /// Fee paid by the maker, in quote.
        maker_fee: Amount,
        /// Fee paid by the taker, in quote.
        taker_fee: Amount,
        /// Quote value of the trade (`price * qty * tick_size`).
        notional: Amount,
        /// The maker's open quantity after this trade.
        maker_remaining: Qty,
        /// The taker's open quantity after this trade.
        taker_remaining: Qty,
    },
    /// An order left the book, or ended without resting.
    OrderDone {
        /// Which order.
        info: OrderInfo,
        /// Why.
        reason: DoneReason,
        /// Quantity filled over its life.
        filled: Qty,
        /// Quote value of its fills over its life (the sum of its trades' `notional`; Binance's
        /// `cummulativeQuoteQty`). For an order resting when a format-3 snapshot was upgraded,
        /// only the fills since.
        quote: Amount,
        /// Quantity that was still open and is now gone (zero when filled).
        remaining: Qty,
    },
    /// An account's balance of one asset changed; the new values.
    Balance {
        /// Account.
        account: AccountId,
        /// Asset.
        asset: AssetId,
        /// Available (free) balance.
        available: Amount,
        /// Held balance (open orders and withdrawals).
        held: Amount,
    },
    /// An aggregated price level changed. `seq` is gap-free per market, so a client holding a
    /// depth snapshot at sequence `s` applies the diffs `s+1, s+2, ...` and has the book exactly.
    Depth {
        /// Market.
        market: MarketId,
        /// Per-market depth sequence number.
        seq: u64,
        /// Side of the level.
        side: Side,
        /// Price of the level.
        price: Price,
        /// Total open quantity at the level now (zero: the level is gone).
        qty: Qty,
    },
    /// An account was created.
    AccountCreated {
        /// Its id.
        account: AccountId,
    },
    /// A deposit was credited.
    Credited {
        /// Beneficiary.
        account: AccountId,
        /// Asset.
        asset: AssetId,
        /// Amount.
        amount: Amount,
        /// Idempotency key.
        key: IdempotencyKey,
    },
    /// Funds were held for a withdrawal.
    WithdrawalHeld {
        /// Withdrawal id.
        id: WithdrawalId,
        /// Owner.
        account: AccountId,
        /// Asset.
        asset: AssetId,
        /// Amount.
        amount: Amount,
        /// Flat fee.
        fee: Amount,
    },
    /// A held withdrawal was given back.
    WithdrawalReleased {
        /// Withdrawal id.
        id: WithdrawalId,
        /// Owner.
        account: AccountId,
    },
    /// A withdrawal was paid and left the ledger.
    WithdrawalCompleted {
        /// Withdrawal id.
        id: WithdrawalId,
        /// Owner.
        account: AccountId,
        /// Network fee share that left the ledger with it.
        network_fee: Amount,
    },
    /// An instant transfer.
    Transferred {
        /// Payer.
        from: AccountId,
        /// Payee.
        to: AccountId,
        /// Asset.
        asset: AssetId,
        /// Amount.
        amount: Amount,
        /// Idempotency key.
        key: IdempotencyKey,
    },
    /// The answer to [`Command::WithdrawalStatus`](crate::Command::WithdrawalStatus): the
    /// engine's record of the withdrawal, `None` when it never held one with this id. The query's
    /// only event; it is never part of a published batch's state changes.
    WithdrawalStatus {
        /// Withdrawal id.
        id: WithdrawalId,
        /// The record, if any.
        withdrawal: Option<Withdrawal>,
    },
    /// The answer to [`Command::CreditStatus`](crate::Command::CreditStatus).
    CreditStatus {
        /// The key asked about.
        key: IdempotencyKey,
        /// True when a credit with this key was applied.
        credited: bool,
    },
    /// The answer to [`Command::TransferStatus`](crate::Command::TransferStatus).
    TransferStatus {
        /// The key asked about.
        key: IdempotencyKey,
        /// True when a transfer with this key was applied.
        transferred: bool,
    },
    /// An order list (OCO) was placed: its legs follow as [`Event::OrderNew`]s (Binance's
    /// `listStatusType` `EXEC_STARTED`).
    OrderListNew {
        /// The list.
        list: ListId,
        /// Owner.
        account: AccountId,
        /// Market.
        market: MarketId,
        /// `[above, below]`.
        legs: [OrderId; 2],
        /// The list's client id.
        client_id: Option<ClientOrderId>,
    },
    /// An order list is done (`ALL_DONE`): one leg filled, triggered, was cancelled or expired,
    /// and the other was cancelled (its [`Event::OrderDone`] comes before this).
    OrderListDone {
        /// The list.
        list: ListId,
        /// Owner.
        account: AccountId,
        /// Market.
        market: MarketId,
    },
    /// An OTO or OTOCO list was placed (`EXEC_STARTED`): its pending orders follow as
    /// [`Event::OrderPending`]s, then its working order's [`Event::OrderNew`].
    OtoNew {
        /// The list.
        list: ListId,
        /// Owner.
        account: AccountId,
        /// Market.
        market: MarketId,
        /// The working order.
        working: OrderId,
        /// The list's client id.
        client_id: Option<ClientOrderId>,
        /// True for an OTOCO (two pending orders, an OCO pair once placed).
        otoco: bool,
    },
    /// A pending order of the OTO or OTOCO list of the [`Event::OtoNew`] just before it
    /// (Binance's `PENDING_NEW`): its id is assigned, it holds nothing and is not in the book
    /// until its working order is completely filled. (No list id: `Event` stays 112 bytes.)
    OrderPending {
        /// The pending order's id.
        order: OrderId,
        /// The order as it will be placed.
        new: NewOrder,
    },
    /// An OTO or OTOCO list's pending phase ended: its pending order(s) were placed (their
    /// [`Event::OrderNew`]s, for an OTOCO after an [`Event::OrderListNew`] with the same list
    /// id, come before this), refused when placed, or cancelled with the working order.
    OtoDone {
        /// The list.
        list: ListId,
        /// Owner.
        account: AccountId,
        /// Market.
        market: MarketId,
        /// What happened to the pending order(s).
        outcome: OtoOutcome,
    },
}
