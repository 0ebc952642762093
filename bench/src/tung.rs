//! The second client/server pair of the handshake scenario: tokio-tungstenite on both
//! ends, as a typical Rust client and server would use it (scenario
//! `handshake-tungstenite`).
//!
//! - **Client** ([`cycle`]): `TcpStream::connect`, then `client_async`, so tungstenite
//!   writes its own request head and checks the `101` and its `Sec-WebSocket-Accept`;
//!   then a clean close: `close(None)` sends a Close frame (masked, no status code), and
//!   the stream is read until the server's Close and the end of the TCP stream.
//! - **Server** ([`echo`]): `accept_async`, then an echo loop; tungstenite answers the
//!   client's Close by itself on the next read and then reports the connection closed,
//!   and the server drops it, so the server ends TCP first.
//!
//! Both keep tokio-tungstenite's and the OS's defaults: no `TCP_NODELAY` (as
//! `connect_async` leaves it), default buffers and limits.

use std::io;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::client::Endpoint;
use crate::ws::invalid;

/// One whole client connection: connect, upgrade, close handshake, the server's TCP end.
/// Any failure, including an upgrade refused or a wrong `Sec-WebSocket-Accept`, or a
/// stream that ends without the server's Close, is an error.
pub async fn cycle(endpoint: &Endpoint) -> io::Result<()> {
    let stream = TcpStream::connect(endpoint.addr).await?;
    let mut request = format!("ws://{}/bench", endpoint.addr)
        .into_client_request()
        .map_err(io_error)?;
    for line in endpoint.headers.split("\r\n").filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid("extra header without a colon"))?;
        let name = HeaderName::try_from(name.trim()).map_err(io::Error::other)?;
        let value = HeaderValue::try_from(value.trim()).map_err(io::Error::other)?;
        request.headers_mut().append(name, value);
    }
    let (mut ws, _response) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(io_error)?;
    ws.close(None).await.map_err(io_error)?;
    // After the server's Close, tungstenite reads on until the TCP stream ends and only
    // then reports the stream over (`None`).
    let mut answered = false;
    while let Some(message) = ws.next().await {
        match message.map_err(io_error)? {
            Message::Close(_) => answered = true,
            // A frame the server sent before it saw our Close.
            Message::Ping(_) | Message::Pong(_) => {}
            _ => return Err(invalid("unexpected message after the client's Close")),
        }
    }
    if !answered {
        return Err(invalid("the stream ended without the server's Close"));
    }
    Ok(())
}

/// Serves one connection: the opening handshake, then echoes data messages until the
/// close handshake is over (tungstenite answers pings and the Close itself); returning
/// drops the socket, so the server closes TCP first.
pub async fn echo(stream: TcpStream) -> io::Result<()> {
    let mut ws = tokio_tungstenite::accept_async(stream)
        .await
        .map_err(io_error)?;
    while let Some(message) = ws.next().await {
        match message.map_err(io_error)? {
            message @ (Message::Text(_) | Message::Binary(_)) => {
                ws.send(message).await.map_err(io_error)?;
            }
            // Pongs and the Close reply go out on the next read.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
        }
    }
    Ok(())
}

/// tungstenite's error as an `io::Error` (its own I/O errors unwrapped).
fn io_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        e => io::Error::other(e),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::client::Conn;
    use crate::ws::Rng;

    const HANDSHAKES: usize = 50;

    /// Serves `serve` on an ephemeral loopback port; returns the address.
    async fn server<F, Fut>(serve: F) -> SocketAddr
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = io::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream));
            }
        });
        addr
    }

    /// The pair completes handshake cycles directly, also with extra request headers.
    #[tokio::test]
    async fn the_pair_completes_handshakes() {
        let addr = server(echo).await;
        let plain = Endpoint::plain(addr);
        let extra = Endpoint {
            addr,
            headers: Arc::from("Origin: https://app.bench.example\r\nAuthorization: Bearer x\r\n"),
            fresh: None,
            tls: None,
        };
        for i in 0..HANDSHAKES {
            let endpoint = if i % 2 == 0 { &plain } else { &extra };
            cycle(endpoint)
                .await
                .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        }
    }

    /// Each client works against the other pair's server: both speak plain RFC 6455.
    #[tokio::test]
    async fn the_pairs_interoperate() {
        let tungstenite = server(echo).await;
        let bench = server(crate::backend::echo).await;
        for i in 0..HANDSHAKES / 5 {
            cycle(&Endpoint::plain(bench)).await.unwrap();
            let conn = Conn::open(&Endpoint::plain(tungstenite), Rng::new(i as u64 + 1))
                .await
                .unwrap();
            conn.close().await.unwrap();
        }
    }

    /// The server echoes data messages and closes TCP after the close handshake.
    #[tokio::test]
    async fn the_server_echoes_and_closes_first() {
        let addr = server(echo).await;
        let mut conn = Conn::open(&Endpoint::plain(addr), Rng::new(3))
            .await
            .unwrap();
        conn.round_trip(crate::ws::OP_BINARY, &[7; 300], crate::ws::OP_BINARY)
            .await
            .unwrap();
        conn.round_trip(crate::ws::OP_PING, b"p", crate::ws::OP_PONG)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }

    /// A `101` with a wrong `Sec-WebSocket-Accept`, or a refusal, is an error.
    #[tokio::test]
    async fn a_wrong_answer_is_an_error() {
        for answer in [
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
            "HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n",
        ] {
            let addr = server(move |mut stream: TcpStream| async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0];
                    if stream.read(&mut byte).await? == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                stream.write_all(answer.as_bytes()).await
            })
            .await;
            assert!(cycle(&Endpoint::plain(addr)).await.is_err(), "{answer}");
        }
    }

    /// A server that closes without answering the Close is an error.
    #[tokio::test]
    async fn an_unanswered_close_is_an_error() {
        let addr = server(|stream: TcpStream| async move {
            let mut ws = tokio_tungstenite::accept_async(stream)
                .await
                .map_err(io_error)?;
            // Read the client's Close, then drop the socket without answering it.
            let _ = ws.next().await;
            drop(ws.into_inner());
            Ok(())
        })
        .await;
        assert!(cycle(&Endpoint::plain(addr)).await.is_err());
    }
}
