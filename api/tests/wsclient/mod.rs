//! A WebSocket API client for tests: Binance's signing of `params` (HMAC over the parameters
//! sorted by name), a connection to `/ws-api/v3` that answers calls by id, and a server for a
//! harness on a real socket.
#![allow(dead_code)]

use super::common::{now_ms, Harness};
use api::keys::sign;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

pub type Key = (String, String);
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn start(h: &Harness) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(api::serve(listener, h.state.clone(), async {
        let _ = rx.await;
    }));
    (addr, tx)
}

pub struct Ws {
    pub s: Socket,
    pub next: u64,
}

/// `params` with `apiKey`, `timestamp` and the signature Binance's WebSocket API expects (HMAC
/// over the parameters sorted by name).
pub fn signed(params: Value, key: &Key, secret: &str) -> Value {
    let mut p: Map<String, Value> = params.as_object().cloned().unwrap_or_default();
    p.insert("timestamp".into(), json!(now_ms()));
    signed_as_is(Value::Object(p), key, secret)
}

/// `params` with `apiKey` and the signature, everything else (`timestamp` included) as given.
pub fn signed_as_is(params: Value, key: &Key, secret: &str) -> Value {
    let mut p: Map<String, Value> = params.as_object().cloned().unwrap_or_default();
    p.insert("apiKey".into(), json!(key.0));
    let mut pairs: Vec<(String, String)> = p
        .iter()
        .map(|(k, v)| {
            let s = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), s)
        })
        .collect();
    pairs.sort();
    let payload: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    p.insert("signature".into(), json!(sign(secret, &payload.join("&"))));
    Value::Object(p)
}

impl Ws {
    pub async fn connect(addr: SocketAddr) -> Self {
        let (s, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws-api/v3"))
            .await
            .unwrap();
        Ws { s, next: 1 }
    }

    pub async fn send_text(&mut self, text: String) {
        self.s.send(Message::Text(text.into())).await.unwrap();
    }

    /// The next answer with this id (user-data events and other answers are skipped).
    pub async fn answer(&mut self, id: &Value) -> Value {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.s.next())
                .await
                .expect("an answer within 10 s")
                .expect("open")
                .expect("no error");
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if &v["id"] == id {
                    return v;
                }
            }
        }
    }

    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = json!(format!("r{}", self.next));
        self.next += 1;
        self.send_text(json!({"id": id, "method": method, "params": params}).to_string())
            .await;
        self.answer(&id).await
    }

    pub async fn signed(&mut self, method: &str, params: Value, key: &Key) -> Value {
        let p = signed(params, key, &key.1);
        self.call(method, p).await
    }

    /// A signed call that must succeed; its `result`.
    pub async fn ok(&mut self, method: &str, params: Value, key: &Key) -> Value {
        let a = self.signed(method, params, key).await;
        assert_eq!(a["status"], 200, "{method}: {a}");
        a["result"].clone()
    }
}
