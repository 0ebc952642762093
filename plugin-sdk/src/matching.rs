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
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// Whether a browser `Origin` (`scheme://host[:port]`) matches an allowed
/// origin pattern of the same shape, whose host may be `*.domain`. Scheme
/// and port must match exactly; `null` and malformed origins never match.
pub fn origin_matches(pattern: &str, origin: &str) -> bool {
    fn split(o: &str) -> Option<(&str, &str, &str)> {
        let (scheme, rest) = o.split_once("://")?;
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, p),
            _ => (rest, ""),
        };
        (!host.is_empty() && !host.contains('/')).then_some((scheme, host, port))
    }
    match (split(pattern), split(origin)) {
        (Some((ps, ph, pp)), Some((os, oh, op))) => {
            ps.eq_ignore_ascii_case(os) && pp == op && host_matches(ph, oh)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(!origin_matches(
            "https://app.example.com",
            "https://app.example.com.evil.net"
        ));
    }
}
