//! The tunnel over in-memory streams: each test plays a client and a server on the far
//! ends of two [`tokio::io::duplex`] pairs, with the tunnel between them.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf, duplex,
};
use tokio::task::JoinHandle;

use super::*;

/// A frame as a client sends it (masked, RFC 6455 §5.3); payloads under 126 bytes.
fn from_client(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// A frame as a server sends it (unmasked); payloads under 126 bytes.
fn from_server(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode, payload.len() as u8];
    f.extend_from_slice(payload);
    f
}

const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;

/// A client and a server with a tunnel between them.
struct Rig {
    /// The client's end.
    client: DuplexStream,
    /// The server's end.
    server: DuplexStream,
    shutdown: CancellationToken,
    tunnel: JoinHandle<Report>,
}

impl Rig {
    fn start(idle: Option<Duration>) -> Rig {
        Rig::with_early(idle, b"", b"")
    }

    /// A tunnel whose sides come with bytes read past their handshakes.
    fn with_early(idle: Option<Duration>, client_early: &[u8], server_early: &[u8]) -> Rig {
        let (client, client_side) = duplex(1 << 16);
        let (server, server_side) = duplex(1 << 16);
        Rig::around(
            client,
            server,
            Side {
                stream: client_side,
                early: Bytes::copy_from_slice(client_early),
            },
            Side {
                stream: server_side,
                early: Bytes::copy_from_slice(server_early),
            },
            idle,
        )
    }

    fn around<C: Stream, S: Stream>(
        client: DuplexStream,
        server: DuplexStream,
        client_side: Side<C>,
        server_side: Side<S>,
        idle: Option<Duration>,
    ) -> Rig {
        let shutdown = CancellationToken::new();
        let tunnel = tokio::spawn(relay(
            client_side,
            server_side,
            idle,
            None,
            shutdown.clone(),
        ));
        Rig {
            client,
            server,
            shutdown,
            tunnel,
        }
    }

    async fn report(self) -> Report {
        self.tunnel.await.unwrap()
    }
}

/// Reads exactly `n` bytes.
async fn read_n(stream: &mut DuplexStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    stream.read_exact(&mut buf).await.unwrap();
    buf
}

/// Reads until the stream ends.
async fn read_to_end(stream: &mut DuplexStream) -> Vec<u8> {
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    buf
}

#[tokio::test]
async fn bytes_pass_both_ways_exactly_and_are_counted() {
    let mut rig = Rig::start(None);
    let up = [from_client(TEXT, b"hello"), from_client(TEXT, &[0xff; 100])].concat();
    rig.client.write_all(&up).await.unwrap();
    assert_eq!(read_n(&mut rig.server, up.len()).await, up);
    let down = from_server(TEXT, b"hi there");
    rig.server.write_all(&down).await.unwrap();
    assert_eq!(read_n(&mut rig.client, down.len()).await, down);

    // The client closes: its Close, the server's answer, then the server ends TCP.
    let close = from_client(CLOSE, &[0x03, 0xe8]);
    rig.client.write_all(&close).await.unwrap();
    assert_eq!(read_n(&mut rig.server, close.len()).await, close);
    let answer = from_server(CLOSE, &[0x03, 0xe8]);
    rig.server.write_all(&answer).await.unwrap();
    drop(rig.server);
    assert_eq!(read_to_end(&mut rig.client).await, answer);
    let report = rig.tunnel.await.unwrap();
    assert_eq!(report.reason, Ended::ClientClosed);
    assert_eq!(report.bytes_in, (up.len() + close.len()) as u64);
    assert_eq!(report.bytes_out, (down.len() + answer.len()) as u64);
    assert!(report.error.is_none());
}

#[tokio::test]
async fn bytes_read_past_the_handshakes_go_first() {
    let client_early = from_client(TEXT, b"first");
    let server_early = from_server(TEXT, b"welcome");
    let mut rig = Rig::with_early(None, &client_early, &server_early);
    let later = from_client(TEXT, b"second");
    rig.client.write_all(&later).await.unwrap();
    assert_eq!(
        read_n(&mut rig.server, client_early.len() + later.len()).await,
        [client_early.clone(), later.clone()].concat()
    );
    assert_eq!(
        read_n(&mut rig.client, server_early.len()).await,
        server_early
    );
    drop(rig.client);
    assert_eq!(read_to_end(&mut rig.server).await, b"");
    drop(rig.server);
    let report = rig.tunnel.await.unwrap();
    assert_eq!(report.bytes_in, (client_early.len() + later.len()) as u64);
    assert_eq!(report.bytes_out, server_early.len() as u64);
}

