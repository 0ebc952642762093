//! Header hygiene shared by the upgrade and plain-request paths: hop-by-hop stripping and
//! the `X-Forwarded-*` headers. Each rule has one definition, over [`HeaderFields`], which
//! both the raw form (spans of the bytes read) and a header map implement.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

use crate::head::{HeaderFields, RawFields};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether `name` is one of the standard hop-by-hop headers.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    is_hop_name(name.as_str().as_bytes())
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

/// Removes the fields [`hop_by_hop_in`] names, except `Connection` and `Upgrade`
/// themselves when `keep_upgrade` (the caller overwrites them). One pass over the names
/// present decides, so nothing is removed (or hashed) only to find it absent.
fn strip(headers: &mut HeaderMap, keep_upgrade: bool) {
    let doomed: Vec<HeaderName> = {
        let hop = hop_by_hop_in(&*headers);
        let doomed = |name: &&HeaderName| {
            let kept = keep_upgrade && (*name == header::CONNECTION || *name == header::UPGRADE);
            !kept && hop(name.as_str().as_bytes())
        };
        if !headers.keys().any(|n| doomed(&n)) {
            return;
        }
        headers.keys().filter(doomed).cloned().collect()
    };
    for name in doomed {
        headers.remove(name);
    }
}

/// Which field names of one head are hop-by-hop: the standard ones, and those its
/// `Connection` fields name. The one rule behind [`strip_hop_by_hop`] (a map) and
/// [`end_to_end`] (raw fields). When `Connection` names only standard hop-by-hop headers
/// (`Upgrade`, `keep-alive`: the usual case) no name is checked against it.
fn hop_by_hop_in<F: HeaderFields + ?Sized>(fields: &F) -> impl Fn(&[u8]) -> bool + '_ {
    let connection = header::CONNECTION.as_str();
    let names_others = fields.values_of(connection).any(names_others);
    move |name| {
        is_hop_name(name)
            || (names_others && fields.values_of(connection).any(|v| value_lists(v, name)))
    }
}

/// Whether a `Connection` line may name a field that is not a standard hop-by-hop one
/// (or is not [`tokenizable`], so is judged field by field).
fn names_others(value: &[u8]) -> bool {
    !tokenizable(value)
        || value.split(|&b| b == b',').any(|t| {
            let t = t.trim_ascii();
            !t.is_empty() && !is_hop_name(t)
        })
}

/// Whether a raw field name (any case) is one of the headers that describe one hop and
/// are never forwarded (RFC 9110 §7.6.1, plus the legacy ones proxies still see). Its
/// length picks the candidates, so most names take no comparison at all.
fn is_hop_name(name: &[u8]) -> bool {
    let candidates: &[&str] = match name.len() {
        2 => &["te"],
        7 => &["trailer", "upgrade"],
        10 => &["connection", "keep-alive"],
        16 => &["proxy-connection"],
        17 => &["transfer-encoding"],
        18 => &["proxy-authenticate"],
        19 => &["proxy-authorization"],
        _ => return false,
    };
    candidates
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// Whether a raw field name (any case) is `name`.
pub fn is_named(raw: &[u8], name: &HeaderName) -> bool {
    raw.eq_ignore_ascii_case(name.as_str().as_bytes())
}

/// The trimmed, non-empty entries of a comma-separated header, over all its lines.
pub fn tokens<'a, F: HeaderFields + ?Sized>(
    fields: &'a F,
    name: &'a str,
) -> impl Iterator<Item = &'a str> {
    fields.values_of(name).flat_map(value_tokens)
}

/// Whether a header line is all visible ASCII, spaces and tabs (what
/// `HeaderValue::to_str` accepts); a line that is not has no tokens.
fn tokenizable(value: &[u8]) -> bool {
    // Folded without an early exit, so it is checked many bytes at a time (a token read
    // from every upgrade is a few hundred bytes).
    value.iter().fold(true, |ok, &b| {
        ok & ((b == b'\t') | (b.wrapping_sub(b' ') <= b'~' - b' '))
    })
}

