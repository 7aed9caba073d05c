//! BIP21 payment URIs and their QR codes (PNG and SVG).
//!
//! The QR code always encodes exactly the bytes it is given (byte mode, error-correction level M,
//! a 4-module quiet zone), so a wallet that scans it reads back exactly the invoice's `bip21`.
//! PNG and SVG are rendered here from the module matrix: no image library, no floats.

use qrcode::{Color, EcLevel, QrCode};

/// Pixels per QR module in [`qr_png`].
pub const PNG_MODULE_PX: u32 = 8;
/// Light modules around the symbol on each side (the quiet zone ISO/IEC 18004 asks for).
pub const QUIET_ZONE_MODULES: u32 = 4;
/// The most bytes [`qr_png`] and [`qr_svg`] accept: a version-40 symbol at level L in byte mode.
/// Up to 2,331 bytes get level M; longer data falls back to level L. Callers bound the label and
/// message they put in a URI so this is never reached.
pub const QR_DATA_MAX_BYTES: usize = 2953;

const SAT_PER_BTC: u64 = 100_000_000;

/// `bitcoin:ADDRESS?amount=..&label=..&message=..` (BIP21).
///
/// * `amount` is in BTC: integer part, then at most 8 decimals with trailing zeros trimmed (no
///   decimal point for whole bitcoins, never an exponent); omitted when `amount_sat` is 0.
/// * `label` and `message` are percent-encoded as UTF-8 bytes, leaving only RFC 3986 unreserved
///   characters (`A-Z a-z 0-9 - . _ ~`) as they are (a space becomes `%20`); omitted when `None`
///   or empty.
/// * `address` is inserted as given; bitcoin addresses (base58 or bech32) are alphanumeric.
pub fn bip21_uri(
    address: &str,
    amount_sat: u64,
    label: Option<&str>,
    message: Option<&str>,
) -> String {
    debug_assert!(
        address.bytes().all(|b| b.is_ascii_alphanumeric()),
        "a bitcoin address is alphanumeric: {address:?}"
    );
    let mut uri = format!("bitcoin:{address}");
    let mut separator = '?';
    let mut push = |uri: &mut String, key: &str, value: &str| {
        uri.push(separator);
        separator = '&';
        uri.push_str(key);
        uri.push('=');
        uri.push_str(value);
    };
    if amount_sat > 0 {
        push(&mut uri, "amount", &btc_decimal(amount_sat));
    }
    for (key, value) in [("label", label), ("message", message)] {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            push(&mut uri, key, &percent_encode(value));
        }
    }
    uri
}

/// `amount_sat` as a BTC decimal: `1` → `0.00000001`, `150_000_000` → `1.5`, `100_000_000` → `1`.
fn btc_decimal(amount_sat: u64) -> String {
    let whole = amount_sat / SAT_PER_BTC;
    let frac = amount_sat % SAT_PER_BTC;
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:08}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// RFC 3986 percent-encoding of every byte outside the unreserved set, upper-case hex.
fn percent_encode(value: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
    }
    out
}

/// The module matrix of `data`: `width` × `width`, row-major, `true` = dark.
struct Matrix {
    width: u32,
    dark: Vec<bool>,
}

impl Matrix {
    fn encode(data: &str) -> Matrix {
        assert!(
            data.len() <= QR_DATA_MAX_BYTES,
            "QR data of {} bytes exceeds the {QR_DATA_MAX_BYTES}-byte maximum",
            data.len()
        );
        let code = QrCode::with_error_correction_level(data.as_bytes(), EcLevel::M)
            .or_else(|_| QrCode::with_error_correction_level(data.as_bytes(), EcLevel::L))
            .expect("data within QR_DATA_MAX_BYTES fits a version-40-L symbol");
        let width = u32::try_from(code.width()).expect("a QR symbol is at most 177 modules wide");
        let dark = code
            .to_colors()
            .into_iter()
            .map(|c| c == Color::Dark)
            .collect();
        Matrix { width, dark }
    }

    /// Whether the module at (`x`, `y`) of the symbol (without quiet zone) is dark.
    fn is_dark(&self, x: u32, y: u32) -> bool {
        self.dark[(y * self.width + x) as usize]
    }
}

