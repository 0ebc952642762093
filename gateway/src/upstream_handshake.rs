//! Upstream handshake stage: sends the WebSocket upgrade to the chosen server over
//! HTTP/1.1 and accepts only a `101` with `Upgrade: websocket` and the exact
//! `Sec-WebSocket-Accept` for the key sent. Anything else is relayed or refused, and the
//! client connection stays HTTP.
//!
//! The request head is made here ([`request_head`]) and written by the connect stage
//! together with the connect ([`crate::connect::tcp_sending`]); this stage reads until
//! the response head parses (`httparse`, the parser hyper itself uses), on the
//! connection task: no hyper client connection, no extra task, no 8 KiB read buffer per
//! upgrade. A refusal's body (it is an error page, usually tiny) is read whole, up to
//! [`MAX_REFUSAL_BODY`].

use std::io;
use std::net::SocketAddr;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::client_handshake::accept_for;
use crate::head::{HeaderFields, RawFields};
use crate::headers::{
    FieldEdit, end_to_end, from_parsed, has_token, is_named, push_field, push_upgrade_fields,
    set_upgrade_hop, value_has_token,
};
use crate::stream::Stream;
use crate::tunnel::{self, Side};

/// Largest upstream response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest body of a refused upgrade that is relayed to the client.
pub const MAX_REFUSAL_BODY: usize = 1 << 20;
/// Most header fields in an upstream response head.
const MAX_HEADERS: usize = 128;

/// How the server answered the upgrade.
pub enum Outcome<S> {
    /// A valid `101`: its fields (for the client's `101`) and the server's end of the
    /// tunnel.
    Upgraded {
        /// The server's `101` fields, end-to-end ones only.
        head: Switch,
        /// The server's stream and any bytes it sent right after the `101`.
        server: Side<S>,
    },
    /// Any final status but `101`: relayed to the client as an ordinary response.
    Declined {
        /// The server's status.
        status: StatusCode,
        /// The server's headers (framing headers included; the caller re-frames).
        headers: HeaderMap,
        /// The whole body, de-chunked.
        body: Bytes,
    },
}

/// The end-to-end fields of a server's `101`, kept as the `name: value` lines they
/// arrived as: the client's `101` is written from them without a header map (see
/// `client::write_switch`), and only hyper's path makes one ([`Switch::header_map`]).
/// `httparse` admits exactly the names and values a `HeaderMap` would.
#[derive(Debug)]
pub struct Switch {
    /// `name: value\r\n` for each end-to-end field, in the server's order.
    lines: Vec<u8>,
    /// Whether one of them is `Date`.
    has_date: bool,
}

