//! `/metrics` in Prometheus text format: HTTP requests and latency, engine round-trip latency,
//! orders, trades, queue depth, read-model lag, WebSocket connections.

use crate::state::AppState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds.
const BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// A latency histogram with fixed buckets (lock-free).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 12],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        for (i, b) in BUCKETS_US.iter().enumerate() {
            if us <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS_US.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {}",
                crate::decimal::format_units(*b, 6),
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            crate::decimal::format_units(self.sum_us.load(Ordering::Relaxed), 6)
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// The API's own metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// HTTP latency.
    pub http_latency: Histogram,
    /// Submit-to-read-model latency of engine commands.
    pub engine_latency: Histogram,
    /// Responses by class: 2xx, 4xx, 5xx.
    pub http_2xx: AtomicU64,
    /// 4xx.
    pub http_4xx: AtomicU64,
    /// 5xx.
    pub http_5xx: AtomicU64,
    /// Requests refused by rate limits.
    pub rate_limited: AtomicU64,
    /// Open WebSocket connections.
    pub ws_connections: AtomicU64,
    /// WebSockets closed for being too slow.
    pub ws_slow_disconnects: AtomicU64,
    /// Connections refused for their address's connection cap.
    pub connections_refused: AtomicU64,
    /// Connections closed by the header-read or the idle timeout.
    pub connections_timed_out: AtomicU64,
    /// Connections shed to make room while every place was taken (see
    /// [`crate::app::serve_router`]).
    pub connections_shed: AtomicU64,
    /// Gauges set by other parts of the server (wallet sync height, reconciliation gap, ...).
    pub external: std::sync::RwLock<std::collections::BTreeMap<&'static str, (&'static str, i64)>>,
}

impl Metrics {
    /// Records one HTTP response.
    pub fn http(&self, status: StatusCode, d: Duration) {
        self.http_latency.record(d);
        let c = match status.as_u16() {
            200..=399 => &self.http_2xx,
            400..=499 => &self.http_4xx,
            _ => &self.http_5xx,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// `GET /metrics`.
pub async fn metrics(State(st): State<AppState>) -> Response {
    let m = &st.0.metrics;
    let mut out = String::with_capacity(4096);
    let (counters, history_gap) = {
        let r = st.0.rm.read();
        (r.counters, r.history_gap)
    };
    let mut line = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    line(
        "mediator_orders_total",
        "counter",
        "Orders accepted by the engine.",
        counters.orders,
    );
    line(
        "mediator_trades_total",
        "counter",
        "Trades.",
        counters.trades,
    );
    line(
        "mediator_event_batches_total",
        "counter",
        "Event batches applied to the read models.",
        counters.batches,
    );
    line(
        "mediator_read_model_broken",
        "gauge",
        "1 when the read models lost engine events and need a restart.",
        u64::from(st.0.rm.broken.load(Ordering::Relaxed)),
    );
    line(
        "mediator_circuit_breaker",
        "gauge",
        "1 when the ledger auditor found money created or destroyed: commands that move money are refused.",
        u64::from(st.breaker_open()),
    );
    line(
        "mediator_audited_commands_total",
        "counter",
        "Commands whose events the ledger auditor checked since start-up.",
        st.0.rm.audited(),
    );
    line(
        "mediator_history_gap_commands",
        "gauge",
        "Journaled commands missing from the order and trade history since start-up.",
        history_gap,
    );
    line(
        "mediator_read_model_seq",
        "gauge",
        "Engine sequence number applied by the read models.",
        st.0.rm.applied(),
    );
    line(
        "mediator_engine_queue_depth",
        "gauge",
        "Commands waiting in the engine's input queue.",
        st.0.core.queue_depth() as u64,
    );
    line(
        "mediator_ws_connections",
        "gauge",
        "Open WebSocket connections.",
        m.ws_connections.load(Ordering::Relaxed),
    );
    line(
        "mediator_ws_slow_disconnects_total",
        "counter",
        "WebSockets closed for falling behind.",
        m.ws_slow_disconnects.load(Ordering::Relaxed),
    );
    line(
        "mediator_connections_refused_total",
        "counter",
        "Connections refused: their client address was at max_connections_per_ip.",
        m.connections_refused.load(Ordering::Relaxed),
    );
    line(
        "mediator_connections_shed_total",
        "counter",
        "Connections closed to make room for a new one while max_connections were open: the \
         least recently active of the client address holding the most.",
        m.connections_shed.load(Ordering::Relaxed),
    );
    line(
        "mediator_connections_timed_out_total",
        "counter",
        "Connections closed by the header-read or the idle timeout.",
        m.connections_timed_out.load(Ordering::Relaxed),
    );
    line(
        "mediator_http_rate_limited_total",
        "counter",
        "Requests refused with 429.",
        m.rate_limited.load(Ordering::Relaxed),
    );
    let _ = writeln!(out, "# HELP mediator_http_responses_total HTTP responses by status class.\n# TYPE mediator_http_responses_total counter");
    for (class, c) in [
        ("2xx", &m.http_2xx),
        ("4xx", &m.http_4xx),
        ("5xx", &m.http_5xx),
    ] {
        let _ = writeln!(
            out,
            "mediator_http_responses_total{{class=\"{class}\"}} {}",
            c.load(Ordering::Relaxed)
        );
    }
    for (name, (help, v)) in m.external.read().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    m.http_latency.render(
        "mediator_http_request_duration_seconds",
        "HTTP request latency.",
        &mut out,
    );
    m.engine_latency.render(
        "mediator_engine_command_duration_seconds",
        "Engine command latency until the read models applied it.",
        &mut out,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
