//! From the raw form to the typed [`Config`]: defaults filled in, ranges and
//! cross-references checked, each error located at the value it is about.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::limits;
use super::locate::Locator;
use super::raw::{
    RawAdmin, RawCapture, RawConfig, RawHealth, RawHttp2, RawPlugin, RawRoute, RawUpstream,
};
use super::units::{Dur, Size};
use super::{
    AdminConfig, Balance, CaptureConfig, Config, ConfigError, HashKey, HealthCheck, HealthConfig,
    HostMatch, Http2Config, ListenerConfig, LogConfig, PluginConfig, PluginLimits, ReloadConfig,
    RouteAction, RouteConfig, ServerConfig, UpstreamConfig,
};

/// Most worker threads a config may ask for.
pub(super) const MAX_WORKERS: u64 = 1024;

/// Most connections one listener may serve at once: far past any file-descriptor limit,
/// and far below the 2^61 permits past which tokio's semaphore panics.
const MAX_CONNECTIONS: u64 = 10_000_000;

impl RawConfig {
    pub(super) fn validate(
        self,
        base_dir: &Path,
        err: &Locator<'_>,
    ) -> Result<Config, ConfigError> {
        let mut listeners = Vec::new();
        for (name, l) in self.listeners {
            let span = l.span();
            let l = l.into_inner();
            check_name(&name, span.clone(), err)?;
            let bind = l.bind.get_ref().parse::<SocketAddr>().map_err(|_| {
                err.at(
                    l.bind.span(),
                    format!(
                        "expected an IP address and port such as \"127.0.0.1:8080\", got {:?}",
                        l.bind.get_ref()
                    ),
                )
            })?;
            // Port 0 asks the OS for any free port, so it never collides.
            if bind.port() != 0 && listeners.iter().any(|x: &ListenerConfig| x.bind == bind) {
                return Err(err.at(
                    l.bind.span(),
                    format!("{bind} is already bound by another listener"),
                ));
            }
            let max_connections = match l.max_connections {
                Some(m) if !(1..=MAX_CONNECTIONS).contains(m.get_ref()) => {
                    return Err(
                        err.at(m.span(), format!("must be between 1 and {MAX_CONNECTIONS}"))
                    );
                }
                Some(m) => *m.get_ref() as usize,
                None => 10_000,
            };
            let max_header_size = match l.max_header_size {
                // hyper's HTTP/1 parser needs at least 8 KiB of buffer.
                Some(s) if s.get_ref().0 < 8192 || s.get_ref().0 > 1 << 20 => {
                    return Err(err.at(s.span(), "must be between 8KiB and 1MiB".to_string()));
                }
                Some(s) => s.into_inner().0 as usize,
                None => 16 * 1024,
            };
            let tls = match l.tls {
                Some(t) => Some(t.into_inner().validate(base_dir, err)?),
                None => None,
            };
            let http2 = match l.http2 {
                Some(h) => h.into_inner().validate(tls.is_some(), err)?,
                // Offered by ALPN on a TLS listener; never guessed at on a plain one.
                None => tls.is_some().then_some(Http2Config::DEFAULT),
            };
            let proxy_protocol = limits::ranges(l.proxy_protocol, err)?;
            let trusted_proxies = limits::ranges(l.trusted_proxies, err)?;
            let per_ip = limits::limits(l.per_ip, err)?;
            listeners.push(ListenerConfig {
                name,
                bind,
                max_connections,
                header_read_timeout: nonzero(l.header_read_timeout, Duration::from_secs(10), err)?,
                max_header_size,
                tls,
                http2,
                proxy_protocol,
                trusted_proxies,
                per_ip,
            });
        }
        if listeners.is_empty() {
            return Err(err.top_level("at least one [listeners.NAME] table is required".into()));
        }

        let mut upstreams = Vec::new();
        for (name, u) in self.upstreams {
            let span = u.span();
            let u = u.into_inner();
            check_name(&name, span.clone(), err)?;
            upstreams.push(u.validate(name, span, base_dir, err)?);
        }

        let mut plugins = Vec::new();
        for (name, p) in self.plugins {
            check_name(&name, p.span(), err)?;
            plugins.push(p.into_inner().validate(name, base_dir, err)?);
        }

        let mut tenants = Vec::new();
        for (name, t) in self.tenants {
            check_name(&name, t.span(), err)?;
            tenants.push(limits::tenant(name, t.into_inner(), err)?);
        }

        let mut routes = Vec::new();
        for r in self.routes {
            let span = r.span();
            let known = Known {
                listeners: &listeners,
                upstreams: &upstreams,
                plugins: &plugins,
            };
            let file_span = (r.get_ref().capture.as_ref()).map(|c| c.get_ref().file.span());
            let mut route = r.into_inner().validate(span, base_dir, &known, err)?;
            // One writer per file: two routes appending to one file would interleave
            // their bounds and redactions.
            if let (Some(c), Some(file_span)) = (&route.capture, file_span)
                && let Some(other) = routes.iter().find(|o: &&RouteConfig| {
                    o.capture
                        .as_ref()
                        .is_some_and(|oc| same_path(&oc.file, &c.file))
                })
            {
                return Err(err.at(
                    file_span,
                    format!(
                        "{} is already the capture file of route `{}`; each route needs its own",
                        c.file.display(),
                        other.name
                    ),
                ));
            }
            if route.tenant.is_none() {
                // A route on a tenant's host belongs to that tenant.
                route.tenant = tenants
                    .iter()
                    .find(|t| route.host.as_ref().is_some_and(|h| t.hosts.contains(h)))
                    .map(|t| t.name.clone());
            }
            routes.push(route);
        }
        if routes.is_empty() {
            return Err(err.top_level("at least one [[routes]] entry is required".into()));
        }

        if let Err(e) = tracing_subscriber::EnvFilter::try_new(self.log.level.get_ref()) {
            return Err(err.at(
                self.log.level.span(),
                format!("expected a log filter such as \"info\" or \"sluice=debug,warn\": {e}"),
            ));
        }
        let workers = match self.runtime.workers {
            Some(w) if !(1..=MAX_WORKERS).contains(w.get_ref()) => {
                return Err(err.at(w.span(), format!("must be between 1 and {MAX_WORKERS}")));
            }
            Some(w) => *w.get_ref() as usize,
            // One per core, within the bound an explicit value has.
            None => std::thread::available_parallelism()
                .map_or(1, usize::from)
                .min(MAX_WORKERS as usize),
        };
        let admin = match self.admin {
            Some(a) => Some(a.into_inner().validate(base_dir, err)?),
            None => None,
        };
        let reload = ReloadConfig {
            watch: self.reload.watch.unwrap_or(true),
            debounce: nonzero(self.reload.debounce, Duration::from_millis(250), err)?,
        };
        Ok(Config {
            workers,
            log: LogConfig {
                level: self.log.level.into_inner(),
                format: self.log.format,
                access_file: self.log.access_file.map(|f| base_dir.join(f.into_inner())),
            },
            admin,
            reload,
            shutdown_grace: self
                .shutdown
                .grace
                .map(|d| d.value)
                .unwrap_or(Duration::from_secs(30)),
            listeners,
            upstreams,
            routes,
            plugins,
            tenants,
            max_clients: limits::max_clients(self.limits.max_clients, err)?,
            cluster: match self.cluster {
                Some(c) => Some(limits::cluster(c.into_inner(), err)?),
                None => None,
            },
        })
    }
}

