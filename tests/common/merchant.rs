//! What the merchant tests of the binary share: a merchant account with a `merchant` key, signed
//! calls, balances and invoices as integers, waiting on conditions, and a local webhook receiver.

use super::Server;
use api::client::{Client, ClientError};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A merchant: its account and a key with `read,trade,merchant,transfer,withdraw` (it also pays
/// other merchants' invoices from its balance, and refunds to addresses).
pub struct Merchant {
    pub account: u32,
    pub client: Client,
}

impl Merchant {
    /// Creates the account and its key through the admin commands.
    pub fn create(s: &Server) -> Merchant {
        let account = s.admin(&["account", "create"])["account"].as_u64().unwrap();
        let key = s.admin(&[
            "apikey",
            "create",
            "--account",
            &account.to_string(),
            "--permissions",
            "read,trade,merchant,transfer,withdraw",
        ]);
        Merchant {
            account: account as u32,
            client: client(s.addr, &key),
        }
    }

    pub fn call(&self, method: &str, path: &str, params: &[(&str, &str)]) -> Value {
        call(&self.client, method, path, params)
    }

    pub fn try_call(
        &self,
        method: &str,
        path: &str,
        params: &[(&str, &str)],
    ) -> Result<Value, ClientError> {
        try_call(&self.client, method, path, params)
    }

    /// `POST /mapi/v1/merchant/store` with these settings.
    pub fn store(&self, settings: &[(&str, &str)]) -> Value {
        self.call("POST", "/mapi/v1/merchant/store", settings)
    }

    /// `POST /mapi/v1/merchant/invoice` for `amount` BTC (plus `more`).
    pub fn invoice(&self, amount: &str, more: &[(&str, &str)]) -> Value {
        let params = [&[("amount", amount), ("currency", "BTC")][..], more].concat();
        self.call("POST", "/mapi/v1/merchant/invoice", &params)
    }

    /// `GET /mapi/v1/merchant/invoice?invoiceId=`.
    pub fn get(&self, id: &str) -> Value {
        self.call("GET", "/mapi/v1/merchant/invoice", &[("invoiceId", id)])
    }

    /// `GET /mapi/v1/merchant/webhook/deliveries?invoiceId=`.
    pub fn deliveries(&self, id: &str) -> Vec<Value> {
        self.call(
            "GET",
            "/mapi/v1/merchant/webhook/deliveries",
            &[("invoiceId", id)],
        )
        .as_array()
        .unwrap()
        .clone()
    }

    /// `(free, locked)` BTC, satoshis.
    pub fn btc(&self) -> (u64, u64) {
        balance(&self.client, "BTC")
    }

    /// Waits until the merchant view of invoice `id` satisfies `f`, and returns it.
    pub fn wait_invoice(&self, id: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(90, || {
            last = self.get(id);
            f(&last)
        });
        assert!(
            ok,
            "timed out waiting for invoice {id}: {what}; last {last:#}"
        );
        last
    }

    /// Waits until the free BTC balance is `sat`.
    pub fn wait_btc(&self, sat: u64) {
        let mut last = (0, 0);
        let ok = wait_until(90, || {
            last = self.btc();
            last.0 == sat
        });
        assert!(ok, "free BTC stayed {last:?}, expected {sat}");
    }
}

pub fn client(addr: SocketAddr, key: &Value) -> Client {
    Client::new(
        addr,
        key["apiKey"].as_str().unwrap(),
        key["secretKey"].as_str().unwrap(),
    )
}

pub fn try_call(
    c: &Client,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
) -> Result<Value, ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(c.signed(method, path, params))
}

pub fn call(c: &Client, method: &str, path: &str, params: &[(&str, &str)]) -> Value {
    try_call(c, method, path, params).unwrap_or_else(|e| panic!("{method} {path} {params:?}: {e}"))
}

