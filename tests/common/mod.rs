//! The shared harness of Sluice's integration tests.
//!
//! Everything here is real: the gateway is the `sluice` binary, started as a child process
//! with a config file written to a fresh temporary directory; backends are tokio servers
//! bound to `127.0.0.1:0`; clients are tokio-tungstenite or raw `TcpStream`s.
//!
//! - [`Gateway`] runs `sluice run`, learns its listener addresses from stdout, collects its
//!   stderr (JSON log lines) in a background thread and kills the process on drop.
//! - [`ConfigBuilder`] writes the config most tests need: one listener `public`, one pool
//!   `echo`, a fixed-answer route `internal` (`/internal` → 403 "forbidden") and the main
//!   route `main` (`/` → the pool), with per-test additions.
//! - [`Backend`] is an HTTP/1.1 + WebSocket echo server (hyper + tokio-tungstenite) that
//!   records every request head and counts connections and open tunnels.
//! - [`ScriptedBackend`] is a raw TCP server that answers request heads with exactly the
//!   bytes a test chooses, or completes an upgrade by hand, and records every byte it reads.
//! - [`RawClient`] and [`Head`] send hand-written requests and parse the responses.
//!
//! Every wait is bounded: helpers apply a deadline and panic saying what they waited for.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::BufRead;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;
use sha1::{Digest, Sha1};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

/// The default deadline for one awaited step: a connect, a handshake, one reply.
pub const STEP: Duration = Duration::from_secs(10);

/// How long a gateway may take to report its listeners. Generous because the first
/// start of a run compiles its plugins (a JavaScript component takes over 15 s on a
/// busy 2-core machine); later starts load them from wasmtime's cache.
const STARTUP: Duration = Duration::from_secs(90);

// ---- deadlines ------------------------------------------------------------------------

/// Awaits `fut`, panicking with `what` if it has not finished within `limit`.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Polls `probe` every 20 ms until it yields `Some`, panicking with `what` after `limit`.
pub async fn eventually<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "gave up after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- data -----------------------------------------------------------------------------

/// `len` deterministic pseudo-random bytes; different seeds give different streams.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The hex SHA-1 of `data`, to compare large payloads without printing them.
pub fn checksum(data: &[u8]) -> String {
    Sha1::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An address on which nothing listens: a socket is bound to it and never listens, and it
/// stays open for the rest of the test process, so that connects to it are refused and no
/// other socket, of this or of a concurrent test process, can listen on the port (a port
/// bound once and released may at once be some other test's backend).
pub fn closed_port() -> SocketAddr {
    static HELD: Mutex<Vec<tokio::net::TcpSocket>> = Mutex::new(Vec::new());
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind a port");
    let addr = socket.local_addr().expect("local addr");
    HELD.lock().expect("held ports").push(socket);
    addr
}

// ---- temporary directory --------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a directory whose name is unique to this process and call.
    pub fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "sluice-it-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` inside the directory and returns the file's path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- config ---------------------------------------------------------------------------

/// Builds the config most tests use: JSON logs, listener `public` on `127.0.0.1:0`, pool
/// `echo` with the given servers, route `internal` (`/internal` → fixed 403 "forbidden")
/// and route `main` (`/` → a pool, `echo` unless changed). Each `*_toml` method appends
/// lines to one table; [`ConfigBuilder::extra`] appends whole tables at the end.
#[derive(Clone, Debug)]
pub struct ConfigBuilder {
    servers: Vec<String>,
    log_level: String,
    grace: String,
    listener: String,
    upstream: String,
    route: String,
    route_upstream: String,
    log: String,
    extra: String,
}

impl ConfigBuilder {
    /// A config whose pool `echo` holds `servers`.
    pub fn new(servers: &[SocketAddr]) -> ConfigBuilder {
        ConfigBuilder {
            servers: servers.iter().map(|s| s.to_string()).collect(),
            log_level: "info".into(),
            grace: "5s".into(),
            listener: String::new(),
            upstream: String::new(),
            route: String::new(),
            route_upstream: "echo".into(),
            log: String::new(),
            extra: String::new(),
        }
    }

    /// Adds lines to `[listeners.public]`, e.g. `max_connections = 2`.
    pub fn listener_toml(mut self, lines: &str) -> Self {
        self.listener.push_str(lines);
        self.listener.push('\n');
        self
    }

    /// Adds lines (or a trailing `[upstreams.echo.health]` table) to `[upstreams.echo]`.
    pub fn upstream_toml(mut self, lines: &str) -> Self {
        self.upstream.push_str(lines);
        self.upstream.push('\n');
        self
    }

    /// Adds lines to the `main` route, e.g. `idle_timeout = "1s"`.
    pub fn route_toml(mut self, lines: &str) -> Self {
        self.route.push_str(lines);
        self.route.push('\n');
        self
    }

    /// Points the `main` route at another pool (define it with [`ConfigBuilder::extra`]).
    pub fn route_upstream(mut self, pool: &str) -> Self {
        self.route_upstream = pool.into();
        self
    }

    /// Sets `[log] level` (a tracing filter such as `info,sluice::accept=debug`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.into();
        self
    }

    /// Adds lines to `[log]`, e.g. `access_file = "access.log"`.
    pub fn log_toml(mut self, lines: &str) -> Self {
        self.log.push_str(lines);
        self.log.push('\n');
        self
    }

    /// Sets `[shutdown] grace`.
    pub fn grace(mut self, grace: &str) -> Self {
        self.grace = grace.into();
        self
    }

    /// Appends whole tables (more pools, more routes) at the end of the file.
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// The config text.
    pub fn build(&self) -> String {
        let servers = self
            .servers
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            r#"[log]
level = "{log_level}"
format = "json"
{log}
[shutdown]
grace = "{grace}"

[listeners.public]
bind = "127.0.0.1:0"
{listener}
[upstreams.echo]
servers = [{servers}]
{upstream}
[[routes]]
name = "internal"
path_prefix = "/internal"
status = 403
body = "forbidden"

[[routes]]
name = "main"
path_prefix = "/"
upstream = "{route_upstream}"
{route}
{extra}"#,
            log_level = self.log_level,
            log = self.log,
            grace = self.grace,
            listener = self.listener,
            upstream = self.upstream,
            route_upstream = self.route_upstream,
            route = self.route,
            extra = self.extra,
        )
    }

    /// Starts a gateway on this config.
    pub async fn start(&self) -> Gateway {
        Gateway::start(&self.build()).await
    }
}