/// Largest admin token file read.
const MAX_TOKEN_FILE: u64 = 4096;

/// Shortest admin token accepted: a guessable token guards nothing.
const MIN_TOKEN_LEN: usize = 16;

impl RawAdmin {
    fn validate(self, base_dir: &Path, err: &Locator<'_>) -> Result<AdminConfig, ConfigError> {
        let bind = self.bind.get_ref().parse::<SocketAddr>().map_err(|_| {
            err.at(
                self.bind.span(),
                format!(
                    "expected an IP address and port such as \"127.0.0.1:9901\", got {:?}",
                    self.bind.get_ref()
                ),
            )
        })?;
        let token = match &self.token_file {
            None => None,
            Some(f) => {
                let path = base_dir.join(f.get_ref());
                let at = |m: String| err.at(f.span(), format!("{}: {m}", path.display()));
                Some(read_token(&path).map_err(at)?)
            }
        };
        let tls = match self.tls {
            Some(t) => Some(t.into_inner().validate(base_dir, err)?),
            None => None,
        };
        if token.is_none() && !bind.ip().is_loopback() {
            return Err(err.at(
                self.bind.span(),
                format!(
                    "{bind} is not a loopback address: an admin listener reachable from \
                     other hosts needs `token_file`"
                ),
            ));
        }
        Ok(AdminConfig { bind, token, tls })
    }
}

