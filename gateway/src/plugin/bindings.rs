//! The one `bindgen!` site, and conversions between the generated WIT types
//! and the gateway's own plain types (so no wasmtime type leaves `plugin`).

use std::borrow::Cow;

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
        // A request is lowered into each plugin from borrowed text (`View`), not copied
        // into an owned record first.
        ownership: Borrowing { duplicate_if_necessary: true },
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

/// What a chain's plugins are shown of one request, borrowed from it: its headers as
/// the plugins before changed them, and the fields that are not text in the request
/// (addresses, lists), each written once for the whole chain.
pub(super) struct View<'r> {
    req: &'r RequestInfo,
    /// Lower-case names, in arrival order; a plugin's `set` moves its name to the end.
    headers: Vec<(Cow<'r, str>, Cow<'r, str>)>,
    client_addr: Option<String>,
    client_ip: Option<String>,
    subprotocols: Option<Vec<&'r str>>,
    cert_names: Vec<&'r str>,
    /// The tenant a plugin set, which later plugins see.
    tenant: Option<String>,
}

impl<'r> View<'r> {
    /// The view of `req` for a chain whose plugins read `fields` (`None`: all).
    pub(super) fn new(req: &'r RequestInfo, fields: Option<wit::Fields>) -> Self {
        let read = |f| reads(fields, f);
        // Lower-case already when the policy stage made `req`; a replayed capture may say
        // otherwise.
        let name = |n: &'r String| match n.bytes().any(|b| b.is_ascii_uppercase()) {
            true => Cow::Owned(n.to_ascii_lowercase()),
            false => Cow::Borrowed(n.as_str()),
        };
        let headers = (req.headers.iter())
            .map(|(n, v)| (name(n), Cow::Borrowed(v.as_str())))
            .collect();
        let tls = req.tls.as_ref().filter(|_| read(wit::Fields::TLS));
        View {
            req,
            headers,
            client_addr: read(wit::Fields::CLIENT_ADDR).then(|| req.client_addr.to_string()),
            client_ip: read(wit::Fields::CLIENT_IP).then(|| ip_text(req.client_addr.ip())),
            subprotocols: read(wit::Fields::SUBPROTOCOLS)
                .then(|| req.subprotocols.iter().map(String::as_str).collect()),
            cert_names: tls.map_or_else(Vec::new, |t| {
                t.client_cert_names.iter().map(String::as_str).collect()
            }),
            tenant: None,
        }
    }

    /// The headers named in `wanted` (lower-case; `None`: all), for [`View::request`].
    pub(super) fn headers(&self, wanted: Option<&[String]>) -> Vec<wit::HeaderParam<'_>> {
        (self.headers.iter())
            .filter(|(n, _)| wanted.is_none_or(|wanted| wanted.iter().any(|w| w == n)))
            .map(|(name, value)| wit::HeaderParam { name, value })
            .collect()
    }

    /// The request a plugin that reads `fields` (`None`: all) and the `headers` picked
    /// for it is shown: what it reads and nothing else is lowered into it (each field
    /// costs a guest allocation and a copy per call). The tenant shown is the one an
    /// earlier plugin set, if one did.
    pub(super) fn request<'a>(
        &'a self,
        headers: &'a [wit::HeaderParam<'a>],
        fields: Option<wit::Fields>,
    ) -> Request<'a> {
        let req = self.req;
        let read = |f| reads(fields, f);
        let text = |f: wit::Fields, s: &'a str| read(f).then_some(s);
        Request {
            kind: req.kind.into(),
            method: text(wit::Fields::METHOD, &req.method),
            scheme: text(wit::Fields::SCHEME, &req.scheme),
            authority: text(wit::Fields::AUTHORITY, &req.authority),
            path: text(wit::Fields::PATH, &req.path),
            query: text(wit::Fields::QUERY, &req.query),
            headers,
            client_addr: self
                .client_addr
                .as_deref()
                .filter(|_| read(wit::Fields::CLIENT_ADDR)),
            client_ip: self
                .client_ip
                .as_deref()
                .filter(|_| read(wit::Fields::CLIENT_IP)),
            tls: (req.tls.as_ref())
                .filter(|_| read(wit::Fields::TLS))
                .map(|t| wit::TlsInfo {
                    sni: t.sni.as_deref(),
                    alpn: t.alpn.as_deref(),
                    client_cert_subject: t.client_cert_subject.as_deref(),
                    client_cert_names: &self.cert_names,
                }),
            route: text(wit::Fields::ROUTE, &req.route),
            tenant: (self.tenant.as_deref())
                .or(req.tenant.as_deref())
                .filter(|_| read(wit::Fields::TENANT)),
            subprotocols: self
                .subprotocols
                .as_deref()
                .filter(|_| read(wit::Fields::SUBPROTOCOLS)),
        }
    }
}

/// Whether a plugin (or chain) that reads `fields` (`None`: all) reads `field`.
fn reads(fields: Option<wit::Fields>, field: wit::Fields) -> bool {
    fields.is_none_or(|fields| fields.contains(field))
}

