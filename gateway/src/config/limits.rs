//! Tenants, their limits, the listeners' per-IP defaults and the `[cluster]` that shares
//! limits across gateways: the typed forms and their validation.

use std::time::Duration;

use toml::Spanned;

use super::locate::Locator;
use super::raw::{RawCluster, RawLimits, RawRate, RawTenant};
use super::validate::{nonzero, parse_host};
use super::{ConfigError, HostMatch};

/// Most requests per second a rate may allow.
const MAX_RATE: f64 = 1e6;
/// Most tunnels a limit may allow.
const MAX_TUNNELS: u64 = 10_000_000;
/// Most client addresses a gateway tracks at once when `[limits]` says nothing.
pub const DEFAULT_MAX_CLIENTS: usize = 100_000;
/// Most client addresses `max_clients` may ask for.
const MAX_MAX_CLIENTS: u64 = 10_000_000;

/// What a set of requests may use: a tenant's whole traffic, or one client address's
/// (within a tenant, or on a listener). Every field is off when absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// WebSocket tunnels open at once.
    pub tunnels: Option<u32>,
    /// WebSocket handshakes (upgrades) admitted.
    pub handshakes: Option<Rate>,
    /// Plain HTTP requests admitted.
    pub requests: Option<Rate>,
    /// Bytes per second each tunnel may move in each direction (shaped: the gateway
    /// reads more slowly).
    pub bandwidth: Option<u64>,
}

impl Limits {
    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }
}

/// A token bucket: `per_second` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Tokens the bucket holds when full.
    pub burst: u32,
}

/// A tenant (`[tenants.NAME]`).
#[derive(Debug, Clone, PartialEq)]
pub struct TenantConfig {
    /// The tenant's name, as routes and plugins give it.
    pub name: String,
    /// Hosts whose routes belong to this tenant unless a route names another.
    pub hosts: Vec<HostMatch>,
    /// The tenant's traffic as a whole (`[tenants.NAME.limits]`).
    pub limits: Limits,
    /// Each client address within the tenant (`[tenants.NAME.per_ip]`), instead of the
    /// listener's `per_ip`.
    pub per_ip: Option<Limits>,
}

/// What a gateway does when the shared store does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Serve on this gateway's own limits alone.
    Open,
    /// Refuse what a shared limit governs (`503`).
    Closed,
}

/// Limits shared by a fleet of gateways (`[cluster]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The Redis server, as a `redis://` URL (plain TCP: keep it on a private network).
    pub redis: String,
    /// What happens while Redis is unreachable or slow.
    pub on_failure: OnFailure,
    /// How long a gateway's claim on tunnel slots lives unless renewed; a gateway that
    /// dies gives its slots back after this.
    pub lease: Duration,
    /// How long a request waits for Redis before `on_failure` decides.
    pub timeout: Duration,
}

pub(super) fn tenant(
    name: String,
    raw: RawTenant,
    err: &Locator<'_>,
) -> Result<TenantConfig, ConfigError> {
    let mut hosts = Vec::new();
    for h in raw.hosts.unwrap_or_default() {
        hosts.push(parse_host(&h, err)?);
    }
    Ok(TenantConfig {
        name,
        hosts,
        limits: limits(raw.limits, err)?,
        per_ip: match raw.per_ip {
            Some(l) => Some(limits(Some(l), err)?),
            None => None,
        },
    })
}

pub(super) fn limits(raw: Option<RawLimits>, err: &Locator<'_>) -> Result<Limits, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Limits::default());
    };
    let tunnels = match raw.tunnels {
        Some(t) if !(1..=MAX_TUNNELS).contains(t.get_ref()) => {
            return Err(err.at(t.span(), format!("must be between 1 and {MAX_TUNNELS}")));
        }
        Some(t) => Some(t.into_inner() as u32),
        None => None,
    };
    let bandwidth = match raw.bandwidth {
        // Below one frame header a second, no tunnel could make progress.
        Some(b) if b.get_ref().0 < 1024 => {
            return Err(err.at(b.span(), "must be at least 1KiB (per second)".into()));
        }
        Some(b) => Some(b.into_inner().0),
        None => None,
    };
    Ok(Limits {
        tunnels,
        handshakes: rate(raw.handshakes, err)?,
        requests: rate(raw.requests, err)?,
        bandwidth,
    })
}

fn rate(raw: Option<Spanned<RawRate>>, err: &Locator<'_>) -> Result<Option<Rate>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let RawRate { rate, burst } = raw.into_inner();
    let per_second = *rate.get_ref();
    if !(per_second > 0.0 && per_second <= MAX_RATE) {
        return Err(err.at(
            rate.span(),
            format!("must be above 0 and at most {MAX_RATE} per second"),
        ));
    }
    let burst = match burst {
        Some(b) if !(1..=u64::from(u32::MAX)).contains(b.get_ref()) => {
            return Err(err.at(b.span(), "must be at least 1".into()));
        }
        Some(b) => b.into_inner() as u32,
        // One second's worth, and at least one request.
        None => per_second.ceil().max(1.0) as u32,
    };
    Ok(Some(Rate { per_second, burst }))
}

pub(super) fn max_clients(
    raw: Option<Spanned<u64>>,
    err: &Locator<'_>,
) -> Result<usize, ConfigError> {
    match raw {
        Some(m) if !(1..=MAX_MAX_CLIENTS).contains(m.get_ref()) => {
            Err(err.at(m.span(), format!("must be between 1 and {MAX_MAX_CLIENTS}")))
        }
        Some(m) => Ok(m.into_inner() as usize),
        None => Ok(DEFAULT_MAX_CLIENTS),
    }
}

pub(super) fn cluster(raw: RawCluster, err: &Locator<'_>) -> Result<ClusterConfig, ConfigError> {
    let url = raw.redis.get_ref();
    // `rediss://` (TLS) would need the redis crate's TLS support, which is not built in.
    let parsed = redis::IntoConnectionInfo::into_connection_info(url.as_str());
    if !url.starts_with("redis://") || parsed.is_err() {
        return Err(err.at(
            raw.redis.span(),
            format!("expected a URL such as \"redis://127.0.0.1:6379\", got {url:?}"),
        ));
    }
    let on_failure = match raw.on_failure.as_ref().map(|f| f.get_ref().as_str()) {
        None | Some("open") => OnFailure::Open,
        Some("closed") => OnFailure::Closed,
        Some(other) => {
            let span = raw
                .on_failure
                .as_ref()
                .map(|f| f.span())
                .unwrap_or_default();
            return Err(err.at(
                span,
                format!("expected \"open\" or \"closed\", got {other:?}"),
            ));
        }
    };
    Ok(ClusterConfig {
        redis: url.clone(),
        on_failure,
        lease: nonzero(raw.lease, Duration::from_secs(10), err)?,
        timeout: nonzero(raw.timeout, Duration::from_millis(100), err)?,
    })
}

/// Parses a list of addresses or CIDR ranges (`proxy_protocol`, `trusted_proxies`).
pub(super) fn ranges(
    raw: Option<Vec<Spanned<String>>>,
    err: &Locator<'_>,
) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    let mut out = Vec::new();
    for range in raw.unwrap_or_default() {
        let text = range.get_ref();
        let net = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                err.at(
                    range.span(),
                    format!("expected an IP address or range such as \"10.0.0.0/8\", got {text:?}"),
                )
            })?;
        out.push(net);
    }
    Ok(out)
}
