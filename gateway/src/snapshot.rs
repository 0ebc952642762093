//! The immutable view of the configuration that connections use: routes, pools, loaded
//! plugins, TLS acceptors and the listeners by name, built from a [`Config`]. A
//! connection reads its first request under the snapshot of its accept, each later
//! request under the newest one, and a tunnel keeps the one it was admitted under, so a
//! reload never changes a live tunnel under its feet; a snapshot (and what only it
//! holds: plugins, pools) is freed when the last of them ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::balance::Pool;
use crate::capture::{self, Capture, CaptureError};
use crate::config::{Config, ListenerTls, PluginConfig};
use crate::health;
use crate::limit::{self, Limiter};
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::plugin::{Plugin, PluginError, PluginHost};
use crate::route::RouteTable;
use crate::tls::{self, Acceptor, Connector};

/// A served certificate this close to its expiry is logged at every load.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// Warns about the listener's certificates that expire within [`EXPIRY_WARNING`]
/// (expired ones never load).
fn warn_expiring(listener: &str, tls: &ListenerTls) {
    for cert in &tls.certificates {
        let left = cert
            .expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if left < EXPIRY_WARNING {
            tracing::warn!(
                listener,
                names = %cert.names.join(","),
                days_left = left.as_secs() / 86_400,
                "TLS certificate expires soon"
            );
        }
    }
}

/// Why a snapshot could not be built (the running one, if any, keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A plugin failed to compile or initialise.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// A listener's TLS settings were refused.
    #[error("listener `{listener}`: TLS: {source}")]
    ListenerTls {
        /// The listener.
        listener: String,
        /// Why.
        source: tls::TlsError,
    },
    /// A route's capture file could not be opened.
    #[error("route `{route}`: {source}")]
    Capture {
        /// The route.
        route: String,
        /// Why.
        source: CaptureError,
    },
    /// The admin listener's TLS settings were refused.
    #[error("admin: TLS: {0}")]
    AdminTls(tls::TlsError),
    /// A pool's TLS settings were refused.
    #[error("upstream `{pool}`: TLS: {source}")]
    UpstreamTls {
        /// The pool.
        pool: String,
        /// Why.
        source: tls::TlsError,
    },
}

/// The rustls sides a config asks for: an acceptor per TLS listener, a connector per
/// pool with TLS servers.
struct Tls {
    acceptors: HashMap<String, Acceptor>,
    admin: Option<Acceptor>,
    connectors: HashMap<String, Arc<Connector>>,
}

impl Tls {
    fn build(config: &Config) -> Result<Tls, LoadError> {
        let mut acceptors = HashMap::new();
        for l in &config.listeners {
            if let Some(t) = &l.tls {
                let acceptor = Acceptor::new(t, l.http2.is_some()).map_err(|source| {
                    LoadError::ListenerTls {
                        listener: l.name.clone(),
                        source,
                    }
                })?;
                acceptors.insert(l.name.clone(), acceptor);
            }
        }
        let admin = match config.admin_tls() {
            Some(t) => Some(Acceptor::new(t, false).map_err(LoadError::AdminTls)?),
            None => None,
        };
        let mut connectors = HashMap::new();
        for u in &config.upstreams {
            if let Some(t) = &u.tls {
                let connector = Connector::new(t).map_err(|source| LoadError::UpstreamTls {
                    pool: u.name.clone(),
                    source,
                })?;
                connectors.insert(u.name.clone(), Arc::new(connector));
            }
        }
        Ok(Tls {
            acceptors,
            admin,
            connectors,
        })
    }
}

/// What a snapshot is built over that outlives snapshots: the route counters and the
/// limit state, both kept by name.
#[derive(Clone, Copy)]
pub struct Shared<'a> {
    /// Route counters.
    pub metrics: &'a Metrics,
    /// Tenants' and client addresses' limit state.
    pub limiter: &'a Arc<Limiter>,
}

/// Snapshots alive in the process: the current one, and old ones that connections
/// opened under them still hold.
static ALIVE: AtomicUsize = AtomicUsize::new(0);

/// How many snapshot generations are alive (`sluice_snapshot_generations_alive`).
pub fn generations_alive() -> usize {
    ALIVE.load(Ordering::Relaxed)
}

/// Routes, pools, plugins and the config they came from.
#[derive(Debug)]
pub struct Snapshot {
    /// 1 for the first snapshot, one more for each reload that published one.
    pub generation: u64,
    /// The listeners serving this config, by name.
    pub listeners: Vec<(Arc<str>, Arc<Listener>)>,
    /// The validated config.
    pub config: Config,
    /// Routes with pools and plugin chains resolved.
    pub routes: RouteTable,
    /// Pools by name.
    pub pools: HashMap<String, Arc<Pool>>,
    /// Tenants' limits and the listeners' per-IP defaults.
    pub limits: limit::Table,
    /// TLS handshakes of the TLS listeners, by listener name: the certificates this
    /// snapshot's config read, so a reload rotates them.
    pub acceptors: HashMap<String, Acceptor>,
    /// The admin listener's TLS handshakes (`[admin.tls]`), rotated by a reload as the
    /// listeners' are.
    pub admin_tls: Option<Acceptor>,
    /// Loaded plugins by name, with the spec they were loaded from.
    plugins: HashMap<String, (PluginConfig, Plugin)>,
    health: CancellationToken,
}

