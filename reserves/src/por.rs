//! The proof of reserves: a BIP-127 proof transaction, as a PSBT, and the published proof
//! document that binds it to a block, the liabilities roots and the audit-log head. Format:
//! `docs/proof-of-reserves.md`.
//!
//! BIP-127, as written (not as the `bdk-reserves` crate does it):
//! * input 0 is the **commitment input**: previous txid = the **single** SHA-256 of
//!   `"Proof-of-Reserves: " + message` (UTF-8; the digest bytes are the txid's bytes as
//!   serialized), vout 0, empty scriptSig and witness; its PSBT input map carries
//!   `PSBT_IN_POR_COMMITMENT` (type `0x09`, no key data) with the message;
//! * every other input spends a UTXO of the prover, signed with `SIGHASH_ALL` (so each
//!   signature commits to input 0, hence to the message);
//! * exactly one output, whose value is the sum of the other inputs (the commitment input counts
//!   as 0): no fee. The output script is a bare `OP_RETURN` (BIP-127 leaves it open; verifiers
//!   must not depend on it).
//!
//! Everything here is offline: [`verify_psbt`] checks the commitment, the output and every
//! signature against the UTXO the PSBT claims; whether those UTXOs existed unspent at the stated
//! block is the node's answer (the `mediator reserves verify` command asks it). Signing is not
//! here: private keys stay in the `wallet` crate, which fills and signs [`proof_psbt`]'s PSBT.
//!
//! Only P2WPKH reserve inputs are verified (the custody wallet is BIP84 `wpkh`); any other
//! script is refused as `unsupported_input`, never accepted unchecked.

use bitcoin::hashes::{hash160, sha256, Hash as _};
use bitcoin::psbt::{self, raw, Psbt};
use bitcoin::secp256k1::{ecdsa, Message, Secp256k1, VerifyOnly};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::transaction::Version;
use bitcoin::{
    absolute, Amount, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Txid, Witness,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// The prefix BIP-127 puts before the message.
pub const MESSAGE_PREFIX: &str = "Proof-of-Reserves: ";
/// `PSBT_IN_POR_COMMITMENT`.
pub const PSBT_IN_POR_COMMITMENT: u8 = 0x09;
/// The proof document's format version.
pub const DOCUMENT_VERSION: u32 = 1;
/// The longest message accepted (it is hashed and carried in the PSBT).
pub const MAX_MESSAGE: usize = 4096;
/// The largest proof document read (1,000 inputs are ~150 KiB of base64).
pub const MAX_DOCUMENT: usize = 64 << 20;

/// Why a proof did not verify, or could not be built or read. [`PorError::code`] is stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PorError {
    /// The document is not JSON or a field is missing or of the wrong type.
    #[error("malformed proof document: {0}")]
    Malformed(String),
    /// A document version this verifier does not know.
    #[error("unsupported proof document version {0} (this verifier reads version 1)")]
    Version(u32),
    /// The network is not one this verifier knows, or not the expected one.
    #[error("wrong network: the proof is for {found}, expected {expected}")]
    WrongNetwork {
        /// The document's network.
        found: String,
        /// The expected one.
        expected: String,
    },
    /// The PSBT is not base64 or not a PSBT.
    #[error("malformed PSBT: {0}")]
    MalformedPsbt(String),
    /// The message is empty or too long.
    #[error("bad message: {0}")]
    Message(String),
    /// Input 0 is not the commitment to the message.
    #[error("commitment input: {0}")]
    Commitment(String),
    /// Not exactly one output, or its value is not the sum of the inputs.
    #[error("outputs: {0}")]
    Outputs(String),
    /// A reserve input has no UTXO in the PSBT.
    #[error("input {0}: no witness UTXO in the PSBT")]
    MissingUtxo(usize),
    /// A reserve input spends a script this verifier does not check.
    #[error("input {0}: unsupported script (only P2WPKH reserve inputs are verified)")]
    UnsupportedInput(usize),
    /// The same outpoint twice (it would count twice).
    #[error("input {0}: outpoint {1} appears twice")]
    DuplicateInput(usize, String),
    /// A missing, malformed or wrong signature, or not SIGHASH_ALL.
    #[error("input {index}: {reason}")]
    Signature {
        /// The input.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The document's `reserves_sat` is not the sum of the inputs.
    #[error("reserves_sat {stated} is not the inputs' sum {computed}")]
    ReservesMismatch {
        /// In the document.
        stated: u64,
        /// Summed from the PSBT.
        computed: u64,
    },
    /// The reserves do not cover the BTC liabilities.
    #[error("reserves {reserves} sat are below the BTC liabilities {liabilities} sat")]
    BelowLiabilities {
        /// Proven reserves.
        reserves: u64,
        /// BTC liabilities total.
        liabilities: u64,
    },
    /// The signed message does not name the document's block, liabilities roots and totals and
    /// audit head ([`default_message`], optionally followed by a note): the signatures would
    /// not cover what the document states (another operator's proof, an old one restated).
    #[error("the signed message does not name this document's block, liabilities and audit head")]
    MessageNotBinding,
    /// No reserve input at all (nothing to prove), when building.
    #[error("no confirmed UTXO to prove")]
    NoUtxos,
    /// An amount overflowed (a dishonest or broken PSBT).
    #[error("amounts overflow")]
    Overflow,
}

impl PorError {
    /// A stable code for scripts.
    pub fn code(&self) -> &'static str {
        match self {
            PorError::Malformed(_) => "malformed",
            PorError::Version(_) => "version",
            PorError::WrongNetwork { .. } => "wrong_network",
            PorError::MalformedPsbt(_) => "malformed_psbt",
            PorError::Message(_) => "bad_message",
            PorError::Commitment(_) => "commitment_mismatch",
            PorError::Outputs(_) => "bad_outputs",
            PorError::MissingUtxo(_) => "missing_utxo",
            PorError::UnsupportedInput(_) => "unsupported_input",
            PorError::DuplicateInput(..) => "duplicate_input",
            PorError::Signature { .. } => "bad_signature",
            PorError::ReservesMismatch { .. } => "reserves_mismatch",
            PorError::BelowLiabilities { .. } => "below_liabilities",
            PorError::MessageNotBinding => "message_not_binding",
            PorError::NoUtxos => "no_utxos",
            PorError::Overflow => "overflow",
        }
    }
}

