//! Configuration: one TOML file, parsed with serde into a raw form that rejects unknown
//! fields, then validated into the typed [`Config`] that a [`crate::snapshot::Snapshot`]
//! is built from. Every error names the file, the line and the field.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::plugin::{Limits, PluginSpec};

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
    pub plugins: Vec<PluginSpec>,
}

/// Logging settings (`[log]`).
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `sluice=debug`; `RUST_LOG` overrides it.
    pub level: String,
    /// Human-readable text or one JSON object per line.
    pub format: LogFormat,
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
}

/// One server of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerConfig {
    /// The address as written, used as the `Host` when the route does not preserve it.
    pub authority: String,
    /// The resolved socket address.
    pub addr: SocketAddr,
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
        let at = |offset: usize, message: String| {
            let (line, column) = line_col(src, offset);
            ConfigError::Invalid {
                file: file.to_string(),
                line,
                column,
                field: field_at(src, offset),
                message,
            }
        };
        let raw: RawConfig = toml::from_str(src).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            at(offset, e.message().trim().to_string())
        })?;
        let base_dir = Path::new(file).parent().unwrap_or(Path::new("."));
        raw.validate(base_dir, &|span: std::ops::Range<usize>, msg: String| {
            at(span.start, msg)
        })
    }
}

type ErrAt<'a> = dyn Fn(std::ops::Range<usize>, String) -> ConfigError + 'a;

// ---- raw form -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    listeners: BTreeMap<String, Spanned<RawListener>>,
    #[serde(default)]
    upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    plugins: BTreeMap<String, Spanned<RawPlugin>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    path: Spanned<String>,
    #[serde(default)]
    config: toml::Table,
    fail_open: Option<bool>,
    cpu_deadline: Option<Dur>,
    memory: Option<Spanned<Size>>,
    max_instances: Option<Spanned<u32>>,
    max_reused: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default = "default_level")]
    level: Spanned<String>,
    #[serde(default = "default_format")]
    format: LogFormat,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: default_level(),
            format: default_format(),
        }
    }
}

fn default_level() -> Spanned<String> {
    Spanned::new(0..0, "info".into())
}
fn default_format() -> LogFormat {
    LogFormat::Text
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    grace: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    workers: Option<Spanned<u64>>,
}

/// Most worker threads a config may ask for.
const MAX_WORKERS: u64 = 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    bind: Spanned<String>,
    max_connections: Option<Spanned<u64>>,
    header_read_timeout: Option<Dur>,
    max_header_size: Option<Spanned<Size>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    servers: Spanned<Vec<Spanned<String>>>,
    balance: Option<Spanned<String>>,
    hash_key: Option<Spanned<String>>,
    connect_timeout: Option<Dur>,
    max_fails: Option<u32>,
    fail_timeout: Option<Dur>,
    health: Option<Spanned<RawHealth>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: Spanned<String>,
    path: Option<Spanned<String>>,
    expect_status: Option<Spanned<u16>>,
    interval: Option<Dur>,
    timeout: Option<Dur>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    listeners: Option<Vec<Spanned<String>>>,
    host: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    upstream: Option<Spanned<String>>,
    status: Option<Spanned<u16>>,
    body: Option<String>,
    preserve_host: Option<bool>,
    idle_timeout: Option<Dur>,
    handshake_timeout: Option<Dur>,
    request_timeout: Option<Dur>,
    plugins: Option<Vec<Spanned<String>>>,
    pools: Option<Vec<Spanned<String>>>,
    tenant: Option<String>,
}