impl Snapshot {
    /// Loads the config's plugins (compiling and running `init`, so a bad plugin fails
    /// here, before anything is served), builds the pools and routes, and starts the
    /// health checks. Must run inside the tokio runtime.
    ///
    /// From `previous`, servers keep their live state (health, ejection, connection
    /// counts) and plugins whose spec is unchanged are reused as they are.
    pub async fn load(
        config: Config,
        previous: Option<&Snapshot>,
        host: Option<&PluginHost>,
        shared: Shared<'_>,
    ) -> Result<Snapshot, LoadError> {
        let Tls {
            acceptors,
            admin: admin_tls,
            mut connectors,
        } = Tls::build(&config)?;
        for l in &config.listeners {
            if let Some(t) = &l.tls {
                warn_expiring(&l.name, t);
            }
        }
        if let Some(t) = config.admin_tls() {
            warn_expiring("(admin)", t);
        }
        let mut plugins = HashMap::new();
        for spec in &config.plugins {
            // Kept only when both the spec and the component's bytes are unchanged: a
            // `.wasm` rebuilt at the same path is loaded anew.
            let reused = match previous.and_then(|p| p.plugins.get(&spec.name)) {
                Some((old, plugin)) if old == spec => {
                    let digest = crate::plugin::digest_of(&spec.wasm).await;
                    (digest == Some(plugin.digest())).then(|| plugin.clone())
                }
                _ => None,
            };
            let plugin = match (reused, host) {
                (Some(p), _) => p,
                (None, Some(host)) => host.load(spec).await?,
                (None, None) => {
                    return Err(PluginError::Host(format!(
                        "plugin `{}`: the plugin runtime is not available",
                        spec.name
                    ))
                    .into());
                }
            };
            plugins.insert(spec.name.clone(), (spec.clone(), plugin));
        }
        let health = CancellationToken::new();
        let pools: HashMap<String, Arc<Pool>> = config
            .upstreams
            .iter()
            .map(|u| {
                let prev = previous.and_then(|p| p.pools.get(&u.name)).map(|p| &**p);
                let pool = Arc::new(Pool::new(u, prev, connectors.remove(&u.name)));
                if let Some(h) = &u.health {
                    health::spawn(&pool, h, &health);
                }
                (u.name.clone(), pool)
            })
            .collect();
        let by_name: HashMap<String, Plugin> = plugins
            .iter()
            .map(|(n, (_, p))| (n.clone(), p.clone()))
            .collect();
        let captures = open_captures(&config, previous, shared.metrics)?;
        let routes = RouteTable::new(&config.routes, &pools, &by_name, &captures, shared.metrics);
        let limits = limit::Table::new(&config, shared.limiter);
        if let Some(host) = host {
            host.share_counters(limits.cluster().cloned());
        }
        ALIVE.fetch_add(1, Ordering::Relaxed);
        Ok(Snapshot {
            generation: 1,
            listeners: Vec::new(),
            config,
            routes,
            pools,
            limits,
            acceptors,
            admin_tls,
            plugins,
            health,
        })
    }

    /// Builds what `sluice check` checks beyond the config file itself: each TLS
    /// listener's and pool's rustls settings, each route's capture file opened (and
    /// removed again if it had to be created), and every plugin loaded once (compile +
    /// `init`); nothing is started.
    pub async fn check(config: &Config) -> Result<(), LoadError> {
        Tls::build(config)?;
        for route in &config.routes {
            if let Some(wanted) = &route.capture {
                capture::check(wanted).map_err(|source| LoadError::Capture {
                    route: route.name.clone(),
                    source,
                })?;
            }
        }
        if config.plugins.is_empty() {
            return Ok(());
        }
        let host = PluginHost::new()?;
        for spec in &config.plugins {
            host.load(spec).await?;
        }
        Ok(())
    }

    /// Stops this snapshot's health checks (its successor runs its own).
    pub fn retire(&self) {
        self.health.cancel();
    }

    /// The name `listener` serves under in this snapshot; `None` once a reload removed it.
    pub fn listener_name(&self, listener: &Arc<Listener>) -> Option<&Arc<str>> {
        self.listeners
            .iter()
            .find(|(_, l)| Arc::ptr_eq(l, listener))
            .map(|(name, _)| name)
    }

    /// The loaded plugins, by name.
    pub fn plugins(&self) -> impl Iterator<Item = (&str, &Plugin)> {
        self.plugins.iter().map(|(n, (_, p))| (n.as_str(), p))
    }
}

/// The captures the config's routes ask for, by file: the previous snapshot's when its
/// settings are unchanged, it is still writing and its file is still at its path (so a
/// reload neither reopens the file nor resets its size), else opened anew: a file an
/// operator moved away is started afresh, and so is a capture stopped at `max_size`.
fn open_captures(
    config: &Config,
    previous: Option<&Snapshot>,
    metrics: &Metrics,
) -> Result<HashMap<std::path::PathBuf, Arc<Capture>>, LoadError> {
    let mut out = HashMap::new();
    for r in &config.routes {
        let Some(wanted) = &r.capture else { continue };
        let kept = previous.and_then(|p| {
            p.routes
                .iter()
                .filter_map(|old| old.capture.as_ref())
                .find(|c| {
                    c.config() == wanted && c.route() == r.name && !c.stopped() && c.still_at_path()
                })
                .cloned()
        });
        let capture =
            match kept {
                Some(c) => c,
                None => Arc::new(Capture::open(wanted, metrics.route(&r.name)).map_err(
                    |source| LoadError::Capture {
                        route: r.name.clone(),
                        source,
                    },
                )?),
            };
        out.insert(wanted.file.clone(), capture);
    }
    Ok(out)
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.health.cancel();
        ALIVE.fetch_sub(1, Ordering::Relaxed);
    }
}
