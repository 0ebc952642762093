//! Client handshake stage: decides whether a request is a valid WebSocket upgrade
//! (RFC 6455 §4.2.1), a plain request, or a malformed upgrade that gets a 4xx.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::header::{self, HeaderName};
use http::{HeaderMap, Method, StatusCode, Version};
use sha1::{Digest, Sha1};

use crate::headers::has_token;

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

/// Classifies a request head.
pub fn classify(method: &Method, version: Version, headers: &HeaderMap) -> Upgrade {
    if !has_token(headers, header::UPGRADE, "websocket") {
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
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return refuse(StatusCode::BAD_REQUEST, "missing `Connection: upgrade`");
    }
    let mut versions = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (None, _) => return refuse(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Version"),
        (Some(v), None) if v == WS_VERSION => {}
        _ => {
            return refuse(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported Sec-WebSocket-Version",
            );
        }
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => k,
        _ => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "missing or repeated Sec-WebSocket-Key",
            );
        }
    };
    // 24 base64 characters decode to at most 18 bytes; a valid key is exactly 16.
    let mut raw = [0u8; 18];
    let valid = key.len() == 24
        && STANDARD
            .decode_slice(key.as_bytes(), &mut raw)
            .is_ok_and(|n| n == 16);
    if !valid {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key must be base64 of 16 bytes",
        );
    }
    Upgrade::WebSocket {
        key: key.to_str().unwrap_or_default().to_string(),
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
