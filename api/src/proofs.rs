//! Verifiable custody in the server: the audit log of operator actions and custody decisions,
//! and published liabilities proofs with each user's inclusion proof (the pure code and the
//! formats are in the `reserves` crate; `docs/liabilities-proof.md`, `docs/audit-log.md`).
//!
//! * **Audit log** (`<data_dir>/audit.log`): opened and verified by [`crate::state::open`]; a broken
//!   chain refuses start-up unless `ApiConfig::audit_override`, and the override is logged.
//!   [`AppState::audit`] appends (fsync) before the handler replies; on a write error the
//!   action's reply is an internal error (the action itself already happened and is in the
//!   journal; the operator sees the failure). Actions that move money or publish a proof
//!   (withdrawal approve, reject, bump; the liabilities and reserves publications) are logged
//!   *before* they are taken ([`AppState::audit_intent`], `<action>.intent`) and after with
//!   their outcome ([`AppState::audit_close`]): if the intent cannot be written the action is
//!   not taken, and a crash in between leaves an open intent that `mediator audit verify` lists.
//! * **Liabilities proofs** (`<data_dir>/reserves.sqlite`, `synchronous=FULL`): `POST
//!   /mapi/v1/admin/reserves/liabilities` snapshots every balance (available + held, fee account
//!   included) from the read model, builds one tree per asset, stores the snapshot, the roots and
//!   the audit head between a `reserves.liabilities.publish.intent` and a
//!   `reserves.liabilities.publish` entry, each with the roots and the
//!   [`reserves::liabilities::commitment`]. `GET /mapi/v1/reserves/my-proof?asset=BTC` answers the
//!   caller's inclusion proof in the one the latest proof of reserves names (or the latest, or
//!   `proofId`) **from memory**: each publication replaces the in-memory trees of the latest,
//!   and a publication that is not in memory is read and rebuilt once and kept (checked against
//!   its published roots; a publication whose roots do not rebuild, e.g. an older format, is not
//!   answered): the signed one, and the one last asked for by `proofId` (such rebuilds at most
//!   one every 10 s, server-wide). The nonces come from a secret derived from the
//!   API master key (`HMAC(master, "reserves/liabilities-nonce")`, ADR 0005), never stored.

use crate::error::ApiError;
use crate::state::{ok_json, AppState, Req, SetupError};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use reserves::auditlog::{AuditError, AuditLog, Intent, Outcome};
use reserves::liabilities::{self, Node, Tree};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The audit log file in the data directory.
pub const AUDIT_FILE: &str = "audit.log";
/// The proofs database in the data directory.
pub const PROOFS_DB: &str = "reserves.sqlite";

/// The browser page that verifies a pasted inclusion proof (`GET /reserves/verify`).
pub const VERIFY_HTML: &str = include_str!("proofs/verify.html");

/// How often `my-proof` may rebuild a publication asked for by `proofId` that is not in memory,
/// server-wide.
const ASKED_REBUILD_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// A publication kept in memory other than the latest: its id and what was loaded.
type Kept = (u64, Latest);

/// The latest publication in memory: what `my-proof` answers from.
#[derive(Debug)]
struct Published {
    id: u64,
    created_ms: u64,
    audit_head: Option<[u8; 32]>,
    trees: Vec<Tree>,
}

/// What the server knows of the latest publication.
#[derive(Debug, Clone)]
enum Latest {
    /// Nothing published yet.
    None,
    /// Published before this server's proof format (its rebuilt roots are not the ones
    /// published): not answered; a new publication replaces it.
    Stale(u64),
    /// Ready to answer.
    Ready(Arc<Published>),
}

/// The cache of the latest publication: loaded from `reserves.sqlite` once (at the first
/// `my-proof` after start), replaced by each publication; never read per request.
#[derive(Debug, Default)]
enum Cache {
    #[default]
    Unloaded,
    Loaded(Latest),
}

/// The audit log, the proofs database and the nonce secret.
pub struct Proofs {
    /// The open audit log.
    pub log: AuditLog,
    db: Mutex<Connection>,
    secret: [u8; 32],
    latest: Mutex<Cache>,
    /// The publication the latest proof of reserves names, when it is not the latest (what
    /// `my-proof` answers by default), kept so that its trees are not rebuilt per request.
    signed: Mutex<Option<Kept>>,
    /// The one other publication asked for last by `proofId`, and when such a one was last
    /// rebuilt: at most one every [`ASKED_REBUILD_EVERY`], server-wide.
    asked: Mutex<(Option<Kept>, Option<std::time::Instant>)>,
    /// The liabilities publication the latest proof of reserves names (`None`: no proof yet).
    por_liabilities: Mutex<Option<u64>>,
    /// How many times a stored snapshot was read and rebuilt.
    snapshot_loads: AtomicU64,
}

