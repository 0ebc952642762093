//! Limits shared by a fleet of gateways through Redis (`[cluster]`).
//!
//! - **Handshake rate.** A tenant's bucket lives in Redis (a Lua script refills and takes
//!   atomically, on Redis's clock). A gateway takes tokens in batches of a tenth of a
//!   second's rate and spends them locally for up to a second, so a busy tenant costs one
//!   round trip per batch, not per handshake; tokens a gateway leaves unspent are lost,
//!   which errs on the side of the limit.
//! - **Tunnels.** Each gateway claims slots of a tenant's limit in a Redis hash (gateway →
//!   slots) and renews its lease in a sorted set (gateway → expiry) every tick; a claim
//!   first drops gateways whose lease ran out, so a dead gateway's slots come back within
//!   `lease`. A closed tunnel's slot stays claimed until the next tick (so a tenant that
//!   opens and closes tunnels in a loop needs no round trip), then goes back.
//! - **Failure.** Every call is bounded by `timeout`. When Redis fails, the gateway logs it
//!   once, counts it, and serves on its own limits (`on_failure = "open"`) or refuses
//!   (`"closed"`) without waiting on Redis again until a ping in the background succeeds;
//!   then every tick re-writes its claims, so a restarted Redis holds the fleet's counts
//!   again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use super::{Limiter, Tenant};
use crate::config::{ClusterConfig, OnFailure, Rate};
use crate::sync::Hold;

/// How long locally held handshake tokens stay spendable.
const TOKEN_LEASE: Duration = Duration::from_secs(1);

/// Takes up to `want` tokens from a tenant's bucket: `{taken, ms until one is free}`.
const TAKE: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local got = math.min(math.floor(tokens), want)
tokens = tokens - got
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
local wait = 0
if got == 0 then wait = math.ceil((1 - tokens) * 1000 / rate) end
return {got, wait}
";

/// Drops expired gateways' claims, then claims up to `want` more of `limit` slots for
/// gateway `ARGV[1]` and renews its lease: the slots it got.
const CLAIM: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local gw, want, limit, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, g in ipairs(dead) do redis.call('HDEL', KEYS[1], g) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end
local got = math.max(0, math.min(want, limit - total))
if got > 0 then redis.call('HINCRBY', KEYS[1], gw, got) end
redis.call('ZADD', KEYS[2], now + lease, gw)
redis.call('PEXPIRE', KEYS[1], lease * 2)
redis.call('PEXPIRE', KEYS[2], lease * 2)
return got
";

/// Sets gateway `ARGV[1]`'s claim to `ARGV[2]` slots and renews its lease (a claim of 0
/// is removed).
const RENEW: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local gw, n, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if n > 0 then
  redis.call('HSET', KEYS[1], gw, n)
  redis.call('ZADD', KEYS[2], now + lease, gw)
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  redis.call('PEXPIRE', KEYS[2], lease * 2)
else
  redis.call('HDEL', KEYS[1], gw)
  redis.call('ZREM', KEYS[2], gw)
end
return n
";

/// A tenant's standing with the fleet, on this gateway.
#[derive(Debug, Default)]
pub(super) struct Shared {
    /// Handshake tokens taken from Redis and not yet spent.
    tokens: u32,
    /// Until when they may be spent.
    until: Option<Instant>,
    /// Tunnel slots this gateway holds in Redis (at least the tunnels open).
    claimed: u32,
    /// What the last renewal wrote, so an unchanged zero is not written again.
    renewed: Option<u32>,
}

/// Counters of the shared store, for `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Whether the last call to Redis succeeded.
    pub up: AtomicBool,
    /// Calls to Redis (scripts and pings).
    pub calls: AtomicU64,
    /// Calls that failed or timed out.
    pub errors: AtomicU64,
}

