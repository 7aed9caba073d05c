//! Merchant payments: invoices, BIP21 QR codes, checkout and point-of-sale pages, webhooks.

pub mod pages;
pub mod qr;
