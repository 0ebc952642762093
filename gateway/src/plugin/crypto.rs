//! The `crypto` import: HMAC and signature checks a plugin asks of the host, done in
//! native code by aws-lc-rs (the provider rustls already uses). The same check compiled
//! into a plugin costs many times more (an HS256 token's HMAC alone is some 18,000 guest
//! instructions) and is not constant-time by construction.
//!
//! A key is parsed once, when the plugin creates it, and lives in the instance's resource
//! table until the plugin drops it or the instance goes. Bounded: keys per instance and
//! bytes per key.

use aws_lc_rs::hmac;
use aws_lc_rs::signature::{self, ParsedPublicKey};
use wasmtime::component::Resource;

use super::bindings::crypto::{Algorithm, Host, HostKey};
use super::instance::State;

/// Keys one instance may hold at once: a JWKS rarely has more than a handful.
pub(super) const MAX_KEYS: usize = 1024;
/// Bytes of one key's material: an 8192-bit RSA key's DER is about 1.1 KiB.
const MAX_MATERIAL: usize = 16 * 1024;

/// A parsed key, the host side of the WIT `key` resource.
pub enum Key {
    /// An HMAC key (its pads already hashed; boxed, being 1.2 KB of context).
    Hmac(Box<hmac::Key>),
    /// A public key and the algorithm it verifies.
    Public(ParsedPublicKey),
}

impl Key {
    /// `algorithm`'s key from `material`, or why not.
    fn parse(algorithm: Algorithm, material: &[u8]) -> Result<Self, String> {
        if material.len() > MAX_MATERIAL {
            return Err(format!(
                "key material is {} bytes, over the {MAX_MATERIAL}-byte bound",
                material.len()
            ));
        }
        let public = |alg: &'static dyn signature::VerificationAlgorithm, what: &str| {
            ParsedPublicKey::new(alg, material)
                .map(Key::Public)
                .map_err(|e| format!("not {what}: {e}"))
        };
        match algorithm {
            Algorithm::HmacSha256 => Ok(Key::Hmac(Box::new(hmac::Key::new(
                hmac::HMAC_SHA256,
                material,
            )))),
            Algorithm::RsaPkcs1Sha256 => {
                let rsa = &signature::RSA_PKCS1_2048_8192_SHA256;
                // Parsing does not check the size, verifying does: a key of the wrong size
                // would load and then refuse every signature.
                let (min, max) = (rsa.min_modulus_len(), rsa.max_modulus_len());
                if let Some(bits) = rsa_bits(material)
                    && !(min..=max).contains(&bits)
                {
                    return Err(format!(
                        "an RSA key of {bits} bits; {min} to {max} bits are accepted"
                    ));
                }
                public(
                    rsa,
                    "an RSA public key of 2048 to 8192 bits (DER SubjectPublicKeyInfo or RSAPublicKey)",
                )
            }
            Algorithm::EcdsaP256Sha256 => public(
                &signature::ECDSA_P256_SHA256_FIXED,
                "a P-256 public key (DER SubjectPublicKeyInfo or an uncompressed point)",
            ),
        }
    }

    /// Whether `signature` is this key's signature or MAC of `message`.
    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            Key::Hmac(key) => hmac::verify(key, message, signature).is_ok(),
            Key::Public(key) => key.verify_sig(message, signature).is_ok(),
        }
    }
}

/// The modulus size of an RSA public key in DER, SPKI or PKCS#1 `RSAPublicKey`.
fn rsa_bits(der: &[u8]) -> Option<u32> {
    aws_lc_rs::rsa::PublicEncryptingKey::from_der(der)
        .ok()
        .and_then(|key| u32::try_from(key.key_size_bits()).ok())
        .or_else(|| signature::RsaParameters::public_modulus_len(der).ok())
}

impl Host for State {}

impl HostKey for State {
    fn parse(&mut self, algorithm: Algorithm, material: Vec<u8>) -> Result<Resource<Key>, String> {
        if self.keys >= MAX_KEYS {
            return Err(format!("this instance already holds {MAX_KEYS} keys"));
        }
        let key = Key::parse(algorithm, &material)?;
        let handle = self.table.push(key).map_err(|e| e.to_string())?;
        self.keys += 1;
        Ok(handle)
    }

    fn verify(&mut self, key: Resource<Key>, message: Vec<u8>, signature: Vec<u8>) -> bool {
        // A handle the guest holds is in the table: wasmtime checked it on the way in.
        self.table
            .get(&key)
            .is_ok_and(|key| key.verify(&message, &signature))
    }

    fn drop(&mut self, key: Resource<Key>) -> wasmtime::Result<()> {
        self.table.delete(key)?;
        self.keys -= 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_keys_check_macs_and_nothing_else() {
        let key = Key::parse(Algorithm::HmacSha256, b"secret").expect("any bytes are a secret");
        let mac = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, b"secret"), b"message");
        assert!(key.verify(b"message", mac.as_ref()));
        assert!(!key.verify(b"messagE", mac.as_ref()));
        assert!(!key.verify(b"message", &mac.as_ref()[..31]));
    }

    #[test]
    fn malformed_and_oversized_material_is_refused_with_a_reason() {
        let rsa = Key::parse(Algorithm::RsaPkcs1Sha256, b"not der")
            .err()
            .expect("refused");
        assert!(rsa.starts_with("not an RSA public key"), "{rsa}");
        let ec = Key::parse(Algorithm::EcdsaP256Sha256, &[4; 65])
            .err()
            .expect("refused");
        assert!(ec.starts_with("not a P-256 public key"), "{ec}");
        // PKCS#1 `RSAPublicKey` with a 1024-bit odd modulus and e = 65537.
        let mut small = vec![0x30, 0x81, 0x89, 0x02, 0x81, 0x81, 0x00, 0xc0];
        small.extend([0x11; 126]);
        small.extend([0x01, 0x02, 0x03, 0x01, 0x00, 0x01]);
        let weak = Key::parse(Algorithm::RsaPkcs1Sha256, &small)
            .err()
            .expect("refused");
        assert_eq!(
            weak,
            "an RSA key of 1024 bits; 2048 to 8192 bits are accepted"
        );
        let big = Key::parse(Algorithm::HmacSha256, &vec![0; MAX_MATERIAL + 1])
            .err()
            .expect("refused");
        assert!(big.contains("16384-byte bound"), "{big}");
    }
}
