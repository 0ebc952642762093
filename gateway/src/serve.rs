//! HTTP stage: serves one client connection with hyper (HTTP/1.1 with upgrades, bounded
//! head size and head-read time) and walks each request through the later stages:
//! route → (policy) → select/connect → handshake + tunnel, or forward.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::access::{CloseHook, Counted, Record};
use crate::balance::Pool;
use crate::config::{HashKey, RouteAction};
use crate::connect::{self, ConnectError, with_failover};
use crate::forward::{self, Conn, Pooled};
use crate::gateway::Gateway;
use crate::handshake::{self, Outcome};
use crate::headers::{add_forwarded, strip_hop_by_hop};
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
pub async fn connection(
    gw: Arc<Gateway>,
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<str>,
    permit: OwnedSemaphorePermit,
) {
    let snapshot = gw.snapshot();
    let Some(limits) = snapshot
        .config
        .listeners
        .iter()
        .find(|l| *l.name == *listener)
        .cloned()
    else {
        return;
    };
    let ctx = Arc::new(ClientConn {
        gw: gw.clone(),
        snapshot,
        listener,
        peer,
        _permit: permit,
    });
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(req, ctx).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_size)
        .serve_connection(TokioIo::new(stream), svc)
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

async fn handle(mut req: Request<Incoming>, ctx: Arc<ClientConn>) -> Response<ResponseBody> {
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
    let host = request_host(&req);
    let path = normalize_path(req.uri().path());
    let Some(route) = ctx
        .snapshot
        .routes
        .find(&ctx.listener, host.as_deref(), &path)
        .cloned()
    else {
        return respond(
            rec,
            StatusCode::NOT_FOUND,
            "no route for this request\n",
            &[],
        );
    };
    rec.route = route.config.name.clone();
    let pool = match (&route.config.action, &route.pool) {
        (RouteAction::Respond { status, body }, _) => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::FORBIDDEN);
            return respond(rec, status, body, &[]);
        }
        (RouteAction::Proxy(_), Some(pool)) => pool.clone(),
        (RouteAction::Proxy(_), None) => {
            return respond(rec, StatusCode::BAD_GATEWAY, "route has no pool\n", &[]);
        }
    };
    let upgrade = upgrade::classify(req.method(), req.version(), req.headers());
    let kind = match &upgrade {
        Upgrade::Refused(r) => {
            let headers = upgrade::refusal_headers(r);
            return respond(rec, r.status, &format!("{}\n", r.reason), &headers);
        }
        Upgrade::WebSocket { .. } => RequestKind::WebSocket,
        Upgrade::None => RequestKind::Http,
    };
    if !route.chain.is_empty() {
        rec.close_hook = Some(Arc::new(CloseHook {
            chain: route.chain.clone(),
            kind,
            tenant: route.config.tenant.clone(),
        }));
    }
    let verdict = match policy::decide(&route, &pool, &ctx.snapshot, &req, kind, ctx.peer).await {
        Ok(v) => v,
        Err(denial) => return deny(rec, denial),
    };
    rec.tags = verdict.tags.clone();
    if let (Some(hook), Some(tenant)) = (&mut rec.close_hook, &verdict.tenant) {
        Arc::make_mut(hook).tenant = Some(tenant.clone());
    }
    let key = match (&verdict.sticky_key, verdict.pool.hash_key()) {
        (Some(k), Some(_)) => k.as_bytes().to_vec(),
        _ => hash_key(&verdict.pool, &req, ctx.peer),
    };
    let plan = Plan {
        route,
        key,
        verdict,
    };
    match upgrade {
        Upgrade::WebSocket { key: ws_key } => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            websocket(req, ws_key, on_upgrade, plan, rec, ctx).await
        }
        _ => forward(req, plan, rec, &ctx).await,
    }
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
        rec.tags = format!("denied_by={}", denial.plugin);
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
fn hash_key<B>(pool: &Pool, req: &Request<B>, peer: SocketAddr) -> Vec<u8> {
    let found = match pool.hash_key() {
        None => return Vec::new(),
        Some(HashKey::ClientIp) => None,
        Some(HashKey::Header(name)) => req
            .headers()
            .get(name.as_str())
            .map(|v| v.as_bytes().to_vec()),
        Some(HashKey::Cookie(name)) => cookie(req.headers(), name).map(|v| v.as_bytes().to_vec()),
        Some(HashKey::Query(name)) => req.uri().query().and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_bytes().to_vec())
        }),
    };
    found.unwrap_or_else(|| peer.ip().to_string().into_bytes())
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The head sent upstream: origin-form URI, cleaned headers, `Host` per the route, and
/// the `X-Forwarded-*` headers.
fn upstream_head(
    uri: &Uri,
    headers: &HeaderMap,
    plan: &Plan,
    authority: &str,
    peer: SocketAddr,
) -> (Uri, HeaderMap) {
    let route = &plan.route;
    let uri = uri
        .path_and_query()
        .map(|pq| Uri::from(pq.clone()))
        .unwrap_or_else(|| Uri::from_static("/"));
    let mut headers = headers.clone();
    strip_hop_by_hop(&mut headers);
    // X-Forwarded-Host names the host the client asked for, before Host is rewritten.
    add_forwarded(&mut headers, peer, "http");
    if (!route.config.preserve_host || !headers.contains_key(header::HOST))
        && let Ok(v) = HeaderValue::from_str(authority)
    {
        headers.insert(header::HOST, v);
    }
    policy::apply(&plan.verdict, &mut headers);
    (uri, headers)
}

