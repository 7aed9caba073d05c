//! The sequencer: many producer threads, one engine thread, group commit.
//!
//! ```text
//!  Producer ──try_submit──▶ ┌────────────────────┐      ┌──────────── engine thread ─────────────┐
//!  Producer ──try_submit──▶ │ bounded ArrayQueue │ ───▶ │ pop ≤ max_batch; per command: now =    │
//!  Producer ──try_submit──▶ └────────────────────┘      │ clock, apply, journal append if        │
//!     ▲  (full: Busy at once)                           │ accepted; then ONE sync (fdatasync);   │
//!     │                                                 │ then fan-out publish, then replies     │
//!     └──── per-producer reply box (bounded SPSC) ◀──── └────────────────────────────────────────┘
//! ```
//!
//! # Contract
//!
//! * [`Producer::try_submit`] never blocks: a full queue answers [`SubmitError::Busy`]
//!   ([`RejectCode::EngineBusy`]) at once, and such a command changes nothing.
//! * Every command that `try_submit` took gets exactly one [`Reply`], in submission order per
//!   producer, and each producer's commands are applied in its submission order.
//! * Durable mode: a reply (accepted **or** rejected) and the batch's events are released only
//!   after the batch's journal records are durable (one `fdatasync` per batch: group commit).
//!   A command is journaled iff it advanced the state's `seq` (see [`StateMachine::apply`]).
//! * The engine thread is the only one that touches the state; the state machine never reads a
//!   clock: `now` comes from the injected [`Clock`], made non-decreasing by the sequencer, and
//!   is journaled with the command.
//! * No `Mutex` or `RwLock` anywhere: queues are crossbeam `ArrayQueue`s, and blocking is done by
//!   parking threads (see `wait.rs`).
//!
//! # Replies without allocation
//!
//! Each [`Producer`] owns a reply box: a bounded queue of `max_in_flight` replies plus a parked
//! thread slot, created once with the producer. A submission carries an `Arc` to its producer's
//! box (a reference-count increment, no allocation), and a producer may have at most
//! `max_in_flight` unanswered submissions, so the engine's push into the box cannot fail. An
//! accepted [`Reply`] holds an [`Events`] view: the batch's shared `Arc<[E]>` (the same one
//! fan-out publishes, one allocation per batch) and the command's range in it. So steady state
//! allocates once per batch, never per command.
//!
//! [`SequencerHandle::submit_with`] is the other way in, for callers that cannot own a producer
//! (async tasks on a pool of threads): the submission carries a boxed function instead of a
//! reply box (one allocation per command), which the engine thread calls with the reply. The
//! API uses it so that no thread stands between its handlers and the engine: a command waiting
//! for the current group commit is already in the queue when the commit ends.
//!
//! # Snapshots
//!
//! In durable mode the engine thread takes a snapshot between two batches when
//! [`StoreConfig::snapshot_every`](crate::recovery::StoreConfig::snapshot_every) commands were
//! accepted since the last one, or when [`SequencerHandle::request_snapshot`] asked for one.
//! Submissions wait in the queue meanwhile (copy, encode, write and fsync of the whole state), so
//! latency shows a spike per snapshot; a failed snapshot is logged and counted, and the engine
//! goes on (the journal is intact).
//!
//! # Failure
//!
//! If the journal fails (write, `fdatasync`, encoding), the engine stops: the commands of the
//! failed batch that were accepted get [`Outcome::Indeterminate`] (they may or may not be in the
//! journal after a restart), queued commands get [`Outcome::NotApplied`], and
//! [`Sequencer::shutdown`] returns the error. A failed `fdatasync` is never retried (the kernel
//! may have dropped the dirty pages and report the retry as a success); nothing of the batch is
//! answered as accepted. The in-memory state is then ahead of the journal and is dropped;
//! [`SequencerHandle::has_stopped`] turns true, the process is expected to exit, and a restart
//! recovers with [`Store::open`] (which re-syncs the journal's tail before serving).

pub(crate) mod wait;

use crate::fanout::{Batch, FanOut, SubscribeError, Subscriber, Subscriptions};
use crate::journal::JournalError;
use crate::recovery::{Recovered, Store, StoreError};
use crate::units::Timestamp;
use crate::{RejectCode, StateMachine};
use crossbeam::queue::ArrayQueue;
use std::ops::Deref;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};
use wait::Waiter;

