//! `/metrics`: the gateway's counters in the Prometheus text format, encoded by
//! `prometheus-client` at scrape time from the atomics the stages keep (`metrics`, the
//! listeners, the servers, the plugins). A scrape reads; it never locks the request path.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::balance::Server;
use crate::limit::{Limit, Scope};
use crate::listener::Listener;
use crate::metrics::{CLOSE_REASONS, Histogram, RouteStats};
use crate::plugin::PluginStats;
use crate::snapshot;
use crate::state::Gateway;

/// The registry `/metrics` encodes: one collector over the whole gateway.
pub struct Exposition {
    registry: Registry,
}

impl Exposition {
    pub fn new(gw: Arc<Gateway>) -> Exposition {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(GatewayCollector(gw)));
        Exposition { registry }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

struct GatewayCollector(Arc<Gateway>);

impl std::fmt::Debug for GatewayCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayCollector")
    }
}

/// One metric family: a descriptor, then its samples.
struct Family<'e>(prometheus_client::encoding::MetricEncoder<'e>);

fn family<'e>(
    enc: &'e mut DescriptorEncoder<'_>,
    name: &'e str,
    help: &str,
    ty: MetricType,
) -> Result<Family<'e>, fmt::Error> {
    Ok(Family(enc.encode_descriptor(name, help, None, ty)?))
}

impl Family<'_> {
    fn counter(&mut self, labels: &impl EncodeLabelSet, v: u64) -> Result<(), fmt::Error> {
        ConstCounter::new(v).encode(self.0.encode_family(labels)?)
    }

    fn gauge(&mut self, labels: &impl EncodeLabelSet, v: i64) -> Result<(), fmt::Error> {
        ConstGauge::new(v).encode(self.0.encode_family(labels)?)
    }

    fn histogram(&mut self, labels: &impl EncodeLabelSet, h: &Histogram) -> Result<(), fmt::Error> {
        let (sum, count, buckets) = h.snapshot();
        self.0
            .encode_family(labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    /// The family's one unlabelled gauge.
    fn only(self, v: i64) -> Result<(), fmt::Error> {
        ConstGauge::new(v).encode(self.0)
    }
}

/// How a family reads its value from one item (a listener, a server, a plugin).
enum Read<T> {
    Counter(fn(&T) -> u64),
    Gauge(fn(&T) -> i64),
}

/// A family per `(name, help, read)` row, each with one sample per labelled item.
fn families<T, L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder<'_>,
    items: &[(L, T)],
    rows: &[(&str, &str, Read<T>)],
) -> Result<(), fmt::Error> {
    for (name, help, read) in rows {
        let ty = match read {
            Read::Counter(_) => MetricType::Counter,
            Read::Gauge(_) => MetricType::Gauge,
        };
        let mut f = family(enc, name, help, ty)?;
        for (labels, item) in items {
            match read {
                Read::Counter(get) => f.counter(labels, get(item))?,
                Read::Gauge(get) => f.gauge(labels, get(item))?,
            }
        }
    }
    Ok(())
}

