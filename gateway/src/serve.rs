//! HTTP stage: serves one client connection and walks each request through the later
//! stages: route → (policy) → select/connect → handshake + tunnel, or forward. A first
//! request that asks for a WebSocket is answered directly on the socket (read by the
//! client stage); everything else is served by hyper (HTTP/1.1 with upgrades, bounded
//! head size and head-read time).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::OptionFuture;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::access::{CloseHook, Counted, Record};
use crate::balance::{ActiveGuard, Pool, Server};
use crate::client::{self, Body, FirstHead, Prefixed, RequestHead, UpgradeHead};
use crate::config::{HashKey, ListenerConfig, RouteAction};
use crate::connect::{self, ConnectError, with_failover};
use crate::forward::{self, Conn, Pooled};
use crate::gateway::Gateway;
use crate::handshake::{self, Outcome, Switch};
use crate::headers::{
    Fields, add_forwarded, has_token, set_upgrade_hop, strip_hop_by_hop, value_text,
};
use crate::plugin::{Denial, RequestKind};
use crate::policy::{self, Verdict};
use crate::route::{Route, normalize_path, request_host};
use crate::snapshot::Snapshot;
use crate::tunnel::{self, End};
use crate::upgrade::{self, Upgrade};

/// The body of every response Sluice sends: a relayed upstream body or its own text.
pub type ResponseBody = Counted<Either<Incoming, Full<Bytes>>>;

/// Everything one client connection needs; shared by its requests and its tunnel.
pub struct ClientConn {
    gw: Arc<Gateway>,
    snapshot: Arc<Snapshot>,
    listener: Arc<str>,
    peer: SocketAddr,
    /// Held until the connection and any tunnel it became have ended.
    _permit: OwnedSemaphorePermit,
}

/// Serves one accepted connection until it closes, upgrades, or the gateway shuts down.
///
/// The first request head is read by the client stage. A WebSocket upgrade is answered
/// here, and its tunnel runs in this same task; any other request (and whatever follows
/// an upgrade that was refused) is served by hyper.
pub fn connection(
    gw: Arc<Gateway>,
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<str>,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send {
    // Everything before the tunnel is boxed, and the rest is put together from
    // pin-projected combinators rather than `async` blocks, which keep a value moved into
    // an `.await` twice: an upgraded connection's task holds only the tunnel's state
    // (800 bytes; an `async fn` here took 1,864, the spawned tunnel task before it 904).
    Box::pin(prepare(gw, stream, peer, listener, permit))
        .then(|ready| OptionFuture::from(ready.map(Ready::run)))
        .map(drop)
}

/// Reads the first head and answers it; `Some` once a `101` has gone to the client.
async fn prepare(
    gw: Arc<Gateway>,
    mut stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<str>,
    permit: OwnedSemaphorePermit,
) -> Option<Ready> {
    let snapshot = gw.snapshot();
    let limits = snapshot
        .config
        .listeners
        .iter()
        .find(|l| *l.name == *listener)
        .map(HeadLimits::of)?;
    let ctx = Arc::new(ClientConn {
        gw: gw.clone(),
        snapshot,
        listener,
        peer,
        _permit: permit,
    });
    let first = tokio::select! {
        head = client::read_first(&mut stream, limits.max_header_size, limits.header_read_timeout) => head,
        () = gw.stopping().cancelled() => return None,
    };
    let (req, rest) = match first {
        FirstHead::Gone => return None,
        FirstHead::Other(read) => {
            Box::pin(serve_http(ctx, Prefixed::new(read, stream), limits)).await;
            return None;
        }
        FirstHead::Upgrade { req, rest } => (req, rest),
    };
    match upgrade_direct(&mut stream, req, &ctx).await {
        Direct::Tunnel(opened) => Some(Ready::new(ctx, stream, End::detach(rest), opened)),
        Direct::KeepAlive => {
            Box::pin(serve_http(ctx, Prefixed::new(rest, stream), limits)).await;
            None
        }
        Direct::Closed => None,
    }
}

/// A tunnel whose `101` has gone to the client: what it needs while it runs.
struct Ready {
    /// Holds the connection permit and the snapshot the tunnel started with.
    ctx: Arc<ClientConn>,
    client: End,
    server: End,
    guard: ActiveGuard,
    rec: Record,
    idle: Option<std::time::Duration>,
}

impl Ready {
    fn new(ctx: Arc<ClientConn>, stream: TcpStream, early: Bytes, opened: Opened) -> Ready {
        Ready {
            ctx,
            client: End { stream, early },
            server: opened.server,
            guard: opened.guard,
            rec: opened.rec,
            idle: opened.idle,
        }
    }

    /// Relays until the tunnel ends, then logs it.
    fn run(self) -> impl Future<Output = ()> + Send {
        let Ready {
            ctx,
            client,
            server,
            guard,
            rec,
            idle,
        } = self;
        tunnel::relay(client, server, idle, ctx.gw.closing().clone()).map(move |report| {
            rec.log_tunnel(&report);
            drop((guard, ctx));
        })
    }
}

/// A listener's bounds on request heads.
#[derive(Clone, Copy)]
struct HeadLimits {
    max_header_size: usize,
    header_read_timeout: std::time::Duration,
}

impl HeadLimits {
    fn of(l: &ListenerConfig) -> HeadLimits {
        HeadLimits {
            max_header_size: l.max_header_size,
            header_read_timeout: l.header_read_timeout,
        }
    }
}

/// Serves a connection with hyper: plain requests, keep-alive, and upgrades that follow a
/// plain request.
async fn serve_http(ctx: Arc<ClientConn>, io: Prefixed, limits: HeadLimits) {
    let gw = ctx.gw.clone();
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(req, ctx).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_size)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = gw.stopping().cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// How an upgrade answered by the client stage ended.
#[expect(
    clippy::large_enum_variant,
    reason = "one per connection, moved once; boxing would only add an allocation"
)]
enum Direct {
    /// `101` sent: run the tunnel.
    Tunnel(Opened),
    /// Answered with another status; the client may send more requests.
    KeepAlive,
    /// Answered (or failed to write) and the connection must close.
    Closed,
}

