//! WebSockets over HTTP/2 for the `h2-*` scenarios (RFC 8441): the load generator's HTTP/2
//! connections and the WebSockets they carry as extended CONNECT streams.
//!
//! - **Connection** ([`H2Conn::connect`]): TCP, the run's TLS client offering only `h2` by
//!   ALPN (a server that picks nothing or `http/1.1` fails the run), then the h2 crate's
//!   client handshake. Its receive windows are Chrome's (6 MiB per stream, 15 MiB for the
//!   connection), so what the proxy may send is bounded by its own settings, not the
//!   client's; no server push. The connection waits, bounded, for the server's SETTINGS to
//!   enable extended CONNECT (`SETTINGS_ENABLE_CONNECT_PROTOCOL`): a server that never
//!   does cannot carry a WebSocket over HTTP/2 at all.
//! - **WebSocket** ([`H2Conn::websocket`]): `:method CONNECT`, `:protocol websocket`,
//!   `:scheme https`, `:path /bench`, `:authority localhost:PORT`,
//!   `sec-websocket-version: 13` (plus the endpoint's extra headers, lower-cased, for the
//!   plugin targets); only a `200` opens it. The stream is then a byte stream ([`H2Io`])
//!   under the bench's own codec: masked frames out, whole frames in, as over TCP.
//! - **Many streams over few connections** ([`open_streams`]): stream `i` goes to
//!   connection `i mod K`, a bounded number opening at a time.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, timeout};

use crate::client::{Conn, Endpoint};
use crate::tls::{self, Stream};
use crate::ws::Rng;

/// The client's receive window per stream: Chrome's.
const STREAM_WINDOW: u32 = 6 << 20;
/// The client's receive window for the whole connection: Chrome's.
const CONNECTION_WINDOW: u32 = 15 << 20;
/// How long a server may take to enable extended CONNECT in its SETTINGS.
const SETTINGS_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest one connection, or one stream's CONNECT and its answer, may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest opening all of a scenario's connections, or all its streams, may take.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(120);

/// One HTTP/2 connection of the load generator, driven by a task of its own (aborted when
/// this is dropped, which ends every stream still open on it).
#[derive(Debug)]
pub struct H2Conn {
    send: SendRequest<Bytes>,
    authority: String,
    tls: String,
    driver: JoinHandle<()>,
}

impl Drop for H2Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl H2Conn {
    /// Connects to `endpoint` over TLS with ALPN `h2` (its client must be [`tls::Client::h2`]),
    /// makes the HTTP/2 handshake and waits until the server has enabled extended CONNECT.
    pub async fn connect(endpoint: &Endpoint) -> io::Result<H2Conn> {
        let client = endpoint
            .tls
            .as_ref()
            .ok_or_else(|| io::Error::other("HTTP/2 needs a TLS endpoint"))?;
        let tcp = TcpStream::connect(endpoint.addr).await?;
        tcp.set_nodelay(true)?;
        let tls = client.handshake(tcp).await?;
        let (alpn, params) = {
            let conn = tls.get_ref().1;
            let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
            (alpn, tls::describe(conn))
        };
        if alpn.as_deref() != Some(b"h2") {
            let alpn = alpn.map_or("none".into(), |a| String::from_utf8_lossy(&a).into_owned());
            return Err(io::Error::other(format!(
                "the server did not pick h2 by ALPN (picked {alpn})"
            )));
        }
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(io::Error::other)?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let conn = H2Conn {
            send,
            authority: format!("{}:{}", tls::SERVER_NAME, endpoint.addr.port()),
            tls: format!("{params} ALPN h2"),
            driver,
        };
        // The server's SETTINGS come after the handshake, processed by the driver; the h2
        // crate refuses an extended CONNECT until they have enabled it.
        let deadline = Instant::now() + SETTINGS_TIMEOUT;
        while !conn.send.is_extended_connect_protocol_enabled() {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "the server did not enable extended CONNECT (RFC 8441: SETTINGS_ENABLE_CONNECT_PROTOCOL) within {SETTINGS_TIMEOUT:?}"
                )));
            }
            sleep(Duration::from_millis(2)).await;
        }
        Ok(conn)
    }

    /// What the connection's TLS handshake negotiated, e.g.
    /// `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519 Full ALPN h2`.
    pub fn tls_parameters(&self) -> &str {
        &self.tls
    }

    /// Opens a WebSocket as an extended CONNECT stream (waiting for a stream slot when the
    /// connection is at the server's limit) with `headers` (request header lines, each
    /// ending in CRLF, as in [`Endpoint::headers`]); only a `200` opens it.
    pub async fn websocket(&self, headers: &str, rng: Rng) -> io::Result<Conn> {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("https://{}/bench", self.authority))
            .header("sec-websocket-version", "13")
            .extension(h2::ext::Protocol::from_static("websocket"));
        for line in headers.split("\r\n").filter(|l| !l.is_empty()) {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| io::Error::other(format!("bad header line {line:?}")))?;
            req = req.header(name.trim().to_ascii_lowercase(), value.trim());
        }
        let req = req.body(()).map_err(io::Error::other)?;
        let mut send = self.send.clone().ready().await.map_err(io::Error::other)?;
        let (response, tx) = send.send_request(req, false).map_err(io::Error::other)?;
        let response = response.await.map_err(io::Error::other)?;
        if response.status() != StatusCode::OK {
            return Err(io::Error::other(format!(
                "extended CONNECT refused: {}",
                response.status()
            )));
        }
        let rx = response.into_body();
        Ok(Conn::over(Stream::H2(Box::new(H2Io::new(tx, rx))), rng))
    }
}

