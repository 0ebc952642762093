//! JSON Web Tokens for Sluice plugins: decoding, verification (HS256, RS256,
//! ES256) with `exp`/`nbf`/`iss`/`aud` checks and leeway, and minting for tests
//! and examples.
//!
//! Shared by the `jwt-auth` plugin (verifies) and the `sticky-key` plugin
//! (reads a claim of a token an earlier plugin verified).
//!
//! ```
//! use sluice_jwt::{Key, Validation, mint, verify};
//! let token = mint::hs256(&serde_json::json!({"sub": "alice", "exp": 2_000}), b"secret");
//! let keys = [Key::hs256(b"secret").unwrap()];
//! let claims = verify(&token, &keys, &Validation::default(), 1_000).unwrap();
//! assert_eq!(sluice_jwt::claim_str(&claims, "sub").as_deref(), Some("alice"));
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};
use sluice_plugin_sdk::crypto::{self, Algorithm};
/// Compares names, claims and tokens, eight bytes at a time (see its doc).
pub use sluice_plugin_sdk::matching::same;
use std::rc::Rc;

pub mod jwks;
#[cfg(not(target_arch = "wasm32"))]
pub mod mint;
pub mod token;

/// The claims of a token: its JSON payload object.
pub type Claims = Map<String, Value>;

/// Why a token was refused. The text is safe to show a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    /// Not three base64url parts with a JSON header and payload.
    Malformed,
    /// The header's `alg` is not one of the configured keys' algorithms.
    UnsupportedAlgorithm(String),
    /// No configured key verifies the signature.
    BadSignature,
    /// `exp` is in the past (beyond leeway).
    Expired,
    /// `nbf` is in the future (beyond leeway).
    NotYetValid,
    /// `iss` is missing or not the expected issuer.
    WrongIssuer,
    /// `aud` is missing or does not contain the expected audience.
    WrongAudience,
    /// The header's `kid` names no key of the set.
    UnknownKey(String),
}

impl std::fmt::Display for JwtError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwtError::Malformed => f.write_str("malformed token"),
            JwtError::UnsupportedAlgorithm(alg) => write!(f, "unsupported algorithm {alg:?}"),
            JwtError::BadSignature => f.write_str("bad signature"),
            JwtError::Expired => f.write_str("token expired"),
            JwtError::NotYetValid => f.write_str("token not yet valid"),
            JwtError::WrongIssuer => f.write_str("wrong issuer"),
            JwtError::WrongAudience => f.write_str("wrong audience"),
            JwtError::UnknownKey(kid) => write!(f, "unknown key {kid:?}"),
        }
    }
}

impl std::error::Error for JwtError {}

/// What a verifier reads of a token's JOSE header; its other members are skipped.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Header {
    /// The `alg` header field.
    pub alg: String,
    /// The `kid` header field: which key of a set signed it.
    pub kid: Option<String>,
}

impl Header {
    /// The header of a token's first base64url part.
    pub fn parse(part: &str) -> Result<Header, JwtError> {
        serde_json::from_str(&base64_text(part)?).map_err(|_| JwtError::Malformed)
    }
}

/// A token split into its parts, signature not yet checked.
#[derive(Debug, Clone)]
pub struct Decoded<'a> {
    /// The header: `alg` and `kid`.
    pub header: Rc<Header>,
    /// The payload: JSON, parsed only once the signature holds.
    payload: String,
    /// `header.payload`, the bytes the signature covers.
    pub signing_input: &'a str,
    /// The raw signature bytes.
    pub signature: Vec<u8>,
}

impl Decoded<'_> {
    /// The payload object, whole.
    pub fn claims(&self) -> Result<Claims, JwtError> {
        serde_json::from_str(&self.payload).map_err(|_| JwtError::Malformed)
    }

    /// What a verifier reads of the payload: the registered claims [`Picked::check`]
    /// checks and the values of `wanted`, with every other member skipped unbuilt.
    pub fn pick<S: AsRef<str>>(&self, wanted: &[S]) -> Result<Picked, JwtError> {
        pick(&self.payload, wanted, true).ok_or(JwtError::Malformed)
    }
}

/// Split and decode a token without checking its signature. Use only for
/// tokens already verified (e.g. by `jwt-auth` earlier in the chain).
pub fn decode(token: &str) -> Result<Decoded<'_>, JwtError> {
    decode_with(token, |part| Header::parse(part).map(Rc::new))
}