impl std::fmt::Debug for Proofs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proofs")
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl Proofs {
    /// Opens (creates) both in `data_dir`; verifies the audit chain (see the module docs).
    pub fn open(
        data_dir: &Path,
        nonce_secret: [u8; 32],
        cfg: &crate::state::ApiConfig,
    ) -> Result<Proofs, SetupError> {
        let audit_override = cfg.audit_override;
        let now = crate::core::now_ms();
        let log = AuditLog::open(&data_dir.join(AUDIT_FILE), audit_override, "operator", now)
            .map_err(|e| SetupError::Audit(e.to_string()))?;
        let db = Connection::open(data_dir.join(PROOFS_DB))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS liabilities (
                proof_id INTEGER PRIMARY KEY,
                created_ms INTEGER NOT NULL,
                audit_head TEXT NOT NULL,
                roots TEXT NOT NULL,
                snapshot TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS reserves_proofs (
                id INTEGER PRIMARY KEY,
                created_ms INTEGER NOT NULL,
                block_height INTEGER NOT NULL,
                block_hash TEXT NOT NULL,
                reserves_sat INTEGER NOT NULL,
                liabilities_proof_id INTEGER NOT NULL,
                document TEXT NOT NULL
            );",
        )?;
        // The log must still hold the audit heads of the latest publications: a log cut back
        // before one (its tail removed) is a valid chain, yet it lost entries a published proof
        // commits to. Refused like a broken chain; the override names the heads it gives up.
        let published = published_heads(&db)?;
        let missing = reserves::auditlog::missing_heads(&data_dir.join(AUDIT_FILE), &published)
            .map_err(|e| SetupError::Audit(format!("audit log: {e}")))?;
        if !missing.is_empty() {
            let hexes: Vec<String> = missing.iter().map(hex::encode).collect();
            if !audit_override {
                return Err(SetupError::Audit(format!(
                    "audit log {} no longer holds the audit head {} of a published proof: it was \
                     cut or rewritten after the proof; run `mediator audit verify --proof` with \
                     the proof to see it; to start anyway (the override is logged), pass \
                     --audit-override",
                    data_dir.join(AUDIT_FILE).display(),
                    hexes.join(", ")
                )));
            }
            log.append(
                now,
                "operator",
                reserves::auditlog::OVERRIDE_ACTION,
                json!({ "break_lines": [], reserves::auditlog::MISSING_HEADS_KEY: hexes }),
            )
            .map_err(|e| SetupError::Audit(e.to_string()))?;
        }
        let por_liabilities: Option<i64> = db
            .query_row(
                "SELECT liabilities_proof_id FROM reserves_proofs ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let p = Proofs {
            log,
            db: Mutex::new(db),
            secret: nonce_secret,
            latest: Mutex::new(Cache::Unloaded),
            signed: Mutex::new(None),
            asked: Mutex::new((None, None)),
            por_liabilities: Mutex::new(por_liabilities.map(|id| id as u64)),
            snapshot_loads: AtomicU64::new(0),
        };
        let open_intents: Vec<u64> = p
            .log
            .open_intents_at_start()
            .iter()
            .map(|i| {
                tracing::warn!(
                    seq = i.seq,
                    action = %i.action,
                    "audit log: an action was announced and never given an outcome (it may \
                     have been taken before a crash); check it"
                );
                i.seq
            })
            .collect();
        p.log
            .append(
                now,
                "system",
                "server.start",
                json!({
                    "open_intents": open_intents,
                    "version": env!("CARGO_PKG_VERSION"),
                    "public_url": cfg.public_url,
                    "audit_override": cfg.audit_override,
                    "ip_weight_per_min": cfg.ip_weight_per_min,
                    "key_weight_per_min": cfg.key_weight_per_min,
                    "max_connections": cfg.max_connections,
                }),
            )
            .map_err(|e| SetupError::Audit(e.to_string()))?;
        Ok(p)
    }

    /// The latest publication, without blocking: `None` when it is not in memory yet (or
    /// being loaded), then [`Proofs::latest`] loads it.
    fn cached(&self) -> Option<Latest> {
        match self.latest.try_lock().as_deref() {
            Ok(Cache::Loaded(l)) => Some(l.clone()),
            _ => None,
        }
    }

    /// The latest publication: from memory, or read from `reserves.sqlite` and rebuilt once
    /// (blocking: the tree build is O(n log n)). The cache lock is held while loading, so
    /// concurrent first requests wait for one load, and a publication that lands meanwhile
    /// replaces the result after it.
    fn latest(&self) -> Result<Latest, ApiError> {
        let mut cache = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        if let Cache::Loaded(l) = &*cache {
            return Ok(l.clone());
        }
        let loaded = self.load(None)?;
        *cache = Cache::Loaded(loaded.clone());
        Ok(loaded)
    }

    /// Publication `id` (blocking): the copy in memory when one is kept (the latest, the one
    /// the latest proof of reserves names, the one asked for last), else read and rebuilt and
    /// kept: as the signed one when `signed`, else as the one asked for, at most one such
    /// rebuild every [`ASKED_REBUILD_EVERY`] server-wide (busy otherwise: a rebuild reads a
    /// whole snapshot, and any `read` key may ask for any publication). Unready answers (none,
    /// an older format) are kept too.
    fn publication(&self, id: u64, signed: bool) -> Result<Latest, ApiError> {
        if let Latest::Ready(l) = self.latest()? {
            if l.id == id {
                return Ok(Latest::Ready(l));
            }
        }
        let kept = |slot: &Option<Kept>| {
            slot.as_ref()
                .filter(|(k, _)| *k == id)
                .map(|(_, l)| l.clone())
        };
        let mut sig = self.signed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = kept(&sig) {
            return Ok(l);
        }
        if signed {
            let loaded = self.load(Some(id))?;
            *sig = Some((id, loaded.clone()));
            return Ok(loaded);
        }
        drop(sig);
        let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = kept(&asked.0) {
            return Ok(l);
        }
        if let Some(left) = asked
            .1
            .and_then(|t| ASKED_REBUILD_EVERY.checked_sub(t.elapsed()))
        {
            return Err(ApiError {
                retry_after: Some(left.as_secs().max(1)),
                ..ApiError::busy()
            });
        }
        let loaded = self.load(Some(id))?;
        // Only a snapshot actually read and rebuilt spends the window and takes the slot: an
        // id that was never published costs nothing and evicts nothing.
        if !matches!(loaded, Latest::None) {
            asked.1 = Some(std::time::Instant::now());
            asked.0 = Some((id, loaded.clone()));
        }
        Ok(loaded)
    }

    /// The liabilities publication the latest proof of reserves names, if there is one.
    fn por_liabilities(&self) -> Option<u64> {
        *self
            .por_liabilities
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Reads publication `id` (the latest with `None`), rebuilds its trees from its snapshot and
    /// checks the rebuilt roots against the published ones.
    fn load(&self, id: Option<u64>) -> Result<Latest, ApiError> {
        let row: Option<(i64, i64, String, String, String)> = {
            let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
            let cols = "proof_id, created_ms, audit_head, roots, snapshot";
            let get =
                |r: &rusqlite::Row<'_>| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?));
            match id {
                Some(id) => db.query_row(
                    &format!("SELECT {cols} FROM liabilities WHERE proof_id = ?1"),
                    [i64::try_from(id).map_err(|_| ApiError::invalid_value("proofId"))?],
                    get,
                ),
                None => db.query_row(
                    &format!("SELECT {cols} FROM liabilities ORDER BY proof_id DESC LIMIT 1"),
                    [],
                    get,
                ),
            }
            .optional()
            .map_err(internal)?
        };
        self.snapshot_loads.fetch_add(1, Ordering::Relaxed);
        let Some((id, created, head, roots, snapshot)) = row else {
            return Ok(Latest::None);
        };
        let (id, created) = (id as u64, created as u64);
        let snap: Vec<(String, Vec<(u32, u64)>)> =
            serde_json::from_str(&snapshot).map_err(internal)?;
        let trees = snap
            .iter()
            .map(|(asset, b)| Tree::build(&self.secret, id, asset, b))
            .collect::<Result<Vec<_>, _>>()
            .map_err(internal)?;
        let published: Vec<Value> = serde_json::from_str(&roots).map_err(internal)?;
        let same = published.len() == trees.len()
            && trees.iter().all(|t| {
                published.iter().any(|p| {
                    p["asset"] == t.asset()
                        && p["root"] == hex::encode(t.root().hash)
                        && p["total"].as_str().and_then(|s| s.parse::<u64>().ok())
                            == Some(t.root().sum)
                })
            });
        if !same {
            tracing::warn!(
                proof_id = id,
                "the latest liabilities proof does not rebuild to its published roots (an older \
                 format, or another master key): not answered"
            );
            return Ok(Latest::Stale(id));
        }
        Ok(Latest::Ready(Arc::new(Published {
            id,
            created_ms: created,
            audit_head: hex_head(&head),
            trees,
        })))
    }

    /// Replaces the cache with a new publication (its trees as built for it).
    fn set_latest(&self, p: Published) {
        let mut cache = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        let newer = match &*cache {
            Cache::Loaded(Latest::Ready(l)) => l.id < p.id,
            Cache::Loaded(Latest::Stale(id)) => *id < p.id,
            _ => true,
        };
        if newer {
            *cache = Cache::Loaded(Latest::Ready(Arc::new(p)));
        }
    }

    /// How many times the stored liabilities snapshot was read (at most once per start; each
    /// publication replaces the in-memory copy without a read).
    pub fn snapshot_loads(&self) -> u64 {
        self.snapshot_loads.load(Ordering::Relaxed)
    }
}

/// The audit heads named by the latest liabilities publication and the latest proof of
/// reserves in `db` (what a log must still hold).
fn published_heads(db: &Connection) -> Result<Vec<[u8; 32]>, SetupError> {
    let liabilities: Option<String> = db
        .query_row(
            "SELECT audit_head FROM liabilities ORDER BY proof_id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let document: Option<String> = db
        .query_row(
            "SELECT document FROM reserves_proofs ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let reserves = document.and_then(|d| {
        serde_json::from_str::<Value>(&d)
            .ok()
            .and_then(|v| v["audit_head"].as_str().map(str::to_owned))
    });
    Ok([liabilities, reserves]
        .iter()
        .flatten()
        .filter_map(|h| hex_head(h))
        .filter(|h| *h != [0; 32])
        .collect())
}

/// The nonce secret: `HMAC(master, "reserves/liabilities-nonce")` (ADR 0005), never stored.
pub fn nonce_secret(keys: &crate::keys::KeyStore) -> [u8; 32] {
    let mut out = [0u8; 32];
    hex::decode_to_slice(keys.derive_purpose("reserves/liabilities-nonce"), &mut out)
        .expect("an HMAC-SHA256 is 64 hex digits");
    out
}

fn hex_head(s: &str) -> Option<[u8; 32]> {
    let mut h = [0u8; 32];
    hex::decode_to_slice(s, &mut h).ok().map(|()| h)
}

fn audit_failed(e: AuditError, action: &str) -> ApiError {
    match e {
        e @ AuditError::SecretInParams { .. } => {
            // A bug in the caller, not an operator's mistake.
            tracing::error!(error = %e, action, "audit entry refused");
        }
        e => tracing::error!(error = %e, action, "audit log write failed"),
    }
    ApiError::internal()
}

fn internal<E: std::fmt::Display>(e: E) -> ApiError {
    tracing::error!(error = %e, "liabilities proof");
    ApiError::internal()
}

impl AppState {
    /// Appends `{actor: "admin", action, params}` to the audit log and waits for it to be on
    /// disk; the caller replies after this. `params` never holds a secret (refused if it does).
    pub fn audit(&self, action: &str, params: Value) -> Result<(), ApiError> {
        self.audit_as("admin", action, params)
    }

    /// As [`AppState::audit`] with another actor (`system`, `key:<account>`).
    pub fn audit_as(&self, actor: &str, action: &str, params: Value) -> Result<(), ApiError> {
        match self
            .0
            .proofs
            .log
            .append(crate::core::now_ms(), actor, action, params)
        {
            Ok(_) => Ok(()),
            Err(e) => Err(audit_failed(e, action)),
        }
    }

    /// As [`AppState::audit_as`] for a single-entry action that changes who can do what or
    /// makes a money address (an account, an API key, a dashboard password or login link, a
    /// deposit address, mined blocks): `params` gain `by`, the public id of the credential that
    /// asked (an API key's id, `session:<16 hex>` for a dashboard session, `start-up` for the
    /// server itself), never a secret.
    pub fn audit_by(
        &self,
        actor: &str,
        by: &str,
        action: &str,
        mut params: Value,
    ) -> Result<(), ApiError> {
        if let Some(o) = params.as_object_mut() {
            o.insert("by".to_owned(), Value::from(by));
        }
        self.audit_as(actor, action, params)
    }

    /// As [`AppState::audit_by`] for an action that has already happened and cannot be taken
    /// back (a revoked key, an opened account, a new deposit address, mined regtest blocks):
    /// an entry that cannot be written is logged in the server log and the action is still
    /// answered as done, since `-1000` would invite a retry that repeats it. Actions that grant
    /// something (a key, a dashboard password or login link, an allow-listed address) are
    /// recorded before they are taken instead, and a failed entry makes nothing.
    pub fn audit_done_by(&self, actor: &str, by: &str, action: &str, params: Value) {
        // `audit_failed` has logged a failure.
        let _ = self.audit_by(actor, by, action, params);
    }

    /// Announces an admin action in the audit log before it is taken (`<action>.intent`, on
    /// disk when this returns); the caller takes the action only after this and then logs its
    /// result with [`AppState::audit_close`]. A crash in between leaves an intent without
    /// outcome, which `mediator audit verify` lists: the action may have happened, and the log
    /// says so.
    pub fn audit_intent(&self, action: &str, params: Value) -> Result<Intent, ApiError> {
        self.0
            .proofs
            .log
            .intent(crate::core::now_ms(), "admin", action, params)
            .map_err(|e| audit_failed(e, action))
    }

    /// Logs how the action announced by `intent` ended: `Ok(params)` is `done`; an error is
    /// `refused` (a 4xx: nothing changed) or `unknown` (anything else), with its code and message.
    /// Private: a handler closes an intent with [`AppState::audit_close`] (or runs the action
    /// through [`AppState::audited`]), which never turns a failed outcome entry into the answer.
    fn audit_outcome(
        &self,
        intent: &Intent,
        result: Result<Value, &ApiError>,
    ) -> Result<(), ApiError> {
        let (outcome, params) = match result {
            Ok(v) => (Outcome::Done, v),
            Err(e) => (
                if e.status.is_client_error() {
                    Outcome::Refused
                } else {
                    Outcome::Unknown
                },
                json!({ "code": e.code, "msg": e.msg }),
            ),
        };
        self.0
            .proofs
            .log
            .outcome(crate::core::now_ms(), intent, outcome, params)
            .map(|_| ())
            .map_err(|e| audit_failed(e, &intent.action))
    }

    /// Closes `intent` with the action's `result` and answers that result, whatever happens
    /// to the outcome entry: `done` gives the outcome's params from an `Ok`. An outcome entry
    /// that cannot be written is logged in the server log (the open intent already records
    /// that the action may have happened, for `audit verify`), never turned into `-1000`,
    /// which would invite the admin to repeat a done, non-idempotent action (publish twice,
    /// open a channel twice). The one rule for every intent/outcome pair.
    pub fn audit_close<T>(
        &self,
        intent: &Intent,
        result: Result<T, ApiError>,
        done: impl FnOnce(&T) -> Result<Value, ApiError>,
    ) -> Result<T, ApiError> {
        match result {
            Ok(v) => {
                // The action happened: its outcome is `done` even if its result cannot be
                // rendered.
                let params = done(&v).unwrap_or_else(|e| json!({ "unrendered": e.msg }));
                // `audit_outcome` has logged the failure; the intent stays open.
                let _ = self.audit_outcome(intent, Ok(params));
                Ok(v)
            }
            Err(e) => {
                let _ = self.audit_outcome(intent, Err(&e));
                Err(e)
            }
        }
    }

    /// Runs an admin action between its intent and its outcome entries: `params` announce it,
    /// `done` gives the outcome's params from its result. The answer is always the action's
    /// own ([`AppState::audit_close`]).
    pub async fn audited<T, Fut>(
        &self,
        action: &str,
        params: Value,
        run: Fut,
        done: impl FnOnce(&T) -> Result<Value, ApiError>,
    ) -> Result<T, ApiError>
    where
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let intent = self.audit_intent(action, params)?;
        let result = run.await;
        self.audit_close(&intent, result, done)
    }

    /// The open audit log (for tools and crash tests: `AuditLog::fail_appends_after`).
    pub fn audit_log(&self) -> &AuditLog {
        &self.0.proofs.log
    }

    /// The audit log's (last seq, head).
    pub fn audit_head(&self) -> (u64, [u8; 32]) {
        self.0.proofs.log.head()
    }

    /// How many times a liabilities snapshot of `reserves.sqlite` was read since start (the
    /// latest at most once: `my-proof` answers from memory, each publication replaces it there;
    /// another publication once while it stays the one kept).
    pub fn liabilities_snapshot_loads(&self) -> u64 {
        self.0.proofs.snapshot_loads()
    }
}

