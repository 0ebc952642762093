//! The running gateway: binds listeners, publishes snapshots through `arc-swap`, reloads
//! on SIGHUP and drains on SIGTERM/SIGINT.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept;
use crate::config::{Config, LogFormat};
use crate::forward::UpstreamConns;
use crate::plugin::{PluginError, PluginHost};
use crate::snapshot::Snapshot;

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
    pub async fn reload(&self, path: &std::path::Path) {
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
    async fn next_snapshot(
        &self,
        path: &std::path::Path,
        old: &Snapshot,
    ) -> anyhow::Result<Snapshot> {
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
) -> Result<Snapshot, PluginError> {
    if !config.plugins.is_empty() && host.get().is_none() {
        let _ = host.set(PluginHost::new()?);
    }
    Snapshot::load(config, previous, host.get()).await
}

/// Runs the gateway until SIGTERM/SIGINT, then drains tunnels for the configured grace.
pub async fn run(path: PathBuf, config: Config) -> anyhow::Result<()> {
    let grace = config.shutdown_grace;
    // Handlers first: a signal that arrives once `listening` is printed must be handled,
    // not take its default action and kill the process.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    let mut bound = Vec::new();
    for l in &config.listeners {
        let listener = accept::bind(l.bind)
            .map_err(|e| anyhow::anyhow!("listener `{}`: cannot bind {}: {e}", l.name, l.bind))?;
        bound.push((l.name.clone(), l.max_connections, listener));
    }
    let plugin_host = OnceLock::new();
    let first = load_snapshot(&plugin_host, config, None).await?;
    let gw = Arc::new(Gateway {
        snapshot: ArcSwap::from_pointee(first),
        conns: Arc::default(),
        stopping: CancellationToken::new(),
        closing: CancellationToken::new(),
        tracker: TaskTracker::new(),
        plugin_host,
    });
    let accepting = TaskTracker::new();
    {
        let mut out = std::io::stdout().lock();
        for (name, max, listener) in bound {
            let addr = listener.local_addr()?;
            writeln!(out, "listening {name} {addr}")?;
            tracing::info!(listener = %name, %addr, "listening");
            accepting.spawn(accept::run(gw.clone(), name.into(), listener, max));
        }
        out.flush()?;
    }
    accepting.close();

    loop {
        tokio::select! {
            _ = hup.recv() => gw.reload(&path).await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    tracing::info!(grace = ?grace, "shutting down: no new connections, draining tunnels");
    gw.stopping.cancel();
    accepting.wait().await;
    gw.tracker.close();
    if tokio::time::timeout(grace, gw.tracker.wait())
        .await
        .is_err()
    {
        tracing::info!(
            open = gw.tracker.len(),
            "drain deadline passed: closing tunnels"
        );
        gw.closing.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), gw.tracker.wait()).await;
    }
    gw.snapshot().retire();
    tracing::info!("stopped");
    Ok(())
}

/// Installs the log subscriber: `RUST_LOG` if set, else the config's level; text or JSON
/// lines on stderr.
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
