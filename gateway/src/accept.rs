//! Accept stage: listening sockets, the per-listener connection limit, and handing each
//! connection to the HTTP stage.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;

use crate::gateway::Gateway;
use crate::serve;

/// Kernel accept backlog: bursts of thousands of WebSocket clients reconnecting at once
/// should queue, not be refused.
const BACKLOG: u32 = 4096;

/// Binds a listening socket.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accepts until shutdown. At `max_connections` open connections (tunnels included) it
/// stops accepting, so further clients wait in the backlog rather than being refused.
pub async fn run(gw: Arc<Gateway>, name: Arc<str>, listener: TcpListener, max_connections: usize) {
    let limit = Arc::new(Semaphore::new(max_connections));
    let stopping = gw.stopping().clone();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = stopping.cancelled() => break,
        };
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
        let _ = stream.set_nodelay(true);
        gw.tracker().spawn(serve::connection(
            gw.clone(),
            stream,
            peer,
            name.clone(),
            permit,
        ));
    }
    tracing::info!(listener = %name, "stopped accepting");
}
