//! Tunnel stage: relays bytes both ways between client and server after a validated
//! upgrade — byte-exact, unbuffered (each read is written on at once), half-close aware,
//! with an idle timeout and byte counters — over any [`Stream`] on either side.
//!
//! An idle tunnel owns no relay buffer: each direction waits for [`Stream::poll_read_ready`]
//! and only then borrows a buffer from a small per-thread spare list, returning it as soon
//! as the bytes are written (or at once when the read finds nothing). So memory per idle
//! tunnel is the task plus the two streams, not the two 8 KiB buffers of
//! `tokio::io::copy_bidirectional`. Both directions, the idle timer and the shutdown
//! signal are polled by one hand-rolled state machine ([`Tunnel`]) inside one small
//! future, which keeps the task small (bench/README.md has the figures).

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::ReadBuf;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::stream::{Stream, try_send};

mod frames;
#[cfg(test)]
mod tests;

use frames::{Frames, GOING_AWAY_TO_CLIENT, GOING_AWAY_TO_SERVER};

/// Size of one relay read. Larger than a 16 KiB message and its frame header, so such a
/// message moves in one read and one write. Buffers are borrowed only on readiness, so an
/// idle tunnel holds none.
const BUF_SIZE: usize = 32 * 1024;
/// Spare buffers kept per worker thread.
const SPARES_PER_THREAD: usize = 16;

thread_local! {
    static SPARES: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// Relay buffers this thread has made, for the tests to compare with its spares.
    static MADE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A relay buffer (`BUF_SIZE` initialised bytes) from this thread's spares.
fn take_buf() -> Vec<u8> {
    SPARES.with(|s| s.borrow_mut().pop()).unwrap_or_else(|| {
        #[cfg(test)]
        MADE.with(|m| m.set(m.get() + 1));
        vec![0; BUF_SIZE]
    })
}

/// Returns a buffer to this thread's spares (read-ahead copies are just dropped).
fn give_buf(buf: Vec<u8>) {
    if buf.len() != BUF_SIZE {
        return;
    }
    SPARES.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARES_PER_THREAD {
            s.push(buf);
        }
    });
}

/// Why a tunnel ended (the access log's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client's side ended first (EOF).
    ClientClosed,
    /// The server's side ended first (EOF).
    ServerClosed,
    /// No bytes either way for the route's idle timeout.
    IdleTimeout,
    /// The gateway's shutdown deadline passed.
    Shutdown,
    /// A stream error before either side closed.
    Error,
}

impl Ended {
    /// The name used in access logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::ClientClosed => "client_closed",
            Ended::ServerClosed => "server_closed",
            Ended::IdleTimeout => "idle_timeout",
            Ended::Shutdown => "shutdown",
            Ended::Error => "error",
        }
    }
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a finished tunnel reports.
#[derive(Debug)]
pub struct Report {
    /// Bytes from client to server (including bytes sent right after the handshake).
    pub bytes_in: u64,
    /// Bytes from server to client.
    pub bytes_out: u64,
    /// Why it ended.
    pub reason: Ended,
    /// The stream error, when `reason` is [`Ended::Error`].
    pub error: Option<io::Error>,
}

/// One side of a tunnel: its stream and bytes already read from it that the other side
/// must receive first (read past the HTTP head by the handshake parser).
pub struct Side<S> {
    /// The stream.
    pub stream: S,
    /// Bytes read ahead from this side.
    pub early: Bytes,
}

/// Bytes read from one side and not yet all written to the other.
struct Pending {
    buf: Vec<u8>,
    /// Written so far.
    at: usize,
    /// End of the bytes read.
    end: usize,
}

/// Fewest bytes a shaped direction waits to have allowance for before reading again
/// (unless its whole burst is smaller), so a slow rate means fewer, larger reads.
const SHAPED_READ: f64 = 8192.0;

