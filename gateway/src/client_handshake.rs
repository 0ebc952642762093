//! Client handshake stage: decides whether a client's request is a valid WebSocket
//! upgrade (RFC 6455 §4.2.1), a plain request, or a malformed upgrade that gets a 4xx.
//! The upstream side of the handshake is `upstream_handshake`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::header::{self, HeaderName};
use http::{Method, StatusCode, Version};
use sha1::{Digest, Sha1};

use crate::head::HeaderFields;
use crate::headers::{is_named, value_has_token};

/// What the client asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// No WebSocket upgrade: proxy as a plain request (any other `Upgrade`, such as `h2c`,
    /// is dropped with the hop-by-hop headers and never tunneled).
    None,
    /// A valid WebSocket handshake; the `Sec-WebSocket-Key` as sent.
    WebSocket {
        /// The client's key, forwarded unchanged so the server's accept value matches.
        key: String,
    },
    /// A WebSocket upgrade that must be refused with this status and reason.
    Refused(Refusal),
}

/// A refused WebSocket handshake.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    /// 400 or 426.
    pub status: StatusCode,
    /// One line saying what was wrong.
    pub reason: &'static str,
}

/// The WebSocket version Sluice speaks.
pub const WS_VERSION: &str = "13";

/// Classifies a request head, in one pass over its fields.
pub fn classify(method: &Method, version: Version, fields: &impl HeaderFields) -> Upgrade {
    let (mut websocket, mut connection_upgrade) = (false, false);
    let (mut versions, mut keys) = (Once::None, Once::None);
    for (name, value) in fields.each() {
        if is_named(name, &header::UPGRADE) {
            websocket |= value_has_token(value, "websocket");
        } else if is_named(name, &header::CONNECTION) {
            connection_upgrade |= value_has_token(value, "upgrade");
        } else if is_named(name, &header::SEC_WEBSOCKET_VERSION) {
            versions.see(value);
        } else if is_named(name, &header::SEC_WEBSOCKET_KEY) {
            keys.see(value);
        }
    }
    if !websocket {
        return Upgrade::None;
    }
    let refuse = |status, reason| Upgrade::Refused(Refusal { status, reason });
    if method != Method::GET {
        return refuse(StatusCode::BAD_REQUEST, "a WebSocket upgrade must use GET");
    }
    if version != Version::HTTP_11 {
        return refuse(
            StatusCode::BAD_REQUEST,
            "a WebSocket upgrade needs HTTP/1.1",
        );
    }
    if !connection_upgrade {
        return refuse(StatusCode::BAD_REQUEST, "missing `Connection: upgrade`");
    }
    match versions {
        Once::None => return refuse(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Version"),
        Once::One(v) if v == WS_VERSION.as_bytes() => {}
        _ => {
            return refuse(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported Sec-WebSocket-Version",
            );
        }
    }
    let Once::One(key) = keys else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "missing or repeated Sec-WebSocket-Key",
        );
    };
    // 24 base64 characters decode to at most 18 bytes; a valid key is exactly 16.
    let mut raw = [0u8; 18];
    let valid = key.len() == 24 && STANDARD.decode_slice(key, &mut raw).is_ok_and(|n| n == 16);
    if !valid {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key must be base64 of 16 bytes",
        );
    }
    Upgrade::WebSocket {
        // Valid base64 is ASCII, so this is never empty.
        key: std::str::from_utf8(key).unwrap_or_default().to_owned(),
    }
}