/// A source of time for the engine thread. The sequencer makes it non-decreasing.
pub trait Clock: Send + 'static {
    /// The current time.
    fn now(&mut self) -> Timestamp;
}

/// The system's wall clock, in nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&mut self) -> Timestamp {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// A deterministic clock for tests and simulation: starts at `next` and advances by `step` at
/// every reading.
#[derive(Clone, Copy, Debug)]
pub struct StepClock {
    /// The next reading.
    pub next: Timestamp,
    /// The increment per reading, in nanoseconds.
    pub step: u64,
}

impl Clock for StepClock {
    fn now(&mut self) -> Timestamp {
        let now = self.next;
        self.next = Timestamp(now.0.saturating_add(self.step));
        now
    }
}

/// Limits and options of a [`Sequencer`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SequencerConfig {
    /// Capacity of the submission queue shared by all producers.
    pub queue_capacity: usize,
    /// Most commands applied per group commit.
    pub max_batch: usize,
    /// Most unanswered submissions per producer (the size of its reply box).
    pub max_in_flight: usize,
    /// Most subscriptions waiting to be taken up by the engine thread.
    pub max_pending_subscriptions: usize,
    /// Take a snapshot at clean shutdown (durable mode only).
    pub snapshot_on_shutdown: bool,
}

impl Default for SequencerConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 4096,
            max_batch: 1024,
            max_in_flight: 1024,
            max_pending_subscriptions: 16,
            snapshot_on_shutdown: false,
        }
    }
}

/// Identifies a submission within its producer: 0, 1, 2, ... in submission order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Ticket(pub u64);

/// The events of one accepted command: a range of its batch's shared event slice.
#[derive(Debug)]
pub struct Events<E> {
    batch: Arc<[E]>,
    start: u32,
    end: u32,
}

impl<E> Events<E> {
    /// The whole batch the command was committed in.
    pub fn batch(&self) -> &Arc<[E]> {
        &self.batch
    }
}

impl<E> Deref for Events<E> {
    type Target = [E];
    fn deref(&self) -> &[E] {
        &self.batch[self.start as usize..self.end as usize]
    }
}

/// What became of a command.
#[derive(Debug)]
pub enum Outcome<E> {
    /// Applied and durable (or applied, in non-durable mode).
    Accepted {
        /// Its sequence number.
        seq: u64,
        /// Its events.
        events: Events<E>,
    },
    /// Rejected: the command itself changed nothing. If time-driven changes preceded the
    /// rejection (the state's `seq` advanced), they were journaled and their events published;
    /// otherwise events pushed before rejecting are discarded.
    Rejected(RejectCode),
    /// The engine stopped before applying it; nothing changed.
    NotApplied,
    /// It was applied but the journal failed before it was known durable: after a restart it may
    /// or may not be there.
    Indeterminate,
}

/// The answer to one submission.
#[derive(Debug)]
pub struct Reply<E> {
    /// Which submission of the producer.
    pub ticket: Ticket,
    /// What became of it.
    pub outcome: Outcome<E>,
}

/// Why a command was not taken. Such a command changes nothing and gets no [`Reply`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The submission queue is full: try again later.
    #[error("engine busy: the submission queue is full")]
    Busy,
    /// This producer has `max_in_flight` unanswered submissions: receive replies first.
    #[error("too many unanswered submissions from this producer")]
    InFlightLimit,
    /// The sequencer is shutting down or has stopped.
    #[error("the sequencer has stopped")]
    Stopped,
    /// [`Producer::submit_wait`] was called while earlier submissions are unanswered.
    #[error("earlier submissions of this producer are unanswered")]
    RepliesPending,
}

impl SubmitError {
    /// The wire reject code for a busy answer, `None` for the others.
    pub fn reject_code(self) -> Option<RejectCode> {
        match self {
            SubmitError::Busy | SubmitError::InFlightLimit => Some(RejectCode::EngineBusy),
            SubmitError::Stopped | SubmitError::RepliesPending => None,
        }
    }
}

