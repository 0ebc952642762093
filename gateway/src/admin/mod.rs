//! The admin listener (`[admin]`): `/metrics` (Prometheus text), `/status` and
//! `/upstreams` (JSON), the status page at `/`, `POST /reload` and `POST /drain`. It runs
//! on the control runtime, never on a worker, so scrapes and page refreshes cost tunnels
//! nothing. Bound to loopback unless a bearer token guards it (config validation refuses
//! a public address without one); HTTPS with `[admin.tls]`.

mod exposition;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{HostMatch, RouteAction};
use crate::snapshot::{self, Snapshot};
use crate::state::{Command, Gateway, ReloadEvent, Trigger};

/// The status page: one HTML file with its CSS and script inline, no build step.
const STATUS_PAGE: &str = include_str!("status.html");

/// Admin connections served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 32;

/// Time a client has to send a request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the admin address.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// A running admin listener.
pub struct Admin {
    stop: CancellationToken,
}

impl Admin {
    /// Serves `listener` until [`Admin::stop`].
    pub fn start(gw: Arc<Gateway>, listener: TcpListener) -> Admin {
        let stop = CancellationToken::new();
        if let Ok(addr) = listener.local_addr() {
            let tls = gw.snapshot().admin_tls.is_some();
            tracing::info!(%addr, tls, "admin listening");
            if !tls && !addr.ip().is_loopback() {
                tracing::warn!(
                    %addr,
                    "the admin listener takes its token over plain HTTP from other hosts; \
                     [admin.tls] keeps it off the wire"
                );
            }
            println!("admin {addr}");
        }
        tokio::spawn(serve(gw, listener, stop.clone()));
        Admin { stop }
    }

    /// Stops accepting and ends its connections.
    pub fn stop(self) {
        self.stop.cancel();
    }
}

async fn serve(gw: Arc<Gateway>, listener: TcpListener, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let exposition = Arc::new(exposition::Exposition::new(gw.clone()));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        // The current snapshot's certificates: a reload rotates them for new connections.
        let tls = gw.snapshot().admin_tls.clone();
        let (gw, exposition, stop) = (gw.clone(), exposition.clone(), stop.clone());
        tokio::spawn(async move {
            let served = async {
                match tls {
                    None => connection(stream, gw, exposition).await,
                    Some(tls) => match tls.accept(stream).await {
                        Ok((stream, _)) => connection(stream, gw, exposition).await,
                        Err(e) => tracing::debug!(error = %e, "admin TLS handshake failed"),
                    },
                }
            };
            tokio::select! {
                () = served => {}
                () = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
}

/// Serves one admin connection (plain or TLS) until it ends.
async fn connection<S>(stream: S, gw: Arc<Gateway>, exposition: Arc<exposition::Exposition>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let (gw, exposition) = (gw.clone(), exposition.clone());
        async move { Ok::<_, Infallible>(handle(req, &gw, &exposition).await) }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "admin connection ended with an error");
    }
}

type Body = Full<Bytes>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `405` naming the methods the path takes.
fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = reply(
        StatusCode::METHOD_NOT_ALLOWED,
        "text/plain",
        "method not allowed\n",
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

fn json_reply(status: StatusCode, v: &Value) -> Response<Body> {
    reply(status, "application/json", format!("{v:#}\n"))
}

async fn handle(
    req: Request<Incoming>,
    gw: &Arc<Gateway>,
    exposition: &exposition::Exposition,
) -> Response<Body> {
    let snapshot = gw.snapshot();
    let token = snapshot
        .config
        .admin
        .as_ref()
        .and_then(|a| a.token.as_deref());
    if let Some(token) = token
        && !authorized(&req, token)
    {
        let mut r = reply(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "a valid admin token is required\n",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"sluice admin\", Bearer realm=\"sluice admin\""),
        );
        return r;
    }
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/") => {
            let mut r = reply(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE);
            r.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
                ),
            );
            r
        }
        (&Method::GET | &Method::HEAD, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            exposition.encode(),
        ),
        (&Method::GET | &Method::HEAD, "/status") => {
            json_reply(StatusCode::OK, &status(gw, &snapshot))
        }
        (&Method::GET | &Method::HEAD, "/upstreams") => {
            json_reply(StatusCode::OK, &upstreams(&snapshot))
        }
        (&Method::POST, "/reload") => {
            drop(snapshot);
            let (tx, rx) = oneshot::channel();
            let sent = gw.command(Command::Reload {
                trigger: Trigger::Admin,
                reply: Some(tx),
            });
            match (sent, rx.await) {
                (true, Ok(event)) => {
                    let status = if event.error.is_none() {
                        StatusCode::OK
                    } else {
                        StatusCode::UNPROCESSABLE_ENTITY
                    };
                    json_reply(status, &reload_json(&event))
                }
                _ => json_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"ok": false, "error": "the gateway is shutting down or busy"}),
                ),
            }
        }
        (&Method::POST, "/drain") => {
            let sent = gw.command(Command::Drain);
            let status = if sent {
                StatusCode::ACCEPTED
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_reply(status, &json!({"draining": sent}))
        }
        (_, "/" | "/metrics" | "/status" | "/upstreams") => not_allowed("GET, HEAD"),
        (_, "/reload" | "/drain") => not_allowed("POST"),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Whether the request carries the token: `Authorization: Bearer TOKEN`, or HTTP Basic
/// with the token as the password (what a browser sends after its login prompt, so the
/// status page works in a browser).
fn authorized<B>(req: &Request<B>, token: &str) -> bool {
    let Some(value) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let given = match value.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim().as_bytes().to_vec(),
        Some((scheme, b)) if scheme.eq_ignore_ascii_case("basic") => {
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(b.trim()) else {
                return false;
            };
            match decoded.iter().position(|c| *c == b':') {
                Some(i) => decoded[i + 1..].to_vec(),
                None => return false,
            }
        }
        _ => return false,
    };
    same(&given, token.as_bytes())
}