/// The longest operator's note, bytes: the binding message before it stays far within
/// [`MAX_MESSAGE`].
pub const MAX_NOTE: usize = 1024;

/// What separates an operator's note from the binding message: `<default message>; note: <note>`.
pub const NOTE_SEPARATOR: &str = "; note: ";

/// The message of a proof over `binding` ([`default_message`]) with an operator's `note`, if
/// any: the note follows the binding part, which every verifier requires.
pub fn message_with_note(binding: String, note: Option<&str>) -> String {
    match note {
        Some(n) => format!("{binding}{NOTE_SEPARATOR}{n}"),
        None => binding,
    }
}

/// The commitment input's previous txid: `SHA-256("Proof-of-Reserves: " + message)`, single.
pub fn commitment_txid(message: &str) -> Txid {
    let mut data = Vec::with_capacity(MESSAGE_PREFIX.len() + message.len());
    data.extend_from_slice(MESSAGE_PREFIX.as_bytes());
    data.extend_from_slice(message.as_bytes());
    Txid::from_byte_array(sha256::Hash::hash(&data).to_byte_array())
}

fn por_key() -> raw::Key {
    raw::Key {
        type_value: PSBT_IN_POR_COMMITMENT,
        key: Vec::new(),
    }
}

fn check_message(message: &str) -> Result<(), PorError> {
    if message.is_empty() {
        return Err(PorError::Message("empty".into()));
    }
    if message.len() > MAX_MESSAGE {
        return Err(PorError::Message(format!(
            "{} bytes, at most {MAX_MESSAGE}",
            message.len()
        )));
    }
    Ok(())
}

