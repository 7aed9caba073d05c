//! The wallet's secret: a BIP39 mnemonic in `wallet.secret` (mode 0600) in the data directory.
//!
//! **Passphrase choice.** The file is not encrypted; instead an optional passphrase (from the
//! environment, via [`Passphrase::from_env`]) is the BIP39 passphrase: the seed is
//! `PBKDF2(mnemonic, "mnemonic" + passphrase)`, so the file alone does not give the keys. The file
//! stores the fingerprint of the resulting master key, so a wrong or missing passphrase is a clear
//! startup error instead of an empty wallet on other keys.
//!
//! The descriptors are BIP84 (`wpkh`): external `m/84'/c'/0'/0/*` and change `m/84'/c'/0'/1/*`.

use bdk_wallet::bitcoin::bip32::{Fingerprint, Xpriv};
use bdk_wallet::bitcoin::secp256k1::rand::{self, RngCore};
use bdk_wallet::bitcoin::secp256k1::Secp256k1;
use bdk_wallet::bitcoin::Network;
use bdk_wallet::keys::bip39::Mnemonic;
use bdk_wallet::template::{Bip84, DescriptorTemplate};
use bdk_wallet::KeychainKind;
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The secret file's name in the data directory.
pub const SECRET_FILE: &str = "wallet.secret";
const HEADER: &str = "mediator-wallet-secret v1";

/// A BIP39 passphrase. `Debug` is redacted.
#[derive(Clone)]
pub struct Passphrase(String);

impl Passphrase {
    /// Wraps a passphrase.
    pub fn new(passphrase: impl Into<String>) -> Self {
        Self(passphrase.into())
    }

    /// The passphrase in environment variable `var`, if set and not empty.
    pub fn from_env(var: &str) -> Option<Self> {
        std::env::var(var).ok().filter(|s| !s.is_empty()).map(Self)
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase([redacted])")
    }
}

/// Why the secret could not be created or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Reading or writing the file failed.
    #[error("wallet secret {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is readable by group or others.
    #[error("wallet secret {path} has mode {mode:o}; it must be 0600")]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a secret this version can read.
    #[error("wallet secret {path} is malformed: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The secret belongs to another network.
    #[error("wallet secret is for {found}, but the service runs on {expected}")]
    NetworkMismatch {
        /// The secret's network.
        found: Network,
        /// The configured network.
        expected: Network,
    },
    /// The passphrase is missing or wrong: the derived master key has another fingerprint.
    #[error("wrong or missing wallet passphrase: master fingerprint {derived} is not {expected}")]
    WrongPassphrase {
        /// Fingerprint from the given passphrase.
        derived: Fingerprint,
        /// Fingerprint recorded in the file.
        expected: Fingerprint,
    },
    /// Key derivation failed.
    #[error("key derivation failed: {0}")]
    Derivation(String),
}

/// The master private key. Never leaves this crate; `Debug` is redacted.
#[derive(Clone)]
pub(crate) struct MasterKey {
    xprv: Xpriv,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey([redacted])")
    }
}

impl MasterKey {
    /// The public BIP84 descriptors, external (deposits) and internal (change), with key origins
    /// so that PSBTs carry the derivations [`sign`](Self::sign) needs. No private key in them.
    pub(crate) fn public_descriptors(
        &self,
        network: Network,
    ) -> Result<(String, String), KeyError> {
        let build = |keychain| {
            Bip84(self.xprv, keychain)
                .build(network.into())
                .map(|(descriptor, _keymap, _networks)| descriptor.to_string())
                .map_err(|e| KeyError::Derivation(e.to_string()))
        };
        Ok((
            build(KeychainKind::External)?,
            build(KeychainKind::Internal)?,
        ))
    }

    /// Signs every input of `psbt` that carries one of our BIP32 derivations.
    pub(crate) fn sign(&self, psbt: &mut bdk_wallet::bitcoin::Psbt) -> Result<usize, String> {
        let secp = Secp256k1::new();
        match psbt.sign(&self.xprv, &secp) {
            Ok(signed) => Ok(signed.len()),
            Err((_, errors)) => Err(format!("{} inputs failed to sign", errors.len())),
        }
    }

    /// Signs every reserve input (1..) of a BIP-127 proof PSBT. Input 0, the commitment input,
    /// spends no UTXO and is never signed: the only input allowed to fail. Returns how many
    /// inputs were signed.
    pub(crate) fn sign_proof(&self, psbt: &mut bdk_wallet::bitcoin::Psbt) -> Result<usize, String> {
        let secp = Secp256k1::new();
        match psbt.sign(&self.xprv, &secp) {
            Ok(signed) => Ok(signed.len()),
            Err((signed, errors)) if errors.keys().all(|&i| i == 0) => Ok(signed.len()),
            Err((_, errors)) => Err(format!("{} reserve inputs failed to sign", errors.len())),
        }
    }

    /// The master fingerprint.
    pub(crate) fn fingerprint(&self) -> Fingerprint {
        self.xprv.fingerprint(&Secp256k1::signing_only())
    }
}

