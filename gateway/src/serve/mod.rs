//! Connection driver: serves one client connection, over any [`Stream`], from its first
//! request head to its end, handing each request to admission (`admit`) and then to the
//! upstream upgrade (`open`) and the tunnel, or to `forward`.
//!
//! A first request that asks for a WebSocket is read and answered straight on the stream
//! (the client stage), and its tunnel runs in this same task. Everything else — and
//! whatever follows an upgrade that was refused — is served by hyper (HTTP/1.1 with
//! upgrades, bounded head size and head-read time). A connection that speaks HTTP/2 (by
//! ALPN, or by prior knowledge where the listener allows `h2c`) goes to [`h2`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::OptionFuture;
use http::header;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::access::Counted;
use crate::admit::{Admitted, Caller, admit};
use crate::balance::ActiveGuard;
use crate::client::{self, FirstHead, Payload, Prefixed};
use crate::config::{Http2Config, ListenerConfig};
use crate::connect::Upstream;
use crate::forward::forward;
use crate::head::{RequestHead, UpgradeHead};
use crate::headers::has_token;
use crate::listener::Permit;
use crate::open::{ClientHead, Opened, open};
use crate::respond::{ResponseBody, respond};
use crate::snapshot::Snapshot;
use crate::state::Gateway;
use crate::stream::Stream;
use crate::tls::Facts;
use crate::tunnel::{self, Side};

mod h2;

/// Everything one client connection needs; shared by its requests and its tunnel. It
/// holds no snapshot: each request takes the newest one, and a tunnel keeps the one it
/// was admitted under.
pub struct ClientConn {
    gw: Arc<Gateway>,
    listener: Arc<str>,
    peer: SocketAddr,
    /// The client's TLS session, on a TLS listener.
    tls: Option<Arc<Facts>>,
    /// Held until the connection and any tunnel it became have ended.
    permit: Permit,
}

impl ClientConn {
    /// What admission reads of this connection, under `snapshot`.
    fn caller<'a>(&'a self, snapshot: &'a Snapshot) -> Caller<'a> {
        Caller {
            snapshot,
            listener: &self.listener,
            peer: self.peer,
            tls: self.tls.as_ref(),
        }
    }
}

/// Serves one accepted connection until it closes, upgrades, or the gateway shuts down.
///
/// The first request head is read by the client stage. A WebSocket upgrade is answered
/// here, and its tunnel runs in this same task; any other request (and whatever follows
/// an upgrade that was refused) is served by hyper.
pub fn connection<S: Stream>(
    gw: Arc<Gateway>,
    snapshot: Arc<Snapshot>,
    stream: S,
    peer: SocketAddr,
    listener: Arc<str>,
    tls: Option<Arc<Facts>>,
    permit: Permit,
) -> impl Future<Output = ()> + Send {
    let ctx = ClientConn {
        gw,
        listener,
        peer,
        tls,
        permit,
    };
    // Everything before the tunnel is boxed, and the rest is put together from
    // pin-projected combinators rather than `async` blocks, which keep a value moved into
    // an `.await` twice: an upgraded connection's task holds only the tunnel's state.
    Box::pin(prepare(ctx, snapshot, stream))
        .then(|ready| OptionFuture::from(ready.map(Ready::run)))
        .map(drop)
}

