//! Configuration: one TOML file, parsed with serde into a raw form that rejects unknown
//! fields, then validated into the typed [`Config`] that a [`crate::snapshot::Snapshot`]
//! is built from. Every error names the file, the line and the field.

mod limits;
mod locate;
mod raw;
mod tls;
mod units;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use limits::{ClusterConfig, DEFAULT_MAX_CLIENTS, Limits, OnFailure, Rate, TenantConfig};
use locate::Locator;
use raw::RawConfig;
pub use tls::{
    CertInfo, ClientAuth, ListenerTls, ServedCert, UnknownName, UpstreamTls, cert_info,
    crypto_provider,
};
pub use units::{MAX_DURATION, MAX_SIZE, UnitError, parse_duration, parse_size};

/// A validated configuration, ready to build a snapshot from.
#[derive(Debug, Clone)]
pub struct Config {
    /// Logging settings.
    pub log: LogConfig,
    /// How long tunnels may drain after SIGTERM/SIGINT before they are closed.
    pub shutdown_grace: Duration,
    /// Worker threads, each with its own event loop and its own socket per listener.
    pub workers: usize,
    /// Listening sockets, in name order.
    pub listeners: Vec<ListenerConfig>,
    /// Upstream pools, in name order.
    pub upstreams: Vec<UpstreamConfig>,
    /// Routes, in file order.
    pub routes: Vec<RouteConfig>,
    /// Policy plugins, in name order.
    pub plugins: Vec<PluginConfig>,
    /// The admin listener (`[admin]`), off when absent.
    pub admin: Option<AdminConfig>,
    /// What triggers a reload besides SIGHUP and `POST /reload` (`[reload]`).
    pub reload: ReloadConfig,
    /// Tenants and their limits, in name order.
    pub tenants: Vec<TenantConfig>,
    /// Client addresses tracked at once for per-IP limits (`[limits] max_clients`).
    pub max_clients: usize,
    /// Limits shared with other gateways through Redis (`[cluster]`).
    pub cluster: Option<ClusterConfig>,
}

impl Config {
    /// The admin listener's TLS settings (`[admin.tls]`), if it has any.
    pub fn admin_tls(&self) -> Option<&ListenerTls> {
        self.admin.as_ref().and_then(|a| a.tls.as_ref())
    }

    /// The files whose change should trigger a reload: the plugins' components and the
    /// listeners', the admin's and pools' certificate, key and CA files (the config file
    /// itself is the caller's).
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.plugins.iter().map(|p| p.wasm.clone()).collect();
        let listeners = self.listeners.iter().filter_map(|l| l.tls.as_ref());
        for t in listeners.chain(self.admin_tls()) {
            files.extend(t.files.iter().cloned());
        }
        for u in &self.upstreams {
            if let Some(t) = &u.tls {
                files.extend(t.files.iter().cloned());
            }
        }
        files.sort();
        files.dedup();
        files
    }
}

/// The admin listener (`[admin]`): metrics, status, reload and drain, off the request
/// path.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address to bind; loopback unless a token guards it.
    pub bind: SocketAddr,
    /// The bearer token every request must carry, read from `token_file`.
    pub token: Option<String>,
    /// HTTPS instead of HTTP (`[admin.tls]`, as a listener's), so the token and the
    /// status do not cross the network in the clear.
    pub tls: Option<ListenerTls>,
}

/// Reload triggers (`[reload]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadConfig {
    /// Reload when the config file, a plugin's `.wasm` or a certificate, key or CA file
    /// changes.
    pub watch: bool,
    /// Changes closer together than this make one reload.
    pub debounce: Duration,
}

/// Logging settings (`[log]`).
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `sluice=debug`; `RUST_LOG` overrides it.
    pub level: String,
    /// Human-readable text or one JSON object per line.
    pub format: LogFormat,
    /// Where access-log events go instead of stderr (reopened on SIGUSR1, for logrotate).
    pub access_file: Option<PathBuf>,
}

/// The shape of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// `key=value` text lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// One listening socket (`[listeners.NAME]`).
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// The listener's name, used by routes and logs.
    pub name: String,
    /// Address to bind.
    pub bind: SocketAddr,
    /// Connections served at once; further accepts wait.
    pub max_connections: usize,
    /// Time a client has to send a complete request head (slowloris bound).
    pub header_read_timeout: Duration,
    /// Largest request head accepted; larger ones get `431`.
    pub max_header_size: usize,
    /// TLS termination, when the table is present.
    pub tls: Option<ListenerTls>,
    /// The balancers (addresses or CIDR ranges) whose connections start with a PROXY
    /// protocol header naming the real client; empty when none.
    pub proxy_protocol: Vec<ipnet::IpNet>,
    /// HTTP/2 from clients (`[listeners.NAME.http2]`): offered by ALPN on a TLS listener,
    /// spoken by prior knowledge (`h2c`) on a plain one; `None` when turned off.
    pub http2: Option<Http2Config>,
    /// Proxies (addresses or CIDR ranges) whose `X-Forwarded-For` names the client: the
    /// client is the last address in it that is not itself a trusted proxy.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Limits on each client address, for requests whose tenant sets no `per_ip`.
    pub per_ip: Limits,
}

