//! What is counted on the request path, as plain atomics that the stages bump where they
//! already are: per listener (`ListenerStats`), per route (`RouteStats`, kept across
//! reloads by name), and latency histograms. Nothing here formats or locks on the request
//! path; the admin listener reads these at scrape time and encodes them with
//! `prometheus-client` (`admin::exposition`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sync::Hold;
use crate::tunnel::Ended;

/// Upper bounds (seconds) of the tunnel-duration buckets: a second to a day.
pub const TUNNEL_BUCKETS: &[f64] = &[1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0, 86400.0];

/// Upper bounds (seconds) of the plugin-call buckets: 1 µs to 50 ms.
pub const PLUGIN_BUCKETS: &[f64] = &[
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05,
];

/// A histogram with fixed buckets: one atomic add per bucket hit, no lock.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Hits per bucket (not cumulative); the last counts values above every bound.
    counts: Box<[AtomicU64]>,
    /// Sum of observed values, in nanoseconds.
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// A histogram over these upper bounds (ascending, in seconds).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.partition_point(|b| *b < secs);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// `(sum in seconds, count, cumulative (bound, count) buckets)` as Prometheus wants
    /// them, the last bucket `+Inf`.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(self.counts.len());
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            let bound = self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, total));
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, total, buckets)
    }
}

/// Counts per HTTP status code (100–599), one atomic each.
#[derive(Debug)]
pub struct StatusCounts(Box<[AtomicU64]>);

impl Default for StatusCounts {
    fn default() -> Self {
        StatusCounts((100..600).map(|_| AtomicU64::new(0)).collect())
    }
}

impl StatusCounts {
    /// Counts one answer with `status` (out-of-range codes count as 500).
    pub fn add(&self, status: u16) {
        let i = usize::from(status).checked_sub(100).filter(|i| *i < 500);
        self.0[i.unwrap_or(400)].fetch_add(1, Ordering::Relaxed);
    }

    /// The non-zero counts, by status.
    pub fn nonzero(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.0.iter().enumerate().filter_map(|(i, c)| {
            let n = c.load(Ordering::Relaxed);
            (n > 0).then_some((i as u16 + 100, n))
        })
    }

    /// The sum over all statuses.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// How tunnels end, in [`Ended`]'s order.
pub const CLOSE_REASONS: [Ended; 5] = [
    Ended::ClientClosed,
    Ended::ServerClosed,
    Ended::IdleTimeout,
    Ended::Shutdown,
    Ended::Error,
];

/// One route's traffic (the route `""` counts requests no route matched). Kept across
/// reloads by the route's name, so counters only grow.
#[derive(Debug)]
pub struct RouteStats {
    /// The route's name.
    pub name: String,
    /// Tunnels open now.
    pub tunnels_open: AtomicI64,
    /// WebSocket handshakes answered, by the status the client got (`101`, or `200` to an
    /// HTTP/2 extended CONNECT: a tunnel).
    pub handshakes: StatusCounts,
    /// Plain requests answered, by status.
    pub requests: StatusCounts,
    /// Bytes read from clients (request bodies and tunnel traffic).
    pub bytes_from_client: AtomicU64,
    /// Bytes written to clients (response bodies and tunnel traffic).
    pub bytes_to_client: AtomicU64,
    /// Tunnels closed, by [`CLOSE_REASONS`].
    pub closes: [AtomicU64; 5],
    /// How long tunnels lasted.
    pub tunnel_seconds: Histogram,
    /// Lines its capture wrote (`[routes.capture]`).
    pub capture_lines: AtomicU64,
    /// Requests its capture did not write: the queue was full, the file had reached
    /// `max_size`, or a write failed.
    pub capture_dropped: AtomicU64,
}

impl RouteStats {
    /// Counters from zero for `name`.
    pub fn new(name: &str) -> RouteStats {
        RouteStats {
            name: name.to_owned(),
            tunnels_open: AtomicI64::new(0),
            handshakes: StatusCounts::default(),
            requests: StatusCounts::default(),
            bytes_from_client: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            closes: Default::default(),
            tunnel_seconds: Histogram::new(TUNNEL_BUCKETS),
            capture_lines: AtomicU64::new(0),
            capture_dropped: AtomicU64::new(0),
        }
    }

