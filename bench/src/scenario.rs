//! The load patterns (closed-loop echo, handshake rate, idle hold) and their measurement
//! windows. Every loop is bounded by time, every operation by a timeout, and every
//! connection count by the parameters.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout};

use crate::client::{Conn, Endpoint};
use crate::http2::{self, H2Conn};
use crate::sys::{Counts, CpuMark, HostCpu, Memory, Profiler};
use crate::ws::{OP_BINARY, OP_PING, OP_PONG, Rng};

/// Longest any single operation (an echo, a handshake cycle, a ping) may take.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// A worker whose operations keep failing gives up after this many errors.
const MAX_ERRORS_PER_WORKER: u64 = 1000;
/// Longest the idle scenario may spend opening, or pinging, all its tunnels.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(120);
/// Connections opened before an idle baseline so lazy start-up costs are already paid.
const IDLE_WARMUP_TUNNELS: usize = 64;
/// WebSockets per HTTP/2 connection in `h2-idle`: the streams a connection may have open
/// at once by both proxies' default (`SETTINGS_MAX_CONCURRENT_STREAMS`: Sluice's
/// `max_concurrent_streams`, HAProxy's `tune.h2.max-concurrent-streams`).
pub const H2_IDLE_STREAMS_PER_CONN: usize = 100;

/// One benchmark scenario: a load pattern, over `ws://`, `wss://`, or WebSockets over
/// HTTP/2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    /// What one operation is.
    pub load: Load,
    /// Whether the client speaks TLS to the proxy (`wss-*`, `h2-*`): the proxy terminates
    /// it, and its upstream to the echo backend stays plain TCP.
    pub tls: bool,
    /// Whether each WebSocket is a stream of an HTTP/2 connection over TLS (`h2-*`, RFC
    /// 8441 extended CONNECT; implies `tls`), many to a connection; the proxy makes each
    /// an HTTP/1.1 upgrade to the echo backend.
    pub h2: bool,
}

/// The load pattern of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// Closed loop: each connection sends a `size`-byte binary message and awaits its echo.
    Echo {
        /// Payload bytes per message.
        size: usize,
    },
    /// Handshake rate: each worker connects, upgrades, closes, and repeats, with the
    /// given client and server (over TLS: a full TLS 1.3 handshake first, every time).
    Handshake(Pair),
    /// Idle hold: open many tunnels, measure memory, then ping each once end to end.
    Idle,
}

impl From<Load> for Scenario {
    /// The `ws://` scenario of a load.
    fn from(load: Load) -> Scenario {
        Scenario {
            load,
            tls: false,
            h2: false,
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.h2 {
            f.write_str("h2-")?;
        } else if self.tls {
            f.write_str("wss-")?;
        }
        match self.load {
            Load::Echo { size } if size % 1024 == 0 => write!(f, "echo-{}k", size / 1024),
            Load::Echo { size } => write!(f, "echo-{size}"),
            Load::Handshake(Pair::Bench) => f.write_str("handshake"),
            Load::Handshake(Pair::Tungstenite) => f.write_str("handshake-tungstenite"),
            Load::Idle => f.write_str("idle"),
        }
    }
}

impl Scenario {
    /// The client and echo server this scenario runs with.
    pub fn pair(self) -> Pair {
        match self.load {
            Load::Handshake(pair) => pair,
            Load::Echo { .. } | Load::Idle => Pair::Bench,
        }
    }
}

/// A load-generator client with its echo server: the bench's own minimal pair, or
/// tokio-tungstenite on both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pair {
    /// The bench's own client and backend (`src/ws.rs`, `src/client.rs`, `src/backend.rs`).
    Bench,
    /// tokio-tungstenite's `client_async` and `accept_async` ([`crate::tung`]).
    Tungstenite,
}

impl Pair {
    /// The name used by `sluice-bench backend --ws`.
    pub fn name(self) -> &'static str {
        match self {
            Pair::Bench => "bench",
            Pair::Tungstenite => "tungstenite",
        }
    }
}

impl FromStr for Pair {
    type Err = String;

    fn from_str(s: &str) -> Result<Pair, String> {
        [Pair::Bench, Pair::Tungstenite]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown pair {s:?}: expected bench or tungstenite"))
    }
}

