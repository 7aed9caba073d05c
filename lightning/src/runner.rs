//! [`Runner`]: the one loop that drives [`LightningService::step`] with the system clock.

use crate::service::{LightningService, StepReport};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wallet::Ledger;

/// A thread calling [`LightningService::step`] every `every` until stopped.
#[derive(Debug)]
pub struct Runner {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

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
        let handle = std::thread::Builder::new()
            .name("lightning".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    match service.step(now_ms()) {
                        Ok(r) => on_step(&r),
                        Err(e) => tracing::warn!(error = %e, "lightning step"),
                    }
                    std::thread::sleep(every);
                }
            })?;
        Ok(Self { stop, handle })
    }

    /// Stops the loop (after its current step).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
    }
}
