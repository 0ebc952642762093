//! Real client addresses behind a balancer: a listener with `proxy_protocol` takes the
//! PROXY header (v1 or v2) a trusted balancer sends first, through the real `sluice`
//! binary; the client it names is what the upstream (`X-Forwarded-For`) and the access log
//! see. A missing header from a balancer, a malformed one, or one from an address that is
//! not trusted closes the connection.

mod common;

use std::net::SocketAddr;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const V1: &[u8] = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 8080\r\n";

/// A v2 header (PROXY, TCP over IPv4) naming 203.0.113.9:50000.
fn v2() -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x21, 0x11, 0, 12]);
    h.extend([203, 0, 113, 9, 10, 0, 0, 1, 0xc3, 0x50, 0x1f, 0x90]);
    h
}

/// A connection that has sent `header`.
async fn with_header(addr: SocketAddr, header: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(header).await.expect("header");
    tcp
}

/// A WebSocket over `stream` that echoes one message.
async fn echo_over<S: AsyncRead + AsyncWrite + Unpin>(stream: S, url: &str) {
    let (mut ws, _) = within(
        STEP,
        "the upgrade",
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .expect("upgrade");
    ws.send(Message::text("hi")).await.expect("send");
    let reply = within(STEP, "the echo", ws.next()).await;
    assert!(
        matches!(reply, Some(Ok(Message::Text(ref t))) if t.as_str() == "hi"),
        "{reply:?}"
    );
    let _ = ws.close(None).await;
}

/// Whether the gateway closes `stream` without answering after `then` is sent on it.
async fn closed_unanswered(mut stream: TcpStream, then: &[u8]) -> bool {
    let _ = stream.write_all(then).await;
    let mut answer = Vec::new();
    let _ = within(
        STEP,
        "the connection to close",
        stream.read_to_end(&mut answer),
    )
    .await;
    answer.is_empty()
}

#[tokio::test]
async fn a_trusted_balancer_names_the_client_that_upstreams_and_logs_see() {
    let (backend, gateway) =
        start_echo_gateway(|c| c.listener_toml("proxy_protocol = [\"127.0.0.1\"]")).await;
    let url = format!("ws://{}/chat", gateway.addr());

    // v1 before a WebSocket upgrade.
    echo_over(with_header(gateway.addr(), V1).await, &url).await;
    let seen = backend.requests().pop().expect("the upgrade");
    assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.7"));
    let log = gateway
        .wait_access_log("the tunnel's log", |l| l.kind == "tunnel")
        .await;
    assert_eq!(log.client, "203.0.113.7:51000");

    // v2 before a plain request.
    let mut tcp = with_header(gateway.addr(), &v2()).await;
    tcp.write_all(b"GET /page HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    within(STEP, "the answer", tcp.read_to_end(&mut answer))
        .await
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let seen = backend.requests().pop().expect("the GET");
    assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.9"));

    // From the balancer, a connection without a header, or with a malformed one, closes.
    let plain = TcpStream::connect(gateway.addr()).await.unwrap();
    assert!(closed_unanswered(plain, b"GET /page HTTP/1.1\r\nHost: a\r\n\r\n").await);
    let bad = with_header(gateway.addr(), b"PROXY TCP4 not an address\r\n").await;
    assert!(closed_unanswered(bad, b"GET /page HTTP/1.1\r\nHost: a\r\n\r\n").await);
}

#[tokio::test]
async fn a_header_from_an_address_that_is_not_trusted_closes_the_connection() {
    let (backend, gateway) =
        start_echo_gateway(|c| c.listener_toml("proxy_protocol = [\"10.0.0.0/8\"]")).await;
    // A client that reaches the gateway directly is served as itself...
    let (ws, name) = ws_whoami(gateway.addr(), "/chat", &[]).await;
    assert_eq!(name, "a");
    close_ws(ws).await;
    assert_eq!(
        backend.requests().pop().unwrap().header("x-forwarded-for"),
        Some("127.0.0.1")
    );
    // ...and may not name another client.
    let spoof = with_header(gateway.addr(), V1).await;
    assert!(closed_unanswered(spoof, b"GET /page HTTP/1.1\r\nHost: a\r\n\r\n").await);
}

#[tokio::test]
async fn the_header_comes_before_the_tls_handshake() {
    let dir = TempDir::new();
    let ca = TestCa::new("Sluice PROXY test CA");
    let (cert, key) = ca
        .issue("localhost", &["localhost"])
        .write(&dir, "localhost");
    let (backend, gateway) = start_echo_gateway(|c| {
        c.listener_toml(&format!(
            "proxy_protocol = [\"127.0.0.1\"]\n[listeners.public.tls]\n\
             certificates = [{{ cert = {cert:?}, key = {key:?} }}]\n"
        ))
    })
    .await;
    let tcp = with_header(gateway.addr(), V1).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = within(
        STEP,
        "TLS after the header",
        tokio_rustls::TlsConnector::from(ca.client()).connect(name, tcp),
    )
    .await
    .expect("TLS handshake");
    echo_over(
        tls,
        &format!("wss://localhost:{}/chat", gateway.addr().port()),
    )
    .await;
    let seen = backend.requests().pop().expect("the upgrade");
    assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.7"));
}

#[tokio::test]
async fn plugins_see_the_client_a_trusted_balancer_names() {
    let backend = Backend::start("a").await;
    let hostile = plugin_wasm("hostile");
    let gateway = ConfigBuilder::new(&[backend.addr])
        .listener_toml("proxy_protocol = [\"127.0.0.1\"]")
        .route_toml("plugins = [\"seen\"]")
        .extra(&format!("[plugins.seen]\npath = {hostile:?}\n"))
        .start()
        .await;
    let url = format!("ws://{}/chat", gateway.addr());
    echo_over(with_header(gateway.addr(), V1).await, &url).await;
    let seen = backend.requests().pop().expect("the upgrade");
    assert_eq!(seen.header("x-hostile-client"), Some("203.0.113.7"));
    echo_over(with_header(gateway.addr(), &v2()).await, &url).await;
    let seen = backend.requests().pop().expect("the upgrade");
    assert_eq!(seen.header("x-hostile-client"), Some("203.0.113.9"));
}