/// A listener's HTTP/2 settings and its bounds against HTTP/2 abuse. The largest header
/// list a client may send is the listener's `max_header_size` (which also bounds a header
/// block spread over CONTINUATION frames), and a connection with no stream open for
/// `header_read_timeout` (one that never sends its preface or SETTINGS included) is
/// closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http2Config {
    /// Streams a client may have open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Streams the client reset before the gateway took them up, held at once; past it
    /// the connection gets GOAWAY (rapid reset, CVE-2023-44487).
    pub max_pending_resets: usize,
    /// Requests the client may cancel (reset before their response) per second, with a
    /// burst of twice as many; past it the connection gets GOAWAY (rapid reset).
    pub max_reset_rate: u32,
    /// The flow-control window of each stream: what a client may send on it that the
    /// gateway has not yet relayed.
    pub stream_window: u32,
    /// The flow-control window of the whole connection: by default room for every stream's
    /// window, so streams whose upstreams are slow never stall the others.
    pub connection_window: u32,
    /// Bytes the gateway queues per stream for a client that is slow to read.
    pub max_send_buffer: usize,
}

impl Http2Config {
    /// The defaults of an `[listeners.NAME.http2]` table.
    pub const DEFAULT: Http2Config = Http2Config {
        max_concurrent_streams: 100,
        max_pending_resets: 20,
        max_reset_rate: 50,
        stream_window: 64 * 1024,
        connection_window: 100 * 64 * 1024,
        max_send_buffer: 64 * 1024,
    };
}

/// An upstream pool (`[upstreams.NAME]`).
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The pool's name, used by routes and logs.
    pub name: String,
    /// The servers, in file order.
    pub servers: Vec<ServerConfig>,
    /// How a server is chosen for each new connection or request.
    pub balance: Balance,
    /// Deadline for a TCP connect to one server.
    pub connect_timeout: Duration,
    /// Consecutive connect failures that eject a server (0 disables passive ejection).
    pub max_fails: u32,
    /// How long a passively ejected server rests before it is tried again
    /// (only when no active health check is configured; otherwise the check decides).
    pub fail_timeout: Duration,
    /// Active health check, if any.
    pub health: Option<HealthConfig>,
    /// How TLS servers of the pool are reached; `Some` when any server speaks TLS.
    pub tls: Option<UpstreamTls>,
}

/// One server of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerConfig {
    /// The address as written, used as the `Host` when the route does not preserve it.
    pub authority: String,
    /// The resolved socket address.
    pub addr: SocketAddr,
    /// Whether the server is reached over TLS (`wss://`, `https://`, or the pool's
    /// `tls` table for a server written without a scheme).
    pub tls: bool,
}

/// Balancing algorithm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    /// Each server in turn.
    RoundRobin,
    /// The server with the fewest open connections and tunnels (ties go round-robin).
    LeastConn,
    /// Consistent hashing of a per-request key onto a ring of servers.
    Hash(HashKey),
}

/// Where the consistent-hash key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address.
    ClientIp,
    /// A request header (lower-case name).
    Header(String),
    /// A cookie.
    Cookie(String),
    /// A query-string parameter.
    Query(String),
}

/// Active health check settings (`[upstreams.NAME.health]`).
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// What a probe does.
    pub check: HealthCheck,
    /// Time between probes of one server.
    pub interval: Duration,
    /// Deadline for one probe.
    pub timeout: Duration,
    /// Consecutive successes that bring an unhealthy server back.
    pub rise: u32,
    /// Consecutive failures that take a healthy server out.
    pub fall: u32,
}

/// The kind of probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// A TCP connect succeeds.
    Tcp,
    /// `GET path` answers with the expected status.
    Http {
        /// Path requested.
        path: String,
        /// Status that counts as healthy.
        expect_status: u16,
    },
}

/// A route (`[[routes]]`).
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Name used in logs (defaults to `host+path_prefix`).
    pub name: String,
    /// Listeners the route applies to; `None` means all.
    pub listeners: Option<Vec<String>>,
    /// Host match; `None` matches any host.
    pub host: Option<HostMatch>,
    /// Path prefix matched against the normalised request path.
    pub path_prefix: String,
    /// What the route does with a matching request.
    pub action: RouteAction,
    /// Forward the client's `Host` header (otherwise the server's address is sent).
    pub preserve_host: bool,
    /// Send the upstream the normalised path that routing matched (`.`/`..` resolved,
    /// `//` collapsed, unreserved %-escapes decoded) instead of the path as sent; as
    /// Envoy's `normalize_path`.
    pub normalize_path: bool,
    /// A tunnel with no bytes either way for this long is closed; `None` disables.
    pub idle_timeout: Option<Duration>,
    /// Deadline for the upstream to answer a WebSocket handshake.
    pub handshake_timeout: Duration,
    /// Deadline for the upstream to answer a plain request's head (then `504`).
    pub request_timeout: Duration,
    /// Plugin chain run before upstream selection, in order.
    pub plugins: Vec<String>,
    /// Pools a plugin may switch this route to, besides its own.
    pub pools: Vec<String>,
    /// Tenant this route belongs to, told to plugins.
    pub tenant: Option<String>,
    /// Where the chain's inputs and decisions are written for `sluice replay`
    /// (`[routes.capture]`); `None`: off.
    pub capture: Option<CaptureConfig>,
}

