//! HTTP/2 from clients through the real `sluice` binary: WebSockets as extended CONNECT
//! streams (RFC 8441) of one connection, made by the h2 crate over tokio-rustls with a
//! test CA (or by hand-written frames where a client must misbehave); plain HTTP/2
//! requests to an HTTP/1.1 backend; refusals that never reach the upstream; and the
//! bounds against HTTP/2 abuse (rapid reset, CONTINUATION floods, silent connections).

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use common::*;
use futures_util::{SinkExt, StreamExt};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A gateway with a TLS listener (HTTP/2 on by default) for `localhost`, in front of one
/// echo backend; `configure` adds to the config.
async fn h2_gateway(
    dir: &TempDir,
    configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> (TestCa, Backend, Gateway) {
    let ca = TestCa::new("Sluice h2 test CA");
    let (cert, key) = ca
        .issue("localhost", &["localhost", "127.0.0.1"])
        .write(dir, "localhost");
    let table =
        format!("[listeners.public.tls]\ncertificates = [{{ cert = {cert:?}, key = {key:?} }}]\n");
    let (backend, gateway) = start_echo_gateway(|c| configure(c).listener_toml(&table)).await;
    (ca, backend, gateway)
}

/// A TLS client config trusting `ca` that offers only `h2`.
fn h2_tls(ca: &TestCa) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Client-side flow control generous enough that one stream the test leaves unread
/// cannot use up the connection's window.
const CLIENT_CONN_WINDOW: u32 = 16 << 20;

/// An HTTP/2 connection to the gateway over TLS (ALPN `h2`), driven in the background.
async fn h2_connect(addr: SocketAddr, ca: &TestCa) -> SendRequest<Bytes> {
    let tls = within(
        STEP,
        "TLS handshake",
        tls_connect(addr, "localhost", h2_tls(ca)),
    )
    .await
    .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
    let (send, conn) = within(
        STEP,
        "the HTTP/2 handshake",
        h2::client::Builder::new()
            .initial_connection_window_size(CLIENT_CONN_WINDOW)
            .handshake(tls),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let send = within(STEP, "the connection", send.ready())
        .await
        .expect("connection ready");
    // The server's SETTINGS arrive after the handshake; extended CONNECT waits for them.
    eventually(STEP, "SETTINGS_ENABLE_CONNECT_PROTOCOL = 1", || {
        send.is_extended_connect_protocol_enabled().then_some(())
    })
    .await;
    send
}

/// An extended CONNECT for a WebSocket at `path` (RFC 8441 §4), with `version` and any
/// extra headers.
fn ws_connect(path: &str, version: &str, extra: &[(&str, &str)]) -> Request<()> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("https://localhost{path}"))
        .header("sec-websocket-version", version)
        .extension(h2::ext::Protocol::from_static("websocket"));
    for (name, value) in extra {
        req = req.header(*name, *value);
    }
    req.body(()).expect("request")
}

/// Sends an extended CONNECT and waits for its response head.
async fn open_stream(
    send: &mut SendRequest<Bytes>,
    req: Request<()>,
) -> (http::response::Parts, H2Io) {
    let mut send = within(STEP, "a stream slot", send.clone().ready())
        .await
        .expect("ready");
    let (resp, tx) = send.send_request(req, false).expect("send CONNECT");
    let resp = within(STEP, "the CONNECT response", resp)
        .await
        .expect("a response");
    let (parts, rx) = resp.into_parts();
    (parts, H2Io::new(tx, rx))
}

/// A WebSocket over an extended CONNECT stream.
async fn h2_websocket(send: &mut SendRequest<Bytes>, path: &str) -> WebSocketStream<H2Io> {
    let (parts, io) = open_stream(send, ws_connect(path, "13", &[])).await;
    assert_eq!(parts.status, StatusCode::OK, "{parts:?}");
    WebSocketStream::from_raw_socket(io, Role::Client, None).await
}

/// One HTTP/2 stream as a byte stream: DATA frames both ways, with flow control.
struct H2Io {
    tx: SendStream<Bytes>,
    rx: RecvStream,
    unread: Bytes,
}

