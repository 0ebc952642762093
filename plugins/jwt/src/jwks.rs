//! Key sets as identity providers publish them (a JWKS, RFC 7517), and verification
//! that picks the set's key by the token's `kid`.
//!
//! RSA keys (`RS256`) and P-256 EC keys (`ES256`) are read; a key of another type,
//! curve or algorithm, or one marked for encryption (`"use": "enc"`), is skipped and
//! named, so a provider that adds an algorithm later does not break the set.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

use std::cell::RefCell;
use std::rc::Rc;

use crate::{
    Claims, Decoded, Header, JwtError, Key, Picked, Validation, check_claims, check_signature,
    decode_with, same,
};

/// Most keys read from one set; a token without `kid` is tried against each of its
/// algorithm, so this bounds the work one token can cause.
pub const MAX_KEYS: usize = 64;

/// A verification key and the `kid` a token names it by.
#[derive(Debug, Clone)]
pub struct NamedKey {
    /// The key's id, if the set gives one.
    pub kid: Option<String>,
    /// The key.
    pub key: Key,
}

/// The usable keys of one JWKS.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<NamedKey>,
    /// The last token header read, by its base64url part: one issuer's tokens share
    /// one, so its base64 and JSON are read once, not per token.
    last_header: RefCell<Option<(String, Rc<Header>)>>,
}

/// One member of `keys`, as far as it is read.
#[derive(Deserialize)]
struct Jwk {
    kty: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    usage: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

#[derive(Deserialize)]
struct Document {
    keys: Vec<Jwk>,
}

impl KeySet {
    /// Keys given directly (a config's static keys), without ids.
    pub fn from_keys(keys: Vec<Key>) -> KeySet {
        KeySet {
            keys: keys
                .into_iter()
                .map(|key| NamedKey { kid: None, key })
                .collect(),
            last_header: RefCell::default(),
        }
    }

    /// Reads a JWKS document. Returns the usable keys and, for each key skipped, why.
    /// A document that is not a JWKS, or whose every key is skipped, is an error.
    pub fn parse(json: &[u8]) -> Result<(KeySet, Vec<String>), String> {
        let doc: Document =
            serde_json::from_slice(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, jwk) in doc.keys.into_iter().enumerate() {
            let name = jwk.kid.clone().unwrap_or_else(|| format!("#{i}"));
            if keys.len() == MAX_KEYS {
                skipped.push(format!("{name}: more than {MAX_KEYS} keys"));
                continue;
            }
            match key_of(&jwk) {
                Ok(key) => keys.push(NamedKey { kid: jwk.kid, key }),
                Err(why) => skipped.push(format!("{name}: {why}")),
            }
        }
        if keys.is_empty() {
            return Err(match skipped.is_empty() {
                true => "the JWKS has no keys".to_owned(),
                false => format!("the JWKS has no usable key ({})", skipped.join("; ")),
            });
        }
        Ok((
            KeySet {
                keys,
                last_header: RefCell::default(),
            },
            skipped,
        ))
    }

    /// This set's keys followed by `other`'s.
    pub fn merged(mut self, other: KeySet) -> KeySet {
        self.keys.extend(other.keys);
        self
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether a key of the set has this id.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys
            .iter()
            .any(|k| k.kid.as_deref().is_some_and(|id| same(id, kid)))
    }

    /// Verify a token as [`crate::verify`] does, with the key its `kid` names (each key
    /// of its algorithm when it names none): [`JwtError::UnknownKey`] when no key of the
    /// set has that id.
    pub fn verify(
        &self,
        token: &str,
        validation: &Validation,
        now_secs: u64,
    ) -> Result<Claims, JwtError> {
        let decoded = self.signed(token)?;
        let claims = decoded.claims()?;
        check_claims(&claims, validation, now_secs)?;
        Ok(claims)
    }

    /// [`KeySet::verify`], reading of the claims only what the checks need and the
    /// values of `wanted` ([`Picked`]): no map of every claim is built.
    pub fn verify_picking(
        &self,
        token: &str,
        validation: &Validation,
        now_secs: u64,
        wanted: &[impl AsRef<str>],
    ) -> Result<Picked, JwtError> {
        let picked = self.signed(token)?.pick(wanted)?;
        picked.check(validation, now_secs)?;
        Ok(picked)
    }

