//! The liabilities Merkle-sum tree: one tree per asset over every account's balance (available
//! + held), with a per-user inclusion proof. Format: `docs/liabilities-proof.md`.
//!
//! * Leaf: `SHA-256("mediator-liability-leaf" || nonce || 0x01 || u32_be(account) || asset ||
//!   0x00 || u64_be(balance))`, with a 32-byte nonce per account, per asset, per proof
//!   ([`nonce`]); padding leaves (kind 0x02 and their index instead of 0x01 and an account,
//!   balance 0, their own nonces) fill the tree to a power of two, and all leaves are ordered by
//!   hash, so neither account ids, balances nor the number of accounts leak beyond the next power
//!   of two. The account is in the leaf so that one leaf cannot be shown to two users with equal
//!   balances and counted once: a user checks the proof names their own account ([`verify_for`]).
//! * Node: `SHA-256("mediator-liability-node" || left_hash || u64_be(left_sum) || right_hash ||
//!   u64_be(right_sum))`, `sum = left_sum + right_sum` (checked: a total above `u64::MAX` is a
//!   build error, never a wrap). Both child sums are hashed, so a sibling cannot be given a
//!   negative or shifted share of its parent's sum.
//!
//! A user checks that the proof names their own account and that the path from their leaf
//! reaches the published root and total; an account left out or a sum changed anywhere on the
//! path changes the root.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// A 32-byte SHA-256 digest.
pub type Hash = [u8; 32];

/// The version of the proof format this code writes and reads. Version 2 hashes the account
/// into its leaf (version 1, `nonce || asset || balance`, let one leaf pass for two accounts).
pub const FORMAT_VERSION: u32 = 2;

/// The largest tree depth accepted by [`verify`]: 2^40 leaves is far above any exchange.
pub const MAX_DEPTH: usize = 40;

/// The longest asset name accepted (bytes; no 0x00 inside).
pub const MAX_ASSET_LEN: usize = 16;

const LEAF_TAG: &[u8] = b"mediator-liability-leaf";
const NODE_TAG: &[u8] = b"mediator-liability-node";
const NONCE_TAG: &[u8] = b"mediator-liability-nonce";
const COMMIT_TAG: &[u8] = b"mediator-liabilities-commitment";

/// Which leaf a nonce is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// An account's leaf.
    Account(u32),
    /// The `i`-th padding leaf.
    Pad(u32),
}

fn slot_bytes(slot: Slot) -> (u8, u32) {
    match slot {
        Slot::Account(a) => (1, a),
        Slot::Pad(i) => (2, i),
    }
}

/// The nonce of one leaf: `HMAC-SHA256(secret, "mediator-liability-nonce" || u64_be(proof_id) ||
/// asset || 0x00 || kind || u32_be(id))`, kind 0x01 for an account, 0x02 for padding. A fresh
/// `proof_id` per published proof means a nonce is never reused across proofs.
pub fn nonce(secret: &[u8; 32], proof_id: u64, asset: &str, slot: Slot) -> Hash {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(NONCE_TAG);
    mac.update(&proof_id.to_be_bytes());
    mac.update(asset.as_bytes());
    mac.update(&[0]);
    let (kind, id) = slot_bytes(slot);
    mac.update(&[kind]);
    mac.update(&id.to_be_bytes());
    mac.finalize().into_bytes().into()
}

/// A leaf's hash: `SHA-256("mediator-liability-leaf" || nonce || kind || u32_be(id) || asset ||
/// 0x00 || u64_be(balance))`, kind 0x01 for an account (id = the account id), 0x02 for padding
/// (id = its index). The account is hashed in, so one leaf can be shown to one account only.
pub fn leaf_hash(nonce: &Hash, slot: Slot, asset: &str, balance: u64) -> Hash {
    let (kind, id) = slot_bytes(slot);
    let mut h = Sha256::new();
    h.update(LEAF_TAG);
    h.update(nonce);
    h.update([kind]);
    h.update(id.to_be_bytes());
    h.update(asset.as_bytes());
    h.update([0u8]);
    h.update(balance.to_be_bytes());
    h.finalize().into()
}

