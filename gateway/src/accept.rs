//! Accept stage: listening sockets (one per listener and worker, joined by
//! `SO_REUSEPORT`), the per-listener connection limit, and handing each connection — after
//! its TLS handshake on a TLS listener (`tls`) — to the connection driver (`serve`) on the
//! worker that accepted it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::Ordering;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use crate::listener::Listener;
use crate::proxy_protocol;
use crate::serve;
use crate::state::Gateway;

/// Kernel accept backlog: bursts of thousands of WebSocket clients reconnecting at once
/// should queue, not be refused.
const BACKLOG: i32 = 4096;

/// How long the kernel may hold a new connection that has sent nothing before handing it
/// over anyway (`TCP_DEFER_ACCEPT`, Linux). An HTTP client speaks first, so a connection
/// normally reaches the accept queue with its request head already there: one event-loop
/// turn and one empty `recv` fewer on about a third of upgrades (bench/README.md), and a
/// client that connects and stays silent takes no connection slot during the wait. One
/// second, as nginx's `deferred` uses, so a silent client still meets the header-read
/// timeout soon after.
#[cfg(target_os = "linux")]
const DEFER_ACCEPT_SECS: u32 = 1;

/// Binds and listens on `workers` sockets at `addr`: the first one (which resolves port
/// 0), then the others at the same address, all with `SO_REUSEPORT`, so that the kernel
/// spreads new connections over the workers and a connection never changes threads. The
/// sockets queue connections from here on; each becomes a tokio listener on the worker
/// that will accept from it ([`TcpListener::from_std`]).
pub fn bind(addr: SocketAddr, workers: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let first = bind_one(addr)?;
    let addr = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..workers {
        all.push(bind_one(addr)?);
    }
    Ok(all)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    #[cfg(target_os = "linux")]
    sluice_sockopt::set_tcp_defer_accept(&socket, DEFER_ACCEPT_SECS)?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// The first wait after a failed `accept`, doubled up to [`MAX_BACKOFF`] while it keeps
/// failing.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// Accepts until shutdown or until a reload removes the listener. The listener's
/// `max_connections` is shared by all workers: a worker takes a connection, then waits
/// for a free slot before it serves it and accepts again, so at the limit each worker
/// holds at most one waiting connection and further clients wait in the kernel's backlog
/// rather than being refused.
///
/// When `accept` fails (typically `EMFILE`: out of file descriptors) the connection stays
/// in the backlog; the loop backs off (10 ms doubling to 250 ms, never spinning), counts
/// it, warns once per run of failures, and accepts again once descriptors are free. Open
/// connections and tunnels are not touched.
pub async fn run(gw: Arc<Gateway>, listener: Arc<Listener>, socket: TcpListener) {
    let stopping = gw.stopping().clone();
    let mut backoff = FIRST_BACKOFF;
    // The name it served under last, for its log lines.
    let mut named = gw.snapshot().listener_name(&listener).cloned();
    loop {
        let (stream, peer) = tokio::select! {
            r = socket.accept() => match r {
                Ok(s) => {
                    backoff = FIRST_BACKOFF;
                    s
                }
                Err(e) => {
                    listener.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    if backoff == FIRST_BACKOFF {
                        tracing::warn!(listener = named.as_deref(), addr = %listener.addr, error = %e, "accept failed; backing off until it succeeds");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stopping.cancelled() => break,
                        () = listener.stop.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
            () = stopping.cancelled() => break,
            () = listener.stop.cancelled() => break,
        };
        let permit = tokio::select! {
            p = listener.acquire() => p,
            () = stopping.cancelled() => break,
            () = listener.stop.cancelled() => break,
        };
        listener.stats.accepted.fetch_add(1, Ordering::Relaxed);
        // Linux copies `TCP_NODELAY` from the listening socket to the ones it accepts
        // (see the test below); elsewhere it is set on each one.
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        // The snapshot of this moment decides the listener's name and TLS: a reload's
        // certificates serve the handshakes that start after it.
        let snapshot = gw.snapshot();
        let Some(name) = snapshot.listener_name(&listener).cloned() else {
            // A reload removed this listener a moment ago; its loop is about to stop.
            break;
        };
        named = Some(name.clone());
        // Behind a balancer, the connection's first bytes name the client (the task
        // reads them: the accept loop never waits on a client).
        let proxied = snapshot
            .config
            .listeners
            .iter()
            .find(|l| *l.name == *name && !l.proxy_protocol.is_empty())
            .map(|l| (l.proxy_protocol.clone(), l.header_read_timeout));
        match snapshot.acceptors.get(&*name) {
            None if proxied.is_some() => {
                let gw = gw.clone();
                gw.clone().tracker().spawn(async move {
                    let mut stream = stream;
                    let Some(peer) = client_addr(&mut stream, peer, proxied, &name).await else {
                        return;
                    };
                    serve::connection(gw, snapshot, stream, peer, name, None, permit).await;
                });
            }
            None => {
                gw.tracker().spawn(serve::connection(
                    gw.clone(),
                    snapshot,
                    stream,
                    peer,
                    name,
                    None,
                    permit,
                ));
            }
            Some(tls) => {
                let (tls, gw) = (tls.clone(), gw.clone());
                gw.clone().tracker().spawn(async move {
                    let mut stream = stream;
                    let Some(peer) = client_addr(&mut stream, peer, proxied, &name).await else {
                        return;
                    };
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
    tracing::debug!(listener = named.as_deref(), addr = %listener.addr, "stopped accepting");
}

/// The client's address: `peer`, or on a listener behind balancers (`proxied`: its
/// trusted addresses and header deadline) the one a trusted balancer's PROXY header names;
/// `None` when the connection must close.
async fn client_addr(
    stream: &mut tokio::net::TcpStream,
    peer: SocketAddr,
    proxied: Option<(Vec<ipnet::IpNet>, Duration)>,
    listener: &str,
) -> Option<SocketAddr> {
    let Some((trusted, timeout)) = proxied else {
        return Some(peer);
    };
    match proxy_protocol::client_addr(stream, peer, &trusted, timeout).await {
        Ok(addr) => Some(addr),
        Err(e) => {
            tracing::debug!(listener, client = %peer, error = %e, "connection closed at its PROXY header");
            None
        }
    }
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
        let [bound] = <[std::net::TcpListener; 1]>::try_from(bound).unwrap();
        let addr = bound.local_addr().unwrap();
        let listener = TcpListener::from_std(bound).unwrap();
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
                sluice_sockopt::tcp_defer_accept(b).unwrap(),
                DEFER_ACCEPT_SECS
            );
        }
    }
}
