//! Request-weight limits per IP and per API key over fixed one-minute windows, as Binance's
//! `X-MBX-USED-WEIGHT-1M`, and order-count limits per account over ten-second windows
//! (`X-MBX-ORDER-COUNT-10S`); concurrency caps per key ([`Slots`]: connections per client
//! address, streams per IP and per invoice) and the limits on long-lived streams
//! ([`StreamLimits`]).

use crate::error::ApiError;
use axum::http::StatusCode;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Mutex};

const SHARDS: usize = 16;

/// The most clients one shard of a [`Limiter`] counts: 7/8 of 32,768, what a map of 32,768
/// buckets holds without growing, so a limiter holds at most 458,752 clients (about 35 MB at
/// most, an IPv6 /64 being the longest key).
///
/// A shard full of clients charged in the current window refuses a client it does not count
/// yet (`Limited`, used 0, until the window ends) rather than dropping one it counts. Dropping
/// a counted client would hand it a fresh budget: an attacker spraying new addresses could
/// reset the heaviest clients' counts, itself included, and the limits would fail open exactly
/// under a flood. Refused instead, the clients already counted (the traders at work) keep
/// being served and counted exactly; only addresses new in a window where this many distinct
/// ones were already seen wait for the next window (at most a minute for the IP limit), a flood
/// for the network's edge to filter. Keys and accounts are charged only after a signature
/// verified, so they never come near the cap. Shards are picked by a hash seeded per limiter,
/// so no one can aim its addresses at one shard.
pub const MAX_KEYS_PER_SHARD: usize = 28_672;

/// Weight counters for one kind of client (IPs, or keys).
#[derive(Debug)]
pub struct Limiter {
    limit: u64,
    window_ms: u64,
    max_keys_per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
    shards: Vec<Mutex<Shard>>,
}

/// One shard's clients: client → (window, weight used in it).
#[derive(Debug, Default)]
struct Shard {
    counts: HashMap<String, (u64, u64)>,
    /// The window the shard was last pruned in: a full shard prunes its older windows' clients
    /// at most once a window, so the scan costs at most one step per client it let in.
    pruned: Option<u64>,
}

/// The outcome of charging weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// Allowed; weight used in this window so far.
    Ok(u64),
    /// Refused; seconds until the window ends.
    Limited {
        /// Weight used (0 for a client refused because its shard was full).
        used: u64,
        /// Seconds to wait.
        retry_after: u64,
    },
}

impl Limiter {
    /// A limiter allowing `limit` weight per minute per client.
    pub fn new(limit: u64) -> Self {
        Self::with_window(limit, 60_000)
    }

    /// A limiter allowing `limit` per window of `window_ms` per client.
    pub fn with_window(limit: u64, window_ms: u64) -> Self {
        Self {
            limit,
            window_ms: window_ms.max(1),
            max_keys_per_shard: MAX_KEYS_PER_SHARD,
            hasher: std::collections::hash_map::RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    /// The same limiter counting at most `n` clients per shard (tests; the default is
    /// [`MAX_KEYS_PER_SHARD`]).
    pub fn with_max_keys_per_shard(mut self, n: usize) -> Self {
        self.max_keys_per_shard = n.max(1);
        self
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Clients held now, over all shards (counted ones and older windows' not yet pruned).
    pub fn clients(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).counts.len())
            .sum()
    }

    /// Adds `weight` for `client` at `now_ms`. Weight 0 is a look at the count: refused (with
    /// the count) once nothing more fits, so a request charged only after its parameters are
    /// read is refused first at the limit.
    pub fn charge(&self, client: &str, weight: u64, now_ms: u64) -> Charge {
        let window = now_ms / self.window_ms;
        let retry_after = || {
            (self.window_ms - now_ms % self.window_ms)
                .div_ceil(1000)
                .max(1)
        };
        let shard = usize::try_from(self.hasher.hash_one(client) % SHARDS as u64).unwrap_or(0);
        let mut guard = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        // No allocation for a client already counted (the common case).
        if !s.counts.contains_key(client) {
            if s.counts.len() >= self.max_keys_per_shard && s.pruned != Some(window) {
                s.counts.retain(|_, (w, _)| *w == window);
                s.pruned = Some(window);
            }
            if s.counts.len() >= self.max_keys_per_shard {
                return Charge::Limited {
                    used: 0,
                    retry_after: retry_after(),
                };
            }
            s.counts.insert(client.to_owned(), (window, 0));
        }
        debug_assert!(s.counts.len() <= self.max_keys_per_shard);
        let Some(e) = s.counts.get_mut(client) else {
            return Charge::Ok(0);
        };
        if e.0 != window {
            *e = (window, 0);
        }
        if e.1 + weight.max(1) > self.limit {
            return Charge::Limited {
                used: e.1,
                retry_after: retry_after(),
            };
        }
        e.1 += weight;
        Charge::Ok(e.1)
    }
}

/// At most `limit` concurrent holders per key (a client address, an invoice). A [`Slot`] is one
/// place, given back when it is dropped; a key with no holder takes no memory.
#[derive(Debug)]
pub struct Slots<K: Hash + Eq + Clone> {
    limit: usize,
    held: Mutex<HashMap<K, usize>>,
}

impl<K: Hash + Eq + Clone> Slots<K> {
    /// At most `limit` holders per key.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A place for `key`, or `None` when `key` holds `limit` already.
    pub fn try_acquire(self: &Arc<Self>, key: K) -> Option<Slot<K>> {
        let mut m = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.get(&key).copied().unwrap_or(0);
        if n >= self.limit {
            return None;
        }
        m.insert(key.clone(), n + 1);
        Some(Slot {
            slots: self.clone(),
            key,
        })
    }

    /// Places `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        let m = self.held.lock().unwrap_or_else(|e| e.into_inner());
        m.get(key).copied().unwrap_or(0)
    }
}

/// One place in [`Slots`]; dropping it gives the place back.
#[derive(Debug)]
pub struct Slot<K: Hash + Eq + Clone> {
    slots: Arc<Slots<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut m = self.slots.held.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(&self.key) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                m.remove(&self.key);
            }
        }
    }
}

