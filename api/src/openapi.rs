//! `GET /openapi.json`: an OpenAPI 3.0 description of every endpoint.

use crate::access::Access;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

/// One operation: (method, path, summary, security, parameters: name and required).
pub type Op = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, bool)],
);

/// The signature parameters a signed operation adds.
pub const SIGNED: &[(&str, bool)] = &[
    ("timestamp", true),
    ("recvWindow", false),
    ("signature", true),
];

/// The trader gateway's operations ([`crate::app::SURFACE`]).
pub const OPS: &[Op] = &[
    ("get", "/api/v3/ping", "Test connectivity.", "none", &[]),
    ("get", "/api/v3/time", "Server time.", "none", &[]),
    (
        "get",
        "/api/v3/exchangeInfo",
        "Symbols and filters.",
        "none",
        &[("symbol", false), ("symbols", false)],
    ),
    (
        "get",
        "/api/v3/depth",
        "Order book snapshot; lastUpdateId matches @depth U/u.",
        "none",
        &[("symbol", true), ("limit", false)],
    ),
    (
        "get",
        "/api/v3/trades",
        "Recent trades.",
        "none",
        &[("symbol", true), ("limit", false)],
    ),
    (
        "get",
        "/api/v3/ticker/24hr",
        "24h rolling statistics.",
        "none",
        &[("symbol", false), ("symbols", false), ("type", false)],
    ),
    (
        "get",
        "/api/v3/ticker/price",
        "Last price.",
        "none",
        &[("symbol", false), ("symbols", false)],
    ),
    (
        "get",
        "/api/v3/ticker/bookTicker",
        "Best bid and ask.",
        "none",
        &[("symbol", false), ("symbols", false)],
    ),
    (
        "get",
        "/api/v3/ticker",
        "Rolling-window statistics (windowSize 1m..7d); 4 weight per symbol, at most 200.",
        "none",
        &[
            ("symbol", false),
            ("symbols", false),
            ("windowSize", false),
            ("type", false),
        ],
    ),
    (
        "get",
        "/api/v3/ticker/tradingDay",
        "Statistics since the start of the day in timeZone; 4 weight per symbol, at most 200.",
        "none",
        &[
            ("symbol", false),
            ("symbols", false),
            ("timeZone", false),
            ("type", false),
        ],
    ),
    (
        "get",
        "/sapi/v1/system/status",
        "0 normal, 1 maintenance (the ledger audit's circuit breaker is open).",
        "none",
        &[],
    ),
    (
        "get",
        "/api/v3/account/commission",
        "The market's maker and taker rates.",
        "read",
        &[("symbol", true)],
    ),
    (
        "get",
        "/api/v3/rateLimit/order",
        "New orders in the current 10-second window and the limit.",
        "read",
        &[],
    ),
    (
        "get",
        "/sapi/v1/asset/tradeFee",
        "Maker and taker rates per market.",
        "read",
        &[("symbol", false)],
    ),
    (
        "get",
        "/sapi/v1/capital/config/getall",
        "Coins, balances and networks (BTC: the custody's withdrawal fee and minimum).",
        "read",
        &[],
    ),
    (
        "get",
        "/sapi/v1/margin/allPairs",
        "Cross-margin pairs: none ([]).",
        "key",
        &[("symbol", false)],
    ),
    (
        "get",
        "/sapi/v1/margin/isolated/allPairs",
        "Isolated-margin pairs: none ([]).",
        "read",
        &[("symbol", false)],
    ),
    (
        "get",
        "/api/v3/klines",
        "Candlesticks (1s to 1w).",
        "none",
        &[
            ("symbol", true),
            ("interval", true),
            ("startTime", false),
            ("endTime", false),
            ("limit", false),
        ],
    ),
    (
        "post",
        "/api/v3/order",
        "New order (LIMIT, MARKET, LIMIT_MAKER, STOP_LOSS, STOP_LOSS_LIMIT, TAKE_PROFIT, TAKE_PROFIT_LIMIT).",
        "trade",
        &[
            ("symbol", true),
            ("side", true),
            ("type", true),
            ("timeInForce", false),
            ("quantity", false),
            ("quoteOrderQty", false),
            ("price", false),
            ("stopPrice", false),
            ("newClientOrderId", false),
            ("selfTradePreventionMode", false),
            ("newOrderRespType", false),
        ],
    ),
    (
        "post",
        "/api/v3/order/test",
        "Validate a new order without placing it.",
        "trade",
        &[("symbol", true), ("side", true), ("type", true)],
    ),
    (
        "get",
        "/api/v3/order",
        "Query an order.",
        "read",
        &[
            ("symbol", true),
            ("orderId", false),
            ("origClientOrderId", false),
        ],
    ),
    (
        "delete",
        "/api/v3/order",
        "Cancel an order.",
        "trade",
        &[
            ("symbol", true),
            ("orderId", false),
            ("origClientOrderId", false),
            ("newClientOrderId", false),
        ],
    ),
    (
        "get",
        "/api/v3/openOrders",
        "Open orders.",
        "read",
        &[("symbol", false)],
    ),
    (
        "delete",
        "/api/v3/openOrders",
        "Cancel all open orders of a symbol.",
        "trade",
        &[("symbol", true)],
    ),
    (
        "post",
        "/api/v3/orderList/oco",
        "New OCO order list (one engine command; held once).",
        "trade",
        &[
            ("symbol", true),
            ("side", true),
            ("quantity", true),
            ("listClientOrderId", false),
            ("aboveType", true),
            ("abovePrice", false),
            ("aboveStopPrice", false),
            ("aboveTimeInForce", false),
            ("aboveClientOrderId", false),
            ("belowType", true),
            ("belowPrice", false),
            ("belowStopPrice", false),
            ("belowTimeInForce", false),
            ("belowClientOrderId", false),
            ("selfTradePreventionMode", false),
            ("newOrderRespType", false),
        ],
    ),
    (
        "post",
        "/api/v3/orderList/oto",
        "New OTO order list: a working order, and a pending order placed once it has filled.",
        "trade",
        &[
            ("symbol", true),
            ("listClientOrderId", false),
            ("workingType", true),
            ("workingSide", true),
            ("workingPrice", true),
            ("workingQuantity", true),
            ("workingTimeInForce", false),
            ("workingClientOrderId", false),
            ("pendingType", true),
            ("pendingSide", true),
            ("pendingQuantity", true),
            ("pendingPrice", false),
            ("pendingStopPrice", false),
            ("pendingTimeInForce", false),
            ("pendingClientOrderId", false),
            ("selfTradePreventionMode", false),
            ("newOrderRespType", false),
        ],
    ),
    (
        "post",
        "/api/v3/orderList/otoco",
        "New OTOCO order list: a working order, and a pending OCO pair placed once it has filled.",
        "trade",
        &[
            ("symbol", true),
            ("listClientOrderId", false),
            ("workingType", true),
            ("workingSide", true),
            ("workingPrice", true),
            ("workingQuantity", true),
            ("workingTimeInForce", false),
            ("workingClientOrderId", false),
            ("pendingSide", true),
            ("pendingQuantity", true),
            ("pendingAboveType", true),
            ("pendingAbovePrice", false),
            ("pendingAboveStopPrice", false),
            ("pendingAboveTimeInForce", false),
            ("pendingAboveClientOrderId", false),
            ("pendingBelowType", true),
            ("pendingBelowPrice", false),
            ("pendingBelowStopPrice", false),
            ("pendingBelowTimeInForce", false),
            ("pendingBelowClientOrderId", false),
            ("selfTradePreventionMode", false),
            ("newOrderRespType", false),
        ],
    ),
    (
        "get",
        "/api/v3/orderList",
        "Query an order list.",
        "read",
        &[("orderListId", false), ("origClientOrderId", false)],
    ),
    (
        "delete",
        "/api/v3/orderList",
        "Cancel an order list (both legs).",
        "trade",
        &[
            ("symbol", true),
            ("orderListId", false),
            ("listClientOrderId", false),
            ("newClientOrderId", false),
        ],
    ),
    ("get", "/api/v3/openOrderList", "Open order lists.", "read", &[]),
    (
        "get",
        "/api/v3/allOrderList",
        "Order list history.",
        "read",
        &[
            ("fromId", false),
            ("startTime", false),
            ("endTime", false),
            ("limit", false),
        ],
    ),
    (
        "get",
        "/api/v3/allOrders",
        "Order history.",
        "read",
        &[
            ("symbol", true),
            ("orderId", false),
            ("startTime", false),
            ("endTime", false),
            ("limit", false),
        ],
    ),
    (
        "get",
        "/api/v3/account",
        "Balances and commission rates.",
        "read",
        &[("omitZeroBalances", false)],
    ),
    (
        "get",
        "/api/v3/myTrades",
        "Trade history.",
        "read",
        &[
            ("symbol", true),
            ("orderId", false),
            ("fromId", false),
            ("startTime", false),
            ("endTime", false),
            ("limit", false),
        ],
    ),
    (
        "post",
        "/api/v3/userDataStream",
        "Create a listenKey (API key only).",
        "key",
        &[],
    ),
    (
        "put",
        "/api/v3/userDataStream",
        "Keep a listenKey alive.",
        "key",
        &[("listenKey", true)],
    ),
    (
        "delete",
        "/api/v3/userDataStream",
        "Close a listenKey.",
        "key",
        &[("listenKey", true)],
    ),
    (
        "post",
        "/mapi/v1/transfer",
        "Instant transfer to another account (idempotent by clientTranId).",
        "trade",
        &[
            ("toAccount", true),
            ("asset", true),
            ("amount", true),
            ("clientTranId", true),
        ],
    ),
    (
        "get",
        "/mapi/v1/apiKey",
        "List the account's API keys.",
        "read",
        &[],
    ),
    (
        "post",
        "/mapi/v1/apiKey",
        "Create an API key for the own account (secret shown once).",
        "read",
        &[("permissions", true), ("label", false)],
    ),
    (
        "delete",
        "/mapi/v1/apiKey",
        "Revoke an API key.",
        "read",
        &[("apiKey", true)],
    ),
    (
        "post",
        "/mapi/v1/admin/account",
        "Create an account.",
        "admin",
        &[],
    ),
    (
        "post",
        "/mapi/v1/admin/apiKey",
        "Create an API key for an account.",
        "admin",
        &[("account", true), ("permissions", true), ("label", false)],
    ),
    (
        "post",
        "/mapi/v1/admin/credit",
        "Record an operator deposit (idempotent by reference).",
        "admin",
        &[
            ("account", true),
            ("asset", true),
            ("amount", true),
            ("reference", true),
        ],
    ),
    (
        "get",
        "/sapi/v1/capital/deposit/address",
        "The account's BTC deposit address.",
        "read",
        &[("coin", true), ("network", false)],
    ),
    (
        "get",
        "/sapi/v1/capital/deposit/hisrec",
        "Deposit history (status 0 pending, 1 success, 7 reorged).",
        "read",
        &[
            ("coin", false),
            ("status", false),
            ("txId", false),
            ("startTime", false),
            ("endTime", false),
            ("offset", false),
            ("limit", false),
        ],
    ),
    (
        "post",
        "/sapi/v1/capital/withdraw/apply",
        "Withdraw BTC (idempotent by withdrawOrderId).",
        "withdraw",
        &[
            ("coin", true),
            ("network", false),
            ("address", true),
            ("amount", true),
            ("withdrawOrderId", false),
        ],
    ),
    (
        "get",
        "/sapi/v1/capital/withdraw/history",
        "Withdraw history (status 2 awaiting approval, 4 processing, 5 failure, 6 completed).",
        "read",
        &[
            ("coin", false),
            ("withdrawOrderId", false),
            ("status", false),
            ("idList", false),
            ("startTime", false),
            ("endTime", false),
            ("offset", false),
            ("limit", false),
        ],
    ),
    (
        "post",
        "/mapi/v1/capital/deposit/address",
        "A new BTC deposit address (old ones keep working).",
        "read",
        &[("coin", true), ("network", false)],
    ),
    (
        "post",
        "/mapi/v1/admin/depositAddress",
        "An account's deposit address (a new one with new=true).",
        "admin",
        &[("account", true), ("new", false)],
    ),
    (
        "get",
        "/mapi/v1/admin/withdrawals",
        "Withdrawals of one account or all.",
        "admin",
        &[("account", false)],
    ),
    (
        "post",
        "/mapi/v1/admin/withdrawals/approve",
        "Approve a withdrawal awaiting approval.",
        "admin",
        &[("id", true)],
    ),
    (
        "post",
        "/mapi/v1/admin/withdrawals/reject",
        "Refuse a withdrawal not batched yet; the hold is given back.",
        "admin",
        &[("id", true), ("reason", true)],
    ),
    (
        "post",
        "/mapi/v1/admin/withdrawals/bump",
        "Bump the fee of the batch paying a withdrawal (RBF, within its flat fees).",
        "admin",
        &[("id", true), ("feeRate", true)],
    ),
    (
        "get",
        "/mapi/v1/admin/accounts/flagged",
        "Accounts flagged for review (cannot withdraw).",
        "admin",
        &[],
    ),
    (
        "post",
        "/mapi/v1/admin/accounts/clearFlag",
        "Clear an account's flag.",
        "admin",
        &[("account", true)],
    ),
    (
        "post",
        "/mapi/v1/admin/batches/abandon",
        "Abandon a batch in flight that can never confirm (inputs double-spent): its withdrawals go out in the next batch.",
        "admin",
        &[("id", true)],
    ),
    (
        "post",
        "/mapi/v1/admin/accounts/writeOffDebt",
        "Write an account's debt to custody off (the exchange bears it).",
        "admin",
        &[("account", true)],
    ),
    (
        "get",
        "/mapi/v1/admin/batches",
        "Withdrawal batches, newest first.",
        "admin",
        &[],
    ),
    (
        "get",
        "/mapi/v1/admin/alarms",
        "Custody alarms not cleared.",
        "admin",
        &[],
    ),
    (
        "post",
        "/mapi/v1/admin/alarms/clear",
        "Clear an alarm an operator dealt with.",
        "admin",
        &[("id", true)],
    ),
    (
        "get",
        "/mapi/v1/admin/reconcile/records",
        "Every credited deposit and completed withdrawal against the ledger and the chain.",
        "admin",
        &[],
    ),
    (
        "get",
        "/mapi/v1/admin/reconcile",
        "Wallet assets against ledger liabilities.",
        "admin",
        &[],
    ),
    (
        "post",
        "/mapi/v1/admin/reserves/liabilities",
        "Publish a liabilities proof (Merkle-sum tree per asset) over every balance now.",
        "admin",
        &[],
    ),
    (
        "post",
        "/mapi/v1/admin/reserves/prove",
        "Publish a BIP-127 proof of reserves (docs/proof-of-reserves.md) with a fresh liabilities proof.",
        "admin",
        &[("message", false)],
    ),
    (
        "get",
        "/mapi/v1/reserves/latest",
        "The latest (or `id`) published proof-of-reserves document.",
        "none",
        &[("id", false)],
    ),
    (
        "get",
        "/mapi/v1/reserves/proofs",
        "Published proofs of reserves, newest first (no PSBTs).",
        "none",
        &[("limit", false), ("fromId", false)],
    ),
    (
        "get",
        "/mapi/v1/reserves/my-proof",
        "Your inclusion proof in the liabilities proof the latest proof of reserves names (or \
         `proofId`; the latest while there is no proof of reserves) (docs/liabilities-proof.md).",
        "read",
        &[("asset", true), ("proofId", false)],
    ),
    (
        "post",
        "/mapi/v1/admin/regtest/mine",
        "Regtest: mine 1..=1000 blocks.",
        "admin",
        &[("blocks", true)],
    ),
    (
        "post",
        "/mapi/v1/admin/regtest/fund",
        "Regtest: fund an account with a matured coinbase.",
        "admin",
        &[("account", true)],
    ),
    (
        "post",
        "/mapi/v1/lightning/invoice",
        "Lightning deposit: a BOLT11 invoice crediting your account once when paid.",
        "read",
        &[("amount", true)],
    ),
    (
        "post",
        "/mapi/v1/lightning/pay",
        "Lightning withdrawal: pay a BOLT11 invoice (amount + fee held, released on failure).",
        "withdraw",
        &[("invoice", true)],
    ),
    (
        "get",
        "/mapi/v1/lightning/pay",
        "A Lightning withdrawal by id.",
        "read",
        &[("id", true)],
    ),
    (
        "get",
        "/mapi/v1/admin/lightning/channels",
        "The Lightning node's channels.",
        "admin",
        &[],
    ),
    (
        "get",
        "/mapi/v1/admin/lightning/balance",
        "The Lightning node's on-chain and channel balances.",
        "admin",
        &[],
    ),
    (
        "post",
        "/mapi/v1/admin/lightning/channel/open",
        "Open a channel to NODEID@HOST:PORT.",
        "admin",
        &[("peer", true), ("amountSat", true)],
    ),
    (
        "post",
        "/mapi/v1/admin/lightning/channel/close",
        "Close a channel cooperatively.",
        "admin",
        &[("channelId", true)],
    ),
    (
        "post",
        "/mapi/v1/admin/lightning/address",
        "A new on-chain address of the Lightning node (to fund channels).",
        "admin",
        &[],
    ),
    (
        "get",
        "/ws",
        "WebSocket: raw streams via SUBSCRIBE.",
        "none",
        &[],
    ),
    (
        "get",
        "/ws/{stream}",
        "WebSocket: one raw stream or a listenKey.",
        "none",
        &[],
    ),
    (
        "get",
        "/stream",
        "WebSocket: combined streams.",
        "none",
        &[("streams", false)],
    ),
    ("get", "/metrics", "Prometheus metrics.", "none", &[]),
];