/// The connection to the fleet's Redis and this gateway's identity in it.
pub struct Cluster {
    config: ClusterConfig,
    conn: ConnectionManager,
    /// This process's name in the claims: random, so a restarted gateway starts afresh.
    id: String,
    take: Script,
    claim: Script,
    renew: Script,
    /// What `/metrics` shows.
    pub stats: ClusterStats,
    stop: CancellationToken,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("redis", &self.config.redis)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Cluster {
    /// Connects (lazily, in the background) and starts the renewal task; `None`, logged,
    /// when the client cannot be made.
    pub(super) fn start(config: ClusterConfig, limiter: Weak<Limiter>) -> Option<Arc<Cluster>> {
        let made = redis::Client::open(config.redis.as_str()).and_then(|client| {
            let settings = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.timeout))
                .set_response_timeout(Some(config.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            ConnectionManager::new_lazy_with_config(client, settings)
        });
        let conn = match made {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(redis = %config.redis, error = %e, "cluster: cannot use Redis; limits stay local");
                return None;
            }
        };
        let mut id = [0u8; 8];
        // Without randomness two gateways could share a name; the time keeps them apart.
        if crate::config::crypto_provider()
            .secure_random
            .fill(&mut id)
            .is_err()
        {
            id = u64::from(std::process::id()).to_le_bytes();
        }
        let cluster = Arc::new(Cluster {
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            conn,
            take: Script::new(TAKE),
            claim: Script::new(CLAIM),
            renew: Script::new(RENEW),
            stats: ClusterStats::default(),
            stop: CancellationToken::new(),
            config,
        });
        cluster.stats.up.store(true, Ordering::Relaxed);
        tokio::spawn(renewals(Arc::downgrade(&cluster), limiter));
        Some(cluster)
    }

    /// Its settings.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    fn up(&self) -> bool {
        self.stats.up.load(Ordering::Relaxed)
    }

    /// Runs one script invocation within the timeout; `None` when Redis failed (noted
    /// once, until it answers again).
    async fn call<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        let mut conn = self.conn.clone();
        self.bounded(invocation.invoke_async(&mut conn)).await
    }

    /// Awaits one call to Redis within the timeout, counting it; `None` (noted) when it
    /// failed.
    async fn bounded<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Option<T> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.config.timeout, call).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                self.failed("no answer within the cluster timeout");
                None
            }
        }
    }

    fn failed(&self, why: &str) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if self.stats.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                redis = %self.config.redis,
                error = why,
                on_failure = match self.config.on_failure {
                    OnFailure::Open => "open: local limits",
                    OnFailure::Closed => "closed: refusing",
                },
                "cluster: Redis unreachable; limits are local until it answers again"
            );
        }
    }

    /// Takes one of `tenant`'s handshake tokens from the fleet's bucket: `Err` with the
    /// wait when it is empty, `None` when Redis is down.
    pub(super) async fn take(&self, tenant: &Tenant, rate: Rate) -> Option<Result<(), Duration>> {
        // While Redis is down, what it granted before is not spent either: the fleet's
        // view is stale, and `on_failure` decides.
        if !self.up() {
            return None;
        }
        if spend(tenant) {
            return Some(Ok(()));
        }
        // One batch in flight per tenant: the requests that find the tokens spent wait
        // for it rather than each taking a batch of their own.
        let _fetching = tenant.fetching.lock().await;
        if spend(tenant) {
            return Some(Ok(()));
        }
        let want = (rate.per_second / 10.0)
            .floor()
            .clamp(1.0, f64::from(rate.burst));
        let key = format!("sluice:{{{}}}:handshakes", tenant.name);
        let mut inv = self.take.key(key);
        inv.arg(rate.per_second).arg(rate.burst).arg(want as u64);
        let (got, wait_ms): (u32, u64) = self.call(&inv).await?;
        if got == 0 {
            return Some(Err(Duration::from_millis(wait_ms)));
        }
        let mut s = tenant.shared.hold();
        s.tokens = got - 1;
        s.until = Some(Instant::now() + TOKEN_LEASE);
        Some(Ok(()))
    }

    /// Adds `delta` to a plugin's counter in the fleet's current fixed window of
    /// `window_ms` (by this gateway's clock, which the fleet's NTP keeps close), and
    /// gives the fleet's count; `None` when Redis is down. `scope` is the plugin, the
    /// request's tenant and the key; one pipelined round trip (`INCRBY`, `PEXPIRE`).
    pub async fn counter_add(
        &self,
        (plugin, tenant, key): (&str, Option<&str>, &str),
        delta: u64,
        window_ms: u64,
    ) -> Option<u64> {
        if !self.up() {
            return None;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let start = now / window_ms * window_ms;
        // Lengths make the parts unambiguous whatever a tenant name or key holds.
        let tenant = tenant.map_or(String::from("-"), |t| format!("{}:{t}", t.len()));
        let name = format!("sluice:counter:{{{plugin}}}:{tenant}:{window_ms}:{start}:{key}");
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("INCRBY").arg(&name).arg(delta);
        pipe.cmd("PEXPIRE")
            .arg(&name)
            .arg(window_ms + 1000)
            .ignore();
        let (n,) = self.bounded(pipe.query_async(&mut conn)).await?;
        Some(n)
    }

    /// Takes one of `tenant`'s `max` tunnel slots in the fleet and counts the tunnel
    /// locally: `Some(false)` when the fleet is at the limit, `None` when Redis is down.
    pub(super) async fn claim(&self, tenant: &Tenant, max: u32) -> Option<bool> {
        // While Redis is down this gateway's claims lapse with its lease.
        if !self.up() {
            return None;
        }
        if self.slot_at_hand(tenant) {
            return Some(true);
        }
        let mut inv = self.claim.key(tunnel_keys(tenant));
        inv.key(lease_key(tenant))
            .arg(&self.id)
            .arg(1)
            .arg(max)
            .arg(self.config.lease.as_millis() as u64);
        // Shared with other claims; a renewal holds it alone (see `renew_all`).
        let _claiming = tenant.claims.read().await;
        let got: Option<u32> = self.call(&inv).await;
        let mut s = tenant.shared.hold();
        s.claimed += got?;
        Some(count_tunnel(&s, tenant))
    }

    /// Counts a tunnel when this gateway holds a slot no open tunnel uses.
    fn slot_at_hand(&self, tenant: &Tenant) -> bool {
        count_tunnel(&tenant.shared.hold(), tenant)
    }

    /// Writes this gateway's claims for every tenant (just what its open tunnels need,
    /// or nothing when `!keep`) and renews its lease; pings first when Redis was down.
    async fn renew_all(&self, limiter: &Limiter, keep: bool) {
        if !self.up() {
            // A ping that fails is counted, not logged again.
            let mut conn = self.conn.clone();
            let ping = redis::cmd("PING");
            if self
                .bounded(ping.query_async::<String>(&mut conn))
                .await
                .is_none()
            {
                return;
            }
            tracing::info!(redis = %self.config.redis, "cluster: Redis answers again; limits are shared");
            self.stats.up.store(true, Ordering::Relaxed);
            for t in limiter.tenants() {
                t.shared.hold().renewed = None;
            }
        }
        for tenant in limiter.tenants() {
            // No claim runs from reading the count to the write landing: the absolute
            // write would erase a slot granted in between, and the fleet would lend it
            // to another gateway. (A claim whose client left after Redis granted it is
            // not counted here: its slot goes back.)
            let _renewing = tenant.claims.write().await;
            let n = {
                let mut s = tenant.shared.hold();
                let open = u32::try_from(tenant.tunnels.load(Ordering::Relaxed)).unwrap_or(0)
                    * u32::from(keep);
                s.claimed = open;
                if open == 0 && s.renewed == Some(0) {
                    continue;
                }
                open
            };
            let mut inv = self.renew.key(tunnel_keys(&tenant));
            inv.key(lease_key(&tenant))
                .arg(&self.id)
                .arg(n)
                .arg(self.config.lease.as_millis() as u64);
            let Some(written) = self.call::<u32>(&inv).await else {
                return;
            };
            tenant.shared.hold().renewed = Some(written);
        }
    }
}