/// An inner node's hash.
pub fn node_hash(left: &Hash, left_sum: u64, right: &Hash, right_sum: u64) -> Hash {
    let mut h = Sha256::new();
    h.update(NODE_TAG);
    h.update(left);
    h.update(left_sum.to_be_bytes());
    h.update(right);
    h.update(right_sum.to_be_bytes());
    h.finalize().into()
}

/// One node of the tree: its hash and the sum of the balances under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    /// The node's hash.
    pub hash: Hash,
    /// Σ balances below it.
    pub sum: u64,
}

/// Why a tree could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The balances sum above `u64::MAX`.
    #[error("liabilities of asset {asset} sum above u64::MAX")]
    Overflow {
        /// The asset.
        asset: String,
    },
    /// An account appears twice.
    #[error("account {account} appears twice in the {asset} snapshot")]
    DuplicateAccount {
        /// The asset.
        asset: String,
        /// The account.
        account: u32,
    },
    /// The asset name is empty, too long or holds a 0x00 byte.
    #[error("bad asset name {asset:?}: 1 to 16 bytes, no NUL")]
    BadAsset {
        /// The name given.
        asset: String,
    },
    /// More accounts than a tree of depth [`MAX_DEPTH`] holds.
    #[error("too many accounts: {count}")]
    TooMany {
        /// The count.
        count: usize,
    },
}

fn asset_ok(asset: &str) -> bool {
    !asset.is_empty() && asset.len() <= MAX_ASSET_LEN && !asset.as_bytes().contains(&0)
}

