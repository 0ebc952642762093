//! Client stage: reads the first request head of a connection with `httparse` (the
//! parser hyper itself uses) under the listener's size and time bounds, and writes
//! Sluice's own answers straight on the client's stream.
//!
//! A WebSocket upgrade is answered from here without a hyper server connection: no
//! dispatcher, no service future, no upgrade hand-off and no spawned tunnel task (the
//! tunnel runs in the connection's own task; see `serve::connection`). Anything else, and
//! any head this stage does not want to judge (a body, an invalid field), goes to hyper
//! with the bytes already read put back in front of the stream ([`Prefixed`]).

use std::cell::Cell;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::head::{HeaderFields, RawFields, RequestHead, UpgradeHead, span};
use crate::headers::{has_token, push_field, value_has_token};
use crate::stream::Stream;
use crate::upstream_handshake::Switch;

/// Most header fields in a request head judged here; more go to hyper (which answers
/// 431 past its own limit of 100).
const MAX_HEADERS: usize = 100;
/// First read buffer: a typical upgrade head (300–2,000 bytes) arrives in one read.
const FIRST_READ: usize = 4096;

/// The first request head of a connection.
#[derive(Debug)]
pub enum FirstHead {
    /// A WebSocket upgrade without a body: the parsed head, and the bytes the client sent
    /// after it.
    Upgrade {
        /// The request head.
        req: UpgradeHead,
        /// Bytes read past the head (a client may send its first frame at once).
        rest: Bytes,
    },
    /// Anything else, with every byte read so far, for hyper to serve.
    Other(Bytes),
    /// The client closed, or did not finish a head within the header-read timeout.
    Gone,
}

/// Reads until one whole request head has arrived, the client is gone, `max` bytes are
/// buffered (hyper then answers 431) or `timeout` passes.
pub async fn read_first(
    stream: &mut (impl AsyncRead + Unpin),
    max: usize,
    timeout: Duration,
) -> FirstHead {
    let mut buf = BytesMut::with_capacity(FIRST_READ.min(max));
    match tokio::time::timeout(timeout, read_head(stream, &mut buf, max)).await {
        Ok(Parsed::Upgrade(line, spans, len)) => {
            let head = buf.split_to(len).freeze();
            match Uri::from_maybe_shared(head.slice(line.target)) {
                Ok(uri) => FirstHead::Upgrade {
                    req: UpgradeHead::new(
                        line.method,
                        uri,
                        line.version,
                        RawFields::new(head, spans),
                    ),
                    rest: buf.freeze(),
                },
                // A target `Uri` refuses: hyper answers it (400) from every byte read.
                Err(_) => FirstHead::Other([&head[..], &buf[..]].concat().into()),
            }
        }
        Ok(Parsed::Other) => FirstHead::Other(buf.freeze()),
        Ok(Parsed::Gone) | Err(_) => FirstHead::Gone,
    }
}

/// What [`read_head`] found.
enum Parsed {
    /// An upgrade head of this many bytes: its request line, and its fields as spans of
    /// the buffer.
    Upgrade(RequestLine, Vec<(Range<usize>, Range<usize>)>, usize),
    /// A head for hyper (complete or not).
    Other,
    /// The client closed first.
    Gone,
}

/// An upgrade head's request line.
struct RequestLine {
    method: Method,
    /// The request target, as a byte range of the head.
    target: Range<usize>,
    version: Version,
}

async fn read_head(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    max: usize,
) -> Parsed {
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve((max - buf.len()).min(buf.capacity()));
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Parsed::Gone,
            Ok(_) => {}
        }
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut slots);
        match req.parse(buf) {
            Ok(httparse::Status::Partial) if buf.len() < max => {}
            Ok(httparse::Status::Complete(len)) => {
                return match upgrade(&req, buf) {
                    Some(line) => Parsed::Upgrade(line, RawFields::spans(buf, req.headers), len),
                    None => Parsed::Other,
                };
            }
            // Too large, too many fields, or malformed: hyper gives the answer.
            _ => return Parsed::Other,
        }
    }
}

/// The request line when the head asks for a WebSocket upgrade and has no body, else
/// `None` (hyper serves it). Judged on the raw fields: a plain request's head is not
/// turned into anything only for hyper to parse again, and an upgrade's fields stay spans
/// of `buf` (`httparse` admits exactly the names and values a header map would).
fn upgrade(req: &httparse::Request<'_, '_>, buf: &[u8]) -> Option<RequestLine> {
    let named = |name| req.headers.values_of(name);
    if !named("upgrade").any(|v| value_has_token(v, "websocket")) {
        return None;
    }
    if named("transfer-encoding").next().is_some() || named("content-length").any(|v| v != b"0") {
        return None;
    }
    Some(RequestLine {
        method: Method::from_bytes(req.method?.as_bytes()).ok()?,
        target: span(buf, req.path?.as_bytes()),
        version: match req.version? {
            0 => Version::HTTP_10,
            _ => Version::HTTP_11,
        },
    })
}

/// Whether the connection must close after answering `req` (HTTP/1.0 without
/// keep-alive, or `Connection: close`).
pub fn closes_after(req: &impl RequestHead) -> bool {
    let connection = header::CONNECTION.as_str();
    if req.version() == Version::HTTP_10 {
        !has_token(req.fields(), connection, "keep-alive")
    } else {
        has_token(req.fields(), connection, "close")
    }
}

/// The body of a response the client stage writes.
#[derive(Debug, Clone, Copy)]
pub struct Payload<'a> {
    /// The body; its length is the `Content-Length`.
    pub bytes: &'a [u8],
    /// Whether the bytes are sent (not for an answer to `HEAD`).
    pub send: bool,
}