/// Opens `count` HTTP/2 connections to `endpoint`, `concurrency` at a time; fails when
/// any fails.
pub async fn connect_many(
    endpoint: &Endpoint,
    count: usize,
    concurrency: usize,
) -> io::Result<Vec<H2Conn>> {
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + SWEEP_TIMEOUT;
    let mut tasks: JoinSet<io::Result<Vec<H2Conn>>> = JoinSet::new();
    for _ in 0..concurrency.clamp(1, count.max(1)) {
        let (next, endpoint) = (next.clone(), endpoint.clone());
        tasks.spawn(async move {
            let mut opened = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                if Instant::now() > deadline {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                let conn = timeout(STEP_TIMEOUT, H2Conn::connect(&endpoint))
                    .await
                    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
                opened.push(conn);
            }
            Ok(opened)
        });
    }
    let mut conns = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        conns.extend(joined.map_err(io::Error::other)??);
    }
    Ok(conns)
}

/// Opens `count` WebSockets over `conns` (stream `i` on connection `i mod K`),
/// `concurrency` at a time; returns those that opened and the number that failed.
pub async fn open_streams(
    conns: &Arc<Vec<H2Conn>>,
    headers: &Arc<str>,
    count: usize,
    concurrency: usize,
    seed: u64,
) -> (Vec<Conn>, u64) {
    if conns.is_empty() {
        return (Vec::new(), count as u64);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + SWEEP_TIMEOUT;
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.clamp(1, count.max(1)) {
        let (next, conns, headers) = (next.clone(), conns.clone(), headers.clone());
        tasks.spawn(async move {
            let mut opened = Vec::new();
            let mut errors = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || Instant::now() > deadline {
                    break;
                }
                let rng =
                    Rng::new(seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
                let conn = &conns[i % conns.len()];
                match timeout(STEP_TIMEOUT, conn.websocket(&headers, rng)).await {
                    Ok(Ok(ws)) => opened.push(ws),
                    _ => errors += 1,
                }
            }
            (opened, errors)
        });
    }
    let mut streams = Vec::with_capacity(count);
    let mut errors = 0;
    while let Some(joined) = tasks.join_next().await {
        let (opened, failed) = joined.unwrap_or_default();
        streams.extend(opened);
        errors += failed;
    }
    let missing = count.saturating_sub(streams.len()) as u64;
    (streams, errors.max(missing))
}

/// One HTTP/2 stream as a byte stream: its DATA frames both ways, with flow control
/// (received bytes are released to the peer's window as soon as they are read).
#[derive(Debug)]
pub struct H2Io {
    tx: SendStream<Bytes>,
    rx: RecvStream,
    unread: Bytes,
}

impl H2Io {
    /// The stream whose halves are `tx` and `rx`.
    pub fn new(tx: SendStream<Bytes>, rx: RecvStream) -> H2Io {
        H2Io {
            tx,
            rx,
            unread: Bytes::new(),
        }
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(self.rx.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.rx.flow_control().release_capacity(data.len());
                    self.unread = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.tx.reserve_capacity(buf.len());
        // Capacity is often assigned at once, from the connection's window.
        let n = match self.tx.capacity() {
            0 => match ready!(self.tx.poll_capacity(cx)) {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            },
            n => n,
        }
        .min(buf.len());
        self.tx
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.tx.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    //! The client against a local HTTP/2 server (rustls, the h2 crate's server) that
    //! answers extended CONNECTs and echoes on each stream like the echo backend.

    use std::fs;
    use std::net::SocketAddr;

    use http::Response;
    use rustls::ServerConfig;
    use rustls::crypto::aws_lc_rs;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::tls::Pki;
    use crate::tls::tests::temp_dir;
    use crate::ws::{OP_BINARY, OP_PING, OP_PONG, Reader};

    /// Longest a test's whole conversation may take.
    const TEST_TIMEOUT: Duration = Duration::from_secs(60);

    /// Serves HTTP/2 over TLS with `pki`'s certificate on an ephemeral port: with `alpn`,
    /// offering `h2`; with `connect_protocol`, enabling extended CONNECT, answering each
    /// `websocket` CONNECT with `200` and echoing on its stream (others get `405`).
    async fn h2_echo_server(pki: &Pki, alpn: bool, connect_protocol: bool) -> SocketAddr {
        let certs = vec![CertificateDer::from_pem_file(&pki.cert).unwrap()];
        let key = PrivateKeyDer::from_pem_file(&pki.key).unwrap();
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap();
        if alpn {
            config.alpn_protocols = vec![b"h2".to_vec()];
        }
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut builder = h2::server::Builder::new();
                    if connect_protocol {
                        builder.enable_connect_protocol();
                    }
                    let Ok(mut conn) = builder.handshake::<_, Bytes>(tls).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let websocket = req.method() == Method::CONNECT
                            && req
                                .extensions()
                                .get::<h2::ext::Protocol>()
                                .is_some_and(|p| p.as_str() == "websocket");
                        let status = match websocket {
                            true => StatusCode::OK,
                            false => StatusCode::METHOD_NOT_ALLOWED,
                        };
                        let response = Response::builder().status(status).body(()).unwrap();
                        let Ok(tx) = respond.send_response(response, !websocket) else {
                            continue;
                        };
                        if websocket {
                            let io = H2Io::new(tx, req.into_body());
                            tokio::spawn(crate::backend::echo_frames(Reader::new(io)));
                        }
                    }
                });
            }
        });
        addr
    }

    fn endpoint(addr: SocketAddr, pki: &Pki) -> Endpoint {
        Endpoint {
            tls: Some(pki.client().unwrap().h2()),
            ..Endpoint::plain(addr)
        }
    }

    /// Twenty WebSockets over two HTTP/2 connections echo 32 B, 16 KiB and 100,000 B
    /// messages (the last beyond the server's default 64 KiB stream window) and pings,
    /// and close cleanly.
    #[tokio::test]
    async fn websockets_share_http2_connections() {
        tokio::time::timeout(TEST_TIMEOUT, share())
            .await
            .expect("timed out");
    }

    async fn share() {
        let dir = temp_dir("h2-share");
        let pki = Pki::generate(&dir).unwrap();
        let endpoint = endpoint(h2_echo_server(&pki, true, true).await, &pki);
        let conns = Arc::new(connect_many(&endpoint, 2, 2).await.unwrap());
        assert_eq!(conns.len(), 2);
        let params = conns[0].tls_parameters();
        assert!(params.starts_with("TLSv1_3 "), "{params}");
        assert!(params.ends_with(" Full ALPN h2"), "{params}");
        let (streams, errors) = open_streams(&conns, &endpoint.headers, 20, 8, 7).await;
        assert_eq!((streams.len(), errors), (20, 0));
        for mut ws in streams {
            for size in [32usize, 16 << 10, 100_000] {
                let payload: Vec<u8> = (0..size).map(|b| b as u8).collect();
                ws.round_trip(OP_BINARY, &payload, OP_BINARY).await.unwrap();
            }
            ws.round_trip(OP_PING, b"sluice!!", OP_PONG).await.unwrap();
            ws.close().await.unwrap();
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A server that never enables extended CONNECT (as nginx), and one that does not
    /// pick `h2` by ALPN, are refused at connect.
    #[tokio::test]
    async fn servers_without_websockets_over_http2_are_refused() {
        tokio::time::timeout(TEST_TIMEOUT, refused())
            .await
            .expect("timed out");
    }

    async fn refused() {
        let dir = temp_dir("h2-refused");
        let pki = Pki::generate(&dir).unwrap();
        let no_connect = endpoint(h2_echo_server(&pki, true, false).await, &pki);
        let e = H2Conn::connect(&no_connect).await.unwrap_err();
        assert!(e.to_string().contains("extended CONNECT"), "{e}");
        let no_alpn = endpoint(h2_echo_server(&pki, false, true).await, &pki);
        let e = H2Conn::connect(&no_alpn).await.unwrap_err();
        assert!(e.to_string().contains("did not pick h2"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