impl serde::Serialize for Scenario {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(name: &str) -> Result<Scenario, String> {
        let (tls, h2, s) = match (name.strip_prefix("wss-"), name.strip_prefix("h2-")) {
            (Some(rest), _) => (true, false, rest),
            (_, Some(rest)) => (true, true, rest),
            (None, None) => (false, false, name),
        };
        let load = match s {
            "handshake" | "handshake-tungstenite" if h2 => {
                return Err(format!(
                    "{name}: over HTTP/2 only echo-SIZE and idle run (h2-echo-SIZE, h2-idle)"
                ));
            }
            "handshake" => Load::Handshake(Pair::Bench),
            "handshake-tungstenite" if tls => {
                return Err(format!(
                    "{name}: over TLS only the bench's own pair runs (wss-handshake)"
                ));
            }
            "handshake-tungstenite" => Load::Handshake(Pair::Tungstenite),
            "idle" => Load::Idle,
            _ => {
                let size = s
                    .strip_prefix("echo-")
                    .and_then(|n| match n.strip_suffix(['k', 'K']) {
                        Some(k) => k.parse::<usize>().ok()?.checked_mul(1024),
                        None => n.parse().ok(),
                    })
                    .filter(|size| *size <= 1 << 20)
                    .ok_or_else(|| {
                        format!("unknown scenario {name:?}: expected echo-SIZE (e.g. echo-32, echo-16k), handshake, handshake-tungstenite or idle, wss- and one of them (not handshake-tungstenite), or h2-echo-SIZE or h2-idle")
                    })?;
                Load::Echo { size }
            }
        };
        Ok(Scenario { load, tls, h2 })
    }
}

/// Load parameters shared by all scenarios.
#[derive(Debug, Clone)]
pub struct Params {
    /// Load before the measured window (connections warm, caches filled).
    pub warmup: Duration,
    /// Length of the measured window for echo and handshake.
    pub duration: Duration,
    /// Connections in the echo loop.
    pub echo_conns: usize,
    /// Concurrent workers in the handshake loop.
    pub handshake_conns: usize,
    /// Tunnels held open in the idle scenario.
    pub tunnels: usize,
    /// Concurrency for opening and pinging idle tunnels.
    pub idle_conns: usize,
    /// HTTP/2 connections the `h2-echo-*` WebSockets are spread over (`h2-idle` opens
    /// one per [`H2_IDLE_STREAMS_PER_CONN`] tunnels).
    pub h2_conns: usize,
}

impl Params {
    /// The connection count a scenario runs with.
    pub fn conns(&self, scenario: Scenario) -> usize {
        match scenario.load {
            Load::Echo { .. } => self.echo_conns,
            Load::Handshake(_) => self.handshake_conns,
            Load::Idle => self.idle_conns,
        }
    }