/// An exact BTC decimal string ("0.0015", "1.00000000") in satoshis.
pub fn sat(s: &str) -> u64 {
    let (i, f) = s.split_once('.').unwrap_or((s, ""));
    assert!(f.len() <= 8, "more than 8 decimals: {s}");
    i.parse::<u64>().unwrap() * 100_000_000 + format!("{f:0<8}").parse::<u64>().unwrap()
}

/// A JSON field holding a BTC decimal string, in satoshis.
pub fn sat_of(v: &Value, field: &str) -> u64 {
    sat(v[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {v}")))
}

/// `(free, locked)` of `asset` in units of 8 decimals, from `GET /api/v3/account`.
pub fn balance(c: &Client, asset: &str) -> (u64, u64) {
    let v = call(c, "GET", "/api/v3/account", &[]);
    v["balances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["asset"] == asset)
        .map(|b| (sat_of(b, "free"), sat_of(b, "locked")))
        .unwrap_or((0, 0))
}

/// Polls `f` every 200 ms for up to `secs`; false when it never held.
#[must_use]
pub fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The marks of an invoice view, as strings.
pub fn marks(v: &Value) -> Vec<String> {
    v["marks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect()
}

/// `GET path` on the server without a key; the JSON body.
pub fn public_get(addr: SocketAddr, path: &str) -> Value {
    let s = super::http_get(addr, path);
    assert!(s.starts_with("HTTP/1.1 200"), "GET {path}: {s}");
    let (_, body) = s.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// One request the webhook receiver got, and what it answered.
#[derive(Clone, Debug)]
pub struct Hook {
    pub headers: Headers,
    pub body: Vec<u8>,
    pub answered: u16,
    /// When the whole request had arrived.
    pub at: Instant,
}

impl Hook {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A webhook receiver on `127.0.0.1:0` (plain HTTP/1.1, one request per connection): it answers
/// 500 to the first `fail_first` requests, 500 to all while [`HookServer::fail_all`] is set, and
/// 200 otherwise; it records every request.
pub struct HookServer {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Hook>>>,
    fail_first: Arc<AtomicUsize>,
    fail_all: Arc<AtomicBool>,
}

impl HookServer {
    pub fn start(fail_first: usize) -> HookServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let fail_first = Arc::new(AtomicUsize::new(fail_first));
        let fail_all = Arc::new(AtomicBool::new(false));
        let (r, ff, fa) = (received.clone(), fail_first.clone(), fail_all.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let Some((headers, body)) = read_request(&conn) else {
                    continue;
                };
                let at = Instant::now();
                let failing = fa.load(Ordering::SeqCst)
                    || ff
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                let answered = if failing { 500 } else { 200 };
                // Recorded before answering, so a delivery the server saw delivered is here.
                r.lock().unwrap().push(Hook {
                    headers,
                    body,
                    answered,
                    at,
                });
                let reason = if failing {
                    "Internal Server Error"
                } else {
                    "OK"
                };
                let mut conn = conn;
                let _ = write!(
                    conn,
                    "HTTP/1.1 {answered} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        HookServer {
            addr,
            received,
            fail_first,
            fail_all,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Answer 500 to everything (`true`) or 200 (`false`).
    pub fn fail_all(&self, on: bool) {
        self.fail_all.store(on, Ordering::SeqCst);
    }

    pub fn hooks(&self) -> Vec<Hook> {
        self.received.lock().unwrap().clone()
    }

    /// The requests answered 200 with this `Mediator-Delivery`.
    pub fn delivered(&self, delivery_id: &str) -> Vec<Hook> {
        self.hooks()
            .into_iter()
            .filter(|h| h.answered == 200 && h.header("Mediator-Delivery") == Some(delivery_id))
            .collect()
    }
}

/// Header names and values, in order.
type Headers = Vec<(String, String)>;

fn read_request(conn: &std::net::TcpStream) -> Option<(Headers, Vec<u8>)> {
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    if !line.starts_with("POST ") {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())?;
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((headers, body))
}