/// Walks an upgrade head through route → policy → connect → handshake and writes the
/// client's answer itself.
async fn upgrade_direct(stream: &mut TcpStream, req: UpgradeHead, ctx: &Arc<ClientConn>) -> Direct {
    let close = client::closes_after(&req);
    let head_only = req.method() == Method::HEAD;
    let resp = match admit(&req, ctx).await {
        Err(resp) => resp,
        Ok(Admitted {
            plan,
            rec,
            ws_key: Some(ws_key),
        }) => match open(ClientHead::Raw(&req), ws_key, plan, rec, ctx).await {
            Ok(opened) => {
                let sent = client::write_switch(stream, &opened.head).await;
                return match sent {
                    Ok(()) => Direct::Tunnel(opened),
                    Err(e) => {
                        tracing::warn!(client = %ctx.peer, error = %e, "client upgrade did not complete");
                        Direct::Closed
                    }
                };
            }
            Err(resp) => resp,
        },
        // Not reached: the client stage passes only heads asking for a WebSocket.
        Ok(Admitted { rec, .. }) => respond(
            rec,
            StatusCode::BAD_REQUEST,
            "not a WebSocket upgrade\n",
            &[],
        ),
    };
    let close = close || has_token(resp.headers(), header::CONNECTION.as_str(), "close");
    let (parts, body) = resp.into_parts();
    // Sluice's own answers are whole in memory; collecting ends the body, which logs it.
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    // The answer to a HEAD keeps its Content-Length but carries no body.
    let body = Body {
        bytes: &body,
        send: !head_only,
    };
    match client::write_response(stream, parts.status, &parts.headers, body, close).await {
        Ok(()) if !close => Direct::KeepAlive,
        _ => Direct::Closed,
    }
}

