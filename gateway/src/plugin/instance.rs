//! Instances of one loaded plugin: the store state, its limits, the host
//! imports, and the bounded pool of reused instances.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::{self, Decision, Request, documents, host, wit};
use super::documents::{Documents, FetchStats};
use super::reuse::Reuse;
use super::types::{Fault, PluginStats};
use crate::config::PluginLimits;
use crate::limit::Cluster;
use crate::metrics::{Histogram, PLUGIN_BUCKETS};
use crate::sync::Hold;

/// Longest a call waits for a free instance before it is an `Overloaded` fault.
/// Each busy instance frees itself within its CPU deadline, so this only
/// trips when the plugin is swamped.
fn queue_wait(limits: &PluginLimits) -> Duration {
    (limits.cpu_deadline * 4).max(Duration::from_millis(50))
}

/// Longest a log message from a plugin may be; the rest is cut.
const MAX_LOG_BYTES: usize = 2048;

/// Windowed counters shared by all instances of a plugin, scoped by plugin name and by
/// the tenant of the request being decided (so a plugin serving several tenants never
/// sees one tenant's counts in another's), for rate limits and quotas. With `[cluster]`
/// they live in the fleet's Redis, and here only while it is unreachable.
#[derive(Debug, Default)]
pub(super) struct Counters {
    map: DashMap<CounterKey, Window>,
    /// The fleet's store, with `[cluster]`.
    pub(super) cluster: std::sync::Mutex<Option<Arc<Cluster>>>,
}

/// Plugin, tenant, key.
type CounterKey = (Arc<str>, Option<String>, String);

#[derive(Debug, Clone, Copy)]
struct Window {
    start_ms: u64,
    len_ms: u64,
    count: u64,
}

/// Distinct keys kept before expired windows are swept.
const MAX_COUNTER_KEYS: usize = 100_000;
/// Longest counter key kept; longer keys are cut.
const MAX_COUNTER_KEY_BYTES: usize = 256;

impl Counters {
    async fn add(
        &self,
        plugin: &Arc<str>,
        tenant: Option<String>,
        mut key: String,
        delta: u64,
        window_ms: u64,
    ) -> u64 {
        truncate(&mut key, MAX_COUNTER_KEY_BYTES);
        let cluster = self.cluster.hold().clone();
        if let Some(c) = cluster {
            let scope = (&**plugin, tenant.as_deref(), key.as_str());
            if let Some(n) = c.counter_add(scope, delta, window_ms.max(1)).await {
                return n;
            }
        }
        self.add_local((plugin.clone(), tenant, key), delta, window_ms)
    }

    fn add_local(&self, key: CounterKey, delta: u64, window_ms: u64) -> u64 {
        let now = now_ms();
        let len_ms = window_ms.max(1);
        let start_ms = now / len_ms * len_ms;
        if self.map.len() >= MAX_COUNTER_KEYS {
            self.map
                .retain(|_, w| w.start_ms.saturating_add(w.len_ms) > now);
        }
        let fresh = Window {
            start_ms,
            len_ms,
            count: 0,
        };
        let mut slot = self.map.entry(key).or_insert(fresh);
        if slot.start_ms != start_ms || slot.len_ms != len_ms {
            *slot = fresh;
        }
        slot.count = slot.count.saturating_add(delta);
        slot.count
    }
}

fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// What every instance of one plugin shares with the host imports.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) name: Arc<str>,
    pub(super) counters: Arc<Counters>,
    pub(super) origin: Instant,
    /// The documents fetched for it from its `grants.http`.
    pub(super) documents: Arc<Documents>,
    /// Its counters, kept by name across reloads.
    pub(super) stats: Arc<Stats>,
}