/// A route's capture (`[routes.capture]`): each request's view as the plugin chain saw it
/// and the decision it took, as JSON lines appended to `file`, for `sluice replay`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// The file appended to (relative paths resolved against the config's directory).
    pub file: PathBuf,
    /// Header names (lower-case) whose values are replaced by a marker before a line is
    /// written: in the request, in the plugins' header changes and in a denial's headers.
    pub redact: Vec<String>,
    /// The file's size past which nothing more is written (a reload with a fresh file
    /// starts again).
    pub max_size: u64,
}

impl CaptureConfig {
    /// Headers redacted when `redact` is not given: the credentials a browser or client
    /// sends on their own.
    pub const DEFAULT_REDACT: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];
    /// `max_size` when not given.
    pub const DEFAULT_MAX_SIZE: u64 = 64 << 20;
}

impl RouteConfig {
    /// The pool this route proxies to, if it proxies.
    pub fn action_pool(&self) -> Option<&str> {
        match &self.action {
            RouteAction::Proxy(p) => Some(p),
            RouteAction::Respond { .. } => None,
        }
    }
}

/// How a route's host matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// The host exactly (lower-case, without port).
    Exact(String),
    /// Any subdomain of this suffix (`*.example.com` stores `.example.com`).
    Suffix(String),
}

/// What a route does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteAction {
    /// Proxy to this upstream pool.
    Proxy(String),
    /// Answer with a fixed status and body, never proxying.
    Respond {
        /// Status code.
        status: u16,
        /// Body text.
        body: String,
    },
}

/// A policy plugin (`[plugins.NAME]`): everything the plugin host needs to load it.
#[derive(Debug, Clone, Default)]
pub struct PluginConfig {
    /// Name used in logs, errors and metrics; also scopes its counters.
    pub name: String,
    /// Path of the component (`.wasm`).
    pub wasm: PathBuf,
    /// JSON text handed to `init`.
    pub config_json: String,
    /// Resource limits.
    pub limits: PluginLimits,
    /// On a fault, skip this plugin (true) instead of denying with 503.
    pub fail_open: bool,
    /// `grants.http`: the URLs whose documents the host may fetch for it.
    pub grants: Vec<String>,
    /// Where its config is written in the config file (`line L, column C
    /// (plugins.NAME.config)`), for a config its `init` refuses; empty when not from a file.
    pub config_at: String,
}

/// Two specs load the same plugin when all but where the config is written agree (a
/// table moved in the file needs no new instance).
impl PartialEq for PluginConfig {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.name,
            &self.wasm,
            &self.config_json,
            &self.limits,
            self.fail_open,
            &self.grants,
        ) == (
            &other.name,
            &other.wasm,
            &other.config_json,
            &other.limits,
            other.fail_open,
            &other.grants,
        )
    }
}

impl Eq for PluginConfig {}

/// Per-plugin resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PluginLimits {
    /// CPU time one hook call (or instantiate + init) may use.
    pub cpu_deadline: Duration,
    /// Linear-memory cap per instance, in bytes.
    pub memory_bytes: usize,
    /// Instances kept (and calls run) concurrently, at most.
    pub max_instances: usize,
    /// Decisions kept for reuse (those the plugin returned with a
    /// `reuse-ms`), at most; `0` calls the plugin for every request.
    pub max_reused: usize,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            cpu_deadline: Duration::from_millis(10),
            memory_bytes: 64 << 20,
            max_instances: 4,
            max_reused: 1024,
        }
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read config: {source}")]
    Io {
        /// The file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read but is invalid.
    #[error("{file}:{line}:{column}: {field}: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The field, as a path such as `routes[1].upstream`.
        field: String,
        /// What was wrong and what was expected.
        message: String,
    },
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: file.clone(),
            source,
        })?;
        Config::parse(&file, &src)
    }

    /// Validates config text; `file` is only used in error messages.
    pub fn parse(file: &str, src: &str) -> Result<Config, ConfigError> {
        let locator = Locator::new(file, src);
        let raw: RawConfig = toml::from_str(src).map_err(|e| {
            let message = e.message().trim().to_string();
            match e.span() {
                Some(span) => locator.at(span, message),
                None => locator.top_level(message),
            }
        })?;
        let base_dir = Path::new(file).parent().unwrap_or(Path::new("."));
        raw.validate(base_dir, &locator)
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