/// The unsigned proof PSBT over `reserves` (each outpoint with its PSBT input, as the wallet
/// fills it: witness UTXO, derivation, `SIGHASH_ALL`). Input 0 is the commitment input, already
/// final (empty scriptSig), carrying `PSBT_IN_POR_COMMITMENT`. Version 2, lock time 0, every
/// sequence final (`0xffffffff`).
pub fn proof_psbt(message: &str, reserves: Vec<(OutPoint, psbt::Input)>) -> Result<Psbt, PorError> {
    check_message(message)?;
    if reserves.is_empty() {
        return Err(PorError::NoUtxos);
    }
    let mut total = Amount::ZERO;
    let mut seen = HashSet::new();
    for (i, (op, input)) in reserves.iter().enumerate() {
        let utxo = input
            .witness_utxo
            .as_ref()
            .ok_or(PorError::MissingUtxo(i + 1))?;
        total = total.checked_add(utxo.value).ok_or(PorError::Overflow)?;
        if !seen.insert(*op) {
            return Err(PorError::DuplicateInput(i + 1, op.to_string()));
        }
    }
    let mut txins = vec![TxIn {
        previous_output: OutPoint {
            txid: commitment_txid(message),
            vout: 0,
        },
        script_sig: ScriptBuf::new(),
        sequence: Sequence::MAX,
        witness: Witness::new(),
    }];
    txins.extend(reserves.iter().map(|(op, _)| TxIn {
        previous_output: *op,
        script_sig: ScriptBuf::new(),
        sequence: Sequence::MAX,
        witness: Witness::new(),
    }));
    let tx = Transaction {
        version: Version::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: txins,
        output: vec![TxOut {
            value: total,
            script_pubkey: ScriptBuf::new_op_return([]),
        }],
    };
    let mut psbt =
        Psbt::from_unsigned_tx(tx).map_err(|e| PorError::MalformedPsbt(e.to_string()))?;
    let mut first = psbt::Input {
        final_script_sig: Some(ScriptBuf::new()),
        ..Default::default()
    };
    first.unknown.insert(por_key(), message.as_bytes().to_vec());
    psbt.inputs[0] = first;
    for (slot, (_, input)) in psbt.inputs.iter_mut().skip(1).zip(reserves) {
        *slot = input;
    }
    Ok(psbt)
}

/// What [`verify_psbt`] established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Each reserve input (index 1..) with the UTXO it claims, signature verified.
    pub inputs: Vec<(OutPoint, TxOut)>,
    /// Their sum.
    pub reserves: Amount,
}

