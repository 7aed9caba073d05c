//! Commands: the only way to change the engine. Each is applied atomically by the single writer:
//! accepted in full, or rejected with a [`RejectCode`](crate::RejectCode) and no change at all.

use crate::units::{
    AccountId, Amount, AssetId, ClientOrderId, IdempotencyKey, MarketId, OrderId, Price, Qty, Side,
    Timestamp, WithdrawalId,
};
use serde::{Deserialize, Serialize};

/// How long a limit order may rest.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum TimeInForce {
    /// Good till cancelled.
    Gtc,
    /// Immediate or cancel: fill what can be filled now, cancel the rest.
    Ioc,
    /// Fill or kill: fill all of it now, or reject the whole order.
    Fok,
    /// Good till date: rests until cancelled or until this time, then expires.
    Gtd(Timestamp),
}

/// Self-trade prevention: what happens when a taker would trade with a resting order of its own
/// account. The taker's mode decides.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub enum StpMode {
    /// Allow the self-trade.
    None,
    /// Expire the rest of the taker order.
    #[default]
    ExpireTaker,
    /// Expire the resting (maker) order and keep matching.
    ExpireMaker,
    /// Expire both.
    ExpireBoth,
}

/// What is being ordered.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum OrderType {
    /// A limit order.
    Limit {
        /// Limit price.
        price: Price,
        /// Quantity.
        qty: Qty,
    },
    /// A market order for a quantity of base (the rest is cancelled when the book runs out).
    Market {
        /// Quantity.
        qty: Qty,
    },
    /// A market order for an amount of quote: a buy spends at most `budget` (fees included), a
    /// sell sells until it has received `budget` before fees (Binance's `quoteOrderQty`).
    MarketBudget {
        /// Quote amount.
        budget: Amount,
    },
    /// A limit order that is placed when the last trade price reaches `stop` (at or above it for
    /// a buy, at or below for a sell).
    StopLimit {
        /// Trigger price.
        stop: Price,
        /// Limit price once triggered.
        price: Price,
        /// Quantity.
        qty: Qty,
    },
    /// A market order for `qty` placed when the last trade price reaches `stop`.
    StopMarket {
        /// Trigger price.
        stop: Price,
        /// Quantity.
        qty: Qty,
    },
    /// The mirror of [`OrderType::StopLimit`] (Binance's `TAKE_PROFIT_LIMIT`): a limit order
    /// placed when the last trade price reaches `stop` from the other side (at or below it for a
    /// buy, at or above for a sell).
    TakeProfitLimit {
        /// Trigger price.
        stop: Price,
        /// Limit price once triggered.
        price: Price,
        /// Quantity.
        qty: Qty,
    },
    /// The mirror of [`OrderType::StopMarket`] (Binance's `TAKE_PROFIT`): a market order for
    /// `qty` placed when the last trade price is at or below `stop` (buy) or at or above (sell).
    TakeProfitMarket {
        /// Trigger price.
        stop: Price,
        /// Quantity.
        qty: Qty,
    },
}

/// Which way the last trade price must move to trigger a waiting order.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Trigger {
    /// When the last price is at or above the trigger price (stop buy, take-profit sell).
    Rise,
    /// When the last price is at or below the trigger price (stop sell, take-profit buy).
    Fall,
}

impl OrderType {
    /// The trigger price of a stop or take-profit order.
    #[inline]
    pub fn trigger_price(&self) -> Option<Price> {
        match *self {
            OrderType::StopLimit { stop, .. }
            | OrderType::StopMarket { stop, .. }
            | OrderType::TakeProfitLimit { stop, .. }
            | OrderType::TakeProfitMarket { stop, .. } => Some(stop),
            _ => None,
        }
    }

    /// The trigger price and direction of a stop or take-profit order placed on `side`.
    #[inline]
    pub fn trigger(&self, side: Side) -> Option<(Trigger, Price)> {
        let rise = match (self, side) {
            (OrderType::StopLimit { .. } | OrderType::StopMarket { .. }, Side::Buy)
            | (
                OrderType::TakeProfitLimit { .. } | OrderType::TakeProfitMarket { .. },
                Side::Sell,
            ) => true,
            (OrderType::StopLimit { .. } | OrderType::StopMarket { .. }, Side::Sell)
            | (OrderType::TakeProfitLimit { .. } | OrderType::TakeProfitMarket { .. }, Side::Buy) => {
                false
            }
            _ => return None,
        };
        let stop = self.trigger_price()?;
        Some((if rise { Trigger::Rise } else { Trigger::Fall }, stop))
    }

    /// The limit price (limit, stop-limit and take-profit-limit orders).
    #[inline]
    pub fn limit_price(&self) -> Option<Price> {
        match *self {
            OrderType::Limit { price, .. }
            | OrderType::StopLimit { price, .. }
            | OrderType::TakeProfitLimit { price, .. } => Some(price),
            _ => None,
        }
    }