/// Compares in time that depends only on the lengths, not on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn reload_json(e: &ReloadEvent) -> Value {
    json!({
        "at_unix_ms": unix_ms(e.at),
        "trigger": e.trigger.as_str(),
        "ok": e.error.is_none(),
        "generation": e.generation,
        "error": e.error,
        "duration_ms": e.duration.as_millis() as u64,
    })
}

/// `GET /status`.
fn status(gw: &Gateway, s: &Snapshot) -> Value {
    let reloads: Vec<Value> = gw.reloads().iter().map(reload_json).collect();
    let listeners: Vec<Value> = s
        .listeners
        .iter()
        .map(|(name, l)| {
            let tls = s
                .config
                .listeners
                .iter()
                .any(|c| *c.name == **name && c.tls.is_some());
            json!({
                "name": &**name,
                "addr": l.addr.to_string(),
                "tls": tls,
                "connections_open": l.open(),
                "max_connections": l.max(),
            })
        })
        .collect();
    let routes: Vec<Value> = s
        .routes
        .iter()
        .map(|r| {
            let c = &r.config;
            let (upstream, status) = match &c.action {
                RouteAction::Proxy(p) => (Some(p.as_str()), None),
                RouteAction::Respond { status, .. } => (None, Some(*status)),
            };
            let host = c.host.as_ref().map(|h| match h {
                HostMatch::Exact(h) => h.clone(),
                HostMatch::Suffix(s) => format!("*{s}"),
            });
            json!({
                "name": c.name,
                "listeners": c.listeners,
                "host": host,
                "path_prefix": c.path_prefix,
                "upstream": upstream,
                "status": status,
                "plugins": c.plugins,
                "tenant": c.tenant,
                "tunnels_open": r.stats.tunnels_open.load(std::sync::atomic::Ordering::Relaxed),
                "handshakes": r.stats.handshakes.total(),
                "requests": r.stats.requests.total(),
            })
        })
        .collect();
    let mut plugins: Vec<(&str, _)> = s.plugins().collect();
    plugins.sort_by_key(|(n, _)| *n);
    let plugins: Vec<Value> = plugins
        .into_iter()
        .map(|(name, p)| {
            let st = p.stats();
            let documents: Vec<Value> = p
                .documents()
                .into_iter()
                .map(|d| {
                    json!({
                        "url": d.url,
                        "version": d.version,
                        "bytes": d.bytes,
                        "fetched_at_unix_ms": d.fetched_at.map(unix_ms),
                        "failures_in_a_row": d.failures_in_a_row,
                        "error": d.error,
                    })
                })
                .collect();
            json!({
                "name": name,
                "calls": st.calls,
                "reused": st.reused,
                "denies": st.denies,
                "faults": st.faults,
                "timeouts": st.timeouts,
                "memory_faults": st.memory_faults,
                "documents": documents,
            })
        })
        .collect();
    let tenants: Vec<Value> = s
        .limits
        .tenants()
        .into_iter()
        .map(|(c, t)| {
            let rate = |r: Option<crate::config::Rate>| r.map(|r| r.per_second);
            json!({
                "name": c.name,
                "tunnels_open": t.stats.tunnels_open.load(std::sync::atomic::Ordering::Relaxed),
                "tunnel_limit": c.limits.tunnels,
                "handshake_rate": rate(c.limits.handshakes),
                "request_rate": rate(c.limits.requests),
                "handshakes": t.stats.handshakes.total(),
                "requests": t.stats.requests.total(),
                "limited": t.refused(),
            })
        })
        .collect();
    let cluster = s.limits.cluster().map(|c| {
        json!({
            "redis": c.config().redis,
            "up": c.stats.up.load(std::sync::atomic::Ordering::Relaxed),
        })
    });
    let tunnels: i64 = gw
        .metrics()
        .routes()
        .iter()
        .map(|r| r.tunnels_open.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_unix": unix_ms(gw.started) / 1000,
        "uptime_seconds": gw.started.elapsed().map_or(0, |d| d.as_secs()),
        "generation": s.generation,
        "generations_alive": snapshot::generations_alive(),
        "draining": gw.stopping().is_cancelled(),
        "connections_open": s.listeners.iter().map(|(_, l)| l.open()).sum::<usize>(),
        "tunnels_open": tunnels,
        "last_reload": reloads.first(),
        "reloads": reloads,
        "listeners": listeners,
        "routes": routes,
        "plugins": plugins,
        "tenants": tenants,
        "cluster": cluster,
        "limit_clients": gw.limiter().clients(),
    })
}