/// The admin token: a small regular file's first line, at least [`MIN_TOKEN_LEN`]
/// visible ASCII characters.
fn read_token(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() || meta.len() > MAX_TOKEN_FILE {
        return Err(format!(
            "expected a regular file of at most {MAX_TOKEN_FILE} bytes holding the token"
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "the token must be at least {MIN_TOKEN_LEN} visible ASCII characters on the \
             first line"
        ));
    }
    Ok(token.to_owned())
}

impl RawUpstream {
    fn validate(
        self,
        name: String,
        span: std::ops::Range<usize>,
        base_dir: &Path,
        err: &Locator<'_>,
    ) -> Result<UpstreamConfig, ConfigError> {
        let pool_tls = match self.tls {
            Some(t) => Some(t.into_inner().validate(base_dir, err)?),
            None => None,
        };
        if self.servers.get_ref().is_empty() {
            return Err(err.at(
                self.servers.span(),
                "at least one server is required".into(),
            ));
        }
        let mut servers: Vec<ServerConfig> = Vec::new();
        for s in self.servers.into_inner() {
            let (scheme_tls, authority) = server_authority(s.get_ref()).ok_or_else(|| {
                err.at(
                    s.span(),
                    format!(
                        "expected \"host:port\" (or ws://, wss://, http://, https:// and \
                         host[:port]), got {:?}",
                        s.get_ref()
                    ),
                )
            })?;
            let addr = authority
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| {
                    err.at(
                        s.span(),
                        format!("expected \"host:port\" that resolves, got {authority:?}"),
                    )
                })?;
            if servers.iter().any(|x| x.addr == addr) {
                return Err(err.at(s.span(), format!("server {authority} is listed twice")));
            }
            let tls = scheme_tls.unwrap_or(pool_tls.is_some());
            servers.push(ServerConfig {
                authority,
                addr,
                tls,
            });
        }
        let tls = servers
            .iter()
            .any(|s| s.tls)
            .then(|| pool_tls.unwrap_or_default());
        let balance = match self.balance.as_ref().map(|b| b.get_ref().as_str()) {
            None | Some("least-conn") => Balance::LeastConn,
            Some("round-robin") => Balance::RoundRobin,
            Some("hash") => Balance::Hash(match &self.hash_key {
                None => HashKey::ClientIp,
                Some(k) => parse_hash_key(k.get_ref())
                    .ok_or_else(|| err.at(k.span(), format!("expected \"client-ip\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\", got {:?}", k.get_ref())))?,
            }),
            Some(other) => {
                return Err(err.at(
                    self.balance.as_ref().map(|b| b.span()).unwrap_or(span),
                    format!(
                        "expected \"round-robin\", \"least-conn\" or \"hash\", got {other:?}"
                    ),
                ));
            }
        };
        if let (Some(k), false) = (&self.hash_key, matches!(balance, Balance::Hash(_))) {
            return Err(err.at(k.span(), "hash_key needs balance = \"hash\"".into()));
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
            tls,
        })
    }
}