    /// The quantity, for every type but a quote-budget market order.
    #[inline]
    pub fn qty(&self) -> Option<Qty> {
        match *self {
            OrderType::Limit { qty, .. }
            | OrderType::Market { qty }
            | OrderType::StopLimit { qty, .. }
            | OrderType::StopMarket { qty, .. }
            | OrderType::TakeProfitLimit { qty, .. }
            | OrderType::TakeProfitMarket { qty, .. } => Some(qty),
            OrderType::MarketBudget { .. } => None,
        }
    }
}

/// A new order.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct NewOrder {
    /// Owner.
    pub account: AccountId,
    /// Market.
    pub market: MarketId,
    /// Buy or sell.
    pub side: Side,
    /// Type, price and quantity.
    pub order_type: OrderType,
    /// Time in force (limit and stop-limit orders; market orders are always IOC).
    pub tif: TimeInForce,
    /// Rejected instead of taking liquidity (limit orders only).
    pub post_only: bool,
    /// Self-trade prevention mode.
    pub stp: StpMode,
    /// Optional client order id, unique among the account's open orders.
    pub client_id: Option<ClientOrderId>,
}

/// A one-cancels-the-other pair (Binance's OCO), placed as one command: both legs or neither.
///
/// `legs[0]` is the *above* leg and `legs[1]` the *below* leg. Both have the same account,
/// market, side and quantity. On a sell, the above leg is a limit maker (`Limit` with
/// `post_only`) or a take-profit order and the below leg a stop; on a buy, the above leg is a
/// stop and the below leg a limit maker or a take-profit order. The above leg's price (its limit
/// price for a limit maker, else its trigger price) is above the last trade price and the below
/// leg's is under it, so neither trades or triggers when placed.
///
/// The first thing that happens to either leg (a fill, even partial; a trigger; a cancel; an
/// expiry) cancels the other, and the list is done. The pair holds once: a sell its base
/// quantity, a buy the larger of its legs' quote needs.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct NewOco {
    /// `[above, below]`.
    pub legs: [NewOrder; 2],
    /// The list's client id (Binance's `listClientOrderId`), if any.
    pub list_client_id: Option<ClientOrderId>,
}

/// A one-triggers-the-other list (Binance's OTO): a *working* limit order placed now and a
/// *pending* order placed when the working order is completely filled.
///
/// The working order is a `Limit` (GTC, GTD, IOC or FOK; `post_only` for Binance's
/// `LIMIT_MAKER`). The pending order is any order type but a quote-budget market order, on the
/// same account and market, either side. It holds nothing and is not in the book until it is
/// placed; when placed it is checked and held like a new order at that moment, and refused
/// cleanly (the list ends, nothing else changes) if it no longer fits (balance, price band,
/// limits). A cancel of either order, or the working order leaving unfilled, ends the list.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct NewOto {
    /// The working order.
    pub working: NewOrder,
    /// The pending order.
    pub pending: NewOrder,
    /// The list's client id (Binance's `listClientOrderId`), if any.
    pub list_client_id: Option<ClientOrderId>,
}

/// A one-triggers-a-one-cancels-the-other list (Binance's OTOCO): a working limit order as in
/// [`NewOto`] and a pending OCO pair ([`NewOco`], `[above, below]`) placed as one OCO when the
/// working order is completely filled; from then on it is an OCO under the same list id.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct NewOtoco {
    /// The working order.
    pub working: NewOrder,
    /// The pending pair, `[above, below]`.
    pub pending: [NewOrder; 2],
    /// The list's client id (Binance's `listClientOrderId`), if any.
    pub list_client_id: Option<ClientOrderId>,
}

/// Which order a cancel or amend is about.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum OrderRef {
    /// By engine order id.
    Id(OrderId),
    /// By client order id (among the account's open orders).
    Client(ClientOrderId),
}

