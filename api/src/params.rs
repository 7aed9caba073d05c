//! Request parameters as Binance reads them: from the query string and a form body, each name at
//! most once; every parameter sent must be read (`-1104`).

use crate::error::ApiError;

/// Parsed parameters, in order. Cloning is cheap (the items are shared; only which were read is
/// copied), so a request parsed once can be handed to every reader.
#[derive(Debug, Default, Clone)]
pub struct Params {
    items: std::sync::Arc<Vec<(String, String)>>,
    /// Bit `i`: item `i` was read (at most [`MAX_PARAMS`] items).
    read: u64,
}

/// The longest accepted parameter value...
pub const MAX_VALUE_LEN: usize = 1024;
/// ...but for a BOLT11 `invoice` (`POST /mapi/v1/lightning/pay`): its description and route hints
/// can take it past 1,024 characters (review: the pay route promised 2,048 and refused any over
/// 1,024 here, before its own check).
pub const MAX_INVOICE_VALUE_LEN: usize = 2048;

/// The longest value accepted for parameter `name`.
fn max_len(name: &str) -> usize {
    if name == "invoice" {
        MAX_INVOICE_VALUE_LEN
    } else {
        MAX_VALUE_LEN
    }
}
/// The most parameters accepted.
pub const MAX_PARAMS: usize = 32;

