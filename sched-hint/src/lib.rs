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
        // SAFETY: `attr` is a valid `struct sched_attr` of `SIZE` bytes that outlives the call;
        // the kernel only reads it; pid 0 is the calling thread; the call's `flags` argument
        // must be 0 (`sched_flags` inside `attr` is another field).
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::syscall(
                libc::SYS_sched_setattr,
                0 as libc::pid_t,
                &attr as *const SchedAttr,
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
}
