//! Close stage: one structured access-log event per plain request and per tunnel, and the
//! counting body wrapper that measures streamed bytes and logs when a response ends.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::limit::{Admission, Limit, Scope, Tenant};
use crate::metrics::RouteStats;
use crate::plugin::{Chain, CloseInfo, CloseReason, RequestKind};
use crate::tls::Facts;
use crate::tunnel::{Ended, Report};

/// The `tracing` target of access-log events.
pub const TARGET: &str = "sluice::access";

/// What is known about one request or tunnel when it is logged.
#[derive(Debug, Clone)]
pub struct Record {
    /// `"http"`, `"tunnel"`, or `"websocket"` for an upgrade that did not become one.
    pub kind: &'static str,
    /// The request asked for a WebSocket (its answer is counted as a handshake).
    pub upgrade: bool,
    /// The route's counters (the unrouted ones until a route matches).
    pub stats: Arc<RouteStats>,
    /// Client address.
    pub client: SocketAddr,
    /// Listener name.
    pub listener: Arc<str>,
    /// Route name (empty when no route matched).
    pub route: String,
    /// Upstream server (empty when none was reached).
    pub upstream: String,
    /// Request method.
    pub method: http::Method,
    /// The client's HTTP version (`HTTP/2.0` for a WebSocket over an extended CONNECT).
    pub version: http::Version,
    /// Request path as sent.
    pub path: String,
    /// Status sent to the client.
    pub status: u16,
    /// When the request head was received.
    pub start: Instant,
    /// Request body bytes read so far (shared with the request body wrapper).
    pub bytes_in: Arc<AtomicU64>,
    /// Keeps the upstream server's active count raised until the record is logged.
    pub hold: Option<Arc<crate::balance::ActiveGuard>>,
    /// Extra fields from plugins, `key=value` pairs joined by spaces.
    pub tags: String,
    /// The route's plugin chain, told when the exchange ends (only when a plugin of it
    /// asked for `on-close`).
    pub close_hook: Option<Arc<CloseHook>>,
    /// The client's TLS session, on a TLS listener (logged as `sni` and `tls_client`).
    pub tls: Option<Arc<Facts>>,
    /// The tenant's counters (logged as `tenant`), once routing and plugins named one.
    pub tenant: Option<Arc<Tenant>>,
    /// The limit that refused the request (logged as `limit`, e.g. `tenant.tunnels`).
    pub limited: Option<(Limit, Scope)>,
    /// What the request took from its limits (a tunnel's slots), given back when the
    /// record, and so the request or tunnel, ends.
    pub admission: Option<Arc<Admission>>,
}

/// What `on-close` needs beyond the record.
#[derive(Debug, Clone)]
pub struct CloseHook {
    /// The chain to notify.
    pub chain: Chain,
    /// Upgrade or plain request.
    pub kind: RequestKind,
    /// Tenant named by the route or a plugin.
    pub tenant: Option<String>,
}

impl Record {
    /// Runs the chain's `on-close` hooks in the background; does nothing (no
    /// `CloseInfo`, no task) when no plugin of the chain asked for them.
    fn notify(&self, bytes_in: u64, bytes_out: u64, reason: CloseReason) {
        let Some(hook) = self
            .close_hook
            .as_ref()
            .filter(|h| h.chain.wants_close())
            .cloned()
        else {
            return;
        };
        let info = CloseInfo {
            kind: hook.kind,
            route: self.route.clone(),
            tenant: hook.tenant.clone(),
            upstream: (!self.upstream.is_empty()).then(|| self.upstream.clone()),
            duration: self.start.elapsed(),
            bytes_from_client: bytes_in,
            bytes_to_client: bytes_out,
            reason,
        };
        tokio::spawn(async move { hook.chain.on_close(&info).await });
    }
}

impl Record {
    /// The counters this exchange is counted in: its route's, and its tenant's.
    fn counters(&self) -> impl Iterator<Item = &RouteStats> {
        std::iter::once(&*self.stats).chain(self.tenant.as_ref().map(|t| &t.stats))
    }

    /// A tunnel opened: its `status` (`101`, or an HTTP/2 `200`) went to the client.
    pub fn tunnel_opened(&self) {
        for stats in self.counters() {
            stats.tunnel_opened(self.status);
        }
    }

    /// Emits the event for a plain request.
    pub fn log_http(&self, bytes_out: u64) {
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        let reason = match self.status {
            502 | 504 => CloseReason::UpstreamError,
            _ if self.upstream.is_empty() => CloseReason::Denied,
            _ => CloseReason::Completed,
        };
        self.notify(bytes_in, bytes_out, reason);
        for stats in self.counters() {
            stats.answered(self.upgrade, self.status, bytes_in, bytes_out);
        }
        self.emit(bytes_in, bytes_out, None, None);
    }

    /// Emits the event for a finished tunnel.
    pub fn log_tunnel(&self, report: &Report) {
        let reason = match report.reason {
            Ended::ClientClosed => CloseReason::ClientClosed,
            Ended::ServerClosed => CloseReason::UpstreamClosed,
            Ended::IdleTimeout => CloseReason::IdleTimeout,
            Ended::Shutdown => CloseReason::Shutdown,
            Ended::Error => CloseReason::UpstreamError,
        };
        self.notify(report.bytes_in, report.bytes_out, reason);
        for stats in self.counters() {
            stats.tunnel_closed(
                report.reason,
                report.bytes_in,
                report.bytes_out,
                self.start.elapsed(),
            );
        }
        let error = report.error.as_ref().map(|e| e.to_string());
        self.emit(
            report.bytes_in,
            report.bytes_out,
            Some(report.reason.as_str()),
            error.as_deref(),
        );
    }

    /// The access-log event itself; `reason` and `error` appear only when set.
    fn emit(&self, bytes_in: u64, bytes_out: u64, reason: Option<&str>, error: Option<&str>) {
        let tls = self.tls.as_deref();
        tracing::info!(
            target: TARGET,
            kind = self.kind,
            client = %self.client,
            listener = %self.listener,
            route = %self.route,
            upstream = %self.upstream,
            method = %self.method,
            proto = ?self.version,
            path = %self.path,
            status = self.status,
            bytes_in,
            bytes_out,
            duration_ms = self.start.elapsed().as_millis() as u64,
            reason,
            error,
            sni = tls.and_then(|t| t.sni.as_deref()),
            tls_client = tls.and_then(|t| t.client_subject.as_deref()),
            tenant = self.tenant.as_ref().map(|t| &*t.name),
            limit = self.limited.map(|(l, s)| format!("{}.{}", s.as_str(), l.as_str())),
            tags = %self.tags,
            "access"
        );
    }
}

/// A body that counts the data bytes passing through it into a shared counter and, when
/// given a [`Record`], logs it once the body ends or is dropped (a client that hangs up
/// mid-body is still logged, with the bytes sent so far).
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
    record: Option<Record>,
}

impl<B> Counted<B> {
    /// Counts into `count` without logging.
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted {
            inner,
            count,
            record: None,
        }
    }

    /// Counts and logs `record` at the end.
    pub fn logged(inner: B, record: Record) -> Self {
        Counted {
            inner,
            count: Arc::new(AtomicU64::new(0)),
            record: Some(record),
        }
    }

    fn finish(&mut self) {
        if let Some(r) = self.record.take() {
            r.log_http(self.count.load(Ordering::Relaxed));
        }
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