/// An asset symbol a proof of reserves may name: one the trees take, of printable ASCII
/// letters, digits, `-` and `_` only (nothing that reads as another part of the signed message).
pub fn asset_symbol_ok(asset: &str) -> bool {
    asset_ok(asset)
        && asset
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A built tree for one asset: every level, leaves first, and where each account's leaf is.
#[derive(Debug, Clone)]
pub struct Tree {
    asset: String,
    proof_id: u64,
    levels: Vec<Vec<Node>>,
    /// account → (leaf index, balance, nonce)
    accounts: HashMap<u32, (u64, u64, Hash)>,
}

impl Tree {
    /// Builds the tree of `asset` for the published proof `proof_id` over `balances` (account,
    /// available + held); accounts with a zero balance are left out. O(n log n) (the sort).
    pub fn build(
        secret: &[u8; 32],
        proof_id: u64,
        asset: &str,
        balances: &[(u32, u64)],
    ) -> Result<Tree, BuildError> {
        if !asset_ok(asset) {
            return Err(BuildError::BadAsset {
                asset: asset.to_owned(),
            });
        }
        let mut leaves: Vec<(Node, Option<(u32, Hash)>)> = Vec::with_capacity(balances.len());
        let mut seen = HashMap::with_capacity(balances.len());
        let mut total: u64 = 0;
        for &(account, balance) in balances {
            if seen.insert(account, ()).is_some() {
                return Err(BuildError::DuplicateAccount {
                    asset: asset.to_owned(),
                    account,
                });
            }
            if balance == 0 {
                continue;
            }
            total = total
                .checked_add(balance)
                .ok_or_else(|| BuildError::Overflow {
                    asset: asset.to_owned(),
                })?;
            let n = nonce(secret, proof_id, asset, Slot::Account(account));
            let hash = leaf_hash(&n, Slot::Account(account), asset, balance);
            leaves.push((Node { hash, sum: balance }, Some((account, n))));
        }
        let width = leaves
            .len()
            .max(1)
            .checked_next_power_of_two()
            .unwrap_or(usize::MAX);
        if width > (1usize << MAX_DEPTH) || leaves.len() > u32::MAX as usize {
            return Err(BuildError::TooMany {
                count: leaves.len(),
            });
        }
        for pad in 0..(width - leaves.len()) as u32 {
            let n = nonce(secret, proof_id, asset, Slot::Pad(pad));
            leaves.push((
                Node {
                    hash: leaf_hash(&n, Slot::Pad(pad), asset, 0),
                    sum: 0,
                },
                None,
            ));
        }
        leaves.sort_unstable_by_key(|l| l.0.hash);
        let mut accounts = HashMap::with_capacity(leaves.len());
        let mut level = Vec::with_capacity(width);
        for (i, (node, who)) in leaves.into_iter().enumerate() {
            if let Some((account, n)) = who {
                accounts.insert(account, (i as u64, node.sum, n));
            }
            level.push(node);
        }
        let mut levels = vec![level];
        while levels.last().map_or(0, Vec::len) > 1 {
            let below = levels.last().expect("non-empty");
            let mut up = Vec::with_capacity(below.len() / 2);
            for pair in below.chunks_exact(2) {
                let (l, r) = (pair[0], pair[1]);
                // Cannot overflow: every sum is at most `total`, which fitted.
                let sum = l
                    .sum
                    .checked_add(r.sum)
                    .expect("sums bounded by the checked total");
                up.push(Node {
                    hash: node_hash(&l.hash, l.sum, &r.hash, r.sum),
                    sum,
                });
            }
            levels.push(up);
        }
        let tree = Tree {
            asset: asset.to_owned(),
            proof_id,
            levels,
            accounts,
        };
        assert_eq!(tree.root().sum, total, "the root sums every balance");
        Ok(tree)
    }

    /// The root: (hash, total).
    pub fn root(&self) -> Node {
        self.levels
            .last()
            .and_then(|l| l.first())
            .copied()
            .expect("a tree has at least one leaf")
    }

    /// The asset.
    pub fn asset(&self) -> &str {
        &self.asset
    }

    /// The number of leaves (a power of two, padding included).
    pub fn width(&self) -> usize {
        self.levels[0].len()
    }

    /// The number of accounts with a leaf.
    pub fn accounts(&self) -> usize {
        self.accounts.len()
    }

    /// The inclusion proof of `account`, or `None` when it has no leaf (a zero balance).
    /// O(log n).
    pub fn prove(&self, account: u32, audit_head: Option<Hash>) -> Option<InclusionProof> {
        let &(index, balance, nonce) = self.accounts.get(&account)?;
        let mut path = Vec::with_capacity(self.levels.len().saturating_sub(1));
        let mut i = index as usize;
        for level in &self.levels[..self.levels.len() - 1] {
            path.push(level[i ^ 1]);
            i /= 2;
        }
        let root = self.root();
        Some(InclusionProof {
            version: FORMAT_VERSION,
            proof_id: self.proof_id,
            account,
            asset: self.asset.clone(),
            balance,
            nonce,
            index,
            path,
            root: root.hash,
            total: root.sum,
            audit_head,
            created_ms: None,
        })
    }
}

/// One user's proof that their balance is counted in the published total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InclusionProof {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The published proof this belongs to.
    pub proof_id: u64,
    /// The account whose leaf this is (hashed into the leaf): the user checks it is theirs
    /// ([`verify_for`]).
    pub account: u32,
    /// The asset.
    pub asset: String,
    /// The account's balance (available + held), base units.
    pub balance: u64,
    /// The leaf's nonce.
    pub nonce: Hash,
    /// The leaf's index (bit k = 1: at level k the leaf's side is the right child).
    pub index: u64,
    /// The siblings, bottom-up.
    pub path: Vec<Node>,
    /// The root hash.
    pub root: Hash,
    /// The root sum: the asset's total liabilities.
    pub total: u64,
    /// The audit-log head when the proof was published.
    pub audit_head: Option<Hash>,
    /// When the proof was published (ms since the epoch; informative, not hashed).
    pub created_ms: Option<u64>,
}

