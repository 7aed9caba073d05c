//! WebSocket streams (Binance's market streams and the listenKey user-data stream) and the
//! `userDataStream` endpoints.
//!
//! Each connection reads from broadcast channels with a bounded backlog
//! ([`crate::ApiConfig::ws_queue`]); a connection that falls behind by more than that, or whose
//! socket does not accept a write within 5 seconds, is closed with code 1008 and a reason. The
//! publisher never waits for a connection. Published messages are serialized once and shared;
//! a connection writes what it has pending with one flush.

use crate::error::ApiError;
use crate::keys::Perms;
use crate::public::{average_price, depth_json, kline_array, ticker};
use crate::readmodel::{interval_index, MarketMsgKind, INTERVALS};
use crate::readmodel::{MarketMsg, UserMsg};
use crate::state::{ok_json, AppState, ClientIp, Req};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

/// Most streams on one connection.
pub const MAX_STREAMS: usize = 1024;
/// Most messages a client may send per second (Binance's limit; pings, pongs and control
/// messages count). One more closes the connection with code 1008.
pub const MAX_IN_PER_SEC: u32 = 5;
/// Request weight of a WebSocket connection (as Binance's WebSocket API charges its connection).
pub const CONNECT_WEIGHT: u64 = 2;
pub use crate::wsapi::{
    parse_api_request, ws_api, ws_api_signed_payload, ApiRequest, MAX_WS_API_SUBSCRIPTIONS,
    MAX_WS_API_SUBSCRIPTION_IDS,
};
/// The server pings this often...
const PING_EVERY_MS: u64 = 20_000;
/// ...and closes a connection silent for this long.
const DEAD_AFTER_MS: u64 = 60_000;

/// Liveness and inbound rate of one connection.
#[derive(Debug)]
pub(crate) struct Alive {
    last_heard: u64,
    last_ping: u64,
    second: u64,
    in_this_second: u32,
}

pub(crate) enum Liveness {
    Fine,
    PingDue,
    Dead,
}

impl Alive {
    pub(crate) fn new(now: u64) -> Self {
        Self {
            last_heard: now,
            last_ping: now,
            second: now / 1000,
            in_this_second: 0,
        }
    }

    /// Records a message from the client; false when it sends too fast.
    fn heard(&mut self, _m: &Message) -> bool {
        let now = crate::core::now_ms();
        self.last_heard = now;
        if now / 1000 != self.second {
            self.second = now / 1000;
            self.in_this_second = 0;
        }
        self.in_this_second += 1;
        self.in_this_second <= MAX_IN_PER_SEC
    }

    /// Records a message from a client that has no message rate limit (the WebSocket API).
    pub(crate) fn touch(&mut self) {
        self.last_heard = crate::core::now_ms();
    }

    pub(crate) fn check(&mut self, now: u64) -> Liveness {
        if now.saturating_sub(self.last_heard) > DEAD_AFTER_MS {
            Liveness::Dead
        } else if now.saturating_sub(self.last_ping) >= PING_EVERY_MS {
            self.last_ping = now;
            Liveness::PingDue
        } else {
            Liveness::Fine
        }
    }
}
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Most published messages a connection takes from its backlog before writing them with one
/// flush (one `write` syscall when they fit tungstenite's write buffer).
const MAX_BATCH: usize = 64;

/// One subscribed stream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stream {
    Diff(usize),
    Partial {
        market: usize,
        levels: usize,
        every_ms: u64,
    },
    Trade(usize),
    /// `<symbol>@aggTrade`: each trade is its own aggregate (as `GET /api/v3/aggTrades`).
    AggTrade(usize),
    /// `<symbol>@avgPrice`: the 5-minute average price, pushed at most once a second when it
    /// changed.
    AvgPrice(usize),
    /// `!ticker@arr` (`mini` false) and `!miniTicker@arr`: the 24 h statistics of every market
    /// that changed, one array at most once a second (all markets in the first).
    AllTickers {
        mini: bool,
    },
    BookTicker(usize),
    /// `<symbol>@ticker` (`mini` false) and `<symbol>@miniTicker`: rolling 24 h statistics,
    /// pushed once a second when the market changed.
    Ticker {
        market: usize,
        mini: bool,
    },
    Kline {
        market: usize,
        interval: usize,
    },
    User {
        account: u32,
        listen_key: String,
    },
}

/// A stream name, parsed without any state (the symbol and listen key are not looked up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamName<'a> {
    /// `<symbol>@<kind>`.
    Market {
        /// The stream symbol (lower case, as sent).
        symbol: &'a str,
        /// Which stream of the market.
        kind: MarketStream,
    },
    /// A name without `@`: a listen key's user-data stream.
    ListenKey(&'a str),
    /// `!ticker@arr` (`mini` false) and `!miniTicker@arr`: every market's ticker.
    AllTickers {
        /// `!miniTicker@arr`.
        mini: bool,
    },
}

