//! The client's real address behind a balancer: the PROXY protocol header (v1 text or v2
//! binary, as HAProxy, AWS NLB and others send it) that comes before anything else on a
//! connection from a trusted balancer (`[listeners.NAME] proxy_protocol`). Parsed with
//! the `ppp` crate; read with `peek` first, so exactly the header's bytes are consumed and
//! the stream stays the socket (TLS, the client stage and the tunnel's fast paths keep
//! it).
//!
//! From an address the listener trusts the header is required; from any other it is
//! refused (whoever can reach the gateway directly must not name another client). A
//! missing, malformed, untrusted or too large header, or one that does not arrive within
//! the listener's `header_read_timeout`, closes the connection.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The largest header read: a v1 header is at most 107 bytes, a v2 header 16 plus its
/// addresses and TLVs, which balancers keep to a few hundred bytes.
const MAX_HEADER: usize = 4096;

/// The longest v1 header, its CRLF included.
const V1_MAX: usize = 107;

/// How long to wait before looking again at a header that has arrived only in part.
const PARTIAL_WAIT: Duration = Duration::from_millis(5);

/// The v1 and v2 signatures a header starts with.
const V1_SIGNATURE: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// Why a connection was closed at its PROXY header.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A trusted balancer's connection did not start with a header.
    #[error("no PROXY header from a trusted address")]
    Missing,
    /// A header from an address the listener does not trust.
    #[error("a PROXY header from an address that is not trusted")]
    Untrusted,
    /// The header did not parse.
    #[error("malformed PROXY header")]
    Malformed,
    /// The header was larger than the gateway reads.
    #[error("PROXY header larger than {MAX_HEADER} bytes")]
    TooLarge,
    /// The header did not arrive in time.
    #[error("PROXY header not received in time")]
    TimedOut,
    /// The connection closed or failed first.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Whether `ip` is one of the `trusted` addresses or ranges.
pub fn trusts(trusted: &[IpNet], ip: IpAddr) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

/// The client's address for a connection from `peer`: the one its PROXY header names when
/// `peer` is a trusted balancer (`peer` itself for a header that names none: a v2
/// `LOCAL` command, such as a balancer's health check, or `UNKNOWN`), else `peer`, once
/// the first bytes show it sent no header. Consumes exactly the header.
pub async fn client_addr(
    stream: &mut TcpStream,
    peer: SocketAddr,
    trusted: &[IpNet],
    timeout: Duration,
) -> Result<SocketAddr, ProxyError> {
    let deadline = Instant::now() + timeout;
    let trusted = trusts(trusted, peer.ip());
    let mut buf = vec![0u8; MAX_HEADER];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .map_err(|_| ProxyError::TimedOut)??;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        let seen = &buf[..n];
        let signed = [V1_SIGNATURE, V2_SIGNATURE]
            .iter()
            .any(|s| seen.starts_with(s));
        let maybe = [V1_SIGNATURE, V2_SIGNATURE]
            .iter()
            .any(|s| n < s.len() && s.starts_with(seen));
        let parsed = HeaderResult::parse(seen);
        // A v1 header is one line of at most 107 bytes: once its line has ended (or could
        // have), what does not parse is malformed, not partial.
        let v1_line_over = seen.starts_with(V1_SIGNATURE)
            && (n >= V1_MAX || seen.windows(2).any(|w| w == b"\r\n"));
        let incomplete = parsed.is_incomplete() && !v1_line_over;
        match (trusted, signed, maybe) {
            (false, true, _) => return Err(ProxyError::Untrusted),
            (false, false, false) => return Ok(peer),
            (true, false, false) => return Err(ProxyError::Missing),
            (_, false, true) => {}
            (true, true, _) if incomplete && n == MAX_HEADER => {
                return Err(ProxyError::TooLarge);
            }
            (true, true, _) if incomplete => {}
            (true, true, _) => {
                let (len, addr) = named(&parsed).ok_or(ProxyError::Malformed)?;
                stream.read_exact(&mut buf[..len]).await?;
                return Ok(addr.unwrap_or(peer));
            }
        }
        // Part of a header (or of its signature) so far: look again shortly.
        tokio::time::timeout_at(deadline, tokio::time::sleep(PARTIAL_WAIT))
            .await
            .map_err(|_| ProxyError::TimedOut)?;
    }
}

