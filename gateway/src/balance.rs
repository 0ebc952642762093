//! Select stage: each upstream pool's servers, their health, and the balancer that picks
//! one for a new tunnel or request (round-robin, least-connections, consistent hashing,
//! with the hash key taken from the request).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::header;
use xxhash_rust::xxh3::xxh3_64;

use crate::config::{Balance, HashKey, ServerConfig, UpstreamConfig};
use crate::head::{HeaderFields, RequestHead};
use crate::headers::value_text;
use crate::tls::Connector;

/// Virtual nodes per server on the consistent-hash ring: enough that keys spread within a
/// few percent across a handful of servers, small enough to rebuild on every reload.
const VNODES: usize = 160;

/// One upstream server and its live state, shared across config reloads.
#[derive(Debug)]
pub struct Server {
    /// Address as configured.
    pub config: ServerConfig,
    /// Open tunnels and in-flight requests on this server.
    active: AtomicUsize,
    /// The active health check's verdict (true until a check says otherwise).
    healthy: AtomicBool,
    /// Consecutive connect failures seen by the request path.
    fails: AtomicU32,
    /// Passive ejection deadline, in nanoseconds since [`epoch`]; 0 when not ejected.
    ejected_until: AtomicU64,
    /// Failed connects, ever (for metrics).
    connect_failures: AtomicU64,
    /// Times a failure ejected the server, ever (for metrics).
    ejections: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_nanos() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

impl Server {
    /// A new server, healthy until shown otherwise.
    pub fn new(config: ServerConfig) -> Server {
        Server {
            config,
            active: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            fails: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
        }
    }

    /// Whether a passive ejection keeps the server out now.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_nanos() < until
    }

    /// Failed connects and ejections since the process started.
    pub fn failures(&self) -> (u64, u64) {
        (
            self.connect_failures.load(Ordering::Relaxed),
            self.ejections.load(Ordering::Relaxed),
        )
    }

    /// Whether the server may receive new connections now.
    pub fn is_available(&self) -> bool {
        if !self.healthy.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || now_nanos() >= until
    }

    /// Open tunnels and in-flight requests.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Sets the active health check's verdict.
    pub fn set_healthy(&self, healthy: bool) {
        if healthy {
            self.fails.store(0, Ordering::Relaxed);
            self.ejected_until.store(0, Ordering::Relaxed);
        }
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// The active health check's verdict.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records a successful connect.
    pub fn connect_succeeded(&self) {
        if self.fails.load(Ordering::Relaxed) != 0 {
            self.fails.store(0, Ordering::Relaxed);
            self.ejected_until.store(0, Ordering::Relaxed);
        }
    }

    /// Records a failed connect; returns true when this failure ejected the server.
    pub fn connect_failed(&self, pool: &Pool) -> bool {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
        let fails = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if pool.max_fails == 0 || fails < pool.max_fails {
            return false;
        }
        let ejected = if pool.has_health_check {
            // The active check decides when it comes back.
            self.healthy.swap(false, Ordering::Relaxed)
        } else {
            let until = now_nanos() + pool.fail_timeout.as_nanos() as u64;
            self.ejected_until.store(until.max(1), Ordering::Relaxed);
            true
        };
        if ejected {
            self.ejections.fetch_add(1, Ordering::Relaxed);
        }
        ejected
    }

    /// Counts a tunnel or request against this server until the guard drops.
    pub fn acquire(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }
}

/// Keeps a server's active count raised while alive.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Server>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An upstream pool: servers plus the balancing policy.
#[derive(Debug)]
pub struct Pool {
    /// Pool name.
    pub name: String,
    /// Servers in config order.
    pub servers: Vec<Arc<Server>>,
    /// Balancing algorithm.
    pub balance: Balance,
    /// Deadline for one TCP connect (and the TLS handshake after it).
    pub connect_timeout: Duration,
    /// TLS to the pool's TLS servers.
    pub tls: Option<Arc<Connector>>,
    max_fails: u32,
    fail_timeout: Duration,
    has_health_check: bool,
    next: AtomicUsize,
    /// Sorted (hash, server index) points; empty unless hashing.
    ring: Vec<(u64, usize)>,
}

impl Pool {
    /// Builds a pool, reusing the live state of servers that `previous` already had.
    pub fn new(
        config: &UpstreamConfig,
        previous: Option<&Pool>,
        tls: Option<Arc<Connector>>,
    ) -> Pool {
        let servers: Vec<Arc<Server>> = config
            .servers
            .iter()
            .map(|s| {
                previous
                    .and_then(|p| p.servers.iter().find(|x| x.config == *s))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Server::new(s.clone())))
            })
            .collect();
        let ring = if matches!(config.balance, Balance::Hash(_)) {
            let mut ring: Vec<(u64, usize)> = servers
                .iter()
                .enumerate()
                .flat_map(|(i, s)| {
                    (0..VNODES).map(move |v| {
                        (xxh3_64(format!("{}#{v}", s.config.authority).as_bytes()), i)
                    })
                })
                .collect();
            ring.sort_unstable();
            ring
        } else {
            Vec::new()
        };
        Pool {
            name: config.name.clone(),
            servers,
            balance: config.balance.clone(),
            connect_timeout: config.connect_timeout,
            tls,
            max_fails: config.max_fails,
            fail_timeout: config.fail_timeout,
            has_health_check: config.health.is_some(),
            next: AtomicUsize::new(0),
            ring,
        }
    }

    /// Picks an available server not in `tried` (indices into `servers`).
    /// `key` is the consistent-hash key; other algorithms ignore it.
    pub fn pick(&self, key: &[u8], tried: &[usize]) -> Option<usize> {
        let usable = |i: usize| !tried.contains(&i) && self.servers[i].is_available();
        let n = self.servers.len();
        match self.balance {
            Balance::Hash(_) => {
                let h = xxh3_64(key);
                let start = self.ring.partition_point(|(p, _)| *p < h);
                (0..self.ring.len())
                    .map(|k| self.ring[(start + k) % self.ring.len()].1)
                    .find(|&i| usable(i))
            }
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| (start + k) % n).find(|&i| usable(i))
            }
            Balance::LeastConn => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|&i| usable(i))
                    .min_by_key(|&i| self.servers[i].active())
            }
        }
    }

    /// The hash key source, when the pool hashes.
    pub fn hash_key(&self) -> Option<&HashKey> {
        match &self.balance {
            Balance::Hash(k) => Some(k),
            _ => None,
        }
    }
}