    /// The token decoded, once its signature holds under the key its `kid` names.
    fn signed<'t>(&self, token: &'t str) -> Result<Decoded<'t>, JwtError> {
        let decoded = decode_with(token, |part| self.header(part))?;
        let kid = decoded.header.kid.as_deref();
        let mut candidates = self
            .keys
            .iter()
            .filter(|k| k.key.alg() == decoded.header.alg)
            .filter(|k| match (kid, &k.kid) {
                (Some(wanted), Some(id)) => same(wanted, id),
                _ => true,
            })
            .map(|k| &k.key)
            .peekable();
        if let Some(kid) = kid
            && candidates.peek().is_none()
            && !self.has_kid(kid)
        {
            return Err(JwtError::UnknownKey(kid.to_owned()));
        }
        check_signature(&decoded, candidates)?;
        Ok(decoded)
    }

    /// The header of a token's base64url `part`: the last one again when it is the
    /// same part.
    fn header(&self, part: &str) -> Result<Rc<Header>, JwtError> {
        let mut last = self.last_header.borrow_mut();
        if let Some((seen, header)) = &*last
            && same(seen, part)
        {
            return Ok(header.clone());
        }
        let header = Rc::new(Header::parse(part)?);
        *last = Some((part.to_owned(), header.clone()));
        Ok(header)
    }
}

/// The key a JWK describes, or why it is skipped.
fn key_of(jwk: &Jwk) -> Result<Key, String> {
    if jwk.usage.as_deref().is_some_and(|u| u != "sig") {
        return Err("not a signing key".into());
    }
    let field = |v: &Option<String>, name: &str| {
        let text = v.as_deref().ok_or_else(|| format!("no `{name}`"))?;
        URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|_| format!("`{name}` is not base64url"))
    };
    match (jwk.kty.as_deref(), jwk.alg.as_deref()) {
        (Some("RSA"), None | Some("RS256")) => {
            let der = rsa_public_key_der(&field(&jwk.n, "n")?, &field(&jwk.e, "e")?)?;
            Key::rs256_der(&der)
        }
        (Some("EC"), None | Some("ES256")) if jwk.crv.as_deref() == Some("P-256") => {
            let (x, y) = (field(&jwk.x, "x")?, field(&jwk.y, "y")?);
            if x.len() != 32 || y.len() != 32 {
                return Err("P-256 coordinates must be 32 bytes".into());
            }
            let point: Vec<u8> = [&[4][..], &x, &y].concat();
            Key::es256_der(&point).map_err(|_| "not a point on P-256".into())
        }
        (Some("EC"), _) => Err(format!(
            "curve {:?} is not supported (P-256 is)",
            jwk.crv.as_deref().unwrap_or("")
        )),
        (kty, alg) => Err(format!(
            "{} {} is not supported (RSA RS256 and EC ES256 are)",
            kty.unwrap_or("(no kty)"),
            alg.unwrap_or("")
        )),
    }
}

