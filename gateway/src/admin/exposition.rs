//! `/metrics`: the gateway's counters in the Prometheus text format, encoded by
//! `prometheus-client` at scrape time from the atomics the stages keep (`metrics`, the
//! listeners, the servers, the plugins). A scrape reads; it never locks the request path.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::metrics::{CLOSE_REASONS, Histogram};
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
struct Family<'e, 'a> {
    enc: prometheus_client::encoding::MetricEncoder<'e>,
    _p: std::marker::PhantomData<&'a ()>,
}

fn family<'e>(
    enc: &'e mut DescriptorEncoder<'_>,
    name: &'e str,
    help: &str,
    ty: MetricType,
) -> Result<Family<'e, 'e>, std::fmt::Error> {
    Ok(Family {
        enc: enc.encode_descriptor(name, help, None, ty)?,
        _p: std::marker::PhantomData,
    })
}

impl Family<'_, '_> {
    fn counter(&mut self, labels: &impl EncodeLabelSet, v: u64) -> Result<(), std::fmt::Error> {
        ConstCounter::new(v).encode(self.enc.encode_family(labels)?)
    }

    fn gauge(&mut self, labels: &impl EncodeLabelSet, v: i64) -> Result<(), std::fmt::Error> {
        ConstGauge::new(v).encode(self.enc.encode_family(labels)?)
    }

