//! The plugin host: runs policy plugins (WebAssembly components of the
//! `sluice:plugin@0.7.0` world in `wit/`) with hard limits, and chains them.
//!
//! ```text
//! PluginHost::new()            one engine: epoch interruption, pooling allocator,
//!                              compilation cache; one linker (host imports + WASI)
//!   └─ load(&PluginConfig)     read → compile once → InstancePre → instantiate + init
//!        └─ Plugin             bounded pool of initialised, reused instances
//! Chain::new(vec![plugin…])
//!   ├─ on_request(&RequestInfo) → ChainDecision   first deny wins, mutations accumulate;
//!   │                                             each plugin is shown only the headers
//!   │                                             and fields its init named, and is not
//!   │                                             called at all when it allowed reuse of
//!   │                                             its decision on the same inputs
//!   ├─ wants_close()                              any plugin asked for on-close in init?
//!   └─ on_close(&CloseInfo)                       only the plugins that asked
//! ```
//!
//! # Instance model and call model
//!
//! - Instances are **reused**: a bounded pool per plugin (`max_instances`), each
//!   instance serving one call at a time, thrown away after any fault. A fresh instance
//!   per request costs tens of times a call on a warm one.
//! - Hooks run with wasmtime's **async** support on the calling task, not on a blocking
//!   pool (a `spawn_blocking` hand-off costs more than a whole call). With a 5 ms epoch
//!   tick a runaway plugin yields to the tokio scheduler every tick and is interrupted
//!   within a tick after its CPU deadline, so it never holds a worker for long;
//!   synchronous calls would save a fiber switch but hold a worker for the whole
//!   deadline. The tick is a thread waking to advance the epoch: at 1 ms those wake-ups
//!   (and the workers they preempt) cost 3 to 5 µs of CPU per upgrade on the bench's
//!   2-core machine; at 5 ms a fifth of it (bench/README.md).
//! - **Only what a plugin reads is lowered into it, in one string**: `init` names the
//!   request headers and fields `on-request` reads (`interest`), and the request crosses
//!   as their text, NUL-ended parts of one string with a list of where each ends
//!   (`bindings::View::request`). Every string or list lowered is a call from the host
//!   into the plugin's allocator; a record of a string per field made four to six of
//!   them per plugin and call.
//! - **The decision crosses back as one string** of items (header changes, choices,
//!   log fields) and a refusal's body: one string to lift and copy, checked item by
//!   item before the gateway acts on it or keeps it for reuse (`bindings::Decision`).
//! - **Decisions are reused when the plugin allows it**: a decision carries `reuse-ms`,
//!   and for that long (at most 5 minutes) a request that shows the plugin the same
//!   inputs gets the same decision without a call (`reuse.rs`: a bounded table per
//!   plugin, `max_reused` entries, emptied by a reload).
//! - `on-close` is opt-in (`init`'s `hooks`): a chain whose plugins do not ask for it
//!   costs nothing when a tunnel ends.
//!
//! The measurements behind each choice are in bench/README.md (*Plugin host*).
//!
//! To see guest functions in `perf report`, start the gateway with
//! `SLUICE_WASM_PERFMAP=1`: wasmtime then writes `/tmp/perf-PID.map`.
//!
//! # Failure model
//!
//! A trap, a CPU timeout, a memory-cap hit, an invalid decision or an
//! exhausted pool is a [`Fault`]: logged with `tracing`, counted in
//! [`PluginStats`], and answered per the plugin's mode — deny 503 (default,
//! fail closed) or skip the plugin (`fail_open`). Other connections never
//! notice: every call has its own store, and instances are never shared.

mod bindings;
mod chain;
mod crypto;
mod documents;
mod instance;
mod reuse;
mod types;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use chain::Chain;
pub use types::{
    ChainDecision, CloseInfo, CloseReason, Denial, DocumentState, Fault, HeaderOp, Mutations,
    PluginStats, RequestInfo, RequestKind, TlsInfo,
};

use crate::config::PluginConfig;
use crate::sync::Hold;
use documents::Documents;
use instance::{Counters, InstancePool, Shared, State, Stats};

/// ` at PLACE`, or nothing for a config that was not read from a file.
fn at_place(at: &str) -> String {
    if at.is_empty() {
        String::new()
    } else {
        format!(" at {at}")
    }
}

