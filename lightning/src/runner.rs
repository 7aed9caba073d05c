//! [`Runner`]: the one loop that drives [`LightningService::step`] with the system clock.

use crate::service::{LightningService, StepReport};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wallet::Ledger;

/// A thread calling [`LightningService::step`] whenever the node has an event (woken by
/// ldk-node's event queue, not by polling it), and at least every `every` (the steps that retry
/// refused credits, resolve withdrawals and sweep open deposits), until stopped.
#[derive(Debug)]
pub struct Runner {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

/// The shortest pause between two steps: an event the node keeps redelivering (its
/// acknowledgement failed) cannot spin the loop.
const MIN_GAP: Duration = Duration::from_millis(5);

/// Milliseconds since the epoch, from the system clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Runner {
    /// Starts the loop.
    pub fn spawn<L: Ledger + 'static>(
        service: Arc<LightningService<L>>,
        every: Duration,
    ) -> std::io::Result<Self> {
        Self::spawn_with(service, every, |_| {})
    }

    /// Starts the loop; `on_step` sees every step's report (e.g. to wake whoever waits for a
    /// credit: the merchant monitor settles Lightning-paid invoices at once).
    pub fn spawn_with<L: Ledger + 'static>(
        service: Arc<LightningService<L>>,
        every: Duration,
        on_step: impl Fn(&StepReport) + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // A runtime of this thread's own, only to wait on ldk-node's async event queue with a
        // timeout (its blocking wait has none, so a stop could not interrupt it).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let handle = std::thread::Builder::new()
            .name("lightning".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    match service.step(now_ms()) {
                        Ok(r) => on_step(&r),
                        Err(e) => tracing::warn!(error = %e, "lightning step"),
                    }
                    std::thread::sleep(MIN_GAP);
                    // The next event (left in the queue: `step` takes and acknowledges it), or
                    // `every`, whichever comes first.
                    let node = service.node();
                    let _ = rt.block_on(async {
                        tokio::time::timeout(every, node.next_event_async()).await
                    });
                }
            })?;
        Ok(Self { stop, handle })
    }

    /// Stops the loop (after its current step and wait: at most `every`).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
    }
}
