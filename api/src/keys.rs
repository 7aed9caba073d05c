//! API keys, permissions and request signatures.
//!
//! **Secrets at rest: none.** A key's secret is `hex(HMAC-SHA256(master, "mediator/api-secret/v1/"
//! || api_key))`, derived on demand from a 32-byte server master key kept in a `0600` file in the
//! data directory. SQLite holds only the public key, its account, permissions and label; the
//! secret is shown once, when the key is created. Whoever can read the master key file can derive
//! every secret (exactly as with an encryption key); a leaked database alone reveals none. A key
//! is revoked by deleting its row; a new key gets a new random id, hence a new secret.
//! See `docs/adr/0005-api-secrets-derived-from-a-master-key.md`.

use crate::store::{KeyRow, Store, StoreError};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

type HmacSha256 = Hmac<Sha256>;

/// Permission bits. The low byte is Mediator's own permissions; bits 8 and up are BTCPay
/// Greenfield's store permissions, for keys that shop plugins hold (ADR 0016). The bits are
/// stored in SQLite, so a bit's meaning never changes.
///
/// A set of bits *holds* more than it names ([`Perms::has`] reads it through
/// [`Perms::implied`]): `merchant` holds every store permission (what a `merchant` key could do
/// before store permissions existed), and a store permission holds the ones BTCPay puts under
/// it (`canmodifystoresettings` holds all of them, `canmodifyinvoices` holds viewing and
/// creating invoices, ...). Money out is never a store permission alone: the pull-payment
/// routes also ask for `withdraw` (ADR 0008).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(pub u32);

impl Perms {
    /// No permission: any live key (e.g. `historicalTrades`).
    pub const NONE: Perms = Perms(0);
    /// Read account data.
    pub const READ: Perms = Perms(1);
    /// Place and cancel orders (funds stay in the account).
    pub const TRADE: Perms = Perms(2);
    /// Withdraw to a Bitcoin address (also: merchant refunds to an address).
    pub const WITHDRAW: Perms = Perms(4);
    /// Receive merchant payments: the native merchant API, and every Greenfield store
    /// permission.
    pub const MERCHANT: Perms = Perms(8);
    /// Operator: create accounts and keys, credit deposits.
    pub const ADMIN: Perms = Perms(16);
    /// Move funds to another account: `POST /mapi/v1/transfer`, paying an invoice from the
    /// balance. Not implied by `trade`: a trading bot's key cannot drain the account.
    pub const TRANSFER: Perms = Perms(32);
    /// Manage the account's API keys: list, create, revoke.
    pub const KEYS: Perms = Perms(64);
    /// `btcpay.store.canviewstoresettings` (holds viewing invoices).
    pub const VIEW_STORE_SETTINGS: Perms = Perms(1 << 8);
    /// `btcpay.store.canmodifystoresettings` (holds every store permission).
    pub const MODIFY_STORE_SETTINGS: Perms = Perms(1 << 9);
    /// `btcpay.store.canviewinvoices`.
    pub const VIEW_INVOICES: Perms = Perms(1 << 10);
    /// `btcpay.store.cancreateinvoice`.
    pub const CREATE_INVOICE: Perms = Perms(1 << 11);
    /// `btcpay.store.canmodifyinvoices` (holds viewing and creating invoices).
    pub const MODIFY_INVOICES: Perms = Perms(1 << 12);
    /// `btcpay.store.webhooks.canmodifywebhooks`.
    pub const MODIFY_WEBHOOKS: Perms = Perms(1 << 13);
    /// `btcpay.store.canmanagepullpayments` (holds creating them).
    pub const MANAGE_PULL_PAYMENTS: Perms = Perms(1 << 14);
    /// `btcpay.store.cancreatepullpayments` (holds creating non-approved ones).
    pub const CREATE_PULL_PAYMENTS: Perms = Perms(1 << 15);
    /// `btcpay.store.cancreatenonapprovedpullpayments` (refunds; holds viewing pull payments).
    pub const CREATE_NON_APPROVED_PULL_PAYMENTS: Perms = Perms(1 << 16);
    /// `btcpay.store.canviewpullpayments` (BTCPay 2.x).
    pub const VIEW_PULL_PAYMENTS: Perms = Perms(1 << 17);
    /// `btcpay.store.canarchivepullpayments` (BTCPay 2.x).
    pub const ARCHIVE_PULL_PAYMENTS: Perms = Perms(1 << 18);
    /// `btcpay.store.canmanagepayouts` (BTCPay 2.x; holds viewing payouts).
    pub const MANAGE_PAYOUTS: Perms = Perms(1 << 19);
    /// `btcpay.store.canviewpayouts` (BTCPay 2.x).
    pub const VIEW_PAYOUTS: Perms = Perms(1 << 20);
    /// Every store permission.
    pub const STORE: Perms = Perms(0x1fff << 8);

