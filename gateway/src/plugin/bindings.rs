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
        // A request's parts are lowered into each plugin from the chain's buffers
        // (`Parts`), and close infos from borrowed text, not copied into owned records
        // first.
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
/// (addresses), each written once for the whole chain.
pub(super) struct View<'r> {
    req: &'r RequestInfo,
    /// Lower-case names, in arrival order; a plugin's `set` moves its name to the end.
    headers: Vec<(Cow<'r, str>, Cow<'r, str>)>,
    client_addr: Option<String>,
    client_ip: Option<String>,
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
        View {
            req,
            headers,
            client_addr: read(wit::Fields::CLIENT_ADDR).then(|| req.client_addr.to_string()),
            client_ip: read(wit::Fields::CLIENT_IP).then(|| ip_text(req.client_addr.ip())),
            tenant: None,
        }
    }

    /// The tenant the route or an earlier plugin assigned.
    pub(super) fn tenant(&self) -> Option<&str> {
        (self.tenant.as_deref()).or(self.req.tenant.as_deref())
    }

    /// The request a plugin that reads `fields` (`None`: all) and the headers named in
    /// `wanted` (lower-case; `None`: all) is shown, its parts written into `parts` (see
    /// the WIT's `request`): what it reads and nothing else crosses into it, in one
    /// string. The tenant shown is the one an earlier plugin set, if one did.
    pub(super) fn request<'a>(
        &self,
        wanted: Option<&[String]>,
        fields: Option<wit::Fields>,
        parts: &'a mut Parts,
    ) -> Request<'a> {
        let req = self.req;
        let fields = fields.unwrap_or_else(wit::Fields::all);
        parts.text.clear();
        parts.ends.clear();
        let mut part = |value: &str| parts.push(value);
        let tenant = self.tenant();
        let texts = [
            (wit::Fields::METHOD, req.method.as_str()),
            (wit::Fields::SCHEME, &req.scheme),
            (wit::Fields::AUTHORITY, &req.authority),
            (wit::Fields::PATH, &req.path),
            (wit::Fields::QUERY, &req.query),
            (
                wit::Fields::CLIENT_ADDR,
                self.client_addr.as_deref().unwrap_or(""),
            ),
            (
                wit::Fields::CLIENT_IP,
                self.client_ip.as_deref().unwrap_or(""),
            ),
            (wit::Fields::ROUTE, &req.route),
            (wit::Fields::TENANT, tenant.unwrap_or("")),
        ];
        for (field, value) in texts {
            if fields.contains(field) {
                part(value);
            }
        }
        let tls = req
            .tls
            .as_ref()
            .filter(|_| fields.contains(wit::Fields::TLS));
        if let Some(tls) = tls {
            for value in [&tls.sni, &tls.alpn, &tls.client_cert_subject] {
                part(value.as_deref().unwrap_or(""));
            }
            tls.client_cert_names.iter().for_each(|n| part(n));
        }
        let subprotocols = match fields.contains(wit::Fields::SUBPROTOCOLS) {
            true => req.subprotocols.as_slice(),
            false => &[],
        };
        subprotocols.iter().for_each(|p| part(p));
        let mut headers = 0;
        for (name, value) in &self.headers {
            if wanted.is_none_or(|wanted| wanted.iter().any(|w| w == name)) {
                part(name);
                part(value);
                headers += 1;
            }
        }
        Request {
            kind: req.kind.into(),
            fields,
            tls_on: tls.is_some(),
            cert_names: count(tls.map_or(0, |t| t.client_cert_names.len())),
            subprotocols: count(subprotocols.len()),
            headers: count(headers),
            text: &parts.text,
            ends: &parts.ends,
        }
    }
}

/// A request's `text` and `ends` (see the WIT's `request`), kept by a chain for its
/// plugins in turn.
#[derive(Default)]
pub(super) struct Parts {
    text: String,
    ends: Vec<u32>,
}

impl Parts {
    /// Room for a usual request, so writing one does not grow them.
    pub(super) fn new() -> Self {
        Parts {
            text: String::with_capacity(512),
            ends: Vec::with_capacity(32),
        }
    }