/// Why the engine thread stopped abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SequencerError {
    /// The journal failed; the state was dropped (see the module docs).
    #[error("journal failed, engine stopped: {0}")]
    Journal(#[from] JournalError),
    /// The snapshot at shutdown failed (the journal is complete and durable).
    #[error("snapshot at shutdown failed: {0}")]
    Snapshot(#[from] StoreError),
    /// The engine thread could not be started.
    #[error("cannot start the engine thread: {0}")]
    Spawn(std::io::Error),
    /// The engine thread panicked (a bug in the state machine or here).
    #[error("the engine thread panicked")]
    Panicked,
}

/// Counters of the engine thread, updated once per batch.
#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    applied: AtomicU64,
    accepted: AtomicU64,
    syncs: AtomicU64,
    sync_nanos: AtomicU64,
    snapshots: AtomicU64,
    snapshot_failures: AtomicU64,
}

/// A reading of the engine thread's counters.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Metrics {
    /// Group commits (batches) done.
    pub batches: u64,
    /// Commands applied (accepted or rejected).
    pub applied: u64,
    /// Commands accepted.
    pub accepted: u64,
    /// Journal syncs (`fdatasync`) done.
    pub syncs: u64,
    /// Wall-clock time the engine thread spent in journal syncs (write and `fdatasync`), in
    /// nanoseconds: with `syncs`, how long the disk takes to make a group durable. It includes
    /// the journal's occasional preallocation (zeros written and synced ahead of the records).
    pub sync_nanos: u64,
    /// Snapshots written.
    pub snapshots: u64,
    /// Snapshots that failed (the journal was unaffected).
    pub snapshot_failures: u64,
}

struct ReplyBox<E> {
    queue: ArrayQueue<Reply<E>>,
    waiter: Waiter,
}

impl<E> ReplyBox<E> {
    fn push(&self, reply: Reply<E>) {
        self.push_quietly(reply);
        self.waiter.wake();
    }

    /// Pushes without waking the producer: the caller wakes it once it has pushed all it has
    /// for it ([`Waiter::wake`] after the condition became true, as the protocol asks).
    fn push_quietly(&self, reply: Reply<E>) {
        if self.queue.push(reply).is_err() {
            panic!("reply box overflow: the in-flight limit was not kept");
        }
    }
}

/// A function that takes one reply ([`SequencerHandle::submit_with`]).
type ReplyFn<E> = Box<dyn FnOnce(Reply<E>) + Send>;

/// Where a submission's reply goes.
enum ReplyTo<E> {
    /// A [`Producer`]'s reply box: pushed to, and its producer woken once per commit.
    Producer(Arc<ReplyBox<E>>),
    /// Called with the reply on the thread that answers (the engine's, or whoever drains the
    /// queue after it stopped).
    Call(ReplyFn<E>),
}

impl<E> ReplyTo<E> {
    /// Hands over the reply (a producer's box is woken: for one reply, not a batch of them).
    fn deliver(self, reply: Reply<E>) {
        match self {
            ReplyTo::Producer(b) => b.push(reply),
            ReplyTo::Call(f) => call(f, reply),
        }
    }
}

/// Calls a reply function; a panic in it is caught and logged, so that a caller's bug cannot
/// stop the engine thread (the function's reply is then lost to its caller alone).
fn call<E>(f: ReplyFn<E>, reply: Reply<E>) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || f(reply))).is_err() {
        tracing::error!("a reply function panicked; the engine goes on");
    }
}

struct Submission<S: StateMachine> {
    cmd: S::Command,
    ticket: Ticket,
    reply_to: ReplyTo<S::Event>,
}

struct Shared<S: StateMachine> {
    queue: ArrayQueue<Submission<S>>,
    /// Where the engine thread parks when the queue is empty.
    engine: Waiter,
    /// No new submissions; the engine drains the queue and stops.
    closing: AtomicBool,
    /// The engine thread takes nothing more from the queue.
    exited: AtomicBool,
    snapshot_requested: AtomicBool,
    /// The state failed its invariant check before a snapshot ([`StateMachine::validate`]).
    invariants_broken: AtomicBool,
    counters: Counters,
    config: SequencerConfig,
    subscriptions: Subscriptions<S::Event>,
}

