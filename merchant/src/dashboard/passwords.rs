//! The dashboard's password work: Argon2id hashes and checks, a few at a time.
//!
//! Each Argon2id run (the crate's defaults: 19 MiB, two passes) holds 19 MiB and a blocking
//! thread for its duration. The login's limits are per address and per store, and an IPv6 /48
//! holds 65,536 /64 budgets, so without a process-wide bound a crowd of wrong passwords sent
//! together would run as many checks as tokio's blocking pool has threads (512: ~10 GB). At
//! most [`PASSWORD_WORK_AT_ONCE`] run at once; a request waits up to [`PASSWORD_WAIT`] for its
//! turn and is then refused as busy, having changed nothing and counted no failure.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Argon2 runs at once, process-wide (4 × 19 MiB).
pub const PASSWORD_WORK_AT_ONCE: usize = 4;
/// How long a request waits for its turn before it is refused as busy.
pub const PASSWORD_WAIT: Duration = Duration::from_secs(5);

/// No turn came within [`PASSWORD_WAIT`] (or the work's thread failed): nothing was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// The process-wide bound on Argon2 runs.
#[derive(Debug)]
pub struct PasswordWork {
    turns: Arc<Semaphore>,
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    waiting: AtomicUsize,
    wait: Duration,
}

impl Default for PasswordWork {
    fn default() -> Self {
        Self::new(PASSWORD_WORK_AT_ONCE)
    }
}

impl PasswordWork {
    /// At most `at_once` runs at a time (at least one), a request waiting [`PASSWORD_WAIT`].
    pub fn new(at_once: usize) -> Self {
        Self::with_wait(at_once, PASSWORD_WAIT)
    }

    /// At most `at_once` runs at a time (at least one), a request waiting up to `wait`.
    pub fn with_wait(at_once: usize, wait: Duration) -> Self {
        Self {
            turns: Arc::new(Semaphore::new(at_once.max(1))),
            running: Arc::new(AtomicUsize::new(0)),
            peak: Arc::new(AtomicUsize::new(0)),
            waiting: AtomicUsize::new(0),
            wait,
        }
    }

    /// Runs `work` on a blocking thread once a turn is free, waiting up to its wait
    /// ([`PASSWORD_WAIT`] by default).
    ///
    /// The turn moves into the blocking closure: a caller that goes away (a client that closes
    /// its connection) does not free it while its Argon2 run goes on, so disconnecting cannot
    /// buy more runs than the bound.
    pub async fn run<T, F>(&self, work: F) -> Result<T, Busy>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let turn = {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let _left = Left(&self.waiting);
            tokio::time::timeout(self.wait, Arc::clone(&self.turns).acquire_owned()).await
        };
        let Ok(Ok(turn)) = turn else {
            return Err(Busy);
        };
        let (running, peak) = (Arc::clone(&self.running), Arc::clone(&self.peak));
        tokio::task::spawn_blocking(move || {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let out = work();
            running.fetch_sub(1, Ordering::SeqCst);
            drop(turn);
            out
        })
        .await
        .map_err(|_| Busy)
    }

    /// The most runs seen at once since start.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Requests waiting for a turn now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// The turns themselves, for an operator's tool or a test that holds them all.
    pub fn turns(&self) -> Arc<Semaphore> {
        Arc::clone(&self.turns)
    }
}

/// Counts a waiter out however its wait ends (a turn, a timeout, or the caller going away).
struct Left<'a>(&'a AtomicUsize);

impl Drop for Left<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A new Argon2id hash (PHC string) of `password` with a random salt.
pub(crate) fn hash_password(password: &str) -> Result<String, api::error::ApiError> {
    use api::error::ApiError;
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt_bytes = api::keys::random_bytes::<16>().map_err(|_| ApiError::internal())?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|_| ApiError::internal())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|_| ApiError::internal())
}

/// Whether `password` matches the PHC string `phc`.
pub(crate) fn verify_password(password: &str, phc: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(phc).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A stored hash to verify against when the store has none, so an unknown store costs the
/// same. Made on first use, on the blocking thread of that first check.
pub(crate) fn dummy_phc() -> &'static str {
    static D: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    D.get_or_init(|| hash_password("no store has this password").unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_runs_at_once_than_the_bound_and_each_gets_its_answer() {
        let work = Arc::new(PasswordWork::new(2));
        let mut tasks = Vec::new();
        for i in 0..12u32 {
            let work = Arc::clone(&work);
            tasks.push(tokio::spawn(async move {
                work.run(move || {
                    std::thread::sleep(Duration::from_millis(20));
                    i * 3
                })
                .await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), Ok(u32::try_from(i).unwrap() * 3));
        }
        assert_eq!(work.peak(), 2, "two turns, twelve runs: two at once");
        assert_eq!(work.waiting(), 0);
        assert_eq!(work.turns().available_permits(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_goes_away_keeps_its_turn_until_its_run_ends() {
        let work = Arc::new(PasswordWork::new(1));
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (finish_tx, finish_rx) = std::sync::mpsc::channel::<()>();
        let w = Arc::clone(&work);
        let caller = tokio::spawn(async move {
            w.run(move || {
                started_tx.send(()).unwrap();
                finish_rx.recv().unwrap();
            })
            .await
        });
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
            .await
            .unwrap();
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        // The run goes on: its turn is still taken.
        assert_eq!(work.turns().available_permits(), 0);
        finish_tx.send(()).unwrap();
        let again = work.run(|| 7).await;
        assert_eq!(again, Ok(7));
        assert_eq!(work.peak(), 1);
    }

    #[tokio::test]
    async fn a_request_that_waits_too_long_is_busy_and_runs_nothing() {
        let work = PasswordWork::with_wait(1, Duration::from_millis(50));
        let held = work.turns().acquire_owned().await.unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&ran);
        let out = work
            .run(move || {
                r.fetch_add(1, Ordering::SeqCst);
            })
            .await;
        assert_eq!(out, Err(Busy));
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        assert_eq!(work.waiting(), 0);
        drop(held);
        assert_eq!(work.run(|| 1).await, Ok(1));
    }
}
