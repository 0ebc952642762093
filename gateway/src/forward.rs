//! Forward stage for plain (non-upgrade) requests: keep-alive connections pooled per
//! upstream server, streamed bodies both ways, `502` when no server answers and `504` when
//! the chosen one is too slow to answer the head.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::access::{Counted, Record};
use crate::admit::Plan;
use crate::balance::{Pool, Server};
use crate::connect::{self, Attempt, with_failover};
use crate::headers::strip_hop_by_hop;
use crate::respond::{ResponseBody, no_upstream, respond};

/// Forwards a plain request to a server of the plan's pool and relays its response; a
/// pooled connection the server closed meanwhile is retried once on a fresh one.
pub async fn forward(
    req: Request<Incoming>,
    plan: Plan,
    mut rec: Record,
    conns: &Arc<UpstreamConns>,
) -> Response<ResponseBody> {
    let (route, pool) = (&plan.route, &plan.verdict.pool);
    let attempt = Pooled { pool, conns };
    let (server, Conn { mut sender, reused }) = match with_failover(pool, &plan.key, attempt).await
    {
        Ok(s) => s,
        Err(e) => return no_upstream(rec, &e),
    };
    rec.upstream = server.config.authority.clone();
    // Counted as active on the server until the response body is done (or dropped).
    rec.hold = Some(Arc::new(server.acquire()));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let (uri, headers) = plan.upstream_head(&parts.uri, parts.headers, &server.config.authority);
    let mut up = Request::new(Counted::new(body, rec.bytes_in.clone()));
    *up.method_mut() = parts.method;
    *up.uri_mut() = uri;
    *up.headers_mut() = headers;
    let deadline = tokio::time::Instant::now() + route.config.request_timeout;
    let mut result = tokio::time::timeout_at(deadline, sender.try_send_request(up)).await;
    // A pooled connection the server closed meanwhile hands the request back unsent:
    // retry it once on a fresh connection to the same server.
    if let (true, Ok(Err(e))) = (reused, &mut result)
        && let Some(up) = e.take_message()
    {
        match open(pool, &server).await {
            Ok(fresh) => {
                sender = fresh;
                result = tokio::time::timeout_at(deadline, sender.try_send_request(up)).await;
            }
            Err(e) => tracing::warn!(upstream = %rec.upstream, error = %e, "reconnect failed"),
        }
    }
    match result {
        Err(_) => respond(
            rec,
            StatusCode::GATEWAY_TIMEOUT,
            "upstream did not answer in time\n",
            &[],
        ),
        Ok(Err(e)) => {
            tracing::warn!(upstream = %rec.upstream, error = %e.error(), "upstream request failed");
            respond(
                rec,
                StatusCode::BAD_GATEWAY,
                "upstream request failed\n",
                &[],
            )
        }
        Ok(Ok(resp)) => {
            conns.recycle(conn_key(&server), sender);
            relay(rec, resp)
        }
    }
}

/// Relays an upstream response head and streamed body, logging when the body ends.
fn relay(mut rec: Record, resp: Response<Incoming>) -> Response<ResponseBody> {
    rec.status = resp.status().as_u16();
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Counted::logged(Either::Left(body), rec))
}

/// The request body as sent upstream: the client's body, counted.
pub type UpstreamBody = Counted<Incoming>;

/// Idle connections kept per server.
const MAX_IDLE_PER_SERVER: usize = 64;
/// An idle connection older than this is not reused (servers close idle ones too).
const IDLE_FOR: Duration = Duration::from_secs(60);

/// Idle keep-alive connections to upstream servers, shared by every route and snapshot.
#[derive(Default)]
pub struct UpstreamConns {
    idle: DashMap<ConnKey, Vec<(SendRequest<UpstreamBody>, Instant)>>,
}

/// What pooled connections are shared by: the server's address, and whether it is
/// spoken to over TLS.
type ConnKey = (SocketAddr, bool);

/// The pool key of a server's connections.
fn conn_key(server: &Server) -> ConnKey {
    (server.config.addr, server.config.tls)
}

impl UpstreamConns {
    fn take(&self, addr: ConnKey) -> Option<SendRequest<UpstreamBody>> {
        let mut list = self.idle.get_mut(&addr)?;
        while let Some((sender, since)) = list.pop() {
            if since.elapsed() < IDLE_FOR && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn put(&self, addr: ConnKey, sender: SendRequest<UpstreamBody>) {
        let mut list = self.idle.entry(addr).or_default();
        list.retain(|(s, since)| since.elapsed() < IDLE_FOR && !s.is_closed());
        if list.len() < MAX_IDLE_PER_SERVER {
            list.push((sender, Instant::now()));
        }
    }

    /// Returns `sender` to the idle list once its current response has been read.
    fn recycle(self: &Arc<Self>, addr: ConnKey, mut sender: SendRequest<UpstreamBody>) {
        let conns = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                conns.put(addr, sender);
            }
        });
    }
}

/// A fresh HTTP/1.1 connection to `server`.
async fn open(pool: &Pool, server: &Server) -> io::Result<SendRequest<UpstreamBody>> {
    let stream = connect::stream(pool, server).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// The attempt used by plain requests: an idle pooled connection, else a new one.
struct Pooled<'a> {
    /// The pool being balanced.
    pool: &'a Pool,
    /// Idle connections.
    conns: &'a UpstreamConns,
}

/// A connection from [`Pooled`], and whether it was reused.
struct Conn {
    /// The request sender.
    sender: SendRequest<UpstreamBody>,
    /// True when it came from the idle list (it may have been closed by the server).
    reused: bool,
}

impl Attempt for Pooled<'_> {
    type Output = Conn;
    async fn attempt(&mut self, server: &Arc<Server>) -> io::Result<Conn> {
        if let Some(sender) = self.conns.take(conn_key(server)) {
            return Ok(Conn {
                sender,
                reused: true,
            });
        }
        Ok(Conn {
            sender: open(self.pool, server).await?,
            reused: false,
        })
    }
}
