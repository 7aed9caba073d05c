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
//! * **Intents:** an action that cannot be undone (a withdrawal approved, a proof published) is
//!   logged *before* it is taken, as an intent entry `<action>.intent` ([`AuditLog::intent`]),
//!   and after it as the outcome entry `<action>` whose `params.intent` names the intent's seq
//!   and `params.outcome` says `done`, `refused` or `unknown` ([`AuditLog::outcome`]). A crash
//!   between the two leaves an intent without outcome: [`verify`] lists it
//!   ([`VerifyReport::open_intents`]), so the record of an action that may have happened is
//!   never lost.

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

/// The suffix of an intent entry's action: `withdrawal.approve.intent`.
pub const INTENT_SUFFIX: &str = ".intent";

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

/// An intent entry no later entry gives an outcome for: the action may or may not have been
/// taken (the writer stopped in between, or it is still under way).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenIntent {
    /// 1-based line number.
    pub line: u64,
    /// The intent's seq (what an outcome's `params.intent` names).
    pub seq: u64,
    /// The action announced, without the [`INTENT_SUFFIX`].
    pub action: String,
}

impl std::fmt::Display for OpenIntent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}: intent {} ({}) has no outcome: the action may have been taken; check it",
            self.line, self.seq, self.action
        )
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
    /// Intents without an outcome, oldest first (not breaks: the chain is intact).
    pub open_intents: Vec<OpenIntent>,
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
        open_intents: Vec::new(),
    };
    let mut open: std::collections::BTreeMap<u64, OpenIntent> = Default::default();
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
                // Checked: a line at `u64::MAX` has no next (review: the sum overflowed, a
                // panic in a debug build and a wrap to 0 in a release one).
                let expected = rep.last_seq.checked_add(1);
                let kind = if expected != Some(e.seq) {
                    Some(BreakKind::SeqGap {
                        expected: expected.unwrap_or(u64::MAX),
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
                if let Some(of) = e.params.get("intent").and_then(|v| v.as_u64()) {
                    open.remove(&of);
                }
                if let Some(action) = e.action.strip_suffix(INTENT_SUFFIX) {
                    open.insert(
                        e.seq,
                        OpenIntent {
                            line: line_no,
                            seq: e.seq,
                            action: action.to_owned(),
                        },
                    );
                }
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
    rep.open_intents = open.into_values().collect();
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

/// The `params` key of an `audit.override` entry that acknowledges published audit heads the
/// log no longer holds (hex strings): see [`missing_heads`].
pub const MISSING_HEADS_KEY: &str = "missing_heads";

/// Which of `heads` the log at `path` does not hold: no line hashes to it and no
/// `audit.override` entry names it under [`MISSING_HEADS_KEY`]. A head a published proof names
/// and the log lacks means the log was cut back (or rewritten) after that proof: a shorter log
/// is a valid chain, so [`verify`] cannot see it. One pass; lines are bounded by [`MAX_LINE`]
/// (a longer one is skipped: it is no entry). A missing file holds nothing.
pub fn missing_heads(path: &Path, heads: &[Hash]) -> io::Result<Vec<Hash>> {
    let mut left: Vec<Hash> = heads.to_vec();
    left.sort_unstable();
    left.dedup();
    let mut r = match File::open(path) {
        Ok(f) => BufReader::with_capacity(1 << 16, f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(left),
        Err(e) => return Err(e),
    };
    let mut buf = Vec::with_capacity(512);
    while !left.is_empty() {
        match read_line(&mut r, &mut buf)? {
            None => break,
            // A longer line is no entry; a torn last line is checked like any other.
            Some((_, Line::TooLong)) => continue,
            Some((_, Line::Complete | Line::Torn)) => {}
        }
        let h = line_hash(&buf);
        left.retain(|x| *x != h);
        if let Ok(e) = serde_json::from_slice::<LineHead>(&buf) {
            if e.action == OVERRIDE_ACTION {
                if let Some(named) = e.params.get(MISSING_HEADS_KEY).and_then(|v| v.as_array()) {
                    left.retain(|x| {
                        !named
                            .iter()
                            .any(|v| v.as_str().is_some_and(|s| hex_eq(s, x)))
                    });
                }
            }
        }
    }
    Ok(left)
}

/// How a line read by [`read_line`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// With its newline (dropped from the buffer).
    Complete,
    /// Longer than [`MAX_LINE`]: read to its end, its first bytes kept.
    TooLong,
    /// The file's last bytes, with no newline after them.
    Torn,
}

/// Reads the next line of `r` into `buf` (cleared first; without its newline), keeping at most
/// [`MAX_LINE`] + 1 bytes of it: a damaged or hostile file cannot make a reader allocate
/// without bound. The bytes the line took in the file (its newline included), and how it ended;
/// `None` at the end of the file.
fn read_line<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<Option<(u64, Line)>> {
    buf.clear();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', buf)? as u64;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Some((n, Line::Complete)));
    }
    if buf.len() <= MAX_LINE {
        return Ok(Some((n, Line::Torn)));
    }
    // Skip the rest of the long line in the reader's own buffer: no allocation.
    let mut taken = n;
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return Ok(Some((taken, Line::TooLong)));
        }
        match avail.iter().position(|b| *b == b'\n') {
            Some(i) => {
                r.consume(i + 1);
                return Ok(Some((taken + i as u64 + 1, Line::TooLong)));
            }
            None => {
                let len = avail.len();
                r.consume(len);
                taken += len as u64;
            }
        }
    }
}