/// `path` made absolute with its `.` and `..` parts resolved (by their names, so it
/// works for a file that is not there), as a user looking for the file needs it.
fn resolved(path: &std::path::Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for part in absolute.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Why a plugin could not be loaded. Every variant names the plugin.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The `.wasm` file could not be read.
    #[error("plugin `{plugin}`: cannot read {}: {source}", path.display())]
    Read {
        /// Plugin name.
        plugin: String,
        /// Path tried.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a WebAssembly component (or does not compile).
    #[error("plugin `{plugin}`: {} is not a usable WebAssembly component: {reason}", path.display())]
    NotComponent {
        /// Plugin name.
        plugin: String,
        /// Path of the file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The component does not target the `sluice:plugin@0.7.0` `plugin` world.
    #[error("plugin `{plugin}`: not a sluice:plugin@0.7.0 plugin: {reason}")]
    WrongWorld {
        /// Plugin name.
        plugin: String,
        /// Missing export or unsatisfiable import.
        reason: String,
    },
    /// `init` returned an error for the given config.
    #[error(
        "plugin `{plugin}`: init rejected the config{}: {reason}",
        at_place(at)
    )]
    Init {
        /// Where the config is written (`line L, column C (plugins.NAME.config)`).
        at: String,
        /// Plugin name.
        plugin: String,
        /// The plugin's own message.
        reason: String,
    },
    /// The first instance faulted while starting (slow init, memory cap
    /// below the guest's initial memory, trap in init…).
    #[error("plugin `{plugin}`: failed to start: {fault}")]
    Start {
        /// Plugin name.
        plugin: String,
        /// What went wrong.
        fault: Fault,
    },
    /// The spec's limits are unusable.
    #[error("plugin `{plugin}`: invalid limits: {reason}")]
    Limits {
        /// Plugin name.
        plugin: String,
        /// Which limit and why.
        reason: String,
    },
    /// The host itself could not be set up.
    #[error("plugin host: {0}")]
    Host(String),
}

/// Bytes of each pooled fiber stack kept resident between calls.
const STACK_KEEP_RESIDENT: usize = 128 << 10;

/// Host-wide settings; [`PluginHost::new`] uses the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostOptions {
    /// Directory of wasmtime's compilation cache (so a restart does not
    /// recompile); `None` uses wasmtime's default (`~/.cache/wasmtime`).
    pub cache_dir: Option<PathBuf>,
    /// Turn the compilation cache off.
    pub disable_cache: bool,
    /// Epoch tick: the granularity of CPU deadlines and of yields, and the shortest
    /// deadline a plugin may have.
    pub tick: Duration,
    /// Largest memory cap any plugin may ask for (sizes pooling slots).
    pub max_memory_bytes: usize,
    /// Component instances the pooling allocator holds, over all plugins.
    pub pool_instances: u32,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            cache_dir: None,
            disable_cache: false,
            tick: Duration::from_millis(5),
            max_memory_bytes: 1 << 30,
            pool_instances: 1000,
        }
    }
}

