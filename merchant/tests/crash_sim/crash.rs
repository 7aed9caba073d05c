//! A crash of the simulated process, and the API's core with faults in it.
//!
//! One `Crash` per life of the server. `trip` is the moment the process dies: from then on
//! nothing of that life may change anything (the core never answers, custody never writes); its
//! tasks and threads wait until the simulation has torn the life down (`bury`), and then find
//! nobody listening. The simulation's own requests race against `wait`.

use api::core::BoxFuture;
use api::{CoreError, ExchangeCore, Reply};
use matching_engine::{Command, EngineConfig};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

#[derive(Debug)]
pub struct Crash {
    tripped: tokio::sync::watch::Sender<bool>,
    buried: tokio::sync::watch::Sender<bool>,
    buried_sync: (Mutex<bool>, Condvar),
    /// Where the process died (first cause only).
    reason: Mutex<Option<String>>,
    /// The simulation's own thread: it never blocks on a crash, it tears the life down.
    driver: std::thread::ThreadId,
}

impl Crash {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            tripped: tokio::sync::watch::Sender::new(false),
            buried: tokio::sync::watch::Sender::new(false),
            buried_sync: (Mutex::new(false), Condvar::new()),
            reason: Mutex::new(None),
            driver: std::thread::current().id(),
        })
    }
    pub fn trip(&self) {
        self.trip_because("crash");
    }
    /// The process dies now, at `place`.
    pub fn trip_because(&self, place: &str) {
        self.reason
            .lock()
            .unwrap()
            .get_or_insert_with(|| place.to_owned());
        self.tripped.send_replace(true);
    }
    /// Where the process died.
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().unwrap().clone()
    }
    pub fn tripped(&self) -> bool {
        *self.tripped.borrow()
    }
    pub async fn wait(&self) {
        let mut rx = self.tripped.subscribe();
        let _ = rx.wait_for(|t| *t).await;
    }
    async fn wait_buried(&self) {
        let mut rx = self.buried.subscribe();
        let _ = rx.wait_for(|t| *t).await;
    }
    /// Blocks a thread of the dead process until the life is torn down (not the driver's).
    pub fn block_until_buried(&self) {
        if std::thread::current().id() == self.driver {
            return;
        }
        let (m, cv) = &self.buried_sync;
        let g = m.lock().unwrap();
        drop(cv.wait_while(g, |b| !*b).unwrap());
    }
    pub fn bury(&self) {
        self.trip();
        self.buried.send_replace(true);
        let (m, cv) = &self.buried_sync;
        *m.lock().unwrap() = true;
        cv.notify_all();
    }
}

/// The durable core with faults: it loses the reply of an applied command (the caller sees
/// *unknown*), or the process crashes just before a command reaches the engine or just after
/// it was applied and made durable (before anyone saw the reply).
pub struct FaultCore {
    inner: Arc<dyn ExchangeCore>,
    crash: Arc<Crash>,
    /// Replies of applied commands still to lose.
    pub lose: AtomicUsize,
    /// Replies lost so far.
    pub lost: AtomicUsize,
    /// Crash at the n-th next command that changes something (0: never).
    pub crash_in: AtomicUsize,
    /// That crash comes after the command was applied (else before it was taken).
    pub crash_after: AtomicBool,
}

impl FaultCore {
    pub fn new(inner: Arc<dyn ExchangeCore>, crash: Arc<Crash>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            crash,
            lose: AtomicUsize::new(0),
            lost: AtomicUsize::new(0),
            crash_in: AtomicUsize::new(0),
            crash_after: AtomicBool::new(false),
        })
    }
    pub fn quiet(&self) {
        self.lose.store(0, Ordering::SeqCst);
        self.crash_in.store(0, Ordering::SeqCst);
    }
}

/// The command's kind, for the statistics.
fn name(cmd: &Command) -> String {
    let s = format!("{cmd:?}");
    s.split([' ', '(', '{'])
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn is_query(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::WithdrawalStatus { .. } | Command::CreditStatus { .. }
    )
}

impl ExchangeCore for FaultCore {
    fn submit(&self, cmd: Command) -> BoxFuture<'_, Result<Reply, CoreError>> {
        Box::pin(async move {
            if self.crash.tripped() {
                self.crash.wait_buried().await;
                return Err(CoreError::Stopped);
            }
            let crash_now = !is_query(&cmd)
                && self
                    .crash_in
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    == Ok(1);
            let after = self.crash_after.load(Ordering::SeqCst);
            if crash_now && !after {
                self.crash.trip_because(&format!("before {}", name(&cmd)));
                self.crash.wait_buried().await;
                return Err(CoreError::Stopped);
            }
            let (label, query) = (name(&cmd), is_query(&cmd));
            let reply = self.inner.submit(cmd).await;
            if crash_now || self.crash.tripped() {
                self.crash.trip_because(&format!("after {label}"));
                self.crash.wait_buried().await;
                return Err(CoreError::Stopped);
            }
            let reply = reply?;
            let lose = reply.result.is_ok()
                && !query
                && self
                    .lose
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            if lose {
                self.lost.fetch_add(1, Ordering::SeqCst);
                return Err(CoreError::Stopped);
            }
            Ok(reply)
        })
    }
    fn config(&self) -> &EngineConfig {
        self.inner.config()
    }
    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }
    fn invariants_broken(&self) -> bool {
        self.inner.invariants_broken()
    }
}