/// `POST /mapi/v1/admin/reserves/liabilities` (ADMIN): publishes a liabilities proof over every
/// balance now.
pub async fn admin_publish_liabilities(
    State(st): State<AppState>,
    req: Req,
) -> Result<Response, ApiError> {
    let (_, p, ctx) = st.signed(&req)?;
    p.finish()?;
    let snapshot = balances_snapshot(&st)?;
    let st2 = st.clone();
    let reply = tokio::task::spawn_blocking(move || publish(&st2, snapshot))
        .await
        .map_err(internal)??;
    Ok(ok_json(&ctx, reply))
}

/// Per asset, every account's non-zero balance: (asset, [(account, balance)]).
type Snapshot = Vec<(String, Vec<(u32, u64)>)>;

/// Every non-zero balance (available + held) per configured asset, from the read model.
fn balances_snapshot(st: &AppState) -> Result<Snapshot, ApiError> {
    let assets: Vec<String> = st
        .markets()
        .assets
        .iter()
        .map(|a| a.symbol.clone())
        .collect();
    let rm = st.read_model().read();
    assets
        .iter()
        .enumerate()
        .map(|(i, sym)| {
            let mut b: Vec<(u32, u64)> = Vec::new();
            for (&account, per) in &rm.balances {
                if let Some(&(avail, held)) = per.get(i) {
                    let total = avail.checked_add(held).ok_or_else(ApiError::internal)?;
                    if total != 0 {
                        b.push((account, total));
                    }
                }
            }
            b.sort_unstable();
            Ok((sym.clone(), b))
        })
        .collect::<Result<_, ApiError>>()
}