/// Loads plugins. Owns the wasmtime engine (and its epoch ticker thread),
/// the linker, the compiled-component cache and the shared counters.
#[derive(Clone)]
pub struct PluginHost {
    engine: Engine,
    linker: Arc<Linker<State>>,
    options: HostOptions,
    counters: Arc<Counters>,
    /// Components compiled by this host, by content hash.
    compiled: Arc<DashMap<u128, Component>>,
    /// Each plugin's counters, by name: a reload that loads it anew counts on.
    stats: Arc<DashMap<Arc<str>, Arc<Stats>>>,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl PluginHost {
    /// Keeps the plugins' counters in the fleet's store from now on (`None`: in this
    /// process).
    pub fn share_counters(&self, cluster: Option<Arc<crate::limit::Cluster>>) {
        *self.counters.cluster.hold() = cluster;
    }

    /// A host with default [`HostOptions`].
    pub fn new() -> Result<Self, PluginError> {
        Self::with_options(HostOptions::default())
    }

    /// A host with these options. Falls back to on-demand allocation when
    /// the pooling allocator cannot reserve its memory.
    pub fn with_options(options: HostOptions) -> Result<Self, PluginError> {
        let host_err = |e: wasmtime::Error| PluginError::Host(format!("{e:#}"));
        let mut config = Config::new();
        config.epoch_interruption(true);
        if std::env::var_os("SLUICE_WASM_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        if !options.disable_cache {
            let mut cache = wasmtime::CacheConfig::new();
            if let Some(dir) = &options.cache_dir {
                cache.with_directory(dir);
            }
            match wasmtime::Cache::new(cache) {
                Ok(cache) => {
                    config.cache(Some(cache));
                }
                Err(e) => tracing::warn!(error = %e, "plugin compilation cache disabled"),
            }
        }
        let mut pooling = PoolingAllocationConfig::new();
        pooling
            .total_component_instances(options.pool_instances)
            .total_core_instances(options.pool_instances.saturating_mul(4))
            .total_memories(options.pool_instances.saturating_mul(2))
            .total_tables(options.pool_instances.saturating_mul(2))
            .total_stacks(options.pool_instances)
            .max_memory_size(options.max_memory_bytes)
            // Every hook call runs on a pooled fiber stack; keeping its top
            // resident saves an madvise + page faults per call.
            .async_stack_keep_resident(STACK_KEEP_RESIDENT);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine = match Engine::new(&config) {
            Ok(engine) => engine,
            Err(e) => {
                tracing::warn!(error = %e, "pooling allocator unavailable; allocating on demand");
                config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
                Engine::new(&config).map_err(host_err)?
            }
        };
        spawn_ticker(&engine, options.tick);
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(host_err)?;
        bindings::Plugin::add_to_linker::<_, HasSelf<State>>(&mut linker, |s| s)
            .map_err(host_err)?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            options,
            counters: Arc::default(),
            compiled: Arc::default(),
            stats: Arc::default(),
        })
    }

    /// Load a plugin: read and compile the component (once per content, off
    /// the async workers; cached on disk across restarts), check it targets
    /// the plugin world, then start one instance and run `init` with the
    /// spec's config, so a bad config fails here, not on the request path.
    pub async fn load(&self, spec: &PluginConfig) -> Result<Plugin, PluginError> {
        let plugin = spec.name.clone();
        self.check_limits(spec)?;
        let bytes = tokio::fs::read(&spec.wasm)
            .await
            .map_err(|source| PluginError::Read {
                plugin: plugin.clone(),
                path: resolved(&spec.wasm),
                source,
            })?;
        let digest = xxhash_rust::xxh3::xxh3_128(&bytes);
        let component = self.compile(&plugin, &spec.wasm, bytes, digest).await?;
        let wrong_world = |e: wasmtime::Error| PluginError::WrongWorld {
            plugin: plugin.clone(),
            reason: match built_for(&component, &self.engine) {
                Some(version) => format!(
                    "it was built against sluice:plugin@{version}; rebuild it against this \
                     gateway's WIT (the current plugin-sdk, or plugins/build.sh) ({e:#})"
                ),
                None => format!("{e:#}"),
            },
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(wrong_world)?;
        let pre = bindings::PluginPre::new(pre).map_err(wrong_world)?;
        let name: Arc<str> = Arc::from(spec.name.as_str());
        let stats = self
            .stats
            .entry(name.clone())
            .or_insert_with(|| Arc::new(Stats::new()))
            .clone();
        let shared = Arc::new(Shared {
            documents: Arc::new(Documents::new(
                name.clone(),
                &spec.grants,
                stats.fetches.clone(),
            )),
            name,
            counters: self.counters.clone(),
            origin: Instant::now(),
            stats,
        });
        let pool = InstancePool::new(
            self.engine.clone(),
            pre,
            shared,
            spec.limits,
            spec.fail_open,
            spec.config_json.clone(),
            self.options.tick,
        );
        let interest = pool.warm_up().await.map_err(|fault| match fault {
            Fault::InitRefused(reason) => PluginError::Init {
                at: spec.config_at.clone(),
                plugin: plugin.clone(),
                reason,
            },
            fault => PluginError::Start {
                plugin: plugin.clone(),
                fault,
            },
        })?;
        Ok(Plugin {
            digest,
            pool: Arc::new(pool),
            wants_close: interest.hooks.contains(bindings::wit::Hooks::ON_CLOSE),
            headers: interest.headers.map(|names| {
                names
                    .into_iter()
                    .map(|name| name.to_ascii_lowercase())
                    .collect()
            }),
            fields: interest.fields,
        })
    }

    fn check_limits(&self, spec: &PluginConfig) -> Result<(), PluginError> {
        let l = &spec.limits;
        let reason = if l.max_instances == 0 {
            "max_instances must be at least 1".to_owned()
        } else if l.cpu_deadline < self.options.tick {
            format!(
                "cpu deadline {:?} is below the epoch tick {:?}",
                l.cpu_deadline, self.options.tick
            )
        } else if l.memory_bytes > self.options.max_memory_bytes {
            format!(
                "memory cap {} exceeds the host maximum {}",
                l.memory_bytes, self.options.max_memory_bytes
            )
        } else {
            return Ok(());
        };
        Err(PluginError::Limits {
            plugin: spec.name.clone(),
            reason,
        })
    }

    async fn compile(
        &self,
        plugin: &str,
        path: &Path,
        bytes: Vec<u8>,
        key: u128,
    ) -> Result<Component, PluginError> {
        let not_component = |reason: String| PluginError::NotComponent {
            plugin: plugin.to_owned(),
            path: path.to_owned(),
            reason,
        };
        match bytes.get(..8) {
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => {
                return Err(not_component(
                    "it is a core wasm module; build for wasm32-wasip2 (plugins/build.sh)".into(),
                ));
            }
            Some([0, b'a', b's', b'm', ..]) => {}
            _ => return Err(not_component("not a WebAssembly file".into())),
        }
        if let Some(component) = self.compiled.get(&key) {
            return Ok(component.clone());
        }
        let engine = self.engine.clone();
        let component = tokio::task::spawn_blocking(move || Component::new(&engine, &bytes))
            .await
            .map_err(|e| not_component(format!("compiler task failed: {e}")))?
            .map_err(|e| not_component(format!("{e:#}")))?;
        self.compiled.insert(key, component.clone());
        Ok(component)
    }
}

