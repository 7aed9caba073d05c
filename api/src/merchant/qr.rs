//! **SHIM — stream Q's `qr.rs` replaces this file at merge.** Exactly the contract's public
//! signatures; `bip21_uri` is complete (the merchant core puts it in every invoice), the QR
//! encoders are placeholders that Q's real encoders replace.

/// `bitcoin:ADDRESS?amount=0.001&label=..&message=..` (amount in BTC, trailing zeros trimmed;
/// label and message percent-encoded per RFC 3986; omitted when `None` or empty).
pub fn bip21_uri(
    address: &str,
    amount_sat: u64,
    label: Option<&str>,
    message: Option<&str>,
) -> String {
    let mut s = format!("bitcoin:{address}");
    let mut sep = '?';
    if amount_sat > 0 {
        let a = crate::decimal::format_units(amount_sat, 8);
        let a = a.trim_end_matches('0').trim_end_matches('.');
        s.push_str(&format!("{sep}amount={a}"));
        sep = '&';
    }
    for (k, v) in [("label", label), ("message", message)] {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            s.push(sep);
            s.push_str(k);
            s.push('=');
            for b in v.bytes() {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    s.push(b as char);
                } else {
                    s.push_str(&format!("%{b:02X}"));
                }
            }
            sep = '&';
        }
    }
    s
}

/// A QR code of `data` as PNG (shim: an empty body until Q's encoder is merged).
pub fn qr_png(data: &str) -> Vec<u8> {
    let _ = data;
    Vec::new()
}

/// A QR code of `data` as a standalone SVG (shim: the data as text until Q's encoder is merged).
pub fn qr_svg(data: &str) -> String {
    let esc = data.replace('&', "&amp;").replace('<', "&lt;");
    format!("<svg xmlns=\"http://www.w3.org/2000/svg\"><text>{esc}</text></svg>")
}