impl H2Io {
    fn new(tx: SendStream<Bytes>, rx: RecvStream) -> H2Io {
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
    ) -> Poll<std::io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(self.rx.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.rx.flow_control().release_capacity(data.len());
                    self.unread = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
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
    ) -> Poll<std::io::Result<usize>> {
        self.tx.reserve_capacity(buf.len());
        let n = match ready!(self.tx.poll_capacity(cx)) {
            Some(Ok(n)) => n.min(buf.len()),
            Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
            None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
        };
        self.tx
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(std::io::Error::other)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let _ = self.tx.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

/// Sends `data` as one binary message and waits for the same bytes back.
async fn echo_binary(ws: &mut WebSocketStream<H2Io>, data: &[u8], what: &str) {
    ws.send(Message::binary(data.to_vec())).await.expect("send");
    let reply = within(STEP, what, ws.next())
        .await
        .expect("a reply")
        .expect("a message");
    assert_eq!(checksum(&reply.into_data()), checksum(data), "{what}");
}

#[tokio::test]
async fn twenty_websockets_share_one_http2_connection_and_a_stalled_one_slows_no_other() {
    let dir = TempDir::new();
    let (ca, backend, gateway) = h2_gateway(&dir, |c| c.extra(ADMIN)).await;
    let mut send = h2_connect(gateway.addr(), &ca).await;
    let mut sockets = Vec::new();
    for _ in 0..20 {
        sockets.push(h2_websocket(&mut send, "/chat").await);
    }
    assert_eq!(
        backend.upgrades(),
        20,
        "each stream is its own upstream upgrade"
    );
    // Every stream echoes its own bytes, interleaved with the others.
    for round in 0..3u64 {
        for (i, ws) in sockets.iter_mut().enumerate() {
            let data = pattern(1000 + 997 * i, round * 100 + i as u64);
            echo_binary(ws, &data, &format!("stream {i}, round {round}")).await;
        }
    }
    // Stream 0's reader stalls: the backend's echo of 4 MiB fills its window and the
    // gateway's queue for it, while the other streams go on echoing.
    let stalled = sockets.remove(0);
    let (mut stalled_tx, stalled_rx) = stalled.split();
    let big = pattern(4 << 20, 7);
    let pushing = tokio::spawn(async move {
        let _ = stalled_tx.send(Message::binary(big)).await;
        stalled_tx
    });
    for round in 0..5u64 {
        for (i, ws) in sockets.iter_mut().enumerate() {
            let data = pattern(16 * 1024, 1000 + round * 100 + i as u64);
            echo_binary(ws, &data, &format!("stream {i} beside a stalled one")).await;
        }
    }
    // The stalled stream was still delivered whole once read.
    let stalled_tx = within(STEP, "the big message sent", pushing).await.unwrap();
    let mut stalled = stalled_rx.reunite(stalled_tx).expect("reunite");
    let reply = within(STEP, "the stalled stream's echo", stalled.next())
        .await
        .expect("a reply")
        .expect("a message");
    assert_eq!(checksum(&reply.into_data()), checksum(&pattern(4 << 20, 7)));

    // Each tunnel is logged as HTTP/2, and counted as an HTTP/2 WebSocket.
    for ws in sockets.iter_mut() {
        ws.close(None).await.expect("close");
    }
    let log = gateway
        .wait_access_log("an HTTP/2 tunnel's access log", |l| l.kind == "tunnel")
        .await;
    assert_eq!(
        (log.method.as_str(), log.proto.as_str()),
        ("CONNECT", "HTTP/2.0")
    );
    assert_eq!(log.status, 200, "the status the HTTP/2 client got");
    let m = Metrics::scrape(gateway.admin().await).await;
    assert_eq!(
        m.value("sluice_http2_websockets_total", &[("listener", "public")]),
        20.0
    );
    assert_eq!(
        m.value("sluice_http2_connections_total", &[("listener", "public")]),
        1.0
    );
}

// ---- hand-written frames, for clients that misbehave ----------------------------------

/// Frame types (RFC 9113 §6).
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
/// Flags.
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

/// One frame: its 9-byte header and `payload`.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix whose high bits are `first` (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of literal fields, never indexed or Huffman-coded (RFC 7541 §6.2.2).
fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x10);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// The request fields of a plain GET of `path`.
fn get_fields(path: &str) -> Vec<(&'static str, String)> {
    vec![
        (":method", "GET".into()),
        (":scheme", "https".into()),
        (":authority", "localhost".into()),
        (":path", path.into()),
    ]
}

/// A TLS connection that has sent the client preface and SETTINGS, and acknowledged
/// the server's.
async fn raw_h2(addr: SocketAddr, ca: &TestCa) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tls = within(
        STEP,
        "TLS handshake",
        tls_connect(addr, "localhost", h2_tls(ca)),
    )
    .await
    .expect("TLS handshake");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    hello.extend(frame(SETTINGS, ACK, 0, &[]));
    tls.write_all(&hello).await.expect("preface");
    tls
}

