//! A scheduling hint for the threads on an order's critical path.
//!
//! An order crosses several threads (a tokio worker, the submitter, the engine, the read
//! model) and each hand-off wakes the next one. On a loaded machine a woken
//! thread waits for the running one to use up its time slice before it gets a core: Linux's
//! EEVDF scheduler gives every thread 0.7 ms × (1 + log2 cores) by default (1.4 ms on two
//! cores), and a handful of hand-offs per order made waits of several milliseconds (`perf sched
//! latency`, the WebSocket API load test: up to 5 ms for the submitter). Since Linux 6.12 a
//! thread may ask for a shorter slice (`sched_attr::sched_runtime` for `SCHED_OTHER`, clamped to
//! 0.1–100 ms): its deadline comes sooner, so a wake-up may preempt a thread with a longer
//! slice. The thread's share of the CPU does not change, no privilege is needed, and older
//! kernels ignore the field.
//!
//! [`short_slice`] asks for [`SLICE_NANOS`] for the calling thread; it is a hint, so callers log
//! a failure and go on.
//!
//! The other way round, [`set_background`] moves a thread whose work can wait (the read models'
//! SQLite history writer) to `SCHED_IDLE`: it runs when a core would otherwise idle, a wake-up
//! of any other thread preempts it at once, and under full load it still gets a sliver of the
//! CPU (weight 3 against a normal thread's 1024), so it is never stopped outright. Going *to*
//! `SCHED_IDLE` needs no privilege, coming *back* does (`CAP_SYS_NICE`, or an `RLIMIT_NICE` of
//! 20): a thread that falls behind must be able to come back, so callers first ask
//! [`background_is_reversible`], which tries both in a throwaway thread, once.

use std::io;

/// The slice asked for: the kernel's minimum (0.1 ms).
pub const SLICE_NANOS: u64 = 100_000;

/// Asks the kernel for a short time slice ([`SLICE_NANOS`]) for the calling thread, keeping its
/// policy (`SCHED_OTHER`) and nice value. `Ok` on other systems than Linux (nothing to do).
pub fn short_slice() -> io::Result<()> {
    imp::short_slice()
}

/// [`short_slice`] for a thread named `thread` (for the log), logging a failure at debug level:
/// the hint is worth a line, not an error.
pub fn request_short_slice(thread: &str) {
    if let Err(e) = short_slice() {
        tracing::debug!(thread, error = %e, "no short scheduling slice");
    }
}