/// Counts a tunnel, under the tenant's lock `s`, when a slot claimed here is unused.
fn count_tunnel(s: &Shared, tenant: &Tenant) -> bool {
    if i64::from(s.claimed) > tenant.tunnels.load(Ordering::Relaxed) {
        tenant.tunnels.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    false
}

/// Spends one of the tenant's handshake tokens held here, if any are left and still
/// spendable.
fn spend(tenant: &Tenant) -> bool {
    let mut s = tenant.shared.hold();
    if s.tokens > 0 && s.until.is_some_and(|u| Instant::now() < u) {
        s.tokens -= 1;
        return true;
    }
    false
}

fn tunnel_keys(tenant: &Tenant) -> String {
    format!("sluice:{{{}}}:tunnels", tenant.name)
}

fn lease_key(tenant: &Tenant) -> String {
    format!("sluice:{{{}}}:leases", tenant.name)
}

/// Renews the claims a few times per lease (at least twice a second, so a closed
/// tunnel's slot goes back to the fleet soon) until the cluster or the process goes.
async fn renewals(cluster: Weak<Cluster>, limiter: Weak<Limiter>) {
    let Some(tick) = cluster
        .upgrade()
        .map(|c| (c.config.lease / 4).min(Duration::from_millis(500)))
    else {
        return;
    };
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stop = match cluster.upgrade() {
            Some(c) => c.stop.clone(),
            None => return,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let (Some(c), Some(l)) = (cluster.upgrade(), limiter.upgrade()) else {
            return;
        };
        if !l.uses(&c) {
            // A reload replaced this store: the one in use now renews the same tunnels
            // under its own name, so this one's claims go.
            c.renew_all(&l, false).await;
            return;
        }
        c.renew_all(&l, true).await;
    }
}
