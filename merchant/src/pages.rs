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
    let (script, style) = if std::ptr::eq(page, CHECKOUT_HTML) {
        CHECKOUT.get_or_init(|| inline_sources(CHECKOUT_HTML))
    } else if std::ptr::eq(page, POS_HTML) {
        POS.get_or_init(|| inline_sources(POS_HTML))
    } else if std::ptr::eq(page, CLAIM_HTML) {
        CLAIM.get_or_init(|| inline_sources(CLAIM_HTML))
    } else {
        computed = inline_sources(page);
        &computed
    };
    format!(
        "default-src 'none'; script-src {script}; style-src {style}; img-src 'self'; \
         connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors {frame_ancestors}"
    )
}

/// The CSP sources of a page's inline `<script>` and `<style>` elements: their hashes.
fn inline_sources(page: &str) -> (String, String) {
    let hashes = |tag: &str| -> String {
        let open = format!("<{tag}>");
        let close = format!("</{tag}>");
        let mut out = Vec::new();
        let mut rest = page;
        while let Some((_, after)) = rest.split_once(open.as_str()) {
            let Some((body, tail)) = after.split_once(close.as_str()) else {
                break;
            };
            // The browser hashes the element's text after the HTML parser turned CR LF and CR
            // into LF (a checkout with CRLF line endings must still match).
            let text = body.replace("\r\n", "\n").replace('\r', "\n");
            out.push(format!("'sha256-{}'", sha256_base64(text.as_bytes())));
            rest = tail;
        }
        if out.is_empty() {
            "'none'".to_owned()
        } else {
            out.join(" ")
        }
    };
    (hashes("script"), hashes("style"))
}

fn sha256_base64(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(bytes);
    // Standard base64 with padding, as CSP hash sources are written.
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(44);
    for c in d.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