/// Classifies an HTTP/2 request: an extended CONNECT with `:protocol = websocket` and
/// `sec-websocket-version: 13` (RFC 8441 §4) is a WebSocket, for which a fresh key is
/// minted (the upstream hop is an HTTP/1.1 upgrade, and its `Sec-WebSocket-Accept` is
/// checked against this key). A CONNECT for anything else is refused with 501 (RFC 9220
/// §3: the gateway tunnels only WebSockets); any other request is plain. h2 itself resets
/// a stream with `:protocol` on another method, or an extended CONNECT without `:path` or
/// `:scheme`.
pub fn classify_h2(method: &Method, protocol: Option<&str>, fields: &impl HeaderFields) -> Upgrade {
    let refuse = |status, reason| Upgrade::Refused(Refusal { status, reason });
    if method != Method::CONNECT {
        return Upgrade::None;
    }
    if !protocol.is_some_and(|p| p.eq_ignore_ascii_case("websocket")) {
        return refuse(
            StatusCode::NOT_IMPLEMENTED,
            "CONNECT here carries only `:protocol = websocket`",
        );
    }
    let mut versions = Once::None;
    for value in fields.values_of(header::SEC_WEBSOCKET_VERSION.as_str()) {
        versions.see(value);
    }
    match versions {
        Once::None => refuse(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Version"),
        Once::One(v) if v == WS_VERSION.as_bytes() => Upgrade::WebSocket { key: mint_key() },
        _ => refuse(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported Sec-WebSocket-Version",
        ),
    }
}

/// A fresh `Sec-WebSocket-Key`: base64 of 16 random bytes (RFC 6455 §4.1), from the
/// TLS crypto provider's generator.
fn mint_key() -> String {
    let mut nonce = [0u8; 16];
    if crate::config::crypto_provider()
        .secure_random
        .fill(&mut nonce)
        .is_err()
    {
        // Never seen; a key needs to be unpredictable to no one, only well-formed.
        nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes();
    }
    STANDARD.encode(nonce)
}

/// How many fields of one name a head has: none, one (with its value), or more.
enum Once<'a> {
    None,
    One(&'a [u8]),
    Many,
}

impl<'a> Once<'a> {
    fn see(&mut self, value: &'a [u8]) {
        *self = match self {
            Once::None => Once::One(value),
            _ => Once::Many,
        };
    }
}

/// The `Sec-WebSocket-Accept` value a server must answer for `key`.
pub fn accept_for(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    STANDARD.encode(sha.finalize())
}

/// Headers a refusal carries (426 must say which version we speak).
pub fn refusal_headers(r: &Refusal) -> Vec<(HeaderName, &'static str)> {
    if r.status == StatusCode::UPGRADE_REQUIRED {
        vec![
            (header::SEC_WEBSOCKET_VERSION, WS_VERSION),
            (header::CONNECTION, "close"),
        ]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::RawFields;
    use http::HeaderMap;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    const GOOD: [(&str, &str); 4] = [
        ("upgrade", "websocket"),
        ("connection", "keep-alive, Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn accepts_a_valid_handshake() {
        let up = classify(&Method::GET, Version::HTTP_11, &headers(&GOOD));
        assert_eq!(
            up,
            Upgrade::WebSocket {
                key: "dGhlIHNhbXBsZSBub25jZQ==".into()
            }
        );
        // RFC 6455's own example.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn raw_fields_and_a_map_classify_alike() {
        let with = |extra: &[(&str, &str)], drop: &str| -> Vec<(String, String)> {
            GOOD.iter()
                .filter(|(n, _)| *n != drop)
                .chain(extra)
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        let cases = [
            with(&[], ""),
            with(&[("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")], ""),
            with(&[("sec-websocket-version", "13")], ""),
            with(&[], "sec-websocket-version"),
            with(&[("Connection", "Upgrade")], "connection"),
            with(
                &[("Connection", "keep-alive"), ("CONNECTION", "upgrade")],
                "connection",
            ),
            with(&[("Upgrade", "h2c"), ("UPGRADE", "WebSocket")], "upgrade"),
            with(&[("Upgrade", "h2c")], "upgrade"),
        ];
        for fields in cases {
            let mut head = String::from("GET / HTTP/1.1\r\n");
            for (n, v) in &fields {
                head.push_str(&format!("{n}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let pairs: Vec<(&str, &str)> = fields
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let raw = RawFields::of_request(&head);
            assert_eq!(
                classify(&Method::GET, Version::HTTP_11, &raw),
                classify(&Method::GET, Version::HTTP_11, &headers(&pairs)),
                "{head}"
            );
        }
        let repeated = RawFields::of_request(
            "GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
             sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        );
        assert!(matches!(
            classify(&Method::GET, Version::HTTP_11, &repeated),
            Upgrade::Refused(Refusal {
                status: StatusCode::BAD_REQUEST,
                ..
            })
        ));
    }

    #[test]
    fn refuses_malformed_handshakes() {
        let status =
            |m: Method, h: &[(&str, &str)]| match classify(&m, Version::HTTP_11, &headers(h)) {
                Upgrade::Refused(r) => Some(r.status.as_u16()),
                _ => None,
            };
        let mut bad_key = GOOD;
        bad_key[3].1 = "c2hvcnQ=";
        assert_eq!(status(Method::GET, &bad_key), Some(400));
        assert_eq!(status(Method::GET, &GOOD[..3]), Some(400));
        let mut v8 = GOOD;
        v8[2].1 = "8";
        assert_eq!(status(Method::GET, &v8), Some(426));
        assert_eq!(status(Method::POST, &GOOD), Some(400));
        assert_eq!(
            classify(
                &Method::GET,
                Version::HTTP_11,
                &headers(&[("upgrade", "h2c"), ("connection", "upgrade")])
            ),
            Upgrade::None
        );
    }
}
