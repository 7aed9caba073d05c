//! Mediator's trader API: Binance-spot-compatible REST and WebSocket, API keys and permissions,
//! rate limits, and the read models that answer queries; and the HTTP shell other products are
//! composed over (the `merchant` crate): [`AppState`] with its typed extension slots
//! ([`AppState::attach`]), the permission-table router ([`app_with`], [`Surface`]), the
//! extractors, errors and limits.
//!
//! **Architecture invariants:**
//! * `api` is the only crate that knows JSON and HTTP; it talks to the engine only through
//!   [`core::ExchangeCore`] (commands in, one reply each) and [`core::EventSink`] (events out).
//! * No floats on the money path: decimal strings convert exactly to ticks, lots and amounts
//!   ([`decimal`], [`market`]).
//! * Every error is a Binance `{"code":..,"msg":..}` ([`error::ApiError`]); internals are logged,
//!   never answered.
//! * No secret is stored or logged: API secrets are derived from a master key ([`keys`]).

#![warn(missing_docs)]

pub mod access;
pub mod app;
pub mod audit;
pub mod capital;
pub mod catalog;
pub mod client;
pub mod core;
pub mod custody;
pub mod decimal;
pub mod error;
pub mod keys;
pub mod lightning;
pub mod market;
pub mod metrics;
pub mod native;
pub mod node;
pub mod openapi;
pub mod orderlist;
pub mod page;
pub mod params;
pub mod policy;
pub mod proofs;
pub mod public;
pub mod ratelimit;
pub mod readmodel;
pub mod seqcore;
pub mod state;
pub mod store;
pub mod trade;
pub mod ws;
pub mod wsapi;

pub use app::{
    admin_app, admin_app_with, app, app_with, open, open_local, public_app, public_app_with, serve,
    serve_admin, ApiConfig, AppState, Surface, SURFACE,
};
pub use core::{CoreError, EventBatch, EventSink, ExchangeCore, LocalCore, Outcome, Reply};
pub use node::{start_node, start_node_with, Node, NodeConfig};
pub use seqcore::SequencerCore;