/// `-1034` with 429: too many connections or connection attempts (Binance's
/// `TOO_MANY_CONNECTIONS`).
pub fn too_many_connections(msg: String, retry_after: Option<u64>) -> ApiError {
    ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        code: -1034,
        msg: msg.into(),
        retry_after,
    }
}

/// WebSocket connection attempts are counted over windows of this length (Binance: 300 per 5
/// minutes per IP).
pub const WS_CONNECT_WINDOW_MS: u64 = 5 * 60_000;

/// The limits on long-lived streams: WebSocket connections and the invoices' SSE streams, per
/// client IP ([`crate::ApiConfig::max_streams_per_ip`], one count for both kinds), SSE streams
/// per invoice ([`crate::ApiConfig::max_sse_per_invoice`]) and WebSocket connection attempts
/// per IP ([`crate::ApiConfig::ws_connects_per_5min`]). Request weight is charged by the
/// handlers, as for any request.
#[derive(Debug)]
pub struct StreamLimits {
    per_ip: Arc<Slots<String>>,
    per_invoice: Arc<Slots<String>>,
    ws_connects: Limiter,
}

/// The places a stream holds; it keeps them until it is dropped with the stream.
#[derive(Debug)]
pub struct StreamGuard {
    _ip: Slot<String>,
    _invoice: Option<Slot<String>>,
}

impl StreamLimits {
    /// Limits from the configuration.
    pub fn new(cfg: &crate::ApiConfig) -> Self {
        Self {
            per_ip: Slots::new(cfg.max_streams_per_ip),
            per_invoice: Slots::new(cfg.max_sse_per_invoice),
            ws_connects: Limiter::with_window(cfg.ws_connects_per_5min, WS_CONNECT_WINDOW_MS),
        }
    }

    fn ip_slot(&self, ip: &str) -> Result<Slot<String>, ApiError> {
        self.per_ip.try_acquire(ip.to_owned()).ok_or_else(|| {
            too_many_connections(
                format!(
                    "Too many concurrent streams from this IP; current limit is {}.",
                    self.per_ip.limit()
                ),
                None,
            )
        })
    }

    /// A WebSocket connection from `ip` at `now_ms`: one attempt counted, one stream place taken.
    pub fn websocket(&self, ip: &str, now_ms: u64) -> Result<StreamGuard, ApiError> {
        if let Charge::Limited { retry_after, .. } = self.ws_connects.charge(ip, 1, now_ms) {
            return Err(too_many_connections(
                format!(
                    "Too many connection attempts from IP; current limit is {} per 5 MINUTE.",
                    self.ws_connects.limit()
                ),
                Some(retry_after),
            ));
        }
        Ok(StreamGuard {
            _ip: self.ip_slot(ip)?,
            _invoice: None,
        })
    }