/// A count as a gauge value.
fn int(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

type Labels<'a, const N: usize> = [(&'static str, &'a str); N];

/// The traffic families (`{prefix}tunnels_open`, `handshakes`, `requests`, `bytes`,
/// `tunnel_closes`, `tunnel_duration_seconds`), one sample set per `(name, stats)`
/// labelled `label=name`: routes and tenants count the same things.
fn traffic(
    enc: &mut DescriptorEncoder<'_>,
    prefix: &str,
    label: &'static str,
    items: &[(&str, &RouteStats)],
) -> Result<(), fmt::Error> {
    let name = |n: &str| format!("{prefix}{n}");
    let n = name("tunnels_open");
    let help = format!("WebSocket tunnels open, by {label}.");
    let mut f = family(enc, &n, &help, MetricType::Gauge)?;
    for (item, r) in items {
        f.gauge(&[(label, *item)], r.tunnels_open.load(Ordering::Relaxed))?;
    }
    let n = name("handshakes");
    let help = format!(
        "WebSocket handshakes answered, by {label}, outcome (tunnel, refused: 4xx, failed: 5xx) and the status the client got."
    );
    let mut f = family(enc, &n, &help, MetricType::Counter)?;
    for (item, r) in items {
        for (status, count) in r.handshakes.nonzero() {
            let outcome = match status {
                101 => "tunnel",
                500.. => "failed",
                _ => "refused",
            };
            let code = status.to_string();
            let l: Labels<3> = [(label, item), ("outcome", outcome), ("status", &code)];
            f.counter(&l, count)?;
        }
    }
    let n = name("requests");
    let help = format!("Plain HTTP requests answered, by {label} and status.");
    let mut f = family(enc, &n, &help, MetricType::Counter)?;
    for (item, r) in items {
        for (status, count) in r.requests.nonzero() {
            let code = status.to_string();
            f.counter(&[(label, *item), ("status", &code)], count)?;
        }
    }
    let n = name("bytes");
    let help = format!("Bytes relayed (bodies and tunnel traffic), by {label} and direction.");
    let mut f = family(enc, &n, &help, MetricType::Counter)?;
    for (item, r) in items {
        f.counter(
            &[(label, *item), ("direction", "from_client")],
            r.bytes_from_client.load(Ordering::Relaxed),
        )?;
        f.counter(
            &[(label, *item), ("direction", "to_client")],
            r.bytes_to_client.load(Ordering::Relaxed),
        )?;
    }
    let n = name("tunnel_closes");
    let help = format!("Tunnels ended, by {label} and reason.");
    let mut f = family(enc, &n, &help, MetricType::Counter)?;
    for (item, r) in items {
        for (reason, count) in CLOSE_REASONS.iter().zip(&r.closes) {
            f.counter(
                &[(label, *item), ("reason", reason.as_str())],
                count.load(Ordering::Relaxed),
            )?;
        }
    }
    let n = name("tunnel_duration_seconds");
    let help = format!("How long tunnels lasted, by {label}.");
    let mut f = family(enc, &n, &help, MetricType::Histogram)?;
    for (item, r) in items {
        f.histogram(&[(label, *item)], &r.tunnel_seconds)?;
    }
    Ok(())
}

impl Collector for GatewayCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let gw = &self.0;
        let s = gw.snapshot();
        let m = gw.metrics();

        let listeners: Vec<(Labels<1>, &Listener)> = s
            .listeners
            .iter()
            .map(|(n, l)| ([("listener", &**n)], &**l))
            .collect();
        families(
            &mut enc,
            &listeners,
            &[
                (
                    "sluice_connections_open",
                    "Client connections open (tunnels included), by listener.",
                    Read::Gauge(|l| int(l.open())),
                ),
                (
                    "sluice_connections_max",
                    "The listener's max_connections.",
                    Read::Gauge(|l| int(l.max())),
                ),
                (
                    "sluice_connections_accepted",
                    "Client connections accepted, by listener.",
                    Read::Counter(|l| l.stats.accepted.load(Ordering::Relaxed)),
                ),
                (
                    "sluice_accept_errors",
                    "accept() failures (such as EMFILE: out of file descriptors), by listener.",
                    Read::Counter(|l| l.stats.accept_errors.load(Ordering::Relaxed)),
                ),
                (
                    "sluice_http2_connections",
                    "Client connections that spoke HTTP/2, by listener.",
                    Read::Counter(|l| l.stats.http2_connections.load(Ordering::Relaxed)),
                ),
                (
                    "sluice_http2_websockets",
                    "WebSockets opened as HTTP/2 streams (extended CONNECT, RFC 8441), by listener.",
                    Read::Counter(|l| l.stats.http2_websockets.load(Ordering::Relaxed)),
                ),
                (
                    "sluice_http2_abuse",
                    "HTTP/2 connections cut off for abuse (rapid reset, protocol errors such as a CONTINUATION flood), by listener.",
                    Read::Counter(|l| l.stats.http2_abuse.load(Ordering::Relaxed)),
                ),
            ],
        )?;

        let routes = m.routes();
        let routes: Vec<(&str, &RouteStats)> =
            routes.iter().map(|r| (r.name.as_str(), &**r)).collect();
        traffic(&mut enc, "sluice_", "route", &routes)?;
        // Capture counters only for routes that capture now or have done so.
        let capturing: Vec<(Labels<1>, &RouteStats)> = routes
            .iter()
            .filter(|(name, r)| {
                r.capture_lines.load(Ordering::Relaxed) + r.capture_dropped.load(Ordering::Relaxed)
                    > 0
                    || s.routes
                        .iter()
                        .any(|sr| sr.capture.is_some() && sr.config.name == *name)
            })
            .map(|(name, r)| ([("route", *name)], *r))
            .collect();
        families(
            &mut enc,
            &capturing,
            &[
                (
                    "sluice_capture_lines",
                    "Lines written to the route's capture file ([routes.capture]), by route.",
                    Read::Counter(|r| r.capture_lines.load(Ordering::Relaxed)),
                ),
                (
                    "sluice_capture_dropped",
                    "Requests the route's capture did not write (queue full, file at max_size, or a failed write), by route.",
                    Read::Counter(|r| r.capture_dropped.load(Ordering::Relaxed)),
                ),
            ],
        )?;
        let tenants = gw.limiter().tenants();
        let traffic_of: Vec<(&str, &RouteStats)> = tenants
            .iter()
            .filter(|t| !t.name.is_empty())
            .map(|t| (&*t.name, &t.stats))
            .collect();
        traffic(&mut enc, "sluice_tenant_", "tenant", &traffic_of)?;
        let mut f = family(
            &mut enc,
            "sluice_limited",
            "Requests refused by a limit (429, or 503 when the cluster store is down and on_failure = \"closed\"), by tenant (empty: none), limit and scope (tenant, ip).",
            MetricType::Counter,
        )?;
        for t in &tenants {
            for (limit, row) in Limit::ALL.iter().zip(&t.limited) {
                for (scope, n) in [Scope::Tenant, Scope::Ip].iter().zip(row) {
                    let l: Labels<3> = [
                        ("tenant", &t.name),
                        ("limit", limit.as_str()),
                        ("scope", scope.as_str()),
                    ];
                    f.counter(&l, n.load(Ordering::Relaxed))?;
                }
            }
        }
        family(
            &mut enc,
            "sluice_limit_clients",
            "Client addresses held for per-IP limits (at most [limits] max_clients).",
            MetricType::Gauge,
        )?
        .only(int(gw.limiter().clients()))?;
        if let Some(c) = gw.limiter().cluster_in_use() {
            let st = &c.stats;
            family(
                &mut enc,
                "sluice_cluster_up",
                "1 while the cluster's Redis answers; 0 while limits are local.",
                MetricType::Gauge,
            )?
            .only(i64::from(st.up.load(Ordering::Relaxed)))?;
            let mut f = family(
                &mut enc,
                "sluice_cluster_calls",
                "Calls to the cluster's Redis, by outcome.",
                MetricType::Counter,
            )?;
            let calls = st.calls.load(Ordering::Relaxed);
            let errors = st.errors.load(Ordering::Relaxed);
            f.counter(&[("outcome", "ok")], calls.saturating_sub(errors))?;
            f.counter(&[("outcome", "error")], errors)?;
        }

        let mut pools: Vec<_> = s.pools.values().collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        let servers: Vec<(Labels<2>, &Server)> = pools
            .iter()
            .flat_map(|p| {
                p.servers.iter().map(|sv| {
                    let labels = [
                        ("pool", p.name.as_str()),
                        ("server", sv.config.authority.as_str()),
                    ];
                    (labels, &**sv)
                })
            })
            .collect();
        families(
            &mut enc,
            &servers,
            &[
                (
                    "sluice_upstream_healthy",
                    "1 when the server may take new connections (healthy and not ejected), by pool and server.",
                    Read::Gauge(|sv| i64::from(sv.is_available())),
                ),
                (
                    "sluice_upstream_ejected",
                    "1 while a passive ejection keeps the server out.",
                    Read::Gauge(|sv| i64::from(sv.is_ejected())),
                ),
                (
                    "sluice_upstream_active",
                    "Tunnels and in-flight requests on the server.",
                    Read::Gauge(|sv| int(sv.active())),
                ),
                (
                    "sluice_upstream_connect_failures",
                    "Failed connects to the server.",
                    Read::Counter(|sv| sv.failures().0),
                ),
                (
                    "sluice_upstream_ejections",
                    "Times connect failures took the server out.",
                    Read::Counter(|sv| sv.failures().1),
                ),
            ],
        )?;

        let mut plugins: Vec<_> = s.plugins().collect();
        plugins.sort_by_key(|(n, _)| *n);
        let stats: Vec<(Labels<1>, PluginStats)> = plugins
            .iter()
            .map(|(n, p)| ([("plugin", *n)], p.stats()))
            .collect();
        families(
            &mut enc,
            &stats,
            &[
                (
                    "sluice_plugin_calls",
                    "Plugin hook calls, by plugin (kept across reloads that load it anew).",
                    Read::Counter(|s| s.calls),
                ),
                (
                    "sluice_plugin_reused",
                    "on-request decisions given again without a call (reuse-ms).",
                    Read::Counter(|s| s.reused),
                ),
                (
                    "sluice_plugin_denies",
                    "Deny decisions.",
                    Read::Counter(|s| s.denies),
                ),
                (
                    "sluice_plugin_faults",
                    "Plugin faults of any kind (trap, timeout, memory, invalid decision, overload).",
                    Read::Counter(|s| s.faults),
                ),
                (
                    "sluice_plugin_timeouts",
                    "Faults that were CPU deadlines.",
                    Read::Counter(|s| s.timeouts),
                ),
                (
                    "sluice_plugin_memory_faults",
                    "Faults that were memory-cap hits.",
                    Read::Counter(|s| s.memory_faults),
                ),
                (
                    "sluice_plugin_instances_created",
                    "Plugin instances created.",
                    Read::Counter(|s| s.instances_created),
                ),
            ],
        )?;
        let mut f = family(
            &mut enc,
            "sluice_plugin_document_fetches",
            "Fetches of the documents plugins watch (grants.http), by plugin and outcome.",
            MetricType::Counter,
        )?;
        for ((labels, s), (_, p)) in stats.iter().zip(&plugins) {
            if p.watches_documents() {
                let plugin = labels[0].1;
                f.counter(
                    &[("plugin", plugin), ("outcome", "changed")],
                    s.fetches_changed,
                )?;
                f.counter(
                    &[("plugin", plugin), ("outcome", "unchanged")],
                    s.fetches_unchanged,
                )?;
                f.counter(
                    &[("plugin", plugin), ("outcome", "failed")],
                    s.fetches_failed,
                )?;
            }
        }
        let mut f = family(
            &mut enc,
            "sluice_plugin_call_duration_seconds",
            "on-request call latency, by plugin.",
            MetricType::Histogram,
        )?;
        for (n, p) in &plugins {
            f.histogram(&[("plugin", *n)], p.latency())?;
        }

        let mut f = family(
            &mut enc,
            "sluice_reloads",
            "Config reloads, by outcome.",
            MetricType::Counter,
        )?;
        f.counter(&[("outcome", "ok")], m.reloads_ok.load(Ordering::Relaxed))?;
        f.counter(
            &[("outcome", "failed")],
            m.reloads_failed.load(Ordering::Relaxed),
        )?;
        family(
            &mut enc,
            "sluice_config_generation",
            "The generation of the config serving new connections (1 at start).",
            MetricType::Gauge,
        )?
        .only(i64::try_from(s.generation).unwrap_or(i64::MAX))?;
        family(
            &mut enc,
            "sluice_snapshot_generations_alive",
            "Config generations still in memory: the current one and those old connections hold.",
            MetricType::Gauge,
        )?
        .only(int(snapshot::generations_alive()))
    }
}
