//! Forward stage for plain (non-upgrade) requests: keep-alive connections pooled per
//! upstream server, streamed bodies both ways, `502` when no server answers and `504` when
//! the chosen one is too slow to answer the head.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::access::Counted;
use crate::balance::{Pool, Server};
use crate::connect::{self, Attempt};

/// The request body as sent upstream: the client's body, counted.
pub type UpstreamBody = Counted<Incoming>;

/// Idle connections kept per server.
const MAX_IDLE_PER_SERVER: usize = 64;
/// An idle connection older than this is not reused (servers close idle ones too).
const IDLE_FOR: Duration = Duration::from_secs(60);

/// Idle keep-alive connections to upstream servers, shared by every route and snapshot.
#[derive(Default)]
pub struct UpstreamConns {
    idle: DashMap<SocketAddr, Vec<(SendRequest<UpstreamBody>, Instant)>>,
}

impl UpstreamConns {
    fn take(&self, addr: SocketAddr) -> Option<SendRequest<UpstreamBody>> {
        let mut list = self.idle.get_mut(&addr)?;
        while let Some((sender, since)) = list.pop() {
            if since.elapsed() < IDLE_FOR && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, sender: SendRequest<UpstreamBody>) {
        let mut list = self.idle.entry(addr).or_default();
        list.retain(|(s, since)| since.elapsed() < IDLE_FOR && !s.is_closed());
        if list.len() < MAX_IDLE_PER_SERVER {
            list.push((sender, Instant::now()));
        }
    }

    /// Returns `sender` to the idle list once its current response has been read.
    pub fn recycle(self: &Arc<Self>, addr: SocketAddr, mut sender: SendRequest<UpstreamBody>) {
        let conns = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                conns.put(addr, sender);
            }
        });
    }
}

/// A fresh HTTP/1.1 connection to `server`.
pub async fn open(pool: &Pool, server: &Server) -> io::Result<SendRequest<UpstreamBody>> {
    let tcp = connect::tcp(pool, server).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// The attempt used by plain requests: an idle pooled connection, else a new one.
pub struct Pooled<'a> {
    /// The pool being balanced.
    pub pool: &'a Pool,
    /// Idle connections.
    pub conns: &'a UpstreamConns,
}

/// A connection from [`Pooled`], and whether it was reused.
pub struct Conn {
    /// The request sender.
    pub sender: SendRequest<UpstreamBody>,
    /// True when it came from the idle list (it may have been closed by the server).
    pub reused: bool,
}

impl Attempt for Pooled<'_> {
    type Output = Conn;
    async fn attempt(&mut self, server: &Arc<Server>) -> io::Result<Conn> {
        if let Some(sender) = self.conns.take(server.config.addr) {
            return Ok(Conn {
                sender,
                reused: true,
            });
        }
        Ok(Conn {
            sender: open(self.pool, server).await?,
            reused: false,
        })
    }
}