/// Starts one [`Backend`] named `a` and a gateway routing to it, configured by `configure`.
pub async fn start_echo_gateway(
    configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> (Backend, Gateway) {
    let backend = Backend::start("a").await;
    let gateway = configure(ConfigBuilder::new(&[backend.addr])).start().await;
    (backend, gateway)
}

// ---- the gateway process --------------------------------------------------------------

/// Lines read from a child's pipe by a background thread, and whether the pipe has ended
/// (every line the child wrote has then been collected).
#[derive(Clone, Default)]
struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
    ended: Arc<AtomicBool>,
}

impl Lines {
    fn collect_from(pipe: impl std::io::Read + Send + 'static) -> Lines {
        let lines = Lines::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).split(b'\n') {
                let Ok(line) = line else { break };
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                sink.lines.lock().expect("lines lock").push(text);
            }
            sink.ended.store(true, Ordering::SeqCst);
        });
        lines
    }

    fn snapshot(&self) -> Vec<String> {
        self.lines.lock().expect("lines lock").clone()
    }

    fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }
}

/// One access-log event (`"target":"sluice::access"`), with its fields at the top level.
#[derive(Clone, Debug, Deserialize)]
pub struct AccessLog {
    /// `"tunnel"` or `"http"`.
    pub kind: String,
    /// The client's `ip:port`.
    pub client: String,
    /// The listener's name.
    pub listener: String,
    /// The route's name.
    pub route: String,
    /// The server's address, or `""` when none was used.
    pub upstream: String,
    /// The request method (`CONNECT` for a WebSocket over HTTP/2).
    #[serde(default)]
    pub method: String,
    /// The client's HTTP version: `HTTP/1.1`, or `HTTP/2.0`.
    #[serde(default)]
    pub proto: String,
    /// The status sent to the client (101 for a tunnel).
    pub status: u16,
    /// Bytes client → server.
    pub bytes_in: u64,
    /// Bytes server → client.
    pub bytes_out: u64,
    /// How long the connection or request lasted.
    pub duration_ms: f64,
    /// Why a tunnel ended: `client_closed`, `server_closed`, `idle_timeout`, `shutdown`, `error`.
    #[serde(default)]
    pub reason: Option<String>,
    /// The server name a TLS client asked for.
    #[serde(default)]
    pub sni: Option<String>,
    /// The subject of a TLS client's verified certificate.
    #[serde(default)]
    pub tls_client: Option<String>,
    /// The tenant named by the route or a plugin.
    #[serde(default)]
    pub tenant: Option<String>,
    /// The limit that refused the request, as `SCOPE.LIMIT` (`tenant.tunnels`).
    #[serde(default)]
    pub limit: Option<String>,
}

