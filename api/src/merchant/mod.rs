//! Merchant payments (issue 5): invoices paid on chain or from a balance, BIP21 QR codes, a
//! checkout page and a point-of-sale page, and signed webhooks that tell the merchant's system
//! what happened. Everything merchant lives in this module tree and shares one SQLite database
//! (`<data_dir>/merchant.sqlite`); the outbox in [`webhook`] is written in the same transaction
//! as the invoice change it announces, so an event is delivered at least once even across a
//! crash.

pub mod pages;
pub mod qr;
pub mod webhook;