/// Reads the first head and answers it under `snapshot` (the one of the accept); `Some`
/// once a `101` has gone to the client.
async fn prepare<S: Stream>(
    ctx: ClientConn,
    snapshot: Arc<Snapshot>,
    mut stream: S,
) -> Option<Ready<S>> {
    let limits = snapshot
        .config
        .listeners
        .iter()
        .find(|l| *l.name == *ctx.listener)
        .map(HeadLimits::of)
        .unwrap_or_default();
    let ctx = Arc::new(ctx);
    if ctx.tls.as_ref().is_some_and(|t| t.is_h2()) {
        drop(snapshot);
        Box::pin(h2::serve(ctx, stream, limits)).await;
        return None;
    }
    let gw = ctx.gw.clone();
    let first = tokio::select! {
        head = client::read_first(&mut stream, limits.max_header_size, limits.header_read_timeout) => head,
        () = gw.stopping().cancelled() => return None,
    };
    let (req, rest) = match first {
        FirstHead::Gone => return None,
        FirstHead::Other(read) => {
            drop(snapshot);
            let io = Prefixed::new(read, stream);
            if limits.http2.is_some() && h2::is_preface(io.prefix()) {
                Box::pin(h2::serve(ctx, io, limits)).await;
            } else {
                Box::pin(serve_http(ctx, io, limits)).await;
            }
            return None;
        }
        FirstHead::Upgrade { req, rest } => (req, rest),
    };
    match upgrade_direct(&mut stream, req, &ctx, &snapshot).await {
        Direct::Tunnel(opened) => Some(Ready::new(
            ctx,
            snapshot,
            stream,
            tunnel::detach(rest),
            opened,
        )),
        Direct::KeepAlive => {
            drop(snapshot);
            Box::pin(serve_http(ctx, Prefixed::new(rest, stream), limits)).await;
            None
        }
        Direct::Closed => None,
    }
}

/// A tunnel whose `101` has gone to the client: what it needs while it runs.
struct Ready<S> {
    /// Holds the connection permit.
    ctx: Arc<ClientConn>,
    /// The snapshot the tunnel was admitted under: its generation stays alive (and
    /// counted) until the tunnel ends.
    snapshot: Arc<Snapshot>,
    client: Side<S>,
    server: Side<Upstream>,
    guard: ActiveGuard,
    rec: crate::access::Record,
    idle: Option<Duration>,
    bandwidth: Option<u64>,
}

impl<S: Stream> Ready<S> {
    fn new(
        ctx: Arc<ClientConn>,
        snapshot: Arc<Snapshot>,
        stream: S,
        early: Bytes,
        opened: Opened,
    ) -> Ready<S> {
        opened.rec.tunnel_opened();
        Ready {
            ctx,
            snapshot,
            client: Side { stream, early },
            server: opened.server,
            guard: opened.guard,
            bandwidth: opened.rec.admission.as_ref().and_then(|a| a.bandwidth),
            rec: opened.rec,
            idle: opened.idle,
        }
    }

    /// Relays until the tunnel ends, then logs it.
    fn run(self) -> impl Future<Output = ()> + Send {
        let Ready {
            ctx,
            snapshot,
            client,
            server,
            guard,
            rec,
            idle,
            bandwidth,
        } = self;
        tunnel::relay(client, server, idle, bandwidth, ctx.gw.closing().clone()).map(
            move |report| {
                rec.log_tunnel(&report);
                drop((guard, ctx, snapshot));
            },
        )
    }
}

/// A listener's bounds on request heads, and its HTTP/2 settings.
#[derive(Clone)]
struct HeadLimits {
    max_header_size: usize,
    header_read_timeout: Duration,
    /// `Some` when the listener serves HTTP/2.
    http2: Option<Http2Config>,
}

impl Default for HeadLimits {
    /// The config's defaults, for a connection whose listener a reload has just removed.
    fn default() -> Self {
        HeadLimits {
            max_header_size: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
            http2: None,
        }
    }
}

impl HeadLimits {
    fn of(l: &ListenerConfig) -> HeadLimits {
        HeadLimits {
            max_header_size: l.max_header_size,
            header_read_timeout: l.header_read_timeout,
            http2: l.http2.clone(),
        }
    }
}

/// Serves a connection with hyper: plain requests, keep-alive, and upgrades that follow a
/// plain request.
async fn serve_http<S: Stream>(ctx: Arc<ClientConn>, io: Prefixed<S>, limits: HeadLimits) {
    let gw = ctx.gw.clone();
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(req, ctx, switch::<S>).await) }
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