/// `sluice SUBCOMMAND PATH` with stdout and stderr piped, no stdin, and no `RUST_LOG`
/// (so the config's log level applies).
pub fn sluice_command(subcommand: &str, path: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .arg(subcommand)
        .arg(path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A running `sluice run CONFIG` child process, killed on drop.
pub struct Gateway {
    child: Child,
    dir: TempDir,
    config: PathBuf,
    listeners: HashMap<String, SocketAddr>,
    stdout: Lines,
    stderr: Lines,
}

impl Gateway {
    /// Writes `config` to a fresh temp dir, starts `sluice run` on it and waits ([`STARTUP`] at
    /// most) until stdout has reported every `[listeners.NAME]` table of the config as
    /// `listening NAME ADDR`.
    pub async fn start(config: &str) -> Gateway {
        Gateway::start_with(config, |path| sluice_command("run", path)).await
    }

    /// As [`Gateway::start`], with the command made by `command` from the config path
    /// (to run `sluice` under `prlimit`, say).
    pub async fn start_with(config: &str, command: impl FnOnce(&Path) -> Command) -> Gateway {
        let dir = TempDir::new();
        let path = dir.write("sluice.toml", config);
        let mut child = command(&path).spawn().expect("spawn sluice");
        let stdout = Lines::collect_from(child.stdout.take().expect("child stdout"));
        let stderr = Lines::collect_from(child.stderr.take().expect("child stderr"));
        let mut gateway = Gateway {
            child,
            dir,
            config: path,
            listeners: HashMap::new(),
            stdout,
            stderr,
        };
        let expected = config
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("[listeners."))
            // `[listeners.NAME]`, not one of its sub-tables such as `[listeners.NAME.tls]`.
            .filter(|rest| rest.split(']').next().is_some_and(|n| !n.contains('.')))
            .count();
        let deadline = Instant::now() + STARTUP;
        loop {
            gateway.listeners = gateway
                .stdout
                .snapshot()
                .iter()
                .filter_map(|l| parse_listening(l))
                .collect();
            if gateway.listeners.len() >= expected {
                return gateway;
            }
            if let Some(status) = gateway.child.try_wait().expect("poll sluice") {
                panic!(
                    "sluice exited ({status}) before reporting its listeners; stdout: {:?}",
                    gateway.stdout.snapshot()
                );
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not report {expected} listener(s) within {STARTUP:?}; stdout: {:?}",
                gateway.stdout.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The admin listener's address, from its `admin ADDR` line on stdout.
    pub async fn admin(&self) -> SocketAddr {
        eventually(STEP, "the `admin ADDR` line", || {
            self.stdout
                .snapshot()
                .iter()
                .find_map(|l| l.strip_prefix("admin ").and_then(|a| a.trim().parse().ok()))
        })
        .await
    }

    /// The address listener `name` reported last on stdout, once it has reported
    /// `count` of them (a reload that adds or rebinds a listener prints a new line).
    pub async fn listening(&self, name: &str, count: usize) -> SocketAddr {
        eventually(STEP, &format!("`listening {name}` line {count}"), || {
            let seen: Vec<SocketAddr> = self
                .stdout
                .snapshot()
                .iter()
                .filter_map(|l| parse_listening(l))
                .filter(|(n, _)| n == name)
                .map(|(_, a)| a)
                .collect();
            (seen.len() >= count).then(|| seen[count - 1])
        })
        .await
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address of listener `public`.
    pub fn addr(&self) -> SocketAddr {
        self.listener("public")
    }

    /// The address listener `name` reported on stdout.
    pub fn listener(&self, name: &str) -> SocketAddr {
        *self
            .listeners
            .get(name)
            .unwrap_or_else(|| panic!("no listener {name:?} reported: {:?}", self.listeners))
    }

    /// The config file the gateway runs on.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Sends a signal (`"TERM"`, `"HUP"`, ...) to the gateway with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.child.id());
    }

    /// Replaces the config file with `config` and sends SIGHUP.
    pub fn reload(&self, config: &str) {
        std::fs::write(&self.config, config).expect("rewrite config");
        self.signal("HUP");
    }

    /// Waits until the process exits, panicking after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = &mut self.child;
        eventually(limit, "sluice to exit", || {
            child.try_wait().expect("poll sluice")
        })
        .await
    }

    /// Sends SIGTERM and waits (up to [`STEP`] each) for the process to exit and for both
    /// of its pipes to end. Afterwards [`Gateway::stdout_lines`] and
    /// [`Gateway::stderr_lines`] hold everything it ever wrote: what is not there never
    /// happened.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        let status = self.wait_exit(STEP).await;
        let (stdout, stderr) = (&self.stdout, &self.stderr);
        eventually(STEP, "the end of sluice's stdout and stderr", || {
            (stdout.ended() && stderr.ended()).then_some(())
        })
        .await;
        status
    }

    /// The number of worker threads, from the `listening` log line.
    pub async fn workers(&self) -> usize {
        let line = self
            .wait_log("the `listening` log line", |l| l["message"] == "listening")
            .await;
        line["workers"]
            .as_u64()
            .unwrap_or_else(|| panic!("`listening` without `workers`: {line}")) as usize
    }

    /// Lines written to stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.snapshot()
    }

    /// Lines written to stderr so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.snapshot()
    }

    /// The stderr lines that parse as JSON (with `format = "json"`, that should be all).
    pub fn json_logs(&self) -> Vec<Value> {
        self.stderr_lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Access-log events so far; panics on one whose fields are not as documented.
    pub fn access_logs(&self) -> Vec<AccessLog> {
        self.json_logs()
            .into_iter()
            .filter(|v| v["target"] == "sluice::access")
            .map(|v| {
                serde_json::from_value(v.clone())
                    .unwrap_or_else(|e| panic!("access log line lacks top-level fields ({e}): {v}"))
            })
            .collect()
    }

    /// Waits (up to [`STEP`]) for an access-log event matching `pred`.
    pub async fn wait_access_log(
        &self,
        what: &str,
        pred: impl Fn(&AccessLog) -> bool,
    ) -> AccessLog {
        eventually(STEP, what, || {
            self.access_logs().into_iter().find(|l| pred(l))
        })
        .await
    }

    /// Waits (up to [`STEP`]) for a JSON log line matching `pred`.
    pub async fn wait_log(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        eventually(STEP, what, || {
            self.json_logs().into_iter().find(|l| pred(l))
        })
        .await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let exited = self.child.try_wait().ok().flatten();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The process is gone: its stderr ends once the reader has every line.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !self.stderr.ended() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Some(status) = exited {
                eprintln!("---- sluice had exited on its own: {status} ----");
            }
            eprintln!("---- sluice stderr ({}) ----", self.config.display());
            for line in self.stderr.snapshot() {
                eprintln!("{line}");
            }
        }
    }
}

fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let mut words = line.split_whitespace();
    if words.next()? != "listening" {
        return None;
    }
    let name = words.next()?.to_string();
    let addr = words.next()?.parse().ok()?;
    Some((name, addr))
}

// ---- backends -------------------------------------------------------------------------

/// Accepts connections until the task is aborted, serving each one with `serve` inside a
/// `JoinSet`, so that aborting the loop also closes every connection it accepted.
async fn accept_loop<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(TcpStream, usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    let mut next = 0;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve(stream, next));
                    next += 1;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One request head as a [`Backend`] received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The method.
    pub method: String,
    /// The request target (path and query) as received.
    pub target: String,
    /// Header names (lower-case) and values.
    pub headers: Vec<(String, String)>,
    /// Index of the TCP connection it arrived on (0 for the backend's first connection).
    pub conn: usize,
}

impl RecordedRequest {
    /// Every value of header `name`.
    pub fn values(&self, name: &str) -> Vec<&str> {
        header_values(&self.headers, name)
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.values(name).first().copied()
    }
}

fn header_values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

struct BackendState {
    name: String,
    requests: Mutex<Vec<RecordedRequest>>,
    connections: AtomicUsize,
    upgrades: AtomicUsize,
    open_tunnels: AtomicUsize,
    health: AtomicU16,
}

/// A real upstream server: HTTP/1.1 (hyper, keep-alive) plus WebSocket echo
/// (tokio-tungstenite over hyper's upgrade). It records every request head.
///
/// - a WebSocket upgrade gets a correct `101` (choosing the first offered subprotocol);
///   the tunnel echoes text and binary messages, except the text `whoami`, which is
///   answered with the backend's name;
/// - `GET /healthz` answers with the status set by [`Backend::set_health`] (200 at first);
/// - `/echo...` streams the request body back as the response body;
/// - `/slow...` answers after 10 s;
/// - anything else answers 200 with the backend's name as body;
/// - every HTTP response carries `x-backend: NAME`.
pub struct Backend {
    /// The address the backend listens on.
    pub addr: SocketAddr,
    state: Arc<BackendState>,
    task: JoinHandle<()>,
}

type BackendBody = UnsyncBoxBody<Bytes, hyper::Error>;
type UpgradeSlot = Arc<Mutex<Option<hyper::upgrade::OnUpgrade>>>;