impl<S: StateMachine> Shared<S> {
    /// Answers every queued submission with `NotApplied`. Only once the engine has exited.
    fn drain_stranded(&self) {
        debug_assert!(self.exited.load(SeqCst));
        while let Some(sub) = self.queue.pop() {
            sub.reply_to.deliver(Reply {
                ticket: sub.ticket,
                outcome: Outcome::NotApplied,
            });
        }
    }
}

/// A handle to a running sequencer, for making producers and subscribers from any thread.
pub struct SequencerHandle<S: StateMachine> {
    shared: Arc<Shared<S>>,
}

impl<S: StateMachine> Clone for SequencerHandle<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: StateMachine> std::fmt::Debug for SequencerHandle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequencerHandle")
            .field("metrics", &self.metrics())
            .finish_non_exhaustive()
    }
}

impl<S: StateMachine> SequencerHandle<S> {
    /// A new producer with its own reply box (allocated here, once).
    pub fn producer(&self) -> Producer<S> {
        Producer {
            shared: Arc::clone(&self.shared),
            replies: Arc::new(ReplyBox {
                queue: ArrayQueue::new(self.shared.config.max_in_flight),
                waiter: Waiter::default(),
            }),
            in_flight: 0,
            next_ticket: 0,
        }
    }

    /// Submits `cmd` without blocking and without a [`Producer`]: `reply` is called exactly
    /// once with its [`Reply`] (whose ticket is 0), on the engine thread after the commit (or on
    /// the thread that answers the queue after the engine stopped). For callers that cannot own
    /// a producer, such as async tasks: each submission goes straight into the engine's queue
    /// and its answer straight back, with no thread between. `reply` must be quick and must
    /// not block: the engine thread waits for it (hand the reply over, e.g. to a channel). A
    /// panic in it is caught and logged. An error means `cmd` was not taken, changed nothing,
    /// and `reply` is dropped uncalled. No in-flight limit applies: the queue's capacity bounds
    /// these submissions ([`SubmitError::Busy`] when full).
    pub fn submit_with(
        &self,
        cmd: S::Command,
        reply: impl FnOnce(Reply<S::Event>) + Send + 'static,
    ) -> Result<(), SubmitError> {
        let shared = &*self.shared;
        if shared.closing.load(SeqCst) {
            return Err(SubmitError::Stopped);
        }
        let submission = Submission {
            cmd,
            ticket: Ticket(0),
            reply_to: ReplyTo::Call(Box::new(reply)),
        };
        if shared.queue.push(submission).is_err() {
            return Err(SubmitError::Busy);
        }
        shared.engine.wake();
        fence(SeqCst);
        // As in `Producer::try_submit`: a taken submission always gets its reply.
        if shared.exited.load(SeqCst) {
            shared.drain_stranded();
        }
        Ok(())
    }

    /// Commands waiting in the engine's queue.
    pub fn queue_len(&self) -> usize {
        self.shared.queue.len()
    }

    /// Subscribes an event consumer with room for `capacity` batches (see [`crate::fanout`]).
    pub fn subscribe(&self, capacity: usize) -> Result<Subscriber<S::Event>, SubscribeError> {
        self.shared.subscriptions.subscribe(capacity)
    }

    /// Asks the engine thread for a snapshot after its current batch (durable mode only).
    pub fn request_snapshot(&self) {
        self.shared.snapshot_requested.store(true, SeqCst);
        self.shared.engine.wake();
    }

    /// The engine thread's counters.
    pub fn metrics(&self) -> Metrics {
        let c = &self.shared.counters;
        Metrics {
            batches: c.batches.load(Relaxed),
            applied: c.applied.load(Relaxed),
            accepted: c.accepted.load(Relaxed),
            syncs: c.syncs.load(Relaxed),
            sync_nanos: c.sync_nanos.load(Relaxed),
            snapshots: c.snapshots.load(Relaxed),
            snapshot_failures: c.snapshot_failures.load(Relaxed),
        }
    }

    /// The sequencer's configuration.
    pub fn config(&self) -> SequencerConfig {
        self.shared.config
    }

    /// True once the engine thread has stopped taking commands: after a shutdown, or on its own
    /// after a journal failure (see the module docs). A server watches this to exit instead of
    /// answering every request with "stopped".
    pub fn has_stopped(&self) -> bool {
        self.shared.exited.load(SeqCst)
    }