/// Why an inclusion proof did not verify (or could not be read). `code()` is stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Not JSON, or a field is missing or of the wrong type.
    #[error("malformed proof: {0}")]
    Malformed(String),
    /// A format version this verifier does not know.
    #[error("unsupported proof version {0} (this verifier reads version 2)")]
    Version(u32),
    /// A hash or nonce is not 64 hex digits.
    #[error("bad hex in {field}: expected 64 hex digits")]
    BadHex {
        /// The field.
        field: String,
    },
    /// A number is not a decimal u64.
    #[error("bad amount in {field}: expected a decimal integer below 2^64")]
    BadAmount {
        /// The field.
        field: String,
    },
    /// The asset name is empty, too long or holds NUL.
    #[error("bad asset name")]
    BadAsset,
    /// The path is longer than [`MAX_DEPTH`], or the index does not fit in it.
    #[error("index {index} does not fit a path of length {depth}")]
    BadIndex {
        /// The index.
        index: u64,
        /// The path length.
        depth: usize,
    },
    /// The proof is for another account than the user's own: a leaf shown to two users.
    #[error("the proof is for account {found}, not account {expected}")]
    AccountMismatch {
        /// The user's account.
        expected: u32,
        /// The account in the proof.
        found: u32,
    },
    /// Sums along the path overflow u64: no honest tree does that.
    #[error("sums along the path overflow")]
    Overflow,
    /// The path does not lead to the published root hash.
    #[error("the path does not lead to the root: the balance is not included as claimed")]
    RootMismatch,
    /// The path leads to the root hash but with another sum than the published total.
    #[error("the path sums to {computed}, the published total is {total}")]
    TotalMismatch {
        /// Σ computed.
        computed: u64,
        /// Published.
        total: u64,
    },
}

impl VerifyError {
    /// A stable code for scripts and the browser page.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::Malformed(_) => "malformed",
            VerifyError::Version(_) => "version",
            VerifyError::BadHex { .. } => "bad_hex",
            VerifyError::BadAmount { .. } => "bad_amount",
            VerifyError::BadAsset => "bad_asset",
            VerifyError::BadIndex { .. } => "bad_index",
            VerifyError::AccountMismatch { .. } => "account_mismatch",
            VerifyError::Overflow => "overflow",
            VerifyError::RootMismatch => "root_mismatch",
            VerifyError::TotalMismatch { .. } => "total_mismatch",
        }
    }
}

/// Checks `proof`: recomputes the leaf from (nonce, asset, balance), walks the path bottom-up and
/// compares with (root, total). O(path length).
pub fn verify(proof: &InclusionProof) -> Result<(), VerifyError> {
    if proof.version != FORMAT_VERSION {
        return Err(VerifyError::Version(proof.version));
    }
    if !asset_ok(&proof.asset) {
        return Err(VerifyError::BadAsset);
    }
    let depth = proof.path.len();
    if depth > MAX_DEPTH || (depth < 64 && proof.index >> depth != 0) {
        return Err(VerifyError::BadIndex {
            index: proof.index,
            depth,
        });
    }
    let mut hash = leaf_hash(
        &proof.nonce,
        Slot::Account(proof.account),
        &proof.asset,
        proof.balance,
    );
    let mut sum = proof.balance;
    for (k, sib) in proof.path.iter().enumerate() {
        let right = (proof.index >> k) & 1 == 1;
        hash = if right {
            node_hash(&sib.hash, sib.sum, &hash, sum)
        } else {
            node_hash(&hash, sum, &sib.hash, sib.sum)
        };
        sum = sum.checked_add(sib.sum).ok_or(VerifyError::Overflow)?;
    }
    if hash != proof.root {
        return Err(VerifyError::RootMismatch);
    }
    if sum != proof.total {
        return Err(VerifyError::TotalMismatch {
            computed: sum,
            total: proof.total,
        });
    }
    Ok(())
}

/// What a user runs: [`verify`], after checking that the proof is for `account`, their own
/// account id (the `uid` of `GET /api/v3/account`). Without this check the exchange could show
/// two users with equal balances the same leaf and count it once.
pub fn verify_for(proof: &InclusionProof, account: u32) -> Result<(), VerifyError> {
    if proof.account != account {
        return Err(VerifyError::AccountMismatch {
            expected: account,
            found: proof.account,
        });
    }
    verify(proof)
}

