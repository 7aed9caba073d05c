//! The router (built from the permission table), middleware (request ids, metrics, timeout)
//! and a bounded server. The application state lives in [`crate::state`].

use crate::error::ApiError;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

// The state's public names, where callers outside the crate have always found them.
pub use crate::state::{
    ok_json, open, open_local, AdminKeyFile, ApiConfig, AppState, ClientIp, Ctx, PeerAddr,
    PendingApi, Req, SetupError, MAX_RECV_WINDOW,
};

static REQUEST_ID: AtomicU64 = AtomicU64::new(1);

/// The longest a request may take (`-1007` after it).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn request_id(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let id = REQUEST_ID.fetch_add(1, Ordering::Relaxed);
    // Neither the query string (signatures, account data) nor the path: a path's segments may
    // be credentials (`/ws/<listenKey>`, `/pos/{token}`, `/pp/{pullPaymentId}`). The matched
    // route's template (`route`) is recorded by the router ([`crate::access::router`]); a path
    // no route serves has none.
    let span = tracing::info_span!(
        "request",
        id,
        method = %req.method(),
        route = tracing::field::Empty
    );
    req.extensions_mut().insert(RequestId(id));
    req.extensions_mut().insert(Arrived(crate::core::now_ms()));
    let t0 = Instant::now();
    // Behind every order answered so far, except a new order (it reads no read model).
    let fenced = !(req.method() == axum::http::Method::POST && req.uri().path() == NEW_ORDER_PATH);
    let run = async {
        if fenced {
            st.fence().await;
        }
        next.run(req).await
    };
    let run = tracing::Instrument::instrument(run, span.clone());
    let mut res = match tokio::time::timeout(REQUEST_TIMEOUT, run).await {
        Ok(res) => res,
        Err(_) => {
            span.in_scope(|| tracing::warn!("request timed out"));
            ApiError::outcome_unknown().into_response()
        }
    };
    let elapsed = t0.elapsed();
    st.0.metrics.http(res.status(), elapsed);
    span.in_scope(|| {
        tracing::debug!(
            status = res.status().as_u16(),
            micros = elapsed.as_micros() as u64,
            "done"
        )
    });
    res.headers_mut()
        .insert("x-request-id", HeaderValue::from(id));
    res
}

/// `POST` on this path places an order: the one request not fenced behind the orders answered
/// ahead of the read models ([`AppState::fence`]).
pub const NEW_ORDER_PATH: &str = "/api/v3/order";

/// When a request arrived (ms since the epoch), before it waited for anything
/// ([`crate::state::Req::arrived_ms`]).
#[derive(Debug, Clone, Copy)]
pub struct Arrived(pub u64);

/// A request's id (also in its `x-request-id` response header and its log span).
#[derive(Debug, Clone, Copy)]
pub struct RequestId(pub u64);

/// A path no route serves: HTTP 404 with an empty body, as Binance answers it. Not `-1000`:
/// clients take that code for a temporary failure and retry a call that can never succeed.
async fn not_found() -> Response {
    StatusCode::NOT_FOUND.into_response()
}

/// What a crate serves over the shell: its permission table (the only way its routes exist)
/// and the OpenAPI entries of its routes. The shell's own is [`SURFACE`]; a product crate
/// (merchant payments) exports its own, and the binary composes them ([`app_with`]).
#[derive(Debug)]
pub struct Surface {
    /// The permission table ([`crate::access::Route`] rows).
    pub routes: &'static [crate::access::Route],
    /// The routes' `/openapi.json` entries.
    pub openapi: &'static [crate::openapi::Op],
}

/// The trader gateway's surface: [`crate::access::ROUTES`] and its OpenAPI entries.
pub static SURFACE: Surface = Surface {
    routes: crate::access::ROUTES,
    openapi: crate::openapi::OPS,
};

