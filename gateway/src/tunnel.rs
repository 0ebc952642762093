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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

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

/// Relays until both sides have closed, the idle timeout fires, or `shutdown` is cancelled.
pub async fn relay(
    client: End,
    server: End,
    idle: Option<Duration>,
    shutdown: &CancellationToken,
) -> Report {
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let (bytes_in, bytes_out) = (AtomicU64::new(0), AtomicU64::new(0));
    let c2s = pump(
        &client.stream,
        &server.stream,
        client.early,
        &bytes_in,
        &last,
        start,
    );
    let s2c = pump(
        &server.stream,
        &client.stream,
        server.early,
        &bytes_out,
        &last,
        start,
    );
    tokio::pin!(c2s, s2c);
    let (mut c_done, mut s_done) = (false, false);
    let mut reason = None;
    let mut error = None;
    while !(c_done && s_done) {
        let finished = tokio::select! {
            r = &mut c2s, if !c_done => { c_done = true; r.map(|()| CloseReason::ClientClosed) }
            r = &mut s2c, if !s_done => { s_done = true; r.map(|()| CloseReason::ServerClosed) }
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
                // An error after one side has already closed (say, a write to a server
                // that closed both ways) is part of that close, not a new failure.
                if reason.is_none() {
                    reason = Some(CloseReason::Error);
                    error = Some(e);
                }
                break;
            }
        }
    }
    Report {
        bytes_in: bytes_in.load(Ordering::Relaxed),
        bytes_out: bytes_out.load(Ordering::Relaxed),
        reason: reason.unwrap_or(CloseReason::Error),
        error,
    }
}

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

/// Copies `from` → `to` until EOF on `from`, then half-closes `to`.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    early: Bytes,
    count: &AtomicU64,
    last: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    if !early.is_empty() {
        write_all(to, &early).await?;
        count.fetch_add(early.len() as u64, Ordering::Relaxed);
    }
    loop {
        from.readable().await?;
        let mut buf = take_buf();
        let n = match from.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                give_buf(buf);
                continue;
            }
            Err(e) => {
                give_buf(buf);
                return Err(e);
            }
        };
        if n == 0 {
            give_buf(buf);
            // Propagate the half-close; the peer may already be gone, which is fine.
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            return Ok(());
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        last.store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let written = write_all(to, &buf[..n]).await;
        give_buf(buf);
        written?;
    }
}

/// Writes all of `data`, trying the socket first and waiting only when it is full.
async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