/// Checks a finalized proof PSBT offline: the commitment input for `message`, exactly one output
/// of the inputs' sum, distinct outpoints, and each reserve input's P2WPKH signature
/// (`SIGHASH_ALL`) against the UTXO the PSBT claims for it.
pub fn verify_psbt(psbt: &Psbt, message: &str) -> Result<Checked, PorError> {
    check_message(message)?;
    let tx = &psbt.unsigned_tx;
    if tx.input.len() < 2 {
        return Err(PorError::Commitment(
            "a proof needs the commitment input and at least one reserve input".into(),
        ));
    }
    if psbt.inputs.len() != tx.input.len() {
        return Err(PorError::MalformedPsbt(
            "input maps do not match the inputs".into(),
        ));
    }
    // Input 0: the commitment.
    let c = &tx.input[0];
    let want = commitment_txid(message);
    if c.previous_output.txid != want || c.previous_output.vout != 0 {
        return Err(PorError::Commitment(format!(
            "spends {} but the message commits to {want}:0",
            c.previous_output
        )));
    }
    let p0 = &psbt.inputs[0];
    if p0.final_script_sig.as_ref().is_some_and(|s| !s.is_empty())
        || p0
            .final_script_witness
            .as_ref()
            .is_some_and(|w| !w.is_empty())
    {
        return Err(PorError::Commitment(
            "scriptSig or witness not empty".into(),
        ));
    }
    match p0.unknown.get(&por_key()) {
        Some(v) if v.as_slice() == message.as_bytes() => {}
        Some(_) => {
            return Err(PorError::Commitment(
                "PSBT_IN_POR_COMMITMENT is not the message".into(),
            ))
        }
        None => {
            return Err(PorError::Commitment(
                "no PSBT_IN_POR_COMMITMENT (0x09) field".into(),
            ))
        }
    }
    if tx.output.len() != 1 {
        return Err(PorError::Outputs(format!(
            "{} outputs, a proof has exactly one",
            tx.output.len()
        )));
    }
    // The reserve inputs.
    let secp = Secp256k1::verification_only();
    let mut cache = SighashCache::new(tx);
    let mut seen = HashSet::new();
    let mut inputs = Vec::with_capacity(tx.input.len() - 1);
    let mut total = Amount::ZERO;
    for (i, (txin, pin)) in tx.input.iter().zip(&psbt.inputs).enumerate().skip(1) {
        if txin.previous_output.txid == want {
            return Err(PorError::Commitment(format!(
                "input {i} also spends the commitment"
            )));
        }
        if !seen.insert(txin.previous_output) {
            return Err(PorError::DuplicateInput(
                i,
                txin.previous_output.to_string(),
            ));
        }
        let utxo = pin.witness_utxo.as_ref().ok_or(PorError::MissingUtxo(i))?;
        if let Some(full) = &pin.non_witness_utxo {
            let claimed = full.output.get(txin.previous_output.vout as usize);
            if full.compute_txid() != txin.previous_output.txid || claimed != Some(utxo) {
                return Err(PorError::MissingUtxo(i));
            }
        }
        verify_p2wpkh(&secp, &mut cache, i, txin, pin, utxo)?;
        total = total.checked_add(utxo.value).ok_or(PorError::Overflow)?;
        inputs.push((txin.previous_output, utxo.clone()));
    }
    if tx.output[0].value != total {
        return Err(PorError::Outputs(format!(
            "the output pays {} sat, the inputs sum to {} sat",
            tx.output[0].value.to_sat(),
            total.to_sat()
        )));
    }
    Ok(Checked {
        inputs,
        reserves: total,
    })
}

fn verify_p2wpkh(
    secp: &Secp256k1<VerifyOnly>,
    cache: &mut SighashCache<&Transaction>,
    i: usize,
    txin: &TxIn,
    pin: &psbt::Input,
    utxo: &TxOut,
) -> Result<(), PorError> {
    let bad = |reason: &str| PorError::Signature {
        index: i,
        reason: reason.to_owned(),
    };
    if !utxo.script_pubkey.is_p2wpkh() {
        return Err(PorError::UnsupportedInput(i));
    }
    if pin.final_script_sig.as_ref().is_some_and(|s| !s.is_empty()) || !txin.script_sig.is_empty() {
        return Err(bad("a P2WPKH input has a non-empty scriptSig"));
    }
    let witness = pin
        .final_script_witness
        .as_ref()
        .ok_or_else(|| bad("not finalized (no witness)"))?;
    if witness.len() != 2 {
        return Err(bad("a P2WPKH witness has two items"));
    }
    let (sig, pk) = (&witness[0], &witness[1]);
    let pubkey = bitcoin::PublicKey::from_slice(pk).map_err(|_| bad("malformed public key"))?;
    if !pubkey.compressed
        || utxo.script_pubkey.as_bytes()[2..] != hash160::Hash::hash(pk).to_byte_array()[..]
    {
        return Err(bad("the public key does not match the UTXO's script"));
    }
    let sig = bitcoin::ecdsa::Signature::from_slice(sig).map_err(|_| bad("malformed signature"))?;
    if sig.sighash_type != EcdsaSighashType::All {
        return Err(bad("the signature is not SIGHASH_ALL"));
    }
    let hash = cache
        .p2wpkh_signature_hash(i, &utxo.script_pubkey, utxo.value, EcdsaSighashType::All)
        .map_err(|e| bad(&e.to_string()))?;
    let msg = Message::from_digest(hash.to_byte_array());
    let s: ecdsa::Signature = sig.signature;
    secp.verify_ecdsa(&msg, &s, &pubkey.inner)
        .map_err(|_| bad("the signature does not verify (another message, or another UTXO)"))
}

/// One asset's liabilities in the proof document (as in `GET /mapi/v1/reserves/my-proof`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssetLiabilities {
    /// The tree's root hash, hex.
    pub root: String,
    /// The root sum, base units, a decimal string.
    pub total: String,
    /// The tree's width (leaves, padding included).
    pub leaves: u64,
}

