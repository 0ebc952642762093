//! Limits stage: after the plugin chain has named the tenant and before a server is
//! chosen, each request takes a token of its kind (WebSocket handshake or plain request)
//! and each WebSocket a tunnel slot, from its tenant and from its client address; a
//! refusal is a `429` with `Retry-After`, and costs no upstream connection.
//!
//! Tenants' state ([`Tenant`]: buckets, tunnel count, counters) is kept by name across
//! reloads. Client addresses live in one concurrent map ([`Clients`]) bounded by
//! `[limits] max_clients`: an entry whose buckets have refilled and that holds no tunnel
//! is worth nothing and is swept out when the map is full; when every entry is still in
//! use, a new address is refused (`429`, limit `clients`) rather than let memory grow.
//! With `[cluster]`, a tenant's handshake rate and tunnel count are shared by the fleet
//! through Redis (`cluster`).

mod cluster;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;

pub use cluster::{Cluster, ClusterStats};

use crate::config::{Config, Limits, OnFailure, Rate, TenantConfig};
use crate::metrics::RouteStats;
use crate::sync::Hold;

/// The tenant name under which traffic of tenants not in the config is counted, so a
/// plugin cannot grow the metrics' label set.
pub const OTHER_TENANT: &str = "_other";

/// A token bucket, refilled lazily when it is asked.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(rate.burst),
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let since = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + since * rate.per_second).min(f64::from(rate.burst));
        self.at = now;
    }

    /// Takes one token, or says how long until one is free.
    pub fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / rate.per_second,
            ))
        }
    }

    /// When the bucket is full again if nothing is taken meanwhile.
    fn full_at(&self, rate: Rate) -> Instant {
        let missing = (f64::from(rate.burst) - self.tokens).max(0.0);
        self.at + Duration::from_secs_f64(missing / rate.per_second)
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Tunnels open at once.
    Tunnels,
    /// WebSocket handshakes per second.
    Handshakes,
    /// Plain requests per second.
    Requests,
    /// The client table is full of addresses still in use.
    Clients,
}

impl Limit {
    /// Every limit, in the order of [`Tenant::limited`].
    pub const ALL: [Limit; 4] = [
        Limit::Tunnels,
        Limit::Handshakes,
        Limit::Requests,
        Limit::Clients,
    ];

    /// The name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Tunnels => "tunnels",
            Limit::Handshakes => "handshakes",
            Limit::Requests => "requests",
            Limit::Clients => "clients",
        }
    }
}

/// What a request takes a token of: a WebSocket a handshake, a plain request a
/// request, under `limits`.
fn rate_of(limits: &Limits, websocket: bool) -> (Limit, Option<Rate>) {
    if websocket {
        (Limit::Handshakes, limits.handshakes)
    } else {
        (Limit::Requests, limits.requests)
    }
}

/// `Retry-After` for a tunnel limit: when a slot comes free is not known.
const TUNNEL_RETRY: Duration = Duration::from_secs(1);

/// Whose limit it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The tenant's as a whole (shared by the fleet with `[cluster]`).
    Tenant,
    /// One client address's.
    Ip,
}

impl Scope {
    /// The name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Tenant => "tenant",
            Scope::Ip => "ip",
        }
    }
}

/// A request refused by a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The limit.
    pub limit: Limit,
    /// Whose.
    pub scope: Scope,
    /// When a retry may succeed (`Retry-After`, rounded up to whole seconds).
    pub retry_after: Duration,
    /// The shared store did not answer and `on_failure = "closed"`: a `503`, not a `429`.
    pub unavailable: bool,
}

