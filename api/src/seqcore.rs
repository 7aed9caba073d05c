//! [`ExchangeCore`] over the durable sequencer ([`matching_engine::sequencer`]): what
//! `mediator serve` runs.
//!
//! * **Submissions.** An async handler puts its command straight into the engine's queue
//!   ([`SequencerHandle::submit_with`]; full: `Busy` at once) with a reply function that the
//!   engine thread calls after the group commit's `fdatasync`: a oneshot send that wakes the
//!   handler's task. No thread in between: a command waiting for the current commit's sync is
//!   already in the queue when it ends, so the engine starts the next group at once (a
//!   submitter thread between the two took commands only after it had handed out the previous
//!   group's replies, and the engine idled meanwhile), and concurrent requests share group
//!   commits.
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
use matching_engine::sequencer::{Outcome, SequencerHandle, SubmitError};
use matching_engine::{Command, Engine, EngineConfig, Event};

/// The sequencer as the API's core.
#[derive(Debug)]
pub struct SequencerCore {
    config: EngineConfig,
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
    /// Attaches the read models to the engine's fan-out. `subscriber_capacity` is the fan-out
    /// queue of the read models, in batches. Commands wait in the sequencer's own queue
    /// ([`matching_engine::sequencer::SequencerConfig::queue_capacity`]).
    pub fn start(
        handle: &SequencerHandle<Engine>,
        config: EngineConfig,
        sink: EventSink,
        subscriber_capacity: usize,
    ) -> Result<Self, SeqCoreError> {
        let sub = handle.subscribe(subscriber_capacity)?;
        if !sink.attach(sub) {
            tracing::error!("the read models stopped before the engine's core started");
            sink.fail();
        }
        Ok(Self {
            config,
            handle: handle.clone(),
        })
    }
}

impl ExchangeCore for SequencerCore {
    fn submit(&self, cmd: Command) -> BoxFuture<'_, Result<Reply, CoreError>> {
        Box::pin(async move {
            let (otx, orx) = tokio::sync::oneshot::channel();
            // Called on the engine thread after the group commit: a send and a task wake-up.
            let reply = move |r: matching_engine::sequencer::Reply<Event>| {
                let _ = otx.send(to_reply(r.outcome));
            };
            match self.handle.submit_with(cmd, reply) {
                Ok(()) => {}
                Err(SubmitError::Busy | SubmitError::InFlightLimit) => return Err(CoreError::Busy),
                Err(_) => return Err(CoreError::Stopped),
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
        self.handle.queue_len()
    }
}
