//! Small matchers plugins share: host names with wildcard subdomains, origins.

/// Whether `host` matches `pattern`, ASCII case-insensitively. A pattern
/// `*.example.com` matches any subdomain at any depth (`a.example.com`,
/// `a.b.example.com`) but not `example.com` itself; any other pattern must
/// match exactly.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                && eq_ignore_case(&host[host.len() - suffix.len()..], suffix)
        }
        None => eq_ignore_case(pattern, host),
    }
}

/// Whether `a` and `b` are the same bytes, compared eight bytes at a time. `==` on
/// strings calls `memcmp`, which WebAssembly's C library runs a byte per loop, some 20
/// instructions a byte; a plugin compares names, claims and tokens many times per
/// request.
pub fn same(a: impl AsRef<[u8]>, b: impl AsRef<[u8]>) -> bool {
    by_words(a.as_ref(), b.as_ref(), |_, _| false, |x, y| x == y)
}

/// Whether `a` and `b` are equal, ASCII case-insensitively: eight bytes at a time
/// while they are equal as written (the usual case), byte by byte only in a word where
/// they differ. `str::eq_ignore_ascii_case` lowers every byte, some 8 instructions a
/// byte in a plugin.
pub(crate) fn eq_ignore_case(a: &str, b: &str) -> bool {
    by_words(
        a.as_bytes(),
        b.as_bytes(),
        |x, y| x.eq_ignore_ascii_case(y),
        |x, y| x.eq_ignore_ascii_case(&y),
    )
}

/// Whether `a` and `b` have the same length, each pair of their eight-byte words is
/// the same or `word` says it is equal, and each pair of the bytes after the last whole
/// words is equal by `byte`.
fn by_words(
    a: &[u8],
    b: &[u8],
    word: impl Fn(&[u8; 8], &[u8; 8]) -> bool,
    byte: impl Fn(u8, u8) -> bool,
) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let ((a8, a1), (b8, b1)) = (a.as_chunks::<8>(), b.as_chunks::<8>());
    a8.iter()
        .zip(b8)
        .all(|(x, y)| u64::from_ne_bytes(*x) == u64::from_ne_bytes(*y) || word(x, y))
        && a1.iter().zip(b1).all(|(x, y)| byte(*x, *y))
}

/// Whether a browser `Origin` (`scheme://host[:port]`) matches an allowed
/// origin pattern of the same shape, whose host may be `*.domain`. Scheme
/// and port must match exactly; `null` and malformed origins never match.
pub fn origin_matches(pattern: &str, origin: &str) -> bool {
    match (OriginPattern::parse(pattern), Origin::parse(origin)) {
        (Some(pattern), Some(origin)) => pattern.matches(&origin),
        _ => false,
    }
}

/// A browser `Origin` split into scheme, host and port (empty when absent), to be
/// matched against many [`OriginPattern`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    scheme: &'a str,
    host: &'a str,
    port: &'a str,
}

impl<'a> Origin<'a> {
    /// `scheme://host[:port]`, or `None` (`null`, a path, an empty host).
    pub fn parse(origin: &'a str) -> Option<Self> {
        // The first `:` ends the scheme (a scheme has none); found byte-wise, which is
        // far cheaper in a plugin than searching for the substring `://`.
        let colon = origin.find(':')?;
        let rest = origin[colon + 1..].strip_prefix("//")?;
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, p),
            _ => (rest, ""),
        };
        (!host.is_empty() && !host.contains('/')).then_some(Origin {
            scheme: &origin[..colon],
            host,
            port,
        })
    }
}

/// An allowed origin, parsed once: `scheme://host[:port]` whose host may be `*.domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: String,
    host: String,
    port: String,
}

impl OriginPattern {
    /// The pattern, or `None` when it is not shaped like an origin.
    pub fn parse(pattern: &str) -> Option<Self> {
        Origin::parse(pattern).map(|o| OriginPattern {
            scheme: o.scheme.to_owned(),
            host: o.host.to_owned(),
            port: o.port.to_owned(),
        })
    }

    /// Whether `origin` matches: the same scheme (ASCII case-insensitively) and port,
    /// and a host [`host_matches`] accepts.
    pub fn matches(&self, origin: &Origin<'_>) -> bool {
        eq_ignore_case(&self.scheme, origin.scheme)
            && self.port == origin.port
            && host_matches(&self.host, origin.host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_is_byte_equality() {
        let text = "https://auth.example/realms/one-two";
        for len in 0..text.len() {
            let a = &text[..len];
            assert!(same(a, a), "{a:?}");
            assert!(!same(a, &text[..len + 1]), "{a:?}");
            for i in 0..len {
                let mut b = a.as_bytes().to_vec();
                b[i] ^= 1;
                assert!(!same(a, &b), "{a:?} at {i}");
            }
        }
    }

    #[test]
    fn equal_ignoring_case_at_every_length() {
        for len in 0..20 {
            let lower: String = (0..len).map(|i| (b'a' + i as u8) as char).collect();
            assert!(eq_ignore_case(&lower, &lower));
            for at in 0..len {
                let mut upper = lower.clone().into_bytes();
                upper[at] = upper[at].to_ascii_uppercase();
                let upper = String::from_utf8(upper).unwrap();
                assert!(eq_ignore_case(&lower, &upper), "{upper}");
                let mut other = lower.clone().into_bytes();
                other[at] = b'-';
                let other = String::from_utf8(other).unwrap();
                assert!(!eq_ignore_case(&lower, &other), "{other}");
                assert!(!eq_ignore_case(&upper, &other), "{other}");
            }
            assert!(!eq_ignore_case(&lower, &format!("{lower}a")));
        }
    }

    #[test]
    fn wildcard_hosts() {
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(host_matches("*.example.com", "A.B.Example.COM"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "evilexample.com"));
        assert!(!host_matches("*.example.com", ".example.com"));
        assert!(host_matches("api.example.com", "API.example.com"));
        assert!(!host_matches("api.example.com", "api.example.com.evil"));
    }

    #[test]
    fn origins() {
        assert!(origin_matches(
            "https://app.example.com",
            "https://app.example.com"
        ));
        assert!(origin_matches(
            "https://*.example.com",
            "https://x.example.com"
        ));
        assert!(!origin_matches(
            "https://*.example.com",
            "http://x.example.com"
        ));
        assert!(!origin_matches(
            "https://*.example.com",
            "https://x.example.com:8443"
        ));
        assert!(origin_matches(
            "http://localhost:3000",
            "http://localhost:3000"
        ));
        assert!(!origin_matches(
            "http://localhost:3000",
            "http://localhost:3001"
        ));
        assert!(!origin_matches("https://app.example.com", "null"));
        assert_eq!(Origin::parse("a:b://x"), None, "a scheme has no colon");
        assert_eq!(Origin::parse("https://x:"), Origin::parse("https://x:"));
        assert!(OriginPattern::parse("https://").is_none());
        assert!(!origin_matches(
            "https://app.example.com",
            "https://app.example.com.evil.net"
        ));
    }
}
