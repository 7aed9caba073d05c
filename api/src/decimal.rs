//! Exact decimal strings ↔ integer units. No floats anywhere on the money path.
//!
//! Binance sends and expects decimal strings (`"0.00100000"`). [`parse_units`] turns one into an
//! integer count of `10^-decimals` units and [`format_units`] turns it back, always with exactly
//! `decimals` fractional digits, as Binance prints them.

/// Why a decimal string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecimalError {
    /// Empty, a sign, an exponent, a second dot, a non-digit, or longer than 40 characters.
    #[error("malformed decimal")]
    Malformed,
    /// More significant fractional digits than the unit allows (trailing zeros are fine).
    #[error("too much precision")]
    TooPrecise,
    /// Does not fit in 64 bits of units.
    #[error("value too large")]
    TooLarge,
}

/// The longest decimal string accepted.
pub const MAX_LEN: usize = 40;

/// Parses a non-negative decimal string into units of `10^-decimals`.
///
/// Accepts `"12"`, `"12."`, `"12.5"`, `"0.00100000"`, `".5"`. Refuses signs, exponents,
/// whitespace, `"."`, nonzero digits beyond `decimals` places, and values above `u64::MAX` units.
pub fn parse_units(s: &str, decimals: u8) -> Result<u64, DecimalError> {
    if s.is_empty() || s.len() > MAX_LEN {
        return Err(DecimalError::Malformed);
    }
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return Err(DecimalError::Malformed);
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DecimalError::Malformed);
    }
    let d = usize::from(decimals);
    let (kept, extra) = if frac.len() > d {
        frac.split_at(d)
    } else {
        (frac, "")
    };
    if extra.bytes().any(|b| b != b'0') {
        return Err(DecimalError::TooPrecise);
    }
    let mut v: u128 = 0;
    for b in int.bytes().chain(kept.bytes()) {
        v = v * 10 + u128::from(b - b'0');
        if v > u128::from(u64::MAX) {
            return Err(DecimalError::TooLarge);
        }
    }
    for _ in kept.len()..d {
        v *= 10;
        if v > u128::from(u64::MAX) {
            return Err(DecimalError::TooLarge);
        }
    }
    Ok(v as u64)
}

/// Formats `units` of `10^-decimals` with exactly `decimals` fractional digits.
pub fn format_units(units: u64, decimals: u8) -> String {
    format_units_u128(u128::from(units), decimals)
}

/// [`format_units`] for sums that may exceed 64 bits. Total: any `decimals` (the digits are
/// placed, not divided by `10^decimals`, which does not fit a `u128` above 38).
pub fn format_units_u128(units: u128, decimals: u8) -> String {
    let d = usize::from(decimals);
    if d == 0 {
        return units.to_string();
    }
    if let Some(scale) = 10u128.checked_pow(u32::from(decimals)) {
        return format!("{}.{:0d$}", units / scale, units % scale);
    }
    // More than 38 decimals: every value is below the scale; left-pad its digits with zeros to
    // `d + 1` digits (one integer digit).
    let digits = units.to_string();
    let padded = format!("{digits:0>width$}", width = d + 1);
    let (int, frac) = padded.split_at(padded.len() - d);
    format!("{int}.{frac}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_case_table() {
        let ok: &[(&str, u8, u64)] = &[
            ("0", 8, 0),
            ("1", 8, 100_000_000),
            ("1.", 8, 100_000_000),
            (".5", 8, 50_000_000),
            ("0.00100000", 8, 100_000),
            ("0.001000000000", 8, 100_000),
            ("0.00000001", 8, 1),
            ("30000.01", 2, 3_000_001),
            ("007", 0, 7),
            ("184467440737.09551615", 8, u64::MAX),
        ];
        for &(s, d, want) in ok {
            assert_eq!(parse_units(s, d), Ok(want), "{s} with {d} decimals");
        }
        let bad: &[(&str, u8, DecimalError)] = &[
            ("", 8, DecimalError::Malformed),
            (".", 8, DecimalError::Malformed),
            ("-1", 8, DecimalError::Malformed),
            ("+1", 8, DecimalError::Malformed),
            ("1e5", 8, DecimalError::Malformed),
            ("1E5", 8, DecimalError::Malformed),
            (" 1", 8, DecimalError::Malformed),
            ("1 ", 8, DecimalError::Malformed),
            ("1.2.3", 8, DecimalError::Malformed),
            ("0x10", 8, DecimalError::Malformed),
            ("NaN", 8, DecimalError::Malformed),
            ("inf", 8, DecimalError::Malformed),
            ("１", 8, DecimalError::Malformed),
            ("0.000000001", 8, DecimalError::TooPrecise),
            ("1.5", 0, DecimalError::TooPrecise),
            ("184467440737.09551616", 8, DecimalError::TooLarge),
            ("99999999999999999999", 8, DecimalError::TooLarge),
            (
                "99999999999999999999999999999999999999999",
                0,
                DecimalError::Malformed,
            ),
        ];
        for &(s, d, want) in bad {
            assert_eq!(parse_units(s, d), Err(want), "{s:?} with {d} decimals");
        }
    }

    #[test]
    fn format_case_table() {
        assert_eq!(format_units(0, 8), "0.00000000");
        assert_eq!(format_units(1, 8), "0.00000001");
        assert_eq!(format_units(123_456_789, 8), "1.23456789");
        assert_eq!(format_units(42, 0), "42");
        assert_eq!(format_units(u64::MAX, 8), "184467440737.09551615");
        assert_eq!(
            format_units_u128(u128::from(u64::MAX) * 10, 8),
            "1844674407370.95516150"
        );
    }

    proptest::proptest! {
        #[test]
        fn round_trip_any_value(v: u64, d in 0u8..=18) {
            proptest::prop_assert_eq!(parse_units(&format_units(v, d), d), Ok(v));
        }

        #[test]
        fn parse_matches_a_reference(int in "[0-9]{1,12}", frac in "[0-9]{0,12}", d in 0u8..=12) {
            let s = if frac.is_empty() { int.clone() } else { format!("{int}.{frac}") };
            // Reference: exact rational arithmetic in u128.
            let significant = frac.trim_end_matches('0');
            let want = if significant.len() > usize::from(d) {
                Err(DecimalError::TooPrecise)
            } else {
                let mut padded = significant.to_owned();
                while padded.len() < usize::from(d) {
                    padded.push('0');
                }
                let v: u128 = format!("{int}{padded}").parse().unwrap_or(u128::MAX);
                u64::try_from(v).map_err(|_| DecimalError::TooLarge)
            };
            proptest::prop_assert_eq!(parse_units(&s, d), want);
        }

        #[test]
        fn never_panics(s in "\\PC{0,45}", d in 0u8..=30) {
            let _ = parse_units(&s, d);
        }
    }

    #[test]
    fn round_trip_every_small_value_and_edges() {
        for d in [0u8, 2, 8, 18] {
            for v in (0..2000u64).chain([u64::MAX, u64::MAX - 1, 10u64.pow(9)]) {
                assert_eq!(parse_units(&format_units(v, d), d), Ok(v));
            }
        }
    }
}