    /// The HTTP/2 connections an `h2-*` scenario spreads its WebSockets over (`None` for
    /// the others).
    pub fn h2_conns(&self, scenario: Scenario) -> Option<usize> {
        match scenario.load {
            _ if !scenario.h2 => None,
            Load::Idle => Some(self.tunnels.div_ceil(H2_IDLE_STREAMS_PER_CONN).max(1)),
            _ => Some(self.h2_conns.max(1)),
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Operations completed inside the measured window.
    pub ops: u64,
    /// Length of the measured window.
    pub seconds: f64,
    /// Round-trip times of those operations, in nanoseconds, sorted.
    pub rtt_ns: Vec<u64>,
    /// Failed operations (including warm-up and, for idle, tunnels that did not open).
    pub errors: u64,
    /// CPU used inside the window.
    pub cpu: CpuUse,
    /// Idle scenario: proxy memory before and after opening the tunnels, and how many opened.
    pub idle: Option<IdleMemory>,
    /// `wss-*` and `h2-*` scenarios: what a connection opened before the run negotiated
    /// ([`crate::tls::describe`], and ALPN over HTTP/2).
    pub tls: Option<String>,
    /// `h2-*` scenarios: the HTTP/2 connections the WebSockets were spread over.
    pub h2_conns: Option<usize>,
}

/// Proxy memory around the idle scenario's tunnel opening.
#[derive(Debug, Clone, Copy)]
pub struct IdleMemory {
    /// Before any tunnel of the measured batch was opened.
    pub before: Memory,
    /// With all tunnels open and settled.
    pub after: Memory,
    /// Tunnels that opened.
    pub tunnels: usize,
    /// `h2-idle`: the proxy's memory before the HTTP/2 connections were opened (`before`
    /// is with them open, each after one stream opened and closed on it), and how many.
    pub h2_conns: Option<(Memory, usize)>,
}

/// CPU seconds spent inside a measured window, by whom.
#[derive(Debug, Clone, Default)]
pub struct CpuUse {
    /// The proxy's process tree (user + system); `None` for the direct target.
    pub proxy: Option<f64>,
    /// The user-space part of `proxy`.
    pub proxy_user: Option<f64>,
    /// The proxy's voluntary and involuntary context switches (all its threads).
    pub proxy_switches: Option<(u64, u64)>,
    /// This process (the load generator).
    pub loadgen: f64,
    /// The echo backend process.
    pub backend: f64,
    /// The whole machine, all cores (busy time, including other users of the machine).
    pub host_busy: f64,
    /// Time the hypervisor took away from this machine's cores.
    pub host_steal: f64,
    /// The proxy's system calls and context switches, when profiled.
    pub proxy_counts: Option<Counts>,
    /// The Redis server's CPU (user + system), when the proxy uses one
    /// (`sluice-limits-redis`); not part of `proxy`.
    pub redis: Option<f64>,
    /// Script calls and commands that Redis processed in the window.
    pub redis_counts: Option<crate::redis::Counts>,
}

/// Measurement hooks: CPU of the proxy, load generator, backend and machine over a
/// window, and memory of the proxy.
#[derive(Debug)]
pub struct Probe {
    proxy: Option<u32>,
    backend: u32,
    /// The Redis server the proxy uses: its address and process id.
    redis: Option<(SocketAddr, u32)>,
    perf_output: Option<PathBuf>,
    profiler: Option<Profiler>,
}

/// The start of a measured window.
#[derive(Debug)]
struct Mark {
    at: Instant,
    proxy: Option<CpuMark>,
    loadgen: CpuMark,
    backend: CpuMark,
    host: HostCpu,
    /// The Redis server's CPU and commands processed.
    redis: Option<(CpuMark, Option<crate::redis::Counts>)>,
}

impl Probe {
    /// Hooks on the proxy tree under `proxy` (`None` for the direct target) and the
    /// backend process; with `perf_output`, the proxy's measured window is also recorded
    /// by `perf record`.
    pub fn new(proxy: Option<u32>, backend: u32, perf_output: Option<PathBuf>) -> Probe {
        Probe {
            proxy,
            backend,
            redis: None,
            perf_output,
            profiler: None,
        }
    }

    /// Also samples the Redis server at `addr` (process `pid`) that the proxy uses: its
    /// CPU and the commands it processed in the window.
    pub fn with_redis(self, redis: Option<(SocketAddr, u32)>) -> Probe {
        Probe { redis, ..self }
    }

    fn redis_mark(&self) -> Option<(CpuMark, Option<crate::redis::Counts>)> {
        self.redis
            .map(|(addr, pid)| (CpuMark::process(pid), crate::redis::counts(addr)))
    }

    fn begin(&mut self) -> Result<Mark> {
        if let (Some(root), Some(path)) = (self.proxy, &self.perf_output) {
            self.profiler = Some(Profiler::start(root, path)?);
            // perf needs a moment to attach before the window counts.
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(Mark {
            at: Instant::now(),
            proxy: self.proxy.map(CpuMark::tree),
            loadgen: CpuMark::process(std::process::id()),
            backend: CpuMark::process(self.backend),
            host: HostCpu::take(),
            redis: self.redis_mark(),
        })
    }

    /// Ends the window opened by `begin`: its end instant and the CPU used in it.
    fn end(&mut self, mark: &Mark) -> Result<(Instant, CpuUse)> {
        let at = Instant::now();
        let redis = self.redis_mark().zip(mark.redis.as_ref());
        let (host_busy, host_steal) = HostCpu::take().seconds_since(&mark.host);
        let now = self
            .proxy
            .zip(mark.proxy.as_ref())
            .map(|(root, before)| (CpuMark::tree(root), before));
        let proxy = now.as_ref().map(|(now, before)| now.split_since(before));
        let cpu = CpuUse {
            proxy: proxy.map(|(user, system)| user + system),
            proxy_user: proxy.map(|(user, _)| user),
            proxy_switches: now.as_ref().map(|(now, before)| now.switches_since(before)),
            loadgen: CpuMark::process(std::process::id()).seconds_since(&mark.loadgen),
            backend: CpuMark::process(self.backend).seconds_since(&mark.backend),
            host_busy,
            host_steal,
            proxy_counts: self.profiler.take().map(Profiler::stop).transpose()?,
            redis: redis
                .as_ref()
                .map(|((now, _), (before, _))| now.seconds_since(before)),
            redis_counts: redis.and_then(|((_, now), (_, before))| Some(now?.since((*before)?))),
        };
        Ok((at, cpu))
    }

    fn memory(&self) -> Option<Memory> {
        self.proxy.map(Memory::take)
    }
}

/// Runs `scenario` against `endpoint` with the proxy observed through `probe`.
pub async fn run(
    scenario: Scenario,
    endpoint: &Endpoint,
    params: &Params,
    probe: &mut Probe,
) -> Result<Outcome> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x5EED, |d| d.as_nanos() as u64);
    let tls = match (&endpoint.tls, scenario.h2) {
        (Some(_), false) => Some(negotiated(endpoint, seed).await?),
        (Some(_), true) => Some(negotiated_h2(endpoint, seed).await?),
        (None, true) => bail!("an h2 scenario needs a TLS endpoint"),
        (None, false) => None,
    };
    let outcome = match scenario.load {
        Load::Echo { size } if scenario.h2 => {
            let k = params.h2_conns(scenario).unwrap_or(1);
            h2_echo(endpoint, size, k, params, probe, seed).await
        }
        Load::Idle if scenario.h2 => {
            let k = params.h2_conns(scenario).unwrap_or(1);
            h2_idle(endpoint, k, params, probe, seed).await
        }
        Load::Echo { size } => {
            let (conns, errors) =
                open_many(endpoint, params.echo_conns, params.echo_conns, seed).await;
            if errors > 0 {
                bail!(
                    "{errors} of {} echo connections failed to open",
                    params.echo_conns
                );
            }
            let payload: Arc<[u8]> = (0..size).map(|i| i as u8).collect();
            let workers = conns
                .into_iter()
                .map(|conn| Echo {
                    conn,
                    payload: payload.clone(),
                })
                .collect();
            closed_loop(workers, params, probe).await
        }
        Load::Handshake(pair) => {
            let workers = (0..params.handshake_conns)
                .map(|i| Cycle {
                    endpoint: endpoint.clone(),
                    pair,
                    rng: Rng::new(seed.wrapping_add(i as u64 * 0x9E37_79B9)),
                })
                .collect();
            closed_loop(workers, params, probe).await
        }
        Load::Idle => idle(endpoint, params, probe, seed).await,
    }?;
    Ok(Outcome { tls, ..outcome })
}

/// Opens and closes one `wss://` connection: what it negotiated, in one line.
async fn negotiated(endpoint: &Endpoint, seed: u64) -> Result<String> {
    let mut conn = timeout(OP_TIMEOUT, Conn::open(endpoint, Rng::new(seed ^ 0x7157)))
        .await
        .map_err(|_| anyhow::anyhow!("the first wss connection timed out"))?
        .map_err(|e| anyhow::anyhow!("the first wss connection failed: {e}"))?;
    let params = conn.tls_parameters().unwrap_or_default();
    timeout(OP_TIMEOUT, conn.close())
        .await
        .map_err(|_| anyhow::anyhow!("closing the first wss connection timed out"))??;
    Ok(params)
}

/// Opens one HTTP/2 connection and one WebSocket on it, and closes both: what the
/// connection negotiated, in one line (also the check that the target speaks `h2` and
/// takes an extended CONNECT).
async fn negotiated_h2(endpoint: &Endpoint, seed: u64) -> Result<String> {
    let first = async {
        let conn = H2Conn::connect(endpoint).await?;
        let ws = conn
            .websocket(&endpoint.headers, Rng::new(seed ^ 0x7157))
            .await?;
        ws.close().await?;
        Ok::<_, io::Error>(conn.tls_parameters().to_string())
    };
    timeout(OP_TIMEOUT, first)
        .await
        .map_err(|_| anyhow::anyhow!("the first HTTP/2 WebSocket timed out"))?
        .map_err(|e| anyhow::anyhow!("the first HTTP/2 WebSocket failed: {e}"))
}

/// `h2-echo-SIZE`: the echo loop's C WebSockets as streams spread over `k` HTTP/2
/// connections.
async fn h2_echo(
    endpoint: &Endpoint,
    size: usize,
    k: usize,
    params: &Params,
    probe: &mut Probe,
    seed: u64,
) -> Result<Outcome> {
    let conns = Arc::new(http2::connect_many(endpoint, k, k).await?);
    let (streams, errors) = http2::open_streams(
        &conns,
        &endpoint.headers,
        params.echo_conns,
        params.echo_conns,
        seed,
    )
    .await;
    if errors > 0 {
        bail!(
            "{errors} of {} HTTP/2 WebSockets failed to open",
            params.echo_conns
        );
    }
    let payload: Arc<[u8]> = (0..size).map(|i| i as u8).collect();
    let workers = streams
        .into_iter()
        .map(|conn| Echo {
            conn,
            payload: payload.clone(),
        })
        .collect();
    let outcome = closed_loop(workers, params, probe).await?;
    drop(conns);
    Ok(Outcome {
        h2_conns: Some(k),
        ..outcome
    })
}

/// `h2-idle`: warm the proxy up as `idle` does (64 WebSockets on one connection, opened,
/// pinged and closed), take a first memory sample, open `k` HTTP/2 connections (one per
/// [`H2_IDLE_STREAMS_PER_CONN`] tunnels), open, ping and close one WebSocket on each,
/// take the baseline, open N WebSockets over them, let them settle, measure memory
/// again, then ping every one once end to end inside the CPU window. Memory per idle
/// WebSocket is that of a stream on a connection already open; memory per connection is
/// the first sample to the baseline.
async fn h2_idle(
    endpoint: &Endpoint,
    k: usize,
    params: &Params,
    probe: &mut Probe,
    seed: u64,
) -> Result<Outcome> {
    // Lazy start-up costs and buffer pools (relay buffers borrowed while bytes move)
    // are paid before the first sample, as for `idle`.
    let warm_count = IDLE_WARMUP_TUNNELS.min(params.tunnels);
    let first = Arc::new(http2::connect_many(endpoint, 1, 1).await?);
    let (warm, _) = http2::open_streams(
        &first,
        &endpoint.headers,
        warm_count,
        params.idle_conns,
        seed,
    )
    .await;
    let (warm, _, _) = ping_all(warm, params.idle_conns).await;
    close_all(warm).await;
    drop(first);
    sleep(Duration::from_millis(500)).await;

    let unconnected = probe.memory();
    let conns = Arc::new(http2::connect_many(endpoint, k, params.idle_conns).await?);
    let (warm, _) =
        http2::open_streams(&conns, &endpoint.headers, k, params.idle_conns, seed).await;
    let (warm, _, _) = ping_all(warm, params.idle_conns).await;
    close_all(warm).await;
    sleep(Duration::from_millis(500)).await;

    let before = probe.memory();
    let (tunnels, open_errors) = http2::open_streams(
        &conns,
        &endpoint.headers,
        params.tunnels,
        params.idle_conns,
        seed ^ 0xA5A5,
    )
    .await;
    sleep(Duration::from_secs(1)).await;
    let after = probe.memory();

    let mark = probe.begin()?;
    let (tunnels, rtt_ns, ping_errors) = ping_all(tunnels, params.idle_conns).await;
    let (window_end, cpu) = probe.end(&mark)?;
    let opened = tunnels.len();
    drop(tunnels);
    drop(conns);

    Ok(Outcome {
        ops: rtt_ns.len() as u64,
        seconds: (window_end - mark.at).as_secs_f64(),
        rtt_ns,
        errors: open_errors + ping_errors,
        cpu,
        idle: before.zip(after).map(|(before, after)| IdleMemory {
            before,
            after,
            tunnels: opened,
            h2_conns: unconnected.map(|m| (m, k)),
        }),
        tls: None,
        h2_conns: Some(k),
    })
}

/// Closes every connection with the closing handshake, all at once, each bounded by
/// [`OP_TIMEOUT`].
async fn close_all(conns: Vec<Conn>) {
    let mut closing = JoinSet::new();
    for conn in conns {
        closing.spawn(timeout(OP_TIMEOUT, conn.close()));
    }
    while closing.join_next().await.is_some() {}
}

/// One repeatable operation of a closed loop, run by one worker.
trait Op: Send + 'static {
    /// Performs the operation once.
    fn run(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Whether the worker may go on after a failed operation.
    fn recoverable(&self) -> bool;
}

/// An echo round trip on a held connection.
struct Echo {
    conn: Conn,
    payload: Arc<[u8]>,
}

impl Op for Echo {
    async fn run(&mut self) -> io::Result<()> {
        self.conn
            .round_trip(OP_BINARY, &self.payload, OP_BINARY)
            .await
    }

