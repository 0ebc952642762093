//! Typed accessors on [`Request`].

use std::borrow::Cow;

use crate::{Request, RequestKind};

impl Request {
    /// The method (`GET`, …). Needs [`Fields::METHOD`](crate::Fields).
    pub fn method(&self) -> &str {
        declared(self.method.as_deref(), "method", "METHOD")
    }

    /// `http` or `https`. Needs `Fields::SCHEME`.
    pub fn scheme(&self) -> &str {
        declared(self.scheme.as_deref(), "scheme", "SCHEME")
    }

    /// Host and optional port. Needs `Fields::AUTHORITY`.
    pub fn authority(&self) -> &str {
        declared(self.authority.as_deref(), "authority", "AUTHORITY")
    }

    /// The path without the query, normalised as the gateway's routing matched it (`.`
    /// and `..` resolved, `//` collapsed, escaped unreserved characters decoded).
    /// Needs `Fields::PATH`.
    pub fn path(&self) -> &str {
        declared(self.path.as_deref(), "path", "PATH")
    }

    /// The raw query string without `?`; `""` when absent. Needs `Fields::QUERY`.
    pub fn query_string(&self) -> &str {
        declared(self.query.as_deref(), "query", "QUERY")
    }

    /// The client's `ip:port`. Needs `Fields::CLIENT_ADDR`.
    pub fn client_addr(&self) -> &str {
        declared(self.client_addr.as_deref(), "client address", "CLIENT_ADDR")
    }

    /// The client's IP address without the port (`10.0.0.7`, `::1`). Needs
    /// `Fields::CLIENT_IP`.
    pub fn client_ip(&self) -> &str {
        declared(self.client_ip.as_deref(), "client IP", "CLIENT_IP")
    }

    /// The matched route's name. Needs `Fields::ROUTE`.
    pub fn route(&self) -> &str {
        declared(self.route.as_deref(), "route", "ROUTE")
    }

    /// The subprotocols the client offered. Needs `Fields::SUBPROTOCOLS`.
    pub fn subprotocols(&self) -> &[String] {
        declared(self.subprotocols.as_deref(), "subprotocols", "SUBPROTOCOLS")
    }

    /// First value of a header; `name` is matched case-insensitively. A header the
    /// plugin's `request_headers()` does not name panics, naming it.
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::check_header(name);
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    /// Every value of a header, in arrival order (declared as for [`Request::header`]).
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        crate::check_header(name);
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    /// Value of a cookie from the `Cookie` header(s), if present.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.header_values("cookie")
            .flat_map(|line| line.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.trim_matches('"'))
    }

    /// First value of a query parameter, percent-decoded (`+` is a space).
    pub fn query(&self, name: &str) -> Option<Cow<'_, str>> {
        self.query_string()
            .split('&')
            .filter_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(k) == name).then(|| percent_decode(v))
            })
            .next()
    }

    /// The token of an `Authorization: Bearer …` header.
    pub fn bearer_token(&self) -> Option<&str> {
        let value = self.header("authorization")?.trim();
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty())
    }

    /// The host part of the authority, without port, lower-case as sent. Needs
    /// `Fields::AUTHORITY`.
    pub fn host(&self) -> &str {
        let authority = self.authority();
        if let Some(rest) = authority.strip_prefix('[') {
            // IPv6 literal: `[::1]:8080`.
            return rest.split(']').next().unwrap_or(rest);
        }
        authority.split(':').next().unwrap_or(authority)
    }

    /// Whether this is a WebSocket upgrade (as opposed to a plain request).
    pub fn is_websocket(&self) -> bool {
        self.kind == RequestKind::Websocket
    }
}

/// A field's value, or a panic naming the flag the plugin did not declare: a field
/// left out of `request_fields()` arrives as `None`, and reading it as empty would
/// misjudge the request silently (a rule on `/admin` allowing everything).
fn declared<'a, T: ?Sized>(value: Option<&'a T>, field: &str, flag: &str) -> &'a T {
    match value {
        Some(v) => v,
        None => panic!(
            "the plugin reads the request's {field}, which its request_fields() leaves \
             out: add Fields::{flag}"
        ),
    }
}

/// Decode `%XX` escapes and `+`; invalid escapes are kept as written.
fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use crate::testing::request;

    #[test]
    fn headers_are_case_insensitive_and_repeatable() {
        let req = request()
            .header("X-Api-Key", "a")
            .header("x-api-key", "b")
            .build();
        assert_eq!(req.header("x-api-key"), Some("a"));
        assert_eq!(
            req.header_values("X-API-KEY").collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(req.header("missing"), None);
    }

    #[test]
    fn cookies_across_headers() {
        let req = request()
            .header("cookie", "a=1; session=\"xyz\"")
            .header("cookie", "b=2")
            .build();
        assert_eq!(req.cookie("session"), Some("xyz"));
        assert_eq!(req.cookie("b"), Some("2"));
        assert_eq!(req.cookie("c"), None);
    }

    #[test]
    fn query_is_decoded() {
        let req = request()
            .path("/ws?token=a%2Bb%20c&x=1+2&flag&bad=%zz%4")
            .build();
        assert_eq!(req.query("token").as_deref(), Some("a+b c"));
        assert_eq!(req.query("x").as_deref(), Some("1 2"));
        assert_eq!(req.query("flag").as_deref(), Some(""));
        assert_eq!(req.query("bad").as_deref(), Some("%zz%4"));
        assert_eq!(req.query("nope"), None);
    }

    #[test]
    fn bearer_and_host() {
        let req = request()
            .authority("API.example.com:8443")
            .header("authorization", "Bearer  abc ")
            .build();
        assert_eq!(req.bearer_token(), Some("abc"));
        assert_eq!(req.host(), "API.example.com");
        assert_eq!(request().authority("[::1]:80").build().host(), "::1");
        let basic = request().header("authorization", "Basic eA==").build();
        assert_eq!(basic.bearer_token(), None);
    }
}