/// [`decode`], with the header read by `header` from its base64url part (a verifier
/// that sees one issuer's tokens may keep the last one: [`jwks::KeySet`] does).
pub fn decode_with(
    token: &str,
    header: impl FnOnce(&str) -> Result<Rc<Header>, JwtError>,
) -> Result<Decoded<'_>, JwtError> {
    let (signing_input, signature) = token.rsplit_once('.').ok_or(JwtError::Malformed)?;
    let (head, payload) = signing_input.split_once('.').ok_or(JwtError::Malformed)?;
    Ok(Decoded {
        header: header(head)?,
        payload: base64_text(payload)?,
        signing_input,
        signature: URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| JwtError::Malformed)?,
    })
}

/// A base64url part holding JSON, as text: UTF-8 is checked once here, so serde reads
/// its strings without checking each again (a tenth of a token's parse in wasm).
fn base64_text(part: &str) -> Result<String, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed)?;
    String::from_utf8(bytes).map_err(|_| JwtError::Malformed)
}

/// One claim of a token, as [`claim_str`] formats it, **without** checking
/// the signature or any other claim: only the payload is decoded, and only
/// the named member is kept (the rest is skipped, not built). Use only for
/// tokens already verified, e.g. by `jwt-auth` earlier in the chain.
/// `None` when the token is malformed or the claim is absent or null.
pub fn peek_claim(token: &str, name: &str) -> Option<String> {
    let mut parts = token.split('.');
    let (_header, payload) = (parts.next()?, parts.next()?);
    let mut picked = pick(&base64_text(payload).ok()?, &[name], false)?;
    picked.values.pop()?
}

/// The claims of a token a verifier reads, without building the others: the
/// registered ones it checks and the values of the names it asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Picked {
    /// `exp`, in whole seconds, if present and numeric.
    pub exp: Option<u64>,
    /// `nbf`, in whole seconds, if present and numeric.
    pub nbf: Option<u64>,
    iss: Option<Value>,
    aud: Option<Value>,
    /// The value of each wanted name, in the order asked, as [`claim_str`] formats it.
    pub values: Vec<Option<String>>,
}

impl Picked {
    /// The checks [`verify`] makes of the claims: times, issuer and audience.
    pub fn check(&self, v: &Validation, now: u64) -> Result<(), JwtError> {
        check_registered(
            self.exp,
            self.nbf,
            self.iss.as_ref(),
            self.aud.as_ref(),
            v,
            now,
        )
    }
}

/// A registered claim [`Picked`] keeps for the checks.
#[derive(Clone, Copy)]
enum Registered {
    Exp,
    Nbf,
    Iss,
    Aud,
}

/// Reads a payload's members into a [`Picked`] (the registered claims too when
/// `registered`); `None` when it is not a JSON object. A repeated member counts
/// once, the last time, as in a [`Claims`] map.
fn pick<S: AsRef<str>>(payload: &str, wanted: &[S], registered: bool) -> Option<Picked> {
    let mut de = serde_json::Deserializer::from_str(payload);
    let mut picked = de.deserialize_map(Pick { wanted, registered }).ok()?;
    de.end().ok()?;
    // A name asked twice gets the value of its first asking.
    for i in 0..wanted.len() {
        let name = wanted[i].as_ref();
        if let Some(first) = wanted[..i].iter().position(|w| same(w.as_ref(), name)) {
            picked.values[i] = picked.values[first].clone();
        }
    }
    Some(picked)
}

/// Visits a payload object for [`pick`].
struct Pick<'w, S> {
    wanted: &'w [S],
    registered: bool,
}

impl<'de, S: AsRef<str>> Visitor<'de> for Pick<'_, S> {
    type Value = Picked;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Picked, A::Error> {
        let mut picked = Picked {
            values: vec![None; self.wanted.len()],
            ..Picked::default()
        };
        while let Some((registered, wanted)) = map.next_key_seed(Member(&self))? {
            if registered.is_none() && wanted.is_none() {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let value: Value = map.next_value()?;
            let time = || value.as_f64().map(|t| t as u64);
            let kept = match registered {
                Some(Registered::Exp) => {
                    picked.exp = time();
                    None
                }
                Some(Registered::Nbf) => {
                    picked.nbf = time();
                    None
                }
                Some(Registered::Iss) => Some(&mut picked.iss),
                Some(Registered::Aud) => Some(&mut picked.aud),
                None => None,
            };
            // A wanted value that is not kept too is moved, not copied.
            match (wanted, kept) {
                (Some(i), Some(slot)) => {
                    picked.values[i] = value_str(&value);
                    *slot = Some(value);
                }
                (Some(i), None) => picked.values[i] = into_text(value),
                (None, Some(slot)) => *slot = Some(value),
                (None, None) => {}
            }
        }
        Ok(picked)
    }
}

