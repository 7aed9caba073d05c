//! **SHIM — stream Q's `pages.rs` (and `pages/*.html`) replaces this file at merge.** Exactly
//! the contract's public constants.

/// The checkout page, served at `GET /i/{id}`.
pub const CHECKOUT_HTML: &str =
    "<!doctype html><title>Checkout</title><p>Checkout page (stream Q).</p>";
/// The point-of-sale page, served at `GET /pos/{token}`.
pub const POS_HTML: &str =
    "<!doctype html><title>Point of sale</title><p>Point of sale (stream Q).</p>";
