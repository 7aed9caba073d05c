//! The parameter rules of `api::params`, restated as a small reference model. Shared by the
//! property tests (`api/tests/parsers.rs`) and the `signed_request` fuzz target.

use api::params::{percent_decode, MAX_PARAMS, MAX_VALUE_LEN};

/// The parameter rules, restated: the error code `query` + `body` get, or the decoded pairs.
pub fn params_model(query: &str, body: &str) -> Result<Vec<(String, String)>, i32> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for part in query.split('&').chain(body.split('&')) {
        if part.is_empty() {
            continue;
        }
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let k = percent_decode(k).ok_or(-1100)?;
        if k.is_empty() || k.len() > 64 || !k.bytes().all(|c| c.is_ascii_alphanumeric()) {
            return Err(-1100);
        }
        let v = percent_decode(v).ok_or(-1100)?;
        if v.len() > MAX_VALUE_LEN {
            return Err(-1100);
        }
        if pairs.iter().any(|(n, _)| *n == k) {
            return Err(-1101);
        }
        pairs.push((k, v));
        if pairs.len() > MAX_PARAMS {
            return Err(-1101);
        }
    }
    Ok(pairs)
}

/// Upper-case percent-encoding of every byte (the decoder's inverse).
pub fn encode_all(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}