/// A member name, told apart without allocating: which registered claim it is (when
/// those are read) and which wanted name (its first place).
struct Member<'p, 'w, S>(&'p Pick<'w, S>);

impl<'de, S: AsRef<str>> DeserializeSeed<'de> for Member<'_, '_, S> {
    type Value = (Option<Registered>, Option<usize>);

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, S: AsRef<str>> Visitor<'de> for Member<'_, '_, S> {
    type Value = (Option<Registered>, Option<usize>);

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        // Byte patterns, not `str` ones: those compile to `memcmp` calls (see [`same`]).
        let registered = match key.as_bytes() {
            _ if !self.0.registered => None,
            [b'e', b'x', b'p'] => Some(Registered::Exp),
            [b'n', b'b', b'f'] => Some(Registered::Nbf),
            [b'i', b's', b's'] => Some(Registered::Iss),
            [b'a', b'u', b'd'] => Some(Registered::Aud),
            _ => None,
        };
        Ok((
            registered,
            self.0.wanted.iter().position(|w| same(w.as_ref(), key)),
        ))
    }
}

/// A verification key: the JOSE algorithm it verifies and the key the gateway holds
/// for it (`sluice_plugin_sdk::crypto`), which checks signatures in native code.
/// Cloning shares the one key.
#[derive(Debug, Clone)]
pub struct Key {
    alg: &'static str,
    key: Rc<crypto::Key>,
}

impl Key {
    fn new(alg: &'static str, algorithm: Algorithm, material: &[u8]) -> Result<Self, String> {
        let key =
            crypto::Key::new(algorithm, material).map_err(|e| format!("bad {alg} key: {e}"))?;
        Ok(Key {
            alg,
            key: Rc::new(key),
        })
    }

    /// An HS256 key from a shared secret (refused only when the instance holds too
    /// many keys).
    pub fn hs256(secret: &[u8]) -> Result<Self, String> {
        Key::new("HS256", Algorithm::HmacSha256, secret)
    }

    /// An RS256 key from a PEM `PUBLIC KEY` (SPKI).
    pub fn rs256_pem(pem: &str) -> Result<Self, String> {
        let der = pem_der(pem).map_err(|e| format!("bad RS256 public key: {e}"))?;
        Key::rs256_der(&der)
    }

    /// An RS256 key from DER: SPKI or PKCS#1 `RSAPublicKey`.
    pub fn rs256_der(der: &[u8]) -> Result<Self, String> {
        Key::new("RS256", Algorithm::RsaPkcs1Sha256, der)
    }

    /// An ES256 key from a PEM `PUBLIC KEY` (SPKI).
    pub fn es256_pem(pem: &str) -> Result<Self, String> {
        let der = pem_der(pem).map_err(|e| format!("bad ES256 public key: {e}"))?;
        Key::es256_der(&der)
    }

    /// An ES256 key from DER SPKI or an uncompressed SEC1 point (`04 || x || y`).
    pub fn es256_der(der: &[u8]) -> Result<Self, String> {
        Key::new("ES256", Algorithm::EcdsaP256Sha256, der)
    }

    /// The JOSE algorithm name this key verifies.
    pub fn alg(&self) -> &'static str {
        self.alg
    }

    fn verifies(&self, input: &[u8], signature: &[u8]) -> bool {
        self.key.verify(input, signature)
    }
}

/// The DER inside a PEM `PUBLIC KEY` block (RFC 7468). Lines may be indented, as a key
/// pasted into an indented TOML string is.
fn pem_der(pem: &str) -> Result<Vec<u8>, &'static str> {
    let lines: Vec<&str> = pem.trim().lines().map(str::trim).collect();
    match pem_rfc7468::decode_vec(lines.join("\n").as_bytes()) {
        Ok(("PUBLIC KEY", der)) => Ok(der),
        Ok(_) => Err("not a PEM PUBLIC KEY block"),
        Err(_) => Err("not a PEM block with base64 inside"),
    }
}