/// Memory cap of one instance; remembers whether it was hit.
struct MemoryCap {
    cap: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.hit = true;
            wasmtime::bail!("memory cap of {} bytes exceeded", self.cap);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// The data of one instance's store.
pub(super) struct State {
    wasi: WasiCtx,
    /// WASI's resources and the plugin's `crypto` keys.
    pub(super) table: ResourceTable,
    /// `crypto` keys in `table`, bounded by `crypto::MAX_KEYS`.
    pub(super) keys: usize,
    memory: MemoryCap,
    /// Epoch ticks the current call may still run.
    ticks_left: u64,
    timed_out: bool,
    shared: Arc<Shared>,
    /// The tenant of the request or tunnel the current call is about: the scope of
    /// its counters.
    tenant: Option<String>,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wit::Host for State {}

impl host::Host for State {
    fn log(&mut self, level: host::Level, mut message: String, fields: Vec<(String, String)>) {
        truncate(&mut message, MAX_LOG_BYTES);
        let plugin = &*self.shared.name;
        match level {
            host::Level::Trace => tracing::trace!(plugin, ?fields, "{message}"),
            host::Level::Debug => tracing::debug!(plugin, ?fields, "{message}"),
            host::Level::Info => tracing::info!(plugin, ?fields, "{message}"),
            host::Level::Warn => tracing::warn!(plugin, ?fields, "{message}"),
            host::Level::Error => tracing::error!(plugin, ?fields, "{message}"),
        }
    }

    fn now_ms(&mut self) -> u64 {
        now_ms()
    }

    fn monotonic_ns(&mut self) -> u64 {
        u64::try_from(self.shared.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    async fn counter_add(&mut self, key: String, delta: u64, window_ms: u64) -> u64 {
        let tenant = self.tenant.clone();
        self.shared
            .counters
            .add(&self.shared.name, tenant, key, delta, window_ms)
            .await
    }
}

impl documents::Host for State {
    async fn watch(&mut self, url: String, refresh: documents::Refresh) -> Result<(), String> {
        self.shared
            .documents
            .watch(url, refresh.min_ms, refresh.max_ms)
            .await
    }

    fn latest(&mut self, url: String, seen: u64) -> Option<documents::Document> {
        let copy = self.shared.documents.latest(&url, seen)?;
        Some(documents::Document {
            version: copy.version,
            body: copy.body.to_vec(),
        })
    }

    fn refresh_soon(&mut self, url: String) {
        self.shared.documents.refresh_soon(&url);
    }
}

/// One live instance and its store.
struct Instance {
    store: Store<State>,
    plugin: bindings::Plugin,
}

/// One plugin's counters. The host keeps them by the plugin's name across reloads (as
/// the routes' are kept), so loading a rebuilt `.wasm` or a changed config does not set
/// `/metrics` back to zero, and the old and new loads count into the same ones while
/// both serve.
#[derive(Debug)]
pub(super) struct Stats {
    calls: AtomicU64,
    reused: AtomicU64,
    denies: AtomicU64,
    faults: AtomicU64,
    timeouts: AtomicU64,
    memory_faults: AtomicU64,
    instances_created: AtomicU64,
    /// Fetches of the documents its `grants.http` allows.
    pub(super) fetches: Arc<FetchStats>,
    /// How long `on-request` calls took (decisions reused are not calls).
    pub(super) latency: Histogram,
}

impl Stats {
    pub(super) fn new() -> Stats {
        let zero = || AtomicU64::new(0);
        Stats {
            calls: zero(),
            reused: zero(),
            denies: zero(),
            faults: zero(),
            timeouts: zero(),
            memory_faults: zero(),
            instances_created: zero(),
            fetches: Arc::default(),
            latency: Histogram::new(PLUGIN_BUCKETS),
        }
    }
}

/// A loaded plugin: its pre-linked component and a bounded pool of
/// initialised instances, each used by one call at a time.
pub(super) struct InstancePool {
    pub(super) shared: Arc<Shared>,
    pub(super) limits: PluginLimits,
    pub(super) fail_open: bool,
    engine: Engine,
    pre: bindings::PluginPre<State>,
    config_json: String,
    /// Ticks in one CPU deadline (plus one for the partial first tick).
    budget_ticks: u64,
    idle: Mutex<Vec<Instance>>,
    permits: Arc<Semaphore>,
    /// Decisions the plugin allowed to be given again: made when it first returns
    /// one with a `reuse-ms` (and reuse is on), so a plugin that never does costs
    /// neither the table's memory nor a lookup per request.
    reuse: OnceLock<Reuse>,
    /// `shared.stats`, one pointer nearer the calls that count into it.
    pub(super) stats: Arc<Stats>,
}

impl std::fmt::Debug for InstancePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstancePool")
            .field("name", &self.shared.name)
            .field("limits", &self.limits)
            .field("fail_open", &self.fail_open)
            .finish_non_exhaustive()
    }
}

impl InstancePool {
    pub(super) fn new(
        engine: Engine,
        pre: bindings::PluginPre<State>,
        shared: Arc<Shared>,
        limits: PluginLimits,
        fail_open: bool,
        config_json: String,
        tick: Duration,
    ) -> Self {
        let ticks = limits
            .cpu_deadline
            .as_nanos()
            .div_ceil(tick.as_nanos().max(1));
        Self {
            limits,
            fail_open,
            engine,
            pre,
            config_json,
            budget_ticks: u64::try_from(ticks).unwrap_or(u64::MAX).saturating_add(1),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(limits.max_instances)),
            reuse: OnceLock::new(),
            stats: shared.stats.clone(),
            shared,
        }
    }