    /// A tunnel opened (its `status`, `101` or an HTTP/2 `200`, went out).
    pub fn tunnel_opened(&self, status: u16) {
        self.handshakes.add(status);
        self.tunnels_open.fetch_add(1, Ordering::Relaxed);
    }

    /// A tunnel ended.
    pub fn tunnel_closed(&self, reason: Ended, from_client: u64, to_client: u64, d: Duration) {
        self.tunnels_open.fetch_sub(1, Ordering::Relaxed);
        let i = CLOSE_REASONS.iter().position(|r| *r == reason).unwrap_or(4);
        self.closes[i].fetch_add(1, Ordering::Relaxed);
        self.add_bytes(from_client, to_client);
        self.tunnel_seconds.observe(d);
    }

    /// A request (or a refused handshake) was answered.
    pub fn answered(&self, upgrade: bool, status: u16, from_client: u64, to_client: u64) {
        if upgrade {
            self.handshakes.add(status);
        } else {
            self.requests.add(status);
        }
        self.add_bytes(from_client, to_client);
    }

    fn add_bytes(&self, from_client: u64, to_client: u64) {
        if from_client > 0 {
            self.bytes_from_client
                .fetch_add(from_client, Ordering::Relaxed);
        }
        if to_client > 0 {
            self.bytes_to_client.fetch_add(to_client, Ordering::Relaxed);
        }
    }
}

/// One listener's connections.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// `accept` failures, such as running out of file descriptors.
    pub accept_errors: AtomicU64,
    /// Connections that spoke HTTP/2.
    pub http2_connections: AtomicU64,
    /// WebSockets opened as HTTP/2 streams (extended CONNECT, RFC 8441).
    pub http2_websockets: AtomicU64,
    /// HTTP/2 connections cut off for abuse: too many reset streams, or a protocol error
    /// (such as a CONTINUATION flood past the header-list bound).
    pub http2_abuse: AtomicU64,
}

/// The process's counters that outlive snapshots: route stats by name, reloads.
#[derive(Debug, Default)]
pub struct Metrics {
    routes: Mutex<Vec<Arc<RouteStats>>>,
    /// Reloads that published a new snapshot.
    pub reloads_ok: AtomicU64,
    /// Reloads refused (the previous snapshot kept serving).
    pub reloads_failed: AtomicU64,
}

impl Metrics {
    /// The stats of the route named `name`, made the first time it is asked for (at
    /// snapshot load, never on the request path).
    pub fn route(&self, name: &str) -> Arc<RouteStats> {
        let mut routes = self.routes.hold();
        if let Some(r) = routes.iter().find(|r| r.name == name) {
            return r.clone();
        }
        let r = Arc::new(RouteStats::new(name));
        routes.push(r.clone());
        r
    }

    /// Every route's stats, in the order they were first made.
    pub fn routes(&self) -> Vec<Arc<RouteStats>> {
        self.routes.hold().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_infinity() {
        let h = Histogram::new(&[1.0, 10.0]);
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(1));
        h.observe(Duration::from_secs(5));
        h.observe(Duration::from_secs(50));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 56.5).abs() < 1e-9);
        assert_eq!(buckets, vec![(1.0, 2), (10.0, 3), (f64::INFINITY, 4)]);
    }

    #[test]
    fn statuses_out_of_range_count_as_500() {
        let s = StatusCounts::default();
        s.add(101);
        s.add(404);
        s.add(404);
        s.add(999);
        s.add(0);
        assert_eq!(
            s.nonzero().collect::<Vec<_>>(),
            vec![(101, 1), (404, 2), (500, 2)]
        );
        assert_eq!(s.total(), 5);
    }

    #[test]
    fn route_stats_are_shared_by_name() {
        let m = Metrics::default();
        let a = m.route("echo");
        a.tunnel_opened(101);
        assert!(Arc::ptr_eq(&a, &m.route("echo")));
        assert_eq!(m.routes().len(), 1);
        assert_eq!(m.route("echo").tunnels_open.load(Ordering::Relaxed), 1);
    }
}