/// A PNG of the QR code of exactly `data`: black on white, 1-bit greyscale, a 4-module quiet zone,
/// 8 px per module.
///
/// # Panics
/// If `data` is longer than [`QR_DATA_MAX_BYTES`].
pub fn qr_png(data: &str) -> Vec<u8> {
    let matrix = Matrix::encode(data);
    let side_modules = matrix.width + 2 * QUIET_ZONE_MODULES;
    let side_px = side_modules * PNG_MODULE_PX;
    let row_bytes = side_px.div_ceil(8) as usize;
    // 1-bit greyscale: a set bit is white. Start all white, clear the dark modules.
    let mut pixels = vec![0xffu8; row_bytes * side_px as usize];
    for y_px in 0..side_px {
        let row = &mut pixels[y_px as usize * row_bytes..][..row_bytes];
        let y_mod = y_px / PNG_MODULE_PX;
        for x_px in 0..side_px {
            let x_mod = x_px / PNG_MODULE_PX;
            let in_symbol = (QUIET_ZONE_MODULES..QUIET_ZONE_MODULES + matrix.width)
                .contains(&x_mod)
                && (QUIET_ZONE_MODULES..QUIET_ZONE_MODULES + matrix.width).contains(&y_mod);
            if in_symbol && matrix.is_dark(x_mod - QUIET_ZONE_MODULES, y_mod - QUIET_ZONE_MODULES) {
                row[(x_px / 8) as usize] &= !(0x80u8 >> (x_px % 8));
            }
        }
    }
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, side_px, side_px);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::One);
    encoder.set_compression(png::Compression::Balanced);
    let mut writer = encoder
        .write_header()
        .expect("writing a PNG header to a Vec cannot fail");
    writer
        .write_image_data(&pixels)
        .expect("the pixel buffer matches the header's size");
    writer
        .finish()
        .expect("finishing a PNG in a Vec cannot fail");
    out
}

