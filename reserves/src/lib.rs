//! Mediator's verifiable custody, the parts that need no network: the per-asset liabilities
//! Merkle-sum tree with per-user inclusion proofs ([`liabilities`]) and the tamper-evident,
//! hash-chained audit log ([`auditlog`]).
//!
//! **Architecture invariants:**
//! * No network, no clock: time comes in as an argument; the only I/O is the audit log's own
//!   file (append + fsync, read to verify), so the server, the CLI and third-party verifiers all
//!   run the same code.
//! * The formats are specified byte for byte in `docs/liabilities-proof.md` and
//!   `docs/audit-log.md`; a change to a hash input is a new format version.
//! * Verification never panics on input: truncated, malformed or dishonest files are an error
//!   value with a stable code.
//! * A published proof binds its liabilities roots and the audit-log head in one
//!   [`liabilities::commitment`] digest; the proof of reserves ([`por`], a BIP-127 PSBT) signs a
//!   message that names the block, every root and the audit head.
//! * [`por`] builds the unsigned proof and verifies a signed one; it never holds a private key
//!   (the `wallet` crate signs).

#![warn(missing_docs)]

pub mod auditlog;
pub mod liabilities;
pub mod por;

pub use auditlog::{AuditLog, Entry as AuditEntry, VerifyReport as AuditReport};
pub use liabilities::{InclusionProof, Tree};