impl RawConfig {
    fn validate(self, base_dir: &Path, err: &ErrAt<'_>) -> Result<Config, ConfigError> {
        let mut listeners = Vec::new();
        for (name, l) in self.listeners {
            let span = l.span();
            let l = l.into_inner();
            check_name(&name, span.clone(), err)?;
            let bind = l.bind.get_ref().parse::<SocketAddr>().map_err(|_| {
                err(
                    l.bind.span(),
                    format!(
                        "expected an IP address and port such as \"127.0.0.1:8080\", got {:?}",
                        l.bind.get_ref()
                    ),
                )
            })?;
            // Port 0 asks the OS for any free port, so it never collides.
            if bind.port() != 0 && listeners.iter().any(|x: &ListenerConfig| x.bind == bind) {
                return Err(err(
                    l.bind.span(),
                    format!("{bind} is already bound by another listener"),
                ));
            }
            let max_connections = match l.max_connections {
                Some(m) if *m.get_ref() == 0 => {
                    return Err(err(m.span(), "must be at least 1".into()));
                }
                Some(m) => *m.get_ref() as usize,
                None => 10_000,
            };
            let max_header_size = match l.max_header_size {
                // hyper's HTTP/1 parser needs at least 8 KiB of buffer.
                Some(s) if s.get_ref().0 < 8192 || s.get_ref().0 > 1 << 20 => {
                    return Err(err(s.span(), "must be between 8KiB and 1MiB".to_string()));
                }
                Some(s) => s.into_inner().0 as usize,
                None => 16 * 1024,
            };
            listeners.push(ListenerConfig {
                name,
                bind,
                max_connections,
                header_read_timeout: nonzero(l.header_read_timeout, Duration::from_secs(10), err)?,
                max_header_size,
            });
        }
        if listeners.is_empty() {
            return Err(err(
                0..0,
                "at least one [listeners.NAME] table is required".into(),
            ));
        }

        let mut upstreams = Vec::new();
        for (name, u) in self.upstreams {
            let span = u.span();
            let u = u.into_inner();
            check_name(&name, span.clone(), err)?;
            upstreams.push(u.validate(name, span, err)?);
        }

        let mut plugins = Vec::new();
        for (name, p) in self.plugins {
            check_name(&name, p.span(), err)?;
            plugins.push(p.into_inner().validate(name, base_dir, err)?);
        }

        let mut routes = Vec::new();
        for r in self.routes {
            let span = r.span();
            let known = Known {
                listeners: &listeners,
                upstreams: &upstreams,
                plugins: &plugins,
            };
            routes.push(r.into_inner().validate(span, &known, err)?);
        }
        if routes.is_empty() {
            return Err(err(
                0..0,
                "at least one [[routes]] entry is required".into(),
            ));
        }

        if let Err(e) = tracing_subscriber::EnvFilter::try_new(self.log.level.get_ref()) {
            return Err(err(
                self.log.level.span(),
                format!("expected a log filter such as \"info\" or \"sluice=debug,warn\": {e}"),
            ));
        }
        let workers = match self.runtime.workers {
            Some(w) if !(1..=MAX_WORKERS).contains(w.get_ref()) => {
                return Err(err(
                    w.span(),
                    format!("must be between 1 and {MAX_WORKERS}"),
                ));
            }
            Some(w) => *w.get_ref() as usize,
            None => std::thread::available_parallelism().map_or(1, usize::from),
        };
        Ok(Config {
            workers,
            log: LogConfig {
                level: self.log.level.into_inner(),
                format: self.log.format,
            },
            shutdown_grace: self
                .shutdown
                .grace
                .map(|d| d.value)
                .unwrap_or(Duration::from_secs(30)),
            listeners,
            upstreams,
            routes,
            plugins,
        })
    }
}

impl RawUpstream {
    fn validate(
        self,
        name: String,
        span: std::ops::Range<usize>,
        err: &ErrAt<'_>,
    ) -> Result<UpstreamConfig, ConfigError> {
        if self.servers.get_ref().is_empty() {
            return Err(err(
                self.servers.span(),
                "at least one server is required".into(),
            ));
        }
        let mut servers: Vec<ServerConfig> = Vec::new();
        for s in self.servers.into_inner() {
            let authority = s.get_ref().clone();
            let addr = authority
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| {
                    err(
                        s.span(),
                        format!("expected \"host:port\" that resolves, got {authority:?}"),
                    )
                })?;
            if servers.iter().any(|x| x.addr == addr) {
                return Err(err(s.span(), format!("server {authority} is listed twice")));
            }
            servers.push(ServerConfig { authority, addr });
        }
        let balance = match self.balance.as_ref().map(|b| b.get_ref().as_str()) {
            None | Some("least-conn") => Balance::LeastConn,
            Some("round-robin") => Balance::RoundRobin,
            Some("hash") => Balance::Hash(match &self.hash_key {
                None => HashKey::ClientIp,
                Some(k) => parse_hash_key(k.get_ref())
                    .ok_or_else(|| err(k.span(), format!("expected \"client-ip\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\", got {:?}", k.get_ref())))?,
            }),
            Some(other) => {
                return Err(err(
                    self.balance.as_ref().map(|b| b.span()).unwrap_or(span),
                    format!(
                        "expected \"round-robin\", \"least-conn\" or \"hash\", got {other:?}"
                    ),
                ));
            }
        };
        if let (Some(k), false) = (&self.hash_key, matches!(balance, Balance::Hash(_))) {
            return Err(err(k.span(), "hash_key needs balance = \"hash\"".into()));
        }
        let health = match self.health {
            None => None,
            Some(h) => Some(h.into_inner().validate(err)?),
        };
        Ok(UpstreamConfig {
            name,
            servers,
            balance,
            connect_timeout: nonzero(self.connect_timeout, Duration::from_secs(3), err)?,
            max_fails: self.max_fails.unwrap_or(3),
            fail_timeout: nonzero(self.fail_timeout, Duration::from_secs(10), err)?,
            health,
        })
    }
}

