//! Free loopback ports for tests, shared by the workspace's test crates (the root crate's
//! `tests/common`, and by `#[path]` the tests of `lightning`, `api` and `merchant`: one copy).
//!
//! A port from `bind("127.0.0.1:0")` is in Linux's ephemeral range (32768–60999): once that
//! listener is dropped, any outgoing connection (to bitcoind, to a webhook receiver) or another
//! test's `bind(:0)` may take it before the server the port was meant for binds it ("address
//! already in use", seen in CI for `serve`). These ports come from a counter below that range,
//! so no `bind(:0)` and no outgoing connection ever gets one, and no two calls in a process get
//! the same one. Same scheme as `src/bitcoind.rs` `free_port` (production code of the binary,
//! which test crates cannot reach), in a range of its own.

/// A loopback port no other call in this process got and nothing listens on now, in
/// 26000..32000 (`serve`'s own counter for its bitcoind takes 20000..26000, so a port handed to
/// a `serve` child is never one it takes itself). Panics when none is free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    const LOW: u32 = 26_000;
    const SPAN: u32 = 6_000;
    static START: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Processes (test binaries run one after another, their children) start apart.
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        (std::process::id().wrapping_mul(7_919) ^ nanos) % SPAN
    });
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN);
}