/// The streams of one market, by name suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarketStream {
    /// `depth`, `depth@100ms`, `depth@1000ms`.
    Diff,
    /// `depth<5|10|20>[@100ms|@1000ms]`.
    Partial {
        /// Levels per side.
        levels: usize,
        /// Push interval.
        every_ms: u64,
    },
    /// `trade`.
    Trade,
    /// `aggTrade`.
    AggTrade,
    /// `avgPrice`.
    AvgPrice,
    /// `bookTicker`.
    BookTicker,
    /// `ticker` (`mini` false) and `miniTicker`.
    Ticker {
        /// `miniTicker`.
        mini: bool,
    },
    /// `kline_<interval>`, the interval's index in [`INTERVALS`].
    Kline {
        /// Index in [`INTERVALS`].
        interval: usize,
    },
}

/// Parses a stream name's syntax (`None`: not a stream name).
pub fn parse_stream_name(name: &str) -> Option<StreamName<'_>> {
    match name {
        "!ticker@arr" => return Some(StreamName::AllTickers { mini: false }),
        "!miniTicker@arr" => return Some(StreamName::AllTickers { mini: true }),
        _ => {}
    }
    let Some((symbol, rest)) = name.split_once('@') else {
        return Some(StreamName::ListenKey(name));
    };
    let kind = match rest {
        "depth" | "depth@100ms" | "depth@1000ms" => MarketStream::Diff,
        "trade" => MarketStream::Trade,
        "aggTrade" => MarketStream::AggTrade,
        "avgPrice" => MarketStream::AvgPrice,
        "bookTicker" => MarketStream::BookTicker,
        "ticker" => MarketStream::Ticker { mini: false },
        "miniTicker" => MarketStream::Ticker { mini: true },
        _ => {
            if let Some(iv) = rest.strip_prefix("kline_") {
                MarketStream::Kline {
                    interval: interval_index(iv)?,
                }
            } else {
                let d = rest.strip_prefix("depth")?;
                let (lv, every_ms) = match d.split_once('@') {
                    Some((l, "100ms")) => (l, 100),
                    Some((l, "1000ms")) => (l, 1000),
                    Some(_) => return None,
                    None => (d, 1000),
                };
                let levels = match lv {
                    "5" => 5,
                    "10" => 10,
                    "20" => 20,
                    _ => return None,
                };
                MarketStream::Partial { levels, every_ms }
            }
        }
    };
    Some(StreamName::Market { symbol, kind })
}

fn parse_stream(st: &AppState, name: &str) -> Option<Stream> {
    let (sym, kind) = match parse_stream_name(name)? {
        StreamName::AllTickers { mini } => return Some(Stream::AllTickers { mini }),
        StreamName::ListenKey(name) => {
            let lk = st.0.listen_keys.read().unwrap_or_else(|e| e.into_inner());
            let l = lk.get(name)?;
            return (l.expires_ms > crate::core::now_ms()).then(|| Stream::User {
                account: l.account,
                listen_key: name.to_owned(),
            });
        }
        StreamName::Market { symbol, kind } => (symbol, kind),
    };
    let m = st
        .markets()
        .markets
        .iter()
        .position(|m| m.stream_symbol == sym)?;
    Some(match kind {
        MarketStream::Diff => Stream::Diff(m),
        MarketStream::Trade => Stream::Trade(m),
        MarketStream::AggTrade => Stream::AggTrade(m),
        MarketStream::AvgPrice => Stream::AvgPrice(m),
        MarketStream::BookTicker => Stream::BookTicker(m),
        MarketStream::Ticker { mini } => Stream::Ticker { market: m, mini },
        MarketStream::Kline { interval } => Stream::Kline {
            market: m,
            interval,
        },
        MarketStream::Partial { levels, every_ms } => Stream::Partial {
            market: m,
            levels,
            every_ms,
        },
    })
}

/// Parses stream names; a name given twice is kept once (each stream is sent once per
/// connection). More than [`MAX_STREAMS`] names (duplicates included) are refused.
fn parse_list(st: &AppState, names: &[&str]) -> Result<Vec<(String, Stream)>, ApiError> {
    if names.is_empty() || names.len() > MAX_STREAMS {
        return Err(ApiError::invalid_value("streams"));
    }
    let mut seen = std::collections::HashSet::with_capacity(names.len());
    names
        .iter()
        .filter(|n| seen.insert(**n))
        .map(|n| {
            parse_stream(st, n)
                .map(|s| ((*n).to_owned(), s))
                .ok_or_else(|| ApiError::bad(-1100, format!("Invalid stream name '{n}'.")))
        })
        .collect()
}

/// Admits a WebSocket connection from `ip`: charges [`CONNECT_WEIGHT`], counts the attempt and
/// takes one of the IP's stream places (`429`, `-1003` / `-1034`).
pub(crate) fn admit(st: &AppState, ip: &str) -> Result<crate::ratelimit::StreamGuard, ApiError> {
    st.charge_ip_addr(ip, CONNECT_WEIGHT)?;
    st.0.streams
        .websocket(ip, crate::core::now_ms())
        .inspect_err(|_| {
            st.0.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        })
}

/// `GET /ws`: a raw connection; streams are added with `SUBSCRIBE`.
pub async fn ws_root(
    State(st): State<AppState>,
    ClientIp(ip): ClientIp,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let guard = admit(&st, &ip)?;
    Ok(upgrade(st, ws, Vec::new(), false, guard))
}