/// The last `n` entries that parse (lines that do not are skipped; `verify` reports them).
/// Lines are bounded by [`MAX_LINE`] (a longer one is no entry).
pub fn tail(path: &Path, n: usize) -> io::Result<Vec<Entry>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut r = BufReader::with_capacity(1 << 16, f);
    let mut out = std::collections::VecDeque::with_capacity(n.min(4096));
    let mut buf = Vec::with_capacity(512);
    while let Some((_, end)) = read_line(&mut r, &mut buf)? {
        if end == Line::TooLong {
            continue;
        }
        if let Ok(e) = serde_json::from_slice::<Entry>(&buf) {
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

/// The 1-based line of the log at `path` whose SHA-256 is `head`, if any, and the byte offset
/// just past it (its newline included): where a published proof's audit head is.
pub fn head_line(path: &Path, head: &Hash) -> io::Result<Option<(u64, u64)>> {
    let mut r = BufReader::with_capacity(1 << 16, File::open(path)?);
    let (mut n, mut end) = (0u64, 0u64);
    let mut buf = Vec::with_capacity(512);
    while let Some((taken, kind)) = read_line(&mut r, &mut buf)? {
        n += 1;
        end += taken;
        // A head is a whole entry: never a torn or over-long line.
        if kind == Line::Complete && line_hash(&buf) == *head {
            return Ok(Some((n, end)));
        }
    }
    Ok(None)
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
    /// Fault injection ([`AuditLog::fail_appends_after`]): appends left before every append
    /// fails.
    fail_after: Option<u64>,
}

/// The open log: appends are serialized and durable (fsync) before they return.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    inner: Mutex<Inner>,
    open_at_start: Vec<OpenIntent>,
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
            open_at_start: rep.open_intents.clone(),
            path: path.to_owned(),
            inner: Mutex::new(Inner {
                file,
                last_seq: rep.last_seq,
                head,
                fail_after: None,
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

    /// The intents without outcome found when the log was opened: actions that may have been
    /// taken before a crash, for the operator to check.
    pub fn open_intents_at_start(&self) -> &[OpenIntent] {
        &self.open_at_start
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
            let mut summary = serde_json::json!({
                "summarized": true,
                "bytes": raw.len(),
                "sha256": hex::encode(Sha256::digest(&raw)),
            });
            // An outcome stays linked to its intent.
            for k in ["intent", "outcome"] {
                if let Some(v) = params.get(k).filter(|v| !v.is_object() && !v.is_array()) {
                    summary[k] = v.clone();
                }
            }
            summary
        } else {
            params
        };
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(left) = g.fail_after.as_mut() {
            if *left == 0 {
                return Err(AuditError::Io {
                    path: self.path.clone(),
                    source: io::Error::other("injected failure (AuditLog::fail_appends_after)"),
                });
            }
            *left -= 1;
        }
        let Some(seq) = g.last_seq.checked_add(1) else {
            return Err(AuditError::Io {
                path: self.path.clone(),
                source: io::Error::other("the audit log's sequence numbers are used up"),
            });
        };
        let entry = Entry {
            seq,
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

/// How an announced action ended (the outcome entry's `params.outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// It was taken.
    Done,
    /// It was refused: nothing changed.
    Refused,
    /// Not known (an internal error, a lost answer): it may have been taken.
    Unknown,
}

impl Outcome {
    /// `done`, `refused` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Refused => "refused",
            Outcome::Unknown => "unknown",
        }
    }
}

/// An intent entry on disk: what [`AuditLog::outcome`] closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    /// The intent entry's seq.
    pub seq: u64,
    /// The action announced (without [`INTENT_SUFFIX`]).
    pub action: String,
    /// Who announced it.
    pub actor: String,
    /// The log's head right after it: the SHA-256 of the intent's line.
    pub head: Hash,
}

impl AuditLog {
    /// Appends the intent entry `<action>.intent` (`params`: what is about to be done) and
    /// returns once it is on disk; the caller takes the action only after this.
    pub fn intent(
        &self,
        now_ms: u64,
        actor: &str,
        action: &str,
        params: serde_json::Value,
    ) -> Result<Intent, AuditError> {
        let (seq, head) =
            self.append(now_ms, actor, &format!("{action}{INTENT_SUFFIX}"), params)?;
        Ok(Intent {
            seq,
            head,
            action: action.to_owned(),
            actor: actor.to_owned(),
        })
    }

    /// Appends the outcome entry of `intent`: action `<action>`, its `params` (an object; any
    /// other value goes under `result`) with `intent` (the intent's seq) and `outcome` added.
    pub fn outcome(
        &self,
        now_ms: u64,
        intent: &Intent,
        outcome: Outcome,
        params: serde_json::Value,
    ) -> Result<(u64, Hash), AuditError> {
        let mut params = match params {
            serde_json::Value::Object(m) => serde_json::Value::Object(m),
            serde_json::Value::Null => serde_json::json!({}),
            other => serde_json::json!({ "result": other }),
        };
        params["intent"] = intent.seq.into();
        params["outcome"] = outcome.as_str().into();
        self.append(now_ms, &intent.actor, &intent.action, params)
    }

    /// Fault injection for crash tests: after `n` more appends succeed, every append fails with
    /// an I/O error and writes nothing (as if the process had died or the disk had gone), until
    /// the log is reopened. Never called by the server itself.
    pub fn fail_appends_after(&self, n: u64) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fail_after = Some(n);
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