fn hexval(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes a form component (`+` is a space).
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let h = hexval(*b.get(i + 1)?)?;
                let l = hexval(*b.get(i + 2)?)?;
                out.push(h * 16 + l);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

impl Params {
    /// Parses query string and form body together.
    pub fn parse(query: &str, body: &str) -> Result<Self, ApiError> {
        let mut items = Vec::new();
        for part in query.split('&').chain(body.split('&')) {
            if part.is_empty() {
                continue;
            }
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let k = percent_decode(k).ok_or_else(|| ApiError::illegal(k, "^[A-Za-z0-9]{1,64}$"))?;
            check_name(&k)?;
            let v = percent_decode(v).ok_or_else(|| ApiError::illegal(&k, "UTF-8 text"))?;
            push(&mut items, k, v)?;
        }
        Ok(Self::from_items(items))
    }

    /// Parameters given as decoded `(name, value)` pairs (the WebSocket API's, from its JSON),
    /// checked as [`Params::parse`] checks a query string's.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Result<Self, ApiError> {
        let mut items = Vec::new();
        for (k, v) in pairs {
            check_name(&k)?;
            push(&mut items, k, v)?;
        }
        Ok(Self::from_items(items))
    }

    fn from_items(items: Vec<(String, String)>) -> Self {
        Self {
            items: std::sync::Arc::new(items),
            read: 0,
        }
    }

    /// The index of `name`, if sent.
    fn find(&self, name: &str) -> Option<usize> {
        self.items.iter().position(|(n, _)| n == name)
    }

    /// An optional parameter (empty counts as absent, and is an error: `-1105`).
    pub fn opt(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        match self.find(name) {
            Some(i) => {
                self.read |= 1 << i;
                let v = &self.items[i].1;
                if v.is_empty() {
                    return Err(ApiError::bad(
                        -1105,
                        format!("Parameter '{name}' was empty."),
                    ));
                }
                Ok(Some(v.clone()))
            }
            None => Ok(None),
        }
    }

    /// A mandatory parameter (`-1102` when missing).
    pub fn req(&mut self, name: &str) -> Result<String, ApiError> {
        self.opt(name)?.ok_or_else(|| ApiError::missing(name))
    }

    /// An optional unsigned integer.
    pub fn opt_u64(&mut self, name: &str) -> Result<Option<u64>, ApiError> {
        match self.opt(name)? {
            None => Ok(None),
            Some(v) => {
                if v.len() > 20 || !v.bytes().all(|c| c.is_ascii_digit()) {
                    return Err(ApiError::illegal(name, "^[0-9]{1,20}$"));
                }
                v.parse::<u64>()
                    .map(Some)
                    .map_err(|_| ApiError::illegal(name, "^[0-9]{1,20}$"))
            }
        }
    }

    /// A `limit` with a default and a maximum (`-1130`-style error above it... Binance clamps
    /// some; here values above `max` are refused).
    pub fn limit(&mut self, default: u32, max: u32) -> Result<u32, ApiError> {
        match self.opt_u64("limit")? {
            None => Ok(default),
            Some(0) => Err(ApiError::invalid_value("limit")),
            Some(v) if v > u64::from(max) => Err(ApiError::invalid_value("limit")),
            Some(v) => Ok(v as u32),
        }
    }

    /// Every parameter as `(name, value)`, in the order sent (nothing is marked read).
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.items.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// True when `name` was sent (nothing is marked read).
    pub fn has(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    /// Marks a parameter read without using it.
    pub fn skip(&mut self, name: &str) {
        if let Some(i) = self.find(name) {
            self.read |= 1 << i;
        }
    }

    /// Fails with `-1104` when a parameter was sent but not read.
    pub fn finish(&self) -> Result<(), ApiError> {
        let read = self.read.count_ones() as usize;
        if read != self.items.len() {
            return Err(ApiError::bad(
                -1104,
                format!(
                    "Not all sent parameters were read; read '{read}' parameter(s) but was sent '{}'.",
                    self.items.len()
                ),
            ));
        }
        Ok(())
    }
}

/// A parameter name: 1 to 64 ASCII letters and digits (`-1100`).
fn check_name(k: &str) -> Result<(), ApiError> {
    if k.is_empty() || k.len() > 64 || !k.bytes().all(|c| c.is_ascii_alphanumeric()) {
        return Err(ApiError::bad(
            -1100,
            "Illegal characters found in a parameter name.",
        ));
    }
    Ok(())
}

/// Appends one parameter: its value at most [`MAX_VALUE_LEN`] bytes ([`MAX_INVOICE_VALUE_LEN`]
/// for an `invoice`), its name not sent before
/// (`-1101`), at most [`MAX_PARAMS`] in all (`-1101`).
fn push(items: &mut Vec<(String, String)>, k: String, v: String) -> Result<(), ApiError> {
    let max = max_len(&k);
    if v.len() > max {
        return Err(ApiError::illegal(&k, &format!("at most {max} characters")));
    }
    if items.iter().any(|(n, _)| *n == k) {
        return Err(ApiError::bad(
            -1101,
            "Duplicate values for a parameter detected.",
        ));
    }
    items.push((k, v));
    if items.len() > MAX_PARAMS {
        return Err(ApiError::bad(
            -1101,
            format!(
                "Too many parameters; expected '{MAX_PARAMS}' and received '{}'.",
                items.len()
            ),
        ));
    }
    Ok(())
}

/// Removes the `signature=...` pair from a raw query or body, returning the rest (exact bytes)
/// and the signature.
pub fn split_signature(raw: &str) -> (String, Option<String>) {
    let mut sig = None;
    let mut rest: Vec<&str> = Vec::new();
    for part in raw.split('&') {
        if let Some(s) = part.strip_prefix("signature=") {
            sig = Some(s.to_owned());
        } else {
            rest.push(part);
        }
    }
    (rest.join("&"), sig)
}

/// A signed request's parameters, read the way [`crate::state::AppState::signed`] reads them before
/// it checks the time and the signature: every parameter parsed (each name once, over query and
/// body together), `timestamp` read (missing or not 1-20 digits: `-1102`), `recvWindow` read if
/// sent (`-1100`). `signature` is left unread.
pub fn parse_signed(query: &str, body: &str) -> Result<(Params, u64, Option<u64>), ApiError> {
    signed_params(Params::parse(query, body)?)
}

/// [`parse_signed`] of parameters already parsed.
pub fn signed_params(mut p: Params) -> Result<(Params, u64, Option<u64>), ApiError> {
    let ts = p.req("timestamp")?;
    let ts: u64 = ts
        .parse()
        .ok()
        .filter(|_| ts.len() <= 20 && ts.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| ApiError::missing("timestamp"))?;
    let recv = p.opt_u64("recvWindow")?;
    Ok((p, ts, recv))
}

/// The bytes a signed request's HMAC covers and the signature sent: the raw query followed by the
/// raw body, each with its `signature=` pair removed (exact bytes otherwise); the query's
/// signature wins. `None` when neither carries a `signature=` pair as sent (a percent-encoded
/// name is not one).
pub fn signed_payload(query: &str, body: &str) -> Option<(String, String)> {
    let (q, sig_q) = split_signature(query);
    let (b, sig_b) = split_signature(body);
    let sig = sig_q.or(sig_b)?;
    Some((format!("{q}{b}"), sig))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_read() {
        let mut p = Params::parse("symbol=BTCUSD&limit=5", "side=BUY&x=a%2Bb+c").unwrap();
        assert_eq!(p.req("symbol").unwrap(), "BTCUSD");
        assert_eq!(p.limit(100, 1000).unwrap(), 5);
        assert_eq!(p.opt("x").unwrap().unwrap(), "a+b c");
        assert_eq!(p.finish().unwrap_err().code, -1104);
        p.skip("side");
        p.finish().unwrap();
        assert_eq!(p.req("missing").unwrap_err().code, -1102);
    }

    #[test]
    fn malformed() {
        assert_eq!(Params::parse("a=1&a=2", "").unwrap_err().code, -1101);
        assert_eq!(Params::parse("a=1", "a=2").unwrap_err().code, -1101);
        assert_eq!(Params::parse("a%zz=1", "").unwrap_err().code, -1100);
        assert_eq!(Params::parse("a-b=1", "").unwrap_err().code, -1100);
        assert_eq!(Params::parse("a=%ff", "").unwrap_err().code, -1100);
        let mut p = Params::parse("limit=abc&recvWindow=", "").unwrap();
        assert_eq!(p.limit(1, 2).unwrap_err().code, -1100);
        assert_eq!(p.opt("recvWindow").unwrap_err().code, -1105);
        let many: Vec<String> = (0..40).map(|i| format!("p{i}=1")).collect();
        assert_eq!(Params::parse(&many.join("&"), "").unwrap_err().code, -1101);
    }

    #[test]
    fn signature_split_keeps_exact_bytes() {
        let (rest, sig) = split_signature("symbol=BTCUSD&timestamp=1&signature=ab");
        assert_eq!(
            (rest.as_str(), sig.as_deref()),
            ("symbol=BTCUSD&timestamp=1", Some("ab"))
        );
        let (rest, sig) = split_signature("a=%20x");
        assert_eq!((rest.as_str(), sig), ("a=%20x", None));
    }
}