    /// True once the state failed its invariant check ([`StateMachine::validate`], run before
    /// every snapshot; the broken state is not snapshotted). The engine goes on (the journal is
    /// the record); a server stops commands that move money (a circuit breaker).
    pub fn invariants_broken(&self) -> bool {
        self.shared.invariants_broken.load(SeqCst)
    }
}

/// One producer: submits commands and receives their replies, in order. Not `Clone`: make one per
/// thread or connection with [`SequencerHandle::producer`].
pub struct Producer<S: StateMachine> {
    shared: Arc<Shared<S>>,
    replies: Arc<ReplyBox<S::Event>>,
    in_flight: usize,
    next_ticket: u64,
}

impl<S: StateMachine> std::fmt::Debug for Producer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("in_flight", &self.in_flight)
            .field("next_ticket", &self.next_ticket)
            .finish_non_exhaustive()
    }
}

impl<S: StateMachine> Producer<S> {
    /// Submits `cmd` without blocking. `Ok` means it will get exactly one [`Reply`]; an error
    /// means it was not taken and changed nothing.
    pub fn try_submit(&mut self, cmd: S::Command) -> Result<Ticket, SubmitError> {
        let shared = &*self.shared;
        if shared.closing.load(SeqCst) {
            return Err(SubmitError::Stopped);
        }
        if self.in_flight == shared.config.max_in_flight {
            return Err(SubmitError::InFlightLimit);
        }
        let ticket = Ticket(self.next_ticket);
        let submission = Submission {
            cmd,
            ticket,
            reply_to: ReplyTo::Producer(Arc::clone(&self.replies)),
        };
        if shared.queue.push(submission).is_err() {
            return Err(SubmitError::Busy);
        }
        self.next_ticket += 1;
        self.in_flight += 1;
        shared.engine.wake();
        fence(SeqCst);
        // Either the engine's exit drains the queue after our push, or we see it exited here and
        // drain it ourselves: a taken submission always gets its reply.
        if shared.exited.load(SeqCst) {
            shared.drain_stranded();
        }
        Ok(ticket)
    }

    /// The next reply if one has arrived.
    pub fn try_recv(&mut self) -> Option<Reply<S::Event>> {
        let reply = self.replies.queue.pop()?;
        self.in_flight -= 1;
        Some(reply)
    }

    /// The next reply, blocking until it arrives; `None` when no submission is unanswered.
    pub fn recv(&mut self) -> Option<Reply<S::Event>> {
        if self.in_flight == 0 {
            return None;
        }
        let reply = self.replies.waiter.wait(|| self.replies.queue.pop());
        self.in_flight -= 1;
        Some(reply)
    }

    /// Submits `cmd` and blocks until its reply. Does not block on a full queue: that is
    /// [`SubmitError::Busy`] as for [`try_submit`](Self::try_submit). Needs every earlier
    /// submission answered and received.
    pub fn submit_wait(&mut self, cmd: S::Command) -> Result<Reply<S::Event>, SubmitError> {
        if self.in_flight != 0 {
            return Err(SubmitError::RepliesPending);
        }
        let ticket = self.try_submit(cmd)?;
        let reply = self.recv().expect("one submission is in flight");
        debug_assert_eq!(reply.ticket, ticket);
        Ok(reply)
    }

    /// Submissions not yet answered and received.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

/// The sequencer: owns the engine thread. Dropping it shuts down as [`shutdown`](Self::shutdown)
/// does, discarding the result.
pub struct Sequencer<S: StateMachine> {
    handle: SequencerHandle<S>,
    thread: Option<JoinHandle<Result<S, SequencerError>>>,
}

impl<S: StateMachine> std::fmt::Debug for Sequencer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequencer")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl<S: StateMachine + Send + 'static> Sequencer<S> {
    /// Starts a durable sequencer on a recovered state: replies wait for `fdatasync`.
    pub fn durable(
        recovered: Recovered<S>,
        clock: impl Clock,
        config: SequencerConfig,
    ) -> Result<Self, SequencerError> {
        let last_time = recovered.report.last_time.unwrap_or_default();
        Self::spawn(
            recovered.state,
            Some(recovered.store),
            clock,
            last_time,
            config,
        )
    }

