//! Reading a log with a line far longer than any entry (a damaged or hostile file) takes bounded
//! memory: `tail` and `head_line` keep at most [`auditlog::MAX_LINE`] bytes of a line, as
//! `verify` does. Counted by a global allocator that records the largest allocation while a
//! test watches.

// Reason: `#[global_allocator]` needs an `unsafe impl GlobalAlloc` (as `tests/alloc.rs`). This
// one forwards each call unchanged to `std::alloc::System` and records the size asked for; the
// safety contract is the caller's and `System`'s, passed through as is.
#![allow(unsafe_code)]

use reserves::auditlog::{self, AuditLog};
use serde_json::json;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Largest;

static WATCH: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if WATCH.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if WATCH.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

/// The largest allocation `f` made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    WATCH.store(true, Ordering::Relaxed);
    let out = f();
    WATCH.store(false, Ordering::Relaxed);
    (out, LARGEST.load(Ordering::Relaxed))
}

/// The one test of this binary (the allocator's record is process-wide).
#[test]
fn a_line_of_32_mib_is_read_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, false, "system", 1).unwrap();
    log.append(1_000, "admin", "account.credit", json!({"account": 1}))
        .unwrap();
    drop(log);
    let first = std::fs::read_to_string(&path).unwrap();
    let head = auditlog::line_hash(first.trim_end().as_bytes());
    // A damaged stretch: 32 MiB without a newline, then the entry again.
    let mut bytes = vec![b'x'; 32 << 20];
    bytes.push(b'\n');
    bytes.extend_from_slice(first.as_bytes());
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, &bytes).unwrap();
    drop(f);
    let bound = 4 * auditlog::MAX_LINE;

    let (tail, largest) = largest_allocation(|| auditlog::tail(&path, 10).unwrap());
    assert_eq!(tail.len(), 2, "the two entries, the long line skipped");
    assert!(largest <= bound, "tail allocated {largest} bytes at once");

    let (found, largest) = largest_allocation(|| auditlog::head_line(&path, &head).unwrap());
    assert_eq!(found, Some((1, first.len() as u64)));
    assert!(
        largest <= bound,
        "head_line allocated {largest} bytes at once"
    );
    // Past the long line: the line and offset count it whole.
    let second = auditlog::line_hash(&[b'x'; 8]);
    let (none, largest) = largest_allocation(|| auditlog::head_line(&path, &second).unwrap());
    assert_eq!(none, None);
    assert!(
        largest <= bound,
        "head_line allocated {largest} bytes at once"
    );
}
