//! TLS for the `wss-*` scenarios: one throw-away CA and ECDSA P-256 server certificate per
//! run (written as PEM files for the proxies), and the load generator's TLS client.
//!
//! - **Certificates** ([`Pki::generate`]): a CA, and a leaf for `localhost` and
//!   `127.0.0.1` signed by it, both ECDSA P-256 (`ecdsa_secp256r1_sha256`). Every proxy
//!   serves the leaf alone (the CA is the client's trust anchor, so the chain on the wire
//!   is the same one certificate for all three) from the same files: `cert.pem` and
//!   `key.pem` (PKCS#8), and `combined.pem` (the two in one file, for HAProxy).
//! - **Client** ([`Client`]): tokio-rustls with aws-lc-rs, TLS 1.3 only, trusting only
//!   the run's CA, SNI `localhost`, no ALPN (ALPN `h2` alone for the `h2-*` scenarios,
//!   [`Client::h2`]), and **no session resumption**
//!   (`Resumption::disabled()`): every connection makes a full handshake, whatever tickets
//!   the server sends. It offers the key exchange groups rustls offers by default minus
//!   the post-quantum hybrid (X25519, then P-256, then P-384): the OpenSSL 3.0 behind
//!   Debian's nginx and HAProxy has no ML-KEM, so offering it would let a rustls server
//!   alone pick a dearer key exchange. Cipher suites are rustls's defaults (AES-256-GCM
//!   first); each run records what was negotiated ([`describe`]).

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, Result};
use rustls::client::Resumption;
use rustls::crypto::aws_lc_rs::{self, kx_group};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::http2::H2Io;

/// The name the client asks for (SNI) and checks the certificate against.
pub const SERVER_NAME: &str = "localhost";

/// The run's CA and server certificate, as PEM files in one directory.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate (the client's only trust anchor).
    pub ca: PathBuf,
    /// The server certificate (the leaf alone: the chain every proxy sends).
    pub cert: PathBuf,
    /// The server's private key, PKCS#8.
    pub key: PathBuf,
    /// `cert` then `key` in one file (HAProxy's `crt`).
    pub combined: PathBuf,
}

impl Pki {
    /// Generates a CA and a server certificate for `localhost` and `127.0.0.1`, both ECDSA
    /// P-256, and writes them into `dir` (created if missing).
    pub fn generate(dir: &Path) -> Result<Pki> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
        };
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "sluice-bench throw-away CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec![
            SERVER_NAME.to_string(),
            IpAddr::V4(Ipv4Addr::LOCALHOST).to_string(),
        ])?;
        params
            .distinguished_name
            .push(DnType::CommonName, SERVER_NAME);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &issuer)?;

        let pki = Pki {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            combined: dir.join("combined.pem"),
        };
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        fs::write(&pki.ca, ca_cert.pem())?;
        fs::write(&pki.cert, &cert_pem)?;
        fs::write(&pki.key, &key_pem)?;
        fs::write(&pki.combined, format!("{cert_pem}{key_pem}"))?;
        Ok(pki)
    }

    /// The load generator's client for servers presenting this PKI's certificate.
    pub fn client(&self) -> Result<Client> {
        Client::trusting(&self.ca)
    }
}

/// The load generator's TLS client: a connector (one `ClientConfig` per run, without
/// resumption) and the server name it asks for.
#[derive(Clone)]
pub struct Client {
    connector: TlsConnector,
    name: ServerName<'static>,
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client that trusts only the CA in the PEM file `ca`.
    pub fn trusting(ca: &Path) -> Result<Client> {
        let ca = CertificateDer::from_pem_file(ca)
            .with_context(|| format!("reading the CA certificate {}", ca.display()))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca)?;
        let mut provider = aws_lc_rs::default_provider();
        provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = Resumption::disabled();
        let config = Arc::new(config);
        Ok(Client {
            connector: TlsConnector::from(config.clone()),
            name: ServerName::try_from(SERVER_NAME)?,
            config,
        })
    }

    /// The same client offering only `h2` by ALPN (the `h2-*` scenarios): a server that
    /// does not pick it fails the run instead of quietly serving HTTP/1.1.
    pub fn h2(&self) -> Client {
        let mut config = (*self.config).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let config = Arc::new(config);
        Client {
            connector: TlsConnector::from(config.clone()),
            name: self.name.clone(),
            config,
        }
    }

    /// Makes the TLS handshake on a connected socket.
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<Stream> {
        Ok(Stream::Tls(Box::new(self.handshake(tcp).await?)))
    }

    /// Makes the TLS handshake on a connected socket, giving the TLS stream itself (an
    /// HTTP/2 connection runs over it).
    pub async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        self.connector.connect(self.name.clone(), tcp).await
    }

    /// A blocking TLS connection over `tcp` (handshake on first use), for the start-up
    /// checks that run outside the runtime.
    pub fn blocking(
        &self,
        tcp: std::net::TcpStream,
    ) -> Result<rustls::StreamOwned<ClientConnection, std::net::TcpStream>> {
        let conn = ClientConnection::new(self.config.clone(), self.name.clone())?;
        Ok(rustls::StreamOwned::new(conn, tcp))
    }
}

/// A load-generator connection: plain TCP, TLS over it, or one stream of an HTTP/2
/// connection.
#[derive(Debug)]
pub enum Stream {
    /// `ws://`.
    Plain(TcpStream),
    /// `wss://`.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// A WebSocket over HTTP/2: an extended CONNECT stream (RFC 8441).
    H2(Box<H2Io>),
}

