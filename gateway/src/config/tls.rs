//! TLS material a config names: certificate chains and keys read from PEM files and
//! checked (they parse, the key fits the certificate, the certificate has not expired),
//! CA bundles, and the names each certificate serves. Read while the config is validated,
//! so `sluice check` and a reload report a bad file, with the field that names it, before
//! anything is served; a reload re-reads them all, which is how certificates rotate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use toml::Spanned;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::ConfigError;
use super::locate::Locator;
use super::raw::{RawCertificate, RawListenerTls, RawUpstreamTls};
use super::validate::nonzero;

/// The crypto provider of every TLS session, listener and upstream side. aws-lc-rs, by
/// measurement against ring (bench/README.md, "TLS"): fewer CPU cycles per handshake and
/// per record on this machine's CPUs.
pub fn crypto_provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// A listener's TLS (`[listeners.NAME.tls]`).
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// Certificates with the names they serve; the first is the default.
    pub certificates: Vec<ServedCert>,
    /// What a client gets that sends no server name, or one no certificate serves.
    pub unknown_name: UnknownName,
    /// Time a client has to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Whether clients present certificates, and who must have signed them.
    pub client_auth: ClientAuth,
    /// The certificate, key and CA files read (a reload trigger when watched).
    pub files: Vec<PathBuf>,
}

/// A certificate chain with its key, and the server names it is chosen for.
#[derive(Debug, Clone)]
pub struct ServedCert {
    /// The chain (leaf first) and its signing key.
    pub key: Arc<CertifiedKey>,
    /// Lower-case names, exact (`example.com`) or wildcard (`*.example.com`): the
    /// config's `names`, or else the DNS names of the certificate's SAN list.
    pub names: Vec<String>,
    /// When the leaf certificate expires (its `notAfter`).
    pub expires: SystemTime,
}

/// The answer to a client whose server name (SNI) no certificate serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownName {
    /// The first certificate.
    Default,
    /// A failed handshake (`unrecognized_name`).
    Refuse,
}

/// Client certificates (mutual TLS).
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// None asked for.
    None,
    /// Asked for; a client without one is served (plugins see no subject), one with a
    /// certificate the CAs did not sign is refused.
    Optional(Arc<RootCertStore>),
    /// Required, signed by one of these CAs.
    Required(Arc<RootCertStore>),
}

/// TLS to a pool's servers (`[upstreams.NAME.tls]`, or a `wss://`/`https://` server).
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// The CAs a server's certificate must chain to: the `ca` bundle, or else the
    /// Mozilla roots of `webpki-roots`.
    pub roots: Arc<RootCertStore>,
    /// The name sent as SNI and verified in the certificate, for every server; by
    /// default each server's own host.
    pub server_name: Option<ServerName<'static>>,
    /// A client certificate to present.
    pub client_cert: Option<Arc<CertifiedKey>>,
    /// The CA, certificate and key files read (a reload trigger when watched).
    pub files: Vec<PathBuf>,
}

