//! The checkout and point-of-sale pages: self-contained HTML, CSS and JavaScript (no CDN, font or
//! external script), one page for every invoice or terminal; the script reads the invoice id or
//! point-of-sale token from `location.pathname` and talks to the public endpoints.

/// Served at `GET /i/{id}`: amount, QR code, copyable address and BIP21 URI, countdown, and the
/// status updated live from `GET /i/{id}/events` (polling `GET /i/{id}/status` as a fallback).
pub const CHECKOUT_HTML: &str = include_str!("pages/checkout.html");

/// Served at `GET /pos/{token}`: an amount keypad in the store's currency (`GET /pos/{token}/info`
/// gives its decimals); "Charge" creates an invoice with `POST /pos/{token}/invoice` and shows its
/// QR code and live status, then "New sale".
pub const POS_HTML: &str = include_str!("pages/pos.html");