/// PKCS#1 `RSAPublicKey` DER (`SEQUENCE { INTEGER n, INTEGER e }`) from a JWK's `n`
/// and `e`, big-endian unsigned.
fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Result<Vec<u8>, String> {
    use pkcs1::der::{Encode as _, asn1::UintRef};
    let key = pkcs1::RsaPublicKey {
        modulus: UintRef::new(n).map_err(|e| format!("`n`: {e}"))?,
        public_exponent: UintRef::new(e).map_err(|e| format!("`e`: {e}"))?,
    };
    key.to_der()
        .map_err(|e| format!("not an RSA public key: {e}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::mint;

    const EC_PRIVATE: &str = include_str!("../testdata/ec_private.pem");
    const EC_PUBLIC: &str = include_str!("../testdata/ec_public.pem");
    const RSA_PRIVATE: &str = include_str!("../testdata/rsa_private.pem");
    const RSA_PUBLIC: &str = include_str!("../testdata/rsa_public.pem");

    fn claims() -> serde_json::Value {
        json!({"sub": "alice", "exp": 2_000})
    }

    fn set(keys: serde_json::Value) -> KeySet {
        KeySet::parse(json!({ "keys": keys }).to_string().as_bytes())
            .unwrap()
            .0
    }

    #[test]
    fn a_jwks_rsa_key_is_the_der_the_rsa_crate_writes() {
        use rsa::pkcs1::EncodeRsaPublicKey as _;
        use rsa::pkcs8::DecodePublicKey as _;
        use rsa::traits::PublicKeyParts as _;
        let key = rsa::RsaPublicKey::from_public_key_pem(RSA_PUBLIC).unwrap();
        let der = rsa_public_key_der(&key.n().to_bytes_be(), &key.e().to_bytes_be()).unwrap();
        assert_eq!(der, key.to_pkcs1_der().unwrap().as_bytes());
        // Leading zeros dropped, a zero byte added before a set top bit.
        assert_eq!(
            rsa_public_key_der(&[0, 0x80], &[1, 0, 1]).unwrap(),
            [
                0x30, 0x09, 0x02, 0x02, 0x00, 0x80, 0x02, 0x03, 0x01, 0x00, 0x01
            ]
        );
    }

    #[test]
    fn picks_the_key_a_token_names() {
        let keys = set(json!([
            mint::jwk(EC_PUBLIC, "ec-1").unwrap(),
            mint::jwk(RSA_PUBLIC, "rsa-1").unwrap(),
        ]));
        assert_eq!(keys.len(), 2);
        let v = Validation::default();
        let es = mint::es256_kid(&claims(), EC_PRIVATE, "ec-1").unwrap();
        let rs = mint::rs256_kid(&claims(), RSA_PRIVATE, "rsa-1").unwrap();
        assert_eq!(keys.verify(&es, &v, 1_000).unwrap()["sub"], "alice");
        assert_eq!(keys.verify(&rs, &v, 1_000).unwrap()["sub"], "alice");
        // Named by another id: refused before any signature check.
        let other = mint::es256_kid(&claims(), EC_PRIVATE, "ec-2").unwrap();
        assert_eq!(
            keys.verify(&other, &v, 1_000),
            Err(JwtError::UnknownKey("ec-2".into()))
        );
        // A token with no `kid` is tried against each key of its algorithm.
        let bare = mint::es256(&claims(), EC_PRIVATE).unwrap();
        assert!(keys.verify(&bare, &v, 1_000).is_ok());
        // The right id on the wrong key's signature fails.
        let lying = mint::rs256_kid(&claims(), RSA_PRIVATE, "ec-1").unwrap();
        assert!(keys.verify(&lying, &v, 1_000).is_err());
        // The set keeps the last header it read: a token with the same one, then one
        // with another, are each read by their own.
        let es_again = mint::es256_kid(&json!({"sub": "bob"}), EC_PRIVATE, "ec-1").unwrap();
        assert_eq!(es.split('.').next(), es_again.split('.').next());
        assert_eq!(keys.verify(&es, &v, 1_000).unwrap()["sub"], "alice");
        assert_eq!(keys.verify(&es_again, &v, 1_000).unwrap()["sub"], "bob");
        assert_eq!(
            keys.verify(&other, &v, 1_000),
            Err(JwtError::UnknownKey("ec-2".into()))
        );
        assert_eq!(keys.verify(&rs, &v, 1_000).unwrap()["sub"], "alice");
    }

    #[test]
    fn unusable_keys_are_skipped_and_named() {
        let (keys, skipped) = KeySet::parse(
            json!({"keys": [
                mint::jwk(EC_PUBLIC, "ok").unwrap(),
                {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
                {"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AA", "y": "AA"},
                {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
                {"kty": "EC", "kid": "short", "crv": "P-256", "x": "AA", "y": "AA"},
            ]})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        assert!(skipped[0].starts_with("sym: "), "{skipped:?}");
    }

    #[test]
    fn a_document_without_usable_keys_is_an_error() {
        for bad in [
            &b"not json"[..],
            b"{\"keys\": 7}",
            b"{\"keys\": []}",
            b"{\"keys\": [{\"kty\": \"oct\"}]}",
            b"[]",
        ] {
            assert!(
                KeySet::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
