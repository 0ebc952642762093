//! The stream seam: every stage from the client's first read to the tunnel works over a
//! [`Stream`], any owned byte stream, not a TCP socket. Plain TCP is one (keeping its
//! fast paths), an in-memory [`DuplexStream`] another (for tests), a TLS stream and an
//! HTTP/2 extended-CONNECT stream more.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tokio::net::TcpStream;

/// A byte stream one side of a connection runs over.
///
/// Reads and writes go through `AsyncRead`/`AsyncWrite`, so a stream with framing of its
/// own (TLS records, HTTP/2 DATA frames) applies it to everything the gateway sends,
/// including the Close frames the tunnel writes itself.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Waits until a read is worth trying, without holding a buffer: the tunnel borrows a
    /// relay buffer only after this is ready, so an idle tunnel holds none.
    ///
    /// `Ready` is a hint, never a promise of bytes: the read that follows may still be
    /// `Pending` (the tunnel then gives the buffer back). The default is ready at once,
    /// which is right for any stream whose readiness the socket cannot tell (a TLS
    /// stream may hold decrypted bytes while its socket is quiet, or have nothing to
    /// give while its socket is readable): its read itself waits.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = cx;
        Poll::Ready(Ok(()))
    }
}

impl Stream for TcpStream {
    /// The socket's read readiness: a plaintext socket's bytes are the stream's bytes.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl Stream for DuplexStream {}

/// A client's TLS session on a TLS listener: readiness is its read's to tell.
impl Stream for tokio_rustls::server::TlsStream<TcpStream> {}

/// An HTTP/2 stream hyper handed over after an extended CONNECT (its DATA frames, with
/// flow control); readiness is its read's to tell.
impl Stream for hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {}

/// Writes `bytes` if the stream takes them all at once, and flushes; never waits. For the
/// last words of a connection (a Close frame at idle timeout or shutdown), written
/// through the stream's own write path. Returns whether all of `bytes` were taken.
pub fn try_send<S: Stream>(stream: &mut S, bytes: &[u8]) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let sent = matches!(
        Pin::new(&mut *stream).poll_write(&mut cx, bytes),
        Poll::Ready(Ok(n)) if n == bytes.len()
    );
    let _ = Pin::new(stream).poll_flush(&mut cx);
    sent
}