/// Walks an upgrade head through admission and the upstream upgrade, and writes the
/// client's answer itself.
async fn upgrade_direct<S: Stream>(
    stream: &mut S,
    req: UpgradeHead,
    ctx: &Arc<ClientConn>,
    snapshot: &Snapshot,
) -> Direct {
    let close = client::closes_after(&req);
    let head_only = req.method() == Method::HEAD;
    let resp = match admit(&req, ctx.caller(snapshot)).await {
        Err(resp) => resp,
        Ok(Admitted {
            plan,
            rec,
            ws_key: Some(ws_key),
        }) => match open(ClientHead::Raw(&req), ws_key, plan, rec).await {
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
    let body = Payload {
        bytes: &body,
        send: !head_only,
    };
    match client::write_response(stream, parts.status, &parts.headers, body, close).await {
        Ok(()) if !close => Direct::KeepAlive,
        _ => Direct::Closed,
    }
}

/// One request hyper read: admitted, then upgraded or forwarded. `switch` answers an
/// upgrade the upstream accepted and starts its tunnel once hyper hands the client's
/// stream over: [`switch`] (a `101` on HTTP/1.1) or `h2::switch` (a `200` to an extended
/// CONNECT).
async fn handle(
    mut req: Request<Incoming>,
    ctx: Arc<ClientConn>,
    switch: impl FnOnce(
        Opened,
        hyper::upgrade::OnUpgrade,
        Arc<ClientConn>,
        Arc<Snapshot>,
    ) -> Response<ResponseBody>,
) -> Response<ResponseBody> {
    // Each request of a keep-alive connection meets the newest config.
    let snapshot = ctx.gw.snapshot();
    let Admitted { plan, rec, ws_key } = match admit(&req, ctx.caller(&snapshot)).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    match ws_key {
        Some(ws_key) => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            let mut headers = std::mem::take(req.headers_mut());
            // An HTTP/2 client sends no key (RFC 8441 §5): the upstream gets the one
            // admission minted, whose accept value `open` checks.
            if let Ok(key) = http::HeaderValue::from_str(&ws_key) {
                headers.entry(header::SEC_WEBSOCKET_KEY).or_insert(key);
            }
            let head = ClientHead::Map {
                uri: req.uri(),
                headers,
            };
            match open(head, ws_key, plan, rec).await {
                Ok(opened) => switch(opened, on_upgrade, ctx, snapshot),
                Err(resp) => resp,
            }
        }
        None => forward(req, plan, rec, ctx.gw.upstream_conns()).await,
    }
}

/// The bodiless answer that opens a tunnel (`101`, or `200` on HTTP/2), with `headers`;
/// the tunnel's access record logs it, so the body is counted but not logged.
fn switch_answer(status: StatusCode, headers: http::HeaderMap) -> Response<ResponseBody> {
    let mut resp = Response::new(Counted::new(
        Either::Right(Full::new(Bytes::new())),
        Arc::new(AtomicU64::new(0)),
    ));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// The `101` for hyper, and the tunnel task that starts once hyper hands the client's
/// connection over.
fn switch<S: Stream>(
    opened: Opened,
    on_upgrade: hyper::upgrade::OnUpgrade,
    ctx: Arc<ClientConn>,
    snapshot: Arc<Snapshot>,
) -> Response<ResponseBody> {
    let resp = switch_answer(StatusCode::SWITCHING_PROTOCOLS, opened.head.header_map());
    let tracker = ctx.gw.tracker().clone();
    // Combinators rather than an `async` block, which would keep `opened` beside the
    // tunnel for the tunnel's whole life: the task holds only the tunnel's state.
    tracker.spawn(on_upgrade.then(move |upgraded| {
        match upgraded.map(|u| u.downcast::<TokioIo<Prefixed<S>>>()) {
            Ok(Ok(parts)) => {
                let (stream, unread) = parts.io.into_inner().into_parts();
                // Bytes hyper had not read of the first head come before its read-ahead.
                let early = if unread.is_empty() {
                    tunnel::detach(parts.read_buf)
                } else {
                    [unread, parts.read_buf].concat().into()
                };
                OptionFuture::from(Some(Ready::new(ctx, snapshot, stream, early, opened).run()))
            }
            _ => {
                tracing::warn!(client = %opened.rec.client, "client upgrade did not complete");
                OptionFuture::from(None)
            }
        }
    }));
    resp
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream};
    use tokio::net::TcpListener;

    use super::*;
    use crate::client_handshake::accept_for;
    use crate::config::Config;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    /// A backend that completes one WebSocket upgrade and then echoes every byte.
    async fn echo_backend() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            let mut key = None;
            loop {
                let mut line = String::new();
                read.read_line(&mut line).await.unwrap();
                if line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("sec-websocket-key")
                {
                    key = Some(value.trim().to_owned());
                }
            }
            let accept = accept_for(&key.unwrap());
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            write.write_all(answer.as_bytes()).await.unwrap();
            tokio::io::copy(&mut read, &mut write).await.unwrap();
        });
        addr
    }

    /// Serves one in-memory connection with a gateway proxying every path to `backend`
    /// but `/fixed`, which answers 403 itself.
    async fn serve_in_memory(backend: SocketAddr) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let config = Config::parse(
            "mem.toml",
            &format!(
                "[listeners.mem]\nbind = \"127.0.0.1:0\"\n\
                 [upstreams.echo]\nservers = [\"{backend}\"]\n\
                 [[routes]]\nupstream = \"echo\"\n\
                 [[routes]]\npath_prefix = \"/fixed\"\nstatus = 403\nbody = \"no\\n\"\n"
            ),
        )
        .unwrap();
        let gw = Arc::new(Gateway::load(config).await.unwrap());
        let permit = Permit::unlimited();
        let (client, ours) = tokio::io::duplex(1 << 16);
        let peer = "192.0.2.7:5555".parse().unwrap();
        let snapshot = gw.snapshot();
        let served = tokio::spawn(connection(
            gw,
            snapshot,
            ours,
            peer,
            "mem".into(),
            None,
            permit,
        ));
        (client, served)
    }

    /// Reads one response head.
    async fn read_head(stream: &mut DuplexStream) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.unwrap());
        }
        String::from_utf8(head).unwrap()
    }

    fn upgrade(version: &str) -> String {
        format!(
            "GET /chat HTTP/1.1\r\nHost: mem.example\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: {version}\r\n\
             Sec-WebSocket-Key: {KEY}\r\n\r\n"
        )
    }

    #[tokio::test]
    async fn an_in_memory_client_upgrades_and_talks_through_the_tunnel() {
        let (mut client, served) = serve_in_memory(echo_backend().await).await;
        let frame = b"\x81\x85abcd\x09\x07\x0f\x08\x0e";
        client
            .write_all(&[upgrade("13").as_bytes(), frame].concat())
            .await
            .unwrap();
        let head = read_head(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(head.contains(&format!("Sec-WebSocket-Accept: {}\r\n", accept_for(KEY))));
        // The frame sent with the head went through the tunnel and came back.
        let mut echoed = vec![0; frame.len()];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, frame);
        drop(client);
        served.await.unwrap();
    }

    #[tokio::test]
    async fn after_a_refused_upgrade_the_in_memory_connection_stays_http() {
        let (mut client, served) = serve_in_memory(echo_backend().await).await;
        client.write_all(upgrade("8").as_bytes()).await.unwrap();
        let head = read_head(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
        assert!(head.contains("sec-websocket-version: 13\r\n"), "{head}");
        // 426 closes the connection (`Connection: close`): nothing more is read from it.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"unsupported Sec-WebSocket-Version\n");
        served.await.unwrap();

        // A refusal that keeps the connection: the next request is hyper's to serve.
        let (mut client, served) = serve_in_memory(echo_backend().await).await;
        let bad_key = upgrade("13").replace(KEY, "c2hvcnQ=");
        client
            .write_all(
                &[
                    bad_key.as_bytes(),
                    b"GET /fixed HTTP/1.1\r\nHost: m\r\n\r\n",
                ]
                .concat(),
            )
            .await
            .unwrap();
        let head = read_head(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        let mut body = vec![0; len];
        client.read_exact(&mut body).await.unwrap();
        let head = read_head(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 403 "), "{head}");
        drop(client);
        served.await.unwrap();
    }
}