/// [`request_short_slice`] once per thread: for a hook that runs often on the same threads (a
/// tokio runtime's `on_thread_unpark`, which runs on its workers only, where `on_thread_start`
/// would also reach the blocking pool's threads).
pub fn request_short_slice_once(thread: &str) {
    thread_local! {
        static ASKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if !ASKED.with(|a| a.replace(true)) {
        request_short_slice(thread);
    }
}

/// Moves the calling thread to the background (`on`: policy `SCHED_IDLE`) or back to the
/// foreground (`SCHED_OTHER`), keeping its nice value; either way with the default time slice.
/// Coming back needs a privilege (see the crate documentation and
/// [`background_is_reversible`]). `Ok` on other systems than Linux (nothing to do).
pub fn set_background(on: bool) -> io::Result<()> {
    imp::set_background(on)
}

/// Whether the calling thread runs in the background (`SCHED_IDLE`); `false` on other systems.
pub fn in_background() -> io::Result<bool> {
    imp::in_background()
}

/// Whether a thread of this process can go to the background and come back: tried once, in a
/// throwaway thread (a thread that went and could not come back would stay there), and
/// remembered.
pub fn background_is_reversible() -> bool {
    static REVERSIBLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REVERSIBLE.get_or_init(|| {
        std::thread::Builder::new()
            .name("sched-probe".into())
            .spawn(|| {
                set_background(true).is_ok()
                    && set_background(false).is_ok()
                    && matches!(in_background(), Ok(false))
            })
            .ok()
            .and_then(|t| t.join().ok())
            .unwrap_or(false)
    })
}

/// The calling thread's time slice as the kernel reports it, in nanoseconds (Linux), `None`
/// elsewhere.
pub fn current_slice() -> io::Result<Option<u64>> {
    imp::current_slice()
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;

    /// `struct sched_attr` (`include/uapi/linux/sched/types.h`), its first version (48 bytes).
    #[repr(C)]
    #[derive(Default)]
    struct SchedAttr {
        size: u32,
        sched_policy: u32,
        sched_flags: u64,
        sched_nice: i32,
        sched_priority: u32,
        sched_runtime: u64,
        sched_deadline: u64,
        sched_period: u64,
    }

    const SIZE: u32 = std::mem::size_of::<SchedAttr>() as u32;

    /// `SCHED_FLAG_RESET_ON_FORK` (`include/uapi/linux/sched.h`): children get the default
    /// policy, nice (if negative) and slice.
    const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

    fn get() -> io::Result<SchedAttr> {
        let mut attr = SchedAttr::default();
        // SAFETY: `attr` is a valid, writable `struct sched_attr` of `SIZE` bytes that outlives
        // the call; pid 0 is the calling thread; flags must be 0.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                0 as libc::pid_t,
                &mut attr as *mut SchedAttr,
                SIZE,
                0 as libc::c_uint,
            )
        };
        if r == 0 {
            Ok(attr)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    pub(super) fn short_slice() -> io::Result<()> {
        // Keep what the thread has (policy, nice); change only the slice.
        let mut attr = get()?;
        if attr.sched_policy != libc::SCHED_OTHER as u32 {
            // A real-time or deadline thread: its runtime means something else.
            return Ok(());
        }
        attr.size = SIZE;
        // Threads this one spawns (the history writer under the read models, a blocking pool's
        // threads) start with the default slice, not this one: the hint is for this thread.
        attr.sched_flags = SCHED_FLAG_RESET_ON_FORK;
        attr.sched_runtime = super::SLICE_NANOS;
        set(&attr)
    }

    /// `sched_setattr` for the calling thread.
    fn set(attr: &SchedAttr) -> io::Result<()> {
        // SAFETY: `attr` is a valid `struct sched_attr` of `SIZE` bytes that outlives the call;
        // the kernel only reads it; pid 0 is the calling thread; the call's `flags` argument
        // must be 0 (`sched_flags` inside `attr` is another field).
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::syscall(
                libc::SYS_sched_setattr,
                0 as libc::pid_t,
                attr as *const SchedAttr,
                0 as libc::c_uint,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    pub(super) fn current_slice() -> io::Result<Option<u64>> {
        Ok(Some(get()?.sched_runtime))
    }

    /// Sets the calling thread's policy (`SCHED_IDLE` or `SCHED_OTHER`), keeping its nice value,
    /// with the default slice (`sched_runtime` 0).
    pub(super) fn set_background(on: bool) -> io::Result<()> {
        let mut attr = get()?;
        let policy = if on {
            libc::SCHED_IDLE
        } else {
            libc::SCHED_OTHER
        } as u32;
        let fair = [libc::SCHED_OTHER as u32, libc::SCHED_IDLE as u32];
        if !fair.contains(&attr.sched_policy) {
            // A real-time, deadline or batch thread: someone chose that; leave it.
            return Ok(());
        }
        attr.size = SIZE;
        attr.sched_policy = policy;
        attr.sched_flags = SCHED_FLAG_RESET_ON_FORK;
        attr.sched_priority = 0;
        attr.sched_runtime = 0;
        set(&attr)
    }

    pub(super) fn in_background() -> io::Result<bool> {
        Ok(get()?.sched_policy == libc::SCHED_IDLE as u32)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::io;

    pub(super) fn short_slice() -> io::Result<()> {
        Ok(())
    }

    pub(super) fn current_slice() -> io::Result<Option<u64>> {
        Ok(None)
    }

    pub(super) fn set_background(_on: bool) -> io::Result<()> {
        Ok(())
    }

    pub(super) fn in_background() -> io::Result<bool> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_asks_for_a_short_slice_gets_it_and_others_keep_theirs() {
        let before = match std::thread::spawn(current_slice).join().unwrap() {
            Ok(slice) => slice,
            // A sandbox without the call (gVisor: ENOSYS; a strict seccomp profile: EPERM).
            Err(e) if matches!(e.raw_os_error(), Some(38) | Some(1)) => return,
            Err(e) => panic!("{e}"),
        };
        let (asked, after, child) = std::thread::spawn(|| {
            let asked = short_slice();
            let after = current_slice().unwrap();
            // A thread it spawns starts with the default slice again.
            let child = std::thread::spawn(current_slice).join().unwrap().unwrap();
            (asked, after, child)
        })
        .join()
        .unwrap();
        assert_eq!(
            child, before,
            "a child of a hinted thread keeps the default"
        );
        if cfg!(target_os = "linux") {
            let before = before.expect("Linux reports a slice");
            let after = after.expect("Linux reports a slice");
            if before == 0 {
                // A kernel before 6.12 (no custom slices) reports none for a fair thread,
                // whether or not it took the call: nothing changed.
                assert_eq!(after, 0);
                return;
            }
            asked.unwrap();
            assert_eq!(after, SLICE_NANOS);
            assert_ne!(
                before, SLICE_NANOS,
                "a new thread starts with the default slice"
            );
        } else {
            asked.unwrap();
            assert_eq!((before, after), (None, None));
        }
    }

    #[test]
    fn a_thread_goes_to_the_background_and_back_when_the_process_may() {
        let reversible = background_is_reversible();
        let (went, there, back, here) = std::thread::spawn(|| {
            let went = set_background(true);
            let there = in_background();
            let back = set_background(false);
            let here = in_background();
            (went, there, back, here)
        })
        .join()
        .unwrap();
        if !cfg!(target_os = "linux") {
            assert!(reversible);
            assert!(!there.unwrap() && !here.unwrap());
            return;
        }
        match went {
            // A sandbox without the call (ENOSYS, EPERM): nothing moved, nothing reversible.
            Err(e) if matches!(e.raw_os_error(), Some(38) | Some(1)) => {
                assert!(!reversible);
                return;
            }
            r => r.unwrap(),
        }
        assert!(there.unwrap(), "SCHED_IDLE after going to the background");
        // Coming back needs CAP_SYS_NICE (or RLIMIT_NICE 20): the probe says the same.
        assert_eq!(back.is_ok(), reversible, "{back:?}");
        assert_eq!(here.unwrap(), !reversible);
        // The probe ran in a thread of its own: this one is where it was.
        assert!(!in_background().unwrap());
    }
}