impl Backend {
    /// Starts a backend called `name` on `127.0.0.1:0`.
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Backend::serve(name, listener)
    }

    /// Starts a backend called `name` that accepts on `listener`.
    pub fn serve(name: &str, listener: TcpListener) -> Backend {
        let addr = listener.local_addr().expect("backend addr");
        let state = Arc::new(BackendState {
            name: name.to_string(),
            requests: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            upgrades: AtomicUsize::new(0),
            open_tunnels: AtomicUsize::new(0),
            health: AtomicU16::new(200),
        });
        let shared = state.clone();
        let task = tokio::spawn(accept_loop(listener, move |stream, conn| {
            serve_backend(stream, conn, shared.clone())
        }));
        Backend { addr, state, task }
    }

    /// Starts a backend called `name` on `127.0.0.1:0` that speaks only TLS, with `tls`.
    pub async fn start_tls(name: &str, tls: Arc<rustls::ServerConfig>) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        let state = Arc::new(BackendState {
            name: name.to_string(),
            requests: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            upgrades: AtomicUsize::new(0),
            open_tunnels: AtomicUsize::new(0),
            health: AtomicU16::new(200),
        });
        let shared = state.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let task = tokio::spawn(accept_loop(listener, move |stream, conn| {
            let (state, acceptor) = (shared.clone(), acceptor.clone());
            async move {
                if let Ok(stream) = acceptor.accept(stream).await {
                    serve_backend(stream, conn, state).await;
                }
            }
        }));
        Backend { addr, state, task }
    }

    /// Starts backends named `a`, `b`, `c`, ... (`n` of them).
    pub async fn start_many(n: usize) -> Vec<Backend> {
        let mut backends = Vec::new();
        for i in 0..n {
            let name = char::from(b'a' + i as u8).to_string();
            backends.push(Backend::start(&name).await);
        }
        backends
    }

    /// The backend's name.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Request heads received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().expect("requests lock").clone()
    }

    /// Request heads received so far, other than health probes (`/healthz`).
    pub fn traffic(&self) -> Vec<RecordedRequest> {
        let mut requests = self.requests();
        requests.retain(|r| !r.target.starts_with("/healthz"));
        requests
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// WebSocket upgrades answered so far.
    pub fn upgrades(&self) -> usize {
        self.state.upgrades.load(Ordering::SeqCst)
    }

    /// WebSocket tunnels open right now.
    pub fn open_tunnels(&self) -> usize {
        self.state.open_tunnels.load(Ordering::SeqCst)
    }

    /// Health probes (`/healthz` requests) received so far.
    pub fn health_probes(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.target.starts_with("/healthz"))
            .count()
    }

    /// Sets the status `/healthz` answers with.
    pub fn set_health(&self, status: u16) {
        self.state.health.store(status, Ordering::SeqCst);
    }

    /// Stops the backend: its port is closed and every connection it holds is dropped.
    pub async fn stop(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Decrements a counter when dropped.
struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_backend<S>(stream: S, conn: usize, state: Arc<BackendState>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    state.connections.fetch_add(1, Ordering::SeqCst);
    let slot = UpgradeSlot::default();
    let (service_state, service_slot) = (state.clone(), slot.clone());
    let service = service_fn(move |req| {
        backend_respond(req, conn, service_state.clone(), service_slot.clone())
    });
    let served = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    let pending = slot.lock().expect("upgrade slot").take();
    if let (Ok(()), Some(on_upgrade)) = (served, pending)
        && let Ok(upgraded) = on_upgrade.await
    {
        let ws = WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            Some(ws_config()),
        )
        .await;
        echo_websocket(ws, &state).await;
    }
}

async fn echo_websocket<S: AsyncRead + AsyncWrite + Unpin>(
    mut ws: WebSocketStream<S>,
    state: &BackendState,
) {
    state.open_tunnels.fetch_add(1, Ordering::SeqCst);
    let _open = Decrement(&state.open_tunnels);
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(t) if t.as_str() == "whoami" => Message::text(state.name.clone()),
            Message::Text(_) | Message::Binary(_) => msg,
            // Pings are answered by tungstenite; a Close is answered on the next poll.
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}

fn full(body: impl Into<Bytes>) -> BackendBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

async fn backend_respond(
    mut req: hyper::Request<Incoming>,
    conn: usize,
    state: Arc<BackendState>,
    slot: UpgradeSlot,
) -> Result<hyper::Response<BackendBody>, std::convert::Infallible> {
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    state
        .requests
        .lock()
        .expect("requests lock")
        .push(RecordedRequest {
            method: req.method().to_string(),
            target: target.clone(),
            headers: headers.clone(),
            conn,
        });
    let first = |name: &str| header_values(&headers, name).first().map(|v| v.to_string());
    if first("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
        let key = first("sec-websocket-key").unwrap_or_default();
        let mut answer = hyper::Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()));
        if let Some(offered) = first("sec-websocket-protocol") {
            let chosen = offered
                .split(',')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            answer = answer.header("sec-websocket-protocol", chosen);
        }
        *slot.lock().expect("upgrade slot") = Some(hyper::upgrade::on(&mut req));
        state.upgrades.fetch_add(1, Ordering::SeqCst);
        return Ok(answer.body(full("")).expect("101 response"));
    }
    let (status, body) = if target.starts_with("/healthz") {
        (
            state.health.load(Ordering::SeqCst),
            full(state.name.clone()),
        )
    } else if target.starts_with("/echo") {
        (200, req.into_body().boxed_unsync())
    } else if target.starts_with("/slow") {
        tokio::time::sleep(Duration::from_secs(10)).await;
        (200, full("slow"))
    } else {
        (200, full(state.name.clone()))
    };
    Ok(hyper::Response::builder()
        .status(status)
        .header("x-backend", state.name.as_str())
        .body(body)
        .expect("response"))
}

/// What a [`ScriptedBackend`] does with each request head it reads.
#[derive(Clone, Debug)]
pub enum Script {
    /// Answer every head with this text, where `{accept}` is replaced by the correct
    /// `Sec-WebSocket-Accept` for the head's key; keep reading (and recording) until EOF.
    Reply(String),
    /// Answer the first head with this text, then close the connection (for responses
    /// whose body ends at the close).
    ReplyAndClose(String),
    /// Answer the first head with a correct `101` and hand the raw socket to the test
    /// ([`ScriptedBackend::upgraded`]).
    Upgrade,
    /// Read and record, never answer.
    Silent,
}

