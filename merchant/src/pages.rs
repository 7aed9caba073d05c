//! The checkout and point-of-sale pages: self-contained HTML, CSS and JavaScript (no CDN, font or
//! external script), one page for every invoice or terminal; the script reads the invoice id or
//! point-of-sale token from `location.pathname` and talks to the public endpoints.

/// Served at `GET /i/{id}`: amount, QR code, copyable address and BIP21 URI, countdown, and the
/// status updated live from `GET /i/{id}/events` (polling `GET /i/{id}/status` as a fallback).
pub const CHECKOUT_HTML: &str = include_str!("pages/checkout.html");

/// Served at `GET /modal/btcpay.js`: BTCPay's modal checkout interface (`window.btcpay`), which
/// opens `GET /i/{id}?view=modal` in a frame over a shop's page and passes its messages on.
pub const MODAL_JS: &str = include_str!("pages/btcpay.js");

/// Served at `GET /pos/{token}`: an amount keypad in the store's currency (`GET /pos/{token}/info`
/// gives its decimals); "Charge" creates an invoice with `POST /pos/{token}/invoice` and shows its
/// QR code and live status, then "New sale".
pub const POS_HTML: &str = include_str!("pages/pos.html");

/// Served at `GET /pp/{id}`: a pull payment (a refund) to claim: what remains, an address (and
/// an amount), "Claim" posts `POST /api/v1/pull-payments/{id}/payouts`, then the payouts.
pub const CLAIM_HTML: &str = include_str!("pages/claim.html");

/// The Content-Security-Policy of a page: nothing but its own inline script and style (by
/// SHA-256 hash, no `'unsafe-inline'`), images from this server (the QR code), requests to this
/// server (status, SSE, invoice creation), no `<base>`, no form posts, and embedding allowed to
/// `frame_ancestors` only (`ApiConfig::frame_ancestors`, `'self'` by default).
pub fn content_security_policy(page: &str, frame_ancestors: &str) -> String {
    static CHECKOUT: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    static POS: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    static CLAIM: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    let computed;
    let sources = if std::ptr::eq(page, CHECKOUT_HTML) {
        CHECKOUT.get_or_init(|| api::page::inline_sources(CHECKOUT_HTML))
    } else if std::ptr::eq(page, POS_HTML) {
        POS.get_or_init(|| api::page::inline_sources(POS_HTML))
    } else if std::ptr::eq(page, CLAIM_HTML) {
        CLAIM.get_or_init(|| api::page::inline_sources(CLAIM_HTML))
    } else {
        computed = api::page::inline_sources(page);
        &computed
    };
    api::page::csp_of(sources, frame_ancestors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::page::sha256_base64;

    #[test]
    fn csp_hashes_each_inline_script_and_style() {
        // RFC 4648 test vector through SHA-256 of "abc".
        assert_eq!(
            sha256_base64(b"abc"),
            "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
        );
        let csp = content_security_policy(
            "<style>a{}</style><script>x()</script>",
            "'self' https://shop.example",
        );
        assert!(csp.contains(&format!("script-src 'sha256-{}';", sha256_base64(b"x()"))));
        assert!(csp.contains(&format!("style-src 'sha256-{}';", sha256_base64(b"a{}"))));
        assert!(csp.ends_with("frame-ancestors 'self' https://shop.example"));
        let crlf = content_security_policy("<script>a()\r\nb()</script>", "'self'");
        assert!(crlf.contains(&sha256_base64(b"a()\nb()")), "{crlf}");
        for page in [CHECKOUT_HTML, POS_HTML] {
            let csp = content_security_policy(page, "'self'");
            assert!(
                !csp.contains("unsafe") && !csp.contains("'none'; style"),
                "{csp}"
            );
            assert!(
                !page.contains(" style=\""),
                "inline style attributes are blocked"
            );
        }
    }
}