impl RawListenerTls {
    pub(super) fn validate(
        self,
        base_dir: &Path,
        err: &Locator<'_>,
    ) -> Result<ListenerTls, ConfigError> {
        if self.certificates.get_ref().is_empty() {
            return Err(err.at(
                self.certificates.span(),
                "at least one { cert, key } pair is required".into(),
            ));
        }
        let mut files: Vec<PathBuf> = self
            .certificates
            .get_ref()
            .iter()
            .flat_map(|c| [c.get_ref().cert.get_ref(), c.get_ref().key.get_ref()])
            .chain(
                self.client_ca
                    .iter()
                    .flat_map(|f| f.get_ref().iter().map(|f| f.get_ref())),
            )
            .map(|f| base_dir.join(f))
            .collect();
        files.dedup();
        let mut certificates = Vec::new();
        for (i, c) in self.certificates.into_inner().into_iter().enumerate() {
            let span = c.span();
            let served = c.into_inner().validate(base_dir, err)?;
            if served.names.is_empty() && i > 0 {
                return Err(err.at(
                    span,
                    "the certificate has no DNS names in its SAN list, so only the first \
                     (default) certificate may lack them; list its `names`"
                        .into(),
                ));
            }
            certificates.push(served);
        }
        let unknown_name = match self.unknown_name.as_ref().map(|u| u.get_ref().as_str()) {
            None | Some("default") => UnknownName::Default,
            Some("refuse") => UnknownName::Refuse,
            Some(other) => {
                let span = self
                    .unknown_name
                    .as_ref()
                    .map(Spanned::span)
                    .unwrap_or(0..0);
                return Err(err.at(
                    span,
                    format!("expected \"default\" or \"refuse\", got {other:?}"),
                ));
            }
        };
        let roots = match &self.client_ca {
            Some(files) if files.get_ref().is_empty() => {
                return Err(err.at(files.span(), "list at least one CA file".into()));
            }
            Some(files) => {
                let mut roots = RootCertStore::empty();
                for f in files.get_ref() {
                    add_roots(&mut roots, base_dir, f, err)?;
                }
                Some(Arc::new(roots))
            }
            None => None,
        };
        let client_auth = match (self.client_auth.as_ref(), roots) {
            (None, None) => ClientAuth::None,
            (Some(a), roots) => match (a.get_ref().as_str(), roots) {
                ("none", None) => ClientAuth::None,
                ("optional", Some(r)) => ClientAuth::Optional(r),
                ("required", Some(r)) => ClientAuth::Required(r),
                ("optional" | "required", None) => {
                    return Err(err.at(
                        a.span(),
                        "client certificates need `client_ca`, the CA files that sign them".into(),
                    ));
                }
                ("none", Some(_)) => {
                    return Err(err.at(
                        a.span(),
                        "`client_ca` is set but client_auth is \"none\"".into(),
                    ));
                }
                (other, _) => {
                    return Err(err.at(
                        a.span(),
                        format!("expected \"none\", \"optional\" or \"required\", got {other:?}"),
                    ));
                }
            },
            // CAs without a mode: certificates are asked for and must be valid if given.
            (None, Some(r)) => ClientAuth::Optional(r),
        };
        Ok(ListenerTls {
            certificates,
            unknown_name,
            handshake_timeout: nonzero(self.handshake_timeout, Duration::from_secs(10), err)?,
            client_auth,
            files,
        })
    }
}

impl RawCertificate {
    fn validate(self, base_dir: &Path, err: &Locator<'_>) -> Result<ServedCert, ConfigError> {
        let (key, leaf) = certified_key(base_dir, &self.cert, &self.key, err)?;
        let names = match self.names {
            Some(names) => {
                let mut out = Vec::new();
                for n in names {
                    out.push(server_name_pattern(n.get_ref()).ok_or_else(|| {
                        err.at(
                            n.span(),
                            format!(
                                "expected a DNS name such as \"example.com\" or \
                                 \"*.example.com\", got {:?}",
                                n.get_ref()
                            ),
                        )
                    })?);
                }
                out
            }
            None => leaf
                .dns_names
                .iter()
                .filter_map(|n| server_name_pattern(n))
                .collect(),
        };
        Ok(ServedCert {
            key,
            names,
            expires: leaf.not_after,
        })
    }
}

impl RawUpstreamTls {
    pub(super) fn validate(
        self,
        base_dir: &Path,
        err: &Locator<'_>,
    ) -> Result<UpstreamTls, ConfigError> {
        let files = [&self.ca, &self.client_cert, &self.client_key]
            .into_iter()
            .flatten()
            .map(|f| base_dir.join(f.get_ref()))
            .collect();
        let roots = match &self.ca {
            Some(f) => {
                let mut roots = RootCertStore::empty();
                add_roots(&mut roots, base_dir, f, err)?;
                Arc::new(roots)
            }
            None => system_roots(),
        };
        let server_name = match &self.server_name {
            None => None,
            Some(n) => Some(ServerName::try_from(n.get_ref().clone()).map_err(|_| {
                err.at(
                    n.span(),
                    format!("expected a DNS name or IP address, got {:?}", n.get_ref()),
                )
            })?),
        };
        let client_cert = match (&self.client_cert, &self.client_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(certified_key(base_dir, cert, key, err)?.0),
            (Some(c), None) => {
                return Err(err.at(c.span(), "client_cert needs client_key".into()));
            }
            (None, Some(k)) => {
                return Err(err.at(k.span(), "client_key needs client_cert".into()));
            }
        };
        Ok(UpstreamTls {
            roots,
            server_name,
            client_cert,
            files,
        })
    }
}

impl Default for UpstreamTls {
    /// Verified against the system roots, each server's own name, no client certificate.
    fn default() -> Self {
        UpstreamTls {
            roots: system_roots(),
            server_name: None,
            client_cert: None,
            files: Vec::new(),
        }
    }
}

