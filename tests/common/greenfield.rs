//! Greenfield calls as a shop plugin sends them: raw HTTP/1.1, `Authorization: token ...`, JSON.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::SocketAddr;

/// One HTTP/1.1 request (`Connection: close`): (status, JSON body or the raw text as a string).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\nAccept: application/json\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: token {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" || method == "PUT" {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    c.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading a large body: ignore a broken pipe.
    let _ = c.write_all(body.as_bytes());
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status line: {text:?}"));
    let payload = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v = serde_json::from_str(payload).unwrap_or(Value::String(payload.to_owned()));
    (status, v)
}

pub fn ok(r: (u16, Value), what: &str) -> Value {
    assert_eq!(r.0, 200, "{what}: {}", r.1);
    r.1
}