/// The consistent-hash key for this request (empty unless the pool hashes). A request
/// without the configured header, cookie or parameter hashes on its client IP.
pub fn hash_key(pool: &Pool, req: &impl RequestHead, peer: SocketAddr) -> Vec<u8> {
    let found = match pool.hash_key() {
        None => return Vec::new(),
        Some(HashKey::ClientIp) => None,
        Some(HashKey::Header(name)) => req.fields().values_of(name).next().map(<[u8]>::to_vec),
        Some(HashKey::Cookie(name)) => cookie(req.fields(), name).map(|v| v.as_bytes().to_vec()),
        Some(HashKey::Query(name)) => req.uri().query().and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_bytes().to_vec())
        }),
    };
    found.unwrap_or_else(|| peer.ip().to_string().into_bytes())
}

/// The value of the cookie `name`, from any `Cookie` field.
fn cookie<'a>(fields: &'a impl HeaderFields, name: &str) -> Option<&'a str> {
    fields
        .values_of(header::COOKIE.as_str())
        .filter_map(value_text)
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn pool(balance: &str, n: usize) -> Pool {
        let servers: Vec<String> = (0..n)
            .map(|i| format!("\"127.0.0.1:{}\"", 9000 + i))
            .collect();
        let src = format!(
            "[listeners.l]\nbind = \"127.0.0.1:1\"\n[upstreams.p]\nservers = [{}]\n{balance}\n[[routes]]\nupstream = \"p\"\n",
            servers.join(",")
        );
        let c = Config::parse("t.toml", &src).unwrap();
        Pool::new(&c.upstreams[0], None, None)
    }

    #[test]
    fn round_robin_cycles() {
        let p = pool("balance = \"round-robin\"", 3);
        let picks: Vec<_> = (0..6).map(|_| p.pick(b"", &[]).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        assert_eq!(p.pick(b"", &[0, 1, 2]), None);
    }

    #[test]
    fn least_conn_prefers_idle() {
        let p = pool("", 3);
        let _a = p.servers[0].acquire();
        let _b = p.servers[1].acquire();
        assert_eq!(p.pick(b"", &[]), Some(2));
    }

    #[test]
    fn hash_moves_only_the_lost_servers_keys() {
        let p = pool("balance = \"hash\"", 4);
        let keys: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| p.pick(k.as_bytes(), &[]).unwrap())
            .collect();
        let mut counts = [0; 4];
        before.iter().for_each(|&i| counts[i] += 1);
        assert!(counts.iter().all(|&c| c > 300), "uneven spread {counts:?}");
        p.servers[2].set_healthy(false);
        for (k, &b) in keys.iter().zip(&before) {
            let after = p.pick(k.as_bytes(), &[]).unwrap();
            if b != 2 {
                assert_eq!(after, b, "key {k} moved although its server stayed");
            } else {
                assert_ne!(after, 2);
            }
        }
    }
}