async fn handle(mut req: Request<Incoming>, ctx: Arc<ClientConn>) -> Response<ResponseBody> {
    let Admitted { plan, rec, ws_key } = match admit(&req, &ctx).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    match ws_key {
        Some(ws_key) => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            let headers = std::mem::take(req.headers_mut());
            let head = ClientHead::Map {
                uri: req.uri(),
                headers,
            };
            match open(head, ws_key, plan, rec, &ctx).await {
                Ok(opened) => switch(opened, on_upgrade, ctx),
                Err(resp) => resp,
            }
        }
        None => forward(req, plan, rec, &ctx).await,
    }
}

/// A request that may go upstream.
struct Admitted {
    plan: Plan,
    rec: Record,
    /// The client's `Sec-WebSocket-Key` when this is a valid WebSocket upgrade.
    ws_key: Option<String>,
}

/// Route → upgrade validation → policy: where the request goes, or Sluice's answer.
async fn admit(
    req: &impl RequestHead,
    ctx: &ClientConn,
) -> Result<Admitted, Response<ResponseBody>> {
    let mut rec = Record {
        kind: "http",
        client: ctx.peer,
        listener: ctx.listener.clone(),
        route: String::new(),
        upstream: String::new(),
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        status: 0,
        start: Instant::now(),
        bytes_in: Arc::new(AtomicU64::new(0)),
        hold: None,
        tags: String::new(),
        close_hook: None,
    };
    let host = request_host(req);
    let path = normalize_path(req.uri().path());
    let Some(route) = ctx
        .snapshot
        .routes
        .find(&ctx.listener, host.as_deref(), &path)
        .cloned()
    else {
        return Err(respond(
            rec,
            StatusCode::NOT_FOUND,
            "no route for this request\n",
            &[],
        ));
    };
    rec.route = route.config.name.clone();
    let pool = match (&route.config.action, &route.pool) {
        (RouteAction::Respond { status, body }, _) => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::FORBIDDEN);
            return Err(respond(rec, status, body, &[]));
        }
        (RouteAction::Proxy(_), Some(pool)) => pool.clone(),
        (RouteAction::Proxy(_), None) => {
            return Err(respond(
                rec,
                StatusCode::BAD_GATEWAY,
                "route has no pool\n",
                &[],
            ));
        }
    };
    let (kind, ws_key) = match upgrade::classify(req.method(), req.version(), req.fields()) {
        Upgrade::Refused(r) => {
            let headers = upgrade::refusal_headers(&r);
            return Err(respond(rec, r.status, &format!("{}\n", r.reason), &headers));
        }
        Upgrade::WebSocket { key } => (RequestKind::WebSocket, Some(key)),
        Upgrade::None => (RequestKind::Http, None),
    };
    if !route.chain.is_empty() {
        rec.close_hook = Some(Arc::new(CloseHook {
            chain: route.chain.clone(),
            kind,
            tenant: route.config.tenant.clone(),
        }));
    }
    let verdict = match policy::decide(&route, &pool, &ctx.snapshot, req, kind, ctx.peer).await {
        Ok(v) => v,
        Err(denial) => return Err(deny(rec, denial)),
    };
    rec.tags = verdict.tags.clone();
    if let (Some(hook), Some(tenant)) = (&mut rec.close_hook, &verdict.tenant) {
        Arc::make_mut(hook).tenant = Some(tenant.clone());
    }
    let key = match (&verdict.sticky_key, verdict.pool.hash_key()) {
        (Some(k), Some(_)) => k.as_bytes().to_vec(),
        _ => hash_key(&verdict.pool, req, ctx.peer),
    };
    let plan = Plan {
        route,
        key,
        verdict,
    };
    Ok(Admitted { plan, rec, ws_key })
}

/// Where a routed, policy-approved request goes.
struct Plan {
    route: Arc<Route>,
    /// The consistent-hash key (empty unless the pool hashes).
    key: Vec<u8>,
    verdict: Verdict,
}

/// A plugin's refusal, sent as the plugin wrote it.
fn deny(mut rec: Record, denial: Denial) -> Response<ResponseBody> {
    let status = StatusCode::from_u16(denial.status).unwrap_or(StatusCode::FORBIDDEN);
    if !denial.plugin.is_empty() {
        let fields = denial
            .log_fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()));
        rec.tags =
            policy::tags(std::iter::once(("denied_by", denial.plugin.as_str())).chain(fields));
    }
    let mut resp = respond(rec, status, &denial.body, &[]);
    for (name, value) in &denial.headers {
        if let (Ok(n), Ok(v)) = (
            header::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            resp.headers_mut().append(n, v);
        }
    }
    resp
}