#[tokio::test]
async fn a_half_close_is_passed_on_and_the_other_way_keeps_flowing() {
    let mut rig = Rig::start(None);
    rig.client.shutdown().await.unwrap();
    // The server sees the end of the client's bytes...
    assert_eq!(read_to_end(&mut rig.server).await, b"");
    // ...and can still answer.
    let late = from_server(TEXT, b"still here");
    rig.server.write_all(&late).await.unwrap();
    assert_eq!(read_n(&mut rig.client, late.len()).await, late);
    drop(rig.server);
    assert_eq!(read_to_end(&mut rig.client).await, b"");
    // No Close frame passed, so the side whose stream ended first closed.
    assert_eq!(rig.tunnel.await.unwrap().reason, Ended::ClientClosed);
}

#[tokio::test]
async fn the_side_that_sent_the_first_close_is_named() {
    let mut rig = Rig::start(None);
    let close = from_server(CLOSE, &[0x03, 0xe8]);
    rig.server.write_all(&close).await.unwrap();
    assert_eq!(read_n(&mut rig.client, close.len()).await, close);
    let answer = from_client(CLOSE, &[0x03, 0xe8]);
    rig.client.write_all(&answer).await.unwrap();
    assert_eq!(read_n(&mut rig.server, answer.len()).await, answer);
    // The closing handshake is over: the server's end of TCP closes both streams.
    drop(rig.server);
    assert_eq!(read_to_end(&mut rig.client).await, b"");
    assert_eq!(rig.tunnel.await.unwrap().reason, Ended::ServerClosed);
}

#[tokio::test(start_paused = true)]
async fn an_idle_tunnel_is_closed_with_going_away_on_both_sides() {
    let idle = Duration::from_secs(30);
    let mut rig = Rig::start(Some(idle));
    let began = Instant::now();
    // Paused time runs forward to the next timer once every task waits.
    assert_eq!(read_to_end(&mut rig.client).await, GOING_AWAY_TO_CLIENT);
    assert_eq!(read_to_end(&mut rig.server).await, GOING_AWAY_TO_SERVER);
    assert!(began.elapsed() >= idle);
    assert_eq!(rig.report().await.reason, Ended::IdleTimeout);
}

#[tokio::test(start_paused = true)]
async fn traffic_puts_off_the_idle_timeout() {
    let idle = Duration::from_secs(10);
    let mut rig = Rig::start(Some(idle));
    let ping = from_client(TEXT, b"ping");
    for _ in 0..4 {
        tokio::time::advance(Duration::from_secs(7)).await;
        rig.client.write_all(&ping).await.unwrap();
        assert_eq!(read_n(&mut rig.server, ping.len()).await, ping);
    }
    // 28 s in, with bytes every 7 s, the tunnel is still open; it closes 10 s after
    // the last of them.
    let last = Instant::now();
    assert_eq!(read_to_end(&mut rig.client).await, GOING_AWAY_TO_CLIENT);
    assert!(last.elapsed() >= idle);
    assert_eq!(rig.report().await.reason, Ended::IdleTimeout);
}

#[tokio::test]
async fn shutdown_sends_going_away_only_where_a_frame_is_not_half_written() {
    let mut rig = Rig::start(None);
    // The client is in the middle of a frame: 3 of its 10 payload bytes have passed.
    let frame = from_client(TEXT, b"0123456789");
    let part = &frame[..2 + 4 + 3];
    rig.client.write_all(part).await.unwrap();
    assert_eq!(read_n(&mut rig.server, part.len()).await, part);
    rig.shutdown.cancel();
    // The client gets a clean Close; the server gets no Close spliced into the frame.
    assert_eq!(read_to_end(&mut rig.client).await, GOING_AWAY_TO_CLIENT);
    assert_eq!(read_to_end(&mut rig.server).await, b"");
    assert_eq!(rig.report().await.reason, Ended::Shutdown);
}

#[tokio::test]
async fn no_going_away_follows_a_close_already_sent() {
    let mut rig = Rig::start(None);
    let close = from_server(CLOSE, &[0x03, 0xe8]);
    rig.server.write_all(&close).await.unwrap();
    assert_eq!(read_n(&mut rig.client, close.len()).await, close);
    rig.shutdown.cancel();
    // The client already has the server's Close: a second one would break the protocol.
    assert_eq!(read_to_end(&mut rig.client).await, b"");
    assert_eq!(read_to_end(&mut rig.server).await, GOING_AWAY_TO_SERVER);
    rig.report().await;
}

