//! The engine and the API together, durable, in one call: what `mediator serve` needs besides
//! the custody service, the listener and signal handling.
//!
//! Layout under the data directory: `journal/` (engine journal and snapshots) and `api/`
//! (`api.sqlite`, `api-master.key`, `admin-key.json`).

use crate::core::ExchangeCore;
use crate::seqcore::{SeqCoreError, SequencerCore};
use crate::state::{AdminKeyFile, ApiConfig, AppState, SetupError};
use matching_engine::recovery::{RecoveryReport, Store, StoreConfig};
use matching_engine::sequencer::{Sequencer, SequencerConfig, SequencerError, SystemClock};
use matching_engine::{Engine, EngineConfig};
use std::path::Path;
use std::sync::Arc;

/// A running engine with its API state.
#[derive(Debug)]
pub struct Node {
    /// The API's state: pass it to [`crate::serve`] or [`crate::app()`].
    pub state: AppState,
    /// The sequencer (engine thread, journal).
    pub sequencer: Sequencer<Engine>,
    /// Where the admin key is.
    pub admin_key: AdminKeyFile,
    /// What journal recovery found.
    pub recovery: RecoveryReport,
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The engine configuration is invalid.
    #[error("engine configuration: {0}")]
    Config(String),
    /// Journal recovery failed.
    #[error(transparent)]
    Recovery(#[from] matching_engine::recovery::RecoveryError),
    /// The API's storage.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The sequencer.
    #[error(transparent)]
    Sequencer(#[from] SequencerError),
    /// The API's core.
    #[error(transparent)]
    Core(#[from] SeqCoreError),
}

/// Knobs of [`start_node`].
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Markets and assets.
    pub engine: EngineConfig,
    /// The API.
    pub api: ApiConfig,
    /// Snapshots.
    pub store: StoreConfig,
    /// The sequencer. Its queue is where the API's commands wait for the engine (full: the
    /// API answers busy); by default [`API_QUEUE`].
    pub sequencer: SequencerConfig,
}

/// The sequencer's queue capacity under the API: what a burst of requests may queue before
/// the API answers busy (about a second of orders at full rate).
pub const API_QUEUE: usize = 65_536;

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            engine: EngineConfig::default(),
            api: ApiConfig::default(),
            store: StoreConfig::default(),
            sequencer: SequencerConfig {
                queue_capacity: API_QUEUE,
                ..SequencerConfig::default()
            },
        }
    }
}

/// Opens the API in `data_dir/api`, recovers the engine from `data_dir/journal` through the
/// floor of the API's SQLite history and rebuilds the read models and the history rows of every
/// command after it (see [`crate::readmodel`]), starts the durable sequencer (its store keeps
/// the snapshots and journal back to the history's floor) and the API's core, and makes sure an
/// admin key exists.
pub fn start_node(data_dir: &Path, cfg: NodeConfig) -> Result<Node, NodeError> {
    start_node_with(data_dir, cfg, |core| core)
}

/// [`start_node`], with the API's core passed through `wrap` before the API uses it: the seam
/// for a test that puts a fault injector (a core that loses replies) between the API and the
/// durable engine, and otherwise starts exactly as `mediator serve` does.
pub fn start_node_with(
    data_dir: &Path,
    cfg: NodeConfig,
    wrap: impl FnOnce(Arc<dyn ExchangeCore>) -> Arc<dyn ExchangeCore>,
) -> Result<Node, NodeError> {
    cfg.engine
        .validate()
        .map_err(|e| NodeError::Config(e.to_string()))?;
    let (pending, sink) = crate::state::open(&data_dir.join("api"), &cfg.engine, cfg.api)?;
    let rm = pending.read_model();
    let mut regen = rm.regenerate().map_err(SetupError::from)?;
    let genesis_cfg = cfg.engine.clone();
    let mut recovered = Store::open_from(
        &data_dir.join("journal"),
        cfg.store,
        move || Engine::new(genesis_cfg).expect("validated above"),
        regen.floor(),
        |step| regen.visit(step),
    )?;
    let regenerated = regen.finish(&recovered.state).map_err(SetupError::from)?;
    if regenerated > 0 {
        tracing::info!(regenerated, "history regenerated from the journal");
    }
    // The engine's full invariant check after recovery, in release builds too: a state that
    // fails it starts with the circuit breaker open.
    if let Err(e) = matching_engine::StateMachine::validate(&recovered.state) {
        rm.trip_engine(format!(
            "the recovered state at seq {} fails its invariants: {e}",
            recovered.state.seq()
        ));
    }
    recovered.store.retain_from(rm.history_floor());
    let recovery = recovered.report.clone();
    let sequencer = Sequencer::durable(recovered, SystemClock, cfg.sequencer)?;
    let core = SequencerCore::start(sequencer.handle(), cfg.engine, sink, 1 << 16)?;
    let state = pending.start(wrap(Arc::new(core)));
    let admin_key = state.ensure_admin_key()?;
    Ok(Node {
        state,
        sequencer,
        admin_key,
        recovery,
    })
}

impl Node {
    /// Stops the engine after the API stopped: commits everything taken, then joins the engine
    /// thread. Call after [`crate::serve`] returned.
    pub fn shutdown(self) -> Result<(), SequencerError> {
        let applier = self.state.take_read_model_thread();
        drop(self.state);
        let r = self.sequencer.shutdown().map(drop);
        // The fan-out closed: the read models write their last history rows and stop.
        if let Some(h) = applier {
            if h.join().is_err() {
                tracing::error!("the read-model thread panicked");
            }
        }
        r
    }
}