    fn histogram(
        &mut self,
        labels: &impl EncodeLabelSet,
        h: &Histogram,
    ) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = h.snapshot();
        self.enc
            .encode_family(labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

type Labels<'a, const N: usize> = [(&'static str, &'a str); N];

/// A plugin counter: its name, its help, and how to read it.
type PluginCounter = (
    &'static str,
    &'static str,
    fn(&crate::plugin::PluginStats) -> u64,
);

impl Collector for GatewayCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gw = &self.0;
        let s = gw.snapshot();
        let m = gw.metrics();
        let int = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        let listeners: Vec<(String, &crate::listener::Listener)> = s
            .listeners
            .iter()
            .map(|(n, l)| (n.to_string(), &**l))
            .collect();

        let mut f = family(
            &mut enc,
            "sluice_connections_open",
            "Client connections open (tunnels included), by listener.",
            MetricType::Gauge,
        )?;
        for (n, l) in &listeners {
            f.gauge(&[("listener", n.as_str())], int(l.open()))?;
        }
        let mut f = family(
            &mut enc,
            "sluice_connections_max",
            "The listener's max_connections.",
            MetricType::Gauge,
        )?;
        for (n, l) in &listeners {
            f.gauge(&[("listener", n.as_str())], int(l.max()))?;
        }
        let mut f = family(
            &mut enc,
            "sluice_connections_accepted",
            "Client connections accepted, by listener.",
            MetricType::Counter,
        )?;
        for (n, l) in &listeners {
            f.counter(
                &[("listener", n.as_str())],
                l.stats.accepted.load(Ordering::Relaxed),
            )?;
        }
        let mut f = family(
            &mut enc,
            "sluice_accept_errors",
            "accept() failures (such as EMFILE: out of file descriptors), by listener.",
            MetricType::Counter,
        )?;
        for (n, l) in &listeners {
            f.counter(
                &[("listener", n.as_str())],
                l.stats.accept_errors.load(Ordering::Relaxed),
            )?;
        }

        let routes = m.routes();
        let mut f = family(
            &mut enc,
            "sluice_tunnels_open",
            "WebSocket tunnels open, by route.",
            MetricType::Gauge,
        )?;
        for r in &routes {
            f.gauge(
                &[("route", r.name.as_str())],
                r.tunnels_open.load(Ordering::Relaxed),
            )?;
        }
        let mut f = family(
            &mut enc,
            "sluice_handshakes",
            "WebSocket handshakes answered, by route, outcome (tunnel, refused: 4xx, failed: 5xx) and the status the client got.",
            MetricType::Counter,
        )?;
        for r in &routes {
            for (status, n) in r.handshakes.nonzero() {
                let outcome = match status {
                    101 => "tunnel",
                    500.. => "failed",
                    _ => "refused",
                };
                let code = status.to_string();
                let l: Labels<3> = [("route", &r.name), ("outcome", outcome), ("status", &code)];
                f.counter(&l, n)?;
            }
        }
        let mut f = family(
            &mut enc,
            "sluice_requests",
            "Plain HTTP requests answered, by route and status.",
            MetricType::Counter,
        )?;
        for r in &routes {
            for (status, n) in r.requests.nonzero() {
                let code = status.to_string();
                f.counter(&[("route", r.name.as_str()), ("status", &code)], n)?;
            }
        }
        let mut f = family(
            &mut enc,
            "sluice_bytes",
            "Bytes relayed (bodies and tunnel traffic), by route and direction.",
            MetricType::Counter,
        )?;
        for r in &routes {
            let name = r.name.as_str();
            f.counter(
                &[("route", name), ("direction", "from_client")],
                r.bytes_from_client.load(Ordering::Relaxed),
            )?;
            f.counter(
                &[("route", name), ("direction", "to_client")],
                r.bytes_to_client.load(Ordering::Relaxed),
            )?;
        }
        let mut f = family(
            &mut enc,
            "sluice_tunnel_closes",
            "Tunnels ended, by route and reason.",
            MetricType::Counter,
        )?;
        for r in &routes {
            for (reason, n) in CLOSE_REASONS.iter().zip(&r.closes) {
                f.counter(
                    &[("route", r.name.as_str()), ("reason", reason.as_str())],
                    n.load(Ordering::Relaxed),
                )?;
            }
        }
        let mut f = family(
            &mut enc,
            "sluice_tunnel_duration_seconds",
            "How long tunnels lasted, by route.",
            MetricType::Histogram,
        )?;
        for r in &routes {
            f.histogram(&[("route", r.name.as_str())], &r.tunnel_seconds)?;
        }

        let mut pools: Vec<_> = s.pools.values().collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        let servers: Vec<(&str, &crate::balance::Server)> = pools
            .iter()
            .flat_map(|p| p.servers.iter().map(|sv| (p.name.as_str(), &**sv)))
            .collect();
        let mut f = family(
            &mut enc,
            "sluice_upstream_healthy",
            "1 when the server may take new connections (healthy and not ejected), by pool and server.",
            MetricType::Gauge,
        )?;
        for (p, sv) in &servers {
            f.gauge(
                &[("pool", *p), ("server", sv.config.authority.as_str())],
                i64::from(sv.is_available()),
            )?;
        }
        let mut f = family(
            &mut enc,
            "sluice_upstream_ejected",
            "1 while a passive ejection keeps the server out.",
            MetricType::Gauge,
        )?;
        for (p, sv) in &servers {
            f.gauge(
                &[("pool", *p), ("server", sv.config.authority.as_str())],
                i64::from(sv.is_ejected()),
            )?;
        }
        let mut f = family(
            &mut enc,
            "sluice_upstream_active",
            "Tunnels and in-flight requests on the server.",
            MetricType::Gauge,
        )?;
        for (p, sv) in &servers {
            f.gauge(
                &[("pool", *p), ("server", sv.config.authority.as_str())],
                int(sv.active()),
            )?;
        }
        let mut f = family(
            &mut enc,
            "sluice_upstream_connect_failures",
            "Failed connects to the server.",
            MetricType::Counter,
        )?;
        for (p, sv) in &servers {
            f.counter(
                &[("pool", *p), ("server", sv.config.authority.as_str())],
                sv.failures().0,
            )?;
        }
        let mut f = family(
            &mut enc,
            "sluice_upstream_ejections",
            "Times connect failures took the server out.",
            MetricType::Counter,
        )?;
        for (p, sv) in &servers {
            f.counter(
                &[("pool", *p), ("server", sv.config.authority.as_str())],
                sv.failures().1,
            )?;
        }

        let mut plugins: Vec<_> = s.plugins().collect();
        plugins.sort_by_key(|(n, _)| *n);
        let stats: Vec<_> = plugins.iter().map(|(n, p)| (*n, p.stats())).collect();
        let plugin_counters: [PluginCounter; 7] = [
            (
                "sluice_plugin_calls",
                "Plugin hook calls, by plugin (since it was loaded).",
                |s| s.calls,
            ),
            (
                "sluice_plugin_reused",
                "on-request decisions given again without a call (reuse-ms).",
                |s| s.reused,
            ),
            ("sluice_plugin_denies", "Deny decisions.", |s| s.denies),
            (
                "sluice_plugin_faults",
                "Plugin faults of any kind (trap, timeout, memory, invalid decision, overload).",
                |s| s.faults,
            ),
            (
                "sluice_plugin_timeouts",
                "Faults that were CPU deadlines.",
                |s| s.timeouts,
            ),
            (
                "sluice_plugin_memory_faults",
                "Faults that were memory-cap hits.",
                |s| s.memory_faults,
            ),
            (
                "sluice_plugin_instances_created",
                "Plugin instances created.",
                |s| s.instances_created,
            ),
        ];
        for (name, help, get) in plugin_counters {
            let mut f = family(&mut enc, name, help, MetricType::Counter)?;
            for (n, st) in &stats {
                f.counter(&[("plugin", *n)], get(st))?;
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
        let f = family(
            &mut enc,
            "sluice_config_generation",
            "The generation of the config serving new connections (1 at start).",
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(s.generation).unwrap_or(i64::MAX)).encode(f.enc)?;
        let f = family(
            &mut enc,
            "sluice_snapshot_generations_alive",
            "Config generations still in memory: the current one and those old connections hold.",
            MetricType::Gauge,
        )?;
        ConstGauge::new(int(snapshot::generations_alive())).encode(f.enc)?;
        Ok(())
    }
}
