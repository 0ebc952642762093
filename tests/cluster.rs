//! Limits shared by a fleet: two real `sluice` processes and one real `redis-server`
//! (Debian's package, started here on a loopback port). A tenant's tunnel count and
//! handshake rate hold across both gateways; with Redis gone both keep serving on their
//! own limits, and once it is back the shared limit holds again; a gateway killed with
//! its tunnels open gives their slots back within the lease.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `redis-server` on a loopback port, killed on drop.
struct Redis {
    port: u16,
    child: Option<Child>,
}

impl Redis {
    /// Starts a server on a free port below the ephemeral range, so no listener or
    /// connection elsewhere in the run can take the port while it is down between
    /// [`Redis::restart`]s; another port if something held that one after all.
    async fn start() -> Redis {
        let mut why = String::new();
        for _ in 0..5 {
            let mut redis = Redis {
                port: unused_fixed_port(),
                child: None,
            };
            match redis.launch().await {
                Ok(()) => return redis,
                Err(e) => why = e,
            }
        }
        panic!("redis-server did not start on any of 5 ports: {why}");
    }

    /// Starts the server again on its port, and waits until it answers.
    async fn restart(&mut self) {
        if let Err(e) = self.launch().await {
            panic!("redis-server on port {}: {e}", self.port);
        }
    }

    /// Starts the server on its port and waits for its `PONG`; an error when it exits
    /// first (the port taken) or something else answers.
    async fn launch(&mut self) -> Result<(), String> {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (Debian: apt-get install redis-server)");
        let addr = self.addr();
        let up = eventually(STEP, "redis-server to listen or exit", || {
            match child.try_wait() {
                Ok(Some(status)) => Some(Err(format!("redis-server exited: {status}"))),
                _ => std::net::TcpStream::connect(addr).ok().map(|_| Ok(())),
            }
        })
        .await;
        self.child = Some(child);
        up?;
        let mut tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tcp.write_all(b"PING\r\n")
            .await
            .map_err(|e| format!("PING: {e}"))?;
        let mut pong = [0u8; 7];
        within(STEP, "PONG", tcp.read_exact(&mut pong))
            .await
            .map_err(|e| format!("PONG: {e}"))?;
        match &pong {
            b"+PONG\r\n" => Ok(()),
            other => Err(format!("not redis: {:?}", String::from_utf8_lossy(other))),
        }
    }

