//! The one error type of the API: Binance's `{"code":..,"msg":..}` with Binance's HTTP statuses.
//! It never carries internal details: a storage or engine failure is logged with the request id
//! and answered as `-1000`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use matching_engine::RejectCode;
use std::borrow::Cow;

/// An error answered to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Binance error code.
    pub code: i32,
    /// Binance-style message.
    pub msg: Cow<'static, str>,
    /// Seconds for a `Retry-After` header (rate limits, busy).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with status 400.
    pub fn bad(code: i32, msg: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code,
            msg: msg.into(),
            retry_after: None,
        }
    }
    /// `-1000`: something went wrong inside; the details are only in the log.
    pub fn internal() -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: -1000,
            msg: "An unknown error occurred while processing the request.".into(),
            retry_after: None,
        }
    }
    /// `-1007` with 503: the command was taken but its outcome is unknown (Binance: "Timeout
    /// waiting for response from backend server. Send status unknown; execution status
    /// unknown."). The client must not treat it as a failure: it looks the order up by its client
    /// order id (or repeats the request with the same idempotency key).
    pub fn outcome_unknown() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: -1007,
            msg: "Timeout waiting for response from backend server. Send status unknown; execution status unknown.".into(),
            retry_after: None,
        }
    }
    /// `-1001` with 408: the request's body did not arrive within `body_read_timeout_ms`. No
    /// handler ran, so nothing was done and the request may be sent again as it was (unlike
    /// [`ApiError::outcome_unknown`]).
    pub fn body_timeout() -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            code: -1001,
            msg: "The request body did not arrive in time; nothing was done. Please try again."
                .into(),
            retry_after: None,
        }
    }
    /// `-2010` with 400, Binance's answer for a restricted account: custody flagged the account
    /// for review (a credited deposit left the chain), so it places no orders until an operator
    /// clears it; its cancels pass.
    pub fn account_restricted() -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: -2010,
            msg: "This action is disabled on this account.".into(),
            retry_after: None,
        }
    }
    /// `-1000` with 503: the ledger auditor tripped the circuit breaker; only cancels pass.
    pub fn halted() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: -1000,
            msg: "Trading and transfers are halted by the ledger audit; cancels are accepted."
                .into(),
            retry_after: None,
        }
    }
    /// `-1008`: the engine's queue is full.
    pub fn busy() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: -1008,
            msg: "Server is currently overloaded with other requests. Please try again in a few minutes.".into(),
            retry_after: Some(1),
        }
    }
    /// `-1003` with 429.
    pub fn rate_limited(limit: u64, retry_after: u64) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: -1003,
            msg: format!("Too much request weight used; current limit is {limit} request weight per 1 MINUTE. Please use WebSocket Streams for live updates to avoid polling the API.").into(),
            retry_after: Some(retry_after),
        }
    }
    /// `-2014` with 401.
    pub fn key_format() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: -2014,
            msg: "API-key format invalid.".into(),
            retry_after: None,
        }
    }
    /// `-2015` with 401: unknown key, or a key without the permission.
    pub fn key_rejected() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: -2015,
            msg: "Invalid API-key, IP, or permissions for action.".into(),
            retry_after: None,
        }
    }
    /// `-1022`.
    pub fn bad_signature() -> Self {
        Self::bad(-1022, "Signature for this request is not valid.")
    }
    /// `-1102` for a missing parameter.
    pub fn missing(name: &str) -> Self {
        Self::bad(
            -1102,
            format!("Mandatory parameter '{name}' was not sent, was empty/null, or malformed."),
        )
    }
    /// `-1100` for a parameter with characters out of its legal range.
    pub fn illegal(name: &str, range: &str) -> Self {
        Self::bad(
            -1100,
            format!("Illegal characters found in parameter '{name}'; legal range is '{range}'."),
        )
    }
    /// `-1111` too much precision.
    pub fn precision(name: &str) -> Self {
        Self::bad(-1111, format!("Parameter '{name}' has too much precision."))
    }
    /// `-1013` filter failure.
    pub fn filter(filter: &str) -> Self {
        Self::bad(-1013, format!("Filter failure: {filter}"))
    }
    /// `-1121`.
    pub fn invalid_symbol() -> Self {
        Self::bad(-1121, "Invalid symbol.")
    }
    /// `-1130` invalid value.
    pub fn invalid_value(name: &str) -> Self {
        Self::bad(
            -1130,
            format!("Data sent for parameter '{name}' is not valid."),
        )
    }
    /// `-1128`.
    pub fn bad_combination() -> Self {
        Self::bad(-1128, "Combination of optional parameters invalid.")
    }
    /// `-2013`: a query for an order that does not exist.
    pub fn no_such_order() -> Self {
        Self::bad(-2013, "Order does not exist.")
    }
    /// `-1125`.
    pub fn bad_listen_key() -> Self {
        Self::bad(-1125, "This listenKey does not exist.")
    }

    /// An engine rejection of a new order (`-2010` unless a filter or symbol code fits better).
    pub fn new_order_rejected(code: RejectCode) -> Self {
        match code {
            RejectCode::ZeroQuantity | RejectCode::QtyOffLot => Self::filter("LOT_SIZE"),
            RejectCode::PriceOffTick | RejectCode::OutsidePriceBand => Self::filter("PRICE_FILTER"),
            RejectCode::BelowMinNotional => Self::filter("NOTIONAL"),
            RejectCode::UnknownMarket => Self::invalid_symbol(),
            RejectCode::EngineBusy => Self::busy(),
            RejectCode::InvalidOrder => Self::bad(-1014, "Unsupported order combination."),
            RejectCode::AccountOrderLimit => Self::bad(-2010, "Filter failure: MAX_NUM_ORDERS"),
            other => Self::bad(-2010, rejection_msg(other)),
        }
    }

    /// An engine rejection of a cancel (`-2011`).
    pub fn cancel_rejected(code: RejectCode) -> Self {
        match code {
            RejectCode::UnknownMarket => Self::invalid_symbol(),
            RejectCode::EngineBusy => Self::busy(),
            other => Self::bad(-2011, rejection_msg(other)),
        }
    }

    /// An engine rejection of a native command (transfer, credit, account creation).
    pub fn command_rejected(code: RejectCode) -> Self {
        match code {
            RejectCode::EngineBusy => Self::busy(),
            // As a refund's reused `idempotencyKey`: the key names another request.
            RejectCode::TransferKeyReused => Self::bad(
                -1164,
                "clientTranId was used for another transfer (recipient, asset or amount).",
            ),
            RejectCode::CreditKeyReused => Self::bad(
                -1164,
                "reference was used for another credit (account, asset or amount).",
            ),
            other => Self::bad(-2010, rejection_msg(other)),
        }
    }
}

