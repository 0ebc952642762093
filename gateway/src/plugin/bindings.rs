//! The one `bindgen!` site, and conversions between the generated WIT types
//! and the gateway's own plain types (so no wasmtime type leaves `plugin`).

use std::borrow::Cow;

use crate::headers::{ip_text, is_field_value, is_token, lower_case};

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
pub(super) use wit::Request;

impl From<RequestKind> for wit::RequestKind {
    fn from(kind: RequestKind) -> Self {
        match kind {
            RequestKind::WebSocket => wit::RequestKind::Websocket,
            RequestKind::Http => wit::RequestKind::Http,
        }
    }
}

/// What a chain's plugins are shown of one request, borrowed from it, and the changes
/// the plugins so far asked for: each plugin sees the client's headers with those
/// changes made (read from the changes, not copied into the view), the tenant one of
/// them set, and the fields that are not text in the request (addresses), each written
/// once for the whole chain.
pub(super) struct View<'r> {
    req: &'r RequestInfo<'r>,
    /// The client's headers, names lower-case, in arrival order.
    headers: Vec<(Cow<'r, str>, &'r str)>,
    client_addr: Option<String>,
    client_ip: Option<String>,
    /// What the plugins so far asked for ([`accumulate`]).
    changes: Mutations,
}

impl<'r> View<'r> {
    /// The view of `req` for a chain whose plugins read `fields` (`None`: all).
    pub(super) fn new(req: &'r RequestInfo<'r>, fields: Option<wit::Fields>) -> Self {
        let read = |f| reads(fields, f);
        // Lower-case already when the policy stage made `req`; a replayed capture may say
        // otherwise.
        let headers = (req.headers.iter())
            .map(|(n, v)| (lower_case(n), v.as_ref()))
            .collect();
        View {
            req,
            headers,
            client_addr: read(wit::Fields::CLIENT_ADDR).then(|| req.client_addr.to_string()),
            client_ip: read(wit::Fields::CLIENT_IP).then(|| ip_text(req.client_addr.ip())),
            changes: Mutations::default(),
        }
    }

    /// The tenant the route or an earlier plugin assigned.
    pub(super) fn tenant(&self) -> Option<&str> {
        (self.changes.tenant.as_deref()).or(self.req.tenant.as_deref())
    }