    /// Starts a sequencer without a journal, for benchmarks and tests: nothing is durable.
    pub fn volatile(
        state: S,
        clock: impl Clock,
        config: SequencerConfig,
    ) -> Result<Self, SequencerError> {
        Self::spawn(state, None, clock, Timestamp::default(), config)
    }

    fn spawn(
        state: S,
        store: Option<Store<S>>,
        clock: impl Clock,
        last_now: Timestamp,
        config: SequencerConfig,
    ) -> Result<Self, SequencerError> {
        assert!(config.queue_capacity > 0 && config.max_batch > 0 && config.max_in_flight > 0);
        if let Some(store) = &store {
            assert_eq!(
                store.next_seq(),
                state.seq() + 1,
                "store and state disagree"
            );
        }
        let fanout = FanOut::new(config.max_pending_subscriptions);
        let shared = Arc::new(Shared {
            queue: ArrayQueue::new(config.queue_capacity),
            engine: Waiter::default(),
            closing: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            snapshot_requested: AtomicBool::new(false),
            invariants_broken: AtomicBool::new(false),
            counters: Counters::default(),
            config,
            subscriptions: fanout.subscriptions(),
        });
        let engine = Engine {
            state,
            store,
            clock,
            last_now,
            events: Vec::with_capacity(config.max_batch * 4),
            outbox: Outbox {
                shared: Arc::clone(&shared),
                pending: Vec::with_capacity(config.max_batch),
                fanout,
            },
            to_wake: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                // Replies and the next group wait for this thread: see `sched_hint`.
                sched_hint::request_short_slice("engine");
                engine.run()
            })
            .map_err(SequencerError::Spawn)?;
        Ok(Self {
            handle: SequencerHandle { shared },
            thread: Some(thread),
        })
    }
}

impl<S: StateMachine> Sequencer<S> {
    /// A cloneable handle for other threads.
    pub fn handle(&self) -> &SequencerHandle<S> {
        &self.handle
    }

    /// A new producer (see [`SequencerHandle::producer`]).
    pub fn producer(&self) -> Producer<S> {
        self.handle.producer()
    }

    /// Subscribes an event consumer (see [`SequencerHandle::subscribe`]).
    pub fn subscribe(&self, capacity: usize) -> Result<Subscriber<S::Event>, SubscribeError> {
        self.handle.subscribe(capacity)
    }

    /// Stops taking submissions, applies and commits everything already taken, optionally takes a
    /// snapshot, joins the engine thread and gives back the final state.
    pub fn shutdown(mut self) -> Result<S, SequencerError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<S, SequencerError> {
        let shared = &self.handle.shared;
        shared.closing.store(true, SeqCst);
        shared.engine.wake();
        let thread = self.thread.take().expect("stopped once");
        thread.join().unwrap_or(Err(SequencerError::Panicked))
    }
}

impl<S: StateMachine> Drop for Sequencer<S> {
    fn drop(&mut self) {
        if self.thread.is_some() {
            if let Err(e) = self.stop() {
                tracing::error!(error = %e, "sequencer stopped with an error");
            }
        }
    }
}

/// Reply boxes to wake once each: when told to, or when dropped (a panic while replies are
/// pushed still wakes their producers, which then find what was pushed).
struct WakeOnDrop<E>(Vec<Arc<ReplyBox<E>>>);

impl<E> WakeOnDrop<E> {
    fn wake_all(&mut self) {
        for b in &self.0 {
            b.waiter.wake();
        }
        // Kept (for its allocation) but emptied of boxes: nothing to wake again on drop.
        self.0.clear();
    }
}

impl<E> Drop for WakeOnDrop<E> {
    fn drop(&mut self) {
        self.wake_all();
    }
}

/// A command applied in the current batch, waiting for the commit to be answered.
struct Pending<E> {
    reply_to: ReplyTo<E>,
    ticket: Ticket,
    outcome: PendingOutcome,
}

enum PendingOutcome {
    /// Being applied right now.
    Applying,
    Accepted {
        seq: u64,
        start: u32,
        end: u32,
    },
    Rejected(RejectCode),
}

