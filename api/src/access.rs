//! Who may call what, where, and who is calling.
//!
//! * [`ROUTES`] is the one permission table: every endpoint the router serves, with its method,
//!   its [`Access`] (public, an API key, or a signed request) and the permission the key needs,
//!   its request weight, and the [`Listener`] it is served on. The router is built from this
//!   table and nothing else ([`router`]), and [`crate::state::AppState::signed`] takes the
//!   permission and weight of the matched entry: a handler cannot ask for less. `api/README.md`
//!   prints the same table; `tests/routes.rs` walks the router against it and runs every route
//!   with every permission set.
//! * [`client_ip`]: the client's address, from a trusted reverse proxy's header only when the
//!   connection comes from that proxy ([`TrustedProxy`]).
//!
//! **Architecture invariant:** a route exists only through a [`ROUTES`] entry; a signed route's
//! permission is checked after its signature verified and before its handler reads a parameter,
//! so a refused key changes nothing (`-2015`).

use crate::keys::Perms;
use crate::state::AppState;
use axum::routing::MethodRouter;
use axum::Router;
use std::net::IpAddr;

/// How a route authenticates its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No key: market data, the checkout and point-of-sale pages, WebSocket upgrades (the
    /// WebSocket API signs its own messages, `read`).
    Public,
    /// An API key in `X-MBX-APIKEY` without a signature, holding these permissions
    /// (Binance's `USER_STREAM` and `MARKET_DATA`). Charged to the IP only.
    Key(Perms),
    /// A signed request (`timestamp`, `signature`) whose key holds these permissions.
    Signed(Perms),
    /// A BTCPay Greenfield request (`Authorization: token <greenfieldToken>`) whose key holds
    /// the Mediator permissions this BTCPay permission maps to ([`Greenfield::perms`]); a
    /// `{storeId}` in the path must be the key's own account's store (otherwise `403
    /// missing-permission`, as BTCPay answers for a store the key has no right on).
    Token(Greenfield),
    /// A store-dashboard page: the session cookie of a store owner who logged in (the
    /// `merchant` crate's dashboard checks it); a form that changes something also needs the session's
    /// CSRF token and a same-site `Origin`. Without a live session a GET redirects to the login
    /// page and anything else is `401`, nothing changed. Charged to the IP.
    Session,
}

/// BTCPay's permission names, as Greenfield clients ask for them: each is a store-permission
/// bit of [`Perms`] (held by `merchant` keys and by keys made with BTCPay's names, see
/// [`Perms::implied`]); `GET /api/v1/api-keys/current` lists those a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greenfield {
    /// Any live token (server info, the key's own description).
    Any,
    /// `btcpay.store.canviewstoresettings`.
    ViewStoreSettings,
    /// `btcpay.store.canmodifystoresettings`.
    ModifyStoreSettings,
    /// `btcpay.store.canviewinvoices`.
    ViewInvoices,
    /// `btcpay.store.cancreateinvoice`.
    CreateInvoice,
    /// `btcpay.store.canmodifyinvoices`.
    ModifyInvoices,
    /// `btcpay.store.webhooks.canmodifywebhooks`.
    ModifyWebhooks,
    /// `btcpay.store.canmanagepullpayments` (create and archive them; approve or cancel their
    /// payouts, as in BTCPay 1.x), + **withdraw**, because a pull payment's id is the right to
    /// claim it to any address and an approval pays a claim out.
    ManagePullPayments,
    /// `btcpay.store.cancreatepullpayments`, + **withdraw**, because whoever holds the pull
    /// payment's link sends its money to any address (ADR 0008: money out is never a store
    /// permission alone).
    CreatePullPayments,
    /// `btcpay.store.cancreatenonapprovedpullpayments` (refunds, which BTCPay's plugins ask
    /// for): pull payments whose claims wait for the store's approval. No **withdraw**: nothing
    /// leaves the store until an approval, which needs [`Greenfield::ManagePullPayments`] (or
    /// the dashboard and its password).
    CreateNonApprovedPullPayments,
    /// `btcpay.store.canviewpullpayments` (list them), + **withdraw**: the list holds their
    /// ids, and an id whose claims are paid when made sends the store's money to any address.
    ViewPullPayments,
    /// `btcpay.store.canarchivepullpayments`: archive one, which takes no more claims and
    /// cancels those waiting for approval. No **withdraw**: it only stops money going out.
    ArchivePullPayments,
    /// `btcpay.store.canmanagepayouts` (approve or cancel a payout), + **withdraw**: an
    /// approval pays a claim out.
    ManagePayouts,
    /// `btcpay.store.canviewpayouts` (list payouts: destinations, amounts, states).
    ViewPayouts,
}