/// Reads frames until one of `kind` arrives (its stream and payload) or the connection
/// ends (`None`), bounded by [`STEP`].
async fn next_frame_of(stream: &mut (impl AsyncRead + Unpin), kind: u8) -> Option<(u32, Vec<u8>)> {
    within(STEP, "a frame or the end of the connection", async {
        loop {
            let mut head = [0u8; 9];
            stream.read_exact(&mut head).await.ok()?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let id = u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]);
            let mut payload = vec![0; len];
            stream.read_exact(&mut payload).await.ok()?;
            if head[3] == kind {
                return Some((id, payload));
            }
        }
    })
    .await
}

/// A second, well-behaved client: an HTTP/2 WebSocket on its own connection that echoes.
async fn bystander(addr: SocketAddr, ca: &TestCa) -> (SendRequest<Bytes>, WebSocketStream<H2Io>) {
    let mut send = h2_connect(addr, ca).await;
    let ws = h2_websocket(&mut send, "/bystander").await;
    (send, ws)
}

#[tokio::test]
async fn extended_connects_that_are_not_websocket_version_13_are_refused_before_the_upstream() {
    let dir = TempDir::new();
    let dead = closed_port();
    let (ca, backend, gateway) = h2_gateway(&dir, |c| {
        c.extra(&format!(
            "[upstreams.dead]\nservers = [\"{dead}\"]\n\n\
             [[routes]]\nname = \"dead\"\npath_prefix = \"/dead\"\nupstream = \"dead\"\n"
        ))
    })
    .await;
    let mut send = h2_connect(gateway.addr(), &ca).await;

    // A wrong version: 426 naming the one spoken.
    let (parts, _) = open_stream(&mut send, ws_connect("/chat", "12", &[])).await;
    assert_eq!(parts.status, StatusCode::UPGRADE_REQUIRED);
    assert_eq!(parts.headers["sec-websocket-version"], "13");
    // Another protocol: 501 (RFC 9220 §3).
    for protocol in ["h2c", "foo"] {
        let mut req = ws_connect("/chat", "13", &[]);
        req.extensions_mut()
            .insert(h2::ext::Protocol::from(protocol));
        let (parts, _) = open_stream(&mut send, req).await;
        assert_eq!(
            parts.status,
            StatusCode::NOT_IMPLEMENTED,
            ":protocol {protocol}"
        );
    }
    // A plain CONNECT (a TCP tunnel to an authority): not something a gateway opens.
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("localhost:443")
        .body(())
        .unwrap();
    let (parts, _) = open_stream(&mut send, req).await;
    assert_eq!(parts.status, StatusCode::NOT_IMPLEMENTED, "plain CONNECT");
    // Routing and fixed answers apply as on HTTP/1.1.
    let (parts, _) = open_stream(&mut send, ws_connect("/internal", "13", &[])).await;
    assert_eq!(parts.status, StatusCode::FORBIDDEN);
    let (parts, _) = open_stream(&mut send, ws_connect("/dead", "13", &[])).await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY, "no server answers");

    // Without `:path`, and `:protocol` on a GET: the stream is reset as malformed.
    let mut raw = raw_h2(gateway.addr(), &ca).await;
    let no_path = hpack(&[
        (":method", "CONNECT"),
        (":protocol", "websocket"),
        (":scheme", "https"),
        (":authority", "localhost"),
        ("sec-websocket-version", "13"),
    ]);
    let get_with_protocol = hpack(&[
        (":method", "GET"),
        (":protocol", "websocket"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", "/chat"),
        ("sec-websocket-version", "13"),
    ]);
    raw.write_all(&frame(HEADERS, END_HEADERS, 1, &no_path))
        .await
        .unwrap();
    assert_eq!(
        next_frame_of(&mut raw, RST_STREAM).await.map(|f| f.0),
        Some(1)
    );
    raw.write_all(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &get_with_protocol,
    ))
    .await
    .unwrap();
    assert_eq!(
        next_frame_of(&mut raw, RST_STREAM).await.map(|f| f.0),
        Some(3)
    );

    // None of them reached the upstream; a valid one still does.
    assert_eq!(backend.connections(), 0, "{:?}", backend.requests());
    let mut ws = h2_websocket(&mut send, "/chat").await;
    echo_binary(&mut ws, b"after the refusals", "the echo").await;
    assert_eq!(backend.upgrades(), 1);
    let seen = backend.requests().pop().expect("the upgrade");
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.header("host"), Some("localhost"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert!(
        seen.header("sec-websocket-key").is_some(),
        "a key minted by the gateway"
    );
}

