//! The load generator's WebSocket client: open (TCP connect, the TLS handshake for
//! `wss://`, upgrade; or an HTTP/2 stream's extended CONNECT, [`crate::http2`]), round
//! trips, close.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::tls::{self, Stream};
use crate::ws::{self, OP_CLOSE, OP_PONG, Reader, Rng};

/// Where the load generator connects, and what its upgrade requests carry beyond the
/// bare WebSocket headers.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The target's listening address.
    pub addr: SocketAddr,
    /// Extra request header lines, each ending in CRLF (empty for none): what a target's
    /// policy plugins need to admit the request, e.g. `Origin` and `Authorization`.
    pub headers: Arc<str>,
    /// Builds those header lines anew for each upgrade from a random number, in place of
    /// `headers` (`sluice-4p-called`: a new token and origin every time).
    pub fresh: Option<fn(u64) -> String>,
    /// `wss://`: the TLS client every connection makes a full handshake with; `None` for
    /// `ws://`.
    pub tls: Option<tls::Client>,
}

impl Endpoint {
    /// An endpoint whose upgrade requests carry no extra headers.
    pub fn plain(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            headers: Arc::from(""),
            fresh: None,
            tls: None,
        }
    }
}

/// One client connection whose opening handshake has completed.
#[derive(Debug)]
pub struct Conn {
    reader: Reader<Stream>,
    out: Vec<u8>,
    rng: Rng,
}

impl Conn {
    /// Connects to `endpoint` (with a full TLS handshake for `wss://`), sends the
    /// upgrade request (with the endpoint's extra headers) and checks the `101` answer,
    /// including `Sec-WebSocket-Accept`; any other answer, such as a plugin's 401 or 403,
    /// is an error.
    pub async fn open(endpoint: &Endpoint, mut rng: Rng) -> io::Result<Conn> {
        let addr = endpoint.addr;
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let stream = match &endpoint.tls {
            None => Stream::Plain(tcp),
            Some(client) => client.connect(tcp).await?,
        };
        let key = ws::client_key(&mut rng);
        let fresh;
        let extra: &str = match endpoint.fresh {
            Some(make) => {
                fresh = make(rng.next_u64());
                &fresh
            }
            None => &endpoint.headers,
        };
        let request = format!(
            "GET /bench HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        let mut reader = Reader::new(stream);
        reader.get_mut().write_all(request.as_bytes()).await?;
        // TLS may hold records back when the socket is full; plain TCP flushes nothing.
        reader.get_mut().flush().await?;
        let head = reader.read_head().await?;
        if !head.starts_with("HTTP/1.1 101") {
            let status = head.lines().next().unwrap_or_default();
            return Err(ws::invalid(&format!("upgrade refused: {status}")));
        }
        if ws::header(&head, "sec-websocket-accept") != Some(ws::accept_key(&key).as_str()) {
            return Err(ws::invalid("wrong Sec-WebSocket-Accept"));
        }
        Ok(Conn::opened(reader, rng))
    }

    /// A connection over `stream`, whose opening handshake has completed (an HTTP/2
    /// stream's extended CONNECT answered `200`: [`crate::http2::H2Conn::websocket`]).
    pub fn over(stream: Stream, rng: Rng) -> Conn {
        Conn::opened(Reader::new(stream), rng)
    }

    fn opened(reader: Reader<Stream>, rng: Rng) -> Conn {
        Conn {
            reader,
            out: Vec::new(),
            rng,
        }
    }

    /// Sends one masked frame and waits for the reply with opcode `expect`, which must
    /// carry a payload of the same length (stray pongs are skipped).
    pub async fn round_trip(&mut self, opcode: u8, payload: &[u8], expect: u8) -> io::Result<()> {
        self.out.clear();
        ws::encode_frame(&mut self.out, opcode, payload, Some(self.rng.mask()));
        let stream = self.reader.get_mut();
        stream.write_all(&self.out).await?;
        stream.flush().await?;
        loop {
            match self.reader.read_frame().await? {
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
                Some((frame, reply)) if frame.opcode == expect => {
                    return if reply.len() == payload.len() {
                        Ok(())
                    } else {
                        Err(ws::invalid("reply length differs"))
                    };
                }
                Some((frame, _)) if frame.opcode == OP_PONG => {}
                Some(_) => return Err(ws::invalid("unexpected frame")),
            }
        }
    }

    /// What the TLS handshake negotiated (`None` for `ws://`).
    pub fn tls_parameters(&mut self) -> Option<String> {
        self.reader.get_mut().tls_parameters()
    }

    /// The closing handshake: sends a close, awaits the echoed close, then waits for the
    /// server to close TCP first (so TIME_WAIT stays on the server side). Over TLS, a
    /// TCP end without the server's `close_notify` also counts as the end: the WebSocket
    /// closing handshake is already complete, and proxies differ in whether they send one.
    /// Over HTTP/2 the end is the stream's (`END_STREAM`, or a reset after the closing
    /// handshake, for the same reason).
    pub async fn close(mut self) -> io::Result<()> {
        let normal = 1000u16.to_be_bytes();
        self.round_trip(OP_CLOSE, &normal, OP_CLOSE).await?;
        loop {
            match self.reader.fill().await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e)
                    if e.kind() == io::ErrorKind::UnexpectedEof
                        && matches!(self.reader.get_mut(), Stream::Tls(_)) =>
                {
                    return Ok(());
                }
                Err(_) if matches!(self.reader.get_mut(), Stream::H2(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}