/// The Mozilla roots compiled in from `webpki-roots`, made once.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            Arc::new(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })
        })
        .clone()
}

/// Reads a chain and its key, and checks that they belong together and that the leaf is
/// within its validity period; also what the leaf says. Errors point at the file's field.
fn certified_key(
    base_dir: &Path,
    cert: &Spanned<String>,
    key: &Spanned<String>,
    err: &Locator<'_>,
) -> Result<(Arc<CertifiedKey>, CertInfo), ConfigError> {
    let cert_path = base_dir.join(cert.get_ref());
    let key_path = base_dir.join(key.get_ref());
    let at_cert = |m: String| err.at(cert.span(), format!("{}: {m}", cert_path.display()));
    let at_key = |m: String| err.at(key.span(), format!("{}: {m}", key_path.display()));
    let chain = read_certs(&cert_path).map_err(at_cert)?;
    let leaf = cert_info(&chain[0]).map_err(at_cert)?;
    if leaf.not_after < SystemTime::now() {
        return Err(at_cert(format!(
            "the certificate expired on {}",
            leaf.not_after_text
        )));
    }
    let pem = read_pem(&key_path).map_err(at_key)?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| at_key(pem_error(e)))?;
    let certified = CertifiedKey::from_der(chain, der, crypto_provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => at_key(format!(
            "this key does not fit the certificate in {}",
            cert_path.display()
        )),
        other => at_key(format!("unusable private key: {other}")),
    })?;
    Ok((Arc::new(certified), leaf))
}

/// Adds every certificate of a PEM bundle to `roots`.
fn add_roots(
    roots: &mut RootCertStore,
    base_dir: &Path,
    file: &Spanned<String>,
    err: &Locator<'_>,
) -> Result<(), ConfigError> {
    let path = base_dir.join(file.get_ref());
    let at = |m: String| err.at(file.span(), format!("{}: {m}", path.display()));
    for cert in read_certs(&path).map_err(at)? {
        roots
            .add(cert)
            .map_err(|e| at(format!("not a usable CA certificate: {e}")))?;
    }
    Ok(())
}

/// Every certificate of a PEM file, in order; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block in this PEM file".into());
    }
    Ok(certs)
}

/// Largest PEM file read (a CA bundle of every public root is about 200 KiB).
const MAX_PEM: u64 = 4 << 20;

/// A PEM file's bytes: a regular file of at most [`MAX_PEM`], so a path such as
/// `/dev/zero` or a FIFO is an error, not a hang.
fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("cannot read: not a regular file".into());
    }
    if meta.len() > MAX_PEM {
        return Err(format!("larger than {} MiB: not a PEM file", MAX_PEM >> 20));
    }
    std::fs::read(path).map_err(|e| format!("cannot read: {e}"))
}

/// What went wrong reading a PEM file, in a config error's words.
fn pem_error(e: rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::Io(e) => format!("cannot read: {e}"),
        Error::NoItemsFound => "no private key block in this PEM file".into(),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// What a certificate says that Sluice uses, read in one parse.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// The subject, RFC 4514 style (`CN=alice`).
    pub subject: String,
    /// The DNS names of its subject alternative names.
    pub dns_names: Vec<String>,
    /// The end of its validity (`notAfter`; the epoch for one before 1970).
    pub not_after: SystemTime,
    /// `notAfter` as the certificate writes it, for messages.
    not_after_text: String,
}

/// Parses a DER certificate for its [`CertInfo`].
pub fn cert_info(cert: &CertificateDer<'_>) -> Result<CertInfo, String> {
    let (_, x509) =
        X509Certificate::from_der(cert).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let not_after = x509.validity().not_after;
    let dns_names = match x509.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(CertInfo {
        subject: x509.subject().to_string(),
        dns_names,
        not_after: u64::try_from(not_after.timestamp())
            .map_or(UNIX_EPOCH, |secs| UNIX_EPOCH + Duration::from_secs(secs)),
        not_after_text: not_after.to_string(),
    })
}

/// A server name to match SNI against, lower-case: a DNS name, or `*.` and one.
fn server_name_pattern(name: &str) -> Option<String> {
    let name = name.to_ascii_lowercase();
    let host = name.strip_prefix("*.").unwrap_or(&name);
    match ServerName::try_from(host) {
        Ok(ServerName::DnsName(_)) if !host.contains('*') => Some(name),
        _ => None,
    }
}