/// A stream like a TLS one: bytes can sit inside it while its transport is quiet, and
/// its transport can have something while it has nothing to give (every other read is
/// `Pending`, as when only part of a record has arrived).
struct Lumpy {
    held: Bytes,
    inner: DuplexStream,
    stall: bool,
}

impl AsyncRead for Lumpy {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.held.is_empty() {
            let n = self.held.len().min(buf.remaining());
            buf.put_slice(&self.held.split_to(n));
            return Poll::Ready(Ok(()));
        }
        self.stall = !self.stall;
        if self.stall {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lumpy {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Stream for Lumpy {}

#[tokio::test]
async fn readiness_is_asked_of_the_stream_not_of_its_transport() {
    let (client, client_side) = duplex(1 << 16);
    let (mut server, server_side) = duplex(1 << 16);
    // Bytes already decrypted inside the client's stream; nothing more on its transport.
    let held = from_client(TEXT, b"decrypted already");
    let client_side = Lumpy {
        held: Bytes::copy_from_slice(&held),
        inner: client_side,
        stall: false,
    };
    let mut rig = Rig::around(
        client,
        duplex(8).0,
        Side {
            stream: client_side,
            early: Bytes::new(),
        },
        Side {
            stream: server_side,
            early: Bytes::new(),
        },
        None,
    );
    assert_eq!(read_n(&mut server, held.len()).await, held);
    // Reads that find nothing (`Pending`) now and then change nothing either.
    let more = from_client(TEXT, b"and more");
    for _ in 0..5 {
        rig.client.write_all(&more).await.unwrap();
        assert_eq!(read_n(&mut server, more.len()).await, more);
    }
    drop(rig.client);
    assert_eq!(read_to_end(&mut server).await, b"");
    drop(server);
    let report = rig.tunnel.await.unwrap();
    assert_eq!(report.bytes_in, (held.len() + 5 * more.len()) as u64);
}

#[tokio::test]
async fn an_idle_tunnel_holds_no_relay_buffer() {
    let mut rig = Rig::start(None);
    for i in 0..20u8 {
        let up = from_client(TEXT, &[i; 50]);
        rig.client.write_all(&up).await.unwrap();
        assert_eq!(read_n(&mut rig.server, up.len()).await, up);
        let down = from_server(TEXT, &[i; 60]);
        rig.server.write_all(&down).await.unwrap();
        assert_eq!(read_n(&mut rig.client, down.len()).await, down);
    }
    // Both ways are quiet: every buffer this thread ever made is back among its spares
    // (the tunnel task runs on this thread: `#[tokio::test]` is single-threaded).
    tokio::task::yield_now().await;
    let made = MADE.with(|m| m.get());
    let spare = SPARES.with(|s| s.borrow().len());
    assert!(made >= 1);
    assert_eq!(spare, made);
    drop(rig.client);
    drop(rig.server);
    rig.tunnel.await.unwrap();
}

/// A stream like a TLS one on the write side: what it is given waits inside it (as
/// encrypted records waiting for the socket) until it is flushed.
struct Holding {
    held: Vec<u8>,
    inner: DuplexStream,
}

impl AsyncRead for Holding {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Holding {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while !this.held.is_empty() {
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &this.held))?;
            this.held.drain(..n);
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Stream for Holding {}

#[tokio::test]
async fn each_message_is_flushed_through_a_stream_that_holds_writes() {
    let (client, client_side) = duplex(1 << 16);
    let (mut server, server_side) = duplex(1 << 16);
    let mut rig = Rig::around(
        client,
        duplex(8).0,
        Side {
            stream: client_side,
            early: Bytes::new(),
        },
        Side {
            stream: Holding {
                held: Vec::new(),
                inner: server_side,
            },
            early: Bytes::new(),
        },
        None,
    );
    // Each message arrives on its own, not with the next one.
    for i in 0..5u8 {
        let up = from_client(TEXT, &[i; 40]);
        rig.client.write_all(&up).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(10), read_n(&mut server, up.len()));
        let got = read
            .await
            .unwrap_or_else(|_| panic!("message {i} was held back"));
        assert_eq!(got, up);
    }
    drop(rig.client);
    assert_eq!(read_to_end(&mut server).await, b"");
    drop(server);
    rig.tunnel.await.unwrap();
}
