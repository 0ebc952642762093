//! Header hygiene shared by the upgrade and plain-request paths: hop-by-hop stripping and
//! the `X-Forwarded-*` headers.

use std::net::SocketAddr;

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1, plus the legacy ones
/// proxies still see).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` is one of the standard hop-by-hop headers.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Removes hop-by-hop headers and every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = tokens(headers, header::CONNECTION)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The trimmed, non-empty entries of a comma-separated header, over all its lines.
pub fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|v| value_tokens(v.as_bytes()))
}

/// The trimmed, non-empty entries of one comma-separated header line; none when the line
/// is not all visible ASCII (what `HeaderValue::to_str` accepts).
fn value_tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value)
        .ok()
        .filter(|v| v.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)))
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Whether a comma-separated header contains `token` (case-insensitive).
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// Whether one raw header line (comma-separated) contains `token` (case-insensitive),
/// as [`has_token`] decides for a header map.
pub fn value_has_token(value: &[u8], token: &str) -> bool {
    value_tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

/// A header map from the fields `httparse` parsed; `Err` says which part of a field is
/// invalid.
pub fn from_parsed(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, &'static str> {
    let mut headers = HeaderMap::with_capacity(fields.len());
    for h in fields {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| "bad header name")?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| "bad header value")?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Appends the client to `X-Forwarded-For` (keeping what earlier proxies wrote, merged
/// into one header) and sets `X-Forwarded-Proto` and `X-Forwarded-Host`, replacing any
/// client-sent values of those two.
pub fn add_forwarded(headers: &mut HeaderMap, client: SocketAddr, proto: &'static str) {
    let xff = HeaderName::from_static("x-forwarded-for");
    let mut chain: Vec<String> = headers
        .get_all(&xff)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    chain.push(client.ip().to_string());
    if let Ok(v) = HeaderValue::from_str(&chain.join(", ")) {
        headers.insert(xff, v);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(proto),
    );
    let xfh = HeaderName::from_static("x-forwarded-host");
    match headers.get(header::HOST).cloned() {
        Some(host) => {
            headers.insert(xfh, host);
        }
        None => {
            headers.remove(xfh);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_listed_and_standard_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, X-Secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn raw_values_have_the_tokens_a_header_map_has() {
        for (value, expected) in [
            (&b"keep-alive, Upgrade"[..], true),
            (b" websocket ,x", false),
            (b"UPGRADE", true),
            (b"upgrade\xff", false),
            (b"upgrade, \xff", false),
            (b"", false),
        ] {
            assert_eq!(value_has_token(value, "upgrade"), expected, "{value:?}");
            let mut h = HeaderMap::new();
            h.insert("connection", HeaderValue::from_bytes(value).unwrap());
            assert_eq!(
                has_token(&h, header::CONNECTION, "upgrade"),
                expected,
                "{value:?}"
            );
        }
    }

    #[test]
    fn xff_is_appended_not_replaced() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "1.2.3.4".parse().unwrap());
        h.append("x-forwarded-for", "5.6.7.8".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.insert("host", "example.com".parse().unwrap());
        add_forwarded(&mut h, "127.0.0.1:5000".parse().unwrap(), "http");
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 5.6.7.8, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
    }
}