impl<'a> From<&'a CloseInfo> for wit::CloseInfo<'a> {
    fn from(info: &'a CloseInfo) -> Self {
        wit::CloseInfo {
            kind: info.kind.into(),
            route: &info.route,
            tenant: info.tenant.as_deref(),
            upstream: info.upstream.as_deref(),
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
fn valid_header(h: &wit::HeaderResult) -> Result<(), String> {
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

/// Apply a plugin's `continue` to what the next plugin sees (headers and tenant), and
/// fold it into the chain's accumulated mutations. Names are lower-cased, as the
/// request's own are, whatever case the plugin used.
pub(super) fn accumulate(m: wit::Mutations, view: &mut View<'_>, acc: &mut Mutations) {
    let headers = &mut view.headers;
    for op in m.headers {
        let op = match op {
            wit::HeaderOp::Set(mut h) => {
                h.name.make_ascii_lowercase();
                headers.retain(|(n, _)| *n != h.name);
                headers.push((h.name.clone().into(), h.value.clone().into()));
                HeaderOp::Set(h.name, h.value)
            }
            wit::HeaderOp::Append(mut h) => {
                h.name.make_ascii_lowercase();
                headers.push((h.name.clone().into(), h.value.clone().into()));
                HeaderOp::Append(h.name, h.value)
            }
            wit::HeaderOp::Remove(name) => {
                let name = name.to_ascii_lowercase();
                headers.retain(|(n, _)| *n != name);
                HeaderOp::Remove(name)
            }
        };
        acc.headers.push(op);
    }
    if m.tenant.is_some() {
        view.tenant.clone_from(&m.tenant);
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

    fn header(name: &str, value: &str) -> wit::HeaderResult {
        wit::HeaderResult {
            name: name.into(),
            value: value.into(),
        }
    }

    fn info() -> RequestInfo {
        RequestInfo {
            kind: RequestKind::WebSocket,
            method: "GET".into(),
            scheme: "http".into(),
            authority: "a.example".into(),
            path: "/p".into(),
            query: String::new(),
            headers: vec![
                ("X-User".into(), "spoofed".into()),
                ("origin".into(), "https://a.example".into()),
            ],
            client_addr: "127.0.0.1:1".parse().unwrap(),
            tls: None,
            route: "r".into(),
            tenant: None,
            subprotocols: vec!["chat".into()],
        }
    }

    fn continuing(headers: Vec<wit::HeaderOp>, tenant: Option<&str>) -> wit::Mutations {
        wit::Mutations {
            headers,
            pool: None,
            tenant: tenant.map(Into::into),
            sticky_key: None,
            subprotocol: None,
            log_fields: Vec::new(),
            reuse_ms: 0,
        }
    }

    fn shown(view: &View<'_>, wanted: Option<&[String]>) -> Vec<(String, String)> {
        (view.headers(wanted).iter())
            .map(|h| (h.name.to_owned(), h.value.to_owned()))
            .collect()
    }

    #[test]
    fn accumulated_header_names_are_lower_case() {
        let info = info();
        let mut view = View::new(&info, None);
        let m = continuing(
            vec![
                wit::HeaderOp::Set(header("X-User", "alice")),
                wit::HeaderOp::Append(header("X-Tag", "a")),
            ],
            None,
        );
        let mut acc = Mutations::default();
        accumulate(m, &mut view, &mut acc);
        // The client's `X-User` is replaced, not kept beside the plugin's.
        let seen = shown(&view, None);
        let seen: Vec<(&str, &str)> = seen.iter().map(|(n, v)| (&**n, &**v)).collect();
        assert_eq!(
            seen,
            [
                ("origin", "https://a.example"),
                ("x-user", "alice"),
                ("x-tag", "a")
            ]
        );
        assert_eq!(
            acc.headers,
            [
                HeaderOp::Set("x-user".into(), "alice".into()),
                HeaderOp::Append("x-tag".into(), "a".into())
            ]
        );
    }

    #[test]
    fn each_plugin_is_shown_what_it_reads_as_the_plugins_before_left_it() {
        let info = info();
        let mut view = View::new(&info, None);
        let origin = ["origin".to_owned()];
        let headers = view.headers(Some(&origin));
        let req = view.request(&headers, Some(wit::Fields::PATH));
        assert_eq!(req.headers.len(), 1);
        assert_eq!(
            (req.headers[0].name, req.headers[0].value),
            ("origin", "https://a.example")
        );
        assert_eq!((req.path, req.method, req.query), (Some("/p"), None, None));
        assert_eq!(
            (req.client_ip, req.subprotocols, req.tenant),
            (None, None, None)
        );
        // Every field read: the ones the view writes once are shown too.
        let req = view.request(&headers, None);
        assert_eq!(req.client_ip, Some("127.0.0.1"));
        assert_eq!(req.client_addr, Some("127.0.0.1:1"));
        assert_eq!(req.subprotocols, Some(&["chat"][..]));
        drop(headers);
        // A later plugin sees an earlier one's tenant and header changes.
        let m = continuing(vec![wit::HeaderOp::Remove("Origin".into())], Some("t1"));
        accumulate(m, &mut view, &mut Mutations::default());
        let headers = view.headers(Some(&origin));
        let req = view.request(&headers, Some(wit::Fields::TENANT));
        assert!(req.headers.is_empty());
        assert_eq!(req.tenant, Some("t1"));
        assert_eq!(
            view.request(&headers, Some(wit::Fields::empty())).tenant,
            None
        );
    }
}