/// A raw TCP upstream that answers with exactly the bytes a [`Script`] says and records
/// every byte it reads, per connection.
pub struct ScriptedBackend {
    /// The address the backend listens on.
    pub addr: SocketAddr,
    received: Arc<Mutex<BTreeMap<usize, Vec<u8>>>>,
    upgraded: mpsc::UnboundedReceiver<TcpStream>,
    task: JoinHandle<()>,
}

impl ScriptedBackend {
    /// Starts a scripted backend on `127.0.0.1:0`.
    pub async fn start(script: Script) -> ScriptedBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind scripted backend");
        let addr = listener.local_addr().expect("scripted backend addr");
        let received = Arc::new(Mutex::new(BTreeMap::new()));
        let (tx, upgraded) = mpsc::unbounded_channel();
        let record = received.clone();
        let task = tokio::spawn(accept_loop(listener, move |stream, conn| {
            serve_script(stream, conn, script.clone(), record.clone(), tx.clone())
        }));
        ScriptedBackend {
            addr,
            received,
            upgraded,
            task,
        }
    }

    /// The bytes read on each connection, in connection order.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.received
            .lock()
            .expect("received lock")
            .values()
            .cloned()
            .collect()
    }

    /// Everything read on every connection, as (lossy) text.
    pub fn received_text(&self) -> String {
        self.received()
            .iter()
            .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
            .collect()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.received.lock().expect("received lock").len()
    }

    /// The backend side of the next upgraded connection ([`Script::Upgrade`]).
    pub async fn upgraded(&mut self) -> TcpStream {
        within(
            STEP,
            "an upgraded connection at the scripted backend",
            self.upgraded.recv(),
        )
        .await
        .expect("scripted backend stopped")
    }
}

impl Drop for ScriptedBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_script(
    mut stream: TcpStream,
    conn: usize,
    script: Script,
    received: Arc<Mutex<BTreeMap<usize, Vec<u8>>>>,
    upgraded: mpsc::UnboundedSender<TcpStream>,
) {
    received
        .lock()
        .expect("received lock")
        .insert(conn, Vec::new());
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        received
            .lock()
            .expect("received lock")
            .entry(conn)
            .or_default()
            .extend_from_slice(&buf[..n]);
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = find(&pending, b"\r\n\r\n") {
            let head: Vec<u8> = pending.drain(..end + 4).collect();
            let head = String::from_utf8_lossy(&head).into_owned();
            let key = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("sec-websocket-key"))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default();
            let accept = derive_accept_key(key.as_bytes());
            match &script {
                Script::Reply(template) => {
                    let answer = template.replace("{accept}", &accept);
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Script::ReplyAndClose(text) => {
                    let _ = stream.write_all(text.as_bytes()).await;
                    return;
                }
                Script::Silent => {}
                Script::Upgrade => {
                    let answer = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                         Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                    );
                    if stream.write_all(answer.as_bytes()).await.is_ok() {
                        let _ = upgraded.send(stream);
                    }
                    return;
                }
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---- raw HTTP clients -----------------------------------------------------------------

/// A hand-written HTTP/1.1 request head.
#[derive(Clone, Debug)]
pub struct Head {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Head {
    /// `METHOD target` with `Host: sluice.test`.
    pub fn new(method: &str, target: &str) -> Head {
        Head {
            method: method.into(),
            target: target.into(),
            headers: vec![("Host".into(), "sluice.test".into())],
        }
    }

    /// `GET target` with `Host: sluice.test`.
    pub fn get(target: &str) -> Head {
        Head::new("GET", target)
    }

    /// A valid WebSocket upgrade of `target` with a fresh random key.
    pub fn websocket(target: &str) -> Head {
        Head::get(target)
            .header("Upgrade", "websocket")
            .header("Connection", "Upgrade")
            .header("Sec-WebSocket-Key", &generate_key())
            .header("Sec-WebSocket-Version", "13")
    }

    /// Changes the method.
    pub fn method(mut self, method: &str) -> Head {
        self.method = method.into();
        self
    }

    /// Appends a header line.
    pub fn header(mut self, name: &str, value: &str) -> Head {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Replaces every header `name` with one line `name: value`.
    pub fn set(self, name: &str, value: &str) -> Head {
        self.without(name).header(name, value)
    }

    /// Removes every header `name`.
    pub fn without(mut self, name: &str) -> Head {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self
    }

    /// The first value of header `name`.
    pub fn value(&self, name: &str) -> Option<&str> {
        header_values(&self.headers, name).first().copied()
    }

    /// The `Sec-WebSocket-Accept` a correct answer to this head carries.
    pub fn expected_accept(&self) -> String {
        derive_accept_key(
            self.value("sec-websocket-key")
                .expect("head has a key")
                .as_bytes(),
        )
    }

    /// The head as bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut text = format!("{} {} HTTP/1.1\r\n", self.method, self.target);
        for (k, v) in &self.headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str("\r\n");
        text.into_bytes()
    }
}

/// Sends `head` (with `Connection: close`) over `stream`, plain or TLS, and returns all
/// that comes back before the close (within [`STEP`]), as text.
pub async fn exchange<S>(mut stream: S, head: Head) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = head.set("Connection", "close");
    stream.write_all(&head.to_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = within(STEP, "the answer", stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Adds the hop-by-hop headers a proxy must drop: `Connection: {connection}, X-Hop` and the
/// `X-Hop` it names, `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer` and
/// `Proxy-Authorization`; plus spoofed `X-Forwarded-Proto` and `X-Forwarded-Host`, which
/// the gateway must overwrite. See [`assert_forwarded_cleanly`].
pub fn with_hop_by_hop(head: Head, connection: &str) -> Head {
    head.set("Connection", &format!("{connection}, X-Hop"))
        .header("X-Hop", "secret")
        .header("Keep-Alive", "timeout=5")
        .header("Proxy-Connection", "keep-alive")
        .header("TE", "trailers")
        .header("Trailer", "X-Checksum")
        .header("Proxy-Authorization", "Basic dXNlcjpwYXNz")
        .header("X-Forwarded-Proto", "https")
        .header("X-Forwarded-Host", "spoofed.example")
}

/// Asserts that a request sent [`with_hop_by_hop`] reached the backend without any of those
/// headers, with `X-Forwarded-For` equal to `xff` (the client's chain plus `127.0.0.1`),
/// `X-Forwarded-Proto: http` and `X-Forwarded-Host` equal to the client's `host`.
pub fn assert_forwarded_cleanly(seen: &RecordedRequest, xff: &str, host: &str) {
    for hop in [
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "proxy-authorization",
    ] {
        assert!(
            seen.values(hop).is_empty(),
            "hop-by-hop {hop} forwarded: {seen:?}"
        );
    }
    assert!(
        seen.values("connection").iter().all(|v| {
            let v = v.to_ascii_lowercase();
            !v.contains("x-hop") && !v.contains("keep-alive")
        }),
        "Connection tokens forwarded: {seen:?}"
    );
    assert_eq!(seen.values("x-forwarded-for").join(", "), xff, "{seen:?}");
    assert_eq!(seen.values("x-forwarded-proto"), ["http"], "{seen:?}");
    assert_eq!(seen.values("x-forwarded-host"), [host], "{seen:?}");
}

/// An HTTP response as a client read it.
#[derive(Clone, Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names (lower-case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        header_values(&self.headers, name).first().copied()
    }

    /// Every value of header `name`, in order.
    pub fn values(&self, name: &str) -> Vec<&str> {
        header_values(&self.headers, name)
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Reads one response head and returns its status and headers; skips interim `1xx`
/// answers other than `101`.
pub async fn read_response_head<R: AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<(u16, Vec<(String, String)>)> {
    loop {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            if r.read_until(b'\n', &mut head).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed before a full response head: {:?}",
                        String::from_utf8_lossy(&head)
                    ),
                ));
            }
            if head.len() > 1 << 20 {
                return Err(invalid("response head over 1 MiB".into()));
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        return Ok((status, headers));
    }
}

/// Reads one chunk of a chunked body; `None` after the last chunk (and its trailers).
pub async fn read_chunk<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Err(invalid("connection closed inside a chunked body".into()));
    }
    let size_text = line.trim().split(';').next().unwrap_or_default().trim();
    let size = usize::from_str_radix(size_text, 16)
        .map_err(|_| invalid(format!("bad chunk size line {line:?}")))?;
    if size == 0 {
        loop {
            let mut trailer = String::new();
            if r.read_line(&mut trailer).await? == 0 || trailer == "\r\n" {
                return Ok(None);
            }
        }
    }
    let mut chunk = vec![0; size];
    r.read_exact(&mut chunk).await?;
    let mut crlf = [0u8; 2];
    r.read_exact(&mut crlf).await?;
    Ok(Some(chunk))
}

