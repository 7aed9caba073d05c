//! The boundary between the API and the engine process: [`ExchangeCore`] takes commands and
//! replies once each is durable; an [`EventSink`] receives every event batch in order.
//!
//! **Contract for an implementation** (the sequencer in `mediator serve`, or [`LocalCore`] here):
//! * `submit` replies exactly once per command, after the command is durable (journaled and
//!   fsynced) when it changed state. `Reply::seq` is the engine's sequence number after the
//!   command ([`matching_engine::Engine::seq`]).
//! * For every command that advanced the engine's sequence, the events are published to the
//!   [`EventSink`] as one [`EventBatch`] with that `seq`, in sequence order, with no gaps, **before
//!   or concurrently with** the reply (the API waits for the read model to reach `Reply::seq`
//!   before answering, so publishing after replying only delays the answer).
//! * Batches start after the state the read models were given at start-up (a recovered engine:
//!   [`crate::readmodel::ReadModel::regenerate`] rebuilds them, and the history rows of commands
//!   the SQLite history had not committed, from the journal replay; upserts, so idempotent).

use matching_engine::{Command, Engine, EngineConfig, Event, RejectCode, Timestamp};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// The answer to one command.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Accepted, or rejected with a code (a rejected command changed nothing it was asked to do).
    pub result: Result<(), RejectCode>,
    /// The command's events (for a rejection: possibly GTD expiries, then `Rejected`).
    pub events: Vec<Event>,
    /// The engine's sequence number after the command.
    pub seq: u64,
}

impl Reply {
    /// The sequence number that names what the command did: its own, or for a duplicate
    /// transfer the one of the command that applied it (a retry answers the transfer's own
    /// id), when the engine knows it.
    pub fn applied_seq(&self) -> u64 {
        self.events
            .iter()
            .find_map(|e| match e {
                Event::Accepted {
                    original: Some(s), ..
                } => Some(*s),
                _ => None,
            })
            .unwrap_or(self.seq)
    }
}

/// What became of one submitted command: the three answers of a boundary that can lose its
/// reply (plus "not taken"). **Contract:** `Applied` and `Rejected` are certain; `Busy` means the
/// command never entered the engine's queue (nothing changed, safe to retry); `Unknown` means the
/// command may or may not have been applied (the engine stopped after taking it, or the reply was
/// lost): a caller that moves money resolves it by asking the engine about the command's
/// idempotency key (re-submitting the same idempotent command, or a lookup), never by assuming
/// either answer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Outcome {
    /// Applied and durable; the reply carries its events and sequence number.
    Applied(Reply),
    /// Refused by the engine: it changed nothing it was asked to do.
    Rejected(RejectCode),
    /// Not taken (the input queue was full): nothing changed; try again later.
    Busy,
    /// Taken, but no answer: applied or not is unknown until resolved by idempotency key.
    Unknown,
    /// Refused because a breaker is open: the ledger auditor found a violation
    /// ([`crate::audit`]; commands that move money wait for an operator), or the read models
    /// lost events (every command waits for a restart). Nothing changed.
    Halted,
    /// Refused because custody flagged the account for review (a credited deposit left the
    /// chain): it takes on no new exposure (orders, order lists, amends) until an operator
    /// clears the flag; cancels pass. Nothing changed.
    Restricted,
}

/// Why a command got no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// The input queue is full: try again later (HTTP 503, `-1008`).
    #[error("engine busy")]
    Busy,
    /// The engine stopped (shutdown or a fatal journal error).
    #[error("engine stopped")]
    Stopped,
}

/// A boxed future, for an object-safe trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The engine process as the API sees it.
pub trait ExchangeCore: Send + Sync + 'static {
    /// Submits a command; resolves once it is durable, with its events.
    fn submit(&self, cmd: Command) -> BoxFuture<'_, Result<Reply, CoreError>>;
    /// The engine's configuration (markets and assets).
    fn config(&self) -> &EngineConfig;
    /// Commands waiting in the input queue (for `/metrics`).
    fn queue_depth(&self) -> usize {
        0
    }
    /// True once the engine's own invariant check failed (before a snapshot): the API's circuit
    /// breaker then stops commands that move money.
    fn invariants_broken(&self) -> bool {
        false
    }
}

/// The events of one command that advanced the engine's sequence.
#[derive(Debug, Clone)]
pub struct EventBatch {
    /// The engine's sequence number after the command.
    pub seq: u64,
    /// Time of the command.
    pub time: Timestamp,
    /// Its events, in order.
    pub events: Arc<[Event]>,
}