/// The version of the WIT package `wit/` defines, as component import names spell it.
const WIT_VERSION: &str = "0.7.0";

/// The `sluice:plugin` version a component imports or exports, when it is not one this
/// gateway links: [`WIT_VERSION`] or an earlier `0.7.x` (additions within a series keep
/// them working, and wasmtime links `0.7.x` imports to the newest `0.7` host).
fn built_for(component: &Component, engine: &Engine) -> Option<String> {
    let ty = component.component_type();
    ty.imports(engine)
        .map(|(name, _)| name)
        .chain(ty.exports(engine).map(|(name, _)| name))
        .filter_map(|name| name.strip_prefix("sluice:plugin/")?.split_once('@'))
        .map(|(_, version)| version)
        .find(|version| !compatible(version))
        .map(str::to_owned)
}

/// Whether a component built against `version` links with this host.
fn compatible(version: &str) -> bool {
    let series = |v: &str| v.rsplit_once('.').map(|(s, _)| s.to_owned());
    series(version).is_some_and(|s| Some(s) == series(WIT_VERSION))
}

/// Advance the engine's epoch every `tick` until the engine is dropped.
fn spawn_ticker(engine: &Engine, tick: Duration) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("sluice-plugin-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(tick);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the plugin epoch ticker; CPU deadlines will not fire");
    }
}

/// A loaded plugin (cheap to clone; clones share the instance pool).
#[derive(Debug, Clone)]
pub struct Plugin {
    /// The component's content hash (xxh3-128), to tell a rebuilt `.wasm` at reload.
    digest: u128,
    pool: Arc<InstancePool>,
    /// `init` asked for `on-close` (the `hooks` flags of the first instance).
    wants_close: bool,
    /// The request headers `init` said `on-request` reads (lower-case);
    /// `None`: all of them.
    headers: Option<Arc<[String]>>,
    /// The other request fields `init` said `on-request` reads; `None`: all.
    fields: Option<bindings::wit::Fields>,
}

/// The content hash of a component file as [`Plugin::digest`] computes it; `None` when
/// it cannot be read (the load that follows reports why).
pub async fn digest_of(path: &Path) -> Option<u128> {
    let bytes = tokio::fs::read(path).await.ok()?;
    Some(xxhash_rust::xxh3::xxh3_128(&bytes))
}

impl Plugin {
    /// The component's content hash.
    pub fn digest(&self) -> u128 {
        self.digest
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.pool.shared.name
    }

    /// Whether faults skip this plugin instead of denying.
    pub fn fail_open(&self) -> bool {
        self.pool.fail_open
    }

    /// Whether the plugin asked (in `init`) to be told when exchanges end;
    /// [`Chain::on_close`] calls only plugins that did.
    pub fn wants_close(&self) -> bool {
        self.wants_close
    }

    /// The request headers the plugin reads (lower-case), as `init` named
    /// them; `None`: all. [`Chain::on_request`] hands it only these.
    pub fn headers(&self) -> Option<&[String]> {
        self.headers.as_deref()
    }

    /// The request fields the plugin reads besides `kind` and the headers,
    /// as `init` named them; `None`: all. The others reach it as `none`.
    pub(crate) fn fields(&self) -> Option<bindings::wit::Fields> {
        self.fields
    }

    /// Its counters since the gateway started (kept across reloads by name).
    pub fn stats(&self) -> PluginStats {
        self.pool.stats()
    }

    /// The documents it watches (`grants.http`): each one's copy and last fetch.
    pub fn documents(&self) -> Vec<DocumentState> {
        self.pool.shared.documents.states()
    }

    /// Whether the plugin was granted documents to fetch (`grants.http`).
    pub fn watches_documents(&self) -> bool {
        self.pool.shared.documents.granted()
    }

    /// How long its `on-request` calls took, since the gateway started.
    pub fn latency(&self) -> &crate::metrics::Histogram {
        &self.pool.stats.latency
    }
}
