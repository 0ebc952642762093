//! HTTP/2 from clients: hyper's HTTP/2 server (over the h2 crate) with the listener's
//! bounds against abuse. Plain requests are served as on HTTP/1.1 (`handle`: admission,
//! then `forward` to an HTTP/1.1 upstream); a WebSocket is an extended CONNECT stream
//! (RFC 8441) that admission validates like an upgrade, `open` turns into an HTTP/1.1
//! upgrade upstream, and the stream becomes its tunnel, one task per stream.
//!
//! hyper rather than h2 alone: it brings request and response bodies, HTTP/2's header
//! rules (connection-specific fields refused or stripped), `Date`, and the same
//! `hyper::upgrade` hand-over the HTTP/1.1 path uses. Its cost per tunnel (a task that
//! feeds each stream's writes to h2) is measured in bench/README.md.
//!
//! The bounds against abuse, each set in [`serve`] from the listener's config:
//! - streams open at once (`max_concurrent_streams`, sent in SETTINGS);
//! - the header list (the listener's `max_header_size`, sent as
//!   SETTINGS_MAX_HEADER_LIST_SIZE); h2 also cuts off a header block spread over more
//!   CONTINUATION frames than that size needs, so a CONTINUATION flood ends there;
//! - rapid reset (CVE-2023-44487): streams the client reset before hyper took them up
//!   (`max_pending_resets`, h2's own bound, GOAWAY `ENHANCE_YOUR_CALM`), and requests
//!   the client cancelled before their answer (`max_reset_rate`, a token bucket here,
//!   then GOAWAY); a cancelled request's admission stops where it is, before any upstream
//!   when it had not reached one;
//! - idleness: a connection with no stream open for the listener's `header_read_timeout`
//!   is closed, so one that never finishes its preface or SETTINGS is too;
//! - flow control: each stream's window (`stream_window`), the connection's
//!   (`connection_window`), and what is queued per stream for a slow reader
//!   (`max_send_buffer`), so what the gateway holds for one client is bounded;
//! - streams the gateway resets for the client's protocol errors ([`MAX_LOCAL_RESETS`]).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::OptionFuture;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ClientConn, HeadLimits, Ready, handle, switch_answer};
use crate::config::{Http2Config, Rate};
use crate::limit::Bucket;
use crate::open::Opened;
use crate::respond::ResponseBody;
use crate::snapshot::Snapshot;
use crate::sync::Hold;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Streams the gateway may reset for a client's protocol errors before it ends the
/// connection (hyper's default, named here).
const MAX_LOCAL_RESETS: usize = 1024;

/// How long a connection closed for idleness or abuse has, after its GOAWAY, to finish
/// its streams and the closing handshake before it is dropped (a client that never
/// finished its preface cannot take part in a graceful close at all).
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Whether the first bytes of a plain connection are HTTP/2's preface (`h2c` by prior
/// knowledge). The client stage stops reading at the request line `httparse` refuses, so
/// as little as `PRI * HTTP/2` may have arrived.
pub(super) fn is_preface(read: &[u8]) -> bool {
    let n = read.len().min(PREFACE.len());
    n >= 12 && read[..n] == PREFACE[..n]
}