    /// Every permission, by name (the names a key's `permissions` parameter takes): Mediator's
    /// own, then BTCPay's store permissions.
    pub const NAMES: [(&'static str, Perms); 20] = [
        ("read", Perms::READ),
        ("trade", Perms::TRADE),
        ("withdraw", Perms::WITHDRAW),
        ("merchant", Perms::MERCHANT),
        ("admin", Perms::ADMIN),
        ("transfer", Perms::TRANSFER),
        ("keys", Perms::KEYS),
        (
            "btcpay.store.canviewstoresettings",
            Perms::VIEW_STORE_SETTINGS,
        ),
        (
            "btcpay.store.canmodifystoresettings",
            Perms::MODIFY_STORE_SETTINGS,
        ),
        ("btcpay.store.canviewinvoices", Perms::VIEW_INVOICES),
        ("btcpay.store.cancreateinvoice", Perms::CREATE_INVOICE),
        ("btcpay.store.canmodifyinvoices", Perms::MODIFY_INVOICES),
        (
            "btcpay.store.webhooks.canmodifywebhooks",
            Perms::MODIFY_WEBHOOKS,
        ),
        (
            "btcpay.store.canmanagepullpayments",
            Perms::MANAGE_PULL_PAYMENTS,
        ),
        (
            "btcpay.store.cancreatepullpayments",
            Perms::CREATE_PULL_PAYMENTS,
        ),
        (
            "btcpay.store.cancreatenonapprovedpullpayments",
            Perms::CREATE_NON_APPROVED_PULL_PAYMENTS,
        ),
        (
            "btcpay.store.canviewpullpayments",
            Perms::VIEW_PULL_PAYMENTS,
        ),
        (
            "btcpay.store.canarchivepullpayments",
            Perms::ARCHIVE_PULL_PAYMENTS,
        ),
        ("btcpay.store.canmanagepayouts", Perms::MANAGE_PAYOUTS),
        ("btcpay.store.canviewpayouts", Perms::VIEW_PAYOUTS),
    ];

    /// Both sets of bits.
    pub const fn with(self, p: Perms) -> Perms {
        Perms(self.0 | p.0)
    }

    /// The bits these hold: the named ones and those under them, BTCPay 2.x's hierarchy for the
    /// permissions that exist here. `merchant` and `canmodifystoresettings` hold every store
    /// permission; `canmanagepullpayments` holds `cancreatepullpayments` (which holds
    /// `cancreatenonapprovedpullpayments`, which holds `canviewpullpayments`) and
    /// `canarchivepullpayments`; `canmanagepayouts` holds `canviewpayouts`;
    /// `canmodifyinvoices` holds `canviewinvoices` and `cancreateinvoice`;
    /// `canviewstoresettings` holds `canviewinvoices`, `canviewpullpayments` and
    /// `canviewpayouts`. One addition, BTCPay 1.x's meaning: `canmanagepullpayments` also holds
    /// `canmanagepayouts` (before 2.0 it was the name that approved and cancelled payouts, and
    /// keys made here with it did).
    pub const fn implied(self) -> Perms {
        let mut b = self.0;
        if b & (Perms::MERCHANT.0 | Perms::MODIFY_STORE_SETTINGS.0) != 0 {
            b |= Perms::STORE.0;
        }
        if b & Perms::MANAGE_PULL_PAYMENTS.0 != 0 {
            b |= Perms::CREATE_PULL_PAYMENTS.0
                | Perms::ARCHIVE_PULL_PAYMENTS.0
                | Perms::MANAGE_PAYOUTS.0;
        }
        if b & Perms::CREATE_PULL_PAYMENTS.0 != 0 {
            b |= Perms::CREATE_NON_APPROVED_PULL_PAYMENTS.0;
        }
        if b & Perms::CREATE_NON_APPROVED_PULL_PAYMENTS.0 != 0 {
            b |= Perms::VIEW_PULL_PAYMENTS.0;
        }
        if b & Perms::MANAGE_PAYOUTS.0 != 0 {
            b |= Perms::VIEW_PAYOUTS.0;
        }
        if b & Perms::MODIFY_INVOICES.0 != 0 {
            b |= Perms::VIEW_INVOICES.0 | Perms::CREATE_INVOICE.0;
        }
        if b & Perms::VIEW_STORE_SETTINGS.0 != 0 {
            b |= Perms::VIEW_INVOICES.0 | Perms::VIEW_PULL_PAYMENTS.0 | Perms::VIEW_PAYOUTS.0;
        }
        Perms(b)
    }

    /// True when these hold every bit of `p` (see [`Perms::implied`]).
    pub fn has(self, p: Perms) -> bool {
        self.implied().0 & p.0 == p.0
    }

    /// Parses `read,trade,...` (and BTCPay's store permission names).
    pub fn parse(s: &str) -> Option<Perms> {
        let mut bits = 0u32;
        for part in s.split(',') {
            let (_, p) = Self::NAMES.iter().find(|(n, _)| *n == part.trim())?;
            bits |= p.0;
        }
        Some(Perms(bits))
    }

    /// Names of the set bits (as granted, not those they hold).
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .filter(|(_, p)| self.0 & p.0 == p.0)
            .map(|(n, _)| *n)
            .collect()
    }
}

