//! A request head in the two forms the stages read it in: hyper's `Request` (a header
//! map) and the client stage's [`UpgradeHead`], whose fields stay spans of the bytes read
//! ([`RawFields`]). Route, client handshake, policy and balance read a head through
//! [`RequestHead`] and its fields through [`HeaderFields`], so one rule serves both forms.

use std::ops::Range;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{HeaderMap, Method, Request, Uri, Version};

/// A request head, whichever stage read it: hyper's `Request`, or the client stage's
/// [`UpgradeHead`]. The route, upgrade and policy stages read requests through it.
pub trait RequestHead {
    /// The head's fields.
    type Fields: HeaderFields;
    /// The request method.
    fn method(&self) -> &Method;
    /// The request target.
    fn uri(&self) -> &Uri;
    /// The HTTP version.
    fn version(&self) -> Version;
    /// The header fields.
    fn fields(&self) -> &Self::Fields;
    /// The `:protocol` of an HTTP/2 extended CONNECT (RFC 8441), such as `websocket`.
    fn protocol(&self) -> Option<&str> {
        None
    }
}

impl<B> RequestHead for Request<B> {
    type Fields = HeaderMap;
    fn method(&self) -> &Method {
        Request::method(self)
    }
    fn uri(&self) -> &Uri {
        Request::uri(self)
    }
    fn version(&self) -> Version {
        Request::version(self)
    }
    fn fields(&self) -> &HeaderMap {
        Request::headers(self)
    }
    fn protocol(&self) -> Option<&str> {
        self.extensions()
            .get::<hyper::ext::Protocol>()
            .map(hyper::ext::Protocol::as_str)
    }
}

/// A first request head that asks for a WebSocket upgrade, its fields kept as spans of
/// the bytes read ([`RawFields`]): no header map is made for it unless a plugin edits the
/// upstream head.
#[derive(Debug)]
pub struct UpgradeHead {
    method: Method,
    uri: Uri,
    version: Version,
    fields: RawFields,
}

impl UpgradeHead {
    /// A head read by the client stage.
    pub fn new(method: Method, uri: Uri, version: Version, fields: RawFields) -> UpgradeHead {
        UpgradeHead {
            method,
            uri,
            version,
            fields,
        }
    }
}

impl RequestHead for UpgradeHead {
    type Fields = RawFields;
    fn method(&self) -> &Method {
        &self.method
    }
    fn uri(&self) -> &Uri {
        &self.uri
    }
    fn version(&self) -> Version {
        self.version
    }
    fn fields(&self) -> &RawFields {
        &self.fields
    }
}

/// Header fields, whichever form they are in: a [`HeaderMap`] (hyper's path, or where a
/// plugin edits them), [`RawFields`] (the client stage's first head) or the fields
/// `httparse` just parsed (an upstream's `101`). Names are matched case-insensitively.
pub trait HeaderFields {
    /// The values of the fields named `name`, in order.
    fn values_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a;
    /// Every field as `(name, value)`, in order (a map's names are lower-case, raw ones as
    /// sent).
    fn each(&self) -> impl Iterator<Item = (&[u8], &[u8])>;
}

impl HeaderFields for HeaderMap {
    fn values_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).into_iter().map(HeaderValue::as_bytes)
    }

    fn each(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
    }
}

/// Header fields as `httparse` parsed them, kept as spans of the head's own bytes: no
/// allocation or copy per field, and no name parsed or hashed. `httparse` admits exactly
/// the names and values a [`HeaderMap`] would, so the raw path writes what a map would hold.
#[derive(Debug, Clone)]
pub struct RawFields {
    head: Bytes,
    /// Each field's name and value, as byte ranges of `head`.
    spans: Vec<(Range<usize>, Range<usize>)>,
}

impl RawFields {
    /// The byte ranges of `fields` within `base`, the buffer `httparse` parsed them from.
    pub fn spans(
        base: &[u8],
        fields: &[httparse::Header<'_>],
    ) -> Vec<(Range<usize>, Range<usize>)> {
        fields
            .iter()
            .map(|h| (span(base, h.name.as_bytes()), span(base, h.value)))
            .collect()
    }

    /// The fields at `spans` (from [`RawFields::spans`]) of `head`.
    pub fn new(head: Bytes, spans: Vec<(Range<usize>, Range<usize>)>) -> RawFields {
        RawFields { head, spans }
    }

    /// The bytes the fields are spans of.
    pub fn head(&self) -> &Bytes {
        &self.head
    }

    /// Every field as `(name, value)`, in the order sent.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + Clone {
        self.spans
            .iter()
            .map(|(n, v)| (&self.head[n.clone()], &self.head[v.clone()]))
    }

    /// The fields as a header map (with room for four more): what the map path starts
    /// from, to check the raw path against it.
    #[cfg(test)]
    pub fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.spans.len() + 4);
        for (name, value) in self.iter() {
            let name = http::header::HeaderName::from_bytes(name);
            if let (Ok(n), Ok(v)) = (name, HeaderValue::from_bytes(value)) {
                map.append(n, v);
            }
        }
        map
    }
}

/// Where `part`, a slice `httparse` returned, lies within `base`, the buffer it parsed.
pub fn span(base: &[u8], part: &[u8]) -> Range<usize> {
    let from = part.as_ptr() as usize - base.as_ptr() as usize;
    from..from + part.len()
}

#[cfg(test)]
impl RawFields {
    /// The fields of a whole request head, for tests.
    pub(crate) fn of_request(head: &str) -> RawFields {
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut slots);
        assert!(req.parse(head.as_bytes()).unwrap().is_complete(), "{head}");
        let spans = RawFields::spans(head.as_bytes(), req.headers);
        RawFields::new(Bytes::copy_from_slice(head.as_bytes()), spans)
    }
}

impl HeaderFields for [httparse::Header<'_>] {
    fn values_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    fn each(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.iter().map(|h| (h.name.as_bytes(), h.value))
    }
}

impl HeaderFields for RawFields {
    fn values_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    fn each(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.iter()
    }
}
