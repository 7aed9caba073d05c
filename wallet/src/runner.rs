//! The one place that loops and reads the clock: a thread that runs
//! [`CustodyService::step`](crate::CustodyService::step) every poll interval.

use crate::service::CustodyService;
use matching_engine::units::Timestamp;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A running service loop. Stops (and joins) on [`stop`](Runner::stop) or drop.
#[derive(Debug)]
pub struct Runner {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

/// The system clock as a [`Timestamp`].
pub fn system_now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    Timestamp(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Runner {
    /// Starts a thread that runs a step of `service` every configured poll interval
    /// ([`CustodyConfig::poll_interval`](crate::CustodyConfig::poll_interval)). A failed step
    /// (bitcoind away, say) is logged and tried again at the next tick; the service reconnects by
    /// itself.
    pub fn spawn(service: Arc<Mutex<CustodyService>>) -> std::io::Result<Self> {
        let poll = match service.lock() {
            Ok(s) => s.config().poll_interval,
            Err(poisoned) => poisoned.into_inner().config().poll_interval,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("custody".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    {
                        let mut s = match service.lock() {
                            Ok(s) => s,
                            Err(poisoned) => poisoned.into_inner(),
                        };
                        if let Err(e) = s.step(system_now()) {
                            tracing::warn!(error = %e, "custody step failed; retrying");
                        }
                    }
                    while !flag.load(Ordering::Relaxed) && started.elapsed() < poll {
                        std::thread::sleep(Duration::from_millis(20).min(poll));
                    }
                }
            })?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the loop after the current step and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.shutdown();
    }
}
