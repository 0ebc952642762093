//! Demo backends for Sluice's quickstart: a WebSocket echo server that also serves a
//! small page with a browser client on plain `GET`s, and the TLS quickstart's throw-away
//! certificates ([`tls`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

pub mod tls;

/// Runs a quickstart: the config at `path`, echo backends at its first pool's server
/// addresses, `banner` printed once they listen; serves until Ctrl-C.
pub fn run_quickstart(path: PathBuf, banner: &str) -> anyhow::Result<()> {
    let config = sluice::config::Config::load(&path)?;
    let logs = sluice::control::init_logging(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        for server in &config.upstreams[0].servers {
            bind_echo(server.addr, &server.authority).await?;
        }
        println!("{banner}");
        Ok(sluice::control::run(path, config, logs).await?)
    })
}

/// The page served on plain requests: type a message, see it echoed through Sluice.
const PAGE: &str = include_str!("page.html");

/// Serves echo on `listener` forever. Each WebSocket message comes back prefixed with
/// nothing (byte-exact); text pings like `whoami` answer with the backend's name.
pub async fn serve_echo(listener: TcpListener, name: String) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let name = name.clone();
        tokio::spawn(async move {
            let _ = handle(stream, &name).await;
        });
    }
}

/// Binds `addr` and serves echo on it.
pub async fn bind_echo(addr: SocketAddr, name: &str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(serve_echo(listener, name.to_string()));
    Ok(local)
}

async fn handle(mut stream: TcpStream, name: &str) -> std::io::Result<()> {
    // Peek at the head without consuming it: upgrades go to tungstenite whole.
    let mut head = [0u8; 4096];
    let n = stream.peek(&mut head).await?;
    let text = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
    if !text.contains("upgrade: websocket") {
        let body = PAGE.replace("{{backend}}", name);
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nx-backend: {name}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        return stream.write_all(resp.as_bytes()).await;
    }
    let mut ws = tokio_tungstenite::accept_async(stream)
        .await
        .map_err(std::io::Error::other)?;
    while let Some(msg) = ws.next().await {
        let reply = match msg.map_err(std::io::Error::other)? {
            Message::Text(t) if t.as_str() == "whoami" => Message::text(name),
            m @ (Message::Text(_) | Message::Binary(_)) => m,
            Message::Close(_) => break,
            _ => continue,
        };
        ws.send(reply).await.map_err(std::io::Error::other)?;
    }
    Ok(())
}
