//! Connect stage: a connection to a server the balancer picks — TCP, and TLS over it for
//! a TLS server — with a connect deadline, passive ejection, and failover to the next
//! healthy server.

use std::io::{self, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::balance::{Pool, Server};
use crate::stream::Stream;

/// A connection to an upstream server.
pub enum Upstream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP (boxed: a TLS session is a few hundred bytes, a socket a few).
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

impl Stream for Upstream {
    /// A plain socket's readiness; a TLS session's read itself waits.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Upstream::Tcp(s) => Stream::poll_read_ready(s, cx),
            Upstream::Tls(_) => Poll::Ready(Ok(())),
        }
    }
}

/// Why no upstream connection could be made (the client gets a 502).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Every server is unhealthy or ejected.
    #[error("upstream pool `{0}` has no healthy server")]
    NoHealthyServer(String),
    /// Every healthy server was tried and none accepted.
    #[error("upstream pool `{pool}`: no server accepted a connection (last: {server}: {source})")]
    AllFailed {
        /// The pool.
        pool: String,
        /// The last server tried.
        server: String,
        /// Its error.
        source: io::Error,
    },
}

/// One attempt: a server to try, given the servers tried so far.
pub trait Attempt {
    /// What a successful attempt yields.
    type Output;
    /// Tries `server`; `Err` counts as a connect failure and moves on to the next server.
    fn attempt(
        &mut self,
        server: &Arc<Server>,
    ) -> impl Future<Output = io::Result<Self::Output>> + Send;
}

/// Tries servers in the balancer's order until `attempt` succeeds on one.
/// Failures count towards passive ejection; successes reset the count.
pub async fn with_failover<A: Attempt>(
    pool: &Pool,
    key: &[u8],
    mut attempt: A,
) -> Result<(Arc<Server>, A::Output), ConnectError> {
    let mut tried = Vec::new();
    let mut last: Option<(String, io::Error)> = None;
    while let Some(i) = pool.pick(key, &tried) {
        tried.push(i);
        let server = &pool.servers[i];
        match attempt.attempt(server).await {
            Ok(out) => {
                server.connect_succeeded();
                return Ok((server.clone(), out));
            }
            Err(e) => {
                let ejected = server.connect_failed(pool);
                tracing::warn!(
                    pool = %pool.name,
                    server = %server.config.authority,
                    error = %e,
                    ejected,
                    "upstream connect failed"
                );
                last = Some((server.config.authority.clone(), e));
            }
        }
    }
    Err(match last {
        None => ConnectError::NoHealthyServer(pool.name.clone()),
        Some((server, source)) => ConnectError::AllFailed {
            pool: pool.name.clone(),
            server,
            source,
        },
    })
}

/// A plain TCP connect with the pool's deadline and `TCP_NODELAY`.
pub async fn tcp(pool: &Pool, server: &Server) -> io::Result<TcpStream> {
    let stream = within_connect_timeout(pool, TcpStream::connect(server.config.addr)).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A connection to `server`: TCP, and the TLS handshake over it for a TLS server, both
/// within the pool's connect deadline.
pub async fn stream(pool: &Pool, server: &Server) -> io::Result<Upstream> {
    let tcp = tcp(pool, server).await?;
    tls_over(pool, server, tcp).await
}

/// A connection to `server` whose first bytes are `first` (an upgrade head): written with
/// the connect on plain TCP ([`tcp_sending`]), after the handshake on TLS.
pub async fn sending(pool: &Pool, server: &Server, first: &[u8]) -> io::Result<Upstream> {
    if !server.config.tls {
        return tcp_sending(pool, server, first).await.map(Upstream::Tcp);
    }
    let mut stream = stream(pool, server).await?;
    let write = async {
        stream.write_all(first).await?;
        stream.flush().await
    };
    within_connect_timeout(pool, write).await?;
    Ok(stream)
}

/// Wraps a connected socket in TLS when `server` speaks it.
async fn tls_over(pool: &Pool, server: &Server, tcp: TcpStream) -> io::Result<Upstream> {
    if !server.config.tls {
        return Ok(Upstream::Tcp(tcp));
    }
    let Some(connector) = &pool.tls else {
        return Err(io::Error::other(
            "TLS server in a pool without TLS settings",
        ));
    };
    let tls = within_connect_timeout(pool, connector.connect(&server.config, tcp)).await?;
    Ok(Upstream::Tls(Box::new(tls)))
}

/// Runs `connecting` within the pool's connect deadline; running out is `TimedOut`.
async fn within_connect_timeout<T>(
    pool: &Pool,
    connecting: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(pool.connect_timeout, connecting)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// A TCP connection to `server` whose first bytes are `first` (a request head), written
/// as soon as `connect(2)` has been issued rather than once the connection is reported.
///
/// A nonblocking write to a socket still in SYN-SENT fails with `EAGAIN`; then this waits
/// for the connection within the pool's deadline and writes afterwards, as a plain
/// connect would. But on loopback and nearby servers the TCP handshake has already
/// completed inside `connect(2)`, and the write goes out at once: no event-loop turn to
/// learn that the socket is writable and no `getsockopt(SO_ERROR)`. A refused connection
/// fails the write with the connect error.
pub async fn tcp_sending(pool: &Pool, server: &Server, first: &[u8]) -> io::Result<TcpStream> {
    let addr = server.config.addr;
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => return Err(e),
        _ => {}
    }
    let socket = std::net::TcpStream::from(socket);
    let sent = match (&socket).write(first) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    let mut stream = TcpStream::from_std(socket)?;
    if sent < first.len() {
        let rest = async {
            stream.writable().await?;
            if let Some(e) = stream.take_error()? {
                return Err(e);
            }
            stream.write_all(&first[sent..]).await
        };
        within_connect_timeout(pool, rest).await?;
    }
    Ok(stream)
}
