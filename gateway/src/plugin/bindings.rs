//! The one `bindgen!` site, and conversions between the generated WIT types
//! and the gateway's own plain types (so no wasmtime type leaves `plugin`).

use crate::headers::{ip_text, is_field_value, is_token};

use super::types::{
    ChainDecision, CloseInfo, CloseReason, Denial, HeaderOp, Mutations, RequestInfo, RequestKind,
};

mod generated {
    wasmtime::component::bindgen!({
        path: "../plugin-sdk/wit",
        world: "plugin",
        // Exports run on a fiber so a long hook yields to tokio at every epoch
        // tick instead of holding a worker (see the numbers in `mod.rs`).
        exports: { default: async },
        // With `[cluster]`, a counter lives in the fleet's Redis: the host awaits it; the
        // first `watch` of a URL awaits its first fetch.
        imports: {
            "sluice:plugin/host.counter-add": async,
            "sluice:plugin/documents.watch": async,
        },
        // A plugin's keys are parsed once, on the host (super::crypto).
        with: {
            "sluice:plugin/crypto.key": crate::plugin::crypto::Key,
        },
    });
}

pub(super) use generated::sluice::plugin::{crypto, documents, host, types as wit};
pub(super) use generated::{Plugin, PluginPre};
pub(super) use wit::{Decision, Request};

impl From<RequestKind> for wit::RequestKind {
    fn from(kind: RequestKind) -> Self {
        match kind {
            RequestKind::WebSocket => wit::RequestKind::Websocket,
            RequestKind::Http => wit::RequestKind::Http,
        }
    }
}

pub(super) fn header(name: &str, value: &str) -> wit::Header {
    wit::Header {
        name: name.to_ascii_lowercase(),
        value: value.to_owned(),
    }
}

/// The record for `req` with only the fields in `fields` and the headers in
/// `headers` (lower-case names; `None`: all of either): what a chain whose
/// plugins read no more needs, without copying the rest.
pub(super) fn request(
    req: &RequestInfo,
    fields: Option<wit::Fields>,
    headers: Option<&[String]>,
) -> Request {
    let read = |f: wit::Fields| fields.is_none_or(|fields| fields.contains(f));
    let text = |f: wit::Fields, s: &String| read(f).then(|| s.clone());
    let headers = req
        .headers
        .iter()
        .filter(|(n, _)| {
            headers.is_none_or(|wanted| wanted.iter().any(|w| w.eq_ignore_ascii_case(n)))
        })
        .map(|(n, v)| header(n, v))
        .collect();
    Request {
        kind: req.kind.into(),
        method: text(wit::Fields::METHOD, &req.method),
        scheme: text(wit::Fields::SCHEME, &req.scheme),
        authority: text(wit::Fields::AUTHORITY, &req.authority),
        path: text(wit::Fields::PATH, &req.path),
        query: text(wit::Fields::QUERY, &req.query),
        headers,
        client_addr: read(wit::Fields::CLIENT_ADDR).then(|| req.client_addr.to_string()),
        client_ip: read(wit::Fields::CLIENT_IP).then(|| ip_text(req.client_addr.ip())),
        tls: req
            .tls
            .as_ref()
            .filter(|_| read(wit::Fields::TLS))
            .map(|t| wit::TlsInfo {
                sni: t.sni.clone(),
                alpn: t.alpn.clone(),
                client_cert_subject: t.client_cert_subject.clone(),
                client_cert_names: t.client_cert_names.clone(),
            }),
        route: text(wit::Fields::ROUTE, &req.route),
        // Earlier plugins may set the tenant, so it is always carried.
        tenant: req.tenant.clone(),
        subprotocols: read(wit::Fields::SUBPROTOCOLS).then(|| req.subprotocols.clone()),
    }
}

impl From<&CloseInfo> for wit::CloseInfo {
    fn from(info: &CloseInfo) -> Self {
        wit::CloseInfo {
            kind: info.kind.into(),
            route: info.route.clone(),
            tenant: info.tenant.clone(),
            upstream: info.upstream.clone(),
            duration_ms: u64::try_from(info.duration.as_millis()).unwrap_or(u64::MAX),
            bytes_from_client: info.bytes_from_client,
            bytes_to_client: info.bytes_to_client,
            reason: match info.reason {
                CloseReason::Completed => wit::CloseReason::Completed,
                CloseReason::ClientClosed => wit::CloseReason::ClientClosed,
                CloseReason::UpstreamClosed => wit::CloseReason::UpstreamClosed,
                CloseReason::IdleTimeout => wit::CloseReason::IdleTimeout,
                CloseReason::Denied => wit::CloseReason::Denied,
                CloseReason::UpstreamError => wit::CloseReason::UpstreamError,
                CloseReason::Shutdown => wit::CloseReason::Shutdown,
            },
        }
    }
}