/// Whatever must be answered even if the engine thread fails or panics: its `Drop` is the exit
/// protocol.
struct Outbox<S: StateMachine> {
    shared: Arc<Shared<S>>,
    pending: Vec<Pending<S::Event>>,
    fanout: FanOut<S::Event>,
}

impl<S: StateMachine> Drop for Outbox<S> {
    fn drop(&mut self) {
        // Normally empty; after a journal failure or a panic these were applied but not known
        // durable.
        for p in self.pending.drain(..) {
            let outcome = match p.outcome {
                PendingOutcome::Applying | PendingOutcome::Accepted { .. } => {
                    Outcome::Indeterminate
                }
                PendingOutcome::Rejected(code) => Outcome::Rejected(code),
            };
            p.reply_to.deliver(Reply {
                ticket: p.ticket,
                outcome,
            });
        }
        self.shared.closing.store(true, SeqCst);
        self.shared.exited.store(true, SeqCst);
        fence(SeqCst);
        self.shared.drain_stranded();
        self.fanout.close();
    }
}

struct Engine<S: StateMachine, C: Clock> {
    state: S,
    store: Option<Store<S>>,
    clock: C,
    last_now: Timestamp,
    events: Vec<S::Event>,
    outbox: Outbox<S>,
    /// The reply boxes a commit pushed to, each woken once (kept to reuse its allocation).
    to_wake: Vec<Arc<ReplyBox<S::Event>>>,
}

impl<S: StateMachine, C: Clock> Engine<S, C> {
    fn run(mut self) -> Result<S, SequencerError> {
        let shared = Arc::clone(&self.outbox.shared);
        loop {
            let first_seq = self.state.seq() + 1;
            self.apply_batch()?;
            if self.outbox.pending.is_empty() {
                if shared.closing.load(SeqCst) {
                    break;
                }
                shared.engine.wait(|| {
                    let ready = !shared.queue.is_empty()
                        || shared.closing.load(SeqCst)
                        || shared.snapshot_requested.load(SeqCst);
                    ready.then_some(())
                });
            } else {
                self.commit(first_seq)?;
            }
            self.maybe_snapshot();
        }
        if let Some(store) = &mut self.store {
            store.sync()?;
            if shared.config.snapshot_on_shutdown
                && store.last_snapshot_seq() < self.state.seq()
                && self.state.validate().is_ok()
            {
                store.snapshot(&self.state)?;
                shared.counters.snapshots.fetch_add(1, Relaxed);
            }
        }
        let Engine { state, outbox, .. } = self;
        drop(outbox);
        Ok(state)
    }

    /// Applies up to `max_batch` queued commands, journaling (buffering) the accepted ones.
    fn apply_batch(&mut self) -> Result<(), JournalError> {
        let shared = &*self.outbox.shared;
        while self.outbox.pending.len() < shared.config.max_batch {
            let Some(sub) = shared.queue.pop() else { break };
            let now = self.clock.now().max(self.last_now);
            self.last_now = now;
            // Registered before `apply`, so that even a panic inside it gets answered.
            self.outbox.pending.push(Pending {
                reply_to: sub.reply_to,
                ticket: sub.ticket,
                outcome: PendingOutcome::Applying,
            });
            let start = self.events.len();
            let seq_before = self.state.seq();
            let result = self.state.apply(&sub.cmd, now, &mut self.events);
            let seq = self.state.seq();
            assert!(
                seq == seq_before || seq == seq_before + 1,
                "a command advances seq by at most one"
            );
            // Journaled iff it changed the state. An accepted command that changed nothing (an
            // idempotent duplicate) is not journaled; a rejected one that changed something (the
            // time-driven expiries that precede it) is, and its events are published.
            let changed = seq == seq_before + 1;
            let outcome = match result {
                Ok(()) => PendingOutcome::Accepted {
                    seq,
                    start: u32::try_from(start).expect("fewer than 2^32 events per batch"),
                    end: u32::try_from(self.events.len())
                        .expect("fewer than 2^32 events per batch"),
                },
                Err(code) => {
                    if !changed {
                        self.events.truncate(start);
                    }
                    PendingOutcome::Rejected(code)
                }
            };
            let accepted_seq = changed.then_some(seq);
            self.outbox
                .pending
                .last_mut()
                .expect("pushed above")
                .outcome = outcome;
            if let (Some(seq), Some(store)) = (accepted_seq, &mut self.store) {
                store.append(seq, now, &sub.cmd)?;
            }
        }
        Ok(())
    }

