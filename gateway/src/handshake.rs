//! Upstream handshake stage: sends the WebSocket upgrade to the chosen server over
//! HTTP/1.1 and accepts only a `101` with `Upgrade: websocket` and the exact
//! `Sec-WebSocket-Accept` for the key sent. Anything else is relayed or refused, and the
//! client connection stays HTTP.

use bytes::Bytes;
use http::header;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::headers::has_token;
use crate::tunnel::End;
use crate::upgrade::accept_for;

/// How the server answered the upgrade.
pub enum Outcome {
    /// A valid `101`: its head (for the client's `101`) and the server's end of the tunnel.
    Upgraded {
        /// The server's `101` head.
        head: http::response::Parts,
        /// The server's socket and any bytes it sent right after the `101`.
        server: End,
    },
    /// Any status but `101`: relayed to the client as an ordinary response.
    Declined(Response<Incoming>),
}

/// Why the upstream handshake failed (the client gets a 502).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The server's response was not valid HTTP, or the connection broke.
    #[error("upstream handshake failed: {0}")]
    Http(#[from] hyper::Error),
    /// A `101` without `Upgrade: websocket`.
    #[error("upstream answered 101 without `Upgrade: websocket`")]
    NotWebSocket,
    /// A `101` whose `Sec-WebSocket-Accept` is missing or wrong.
    #[error("upstream answered 101 with a missing or wrong Sec-WebSocket-Accept")]
    BadAccept,
    /// hyper handed back an unexpected transport.
    #[error("upstream upgrade yielded an unexpected transport")]
    Transport,
}

/// Performs the handshake on `stream`; `key` is the `Sec-WebSocket-Key` inside `req`.
pub async fn handshake(
    stream: TcpStream,
    req: Request<Empty<Bytes>>,
    key: &str,
) -> Result<Outcome, HandshakeError> {
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        // Ends when the response (or the upgrade) is done; errors surface in send_request.
        let _ = conn.with_upgrades().await;
    });
    let mut resp = sender.send_request(req).await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Outcome::Declined(resp));
    }
    if !has_token(resp.headers(), header::UPGRADE, "websocket") {
        return Err(HandshakeError::NotWebSocket);
    }
    let expected = accept_for(key);
    let mut accepts = resp.headers().get_all(header::SEC_WEBSOCKET_ACCEPT).iter();
    match (accepts.next(), accepts.next()) {
        (Some(a), None) if a.as_bytes() == expected.as_bytes() => {}
        _ => return Err(HandshakeError::BadAccept),
    }
    let upgraded = hyper::upgrade::on(&mut resp).await?;
    let parts = upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| HandshakeError::Transport)?;
    let (head, _) = resp.into_parts();
    Ok(Outcome::Upgraded {
        head,
        server: End {
            stream: parts.io.into_inner(),
            early: End::detach(parts.read_buf),
        },
    })
}