/// Claim checks applied after the signature.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validation {
    /// Required `iss`, if any.
    pub issuer: Option<String>,
    /// Required member of `aud` (a string or an array), if any.
    pub audience: Option<String>,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Refuse tokens without `exp`.
    pub require_exp: bool,
}

/// Verify a token's signature against `keys` (the one whose algorithm the
/// header names) and its claims against `validation` at time `now_secs`.
pub fn verify(
    token: &str,
    keys: &[Key],
    validation: &Validation,
    now_secs: u64,
) -> Result<Claims, JwtError> {
    let decoded = decode(token)?;
    check_signature(
        &decoded,
        keys.iter().filter(|k| k.alg() == decoded.header.alg),
    )?;
    let claims = decoded.claims()?;
    check_claims(&claims, validation, now_secs)?;
    Ok(claims)
}

/// The signature check of a decoded token against `candidates` (the keys of its
/// algorithm): none is [`JwtError::UnsupportedAlgorithm`], none verifying
/// [`JwtError::BadSignature`].
fn check_signature<'k>(
    decoded: &Decoded<'_>,
    candidates: impl Iterator<Item = &'k Key>,
) -> Result<(), JwtError> {
    let mut candidates = candidates.peekable();
    if candidates.peek().is_none() {
        return Err(JwtError::UnsupportedAlgorithm(decoded.header.alg.clone()));
    }
    if !candidates.any(|k| k.verifies(decoded.signing_input.as_bytes(), &decoded.signature)) {
        return Err(JwtError::BadSignature);
    }
    Ok(())
}

/// A time claim (`exp`, `nbf`, `iat`) in whole seconds, if present and numeric.
pub fn time_claim(claims: &Claims, name: &str) -> Option<u64> {
    claims.get(name).and_then(Value::as_f64).map(|t| t as u64)
}

/// The `exp` and `nbf` checks of [`verify`] on their own, at time `now`
/// (for a token verified earlier, whose time claims were kept).
pub fn check_times(
    exp: Option<u64>,
    nbf: Option<u64>,
    v: &Validation,
    now: u64,
) -> Result<(), JwtError> {
    match exp {
        Some(exp) if now > exp.saturating_add(v.leeway_secs) => return Err(JwtError::Expired),
        None if v.require_exp => return Err(JwtError::Expired),
        _ => {}
    }
    if nbf.is_some_and(|nbf| nbf > now.saturating_add(v.leeway_secs)) {
        return Err(JwtError::NotYetValid);
    }
    Ok(())
}

fn check_claims(claims: &Claims, v: &Validation, now: u64) -> Result<(), JwtError> {
    check_registered(
        time_claim(claims, "exp"),
        time_claim(claims, "nbf"),
        claims.get("iss"),
        claims.get("aud"),
        v,
        now,
    )
}

/// The claim checks of [`verify`], on the registered claims' values.
fn check_registered(
    exp: Option<u64>,
    nbf: Option<u64>,
    iss: Option<&Value>,
    aud: Option<&Value>,
    v: &Validation,
    now: u64,
) -> Result<(), JwtError> {
    check_times(exp, nbf, v, now)?;
    if let Some(wanted) = &v.issuer
        && !iss
            .and_then(Value::as_str)
            .is_some_and(|iss| same(iss, wanted))
    {
        return Err(JwtError::WrongIssuer);
    }
    if let Some(wanted) = &v.audience {
        let is_wanted = |a: &Value| a.as_str().is_some_and(|a| same(a, wanted));
        let ok = match aud {
            Some(Value::Array(list)) => list.iter().any(is_wanted),
            Some(one) => is_wanted(one),
            None => false,
        };
        if !ok {
            return Err(JwtError::WrongAudience);
        }
    }
    Ok(())
}

/// A claim as text: strings as-is, numbers and booleans formatted, other
/// JSON compactly serialised. `None` when absent or null.
pub fn claim_str(claims: &Claims, name: &str) -> Option<String> {
    value_str(claims.get(name)?)
}