impl Stream {
    /// What the TLS handshake negotiated (`None` on a plain stream; an HTTP/2 stream's
    /// connection describes its own, [`crate::http2::H2Conn::tls_parameters`]).
    pub fn tls_parameters(&self) -> Option<String> {
        match self {
            Stream::Plain(_) | Stream::H2(_) => None,
            Stream::Tls(tls) => Some(describe(tls.get_ref().1)),
        }
    }
}

/// A connection's negotiated TLS parameters in one line, e.g.
/// `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519 Full`.
pub fn describe(conn: &ClientConnection) -> String {
    let show = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    format!(
        "{} {} {} {}",
        show(conn.protocol_version().map(|v| format!("{v:?}"))),
        show(
            conn.negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite()))
        ),
        show(
            conn.negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name()))
        ),
        show(conn.handshake_kind().map(|k| format!("{k:?}"))),
    )
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::H2(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::H2(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::H2(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::H2(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
pub mod tests {
    //! A local rustls server in front of the bench's own echo server, and the client
    //! against it.

    use std::net::SocketAddr;

    use rustls::ServerConfig;
    use rustls::pki_types::PrivateKeyDer;
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::client::{Conn, Endpoint};
    use crate::ws::{OP_BINARY, OP_PING, OP_PONG, Rng};

    /// A fresh temporary directory for one test.
    pub fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sluice-bench-test-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Serves the bench's echo over TLS with `pki`'s certificate, on an ephemeral port;
    /// each connection is answered like the echo backend, then sent a `close_notify`.
    async fn tls_echo_server(pki: &Pki) -> SocketAddr {
        let certs = vec![CertificateDer::from_pem_file(&pki.cert).unwrap()];
        let key = PrivateKeyDer::from_pem_file(&pki.key).unwrap();
        let config = ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = crate::backend::echo_on(&mut tls).await;
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
                });
            }
        });
        addr
    }

    fn endpoint(addr: SocketAddr, pki: &Pki) -> Endpoint {
        Endpoint {
            tls: Some(pki.client().unwrap()),
            ..Endpoint::plain(addr)
        }
    }

    /// Full TLS 1.3 handshakes every time (no resumption, although the rustls server
    /// sends tickets), echoes of both sizes and pings through TLS, and a clean close.
    /// Longest a test's whole conversation may take.
    const TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

    #[tokio::test]
    async fn the_client_talks_to_a_rustls_echo_server() {
        tokio::time::timeout(TEST_TIMEOUT, talks())
            .await
            .expect("timed out");
    }

    async fn talks() {
        let dir = temp_dir("client");
        let pki = Pki::generate(&dir).unwrap();
        let addr = tls_echo_server(&pki).await;
        let endpoint = endpoint(addr, &pki);
        for i in 0..20u64 {
            let mut conn = Conn::open(&endpoint, Rng::new(i + 1)).await.unwrap();
            let params = conn.tls_parameters().unwrap();
            assert!(params.starts_with("TLSv1_3 "), "{params}");
            assert!(params.contains(" X25519 "), "{params}");
            assert!(params.ends_with(" Full"), "connection {i}: {params}");
            for size in [32usize, 16 << 10, 100_000] {
                let payload: Vec<u8> = (0..size).map(|b| b as u8).collect();
                conn.round_trip(OP_BINARY, &payload, OP_BINARY)
                    .await
                    .unwrap();
            }
            conn.round_trip(OP_PING, b"sluice!!", OP_PONG)
                .await
                .unwrap();
            conn.close().await.unwrap();
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The client refuses a server whose certificate its CA did not sign, and a plain
    /// HTTP server.
    #[tokio::test]
    async fn the_client_refuses_other_servers() {
        tokio::time::timeout(TEST_TIMEOUT, refuses())
            .await
            .expect("timed out");
    }

    async fn refuses() {
        let dir = temp_dir("refuses");
        let pki = Pki::generate(&dir.join("a")).unwrap();
        let other = Pki::generate(&dir.join("b")).unwrap();
        let addr = tls_echo_server(&other).await;
        assert!(
            Conn::open(&endpoint(addr, &pki), Rng::new(1))
                .await
                .is_err()
        );

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain = listener.local_addr().unwrap();
        // A plain HTTP server answers the ClientHello's bytes with a 400 and closes.
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut hello = [0u8; 512];
                let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut hello).await;
                let answer = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
                let _ = tokio::io::AsyncWriteExt::write_all(&mut tcp, answer).await;
            }
        });
        assert!(
            Conn::open(&endpoint(plain, &pki), Rng::new(2))
                .await
                .is_err()
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The PEM files hold what each proxy reads: one certificate, one PKCS#8 key, and
    /// the two together.
    #[test]
    fn the_pem_files_hold_one_certificate_and_its_key() {
        let dir = temp_dir("pem");
        let pki = Pki::generate(&dir).unwrap();
        let read = |p: &Path| fs::read_to_string(p).unwrap();
        let count = |text: &str, what: &str| text.matches(what).count();
        assert_eq!(count(&read(&pki.cert), "BEGIN CERTIFICATE"), 1);
        assert_eq!(count(&read(&pki.key), "BEGIN PRIVATE KEY"), 1);
        let combined = read(&pki.combined);
        assert_eq!(count(&combined, "BEGIN CERTIFICATE"), 1);
        assert_eq!(count(&combined, "BEGIN PRIVATE KEY"), 1);
        assert_ne!(read(&pki.ca), read(&pki.cert));
        fs::remove_dir_all(&dir).unwrap();
    }
}