/// `GET /ws/<stream>`: one raw stream (a market stream or a listenKey). A name of digits only
/// opens a raw connection without streams, for `SUBSCRIBE` (ccxt connects to `/ws/<n>`).
pub async fn ws_path(
    State(st): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(stream): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let subs =
        if !stream.is_empty() && stream.len() <= 20 && stream.bytes().all(|b| b.is_ascii_digit()) {
            Vec::new()
        } else {
            parse_list(&st, &[stream.as_str()])?
        };
    let guard = admit(&st, &ip)?;
    Ok(upgrade(st, ws, subs, false, guard))
}

/// `GET /stream?streams=a/b/c`: combined streams (`{"stream":..,"data":..}`).
pub async fn ws_combined(
    State(st): State<AppState>,
    ClientIp(ip): ClientIp,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let names: Vec<&str> = q
        .get("streams")
        .map(|s| s.split('/').filter(|x| !x.is_empty()).collect())
        .unwrap_or_default();
    let subs = if names.is_empty() {
        Vec::new()
    } else {
        parse_list(&st, &names)?
    };
    let guard = admit(&st, &ip)?;
    Ok(upgrade(st, ws, subs, true, guard))
}

/// The WebSocket settings of every connection: frames and messages from the client at most
/// [`crate::ApiConfig::ws_max_message_bytes`] (a larger frame is refused from its header,
/// before its payload is buffered; tungstenite's default would take 16 MiB frames), and a small
/// read buffer. Clients send only small control messages. tungstenite zero-fills its whole read
/// buffer (128 KiB by default) each time the socket is polled for input
/// (snapview/tungstenite-rs#547): half of all CPU with 1,000 depth subscribers before this was
/// set, when the connection loop polled the socket on every market message (now a task of its
/// own reads it, see `run`).
pub(crate) fn limited(st: &AppState, ws: WebSocketUpgrade) -> WebSocketUpgrade {
    let max = st.0.cfg.ws_max_message_bytes;
    ws.max_frame_size(max)
        .max_message_size(max)
        .read_buffer_size(4 * 1024)
}

fn upgrade(
    st: AppState,
    ws: WebSocketUpgrade,
    subs: Vec<(String, Stream)>,
    combined: bool,
    guard: crate::ratelimit::StreamGuard,
) -> Response {
    limited(&st, ws)
        .on_upgrade(move |socket| async move {
            st.0.metrics.ws_connections.fetch_add(1, Ordering::Relaxed);
            run(&st, socket, subs, combined).await;
            st.0.metrics.ws_connections.fetch_sub(1, Ordering::Relaxed);
            drop(guard);
        })
        .into_response()
}

/// The writing side of a connection: the whole [`WebSocket`] or its write half.
pub(crate) trait WsSink: Sink<Message, Error = axum::Error> + Unpin {}
impl<S: Sink<Message, Error = axum::Error> + Unpin> WsSink for S {}

/// How a send ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Done,
    /// The socket failed: the client hung up or reset. Not a slow consumer.
    Gone,
    /// The socket did not take it within [`SEND_TIMEOUT`]: a slow consumer.
    Slow,
}

async fn send<S: WsSink>(socket: &mut S, text: impl Into<Utf8Bytes>) -> Sent {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Text(text.into()))).await {
        Ok(Ok(())) => Sent::Done,
        Ok(Err(_)) => Sent::Gone,
        Err(_) => Sent::Slow,
    }
}

/// Writes every queued message and flushes once (empty: nothing happens). `out` is left empty.
async fn send_all<S: WsSink>(socket: &mut S, out: &mut Vec<Message>) -> Sent {
    if out.is_empty() {
        return Sent::Done;
    }
    let r = tokio::time::timeout(SEND_TIMEOUT, async {
        for m in out.drain(..) {
            socket.feed(m).await?;
        }
        socket.flush().await
    })
    .await;
    out.clear();
    match r {
        Ok(Ok(())) => Sent::Done,
        Ok(Err(_)) => Sent::Gone,
        Err(_) => Sent::Slow,
    }
}

fn frame(combined: bool, name: &str, data: &str) -> String {
    if combined {
        format!("{{\"stream\":\"{name}\",\"data\":{data}}}")
    } else {
        data.to_owned()
    }
}

/// A published message for one subscription: a raw stream shares the serialized bytes; a
/// combined stream wraps them (one copy).
fn shared(combined: bool, name: &str, data: &Utf8Bytes) -> Message {
    Message::Text(if combined {
        frame(true, name, data).into()
    } else {
        data.clone()
    })
}

/// How taking a receiver's backlog ended.
enum Drained {
    /// Up to [`MAX_BATCH`] messages taken; the channel is open.
    Open,
    /// The publisher is gone (shutdown).
    Closed,
    /// The connection fell this many messages behind.
    Lagged(u64),
}

/// Sends what a drain (or a tick) queued. `false` when the connection is over: the client hung
/// up, the publisher is gone, or the connection is a slow consumer (then it is closed with the
/// reason and counted; a client that hung up is not a slow consumer).
async fn flush<S: WsSink>(
    st: &AppState,
    socket: &mut S,
    out: &mut Vec<Message>,
    drained: Drained,
) -> bool {
    let slow = || {
        st.0.metrics
            .ws_slow_disconnects
            .fetch_add(1, Ordering::Relaxed)
    };
    if let Drained::Lagged(n) = drained {
        slow();
        close(socket, format!("slow consumer: {n} messages behind")).await;
        return false;
    }
    match send_all(socket, out).await {
        Sent::Done => !matches!(drained, Drained::Closed),
        Sent::Gone => false,
        Sent::Slow => {
            slow();
            close(socket, "slow consumer: send timed out".into()).await;
            false
        }
    }
}