/// A claim's value as text, per [`claim_str`].
fn value_str(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// [`value_str`] of a value the caller gives up.
fn into_text(value: Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s),
        other => value_str(&other),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const RSA_PRIVATE: &str = include_str!("../testdata/rsa_private.pem");
    const RSA_PUBLIC: &str = include_str!("../testdata/rsa_public.pem");
    const EC_PRIVATE: &str = include_str!("../testdata/ec_private.pem");
    const EC_PUBLIC: &str = include_str!("../testdata/ec_public.pem");

    fn all_keys() -> Vec<Key> {
        vec![
            Key::hs256(b"s3cret").unwrap(),
            Key::rs256_pem(RSA_PUBLIC).unwrap(),
            Key::es256_pem(EC_PUBLIC).unwrap(),
        ]
    }

    #[test]
    fn each_algorithm_round_trips() {
        let claims = json!({"sub": "alice", "exp": 2_000, "n": 7});
        let tokens = [
            mint::hs256(&claims, b"s3cret"),
            mint::rs256(&claims, RSA_PRIVATE).unwrap(),
            mint::es256(&claims, EC_PRIVATE).unwrap(),
        ];
        for token in tokens {
            let got = verify(&token, &all_keys(), &Validation::default(), 1_000).unwrap();
            assert_eq!(claim_str(&got, "sub").as_deref(), Some("alice"));
            assert_eq!(claim_str(&got, "n").as_deref(), Some("7"));
        }
    }

    #[test]
    fn tampering_and_wrong_keys_fail() {
        let token = mint::hs256(&json!({"sub": "alice"}), b"s3cret");
        let keys = [Key::hs256(b"other").unwrap()];
        assert_eq!(
            verify(&token, &keys, &Validation::default(), 0),
            Err(JwtError::BadSignature)
        );
        let forged = mint::hs256(&json!({"sub": "mallory"}), b"s3cret");
        let (_, sig) = token.rsplit_once('.').unwrap();
        let (body, _) = forged.rsplit_once('.').unwrap();
        let spliced = format!("{body}.{sig}");
        let keys = all_keys();
        assert_eq!(
            verify(&spliced, &keys, &Validation::default(), 0),
            Err(JwtError::BadSignature)
        );
        let es_only = [Key::es256_pem(EC_PUBLIC).unwrap()];
        assert!(matches!(
            verify(&token, &es_only, &Validation::default(), 0),
            Err(JwtError::UnsupportedAlgorithm(a)) if a == "HS256"
        ));
        assert_eq!(
            verify("a.b", &keys, &Validation::default(), 0).unwrap_err(),
            JwtError::Malformed
        );
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode("{}")
        );
        assert!(matches!(
            verify(&none_alg, &keys, &Validation::default(), 0),
            Err(JwtError::UnsupportedAlgorithm(_))
        ));
    }

    #[test]
    fn time_and_audience_claims() {
        let key = [Key::hs256(b"k").unwrap()];
        let v = Validation {
            issuer: Some("https://issuer".into()),
            audience: Some("sluice".into()),
            leeway_secs: 30,
            require_exp: true,
        };
        let tok = |c: Value| mint::hs256(&c, b"k");
        let good =
            json!({"iss": "https://issuer", "aud": ["x", "sluice"], "exp": 1_000, "nbf": 500});
        assert!(
            verify(&tok(good.clone()), &key, &v, 1_020).is_ok(),
            "within leeway"
        );
        assert_eq!(
            verify(&tok(good.clone()), &key, &v, 1_031),
            Err(JwtError::Expired)
        );
        assert_eq!(
            verify(&tok(good), &key, &v, 469),
            Err(JwtError::NotYetValid)
        );
        let no_exp = json!({"iss": "https://issuer", "aud": "sluice"});
        assert_eq!(verify(&tok(no_exp), &key, &v, 0), Err(JwtError::Expired));
        let bad_iss = json!({"iss": "evil", "aud": "sluice", "exp": 10});
        assert_eq!(
            verify(&tok(bad_iss), &key, &v, 0),
            Err(JwtError::WrongIssuer)
        );
        let bad_aud = json!({"iss": "https://issuer", "aud": "other", "exp": 10});
        assert_eq!(
            verify(&tok(bad_aud), &key, &v, 0),
            Err(JwtError::WrongAudience)
        );
    }

    #[test]
    fn peek_reads_one_claim_without_verifying() {
        let token = mint::hs256(
            &json!({"sub": "alice", "n": 7, "obj": {"sub": "inner"}, "nil": null, "esc\"k": "v"}),
            b"whatever",
        );
        assert_eq!(peek_claim(&token, "sub").as_deref(), Some("alice"));
        assert_eq!(peek_claim(&token, "n").as_deref(), Some("7"));
        assert_eq!(
            peek_claim(&token, "obj").as_deref(),
            Some(r#"{"sub":"inner"}"#)
        );
        assert_eq!(peek_claim(&token, "esc\"k").as_deref(), Some("v"));
        assert_eq!(peek_claim(&token, "nil"), None);
        assert_eq!(peek_claim(&token, "missing"), None);
        assert_eq!(peek_claim("not a token", "sub"), None);
        assert_eq!(peek_claim("a.!!!.c", "sub"), None);
        let array = format!("x.{}.y", URL_SAFE_NO_PAD.encode("[1]"));
        assert_eq!(peek_claim(&array, "sub"), None);
    }

    #[test]
    fn picking_agrees_with_the_claims_map() {
        let keys = jwks::KeySet::from_keys(vec![Key::hs256(b"k").unwrap()]);
        let v = Validation {
            issuer: Some("iss".into()),
            audience: Some("sluice".into()),
            leeway_secs: 0,
            require_exp: true,
        };
        let wanted = ["sub", "n", "iss", "obj", "nil", "missing", "sub"];
        let payloads = [
            json!({"sub": "alice", "iss": "iss", "aud": "sluice", "exp": 100, "n": 7.5}),
            json!({"sub": "a", "iss": "iss", "aud": ["x", "sluice"], "exp": 100, "nbf": 10, "obj": {"k": [1]}, "nil": null}),
            json!({"iss": "iss", "aud": "sluice", "exp": "100"}),
            json!({"iss": "other", "aud": "sluice", "exp": 100}),
            json!({"iss": "iss", "aud": ["x"], "exp": 100}),
            json!({"iss": "iss", "aud": "sluice", "exp": 100, "nbf": 60}),
            json!({"iss": "iss", "aud": "sluice", "exp": 40}),
            json!({"iss": "iss", "aud": "sluice", "exp": 100, "sub\u{0}": 1, "s\"ub": 2}),
        ];
        for payload in payloads {
            let token = mint::hs256(&payload, b"k");
            let full = keys.verify(&token, &v, 50);
            let picked = keys.verify_picking(&token, &v, 50, &wanted);
            match (full, picked) {
                (Ok(claims), Ok(picked)) => {
                    assert_eq!(picked.exp, time_claim(&claims, "exp"), "{payload}");
                    assert_eq!(picked.nbf, time_claim(&claims, "nbf"), "{payload}");
                    let each: Vec<_> = wanted.iter().map(|w| claim_str(&claims, w)).collect();
                    assert_eq!(picked.values, each, "{payload}");
                }
                (full, picked) => assert_eq!(full.err(), picked.err(), "{payload}"),
            }
        }
        let repeated = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"sub":"first","sub":"last"}"#)
        );
        let decoded = decode(&repeated).unwrap();
        assert_eq!(
            decoded.pick(&["sub"]).unwrap().values,
            vec![claim_str(&decoded.claims().unwrap(), "sub")]
        );
        let not_object = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256"}"#),
            URL_SAFE_NO_PAD.encode("[1]")
        );
        assert_eq!(
            decode(&not_object).unwrap().pick(&["sub"]),
            Err(JwtError::Malformed)
        );
    }

    #[test]
    fn bad_pem_is_a_clear_error() {
        assert!(Key::rs256_pem("nope").unwrap_err().contains("RS256"));
        assert!(Key::es256_pem(RSA_PUBLIC).unwrap_err().contains("ES256"));
        let err = Key::es256_pem(EC_PRIVATE).unwrap_err();
        assert!(err.contains("not a PEM PUBLIC KEY block"), "{err}");
        let broken = EC_PUBLIC.replace('A', "!");
        let err = Key::es256_pem(&broken).unwrap_err();
        assert!(err.contains("base64"), "{err}");
    }

    #[test]
    fn a_pem_key_may_be_indented_as_in_a_toml_string() {
        let indented: String = EC_PUBLIC.lines().map(|l| format!("    {l}\n")).collect();
        let token = mint::es256(&json!({"sub": "alice"}), EC_PRIVATE).unwrap();
        let key = Key::es256_pem(&indented).unwrap();
        assert!(verify(&token, &[key], &Validation::default(), 0).is_ok());
    }
}
