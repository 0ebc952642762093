//! The echo backend every target proxies to: a WebSocket server that answers each data
//! frame with the same payload, each ping with a pong and a close with a close (then closes
//! TCP first, as RFC 6455 asks of servers).
//!
//! It runs as its own process (`sluice-bench backend`) so that its sockets count against
//! its own open-file limit and its CPU never mixes with the load generator's. Per
//! connection it holds one task and, until the first frame arrives, no buffers at all.
//! With `--ws tungstenite` the same process serves tokio-tungstenite's echo server
//! ([`crate::tung::echo`]) instead of the bench's own.

use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::scenario::Pair;
use crate::sys;
use crate::ws::{self, OP_CLOSE, OP_PING, OP_PONG, Reader};

/// Serves `pair`'s echo server on `listen` until stdin closes (the parent exited) or the
/// process is signalled. Prints `listening ADDR` on stdout once accepting.
pub fn serve(listen: SocketAddr, threads: usize, pair: Pair) -> Result<()> {
    sys::raise_nofile_limit();
    // A parent that dies without stopping us closes our stdin: exit with it.
    std::thread::spawn(|| {
        let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
        std::process::exit(0);
    });
    sys::runtime(threads)?.block_on(async {
        let listener = TcpListener::bind(listen).await?;
        println!("listening {}", listener.local_addr()?);
        io::stdout().flush()?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(async move {
                        // A client that goes away mid-frame is normal at the end of a run.
                        let _ = match pair {
                            Pair::Bench => echo(stream).await,
                            Pair::Tungstenite => crate::tung::echo(stream).await,
                        };
                    });
                }
                // Out of descriptors or similar: back off rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
}

/// Completes the opening handshake on `stream`, then echoes until close or end of stream.
pub async fn echo(stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    echo_on(stream).await
}

/// [`echo`] on any stream (the TLS client's tests put a rustls server in front of it).
pub async fn echo_on<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> io::Result<()> {
    let mut reader = Reader::new(stream);
    let head = reader.read_head().await?;
    let Some(key) = ws::header(&head, "sec-websocket-key") else {
        let reply = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        return reader.get_mut().write_all(reply).await;
    };
    let reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        ws::accept_key(key)
    );
    reader.get_mut().write_all(reply.as_bytes()).await?;
    reader.get_mut().flush().await?;
    echo_frames(reader).await
}

/// The echo loop of [`echo_on`] once the opening handshake is done (the tests' HTTP/2
/// server runs it on each extended CONNECT stream it answered).
pub async fn echo_frames<S: AsyncRead + AsyncWrite + Unpin>(
    mut reader: Reader<S>,
) -> io::Result<()> {
    // Replies to everything already buffered go out in one write.
    let mut out = Vec::new();
    loop {
        let mut closing = false;
        while let Some((frame, payload)) = reader.try_frame()? {
            match frame.opcode {
                OP_PONG => {}
                OP_PING => ws::encode_frame(&mut out, OP_PONG, payload, None),
                OP_CLOSE => {
                    ws::encode_frame(&mut out, OP_CLOSE, payload, None);
                    closing = true;
                    break;
                }
                data => ws::encode_frame(&mut out, data, payload, None),
            }
        }
        if !out.is_empty() {
            reader.get_mut().write_all(&out).await?;
            // Over TLS (the tests' server) records may wait for a flush.
            reader.get_mut().flush().await?;
            out.clear();
        }
        if closing {
            return reader.get_mut().shutdown().await;
        }
        if reader.fill().await? == 0 {
            return Ok(());
        }
    }
}

/// A running backend process, stopped when dropped.
#[derive(Debug)]
pub struct Backend {
    child: Child,
    /// Where it accepts connections.
    pub addr: SocketAddr,
}

impl Backend {
    /// Starts `sluice-bench backend` (this same executable) serving `pair`'s echo server
    /// on an ephemeral loopback port.
    pub fn spawn(threads: usize, pair: Pair) -> Result<Backend> {
        let exe = std::env::current_exe().context("locating sluice-bench")?;
        let mut child = Command::new(exe)
            .args([
                "backend",
                "--listen",
                "127.0.0.1:0",
                "--ws",
                pair.name(),
                "--threads",
            ])
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the echo backend")?;
        let stdout = child.stdout.take().expect("stdout is piped");
        match read_listening(stdout) {
            Ok(addr) => Ok(Backend { child, addr }),
            Err(e) => {
                let _ = sys::stop_child(&mut child, Duration::from_secs(1));
                Err(e)
            }
        }
    }

    /// The backend's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Reads the `listening ADDR` line a freshly started backend prints.
fn read_listening(stdout: ChildStdout) -> Result<SocketAddr> {
    let mut line = String::new();
    io::BufReader::new(stdout).read_line(&mut line)?;
    match line.trim().strip_prefix("listening ") {
        Some(addr) => Ok(addr.parse()?),
        None => bail!("echo backend did not start (printed {line:?})"),
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = sys::stop_child(&mut self.child, Duration::from_secs(2));
    }
}