/// What a header map would take, checked without making one (that copies every value).
fn valid_header(h: &wit::Header) -> Result<(), String> {
    valid_name(&h.name)?;
    match is_field_value(h.value.as_bytes()) {
        true => Ok(()),
        false => Err(format!("invalid value for header {:?}", h.name)),
    }
}

fn valid_name(name: &str) -> Result<(), String> {
    match is_token(name.as_bytes()) {
        true => Ok(()),
        false => Err(format!("invalid header name {name:?}")),
    }
}

/// Check a plugin's decision before the gateway acts on it: a bad header or
/// status from a plugin is a plugin fault, never a gateway error.
pub(super) fn validate(decision: &Decision) -> Result<(), String> {
    match decision {
        Decision::Continue(m) => {
            for op in &m.headers {
                match op {
                    wit::HeaderOp::Set(h) | wit::HeaderOp::Append(h) => valid_header(h)?,
                    wit::HeaderOp::Remove(name) => valid_name(name)?,
                }
            }
            m.log_fields.iter().try_for_each(valid_header)
        }
        Decision::Deny(d) if !(300..=599).contains(&d.status) => {
            Err(format!("deny status {} is not 300-599", d.status))
        }
        Decision::Deny(d) => d
            .headers
            .iter()
            .chain(&d.log_fields)
            .try_for_each(valid_header),
    }
}

/// Apply a plugin's `continue` to the request the next plugin sees (headers
/// and tenant), and fold it into the chain's accumulated mutations. Names are
/// lower-cased, as the request's own are, whatever case the plugin used.
pub(super) fn accumulate(m: wit::Mutations, req: &mut Request, acc: &mut Mutations) {
    for op in m.headers {
        let op = match op {
            wit::HeaderOp::Set(mut h) => {
                h.name.make_ascii_lowercase();
                req.headers.retain(|x| x.name != h.name);
                req.headers.push(h.clone());
                HeaderOp::Set(h.name, h.value)
            }
            wit::HeaderOp::Append(mut h) => {
                h.name.make_ascii_lowercase();
                req.headers.push(h.clone());
                HeaderOp::Append(h.name, h.value)
            }
            wit::HeaderOp::Remove(name) => {
                let name = name.to_ascii_lowercase();
                req.headers.retain(|x| x.name != name);
                HeaderOp::Remove(name)
            }
        };
        acc.headers.push(op);
    }
    if m.tenant.is_some() {
        req.tenant.clone_from(&m.tenant);
    }
    let later = [
        (&mut acc.pool, m.pool),
        (&mut acc.tenant, m.tenant),
        (&mut acc.sticky_key, m.sticky_key),
        (&mut acc.subprotocol, m.subprotocol),
    ];
    for (slot, value) in later {
        if value.is_some() {
            *slot = value;
        }
    }
    acc.log_fields
        .extend(m.log_fields.into_iter().map(|h| (h.name, h.value)));
}

/// A plugin's `deny`, as the gateway's type, keeping the log fields the plugins
/// before it added (`earlier`).
pub(super) fn denial(d: wit::Denial, plugin: &str, earlier: Mutations) -> ChainDecision {
    let mut log_fields = earlier.log_fields;
    log_fields.extend(d.log_fields.into_iter().map(|h| (h.name, h.value)));
    ChainDecision::Deny(Denial {
        status: d.status,
        headers: d.headers.into_iter().map(|h| (h.name, h.value)).collect(),
        body: d.body,
        log_fields,
        plugin: plugin.to_owned(),
        fault: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, value: &str) -> wit::Header {
        wit::Header {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn accumulated_header_names_are_lower_case() {
        let info = RequestInfo {
            kind: RequestKind::WebSocket,
            method: "GET".into(),
            scheme: "http".into(),
            authority: "a.example".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![("X-User".into(), "spoofed".into())],
            client_addr: "127.0.0.1:1".parse().unwrap(),
            tls: None,
            route: "r".into(),
            tenant: None,
            subprotocols: Vec::new(),
        };
        let mut req = request(&info, None, None);
        let m = wit::Mutations {
            headers: vec![
                wit::HeaderOp::Set(header("X-User", "alice")),
                wit::HeaderOp::Append(header("X-Tag", "a")),
            ],
            pool: None,
            tenant: None,
            sticky_key: None,
            subprotocol: None,
            log_fields: Vec::new(),
            reuse_ms: 0,
        };
        let mut acc = Mutations::default();
        accumulate(m, &mut req, &mut acc);
        // The client's `X-User` is replaced, not kept beside the plugin's.
        let seen: Vec<(&str, &str)> = req
            .headers
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_str()))
            .collect();
        assert_eq!(seen, [("x-user", "alice"), ("x-tag", "a")]);
        assert_eq!(
            acc.headers,
            [
                HeaderOp::Set("x-user".into(), "alice".into()),
                HeaderOp::Append("x-tag".into(), "a".into())
            ]
        );
    }
}
