//! Tunnel stage: relays bytes both ways between client and server after a validated
//! upgrade — byte-exact, unbuffered (each read is written on at once), half-close aware,
//! with an idle timeout and byte counters.
//!
//! An idle tunnel owns no relay buffer: each direction waits for readiness first and only
//! then borrows a buffer from a small per-thread spare list, returning it as soon as the
//! bytes are written. So memory per idle tunnel is the task plus two sockets, not the two
//! 8 KiB buffers of `tokio::io::copy_bidirectional`.

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;

mod frames;

use frames::{Frames, GOING_AWAY_TO_CLIENT, GOING_AWAY_TO_SERVER};

/// Size of one relay read.
const BUF_SIZE: usize = 16 * 1024;
/// Spare buffers kept per worker thread.
const SPARES_PER_THREAD: usize = 16;

thread_local! {
    static SPARES: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Vec<u8> {
    SPARES
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(BUF_SIZE))
}

fn give_buf(mut buf: Vec<u8>) {
    buf.clear();
    SPARES.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARES_PER_THREAD {
            s.push(buf);
        }
    });
}

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client's side ended first (EOF).
    ClientClosed,
    /// The server's side ended first (EOF).
    ServerClosed,
    /// No bytes either way for the route's idle timeout.
    IdleTimeout,
    /// The gateway's shutdown deadline passed.
    Shutdown,
    /// A socket error before either side closed.
    Error,
}

impl CloseReason {
    /// The name used in access logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ServerClosed => "server_closed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Error => "error",
        }
    }
}

impl fmt::Display for CloseReason {
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
    pub reason: CloseReason,
    /// The socket error, when `reason` is [`CloseReason::Error`].
    pub error: Option<io::Error>,
}

/// One side of a tunnel: its socket and bytes already read from it that the other side
/// must receive first (read past the HTTP head by the handshake parser).
pub struct End {
    /// The socket.
    pub stream: TcpStream,
    /// Bytes read ahead from this side.
    pub early: Bytes,
}

/// One direction's state: its pump owns it while the tunnel runs, the relay reads it
/// once the pumps are gone.
#[derive(Default)]
struct Direction {
    bytes: u64,
    /// Frame boundaries of the bytes read so far.
    frames: Frames,
    /// True while a read's bytes are being written on (still true if the pump was
    /// stopped mid-write).
    writing: bool,
}

impl Direction {
    /// Whether a Close frame of ours may be written now: between frames, nothing
    /// half-written, and no Close already sent this way.
    fn may_inject_close(&self) -> bool {
        self.frames.at_boundary() && !self.frames.saw_close() && !self.writing
    }
}

impl End {
    /// Copies read-ahead bytes out of hyper's read buffer. The `Bytes` hyper hands over
    /// shares its whole 8 KiB+ allocation, which a long-lived tunnel would otherwise keep
    /// alive for nothing: measured at 16 KiB per idle tunnel (two sides).
    pub fn detach(read_buf: Bytes) -> Bytes {
        if read_buf.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&read_buf)
        }
    }
}