/// The published proof of reserves (`docs/proof-of-reserves.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofDocument {
    /// [`DOCUMENT_VERSION`].
    pub version: u32,
    /// `bitcoin`, `testnet`, `signet` or `regtest`.
    pub network: String,
    /// The BIP-127 message.
    pub message: String,
    /// The block the UTXOs are proven unspent at, hex.
    pub block_hash: String,
    /// Its height.
    pub block_height: u32,
    /// The finalized proof PSBT, base64.
    pub psbt: String,
    /// The proven reserves, satoshis (the PSBT's inputs' sum).
    pub reserves_sat: u64,
    /// The liabilities proof the roots come from (users' `my-proof` answers name it).
    pub liabilities_proof_id: u64,
    /// Per asset, the liabilities tree's root.
    pub liabilities: BTreeMap<String, AssetLiabilities>,
    /// The audit log's head when the proof was made, hex.
    pub audit_head: String,
    /// When it was made, ms since the Unix epoch.
    pub created: u64,
    /// The Lightning node's balances when it was made, as the node reports them: **not
    /// proven** (channel funds cannot be proven by BIP-127, and the node's on-chain wallet is not
    /// among the PSBT's inputs), not part of `reserves_sat`. Absent without a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lightning_unproven: Option<LightningUnproven>,
}

/// The Lightning balances a [`ProofDocument`] reports apart, unproven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LightningUnproven {
    /// The node's on-chain wallet, satoshis.
    pub onchain_sat: u64,
    /// Our side of its channels, satoshis.
    pub channels_sat: u64,
    /// Closed channels' funds still being swept, satoshis.
    pub pending_close_sat: u64,
}

/// A serialized PSBT in base64 (the document's `psbt` field).
pub fn psbt_base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The message [`ProofDocument`]s carry by default: it names the block, every liabilities root
/// and total, and the audit head, so one signature binds all three.
pub fn default_message(
    block_height: u32,
    block_hash: &str,
    liabilities_proof_id: u64,
    liabilities: &BTreeMap<String, AssetLiabilities>,
    audit_head: &str,
) -> String {
    let roots: Vec<String> = liabilities
        .iter()
        .map(|(asset, l)| format!("{asset} {} {}", l.root, l.total))
        .collect();
    format!(
        "Mediator reserves at block {block_height} {block_hash}; liabilities {liabilities_proof_id}: {}; audit head {audit_head}",
        roots.join(", ")
    )
}

impl ProofDocument {
    /// Reads a document (bounded; any error is [`PorError::Malformed`] or [`PorError::Version`]).
    pub fn from_json(text: &str) -> Result<ProofDocument, PorError> {
        if text.len() > MAX_DOCUMENT {
            return Err(PorError::Malformed(format!(
                "larger than {MAX_DOCUMENT} bytes"
            )));
        }
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| PorError::Malformed(e.to_string()))?;
        if let Some(n) = v.get("version").and_then(|x| x.as_u64()) {
            if n != u64::from(DOCUMENT_VERSION) {
                return Err(PorError::Version(u32::try_from(n).unwrap_or(u32::MAX)));
            }
        }
        serde_json::from_value(v).map_err(|e| PorError::Malformed(e.to_string()))
    }

    /// The network, parsed.
    pub fn network(&self) -> Result<bitcoin::Network, PorError> {
        self.network
            .parse::<bitcoin::Network>()
            .map_err(|_| PorError::WrongNetwork {
                found: self.network.clone(),
                expected: "bitcoin, testnet, testnet4, signet or regtest".into(),
            })
    }

    /// The PSBT, decoded.
    pub fn decode_psbt(&self) -> Result<Psbt, PorError> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(self.psbt.trim())
            .map_err(|e| PorError::MalformedPsbt(format!("not base64: {e}")))?;
        Psbt::deserialize(&bytes).map_err(|e| PorError::MalformedPsbt(e.to_string()))
    }

    /// True when the message is [`default_message`] of this document's fields, alone or
    /// followed by an operator's note ([`message_with_note`]): it binds the block, the
    /// liabilities and the audit head. Required by [`verify_document`].
    pub fn message_binds(&self) -> bool {
        let binding = default_message(
            self.block_height,
            &self.block_hash,
            self.liabilities_proof_id,
            &self.liabilities,
            &self.audit_head,
        );
        match self.message.strip_prefix(&binding) {
            Some(rest) => rest.is_empty() || rest.starts_with(NOTE_SEPARATOR),
            None => false,
        }
    }

    /// The BTC liabilities total.
    pub fn btc_liabilities(&self) -> Result<u64, PorError> {
        let l = self
            .liabilities
            .get("BTC")
            .ok_or_else(|| PorError::Malformed("no BTC liabilities".into()))?;
        l.total
            .parse()
            .map_err(|_| PorError::Malformed("liabilities.BTC.total is not a decimal u64".into()))
    }
}

