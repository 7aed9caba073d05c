//! `api::decimal`: `parse_units` on any text and unit count never panics; what it accepts formats
//! back to the same units; `format_units` is total (any units, any decimals) and exact.
#![no_main]

use api::decimal::{format_units, format_units_u128, parse_units, MAX_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&decimals, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if let Ok(units) = parse_units(&text, decimals) {
        let formatted = format_units(units, decimals);
        // Formatting always gives `decimals` fractional digits; whenever that is short enough
        // to be parsed again, it parses back to the same value.
        if formatted.len() <= MAX_LEN {
            assert_eq!(parse_units(&formatted, decimals), Ok(units), "{text:?}");
        }
    }
    // Any 64 or 128-bit value with any number of decimals: the digits are the value's.
    if rest.len() >= 16 {
        let v = u128::from_le_bytes(rest[..16].try_into().expect("16 bytes"));
        let s = format_units_u128(v, decimals);
        let digits: String = s.chars().filter(|c| *c != '.').collect();
        assert_eq!(
            digits.trim_start_matches('0'),
            v.to_string().trim_start_matches('0')
        );
        if decimals > 0 {
            let (_, frac) = s.split_once('.').expect("a point when decimals > 0");
            assert_eq!(frac.len(), usize::from(decimals), "{s}");
        }
        let v64 = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let s = format_units(v64, decimals);
        if s.len() <= MAX_LEN {
            assert_eq!(parse_units(&s, decimals), Ok(v64), "{s}");
        }
    }
});