/// A live key as the API holds it in memory.
#[derive(Clone)]
pub struct ApiKey {
    /// The public key.
    pub api_key: String,
    /// Its account.
    pub account: u32,
    /// Permissions.
    pub perms: Perms,
    /// Label.
    pub label: String,
    /// Creation time.
    pub created_ms: u64,
    /// HMAC-SHA256 keyed with the secret (the secret's two padded blocks already hashed): each
    /// check clones it instead of keying a new one.
    mac: HmacSha256,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("api_key", &self.api_key)
            .field("account", &self.account)
            .field("perms", &self.perms)
            .finish_non_exhaustive()
    }
}

impl ApiKey {
    /// The principal of a store-dashboard session: the store's account with `perms`, no secret
    /// (it is never in the key table, so nothing can sign or present it; see
    /// `merchant::dashboard`).
    pub fn session(account: u32, perms: Perms) -> Self {
        Self {
            api_key: format!("dashboard:{account}"),
            account,
            perms,
            label: "dashboard".to_owned(),
            created_ms: 0,
            mac: keyed(&[0; 64]),
        }
    }

    /// True when `signature_hex` is the HMAC-SHA256 of `payload` under this key's secret,
    /// compared in constant time.
    pub fn verify(&self, payload: &[u8], signature_hex: &str) -> bool {
        let mut sig = [0u8; 32];
        if hex::decode_to_slice(signature_hex, &mut sig).is_err() {
            return false;
        }
        let mut mac = self.mac.clone();
        mac.update(payload);
        mac.verify_slice(&sig).is_ok()
    }
}

/// HMAC-SHA256 keyed with `secret`.
fn keyed(secret: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(secret).expect("hmac takes any key length")
}

/// The most live API keys one account holds (Binance: "Each account can create up to 30 API
/// Keys"). [`KeyStore::create`] refuses one more ([`KeyError::TooMany`]).
pub const MAX_KEYS_PER_ACCOUNT: usize = 30;

