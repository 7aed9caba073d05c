//! The tamper-evident audit log: an append-only file of JSON lines, each entry carrying the
//! SHA-256 of the line before it. Format: `docs/audit-log.md`.
//!
//! * An entry is one line `{"seq":N,"time":MS,"actor":"..","action":"..","params":{..},
//!   "prev":"<64 hex>"}` + `\n`; `seq` starts at 1 and goes up by one; `prev` is the SHA-256 of
//!   the previous line's bytes (without its `\n`), 64 zeros for the first. The **head** is the
//!   SHA-256 of the last line (64 zeros for an empty log).
//! * **Durability:** [`AuditLog::append`] returns after `write` + `fsync` of the line: the
//!   caller replies to the action only after that.
//! * **Breaks:** [`verify`] walks every line and reports each line whose `prev` or `seq` does
//!   not follow, that does not parse, or a torn last line. A changed entry breaks the next line's
//!   `prev`; a removed entry breaks `seq` and `prev`. Removing entries at the *end* leaves a
//!   valid shorter chain: that is what the head in every published proof is for.
//! * **Override:** a break is *acknowledged* by a later `audit.override` entry whose
//!   `params.break_lines` names its line; start-up with the operator's explicit override appends
//!   that entry, so the override is itself in the chain.
//! * **No secrets:** [`AuditLog::append`] refuses params with a key that names a secret.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A 32-byte SHA-256 digest.
pub type Hash = [u8; 32];

/// The action of the entry that acknowledges breaks.
pub const OVERRIDE_ACTION: &str = "audit.override";

/// The longest line [`verify`] reads (bytes); a longer one is a break, not an allocation spiral.
pub const MAX_LINE: usize = 64 * 1024;

/// The longest params kept verbatim (bytes of JSON); longer ones are summarized by
/// [`AuditLog::append`]. Leaves room in [`MAX_LINE`] for the other fields.
pub const MAX_PARAMS: usize = 32 * 1024;

/// Key fragments that may never appear in params (case-insensitive).
const SECRET_KEYS: &[&str] = &[
    "secret",
    "password",
    "master_key",
    "mnemonic",
    "xprv",
    "seed",
];

/// One entry, as read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// 1, 2, 3, ...
    pub seq: u64,
    /// Milliseconds since the Unix epoch (the writer's clock).
    pub time: u64,
    /// Who: `admin`, `operator`, `system`, or `key:<id>`.
    pub actor: String,
    /// What, e.g. `account.create`.
    pub action: String,
    /// The action's parameters (never a secret).
    pub params: serde_json::Value,
    /// SHA-256 of the previous line, hex.
    pub prev: String,
}

/// What is wrong with one line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum BreakKind {
    /// Not an entry (bad JSON, a missing field, too long).
    Malformed {
        /// The parser's message.
        error: String,
    },
    /// `seq` is not the previous `seq` + 1.
    SeqGap {
        /// Expected.
        expected: u64,
        /// Found.
        found: u64,
    },
    /// `prev` is not the SHA-256 of the previous line.
    PrevMismatch {
        /// The line's seq.
        seq: u64,
    },
    /// The last line has no final newline: a write that never completed.
    Torn,
}

/// A break in the chain at a line (1-based).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Break {
    /// 1-based line number.
    pub line: u64,
    /// What.
    #[serde(flatten)]
    pub kind: BreakKind,
    /// True when a later `audit.override` entry names this line.
    pub acknowledged: bool,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: ", self.line)?;
        match &self.kind {
            BreakKind::Malformed { error } => write!(f, "not an audit entry ({error})"),
            BreakKind::SeqGap { expected, found } => {
                write!(f, "seq {found} where {expected} was expected (an entry was removed or inserted)")
            }
            BreakKind::PrevMismatch { seq } => write!(
                f,
                "entry {seq} does not carry the hash of the line before it (that line was changed, or entries were removed)"
            ),
            BreakKind::Torn => write!(f, "torn last line (a write that never completed)"),
        }?;
        if self.acknowledged {
            write!(f, " [acknowledged by an operator override]")?;
        }
        Ok(())
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Lines read.
    pub lines: u64,
    /// The last entry's seq (0 for an empty log).
    pub last_seq: u64,
    /// SHA-256 of the last line, hex (zeros for an empty log).
    #[serde(serialize_with = "ser_hex")]
    pub head: Hash,
    /// Every break, acknowledged or not.
    pub breaks: Vec<Break>,
    /// True when the last line is torn (no final newline).
    pub torn: bool,
}

fn ser_hex<S: serde::Serializer>(h: &Hash, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(h))
}

impl VerifyReport {
    /// True when every break is acknowledged.
    pub fn ok(&self) -> bool {
        self.breaks.iter().all(|b| b.acknowledged)
    }

    /// The breaks no override acknowledged.
    pub fn unacknowledged(&self) -> impl Iterator<Item = &Break> {
        self.breaks.iter().filter(|b| !b.acknowledged)
    }
}

