//! One process at a time writes a data directory.
//!
//! `serve` and `journal repair` hold `<data_dir>/mediator.lock` (an exclusive advisory lock,
//! `flock`) for as long as they run, taken before anything in the directory is opened. A second
//! one is refused at once, having touched nothing. Without it, a second `serve` on the same
//! directory (a restart that overlapped the old process, a copied configuration) appended to the
//! live audit log and cut the live journal back to what it had read, both of which the running
//! server went on writing: acknowledged commands lost, and a log that refuses the next start
//! (review). The lock goes with the process, however it ends.

use anyhow::{anyhow, Context};
use std::fs::{File, OpenOptions};
use std::path::Path;

/// The lock file's name in the data directory.
pub const LOCK_FILE: &str = "mediator.lock";

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Takes the data directory's lock for `what` (the command, for the message), or says which
/// process may hold it.
pub fn lock(data_dir: &Path, what: &str) -> anyhow::Result<DataDirLock> {
    let path = data_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // Through the trait by name: `std::fs::File` has methods of the same names only from Rust
    // 1.89, above this crate's minimum.
    match fs4::FileExt::try_lock(&file) {
        Ok(()) => Ok(DataDirLock { _file: file }),
        Err(fs4::TryLockError::WouldBlock) => Err(anyhow!(
            "the data directory {} is in use by another mediator process (serve or journal \
             repair); {what} refused, nothing was changed",
            data_dir.display()
        )),
        Err(fs4::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path(), "serve").unwrap();
        let err = lock(dir.path(), "serve").unwrap_err().to_string();
        assert!(err.contains("in use by another mediator process"), "{err}");
        drop(first);
        lock(dir.path(), "serve").expect("free again");
    }
}
