//! Client stage: reads the first request head of a connection with `httparse` (the
//! parser hyper itself uses) under the listener's size and time bounds, and writes
//! Sluice's own answers on the raw socket.
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
use http::{Method, Request, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::handshake::Switch;
use crate::headers::{
    Fields, RawFields, has_token, parsed_values, push_field, span, value_has_token,
};

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
pub async fn read_first(stream: &mut TcpStream, max: usize, timeout: Duration) -> FirstHead {
    let mut buf = BytesMut::with_capacity(FIRST_READ.min(max));
    match tokio::time::timeout(timeout, read_head(stream, &mut buf, max)).await {
        Ok(Parsed::Upgrade(line, spans, len)) => {
            let head = buf.split_to(len).freeze();
            match Uri::from_maybe_shared(head.slice(line.target)) {
                Ok(uri) => FirstHead::Upgrade {
                    req: UpgradeHead {
                        method: line.method,
                        uri,
                        version: line.version,
                        fields: RawFields::new(head, spans),
                    },
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

async fn read_head(stream: &mut TcpStream, buf: &mut BytesMut, max: usize) -> Parsed {
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
    let named = |name| parsed_values(req.headers, name);
    if !named(&header::UPGRADE).any(|v| value_has_token(v, "websocket")) {
        return None;
    }
    if named(&header::TRANSFER_ENCODING).next().is_some()
        || named(&header::CONTENT_LENGTH).any(|v| v != b"0")
    {
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

/// A request head, whichever stage read it: hyper's `Request`, or the client stage's
/// [`UpgradeHead`]. The route, upgrade and policy stages read requests through it.
pub trait RequestHead {
    /// The head's fields.
    type Fields: Fields;
    /// The request method.
    fn method(&self) -> &Method;
    /// The request target.
    fn uri(&self) -> &Uri;
    /// The HTTP version.
    fn version(&self) -> Version;
    /// The header fields.
    fn fields(&self) -> &Self::Fields;
}

impl<B> RequestHead for Request<B> {
    type Fields = HeaderMap;
    fn method(&self) -> &Method {
        Request::method(self)
    }
    fn uri(&self) -> &Uri {
        Request::uri(self)
    }
    fn version(&self) -> Version {
        Request::version(self)
    }
    fn fields(&self) -> &HeaderMap {
        Request::headers(self)
    }
}

/// A first request head that asks for a WebSocket upgrade, its fields kept as spans of
/// the bytes read ([`RawFields`]): no header map is made for it unless a plugin edits the
/// upstream head.
#[derive(Debug)]
pub struct UpgradeHead {
    method: Method,
    uri: Uri,
    version: Version,
    fields: RawFields,
}

impl RequestHead for UpgradeHead {
    type Fields = RawFields;
    fn method(&self) -> &Method {
        &self.method
    }
    fn uri(&self) -> &Uri {
        &self.uri
    }
    fn version(&self) -> Version {
        self.version
    }
    fn fields(&self) -> &RawFields {
        &self.fields
    }
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
pub struct Body<'a> {
    /// The body; its length is the `Content-Length`.
    pub bytes: &'a [u8],
    /// Whether the bytes are sent (not for an answer to `HEAD`).
    pub send: bool,
}

/// Writes one response in a single write: status line, `headers`, `Date` unless the
/// headers carry one, framing (`Content-Length`) and `Connection: close` when `close`,
/// then the body. A `101` goes out through [`write_switch`].
pub async fn write_response(
    stream: &mut TcpStream,
    status: StatusCode,
    headers: &HeaderMap,
    body: Body<'_>,
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
    stream.write_all(&out).await
}

/// Writes the client's `101` in one write: the status line, the server's end-to-end
/// fields as they came, exactly one `Connection: Upgrade` and `Upgrade: websocket`, and
/// `Date` unless the server sent one. No header map is made for it.
pub async fn write_switch(stream: &mut TcpStream, head: &Switch) -> io::Result<()> {
    let lines = head.lines();
    let mut out = Vec::with_capacity(128 + lines.len());
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    out.extend_from_slice(lines);
    out.extend_from_slice(b"connection: Upgrade\r\nupgrade: websocket\r\n");
    if !head.has_date() {
        push_date_field(&mut out);
    }
    out.extend_from_slice(b"\r\n");
    stream.write_all(&out).await
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
pub struct Prefixed {
    prefix: Bytes,
    stream: TcpStream,
}

impl Prefixed {
    /// `stream`, reading `prefix` first.
    pub fn new(prefix: Bytes, stream: TcpStream) -> Self {
        Prefixed { prefix, stream }
    }

    /// The stream and whatever of the prefix hyper has not read.
    pub fn into_parts(self) -> (TcpStream, Bytes) {
        (self.stream, self.prefix)
    }
}

impl AsyncRead for Prefixed {
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

impl AsyncWrite for Prefixed {
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
