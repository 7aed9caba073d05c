//! The node's seed: 64 random bytes in `lightning.seed` (mode 0600) beside the wallet's secret.
//! Created once, on the first start, durably (temporary file, fsync, rename, directory fsync);
//! a seed readable by group or others is refused, never silently fixed.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The seed file's name, in the wallet's directory (next to `wallet.secret`).
pub const SEED_FILE: &str = "lightning.seed";
/// Length of the seed ldk-node derives its keys from.
pub const SEED_LEN: usize = 64;

/// The node's seed. `Debug` is redacted; the bytes are zeroed on drop.
pub struct Seed(pub(crate) [u8; SEED_LEN]);

impl std::fmt::Debug for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seed(<redacted>)")
    }
}

impl Drop for Seed {
    fn drop(&mut self) {
        self.0.fill(0);
    }
}

/// Why the seed could not be created or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SeedError {
    /// Reading or writing the file failed.
    #[error("lightning seed {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Group or others may read the file.
    #[error("lightning seed {path} has mode {mode:o}; it must be 0600")]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The file is not 64 bytes.
    #[error("lightning seed {path} is malformed: {len} bytes, expected 64")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// No randomness from the operating system.
    #[error("no randomness for a new lightning seed: {0}")]
    Random(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SeedError + '_ {
    move |source| SeedError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Loads the seed in `dir`, or creates one when there is none. Returns the seed and whether it
/// was created now.
pub fn load_or_create(dir: &Path) -> Result<(Seed, bool), SeedError> {
    let path = dir.join(SEED_FILE);
    if path.exists() {
        return load(&path).map(|s| (s, false));
    }
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mut seed = Seed([0u8; SEED_LEN]);
    getrandom::getrandom(&mut seed.0).map_err(|e| SeedError::Random(e.to_string()))?;
    let tmp = path.with_extension("tmp");
    // Only ever renamed onto `path`: one left over from a crash during a first start was never
    // used.
    if tmp.exists() {
        fs::remove_file(&tmp).map_err(io(&tmp))?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(&seed.0).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, &path).map_err(io(&path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok((seed, true))
}

fn load(path: &Path) -> Result<Seed, SeedError> {
    let mode = fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SeedError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut bytes = Vec::with_capacity(SEED_LEN + 1);
    fs::File::open(path)
        .and_then(|f| f.take(SEED_LEN as u64 + 1).read_to_end(&mut bytes))
        .map_err(io(path))?;
    let mut seed = Seed([0u8; SEED_LEN]);
    if bytes.len() != SEED_LEN {
        let len = bytes.len();
        bytes.fill(0);
        return Err(SeedError::Malformed {
            path: path.to_owned(),
            len,
        });
    }
    seed.0.copy_from_slice(&bytes);
    bytes.fill(0);
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_seed_is_private_and_reloads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = load_or_create(dir.path()).unwrap();
        assert!(created);
        let mode = fs::metadata(dir.path().join(SEED_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (b, created) = load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(a.0, b.0);
        assert_ne!(a.0, [0u8; SEED_LEN]);
        assert_eq!(format!("{a:?}"), "Seed(<redacted>)");
    }

    #[test]
    fn readable_or_short_seed_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        let path = dir.path().join(SEED_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(SeedError::InsecurePermissions { mode: 0o644, .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, [7u8; 10]).unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(SeedError::Malformed { len: 10, .. })
        ));
    }
}
