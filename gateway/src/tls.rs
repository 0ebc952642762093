//! TLS stage, both sides, with rustls (through tokio-rustls).
//!
//! Listener side: an [`Acceptor`] per TLS listener, built into each snapshot from the
//! certificates the config read, so a reload rotates them for new handshakes while live
//! connections keep the session they made. The certificate is chosen by SNI (exact names,
//! then `*.` wildcards, then the default or a refusal); ALPN offers `h2` (unless the
//! listener turns HTTP/2 off) and `http/1.1`; TLS 1.2
//! and 1.3 with rustls's default suites (AEAD with forward secrecy only); sessions resume
//! by stateless tickets whose keys outlive reloads. The handshake has a deadline.
//!
//! Upstream side: a [`Connector`] per pool that has TLS servers, verifying them against
//! the pool's CAs (or the compiled-in Mozilla roots) under their own name or the pool's
//! `server_name`, optionally presenting a client certificate.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::server::{
    ClientHello, ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache,
    StoresServerSessions, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::config::{
    ClientAuth, ListenerTls, ServerConfig as UpstreamServer, UnknownName, UpstreamTls, cert_info,
    crypto_provider,
};

/// The ALPN protocols a TLS listener offers with HTTP/2 on, most preferred first, and
/// those asked of TLS upstreams (which are spoken to in HTTP/1.1 only).
const ALPN_H2: &[&[u8]] = &[b"h2", b"http/1.1"];
const ALPN: &[&[u8]] = &[b"http/1.1"];

/// TLS 1.2 sessions kept for resumption by session ID, across all listeners.
const SESSION_CACHE: usize = 16 * 1024;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the settings.
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built from the CAs.
    #[error("client certificate CAs: {0}")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
}

/// A TLS listener's handshakes: its rustls configuration and deadline.
#[derive(Clone)]
pub struct Acceptor {
    acceptor: TlsAcceptor,
    timeout: Duration,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What plugins and logs learn of a client's TLS session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The server name the client asked for (SNI).
    pub sni: Option<String>,
    /// The negotiated ALPN protocol.
    pub alpn: Option<String>,
    /// The subject of the client's verified certificate (mutual TLS), RFC 4514 style.
    pub client_subject: Option<String>,
    /// The DNS names of the client certificate's SAN list.
    pub client_names: Vec<String>,
}

impl Acceptor {
    /// Builds a listener's TLS from its config; `http2` offers `h2` by ALPN.
    pub fn new(config: &ListenerTls, http2: bool) -> Result<Acceptor, TlsError> {
        let provider = crypto_provider().clone();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)?;
        let builder = match &config.client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Optional(roots) => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
                    .allow_unauthenticated()
                    .build()?,
            ),
            ClientAuth::Required(roots) => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider).build()?,
            ),
        };
        let mut server = builder.with_cert_resolver(Arc::new(ByName::new(config)));
        let alpn = if http2 { ALPN_H2 } else { ALPN };
        server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        server.session_storage = session_cache();
        if let Some(ticketer) = ticketer() {
            server.ticketer = ticketer;
        }
        Ok(Acceptor {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            timeout: config.handshake_timeout,
        })
    }

    /// Completes the TLS handshake on an accepted connection within the listener's
    /// deadline; a client that is too slow gets `TimedOut`.
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> io::Result<(server::TlsStream<TcpStream>, Facts)> {
        let stream = tokio::time::timeout(self.timeout, self.acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let facts = facts(stream.get_ref().1);
        Ok((stream, facts))
    }
}

impl Facts {
    /// Whether the client and the listener agreed on HTTP/2.
    pub fn is_h2(&self) -> bool {
        self.alpn.as_deref() == Some("h2")
    }
}

/// The scheme a client used: `https` over a TLS session, else `http`.
pub fn scheme(tls: Option<&Facts>) -> &'static str {
    if tls.is_some() { "https" } else { "http" }
}