/// A response of Sluice's own, logged at once.
fn respond(
    mut rec: Record,
    status: StatusCode,
    body: &str,
    headers: &[(header::HeaderName, &'static str)],
) -> Response<ResponseBody> {
    rec.status = status.as_u16();
    let mut resp = Response::new(Counted::logged(
        Either::Right(Full::new(Bytes::copy_from_slice(body.as_bytes()))),
        rec,
    ));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    for (name, value) in headers {
        resp.headers_mut()
            .insert(name.clone(), HeaderValue::from_static(value));
    }
    resp
}

/// The 502 for a request no server of its pool would take.
fn no_upstream(rec: Record, route: &Route, e: &ConnectError) -> Response<ResponseBody> {
    tracing::warn!(route = %route.config.name, error = %e, "no upstream server available");
    respond(
        rec,
        StatusCode::BAD_GATEWAY,
        "no upstream server is available\n",
        &[],
    )
}

/// Relays an upstream response head and streamed body, logging when the body ends.
fn relay(mut rec: Record, resp: Response<Incoming>) -> Response<ResponseBody> {
    rec.status = resp.status().as_u16();
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Counted::logged(Either::Left(body), rec))
}

/// Relays a server's refusal of an upgrade (read whole by the handshake stage), framed
/// anew for the client.
fn relay_refusal(
    mut rec: Record,
    status: StatusCode,
    mut headers: HeaderMap,
    body: Bytes,
) -> Response<ResponseBody> {
    rec.status = status.as_u16();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::CONTENT_LENGTH);
    let mut resp = Response::new(Counted::logged(Either::Right(Full::new(body)), rec));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// The consistent-hash key for this request (empty unless the pool hashes). A request
/// without the configured header, cookie or parameter hashes on its client IP.
fn hash_key(pool: &Pool, req: &impl RequestHead, peer: SocketAddr) -> Vec<u8> {
    let found = match pool.hash_key() {
        None => return Vec::new(),
        Some(HashKey::ClientIp) => None,
        Some(HashKey::Header(name)) => req.fields().values_of(name).next().map(<[u8]>::to_vec),
        Some(HashKey::Cookie(name)) => cookie(req.fields(), name).map(|v| v.as_bytes().to_vec()),
        Some(HashKey::Query(name)) => req.uri().query().and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_bytes().to_vec())
        }),
    };
    found.unwrap_or_else(|| peer.ip().to_string().into_bytes())
}

fn cookie<'a>(fields: &'a impl Fields, name: &str) -> Option<&'a str> {
    fields
        .values_of(header::COOKIE.as_str())
        .filter_map(value_text)
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The head sent upstream: origin-form URI, the client's `headers` (already cleaned for
/// this hop by the caller: [`strip_hop_by_hop`], or [`set_upgrade_hop`] for an upgrade),
/// `Host` per the route, and the `X-Forwarded-*` headers.
fn upstream_head(
    uri: &Uri,
    mut headers: HeaderMap,
    plan: &Plan,
    authority: &str,
    peer: SocketAddr,
) -> (Uri, HeaderMap) {
    let route = &plan.route;
    let uri = uri
        .path_and_query()
        .map(|pq| Uri::from(pq.clone()))
        .unwrap_or_else(|| Uri::from_static("/"));
    // X-Forwarded-Host names the host the client asked for, before Host is rewritten.
    add_forwarded(&mut headers, peer, "http");
    if !keeps_client_host(route, headers.contains_key(header::HOST))
        && let Ok(v) = HeaderValue::from_str(authority)
    {
        headers.insert(header::HOST, v);
    }
    policy::apply(&plan.verdict, &mut headers);
    (uri, headers)
}

/// Whether the upstream request keeps the client's `Host`: `preserve_host` (the default),
/// and the client sent one that is not hop-by-hop. Otherwise `Host` names the server.
fn keeps_client_host(route: &Route, has_host: bool) -> bool {
    route.config.preserve_host && has_host
}

