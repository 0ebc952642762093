//! [`Request`]: what the gateway shows a plugin of a request, and its typed accessors.

use std::borrow::Cow;

use crate::bindings::sluice::plugin::types as wire;
use crate::{Fields, RequestKind};

/// The text fields, in the order the WIT's `request.text` holds them.
pub(crate) const TEXT_FIELDS: [Fields; 9] = [
    Fields::METHOD,
    Fields::SCHEME,
    Fields::AUTHORITY,
    Fields::PATH,
    Fields::QUERY,
    Fields::CLIENT_ADDR,
    Fields::CLIENT_IP,
    Fields::ROUTE,
    Fields::TENANT,
];

/// A request as the gateway shows it to the plugin: the fields and headers the plugin
/// declared it reads ([`Plugin::request_fields`](crate::Plugin::request_fields),
/// [`Plugin::request_headers`](crate::Plugin::request_headers)), read through the
/// accessors below. Reading an undeclared field or header panics, naming the
/// declaration to add.
///
/// It keeps the text the gateway handed over in one piece (the WIT's `request`) and
/// slices it: nothing is copied per field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    kind: RequestKind,
    fields: Fields,
    tls_on: bool,
    cert_names: u32,
    subprotocols: u32,
    headers: u32,
    /// The index of the first subprotocol part, and of the first header name part.
    subprotocols_at: u32,
    headers_at: u32,
    text: String,
    /// Where each part of `text` ends (the offset of its NUL); the next starts one byte
    /// later.
    ends: Vec<u32>,
}

/// What the plugin was told of the client's TLS session ([`Request::tls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls<'a> {
    /// The server name the client asked for (SNI), if it sent one.
    pub sni: Option<&'a str>,
    /// The negotiated ALPN protocol (`h2`, `http/1.1`), if one was.
    pub alpn: Option<&'a str>,
    /// The subject of the verified client certificate, under mutual TLS.
    pub client_cert_subject: Option<&'a str>,
    /// The DNS names of the verified client certificate.
    pub client_cert_names: Vec<&'a str>,
}

impl From<wire::Request> for Request {
    fn from(w: wire::Request) -> Self {
        let texts = TEXT_FIELDS
            .iter()
            .filter(|&&f| w.fields.contains(f))
            .count();
        let tls = match w.tls_on && w.fields.contains(Fields::TLS) {
            true => w.cert_names.saturating_add(3),
            false => 0,
        };
        let subprotocols_at = (texts as u32).saturating_add(tls);
        Request {
            subprotocols_at,
            headers_at: subprotocols_at.saturating_add(w.subprotocols),
            kind: w.kind,
            fields: w.fields,
            tls_on: w.tls_on,
            cert_names: w.cert_names,
            subprotocols: w.subprotocols,
            headers: w.headers,
            text: w.text,
            ends: w.ends,
        }
    }
}

impl Request {
    /// Whether this is a WebSocket upgrade or a plain request.
    pub fn kind(&self) -> RequestKind {
        self.kind
    }

    /// The fields the gateway gave this request (those the plugin declared).
    pub fn fields(&self) -> Fields {
        self.fields
    }

    /// Part `i` of the text; empty past the last.
    fn part(&self, i: usize) -> &str {
        let start = match i.checked_sub(1) {
            None => 0,
            Some(before) => self
                .ends
                .get(before)
                .map_or(usize::MAX, |&e| e as usize + 1),
        };
        let end = self.ends.get(i).map_or(0, |&e| e as usize);
        self.text.get(start..end).unwrap_or("")
    }

    /// The value of a text field, or a panic naming the flag the plugin did not
    /// declare: reading a field left out as empty would misjudge the request silently
    /// (a rule on `/admin` allowing everything).
    fn text_field(&self, field: Fields, name: &str, flag: &str) -> &str {
        self.declared(field, name, flag);
        let before = TEXT_FIELDS
            .iter()
            .take_while(|&&f| f != field)
            .filter(|&&f| self.fields.contains(f))
            .count();
        self.part(before)
    }

    fn declared(&self, field: Fields, name: &str, flag: &str) {
        if !self.fields.contains(field) {
            panic!(
                "the plugin reads the request's {name}, which its request_fields() leaves \
                 out: add Fields::{flag}"
            );
        }
    }

    /// The method (`GET`, …). Needs [`Fields::METHOD`](crate::Fields).
    pub fn method(&self) -> &str {
        self.text_field(Fields::METHOD, "method", "METHOD")
    }