    /// An SSE stream of `invoice` from `ip`: a place of the IP and one of the invoice.
    pub fn invoice_events(&self, ip: &str, invoice: &str) -> Result<StreamGuard, ApiError> {
        let ip_slot = self.ip_slot(ip)?;
        let inv = self
            .per_invoice
            .try_acquire(invoice.to_owned())
            .ok_or_else(|| {
                too_many_connections(
                    format!(
                        "Too many concurrent streams of this invoice; current limit is {}.",
                        self.per_invoice.limit()
                    ),
                    None,
                )
            })?;
        Ok(StreamGuard {
            _ip: ip_slot,
            _invoice: Some(inv),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_limits_and_resets() {
        let l = Limiter::new(10);
        assert_eq!(l.charge("a", 6, 0), Charge::Ok(6));
        assert_eq!(l.charge("b", 6, 0), Charge::Ok(6));
        assert_eq!(
            l.charge("a", 5, 1_000),
            Charge::Limited {
                used: 6,
                retry_after: 59
            }
        );
        assert_eq!(l.charge("a", 4, 2_000), Charge::Ok(10));
        assert_eq!(l.charge("a", 5, 60_000), Charge::Ok(5));
        let o = Limiter::with_window(2, 10_000);
        assert_eq!(o.charge("7", 1, 10_500), Charge::Ok(1));
        assert_eq!(o.charge("7", 1, 10_600), Charge::Ok(2));
        assert_eq!(
            o.charge("7", 1, 12_000),
            Charge::Limited {
                used: 2,
                retry_after: 8
            }
        );
        assert_eq!(o.charge("7", 1, 20_000), Charge::Ok(1));
    }

    /// Defect: a shard that held more than 100,000 clients all charged in the current window
    /// kept every one (the clean-up removed only older windows) and scanned them all again on
    /// every charge, under the shard's lock: a flood of new addresses grew the map without
    /// bound and made every request's charge a full scan. Now a shard holds at most its cap;
    /// once full in the current window a new client is refused until the window ends, and the
    /// clients already counted keep being counted.
    #[test]
    fn a_flood_of_new_clients_leaves_the_map_bounded_and_counted_clients_counted() {
        let cap = 4;
        let l = Limiter::new(10).with_max_keys_per_shard(cap);
        let bound = SHARDS * cap;
        let mut counted = Vec::new();
        let mut refused = 0;
        for i in 0..2_000 {
            let client = format!("198.51.{}.{}", i / 256, i % 256);
            match l.charge(&client, 1, 1_000) {
                Charge::Ok(1) => counted.push(client),
                Charge::Limited {
                    used: 0,
                    retry_after: 59,
                } => refused += 1,
                other => panic!("{client}: {other:?}"),
            }
            assert!(l.clients() <= bound, "{} keys after {i}", l.clients());
        }
        assert!(!counted.is_empty() && counted.len() <= bound);
        assert_eq!(counted.len() + refused, 2_000);
        // Every client counted before the flood is still counted, up to its limit.
        for c in &counted {
            assert_eq!(l.charge(c, 9, 2_000), Charge::Ok(10), "{c}");
            assert!(matches!(
                l.charge(c, 1, 2_000),
                Charge::Limited { used: 10, .. }
            ));
        }
        // The next window makes room: the old window's clients are pruned, new ones counted.
        let mut later = 0;
        for i in 0..2_000 {
            let client = format!("203.0.{}.{}", i / 256, i % 256);
            if l.charge(&client, 1, 61_000) == Charge::Ok(1) {
                later += 1;
            }
            assert!(l.clients() <= bound, "{} keys after {i}", l.clients());
        }
        assert!(later > 0);
    }

    #[test]
    fn slots_cap_each_key_and_give_places_back() {
        let s = Slots::new(2);
        let a1 = s.try_acquire("a").unwrap();
        let _a2 = s.try_acquire("a").unwrap();
        assert!(s.try_acquire("a").is_none(), "a third place for a");
        let _b = s.try_acquire("b").expect("b is not affected by a");
        drop(a1);
        assert_eq!(s.held(&"a"), 1);
        let _a3 = s.try_acquire("a").expect("a place was given back");
        drop(_b);
        assert_eq!(s.held(&"b"), 0);
        assert!(s.held.lock().unwrap().get("b").is_none(), "no memory for b");
    }

    #[test]
    fn stream_limits_count_attempts_and_places() {
        let l = StreamLimits::new(&crate::ApiConfig {
            max_streams_per_ip: 2,
            max_sse_per_invoice: 1,
            ws_connects_per_5min: 3,
            ..crate::ApiConfig::default()
        });
        let w1 = l.websocket("1.1.1.1", 0).unwrap();
        let s1 = l.invoice_events("1.1.1.1", "inv").unwrap();
        let e = l.websocket("1.1.1.1", 0).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (429, -1034));
        assert!(e.msg.contains("streams from this IP"), "{}", e.msg);
        let e = l.invoice_events("2.2.2.2", "inv").unwrap_err();
        assert!(e.msg.contains("of this invoice"), "{}", e.msg);
        drop((w1, s1));
        let _w = l.websocket("1.1.1.1", 0).expect("places given back");
        // Four attempts in five minutes: the fourth is refused, whatever the places.
        let e = l.websocket("1.1.1.1", 1).unwrap_err();
        assert!(e.msg.contains("connection attempts"), "{}", e.msg);
        assert!(l.websocket("1.1.1.1", WS_CONNECT_WINDOW_MS).is_ok());
    }
}