    /// Create and initialise the first instance (at load: this is where a bad
    /// config, a slow init or a too-small memory cap shows up). Returns what
    /// the plugin asked for in `init`: its hooks and the headers it reads.
    pub(super) async fn warm_up(&self) -> Result<wit::Interest, Fault> {
        let (instance, interest) = self.instantiate().await?;
        self.checkin(instance);
        Ok(interest)
    }

    /// Call `on-request`, or give again the decision it returned for the same
    /// inputs when it allowed that (`reuse-ms`). `tenant` is the request's, the scope of
    /// the plugin's counters whether or not it reads the tenant.
    pub(super) async fn on_request(
        &self,
        req: Request<'_>,
        tenant: Option<&str>,
    ) -> Result<Decision, Fault> {
        let now = Instant::now();
        // A decision made on an older copy of a watched document is not given again.
        let generation = self.shared.documents.generation();
        let reuse = self.reuse.get();
        let key = reuse.and_then(|reuse| reuse.key(&req));
        if let Some(decision) = key
            .as_ref()
            .and_then(|key| reuse?.get(key, now, generation))
        {
            self.stats.reused.fetch_add(1, Ordering::Relaxed);
            self.count_deny(&decision);
            return Ok(decision);
        }
        let (_permit, mut inst) = self.checkout().await?;
        arm(&mut inst.store, self.budget_ticks);
        inst.store.data_mut().tenant = tenant.map(str::to_owned);
        let result = inst
            .plugin
            .call_on_request(&mut inst.store, req.clone())
            .await;
        self.stats.latency.observe(now.elapsed());
        let decision = match Decision::check(self.settle(inst, result)?) {
            Ok(decision) => decision,
            Err(reason) => return Err(self.fault(Fault::InvalidDecision(reason))),
        };
        self.count_deny(&decision);
        let ms = decision.reuse_ms();
        if ms > 0 && self.limits.max_reused > 0 {
            let reuse = self
                .reuse
                .get_or_init(|| Reuse::new(self.limits.max_reused));
            if let Some(key) = key.or_else(|| reuse.key(&req)) {
                reuse.put(key, &decision, now, ms, generation);
            }
        }
        Ok(decision)
    }

    fn count_deny(&self, decision: &Decision) {
        if decision.refuses() {
            self.stats.denies.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Call `on-close`.
    pub(super) async fn on_close(&self, info: wit::CloseInfo<'_>) -> Result<(), Fault> {
        let (_permit, mut inst) = self.checkout().await?;
        arm(&mut inst.store, self.budget_ticks);
        inst.store.data_mut().tenant = info.tenant.map(str::to_owned);
        let result = inst.plugin.call_on_close(&mut inst.store, info).await;
        self.settle(inst, result)
    }

    pub(super) fn stats(&self) -> PluginStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PluginStats {
            calls: get(&self.stats.calls),
            reused: get(&self.stats.reused),
            denies: get(&self.stats.denies),
            faults: get(&self.stats.faults),
            timeouts: get(&self.stats.timeouts),
            memory_faults: get(&self.stats.memory_faults),
            instances_created: get(&self.stats.instances_created),
            fetches_changed: get(&self.stats.fetches.changed),
            fetches_unchanged: get(&self.stats.fetches.unchanged),
            fetches_failed: get(&self.stats.fetches.failed),
        }
    }

    /// Take a permit, then reuse an idle instance or make a new one. The
    /// common case (a permit free) takes no timer; only a full pool waits,
    /// for at most [`queue_wait`].
    async fn checkout(&self) -> Result<(OwnedSemaphorePermit, Instance), Fault> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => self.wait_for_permit().await?,
            Err(TryAcquireError::Closed) => {
                return Err(self.fault(Fault::Overloaded(Duration::ZERO)));
            }
        };
        let idle = self.idle.hold().pop();
        let instance = match idle {
            Some(instance) => instance,
            None => self.instantiate().await.map_err(|f| self.fault(f))?.0,
        };
        Ok((permit, instance))
    }