/// Binance's message for an engine rejection, where Binance has one.
pub fn rejection_msg(code: RejectCode) -> Cow<'static, str> {
    match code {
        RejectCode::InsufficientBalance => {
            "Account has insufficient balance for requested action.".into()
        }
        RejectCode::PostOnlyWouldTake => "Order would immediately match and take.".into(),
        RejectCode::DuplicateClientId => "Duplicate order sent.".into(),
        RejectCode::UnknownOrder => "Unknown order sent.".into(),
        RejectCode::FokCannotFill => "Order could not be filled in full immediately (FOK).".into(),
        RejectCode::BookFull => "The order book is full.".into(),
        other => {
            let m = other.message();
            let mut s = String::with_capacity(m.len() + 1);
            let mut c = m.chars();
            if let Some(f) = c.next() {
                s.extend(f.to_uppercase());
                s.push_str(c.as_str());
            }
            s.push('.');
            s.into()
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.msg)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.code, "msg": self.msg });
        let mut res = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                res.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        res
    }
}

/// A key store failure: too many keys is `-2010`; anything else is logged and answered `-1000`
/// (never with the key's secret: a [`crate::keys::KeyError`] holds none).
impl From<crate::keys::KeyError> for ApiError {
    fn from(e: crate::keys::KeyError) -> Self {
        match e {
            crate::keys::KeyError::TooMany { max, .. } => Self::bad(
                -2010,
                format!("Too many API keys; an account holds at most {max}."),
            ),
            e => {
                tracing::error!(error = %e, "API key storage failed");
                Self::internal()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_mapping_table() {
        let cases: &[(RejectCode, i32, &str)] = &[
            (RejectCode::InsufficientBalance, -2010, "Account has insufficient balance for requested action."),
            (RejectCode::PostOnlyWouldTake, -2010, "Order would immediately match and take."),
            (RejectCode::PriceOffTick, -1013, "Filter failure: PRICE_FILTER"),
            (RejectCode::QtyOffLot, -1013, "Filter failure: LOT_SIZE"),
            (RejectCode::BelowMinNotional, -1013, "Filter failure: NOTIONAL"),
            (RejectCode::UnknownMarket, -1121, "Invalid symbol."),
            (RejectCode::DuplicateClientId, -2010, "Duplicate order sent."),
            (RejectCode::EngineBusy, -1008, "Server is currently overloaded with other requests. Please try again in a few minutes."),
        ];
        for &(code, want, msg) in cases {
            let e = ApiError::new_order_rejected(code);
            assert_eq!((e.code, e.msg.as_ref()), (want, msg), "{code:?}");
        }
        let e = ApiError::cancel_rejected(RejectCode::UnknownOrder);
        assert_eq!((e.code, e.msg.as_ref()), (-2011, "Unknown order sent."));
        assert_eq!(
            rejection_msg(RejectCode::SelfTransfer),
            "Transfer to the same account."
        );
    }
}