impl Greenfield {
    /// Every store permission, in the order `api-keys/current` lists them.
    pub const STORE: [Greenfield; 13] = [
        Greenfield::ViewStoreSettings,
        Greenfield::ModifyStoreSettings,
        Greenfield::ViewInvoices,
        Greenfield::CreateInvoice,
        Greenfield::ModifyInvoices,
        Greenfield::ModifyWebhooks,
        Greenfield::ManagePullPayments,
        Greenfield::CreatePullPayments,
        Greenfield::CreateNonApprovedPullPayments,
        Greenfield::ViewPullPayments,
        Greenfield::ArchivePullPayments,
        Greenfield::ManagePayouts,
        Greenfield::ViewPayouts,
    ];

    /// BTCPay's name (`""` for [`Greenfield::Any`]).
    pub const fn name(self) -> &'static str {
        match self {
            Greenfield::Any => "",
            Greenfield::ViewStoreSettings => "btcpay.store.canviewstoresettings",
            Greenfield::ModifyStoreSettings => "btcpay.store.canmodifystoresettings",
            Greenfield::ViewInvoices => "btcpay.store.canviewinvoices",
            Greenfield::CreateInvoice => "btcpay.store.cancreateinvoice",
            Greenfield::ModifyInvoices => "btcpay.store.canmodifyinvoices",
            Greenfield::ModifyWebhooks => "btcpay.store.webhooks.canmodifywebhooks",
            Greenfield::ManagePullPayments => "btcpay.store.canmanagepullpayments",
            Greenfield::CreatePullPayments => "btcpay.store.cancreatepullpayments",
            Greenfield::CreateNonApprovedPullPayments => {
                "btcpay.store.cancreatenonapprovedpullpayments"
            }
            Greenfield::ViewPullPayments => "btcpay.store.canviewpullpayments",
            Greenfield::ArchivePullPayments => "btcpay.store.canarchivepullpayments",
            Greenfield::ManagePayouts => "btcpay.store.canmanagepayouts",
            Greenfield::ViewPayouts => "btcpay.store.canviewpayouts",
        }
    }

    /// The stored permissions a key needs for it.
    pub const fn perms(self) -> Perms {
        match self {
            Greenfield::Any => Perms::NONE,
            Greenfield::ViewStoreSettings => Perms::VIEW_STORE_SETTINGS,
            Greenfield::ModifyStoreSettings => Perms::MODIFY_STORE_SETTINGS,
            Greenfield::ViewInvoices => Perms::VIEW_INVOICES,
            Greenfield::CreateInvoice => Perms::CREATE_INVOICE,
            Greenfield::ModifyInvoices => Perms::MODIFY_INVOICES,
            Greenfield::ModifyWebhooks => Perms::MODIFY_WEBHOOKS,
            Greenfield::ManagePullPayments => Perms::MANAGE_PULL_PAYMENTS.with(Perms::WITHDRAW),
            Greenfield::CreatePullPayments => Perms::CREATE_PULL_PAYMENTS.with(Perms::WITHDRAW),
            Greenfield::CreateNonApprovedPullPayments => Perms::CREATE_NON_APPROVED_PULL_PAYMENTS,
            Greenfield::ViewPullPayments => Perms::VIEW_PULL_PAYMENTS.with(Perms::WITHDRAW),
            Greenfield::ArchivePullPayments => Perms::ARCHIVE_PULL_PAYMENTS,
            Greenfield::ManagePayouts => Perms::MANAGE_PAYOUTS.with(Perms::WITHDRAW),
            Greenfield::ViewPayouts => Perms::VIEW_PAYOUTS,
        }
    }
}

/// Which listener serves a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The public address (trading, custody, merchant API, checkout pages).
    Public,
    /// The operator address (`admin_listen`, default `127.0.0.1:8081`): `/mapi/v1/admin/*` and
    /// `/metrics`.
    Admin,
}