    fn recoverable(&self) -> bool {
        false // the connection is gone
    }
}

/// A whole connection lifetime: connect, upgrade, close handshake, TCP close.
struct Cycle {
    endpoint: Endpoint,
    pair: Pair,
    rng: Rng,
}

impl Op for Cycle {
    async fn run(&mut self) -> io::Result<()> {
        match self.pair {
            Pair::Bench => {
                let rng = Rng::new(self.rng.next_u64());
                Conn::open(&self.endpoint, rng).await?.close().await
            }
            Pair::Tungstenite => crate::tung::cycle(&self.endpoint).await,
        }
    }

    fn recoverable(&self) -> bool {
        true
    }
}

/// Runs every worker's operation back to back for warm-up plus duration; counts the
/// operations that complete inside the measured window.
async fn closed_loop<O: Op>(
    workers: Vec<O>,
    params: &Params,
    probe: &mut Probe,
) -> Result<Outcome> {
    let warm_end = tokio::time::Instant::now() + params.warmup;
    let end = warm_end + params.duration;
    let mut tasks = JoinSet::new();
    for mut worker in workers {
        tasks.spawn(async move {
            let mut done = Vec::new();
            let mut errors = 0u64;
            while tokio::time::Instant::now() < end {
                let start = Instant::now();
                match timeout(OP_TIMEOUT, worker.run()).await {
                    Ok(Ok(())) => done.push((start, Instant::now())),
                    _ => {
                        errors += 1;
                        if !worker.recoverable() || errors >= MAX_ERRORS_PER_WORKER {
                            break;
                        }
                        sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (done, errors)
        });
    }
    sleep_until(warm_end).await;
    let mark = probe.begin()?;
    sleep_until(end).await;
    let (window_end, cpu) = probe.end(&mark)?;

    let mut outcome = Outcome {
        seconds: (window_end - mark.at).as_secs_f64(),
        cpu,
        ..Outcome::default()
    };
    while let Some(joined) = tasks.join_next().await {
        let (done, errors) = joined?;
        outcome.errors += errors;
        outcome.rtt_ns.extend(
            done.iter()
                .filter(|(_, finished)| (mark.at..=window_end).contains(finished))
                .map(|(start, finished)| (*finished - *start).as_nanos() as u64),
        );
    }
    outcome.rtt_ns.sort_unstable();
    outcome.ops = outcome.rtt_ns.len() as u64;
    Ok(outcome)
}

/// Idle hold: warm up, take a memory baseline, open `tunnels` tunnels, let them settle,
/// measure memory again, then ping every tunnel once end to end inside the CPU window.
async fn idle(
    endpoint: &Endpoint,
    params: &Params,
    probe: &mut Probe,
    seed: u64,
) -> Result<Outcome> {
    let warm_count = IDLE_WARMUP_TUNNELS.min(params.tunnels);
    let (warm, _) = open_many(endpoint, warm_count, params.idle_conns, seed).await;
    let (warm, _, _) = ping_all(warm, params.idle_conns).await;
    drop(warm);
    sleep(Duration::from_millis(500)).await;

    let before = probe.memory();
    let (tunnels, _) = open_many(endpoint, params.tunnels, params.idle_conns, seed ^ 0xA5A5).await;
    sleep(Duration::from_secs(1)).await;
    let after = probe.memory();

    let mark = probe.begin()?;
    let (tunnels, rtt_ns, ping_errors) = ping_all(tunnels, params.idle_conns).await;
    let (window_end, cpu) = probe.end(&mark)?;
    let opened = tunnels.len();
    drop(tunnels);

    Ok(Outcome {
        ops: rtt_ns.len() as u64,
        seconds: (window_end - mark.at).as_secs_f64(),
        rtt_ns,
        errors: params.tunnels.saturating_sub(opened) as u64 + ping_errors,
        cpu,
        idle: before.zip(after).map(|(before, after)| IdleMemory {
            before,
            after,
            tunnels: opened,
            h2_conns: None,
        }),
        tls: None,
        h2_conns: None,
    })
}

/// Makes `count` handshake cycles through `addr` with `pair`'s client, `concurrency` at a
/// time, on a current-thread runtime (`sluice-bench drive`, for the counting scripts);
/// with `tls_ca`, over TLS trusting that CA (the bench pair only). Fails when any cycle
/// failed or the whole took longer than [`SWEEP_TIMEOUT`].
pub fn drive(
    addr: SocketAddr,
    count: usize,
    concurrency: usize,
    pair: Pair,
    tls_ca: Option<&std::path::Path>,
    target: crate::targets::Target,
) -> Result<()> {
    if tls_ca.is_some() && pair != Pair::Bench {
        bail!("over TLS only the bench's own pair runs");
    }
    let endpoint = Endpoint {
        tls: tls_ca.map(crate::tls::Client::trusting).transpose()?,
        ..crate::targets::admitted(target, addr, &crate::plugins::token())
    };
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + SWEEP_TIMEOUT;
    let (ok, errors) = crate::sys::runtime(1)?.block_on(async {
        let mut tasks = JoinSet::new();
        for i in 0..concurrency.clamp(1, count.max(1)) {
            let next = next.clone();
            let mut cycle = Cycle {
                endpoint: endpoint.clone(),
                pair,
                rng: Rng::new(0x5EED + i as u64),
            };
            tasks.spawn(async move {
                let (mut ok, mut errors) = (0u64, 0u64);
                while Instant::now() < deadline && next.fetch_add(1, Ordering::Relaxed) < count {
                    match timeout(OP_TIMEOUT, cycle.run()).await {
                        Ok(Ok(())) => ok += 1,
                        _ => errors += 1,
                    }
                }
                (ok, errors)
            });
        }
        let (mut ok, mut errors) = (0, 0);
        while let Some(joined) = tasks.join_next().await {
            let (o, e) = joined.unwrap_or((0, 1));
            ok += o;
            errors += e;
        }
        (ok, errors)
    });
    if errors > 0 || ok < count as u64 {
        bail!("{ok} of {count} cycles completed, {errors} failed");
    }
    Ok(())
}

/// Opens `count` connections, `concurrency` at a time; returns those that opened and the
/// number that failed.
async fn open_many(
    endpoint: &Endpoint,
    count: usize,
    concurrency: usize,
    seed: u64,
) -> (Vec<Conn>, u64) {
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + SWEEP_TIMEOUT;
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.clamp(1, count.max(1)) {
        let next = next.clone();
        let endpoint = endpoint.clone();
        tasks.spawn(async move {
            let mut opened = Vec::new();
            let mut errors = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || Instant::now() > deadline {
                    break;
                }
                let rng = Rng::new(seed.wrapping_add((i as u64 + 1) * 0x9E37_79B9_7F4A_7C15));
                match timeout(OP_TIMEOUT, Conn::open(&endpoint, rng)).await {
                    Ok(Ok(conn)) => opened.push(conn),
                    _ => errors += 1,
                }
            }
            (opened, errors)
        });
    }
    let mut conns = Vec::with_capacity(count);
    let mut errors = 0;
    while let Some(Ok((opened, failed))) = tasks.join_next().await {
        conns.extend(opened);
        errors += failed;
    }
    (conns, errors)
}

/// Pings every connection once, `concurrency` at a time; returns the connections (still
/// open), the sorted round-trip times in nanoseconds, and the number of failed pings.
async fn ping_all(conns: Vec<Conn>, concurrency: usize) -> (Vec<Conn>, Vec<u64>, u64) {
    let groups = concurrency.max(1);
    let mut split: Vec<Vec<Conn>> = (0..groups).map(|_| Vec::new()).collect();
    for (i, conn) in conns.into_iter().enumerate() {
        split[i % groups].push(conn);
    }
    let deadline = Instant::now() + SWEEP_TIMEOUT;
    let mut tasks = JoinSet::new();
    for mut group in split {
        tasks.spawn(async move {
            let mut rtts = Vec::with_capacity(group.len());
            let mut errors = 0u64;
            for conn in &mut group {
                if Instant::now() > deadline {
                    errors += 1;
                    continue;
                }
                let start = Instant::now();
                match timeout(OP_TIMEOUT, conn.round_trip(OP_PING, b"sluice!!", OP_PONG)).await {
                    Ok(Ok(())) => rtts.push(start.elapsed().as_nanos() as u64),
                    _ => errors += 1,
                }
            }
            (group, rtts, errors)
        });
    }
    let (mut conns, mut rtts, mut errors) = (Vec::new(), Vec::new(), 0);
    while let Some(Ok((group, group_rtts, group_errors))) = tasks.join_next().await {
        conns.extend(group);
        rtts.extend(group_rtts);
        errors += group_errors;
    }
    rtts.sort_unstable();
    (conns, rtts, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_names_round_trip() {
        for name in [
            "echo-32",
            "echo-16k",
            "echo-1000",
            "handshake",
            "handshake-tungstenite",
            "idle",
        ] {
            assert_eq!(name.parse::<Scenario>().unwrap().to_string(), name);
        }
        assert_eq!(
            "echo-16K".parse(),
            Ok(Scenario::from(Load::Echo { size: 16384 }))
        );
        assert!("echo-".parse::<Scenario>().is_err());
        assert!("ping".parse::<Scenario>().is_err());
        for name in ["wss-echo-32", "wss-echo-16k", "wss-handshake", "wss-idle"] {
            let scenario = name.parse::<Scenario>().unwrap();
            assert!(scenario.tls, "{name}");
            assert_eq!(scenario.to_string(), name);
        }
        assert_eq!(
            "wss-handshake".parse(),
            Ok(Scenario {
                load: Load::Handshake(Pair::Bench),
                tls: true,
                h2: false,
            })
        );
        assert!("wss-handshake-tungstenite".parse::<Scenario>().is_err());
        assert!("wss-".parse::<Scenario>().is_err());
        assert!("wss-wss-idle".parse::<Scenario>().is_err());
        for name in ["h2-echo-32", "h2-echo-16k", "h2-idle"] {
            let scenario = name.parse::<Scenario>().unwrap();
            assert!(scenario.tls && scenario.h2, "{name}");
            assert_eq!(scenario.to_string(), name);
        }
        for name in [
            "h2-handshake",
            "h2-handshake-tungstenite",
            "h2-wss-idle",
            "wss-h2-idle",
        ] {
            assert!(name.parse::<Scenario>().is_err(), "{name}");
        }
    }

    #[test]
    fn h2_scenarios_spread_their_websockets_over_few_connections() {
        let params = Params {
            warmup: Duration::ZERO,
            duration: Duration::ZERO,
            echo_conns: 64,
            handshake_conns: 32,
            tunnels: 9000,
            idle_conns: 64,
            h2_conns: 4,
        };
        let conns = |name: &str| params.h2_conns(name.parse().unwrap());
        assert_eq!(conns("h2-echo-32"), Some(4));
        assert_eq!(conns("h2-idle"), Some(90));
        assert_eq!(conns("wss-echo-32"), None);
        assert_eq!(conns("idle"), None);
        let few = Params {
            tunnels: 1001,
            ..params
        };
        assert_eq!(few.h2_conns("h2-idle".parse().unwrap()), Some(11));
    }
}
