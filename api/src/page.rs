//! Shell utilities for the server's own HTML pages (the reserves verification page here, the
//! checkout, point-of-sale, claim and dashboard pages of the `merchant` crate): the
//! Content-Security-Policy that lets a self-contained page run its inline script and style and
//! nothing else.

/// The Content-Security-Policy of a page: nothing but its own inline script and style (by
/// SHA-256 hash, no `'unsafe-inline'`), images from this server, requests to this server, no
/// `<base>`, no form posts, and embedding allowed to `frame_ancestors` only (`'none'`, or
/// `ApiConfig::frame_ancestors`). Computes the hashes on each call; a page served often caches
/// [`inline_sources`] and calls [`csp_of`].
pub fn content_security_policy(page: &str, frame_ancestors: &str) -> String {
    csp_of(&inline_sources(page), frame_ancestors)
}

/// The policy of a page whose `(script, style)` sources [`inline_sources`] gave.
pub fn csp_of((script, style): &(String, String), frame_ancestors: &str) -> String {
    format!(
        "default-src 'none'; script-src {script}; style-src {style}; img-src 'self'; \
         connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors {frame_ancestors}"
    )
}

/// The CSP sources of a page's inline `<script>` and `<style>` elements: their hashes.
pub fn inline_sources(page: &str) -> (String, String) {
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

/// Standard base64 (with padding) of a SHA-256 digest, as CSP hash sources are written.
pub fn sha256_base64(bytes: &[u8]) -> String {
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
        let none = content_security_policy("<p>static</p>", "'none'");
        assert!(
            none.contains("script-src 'none'; style-src 'none';"),
            "{none}"
        );
    }
}