/// A direction's allowance when the tunnel's bandwidth is limited: a bucket of bytes,
/// refilled at `rate` a second up to one second's worth. While it is empty the direction
/// does not read, so the sender meets TCP backpressure; nothing is buffered beyond one
/// relay read.
struct Shaper {
    rate: f64,
    allowance: f64,
    at: Instant,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Shaper {
    fn new(rate: u64) -> Box<Shaper> {
        let rate = rate as f64;
        Box::new(Shaper {
            rate,
            allowance: rate,
            at: Instant::now(),
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
        })
    }

    /// How many bytes may be read now; `Pending` (woken by its timer) until enough are.
    fn poll_allowance(&mut self, cx: &mut Context<'_>) -> Poll<usize> {
        let now = Instant::now();
        let burst = self.rate;
        self.allowance =
            (self.allowance + now.duration_since(self.at).as_secs_f64() * self.rate).min(burst);
        self.at = now;
        let enough = SHAPED_READ.min(burst);
        if self.allowance >= enough {
            return Poll::Ready((self.allowance as usize).min(BUF_SIZE));
        }
        let wait = Duration::from_secs_f64((enough - self.allowance) / self.rate);
        self.sleep.as_mut().reset(now + wait);
        match self.sleep.as_mut().poll(cx) {
            // The timer is already due: the allowance is there on the next look.
            Poll::Ready(()) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn spend(&mut self, n: usize) {
        self.allowance -= n as f64;
    }
}

/// One direction of a tunnel: its counters, frame tracker and the bytes it is still
/// writing. Polled by [`relay`]'s single task; holds a buffer only mid-write.
#[derive(Default)]
struct Direction {
    bytes: u64,
    /// Its allowance, when the tunnel's bandwidth is limited.
    shaper: Option<Box<Shaper>>,
    /// Frame boundaries of the bytes read so far.
    frames: Frames,
    /// Bytes read but not yet written on.
    pending: Option<Pending>,
    /// The source ended; the half-close is being propagated.
    eof: bool,
    /// The source ended and the other side was told.
    done: bool,
}

impl Direction {
    /// Whether a Close frame of ours may be written now: between frames, nothing
    /// half-written, and no Close already sent this way.
    fn may_inject_close(&self) -> bool {
        self.frames.at_boundary() && !self.frames.saw_close() && self.pending.is_none()
    }

    /// Whether this direction has passed a whole Close frame and has nothing left to write.
    fn closed_cleanly(&self) -> bool {
        self.frames.saw_close() && self.frames.at_boundary() && self.pending.is_none()
    }

    /// Starts with bytes read ahead by the handshake parser.
    fn early(&mut self, early: Bytes) {
        if early.is_empty() {
            return;
        }
        self.account(&early);
        self.pending = Some(Pending {
            end: early.len(),
            buf: early.to_vec(),
            at: 0,
        });
    }

    /// Counts freshly read bytes and tracks their frame boundaries.
    fn account(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        self.frames.feed(data);
    }

    /// Moves bytes `from` → `to` until `from` ends (then half-closes `to` and is
    /// `Ready(Ok)`), a stream fails, or it must wait for a stream.
    ///
    /// Waiting happens on [`Stream::poll_read_ready`] alone; a buffer is borrowed only
    /// then, and given back at once if the read finds nothing. On TCP the read goes
    /// through `AsyncRead`, whose short-read rule clears readiness when the socket is
    /// drained, so each message costs one read and one write syscall (no extra read that
    /// ends in `EAGAIN`).
    ///
    /// `Ready(Ok(true))` means the WebSocket closing handshake is over: both sides sent
    /// a whole Close frame (`other_closed` says so for the other direction) and this
    /// source ended. Then no half-close is passed on: the tunnel is over, and both
    /// streams close at once (RFC 6455 §7.1.1: the server closes TCP first). That saves
    /// two `shutdown` calls and a read per tunnel; the other side gets its FIN from the
    /// close.
    fn poll_pump(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut impl Stream,
        to: &mut impl Stream,
        other_closed: bool,
    ) -> Poll<io::Result<bool>> {
        if self.done {
            return Poll::Ready(Ok(false));
        }
        loop {
            if let Some(p) = &mut self.pending {
                while p.at < p.end {
                    match ready!(Pin::new(&mut *to).poll_write(cx, &p.buf[p.at..p.end])) {
                        Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                        Ok(n) => p.at += n,
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                // Through a stream that buffers what it frames (TLS): out now, not with
                // the next message. A socket's flush returns at once.
                if let Err(e) = ready!(Pin::new(&mut *to).poll_flush(cx)) {
                    return Poll::Ready(Err(e));
                }
                if let Some(p) = self.pending.take() {
                    give_buf(p.buf);
                }
            }
            if self.eof {
                let over = other_closed && self.closed_cleanly();
                if !over {
                    // Propagate the half-close; the peer may already be gone, which is fine.
                    let _ = ready!(Pin::new(&mut *to).poll_shutdown(cx));
                }
                self.done = true;
                return Poll::Ready(Ok(over));
            }
            let allowed = match &mut self.shaper {
                Some(s) => ready!(s.poll_allowance(cx)),
                None => BUF_SIZE,
            };
            ready!(from.poll_read_ready(cx))?;
            let mut buf = take_buf();
            let mut read = ReadBuf::new(&mut buf[..allowed]);
            let polled = Pin::new(&mut *from).poll_read(cx, &mut read);
            let end = read.filled().len();
            match polled {
                Poll::Ready(Ok(())) if end == 0 => {
                    give_buf(buf);
                    self.eof = true;
                }
                Poll::Ready(Ok(())) => {
                    if let Some(s) = &mut self.shaper {
                        s.spend(end);
                    }
                    self.account(&buf[..end]);
                    self.pending = Some(Pending { buf, at: 0, end });
                }
                // A TLS peer that closed its socket without `close_notify`: for a
                // WebSocket, whose own Close frames say whether it ended cleanly, that is
                // the stream's end (browsers do it routinely), not a failure.
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    give_buf(buf);
                    self.eof = true;
                }
                Poll::Ready(Err(e)) => {
                    give_buf(buf);
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    give_buf(buf);
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Copies read-ahead bytes out of a parser's read buffer (hyper's or a handshake's): the
/// `Bytes` a parser hands over shares its whole allocation (8 KiB+ for hyper), which a
/// long-lived tunnel would otherwise keep alive for nothing.
pub fn detach(read_buf: Bytes) -> Bytes {
    if read_buf.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&read_buf)
    }
}

/// A running tunnel: both streams, both directions, and what the close report needs.
struct Tunnel<C, S> {
    client: C,
    server: S,
    c2s: Direction,
    s2c: Direction,
    /// The side whose first Close frame passed first.
    first_close: Option<Ended>,
    /// The side whose stream ended first.
    ended: Option<Ended>,
    /// The stream error that stopped the tunnel.
    error: Option<io::Error>,
    /// Bytes moved both ways when the idle clock was last updated.
    seen: u64,
    /// When bytes last moved (updated lazily, when the idle timer is polled).
    last: Instant,
}

impl<C: Stream, S: Stream> Tunnel<C, S> {
    /// Polls both directions; `Ready` once the tunnel is over: `Some(Error)` for a
    /// stream error before either side ended, `None` when both sides are done (or an
    /// error followed a side's end).
    fn poll_pumps(&mut self, cx: &mut Context<'_>) -> Poll<Option<Ended>> {
        let polled = self.c2s.poll_pump(
            cx,
            &mut self.client,
            &mut self.server,
            self.s2c.closed_cleanly(),
        );
        if let Poll::Ready(stopped) = self.settle(Ended::ClientClosed, polled) {
            return Poll::Ready(stopped);
        }
        let polled = self.s2c.poll_pump(
            cx,
            &mut self.server,
            &mut self.client,
            self.c2s.closed_cleanly(),
        );
        if let Poll::Ready(stopped) = self.settle(Ended::ServerClosed, polled) {
            return Poll::Ready(stopped);
        }
        if self.c2s.done && self.s2c.done {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    /// What one direction's poll means for the tunnel: `Ready` when it is over (as
    /// [`Tunnel::poll_pumps`] says), `Pending` when it goes on.
    fn settle(&mut self, side: Ended, polled: Poll<io::Result<bool>>) -> Poll<Option<Ended>> {
        self.note_close(side);
        match polled {
            Poll::Ready(Ok(over)) => {
                self.ended.get_or_insert(side);
                if over {
                    return Poll::Ready(None);
                }
                Poll::Pending
            }
            // An error after one side has already closed (say, a write to a server that
            // closed both ways) is part of that close.
            Poll::Ready(Err(e)) if self.ended.is_none() => {
                self.error = Some(e);
                Poll::Ready(Some(Ended::Error))
            }
            Poll::Ready(Err(_)) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Records `side` as the first to send a Close frame, if its direction has seen one
    /// and no side was recorded before.
    fn note_close(&mut self, side: Ended) {
        let dir = match side {
            Ended::ClientClosed => &self.c2s,
            _ => &self.s2c,
        };
        if dir.frames.saw_close() {
            self.first_close.get_or_insert(side);
        }
    }

    /// Whether bytes moved either way since the last call.
    fn moved(&mut self) -> bool {
        let total = self.c2s.bytes + self.s2c.bytes;
        std::mem::replace(&mut self.seen, total) != total
    }
}

/// Relays until both sides have closed, the idle timeout fires, or `shutdown` is cancelled.
/// With `bandwidth`, each direction reads at most that many bytes a second.
///
/// The close reason names who closed first: the side that sent the first WebSocket Close
/// frame, or, when neither did, the side whose TCP stream ended first. On an idle timeout
/// or shutdown, each side that is between frames gets a Close frame with status 1001
/// (going away), written through its stream, before the streams close, so clients see a
/// clean close, not a 1006.
pub fn relay<C: Stream, S: Stream>(
    client: Side<C>,
    server: Side<S>,
    idle: Option<Duration>,
    bandwidth: Option<u64>,
    shutdown: CancellationToken,
) -> impl Future<Output = Report> {
    let mut t = Tunnel {
        client: client.stream,
        server: server.stream,
        c2s: Direction::default(),
        s2c: Direction::default(),
        first_close: None,
        ended: None,
        error: None,
        seen: 0,
        last: Instant::now(),
    };
    if let Some(rate) = bandwidth {
        t.c2s.shaper = Some(Shaper::new(rate));
        t.s2c.shaper = Some(Shaper::new(rate));
    }
    t.c2s.early(client.early);
    t.s2c.early(server.early);
    t.note_close(Ended::ClientClosed);
    t.note_close(Ended::ServerClosed);
    // Built before the future so that the ends (and their read-ahead) are not also
    // kept in the future's argument slots for the tunnel's whole life.
    async move {
        let sleep = tokio::time::sleep(idle.unwrap_or(Duration::MAX / 4));
        let cancelled = shutdown.cancelled_owned();
        tokio::pin!(sleep, cancelled);
        let stopped = std::future::poll_fn(|cx| {
            if cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(Ended::Shutdown));
            }
            if let Poll::Ready(stopped) = t.poll_pumps(cx) {
                return Poll::Ready(stopped);
            }
            if let Some(idle) = idle {
                if t.moved() {
                    t.last = Instant::now();
                }
                // The timer is re-armed only when it fires, not on every message.
                while sleep.as_mut().poll(cx).is_ready() {
                    let deadline = t.last + idle;
                    if Instant::now() >= deadline {
                        return Poll::Ready(Some(Ended::IdleTimeout));
                    }
                    sleep.as_mut().reset(deadline);
                }
            }
            Poll::Pending
        })
        .await;
        let Tunnel {
            mut client,
            mut server,
            c2s,
            s2c,
            first_close,
            ended,
            error,
            ..
        } = t;
        let mut reason = stopped.or(ended).unwrap_or(Ended::Error);
        match reason {
            Ended::IdleTimeout | Ended::Shutdown => {
                if s2c.may_inject_close() {
                    try_send(&mut client, &GOING_AWAY_TO_CLIENT);
                }
                if c2s.may_inject_close() {
                    try_send(&mut server, &GOING_AWAY_TO_SERVER);
                }
            }
            Ended::ClientClosed | Ended::ServerClosed => {
                if let Some(first) = first_close {
                    reason = first;
                }
            }
            Ended::Error => {}
        }
        Report {
            bytes_in: c2s.bytes,
            bytes_out: s2c.bytes,
            reason,
            error,
        }
    }
}
