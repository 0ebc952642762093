//! Accept stage: listening sockets (one per listener and worker, joined by
//! `SO_REUSEPORT`), the per-listener connection limit, and handing each connection — after
//! its TLS handshake on a TLS listener (`tls`) — to the connection driver (`serve`) on the
//! worker that accepted it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;

use crate::serve;
use crate::state::Gateway;

/// Kernel accept backlog: bursts of thousands of WebSocket clients reconnecting at once
/// should queue, not be refused.
const BACKLOG: u32 = 4096;

/// How long the kernel may hold a new connection that has sent nothing before handing it
/// over anyway (`TCP_DEFER_ACCEPT`, Linux). An HTTP client speaks first, so a connection
/// normally reaches the accept queue with its request head already there: one event-loop
/// turn and one empty `recv` fewer on about a third of upgrades (bench/README.md), and a
/// client that connects and stays silent takes no connection slot during the wait. One
/// second, as nginx's `deferred` uses, so a silent client still meets the header-read
/// timeout soon after.
#[cfg(target_os = "linux")]
const DEFER_ACCEPT_SECS: u32 = 1;

/// A bound socket, not yet listening: it becomes a listener on the worker that will
/// accept from it (a tokio listener belongs to the event loop it was made on).
#[derive(Debug)]
pub struct Bound(TcpSocket);

impl Bound {
    /// The bound address (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    /// Starts listening, registered with the current worker's event loop.
    pub fn listen(self) -> std::io::Result<TcpListener> {
        self.0.listen(BACKLOG)
    }
}

/// Binds `workers` sockets to `addr`: the first one (which resolves port 0), then the
/// others to the same address, all with `SO_REUSEPORT`, so that the kernel spreads new
/// connections over the workers and a connection never changes threads.
pub fn bind(addr: SocketAddr, workers: usize) -> std::io::Result<Vec<Bound>> {
    let first = bind_one(addr)?;
    let addr = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..workers {
        all.push(bind_one(addr)?);
    }
    Ok(all)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<Bound> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    #[cfg(target_os = "linux")]
    sluice_sockopt::set_tcp_defer_accept(&socket, DEFER_ACCEPT_SECS)?;
    Ok(Bound(socket))
}

/// Accepts until shutdown. `limit` is the listener's `max_connections`, shared by all
/// workers. A worker takes a connection, then waits for a free slot before it serves it
/// and accepts again, so at the limit each worker holds at most one waiting connection
/// and further clients wait in the kernel's backlog rather than being refused.
pub async fn run(gw: Arc<Gateway>, name: Arc<str>, listener: TcpListener, limit: Arc<Semaphore>) {
    let stopping = gw.stopping().clone();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopping.cancelled() => break,
        };
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = stopping.cancelled() => break,
        };
        // Linux copies `TCP_NODELAY` from the listening socket to the ones it accepts
        // (see the test below); elsewhere it is set on each one.
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        // The snapshot of this moment decides TLS: a reload's certificates serve the
        // handshakes that start after it.
        let snapshot = gw.snapshot();
        match snapshot.acceptors.get(&*name) {
            None => {
                gw.tracker().spawn(serve::connection(
                    gw.clone(),
                    snapshot,
                    stream,
                    peer,
                    name.clone(),
                    None,
                    permit,
                ));
            }
            Some(tls) => {
                let (tls, gw, name) = (tls.clone(), gw.clone(), name.clone());
                gw.clone().tracker().spawn(async move {
                    // The handshake holds the connection slot, and the drain cancels it.
                    let shake = tokio::select! {
                        r = tls.accept(stream) => r,
                        () = gw.stopping().cancelled() => return,
                    };
                    match shake {
                        Ok((stream, facts)) => {
                            let facts = Some(Arc::new(facts));
                            serve::connection(gw, snapshot, stream, peer, name, facts, permit)
                                .await;
                        }
                        Err(e) => {
                            tracing::debug!(listener = %name, client = %peer, error = %e, "TLS handshake failed");
                        }
                    }
                });
            }
        }
    }
    tracing::debug!(listener = %name, "stopped accepting");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tunnels relay small frames as they come: every accepted connection must have
    /// `TCP_NODELAY`, which on Linux it inherits from the listening socket that `bind`
    /// made. (Elsewhere `run` sets it on each connection, which this cannot observe.)
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        use tokio::io::AsyncWriteExt;
        let bound = bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let [bound] = <[Bound; 1]>::try_from(bound).unwrap();
        let addr = bound.local_addr().unwrap();
        let listener = bound.listen().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        // A first byte, so that the deferred accept hands the connection over at once.
        client.write_all(b"G").await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
        drop(client);
    }

    /// Listeners ask the kernel to defer accepting until the client's first bytes arrive
    /// (that it does is `tests/limits.rs`: a silent connection takes no slot).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn listeners_ask_the_kernel_to_defer_accept() {
        let bound = bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        for b in &bound {
            assert_eq!(
                sluice_sockopt::tcp_defer_accept(&b.0).unwrap(),
                DEFER_ACCEPT_SECS
            );
        }
    }
}