/// Serves one HTTP/2 connection until the client or the gateway ends it.
pub(super) async fn serve<I>(ctx: Arc<ClientConn>, io: I, limits: HeadLimits)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = limits.http2.clone().unwrap_or(Http2Config::DEFAULT);
    let gw = ctx.gw.clone();
    let stats = &ctx.permit.listener().stats;
    stats.http2_connections.fetch_add(1, Ordering::Relaxed);
    let streams = Arc::new(Streams::new(config.max_reset_rate));
    let svc = service_fn({
        let (ctx, streams) = (ctx.clone(), streams.clone());
        move |req| {
            let (ctx, open) = (ctx.clone(), Open::new(&streams));
            async move {
                let mut answering = Answering(Some(open.clone()));
                let tunnel = open.clone();
                let resp = handle(as_http1(req), ctx, move |opened, on, ctx, snapshot| {
                    switch(opened, on, ctx, snapshot, tunnel)
                })
                .await;
                answering.0 = None;
                // The stream stays open while its response body streams.
                Ok::<_, Infallible>(resp.map(|body| Held { body, _open: open }))
            }
        }
    });
    let mut builder = http2::Builder::new(Exec(gw.tracker().clone()));
    builder
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(config.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(config.max_pending_resets)
        .max_local_error_reset_streams(MAX_LOCAL_RESETS)
        .initial_stream_window_size(config.stream_window)
        .initial_connection_window_size(config.connection_window)
        .max_send_buf_size(config.max_send_buffer);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle_for = limits.header_read_timeout;
    let mut closing = false;
    // Runs until the connection ends by itself (return), or until it must be closed:
    // then it has `CLOSE_GRACE` after its GOAWAY (below).
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended
                    && cut_off(&e)
                {
                    stats.http2_abuse.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(listener = %ctx.listener, client = %ctx.peer, error = %e, "HTTP/2 connection cut off");
                }
                return;
            }
            () = gw.stopping().cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            // The drain's deadline: the tunnels are closing; a client that does not take
            // part in the graceful close does not hold the process.
            () = gw.closing().cancelled() => break,
            () = streams.abuse.cancelled(), if !closing => {
                stats.http2_abuse.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(listener = %ctx.listener, client = %ctx.peer, "HTTP/2 client cancelled requests too fast; GOAWAY");
                conn.as_mut().graceful_shutdown();
                break;
            }
            () = tokio::time::sleep_until(streams.idle_deadline(idle_for)), if !closing => {
                if streams.idle_for(idle_for) {
                    conn.as_mut().graceful_shutdown();
                    break;
                }
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await;
}

/// Whether a connection ended because the gateway cut the client off for a protocol
/// error or abuse (h2's GOAWAY with an error code), not because either side closed.
fn cut_off(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<::h2::Error>() {
            return !h2.is_remote()
                && !h2.is_io()
                && h2.reason().is_some_and(|r| r != ::h2::Reason::NO_ERROR);
        }
        source = s.source();
    }
    false
}

/// An HTTP/2 request made ready for an HTTP/1.1 hop (RFC 9113 §8.3.1, §8.2.3): `Host`
/// from `:authority` when the client sent none, and its cookie crumbs joined into one
/// field.
fn as_http1(mut req: Request<Incoming>) -> Request<Incoming> {
    if !req.headers().contains_key(header::HOST)
        && let Some(host) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, host);
    }
    let cookies = req.headers().get_all(header::COOKIE);
    if cookies.iter().nth(1).is_some() {
        let joined: Vec<&[u8]> = cookies.iter().map(HeaderValue::as_bytes).collect();
        if let Ok(one) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
            req.headers_mut().insert(header::COOKIE, one);
        }
    }
    req
}

/// The `200` to an extended CONNECT the upstream accepted (with its subprotocol and
/// extensions), and the tunnel task that starts once hyper hands the stream over.
fn switch(
    opened: Opened,
    on_upgrade: hyper::upgrade::OnUpgrade,
    ctx: Arc<ClientConn>,
    snapshot: Arc<Snapshot>,
    open: Open,
) -> Response<ResponseBody> {
    let resp = switch_answer(StatusCode::OK, opened.head.h2_header_map());
    let tracker = ctx.gw.tracker().clone();
    // Combinators rather than an `async` block, which would keep `opened` beside the
    // tunnel for the tunnel's whole life: the task holds only the tunnel's state.
    tracker.spawn(on_upgrade.then(move |upgraded| match upgraded {
        Ok(stream) => {
            let stats = &ctx.permit.listener().stats;
            stats.http2_websockets.fetch_add(1, Ordering::Relaxed);
            let ready = Ready::new(ctx, snapshot, TokioIo::new(stream), Bytes::new(), opened);
            OptionFuture::from(Some(ready.run().map(move |()| drop(open))))
        }
        Err(e) => {
            tracing::warn!(client = %opened.rec.client, error = %e, "HTTP/2 WebSocket stream did not open");
            OptionFuture::from(None)
        }
    }));
    resp
}