/// The client's upgrade request, in the form the stage that read it keeps.
enum ClientHead<'a> {
    /// Read by hyper: its fields in a header map.
    Map { uri: &'a Uri, headers: HeaderMap },
    /// Read by the client stage: its raw fields.
    Raw(&'a UpgradeHead),
}

/// Connects to a server and sends it the upgrade head in the same step
/// ([`connect::tcp_sending`]).
struct UpgradeAttempt<'a> {
    plan: &'a Plan,
    peer: SocketAddr,
    head: Head<'a>,
}

/// The upgrade head for the servers tried.
enum Head<'a> {
    /// `Host` is the client's (with `preserve_host`, the default): the same bytes for
    /// every server, made once.
    Fixed(Vec<u8>),
    /// `Host` names the server: made for each server tried, from the client's head.
    PerServer(ClientHead<'a>),
}

impl<'a> UpgradeAttempt<'a> {
    /// The client's raw fields are written upstream without a header map unless a plugin
    /// edits them (header changes or a subprotocol), which is done on a map.
    fn new(client: ClientHead<'a>, plan: &'a Plan, peer: SocketAddr) -> Self {
        let edits = !plan.verdict.headers.is_empty() || plan.verdict.subprotocol.is_some();
        let client = match client {
            ClientHead::Raw(req) if edits => ClientHead::Map {
                uri: req.uri(),
                headers: req.fields().to_map(),
            },
            client => client,
        };
        let head = match client {
            ClientHead::Raw(req) => {
                // Made at once with the client's `Host`, and kept if it had one.
                let fixed = plan
                    .route
                    .config
                    .preserve_host
                    .then(|| handshake::request_head_raw(req.uri(), req.fields(), None, peer));
                match fixed {
                    Some((head, true)) => Head::Fixed(head),
                    _ => Head::PerServer(ClientHead::Raw(req)),
                }
            }
            ClientHead::Map { uri, mut headers } => {
                // Cleaned for the hop once, for every server tried; the `Host` decision
                // sees what goes upstream (a `Host` listed in `Connection` does not).
                set_upgrade_hop(&mut headers);
                if keeps_client_host(&plan.route, headers.contains_key(header::HOST)) {
                    // No server's authority is written: the client's Host stays.
                    let (uri, headers) = upstream_head(uri, headers, plan, "", peer);
                    Head::Fixed(handshake::request_head(&uri, &headers))
                } else {
                    Head::PerServer(ClientHead::Map { uri, headers })
                }
            }
        };
        UpgradeAttempt { plan, peer, head }
    }
}

impl connect::Attempt for UpgradeAttempt<'_> {
    type Output = TcpStream;
    async fn attempt(&mut self, server: &Arc<Server>) -> std::io::Result<TcpStream> {
        let pool = &self.plan.verdict.pool;
        let authority = server.config.authority.as_str();
        let head = match &self.head {
            Head::Fixed(head) => return connect::tcp_sending(pool, server, head).await,
            Head::PerServer(ClientHead::Raw(req)) => {
                handshake::request_head_raw(req.uri(), req.fields(), Some(authority), self.peer).0
            }
            Head::PerServer(ClientHead::Map { uri, headers }) => {
                let (uri, headers) =
                    upstream_head(uri, headers.clone(), self.plan, authority, self.peer);
                handshake::request_head(&uri, &headers)
            }
        };
        connect::tcp_sending(pool, server, &head).await
    }
}

/// An upstream that answered the upgrade with a valid `101`.
struct Opened {
    /// The server's `101` fields for the client's `101`: its end-to-end ones (the client
    /// stage or hyper adds exactly one `Upgrade`/`Connection` pair).
    head: Switch,
    /// The server's end of the tunnel.
    server: End,
    /// Counts the tunnel as active on its server.
    guard: ActiveGuard,
    rec: Record,
    idle: Option<std::time::Duration>,
}