async fn websocket(
    req: Request<Incoming>,
    ws_key: String,
    on_upgrade: hyper::upgrade::OnUpgrade,
    plan: Plan,
    mut rec: Record,
    ctx: Arc<ClientConn>,
) -> Response<ResponseBody> {
    let (route, pool) = (&plan.route, &plan.verdict.pool);
    let (server, stream) = match with_failover(pool, &plan.key, connect::Tcp(pool)).await {
        Ok(s) => s,
        Err(e) => return no_upstream(rec, route, &e),
    };
    rec.upstream = server.config.authority.clone();
    let guard = server.acquire();
    let (uri, mut headers) = upstream_head(
        req.uri(),
        req.headers(),
        &plan,
        &server.config.authority,
        ctx.peer,
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let outcome = tokio::time::timeout(
        route.config.handshake_timeout,
        handshake::handshake(stream, &uri, &headers, &ws_key),
    )
    .await;
    let (head, server_end) = match outcome {
        Err(_) => {
            tracing::warn!(route = %route.config.name, upstream = %rec.upstream, "upstream WebSocket handshake timed out");
            return respond(
                rec,
                StatusCode::GATEWAY_TIMEOUT,
                "upstream did not answer the WebSocket handshake in time\n",
                &[],
            );
        }
        Ok(Err(e)) => {
            tracing::warn!(route = %route.config.name, upstream = %rec.upstream, error = %e, "upstream WebSocket handshake refused");
            return respond(
                rec,
                StatusCode::BAD_GATEWAY,
                "upstream sent an invalid WebSocket handshake\n",
                &[],
            );
        }
        Ok(Ok(Outcome::Declined {
            status,
            headers,
            body,
        })) => return relay_refusal(rec, status, headers, body),
        Ok(Ok(Outcome::Upgraded { headers, server })) => (headers, server),
    };
    // The client gets the server's 101 head (cookies, subprotocol, extensions...) minus
    // hop-by-hop headers, and exactly one Upgrade/Connection pair.
    let mut resp = Response::new(Counted::new(
        Either::Right(Full::new(Bytes::new())),
        Arc::new(AtomicU64::new(0)),
    ));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = head;
    strip_hop_by_hop(resp.headers_mut());
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    rec.kind = "tunnel";
    rec.status = 101;
    let idle = route.config.idle_timeout;
    let gw = ctx.gw.clone();
    let tracker = gw.tracker().clone();
    tracker.spawn(async move {
        let _guard = guard;
        let _ctx = ctx;
        let client_end = match on_upgrade.await.map(|u| u.downcast::<TokioIo<TcpStream>>()) {
            Ok(Ok(parts)) => End {
                stream: parts.io.into_inner(),
                early: End::detach(parts.read_buf),
            },
            _ => {
                tracing::warn!(client = %rec.client, "client upgrade did not complete");
                return;
            }
        };
        let report = tunnel::relay(client_end, server_end, idle, gw.closing()).await;
        rec.log_tunnel(&report);
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
    let (parts, body) = req.into_parts();
    let (uri, headers) = upstream_head(
        &parts.uri,
        &parts.headers,
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