/// Runs hyper's per-stream tasks on the connection's worker, tracked, so a drain waits
/// for them.
#[derive(Clone)]
struct Exec(TaskTracker);

impl<F: Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for Exec {
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// One connection's streams: how many are open (being answered, or tunnels), since when
/// none is, and the budget of cancelled requests.
struct Streams {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
    resets: Mutex<Bucket>,
    reset_rate: Rate,
    /// Cancelled when the client cancels requests faster than the budget allows.
    abuse: CancellationToken,
}

impl Streams {
    fn new(rate: u32) -> Streams {
        // Cancelled requests: `rate` per second, up to twice that at once.
        let reset_rate = Rate {
            per_second: f64::from(rate),
            burst: rate.saturating_mul(2),
        };
        Streams {
            open: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            resets: Mutex::new(Bucket::full(reset_rate, Instant::now().into_std())),
            reset_rate,
            abuse: CancellationToken::new(),
        }
    }

    /// When the connection has been idle for `idle` if nothing changes meanwhile (a
    /// connection with streams open is looked at again after `idle`).
    fn idle_deadline(&self, idle: Duration) -> Instant {
        if self.open.load(Ordering::Acquire) > 0 {
            return Instant::now() + idle;
        }
        *self.idle_since.hold() + idle
    }

    /// Whether no stream has been open for `idle`.
    fn idle_for(&self, idle: Duration) -> bool {
        self.open.load(Ordering::Acquire) == 0 && self.idle_since.hold().elapsed() >= idle
    }

    /// A request the client cancelled before its answer; past the budget, the connection
    /// is marked for GOAWAY.
    fn cancelled(&self) {
        let mut b = self.resets.hold();
        if b.take(self.reset_rate, Instant::now().into_std()).is_err() {
            self.abuse.cancel();
        }
    }
}

/// A stream counted open (a request being answered, or a tunnel) while held.
struct Open(Arc<Streams>);

impl Open {
    fn new(streams: &Arc<Streams>) -> Open {
        streams.open.fetch_add(1, Ordering::AcqRel);
        Open(streams.clone())
    }
}

impl Clone for Open {
    fn clone(&self) -> Open {
        Open::new(&self.0)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.hold() = Instant::now();
        }
    }
}

/// A response body that keeps its stream counted open until it has been sent.
struct Held {
    body: ResponseBody,
    _open: Open,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = <ResponseBody as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Held while a request is being answered: dropped before the answer (hyper drops the
/// request's future when the client resets its stream), it counts a cancelled request.
struct Answering(Option<Open>);

impl Drop for Answering {
    fn drop(&mut self) {
        if let Some(open) = &self.0 {
            open.0.cancelled();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_is_known_from_its_first_twelve_bytes() {
        assert!(is_preface(PREFACE));
        assert!(is_preface(b"PRI * HTTP/2"));
        assert!(is_preface(&[PREFACE, b"\x00\x00\x00\x04"].concat()));
        assert!(!is_preface(b"PRI * HTTP"));
        assert!(!is_preface(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!is_preface(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_faster_than_the_rate_marks_the_connection() {
        let streams = Streams::new(10);
        // The burst: twice the rate.
        for _ in 0..20 {
            streams.cancelled();
        }
        assert!(!streams.abuse.is_cancelled());
        // A second later, ten more are allowed; the eleventh is one too many.
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..10 {
            streams.cancelled();
        }
        assert!(!streams.abuse.is_cancelled());
        streams.cancelled();
        assert!(streams.abuse.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_with_no_stream_open() {
        let streams = Arc::new(Streams::new(10));
        let idle = Duration::from_secs(10);
        let open = Open::new(&streams);
        tokio::time::advance(idle * 2).await;
        assert!(!streams.idle_for(idle));
        let again = open.clone();
        drop(open);
        assert!(!streams.idle_for(idle));
        drop(again);
        assert!(!streams.idle_for(idle));
        assert_eq!(streams.idle_deadline(idle), Instant::now() + idle);
        tokio::time::advance(idle).await;
        assert!(streams.idle_for(idle));
    }
}