impl Refusal {
    fn new(limit: Limit, scope: Scope, retry_after: Duration) -> Refusal {
        Refusal {
            limit,
            scope,
            retry_after,
            unavailable: false,
        }
    }

    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// A tenant's shared state: its buckets, its open tunnels and its counters. Kept across
/// reloads by name.
#[derive(Debug)]
pub struct Tenant {
    /// The tenant's name ([`OTHER_TENANT`] for names not in the config).
    pub name: Arc<str>,
    /// The client table's scope for the tenant's `per_ip` limits.
    scope: Arc<str>,
    /// Its traffic: handshakes and requests by status, tunnels, bytes.
    pub stats: RouteStats,
    /// Requests refused, by [`Limit::ALL`] × (tenant, ip).
    pub limited: [[AtomicU64; 2]; 4],
    handshakes: Mutex<Option<Bucket>>,
    requests: Mutex<Option<Bucket>>,
    /// Tunnels open under the tenant's limit on this gateway.
    tunnels: AtomicI64,
    /// The fleet's view of this tenant, with `[cluster]`.
    shared: Mutex<cluster::Shared>,
    /// Held while a batch of handshake tokens is fetched from the fleet.
    fetching: tokio::sync::Mutex<()>,
    /// Held shared by each tunnel-slot claim sent to the fleet, and alone by a renewal
    /// of this gateway's claim, so no claim's grant lands between the two.
    claims: tokio::sync::RwLock<()>,
}

impl Tenant {
    fn new(name: &str) -> Tenant {
        Tenant {
            name: name.into(),
            scope: format!("tenant:{name}").into(),
            stats: RouteStats::new(name),
            limited: Default::default(),
            handshakes: Mutex::new(None),
            requests: Mutex::new(None),
            tunnels: AtomicI64::new(0),
            shared: Mutex::new(cluster::Shared::default()),
            fetching: tokio::sync::Mutex::new(()),
            claims: tokio::sync::RwLock::new(()),
        }
    }

    /// Tunnels open on this gateway that count against the tenant's limit.
    pub fn tunnels(&self) -> i64 {
        self.tunnels.load(Ordering::Relaxed)
    }

    /// Requests refused by any limit.
    pub fn refused(&self) -> u64 {
        self.limited
            .iter()
            .flatten()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }

    fn count_refusal(&self, r: &Refusal) {
        let i = Limit::ALL.iter().position(|l| *l == r.limit).unwrap_or(0);
        let j = usize::from(r.scope == Scope::Ip);
        self.limited[i][j].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a token from this gateway's handshake (`websocket`) or request bucket.
    fn take(&self, websocket: bool, rate: Rate) -> Result<(), Duration> {
        let bucket = if websocket {
            &self.handshakes
        } else {
            &self.requests
        };
        let now = Instant::now();
        let mut b = bucket.hold();
        b.get_or_insert_with(|| Bucket::full(rate, now))
            .take(rate, now)
    }
}

/// The key of a client address's entry: the scope whose `per_ip` limits apply (a
/// tenant's, or a listener's) and the address.
type ClientKey = (Arc<str>, IpAddr);

/// One client address's state within a scope.
#[derive(Debug)]
struct Client {
    handshakes: Option<Bucket>,
    requests: Option<Bucket>,
    tunnels: u32,
    /// From then on the entry holds nothing a fresh one would not (its buckets are full).
    idle_at: Instant,
}

impl Client {
    fn new() -> Client {
        Client {
            handshakes: None,
            requests: None,
            tunnels: 0,
            idle_at: Instant::now(),
        }
    }

    fn idle(&self, now: Instant) -> bool {
        self.tunnels == 0 && now >= self.idle_at
    }
}

/// Client addresses' entries, at most `max` at once.
#[derive(Debug, Default)]
pub struct Clients {
    map: DashMap<ClientKey, Client>,
    /// Entries in the map, counted apart so that the bound holds exactly however many
    /// workers add addresses at once.
    held: AtomicUsize,
    /// When the map was last swept, so a full map of busy entries is not scanned on
    /// every new address.
    swept: Mutex<Option<Instant>>,
}

/// Least time between two sweeps of a full client table.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

impl Clients {
    /// Entries held now.
    pub fn len(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts one more entry if there is room, sweeping out the idle ones when the map
    /// is full; `false` when there is none.
    fn reserve(&self, max: usize) -> bool {
        let below = |n: usize| (n < max).then_some(n + 1);
        if self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, below)
            .is_ok()
        {
            return true;
        }
        let now = Instant::now();
        {
            let mut swept = self.swept.hold();
            if swept.is_some_and(|at| now.duration_since(at) < SWEEP_EVERY) {
                return false;
            }
            *swept = Some(now);
        }
        self.map.retain(|_, c| {
            let keep = !c.idle(now);
            if !keep {
                self.held.fetch_sub(1, Ordering::AcqRel);
            }
            keep
        });
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, below)
            .is_ok()
    }

