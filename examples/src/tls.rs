//! Throw-away certificates for the TLS quickstart: a CA made on the spot and a
//! `localhost`/`127.0.0.1` server certificate it signs, both ECDSA P-256.
//!
//! The CA's private key is never written down: once the leaf is signed it is dropped, so
//! trusting `ca.pem` trusts that one certificate and nothing else anyone could sign later.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData,
};
use sha2::{Digest, Sha256};

/// Where the TLS quickstart keeps its certificates, relative to `examples/` (the directory
/// of `quickstart-tls.toml`, whose paths name it).
pub const QUICKSTART_DIR: &str = "../target/quickstart-tls";

/// The CA certificate to trust (PEM).
pub const CA_FILE: &str = "ca.pem";
/// The server certificate for `localhost` and `127.0.0.1` (PEM), signed by the CA.
pub const CERT_FILE: &str = "localhost.pem";
/// The server certificate's private key (PKCS#8 PEM).
pub const KEY_FILE: &str = "localhost-key.pem";
/// When the server certificate expires, in seconds since the Unix epoch (decimal text).
pub const VALID_UNTIL_FILE: &str = "valid-until";

/// How long a new certificate is valid.
pub const VALIDITY: Duration = Duration::from_secs(90 * 86_400);
/// Certificates closer than this to their end are made anew rather than reused.
pub const RENEW_BEFORE: Duration = Duration::from_secs(86_400);

/// The files of one set of quickstart certificates.
#[derive(Clone, Debug)]
pub struct Certs {
    /// The CA certificate to trust.
    pub ca: PathBuf,
    /// The server certificate.
    pub cert: PathBuf,
    /// The server certificate's private key.
    pub key: PathBuf,
    /// When the server certificate expires.
    pub valid_until: SystemTime,
    /// Base64 of the SHA-256 of the server key's SubjectPublicKeyInfo: the value Chromium's
    /// `--ignore-certificate-errors-spki-list` takes.
    pub spki_sha256: String,
    /// Whether these files were made by this call (`false`: reused).
    pub fresh: bool,
}

/// The certificates in `dir`, reused when all files are there and the server certificate
/// is valid for at least [`RENEW_BEFORE`] more, otherwise made anew (the directory is
/// created if needed).
pub fn ensure_certs(dir: &Path) -> anyhow::Result<Certs> {
    match existing(dir) {
        Some(certs) if certs.valid_until > SystemTime::now() + RENEW_BEFORE => Ok(certs),
        _ => generate_certs(dir),
    }
}

/// Makes a new CA and server certificate in `dir`, replacing any there.
pub fn generate_certs(dir: &Path) -> anyhow::Result<Certs> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let now = SystemTime::now();
    // Valid from the start of yesterday (UTC), so a clock a little behind still accepts it.
    let at = |t: SystemTime| {
        let (year, month, day) = ymd(t);
        rcgen::date_time_ymd(year, month, day)
    };
    let not_before = at(now - Duration::from_secs(86_400));
    let valid_until = start_of_day(now + VALIDITY);
    let not_after = at(valid_until);

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Sluice quickstart CA (throw-away)");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;

    let certs = Certs {
        ca: dir.join(CA_FILE),
        cert: dir.join(CERT_FILE),
        key: dir.join(KEY_FILE),
        valid_until,
        spki_sha256: spki_sha256(&key),
        fresh: true,
    };
    write(&certs.ca, &ca_cert.pem())?;
    write(&certs.cert, &cert.pem())?;
    write(&certs.key, &key.serialize_pem())?;
    let secs = valid_until.duration_since(UNIX_EPOCH)?.as_secs();
    write(&dir.join(VALID_UNTIL_FILE), &format!("{secs}\n"))?;
    Ok(certs)
}

/// Base64 of the SHA-256 of `key`'s SubjectPublicKeyInfo (DER), as Chromium's
/// `--ignore-certificate-errors-spki-list` and HPKP pins write it.
pub fn spki_sha256(key: &impl PublicKeyData) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(key.subject_public_key_info()))
}

/// The certificates already in `dir`, if every file is there and readable.
fn existing(dir: &Path) -> Option<Certs> {
    let (ca, cert, key) = (dir.join(CA_FILE), dir.join(CERT_FILE), dir.join(KEY_FILE));
    if !ca.is_file() || !cert.is_file() {
        return None;
    }
    let key_pair = KeyPair::from_pem(&std::fs::read_to_string(&key).ok()?).ok()?;
    let secs: u64 = std::fs::read_to_string(dir.join(VALID_UNTIL_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Certs {
        ca,
        cert,
        key,
        valid_until: UNIX_EPOCH + Duration::from_secs(secs),
        spki_sha256: spki_sha256(&key_pair),
        fresh: false,
    })
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("write {}", path.display()))
}

/// Midnight UTC at the start of the day holding `t`.
fn start_of_day(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    UNIX_EPOCH + Duration::from_secs(secs - secs % 86_400)
}

/// The UTC date holding `t`, as `YYYY-MM-DD`.
pub fn utc_date(t: SystemTime) -> String {
    let (year, month, day) = ymd(t);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The UTC (year, month, day) holding `t`.
fn ymd(t: SystemTime) -> (i32, u8, u8) {
    let days = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 86_400;
    civil_from_days(days as i64)
}

/// The proleptic Gregorian (year, month, day) of `days` after 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sluice-examples-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_453), (2025, 12, 31));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }

    #[test]
    fn the_quickstart_config_names_these_files() {
        let config = include_str!("../quickstart-tls.toml");
        for line in [
            format!("cert = \"{QUICKSTART_DIR}/{CERT_FILE}\""),
            format!("key = \"{QUICKSTART_DIR}/{KEY_FILE}\""),
        ] {
            assert!(config.contains(&line), "quickstart-tls.toml lacks {line}");
        }
        assert_eq!(
            utc_date(UNIX_EPOCH + Duration::from_secs(20_454 * 86_400 - 1)),
            "2025-12-31"
        );
    }

    #[test]
    fn certs_are_made_then_reused_then_renewed() {
        let dir = temp_dir("certs");
        let made = ensure_certs(&dir).expect("make certs");
        assert!(made.fresh);
        for file in [&made.ca, &made.cert, &made.key] {
            let text = std::fs::read_to_string(file).expect("read a cert file");
            assert!(
                text.starts_with("-----BEGIN "),
                "{}: {text}",
                file.display()
            );
        }
        let left = made
            .valid_until
            .duration_since(SystemTime::now())
            .expect("valid in the future");
        assert!(left > VALIDITY - Duration::from_secs(2 * 86_400) && left <= VALIDITY);
        // The hash is that of the key on disk: 32 bytes of SHA-256 in base64.
        let key = KeyPair::from_pem(&std::fs::read_to_string(&made.key).unwrap()).unwrap();
        assert_eq!(spki_sha256(&key), made.spki_sha256);
        assert_eq!(made.spki_sha256.len(), 44);

        let reused = ensure_certs(&dir).expect("reuse certs");
        assert!(!reused.fresh);
        assert_eq!(reused.spki_sha256, made.spki_sha256);
        assert_eq!(reused.valid_until, made.valid_until);

        // Close to its end, a certificate is made anew, with a new key.
        std::fs::write(dir.join(VALID_UNTIL_FILE), "1000\n").unwrap();
        let renewed = ensure_certs(&dir).expect("renew certs");
        assert!(renewed.fresh);
        assert_ne!(renewed.spki_sha256, made.spki_sha256);

        // A missing file is made anew too.
        std::fs::remove_file(&renewed.key).unwrap();
        assert!(ensure_certs(&dir).expect("remake certs").fresh);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