#[derive(Deserialize)]
struct LineHead {
    seq: u64,
    #[allow(dead_code)]
    time: u64,
    #[allow(dead_code)]
    actor: serde::de::IgnoredAny,
    action: String,
    params: serde_json::Value,
    prev: String,
}

/// The SHA-256 of one line's bytes (without its newline).
pub fn line_hash(line: &[u8]) -> Hash {
    Sha256::digest(line).into()
}

/// Walks a whole log from `r` and reports every break. Reads line by line (bounded by
/// [`MAX_LINE`]); an I/O error is the only `Err`.
pub fn verify<R: BufRead>(mut r: R) -> io::Result<VerifyReport> {
    let mut rep = VerifyReport {
        lines: 0,
        last_seq: 0,
        head: [0; 32],
        breaks: Vec::new(),
        torn: false,
    };
    let mut prev_hash = [0u8; 32];
    let mut buf = Vec::with_capacity(512);
    let mut acks: Vec<u64> = Vec::new();
    loop {
        buf.clear();
        let n = r
            .by_ref()
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        rep.lines += 1;
        let line_no = rep.lines;
        let complete = buf.last() == Some(&b'\n');
        if complete {
            buf.pop();
        } else if buf.len() > MAX_LINE {
            // Skip the rest of the over-long line.
            let mut sink = Vec::new();
            loop {
                sink.clear();
                let m = r
                    .by_ref()
                    .take(MAX_LINE as u64)
                    .read_until(b'\n', &mut sink)?;
                if m == 0 || sink.last() == Some(&b'\n') {
                    break;
                }
            }
            rep.breaks.push(Break {
                line: line_no,
                kind: BreakKind::Malformed {
                    error: format!("line longer than {MAX_LINE} bytes"),
                },
                acknowledged: false,
            });
            prev_hash = line_hash(&buf);
            continue;
        } else {
            rep.torn = true;
            rep.breaks.push(Break {
                line: line_no,
                kind: BreakKind::Torn,
                acknowledged: false,
            });
            prev_hash = line_hash(&buf);
            break;
        }
        let this_hash = line_hash(&buf);
        match serde_json::from_slice::<LineHead>(&buf) {
            Err(e) => rep.breaks.push(Break {
                line: line_no,
                kind: BreakKind::Malformed {
                    error: e.to_string(),
                },
                acknowledged: false,
            }),
            Ok(e) => {
                let expected = rep.last_seq + 1;
                let kind = if e.seq != expected {
                    Some(BreakKind::SeqGap {
                        expected,
                        found: e.seq,
                    })
                } else if !hex_eq(&e.prev, &prev_hash) {
                    Some(BreakKind::PrevMismatch { seq: e.seq })
                } else {
                    None
                };
                if let Some(kind) = kind {
                    rep.breaks.push(Break {
                        line: line_no,
                        kind,
                        acknowledged: false,
                    });
                }
                rep.last_seq = e.seq;
                if e.action == OVERRIDE_ACTION {
                    if let Some(lines) = e.params.get("break_lines").and_then(|v| v.as_array()) {
                        acks.extend(
                            lines
                                .iter()
                                .filter_map(|v| v.as_u64())
                                .filter(|&l| l < line_no),
                        );
                    }
                }
            }
        }
        prev_hash = this_hash;
    }
    rep.head = prev_hash;
    for b in &mut rep.breaks {
        b.acknowledged = acks.contains(&b.line);
    }
    Ok(rep)
}

/// Constant-time comparison of a hex field with a hash (the field is public, but it costs
/// nothing).
fn hex_eq(field: &str, h: &Hash) -> bool {
    let mut out = [0u8; 32];
    if field.len() != 64 || hex::decode_to_slice(field, &mut out).is_err() {
        return false;
    }
    out.iter().zip(h).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Verifies the file at `path` (a missing file is an empty log).
pub fn verify_file(path: &Path) -> io::Result<VerifyReport> {
    match File::open(path) {
        Ok(f) => verify(BufReader::with_capacity(1 << 16, f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => verify(io::empty()),
        Err(e) => Err(e),
    }
}

/// The last `n` entries that parse (lines that do not are skipped; `verify` reports them).
pub fn tail(path: &Path, n: usize) -> io::Result<Vec<Entry>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = std::collections::VecDeque::with_capacity(n.min(4096));
    for line in BufReader::new(f).split(b'\n') {
        let line = line?;
        if let Ok(e) = serde_json::from_slice::<Entry>(&line) {
            if out.len() == n {
                out.pop_front();
            }
            if n > 0 {
                out.push_back(e);
            }
        }
    }
    Ok(out.into())
}

/// Why the log could not be opened or appended to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// Reading or writing the file failed.
    #[error("audit log {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The chain is broken and no override was given.
    #[error(
        "audit log {path} is broken: {first} ({count} unacknowledged break(s)); run \
         `mediator audit verify` to see them all; to start anyway (the override is logged), \
         pass --audit-override"
    )]
    Broken {
        /// The file.
        path: PathBuf,
        /// The first unacknowledged break.
        first: Break,
        /// How many.
        count: usize,
    },
    /// The params hold a key that names a secret.
    #[error("audit params may not hold a secret (key {key:?})")]
    SecretInParams {
        /// The key.
        key: String,
    },
}