/// Connects to a server of the plan's pool and completes the WebSocket handshake with it;
/// any failure or refusal is the client's answer instead.
async fn open(
    client: ClientHead<'_>,
    ws_key: String,
    plan: Plan,
    mut rec: Record,
    ctx: &ClientConn,
) -> Result<Opened, Response<ResponseBody>> {
    let (route, pool) = (&plan.route, &plan.verdict.pool);
    let attempt = UpgradeAttempt::new(client, &plan, ctx.peer);
    let (server, stream) = match with_failover(pool, &plan.key, attempt).await {
        Ok(s) => s,
        Err(e) => return Err(no_upstream(rec, route, &e)),
    };
    rec.upstream = server.config.authority.clone();
    let guard = server.acquire();
    let outcome = tokio::time::timeout(
        route.config.handshake_timeout,
        handshake::handshake(stream, &ws_key),
    )
    .await;
    let (head, server_end) = match outcome {
        Err(_) => {
            tracing::warn!(route = %route.config.name, upstream = %rec.upstream, "upstream WebSocket handshake timed out");
            return Err(respond(
                rec,
                StatusCode::GATEWAY_TIMEOUT,
                "upstream did not answer the WebSocket handshake in time\n",
                &[],
            ));
        }
        Ok(Err(e)) => {
            tracing::warn!(route = %route.config.name, upstream = %rec.upstream, error = %e, "upstream WebSocket handshake refused");
            return Err(respond(
                rec,
                StatusCode::BAD_GATEWAY,
                "upstream sent an invalid WebSocket handshake\n",
                &[],
            ));
        }
        Ok(Ok(Outcome::Declined {
            status,
            headers,
            body,
        })) => return Err(relay_refusal(rec, status, headers, body)),
        Ok(Ok(Outcome::Upgraded { head, server })) => (head, server),
    };
    rec.kind = "tunnel";
    rec.status = 101;
    Ok(Opened {
        head,
        server: server_end,
        guard,
        rec,
        idle: route.config.idle_timeout,
    })
}

/// The `101` for hyper, and the tunnel task that starts once hyper hands the client's
/// connection over.
fn switch(
    opened: Opened,
    on_upgrade: hyper::upgrade::OnUpgrade,
    ctx: Arc<ClientConn>,
) -> Response<ResponseBody> {
    let mut resp = Response::new(Counted::new(
        Either::Right(Full::new(Bytes::new())),
        Arc::new(AtomicU64::new(0)),
    ));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = opened.head.header_map();
    let tracker = ctx.gw.tracker().clone();
    tracker.spawn(async move {
        match on_upgrade.await.map(|u| u.downcast::<TokioIo<Prefixed>>()) {
            Ok(Ok(parts)) => {
                let (stream, unread) = parts.io.into_inner().into_parts();
                // Bytes hyper had not read of the first head come before its read-ahead.
                let early = if unread.is_empty() {
                    End::detach(parts.read_buf)
                } else {
                    [unread, parts.read_buf].concat().into()
                };
                Ready::new(ctx, stream, early, opened).run().await;
            }
            _ => tracing::warn!(client = %opened.rec.client, "client upgrade did not complete"),
        }
    });
    resp
}

async fn forward(
    req: Request<Incoming>,
    plan: Plan,
    mut rec: Record,
    ctx: &ClientConn,
) -> Response<ResponseBody> {
    let (route, pool) = (&plan.route, &plan.verdict.pool);
    let conns = ctx.gw.upstream_conns();
    let attempt = Pooled { pool, conns };
    let (server, Conn { mut sender, reused }) = match with_failover(pool, &plan.key, attempt).await
    {
        Ok(s) => s,
        Err(e) => return no_upstream(rec, route, &e),
    };
    rec.upstream = server.config.authority.clone();
    // Counted as active on the server until the response body is done (or dropped).
    rec.hold = Some(Arc::new(server.acquire()));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let (uri, headers) = upstream_head(
        &parts.uri,
        parts.headers,
        &plan,
        &server.config.authority,
        ctx.peer,
    );
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
        match forward::open(pool, &server).await {
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
            conns.recycle(server.config.addr, sender);
            relay(rec, resp)
        }
    }
}
