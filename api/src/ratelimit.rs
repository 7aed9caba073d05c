//! Request-weight limits per IP and per API key over fixed one-minute windows, as Binance's
//! `X-MBX-USED-WEIGHT-1M`, and order-count limits per account over ten-second windows
//! (`X-MBX-ORDER-COUNT-10S`).

use std::collections::HashMap;
use std::sync::Mutex;

const SHARDS: usize = 16;

/// Weight counters for one kind of client (IPs, or keys).
#[derive(Debug)]
pub struct Limiter {
    limit: u64,
    window_ms: u64,
    shards: Vec<Mutex<HashMap<String, (u64, u64)>>>,
}

/// The outcome of charging weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// Allowed; weight used in this window so far.
    Ok(u64),
    /// Refused; seconds until the window ends.
    Limited {
        /// Weight used.
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
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Adds `weight` for `client` at `now_ms`.
    pub fn charge(&self, client: &str, weight: u64, now_ms: u64) -> Charge {
        let window = now_ms / self.window_ms;
        let shard = client.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        }) % SHARDS;
        let mut m = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 100_000 {
            m.retain(|_, (w, _)| *w == window);
        }
        // No allocation for a client already counted (the common case).
        if !m.contains_key(client) {
            m.insert(client.to_owned(), (window, 0));
        }
        let Some(e) = m.get_mut(client) else {
            return Charge::Ok(0);
        };
        if e.0 != window {
            *e = (window, 0);
        }
        if e.1 + weight > self.limit {
            let retry = (self.window_ms - now_ms % self.window_ms).div_ceil(1000);
            return Charge::Limited {
                used: e.1,
                retry_after: retry.max(1),
            };
        }
        e.1 += weight;
        Charge::Ok(e.1)
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
}