fn publish(st: &AppState, snapshot: Vec<(String, Vec<(u32, u64)>)>) -> Result<Value, ApiError> {
    let proofs = &st.0.proofs;
    let created = crate::core::now_ms();
    let (audit_seq, head) = proofs.log.head();
    let db = proofs.db.lock().unwrap_or_else(|e| e.into_inner());
    let next: i64 = db
        .query_row(
            "SELECT COALESCE(MAX(proof_id), 0) + 1 FROM liabilities",
            [],
            |r| r.get(0),
        )
        .map_err(internal)?;
    // The nonces are keyed by the proof id, so an id must never come back, not even after
    // `reserves.sqlite` was lost: it is also above the audit log's last seq (which only grows,
    // and start-up refuses a broken log).
    let id = next.max(i64::try_from(audit_seq).map_err(internal)? + 1);
    let trees = snapshot
        .iter()
        .map(|(asset, b)| Tree::build(&proofs.secret, id as u64, asset, b))
        .collect::<Result<Vec<_>, _>>()
        .map_err(internal)?;
    let roots: Vec<(String, Node)> = trees
        .iter()
        .map(|t| (t.asset().to_owned(), t.root()))
        .collect();
    let commitment = liabilities::commitment(id as u64, Some(head), &roots);
    let roots_json: Vec<Value> = trees
        .iter()
        .map(|t| {
            json!({
                "asset": t.asset(),
                "root": hex::encode(t.root().hash),
                "total": t.root().sum.to_string(),
                "accounts": t.accounts(),
                "leaves": t.width(),
            })
        })
        .collect();
    let body = json!({
        "proofId": id,
        "createdMs": created,
        "auditHead": hex::encode(head),
        "commitment": hex::encode(commitment),
        "assets": roots_json,
    });
    let snapshot_json = serde_json::to_string(&snapshot).map_err(internal)?;
    // Announced before it is stored (and so answerable by `my-proof`): a crash in between leaves
    // the intent, never a publication without a record.
    let intent = st.audit_intent("reserves.liabilities.publish", body.clone())?;
    let stored = db
        .execute(
            "INSERT INTO liabilities (proof_id, created_ms, audit_head, roots, snapshot) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                id,
                created as i64,
                hex::encode(head),
                Value::Array(roots_json).to_string(),
                snapshot_json,
            ],
        )
        .map(|_| ())
        .map_err(internal);
    drop(db);
    let stored = stored.map(|()| {
        proofs.set_latest(Published {
            id: id as u64,
            created_ms: created,
            audit_head: Some(head),
            trees,
        });
        body
    });
    // Published (stored and answerable): the answer says so even if its outcome entry is lost.
    st.audit_close(&intent, stored, |b| Ok(b.clone()))
}

