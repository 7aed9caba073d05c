//! The request log (its own test binary: it installs the process's global subscriber, which
//! a test among others cannot do reliably: a thread-scoped one misses events whose call sites
//! other tests' threads registered first, with no subscriber).

mod common;

use common::Harness;

/// A log sink for one test: everything the subscriber writes, kept.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Defect: every request's log span carried its raw path, and paths carry credentials: a
/// listenKey (`/ws/<listenKey>` streams the account's orders and balances to whoever holds
/// it), a point-of-sale token, a pull payment's id. At `debug` each request's `done` line wrote
/// them to the log (and at any level, whatever a handler logged in its span). The span names
/// the matched route's template instead (`/ws/{streams}`).
#[tokio::test]
async fn request_logs_name_the_route_never_a_credential_in_the_path() {
    let sink = Captured::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let h = Harness::new();
    let (_, k) = h.trader("0", "0").await;
    let r = h
        .raw("POST", "/api/v3/userDataStream", "", Some(&k.0))
        .await;
    let lk = r.json["listenKey"].as_str().unwrap().to_owned();
    // Not an upgrade: refused, but served (and logged) by the stream route.
    h.get(&format!("/ws/{lk}")).await;
    let logs = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("/ws/{streams}"), "{logs}");
    assert!(!logs.contains(&lk), "the listenKey was logged: {logs}");
}