/// Relays until both sides have closed, the idle timeout fires, or `shutdown` is cancelled.
///
/// The close reason names who closed first: the side that sent the first WebSocket Close
/// frame, or, when neither did, the side whose TCP stream ended first. On an idle timeout
/// or shutdown, each side that is between frames gets a Close frame with status 1001
/// (going away) before the sockets close, so clients see a clean close, not a 1006.
pub async fn relay(
    mut client: End,
    mut server: End,
    idle: Option<Duration>,
    shutdown: &CancellationToken,
) -> Report {
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let (mut c2s, mut s2c) = (Direction::default(), Direction::default());
    let first_close = AtomicU8::new(NO_CLOSE);
    let (mut reason, error) = {
        let (client_r, client_w) = client.stream.split();
        let (server_r, server_w) = server.stream.split();
        let up = Pump {
            dir: &mut c2s,
            last: &last,
            start,
            first_close: &first_close,
            side: CLIENT_CLOSE,
        };
        let down = Pump {
            dir: &mut s2c,
            last: &last,
            start,
            first_close: &first_close,
            side: SERVER_CLOSE,
        };
        let up = up.run(client_r, server_w, std::mem::take(&mut client.early));
        let down = down.run(server_r, client_w, std::mem::take(&mut server.early));
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        let mut reason = None;
        let mut error = None;
        while !(up_done && down_done) {
            let finished = tokio::select! {
                r = &mut up, if !up_done => { up_done = true; r.map(|()| CloseReason::ClientClosed) }
                r = &mut down, if !down_done => { down_done = true; r.map(|()| CloseReason::ServerClosed) }
                () = idle_expired(idle, &last, start) => Ok(CloseReason::IdleTimeout),
                () = shutdown.cancelled() => Ok(CloseReason::Shutdown),
            };
            match finished {
                Ok(r @ (CloseReason::IdleTimeout | CloseReason::Shutdown)) => {
                    reason = Some(r);
                    break;
                }
                Ok(r) => {
                    reason.get_or_insert(r);
                }
                Err(e) => {
                    // An error after one side has already closed (say, a write to a
                    // server that closed both ways) is part of that close.
                    if reason.is_none() {
                        reason = Some(CloseReason::Error);
                        error = Some(e);
                    }
                    break;
                }
            }
        }
        (reason.unwrap_or(CloseReason::Error), error)
    };
    match reason {
        CloseReason::IdleTimeout | CloseReason::Shutdown => {
            if s2c.may_inject_close() {
                let _ = client.stream.try_write(&GOING_AWAY_TO_CLIENT);
            }
            if c2s.may_inject_close() {
                let _ = server.stream.try_write(&GOING_AWAY_TO_SERVER);
            }
        }
        CloseReason::ClientClosed | CloseReason::ServerClosed => {
            match first_close.load(Ordering::Relaxed) {
                CLIENT_CLOSE => reason = CloseReason::ClientClosed,
                SERVER_CLOSE => reason = CloseReason::ServerClosed,
                _ => {}
            }
        }
        CloseReason::Error => {}
    }
    Report {
        bytes_in: c2s.bytes,
        bytes_out: s2c.bytes,
        reason,
        error,
    }
}

const NO_CLOSE: u8 = 0;
const CLIENT_CLOSE: u8 = 1;
const SERVER_CLOSE: u8 = 2;

/// Resolves once nothing has moved for `idle`; never when `idle` is `None`.
async fn idle_expired(idle: Option<Duration>, last: &AtomicU64, start: Instant) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    loop {
        let last_at = start + Duration::from_nanos(last.load(Ordering::Relaxed));
        let deadline = last_at + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// One direction's copy loop and what it reports into.
struct Pump<'a> {
    dir: &'a mut Direction,
    last: &'a AtomicU64,
    start: Instant,
    first_close: &'a AtomicU8,
    /// The value this direction stores in `first_close`.
    side: u8,
}

impl Pump<'_> {
    /// Copies `from` → `to` until EOF on `from`, then half-closes `to`.
    ///
    /// Waiting happens on readiness alone; a buffer is borrowed only once bytes are
    /// there. The read goes through `AsyncRead`, whose short-read rule clears readiness
    /// when the socket is drained, so each message costs one read and one write syscall
    /// (no extra read that ends in `EAGAIN`).
    async fn run(
        mut self,
        mut from: ReadHalf<'_>,
        mut to: WriteHalf<'_>,
        early: Bytes,
    ) -> io::Result<()> {
        if !early.is_empty() {
            self.forward(&mut to, &early).await?;
        }
        drop(early);
        loop {
            from.readable().await?;
            let mut buf = take_buf();
            let n = match from.read_buf(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    give_buf(buf);
                    return Err(e);
                }
            };
            if n == 0 {
                give_buf(buf);
                // Propagate the half-close; the peer may already be gone, which is fine.
                let _ = to.shutdown().await;
                return Ok(());
            }
            let written = self.forward(&mut to, &buf[..n]).await;
            give_buf(buf);
            written?;
        }
    }

    /// Accounts for `data` (bytes, activity, frame boundaries) and writes it all.
    async fn forward(&mut self, to: &mut WriteHalf<'_>, data: &[u8]) -> io::Result<()> {
        self.dir.bytes += data.len() as u64;
        self.last
            .store(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if self.dir.frames.feed(data) {
            let _ = self.first_close.compare_exchange(
                NO_CLOSE,
                self.side,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        self.dir.writing = true;
        to.write_all(data).await?;
        self.dir.writing = false;
        Ok(())
    }
}