fn parse_hash_key(s: &str) -> Option<HashKey> {
    if s == "client-ip" {
        return Some(HashKey::ClientIp);
    }
    let (kind, name) = s.split_once(':')?;
    if name.is_empty() {
        return None;
    }
    match kind {
        "header" => Some(HashKey::Header(name.to_ascii_lowercase())),
        "cookie" => Some(HashKey::Cookie(name.to_string())),
        "query" => Some(HashKey::Query(name.to_string())),
        _ => None,
    }
}

impl RawHealth {
    fn validate(self, err: &ErrAt<'_>) -> Result<HealthConfig, ConfigError> {
        let check = match self.check.get_ref().as_str() {
            "tcp" => {
                if let Some(p) = &self.path {
                    return Err(err(p.span(), "path needs check = \"http\"".into()));
                }
                HealthCheck::Tcp
            }
            "http" => {
                let path = self
                    .path
                    .map(|p| p.into_inner())
                    .unwrap_or_else(|| "/".into());
                if !path.starts_with('/') {
                    return Err(err(
                        self.check.span(),
                        format!("path must start with '/', got {path:?}"),
                    ));
                }
                let expect_status = match self.expect_status {
                    Some(s) if !(100..=599).contains(s.get_ref()) => {
                        return Err(err(s.span(), "expected an HTTP status code 100-599".into()));
                    }
                    Some(s) => s.into_inner(),
                    None => 200,
                };
                HealthCheck::Http {
                    path,
                    expect_status,
                }
            }
            other => {
                return Err(err(
                    self.check.span(),
                    format!("expected \"tcp\" or \"http\", got {other:?}"),
                ));
            }
        };
        let count = |v: Option<Spanned<u32>>, default: u32| match v {
            Some(c) if *c.get_ref() == 0 => Err(err(c.span(), "must be at least 1".into())),
            Some(c) => Ok(c.into_inner()),
            None => Ok(default),
        };
        Ok(HealthConfig {
            check,
            interval: nonzero(self.interval, Duration::from_secs(5), err)?,
            timeout: nonzero(self.timeout, Duration::from_secs(2), err)?,
            rise: count(self.rise, 2)?,
            fall: count(self.fall, 3)?,
        })
    }
}