    /// Checks and counts one request of `ip` against `limits`; `tunnel` takes a slot.
    fn admit(
        &self,
        key: &ClientKey,
        limits: &Limits,
        websocket: bool,
        max: usize,
    ) -> Result<bool, Refusal> {
        let (limit, rate) = rate_of(limits, websocket);
        let tunnel_limit = limits.tunnels.filter(|_| websocket);
        if rate.is_none() && tunnel_limit.is_none() {
            return Ok(false);
        }
        let now = Instant::now();
        let mut entry = match self.map.get_mut(key) {
            Some(e) => e,
            None => {
                if !self.reserve(max) {
                    return Err(Refusal::new(Limit::Clients, Scope::Ip, SWEEP_EVERY));
                }
                match self.map.entry(key.clone()) {
                    // Another worker added it meanwhile: the reservation is not needed.
                    dashmap::Entry::Occupied(e) => {
                        self.held.fetch_sub(1, Ordering::AcqRel);
                        e.into_ref()
                    }
                    dashmap::Entry::Vacant(e) => e.insert(Client::new()),
                }
            }
        };
        let c = &mut *entry;
        if let Some(rate) = rate {
            let slot = if websocket {
                &mut c.handshakes
            } else {
                &mut c.requests
            };
            let bucket = slot.get_or_insert_with(|| Bucket::full(rate, now));
            let taken = bucket.take(rate, now);
            c.idle_at = c.idle_at.max(bucket.full_at(rate));
            if let Err(wait) = taken {
                return Err(Refusal::new(limit, Scope::Ip, wait));
            }
        }
        match tunnel_limit {
            Some(max) if c.tunnels >= max => {
                Err(Refusal::new(Limit::Tunnels, Scope::Ip, TUNNEL_RETRY))
            }
            Some(_) => {
                c.tunnels += 1;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn release(&self, key: &ClientKey) {
        if let Some(mut c) = self.map.get_mut(key) {
            c.tunnels = c.tunnels.saturating_sub(1);
        }
    }
}

/// The process's limit state that outlives snapshots: tenants by name, the client
/// table, and the fleet's shared store.
#[derive(Debug, Default)]
pub struct Limiter {
    tenants: Mutex<HashMap<String, Arc<Tenant>>>,
    clients: Arc<Clients>,
    cluster: Mutex<Option<Arc<Cluster>>>,
}

impl Limiter {
    /// The state of the tenant named `name`, made the first time it is asked for (at
    /// snapshot load, never on the request path).
    pub fn tenant(&self, name: &str) -> Arc<Tenant> {
        let mut tenants = self.tenants.hold();
        tenants
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Tenant::new(name)))
            .clone()
    }

    /// Every tenant's state, by name.
    pub fn tenants(&self) -> Vec<Arc<Tenant>> {
        let mut all: Vec<_> = self.tenants.hold().values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Client addresses tracked now.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// The shared store for `config`'s `[cluster]`: the running one when its settings
    /// are unchanged, else a new one (connecting in the background).
    fn cluster(self: &Arc<Self>, config: &Config) -> Option<Arc<Cluster>> {
        let mut current = self.cluster.hold();
        let Some(wanted) = &config.cluster else {
            *current = None;
            return None;
        };
        if let Some(c) = current.as_ref().filter(|c| c.config() == wanted) {
            return Some(c.clone());
        }
        let made = Cluster::start(wanted.clone(), Arc::downgrade(self));
        *current = made.clone();
        made
    }

    /// Whether `cluster` is the shared store in use (a reload may have replaced it).
    fn uses(&self, cluster: &Cluster) -> bool {
        self.cluster
            .hold()
            .as_ref()
            .is_some_and(|c| std::ptr::eq(&**c, cluster))
    }

    /// The shared store in use, if any.
    pub fn cluster_in_use(&self) -> Option<Arc<Cluster>> {
        self.cluster.hold().clone()
    }
}

/// A listener's per-IP defaults and the proxies it trusts to name the client.
#[derive(Debug)]
struct ListenerLimits {
    /// The client table's scope for these defaults.
    scope: Arc<str>,
    per_ip: Limits,
    trusted_proxies: Vec<ipnet::IpNet>,
}

/// A snapshot's limits: its tenants' settings with their shared state, each listener's
/// per-IP defaults, and the store shared by the fleet.
#[derive(Debug)]
pub struct Table {
    tenants: HashMap<String, (TenantConfig, Arc<Tenant>)>,
    other: Arc<Tenant>,
    /// Where refusals of requests with no tenant are counted (the tenant `""`).
    none: Arc<Tenant>,
    listeners: HashMap<String, ListenerLimits>,
    clients: Arc<Clients>,
    max_clients: usize,
    cluster: Option<Arc<Cluster>>,
}

impl Table {
    /// Builds the limits of `config` over the process's `limiter`. Must run inside the
    /// tokio runtime (the shared store's connection starts in the background).
    pub fn new(config: &Config, limiter: &Arc<Limiter>) -> Table {
        let tenants = config
            .tenants
            .iter()
            .map(|t| (t.name.clone(), (t.clone(), limiter.tenant(&t.name))))
            .collect();
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let limits = ListenerLimits {
                    scope: format!("listener:{}", l.name).into(),
                    per_ip: l.per_ip.clone(),
                    trusted_proxies: l.trusted_proxies.clone(),
                };
                (l.name.clone(), limits)
            })
            .collect();
        Table {
            tenants,
            other: limiter.tenant(OTHER_TENANT),
            none: limiter.tenant(""),
            listeners,
            clients: limiter.clients.clone(),
            max_clients: config.max_clients,
            cluster: limiter.cluster(config),
        }
    }

