//! HMAC and signature checks done by the gateway in native code: constant-time, with
//! the CPU's SHA instructions, and many times cheaper than the same check compiled into
//! the plugin (an HS256 token's HMAC alone is some 18,000 guest instructions).
//!
//! Make a [`Key`] once (in `init`, or when a JWKS changes) and [`Key::verify`] on the
//! request path. In native builds (unit tests) the same checks run on the RustCrypto
//! crates, so plugin code calls them the same way in both.
//!
//! ```
//! use sluice_plugin_sdk::crypto::{Algorithm, Key};
//! let key = Key::new(Algorithm::HmacSha256, b"secret").unwrap();
//! assert!(!key.verify(b"message", &[0; 32]));
//! ```

pub use crate::bindings::sluice::plugin::crypto::Algorithm;

/// A verification key the gateway holds for this instance, parsed once. Dropping it
/// frees it in the gateway too.
#[derive(Debug)]
pub struct Key(imp::Key);

impl Key {
    /// A key for `algorithm` from `material`: the shared secret for
    /// [`Algorithm::HmacSha256`]; for [`Algorithm::RsaPkcs1Sha256`] an RSA public key of
    /// 2048 to 8192 bits, DER `SubjectPublicKeyInfo` or PKCS#1 `RSAPublicKey`; for
    /// [`Algorithm::EcdsaP256Sha256`] a P-256 public key, DER `SubjectPublicKeyInfo` or an
    /// uncompressed point (`04 || x || y`). Refused, with the reason, when the material is
    /// not such a key, is over 16 KiB, or the instance holds 1,024 keys already.
    pub fn new(algorithm: Algorithm, material: &[u8]) -> Result<Self, String> {
        imp::Key::parse(algorithm, material).map(Key)
    }

    /// Whether `signature` is this key's signature (or MAC) of `message`. An ECDSA
    /// signature is `r || s`, 64 bytes.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        self.0.verify(message, signature)
    }
}

#[cfg(target_arch = "wasm32")]
use crate::bindings::sluice::plugin::crypto as imp;

/// The native stand-in for the `crypto` import, on the RustCrypto crates.
#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use std::cell::Cell;

    use hmac::{Hmac, Mac as _};
    use p256::ecdsa::signature::Verifier as _;
    use rsa::pkcs1::DecodeRsaPublicKey as _;
    use rsa::pkcs8::DecodePublicKey as _;
    use sha2::Sha256;

    use super::Algorithm;

    const MAX_MATERIAL: usize = 16 * 1024;
    /// Keys one instance may hold at once, as the gateway bounds them; natively, a thread
    /// stands for an instance.
    pub(super) const MAX_KEYS: usize = 1024;

    thread_local!(static LIVE: Cell<usize> = const { Cell::new(0) });

    #[derive(Debug)]
    pub(super) enum Key {
        Hmac(Hmac<Sha256>),
        Rsa(rsa::pkcs1v15::VerifyingKey<Sha256>),
        Ec(p256::ecdsa::VerifyingKey),
    }

    impl Drop for Key {
        fn drop(&mut self) {
            LIVE.with(|live| live.set(live.get().saturating_sub(1)));
        }
    }

    impl Key {
        pub(super) fn parse(algorithm: Algorithm, material: &[u8]) -> Result<Self, String> {
            if LIVE.with(Cell::get) >= MAX_KEYS {
                return Err(format!("this instance already holds {MAX_KEYS} keys"));
            }
            let key = Self::parse_material(algorithm, material)?;
            LIVE.with(|live| live.set(live.get() + 1));
            Ok(key)
        }

        fn parse_material(algorithm: Algorithm, material: &[u8]) -> Result<Self, String> {
            if material.len() > MAX_MATERIAL {
                return Err(format!(
                    "key material is {} bytes, over the {MAX_MATERIAL}-byte bound",
                    material.len()
                ));
            }
            match algorithm {
                Algorithm::HmacSha256 => Hmac::new_from_slice(material)
                    .map(Key::Hmac)
                    .map_err(|e| e.to_string()),
                Algorithm::RsaPkcs1Sha256 => {
                    let key = rsa::RsaPublicKey::from_public_key_der(material)
                        .or_else(|_| rsa::RsaPublicKey::from_pkcs1_der(material))
                        .map_err(|_| {
                            "not an RSA public key of 2048 to 8192 bits (DER SubjectPublicKeyInfo or RSAPublicKey)".to_owned()
                        })?;
                    // The gateway's own words for a key of the wrong size.
                    let bits = rsa::traits::PublicKeyParts::n(&key).bits();
                    if !(2048..=8192).contains(&bits) {
                        return Err(format!(
                            "an RSA key of {bits} bits; 2048 to 8192 bits are accepted"
                        ));
                    }
                    Ok(Key::Rsa(rsa::pkcs1v15::VerifyingKey::new(key)))
                }
                Algorithm::EcdsaP256Sha256 => p256::ecdsa::VerifyingKey::from_public_key_der(
                    material,
                )
                .or_else(|_| p256::ecdsa::VerifyingKey::from_sec1_bytes(material))
                .map(Key::Ec)
                .map_err(|_| {
                    "not a P-256 public key (DER SubjectPublicKeyInfo or an uncompressed point)"
                        .to_owned()
                }),
            }
        }

        pub(super) fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
            match self {
                Key::Hmac(mac) => mac
                    .clone()
                    .chain_update(message)
                    .verify_slice(signature)
                    .is_ok(),
                Key::Rsa(key) => rsa::pkcs1v15::Signature::try_from(signature)
                    .is_ok_and(|sig| key.verify(message, &sig).is_ok()),
                Key::Ec(key) => p256::ecdsa::Signature::from_slice(signature)
                    .is_ok_and(|sig| key.verify(message, &sig).is_ok()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_rsa_key_is_refused_in_the_gateways_words() {
        // PKCS#1 `RSAPublicKey` with a 1024-bit odd modulus and e = 65537 (the gateway's
        // own test of plugin/crypto.rs uses the same bytes).
        let mut small = vec![0x30, 0x81, 0x89, 0x02, 0x81, 0x81, 0x00, 0xc0];
        small.extend([0x11; 126]);
        small.extend([0x01, 0x02, 0x03, 0x01, 0x00, 0x01]);
        let refused = Key::new(Algorithm::RsaPkcs1Sha256, &small).err();
        assert_eq!(
            refused.as_deref(),
            Some("an RSA key of 1024 bits; 2048 to 8192 bits are accepted")
        );
        let hmac = Key::new(Algorithm::HmacSha256, b"secret").expect("any bytes are a secret");
        assert!(!hmac.verify(b"message", &[0; 32]));
    }

    #[test]
    fn an_instance_holds_at_most_1024_keys_as_in_the_gateway() {
        // Each test runs on a thread of its own: this one's keys are all its own.
        let make = || Key::new(Algorithm::HmacSha256, b"secret");
        let mut held: Vec<Key> = (0..imp::MAX_KEYS).map(|_| make().unwrap()).collect();
        assert_eq!(
            make().err().as_deref(),
            Some("this instance already holds 1024 keys")
        );
        // A key dropped frees its place.
        held.pop();
        held.push(make().expect("a place was freed"));
    }
}