/// Reads one full response (content-length, chunked or until close).
pub async fn read_response<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Response> {
    let (status, headers) = read_response_head(r).await?;
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if matches!(status, 101 | 204 | 304) {
        return Ok(response);
    }
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    if chunked {
        while let Some(chunk) = read_chunk(r).await? {
            response.body.extend_from_slice(&chunk);
        }
    } else if let Some(len) = response.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| invalid(format!("bad content-length {len:?}")))?;
        response.body = vec![0; len];
        r.read_exact(&mut response.body).await?;
    } else {
        r.read_to_end(&mut response.body).await?;
    }
    Ok(response)
}

/// A raw client connection: write any bytes, parse responses by hand.
pub struct RawClient {
    /// The buffered read half.
    pub reader: BufReader<OwnedReadHalf>,
    /// The write half.
    pub writer: OwnedWriteHalf,
}

impl RawClient {
    /// Connects to `addr` (within [`STEP`]).
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = within(STEP, "a TCP connect", TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        RawClient::from_stream(stream)
    }

    /// A client over a connection made elsewhere (from a chosen address, or after a
    /// PROXY header).
    pub fn from_stream(stream: TcpStream) -> RawClient {
        stream.set_nodelay(true).expect("nodelay");
        let (read, writer) = stream.into_split();
        RawClient {
            reader: BufReader::new(read),
            writer,
        }
    }

    /// The client's own address, as the gateway sees it.
    pub fn local_addr(&self) -> SocketAddr {
        self.writer.local_addr().expect("local addr")
    }

    /// Writes `bytes`, panicking on error.
    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        within(STEP, "a write", self.writer.write_all(bytes.as_ref()))
            .await
            .expect("write to the gateway");
    }

    /// Reads one response within [`STEP`], panicking on error.
    pub async fn response(&mut self) -> Response {
        within(STEP, "a response", read_response(&mut self.reader))
            .await
            .expect("read a response")
    }

    /// Sends `head` and reads the response.
    pub async fn request(&mut self, head: &Head) -> Response {
        self.send(head.to_bytes()).await;
        self.response().await
    }

    /// Waits up to `limit` for bytes: `None` if none came (the connection stays open and
    /// silent), `Some(Ok(bytes))` with the bytes (empty at EOF), or `Some(Err(_))`.
    pub async fn read_some(&mut self, limit: Duration) -> Option<std::io::Result<Vec<u8>>> {
        let mut buf = vec![0u8; 64 * 1024];
        match tokio::time::timeout(limit, self.reader.read(&mut buf)).await {
            Err(_) => None,
            Ok(Ok(n)) => Some(Ok(buf[..n].to_vec())),
            Ok(Err(e)) => Some(Err(e)),
        }
    }

    /// The socket and any bytes already buffered from it.
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        let buffered = self.reader.buffer().to_vec();
        let stream = self
            .reader
            .into_inner()
            .reunite(self.writer)
            .expect("halves of one socket");
        (stream, buffered)
    }

    /// After a `101`, speaks WebSocket (client role) on this connection.
    pub async fn into_websocket(self) -> Ws {
        let (stream, buffered) = self.into_parts();
        WebSocketStream::from_partially_read(stream, buffered, Role::Client, Some(ws_config()))
            .await
    }
}

/// Sends `head` on a fresh connection to `addr` and reads the response.
pub async fn request_once(addr: SocketAddr, head: &Head) -> Response {
    RawClient::connect(addr).await.request(head).await
}