/// Hands `first` and then whatever else is already queued (up to [`MAX_BATCH`] in all) to `each`,
/// without waiting: one wake-up and one flush serve a whole backlog.
fn drain<T: Clone>(
    rx: &mut broadcast::Receiver<T>,
    first: Result<T, RecvError>,
    mut each: impl FnMut(&T),
) -> Drained {
    let mut next = first;
    let mut taken = 0;
    loop {
        match next {
            Ok(m) => each(&m),
            Err(RecvError::Closed) => return Drained::Closed,
            Err(RecvError::Lagged(n)) => return Drained::Lagged(n),
        }
        taken += 1;
        if taken == MAX_BATCH {
            return Drained::Open;
        }
        next = match rx.try_recv() {
            Ok(m) => Ok(m),
            Err(TryRecvError::Empty) => return Drained::Open,
            Err(TryRecvError::Closed) => Err(RecvError::Closed),
            Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
        };
    }
}

/// Queues a market message for every subscription that wants it.
fn queue_market(subs: &[(String, Stream)], combined: bool, m: &MarketMsg, out: &mut Vec<Message>) {
    for (name, s) in subs {
        let hit = match (s, m.kind) {
            (Stream::Diff(x), MarketMsgKind::Depth)
            | (Stream::Trade(x), MarketMsgKind::Trade)
            | (Stream::BookTicker(x), MarketMsgKind::BookTicker) => *x == m.market,
            (Stream::AggTrade(x), MarketMsgKind::Trade) if *x == m.market => {
                if let Some(a) = agg_trade_event(&m.json) {
                    out.push(Message::Text(frame(combined, name, &a).into()));
                }
                continue;
            }
            _ => false,
        };
        if !hit {
            continue;
        }
        if combined {
            let (first, text) = m
                .combined
                .get_or_init(|| (name.as_str().into(), frame(true, name, &m.json).into()));
            if **first == **name {
                out.push(Message::Text(text.clone()));
                continue;
            }
        }
        out.push(shared(combined, name, &m.json));
    }
}

/// Queues a user message for every listenKey stream of its account.
fn queue_user(subs: &[(String, Stream)], combined: bool, u: &UserMsg, out: &mut Vec<Message>) {
    for (name, s) in subs {
        if matches!(s, Stream::User { account, .. } if *account == u.account) {
            out.push(shared(combined, name, &u.json));
        }
    }
}

pub(crate) async fn close<S: WsSink>(socket: &mut S, reason: String) {
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        socket.send(Message::Close(Some(CloseFrame {
            code: 1008,
            reason: reason.into(),
        }))),
    )
    .await;
}

/// The client closed: complete the closing handshake (RFC 6455 5.5.1) instead of dropping the
/// connection, which clients report as a reset (tungstenite: `ResetWithoutClosingHandshake`) and
/// some wait on until their close timeout. tungstenite queued the echo of the client's frame when
/// it read it; closing the sink flushes it (a `send(Close)` would be refused).
pub(crate) async fn closed_by_peer<S: WsSink>(socket: &mut S) {
    let _ = tokio::time::timeout(Duration::from_secs(1), SinkExt::close(socket)).await;
}

/// A control request on a market-data connection, parsed without any state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// `SUBSCRIBE` these names (the string entries of `params`; others are ignored).
    Subscribe(Vec<String>),
    /// `UNSUBSCRIBE` these names.
    Unsubscribe(Vec<String>),
    /// `LIST_SUBSCRIPTIONS`.
    List,
}

/// Why a control request was refused: the answer's `error` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlError {
    /// `3`: not JSON; `2`: an invalid request.
    pub code: u8,
    /// The message.
    pub msg: &'static str,
}

