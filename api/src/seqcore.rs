//! [`ExchangeCore`] over the durable sequencer ([`matching_engine::sequencer`]): what
//! `mediator serve` runs.
//!
//! * **Submissions.** One submitter thread owns a [`Producer`]; async handlers hand it
//!   `(command, reply slot)` through a bounded channel (full: `Busy` at once). It pipelines:
//!   submits everything queued, then waits for replies (which come after the group commit's
//!   `fdatasync`), so concurrent requests share group commits.
//! * **Events.** The read models' thread reads a fan-out [`Subscriber`] itself
//!   ([`EventSink::attach`]): no thread between the engine and the read models, so a group
//!   commit wakes one thread less on its way to the answers. If the read models fall so far
//!   behind that the fan-out drops them, they log it and stop; the API then answers `-1000`
//!   (read model lag) until restarted. Size `subscriber_capacity` for bursts.
//! * **Start-up.** The sequencer does not republish journal replay: recover the engine through
//!   the history's floor, feeding the replay to the read models
//!   ([`crate::readmodel::ReadModel::regenerate`]), give the store the history's floor
//!   ([`crate::readmodel::ReadModel::history_floor`]), then start the sequencer and this core
//!   ([`crate::start_node`] does all of it).

use crate::core::{BoxFuture, CoreError, EventSink, ExchangeCore, Reply};
use matching_engine::sequencer::{Outcome, Producer, SequencerHandle, SubmitError};
use matching_engine::{Command, Engine, EngineConfig, Event};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

type Job = (
    Command,
    tokio::sync::oneshot::Sender<Result<Reply, CoreError>>,
);

/// The sequencer as the API's core.
#[derive(Debug)]
pub struct SequencerCore {
    tx: crossbeam::channel::Sender<Job>,
    config: EngineConfig,
    waiting: Arc<AtomicUsize>,
    handle: SequencerHandle<Engine>,
}

/// Why the core could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SeqCoreError {
    /// Subscribing to the fan-out failed.
    #[error("subscribing to engine events: {0}")]
    Subscribe(#[from] matching_engine::fanout::SubscribeError),
    /// A thread could not be started.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn to_reply(outcome: Outcome<Event>) -> Result<Reply, CoreError> {
    match outcome {
        Outcome::Accepted { seq, events } => Ok(Reply {
            result: Ok(()),
            events: events.to_vec(),
            seq,
        }),
        // The rejected command changed nothing; time-driven expiries that preceded it reach the
        // read models through the fan-out, and nobody waits for them.
        Outcome::Rejected(code) => Ok(Reply {
            result: Err(code),
            events: Vec::new(),
            seq: 0,
        }),
        // The engine stopped before applying it: nothing changed (as a full queue: not taken).
        Outcome::NotApplied => Err(CoreError::Busy),
        // Applied, but the journal failed before it was known durable: unknown.
        Outcome::Indeterminate => Err(CoreError::Stopped),
    }
}

impl SequencerCore {
    /// Starts the submitter thread and attaches the read models to the engine's fan-out. `queue` bounds the commands waiting for the
    /// submitter; `subscriber_capacity` is the fan-out queue of the read models, in batches.
    pub fn start(
        handle: &SequencerHandle<Engine>,
        config: EngineConfig,
        sink: EventSink,
        queue: usize,
        subscriber_capacity: usize,
    ) -> Result<Self, SeqCoreError> {
        let sub = handle.subscribe(subscriber_capacity)?;
        if !sink.attach(sub) {
            tracing::error!("the read models stopped before the engine's core started");
            sink.fail();
        }
        let (tx, rx) = crossbeam::channel::bounded::<Job>(queue);
        let producer = handle.producer();
        let waiting = Arc::new(AtomicUsize::new(0));
        let w = waiting.clone();
        std::thread::Builder::new()
            .name("api-submit".into())
            .spawn(move || {
                sched_hint::request_short_slice("api-submit");
                submitter(producer, rx, w)
            })?;
        Ok(Self {
            tx,
            config,
            waiting,
            handle: handle.clone(),
        })
    }
}

fn submitter(
    mut producer: Producer<Engine>,
    rx: crossbeam::channel::Receiver<Job>,
    waiting: Arc<AtomicUsize>,
) {
    let mut in_flight: VecDeque<tokio::sync::oneshot::Sender<Result<Reply, CoreError>>> =
        VecDeque::new();
    let mut closed = false;
    loop {
        if in_flight.is_empty() {
            if closed {
                return;
            }
            match rx.recv() {
                Ok(job) => submit(&mut producer, job, &mut in_flight, &waiting),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(job) => submit(&mut producer, job, &mut in_flight, &waiting),
                Err(crossbeam::channel::TryRecvError::Empty) => break,
                Err(crossbeam::channel::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if !in_flight.is_empty() {
            if let Some(r) = producer.recv() {
                answer(&mut in_flight, r.outcome);
            }
            while let Some(r) = producer.try_recv() {
                answer(&mut in_flight, r.outcome);
            }
        }
    }
}

fn answer(
    in_flight: &mut VecDeque<tokio::sync::oneshot::Sender<Result<Reply, CoreError>>>,
    outcome: Outcome<Event>,
) {
    if let Some(tx) = in_flight.pop_front() {
        let _ = tx.send(to_reply(outcome));
    }
}

fn submit(
    producer: &mut Producer<Engine>,
    (cmd, tx): Job,
    in_flight: &mut VecDeque<tokio::sync::oneshot::Sender<Result<Reply, CoreError>>>,
    waiting: &AtomicUsize,
) {
    waiting.fetch_sub(1, Ordering::Relaxed);
    loop {
        // A clone per attempt: `try_submit` consumes the command even when it refuses it.
        match producer.try_submit(cmd.clone()) {
            Ok(_) => {
                in_flight.push_back(tx);
                return;
            }
            Err(SubmitError::InFlightLimit) => {
                // Make room: take one reply (it will come: each in-flight command gets one).
                if let Some(r) = producer.recv() {
                    answer(in_flight, r.outcome);
                }
            }
            Err(SubmitError::Busy) => {
                let _ = tx.send(Err(CoreError::Busy));
                return;
            }
            Err(_) => {
                let _ = tx.send(Err(CoreError::Stopped));
                return;
            }
        }
    }
}

impl ExchangeCore for SequencerCore {
    fn submit(&self, cmd: Command) -> BoxFuture<'_, Result<Reply, CoreError>> {
        Box::pin(async move {
            let (otx, orx) = tokio::sync::oneshot::channel();
            self.waiting.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.tx.try_send((cmd, otx)) {
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                return Err(match e {
                    crossbeam::channel::TrySendError::Full(_) => CoreError::Busy,
                    crossbeam::channel::TrySendError::Disconnected(_) => CoreError::Stopped,
                });
            }
            orx.await.map_err(|_| CoreError::Stopped)?
        })
    }

    fn config(&self) -> &EngineConfig {
        &self.config
    }

    fn invariants_broken(&self) -> bool {
        self.handle.invariants_broken()
    }

    fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}