    /// Every instance is busy: wait for one, within [`queue_wait`].
    async fn wait_for_permit(&self) -> Result<OwnedSemaphorePermit, Fault> {
        let wait = queue_wait(&self.limits);
        tokio::time::timeout(wait, self.permits.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| self.fault(Fault::Overloaded(wait)))
    }

    fn checkin(&self, instance: Instance) {
        self.idle.hold().push(instance);
    }

    /// Return a healthy instance to the pool; drop one that failed (a trapped
    /// instance refuses further calls, and its state is suspect anyway).
    fn settle<R>(&self, inst: Instance, result: wasmtime::Result<R>) -> Result<R, Fault> {
        match result {
            Ok(value) => {
                self.checkin(inst);
                Ok(value)
            }
            Err(err) => Err(self.fault(self.classify(&inst.store, &err))),
        }
    }

    fn classify(&self, store: &Store<State>, err: &wasmtime::Error) -> Fault {
        let state = store.data();
        if state.timed_out {
            Fault::Timeout(self.limits.cpu_deadline)
        } else if state.memory.hit {
            Fault::Memory(self.limits.memory_bytes)
        } else {
            let mut text = match err.downcast_ref::<wasmtime::Trap>() {
                Some(trap) => trap.to_string(),
                None => format!("{:#}", err.root_cause()),
            };
            truncate(&mut text, 512);
            Fault::Trap(text)
        }
    }

    /// Count a fault (by kind) and pass it on.
    fn fault(&self, fault: Fault) -> Fault {
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        match fault {
            Fault::Timeout(_) => self.stats.timeouts.fetch_add(1, Ordering::Relaxed),
            Fault::Memory(_) => self.stats.memory_faults.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        fault
    }

    /// Instantiate from the `InstancePre` and run `init` with the config,
    /// both under the CPU deadline and memory cap; also returns what `init`
    /// asked for.
    async fn instantiate(&self) -> Result<(Instance, wit::Interest), Fault> {
        self.stats.instances_created.fetch_add(1, Ordering::Relaxed);
        let state = State {
            // No preopened dirs, env, args, network or stdio: a plugin gets
            // only what the `host` interface lends it.
            wasi: WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
            keys: 0,
            memory: MemoryCap {
                cap: self.limits.memory_bytes,
                hit: false,
            },
            ticks_left: 0,
            timed_out: false,
            shared: self.shared.clone(),
            tenant: None,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.memory);
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            state.ticks_left = state.ticks_left.saturating_sub(1);
            if state.ticks_left == 0 {
                state.timed_out = true;
                return Ok(UpdateDeadline::Interrupt);
            }
            // Let other tasks on this tokio worker run, then keep counting. tokio's own
            // `yield_now` puts the task behind the others; wasmtime's plain `Yield`
            // wakes it straight back into the worker's LIFO slot, which starved other
            // connections on that worker until the deadline.
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        });
        arm(&mut store, self.budget_ticks);
        let plugin = match self.pre.instantiate_async(&mut store).await {
            Ok(plugin) => plugin,
            Err(err) => return Err(start_fault(self.classify(&store, &err))),
        };
        arm(&mut store, self.budget_ticks);
        match plugin.call_init(&mut store, &self.config_json).await {
            Ok(Ok(interest)) => Ok((Instance { store, plugin }, interest)),
            Ok(Err(reason)) => Err(Fault::InitRefused(reason)),
            Err(err) => Err(start_fault(self.classify(&store, &err))),
        }
    }
}

/// Faults while starting an instance keep their kind except traps, which
/// are reported as start failures (instantiation errors land there too).
fn start_fault(fault: Fault) -> Fault {
    match fault {
        Fault::Trap(text) => Fault::Start(text),
        other => other,
    }
}

/// Give the next call a fresh CPU budget.
fn arm(store: &mut Store<State>, budget_ticks: u64) {
    let state = store.data_mut();
    state.ticks_left = budget_ticks;
    state.timed_out = false;
    store.set_epoch_deadline(1);
}
