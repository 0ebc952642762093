//! Header hygiene shared by the upgrade and plain-request paths: hop-by-hop stripping and
//! the `X-Forwarded-*` headers.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

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
    strip(headers, false);
}

/// Makes `headers` those of one WebSocket upgrade hop: [`strip_hop_by_hop`], then exactly
/// `Connection: Upgrade` and `Upgrade: websocket`. The pair is replaced in place rather
/// than removed and added again.
pub fn set_upgrade_hop(headers: &mut HeaderMap) {
    strip(headers, true);
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

/// Removes the hop-by-hop headers present and those named in `Connection`, except
/// `Connection` and `Upgrade` themselves when `keep_upgrade` (the caller overwrites them).
///
/// One pass over the names present decides, so nothing is parsed or hashed only to find
/// it absent. When `Connection` names only standard hop-by-hop headers (`Upgrade`,
/// `keep-alive`: the usual case) no name needs checking against it.
fn strip(headers: &mut HeaderMap, keep_upgrade: bool) {
    let connection = headers.get_all(header::CONNECTION);
    let names_others = connection.iter().any(|v| {
        let v = v.as_bytes();
        !tokenizable(v)
            || v.split(|&b| b == b',').any(|t| {
                let t = t.trim_ascii();
                !t.is_empty()
                    && !HOP_BY_HOP
                        .iter()
                        .any(|h| t.eq_ignore_ascii_case(h.as_bytes()))
            })
    });
    let doomed = |name: &HeaderName| {
        if keep_upgrade && (name == header::CONNECTION || name == header::UPGRADE) {
            return false;
        }
        is_hop_by_hop(name)
            || (names_others
                && connection
                    .iter()
                    .any(|v| value_has_token(v.as_bytes(), name.as_str())))
    };
    if !headers.keys().any(doomed) {
        return;
    }
    let doomed: Vec<HeaderName> = headers.keys().filter(|n| doomed(n)).cloned().collect();
    for name in doomed {
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

/// Whether a header line is all visible ASCII, spaces and tabs (what
/// `HeaderValue::to_str` accepts); a line that is not has no tokens.
fn tokenizable(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// The trimmed, non-empty entries of one comma-separated header line; none when the line
/// is not [`tokenizable`].
fn value_tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    Some(value)
        .filter(|v| tokenizable(v))
        .and_then(|v| std::str::from_utf8(v).ok())
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Whether a comma-separated header contains `token` (case-insensitive).
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| value_has_token(v.as_bytes(), token))
}

/// Whether one raw header line (comma-separated) contains `token` (case-insensitive),
/// as [`has_token`] decides for a header map. A byte scan, no UTF-8 decoding: a
/// tokenizable line is ASCII, where `trim_ascii` and `str::trim` agree.
pub fn value_has_token(value: &[u8], token: &str) -> bool {
    !token.is_empty()
        && tokenizable(value)
        && value
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// A header map from the fields `httparse` parsed; `Err` says which part of a field is
/// invalid. It has room for the few headers a proxy adds (a full map grows on any
/// insert, even of a name it has).
pub fn from_parsed(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, &'static str> {
    map_of(fields, |_| true)
}

/// The end-to-end fields among those `httparse` parsed: what [`strip_hop_by_hop`] would
/// leave of their map, without making one (hop-by-hop fields and those named in a
/// `Connection` field are skipped).
pub fn end_to_end<'a, 'h>(
    fields: &'a [httparse::Header<'h>],
) -> impl Iterator<Item = &'a httparse::Header<'h>> {
    let listed = move |name: &str| {
        fields.iter().any(|h| {
            h.name.eq_ignore_ascii_case(header::CONNECTION.as_str())
                && value_has_token(h.value, name)
        })
    };
    fields.iter().filter(move |h| {
        !HOP_BY_HOP.iter().any(|n| h.name.eq_ignore_ascii_case(n)) && !listed(h.name)
    })
}

/// The map of the fields `keep` accepts, with room for four more.
fn map_of(
    fields: &[httparse::Header<'_>],
    keep: impl Fn(&httparse::Header<'_>) -> bool,
) -> Result<HeaderMap, &'static str> {
    let mut headers = HeaderMap::with_capacity(fields.len() + 4);
    for h in fields.iter().filter(|h| keep(h)) {
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
    let mut chain = String::with_capacity(48);
    for v in headers.get_all(X_FORWARDED_FOR) {
        if let Ok(v) = v.to_str().map(str::trim)
            && !v.is_empty()
        {
            chain.push_str(v);
            chain.push_str(", ");
        }
    }
    push_ip(&mut chain, client.ip());
    // Both parts are valid header text, so this cannot fail; the value takes the String's
    // buffer without a copy.
    if let Ok(v) = HeaderValue::try_from(chain) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match headers.get(header::HOST).cloned() {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST, host);
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
}

/// Appends `ip` in its usual text form; IPv4 by hand (every upgrade writes one), IPv6
/// through `Display`.
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_listed_and_standard_hop_headers_whatever_the_case() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, X-Secret, x-ONE".parse().unwrap());
        h.append("connection", "X-Two".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        for name in ["x-secret", "x-one", "x-two", "keep-alive", "te", "x-kept"] {
            h.insert(name, "1".parse().unwrap());
        }
        h.insert("proxy-authorization", "Basic e30=".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
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
    fn client_ips_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.0.99.100",
            "::1",
            "2001:db8::7",
        ] {
            let mut out = String::new();
            push_ip(&mut out, ip.parse().unwrap());
            assert_eq!(out, ip);
        }
    }

    #[test]
    fn an_upgrade_hop_has_exactly_one_pair() {
        let mut h = HeaderMap::new();
        h.append(
            "connection",
            "keep-alive, Upgrade, X-Secret".parse().unwrap(),
        );
        h.append("connection", "close".parse().unwrap());
        h.append("upgrade", "websocket".parse().unwrap());
        h.append("upgrade", "h2c".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("sec-websocket-key", "k".parse().unwrap());
        set_upgrade_hop(&mut h);
        let mut names: Vec<_> = h
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "connection: Upgrade",
                "sec-websocket-key: k",
                "upgrade: websocket"
            ]
        );
    }

    #[test]
    fn end_to_end_fields_are_what_stripping_leaves() {
        let fields = [
            httparse::Header {
                name: "Connection",
                value: b"Upgrade, X-Hop",
            },
            httparse::Header {
                name: "Upgrade",
                value: b"websocket",
            },
            httparse::Header {
                name: "X-Hop",
                value: b"1",
            },
            httparse::Header {
                name: "Keep-Alive",
                value: b"timeout=5",
            },
            httparse::Header {
                name: "Sec-WebSocket-Accept",
                value: b"a",
            },
            httparse::Header {
                name: "Set-Cookie",
                value: b"x=1",
            },
            httparse::Header {
                name: "Set-Cookie",
                value: b"y=2",
            },
        ];
        let mut stripped = from_parsed(&fields).unwrap();
        strip_hop_by_hop(&mut stripped);
        let kept: Vec<httparse::Header<'_>> = end_to_end(&fields).copied().collect();
        assert_eq!(from_parsed(&kept).unwrap(), stripped);
        assert_eq!(stripped.len(), 3);
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