    /// The tunnel slots the gateways claim for `tenant` in all (`HVALS` summed).
    async fn claimed(&self, tenant: &str) -> u64 {
        let key = format!("sluice:{{{tenant}}}:tunnels");
        let cmd = format!("*2\r\n$5\r\nHVALS\r\n${}\r\n{key}\r\n", key.len());
        let mut tcp = tokio::net::TcpStream::connect(self.addr())
            .await
            .expect("connect");
        tcp.write_all(cmd.as_bytes()).await.expect("HVALS");
        let mut reply = Vec::new();
        let mut buf = [0u8; 1024];
        // `*N` then N bulk strings (`$len` and the number): read until all are in.
        loop {
            let n = within(STEP, "HVALS", tcp.read(&mut buf))
                .await
                .expect("read");
            assert!(n > 0, "redis closed");
            reply.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&reply).to_string();
            let mut lines = text.split("\r\n");
            let count: usize = lines.next().and_then(|l| l[1..].parse().ok()).unwrap_or(0);
            let values: Vec<u64> = lines
                .skip(1)
                .step_by(2)
                .filter_map(|v| v.parse().ok())
                .collect();
            if values.len() >= count && text.ends_with("\r\n") {
                return values.iter().sum();
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// A loopback port no one listens on, between 20000 and the ephemeral range (32768), so
/// that no `bind(0)` nor outgoing connection of this run is given it.
fn unused_fixed_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    for _ in 0..100 {
        let port = 20_000 + (RandomState::new().hash_one(()) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32000");
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gateway of the fleet: tenant `a` on host `a.example` with `limits`, sharing them
/// through `redis`.
async fn member(backend: &Backend, redis: &Redis, limits: &str) -> Gateway {
    member_config(backend, redis, "", limits).start().await
}

/// The config of a [`member`], with more `[cluster]` settings.
fn member_config(backend: &Backend, redis: &Redis, cluster: &str, limits: &str) -> ConfigBuilder {
    ConfigBuilder::new(&[backend.addr]).extra(&format!(
        r#"{ADMIN}
[cluster]
redis = "redis://{redis}"
lease = "2s"
timeout = "200ms"
{cluster}

[tenants.a]
hosts = ["a.example"]

[tenants.a.limits]
{limits}

[[routes]]
name = "a"
host = "a.example"
upstream = "echo"
"#,
        redis = redis.addr()
    ))
}

async fn tunnel(gw: &Gateway) -> Result<Ws, Response> {
    upgrade(gw.addr(), "a.example", None).await
}

/// Opens a tunnel through `gw`, retrying while the tenant is at its limit (a slot given
/// back elsewhere reaches this gateway within a renewal or a lease).
async fn tunnel_when_free(gw: &Gateway, within_time: Duration) -> Ws {
    within(within_time, "a tunnel slot to come free", async {
        loop {
            match tunnel(gw).await {
                Ok(ws) => return ws,
                Err(r) => assert_limited(&r, "tunnels"),
            };
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_hold_one_tunnel_limit_and_survive_redis_going_away() {
    let backend = Backend::start("a").await;
    let mut redis = Redis::start().await;
    let one = member(&backend, &redis, "tunnels = 3").await;
    let two = member(&backend, &redis, "tunnels = 3").await;

    // Three tunnels over both gateways fill the tenant's one limit.
    let mut open_one = vec![
        tunnel(&one).await.expect("1"),
        tunnel(&one).await.expect("2"),
    ];
    let mut open_two = vec![tunnel(&two).await.expect("3")];
    assert_limited(
        &tunnel(&two).await.expect_err("4th on two"),
        "tenant limit on tunnels",
    );
    assert_limited(
        &tunnel(&one).await.expect_err("4th on one"),
        "tenant limit on tunnels",
    );

    // A tunnel closed on one gateway frees a slot the other can take.
    close_ws(open_one.pop().unwrap()).await;
    open_two.push(tunnel_when_free(&two, Duration::from_secs(5)).await);
    assert_limited(&tunnel(&one).await.expect_err("full again"), "tunnels");

    // Redis goes away: both serve on their own limits (3 each), say so once, and count it.
    redis.kill();
    let admin = one.admin().await;
    let mut outage = Vec::new();
    within(Duration::from_secs(10), "local limits on both", async {
        while open_one.len() + outage.len() < 3 {
            match tunnel(&one).await {
                Ok(ws) => outage.push(ws),
                Err(r) => {
                    assert_limited(&r, "tunnels");
                }
            }
        }
    })
    .await;
    assert_limited(&tunnel(&one).await.expect_err("local limit"), "tunnels");
    wait_metric(admin, "sluice_cluster_up", &[], 0.0).await;
    one.wait_log("the outage warning", |l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains("Redis unreachable"))
    })
    .await;
    let warnings = one
        .json_logs()
        .iter()
        .filter(|l| l.to_string().contains("Redis unreachable"))
        .count();
    assert_eq!(warnings, 1, "the outage is logged once");

    // Redis comes back (empty): the gateways write their counts again, and the fleet's
    // limit holds: 3 + 2 tunnels are open, so neither may open another until 5 close.
    redis.restart().await;
    wait_metric(admin, "sluice_cluster_up", &[], 1.0).await;
    wait_metric(two.admin().await, "sluice_cluster_up", &[], 1.0).await;
    within(
        STEP,
        "both gateways' claims (5) in the restarted Redis",
        async {
            while redis.claimed("a").await != 5 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    assert_limited(
        &tunnel(&two).await.expect_err("shared again"),
        "tenant limit on tunnels",
    );
    assert_limited(
        &tunnel(&one).await.expect_err("shared again"),
        "tenant limit on tunnels",
    );
    for ws in outage
        .drain(..)
        .chain(open_two.drain(..))
        .chain(open_one.drain(..))
    {
        close_ws(ws).await;
    }
    let again = tunnel_when_free(&two, Duration::from_secs(5)).await;
    close_ws(again).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_handshake_rate() {
    let backend = Backend::start("a").await;
    let redis = Redis::start().await;
    // A bucket of 4 that refills one token in 100 s: 4 handshakes in all.
    let limits = "handshakes = { rate = 0.01, burst = 4 }";
    let one = member(&backend, &redis, limits).await;
    let two = member(&backend, &redis, limits).await;
    let mut open = Vec::new();
    for gw in [&one, &two, &one, &two] {
        open.push(tunnel(gw).await.expect("within the shared burst"));
    }
    for gw in [&one, &two] {
        let refused = tunnel(gw).await.expect_err("past the shared burst");
        let wait = assert_limited(&refused, "tenant limit on handshakes");
        assert!((1..=100).contains(&wait), "Retry-After {wait}");
    }
    let m = Metrics::scrape(two.admin().await).await;
    assert!(m.value("sluice_cluster_calls_total", &[("outcome", "ok")]) >= 2.0);
    for ws in open {
        close_ws(ws).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_tunnels_give_their_slots_back_within_the_lease() {
    let backend = Backend::start("a").await;
    let redis = Redis::start().await;
    let mut one = member(&backend, &redis, "tunnels = 2").await;
    let two = member(&backend, &redis, "tunnels = 2").await;
    let held = [
        tunnel(&one).await.expect("1"),
        tunnel(&one).await.expect("2"),
    ];
    assert_limited(
        &tunnel(&two).await.expect_err("full"),
        "tenant limit on tunnels",
    );
    one.signal("KILL");
    one.wait_exit(STEP).await;
    // The lease is 2 s: the slots come back within it (and a renewal tick).
    let a = tunnel_when_free(&two, Duration::from_secs(5)).await;
    let b = tunnel(&two).await.expect("the second slot");
    assert_limited(&tunnel(&two).await.expect_err("full again"), "tunnels");
    drop(held);
    close_ws(a).await;
    close_ws(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_failure_closed_a_shared_limit_refuses_while_redis_is_down() {
    let backend = Backend::start("a").await;
    let mut redis = Redis::start().await;
    let config = member_config(&backend, &redis, "on_failure = \"closed\"", "tunnels = 10");
    let gw = config.start().await;
    close_ws(tunnel(&gw).await.expect("Redis up")).await;
    redis.kill();
    let refused = within(STEP, "the refusal", async {
        loop {
            match tunnel(&gw).await {
                Ok(ws) => close_ws(ws).await,
                Err(r) => return r,
            }
        }
    })
    .await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.header("retry-after").is_some());
    // Traffic no shared limit governs is served.
    assert_answered(gw.addr(), &Head::get("/"), "a").await;
    redis.restart().await;
    wait_metric(gw.admin().await, "sluice_cluster_up", &[], 1.0).await;
    close_ws(tunnel(&gw).await.expect("Redis back")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_counters_are_shared_by_the_fleet() {
    let backend = Backend::start("a").await;
    let redis = Redis::start().await;
    let api_key = plugin_wasm("api-key-js");
    let config = ConfigBuilder::new(&[backend.addr])
        .route_toml("plugins = [\"keys\"]")
        .extra(&format!(
            r#"[cluster]
redis = "redis://{}"

[plugins.keys]
path = {api_key:?}

[plugins.keys.config]
keys = {{ "k-1" = "alice" }}
rate_limit_per_minute = 3
"#,
            redis.addr()
        ));
    let (one, two) = (config.start().await, config.start().await);
    let get = Head::get("/").header("X-Api-Key", "k-1");
    // alice's third request in the minute is the fleet's third, whichever gateway.
    for gw in [&one, &two, &one] {
        assert_answered(gw.addr(), &get, "a").await;
    }
    for gw in [&two, &one] {
        let answer = request_once(gw.addr(), &get).await;
        assert_eq!(answer.status, 429, "{answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_handshakes_within_the_shared_bucket_is_all_admitted() {
    let backend = Backend::start("a").await;
    let redis = Redis::start().await;
    // Batches of 10 tokens: 50 upgrades at once need 5 of them, well within the 100.
    let gw = member(&backend, &redis, "handshakes = { rate = 100, burst = 100 }").await;
    let attempts = (0..50).map(|_| tunnel(&gw));
    let answers = futures_util::future::join_all(attempts).await;
    let refused: Vec<u16> = answers
        .iter()
        .filter_map(|a| a.as_ref().err().map(|r| r.status))
        .collect();
    assert!(refused.is_empty(), "refused within the bucket: {refused:?}");
    for ws in answers.into_iter().flatten() {
        close_ws(ws).await;
    }
}