/// Parses a `SUBSCRIBE` / `UNSUBSCRIBE` / `LIST_SUBSCRIPTIONS` request: its `id` (echoed in the
/// answer; `null` when absent or when the text is not JSON) and the request, or why it is refused.
pub fn parse_control(text: &str) -> (Value, Result<Control, ControlError>) {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        let e = ControlError {
            code: 3,
            msg: "Invalid JSON",
        };
        return (Value::Null, Err(e));
    };
    let id = v.get("id").cloned().unwrap_or(Value::Null);
    let names = || -> Vec<String> {
        v.get("params")
            .and_then(|p| p.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let control = match v.get("method").and_then(|m| m.as_str()) {
        Some("SUBSCRIBE") => Ok(Control::Subscribe(names())),
        Some("UNSUBSCRIBE") => Ok(Control::Unsubscribe(names())),
        Some("LIST_SUBSCRIPTIONS") => Ok(Control::List),
        _ => Err(ControlError {
            code: 2,
            msg: "Invalid request: unknown method",
        }),
    };
    (id, control)
}

/// Handles a `SUBSCRIBE` / `UNSUBSCRIBE` / `LIST_SUBSCRIPTIONS` request; returns the answer.
fn control(st: &AppState, subs: &mut Vec<(String, Stream)>, text: &str) -> String {
    let (id, request) = parse_control(text);
    match request {
        Ok(Control::Subscribe(names)) => {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            match parse_list(st, &refs) {
                Ok(mut new) => {
                    new.retain(|(n, _)| !subs.iter().any(|(x, _)| x == n));
                    if subs.len() + new.len() > MAX_STREAMS {
                        return json!({"error": {"code": 2, "msg": "Too many streams"}, "id": id})
                            .to_string();
                    }
                    subs.extend(new);
                    json!({"result": null, "id": id}).to_string()
                }
                Err(e) => json!({"error": {"code": 2, "msg": e.msg}, "id": id}).to_string(),
            }
        }
        Ok(Control::Unsubscribe(names)) => {
            subs.retain(|(n, _)| !names.contains(n));
            json!({"result": null, "id": id}).to_string()
        }
        Ok(Control::List) => {
            let l: Vec<&str> = subs.iter().map(|(n, _)| n.as_str()).collect();
            json!({"result": l, "id": id}).to_string()
        }
        Err(e) => json!({"error": {"code": e.code, "msg": e.msg}, "id": id}).to_string(),
    }
}

/// What the client sent, as the read half's task hands it over.
type Inbound = tokio::sync::mpsc::Receiver<Result<Message, axum::Error>>;

async fn run(st: &AppState, socket: WebSocket, subs: Vec<(String, Stream)>, combined: bool) {
    // The read half runs in a task of its own that is woken only when the client sends
    // something. Polled in the loop below it would be read (and tungstenite's read buffer
    // zero-filled) on every market message, for every subscriber.
    let (mut sink, stream) = socket.split();
    let (tx, mut inbound) = tokio::sync::mpsc::channel(4);
    let reader = tokio::spawn(read_half(stream, tx));
    streams(st, &mut sink, &mut inbound, subs, combined).await;
    reader.abort();
}

/// Hands every message the client sends to the connection's loop, in order; ends after an error,
/// at the end of the stream, or when the loop is gone.
async fn read_half(
    mut stream: SplitStream<WebSocket>,
    tx: tokio::sync::mpsc::Sender<Result<Message, axum::Error>>,
) {
    while let Some(m) = stream.next().await {
        let failed = m.is_err();
        if tx.send(m).await.is_err() || failed {
            break;
        }
    }
}

async fn streams(
    st: &AppState,
    socket: &mut SplitSink<WebSocket, Message>,
    inbound: &mut Inbound,
    mut subs: Vec<(String, Stream)>,
    combined: bool,
) {
    let mut mrx = st.0.rm.market_tx.subscribe();
    // User events only while the connection has a user data stream: a market socket neither
    // makes the read model build every account's events nor is cut off for lagging behind them.
    let wants_user =
        |subs: &[(String, Stream)]| subs.iter().any(|(_, s)| matches!(s, Stream::User { .. }));
    let mut urx = wants_user(&subs).then(|| st.0.rm.user_tx.subscribe());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut alive = Alive::new(crate::core::now_ms());
    // Last push per partial-depth stream: (time, depth seq pushed).
    let mut last: HashMap<String, (u64, u64)> = HashMap::new();
    // Last push per kline stream: (open time, pushed as closed, last trade id, time).
    let mut kstate: HashMap<String, (u64, bool, u64, u64)> = HashMap::new();
    // Last push per `@avgPrice` stream: (time, the event's `w` and `T`).
    let mut avg: HashMap<String, (u64, String, u64)> = HashMap::new();
    // Messages waiting for the next flush (reused: no allocation per message once warm).
    let mut out: Vec<Message> = Vec::with_capacity(MAX_BATCH);
    loop {
        tokio::select! {
            msg = inbound.recv() => match msg {
                Some(Ok(m)) if !alive.heard(&m) => {
                    return close(socket, format!("too many messages: at most {MAX_IN_PER_SEC} per second")).await;
                }
                Some(Ok(Message::Text(t))) => {
                    let answer = control(st, &mut subs, t.as_str());
                    match (wants_user(&subs), urx.is_some()) {
                        (true, false) => urx = Some(st.0.rm.user_tx.subscribe()),
                        (false, true) => urx = None,
                        _ => {}
                    }
                    if send(socket, answer).await != Sent::Done {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    closed_by_peer(socket).await;
                    break;
                }
                None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            r = mrx.recv() => {
                let d = drain(&mut mrx, r, |m| queue_market(&subs, combined, m, &mut out));
                if !flush(st, socket, &mut out, d).await {
                    break;
                }
            },
            r = async { urx.as_mut()?.recv().await.into() }, if urx.is_some() => {
                let (Some(r), Some(rx)) = (r, urx.as_mut()) else { continue };
                let d = drain(rx, r, |u| queue_user(&subs, combined, u, &mut out));
                if !flush(st, socket, &mut out, d).await {
                    break;
                }
            },
            _ = tick.tick() => {
                let now = crate::core::now_ms();
                match alive.check(now) {
                    Liveness::Dead => return close(socket, "no pong: connection idle".into()).await,
                    Liveness::PingDue => {
                        if !matches!(tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Ping(Vec::new().into()))).await, Ok(Ok(()))) {
                            break;
                        }
                    }
                    Liveness::Fine => {}
                }
                let mut expired = Vec::new();
                {
                    let rm = st.0.rm.read();
                    for (name, s) in &subs {
                        match s {
                            Stream::Partial { market, levels, every_ms } => {
                                let ms = &rm.markets[*market];
                                let prev = last.get(name).copied();
                                if prev.is_none_or(|(t, seq)| now >= t + every_ms && seq != ms.depth_seq) {
                                    last.insert(name.clone(), (now, ms.depth_seq));
                                    let m = &st.markets().markets[*market];
                                    out.push(Message::Text(frame(combined, name, &depth_json(m, ms, *levels).to_string()).into()));
                                }
                            }
                            Stream::Ticker { market, mini } => {
                                let ms = &rm.markets[*market];
                                let prev = last.get(name).copied();
                                if prev.is_none_or(|(t, seq)| now >= t + 1000 && seq != ms.depth_seq) {
                                    last.insert(name.clone(), (now, ms.depth_seq));
                                    let m = &st.markets().markets[*market];
                                    let ev = st.0.stats.ticker(m, ms, *market, *mini, now);
                                    out.push(Message::Text(frame(combined, name, &ev).into()));
                                }
                            }
                            Stream::AllTickers { mini } => {
                                if last.get(name).is_some_and(|(t, _)| now < t + 1000) {
                                    continue;
                                }
                                let mut changed = Vec::new();
                                for (i, m) in st.markets().markets.iter().enumerate() {
                                    let ms = &rm.markets[i];
                                    let key = format!("{name}#{i}");
                                    if last.get(&key).is_none_or(|(_, seq)| *seq != ms.depth_seq) {
                                        last.insert(key, (now, ms.depth_seq));
                                        changed.push(st.0.stats.ticker(m, ms, i, *mini, now));
                                    }
                                }
                                last.insert(name.clone(), (now, 0));
                                if !changed.is_empty() {
                                    let arr = format!("[{}]", changed.join(","));
                                    out.push(Message::Text(frame(combined, name, &arr).into()));
                                }
                            }
                            Stream::AvgPrice(market) => {
                                let ms = &rm.markets[*market];
                                let prev = avg.get(name);
                                if prev.is_some_and(|(t, _, _)| now < t + 1000) {
                                    continue;
                                }
                                let m = &st.markets().markets[*market];
                                let avg_now = st.0.stats.average(m, ms, *market, now);
                                let (w, at) = (avg_now.0.clone(), avg_now.1);
                                if prev.is_none_or(|(_, pw, pt)| *pw != w || *pt != at) {
                                    let ev = json!({"e": "avgPrice", "E": now, "s": m.symbol, "i": "5m", "w": w, "T": at});
                                    out.push(Message::Text(frame(combined, name, &ev.to_string()).into()));
                                }
                                avg.insert(name.clone(), (now, w, at));
                            }
                            Stream::Kline { market, interval } => {
                                let ms = &rm.markets[*market];
                                let ks = &ms.klines[*interval];
                                let Some(k) = ks.back() else { continue };
                                let m = &st.markets().markets[*market];
                                let iv = INTERVALS[*interval].0;
                                let prev = kstate.get(name).copied();
                                // The previous candle's final update (x = true) once a new one opened.
                                if let Some((popen, pclosed, _, _)) = prev {
                                    if popen != k.open_ms && !pclosed {
                                        if let Some(pk) = ks.iter().rev().find(|x| x.open_ms == popen) {
                                            out.push(Message::Text(frame(combined, name, &kline_event(m, iv, pk, true, now)).into()));
                                        }
                                    }
                                }
                                let stamp = k.last_id;
                                let closed = now > k.close_ms;
                                let due = prev.is_none_or(|(popen, pclosed, pstamp, t)| {
                                    popen != k.open_ms
                                        || (closed && !pclosed)
                                        || (pstamp != stamp && now >= t + 1000)
                                });
                                if due {
                                    kstate.insert(name.clone(), (k.open_ms, closed, stamp, now));
                                    out.push(Message::Text(frame(combined, name, &kline_event(m, iv, k, closed, now)).into()));
                                }
                            }
                            Stream::User { listen_key, .. } => {
                                let lk = st.0.listen_keys.read().unwrap_or_else(|e| e.into_inner());
                                if lk.get(listen_key).is_none_or(|l| l.expires_ms <= now) {
                                    expired.push(name.clone());
                                    out.push(Message::Text(frame(combined, name, &json!({
                                        "e": "listenKeyExpired", "E": now, "listenKey": listen_key,
                                    }).to_string()).into()));
                                }
                            }
                            _ => {}
                        }
                    }
                }
                subs.retain(|(n, _)| !expired.contains(n));
                if urx.is_some() && !wants_user(&subs) {
                    urx = None;
                }
                if !flush(st, socket, &mut out, Drained::Open).await {
                    break;
                }
            }
        }
    }
}

/// A value and the second it was made in.
type Made<T> = (u64, std::sync::Arc<T>);

/// Ticker and average-price events, made at most once a second per market for every connection
/// that streams them. Each connection made its own before: a 24 h ticker walks up to 1,500
/// one-minute klines and an average price every kept trade, under the read models' lock, once a
/// second per subscriber and market, so a thousand `!ticker@arr` sockets cost the read models'
/// writer a thousand such walks a second for each market.
#[derive(Debug, Default)]
pub(crate) struct StatsCache {
    /// `(market, mini)` → (the second it was made in, the event's JSON).
    tickers: std::sync::Mutex<HashMap<(usize, bool), Made<str>>>,
    /// market → (the second it was made in, `w`, `T`).
    averages: std::sync::Mutex<HashMap<usize, Made<(String, u64)>>>,
    /// Events made (not taken from the cache), for tests.
    made: std::sync::atomic::AtomicU64,
}

impl StatsCache {
    /// The `24hrTicker` (`mini` false) or `24hrMiniTicker` event of a market, as made in this
    /// second (its `E` is when it was made).
    fn ticker(
        &self,
        m: &crate::market::MarketSpec,
        ms: &crate::readmodel::MarketState,
        market: usize,
        mini: bool,
        now: u64,
    ) -> std::sync::Arc<str> {
        let second = now / 1000;
        let mut c = self.tickers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, ev)) = c.get(&(market, mini)) {
            if *at == second {
                return ev.clone();
            }
        }
        self.made.fetch_add(1, Ordering::Relaxed);
        let ev: std::sync::Arc<str> = ticker_event(&ticker(m, ms, now, mini), mini, now).into();
        c.insert((market, mini), (second, ev.clone()));
        ev
    }

    /// A market's 5-minute average price and its last trade's time, as made in this second.
    fn average(
        &self,
        m: &crate::market::MarketSpec,
        ms: &crate::readmodel::MarketState,
        market: usize,
        now: u64,
    ) -> std::sync::Arc<(String, u64)> {
        let second = now / 1000;
        let mut c = self.averages.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, v)) = c.get(&market) {
            if *at == second {
                return v.clone();
            }
        }
        self.made.fetch_add(1, Ordering::Relaxed);
        let v = std::sync::Arc::new(average_price(m, ms, now));
        c.insert(market, (second, v.clone()));
        v
    }

    /// Events made so far.
    #[cfg(test)]
    fn made(&self) -> u64 {
        self.made.load(Ordering::Relaxed)
    }
}