impl RawRoute {
    fn validate(
        self,
        span: std::ops::Range<usize>,
        known: &Known<'_>,
        err: &ErrAt<'_>,
    ) -> Result<RouteConfig, ConfigError> {
        let (listeners, upstreams) = (known.listeners, known.upstreams);
        let plugin_names: Vec<&str> = known.plugins.iter().map(|p| p.name.as_str()).collect();
        let pool_names: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
        let route_plugins = known_names(self.plugins, &plugin_names, "plugin", err)?;
        let route_pools = known_names(self.pools, &pool_names, "upstream", err)?;
        let route_listeners = match self.listeners {
            None => None,
            Some(ls) => {
                let mut names = Vec::new();
                for l in ls {
                    if !listeners.iter().any(|x| x.name == *l.get_ref()) {
                        return Err(err(
                            l.span(),
                            format!(
                                "unknown listener `{}` (defined: {})",
                                l.get_ref(),
                                listeners
                                    .iter()
                                    .map(|x| x.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    }
                    names.push(l.into_inner());
                }
                Some(names)
            }
        };
        let host = match &self.host {
            None => None,
            Some(h) => {
                let v = h.get_ref().to_ascii_lowercase();
                if v.is_empty() || v.contains(['/', ':', ' ']) {
                    return Err(err(
                        h.span(),
                        format!(
                            "expected a host name such as \"example.com\" or \"*.example.com\", got {:?}",
                            h.get_ref()
                        ),
                    ));
                }
                Some(match v.strip_prefix("*.") {
                    Some(rest) => HostMatch::Suffix(format!(".{rest}")),
                    None => HostMatch::Exact(v),
                })
            }
        };
        let path_prefix = match &self.path_prefix {
            None => "/".to_string(),
            Some(p) if !p.get_ref().starts_with('/') => {
                return Err(err(
                    p.span(),
                    format!("must start with '/', got {:?}", p.get_ref()),
                ));
            }
            Some(p) => p.get_ref().clone(),
        };
        let action = match (self.upstream, self.status) {
            (Some(u), None) => {
                if !upstreams.iter().any(|x| x.name == *u.get_ref()) {
                    return Err(err(
                        u.span(),
                        format!(
                            "unknown upstream `{}` (defined: {})",
                            u.get_ref(),
                            upstreams
                                .iter()
                                .map(|x| x.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                RouteAction::Proxy(u.into_inner())
            }
            (None, Some(s)) => {
                if !(200..=599).contains(s.get_ref()) {
                    return Err(err(s.span(), "expected an HTTP status code 200-599".into()));
                }
                RouteAction::Respond {
                    status: s.into_inner(),
                    body: self.body.unwrap_or_default(),
                }
            }
            (Some(u), Some(_)) => {
                return Err(err(
                    u.span(),
                    "a route has either `upstream` or `status`, not both".into(),
                ));
            }
            (None, None) => {
                return Err(err(
                    span,
                    "a route needs `upstream` (proxy) or `status` (fixed answer)".into(),
                ));
            }
        };
        let name = self.name.unwrap_or_else(|| {
            format!(
                "{}{}",
                self.host
                    .as_ref()
                    .map(|h| h.get_ref().as_str())
                    .unwrap_or("*"),
                path_prefix
            )
        });
        let idle_timeout = match self.idle_timeout {
            Some(d) if d.value.is_zero() => None,
            Some(d) => Some(d.value),
            None => Some(Duration::from_secs(3600)),
        };
        Ok(RouteConfig {
            name,
            listeners: route_listeners,
            host,
            path_prefix,
            action,
            preserve_host: self.preserve_host.unwrap_or(true),
            idle_timeout,
            handshake_timeout: nonzero(self.handshake_timeout, Duration::from_secs(10), err)?,
            request_timeout: nonzero(self.request_timeout, Duration::from_secs(60), err)?,
            plugins: route_plugins,
            pools: route_pools,
            tenant: self.tenant,
        })
    }
}

/// What routes may refer to.
struct Known<'a> {
    listeners: &'a [ListenerConfig],
    upstreams: &'a [UpstreamConfig],
    plugins: &'a [PluginSpec],
}

/// Checks that each name is one of `known` (`what` names the kind in the error).
fn known_names(
    list: Option<Vec<Spanned<String>>>,
    known: &[&str],
    what: &str,
    err: &ErrAt<'_>,
) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for n in list.unwrap_or_default() {
        if !known.contains(&n.get_ref().as_str()) {
            return Err(err(
                n.span(),
                format!(
                    "unknown {what} `{}` (defined: {})",
                    n.get_ref(),
                    known.join(", ")
                ),
            ));
        }
        out.push(n.into_inner());
    }
    Ok(out)
}

/// Most decisions one plugin may keep for reuse (each holds its key, at most 4 KiB).
const MAX_REUSED: u32 = 65_536;

impl RawPlugin {
    fn validate(
        self,
        name: String,
        base_dir: &Path,
        err: &ErrAt<'_>,
    ) -> Result<PluginSpec, ConfigError> {
        let defaults = Limits::default();
        let memory_bytes = match self.memory {
            Some(m) if m.get_ref().0 < 1 << 16 || m.get_ref().0 > 1 << 30 => {
                return Err(err(m.span(), "must be between 64KiB and 1GiB".into()));
            }
            Some(m) => m.into_inner().0 as usize,
            None => defaults.memory_bytes,
        };
        let max_instances = match self.max_instances {
            Some(n) if *n.get_ref() == 0 || *n.get_ref() > 256 => {
                return Err(err(n.span(), "must be between 1 and 256".into()));
            }
            Some(n) => n.into_inner() as usize,
            None => defaults.max_instances,
        };
        let max_reused = match self.max_reused {
            Some(n) if *n.get_ref() > MAX_REUSED => {
                return Err(err(
                    n.span(),
                    format!("must be at most {MAX_REUSED} (0 turns reuse off)"),
                ));
            }
            Some(n) => n.into_inner() as usize,
            None => defaults.max_reused,
        };
        let config_json = serde_json::to_string(&self.config).map_err(|e| {
            err(
                self.path.span(),
                format!("config table is not JSON-compatible: {e}"),
            )
        })?;
        Ok(PluginSpec {
            name,
            wasm: base_dir.join(self.path.get_ref()),
            config_json,
            limits: Limits {
                cpu_deadline: nonzero(self.cpu_deadline, defaults.cpu_deadline, err)?,
                memory_bytes,
                max_instances,
                max_reused,
            },
            fail_open: self.fail_open.unwrap_or(false),
        })
    }
}

fn check_name(
    name: &str,
    span: std::ops::Range<usize>,
    err: &ErrAt<'_>,
) -> Result<(), ConfigError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(err(
            span,
            format!("names use letters, digits, '-' and '_', got {name:?}"),
        ));
    }
    Ok(())
}

fn nonzero(d: Option<Dur>, default: Duration, err: &ErrAt<'_>) -> Result<Duration, ConfigError> {
    match d {
        None => Ok(default),
        Some(d) if d.value.is_zero() => Err(err(d.span, "must be greater than zero".into())),
        Some(d) => Ok(d.value),
    }
}

// ---- value types ----------------------------------------------------------------------

/// A duration written as `"30s"`, `"500ms"`, `"1h30m"`, remembering where it was written.
struct Dur {
    value: Duration,
    span: std::ops::Range<usize>,
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<String>::deserialize(d)?;
        let value = parse_duration(s.get_ref()).map_err(serde::de::Error::custom)?;
        Ok(Dur {
            value,
            span: s.span(),
        })
    }
}

/// Parses `"30s"`, `"250ms"`, `"1h30m"`, `"2d"`, or `"0"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("expected a duration such as \"30s\", \"500ms\" or \"1h\", got {s:?}");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86400),
            _ => return Err(bad()),
        };
        total += d;
    }
    Ok(total)
}

/// A size written as `"16KiB"`, `"1MiB"`, `"512B"` or a plain integer of bytes.
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            N(u64),
            S(String),
        }
        match Either::deserialize(d)? {
            Either::N(n) => Ok(Size(n)),
            Either::S(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `"16KiB"`, `"1MiB"`, `"10KB"`, `"512B"` or `"512"`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("expected a size such as \"16KiB\" or \"1MiB\", got {s:?}");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if split == 0 {
        return Err(bad());
    }
    let n: u64 = t[..split].parse().map_err(|_| bad())?;
    let mult = match t[split..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

// ---- error locations -----------------------------------------------------------------

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, column)
}

/// Names the field at a byte offset as a dotted path such as `routes[1].upstream` or
/// `upstreams.echo.health.interval`, from the enclosing table header and the key on the line.
fn field_at(src: &str, offset: usize) -> String {
    if offset == 0 {
        // Whole-file problems (a required table missing) have no better place.
        return "(top level)".into();
    }
    let offset = offset.min(src.len());
    let line_start = src[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = src[offset..]
        .find('\n')
        .map(|i| offset + i)
        .unwrap_or(src.len());
    let line = &src[line_start..line_end];
    let trimmed = line.trim_start();
    let header_of = |l: &str| -> Option<(String, bool)> {
        let l = l.trim();
        if let Some(inner) = l.strip_prefix("[[").and_then(|x| x.split("]]").next()) {
            return Some((inner.trim().to_string(), true));
        }
        if let Some(inner) = l.strip_prefix('[').and_then(|x| x.split(']').next()) {
            return Some((inner.trim().to_string(), false));
        }
        None
    };
    // The table enclosing the offset (the line itself when it is a header).
    let mut table: Option<(String, bool, usize)> = None;
    for (pos, l) in line_starts(src) {
        if pos > line_start {
            break;
        }
        if let Some((name, array)) = header_of(l) {
            table = Some((name, array, pos));
        }
    }
    let table_path = match &table {
        None => String::new(),
        Some((name, array, pos)) if *array => {
            let index = line_starts(src)
                .filter(|(p, l)| *p < *pos && header_of(l).is_some_and(|(n, a)| a && n == *name))
                .count();
            format!("{name}[{index}]")
        }
        Some((name, _, _)) => name.clone(),
    };
    if header_of(trimmed).is_some() || trimmed.is_empty() {
        return if table_path.is_empty() {
            "(top level)".into()
        } else {
            table_path
        };
    }
    let key = trimmed
        .split('=')
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches('"');
    match (table_path.is_empty(), key.is_empty()) {
        (true, _) => key.to_string(),
        (false, true) => table_path,
        (false, false) => format!("{table_path}.{key}"),
    }
}

fn line_starts(src: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut pos = 0;
    src.split('\n').map(move |l| {
        let p = pos;
        pos += l.len() + 1;
        (p, l)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[listeners.public]
bind = "127.0.0.1:8080"

[upstreams.echo]
servers = ["127.0.0.1:9001"]

[[routes]]
path_prefix = "/"
upstream = "echo"
"#;

    fn err_of(src: &str) -> String {
        Config::parse("sluice.toml", src).unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse("sluice.toml", BASE).unwrap();
        assert_eq!(c.listeners[0].max_header_size, 16 * 1024);
        assert_eq!(c.upstreams[0].balance, Balance::LeastConn);
        assert_eq!(c.routes[0].idle_timeout, Some(Duration::from_secs(3600)));
        assert!(c.routes[0].preserve_host);
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let src = BASE.replace("servers = [", "serverz = 1\nservers = [");
        assert_eq!(
            err_of(&src),
            "sluice.toml:6:1: upstreams.echo.serverz: unknown field `serverz`, expected one of `servers`, `balance`, `hash_key`, `connect_timeout`, `max_fails`, `fail_timeout`, `health`"
        );
    }

    #[test]
    fn bad_duration_names_the_field() {
        let src = format!("{BASE}idle_timeout = \"3 weeks\"\n");
        assert_eq!(
            err_of(&src),
            "sluice.toml:11:16: routes[0].idle_timeout: expected a duration such as \"30s\", \"500ms\" or \"1h\", got \"3 weeks\""
        );
    }

    #[test]
    fn unknown_upstream_is_reported_at_its_use() {
        let src = format!("{BASE}\n[[routes]]\npath_prefix = \"/x\"\nupstream = \"nope\"\n");
        assert_eq!(
            err_of(&src),
            "sluice.toml:14:12: routes[1].upstream: unknown upstream `nope` (defined: echo)"
        );
    }

    #[test]
    fn bad_hash_key_and_sizes() {
        let src = BASE.replace(
            "servers = [\"127.0.0.1:9001\"]",
            "servers = [\"127.0.0.1:9001\"]\nbalance = \"hash\"\nhash_key = \"body:x\"",
        );
        assert!(err_of(&src).starts_with("sluice.toml:8:12: upstreams.echo.hash_key: expected"));
        let src = BASE.replace(
            "bind = \"127.0.0.1:8080\"",
            "bind = \"127.0.0.1:8080\"\nmax_header_size = \"1KiB\"",
        );
        assert_eq!(
            err_of(&src),
            "sluice.toml:4:19: listeners.public.max_header_size: must be between 8KiB and 1MiB"
        );
    }

    #[test]
    fn workers_default_to_the_cores_and_are_bounded() {
        let c = Config::parse("sluice.toml", BASE).unwrap();
        assert_eq!(
            c.workers,
            std::thread::available_parallelism().map_or(1, usize::from)
        );
        let c = Config::parse("sluice.toml", &format!("[runtime]\nworkers = 3\n{BASE}")).unwrap();
        assert_eq!(c.workers, 3);
        assert_eq!(
            err_of(&format!("[runtime]\nworkers = 0\n{BASE}")),
            "sluice.toml:2:11: runtime.workers: must be between 1 and 1024"
        );
    }

    #[test]
    fn reused_decisions_default_can_be_turned_off_and_are_bounded() {
        let with = |line: &str| format!("{BASE}\n[plugins.p]\npath = \"p.wasm\"\n{line}\n");
        let limits = |src: &str| Config::parse("sluice.toml", src).unwrap().plugins[0].limits;
        assert_eq!(limits(&with("")).max_reused, 1024);
        assert_eq!(limits(&with("max_reused = 0")).max_reused, 0);
        assert_eq!(
            err_of(&with("max_reused = 70000")),
            "sluice.toml:14:14: plugins.p.max_reused: must be at most 65536 (0 turns reuse off)"
        );
    }

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(parse_size("16KiB").unwrap(), 16384);
        assert_eq!(parse_size("2MB").unwrap(), 2_000_000);
        assert!(parse_size("lots").is_err());
    }
}