/// A standalone SVG of the QR code of exactly `data`: a white square with a 4-module quiet zone
/// and one black path (a rectangle per horizontal run of dark modules), one user unit per module
/// (`viewBox="0 0 N N"`), 8 px per module as its intrinsic size, `shape-rendering="crispEdges"`.
///
/// # Panics
/// If `data` is longer than [`QR_DATA_MAX_BYTES`].
pub fn qr_svg(data: &str) -> String {
    let matrix = Matrix::encode(data);
    let side = matrix.width + 2 * QUIET_ZONE_MODULES;
    let side_px = side * PNG_MODULE_PX;
    let mut path = String::new();
    for y in 0..matrix.width {
        let mut x = 0;
        while x < matrix.width {
            if !matrix.is_dark(x, y) {
                x += 1;
                continue;
            }
            let start = x;
            while x < matrix.width && matrix.is_dark(x, y) {
                x += 1;
            }
            path.push_str(&format!(
                "M{} {}h{}v1h-{}z",
                start + QUIET_ZONE_MODULES,
                y + QUIET_ZONE_MODULES,
                x - start,
                x - start
            ));
        }
    }
    format!(
        concat!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" version="1.1" viewBox="0 0 {side} {side}" "#,
            r#"width="{px}" height="{px}" shape-rendering="crispEdges">"#,
            r##"<rect width="{side}" height="{side}" fill="#fff"/>"##,
            r##"<path fill="#000" d="{path}"/></svg>"##,
            "\n"
        ),
        side = side,
        px = side_px,
        path = path
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a wallet reads back from a BIP21 URI.
    #[derive(Debug, PartialEq)]
    struct Parsed {
        address: String,
        amount_sat: Option<u64>,
        label: Option<String>,
        message: Option<String>,
    }

    fn percent_decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ascii hex");
                out.push(u8::from_str_radix(hex, 16).expect("hex digits"));
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).expect("utf-8")
    }

    /// A BTC decimal to satoshis, integers only; at most 8 decimals.
    fn parse_btc(s: &str) -> u64 {
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        assert!(frac.len() <= 8, "too many decimals in {s}");
        assert!(!frac.ends_with('0'), "trailing zero in {s}");
        assert!(whole.bytes().all(|b| b.is_ascii_digit()) && !whole.is_empty());
        let frac_sat: u64 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<8}").parse().expect("digits")
        };
        whole.parse::<u64>().expect("digits") * SAT_PER_BTC + frac_sat
    }

    /// A small BIP21 parser: the reference the encoder is checked against.
    fn parse(uri: &str) -> Parsed {
        let rest = uri.strip_prefix("bitcoin:").expect("bitcoin: scheme");
        let (address, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut parsed = Parsed {
            address: address.to_owned(),
            amount_sat: None,
            label: None,
            message: None,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').expect("key=value");
            // Only unreserved characters and %XX escapes may appear in a value.
            assert!(
                value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)),
                "unescaped character in {value:?}"
            );
            match key {
                "amount" => parsed.amount_sat = Some(parse_btc(value)),
                "label" => parsed.label = Some(percent_decode(value)),
                "message" => parsed.message = Some(percent_decode(value)),
                other => panic!("unexpected key {other}"),
            }
        }
        parsed
    }

    const ADDR: &str = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080";

    #[test]
    fn amounts() {
        let cases: &[(&str, u64, &str)] = &[
            ("one satoshi", 1, "0.00000001"),
            ("ten satoshis", 10, "0.0000001"),
            ("one bitcoin", 100_000_000, "1"),
            ("whole bitcoins", 2_100_000_000, "21"),
            ("all bitcoins", 2_100_000_000_000_000, "21000000"),
            ("trailing zeros", 100_000, "0.001"),
            ("mixed", 123_456_789, "1.23456789"),
            ("half", 50_000_000, "0.5"),
            ("u64 max", u64::MAX, "184467440737.09551615"),
        ];
        for (name, sat, want) in cases {
            let uri = bip21_uri(ADDR, *sat, None, None);
            assert_eq!(uri, format!("bitcoin:{ADDR}?amount={want}"), "{name}");
            assert_eq!(parse(&uri).amount_sat, Some(*sat), "{name}");
        }
        assert_eq!(bip21_uri(ADDR, 0, None, None), format!("bitcoin:{ADDR}"));
    }

    #[test]
    fn labels_and_messages() {
        let cases: &[(&str, Option<&str>, Option<&str>, &str)] = &[
            ("none", None, None, "?amount=0.001"),
            ("empty is omitted", Some(""), Some(""), "?amount=0.001"),
            (
                "reserved characters",
                Some("a&b=c?d#e%f g"),
                None,
                "?amount=0.001&label=a%26b%3Dc%3Fd%23e%25f%20g",
            ),
            (
                "unreserved stay",
                Some("A-z.0_9~"),
                None,
                "?amount=0.001&label=A-z.0_9~",
            ),
            (
                "non-ascii as utf-8",
                Some("Café €"),
                Some("Grüße+/"),
                "?amount=0.001&label=Caf%C3%A9%20%E2%82%AC&message=Gr%C3%BC%C3%9Fe%2B%2F",
            ),
            (
                "message only",
                None,
                Some("Order 42"),
                "?amount=0.001&message=Order%2042",
            ),
        ];
        for (name, label, message, want) in cases {
            let uri = bip21_uri(ADDR, 100_000, *label, *message);
            assert_eq!(uri, format!("bitcoin:{ADDR}{want}"), "{name}");
            let parsed = parse(&uri);
            assert_eq!(
                parsed.label.as_deref(),
                label.filter(|l| !l.is_empty()),
                "{name}"
            );
            assert_eq!(
                parsed.message.as_deref(),
                message.filter(|m| !m.is_empty()),
                "{name}"
            );
        }
    }

    proptest! {
        #[test]
        fn uri_parses_back(
            address in "[a-km-zA-HJ-NP-Z1-9]{26,62}",
            amount_sat in 1u64..=2_100_000_000_000_000,
            label in proptest::option::of(".{0,40}"),
            message in proptest::option::of(".{0,40}"),
        ) {
            let uri = bip21_uri(&address, amount_sat, label.as_deref(), message.as_deref());
            let parsed = parse(&uri);
            prop_assert_eq!(parsed, Parsed {
                address,
                amount_sat: Some(amount_sat),
                label: label.filter(|l| !l.is_empty()),
                message: message.filter(|m| !m.is_empty()),
            });
        }
    }

    /// Decodes a QR PNG the way a phone would see it: greyscale pixels into a QR reader.
    fn decode_png(png_bytes: &[u8]) -> String {
        let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
        decoder.set_transformations(png::Transformations::EXPAND);
        let mut reader = decoder.read_info().expect("PNG header");
        let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
        let info = reader.next_frame(&mut buf).expect("PNG frame");
        assert_eq!(info.color_type, png::ColorType::Grayscale);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        let (w, h) = (info.width as usize, info.height as usize);
        let mut img = rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| {
            if buf[y * info.line_size + x] > 0 {
                255
            } else {
                0
            }
        });
        let grids = img.detect_grids();
        assert_eq!(grids.len(), 1, "exactly one QR code in the PNG");
        let (_meta, content) = grids[0].decode().expect("QR decodes");
        content
    }

    #[test]
    fn png_decodes_to_exactly_the_uri() {
        let cases = [
            bip21_uri(
                ADDR,
                25_000,
                Some("Coffee Shop"),
                Some("Invoice 7xYz: 2 × latte"),
            ),
            bip21_uri(ADDR, 1, None, None),
            bip21_uri(
                "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2",
                2_100_000_000_000_000,
                None,
                None,
            ),
            bip21_uri(ADDR, 123_456_789, Some(&"long label ".repeat(30)), None),
        ];
        for uri in &cases {
            let png_bytes = qr_png(uri);
            assert_eq!(&png_bytes[..8], b"\x89PNG\r\n\x1a\n");
            let decoded = decode_png(&png_bytes);
            assert_eq!(&decoded, uri);
            let parsed = parse(&decoded);
            let want = parse(uri);
            assert_eq!(parsed.address, want.address);
            assert_eq!(parsed.amount_sat, want.amount_sat);
        }
        let parsed = parse(&decode_png(&qr_png(&cases[0])));
        assert_eq!(parsed.address, ADDR);
        assert_eq!(parsed.amount_sat, Some(25_000));
    }

    #[test]
    fn png_has_quiet_zone_and_module_size() {
        let uri = bip21_uri(ADDR, 25_000, None, None);
        let code = QrCode::with_error_correction_level(uri.as_bytes(), EcLevel::M).expect("fits");
        let side = (code.width() as u32 + 2 * QUIET_ZONE_MODULES) * PNG_MODULE_PX;
        let png_bytes = qr_png(&uri);
        let mut decoder = png::Decoder::new(std::io::Cursor::new(&png_bytes[..]));
        decoder.set_transformations(png::Transformations::EXPAND);
        let mut reader = decoder.read_info().expect("PNG header");
        let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
        let info = reader.next_frame(&mut buf).expect("PNG frame");
        assert_eq!((info.width, info.height), (side, side));
        let quiet_px = (QUIET_ZONE_MODULES * PNG_MODULE_PX) as usize;
        for y in 0..side as usize {
            for x in 0..side as usize {
                let in_quiet = x < quiet_px
                    || y < quiet_px
                    || x >= side as usize - quiet_px
                    || y >= side as usize - quiet_px;
                if in_quiet {
                    assert!(
                        buf[y * info.line_size + x] > 0,
                        "quiet zone pixel ({x},{y}) dark"
                    );
                }
            }
        }
        // The top-left finder pattern starts right after the quiet zone: dark.
        assert_eq!(buf[quiet_px * info.line_size + quiet_px], 0);
    }

    #[test]
    fn svg_is_a_standalone_drawing_of_the_symbol() {
        let uri = bip21_uri(ADDR, 25_000, Some("Coffee"), None);
        let code = QrCode::with_error_correction_level(uri.as_bytes(), EcLevel::M).expect("fits");
        let side = code.width() as u32 + 2 * QUIET_ZONE_MODULES;
        let svg = qr_svg(&uri);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.contains(&format!("viewBox=\"0 0 {side} {side}\"")));
        assert!(svg.contains("shape-rendering=\"crispEdges\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        // Every dark module is covered by exactly the runs of the path.
        let d = svg
            .split(" d=\"")
            .nth(1)
            .expect("a path")
            .split('"')
            .next()
            .expect("d");
        let dark_in_svg: u32 = d
            .split('M')
            .filter(|r| !r.is_empty())
            .map(|run| {
                run.split('h')
                    .nth(1)
                    .expect("run")
                    .split('v')
                    .next()
                    .expect("len")
            })
            .map(|len| len.parse::<u32>().expect("run length"))
            .sum();
        let dark_in_code = code
            .to_colors()
            .into_iter()
            .filter(|c| *c == Color::Dark)
            .count() as u32;
        assert!(dark_in_svg > 0);
        assert_eq!(dark_in_svg, dark_in_code);
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn oversized_data_panics_with_a_message() {
        qr_svg(&"x".repeat(QR_DATA_MAX_BYTES + 1));
    }
}