impl Switch {
    /// The end-to-end fields of `fields` (a `Content-Length`, which a `101` must not
    /// carry, is dropped too).
    fn of(fields: &[httparse::Header<'_>]) -> Switch {
        let mut lines = Vec::with_capacity(
            fields
                .iter()
                .map(|h| h.name.len() + h.value.len() + 4)
                .sum(),
        );
        let mut has_date = false;
        for (name, value) in end_to_end(fields) {
            if is_named(name, &header::CONTENT_LENGTH) {
                continue;
            }
            has_date |= is_named(name, &header::DATE);
            push_field(&mut lines, name, value);
        }
        Switch { lines, has_date }
    }

    /// The fields as `name: value\r\n` lines.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// Whether the server sent a `Date`.
    pub fn has_date(&self) -> bool {
        self.has_date
    }

    /// The fields as a header map, with exactly one `Connection: Upgrade` and
    /// `Upgrade: websocket` (for hyper's `101`).
    pub fn header_map(&self) -> HeaderMap {
        let mut map = self.fields();
        set_upgrade_hop(&mut map);
        map
    }

    /// The fields for an HTTP/2 client's `200` to its extended CONNECT (RFC 8441 §5):
    /// the end-to-end ones (the subprotocol and extensions chosen, cookies) without
    /// `Sec-WebSocket-Accept`, which belongs to the HTTP/1.1 hop.
    pub fn h2_header_map(&self) -> HeaderMap {
        let mut map = self.fields();
        map.remove(header::SEC_WEBSOCKET_ACCEPT);
        map
    }

    fn fields(&self) -> HeaderMap {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut head = self.lines.clone();
        head.extend_from_slice(b"\r\n");
        // The lines passed `httparse` once already, as at most `MAX_HEADERS` fields, so
        // neither step can fail here.
        match httparse::parse_headers(&head, &mut slots) {
            Ok(httparse::Status::Complete((_, fields))) => from_parsed(fields).unwrap_or_default(),
            _ => HeaderMap::new(),
        }
    }
}

/// Why the upstream handshake failed (the client gets a 502). Every variant is the
/// upstream's side.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading the response failed.
    #[error("upstream connection failed during the handshake: {0}")]
    Io(#[from] io::Error),
    /// The server closed before a whole response arrived.
    #[error("upstream closed the connection before a whole response")]
    Closed,
    /// The response head is not valid HTTP/1.
    #[error("upstream sent a malformed response: {0}")]
    Malformed(String),
    /// The response head is larger than [`MAX_HEAD`].
    #[error("upstream response head exceeds {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// A refusal's body is larger than [`MAX_REFUSAL_BODY`].
    #[error("upstream refusal body exceeds {MAX_REFUSAL_BODY} bytes")]
    BodyTooLarge,
    /// A `101` without `Upgrade: websocket`.
    #[error("upstream answered 101 without `Upgrade: websocket`")]
    NotWebSocket,
    /// A `101` whose `Sec-WebSocket-Accept` is missing or wrong.
    #[error("upstream answered 101 with a missing or wrong Sec-WebSocket-Accept")]
    BadAccept,
}

/// Reads the server's answer to the upgrade head already sent on `stream` (made by
/// [`request_head`]; the connect stage writes it); `key` is the `Sec-WebSocket-Key` sent.
pub async fn handshake<S: Stream>(mut stream: S, key: &str) -> Result<Outcome<S>, HandshakeError> {
    let accept = accept_for(key);
    let mut buf = BytesMut::with_capacity(1024);
    let (status, headers) = loop {
        match read_head(&mut stream, &mut buf, &accept).await? {
            Answer::Switch(head) => {
                return Ok(Outcome::Upgraded {
                    head,
                    server: Side {
                        stream,
                        early: tunnel::detach(buf.freeze()),
                    },
                });
            }
            // Interim answers (100 Continue, 103 Early Hints) are skipped, as hyper does.
            Answer::Other(status, _) if status.is_informational() => {}
            Answer::Other(status, headers) => break (status, headers),
        }
    };
    let body = read_body(&mut stream, &mut buf, status, &headers).await?;
    Ok(Outcome::Declined {
        status,
        headers,
        body,
    })
}

/// One response head.
enum Answer {
    /// A valid `101`.
    Switch(Switch),
    /// Any other status, with all its fields.
    Other(StatusCode, HeaderMap),
}

/// The upgrade's request head: `GET path?query HTTP/1.1`, the headers, a blank line.
pub fn request_head(uri: &Uri, headers: &HeaderMap) -> Vec<u8> {
    let mut out = request_line(uri, 256 + headers.len() * 48);
    for (name, value) in headers {
        push_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The upgrade's request head made from a client's raw fields, as [`request_head`] makes
/// it from their map after the upgrade hop's rules ([`push_upgrade_fields`]): `host`
/// replaces the client's `Host` when given, and `edits` (a policy's) change the fields
/// last. Also says whether the client's end-to-end
/// fields had a `Host`. `proto` is the client's scheme, for `X-Forwarded-Proto`.
pub fn request_head_raw(
    uri: &Uri,
    fields: &RawFields,
    host: Option<&str>,
    client: SocketAddr,
    proto: &str,
    edits: &[FieldEdit<'_>],
) -> (Vec<u8>, bool) {
    let mut out = request_line(uri, 256 + fields.head().len());
    let had_host = push_upgrade_fields(&mut out, fields, host, client, proto, edits);
    out.extend_from_slice(b"\r\n");
    (out, had_host)
}

/// `GET path?query HTTP/1.1` in a buffer with room for `capacity` bytes.
fn request_line(uri: &Uri, capacity: usize) -> Vec<u8> {
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut out = Vec::with_capacity(capacity);
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    out
}

/// Reads more bytes into `buf`; the server closing is an error here.
async fn fill(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Result<(), HandshakeError> {
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(4096);
    }
    match stream.read_buf(buf).await? {
        0 => Err(HandshakeError::Closed),
        _ => Ok(()),
    }
}

/// Reads and parses one response head, consuming it from `buf`. A `101` must carry
/// `Upgrade: websocket` and exactly one `Sec-WebSocket-Accept` equal to `accept`, checked
/// on the raw fields, and only its end-to-end fields are kept.
async fn read_head(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    accept: &str,
) -> Result<Answer, HandshakeError> {
    loop {
        if !buf.is_empty() {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut slots);
            match resp.parse(buf) {
                Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
                    return Err(HandshakeError::HeadTooLarge);
                }
                Ok(httparse::Status::Complete(len)) => {
                    let malformed = |what: &str| HandshakeError::Malformed(what.to_owned());
                    let status = resp
                        .code
                        .and_then(|c| StatusCode::from_u16(c).ok())
                        .ok_or_else(|| malformed("bad status code"))?;
                    let answer = if status == StatusCode::SWITCHING_PROTOCOLS {
                        check_switch(resp.headers, accept)?;
                        Answer::Switch(Switch::of(resp.headers))
                    } else {
                        Answer::Other(status, from_parsed(resp.headers).map_err(malformed)?)
                    };
                    buf.advance(len);
                    return Ok(answer);
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(HandshakeError::Malformed(e.to_string())),
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(HandshakeError::HeadTooLarge);
        }
        fill(stream, buf).await?;
    }
}

/// Whether a `101`'s fields make it a WebSocket answer to the key whose accept value is
/// `accept`.
fn check_switch(fields: &[httparse::Header<'_>], accept: &str) -> Result<(), HandshakeError> {
    if !fields
        .values_of(header::UPGRADE.as_str())
        .any(|v| value_has_token(v, "websocket"))
    {
        return Err(HandshakeError::NotWebSocket);
    }
    let mut accepts = fields.values_of(header::SEC_WEBSOCKET_ACCEPT.as_str());
    match (accepts.next(), accepts.next()) {
        (Some(a), None) if a == accept.as_bytes() => Ok(()),
        _ => Err(HandshakeError::BadAccept),
    }
}

/// Reads a refusal's whole body per its framing (RFC 9112 §6.3): none for 204/304,
/// chunked, `Content-Length`, or until the server closes.
async fn read_body(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<Bytes, HandshakeError> {
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Bytes::new());
    }
    if has_token(headers, header::TRANSFER_ENCODING.as_str(), "chunked") {
        return read_chunked(stream, buf).await;
    }
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        let len: usize = len
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| HandshakeError::Malformed("bad content-length".into()))?;
        if len > MAX_REFUSAL_BODY {
            return Err(HandshakeError::BodyTooLarge);
        }
        while buf.len() < len {
            fill(stream, buf).await?;
        }
        return Ok(buf.split_to(len).freeze());
    }
    loop {
        if buf.len() > MAX_REFUSAL_BODY {
            return Err(HandshakeError::BodyTooLarge);
        }
        match fill(stream, buf).await {
            Ok(()) => {}
            Err(HandshakeError::Closed) => return Ok(std::mem::take(buf).freeze()),
            Err(e) => return Err(e),
        }
    }
}

/// Decodes a chunked body (trailers are read and dropped).
async fn read_chunked(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Result<Bytes, HandshakeError> {
    let malformed = || HandshakeError::Malformed("bad chunked body".into());
    let mut body = BytesMut::new();
    loop {
        let size = loop {
            match httparse::parse_chunk_size(buf) {
                Ok(httparse::Status::Complete((used, size))) => {
                    buf.advance(used);
                    break usize::try_from(size).map_err(|_| HandshakeError::BodyTooLarge)?;
                }
                Ok(httparse::Status::Partial) if buf.len() < 1024 => fill(stream, buf).await?,
                _ => return Err(malformed()),
            }
        };
        if size == 0 {
            // Trailer fields, then the blank line that ends the message.
            loop {
                match buf.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => return Ok(body.freeze()),
                    Some(end) => buf.advance(end + 2),
                    None if buf.len() < MAX_HEAD => fill(stream, buf).await?,
                    None => return Err(HandshakeError::HeadTooLarge),
                }
            }
        }
        if body.len().saturating_add(size) > MAX_REFUSAL_BODY {
            return Err(HandshakeError::BodyTooLarge);
        }
        while buf.len() < size + 2 {
            fill(stream, buf).await?;
        }
        if &buf[size..size + 2] != b"\r\n" {
            return Err(malformed());
        }
        body.extend_from_slice(&buf[..size]);
        buf.advance(size + 2);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    /// Runs the handshake against a server that answers `answer` (sent in pieces of
    /// `piece` bytes) and then ends its stream.
    async fn against(
        answer: &[u8],
        piece: usize,
    ) -> Result<Outcome<tokio::io::DuplexStream>, HandshakeError> {
        let (ours, mut theirs) = duplex(1 << 20);
        let answer = answer.to_vec();
        tokio::spawn(async move {
            for chunk in answer.chunks(piece) {
                theirs.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        handshake(ours, KEY).await
    }

    #[tokio::test]
    async fn a_valid_101_opens_the_tunnel_with_the_bytes_after_it() {
        let answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
            Connection: Upgrade, X-Hop\r\nX-Hop: 1\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
            Sec-WebSocket-Protocol: chat\r\n\r\n\x81\x02hi";
        for piece in [1, 7, answer.len()] {
            let Ok(Outcome::Upgraded { head, mut server }) = against(answer, piece).await else {
                panic!("not upgraded (piece {piece})");
            };
            // Only end-to-end fields are kept for the client's 101.
            assert_eq!(
                String::from_utf8_lossy(head.lines()),
                "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n"
            );
            // The first frame, sent with the 101, goes into the tunnel: what was read
            // with the head first, the rest from the stream.
            let mut rest = Vec::new();
            server.stream.read_to_end(&mut rest).await.unwrap();
            assert_eq!([&server.early[..], &rest].concat(), b"\x81\x02hi");
        }
    }

    #[tokio::test]
    async fn a_101_without_the_right_accept_is_refused() {
        let wrong = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n";
        assert!(matches!(
            against(wrong, 5).await,
            Err(HandshakeError::BadAccept)
        ));
        let twice = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
            Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
            Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert!(matches!(
            against(twice, 64).await,
            Err(HandshakeError::BadAccept)
        ));
        let not_ws = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\
            Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert!(matches!(
            against(not_ws, 64).await,
            Err(HandshakeError::NotWebSocket)
        ));
        assert!(matches!(
            against(b"HTTP/1.1 10", 3).await,
            Err(HandshakeError::Closed)
        ));
    }

    #[tokio::test]
    async fn a_refusal_is_read_whole_after_interim_answers() {
        let answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\n\
            Transfer-Encoding: chunked\r\nX-Why: origin\r\n\r\n4\r\nnope\r\n3\r\n!!\n\r\n0\r\n\r\n";
        for piece in [1, 9, answer.len()] {
            let Ok(Outcome::Declined {
                status,
                headers,
                body,
            }) = against(answer, piece).await
            else {
                panic!("not declined (piece {piece})");
            };
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert_eq!(headers["x-why"], "origin");
            assert_eq!(&body[..], b"nope!!\n");
        }
    }
}