    /// `http` or `https`. Needs `Fields::SCHEME`.
    pub fn scheme(&self) -> &str {
        self.text_field(Fields::SCHEME, "scheme", "SCHEME")
    }

    /// Host and optional port. Needs `Fields::AUTHORITY`.
    pub fn authority(&self) -> &str {
        self.text_field(Fields::AUTHORITY, "authority", "AUTHORITY")
    }

    /// The path without the query, normalised as the gateway's routing matched it (`.`
    /// and `..` resolved, `//` collapsed, escaped unreserved characters decoded).
    /// Needs `Fields::PATH`.
    pub fn path(&self) -> &str {
        self.text_field(Fields::PATH, "path", "PATH")
    }

    /// The raw query string without `?`; `""` when absent. Needs `Fields::QUERY`.
    pub fn query_string(&self) -> &str {
        self.text_field(Fields::QUERY, "query", "QUERY")
    }

    /// The client's `ip:port`. Needs `Fields::CLIENT_ADDR`.
    pub fn client_addr(&self) -> &str {
        self.text_field(Fields::CLIENT_ADDR, "client address", "CLIENT_ADDR")
    }

    /// The client's IP address without the port (`10.0.0.7`, `::1`). Needs
    /// `Fields::CLIENT_IP`.
    pub fn client_ip(&self) -> &str {
        self.text_field(Fields::CLIENT_IP, "client IP", "CLIENT_IP")
    }

    /// The matched route's name. Needs `Fields::ROUTE`.
    pub fn route(&self) -> &str {
        self.text_field(Fields::ROUTE, "route", "ROUTE")
    }

    /// The tenant the route or an earlier plugin assigned, if any. Needs
    /// `Fields::TENANT`.
    pub fn tenant(&self) -> Option<&str> {
        Some(self.text_field(Fields::TENANT, "tenant", "TENANT")).filter(|t| !t.is_empty())
    }

    /// The client's TLS session; `None` on a plain-text listener. Needs `Fields::TLS`.
    pub fn tls(&self) -> Option<Tls<'_>> {
        self.declared(Fields::TLS, "TLS session", "TLS");
        if !self.tls_on {
            return None;
        }
        let at = (self.subprotocols_at as usize).saturating_sub(3 + self.cert_names as usize);
        let given = |i| Some(self.part(at + i)).filter(|v| !v.is_empty());
        Some(Tls {
            sni: given(0),
            alpn: given(1),
            client_cert_subject: given(2),
            client_cert_names: (0..self.cert_names as usize)
                .map(|i| self.part(at + 3 + i))
                .collect(),
        })
    }

    /// The subprotocols the client offered, in order. Needs `Fields::SUBPROTOCOLS`.
    pub fn subprotocols(&self) -> impl ExactSizeIterator<Item = &str> + Clone + '_ {
        self.declared(Fields::SUBPROTOCOLS, "subprotocols", "SUBPROTOCOLS");
        let at = self.subprotocols_at as usize;
        (0..self.subprotocols as usize).map(move |i| self.part(at + i))
    }

    /// Every header the plugin was given, `(lower-case name, value)`, in arrival order
    /// (those its `request_headers()` names, or all).
    pub fn headers(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + Clone + '_ {
        let at = self.headers_at as usize;
        (0..self.headers as usize).map(move |i| (self.part(at + 2 * i), self.part(at + 2 * i + 1)))
    }

    /// First value of a header; `name` is matched case-insensitively. A header the
    /// plugin's `request_headers()` does not name panics, naming it.
    pub fn header(&self, name: &str) -> Option<&str> {
        let at = self.headers_at as usize;
        let found = (0..self.headers as usize)
            .map(|i| at + 2 * i)
            .find(|&i| is_named(self.part(i), name));
        match found {
            Some(i) => Some(self.part(i + 1)),
            // The gateway hands over only declared headers: one found was declared.
            None => {
                crate::check_header(name);
                None
            }
        }
    }

    /// Every value of a header, in arrival order (declared as for [`Request::header`]).
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        // Panics as `header` does for an undeclared one.
        let _ = self.header(name);
        self.headers()
            .filter(move |(n, _)| is_named(n, name))
            .map(|(_, v)| v)
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

/// Whether a header name as the gateway gives it (lower-case) is `name`, in any case.
fn is_named(given: &str, name: &str) -> bool {
    crate::matching::eq_ignore_case(given, name)
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