/// A whole header's length and the client address it names, if any; `None` when it is
/// malformed.
fn named(parsed: &HeaderResult<'_>) -> Option<(usize, Option<SocketAddr>)> {
    match parsed {
        HeaderResult::V1(Ok(h)) => {
            let addr = match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            Some((h.header.len(), addr))
        }
        HeaderResult::V2(Ok(h)) => {
            let addr = match (h.command, h.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            };
            Some((h.len(), addr))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    /// Sends `sent` to a fresh connection and runs [`client_addr`] on it with `trusted`;
    /// the outcome and what is left to read after it.
    async fn on(sent: Vec<u8>, trusted: &[&str]) -> (Result<SocketAddr, String>, Vec<u8>) {
        let trusted: Vec<IpNet> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&sent).await.unwrap();
            c.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest).await;
        });
        let (mut stream, peer) = listener.accept().await.unwrap();
        let got = client_addr(&mut stream, peer, &trusted, Duration::from_secs(2))
            .await
            .map_err(|e| e.to_string());
        let mut rest = Vec::new();
        if got.is_ok() {
            stream.read_to_end(&mut rest).await.unwrap();
        }
        drop(stream);
        client.await.unwrap();
        (got, rest)
    }

    fn v2(command: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(0x11); // TCP over IPv4
        h.extend((addresses.len() as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    #[tokio::test]
    async fn a_trusted_balancer_names_the_client_in_v1_or_v2() {
        let (got, rest) = on(
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 8080\r\nGET / HTTP/1.1\r\n\r\n".to_vec(),
            &["127.0.0.1/32"],
        )
        .await;
        assert_eq!(got, Ok("203.0.113.7:51000".parse().unwrap()));
        assert_eq!(
            rest, b"GET / HTTP/1.1\r\n\r\n",
            "exactly the header is consumed"
        );

        let addresses = [203, 0, 113, 9, 10, 0, 0, 1, 0xc3, 0x50, 0x1f, 0x90];
        let (got, rest) = on(
            [v2(1, &addresses), b"hello".to_vec()].concat(),
            &["127.0.0.0/8"],
        )
        .await;
        assert_eq!(got, Ok("203.0.113.9:50000".parse().unwrap()));
        assert_eq!(rest, b"hello");
        // LOCAL (a balancer's own health check): the connection's address stands.
        let (got, _) = on(v2(0, &addresses), &["127.0.0.1/32"]).await;
        assert_eq!(got.unwrap().ip(), IpAddr::from([127, 0, 0, 1]));
    }

    #[tokio::test]
    async fn missing_malformed_and_untrusted_headers_close_the_connection() {
        let (got, _) = on(b"GET / HTTP/1.1\r\n\r\n".to_vec(), &["127.0.0.1/32"]).await;
        assert_eq!(got, Err(ProxyError::Missing.to_string()));
        let (got, _) = on(b"PROXY TCP4 nonsense\r\n".to_vec(), &["127.0.0.1/32"]).await;
        assert_eq!(got, Err(ProxyError::Malformed.to_string()));
        let (got, _) = on(
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 8080\r\n".to_vec(),
            &["10.0.0.0/8"],
        )
        .await;
        assert_eq!(got, Err(ProxyError::Untrusted.to_string()));
        // A direct client that sends no header is its own address; nothing is consumed.
        let (got, rest) = on(b"PROPFIND / HTTP/1.1\r\n\r\n".to_vec(), &["10.0.0.0/8"]).await;
        assert_eq!(got.unwrap().ip(), IpAddr::from([127, 0, 0, 1]));
        assert_eq!(rest, b"PROPFIND / HTTP/1.1\r\n\r\n");
        // A header cut short by the balancer's close.
        let (got, _) = on(b"PROXY TCP4 203.0".to_vec(), &["127.0.0.1/32"]).await;
        assert!(got.is_err(), "{got:?}");
    }
}