/// `GET /mapi/v1/reserves/my-proof?asset=BTC[&proofId=N]` (READ): the caller's inclusion proof
/// in liabilities publication `proofId`; by default the one the latest proof of reserves names
/// (the tree its signatures bind, which `verify-inclusion --against` checks), or the latest
/// publication while no proof of reserves exists.
pub async fn my_proof(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (key, mut p, ctx) = st.signed(&req)?;
    let asset = p.req("asset")?;
    let asked = p.opt_u64("proofId")?;
    p.finish()?;
    // The signed publication is kept as such, whether asked for by its id or by default.
    let signed_id = st.0.proofs.por_liabilities();
    let wanted = asked.or(signed_id);
    let signed = wanted.is_some() && wanted == signed_id;
    // From memory; only the first request after start (or for another publication) loads it,
    // off the async threads.
    let cached = match wanted {
        None => st.0.proofs.cached(),
        Some(_) => None,
    };
    let latest = match cached {
        Some(l) => l,
        None => {
            let st2 = st.clone();
            tokio::task::spawn_blocking(move || match wanted {
                Some(id) => st2.0.proofs.publication(id, signed),
                None => st2.0.proofs.latest(),
            })
            .await
            .map_err(internal)??
        }
    };
    let published = match latest {
        Latest::Ready(p) => p,
        Latest::None => {
            return Err(ApiError::bad(
                -1130,
                "No such liabilities proof has been published.",
            ))
        }
        Latest::Stale(_) => {
            return Err(ApiError::bad(
                -1130,
                "That liabilities proof was published in an older format; a new one must be \
                 published.",
            ))
        }
    };
    let id = published.id;
    let Some(tree) = published.trees.iter().find(|t| t.asset() == asset) else {
        return Err(ApiError::invalid_value("asset"));
    };
    let Some(proof) = tree.prove(key.account, published.audit_head) else {
        return Err(ApiError::bad(
            -1130,
            "This account had no balance of this asset in that liabilities proof.",
        ));
    };
    let proof = liabilities::InclusionProof {
        created_ms: Some(published.created_ms),
        ..proof
    };
    debug_assert_eq!(proof.proof_id, id);
    debug_assert!(liabilities::verify(&proof).is_ok());
    Ok(ok_json(&ctx, proof.to_json()))
}