/// A server as written: `host:port`, or with a scheme that says whether it speaks TLS
/// (`wss://`, `https://`) or not (`ws://`, `http://`) and gives the default port. Returns
/// the scheme's word on TLS (`None` without one) and the `host:port` authority.
fn server_authority(s: &str) -> Option<(Option<bool>, String)> {
    let (tls, rest, port) = match s.split_once("://") {
        None => (None, s, None),
        Some(("wss" | "https", rest)) => (Some(true), rest, Some(443)),
        Some(("ws" | "http", rest)) => (Some(false), rest, Some(80)),
        Some(_) => return None,
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let authority: http::uri::Authority = rest.parse().ok()?;
    if authority.as_str().contains('@') {
        return None;
    }
    match (authority.port_u16(), port) {
        (Some(_), _) => Some((tls, authority.to_string())),
        (None, Some(port)) => Some((tls, format!("{}:{port}", authority.host()))),
        // Without a scheme, the port is required (`to_socket_addrs` says so).
        (None, None) => Some((tls, authority.to_string())),
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
    fn validate(self, err: &Locator<'_>) -> Result<HealthConfig, ConfigError> {
        let check = match self.check.get_ref().as_str() {
            "tcp" => {
                if let Some(p) = &self.path {
                    return Err(err.at(p.span(), "path needs check = \"http\"".into()));
                }
                HealthCheck::Tcp
            }
            "http" => {
                let path = self
                    .path
                    .map(|p| p.into_inner())
                    .unwrap_or_else(|| "/".into());
                if !path.starts_with('/') {
                    return Err(err.at(
                        self.check.span(),
                        format!("path must start with '/', got {path:?}"),
                    ));
                }
                let expect_status = match self.expect_status {
                    Some(s) if !(100..=599).contains(s.get_ref()) => {
                        return Err(err.at(s.span(), "expected an HTTP status code 100-599".into()));
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
                return Err(err.at(
                    self.check.span(),
                    format!("expected \"tcp\" or \"http\", got {other:?}"),
                ));
            }
        };
        let count = |v: Option<Spanned<u32>>, default: u32| match v {
            Some(c) if *c.get_ref() == 0 => Err(err.at(c.span(), "must be at least 1".into())),
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
        base_dir: &Path,
        known: &Known<'_>,
        err: &Locator<'_>,
    ) -> Result<RouteConfig, ConfigError> {
        let listener_names: Vec<&str> = known.listeners.iter().map(|l| l.name.as_str()).collect();
        let pool_names: Vec<&str> = known.upstreams.iter().map(|u| u.name.as_str()).collect();
        let plugin_names: Vec<&str> = known.plugins.iter().map(|p| p.name.as_str()).collect();
        let route_plugins = known_names(self.plugins, &plugin_names, "plugin", err)?;
        let route_pools = known_names(self.pools, &pool_names, "upstream", err)?;
        let route_listeners = match self.listeners {
            None => None,
            Some(ls) => Some(known_names(Some(ls), &listener_names, "listener", err)?),
        };
        let host = match &self.host {
            None => None,
            Some(h) => Some(parse_host(h, err)?),
        };
        let path_prefix = match &self.path_prefix {
            None => "/".to_string(),
            Some(p) if !p.get_ref().starts_with('/') => {
                return Err(err.at(
                    p.span(),
                    format!("must start with '/', got {:?}", p.get_ref()),
                ));
            }
            Some(p) => p.get_ref().clone(),
        };
        let action = match (self.upstream, self.status) {
            (Some(u), None) => RouteAction::Proxy(known_name(u, &pool_names, "upstream", err)?),
            (None, Some(s)) => {
                if !(200..=599).contains(s.get_ref()) {
                    return Err(err.at(s.span(), "expected an HTTP status code 200-599".into()));
                }
                RouteAction::Respond {
                    status: s.into_inner(),
                    body: self.body.unwrap_or_default(),
                }
            }
            (Some(u), Some(_)) => {
                return Err(err.at(
                    u.span(),
                    "a route has either `upstream` or `status`, not both".into(),
                ));
            }
            (None, None) => {
                return Err(err.at(
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
        let capture = match self.capture {
            None => None,
            Some(c) if matches!(action, RouteAction::Respond { .. }) => {
                return Err(err.at(
                    c.span(),
                    "capture needs a route with `upstream`: a fixed answer runs no plugins".into(),
                ));
            }
            Some(c) => Some(c.into_inner().validate(base_dir, err)?),
        };
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
            normalize_path: self.normalize_path.unwrap_or(false),
            idle_timeout,
            handshake_timeout: nonzero(self.handshake_timeout, Duration::from_secs(10), err)?,
            request_timeout: nonzero(self.request_timeout, Duration::from_secs(60), err)?,
            plugins: route_plugins,
            pools: route_pools,
            tenant: self.tenant,
            capture,
        })
    }
}

/// Whether two paths as written name the same file (`./a` and `a` do), short of
/// following links.
fn same_path(a: &Path, b: &Path) -> bool {
    let parts = |p: &Path| {
        let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        p.components()
            .filter(|c| *c != std::path::Component::CurDir)
            .map(|c| c.as_os_str().to_owned())
            .collect::<Vec<_>>()
    };
    parts(a) == parts(b)
}

/// Smallest `max_size` of a capture file: room for a few lines.
const MIN_CAPTURE_SIZE: u64 = 4 << 10;

impl RawCapture {
    fn validate(self, base_dir: &Path, err: &Locator<'_>) -> Result<CaptureConfig, ConfigError> {
        if self.file.get_ref().is_empty() {
            return Err(err.at(self.file.span(), "expected a file path".into()));
        }
        let redact = match self.redact {
            None => CaptureConfig::DEFAULT_REDACT.map(String::from).to_vec(),
            Some(names) => {
                let mut out: Vec<String> = Vec::new();
                for n in names {
                    if http::HeaderName::from_bytes(n.get_ref().as_bytes()).is_err() {
                        return Err(err.at(
                            n.span(),
                            format!("expected a header name, got {:?}", n.get_ref()),
                        ));
                    }
                    let name = n.get_ref().to_ascii_lowercase();
                    if !out.contains(&name) {
                        out.push(name);
                    }
                }
                out
            }
        };
        let max_size = match self.max_size {
            Some(s) if s.get_ref().0 < MIN_CAPTURE_SIZE => {
                return Err(err.at(s.span(), "must be at least 4KiB".into()));
            }
            Some(s) => s.into_inner().0,
            None => CaptureConfig::DEFAULT_MAX_SIZE,
        };
        Ok(CaptureConfig {
            file: base_dir.join(self.file.get_ref()),
            redact,
            max_size,
        })
    }
}

/// A host as routes and tenants write it: `example.com`, or `*.example.com` for its
/// subdomains.
pub(super) fn parse_host(h: &Spanned<String>, err: &Locator<'_>) -> Result<HostMatch, ConfigError> {
    let v = h.get_ref().to_ascii_lowercase();
    if v.is_empty() || v.contains(['/', ':', ' ']) {
        return Err(err.at(
            h.span(),
            format!(
                "expected a host name such as \"example.com\" or \"*.example.com\", got {:?}",
                h.get_ref()
            ),
        ));
    }
    Ok(match v.strip_prefix("*.") {
        Some(rest) => HostMatch::Suffix(format!(".{rest}")),
        None => HostMatch::Exact(v),
    })
}

/// What routes may refer to.
struct Known<'a> {
    listeners: &'a [ListenerConfig],
    upstreams: &'a [UpstreamConfig],
    plugins: &'a [PluginConfig],
}

/// Checks that each name is one of `known` (`what` names the kind in the error).
fn known_names(
    list: Option<Vec<Spanned<String>>>,
    known: &[&str],
    what: &str,
    err: &Locator<'_>,
) -> Result<Vec<String>, ConfigError> {
    (list.unwrap_or_default().into_iter())
        .map(|n| known_name(n, known, what, err))
        .collect()
}

/// Checks that a name is one of `known` (`what` names the kind in the error).
fn known_name(
    name: Spanned<String>,
    known: &[&str],
    what: &str,
    err: &Locator<'_>,
) -> Result<String, ConfigError> {
    if !known.contains(&name.get_ref().as_str()) {
        return Err(err.at(
            name.span(),
            format!(
                "unknown {what} `{}` (defined: {})",
                name.get_ref(),
                known.join(", ")
            ),
        ));
    }
    Ok(name.into_inner())
}

/// Most URLs one plugin may be granted.
const MAX_GRANTS: usize = 16;

/// `grants.http`: absolute `http`/`https` URLs with a host and no user info, each once.
fn granted_urls(urls: Vec<Spanned<String>>, err: &Locator<'_>) -> Result<Vec<String>, ConfigError> {
    if urls.len() > MAX_GRANTS {
        let span = urls[MAX_GRANTS].span();
        return Err(err.at(span, format!("at most {MAX_GRANTS} URLs may be granted")));
    }
    let mut granted: Vec<String> = Vec::with_capacity(urls.len());
    for url in urls {
        let fail = |m: &str| err.at(url.span(), format!("{:?}: {m}", url.get_ref()));
        let uri: http::Uri = url
            .get_ref()
            .parse()
            .map_err(|e| fail(&format!("not a URL: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(fail("must be an http:// or https:// URL"));
        }
        match uri.authority() {
            None => return Err(fail("must name a host")),
            Some(a) if a.as_str().contains('@') => {
                return Err(fail("must not carry user info"));
            }
            Some(a) if a.host().is_empty() => return Err(fail("must name a host")),
            Some(_) => {}
        }
        if granted.contains(url.get_ref()) {
            return Err(fail("is granted twice"));
        }
        granted.push(url.into_inner());
    }
    Ok(granted)
}

/// Most decisions one plugin may keep for reuse (each holds its key, at most 4 KiB).
const MAX_REUSED: u32 = 65_536;

impl RawPlugin {
    fn validate(
        self,
        name: String,
        base_dir: &Path,
        err: &Locator<'_>,
    ) -> Result<PluginConfig, ConfigError> {
        let defaults = PluginLimits::default();
        let memory_bytes = match self.memory {
            Some(m) if m.get_ref().0 < 1 << 16 || m.get_ref().0 > 1 << 30 => {
                return Err(err.at(m.span(), "must be between 64KiB and 1GiB".into()));
            }
            Some(m) => m.into_inner().0 as usize,
            None => defaults.memory_bytes,
        };
        let max_instances = match self.max_instances {
            Some(n) if *n.get_ref() == 0 || *n.get_ref() > 256 => {
                return Err(err.at(n.span(), "must be between 1 and 256".into()));
            }
            Some(n) => n.into_inner() as usize,
            None => defaults.max_instances,
        };
        let max_reused = match self.max_reused {
            Some(n) if *n.get_ref() > MAX_REUSED => {
                return Err(err.at(
                    n.span(),
                    format!("must be at most {MAX_REUSED} (0 turns reuse off)"),
                ));
            }
            Some(n) => n.into_inner() as usize,
            None => defaults.max_reused,
        };
        let (config, config_at) = match self.config {
            Some(c) => (c.get_ref().clone(), err.place(c.span())),
            None => (toml::Table::new(), err.place(self.path.span())),
        };
        let config_json = serde_json::to_string(&config).map_err(|e| {
            err.at(
                self.path.span(),
                format!("config table is not JSON-compatible: {e}"),
            )
        })?;
        let grants = match self.grants {
            Some(g) => granted_urls(g.http, err)?,
            None => Vec::new(),
        };
        Ok(PluginConfig {
            name,
            wasm: base_dir.join(self.path.get_ref()),
            grants,
            config_json,
            config_at,
            limits: PluginLimits {
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
    err: &Locator<'_>,
) -> Result<(), ConfigError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(err.at(
            span,
            format!("names use letters, digits, '-' and '_', got {name:?}"),
        ));
    }
    Ok(())
}

impl RawHttp2 {
    /// The settings, or `None` when `enabled = false`. `enabled` defaults to whether the
    /// listener has TLS: on a plain listener HTTP/2 is cleartext by prior knowledge, which
    /// an operator asks for.
    fn validate(self, tls: bool, err: &Locator<'_>) -> Result<Option<Http2Config>, ConfigError> {
        let enabled = self.enabled.unwrap_or(tls);
        let d = Http2Config::DEFAULT;
        let within = |v: Option<Spanned<u32>>, default: u32, lo: u32, hi: u32| match v {
            Some(v) if !(lo..=hi).contains(v.get_ref()) => {
                Err(err.at(v.span(), format!("must be between {lo} and {hi}")))
            }
            Some(v) => Ok(v.into_inner()),
            None => Ok(default),
        };
        // RFC 9113 §6.9.1: windows are at most 2^31-1; below 16 KiB a stream moves a
        // frame at a time.
        let window = |v: Option<Spanned<Size>>, default: u32| match v {
            Some(v) if !(16 * 1024..=1 << 30).contains(&v.get_ref().0) => {
                Err(err.at(v.span(), "must be between 16KiB and 1GiB".to_string()))
            }
            Some(v) => Ok(v.into_inner().0 as u32),
            None => Ok(default),
        };
        let max_concurrent_streams = within(
            self.max_concurrent_streams,
            d.max_concurrent_streams,
            1,
            10_000,
        )?;
        let stream_window = window(self.stream_window, d.stream_window)?;
        // By default room for every stream's window, so that streams whose upstreams are
        // slow never stall the others.
        let room = (u64::from(max_concurrent_streams) * u64::from(stream_window)).min(1 << 30);
        let connection_window = match self.connection_window {
            Some(w) if w.get_ref().0 < u64::from(stream_window) => {
                return Err(err.at(
                    w.span(),
                    format!("must be at least stream_window ({stream_window} bytes)"),
                ));
            }
            w => window(w, room as u32)?,
        };
        // Checked even when off, so a bad value is found before it is turned on.
        let config = Http2Config {
            max_concurrent_streams,
            max_pending_resets: within(
                self.max_pending_resets,
                d.max_pending_resets as u32,
                1,
                10_000,
            )? as usize,
            max_reset_rate: within(self.max_reset_rate, d.max_reset_rate, 1, 100_000)?,
            stream_window,
            connection_window,
            max_send_buffer: window(self.max_send_buffer, d.max_send_buffer as u32)? as usize,
        };
        Ok(enabled.then_some(config))
    }
}

pub(super) fn nonzero(
    d: Option<Dur>,
    default: Duration,
    err: &Locator<'_>,
) -> Result<Duration, ConfigError> {
    match d {
        None => Ok(default),
        Some(d) if d.value.is_zero() => Err(err.at(d.span, "must be greater than zero".into())),
        Some(d) => Ok(d.value),
    }
}