#[derive(Debug)]
struct Inner {
    file: File,
    last_seq: u64,
    head: Hash,
}

/// The open log: appends are serialized and durable (fsync) before they return.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    inner: Mutex<Inner>,
}

fn find_secret(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::Object(m) => m.iter().find_map(|(k, v)| {
            let lk = k.to_ascii_lowercase();
            if SECRET_KEYS.iter().any(|s| lk.contains(s)) {
                Some(k.clone())
            } else {
                find_secret(v)
            }
        }),
        serde_json::Value::Array(a) => a.iter().find_map(find_secret),
        _ => None,
    }
}

impl AuditLog {
    /// Opens (or creates) the log at `path` and verifies the whole chain. A broken chain is
    /// refused unless `allow_broken`; then an `audit.override` entry acknowledging every break is
    /// appended (by `actor`, at `now_ms`) before this returns, so the override is in the chain.
    pub fn open(
        path: &Path,
        allow_broken: bool,
        actor: &str,
        now_ms: u64,
    ) -> Result<AuditLog, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        let rep = verify_file(path).map_err(io)?;
        let unack: Vec<Break> = rep.unacknowledged().cloned().collect();
        if !unack.is_empty() && !allow_broken {
            return Err(AuditError::Broken {
                path: path.to_owned(),
                first: unack[0].clone(),
                count: unack.len(),
            });
        }
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        if !existed {
            file.sync_all().map_err(io)?;
            if let Some(dir) = path.parent() {
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
        }
        let head = rep.head;
        if rep.torn {
            // End the torn line so the override starts on its own line; the torn line's bytes
            // (now complete) are what the override's `prev` hashes: unchanged.
            file.write_all(b"\n")
                .and_then(|()| file.sync_data())
                .map_err(io)?;
        }
        let log = AuditLog {
            path: path.to_owned(),
            inner: Mutex::new(Inner {
                file,
                last_seq: rep.last_seq,
                head,
            }),
        };
        if !unack.is_empty() {
            let lines: Vec<u64> = unack.iter().map(|b| b.line).collect();
            let errors: Vec<String> = unack.iter().map(|b| b.to_string()).collect();
            log.append(
                now_ms,
                actor,
                OVERRIDE_ACTION,
                serde_json::json!({ "break_lines": lines, "breaks": errors }),
            )?;
        }
        Ok(log)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (last seq, head hash).
    pub fn head(&self) -> (u64, Hash) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (g.last_seq, g.head)
    }

    /// Appends one entry and returns (its seq, the new head) once it is on disk (fsync). Refuses
    /// params holding a key that names a secret. On a write error nothing is counted: the next
    /// append's `prev` still names the last durable line.
    pub fn append(
        &self,
        now_ms: u64,
        actor: &str,
        action: &str,
        params: serde_json::Value,
    ) -> Result<(u64, Hash), AuditError> {
        if let Some(key) = find_secret(&params) {
            return Err(AuditError::SecretInParams { key });
        }
        // Bounded: params too long for one line (e.g. a reconciliation of every record) are
        // replaced by their size and SHA-256, so a reader can still check a kept copy.
        let raw = serde_json::to_vec(&params).expect("a JSON value serializes");
        let params = if raw.len() > MAX_PARAMS {
            serde_json::json!({
                "summarized": true,
                "bytes": raw.len(),
                "sha256": hex::encode(Sha256::digest(&raw)),
            })
        } else {
            params
        };
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let entry = Entry {
            seq: g.last_seq + 1,
            time: now_ms,
            actor: actor.to_owned(),
            action: action.to_owned(),
            params,
            prev: hex::encode(g.head),
        };
        let mut line = serde_json::to_vec(&entry).expect("an entry serializes");
        let hash = line_hash(&line);
        line.push(b'\n');
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let len = g.file.metadata().map_err(io)?.len();
        if let Err(e) = g.file.write_all(&line).and_then(|()| g.file.sync_data()) {
            // Cut a partial line so the next append starts on a line of its own.
            let _ = g.file.set_len(len);
            return Err(io(e));
        }
        g.last_seq = entry.seq;
        g.head = hash;
        Ok((entry.seq, hash))
    }
}

/// Renders one entry as a line for people: `seq time actor action params`.
pub fn render(e: &Entry) -> String {
    format!(
        "{:>8} {} {:<12} {:<28} {}",
        e.seq, e.time, e.actor, e.action, e.params
    )
}

/// Builds the exact bytes of an entry line (without the newline), for tests and benches that
/// produce logs in memory.
pub fn entry_line(
    seq: u64,
    time: u64,
    actor: &str,
    action: &str,
    params: serde_json::Value,
    prev: &Hash,
) -> Vec<u8> {
    let e = Entry {
        seq,
        time,
        actor: actor.to_owned(),
        action: action.to_owned(),
        params,
        prev: hex::encode(prev),
    };
    serde_json::to_vec(&e).expect("an entry serializes")
}