/// A key-store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Master key file.
    #[error("master key file: {0}")]
    Io(#[from] std::io::Error),
    /// No randomness.
    #[error("no randomness available")]
    Random,
    /// The account already holds [`MAX_KEYS_PER_ACCOUNT`] live keys.
    #[error("account {account} already holds {max} api keys")]
    TooMany {
        /// The account.
        account: u32,
        /// [`MAX_KEYS_PER_ACCOUNT`].
        max: usize,
    },
}

/// All live keys (in memory, backed by SQLite).
pub struct KeyStore {
    master: [u8; 32],
    keys: RwLock<HashMap<String, Arc<ApiKey>>>,
    /// SHA-256 of each live key's Greenfield token → the key's id (lookup only; the token itself
    /// is derived again and compared in constant time, see [`KeyStore::by_greenfield_token`]).
    tokens: RwLock<HashMap<[u8; 32], String>>,
    /// Held while a key is created: the count of an account's keys and the insertion of one
    /// more are one step (two creations at once cannot both take the last place).
    creating: std::sync::Mutex<()>,
}

/// The domain label of Greenfield tokens: `hex(HMAC-SHA256(master, GREENFIELD_TOKEN_DOMAIN ||
/// api_key))`. Distinct from the secrets' `mediator/api-secret/v1/`, so a token never equals a
/// secret and one reveals nothing about the other.
pub const GREENFIELD_TOKEN_DOMAIN: &str = "mediator/greenfield-token/v1/";

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore").finish_non_exhaustive()
    }
}

/// Random bytes from the OS.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|_| KeyError::Random)?;
    Ok(b)
}

/// Reads the master key from `path`, creating it (mode 0600) when absent.
pub fn load_or_create_master(path: &Path) -> Result<[u8; 32], KeyError> {
    if let Ok(s) = std::fs::read_to_string(path) {
        let v = hex::decode(s.trim()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not 64 hex characters")
        })?;
        return v.try_into().map_err(|_| {
            KeyError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not 32 bytes",
            ))
        });
    }
    let key = random_bytes::<32>()?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    let mut f = opts.open(path)?;
    f.write_all(hex::encode(key).as_bytes())?;
    f.sync_all()?;
    Ok(key)
}

impl KeyStore {
    /// Loads every live key from the store.
    pub fn load(master: [u8; 32], store: &Store) -> Result<Self, KeyError> {
        let ks = Self {
            master,
            keys: RwLock::new(HashMap::new()),
            tokens: RwLock::new(HashMap::new()),
            creating: std::sync::Mutex::new(()),
        };
        for row in store.keys()? {
            ks.insert_row(row);
        }
        Ok(ks)
    }

    fn derive(&self, api_key: &str) -> [u8; 64] {
        let mut mac = HmacSha256::new_from_slice(&self.master).expect("hmac takes any key length");
        mac.update(b"mediator/api-secret/v1/");
        mac.update(api_key.as_bytes());
        let d = mac.finalize().into_bytes();
        let mut out = [0u8; 64];
        hex::encode_to_slice(d, &mut out).expect("32 bytes are 64 hex characters");
        out
    }