/// `GET /reserves/verify`: the page that verifies a pasted inclusion proof in the browser.
pub async fn verify_page(State(st): State<AppState>) -> Response {
    let csp = crate::page::content_security_policy(VERIFY_HTML, "'none'");
    let _ = &st;
    let mut r = (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        VERIFY_HTML,
    )
        .into_response();
    if let Ok(v) = header::HeaderValue::from_str(&csp) {
        r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
    }
    r
}

// ----- the BIP-127 proof of reserves (docs/proof-of-reserves.md) -----

/// `POST /mapi/v1/admin/reserves/prove` (ADMIN), `message` optional (a note of at most
/// [`reserves::por::MAX_NOTE`] bytes): publishes a liabilities proof over every balance now,
/// then has custody sign a BIP-127 proof of reserves over its UTXOs at the node's tip whose
/// message names that block, every liabilities root and the audit head, followed by the note
/// if any (`; note: ...`; verifiers refuse a message that does not bind); stores the proof
/// document (all of them are kept), logs `reserves.prove.publish` and answers the document.
pub async fn admin_prove(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (_, mut p, ctx) = st.signed(&req)?;
    let custom = p.opt("message")?;
    p.finish()?;
    if let Some(m) = &custom {
        if m.is_empty() || m.len() > reserves::por::MAX_NOTE {
            return Err(ApiError::invalid_value("message"));
        }
    }
    if st.0.custody.get().is_none() {
        // Nothing published, nothing announced: custody cannot sign.
        return Err(crate::capital::unavailable());
    }
    // The liabilities are published and the intent announced inside custody's call, under its
    // lock, after it synced and completed what the tip paid and before it lists the UTXOs
    // (`Custody::prove_reserves`): both sides of the proof are one moment. Taken before that
    // call, a deposit credited meanwhile counted as reserves with no liability standing for it.
    let taken: Arc<Mutex<Option<Taken>>> = Arc::default();
    let (st2, taken2) = (st.clone(), taken.clone());
    let handle = tokio::runtime::Handle::current();
    let proof = crate::capital::call(&st, move |c| {
        c.prove_reserves(&|height: u32, hash: &str| {
            // Every command the engine applied so far, the credits custody just made included.
            if !handle.block_on(st2.sync_read_model()) {
                return Err(as_custody(ApiError::busy()));
            }
            let snapshot = balances_snapshot(&st2).map_err(as_custody)?;
            let published = publish(&st2, snapshot).map_err(as_custody)?;
            let liabilities_proof_id = published["proofId"]
                .as_u64()
                .ok_or_else(|| as_custody(ApiError::internal()))?;
            let mut liabilities = std::collections::BTreeMap::new();
            for a in published["assets"].as_array().into_iter().flatten() {
                liabilities.insert(
                    a["asset"].as_str().unwrap_or_default().to_owned(),
                    reserves::por::AssetLiabilities {
                        root: a["root"].as_str().unwrap_or_default().to_owned(),
                        total: a["total"].as_str().unwrap_or_default().to_owned(),
                        leaves: a["leaves"].as_u64().unwrap_or_default(),
                    },
                );
            }
            // Announced before custody signs and the document is stored; the proof names the
            // head right after this intent (which follows the liabilities publication).
            let intent = st2
                .audit_intent(
                    "reserves.prove.publish",
                    json!({ "liabilities_proof_id": liabilities_proof_id, "message": &custom }),
                )
                .map_err(as_custody)?;
            let audit_head = hex::encode(intent.head);
            let binding = reserves::por::default_message(
                height,
                hash,
                liabilities_proof_id,
                &liabilities,
                &audit_head,
            );
            let text = reserves::por::message_with_note(binding, custom.as_deref());
            *taken2.lock().unwrap_or_else(|e| e.into_inner()) = Some(Taken {
                intent,
                liabilities_proof_id,
                liabilities,
                audit_head,
            });
            Ok(text)
        })
    })
    .await;
    let Some(t) = taken.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        // Nothing announced: custody refused before asking, or the publication failed.
        return Err(proof.err().unwrap_or_else(ApiError::internal));
    };
    let result = match proof {
        Ok(proof) => {
            store_proof(
                &st,
                proof,
                t.liabilities_proof_id,
                t.liabilities,
                t.audit_head,
            )
            .await
        }
        Err(e) => Err(e),
    };
    // Signed and stored: answered as published even if its outcome entry is lost.
    let (id, doc, _, _) = st.audit_close(&t.intent, result, |(id, doc, utxos, psbt_sha256)| {
        Ok(json!({
            "id": id,
            "block_height": doc.block_height,
            "block_hash": doc.block_hash,
            "reserves_sat": doc.reserves_sat,
            "utxos": utxos,
            "liabilities_proof_id": doc.liabilities_proof_id,
            "audit_head": doc.audit_head,
            "message": doc.message,
            "psbt_sha256": psbt_sha256,
        }))
    })?;
    let mut v = serde_json::to_value(&doc).map_err(internal)?;
    v["id"] = json!(id);
    Ok(ok_json(&ctx, v))
}