/// Binance's `aggTrade` event from a published `trade` event: one trade per aggregate, so the
/// aggregate id and first and last trade ids are the trade's id. Made per subscriber (only
/// `aggTrade` subscribers pay for it); `None` for a payload that is not a trade event.
fn agg_trade_event(trade: &str) -> Option<String> {
    let t: Value = serde_json::from_str(trade).ok()?;
    let id = t["t"].as_u64()?;
    Some(
        json!({
            "e": "aggTrade", "E": t["E"], "s": t["s"], "a": id, "p": t["p"], "q": t["q"],
            "f": id, "l": id, "T": t["T"], "m": t["m"], "M": t["M"],
        })
        .to_string(),
    )
}

/// Binance's `24hrTicker` / `24hrMiniTicker` event from the REST `ticker/24hr` object.
fn ticker_event(t: &Value, mini: bool, now: u64) -> String {
    let mut v = json!({
        "e": if mini { "24hrMiniTicker" } else { "24hrTicker" },
        "E": now,
        "s": t["symbol"], "c": t["lastPrice"], "o": t["openPrice"], "h": t["highPrice"],
        "l": t["lowPrice"], "v": t["volume"], "q": t["quoteVolume"],
    });
    if !mini {
        let extra = json!({
            "p": t["priceChange"], "P": t["priceChangePercent"], "w": t["weightedAvgPrice"],
            "x": t["prevClosePrice"], "Q": t["lastQty"], "b": t["bidPrice"], "B": t["bidQty"],
            "a": t["askPrice"], "A": t["askQty"], "O": t["openTime"], "C": t["closeTime"],
            "F": t["firstId"], "L": t["lastId"], "n": t["count"],
        });
        if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
    }
    v.to_string()
}