    fn token_mac(&self, api_key: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.master).expect("hmac takes any key length");
        mac.update(GREENFIELD_TOKEN_DOMAIN.as_bytes());
        mac.update(api_key.as_bytes());
        mac
    }

    /// The Greenfield token of a key (`Authorization: token <this>`): 64 lowercase hex digits,
    /// derived from the master key like the secret (ADR 0005), never stored.
    pub fn greenfield_token(&self, api_key: &str) -> String {
        hex::encode(self.token_mac(api_key).finalize().into_bytes())
    }

    /// The live key whose Greenfield token is `token`. The map is looked up by the SHA-256 of
    /// the token (so a lookup's timing says nothing about a token's prefix), then the key's
    /// token is derived again and compared in constant time.
    pub fn by_greenfield_token(&self, token: &str) -> Option<Arc<ApiKey>> {
        let mut raw = [0u8; 32];
        hex::decode_to_slice(token.as_bytes(), &mut raw).ok()?;
        let digest: [u8; 32] = <Sha256 as sha2::Digest>::digest(token.as_bytes()).into();
        let api_key = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
            .cloned()?;
        self.token_mac(&api_key).verify_slice(&raw).ok()?;
        self.get(&api_key)
    }

    /// A secret for another purpose than API keys (e.g. `webhook/<account>/<version>`):
    /// `hex(HMAC-SHA256(master, purpose))`, derived on demand and never stored (ADR 0005).
    /// Purposes must not start with `mediator/api-secret/` (the API keys' domain).
    pub fn derive_purpose(&self, purpose: &str) -> String {
        debug_assert!(!purpose.starts_with("mediator/api-secret/"));
        let mut mac = HmacSha256::new_from_slice(&self.master).expect("hmac takes any key length");
        mac.update(purpose.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    fn insert_row(&self, row: KeyRow) {
        let secret = self.derive(&row.api_key);
        let k = ApiKey {
            api_key: row.api_key.clone(),
            account: row.account,
            perms: Perms(row.perms),
            label: row.label,
            created_ms: row.created_ms,
            mac: keyed(&secret),
        };
        let token = self.greenfield_token(&row.api_key);
        let digest: [u8; 32] = <Sha256 as sha2::Digest>::digest(token.as_bytes()).into();
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest, row.api_key.clone());
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(row.api_key, Arc::new(k));
    }

    /// Creates a key of `account` and answers it with its secret (derived, shown once): the
    /// key's public row is first given to `record` (the audit entry, see
    /// [`crate::native::create_key`]) and a `record` that fails makes nothing, so that no key
    /// exists without its record. The record comes first, the store second: a store that fails
    /// after it leaves a record of a key that was not made (and a `-1000` answer, which is then
    /// the truth), never a key without a record. An account holding [`MAX_KEYS_PER_ACCOUNT`] live keys gets no more
    /// ([`KeyError::TooMany`]).
    pub fn create<E: From<KeyError>>(
        &self,
        store: &Store,
        account: u32,
        perms: Perms,
        label: &str,
        now_ms: u64,
        record: impl FnOnce(&KeyRow) -> Result<(), E>,
    ) -> Result<(Arc<ApiKey>, String), E> {
        let _one_at_a_time = self.creating.lock().unwrap_or_else(|e| e.into_inner());
        let held = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|k| k.account == account)
            .count();
        if held >= MAX_KEYS_PER_ACCOUNT {
            return Err(KeyError::TooMany {
                account,
                max: MAX_KEYS_PER_ACCOUNT,
            }
            .into());
        }
        let api_key = hex::encode(random_bytes::<32>()?);
        let row = KeyRow {
            api_key: api_key.clone(),
            account,
            perms: perms.0,
            label: label.to_owned(),
            created_ms: now_ms,
        };
        record(&row)?;
        store.insert_key(&row).map_err(KeyError::from)?;
        self.insert_row(row);
        let k = self.get(&api_key).ok_or(KeyError::Random)?;
        // Derived again: the key holds only its keyed HMAC.
        let secret = String::from_utf8_lossy(&self.derive(&api_key)).into_owned();
        Ok((k, secret))
    }

    /// Revokes a key.
    pub fn revoke(&self, store: &Store, api_key: &str) -> Result<bool, KeyError> {
        let found = store.revoke_key(api_key)?;
        let token = self.greenfield_token(api_key);
        let digest: [u8; 32] = <Sha256 as sha2::Digest>::digest(token.as_bytes()).into();
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&digest);
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(api_key);
        Ok(found)
    }

    /// A live key.
    pub fn get(&self, api_key: &str) -> Option<Arc<ApiKey>> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(api_key)
            .cloned()
    }

    /// Keys of an account.
    pub fn of_account(&self, account: u32) -> Vec<Arc<ApiKey>> {
        let mut v: Vec<Arc<ApiKey>> = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|k| k.account == account)
            .cloned()
            .collect();
        v.sort_by_key(|k| k.created_ms);
        v
    }
}