/// A command to the engine.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Command {
    /// Opens a new account; the engine assigns its id.
    CreateAccount,
    /// Places an order.
    NewOrder(NewOrder),
    /// Cancels one open order of `account`.
    Cancel {
        /// Owner.
        account: AccountId,
        /// Market.
        market: MarketId,
        /// Which order.
        order: OrderRef,
    },
    /// Cancels all open orders of `account`, in one market or in all.
    CancelAll {
        /// Owner.
        account: AccountId,
        /// Only this market, or all.
        market: Option<MarketId>,
    },
    /// Changes a resting limit order. Lowering the quantity keeps time priority; a new price or a
    /// higher quantity loses it (and a new price may trade at once).
    Amend {
        /// Owner.
        account: AccountId,
        /// Market.
        market: MarketId,
        /// Which order.
        order: OrderRef,
        /// New limit price, or unchanged.
        new_price: Option<Price>,
        /// New total quantity (filled included, as Binance), or unchanged.
        new_qty: Option<Qty>,
    },
    /// Credits a deposit. Idempotent: a second credit with the same key changes nothing and is
    /// accepted as a duplicate.
    Credit {
        /// Beneficiary.
        account: AccountId,
        /// Asset.
        asset: AssetId,
        /// Amount (more than zero).
        amount: Amount,
        /// E.g. the deposit's outpoint.
        key: IdempotencyKey,
    },
    /// Holds `amount + fee` of `account` for a withdrawal.
    WithdrawHold {
        /// Owner.
        account: AccountId,
        /// Asset.
        asset: AssetId,
        /// Amount paid out.
        amount: Amount,
        /// Flat withdrawal fee charged to the user.
        fee: Amount,
        /// Unique id chosen by the custody service.
        id: WithdrawalId,
    },
    /// Gives a held withdrawal back to the account (it could not be paid).
    WithdrawRelease {
        /// The withdrawal.
        id: WithdrawalId,
    },
    /// Completes a held withdrawal: `amount` leaves the ledger, `network_fee` (at most the flat
    /// fee) leaves it too, and the rest of the flat fee goes to the fee account.
    WithdrawComplete {
        /// The withdrawal.
        id: WithdrawalId,
        /// Its share of the network fee actually paid.
        network_fee: Amount,
    },
    /// Moves `amount` from one account to another at once. Idempotent by `key`.
    Transfer {
        /// Payer.
        from: AccountId,
        /// Payee.
        to: AccountId,
        /// Asset.
        asset: AssetId,
        /// Amount (more than zero).
        amount: Amount,
        /// Idempotency key.
        key: IdempotencyKey,
    },
    /// Advances time only: expires GTD orders whose time has come.
    Tick,
    /// A read-only query: the engine's record of a withdrawal (held, released or completed, with
    /// account, asset, amount and fee), answered by one [`Event::WithdrawalStatus`](crate::Event).
    /// It changes nothing: it never advances `seq` or the engine's time, expires nothing, and is
    /// therefore never journaled. Custody resolves an *unknown* outcome with it.
    WithdrawalStatus {
        /// The withdrawal.
        id: WithdrawalId,
    },
    /// A read-only query like [`Command::WithdrawalStatus`]: whether a credit with this key was
    /// applied, answered by one [`Event::CreditStatus`](crate::Event). Custody's reconciliation
    /// checks every credited deposit with it.
    CreditStatus {
        /// The credit's idempotency key.
        key: IdempotencyKey,
    },
    /// Places a one-cancels-the-other pair ([`NewOco`]). A cancel of either leg cancels both.
    /// (Last, so the journal encoding of the older commands is unchanged.)
    NewOco(Box<NewOco>),
    /// Places a one-triggers-the-other list ([`NewOto`]).
    NewOto(Box<NewOto>),
    /// Places a working order with a pending OCO pair ([`NewOtoco`]).
    NewOtoco(Box<NewOtoco>),
    /// Lowers a resting limit order's total quantity in place, keeping its time priority
    /// (Binance's `order/amend/keepPriority`). The condition is the engine's, checked against
    /// the order as it stands when the command applies: a `new_qty` not below the order's
    /// current total is refused (`InvalidAmend`), never taken as an increase. (A gateway that
    /// checked it against its read model and sent [`Command::Amend`] could raise what a
    /// concurrent amend had just lowered.) Appended last: journals written before it still
    /// decode.
    AmendKeepPriority {
        /// Owner.
        account: AccountId,
        /// Market.
        market: MarketId,
        /// Which order.
        order: OrderRef,
        /// New total quantity (filled included), below the current one.
        new_qty: Qty,
    },
    /// A read-only query like [`Command::CreditStatus`]: whether a transfer with this key was
    /// applied, answered by one [`Event::TransferStatus`](crate::Event). The gateway asks it
    /// before refusing a transfer on a rule that may have changed since (a flag, a withdrawal
    /// policy): a retry of an applied transfer is answered with its outcome, never "refused".
    /// Appended last (never journaled, but the encoding of the others stays as it was).
    TransferStatus {
        /// The transfer's idempotency key.
        key: IdempotencyKey,
    },
}

impl Command {
    /// True for commands that place or change orders (the order path).
    pub fn is_order_path(&self) -> bool {
        matches!(
            self,
            Command::NewOrder(_)
                | Command::NewOco(_)
                | Command::NewOto(_)
                | Command::NewOtoco(_)
                | Command::Cancel { .. }
                | Command::CancelAll { .. }
                | Command::Amend { .. }
                | Command::AmendKeepPriority { .. }
        )
    }
}
