//! Minting tokens, for tests and examples (the gateway never signs).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::{SignatureEncoding as _, Signer as _};
use p256::pkcs8::DecodePrivateKey as _;
use serde_json::Value;
use sha2::Sha256;

fn signing_input(alg: &str, claims: &Value) -> String {
    let header = serde_json::json!({"alg": alg, "typ": "JWT"});
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn finish(input: String, signature: &[u8]) -> String {
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// Sign `claims` with an HMAC-SHA256 secret.
pub fn hs256(claims: &Value, secret: &[u8]) -> String {
    let input = signing_input("HS256", claims);
    let mac = Hmac::<Sha256>::new_from_slice(secret)
        .expect("HMAC accepts any key length")
        .chain_update(input.as_bytes())
        .finalize()
        .into_bytes();
    finish(input, &mac)
}

/// Sign `claims` with an RSA private key (PEM `PRIVATE KEY`, PKCS#8).
pub fn rs256(claims: &Value, private_pem: &str) -> Result<String, String> {
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(private_pem).map_err(|e| e.to_string())?;
    let input = signing_input("RS256", claims);
    let sig = rsa::pkcs1v15::SigningKey::<Sha256>::new(key).sign(input.as_bytes());
    Ok(finish(input, &sig.to_vec()))
}

/// Sign `claims` with a P-256 private key (PEM `PRIVATE KEY`, PKCS#8).
pub fn es256(claims: &Value, private_pem: &str) -> Result<String, String> {
    let key = p256::ecdsa::SigningKey::from_pkcs8_pem(private_pem).map_err(|e| e.to_string())?;
    let input = signing_input("ES256", claims);
    let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
    Ok(finish(input, &sig.to_bytes()))
}

fn signing_input_kid(alg: &str, kid: &str, claims: &Value) -> String {
    let header = serde_json::json!({"alg": alg, "typ": "JWT", "kid": kid});
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// [`rs256`] with a `kid` header naming the key.
pub fn rs256_kid(claims: &Value, private_pem: &str, kid: &str) -> Result<String, String> {
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(private_pem).map_err(|e| e.to_string())?;
    let input = signing_input_kid("RS256", kid, claims);
    let sig = rsa::pkcs1v15::SigningKey::<Sha256>::new(key).sign(input.as_bytes());
    Ok(finish(input, &sig.to_vec()))
}

/// [`es256`] with a `kid` header naming the key.
pub fn es256_kid(claims: &Value, private_pem: &str, kid: &str) -> Result<String, String> {
    let key = p256::ecdsa::SigningKey::from_pkcs8_pem(private_pem).map_err(|e| e.to_string())?;
    let input = signing_input_kid("ES256", kid, claims);
    let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
    Ok(finish(input, &sig.to_bytes()))
}

/// The JWK (as a JWKS lists it) of a PEM `PUBLIC KEY`, RSA or P-256, under `kid`.
pub fn jwk(public_pem: &str, kid: &str) -> Result<Value, String> {
    use p256::pkcs8::DecodePublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
    if let Ok(key) = p256::PublicKey::from_public_key_pem(public_pem) {
        let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&key, false);
        let (x, y) = (point.x().ok_or("no x")?, point.y().ok_or("no y")?);
        return Ok(serde_json::json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64(x), "y": b64(y),
        }));
    }
    let key = rsa::RsaPublicKey::from_public_key_pem(public_pem).map_err(|e| e.to_string())?;
    Ok(serde_json::json!({
        "kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
        "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be()),
    }))
}

/// A JWKS document listing the [`jwk`] of each `(public_pem, kid)`.
pub fn jwks(keys: &[(&str, &str)]) -> Result<Value, String> {
    let keys = keys
        .iter()
        .map(|(pem, kid)| jwk(pem, kid))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(serde_json::json!({ "keys": keys }))
}