/// Asserts that `head`, sent on a fresh connection, is answered `200` with body `body`
/// (an echo [`Backend`]'s name, or a fixed route's body).
pub async fn assert_answered(addr: SocketAddr, head: &Head, body: &str) {
    let answer = request_once(addr, head).await;
    assert_eq!(
        (answer.status, answer.text().as_str()),
        (200, body),
        "answer to {head:?}"
    );
}

/// A gateway in front of a [`Script::Upgrade`] backend, with one unframed tunnel open
/// through it: whatever bytes one socket writes, the other should read.
pub struct RawTunnel {
    /// The gateway.
    pub gateway: Gateway,
    /// The backend (kept alive for the tunnel's life).
    pub backend: ScriptedBackend,
    /// The client's socket.
    pub client: TcpStream,
    /// The backend's socket.
    pub server: TcpStream,
}

impl RawTunnel {
    /// Starts both, sends a hand-written upgrade, checks the `101` and its accept value.
    pub async fn open() -> RawTunnel {
        let mut backend = ScriptedBackend::start(Script::Upgrade).await;
        let gateway = ConfigBuilder::new(&[backend.addr]).start().await;
        let mut client = RawClient::connect(gateway.addr()).await;
        let head = Head::websocket("/raw");
        let answer = client.request(&head).await;
        assert_eq!(answer.status, 101, "upgrade answer: {answer:?}");
        assert_eq!(
            answer.header("sec-websocket-accept"),
            Some(head.expected_accept().as_str()),
            "accept relayed to the client"
        );
        let server = backend.upgraded().await;
        let (client, buffered) = client.into_parts();
        assert!(
            buffered.is_empty(),
            "unexpected bytes after the 101: {buffered:?}"
        );
        RawTunnel {
            gateway,
            backend,
            client,
            server,
        }
    }
}

// ---- WebSocket clients ----------------------------------------------------------------

/// A client WebSocket over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// WebSocket settings for test clients and backends: a small read buffer (so 1,000 tunnels
/// stay cheap) and limits large enough for a 16 MiB message in one frame.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

/// Opens a WebSocket to `path` on `addr` with extra request headers (no deadline).
pub async fn try_ws_connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, tungstenite::Error> {
    let mut request = format!("ws://{addr}{path}").into_client_request()?;
    for (name, value) in headers {
        request.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes())?,
            HeaderValue::from_str(value)?,
        );
    }
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config())).await?;
    Ok(ws)
}

/// Opens a WebSocket with extra headers, panicking on failure or after [`STEP`].
pub async fn ws_connect_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Ws {
    within(
        STEP,
        "a WebSocket handshake",
        try_ws_connect(addr, path, headers),
    )
    .await
    .unwrap_or_else(|e| panic!("WebSocket to {addr}{path} failed: {e}"))
}

/// Opens a WebSocket, panicking on failure or after [`STEP`].
pub async fn ws_connect(addr: SocketAddr, path: &str) -> Ws {
    ws_connect_with(addr, path, &[]).await
}

/// The next text or binary message (skipping control frames), within [`STEP`].
pub async fn next_data(ws: &mut Ws) -> Message {
    within(STEP, "a WebSocket message", async {
        loop {
            match ws.next().await {
                Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => return msg,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("WebSocket error while waiting for a message: {e}"),
                None => panic!("WebSocket closed while waiting for a message"),
            }
        }
    })
    .await
}

/// Sends `msg` and returns the next data message received.
pub async fn roundtrip(ws: &mut Ws, msg: Message) -> Message {
    within(STEP, "a WebSocket send", ws.send(msg))
        .await
        .expect("WebSocket send");
    next_data(ws).await
}

/// Asks the echo [`Backend`] behind the tunnel for its name.
pub async fn whoami(ws: &mut Ws) -> String {
    match roundtrip(ws, Message::text("whoami")).await {
        Message::Text(name) => name.to_string(),
        other => panic!("whoami answered with {other:?}"),
    }
}