    /// What the plugins so far asked for.
    pub(super) fn into_changes(self) -> Mutations {
        self.changes
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
            (wit::Fields::METHOD, &*req.method),
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
        // The client's headers that no plugin set or removed, then the values plugins
        // set or appended that no later plugin set or removed, in the order made.
        let shown = |name: &str| wanted.is_none_or(|wanted| wanted.iter().any(|w| w == name));
        let ops = self.changes.headers.as_slice();
        let mut headers = 0;
        for (name, value) in &self.headers {
            if shown(name) && !replaced(name, ops) {
                part(name);
                part(value);
                headers += 1;
            }
        }
        for (i, op) in ops.iter().enumerate() {
            if let HeaderOp::Set(name, value) | HeaderOp::Append(name, value) = op
                && shown(name)
                && !replaced(name, &ops[i + 1..])
            {
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

/// Whether one of `ops` sets or removes the header `name`, replacing its values before.
fn replaced(name: &str, ops: &[HeaderOp]) -> bool {
    ops.iter().any(|op| match op {
        HeaderOp::Set(n, _) | HeaderOp::Remove(n) => n == name,
        HeaderOp::Append(..) => false,
    })
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

/// A plugin's decision, its text checked item by item ([`Decision::check`]): what the
/// chain acts on and what the reuse table keeps (one string, so a copy is cheap).
#[derive(Debug, Clone)]
pub(super) struct Decision(wit::Decision);

/// A change a decision makes to a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Set,
    Append,
    Remove,
}

/// A choice a decision that lets a request through makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    Pool,
    Tenant,
    StickyKey,
    Subprotocol,
}

/// An item of a decision's text (see the WIT's `decision`).
#[derive(Debug, PartialEq, Eq)]
enum Item<'d> {
    /// A header change: the name (in the case the plugin wrote it), then the value
    /// (empty for a removal).
    Header(Change, &'d str, &'d str),
    /// A choice.
    Choice(Choice, &'d str),
    /// An access-log field.
    Log(&'d str, &'d str),
}

impl Decision {
    /// `d` when the gateway can act on it: a status of 0 or 300-599, as many items as
    /// it says, each of a known kind with all its parts, header names tokens and values
    /// field values (what a header map would take, checked without making one), and no
    /// choice or body on the wrong side. A bad decision from a plugin is a plugin fault,
    /// never a gateway error.
    pub(super) fn check(d: wit::Decision) -> Result<Decision, String> {
        let refuses = match d.status {
            0 => false,
            300..=599 => true,
            other => return Err(format!("status {other} is neither 0 nor 300-599")),
        };
        let body = read(&d, |item| match item {
            Item::Header(Change::Remove, name, _) => valid_name(name),
            Item::Header(_, name, value) | Item::Log(name, value) => valid_header(name, value),
            Item::Choice(..) if refuses => Err("a refusal makes no choices".into()),
            Item::Choice(..) => Ok(()),
        })?;
        if !refuses && !body.is_empty() {
            return Err("a decision that lets the request through has no body".into());
        }
        Ok(Decision(d))
    }

    /// Whether it refuses the request.
    pub(super) fn refuses(&self) -> bool {
        self.0.status != 0
    }

    /// How long it may be given again without a call (`reuse-ms`).
    pub(super) fn reuse_ms(&self) -> u32 {
        self.0.reuse_ms
    }

    /// Hands its items to `each`, in order, and returns its body.
    fn items(&self, mut each: impl FnMut(Item<'_>)) -> &str {
        // Checked when it was made: reading it again finds no fault.
        read(&self.0, |item| {
            each(item);
            Ok(())
        })
        .unwrap_or_default()
    }
}

/// Walks a decision's text, handing each item to `each`, and returns the body; the
/// first item missing, unknown or short of a part, or `each`'s first error, ends the
/// walk.
fn read<'d>(
    d: &'d wit::Decision,
    mut each: impl FnMut(Item<'d>) -> Result<(), String>,
) -> Result<&'d str, String> {
    let text = d.text.as_str();
    let mut nuls = memchr::memchr_iter(0, text.as_bytes());
    let mut at = 0;
    // A NUL is ASCII: the text's slices at and after one are strings.
    let mut part = || {
        let end = nuls
            .next()
            .ok_or_else(|| format!("its text ends inside one of the {} items it says", d.items))?;
        let part = &text[at..end];
        at = end + 1;
        Ok::<_, String>(part)
    };
    for _ in 0..d.items {
        // The kind is the part's first character, and ASCII: it ends at a char boundary.
        let kind = part()?;
        let (tag, first) = match kind.as_bytes().first() {
            Some(tag) if tag.is_ascii() => (*tag, &kind[1..]),
            _ => return Err(format!("item {kind:?} does not start with its kind")),
        };
        let item = match tag {
            b'=' => Item::Header(Change::Set, first, part()?),
            b'+' => Item::Header(Change::Append, first, part()?),
            b'-' => Item::Header(Change::Remove, first, ""),
            b'p' => Item::Choice(Choice::Pool, first),
            b't' => Item::Choice(Choice::Tenant, first),
            b'k' => Item::Choice(Choice::StickyKey, first),
            b's' => Item::Choice(Choice::Subprotocol, first),
            b'l' => Item::Log(first, part()?),
            _ => return Err(format!("item {kind:?} is of no known kind")),
        };
        each(item)?;
    }
    Ok(&text[at..])
}

fn valid_header(name: &str, value: &str) -> Result<(), String> {
    valid_name(name)?;
    match is_field_value(value.as_bytes()) {
        true => Ok(()),
        false => Err(format!("invalid value for header {name:?}")),
    }
}

fn valid_name(name: &str) -> Result<(), String> {
    match is_token(name.as_bytes()) {
        true => Ok(()),
        false => Err(format!("invalid header name {name:?}")),
    }
}

/// Fold a plugin's decision to let the request through into the chain's changes, which
/// the next plugins see (headers and tenant). Header and log field names are
/// lower-cased, as the request's own are, whatever case the plugin used.
pub(super) fn accumulate(d: &Decision, view: &mut View<'_>) {
    let acc = &mut view.changes;
    d.items(|item| match item {
        Item::Header(change, name, value) => {
            let name = name.to_ascii_lowercase();
            acc.headers.push(match change {
                Change::Set => HeaderOp::Set(name, value.to_owned()),
                Change::Append => HeaderOp::Append(name, value.to_owned()),
                Change::Remove => HeaderOp::Remove(name),
            });
        }
        Item::Choice(choice, value) => {
            let slot = match choice {
                Choice::Pool => &mut acc.pool,
                Choice::Tenant => &mut acc.tenant,
                Choice::StickyKey => &mut acc.sticky_key,
                Choice::Subprotocol => &mut acc.subprotocol,
            };
            *slot = Some(value.to_owned());
        }
        Item::Log(name, value) => {
            acc.log_fields
                .push((name.to_ascii_lowercase(), value.to_owned()));
        }
    });
}

/// A plugin's refusal, as the gateway's type, keeping the log fields the plugins
/// before it added (`earlier`).
pub(super) fn denial(d: &Decision, plugin: &str, earlier: Mutations) -> ChainDecision {
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut log_fields = earlier.log_fields;
    let body = d.items(|item| match item {
        Item::Header(change, name, value) => {
            let name = name.to_ascii_lowercase();
            if change != Change::Append {
                headers.retain(|(n, _)| *n != name);
            }
            if change != Change::Remove {
                headers.push((name, value.to_owned()));
            }
        }
        Item::Choice(..) => {}
        Item::Log(name, value) => log_fields.push((name.to_ascii_lowercase(), value.to_owned())),
    });
    ChainDecision::Deny(Denial {
        status: d.0.status,
        headers,
        body: body.to_owned(),
        log_fields,
        plugin: plugin.to_owned(),
        fault: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::types::TlsInfo;

    fn info() -> RequestInfo<'static> {
        RequestInfo {
            kind: RequestKind::WebSocket,
            method: "GET".into(),
            scheme: "http".into(),
            authority: "a.example".into(),
            path: "/p".into(),
            query: "".into(),
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

    /// A decision as a plugin would send it: `status`, its items (each its parts, the
    /// first led by the item's kind), then the body.
    fn crossing(status: u16, items: &[&[&str]], body: &str) -> wit::Decision {
        let parts: String = items
            .iter()
            .flat_map(|item| item.iter())
            .map(|p| format!("{p}\0"))
            .collect();
        raw(status, items.len(), &(parts + body))
    }

    /// A decision of `items` items whose text is `text`, as written.
    fn raw(status: u16, items: usize, text: &str) -> wit::Decision {
        wit::Decision {
            status,
            reuse_ms: 0,
            items: items as u32,
            text: text.into(),
        }
    }

    fn checked(d: wit::Decision) -> Decision {
        Decision::check(d).expect("a good decision")
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
        let d = checked(crossing(0, &[&["=X-User", "alice"], &["+X-Tag", "a"]], ""));
        accumulate(&d, &mut view);
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
            view.into_changes().headers,
            [
                HeaderOp::Set("x-user".into(), "alice".into()),
                HeaderOp::Append("x-tag".into(), "a".into())
            ]
        );
    }

    #[test]
    fn later_plugins_see_headers_as_the_changes_before_them_left_them() {
        let info = info();
        let mut view = View::new(&info, None);
        let steps: [&[&[&str]]; 4] = [
            // Appended to the client's value, then a set that replaces both.
            &[&["+origin", "https://b.example"], &["+x-tag", "1"]],
            &[&["=x-tag", "2"], &["+x-tag", "3"], &["=x-gone", "1"]],
            &[&["-x-gone"], &["+origin", "https://c.example"]],
            &[&["=x-user", "alice"]],
        ];
        // What the next plugin is shown after each step, as `name=value` in order.
        let shown = [
            "x-user=spoofed origin=https://a.example origin=https://b.example x-tag=1",
            "x-user=spoofed origin=https://a.example origin=https://b.example x-tag=2 x-tag=3 \
             x-gone=1",
            "x-user=spoofed origin=https://a.example origin=https://b.example x-tag=2 x-tag=3 \
             origin=https://c.example",
            "origin=https://a.example origin=https://b.example x-tag=2 x-tag=3 \
             origin=https://c.example x-user=alice",
        ];
        let pairs = |req: &Request<'_>| {
            let parts = parts(req);
            let pairs: Vec<String> = parts.chunks(2).map(|p| p.join("=")).collect();
            pairs.join(" ")
        };
        let mut text = Parts::default();
        for (items, expected) in steps.iter().zip(shown) {
            accumulate(&checked(crossing(0, items, "")), &mut view);
            let req = view.request(None, Some(wit::Fields::empty()), &mut text);
            assert_eq!(pairs(&req), expected, "after {items:?}");
            assert_eq!(req.headers as usize, expected.split(' ').count());
        }
        // Only the headers a plugin reads are shown, with the same changes made.
        let wanted = ["x-tag".to_owned()];
        let req = view.request(Some(&wanted), Some(wit::Fields::empty()), &mut text);
        assert_eq!(pairs(&req), "x-tag=2 x-tag=3");
    }

    #[test]
    fn a_decision_is_read_in_the_wits_order() {
        let info = info();
        let mut view = View::new(&info, None);
        let d = checked(crossing(
            0,
            &[
                &["-origin"],
                &["pred"],
                &["=x-a", "1"],
                &["kk"],
                &["luser", "alice"],
                &["schat"],
                &["pblue"],
            ],
            "",
        ));
        assert!(!d.refuses());
        view.changes = Mutations {
            pool: Some("green".into()),
            tenant: Some("t0".into()),
            ..Mutations::default()
        };
        accumulate(&d, &mut view);
        assert_eq!(
            view.into_changes(),
            Mutations {
                headers: vec![
                    HeaderOp::Remove("origin".into()),
                    HeaderOp::Set("x-a".into(), "1".into())
                ],
                pool: Some("blue".into()),
                tenant: Some("t0".into()),
                sticky_key: Some("k".into()),
                subprotocol: Some("chat".into()),
                log_fields: vec![("user".into(), "alice".into())],
            }
        );
        // A refusal's header changes make its response headers; its body may hold NULs.
        let d = checked(crossing(
            429,
            &[
                &["=Retry-After", "1"],
                &["+x-b", "1"],
                &["lWhy", "slow"],
                &["+x-b", "2"],
                &["=retry-after", "60"],
            ],
            "slow\0down",
        ));
        let earlier = Mutations {
            log_fields: vec![("user".into(), "alice".into())],
            ..Mutations::default()
        };
        let ChainDecision::Deny(denial) = denial(&d, "p", earlier) else {
            panic!("a refusal")
        };
        assert_eq!(denial.status, 429);
        assert_eq!(
            denial.headers,
            [
                ("x-b".to_owned(), "1".to_owned()),
                ("x-b".into(), "2".into()),
                ("retry-after".into(), "60".into())
            ]
        );
        assert_eq!(denial.body, "slow\0down");
        assert_eq!(
            denial.log_fields,
            [
                ("user".to_owned(), "alice".to_owned()),
                ("why".into(), "slow".into())
            ]
        );
    }

    #[test]
    fn a_malformed_decision_is_refused_with_the_reason() {
        let refused = |d: wit::Decision| Decision::check(d).expect_err("refused");
        let ok = crossing(0, &[&["=x-a", "1"], &["ll", "v"]], "");
        assert!(Decision::check(ok.clone()).is_ok());
        let cases = [
            (crossing(200, &[], ""), "status 200"),
            (crossing(600, &[], ""), "status 600"),
            (
                wit::Decision {
                    items: 3,
                    ..ok.clone()
                },
                "ends inside",
            ),
            (raw(0, 1, "=x-a\0"), "ends inside"),
            (raw(0, 1, "=x-a"), "ends inside"),
            (crossing(0, &[&["*x-a", "1"]], ""), "no known kind"),
            (crossing(0, &[&[""]], ""), "does not start with its kind"),
            (
                crossing(0, &[&["\u{e9}x"]], ""),
                "does not start with its kind",
            ),
            (crossing(0, &[&["=", "1"]], ""), "invalid header name"),
            (crossing(0, &[&["=x a", "1"]], ""), "invalid header name"),
            (crossing(0, &[&["-x a"]], ""), "invalid header name"),
            (crossing(0, &[&["=x-a", "1\r\n"]], ""), "invalid value"),
            (
                crossing(0, &[&["lbad name", "v"]], ""),
                "invalid header name",
            ),
            (crossing(0, &[], "a body"), "has no body"),
            (crossing(403, &[&["pblue"]], ""), "no choices"),
        ];
        for (d, why) in cases {
            let reason = refused(d.clone());
            assert!(reason.contains(why), "{d:?}: {reason}");
        }
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
        let d = checked(crossing(0, &[&["-Origin"], &["tt1"]], ""));
        accumulate(&d, &mut view);
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