/// One row of the permission table.
#[derive(Debug)]
pub struct Route {
    /// `GET`, `POST`, `PUT` or `DELETE`.
    pub method: &'static str,
    /// The path as the router matches it (`/i/{id}`).
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
    /// Request weight charged per call to the IP and, once the signature verified, to the key;
    /// `None`: the handler computes it from its parameters (public market data).
    pub weight: Option<u64>,
    /// Where it is served.
    pub listener: Listener,
    /// A parameter that, when sent, needs one more permission: a merchant refund to an
    /// `address` needs `withdraw` (a refund `toAccount` goes back to the payer only).
    pub also: Option<(&'static str, Perms)>,
    handler: fn() -> MethodRouter<AppState>,
    /// The handler's path as written in the table (`t::new_order`): the WebSocket API calls
    /// the same function directly and a test compares the names ([`crate::wsapi::METHODS`]).
    pub handler_name: &'static str,
}

impl Route {
    /// A row: `handler` builds the route's method router (what [`route!`](crate::route) writes).
    #[allow(clippy::too_many_arguments)]
    pub const fn new(
        method: &'static str,
        path: &'static str,
        access: Access,
        weight: Option<u64>,
        listener: Listener,
        also: Option<(&'static str, Perms)>,
        handler: fn() -> MethodRouter<AppState>,
        handler_name: &'static str,
    ) -> Self {
        Self {
            method,
            path,
            access,
            weight,
            listener,
            also,
            handler,
            handler_name,
        }
    }
}

/// The method routers [`route!`](crate::route) builds (for the tables of other crates).
#[doc(hidden)]
pub use axum::routing as routing_fns;

use Access::{Key, Public, Signed};
use Listener::Admin as A;
use Listener::Public as P;

const R: Perms = Perms::READ;
const T: Perms = Perms::TRADE;
const W: Perms = Perms::WITHDRAW;
const ADM: Perms = Perms::ADMIN;
const X: Perms = Perms::TRANSFER;
const K: Perms = Perms::KEYS;

/// One row of a permission table: `route!(method, path, access, weight, listener, handler)`,
/// with an optional last argument for [`Route::also`]. Other crates build their tables with it
/// ([`crate::app::app_with`] serves several).
#[macro_export]
macro_rules! route {
    ($m:literal, $path:literal, $access:expr, $w:expr, $l:expr, $h:expr) => {
        $crate::route!($m, $path, $access, $w, $l, $h, None)
    };
    ($m:literal, $path:literal, $access:expr, $w:expr, $l:expr, $h:expr, $also:expr) => {
        $crate::access::Route::new(
            $m,
            $path,
            $access,
            $w,
            $l,
            $also,
            || match $m {
                "GET" => $crate::access::routing_fns::get($h),
                "POST" => $crate::access::routing_fns::post($h),
                "PUT" => $crate::access::routing_fns::put($h),
                _ => $crate::access::routing_fns::delete($h),
            },
            stringify!($h),
        )
    };
}

/// The permission table of this crate's endpoints (printed in `api/README.md`, "Permissions",
/// with the tables of the crates composed over it, e.g. `merchant::ROUTES`).
pub static ROUTES: &[Route] = {
    use crate::capital as c;
    use crate::catalog as cat;
    use crate::lightning as ln;
    use crate::{
        metrics, native as n, openapi, orderlist as ol, proofs as pr, public as p, trade as t, ws,
    };
    &[
        // Market data.
        route!("GET", "/api/v3/ping", Public, None, P, p::ping),
        route!("GET", "/api/v3/time", Public, None, P, p::time),
        route!(
            "GET",
            "/api/v3/exchangeInfo",
            Public,
            None,
            P,
            p::exchange_info
        ),
        route!("GET", "/api/v3/depth", Public, None, P, p::depth),
        route!("GET", "/api/v3/trades", Public, None, P, p::trades),
        route!("GET", "/api/v3/aggTrades", Public, None, P, p::agg_trades),
        route!(
            "GET",
            "/api/v3/historicalTrades",
            Key(Perms::NONE),
            Some(25),
            P,
            p::historical_trades
        ),
        route!("GET", "/api/v3/avgPrice", Public, None, P, p::avg_price),
        route!(
            "GET",
            "/api/v3/ticker/24hr",
            Public,
            None,
            P,
            p::ticker_24hr
        ),
        route!(
            "GET",
            "/api/v3/ticker/price",
            Public,
            None,
            P,
            p::ticker_price
        ),
        route!(
            "GET",
            "/api/v3/ticker/bookTicker",
            Public,
            None,
            P,
            p::book_ticker
        ),
        route!("GET", "/api/v3/klines", Public, None, P, p::klines),
        route!("GET", "/api/v3/uiKlines", Public, None, P, p::klines),
        // 4 per symbol, at most 200 (the handler charges it).
        route!("GET", "/api/v3/ticker", Public, None, P, p::ticker_window),
        route!(
            "GET",
            "/api/v3/ticker/tradingDay",
            Public,
            None,
            P,
            p::ticker_trading_day
        ),
        route!(
            "GET",
            "/sapi/v1/system/status",
            Public,
            None,
            P,
            p::system_status
        ),
        // Trading.
        route!("POST", "/api/v3/order", Signed(T), Some(1), P, t::new_order),
        route!("GET", "/api/v3/order", Signed(R), Some(4), P, t::get_order),
        route!(
            "DELETE",
            "/api/v3/order",
            Signed(T),
            Some(1),
            P,
            t::cancel_order
        ),
        route!(
            "POST",
            "/api/v3/order/test",
            Signed(T),
            Some(1),
            P,
            t::test_order
        ),
        route!(
            "POST",
            "/api/v3/order/cancelReplace",
            Signed(T),
            Some(1),
            P,
            t::cancel_replace
        ),
        route!(
            "PUT",
            "/api/v3/order/amend/keepPriority",
            Signed(T),
            Some(4),
            P,
            t::amend_keep_priority
        ),
        // Weight 6 with `symbol`, 80 without (the handler charges it).
        route!(
            "GET",
            "/api/v3/openOrders",
            Signed(R),
            None,
            P,
            t::open_orders
        ),
        route!(
            "DELETE",
            "/api/v3/openOrders",
            Signed(T),
            Some(1),
            P,
            t::cancel_open_orders
        ),
        // Order lists: OCO, OTO, OTOCO.
        route!(
            "POST",
            "/api/v3/orderList/oco",
            Signed(T),
            Some(1),
            P,
            ol::new_oco
        ),
        route!(
            "POST",
            "/api/v3/orderList/oto",
            Signed(T),
            Some(1),
            P,
            ol::new_oto
        ),
        route!(
            "POST",
            "/api/v3/orderList/otoco",
            Signed(T),
            Some(1),
            P,
            ol::new_otoco
        ),
        route!(
            "GET",
            "/api/v3/orderList",
            Signed(R),
            Some(4),
            P,
            ol::get_list
        ),
        route!(
            "DELETE",
            "/api/v3/orderList",
            Signed(T),
            Some(1),
            P,
            ol::cancel_list
        ),
        route!(
            "GET",
            "/api/v3/openOrderList",
            Signed(R),
            Some(6),
            P,
            ol::open_lists
        ),
        route!(
            "GET",
            "/api/v3/allOrderList",
            Signed(R),
            Some(20),
            P,
            ol::all_lists
        ),
        route!(
            "GET",
            "/api/v3/allOrders",
            Signed(R),
            Some(20),
            P,
            t::all_orders
        ),
        route!("GET", "/api/v3/account", Signed(R), Some(20), P, t::account),
        route!(
            "GET",
            "/api/v3/myTrades",
            Signed(R),
            Some(20),
            P,
            t::my_trades
        ),
        // What clients load before trading (fees, limits, coins, no margin).
        route!(
            "GET",
            "/api/v3/account/commission",
            Signed(R),
            Some(20),
            P,
            cat::account_commission
        ),
        route!(
            "GET",
            "/api/v3/rateLimit/order",
            Signed(R),
            Some(40),
            P,
            cat::rate_limit_order
        ),
        route!(
            "GET",
            "/sapi/v1/asset/tradeFee",
            Signed(R),
            Some(1),
            P,
            cat::trade_fee
        ),
        route!(
            "GET",
            "/sapi/v1/capital/config/getall",
            Signed(R),
            Some(10),
            P,
            cat::config_getall
        ),
        route!(
            "GET",
            "/sapi/v1/margin/allPairs",
            Key(Perms::NONE),
            Some(1),
            P,
            cat::margin_all_pairs
        ),
        route!(
            "GET",
            "/sapi/v1/margin/isolated/allPairs",
            Signed(R),
            Some(10),
            P,
            cat::margin_isolated_all_pairs
        ),
        route!(
            "POST",
            "/api/v3/userDataStream",
            Key(R),
            Some(2),
            P,
            ws::listen_key_new
        ),
        route!(
            "PUT",
            "/api/v3/userDataStream",
            Key(Perms::NONE),
            Some(2),
            P,
            ws::listen_key_keepalive
        ),
        route!(
            "DELETE",
            "/api/v3/userDataStream",
            Key(Perms::NONE),
            Some(2),
            P,
            ws::listen_key_close
        ),
        // Native: transfers and keys.
        route!(
            "POST",
            "/mapi/v1/transfer",
            Signed(X),
            Some(1),
            P,
            n::transfer
        ),
        route!(
            "GET",
            "/mapi/v1/apiKey",
            Signed(K),
            Some(5),
            P,
            n::list_keys
        ),
        route!(
            "POST",
            "/mapi/v1/apiKey",
            Signed(K),
            Some(5),
            P,
            n::create_own_key
        ),
        route!(
            "DELETE",
            "/mapi/v1/apiKey",
            Signed(K),
            Some(5),
            P,
            n::revoke_key
        ),
        // Custody.
        route!(
            "GET",
            "/sapi/v1/capital/deposit/address",
            Signed(R),
            Some(10),
            P,
            c::deposit_address
        ),
        route!(
            "GET",
            "/sapi/v1/capital/deposit/hisrec",
            Signed(R),
            Some(1),
            P,
            c::deposit_history
        ),
        route!(
            "POST",
            "/sapi/v1/capital/withdraw/apply",
            Signed(W),
            Some(1),
            P,
            c::withdraw_apply
        ),
        route!(
            "GET",
            "/sapi/v1/capital/withdraw/history",
            Signed(R),
            Some(1),
            P,
            c::withdraw_history
        ),
        route!(
            "POST",
            "/mapi/v1/capital/deposit/address",
            Signed(R),
            Some(10),
            P,
            c::new_deposit_address
        ),
        // WebSockets.
        route!("GET", "/ws", Public, None, P, ws::ws_root),
        route!("GET", "/ws/{streams}", Public, None, P, ws::ws_path),
        route!("GET", "/stream", Public, None, P, ws::ws_combined),
        route!("GET", "/ws-api/v3", Public, None, P, ws::ws_api),
        route!("GET", "/openapi.json", Public, None, P, openapi::openapi),
        // Operator.
        route!(
            "POST",
            "/mapi/v1/admin/account",
            Signed(ADM),
            Some(1),
            A,
            n::admin_create_account
        ),
        route!(
            "POST",
            "/mapi/v1/admin/apiKey",
            Signed(ADM),
            Some(1),
            A,
            n::admin_create_key
        ),
        route!(
            "DELETE",
            "/mapi/v1/admin/apiKey",
            Signed(ADM),
            Some(1),
            A,
            n::admin_revoke_key
        ),
        route!(
            "POST",
            "/mapi/v1/admin/credit",
            Signed(ADM),
            Some(1),
            A,
            n::admin_credit
        ),
        route!(
            "POST",
            "/mapi/v1/admin/depositAddress",
            Signed(ADM),
            Some(1),
            A,
            c::admin_deposit_address
        ),
        route!(
            "GET",
            "/mapi/v1/admin/withdrawals",
            Signed(ADM),
            Some(1),
            A,
            c::admin_withdrawals
        ),
        route!(
            "POST",
            "/mapi/v1/admin/withdrawals/approve",
            Signed(ADM),
            Some(1),
            A,
            c::admin_approve
        ),
        route!(
            "POST",
            "/mapi/v1/admin/withdrawals/reject",
            Signed(ADM),
            Some(1),
            A,
            c::admin_reject
        ),
        route!(
            "POST",
            "/mapi/v1/admin/withdrawals/bump",
            Signed(ADM),
            Some(1),
            A,
            c::admin_bump
        ),
        route!(
            "GET",
            "/mapi/v1/admin/accounts/flagged",
            Signed(ADM),
            Some(1),
            A,
            c::admin_flagged
        ),
        route!(
            "POST",
            "/mapi/v1/admin/accounts/clearFlag",
            Signed(ADM),
            Some(1),
            A,
            c::admin_clear_flag
        ),
        route!(
            "POST",
            "/mapi/v1/admin/batches/abandon",
            Signed(ADM),
            Some(1),
            A,
            c::admin_abandon_batch
        ),
        route!(
            "POST",
            "/mapi/v1/admin/accounts/writeOffDebt",
            Signed(ADM),
            Some(1),
            A,
            c::admin_write_off_debt
        ),
        route!(
            "GET",
            "/mapi/v1/admin/batches",
            Signed(ADM),
            Some(1),
            A,
            c::admin_batches
        ),
        route!(
            "GET",
            "/mapi/v1/admin/alarms",
            Signed(ADM),
            Some(1),
            A,
            c::admin_alarms
        ),
        route!(
            "POST",
            "/mapi/v1/admin/alarms/clear",
            Signed(ADM),
            Some(1),
            A,
            c::admin_clear_alarm
        ),
        route!(
            "GET",
            "/mapi/v1/admin/reconcile",
            Signed(ADM),
            Some(1),
            A,
            c::admin_reconcile
        ),
        route!(
            "GET",
            "/mapi/v1/admin/reconcile/records",
            Signed(ADM),
            Some(1),
            A,
            c::admin_reconcile_records
        ),
        route!(
            "POST",
            "/mapi/v1/admin/regtest/mine",
            Signed(ADM),
            Some(1),
            A,
            c::admin_mine
        ),
        route!(
            "POST",
            "/mapi/v1/admin/regtest/fund",
            Signed(ADM),
            Some(1),
            A,
            c::admin_fund
        ),
        route!("GET", "/metrics", Public, None, A, metrics::metrics),
        // Verifiable custody (crate::proofs).
        route!(
            "POST",
            "/mapi/v1/admin/reserves/liabilities",
            Signed(ADM),
            Some(10),
            A,
            pr::admin_publish_liabilities
        ),
        route!(
            "GET",
            "/mapi/v1/reserves/my-proof",
            Signed(R),
            Some(2),
            P,
            pr::my_proof
        ),
        route!("GET", "/reserves/verify", Public, None, P, pr::verify_page),
        route!(
            "POST",
            "/mapi/v1/admin/reserves/prove",
            Signed(ADM),
            Some(10),
            A,
            pr::admin_prove
        ),
        route!(
            "GET",
            "/mapi/v1/reserves/latest",
            Public,
            None,
            P,
            pr::latest
        ),
        route!("GET", "/mapi/v1/reserves/proofs", Public, None, P, pr::list),
        // Lightning (crate::lightning).
        route!(
            "POST",
            "/mapi/v1/lightning/invoice",
            Signed(R),
            Some(10),
            P,
            ln::invoice
        ),
        route!(
            "POST",
            "/mapi/v1/lightning/pay",
            Signed(W),
            Some(1),
            P,
            ln::pay
        ),
        route!(
            "GET",
            "/mapi/v1/lightning/pay",
            Signed(R),
            Some(1),
            P,
            ln::pay_status
        ),
        route!(
            "GET",
            "/mapi/v1/admin/lightning/channels",
            Signed(ADM),
            Some(1),
            A,
            ln::admin_channels
        ),
        route!(
            "GET",
            "/mapi/v1/admin/lightning/balance",
            Signed(ADM),
            Some(1),
            A,
            ln::admin_balance
        ),
        route!(
            "POST",
            "/mapi/v1/admin/lightning/channel/open",
            Signed(ADM),
            Some(1),
            A,
            ln::admin_open
        ),
        route!(
            "POST",
            "/mapi/v1/admin/lightning/channel/close",
            Signed(ADM),
            Some(1),
            A,
            ln::admin_close
        ),
        route!(
            "POST",
            "/mapi/v1/admin/lightning/address",
            Signed(ADM),
            Some(1),
            A,
            ln::admin_address
        ),
    ]
};

/// [`ROUTES`]' entry for `method` and router path `path`.
pub fn find(method: &str, path: &str) -> Option<&'static Route> {
    find_in(&[ROUTES], method, path)
}

/// The entry of `tables` for `method` and router path `path`.
pub fn find_in(tables: &[&'static [Route]], method: &str, path: &str) -> Option<&'static Route> {
    tables
        .iter()
        .flat_map(|t| t.iter())
        .find(|r| r.method.eq_ignore_ascii_case(method) && r.path == path)
}

/// The routes of `tables` served on `only` (all with `None`), each handler given its entry
/// (as a request extension, read by [`crate::state::Req`]). A method and path in two tables is
/// a bug (axum panics on the overlap).
pub fn router(tables: &[&'static [Route]], only: Option<Listener>) -> Router<AppState> {
    let mut r = Router::new();
    for route in tables
        .iter()
        .flat_map(|t| t.iter())
        .filter(|r| only.is_none_or(|l| r.listener == l))
    {
        let entry: &'static Route = route;
        r = r.route(route.path, (route.handler)().layer(axum::Extension(entry)));
    }
    r.route_layer(axum::middleware::from_fn(record_route))
}

/// Records the matched route's template (`/ws/{streams}`) as the request log span's `route`
/// ([`crate::app`]'s request ids): never the path itself, whose segments may be credentials.
async fn record_route(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(p) = req.extensions().get::<axum::extract::MatchedPath>() {
        tracing::Span::current().record("route", p.as_str());
    }
    next.run(req).await
}

/// Where the client address comes from behind a reverse proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedProxy {
    /// The header the proxy sets, e.g. `x-forwarded-for` (the last address of the list is the
    /// one the proxy saw) or `x-real-ip`. Compared case-insensitively.
    pub header: String,
    /// The proxies' own addresses: only a connection from one of these is believed.
    pub addresses: Vec<IpAddr>,
}

impl TrustedProxy {
    /// Whether a connection from `peer` is one of the proxies. Both sides are compared
    /// canonical (`IpAddr::to_canonical`): on a `[::]` listener an IPv4 proxy's peer address is
    /// `::ffff:10.0.0.2`, which is the configured `10.0.0.2`.
    pub fn is_proxy(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.addresses.iter().any(|a| a.to_canonical() == peer)
    }

    /// The address the proxy saw, from `headers`: the last comma-separated entry of the
    /// header's last line, trimmed. A proxy appends its entry (or its own line, HAProxy's
    /// `option forwardfor`) after whatever the client sent, so only the last entry is the
    /// proxy's word; `None` when it is not an address (then nothing in the header is believed).
    fn forwarded(&self, headers: &axum::http::HeaderMap) -> Option<IpAddr> {
        let line = headers.get_all(self.header.as_str()).iter().next_back()?;
        let entry = line.to_str().ok()?.rsplit(',').next()?;
        entry
            .trim()
            .parse::<IpAddr>()
            .ok()
            .map(|ip| ip.to_canonical())
    }
}

/// The client's address for rate limits and logs: the peer's, or, when the peer is a trusted
/// proxy ([`TrustedProxy::is_proxy`]), the last address of the header's last line (a proxy
/// appends the address it saw, as an entry or as a line of its own, so everything before it is
/// the client's claim). A header from anyone else is ignored; a trusted proxy's request whose
/// last entry is missing or not an address counts as the proxy's own. `local` without a socket.
///
/// A client is counted as [`crate::app::client_key`] counts its connections: an IPv4 address,
/// or the /64 of an IPv6 address (`2001:db8:1:2::/64`; one host is given a whole /64, and a
/// budget per address would be a fresh budget per request); an IPv4-mapped address is the IPv4
/// address.
pub fn client_ip(
    peer: Option<IpAddr>,
    headers: &axum::http::HeaderMap,
    proxy: Option<&TrustedProxy>,
) -> String {
    let Some(peer) = peer else {
        return "local".to_owned();
    };
    let peer = peer.to_canonical();
    let forwarded = proxy
        .filter(|p| p.is_proxy(peer))
        .and_then(|p| p.forwarded(headers));
    match crate::app::client_key(forwarded.unwrap_or(peer)) {
        ip @ IpAddr::V4(_) => ip.to_string(),
        ip @ IpAddr::V6(_) => format!("{ip}/64"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_entry_per_method_and_path() {
        for (i, a) in ROUTES.iter().enumerate() {
            assert!(
                ["GET", "POST", "PUT", "DELETE"].contains(&a.method),
                "{}",
                a.path
            );
            for b in &ROUTES[i + 1..] {
                assert!(
                    !(a.method == b.method && a.path == b.path),
                    "{} {} twice",
                    a.method,
                    a.path
                );
            }
            if a.path.starts_with("/mapi/v1/admin/") {
                assert_eq!(a.access, Signed(ADM), "{}", a.path);
                assert_eq!(a.listener, Listener::Admin, "{}", a.path);
            }
            if a.listener == Listener::Admin {
                assert!(a.path.starts_with("/mapi/v1/admin/") || a.path == "/metrics");
            }
        }
    }

    #[test]
    fn proxy_header_is_believed_from_the_proxy_only() {
        let mut h = axum::http::HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "198.51.100.9, 203.0.113.7".parse().unwrap(),
        );
        let proxy = TrustedProxy {
            header: "X-Forwarded-For".into(),
            addresses: vec!["10.0.0.2".parse().unwrap()],
        };
        let from_proxy = Some("10.0.0.2".parse().unwrap());
        let from_other = Some("192.0.2.1".parse().unwrap());
        assert_eq!(client_ip(from_proxy, &h, Some(&proxy)), "203.0.113.7");
        assert_eq!(client_ip(from_other, &h, Some(&proxy)), "192.0.2.1");
        assert_eq!(client_ip(from_proxy, &h, None), "10.0.0.2");
        assert_eq!(client_ip(None, &h, Some(&proxy)), "local");
        let mut bad = axum::http::HeaderMap::new();
        bad.insert("x-forwarded-for", "not-an-ip".parse().unwrap());
        assert_eq!(client_ip(from_proxy, &bad, Some(&proxy)), "10.0.0.2");
        // A forwarded IPv6 client is its /64; an IPv4-mapped one its IPv4 address.
        let mut v6 = axum::http::HeaderMap::new();
        v6.insert("x-forwarded-for", "2001:db8:1:2:3:4:5:6".parse().unwrap());
        assert_eq!(
            client_ip(from_proxy, &v6, Some(&proxy)),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            client_ip(Some("::ffff:192.0.2.1".parse().unwrap()), &h, None),
            "192.0.2.1"
        );
    }

    /// Defect: the client address was read from the header's first line only
    /// (`headers.get`), so behind a proxy that appends its own line after the client's
    /// (HAProxy's `option forwardfor`) a client chose its address by sending the header itself;
    /// and a last entry that is not an address fell back to an earlier, client-written one.
    #[test]
    fn forwarded_address_is_the_last_entry_of_the_last_header_line() {
        let proxy = TrustedProxy {
            header: "X-Forwarded-For".into(),
            addresses: vec!["10.0.0.2".parse().unwrap()],
        };
        let from_proxy = Some("10.0.0.2".parse().unwrap());
        let mut h = axum::http::HeaderMap::new();
        // The client's own line, then the proxy's.
        h.append("x-forwarded-for", "6.6.6.6, 7.7.7.7".parse().unwrap());
        h.append("x-forwarded-for", " 203.0.113.7 ".parse().unwrap());
        assert_eq!(client_ip(from_proxy, &h, Some(&proxy)), "203.0.113.7");
        // An unreadable last entry is the proxy's own address, never an earlier entry.
        let mut bad = axum::http::HeaderMap::new();
        bad.append("x-forwarded-for", "198.51.100.9".parse().unwrap());
        bad.append("x-forwarded-for", "198.51.100.10, unknown".parse().unwrap());
        assert_eq!(client_ip(from_proxy, &bad, Some(&proxy)), "10.0.0.2");
        let mut empty = axum::http::HeaderMap::new();
        empty.append("x-forwarded-for", "198.51.100.9".parse().unwrap());
        empty.append("x-forwarded-for", "".parse().unwrap());
        assert_eq!(client_ip(from_proxy, &empty, Some(&proxy)), "10.0.0.2");
    }

    /// Defect: the peer was compared raw with the proxy's configured addresses, so on a `[::]`
    /// listener an IPv4 proxy (peer `::ffff:10.0.0.2`) never matched `10.0.0.2`: its header
    /// was ignored and every client behind it counted as the proxy.
    #[test]
    fn an_ipv4_mapped_proxy_peer_is_the_configured_ipv4_proxy() {
        let mut h = axum::http::HeaderMap::new();
        h.insert("x-forwarded-for", "::ffff:203.0.113.7".parse().unwrap());
        let v4 = TrustedProxy {
            header: "x-forwarded-for".into(),
            addresses: vec!["10.0.0.2".parse().unwrap()],
        };
        let mapped_peer = Some("::ffff:10.0.0.2".parse().unwrap());
        assert_eq!(client_ip(mapped_peer, &h, Some(&v4)), "203.0.113.7");
        // Configured in its mapped form, a proxy seen on an IPv4 listener is it too.
        let mapped = TrustedProxy {
            header: "x-forwarded-for".into(),
            addresses: vec!["::ffff:10.0.0.2".parse().unwrap()],
        };
        let v4_peer = Some("10.0.0.2".parse().unwrap());
        assert_eq!(client_ip(v4_peer, &h, Some(&mapped)), "203.0.113.7");
        assert!(v4.is_proxy("::ffff:10.0.0.2".parse().unwrap()));
        assert!(!v4.is_proxy("::ffff:10.0.0.3".parse().unwrap()));
    }
}