/// Binance's `kline` event.
fn kline_event(
    m: &crate::market::MarketSpec,
    interval: &str,
    k: &crate::readmodel::Kline,
    closed: bool,
    now: u64,
) -> String {
    let a = kline_array(m, k);
    json!({
        "e": "kline", "E": now, "s": m.symbol,
        "k": {
            "t": a[0], "T": a[6], "s": m.symbol, "i": interval,
            "f": k.first_id, "L": k.last_id,
            "o": a[1], "c": a[4], "h": a[2], "l": a[3], "v": a[5],
            "n": k.trades, "x": closed, "q": a[7],
            "V": a[9], "Q": a[10], "B": "0",
        }
    })
    .to_string()
}

/// A live listenKey: its account, when it expires, and the API keys it was handed to or kept
/// alive by. Revoking one of those keys ends it ([`forget_listen_keys_of`]): a revoked key
/// reads nothing more, as on the WebSocket API.
#[derive(Debug, Clone)]
pub struct ListenKey {
    /// The account whose user data it streams.
    pub account: u32,
    /// When it expires (ms), unless kept alive.
    pub expires_ms: u64,
    /// The API keys (public ids) that created, were handed or kept alive this listenKey: at
    /// most the account's live keys (a revoked one ends it).
    pub holders: Vec<String>,
}

impl ListenKey {
    fn held_by(&mut self, api_key: &str) {
        if !self.holders.iter().any(|h| h == api_key) {
            self.holders.push(api_key.to_owned());
        }
    }
}