#[tokio::test]
async fn the_subprotocol_chosen_upstream_reaches_the_http2_client() {
    let dir = TempDir::new();
    let (ca, _backend, gateway) = h2_gateway(&dir, |c| c).await;
    let mut send = h2_connect(gateway.addr(), &ca).await;
    let req = ws_connect(
        "/chat",
        "13",
        &[("sec-websocket-protocol", "chat.v2, chat.v1")],
    );
    let (parts, io) = open_stream(&mut send, req).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers["sec-websocket-protocol"], "chat.v2");
    assert!(
        !parts.headers.contains_key("sec-websocket-accept"),
        "{parts:?}"
    );
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Client, None).await;
    echo_binary(&mut ws, b"v2", "the echo").await;
}

/// Writes `bytes` in pieces until done or the gateway closes the connection; how many
/// bytes it took.
async fn write_until_cut_off(w: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> usize {
    let mut sent = 0;
    for piece in bytes.chunks(16 * 1024) {
        match tokio::time::timeout(STEP, w.write_all(piece)).await {
            Ok(Ok(())) => sent += piece.len(),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    sent
}

/// What an abusive client met: the GOAWAY it got (its error code), if any, and how many of
/// its bytes the connection took before it was cut off.
struct CutOff {
    goaway: Option<u32>,
    sent: usize,
}

/// Sends `abuse` on a fresh HTTP/2 connection and waits for the gateway's GOAWAY (or the
/// end of the connection) and the end of the writes.
async fn abuse(addr: SocketAddr, ca: &TestCa, abuse: Vec<u8>) -> CutOff {
    let (mut rd, mut wr) = tokio::io::split(raw_h2(addr, ca).await);
    let writing = tokio::spawn(async move { write_until_cut_off(&mut wr, &abuse).await });
    let goaway = next_frame_of(&mut rd, GOAWAY)
        .await
        .map(|(_, payload)| u32::from_be_bytes(payload[4..8].try_into().unwrap()));
    let sent = within(STEP, "the abuser's writes to end", writing)
        .await
        .unwrap();
    CutOff { goaway, sent }
}

/// Waits until the gateway has counted a connection cut off for abuse.
async fn abuse_counted(gateway: &Gateway) {
    let labels = [("listener", "public")];
    wait_metric(
        gateway.admin().await,
        "sluice_http2_abuse_total",
        &labels,
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_rapid_reset_burst_gets_goaway_and_its_requests_stay_off_the_upstream() {
    let dir = TempDir::new();
    let (ca, backend, gateway) = h2_gateway(&dir, |c| c.extra(ADMIN)).await;
    let (_keep, mut other) = bystander(gateway.addr(), &ca).await;

    // 5,000 requests, each reset at once (CVE-2023-44487), on paths that would keep an
    // upstream busy for seconds.
    const BURST: u32 = 5000;
    let mut burst = Vec::new();
    for i in 0..BURST {
        let id = 1 + 2 * i;
        let fields = get_fields(&format!("/slow/{i}"));
        let fields: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
        burst.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            id,
            &hpack(&fields),
        ));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let cut = abuse(gateway.addr(), &ca, burst).await;
    let code = cut.goaway.expect("a GOAWAY before the connection ends");
    // ENHANCE_YOUR_CALM from h2's bound on reset streams, or NO_ERROR from the gateway's
    // cancelled-request budget: either way the abuser is told to go away.
    assert!(code == 0xb || code == 0, "GOAWAY code {code:#x}");

    // The other client was served throughout, and only a bounded number of the reset
    // requests ever reached the upstream.
    echo_binary(&mut other, b"still here", "the bystander's echo").await;
    let slow = backend
        .requests()
        .iter()
        .filter(|r| r.target.starts_with("/slow/"))
        .count();
    eprintln!("GOAWAY {code:#x}; {slow} of {BURST} reset requests reached the upstream");
    assert!(
        slow <= 200,
        "{slow} of {BURST} reset requests reached the upstream"
    );
    abuse_counted(&gateway).await;
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off_at_the_header_list_bound() {
    let dir = TempDir::new();
    let (ca, backend, gateway) = h2_gateway(&dir, |c| c.extra(ADMIN)).await;
    let (_keep, mut other) = bystander(gateway.addr(), &ca).await;

    // A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION
    // frames of 1 KiB of fields each, 64 MiB in all if the gateway kept reading.
    let fields = get_fields("/page");
    let fields: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let mut flood = frame(HEADERS, END_STREAM, 1, &hpack(&fields));
    let filler = "x".repeat(1000);
    let piece = frame(CONTINUATION, 0, 1, &hpack(&[("x-filler", filler.as_str())]));
    let pieces = 64 * 1024;
    flood.reserve(piece.len() * pieces);
    for _ in 0..pieces {
        flood.extend_from_slice(&piece);
    }
    let total = flood.len();
    // The gateway answers with GOAWAY (or just closes) long before the flood is read.
    let CutOff { sent, .. } = abuse(gateway.addr(), &ca, flood).await;
    eprintln!("the gateway took {sent} of the flood's {total} bytes");
    assert!(sent < total, "the whole {total}-byte flood was taken");
    echo_binary(&mut other, b"still here", "the bystander's echo").await;
    assert_eq!(
        backend
            .requests()
            .iter()
            .filter(|r| r.target == "/page")
            .count(),
        0
    );
    abuse_counted(&gateway).await;
}

#[tokio::test]
async fn silent_http2_connections_are_closed_at_the_header_read_timeout() {
    let dir = TempDir::new();
    let (ca, _backend, gateway) =
        h2_gateway(&dir, |c| c.listener_toml("header_read_timeout = \"1s\"")).await;
    // One says nothing after TLS; one sends the preface's magic but no SETTINGS; one
    // finishes the preface and never asks for anything.
    let mut silent = tls_connect(gateway.addr(), "localhost", h2_tls(&ca))
        .await
        .expect("TLS");
    let mut magic_only = tls_connect(gateway.addr(), "localhost", h2_tls(&ca))
        .await
        .expect("TLS");
    magic_only
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut idle = raw_h2(gateway.addr(), &ca).await;
    let started = std::time::Instant::now();
    for (what, conn) in [
        ("silent", &mut silent),
        ("magic only", &mut magic_only),
        ("idle", &mut idle),
    ] {
        let mut sink = Vec::new();
        within(Duration::from_secs(5), what, conn.read_to_end(&mut sink))
            .await
            .ok();
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too soon"
    );
}

#[tokio::test]
async fn requests_cancelled_faster_than_the_budget_get_goaway() {
    let dir = TempDir::new();
    let (ca, backend, gateway) = h2_gateway(&dir, |c| {
        c.extra(ADMIN)
            .listener_toml("[listeners.public.http2]\nmax_reset_rate = 5")
    })
    .await;
    // Thirty requests the upstream is slow to answer, each cancelled once it is there:
    // past the budget (a burst of 10), the connection is told to go away.
    let send = h2_connect(gateway.addr(), &ca).await;
    let mut pending = Vec::new();
    for i in 0..30 {
        let req = Request::get(format!("https://localhost/slow/{i}"))
            .body(())
            .unwrap();
        let mut ready = within(STEP, "a stream slot", send.clone().ready())
            .await
            .expect("ready");
        pending.push(ready.send_request(req, true).expect("send"));
    }
    eventually(STEP, "the slow requests at the upstream", || {
        (backend.requests().len() >= 30).then_some(())
    })
    .await;
    for (resp, mut tx) in pending {
        tx.send_reset(h2::Reason::CANCEL);
        drop(resp);
    }
    abuse_counted(&gateway).await;
    // The connection is gone: a new request on it fails.
    let gone = within(STEP, "the connection to end", async {
        loop {
            match send.clone().ready().await {
                Err(_) => return,
                Ok(mut s) => {
                    let req = Request::get("https://localhost/page").body(()).unwrap();
                    let Ok((resp, _)) = s.send_request(req, true) else {
                        return;
                    };
                    if resp.await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    gone.await;
}

/// Collects a response body.
async fn body_of(mut rx: RecvStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = within(STEP, "the response body", rx.data()).await {
        let chunk = chunk.expect("body chunk");
        let _ = rx.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    out
}

#[tokio::test]
async fn plain_http2_get_and_post_reach_an_http1_backend_with_streamed_bodies() {
    let dir = TempDir::new();
    let (ca, backend, gateway) = h2_gateway(&dir, |c| c).await;
    let mut send = h2_connect(gateway.addr(), &ca).await;

    let req = Request::get("https://localhost/page?q=1")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).expect("GET");
    let resp = within(STEP, "the GET response", resp)
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-backend"], "a");
    assert_eq!(body_of(resp.into_body()).await, b"a");
    let seen = backend.requests().pop().expect("the GET upstream");
    assert_eq!(
        (seen.method.as_str(), seen.target.as_str()),
        ("GET", "/page?q=1")
    );
    assert_eq!(
        seen.header("host"),
        Some("localhost"),
        "Host from :authority"
    );
    assert_eq!(seen.values("cookie"), ["a=1; b=2"], "cookie crumbs joined");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert!(seen.values("te").is_empty(), "{seen:?}");

    // A POST whose body is sent in pieces comes back whole, streamed.
    let req = Request::post("https://localhost/echo").body(()).unwrap();
    let mut ready = send.clone().ready().await.expect("ready");
    let (resp, mut tx) = ready.send_request(req, false).expect("POST");
    let body = pattern(300 * 1024, 3);
    for piece in body.chunks(64 * 1024) {
        tx.reserve_capacity(piece.len());
        let mut left = Bytes::copy_from_slice(piece);
        while !left.is_empty() {
            let n = within(
                STEP,
                "send capacity",
                std::future::poll_fn(|cx| tx.poll_capacity(cx)),
            )
            .await
            .expect("capacity")
            .expect("capacity");
            let n = n.min(left.len());
            tx.send_data(left.split_to(n), false).expect("send data");
        }
    }
    tx.send_data(Bytes::new(), true).expect("end of body");
    let resp = within(STEP, "the POST response", resp)
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(checksum(&body_of(resp.into_body()).await), checksum(&body));
}

#[tokio::test]
async fn cleartext_http2_by_prior_knowledge_is_served_beside_http1_when_configured() {
    let (backend, gateway) =
        start_echo_gateway(|c| c.listener_toml("[listeners.public.http2]\nenabled = true")).await;
    let tcp = TcpStream::connect(gateway.addr()).await.unwrap();
    let (send, conn) = within(STEP, "h2c handshake", h2::client::handshake(tcp))
        .await
        .expect("h2c handshake");
    tokio::spawn(conn);
    let mut send = within(STEP, "ready", send.ready()).await.expect("ready");
    eventually(STEP, "SETTINGS", || {
        send.is_extended_connect_protocol_enabled().then_some(())
    })
    .await;
    let req = Request::get("http://localhost/page").body(()).unwrap();
    let (resp, _) = send.send_request(req, true).expect("GET");
    let resp = within(STEP, "the GET response", resp)
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("http://localhost/chat")
        .header("sec-websocket-version", "13")
        .extension(h2::ext::Protocol::from_static("websocket"))
        .body(())
        .unwrap();
    let (parts, io) = open_stream(&mut send, req).await;
    assert_eq!(parts.status, StatusCode::OK);
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Client, None).await;
    echo_binary(&mut ws, b"h2c", "the echo over h2c").await;
    assert_eq!(
        backend
            .requests()
            .last()
            .unwrap()
            .header("x-forwarded-proto"),
        Some("http")
    );
    // HTTP/1.1 on the same listener, upgrade and plain request alike.
    let (ws, name) = ws_whoami(gateway.addr(), "/chat", &[]).await;
    assert_eq!(name, "a");
    close_ws(ws).await;
}

#[tokio::test]
async fn http2_is_not_spoken_where_it_is_off() {
    // A plain listener without the table does not take the preface for HTTP/2.
    let (_backend, gateway) = start_echo_gateway(|c| c).await;
    let mut tcp = TcpStream::connect(gateway.addr()).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = within(STEP, "the answer", tcp.read_to_end(&mut answer)).await;
    // (hyper's HTTP/1.1 parser knows the preface and closes without an answer.)
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 "),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );

    // A TLS listener with `enabled = false` offers only http/1.1.
    let dir = TempDir::new();
    let (ca, _backend, gateway) = h2_gateway(&dir, |c| {
        c.listener_toml("[listeners.public.http2]\nenabled = false")
    })
    .await;
    let mut both = rustls::ClientConfig::builder()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    both.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tls = tls_connect(gateway.addr(), "localhost", Arc::new(both))
        .await
        .expect("TLS");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn each_stream_tunnel_closes_with_its_stream_its_upstream_or_its_connection() {
    let mut scripted = ScriptedBackend::start(Script::Upgrade).await;
    let dir = TempDir::new();
    let echo = Backend::start("a").await;
    let ca = TestCa::new("Sluice h2 test CA");
    let (cert, key) = ca
        .issue("localhost", &["localhost"])
        .write(&dir, "localhost");
    let gateway = ConfigBuilder::new(&[echo.addr])
        .listener_toml(&format!(
            "[listeners.public.tls]\ncertificates = [{{ cert = {cert:?}, key = {key:?} }}]\n"
        ))
        .extra(&format!(
            "[upstreams.scripted]\nservers = [\"{}\"]\n\n\
             [[routes]]\nname = \"scripted\"\npath_prefix = \"/scripted\"\nupstream = \"scripted\"\n",
            scripted.addr
        ))
        .start()
        .await;
    let mut send = h2_connect(gateway.addr(), &ca).await;

    // A stream the client resets closes its upstream connection; the others run on.
    let (parts, io) = open_stream(&mut send, ws_connect("/chat", "13", &[])).await;
    assert_eq!(parts.status, StatusCode::OK);
    let mut keep = h2_websocket(&mut send, "/chat").await;
    eventually(STEP, "two tunnels at the backend", || {
        (echo.open_tunnels() == 2).then_some(())
    })
    .await;
    let H2Io { mut tx, .. } = io;
    tx.send_reset(h2::Reason::CANCEL);
    eventually(STEP, "the reset stream's upstream to close", || {
        (echo.open_tunnels() == 1).then_some(())
    })
    .await;
    echo_binary(&mut keep, b"unaffected", "the other stream").await;

    // The upstream closes: its Close frame reaches the client, then the stream ends.
    let mut ws = h2_websocket(&mut send, "/scripted").await;
    let mut server = scripted.upgraded().await;
    server.write_all(b"\x88\x02\x03\xe8").await.unwrap();
    drop(server);
    let close = within(STEP, "the upstream's Close", ws.next()).await;
    assert!(
        matches!(close, Some(Ok(Message::Close(Some(ref f)))) if u16::from(f.code) == 1000),
        "{close:?}"
    );
    // The client answers the Close (tungstenite does so as it reads on), and the stream
    // ends.
    let end = within(STEP, "the stream to end", ws.next()).await;
    assert!(end.is_none() || matches!(end, Some(Err(_))), "{end:?}");
    drop(ws);
    let log = gateway
        .wait_access_log("the scripted tunnel's log", |l| l.route == "scripted")
        .await;
    assert_eq!(log.reason.as_deref(), Some("server_closed"));

    // Closing the client's connection closes every tunnel it carried.
    let _more = h2_websocket(&mut send, "/chat").await;
    eventually(STEP, "two tunnels again", || {
        (echo.open_tunnels() == 2).then_some(())
    })
    .await;
    drop((send, keep, _more));
    eventually(STEP, "every tunnel of the connection to close", || {
        (echo.open_tunnels() == 0).then_some(())
    })
    .await;
}

/// Waits for a Close frame with `code` on `ws`.
async fn closed_with(ws: &mut WebSocketStream<H2Io>, code: u16, what: &str) {
    let close = within(STEP, what, ws.next()).await;
    assert!(
        matches!(close, Some(Ok(Message::Close(Some(ref f)))) if u16::from(f.code) == code),
        "{what}: {close:?}"
    );
}

#[tokio::test]
async fn http2_tunnels_meet_the_idle_timeout_and_the_drain_with_close_1001() {
    let dir = TempDir::new();
    let (ca, _backend, mut gateway) = h2_gateway(&dir, |c| {
        c.grace("1s").extra(
            "[[routes]]\nname = \"idle\"\npath_prefix = \"/idle\"\nupstream = \"echo\"\n\
                 idle_timeout = \"1s\"\n",
        )
    })
    .await;
    let mut send = h2_connect(gateway.addr(), &ca).await;

    // An idle stream gets Close 1001 at the route's idle timeout, logged as such.
    let mut idle = h2_websocket(&mut send, "/idle").await;
    closed_with(&mut idle, 1001, "the idle timeout's Close").await;
    drop(idle);
    let log = gateway
        .wait_access_log("the idle tunnel's log", |l| l.kind == "tunnel")
        .await;
    assert_eq!(log.reason.as_deref(), Some("idle_timeout"), "{log:?}");

    // A live stream on the same connection gets Close 1001 when the drain's grace ends.
    let mut live = h2_websocket(&mut send, "/live").await;
    echo_binary(&mut live, b"before the drain", "the echo").await;
    gateway.signal("TERM");
    closed_with(&mut live, 1001, "the drain's Close").await;
    drop((live, send));
    let status = gateway.wait_exit(STEP).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let reasons: Vec<Option<String>> = gateway
        .access_logs()
        .into_iter()
        .filter(|l| l.kind == "tunnel")
        .map(|l| l.reason)
        .collect();
    assert_eq!(
        reasons,
        [Some("idle_timeout".into()), Some("shutdown".into())]
    );
}

#[tokio::test]
async fn plugins_see_an_http2_websocket_as_a_websocket_connect_over_h2() {
    let dir = TempDir::new();
    let seer = plugin_wasm("hostile");
    let plugin = format!("[plugins.seer]\npath = {seer:?}\nconfig = {{ on_request = \"allow\" }}");
    let (ca, backend, gateway) = h2_gateway(&dir, |c| {
        c.route_toml("plugins = [\"seer\"]").extra(&plugin)
    })
    .await;
    let mut send = h2_connect(gateway.addr(), &ca).await;
    let mut ws = h2_websocket(&mut send, "/chat").await;
    echo_binary(&mut ws, b"seen", "the echo").await;
    let seen = backend.requests().pop().expect("the upgrade");
    assert_eq!(
        seen.header("x-hostile-request"),
        Some("websocket CONNECT localhost")
    );
    assert_eq!(seen.header("x-hostile-scheme"), Some("https"));
    assert_eq!(seen.header("x-hostile-tls"), Some("localhost;h2;-;"));

    // A plain HTTP/2 request is `http` with its own method.
    let req = Request::get("https://localhost/page").body(()).unwrap();
    let (resp, _) = send.send_request(req, true).expect("GET");
    let resp = within(STEP, "the GET", resp).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = backend.requests().pop().expect("the GET");
    assert_eq!(seen.header("x-hostile-request"), Some("http GET localhost"));
}

#[tokio::test]
async fn a_slow_streamed_exchange_keeps_its_connection_past_the_idle_timeout() {
    let dir = TempDir::new();
    let (ca, _backend, gateway) =
        h2_gateway(&dir, |c| c.listener_toml("header_read_timeout = \"1s\"")).await;
    let send = h2_connect(gateway.addr(), &ca).await;
    // A request body sent in pieces over three idle timeouts, echoed back as it comes:
    // the stream is open all along, so the connection is not idle.
    let req = Request::post("https://localhost/echo").body(()).unwrap();
    let mut ready = send.clone().ready().await.expect("ready");
    let (resp, mut tx) = ready.send_request(req, false).expect("POST");
    tx.send_data(Bytes::from_static(b"piece 0;"), false)
        .unwrap();
    let resp = within(STEP, "the response head", resp)
        .await
        .expect("response");
    let mut rx = resp.into_body();
    for i in 1..=6 {
        let got = within(STEP, "an echoed piece", rx.data())
            .await
            .expect("more body")
            .expect("a chunk");
        let _ = rx.flow_control().release_capacity(got.len());
        // The pacing is the point: a slow client, half an idle timeout between pieces.
        tokio::time::sleep(Duration::from_millis(500)).await;
        tx.send_data(Bytes::from(format!("piece {i};")), i == 6)
            .expect("the connection is still open");
    }
    let rest = body_of(rx).await;
    assert!(
        String::from_utf8_lossy(&rest).ends_with("piece 6;"),
        "{rest:?}"
    );
}