/// The facts of a finished server-side handshake.
fn facts(conn: &rustls::ServerConnection) -> Facts {
    let alpn = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| cert_info(leaf).ok());
    let (client_subject, client_names) = match leaf {
        Some(info) => (Some(info.subject), info.dns_names),
        None => (None, Vec::new()),
    };
    Facts {
        sni: conn.server_name().map(str::to_owned),
        alpn,
        client_subject,
        client_names,
    }
}

/// Chooses a listener's certificate by the client's SNI.
#[derive(Debug)]
struct ByName {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the suffix after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// For no SNI or an unknown one; `None` refuses the handshake.
    default: Option<Arc<CertifiedKey>>,
}

impl ByName {
    fn new(config: &ListenerTls) -> ByName {
        let (mut exact, mut wildcard) = (HashMap::new(), HashMap::new());
        // The first certificate listing a name serves it.
        for cert in &config.certificates {
            for name in &cert.names {
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_owned()),
                    None => exact.entry(name.clone()),
                }
                .or_insert_with(|| cert.key.clone());
            }
        }
        let default = match config.unknown_name {
            UnknownName::Default => config.certificates.first().map(|c| c.key.clone()),
            UnknownName::Refuse => None,
        };
        ByName {
            exact,
            wildcard,
            default,
        }
    }

    fn find(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = sni.map(str::to_ascii_lowercase) else {
            return self.default.clone();
        };
        if let Some(key) = self.exact.get(&name) {
            return Some(key.clone());
        }
        // A wildcard covers exactly one label.
        if let Some((_, parent)) = name.split_once('.')
            && let Some(key) = self.wildcard.get(parent)
        {
            return Some(key.clone());
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.find(hello.server_name())
    }
}

/// Stateless resumption tickets, one key set for the process so tickets outlive
/// reloads (rustls rotates the keys every 6 hours). `None` if the system's random
/// source failed, leaving resumption to the session cache.
fn ticketer() -> Option<Arc<dyn ProducesTickets>> {
    static TICKETER: OnceLock<Option<Arc<dyn ProducesTickets>>> = OnceLock::new();
    TICKETER
        .get_or_init(|| match rustls::crypto::aws_lc_rs::Ticketer::new() {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "TLS session tickets unavailable");
                None
            }
        })
        .clone()
}

/// The session-ID cache shared by every listener and snapshot.
fn session_cache() -> Arc<dyn StoresServerSessions> {
    static CACHE: OnceLock<Arc<dyn StoresServerSessions>> = OnceLock::new();
    CACHE
        .get_or_init(|| ServerSessionMemoryCache::new(SESSION_CACHE))
        .clone()
}

/// TLS to one pool's servers.
pub struct Connector {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Builds a pool's client TLS from its config.
    pub fn new(config: &UpstreamTls) -> Result<Connector, TlsError> {
        let builder = ClientConfig::builder_with_provider(crypto_provider().clone())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
            .with_root_certificates(config.roots.clone());
        let mut client = match &config.client_cert {
            Some(key) => builder.with_client_cert_resolver(Arc::new(Fixed(key.clone()))),
            None => builder.with_no_client_auth(),
        };
        client.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Connector {
            connector: TlsConnector::from(Arc::new(client)),
            server_name: config.server_name.clone(),
        })
    }

    /// The TLS handshake with `server` over a connected socket; a certificate that does
    /// not verify is an `InvalidData` error saying why.
    pub async fn connect(
        &self,
        server: &UpstreamServer,
        tcp: TcpStream,
    ) -> io::Result<client::TlsStream<TcpStream>> {
        self.connect_to(&server.authority, tcp).await
    }

    /// The TLS handshake with the server at `authority` (`host[:port]`), verified under
    /// the connector's `server_name` or else that host.
    pub async fn connect_to(
        &self,
        authority: &str,
        tcp: TcpStream,
    ) -> io::Result<client::TlsStream<TcpStream>> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => server_name(authority)?,
        };
        self.connector.connect(name, tcp).await
    }
}

/// The name a server is verified under by default: the host of its authority.
fn server_name(authority: &str) -> io::Result<ServerName<'static>> {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} is not a name TLS can verify: {e}"),
        )
    })
}

/// A client certificate presented to every server that asks.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