/// What [`admin_prove`] took under custody's lock: the intent it announced and the liabilities
/// publication the message names.
struct Taken {
    intent: Intent,
    liabilities_proof_id: u64,
    liabilities: std::collections::BTreeMap<String, reserves::por::AssetLiabilities>,
    audit_head: String,
}

/// An API error carried through custody's call (a failure inside its `message`) and back.
fn as_custody(e: ApiError) -> crate::custody::CustodyError {
    crate::custody::CustodyError {
        code: e.code,
        status: e.status.as_u16(),
        msg: e.msg.into_owned(),
    }
}

/// The document of the proof custody signed is built and stored: (its id, the document, the
/// number of UTXOs, the PSBT's SHA-256).
async fn store_proof(
    st: &AppState,
    proof: crate::custody::ReservesProofInfo,
    liabilities_proof_id: u64,
    liabilities: std::collections::BTreeMap<String, reserves::por::AssetLiabilities>,
    audit_head: String,
) -> Result<(u64, reserves::por::ProofDocument, Value, String), ApiError> {
    // The Lightning node's balances, reported apart and unproven (a failure leaves them out).
    let lightning_unproven = match st.0.lightning.get().cloned() {
        Some(ln) => tokio::task::spawn_blocking(move || ln.balance())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| reserves::por::LightningUnproven {
                onchain_sat: b.onchain_sat,
                channels_sat: b.channels_sat,
                pending_close_sat: b.pending_close_sat,
            }),
        None => None,
    };
    let doc = reserves::por::ProofDocument {
        version: reserves::por::DOCUMENT_VERSION,
        network: proof.network,
        message: proof.message,
        block_hash: proof.block_hash,
        block_height: proof.block_height,
        psbt: reserves::por::psbt_base64(&proof.psbt),
        reserves_sat: proof.reserves_sat,
        liabilities_proof_id,
        liabilities,
        audit_head,
        created: crate::core::now_ms(),
        lightning_unproven,
    };
    let st2 = st.clone();
    let (id, doc) = tokio::task::spawn_blocking(move || store_document(&st2, doc))
        .await
        .map_err(internal)??;
    let psbt_sha256 = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&proof.psbt))
    };
    Ok((id, doc, json!(proof.utxos), psbt_sha256))
}