/// Ends every listenKey that `api_key` created, was handed or kept alive (the key was revoked):
/// its open streams get `listenKeyExpired` at their next tick, and the account's other keys are
/// handed a new listenKey. Without this, whoever held the revoked key went on reading the
/// account's stream while another key of the account kept the shared listenKey alive.
pub fn forget_listen_keys_of(st: &AppState, api_key: &str) {
    let mut lk = st.0.listen_keys.write().unwrap_or_else(|e| e.into_inner());
    lk.retain(|_, l| !l.holders.iter().any(|h| h == api_key));
}

fn new_listen_key() -> Result<String, ApiError> {
    crate::keys::random_bytes::<30>()
        .map(hex::encode)
        .map_err(|_| ApiError::internal())
}

/// `POST /api/v3/userDataStream` (API key, no signature): a listenKey for the key's account,
/// valid for 60 minutes unless kept alive. An account's live listenKey is returned again.
pub async fn listen_key_new(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, p, ctx) = st.keyed(&req, 2)?;
    p.finish()?;
    if !key.perms.has(Perms::READ) {
        return Err(ApiError::key_rejected());
    }
    let now = crate::core::now_ms();
    let ttl = st.0.cfg.listen_key_ttl_ms;
    let mut lk = st.0.listen_keys.write().unwrap_or_else(|e| e.into_inner());
    lk.retain(|_, l| l.expires_ms > now);
    let existing = lk
        .iter()
        .find(|(_, l)| l.account == key.account)
        .map(|(k, _)| k.clone());
    let k = match existing {
        Some(k) => k,
        None => new_listen_key()?,
    };
    let l = lk.entry(k.clone()).or_insert_with(|| ListenKey {
        account: key.account,
        expires_ms: 0,
        holders: Vec::new(),
    });
    l.expires_ms = now + ttl;
    l.held_by(&key.api_key);
    // Revoked while this request ran (after the revocation's `forget_listen_keys_of`, which
    // waits for this lock): the listenKey it was handed ends as if it had been revoked after.
    if st.0.keys.get(&key.api_key).is_none() {
        lk.remove(&k);
        return Err(ApiError::key_rejected());
    }
    Ok(ok_json(&ctx, json!({ "listenKey": k })))
}

fn touch(st: &AppState, req: &Req, remove: bool) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.keyed(req, 2)?;
    let k = p.req("listenKey")?;
    p.finish()?;
    let now = crate::core::now_ms();
    let mut lk = st.0.listen_keys.write().unwrap_or_else(|e| e.into_inner());
    match lk.get_mut(&k) {
        Some(l) if l.account == key.account && l.expires_ms > now => {
            if remove {
                lk.remove(&k);
            } else {
                l.expires_ms = now + st.0.cfg.listen_key_ttl_ms;
                l.held_by(&key.api_key);
                // As in `listen_key_new`: a key revoked meanwhile ends what it kept alive.
                if st.0.keys.get(&key.api_key).is_none() {
                    lk.remove(&k);
                    return Err(ApiError::key_rejected());
                }
            }
            Ok(ok_json(&ctx, json!({})))
        }
        _ => Err(ApiError::bad_listen_key()),
    }
}

/// `PUT /api/v3/userDataStream`: keeps a listenKey alive for another 60 minutes.
pub async fn listen_key_keepalive(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    touch(&st, &req, false)
}

/// `DELETE /api/v3/userDataStream`: closes a listenKey.
pub async fn listen_key_close(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    touch(&st, &req, true)
}

#[cfg(test)]
mod tests {
    /// Three subscribers of one market's ticker in the same second share one event (and its
    /// `E`); the next second makes a new one. The average price likewise.
    #[test]
    fn ticker_and_average_events_are_made_once_a_second_for_all_subscribers() {
        let dir = tempfile::tempdir().unwrap();
        let st = crate::state::open_local(
            dir.path(),
            matching_engine::config::EngineConfig::default(),
            crate::state::ApiConfig::default(),
        )
        .unwrap();
        let rm = st.0.rm.read();
        let (m, ms) = (&st.markets().markets[0], &rm.markets[0]);
        let cache = &st.0.stats;
        let now = 1_700_000_000_250;
        let first = cache.ticker(m, ms, 0, false, now);
        for later in [now + 100, now + 500, now + 749] {
            assert!(std::sync::Arc::ptr_eq(
                &first,
                &cache.ticker(m, ms, 0, false, later)
            ));
        }
        assert_eq!(cache.made(), 1);
        let mini = cache.ticker(m, ms, 0, true, now);
        assert!(mini.contains("24hrMiniTicker") && first.contains("24hrTicker"));
        assert_eq!(cache.made(), 2, "the mini ticker is its own event");
        let next = cache.ticker(m, ms, 0, false, now + 750);
        assert_eq!(cache.made(), 3, "a new second, a new event");
        assert!(next.contains(&format!("\"E\":{}", now + 750)), "{next}");

        let a = cache.average(m, ms, 0, now);
        assert!(std::sync::Arc::ptr_eq(
            &a,
            &cache.average(m, ms, 0, now + 10)
        ));
        assert_eq!(cache.made(), 4);
    }
}