impl From<matching_engine::fanout::Batch<Event>> for EventBatch {
    /// A fan-out batch (one group commit) as one batch of the read models: its last sequence
    /// number, and the time of its first accepted command (the wall clock if none).
    fn from(batch: matching_engine::fanout::Batch<Event>) -> Self {
        let time = batch
            .events
            .iter()
            .find_map(|e| match e {
                Event::Accepted { time, .. } => Some(*time),
                _ => None,
            })
            .unwrap_or(Timestamp(wall_clock_nanos()));
        EventBatch {
            seq: batch.last_seq,
            time,
            events: batch.events,
        }
    }
}

/// Where the core publishes event batches: the read models' input. Cloneable; `publish` blocks
/// when the read models are a full queue behind (backpressure on the engine, never loss).
#[derive(Debug, Clone)]
pub struct EventSink {
    pub(crate) tx: crossbeam::channel::Sender<SinkInput>,
    pub(crate) broken: Arc<std::sync::atomic::AtomicBool>,
}

/// What reaches the read models' thread through an [`EventSink`].
#[derive(Debug)]
pub(crate) enum SinkInput {
    /// One batch, in sequence order.
    Batch(EventBatch),
    /// From now on, read the engine's fan-out directly: every batch the fan-out publishes after
    /// this subscriber was made (no thread in between; see [`EventSink::attach`]).
    Attach(Box<matching_engine::fanout::Subscriber<Event>>),
}

impl EventSink {
    /// Marks the read models as broken: the core lost events (e.g. the fan-out dropped the
    /// subscriber). Handlers then answer `-1000` at once instead of waiting, and `/metrics`
    /// shows `mediator_read_model_broken 1` until a restart resynchronises.
    pub fn fail(&self) {
        self.broken.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Publishes one batch. Returns false when the API has shut down.
    pub fn publish(&self, batch: EventBatch) -> bool {
        self.tx.send(SinkInput::Batch(batch)).is_ok()
    }

    /// Hands the read models a fan-out subscriber of the engine: after the batches published
    /// before this call, they read every batch from it on their own thread ([`EventBatch::from`]
    /// the fan-out's), with no bridge thread between the engine and them. If they fall so far
    /// behind that the fan-out drops them, they mark themselves broken (as [`EventSink::fail`])
    /// and stop. Returns false when the API has shut down.
    pub fn attach(&self, sub: matching_engine::fanout::Subscriber<Event>) -> bool {
        self.tx.send(SinkInput::Attach(Box::new(sub))).is_ok()
    }
}

type Job = (Command, tokio::sync::oneshot::Sender<Reply>);

/// An in-process core for tests and single-process use without a journal: the [`Engine`] is
/// owned by one dedicated thread fed by a bounded channel (an actor; no lock around the engine).
/// It is **not durable**: replies do not wait for any fsync.
#[derive(Debug)]
pub struct LocalCore {
    tx: tokio::sync::mpsc::Sender<Job>,
    config: EngineConfig,
}

impl LocalCore {
    /// Starts the engine thread with an input queue of `capacity` commands. The engine's time is
    /// the wall clock, never going backwards.
    pub fn spawn(engine: Engine, sink: EventSink, capacity: usize) -> std::io::Result<Self> {
        let config = engine.config().clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Job>(capacity);
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let mut engine = engine;
                let mut out = Vec::with_capacity(64);
                while let Some((cmd, reply)) = rx.blocking_recv() {
                    let now = Timestamp(wall_clock_nanos().max(engine.now().0));
                    let before = engine.seq();
                    out.clear();
                    let result = engine.apply(&cmd, now, &mut out);
                    let seq = engine.seq();
                    if seq != before {
                        let batch = EventBatch {
                            seq,
                            time: engine.now(),
                            events: out.clone().into(),
                        };
                        if !sink.publish(batch) {
                            break;
                        }
                    }
                    let _ = reply.send(Reply {
                        result,
                        events: out.clone(),
                        seq,
                    });
                }
            })?;
        Ok(Self { tx, config })
    }
}

impl ExchangeCore for LocalCore {
    fn submit(&self, cmd: Command) -> BoxFuture<'_, Result<Reply, CoreError>> {
        Box::pin(async move {
            let (otx, orx) = tokio::sync::oneshot::channel();
            self.tx.try_send((cmd, otx)).map_err(|e| match e {
                tokio::sync::mpsc::error::TrySendError::Full(_) => CoreError::Busy,
                tokio::sync::mpsc::error::TrySendError::Closed(_) => CoreError::Stopped,
            })?;
            orx.await.map_err(|_| CoreError::Stopped)
        })
    }

    fn config(&self) -> &EngineConfig {
        &self.config
    }

    fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Nanoseconds since the Unix epoch (0 if the clock is before it).
pub fn wall_clock_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    wall_clock_nanos() / 1_000_000
}