/// `GET /upstreams`.
fn upstreams(s: &Snapshot) -> Value {
    let mut pools: Vec<_> = s.pools.values().collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    let pools: Vec<Value> = pools
        .into_iter()
        .map(|p| {
            let servers: Vec<Value> = p
                .servers
                .iter()
                .map(|sv| {
                    let (failures, ejections) = sv.failures();
                    json!({
                        "addr": sv.config.addr.to_string(),
                        "authority": sv.config.authority,
                        "tls": sv.config.tls,
                        "state": server_state(sv),
                        "active": sv.active(),
                        "connect_failures": failures,
                        "ejections": ejections,
                    })
                })
                .collect();
            json!({
                "name": p.name,
                "balance": balance_name(&p.balance),
                "servers": servers,
            })
        })
        .collect();
    json!({ "pools": pools })
}

/// `healthy`, `unhealthy` (the active check says so) or `ejected` (passively, for now).
fn server_state(s: &crate::balance::Server) -> &'static str {
    if !s.is_healthy() {
        "unhealthy"
    } else if s.is_ejected() {
        "ejected"
    } else {
        "healthy"
    }
}

fn balance_name(b: &crate::config::Balance) -> &'static str {
    match b {
        crate::config::Balance::RoundRobin => "round-robin",
        crate::config::Balance::LeastConn => "least-conn",
        crate::config::Balance::Hash(_) => "hash",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: &str) -> Request<()> {
        Request::builder()
            .header(header::AUTHORIZATION, value)
            .body(())
            .unwrap()
    }

    #[test]
    fn the_token_is_accepted_as_bearer_or_basic_password_only() {
        let token = "0123456789abcdef";
        assert!(authorized(&with_auth("Bearer 0123456789abcdef"), token));
        assert!(authorized(&with_auth("bearer  0123456789abcdef "), token));
        let basic = base64::engine::general_purpose::STANDARD.encode("ops:0123456789abcdef");
        assert!(authorized(&with_auth(&format!("Basic {basic}")), token));
        assert!(!authorized(&with_auth("Bearer 0123456789abcdeX"), token));
        assert!(!authorized(&with_auth("Bearer 0123456789abcde"), token));
        assert!(!authorized(&with_auth("Token 0123456789abcdef"), token));
        let no_colon = base64::engine::general_purpose::STANDARD.encode("0123456789abcdef");
        assert!(!authorized(&with_auth(&format!("Basic {no_colon}")), token));
        assert!(!authorized(&Request::new(()), token));
    }
}