/// Signs a payload (for tests and clients).
pub fn sign(secret: &str, payload: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(payload.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perms_parse() {
        let p = Perms::parse("read,trade").unwrap();
        assert!(p.has(Perms::READ) && p.has(Perms::TRADE) && !p.has(Perms::WITHDRAW));
        assert!(!p.has(Perms::TRANSFER) && !p.has(Perms::KEYS));
        assert_eq!(p.names(), vec!["read", "trade"]);
        assert!(Perms::parse("read,root").is_none());
        // Stored bits keep their meaning: keys created before `transfer` and `keys` existed
        // parse and print as they did.
        for (old, bits) in [
            ("read", 1),
            ("read,trade", 3),
            ("read,trade,withdraw", 7),
            ("read,merchant", 9),
            ("read,trade,merchant", 11),
            ("admin,read", 17),
        ] {
            assert_eq!(Perms::parse(old), Some(Perms(bits)), "{old}");
        }
        assert_eq!(Perms(17).names(), vec!["read", "admin"]);
        let all = Perms::parse("read,trade,withdraw,merchant,admin,transfer,keys").unwrap();
        assert_eq!(all, Perms(127));
        assert_eq!(all.names().len(), 7);
    }

    #[test]
    fn btcpay_store_permissions_hold_what_btcpay_puts_under_them() {
        let p = |s: &str| Perms::parse(s).unwrap();
        // Each store permission and what it holds, written out from BTCPay's policy map (its
        // `PolicyHasChild` calls), for the permissions that exist here.
        let table: [(&str, &[&str]); 13] = [
            (
                "btcpay.store.canviewstoresettings",
                &[
                    "btcpay.store.canviewinvoices",
                    "btcpay.store.canviewpullpayments",
                    "btcpay.store.canviewpayouts",
                ],
            ),
            (
                "btcpay.store.canmodifystoresettings",
                &[
                    "btcpay.store.canviewstoresettings",
                    "btcpay.store.canviewinvoices",
                    "btcpay.store.cancreateinvoice",
                    "btcpay.store.canmodifyinvoices",
                    "btcpay.store.webhooks.canmodifywebhooks",
                    "btcpay.store.canmanagepullpayments",
                    "btcpay.store.cancreatepullpayments",
                    "btcpay.store.cancreatenonapprovedpullpayments",
                    "btcpay.store.canviewpullpayments",
                    "btcpay.store.canarchivepullpayments",
                    "btcpay.store.canmanagepayouts",
                    "btcpay.store.canviewpayouts",
                ],
            ),
            ("btcpay.store.canviewinvoices", &[]),
            ("btcpay.store.cancreateinvoice", &[]),
            (
                "btcpay.store.canmodifyinvoices",
                &[
                    "btcpay.store.canviewinvoices",
                    "btcpay.store.cancreateinvoice",
                ],
            ),
            ("btcpay.store.webhooks.canmodifywebhooks", &[]),
            // BTCPay 2.x puts only creating and archiving under it; approving and cancelling
            // payouts is what the name meant in 1.x (and for keys made here with it).
            (
                "btcpay.store.canmanagepullpayments",
                &[
                    "btcpay.store.cancreatepullpayments",
                    "btcpay.store.cancreatenonapprovedpullpayments",
                    "btcpay.store.canviewpullpayments",
                    "btcpay.store.canarchivepullpayments",
                    "btcpay.store.canmanagepayouts",
                    "btcpay.store.canviewpayouts",
                ],
            ),
            (
                "btcpay.store.cancreatepullpayments",
                &[
                    "btcpay.store.cancreatenonapprovedpullpayments",
                    "btcpay.store.canviewpullpayments",
                ],
            ),
            (
                "btcpay.store.cancreatenonapprovedpullpayments",
                &["btcpay.store.canviewpullpayments"],
            ),
            ("btcpay.store.canviewpullpayments", &[]),
            ("btcpay.store.canarchivepullpayments", &[]),
            (
                "btcpay.store.canmanagepayouts",
                &["btcpay.store.canviewpayouts"],
            ),
            ("btcpay.store.canviewpayouts", &[]),
        ];
        for (name, under) in table {
            let held = p(name);
            for (other, bits) in Perms::NAMES {
                let expected = other == name || under.contains(&other);
                assert_eq!(held.has(bits), expected, "{name} holds {other}");
            }
            assert_eq!(held.names(), vec![name]);
        }
        // `merchant` holds every store permission, none of them holds a Mediator permission,
        // and the bits of keys made before store permissions existed mean what they meant.
        for (name, bits) in Perms::NAMES {
            let store = bits.0 & Perms::STORE.0 != 0;
            assert_eq!(
                Perms::MERCHANT.has(bits),
                store || name == "merchant",
                "{name}"
            );
            assert_eq!(
                p("read,withdraw").has(bits),
                matches!(name, "read" | "withdraw")
            );
        }
        assert!(!Perms::STORE.has(Perms::MERCHANT) && !Perms::STORE.has(Perms::WITHDRAW));
        assert_eq!(Perms::MERCHANT.names(), vec!["merchant"]);
        assert_eq!(Perms(Perms::STORE.0).names().len(), 13);
        assert!(Perms::parse("btcpay.store.canviewinvoices:1").is_none());
        assert!(Perms::parse("btcpay.server.canmodifyserversettings").is_none());
    }

    #[test]
    fn create_verify_revoke_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let master = load_or_create_master(&dir.path().join("m.key")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("m.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(
            load_or_create_master(&dir.path().join("m.key")).unwrap(),
            master
        );
        let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
        let ks = KeyStore::load(master, &store).unwrap();
        let (k, secret) = ks
            .create(&store, 7, Perms::READ, "bot", 1, |_| Ok::<(), KeyError>(()))
            .unwrap();
        let plugin = Perms::parse("btcpay.store.canmodifyinvoices,withdraw").unwrap();
        let (p, _) = ks
            .create(&store, 7, plugin, "shop", 1, |_| Ok::<(), KeyError>(()))
            .unwrap();
        let sig = sign(&secret, "a=1&timestamp=5");
        assert!(k.verify(b"a=1&timestamp=5", &sig));
        assert!(!k.verify(b"a=2&timestamp=5", &sig));
        assert!(!k.verify(b"a=1&timestamp=5", "zz"));
        // Nothing secret in the database file.
        let raw = std::fs::read(dir.path().join("db.sqlite")).unwrap();
        assert!(!raw.windows(secret.len()).any(|w| w == secret.as_bytes()));
        let again = KeyStore::load(master, &store).unwrap();
        // Store permissions (bits above the low byte) come back as they were stored.
        assert_eq!(again.get(&p.api_key).unwrap().perms, plugin);
        assert!(again
            .get(&k.api_key)
            .unwrap()
            .verify(b"a=1&timestamp=5", &sig));
        // The Greenfield token: derived, not stored, found only exactly.
        let token = ks.greenfield_token(&k.api_key);
        assert_eq!(token.len(), 64);
        assert_ne!(token, secret);
        assert!(!raw.windows(token.len()).any(|w| w == token.as_bytes()));
        assert_eq!(ks.by_greenfield_token(&token).unwrap().api_key, k.api_key);
        assert_eq!(
            again.by_greenfield_token(&token).unwrap().api_key,
            k.api_key
        );
        let mut wrong = token.clone().into_bytes();
        wrong[63] = if wrong[63] == b'0' { b'1' } else { b'0' };
        assert!(ks
            .by_greenfield_token(std::str::from_utf8(&wrong).unwrap())
            .is_none());
        assert!(ks.by_greenfield_token(&secret).is_none());
        assert!(ks.by_greenfield_token("zz").is_none());
        assert!(ks.revoke(&store, &k.api_key).unwrap());
        assert!(ks.by_greenfield_token(&token).is_none());
        assert!(KeyStore::load(master, &store)
            .unwrap()
            .get(&k.api_key)
            .is_none());
    }
}