fn derive(
    mnemonic: &Mnemonic,
    passphrase: Option<&Passphrase>,
    network: Network,
) -> Result<MasterKey, KeyError> {
    let seed = mnemonic.to_seed(passphrase.map(|p| p.0.as_str()).unwrap_or(""));
    let xprv =
        Xpriv::new_master(network, &seed).map_err(|e| KeyError::Derivation(e.to_string()))?;
    Ok(MasterKey { xprv })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Loads the secret in `dir`, or creates one (a fresh 24-word mnemonic) when there is none.
/// Returns the master key and whether it was created now.
pub(crate) fn load_or_create(
    dir: &Path,
    network: Network,
    passphrase: Option<&Passphrase>,
) -> Result<(MasterKey, bool), KeyError> {
    let path = dir.join(SECRET_FILE);
    if path.exists() {
        return load(&path, network, passphrase).map(|k| (k, false));
    }
    let mut entropy = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut entropy);
    let mnemonic =
        Mnemonic::from_entropy(&entropy).map_err(|e| KeyError::Derivation(e.to_string()))?;
    entropy.fill(0);
    let key = derive(&mnemonic, passphrase, network)?;
    let text = format!(
        "{HEADER}\nnetwork {network}\nfingerprint {}\nmnemonic {mnemonic}\n",
        key.fingerprint()
    );
    write_private(&path, text.as_bytes())?;
    Ok((key, true))
}

/// Writes `bytes` to `path` with mode 0600, durably (fsync of file and directory), atomically
/// (temporary file then rename).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let tmp = path.with_extension("tmp");
    // A temporary file is only ever renamed onto `path`; one left over (a crash before the
    // rename, e.g. during the first start) was never used: remove it instead of failing forever.
    if tmp.exists() {
        tracing::warn!(path = %tmp.display(), "removing a stale temporary secret file");
        fs::remove_file(&tmp).map_err(io(&tmp))?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io(parent))?;
    }
    Ok(())
}

fn load(
    path: &Path,
    network: Network,
    passphrase: Option<&Passphrase>,
) -> Result<MasterKey, KeyError> {
    let mode = fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(io(path))?;
    let malformed = |reason: &str| KeyError::Malformed {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(malformed("unknown header"));
    }
    let (mut found_network, mut fingerprint, mut mnemonic) = (None, None, None);
    for line in lines {
        match line.split_once(' ') {
            Some(("network", v)) => {
                found_network = Some(
                    v.parse::<Network>()
                        .map_err(|_| malformed("unknown network"))?,
                )
            }
            Some(("fingerprint", v)) => {
                fingerprint = Some(
                    v.parse::<Fingerprint>()
                        .map_err(|_| malformed("bad fingerprint"))?,
                )
            }
            Some(("mnemonic", v)) => {
                mnemonic = Some(Mnemonic::parse(v).map_err(|_| malformed("bad mnemonic"))?)
            }
            _ => return Err(malformed("unknown line")),
        }
    }
    let found = found_network.ok_or_else(|| malformed("no network"))?;
    let expected_fp = fingerprint.ok_or_else(|| malformed("no fingerprint"))?;
    let mnemonic = mnemonic.ok_or_else(|| malformed("no mnemonic"))?;
    if found != network {
        return Err(KeyError::NetworkMismatch {
            found,
            expected: network,
        });
    }
    let key = derive(&mnemonic, passphrase, network)?;
    let derived = key.fingerprint();
    if derived != expected_fp {
        return Err(KeyError::WrongPassphrase {
            derived,
            expected: expected_fp,
        });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_secret_is_private_and_reloads_to_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, created) = load_or_create(dir.path(), Network::Regtest, None).unwrap();
        assert!(created);
        let mode = fs::metadata(dir.path().join(SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (k2, created) = load_or_create(dir.path(), Network::Regtest, None).unwrap();
        assert!(!created);
        assert_eq!(k1.fingerprint(), k2.fingerprint());
    }

    #[test]
    fn mainnet_secret_on_regtest_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path(), Network::Bitcoin, None).unwrap();
        let err = load_or_create(dir.path(), Network::Regtest, None).unwrap_err();
        assert!(matches!(
            err,
            KeyError::NetworkMismatch {
                found: Network::Bitcoin,
                expected: Network::Regtest
            }
        ));
    }

    #[test]
    fn passphrase_changes_the_key_and_a_wrong_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let pass = Passphrase::new("correct horse");
        let (k, _) = load_or_create(dir.path(), Network::Regtest, Some(&pass)).unwrap();
        let (again, _) = load_or_create(dir.path(), Network::Regtest, Some(&pass)).unwrap();
        assert_eq!(k.fingerprint(), again.fingerprint());
        let wrong = Passphrase::new("battery staple");
        assert!(matches!(
            load_or_create(dir.path(), Network::Regtest, Some(&wrong)),
            Err(KeyError::WrongPassphrase { .. })
        ));
        assert!(matches!(
            load_or_create(dir.path(), Network::Regtest, None),
            Err(KeyError::WrongPassphrase { .. })
        ));
    }

    #[test]
    fn readable_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path(), Network::Regtest, None).unwrap();
        let path = dir.path().join(SECRET_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(dir.path(), Network::Regtest, None),
            Err(KeyError::InsecurePermissions { mode: 0o644, .. })
        ));
    }

    #[test]
    fn debug_of_secrets_is_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let (k, _) = load_or_create(dir.path(), Network::Regtest, None).unwrap();
        let words = fs::read_to_string(dir.path().join(SECRET_FILE)).unwrap();
        let phrase = words
            .lines()
            .last()
            .unwrap()
            .strip_prefix("mnemonic ")
            .unwrap()
            .to_owned();
        let (ext, int) = k.public_descriptors(Network::Regtest).unwrap();
        assert!(
            ext.starts_with("wpkh([") && ext.contains("/84'/1'/0']tpub"),
            "{ext}"
        );
        assert!(!ext.contains("prv") && !int.contains("prv"));
        let shown = format!("{k:?} {:?}", Passphrase::new("hunter2"));
        assert_eq!(shown, "MasterKey([redacted]) Passphrase([redacted])");
        assert!(!shown.contains(&phrase));
    }
}