/// Writes one response in a single write: status line, `headers`, `Date` unless the
/// headers carry one, framing (`Content-Length`) and `Connection: close` when `close`,
/// then the body. A `101` goes out through [`write_switch`].
pub async fn write_response(
    stream: &mut (impl AsyncWrite + Unpin),
    status: StatusCode,
    headers: &HeaderMap,
    body: Payload<'_>,
    close: bool,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(128 + headers.len() * 48 + body.bytes.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || (close && name == header::CONNECTION) {
            continue;
        }
        push_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !headers.contains_key(header::DATE) {
        push_date_field(&mut out);
    }
    out.extend_from_slice(format!("content-length: {}\r\n", body.bytes.len()).as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if body.send {
        out.extend_from_slice(body.bytes);
    }
    stream.write_all(&out).await?;
    // A TLS stream holds what it encrypted until flushed; a socket's flush is nothing.
    stream.flush().await
}

/// Writes the client's `101` in one write: the status line, the server's end-to-end
/// fields as they came, exactly one `Connection: Upgrade` and `Upgrade: websocket`, and
/// `Date` unless the server sent one. No header map is made for it.
pub async fn write_switch(stream: &mut (impl AsyncWrite + Unpin), head: &Switch) -> io::Result<()> {
    let lines = head.lines();
    let mut out = Vec::with_capacity(128 + lines.len());
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    out.extend_from_slice(lines);
    out.extend_from_slice(b"connection: Upgrade\r\nupgrade: websocket\r\n");
    if !head.has_date() {
        push_date_field(&mut out);
    }
    out.extend_from_slice(b"\r\n");
    stream.write_all(&out).await?;
    // A TLS stream holds what it encrypted until flushed; a socket's flush is nothing.
    stream.flush().await
}

/// Appends a `date` field with the current value.
fn push_date_field(out: &mut Vec<u8>) {
    out.extend_from_slice(b"date: ");
    push_date(out);
    out.extend_from_slice(b"\r\n");
}

/// The length of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
const DATE_LEN: usize = 29;

/// Appends the current `Date` value. It is formatted once per second per worker thread
/// (as hyper does for the responses it writes), not once per response.
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static LAST: Cell<(u64, [u8; DATE_LEN])> = const { Cell::new((u64::MAX, [0; DATE_LEN])) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (cached, text) = LAST.get();
    if cached == secs {
        out.extend_from_slice(&text);
        return;
    }
    let fresh = httpdate::fmt_http_date(now);
    if let Ok(text) = <[u8; DATE_LEN]>::try_from(fresh.as_bytes()) {
        LAST.set((secs, text));
    }
    out.extend_from_slice(fresh.as_bytes());
}

/// A client stream with bytes already read from it put back in front, so hyper parses
/// the head this stage read first.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    stream: S,
}

impl<S> Prefixed<S> {
    /// `stream`, reading `prefix` first.
    pub fn new(prefix: Bytes, stream: S) -> Self {
        Prefixed { prefix, stream }
    }

    /// The bytes read ahead that are served before the stream's own.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The stream and whatever of the prefix hyper has not read.
    pub fn into_parts(self) -> (S, Bytes) {
        (self.stream, self.prefix)
    }
}

impl<S: Stream> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.advance(n);
        if this.prefix.is_empty() {
            // Let go of the first read's buffer.
            this.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: Stream> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cached_date_is_the_current_one() {
        for _ in 0..3 {
            let before = SystemTime::now();
            let mut out = Vec::new();
            push_date(&mut out);
            let after = SystemTime::now();
            let text = std::str::from_utf8(&out).unwrap();
            let parsed = httpdate::parse_http_date(text).unwrap();
            // Second resolution: the value is within the second before `before` and `after`.
            assert!(parsed + Duration::from_secs(1) > before, "{text}");
            assert!(parsed <= after, "{text}");
            assert_eq!(out.len(), DATE_LEN);
        }
    }
}

#[cfg(test)]
mod stream_tests {
    use tokio::io::{AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test]
    async fn an_upgrade_head_is_read_in_pieces_and_the_bytes_after_it_kept() {
        let head = "GET /chat?room=1 HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\n\
                    Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let sent = [head.as_bytes(), b"\x81\x82abcdXY"].concat();
        let (mut ours, mut theirs) = duplex(1 << 16);
        let client = tokio::spawn(async move {
            for chunk in sent.chunks(11) {
                theirs.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            theirs
        });
        let first = read_first(&mut ours, 16 * 1024, Duration::from_secs(10)).await;
        let FirstHead::Upgrade { req, rest } = first else {
            panic!("not an upgrade: {first:?}");
        };
        assert_eq!(req.uri().path(), "/chat");
        assert_eq!(
            req.fields().values_of("host").next(),
            Some(&b"a.example"[..])
        );
        // Whatever arrived after the head is kept for the tunnel (here, possibly part of
        // the first frame: the rest is still on the stream).
        assert!(b"\x81\x82abcdXY".starts_with(&rest));
        drop(client.await.unwrap());
    }

    #[tokio::test]
    async fn other_heads_go_to_hyper_with_every_byte_read() {
        let sent = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi";
        let (mut ours, mut theirs) = duplex(1 << 16);
        theirs.write_all(sent).await.unwrap();
        match read_first(&mut ours, 16 * 1024, Duration::from_secs(10)).await {
            FirstHead::Other(read) => assert_eq!(&read[..], sent),
            other => panic!("{other:?}"),
        }
        drop(theirs);
        assert!(matches!(
            read_first(&mut ours, 16 * 1024, Duration::from_secs(10)).await,
            FirstHead::Gone
        ));
    }
}
