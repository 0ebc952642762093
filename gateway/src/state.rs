//! The gateway's shared running state: the current snapshot (swapped on reload), the
//! shutdown signals, the task tracker and the upstream connection pool. Every stage
//! reads it; only the control loop (`control`) changes it.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::forward::UpstreamConns;
use crate::plugin::PluginHost;
use crate::snapshot::{LoadError, Snapshot};

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
}

impl Gateway {
    /// Loads the first snapshot of `config` (compiling its plugins) and the state around
    /// it. Must run inside the tokio runtime.
    pub async fn load(config: Config) -> Result<Gateway, LoadError> {
        let plugin_host = OnceLock::new();
        let first = load_snapshot(&plugin_host, config, None).await?;
        Ok(Gateway {
            snapshot: ArcSwap::from_pointee(first),
            conns: Arc::default(),
            stopping: CancellationToken::new(),
            closing: CancellationToken::new(),
            tracker: TaskTracker::new(),
            plugin_host,
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

    /// Re-reads the config file and swaps in a new snapshot; on error the old one keeps
    /// serving. New plugins are compiled and initialised here, off the request path.
    /// Listener changes need a restart.
    pub async fn reload(&self, path: &Path) {
        let old = self.snapshot();
        let new = match self.next_snapshot(path, &old).await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!(error = %e, "reload failed; still serving the previous config");
                return;
            }
        };
        self.snapshot.store(new);
        old.retire();
        tracing::info!(config = %path.display(), "config reloaded");
    }

    /// The snapshot a reload of `path` would publish after `old`.
    async fn next_snapshot(&self, path: &Path, old: &Snapshot) -> anyhow::Result<Snapshot> {
        let config = Config::load(path)?;
        let same_listeners = config.listeners.len() == old.config.listeners.len()
            && config
                .listeners
                .iter()
                .zip(&old.config.listeners)
                .all(|(a, b)| a.name == b.name && a.bind == b.bind);
        if !same_listeners {
            tracing::warn!("listener changes take effect on restart; other changes apply now");
        }
        Ok(load_snapshot(&self.plugin_host, config, Some(old)).await?)
    }
}

/// Builds a snapshot, creating the plugin host first if the config is the first to need
/// one (no wasmtime engine exists for configs without plugins).
async fn load_snapshot(
    host: &OnceLock<PluginHost>,
    config: Config,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, LoadError> {
    if !config.plugins.is_empty() && host.get().is_none() {
        let _ = host.set(PluginHost::new().map_err(LoadError::Plugin)?);
    }
    Snapshot::load(config, previous, host.get()).await
}