/// Opens a WebSocket and returns it with the name of the backend it reached.
pub async fn ws_whoami(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (Ws, String) {
    let mut ws = ws_connect_with(addr, path, headers).await;
    let name = whoami(&mut ws).await;
    (ws, name)
}

/// Waits until the WebSocket is closed by the other side (close frame, EOF or reset),
/// ignoring data; panics if it is still open after `limit`.
pub async fn ws_closed_within(ws: &mut Ws, limit: Duration) {
    within(limit, "the tunnel to be closed", async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
}

/// Closes the WebSocket from the client side and waits for the close to complete.
pub async fn close_ws(mut ws: Ws) {
    within(STEP, "a WebSocket close", async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

// ---- limits ----

/// A WebSocket upgrade of `/` for `host`, from `from` (a loopback address) when given.
pub async fn upgrade(addr: SocketAddr, host: &str, from: Option<IpAddr>) -> Result<Ws, Response> {
    upgrade_with(addr, Head::websocket("/").set("Host", host), from).await
}

pub async fn upgrade_with(
    addr: SocketAddr,
    head: Head,
    from: Option<IpAddr>,
) -> Result<Ws, Response> {
    let mut client = match from {
        Some(ip) => RawClient::from_stream(connect_from(ip, addr).await),
        None => RawClient::connect(addr).await,
    };
    let answer = client.request(&head).await;
    if answer.status != 101 {
        return Err(answer);
    }
    let mut ws = client.into_websocket().await;
    assert_eq!(whoami(&mut ws).await, "a");
    Ok(ws)
}

/// A TCP connection to `addr` from the loopback address `ip`.
pub async fn connect_from(ip: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(ip, 0)).expect("bind");
    within(STEP, "a TCP connect", socket.connect(addr))
        .await
        .expect("connect")
}

/// Asserts `answer` is a 429 naming `limit`, and returns its `Retry-After` in seconds.
pub fn assert_limited(answer: &Response, limit: &str) -> u64 {
    assert_eq!(answer.status, 429, "{answer:?}");
    assert!(answer.text().contains(limit), "{}", answer.text());
    answer
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .filter(|s| *s >= 1)
        .unwrap_or_else(|| panic!("no Retry-After in {answer:?}"))
}

// ---- TLS ------------------------------------------------------------------------------

/// A certificate authority made at test time (ECDSA P-256), and the certificates it issues.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
    der: rustls::pki_types::CertificateDer<'static>,
}

/// A certificate and its key, issued by a [`TestCa`].
#[derive(Clone)]
pub struct Issued {
    /// The certificate then the CA's, PEM (a chain as servers send it).
    pub chain_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The certificate, DER.
    pub der: rustls::pki_types::CertificateDer<'static>,
    ca_der: rustls::pki_types::CertificateDer<'static>,
}

impl TestCa {
    /// A new CA called `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign CA");
        TestCa {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses), with `cn` as its subject's
    /// common name, valid from yesterday for a year.
    pub fn issue(&self, cn: &str, names: &[&str]) -> Issued {
        let now = time_now();
        self.issue_between(cn, names, now - DAY, now + 365 * DAY)
    }

    /// A certificate valid from yesterday for `days` more days.
    pub fn issue_for_days(&self, cn: &str, names: &[&str], days: u32) -> Issued {
        let now = time_now();
        self.issue_between(cn, names, now - DAY, now + days * DAY)
    }

    /// A certificate that expired yesterday.
    pub fn issue_expired(&self, cn: &str, names: &[&str]) -> Issued {
        let now = time_now();
        self.issue_between(cn, names, now - 30 * DAY, now - DAY)
    }

    fn issue_between(
        &self,
        cn: &str,
        names: &[&str],
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Issued {
            chain_pem: format!("{}{}", cert.pem(), self.pem),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            ca_der: self.der.clone(),
        }
    }

    /// Roots holding only this CA.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("add CA root");
        roots
    }

    /// A client config that trusts only this CA, offering ALPN `http/1.1`.
    pub fn client(&self) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A client config that trusts this CA and presents `cert`.
    pub fn client_with(&self, cert: &Issued) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(self.roots())
            .with_client_auth_cert(cert.chain(), cert.key())
            .expect("client certificate");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

const DAY: Duration = Duration::from_secs(86_400);

fn time_now() -> std::time::SystemTime {
    std::time::SystemTime::now()
}

impl Issued {
    /// Writes `NAME.pem` (the chain) and `NAME-key.pem` into `dir`; returns both paths.
    pub fn write(&self, dir: &TempDir, name: &str) -> (PathBuf, PathBuf) {
        (
            dir.write(&format!("{name}.pem"), &self.chain_pem),
            dir.write(&format!("{name}-key.pem"), &self.key_pem),
        )
    }

    /// The chain, DER.
    pub fn chain(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        vec![self.der.clone(), self.ca_der.clone()]
    }

    /// The key, DER.
    pub fn key(&self) -> rustls::pki_types::PrivateKeyDer<'static> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("key PEM")
    }

    /// A server config serving this certificate, ALPN `http/1.1`.
    pub fn server(&self) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(self.chain(), self.key())
            .expect("server certificate");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// A client config that accepts any server certificate, to see what a server presents
/// for a name it may not hold.
pub fn any_cert_client() -> Arc<rustls::ClientConfig> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS connection to `addr` asking for `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// The DNS names in the SAN list of the certificate a TLS server presented.
pub fn served_names(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<String> {
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("the server sent a certificate");
    sluice::config::cert_info(leaf)
        .expect("the served certificate parses")
        .dns_names
}

/// A WebSocket over TLS to `path` on `addr`, asking for server name `sni` (also the
/// `Host`).
pub async fn wss_connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
    path: &str,
) -> WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>> {
    let tls = within(STEP, "TLS handshake", tls_connect(addr, sni, config))
        .await
        .expect("TLS handshake");
    let url = format!("wss://{sni}:{}{path}", addr.port());
    let (ws, resp) = within(
        STEP,
        "WebSocket handshake over TLS",
        tokio_tungstenite::client_async_with_config(url, tls, Some(ws_config())),
    )
    .await
    .expect("WebSocket handshake over TLS");
    assert_eq!(resp.status(), 101);
    ws
}

// ---- the admin listener ---------------------------------------------------------------

/// `[admin]` on a free loopback port, without a token.
pub const ADMIN: &str = "[admin]\nbind = \"127.0.0.1:0\"\n";

/// `GET path` on the admin listener, with `Authorization: Bearer token` when given.
pub async fn admin_get(admin: SocketAddr, path: &str, token: Option<&str>) -> Response {
    let mut head = Head::get(path);
    if let Some(t) = token {
        head = head.header("Authorization", &format!("Bearer {t}"));
    }
    request_once(admin, &head).await
}

/// `POST path` (no body) on the admin listener.
pub async fn admin_post(admin: SocketAddr, path: &str, token: Option<&str>) -> Response {
    let mut head = Head::new("POST", path).header("Content-Length", "0");
    if let Some(t) = token {
        head = head.header("Authorization", &format!("Bearer {t}"));
    }
    request_once(admin, &head).await
}

/// `GET path` on the admin listener, answered 200 with JSON.
pub async fn admin_json(admin: SocketAddr, path: &str) -> Value {
    let r = admin_get(admin, path, None).await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e})"))
}

/// `/metrics`, parsed as the Prometheus text format (a parse failure fails the test).
pub struct Metrics(prometheus_parse::Scrape);

impl Metrics {
    /// Scrapes the admin listener.
    pub async fn scrape(admin: SocketAddr) -> Metrics {
        let r = admin_get(admin, "/metrics", None).await;
        assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
            "{:?}",
            r.headers
        );
        let text = r.text();
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        Metrics(prometheus_parse::Scrape::parse(lines).expect("/metrics parses as Prometheus text"))
    }

    /// The value of the sample `name` (with `_total` for counters) whose labels include
    /// `labels`; `None` when there is none.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => h.last().map_or(0.0, |b| b.count),
                prometheus_parse::Value::Summary(_) => f64::NAN,
            })
    }

    /// As [`Metrics::get`], 0 when absent (a counter not yet counted).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

/// Waits (up to [`STEP`]) until the metric reads `want`, scraping again and again.
pub async fn wait_metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + STEP;
    loop {
        let got = Metrics::scrape(admin).await.value(name, labels);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} is {got}, waited {STEP:?} for {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The component `plugins/build.sh` built for plugin `name` (`target/plugins/NAME.wasm`).
pub fn plugin_wasm(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/plugins")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `plugins/build.sh` to build the plugin components first",
        path.display()
    );
    path
}