/// The document of the trader gateway alone.
pub fn document() -> Value {
    document_of(&[&crate::app::SURFACE])
}

/// The document of every operation of `surfaces`.
pub fn document_of(surfaces: &[&crate::app::Surface]) -> Value {
    let tables: Vec<&'static [crate::access::Route]> = surfaces.iter().map(|s| s.routes).collect();
    let mut paths = Map::new();
    for (method, path, summary, sec, params) in surfaces.iter().flat_map(|s| s.openapi.iter()) {
        let mut ps: Vec<Value> = params
            .iter()
            .map(|(n, req)| json!({"name": n, "in": "query", "required": req, "schema": {"type": "string"}}))
            .collect();
        if !matches!(*sec, "none" | "key") {
            ps.extend(SIGNED.iter().map(|(n, req)| {
                json!({"name": n, "in": "query", "required": req, "schema": {"type": "string"}})
            }));
        }
        let mut op = json!({
            "summary": summary,
            "parameters": ps,
            "responses": {
                "200": {"description": "Binance-compatible JSON."},
                "400": {"description": "{\"code\": <Binance code>, \"msg\": ...}"},
                "401": {"description": "-2014 / -2015: bad API key or permission."},
                "429": {"description": "-1003: rate limited (Retry-After)."},
                "503": {"description": "-1008 busy, or -1001 custody not available."}
            },
        });
        if *sec != "none" {
            op["security"] = json!([{"ApiKey": []}]);
            // The permission table is the one source ([`crate::access::ROUTES`]).
            let perm = match crate::access::find_in(&tables, method, path).map(|r| r.access) {
                Some(Access::Signed(p) | Access::Key(p)) => p.names().join(","),
                _ => (*sec).to_owned(),
            };
            op["x-permission"] = json!(perm);
        }
        let entry = paths
            .entry(path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = entry {
            m.insert((*method).to_owned(), op);
        }
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "Mediator trader API (Binance spot compatible)", "version": env!("CARGO_PKG_VERSION")},
        "components": {"securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-MBX-APIKEY"}}},
        "paths": paths,
    })
}

/// `GET /openapi.json`: the operations of the surfaces the router serves.
pub async fn openapi(surfaces: Option<axum::Extension<crate::app::Surfaces>>) -> Response {
    let doc = match surfaces {
        Some(axum::Extension(s)) => document_of(&s.0),
        None => document(),
    };
    axum::Json(doc).into_response()
}