    /// Makes the batch durable with one sync, then answers it and publishes its events.
    fn commit(&mut self, first_seq: u64) -> Result<(), JournalError> {
        let shared = &*self.outbox.shared;
        let last_seq = self.state.seq();
        let accepted = last_seq + 1 - first_seq;
        if let (true, Some(store)) = (accepted > 0, &mut self.store) {
            let t0 = std::time::Instant::now();
            store.sync()?;
            let took = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            shared.counters.syncs.fetch_add(1, Relaxed);
            shared.counters.sync_nanos.fetch_add(took, Relaxed);
        }
        // One allocation per batch, shared by the replies and every consumer.
        let events: Arc<[S::Event]> = Arc::from(&self.events[..]);
        self.events.clear();
        // Count before answering: a producer that holds its reply must see it counted.
        let c = &shared.counters;
        c.batches.fetch_add(1, Relaxed);
        c.applied
            .fetch_add(self.outbox.pending.len() as u64, Relaxed);
        c.accepted.fetch_add(accepted, Relaxed);
        if accepted > 0 {
            self.outbox.fanout.publish(&Batch {
                first_seq,
                last_seq,
                events: Arc::clone(&events),
            });
        }
        // Every reply of the batch is pushed first and each producer woken once, after its last
        // one: woken per reply, a producer took the first, slept again and was woken again
        // (four sleeps per group commit for the API's one submitter, in the load test). The
        // guard wakes them even if this loop panics.
        let mut to_wake = WakeOnDrop(std::mem::take(&mut self.to_wake));
        for p in &self.outbox.pending {
            if let ReplyTo::Producer(b) = &p.reply_to {
                if !to_wake.0.iter().any(|w| Arc::ptr_eq(w, b)) {
                    to_wake.0.push(Arc::clone(b));
                }
            }
        }
        for p in self.outbox.pending.drain(..) {
            let outcome = match p.outcome {
                PendingOutcome::Accepted { seq, start, end } => Outcome::Accepted {
                    seq,
                    events: Events {
                        batch: Arc::clone(&events),
                        start,
                        end,
                    },
                },
                PendingOutcome::Rejected(code) => Outcome::Rejected(code),
                PendingOutcome::Applying => unreachable!("every command is applied before commit"),
            };
            let reply = Reply {
                ticket: p.ticket,
                outcome,
            };
            match p.reply_to {
                ReplyTo::Producer(b) => b.push_quietly(reply),
                ReplyTo::Call(f) => call(f, reply),
            }
        }
        to_wake.wake_all();
        self.to_wake = std::mem::take(&mut to_wake.0);
        Ok(())
    }

    /// Takes a snapshot when due or requested. A failed snapshot is logged and counted; the
    /// journal is unaffected, so the engine goes on.
    fn maybe_snapshot(&mut self) {
        let shared = &*self.outbox.shared;
        let requested = shared.snapshot_requested.swap(false, SeqCst);
        let Some(store) = &mut self.store else {
            return;
        };
        let seq = self.state.seq();
        let due = store.snapshot_due(seq) || (requested && store.last_snapshot_seq() < seq);
        if !due {
            return;
        }
        // The full invariant check, in release builds too: a state that fails it is never
        // written as the newest snapshot, and the breaker opens.
        if let Err(e) = self.state.validate() {
            shared.counters.snapshot_failures.fetch_add(1, Relaxed);
            if !shared.invariants_broken.swap(true, SeqCst) {
                tracing::error!(seq, error = %e, "INVARIANT CHECK FAILED before a snapshot: not snapshotting");
            }
            return;
        }
        match store.snapshot(&self.state) {
            Ok(path) => {
                shared.counters.snapshots.fetch_add(1, Relaxed);
                tracing::info!(seq, path = %path.display(), "snapshot written");
            }
            Err(e) => {
                shared.counters.snapshot_failures.fetch_add(1, Relaxed);
                tracing::error!(seq, error = %e, "snapshot failed");
            }
        }
    }
}