/// A header name lower-case, as a header map has it: borrowed when it already is.
pub fn lower_case(name: &str) -> Cow<'_, str> {
    match name.bytes().any(|b| b.is_ascii_uppercase()) {
        true => Cow::Owned(name.to_ascii_lowercase()),
        false => Cow::Borrowed(name),
    }
}

/// A field value as text when it is [`tokenizable`] (what `HeaderValue::to_str` gives).
pub fn value_text(value: &[u8]) -> Option<&str> {
    Some(value)
        .filter(|v| tokenizable(v))
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// The trimmed, non-empty entries of one comma-separated header line; none when the line
/// is not [`tokenizable`].
fn value_tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    value_text(value)
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Whether a comma-separated header contains `token` (case-insensitive).
pub fn has_token<F: HeaderFields + ?Sized>(fields: &F, name: &str, token: &str) -> bool {
    fields.values_of(name).any(|v| value_has_token(v, token))
}

/// Whether one raw header line (comma-separated) contains `token` (case-insensitive),
/// as [`has_token`] decides for a header map. A byte scan, no UTF-8 decoding: a
/// tokenizable line is ASCII, where `trim_ascii` and `str::trim` agree.
pub fn value_has_token(value: &[u8], token: &str) -> bool {
    value_lists(value, token.as_bytes())
}

/// [`value_has_token`] for a token given as bytes (a raw field name).
fn value_lists(value: &[u8], token: &[u8]) -> bool {
    !token.is_empty()
        && tokenizable(value)
        && value
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// A header map from the fields `httparse` parsed; `Err` says which part of a field is
/// invalid. It has room for the few headers a proxy adds (a full map grows on any
/// insert, even of a name it has).
pub fn from_parsed(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, &'static str> {
    let mut headers = HeaderMap::with_capacity(fields.len() + 4);
    for h in fields {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| "bad header name")?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| "bad header value")?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// The end-to-end fields of `fields`, raw: what [`strip_hop_by_hop`] leaves of their map,
/// without making one.
pub fn end_to_end<F: HeaderFields + ?Sized>(fields: &F) -> impl Iterator<Item = (&[u8], &[u8])> {
    let hop = hop_by_hop_in(fields);
    fields.each().filter(move |(name, _)| !hop(name))
}

/// Makes a request's fields, already cleaned for the hop, those an upstream gets:
/// [`add_forwarded`], then `Host: host` when the server's authority replaces the client's
/// `Host` (`None` keeps the client's). [`push_upgrade_fields`] writes the same from raw
/// fields.
pub fn set_upstream_fields(
    headers: &mut HeaderMap,
    client: SocketAddr,
    proto: &'static str,
    host: Option<&str>,
) {
    // X-Forwarded-Host names the host the client asked for, before Host is rewritten.
    add_forwarded(headers, client, proto);
    if let Some(v) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
        headers.insert(header::HOST, v);
    }
}

/// Appends the client to `X-Forwarded-For` (keeping what earlier proxies wrote, merged
/// into one header) and sets `X-Forwarded-Proto` and `X-Forwarded-Host`, replacing any
/// client-sent values of those two.
fn add_forwarded(headers: &mut HeaderMap, client: SocketAddr, proto: &'static str) {
    let mut chain = Vec::with_capacity(48);
    for v in headers.get_all(X_FORWARDED_FOR) {
        push_forwarded_entry(&mut chain, v.as_bytes());
    }
    push_ip(&mut chain, client.ip());
    // Both parts are valid header text, so this cannot fail; the value takes the Vec's
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

/// A change a policy makes to the fields an upstream gets, made after the gateway's own
/// (`X-Forwarded-*`, `Host`), as `policy::apply` makes it on a header map. Names are
/// lower-case; changes to hop-by-hop fields, which stay the gateway's
/// to manage, and to names or values no header map would take are not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldEdit<'a> {
    /// Replace every value of the field, or add it.
    Set(&'a str, &'a str),
    /// Add a value.
    Append(&'a str, &'a str),
    /// Drop every value.
    Remove(&'a str),
}

impl<'a> FieldEdit<'a> {
    /// The field it changes.
    pub fn name(&self) -> &'a str {
        match *self {
            Self::Set(name, _) | Self::Append(name, _) | Self::Remove(name) => name,
        }
    }

    /// Whether it is made at all: not of a hop-by-hop field, and a valid name and value.
    fn applies(&self) -> bool {
        let name = self.name().as_bytes();
        let value = match *self {
            Self::Set(_, v) | Self::Append(_, v) => v.as_bytes(),
            Self::Remove(_) => b"",
        };
        is_token(name) && !is_hop_name(name) && is_field_value(value)
    }
}

/// Makes `edits` on a header map (after [`set_upstream_fields`]), as
/// [`push_upgrade_fields`] makes them on raw fields.
pub fn edit_map(headers: &mut HeaderMap, edits: &[FieldEdit<'_>]) {
    for edit in edits.iter().filter(|e| e.applies()) {
        let Ok(name) = HeaderName::from_bytes(edit.name().as_bytes()) else {
            continue;
        };
        match *edit {
            FieldEdit::Set(_, v) => {
                if let Ok(v) = HeaderValue::from_str(v) {
                    headers.insert(name, v);
                }
            }
            FieldEdit::Append(_, v) => {
                if let Ok(v) = HeaderValue::from_str(v) {
                    headers.append(name, v);
                }
            }
            FieldEdit::Remove(_) => {
                headers.remove(name);
            }
        }
    }
}

/// Whether `name` is a valid field name (an RFC 9110 token), as `HeaderName` takes it
/// (which also bounds its length).
pub fn is_token(name: &[u8]) -> bool {
    (1..1 << 16).contains(&name.len())
        && name.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// Whether `value` is a valid field value, as `HeaderValue` takes it: no control
/// characters but tab (so no line break can smuggle a field in).
pub fn is_field_value(value: &[u8]) -> bool {
    // Folded without an early exit, as `tokenizable` is.
    value.iter().fold(true, |ok, &b| {
        ok & ((b == b'\t') | ((b >= b' ') & (b != 0x7f)))
    })
}

/// Appends the header lines of one WebSocket upgrade hop made from a client's raw fields,
/// with no header map: the same fields [`set_upgrade_hop`] and [`set_upstream_fields`]
/// make of their map, then changed by `edits` as a policy changes that map. These are the
/// end-to-end fields as sent (less the `X-Forwarded-*` ones, and less `Host` when `host`
/// is given), one `Connection: Upgrade`/`Upgrade: websocket` pair, `X-Forwarded-For` with
/// `client` appended, `X-Forwarded-Proto`, `X-Forwarded-Host` (the client's first `Host`)
/// and `Host: host`; the lines of fields `edits` change come last, as edited. Returns
/// whether the client's end-to-end fields had a `Host`.
pub fn push_upgrade_fields(
    out: &mut Vec<u8>,
    fields: &RawFields,
    host: Option<&str>,
    client: SocketAddr,
    proto: &str,
    edits: &[FieldEdit<'_>],
) -> bool {
    let mut lines = Edited::new(edits);
    let mut client_host = None;
    // Earlier proxies' chain; allocated only when there is one.
    let mut chain = Vec::new();
    for (name, value) in end_to_end(fields) {
        if is_named(name, &X_FORWARDED_FOR) {
            push_forwarded_entry(&mut chain, value);
            continue;
        }
        if is_named(name, &X_FORWARDED_PROTO) || is_named(name, &X_FORWARDED_HOST) {
            continue;
        }
        if is_named(name, &header::HOST) {
            client_host = client_host.or(Some(value));
            if host.is_some() {
                continue;
            }
        }
        lines.push(out, name, value);
    }
    out.extend_from_slice(b"connection: Upgrade\r\nupgrade: websocket\r\n");
    // The gateway's own fields by literal name, as `X_FORWARDED_*` and `header::HOST`
    // spell them: `lines` may hold a name back for an edit, which a name borrowed from a
    // constant `HeaderName` cannot outlive (binding the constants to locals costs their
    // drops on every upgrade).
    let xff = b"x-forwarded-for";
    if lines.changes(xff) {
        push_ip(&mut chain, client.ip());
        lines.push(out, xff, &chain);
    } else {
        out.extend_from_slice(b"x-forwarded-for: ");
        out.extend_from_slice(&chain);
        push_ip(out, client.ip());
        out.extend_from_slice(b"\r\n");
    }
    lines.push(out, b"x-forwarded-proto", proto.as_bytes());
    if let Some(value) = client_host {
        lines.push(out, b"x-forwarded-host", value);
    }
    if let Some(host) = host {
        lines.push(out, b"host", host.as_bytes());
    }
    lines.finish(out);
    client_host.is_some()
}

/// Lines being written under a policy's edits: those of fields an edit changes are held
/// back, to be written after all others as the edits leave them.
struct Edited<'e, 'v> {
    /// The edits that are made, in order.
    edits: Vec<FieldEdit<'e>>,
    held: Vec<(&'v [u8], Vec<u8>)>,
}

impl<'e, 'v> Edited<'e, 'v> {
    fn new(edits: &[FieldEdit<'e>]) -> Self {
        Self {
            edits: edits.iter().filter(|e| e.applies()).copied().collect(),
            held: Vec::new(),
        }
    }

    /// Whether an edit changes the field `name`.
    fn changes(&self, name: &[u8]) -> bool {
        (self.edits.iter()).any(|e| name.eq_ignore_ascii_case(e.name().as_bytes()))
    }

    fn push(&mut self, out: &mut Vec<u8>, name: &'v [u8], value: &[u8]) {
        match self.changes(name) {
            true => self.held.push((name, value.to_vec())),
            false => push_field(out, name, value),
        }
    }

    /// Writes each edited field's values, in the order the edits first name them.
    fn finish(self, out: &mut Vec<u8>) {
        for (at, first) in self.edits.iter().enumerate() {
            let name = first.name();
            let same = |e: &&FieldEdit<'_>| e.name().eq_ignore_ascii_case(name);
            if self.edits[..at].iter().any(|e| same(&e)) {
                continue;
            }
            let mut values: Vec<&[u8]> = (self.held.iter())
                .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, v)| v.as_slice())
                .collect();
            for edit in self.edits.iter().filter(same) {
                match *edit {
                    FieldEdit::Set(_, v) => {
                        values.clear();
                        values.push(v.as_bytes());
                    }
                    FieldEdit::Append(_, v) => values.push(v.as_bytes()),
                    FieldEdit::Remove(_) => values.clear(),
                }
            }
            for value in values {
                push_field(out, name.as_bytes(), value);
            }
        }
    }
}

/// Appends one `name: value` line.
pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The client a trusted proxy names: when `peer` is one of `trusted`, the last address in
/// `X-Forwarded-For` (all its fields, in order) that is not itself trusted, or the first
/// when every one is; `peer` itself otherwise, or when the chain has an entry that is not
/// an IP address (a chain that cannot be read names no one).
pub fn forwarded_client(
    fields: &impl HeaderFields,
    peer: SocketAddr,
    trusted: &[ipnet::IpNet],
) -> SocketAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer.ip()) {
        return peer;
    }
    let mut chain: Vec<IpAddr> = Vec::new();
    for line in fields.values_of("x-forwarded-for") {
        let Ok(text) = std::str::from_utf8(line) else {
            return peer;
        };
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            match entry.parse::<IpAddr>() {
                Ok(ip) => chain.push(ip),
                Err(_) => return peer,
            }
        }
    }
    let client = chain
        .iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or(chain.first());
    client.map_or(peer, |ip| SocketAddr::new(*ip, 0))
}

/// Appends an earlier `X-Forwarded-For` line and `, ` when the line is valid header text
/// and not empty (trimmed).
fn push_forwarded_entry(out: &mut Vec<u8>, line: &[u8]) {
    let line = line.trim_ascii();
    if !line.is_empty() && tokenizable(line) {
        out.extend_from_slice(line);
        out.extend_from_slice(b", ");
    }
}

/// `ip` in its usual text form, as `to_string` writes it without the formatting
/// machinery (a plugin reading `client-ip` is handed one on every call).
pub fn ip_text(ip: IpAddr) -> String {
    let mut out = Vec::with_capacity(15);
    push_ip(&mut out, ip);
    // Digits, dots and colons only.
    String::from_utf8(out).unwrap_or_default()
}

/// Appends `ip` in its usual text form; IPv4 by hand (every upgrade writes one), IPv6
/// through `Display`.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hop-by-hop headers [`is_hop_name`] knows, as a list.
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
                has_token(&h, "connection", "upgrade"),
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
            let mut out = Vec::new();
            push_ip(&mut out, ip.parse().unwrap());
            assert_eq!(out, ip.as_bytes());
            assert_eq!(ip_text(ip.parse().unwrap()), ip);
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
        let kept: Vec<httparse::Header<'_>> = end_to_end(&fields[..])
            .map(|(name, value)| httparse::Header {
                name: std::str::from_utf8(name).unwrap(),
                value,
            })
            .collect();
        assert_eq!(from_parsed(&kept).unwrap(), stripped);
        assert_eq!(stripped.len(), 3);
    }

    /// What the map path sends upstream for an upgrade (the calls `open` and
    /// `admit::Plan::upstream_head` make).
    fn through_a_map(
        fields: &RawFields,
        host: Option<&str>,
        client: SocketAddr,
        edits: &[FieldEdit<'_>],
    ) -> HeaderMap {
        let mut map = fields.to_map();
        set_upgrade_hop(&mut map);
        set_upstream_fields(&mut map, client, "http", host);
        edit_map(&mut map, edits);
        map
    }

    /// Policies' changes: none; new fields and the client's replaced, appended to and
    /// removed; the gateway's own fields changed; hop-by-hop fields and invalid names and
    /// values (not made); one name in two cases.
    const EDITS: &[&[FieldEdit<'static>]] = &[
        &[],
        &[
            FieldEdit::Set("x-user", "alice"),
            FieldEdit::Append("cookie", "c=3"),
            FieldEdit::Remove("origin"),
            FieldEdit::Append("x-tag", "a"),
            FieldEdit::Append("x-tag", "b"),
            FieldEdit::Set("sec-websocket-protocol", "chat"),
        ],
        &[
            FieldEdit::Append("x-forwarded-for", "10.0.0.1"),
            FieldEdit::Set("x-forwarded-proto", "https"),
            FieldEdit::Remove("x-forwarded-host"),
            FieldEdit::Set("host", "rewritten.example"),
            FieldEdit::Remove("x-kept"),
            FieldEdit::Append("x-kept", "3"),
        ],
        &[
            FieldEdit::Set("connection", "close"),
            FieldEdit::Remove("upgrade"),
            FieldEdit::Set("x-bad", "a\r\nx-injected: 1"),
            FieldEdit::Set("bad name", "v"),
            FieldEdit::Set("X-Case", "1"),
            FieldEdit::Append("x-case", "2"),
            FieldEdit::Set("cookie", "only"),
            FieldEdit::Remove("cookie"),
        ],
    ];

    #[test]
    fn raw_upgrade_fields_are_what_the_map_path_sends() {
        let heads = [
            // A browser's upgrade.
            "GET /chat HTTP/1.1\r\nHost: chat.example:8443\r\nConnection: keep-alive, Upgrade\r\n\
             Upgrade: websocket\r\nOrigin: https://app.example\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
            // Earlier proxies' chains (one line not valid text, one empty), spoofed
            // X-Forwarded-Proto/-Host, fields named in Connection, repeated and
            // interleaved names.
            "GET / HTTP/1.1\r\nX-Forwarded-For: 1.2.3.4 \r\nhost: a.example\r\n\
             X-Forwarded-For: é\r\nx-forwarded-for: \r\nX-FORWARDED-FOR: 5.6.7.8, 9.9.9.9\r\n\
             X-Forwarded-Proto: https\r\nX-Forwarded-Host: spoofed\r\n\
             Connection: Upgrade, X-Secret\r\nconnection: x-other\r\nX-Secret: 1\r\nX-Other: 2\r\n\
             X-Kept: 1\r\nTE: trailers\r\nX-Kept: 2\r\nUpgrade: websocket\r\nKeep-Alive: 5\r\n\r\n",
            // Host listed in Connection, so not sent; two Hosts elsewhere.
            "GET / HTTP/1.1\r\nHost: b.example\r\nConnection: Upgrade, Host\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: one\r\nHost: two\r\nUpgrade: websocket\r\n\r\n",
            // No Host at all; a Connection line that is not valid text.
            "GET / HTTP/1.1\r\nConnection: é, X-A\r\nX-A: 1\r\nUpgrade: websocket\r\n\r\n",
        ];
        for head in heads {
            let fields = RawFields::of_request(head);
            for client in ["127.0.0.1:5000", "[2001:db8::7]:443"] {
                let client: SocketAddr = client.parse().unwrap();
                for (host, edits) in [None, Some("backend:9000")]
                    .into_iter()
                    .flat_map(|h| EDITS.iter().map(move |e| (h, *e)))
                {
                    let mut out = Vec::new();
                    push_upgrade_fields(&mut out, &fields, host, client, "http", edits);
                    out.extend_from_slice(b"\r\n");
                    let mut slots = [httparse::EMPTY_HEADER; 32];
                    let parsed = match httparse::parse_headers(&out, &mut slots) {
                        Ok(httparse::Status::Complete((_, parsed))) => parsed,
                        other => panic!("{other:?}: {}", String::from_utf8_lossy(&out)),
                    };
                    assert_eq!(
                        from_parsed(parsed).unwrap(),
                        through_a_map(&fields, host, client, edits),
                        "{head:?} {client} {host:?} {edits:?}: {}",
                        String::from_utf8_lossy(&out)
                    );
                }
            }
        }
    }

    #[test]
    fn names_and_values_are_valid_as_a_header_map_takes_them() {
        for b in 0..=u8::MAX {
            let name = [b'x', b];
            let value = [b'v', b, b'v'];
            assert_eq!(
                is_token(&name),
                HeaderName::from_bytes(&name).is_ok(),
                "{b}"
            );
            assert_eq!(
                is_field_value(&value),
                HeaderValue::from_bytes(&value).is_ok(),
                "{b}"
            );
        }
        let long = vec![b'x'; 1 << 16];
        assert!(is_token(&long[1..]) && HeaderName::from_bytes(&long[1..]).is_ok());
        assert!(!is_token(&long) && HeaderName::from_bytes(&long).is_err());
        assert!(!is_token(b"") && HeaderName::from_bytes(b"").is_err());
    }

    #[test]
    fn raw_hop_names_are_the_hop_by_hop_list() {
        for name in HOP_BY_HOP {
            assert!(is_hop_name(name.as_bytes()), "{name}");
            assert!(is_hop_name(name.to_ascii_uppercase().as_bytes()), "{name}");
            assert!(!is_hop_name(format!("{name}s").as_bytes()), "{name}");
        }
        for other in [
            "host",
            "x-te",
            "sec-websocket-key",
            "upgrade-insecure-requests",
        ] {
            assert!(!is_hop_name(other.as_bytes()), "{other}");
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
