//! Blocking without locks: a consumer parks its thread, a producer unparks it.
//!
//! The protocol is the classic store-then-check on both sides with `SeqCst` fences (Dekker): the
//! waiter publishes `parked = true` and then checks its condition again; the waker makes the
//! condition true and then checks `parked`. At least one of them sees the other's write, so a
//! wake-up is never lost. `Thread::unpark` leaves a token when the thread is not parked, so a
//! late wake-up only causes one spurious return from `park`, after which the condition is
//! checked again.

use arc_swap::ArcSwapOption;
use std::sync::atomic::{fence, AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::{self, Thread};
use std::time::Instant;

/// How many times a waiter checks its condition, spinning, before it parks.
const SPINS: u32 = 64;

/// One waiting thread (at most one at a time) and any number of wakers.
#[derive(Debug, Default)]
pub(crate) struct Waiter {
    parked: AtomicBool,
    thread: ArcSwapOption<Thread>,
}

impl Waiter {
    /// Wakes the waiter if it is parked or about to park. Call after making its condition true.
    pub(crate) fn wake(&self) {
        fence(SeqCst);
        if self.parked.load(SeqCst) {
            if let Some(thread) = self.thread.load().as_ref() {
                thread.unpark();
            }
        }
    }

    /// Blocks until `ready` returns `Some`. Only one thread may wait on a `Waiter` at a time
    /// (callers enforce it with `&mut self`).
    pub(crate) fn wait<R>(&self, mut ready: impl FnMut() -> Option<R>) -> R {
        self.wait_until(None, &mut ready)
            .expect("waits without a deadline end only when ready")
    }

    /// Blocks until `ready` returns `Some` or `deadline` passes (then `None`).
    pub(crate) fn wait_until<R>(
        &self,
        deadline: Option<Instant>,
        ready: &mut impl FnMut() -> Option<R>,
    ) -> Option<R> {
        for _ in 0..SPINS {
            if let Some(r) = ready() {
                return Some(r);
            }
            std::hint::spin_loop();
        }
        self.register();
        loop {
            self.parked.store(true, SeqCst);
            fence(SeqCst);
            let found = ready();
            if found.is_some() {
                self.parked.store(false, SeqCst);
                return found;
            }
            match deadline {
                None => thread::park(),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        self.parked.store(false, SeqCst);
                        return None;
                    }
                    thread::park_timeout(deadline - now);
                }
            }
            self.parked.store(false, SeqCst);
        }
    }

    /// Records the current thread as the one to unpark; allocates only when it changed.
    fn register(&self) {
        let current = thread::current();
        let same = self
            .thread
            .load()
            .as_ref()
            .is_some_and(|t| t.id() == current.id());
        if !same {
            self.thread.store(Some(Arc::new(current)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    #[test]
    fn no_wake_up_is_lost() {
        let waiter = Arc::new(Waiter::default());
        let value = Arc::new(AtomicU64::new(0));
        let (w, v) = (waiter.clone(), value.clone());
        let waker = thread::spawn(move || {
            for i in 1..=20_000 {
                v.store(i, SeqCst);
                w.wake();
            }
        });
        let mut seen = 0;
        while seen < 20_000 {
            seen = waiter.wait(|| {
                let now = value.load(SeqCst);
                (now > seen).then_some(now)
            });
        }
        waker.join().unwrap();
    }

    #[test]
    fn a_deadline_ends_the_wait() {
        let waiter = Waiter::default();
        let start = Instant::now();
        let got: Option<()> =
            waiter.wait_until(Some(start + Duration::from_millis(20)), &mut || None);
        assert_eq!(got, None);
        assert!(start.elapsed() >= Duration::from_millis(20));
    }
}
