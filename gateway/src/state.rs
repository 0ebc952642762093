//! The gateway's shared running state: the current snapshot (swapped on reload), the
//! shutdown signals, the task tracker, the
//! upstream connection pool, the counters and the reload history. Every stage reads it;
//! only the control loop (`control`) changes it.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::forward::UpstreamConns;
use crate::limit::Limiter;
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::plugin::PluginHost;
use crate::snapshot::{LoadError, Shared, Snapshot};
use crate::sync::Hold;

/// State shared by every connection of the process.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    conns: Arc<UpstreamConns>,
    /// Cancelled when shutdown starts: stop accepting, finish in-flight requests.
    stopping: CancellationToken,
    /// Cancelled when the drain deadline passes: close the remaining tunnels.
    closing: CancellationToken,
    tracker: TaskTracker,
    /// The wasmtime engine, created the first time a config lists plugins.
    plugin_host: OnceLock<PluginHost>,
    metrics: Arc<Metrics>,
    /// Tenants' and client addresses' limit state, kept across reloads.
    limiter: Arc<Limiter>,
    /// When the process started serving.
    pub started: SystemTime,
    reloads: Mutex<VecDeque<ReloadEvent>>,
    commands: Option<mpsc::Sender<Command>>,
}

/// Reload events kept for `/status` and the status page.
const RELOAD_HISTORY: usize = 16;

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The first load, at start-up.
    Start,
    /// SIGHUP.
    Signal,
    /// `POST /reload` on the admin listener.
    Admin,
    /// A watched file changed.
    Watch,
}

impl Trigger {
    /// The name shown in logs and `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Signal => "sighup",
            Trigger::Admin => "admin",
            Trigger::Watch => "watch",
        }
    }
}

/// One reload, as `/status` reports it.
#[derive(Debug, Clone)]
pub struct ReloadEvent {
    /// When it finished.
    pub at: SystemTime,
    /// What started it.
    pub trigger: Trigger,
    /// The generation serving afterwards.
    pub generation: u64,
    /// Why it was refused (the previous snapshot kept serving).
    pub error: Option<String>,
    /// How long it took.
    pub duration: std::time::Duration,
}

/// A request to the control loop, from the admin listener or the file watch.
#[derive(Debug)]
pub enum Command {
    /// Reload the config; the result goes back on `reply`.
    Reload {
        /// What asked for it.
        trigger: Trigger,
        /// Gets the reload's outcome.
        reply: Option<oneshot::Sender<ReloadEvent>>,
    },
    /// Stop accepting and drain, as SIGTERM does.
    Drain,
}

impl Gateway {
    /// Loads the first snapshot of `config` (compiling its plugins) and the state around
    /// it, with no listeners (tests serve streams themselves). Must run inside the tokio
    /// runtime.
    pub async fn load(config: Config) -> Result<Gateway, LoadError> {
        Gateway::start(config, Vec::new(), Arc::default(), None).await
    }

    /// Loads the first snapshot of `config` with these `listeners`; `commands` reaches
    /// the control loop.
    pub async fn start(
        config: Config,
        listeners: Vec<(Arc<str>, Arc<Listener>)>,
        metrics: Arc<Metrics>,
        commands: Option<mpsc::Sender<Command>>,
    ) -> Result<Gateway, LoadError> {
        let plugin_host = OnceLock::new();
        let limiter = Arc::default();
        let shared = Shared {
            metrics: &metrics,
            limiter: &limiter,
        };
        let first = load_snapshot(&plugin_host, config, None, shared, listeners, 1).await?;
        Ok(Gateway {
            snapshot: ArcSwap::from_pointee(first),
            conns: Arc::default(),
            stopping: CancellationToken::new(),
            closing: CancellationToken::new(),
            tracker: TaskTracker::new(),
            plugin_host,
            metrics,
            limiter,
            started: SystemTime::now(),
            reloads: Mutex::default(),
            commands,
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Pooled upstream connections for plain requests.
    pub fn upstream_conns(&self) -> &Arc<UpstreamConns> {
        &self.conns
    }

    /// Cancelled when shutdown begins.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    /// Cancelled when live tunnels must close.
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    /// Tracks connection and tunnel tasks, so shutdown can wait for them.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// The process's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Tenants' and client addresses' limit state.
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// Asks the control loop to do something; false when it is not listening.
    pub fn command(&self, c: Command) -> bool {
        self.commands
            .as_ref()
            .is_some_and(|tx| tx.try_send(c).is_ok())
    }

    /// Builds the snapshot that would follow the current one for `config` (plugins whose
    /// component and spec are unchanged are kept, servers keep their live state), off the
    /// request path. Nothing changes until [`Gateway::publish`].
    pub async fn prepare(
        &self,
        config: Config,
        listeners: Vec<(Arc<str>, Arc<Listener>)>,
    ) -> Result<Snapshot, LoadError> {
        let old = self.snapshot();
        let generation = old.generation + 1;
        load_snapshot(
            &self.plugin_host,
            config,
            Some(&old),
            Shared {
                metrics: &self.metrics,
                limiter: &self.limiter,
            },
            listeners,
            generation,
        )
        .await
    }

    /// Makes `next` the snapshot new connections and requests use; the old one stops its
    /// health checks and is freed when the last connection holding it ends.
    pub fn publish(&self, next: Snapshot) {
        let old = self.snapshot.swap(Arc::new(next));
        old.retire();
    }

    /// Remembers a reload's outcome for `/status`.
    pub fn record_reload(&self, event: ReloadEvent) {
        let counter = match (&event.error, event.trigger) {
            (_, Trigger::Start) => None,
            (None, _) => Some(&self.metrics.reloads_ok),
            (Some(_), _) => Some(&self.metrics.reloads_failed),
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let mut r = self.reloads.hold();
        if r.len() == RELOAD_HISTORY {
            r.pop_back();
        }
        r.push_front(event);
    }

    /// Recent reloads, newest first.
    pub fn reloads(&self) -> Vec<ReloadEvent> {
        let r = self.reloads.hold();
        r.iter().cloned().collect()
    }
}

/// Builds a snapshot, creating the plugin host first if the config is the first to need
/// one (no wasmtime engine exists for configs without plugins).
async fn load_snapshot(
    host: &OnceLock<PluginHost>,
    config: Config,
    previous: Option<&Snapshot>,
    shared: Shared<'_>,
    listeners: Vec<(Arc<str>, Arc<Listener>)>,
    generation: u64,
) -> Result<Snapshot, LoadError> {
    if !config.plugins.is_empty() && host.get().is_none() {
        let _ = host.set(PluginHost::new().map_err(LoadError::Plugin)?);
    }
    let mut s = Snapshot::load(config, previous, host.get(), shared).await?;
    s.listeners = listeners;
    s.generation = generation;
    Ok(s)
}