/// What [`verify_document`] established offline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentReport {
    /// The PSBT checks.
    pub checked: Checked,
    /// The network.
    pub network: bitcoin::Network,
    /// The block hash, parsed.
    pub block_hash: bitcoin::BlockHash,
    /// Whether the message binds the block, liabilities and audit head.
    pub message_binds: bool,
    /// The BTC liabilities total.
    pub btc_liabilities: u64,
}

/// Everything a verifier checks without a node: the document's fields, the PSBT
/// ([`verify_psbt`]), that `reserves_sat` is the inputs' sum and covers the BTC liabilities.
/// `expected_network`, when given, must be the document's.
pub fn verify_document(
    doc: &ProofDocument,
    expected_network: Option<bitcoin::Network>,
) -> Result<DocumentReport, PorError> {
    if doc.version != DOCUMENT_VERSION {
        return Err(PorError::Version(doc.version));
    }
    let network = doc.network()?;
    if let Some(want) = expected_network {
        if want != network {
            return Err(PorError::WrongNetwork {
                found: network.to_string(),
                expected: want.to_string(),
            });
        }
    }
    let block_hash: bitcoin::BlockHash = doc
        .block_hash
        .parse()
        .map_err(|_| PorError::Malformed("block_hash is not 64 hex digits".into()))?;
    for (asset, l) in &doc.liabilities {
        // An asset symbol as the liabilities trees take it, and nothing that could read as
        // another part of the binding message (a space, `,` or `;`).
        if !crate::liabilities::asset_symbol_ok(asset) {
            return Err(PorError::Malformed(format!(
                "liabilities key {asset:?} is not an asset symbol"
            )));
        }
        let mut h = [0u8; 32];
        hex::decode_to_slice(&l.root, &mut h).map_err(|_| {
            PorError::Malformed(format!("liabilities.{asset}.root is not 64 hex digits"))
        })?;
        l.total.parse::<u64>().map_err(|_| {
            PorError::Malformed(format!("liabilities.{asset}.total is not a decimal u64"))
        })?;
    }
    let mut h = [0u8; 32];
    hex::decode_to_slice(&doc.audit_head, &mut h)
        .map_err(|_| PorError::Malformed("audit_head is not 64 hex digits".into()))?;
    let btc_liabilities = doc.btc_liabilities()?;
    let psbt = doc.decode_psbt()?;
    let checked = verify_psbt(&psbt, &doc.message)?;
    let computed = checked.reserves.to_sat();
    if computed != doc.reserves_sat {
        return Err(PorError::ReservesMismatch {
            stated: doc.reserves_sat,
            computed,
        });
    }
    if computed < btc_liabilities {
        return Err(PorError::BelowLiabilities {
            reserves: computed,
            liabilities: btc_liabilities,
        });
    }
    // The signatures cover the message only: unless it names this document's block, roots,
    // totals and audit head, they say nothing of them (another operator's proof, or an old
    // one, could be restated with any liabilities).
    if !doc.message_binds() {
        return Err(PorError::MessageNotBinding);
    }
    Ok(DocumentReport {
        checked,
        network,
        block_hash,
        message_binds: true,
        btc_liabilities,
    })
}