    /// The config's tenants with their state, by name.
    pub fn tenants(&self) -> Vec<(&TenantConfig, &Arc<Tenant>)> {
        let mut all: Vec<_> = self.tenants.values().map(|(c, t)| (c, t)).collect();
        all.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        all
    }

    /// The fleet's shared store, with `[cluster]`.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// The proxies whose `X-Forwarded-For` `listener` believes.
    pub fn trusted_proxies(&self, listener: &str) -> &[ipnet::IpNet] {
        self.listeners
            .get(listener)
            .map_or(&[], |l| &l.trusted_proxies)
    }

    /// The state a request of `tenant` is counted under: its own when the config lists
    /// it, else the shared [`OTHER_TENANT`].
    pub fn tenant(&self, tenant: Option<&str>) -> Option<Arc<Tenant>> {
        let known = self.tenants.get(tenant?).map(|(_, t)| t);
        Some(known.unwrap_or(&self.other).clone())
    }

    /// Checks one request against its tenant's limits and its client address's, and
    /// counts it: a WebSocket (`websocket`) takes a handshake token and a tunnel slot, a
    /// plain request a request token. What it takes is held by the [`Admission`] and
    /// given back when that is dropped.
    pub async fn admit(
        &self,
        listener: &str,
        tenant: Option<&Arc<Tenant>>,
        ip: IpAddr,
        websocket: bool,
    ) -> Result<Admission, Refusal> {
        let config = tenant
            .and_then(|t| self.tenants.get(&*t.name))
            .map(|(c, _)| c);
        let mut admission = Admission {
            bandwidth: None,
            client: None,
            tenant: None,
        };
        let per_ip = match tenant.zip(config.and_then(|c| c.per_ip.as_ref())) {
            Some((t, limits)) => Some((t.scope.clone(), limits)),
            None => self
                .listeners
                .get(listener)
                .map(|l| (l.scope.clone(), &l.per_ip)),
        };
        let refused = |r: Refusal| {
            tenant.unwrap_or(&self.none).count_refusal(&r);
            r
        };
        if let Some((scope, limits)) = per_ip.filter(|(_, l)| !l.is_empty()) {
            let key = (scope, ip);
            let slot = self
                .clients
                .admit(&key, limits, websocket, self.max_clients)
                .map_err(refused)?;
            if slot {
                admission.client = Some((self.clients.clone(), key));
            }
            admission.bandwidth = limits.bandwidth.filter(|_| websocket);
        }
        let (Some(tenant), Some(config)) = (tenant, config) else {
            return Ok(admission);
        };
        let limits = &config.limits;
        admission.bandwidth = match (admission.bandwidth, limits.bandwidth.filter(|_| websocket)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let (limit, rate) = rate_of(limits, websocket);
        if let Some(rate) = rate {
            let shared = match &self.cluster {
                Some(c) if websocket => c.take(tenant, rate).await.ok_or(()),
                _ => Err(()),
            };
            let taken = match shared {
                Ok(taken) => taken,
                Err(()) => {
                    if self.cluster.is_some() && websocket {
                        self.unavailable(limit).map_err(refused)?;
                    }
                    tenant.take(websocket, rate)
                }
            };
            taken.map_err(|wait| refused(Refusal::new(limit, Scope::Tenant, wait)))?;
        }
        if let (Some(max), true) = (limits.tunnels, websocket) {
            let shared = match &self.cluster {
                Some(c) => c.claim(tenant, max).await,
                None => None,
            };
            let counted = match shared {
                Some(counted) => counted,
                None => {
                    if self.cluster.is_some() {
                        self.unavailable(Limit::Tunnels).map_err(refused)?;
                    }
                    // Counted first, so two requests at once cannot both take the last slot.
                    let before = tenant.tunnels.fetch_add(1, Ordering::Relaxed);
                    if before >= i64::from(max) {
                        tenant.tunnels.fetch_sub(1, Ordering::Relaxed);
                    }
                    before < i64::from(max)
                }
            };
            if !counted {
                return Err(refused(Refusal::new(
                    Limit::Tunnels,
                    Scope::Tenant,
                    TUNNEL_RETRY,
                )));
            }
            admission.tenant = Some(tenant.clone());
        }
        Ok(admission)
    }

    /// With the shared store unreachable: go on with local limits (`open`), or refuse.
    fn unavailable(&self, limit: Limit) -> Result<(), Refusal> {
        match &self.cluster {
            Some(c) if c.config().on_failure == OnFailure::Closed => Err(Refusal {
                limit,
                scope: Scope::Tenant,
                retry_after: c.config().timeout,
                unavailable: true,
            }),
            _ => Ok(()),
        }
    }
}

/// What an admitted request holds: its tunnel slots (given back on drop) and the
/// bandwidth its tunnel may use.
#[derive(Debug)]
pub struct Admission {
    /// Bytes per second the tunnel may move each way, when limited.
    pub bandwidth: Option<u64>,
    client: Option<(Arc<Clients>, ClientKey)>,
    tenant: Option<Arc<Tenant>>,
}

impl Admission {
    /// Whether it holds nothing and limits nothing (so need not be kept).
    pub fn is_empty(&self) -> bool {
        self.bandwidth.is_none() && self.client.is_none() && self.tenant.is_none()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some((clients, key)) = &self.client {
            clients.release(key);
        }
        if let Some(t) = &self.tenant {
            t.tunnels.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests;
