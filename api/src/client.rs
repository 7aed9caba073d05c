//! A small signed client for the server's own endpoints (the `mediator` admin commands): one
//! HTTP/1.1 request per connection, parameters in a form body, HMAC-SHA256 signature as the
//! server checks it. No TLS: it talks to the local server.

use crate::keys::sign;
use serde_json::Value;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Connecting, writing or reading.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// Not an HTTP response with a JSON body.
    #[error("malformed response")]
    Malformed,
    /// The server answered with a Binance-style error.
    #[error("HTTP {status}: {code} {msg}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Binance code.
        code: i64,
        /// Message.
        msg: String,
    },
}

/// A key and the server it signs for.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    api_key: String,
    secret: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("api_key", &self.api_key)
            .finish_non_exhaustive()
    }
}

/// Percent-encodes a form value.
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    /// A client for `addr` with this key.
    pub fn new(addr: SocketAddr, api_key: &str, secret: &str) -> Self {
        Self {
            addr,
            api_key: api_key.to_owned(),
            secret: secret.to_owned(),
        }
    }

    /// Reads `{"apiKey","secretKey"}` from a key file such as `admin-key.json`.
    pub fn from_key_file(addr: SocketAddr, path: &std::path::Path) -> Result<Self, ClientError> {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path)?)
            .map_err(|_| ClientError::Malformed)?;
        match (v["apiKey"].as_str(), v["secretKey"].as_str()) {
            (Some(k), Some(s)) => Ok(Self::new(addr, k, s)),
            _ => Err(ClientError::Malformed),
        }
    }

    /// A signed request; `params` are unencoded name/value pairs.
    pub async fn signed(
        &self,
        method: &str,
        path: &str,
        params: &[(&str, &str)],
    ) -> Result<Value, ClientError> {
        let mut q: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", form_encode(v)))
            .collect();
        q.push(format!("timestamp={}", crate::core::now_ms()));
        let q = q.join("&");
        let body = format!("{q}&signature={}", sign(&self.secret, &q));
        self.raw(method, path, &body).await
    }

    async fn raw(&self, method: &str, path: &str, body: &str) -> Result<Value, ClientError> {
        let mut s = tokio::net::TcpStream::connect(self.addr).await?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nX-MBX-APIKEY: {}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            self.api_key,
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8(buf).map_err(|_| ClientError::Malformed)?;
        let status: u16 = text
            .get(9..12)
            .and_then(|x| x.parse().ok())
            .ok_or(ClientError::Malformed)?;
        let (head, body) = text.split_once("\r\n\r\n").ok_or(ClientError::Malformed)?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body).ok_or(ClientError::Malformed)?
        } else {
            body.to_owned()
        };
        let v: Value = serde_json::from_str(&body).map_err(|_| ClientError::Malformed)?;
        if status == 200 {
            Ok(v)
        } else {
            Err(ClientError::Api {
                status,
                code: v["code"].as_i64().unwrap_or(0),
                msg: v["msg"].as_str().unwrap_or("").to_owned(),
            })
        }
    }
}

fn dechunk(mut s: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (len, rest) = s.split_once("\r\n")?;
        let n = usize::from_str_radix(len.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..n)?);
        s = rest.get(n + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_and_chunks() {
        assert_eq!(form_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(
            dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").as_deref(),
            Some("abcde")
        );
        assert_eq!(dechunk("zz\r\n"), None);
    }
}