/// The surfaces a router serves (a request extension: `/openapi.json` describes them all).
#[derive(Debug, Clone)]
pub struct Surfaces(pub Arc<[&'static Surface]>);

impl Surfaces {
    /// Their permission tables.
    pub fn tables(&self) -> Vec<&'static [crate::access::Route]> {
        self.0.iter().map(|s| s.routes).collect()
    }
}

/// The router of every endpoint of [`crate::access::ROUTES`], both listeners' (tests and
/// single-listener embedding), with request ids and the body limit. `mediator serve` serves
/// [`public_app_with`] and [`admin_app_with`] on separate addresses instead.
pub fn app(state: AppState) -> Router {
    app_with(state, &[&SURFACE])
}

/// The router of every endpoint of `surfaces` (e.g. `&[&api::SURFACE, &merchant::SURFACE]`),
/// both listeners'.
pub fn app_with(state: AppState, surfaces: &[&'static Surface]) -> Router {
    build(state, surfaces, None)
}

/// The public listener's routes: everything but `/mapi/v1/admin/*` and `/metrics`.
pub fn public_app(state: AppState) -> Router {
    public_app_with(state, &[&SURFACE])
}

/// The public listener's routes of `surfaces`.
pub fn public_app_with(state: AppState, surfaces: &[&'static Surface]) -> Router {
    build(state, surfaces, Some(crate::access::Listener::Public))
}

/// The admin listener's routes: `/mapi/v1/admin/*` and `/metrics`.
pub fn admin_app(state: AppState) -> Router {
    admin_app_with(state, &[&SURFACE])
}

/// The admin listener's routes of `surfaces`.
pub fn admin_app_with(state: AppState, surfaces: &[&'static Surface]) -> Router {
    build(state, surfaces, Some(crate::access::Listener::Admin))
}

fn build(
    state: AppState,
    surfaces: &[&'static Surface],
    only: Option<crate::access::Listener>,
) -> Router {
    let body_limit = state.0.cfg.max_body_bytes;
    let surfaces = Surfaces(surfaces.into());
    crate::access::router(&surfaces.tables(), only)
        .layer(axum::Extension(surfaces))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_id,
        ))
        .with_state(state)
}

/// Milliseconds on a monotonic clock (since the first call), for the idle timeout.
fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The key a client's connections are counted under: its IPv4 address, or the /64 of an IPv6
/// address (one subscriber's prefix; an IPv4-mapped address counts as the IPv4 address).
pub fn client_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv6Addr};
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Sets `SO_SNDBUF` on a connected stream (through a duplicate of its descriptor).
fn set_send_buffer(
    stream: tokio::net::TcpStream,
    size: u32,
) -> std::io::Result<tokio::net::TcpStream> {
    let std = stream.into_std()?;
    tokio::net::TcpSocket::from_std_stream(std.try_clone()?).set_send_buffer_size(size)?;
    tokio::net::TcpStream::from_std(std)
}

/// An accepted connection: notes when a byte last moved (the idle timeout) and holds the
/// connection's places, one of the server's `max_connections` and one of its client address's
/// `max_connections_per_ip` (none for the trusted proxy's connections), until it is dropped;
/// after a WebSocket upgrade the WebSocket holds it. Once shed ([`Live::shed_one`]) it reads
/// as closed and refuses writes, so that whichever task owns it (hyper's, or a WebSocket's)
/// ends and drops it.
#[derive(Debug)]
struct ConnStream {
    stream: tokio::net::TcpStream,
    last_active: Arc<AtomicU64>,
    shed: Arc<Shed>,
    _registered: Registered,
    _slot: Option<crate::ratelimit::Slot<std::net::IpAddr>>,
}

/// A connection's shed signal (set once, waking whatever waits to read or write on it), its
/// place in the pool (given back the moment it is shed: the newcomer takes it at once, whether
/// or not the owner has noticed yet), and its requests in progress (a connection with one is
/// never shed: its answer would be lost with an action perhaps applied).
#[derive(Debug)]
struct Shed {
    /// Set once, under `state`'s lock (read without it on every poll).
    on: std::sync::atomic::AtomicBool,
    read: futures_util::task::AtomicWaker,
    write: futures_util::task::AtomicWaker,
    /// The requests in progress and the place: a shed and a request's start are decided under
    /// this one lock, so that neither slips in between the other's look and change.
    state: std::sync::Mutex<ShedState>,
}

#[derive(Debug)]
struct ShedState {
    busy: u32,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Counts one request in progress on its connection while it lives (an HTTP request's response
/// future; a WebSocket API connection's requests, [`ConnInProgress`]).
#[derive(Debug)]
struct Busy(Arc<Shed>);

/// The connection a request came on (a request extension, when served by [`serve_router`]): a
/// handler that keeps the connection (the WebSocket API) marks it busy while it has requests in
/// progress, so that it is not shed then ([`Live`]).
#[derive(Debug, Clone)]
pub struct ConnInProgress(Arc<Shed>);

/// A request body read ahead by [`connection`]: the frames already read, then the rest when
/// the read stopped over the size limit, or the read's error when it failed (kept for the
/// handler: hyper's body reads as ended after an error, and the handler would take the part
/// read for the whole).
struct ReadAhead {
    read: std::collections::VecDeque<hyper::body::Frame<hyper::body::Bytes>>,
    rest: Option<hyper::body::Incoming>,
    failed: Option<hyper::Error>,
}

impl hyper::body::Body for ReadAhead {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        if let Some(f) = self.read.pop_front() {
            return std::task::Poll::Ready(Some(Ok(f)));
        }
        if let Some(e) = self.failed.take() {
            return std::task::Poll::Ready(Some(Err(e)));
        }
        match self.rest.as_mut() {
            Some(rest) => std::pin::Pin::new(rest).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty()
            && self.failed.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

/// A response body that frees its connection's busy mark at its first frame or its end (or
/// when dropped) ([`connection`]).
struct FreeAtFirstFrame {
    inner: axum::body::Body,
    held: Option<Busy>,
}

impl hyper::body::Body for FreeAtFirstFrame {
    type Data = hyper::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if r.is_ready() {
            self.held = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl ConnInProgress {
    /// Busy until the guard is dropped; `None` once the connection is shed (it is closing).
    pub fn enter(&self) -> Option<InProgress> {
        Busy::enter(&self.0).map(InProgress)
    }
}

/// A request in progress on a connection ([`ConnInProgress::enter`]).
#[derive(Debug)]
pub struct InProgress(#[allow(dead_code)] Busy);

impl Busy {
    /// A request in progress from now, unless the connection is shed already.
    fn enter(shed: &Arc<Shed>) -> Option<Self> {
        let mut st = shed.state.lock().unwrap_or_else(|e| e.into_inner());
        if shed.is_on() {
            return None;
        }
        st.busy += 1;
        Some(Self(shed.clone()))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        st.busy = st.busy.saturating_sub(1);
    }
}

impl Shed {
    fn new(permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        Self {
            on: std::sync::atomic::AtomicBool::new(false),
            read: futures_util::task::AtomicWaker::new(),
            write: futures_util::task::AtomicWaker::new(),
            state: std::sync::Mutex::new(ShedState {
                busy: 0,
                permit: Some(permit),
            }),
        }
    }

    /// Sheds the connection unless it is shed already or has a request in progress (decided
    /// under the lock a request's start takes): true when it was shed now.
    fn trigger(&self) -> bool {
        let permit = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if self.is_on() || st.busy > 0 {
                return false;
            }
            self.on.store(true, Ordering::Release);
            st.permit.take()
        };
        drop(permit);
        self.read.wake();
        self.write.wake();
        true
    }

    /// Not shed and no request in progress (a look: [`Shed::trigger`] decides).
    fn sheddable(&self) -> bool {
        !self.is_on() && self.state.lock().unwrap_or_else(|e| e.into_inner()).busy == 0
    }
    fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }
}

/// One open connection as the accept loop sees it.
#[derive(Debug)]
struct LiveConn {
    /// Its client address's key ([`client_key`]; `None`: the trusted proxy's).
    key: Option<std::net::IpAddr>,
    last_active: Arc<AtomicU64>,
    shed: Arc<Shed>,
}

/// The open connections of one listener: what a full pool sheds from.
///
/// Each address's cap (`max_connections_per_ip`) leaves the pool to a few addresses together
/// (16 of 256 fill 4,096), and a full pool made every other client wait in the kernel's
/// backlog. So when no place is left for a connection just accepted, one is shed: the least
/// recently active of those of the address holding the most (an idle keep-alive, a half-sent
/// request or a quiet WebSocket alike; ties: the oldest), never one with a request in progress
/// (HTTP, or the WebSocket API's: [`ConnInProgress`]); its place goes to the new client at once. An address with a few connections is
/// never shed while another holds more.
#[derive(Debug, Default)]
struct Live {
    next: AtomicU64,
    conns: std::sync::Mutex<std::collections::HashMap<u64, LiveConn>>,
}

/// A connection's entry in [`Live`], removed when the connection is dropped.
#[derive(Debug)]
struct Registered {
    live: Arc<Live>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.live
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl Live {
    fn register(
        self: &Arc<Self>,
        key: Option<std::net::IpAddr>,
        last_active: Arc<AtomicU64>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> (Registered, Arc<Shed>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let shed = Arc::new(Shed::new(permit));
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            LiveConn {
                key,
                last_active,
                shed: shed.clone(),
            },
        );
        (
            Registered {
                live: self.clone(),
                id,
            },
            shed,
        )
    }

    /// Sheds the least recently active idle connection of the address holding the most idle
    /// ones (ties: the oldest connection); false when there is none to shed.
    fn shed_one(&self) -> bool {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut held: std::collections::HashMap<Option<std::net::IpAddr>, usize> =
            std::collections::HashMap::new();
        for c in conns.values().filter(|c| c.shed.sheddable()) {
            *held.entry(c.key).or_default() += 1;
        }
        let Some(&most) = held.values().max() else {
            return false;
        };
        let mut victims: Vec<(u64, u64, &LiveConn)> = conns
            .iter()
            .filter(|(_, c)| c.shed.sheddable() && held.get(&c.key) == Some(&most))
            .map(|(id, c)| (c.last_active.load(Ordering::Relaxed), *id, c))
            .collect();
        victims.sort_unstable_by_key(|&(at, id, _)| (at, id));
        // A request may start between the look and the shed: the next one then.
        victims.into_iter().any(|(_, _, c)| c.shed.trigger())
    }
}

impl tokio::io::AsyncRead for ConnStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.shed.is_on() {
            // End of stream: the owner closes the connection.
            return std::task::Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        if r.is_pending() {
            // Waiting: a shed wakes this read. Looked at again after the registration, for a
            // shed that came between the first look and it.
            self.shed.read.register(cx.waker());
            if self.shed.is_on() {
                return std::task::Poll::Ready(Ok(()));
            }
        }
        if buf.filled().len() > before {
            self.last_active.store(mono_ms(), Ordering::Relaxed);
        }
        r
    }
}

impl ConnStream {
    /// The error a write answers once the connection is shed.
    fn shed_error() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "connection shed")
    }

    /// A write's answer, `r` from the socket: a pending write waits for the shed too (as
    /// `poll_read`).
    fn after_write(
        &self,
        cx: &std::task::Context<'_>,
        r: std::task::Poll<std::io::Result<usize>>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        if r.is_pending() {
            self.shed.write.register(cx.waker());
            if self.shed.is_on() {
                return std::task::Poll::Ready(Err(Self::shed_error()));
            }
        }
        self.wrote(&r);
        r
    }

    fn wrote(&self, r: &std::task::Poll<std::io::Result<usize>>) {
        if matches!(r, std::task::Poll::Ready(Ok(n)) if *n > 0) {
            self.last_active.store(mono_ms(), Ordering::Relaxed);
        }
    }
}

impl tokio::io::AsyncWrite for ConnStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.shed.is_on() {
            return std::task::Poll::Ready(Err(Self::shed_error()));
        }
        let r = std::pin::Pin::new(&mut self.stream).poll_write(cx, buf);
        self.after_write(cx, r)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.shed.is_on() {
            return std::task::Poll::Ready(Err(Self::shed_error()));
        }
        let r = std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.after_write(cx, r)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Answers a connection over its address's limit with `429` / `-1034` (one non-blocking write:
/// nothing waits for a client that does not read) and closes it.
fn refuse(stream: tokio::net::TcpStream, limit: usize) {
    let body = format!(
        "{{\"code\":-1034,\"msg\":\"Too many concurrent connections; current limit is {limit}.\"}}"
    );
    let answer = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(answer.as_bytes());
}

/// Serves `state`'s public routes ([`public_app`]) on a bound listener until `shutdown`
/// resolves, then finishes in-flight requests (graceful shutdown). See [`serve_router`] for the
/// limits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = public_app(state.clone());
    serve_router(listener, router, &state, shutdown).await
}

/// Serves `router` (HTTP/1.1 with WebSocket upgrades; any router over `state`, e.g. a second
/// listener's) on a bound listener until `shutdown`
/// resolves, then finishes in-flight requests (waiting at most the request timeout and 5 s:
/// an SSE stream would never finish). Connection limits and timeouts come from `state`'s
/// [`ApiConfig`]; refusals and timeouts are counted on `/metrics`:
/// at most `max_connections` at once (with all of them open, one is shed for the next: see
/// [`Live`]), at most
/// `max_connections_per_ip` per client address ([`client_key`]; one more is answered `429`
/// `-1034` and closed; a connection from the trusted proxy, [`crate::access::TrustedProxy`],
/// is not counted per address: every client behind it shares its address, and the stream caps
/// and rate limits count each forwarded address), `header_read_timeout_ms` for each request
/// head (hyper's timer, which
/// starts when the connection is ready for a request, so it also closes idle keep-alive
/// connections), and `idle_timeout_ms` without a byte moving either way. Handlers see the peer
/// as `ConnectInfo<PeerAddr>` ([`ClientIp`]).
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
    state: &AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cfg = &state.0.cfg;
    let permits = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let live = Arc::new(Live::default());
    let per_ip = crate::ratelimit::Slots::new(cfg.max_connections_per_ip);
    let timeouts = ConnTimeouts {
        header_read: std::time::Duration::from_millis(cfg.header_read_timeout_ms.max(1)),
        body_read: std::time::Duration::from_millis(cfg.body_read_timeout_ms.max(1)),
        idle_ms: cfg.idle_timeout_ms.max(1),
    };
    // Connection tasks watch `stop` and each hold a `done` sender: the loop below ends by
    // telling them to finish, then waits until the last one dropped its sender.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let from_proxy = cfg
            .trusted_proxy
            .as_ref()
            .is_some_and(|p| p.is_proxy(peer.ip()));
        // The proxy's clients all share its address: they are counted per forwarded address by
        // the stream caps and rate limits, and together by `max_connections`.
        let slot = if from_proxy {
            None
        } else if let Some(slot) = per_ip.try_acquire(client_key(peer.ip())) {
            Some(slot)
        } else {
            tracing::debug!(peer = %peer.ip(), "connection refused: too many from its address");
            state
                .0
                .metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            refuse(stream, per_ip.limit());
            continue;
        };
        let _ = stream.set_nodelay(true);
        let stream = match cfg.socket_send_buffer {
            None => stream,
            Some(n) => match set_send_buffer(stream, n) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "setting SO_SNDBUF failed");
                    continue;
                }
            },
        };
        // A place in the pool, once the connection passed its address's cap (a refused one
        // sheds nobody). Every one taken: one connection is shed ([`Live`]), its place
        // given back at once; none to shed (every one busy): the new one waits for a place, a
        // look each second.
        let permit = loop {
            match permits.clone().try_acquire_owned() {
                Ok(p) => break Some(p),
                Err(tokio::sync::TryAcquireError::Closed) => break None,
                Err(tokio::sync::TryAcquireError::NoPermits) => {}
            }
            if live.shed_one() {
                state
                    .0
                    .metrics
                    .connections_shed
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            tokio::select! {
                p = permits.clone().acquire_owned() => break p.ok(),
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                () = &mut shutdown => break None,
            }
        };
        let Some(permit) = permit else {
            break;
        };
        let last_active = Arc::new(AtomicU64::new(mono_ms()));
        let key = slot.as_ref().map(|_| client_key(peer.ip()));
        let (registered, shed) = live.register(key, last_active.clone(), permit);
        let io = ConnStream {
            stream,
            last_active,
            shed,
            _registered: registered,
            _slot: slot,
        };
        tokio::spawn(connection(
            io,
            peer,
            router.clone(),
            state.clone(),
            timeouts,
            stop_rx.clone(),
            done_tx.clone(),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(done_tx);
    // In-flight requests finish within their body's and the request's timeouts; a stream (SSE)
    // never does, so the wait is bounded.
    let grace = timeouts.body_read + REQUEST_TIMEOUT + std::time::Duration::from_secs(5);
    if tokio::time::timeout(grace, done_rx.recv()).await.is_err() {
        tracing::warn!("connections still open after the shutdown grace period; closing them");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct ConnTimeouts {
    header_read: std::time::Duration,
    body_read: std::time::Duration,
    idle_ms: u64,
}

/// One connection: HTTP/1.1 with upgrades, the header-read timer, the idle check, graceful
/// shutdown. Ends when the connection closes or is upgraded (the WebSocket then owns the
/// socket and its places).
async fn connection(
    io: ConnStream,
    peer: SocketAddr,
    router: Router,
    state: AppState,
    t: ConnTimeouts,
    mut stop: tokio::sync::watch::Receiver<bool>,
    _done: tokio::sync::mpsc::Sender<()>,
) {
    let last_active = io.last_active.clone();
    let shed = io.shed.clone();
    let body_limit = state.0.cfg.max_body_bytes;
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
        req.extensions_mut().insert(ConnInProgress(shed.clone()));
        let (shed, router) = (shed.clone(), router.clone());
        async move {
            // The body read here first, up to the size limit: the request is in progress (its
            // connection not shed) from the moment it has all arrived, whatever the handler
            // does before it reads it (a body still arriving is the client's, and a trickled one
            // must not keep a connection from being shed), to its answer's first frame (a JSON
            // answer whole; a stream's first event).
            // Within `body_read_timeout_ms`: after it no handler has run, so the answer says
            // nothing was done (`-1001`), and the connection closes (its body is unread).
            let (parts, mut body) = req.into_parts();
            let mut read = std::collections::VecDeque::new();
            let (mut len, mut complete, mut failed) = (0usize, false, None);
            let ahead = async {
                loop {
                    let next = std::future::poll_fn(|cx| {
                        hyper::body::Body::poll_frame(std::pin::Pin::new(&mut body), cx)
                    })
                    .await;
                    match next {
                        None => {
                            complete = true;
                            break;
                        }
                        Some(Ok(f)) => {
                            len += f.data_ref().map_or(0, |d| d.len());
                            read.push_back(f);
                            if len > body_limit {
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            };
            if tokio::time::timeout(t.body_read, ahead).await.is_err() {
                let mut r = ApiError::body_timeout().into_response();
                r.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    HeaderValue::from_static("close"),
                );
                return Ok(r);
            }
            let busy = if complete {
                // Shed meanwhile (a request read behind the last answer): not served, its
                // answer could not be written.
                let Some(b) = Busy::enter(&shed) else {
                    let mut r = axum::response::Response::new(axum::body::Body::empty());
                    *r.status_mut() = axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    return Ok(r);
                };
                Some(b)
            } else {
                None
            };
            let rest = (!complete && failed.is_none()).then_some(body);
            let req = hyper::Request::from_parts(
                parts,
                axum::body::Body::new(ReadAhead { read, rest, failed }),
            );
            let answer = tower::ServiceExt::oneshot(router, req).await;
            answer.map(|r| {
                r.map(|b| {
                    axum::body::Body::new(FreeAtFirstFrame {
                        inner: b,
                        held: busy,
                    })
                })
            })
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Heads capped like bodies (hyper's default buffer holds about 408 KiB per connection).
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(t.header_read)
        .max_buf_size(state.0.cfg.max_header_bytes.max(8_192))
        .max_headers(100)
        .keep_alive(true);
    let conn = builder
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let every = std::time::Duration::from_millis((t.idle_ms / 4).clamp(10, 5_000));
    let mut check = tokio::time::interval(every);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut stopping = false;
    let timed_out = || {
        state
            .0
            .metrics
            .connections_timed_out
            .fetch_add(1, Ordering::Relaxed)
    };
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    if e.is_timeout() {
                        timed_out();
                    }
                    tracing::debug!(peer = %peer.ip(), error = %e, "connection ended");
                }
                break;
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = check.tick() => {
                if mono_ms().saturating_sub(last_active.load(Ordering::Relaxed)) >= t.idle_ms {
                    tracing::debug!(peer = %peer.ip(), "connection idle: closed");
                    timed_out();
                    break;
                }
            }
        }
    }
}

/// Serves the admin routes ([`admin_app`]: `/mapi/v1/admin/*`, `/metrics`) on their own bound
/// listener (`admin_listen`, loopback by default) until `shutdown` resolves.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = admin_app(state.clone());
    serve_router(listener, router, &state, shutdown).await
}