fn store_document(
    st: &AppState,
    doc: reserves::por::ProofDocument,
) -> Result<(u64, reserves::por::ProofDocument), ApiError> {
    let text = serde_json::to_string(&doc).map_err(internal)?;
    let db = st.0.proofs.db.lock().unwrap_or_else(|e| e.into_inner());
    db.execute(
        "INSERT INTO reserves_proofs \
         (created_ms, block_height, block_hash, reserves_sat, liabilities_proof_id, document) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            i64::try_from(doc.created).map_err(internal)?,
            doc.block_height,
            doc.block_hash,
            i64::try_from(doc.reserves_sat).map_err(internal)?,
            i64::try_from(doc.liabilities_proof_id).map_err(internal)?,
            text,
        ],
    )
    .map_err(internal)?;
    let id = db.last_insert_rowid() as u64;
    // Under the database's lock: two proofs at once set it in the order they were stored.
    *st.0
        .proofs
        .por_liabilities
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(doc.liabilities_proof_id);
    drop(db);
    Ok((id, doc))
}

/// The stored document `id` (the latest with `None`), as stored.
fn load_document(st: &AppState, id: Option<u64>) -> Result<Option<(u64, String)>, ApiError> {
    let db = st.0.proofs.db.lock().unwrap_or_else(|e| e.into_inner());
    let row = match id {
        Some(id) => db.query_row(
            "SELECT id, document FROM reserves_proofs WHERE id = ?1",
            params![i64::try_from(id).map_err(|_| ApiError::invalid_value("id"))?],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
        ),
        None => db.query_row(
            "SELECT id, document FROM reserves_proofs ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
        ),
    }
    .optional()
    .map_err(internal)?;
    Ok(row.map(|(id, d)| (id as u64, d)))
}

/// `GET /mapi/v1/reserves/latest` (public, weight 2; `id` optional: that older proof): the
/// proof-of-reserves document as published, with its `id`.
pub async fn latest(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (mut p, ctx) = st.public(&req, 2)?;
    let id = p.opt_u64("id")?;
    p.finish()?;
    let st2 = st.clone();
    let found = tokio::task::spawn_blocking(move || load_document(&st2, id))
        .await
        .map_err(internal)??;
    let Some((id, text)) = found else {
        return Err(ApiError::bad(
            -1130,
            "No such proof of reserves has been published.",
        ));
    };
    let mut v: Value = serde_json::from_str(&text).map_err(internal)?;
    v["id"] = json!(id);
    Ok(ok_json(&ctx, v))
}

/// The most proofs [`list`] answers at once.
pub const LIST_LIMIT: u64 = 100;

/// `GET /mapi/v1/reserves/proofs` (public, weight 2; `limit` 1..=100, default 100; `fromId`:
/// ids at most this): the published proofs, newest first, without their PSBTs
/// (`GET /mapi/v1/reserves/latest?id=N` answers one whole).
pub async fn list(State(st): State<AppState>, req: Req) -> Result<Response, ApiError> {
    let (mut p, ctx) = st.public(&req, 2)?;
    let limit = p.opt_u64("limit")?.unwrap_or(LIST_LIMIT);
    let from = p.opt_u64("fromId")?;
    p.finish()?;
    if !(1..=LIST_LIMIT).contains(&limit) {
        return Err(ApiError::invalid_value("limit"));
    }
    let from = i64::try_from(from.unwrap_or(i64::MAX as u64))
        .map_err(|_| ApiError::invalid_value("fromId"))?;
    let st2 = st.clone();
    let rows = tokio::task::spawn_blocking(move || -> Result<Vec<Value>, ApiError> {
        let db = st2.0.proofs.db.lock().unwrap_or_else(|e| e.into_inner());
        let mut q = db
            .prepare(
                "SELECT id, created_ms, block_height, block_hash, reserves_sat, \
                 liabilities_proof_id FROM reserves_proofs WHERE id <= ?1 \
                 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(internal)?;
        let rows = q
            .query_map(params![from, limit as i64], |r| {
                Ok(json!({
                    "id": r.get::<_, i64>(0)?,
                    "created": r.get::<_, i64>(1)?,
                    "block_height": r.get::<_, i64>(2)?,
                    "block_hash": r.get::<_, String>(3)?,
                    "reserves_sat": r.get::<_, i64>(4)?,
                    "liabilities_proof_id": r.get::<_, i64>(5)?,
                }))
            })
            .map_err(internal)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(internal)?;
        Ok(rows)
    })
    .await
    .map_err(internal)??;
    Ok(ok_json(&ctx, Value::Array(rows)))
}