/// The digest a published proof commits to, for the proof of reserves to sign over:
/// `SHA-256("mediator-liabilities-commitment" || u64_be(proof_id) || audit_head (32 bytes, zeros
/// when none) || for each (asset, root) sorted by asset: asset || 0x00 || root_hash ||
/// u64_be(total))`.
pub fn commitment(proof_id: u64, audit_head: Option<Hash>, roots: &[(String, Node)]) -> Hash {
    let mut sorted: Vec<&(String, Node)> = roots.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    h.update(COMMIT_TAG);
    h.update(proof_id.to_be_bytes());
    h.update(audit_head.unwrap_or([0; 32]));
    for (asset, root) in sorted {
        h.update(asset.as_bytes());
        h.update([0u8]);
        h.update(root.hash);
        h.update(root.sum.to_be_bytes());
    }
    h.finalize().into()
}

// ----- the JSON form (docs/liabilities-proof.md) -----

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireStep {
    hash: String,
    sum: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireProof {
    version: u32,
    proof_id: u64,
    account: u32,
    asset: String,
    balance: String,
    nonce: String,
    index: u64,
    path: Vec<WireStep>,
    root: String,
    total: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audit_head: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created_ms: Option<u64>,
}

fn hex32(field: &str, s: &str) -> Result<Hash, VerifyError> {
    let mut out = [0u8; 32];
    if s.len() != 64 || hex::decode_to_slice(s, &mut out).is_err() {
        return Err(VerifyError::BadHex {
            field: field.to_owned(),
        });
    }
    Ok(out)
}

fn amount(field: &str, s: &str) -> Result<u64, VerifyError> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::BadAmount {
            field: field.to_owned(),
        });
    }
    s.parse().map_err(|_| VerifyError::BadAmount {
        field: field.to_owned(),
    })
}

impl InclusionProof {
    /// The JSON form: amounts as decimal strings (so JavaScript reads them exactly), hashes as
    /// lower-case hex.
    pub fn to_json(&self) -> serde_json::Value {
        let w = WireProof {
            version: self.version,
            proof_id: self.proof_id,
            account: self.account,
            asset: self.asset.clone(),
            balance: self.balance.to_string(),
            nonce: hex::encode(self.nonce),
            index: self.index,
            path: self
                .path
                .iter()
                .map(|n| WireStep {
                    hash: hex::encode(n.hash),
                    sum: n.sum.to_string(),
                })
                .collect(),
            root: hex::encode(self.root),
            total: self.total.to_string(),
            audit_head: self.audit_head.map(hex::encode),
            created_ms: self.created_ms,
        };
        serde_json::to_value(w).expect("plain struct serializes")
    }

    /// Reads the JSON form; every field is checked, unknown fields are refused.
    pub fn from_json(text: &str) -> Result<InclusionProof, VerifyError> {
        let w: WireProof =
            serde_json::from_str(text).map_err(|e| VerifyError::Malformed(e.to_string()))?;
        Self::from_wire(w)
    }

    /// As [`InclusionProof::from_json`], from an already parsed value.
    pub fn from_value(v: serde_json::Value) -> Result<InclusionProof, VerifyError> {
        let w: WireProof =
            serde_json::from_value(v).map_err(|e| VerifyError::Malformed(e.to_string()))?;
        Self::from_wire(w)
    }

    fn from_wire(w: WireProof) -> Result<InclusionProof, VerifyError> {
        if w.version != FORMAT_VERSION {
            return Err(VerifyError::Version(w.version));
        }
        if w.path.len() > MAX_DEPTH {
            return Err(VerifyError::BadIndex {
                index: w.index,
                depth: w.path.len(),
            });
        }
        let mut path = Vec::with_capacity(w.path.len());
        for (k, s) in w.path.iter().enumerate() {
            path.push(Node {
                hash: hex32(&format!("path[{k}].hash"), &s.hash)?,
                sum: amount(&format!("path[{k}].sum"), &s.sum)?,
            });
        }
        Ok(InclusionProof {
            version: w.version,
            proof_id: w.proof_id,
            account: w.account,
            asset: w.asset,
            balance: amount("balance", &w.balance)?,
            nonce: hex32("nonce", &w.nonce)?,
            index: w.index,
            path,
            root: hex32("root", &w.root)?,
            total: amount("total", &w.total)?,
            audit_head: w
                .audit_head
                .as_deref()
                .map(|h| hex32("audit_head", h))
                .transpose()?,
            created_ms: w.created_ms,
        })
    }
}