    /// Appends `value` and its NUL; a NUL inside it (a route or tenant name, a
    /// certificate's subject can hold one) is written as U+FFFD so it cannot end the
    /// part early for a reader that splits at NULs.
    fn push(&mut self, value: &str) {
        match value.contains('\0') {
            false => self.text.push_str(value),
            true => self.text.push_str(&value.replace('\0', "\u{FFFD}")),
        }
        self.ends.push(count(self.text.len()));
        self.text.push('\0');
    }
}

/// A count or offset for the WIT's `u32` (a request is far smaller).
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
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
    use crate::plugin::types::TlsInfo;

    fn header(name: &str, value: &str) -> wit::Header {
        wit::Header {
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

    /// The parts of a request's text, split at its NULs, which `ends` must agree with.
    fn parts<'a>(req: &Request<'a>) -> Vec<&'a str> {
        let parts: Vec<&str> = match req.text.strip_suffix('\0') {
            None => Vec::new(),
            Some(text) => text.split('\0').collect(),
        };
        let mut at = 0;
        for (part, &end) in parts.iter().zip(req.ends) {
            assert_eq!(&req.text[at..end as usize], *part);
            at = end as usize + 1;
        }
        assert_eq!(req.ends.len(), parts.len());
        parts
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
        let mut text = Parts::default();
        let req = view.request(None, Some(wit::Fields::empty()), &mut text);
        assert_eq!(req.headers, 3);
        assert_eq!(
            parts(&req),
            [
                "origin",
                "https://a.example",
                "x-user",
                "alice",
                "x-tag",
                "a"
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
        let mut text = Parts::default();
        let req = view.request(Some(&origin), Some(wit::Fields::PATH), &mut text);
        assert_eq!(
            (req.fields, req.headers, req.subprotocols),
            (wit::Fields::PATH, 1, 0)
        );
        assert_eq!(parts(&req), ["/p", "origin", "https://a.example"]);
        // Every field read: the ones the view writes once are shown too, in the WIT's
        // order.
        let req = view.request(Some(&origin), None, &mut text);
        assert_eq!((req.fields, req.tls_on), (wit::Fields::all(), false));
        assert_eq!((req.subprotocols, req.headers, req.cert_names), (1, 1, 0));
        assert_eq!(
            parts(&req),
            [
                "GET",
                "http",
                "a.example",
                "/p",
                "",
                "127.0.0.1:1",
                "127.0.0.1",
                "r",
                "",
                "chat",
                "origin",
                "https://a.example"
            ]
        );
        // A later plugin sees an earlier one's tenant and header changes.
        let m = continuing(vec![wit::HeaderOp::Remove("Origin".into())], Some("t1"));
        accumulate(m, &mut view, &mut Mutations::default());
        let req = view.request(Some(&origin), Some(wit::Fields::TENANT), &mut text);
        assert_eq!((req.headers, parts(&req)), (0, vec!["t1"]));
        let req = view.request(Some(&origin), Some(wit::Fields::empty()), &mut text);
        assert_eq!((req.headers, req.text), (0, ""));
    }

    #[test]
    fn tls_parts_follow_the_text_fields_and_no_part_holds_a_nul() {
        let mut info = info();
        info.route = "r\0x".into();
        info.tls = Some(TlsInfo {
            sni: Some("a.example".into()),
            alpn: None,
            client_cert_subject: Some("CN=alice".into()),
            client_cert_names: vec!["alice.example".into(), "bob.example".into()],
        });
        let view = View::new(&info, None);
        let mut text = Parts::default();
        let fields = wit::Fields::ROUTE | wit::Fields::TLS | wit::Fields::SUBPROTOCOLS;
        let req = view.request(Some(&[]), Some(fields), &mut text);
        assert_eq!((req.tls_on, req.cert_names, req.subprotocols), (true, 2, 1));
        assert_eq!(
            parts(&req),
            [
                "r\u{FFFD}x",
                "a.example",
                "",
                "CN=alice",
                "alice.example",
                "bob.example",
                "chat"
            ]
        );
        // Without `tls` in its fields, a plugin is not told the listener's TLS at all.
        let req = view.request(Some(&[]), Some(wit::Fields::ROUTE), &mut text);
        assert_eq!((req.tls_on, req.cert_names), (false, 0));
    }
}
