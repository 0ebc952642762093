//! Native test helpers: build requests, run a plugin's hooks, control the
//! clock and inspect logs and counters, all without wasm. Native builds only.
//!
//! ```
//! use sluice_plugin_sdk::testing::{request, set_now_ms};
//! set_now_ms(1_700_000_000_000);
//! let req = request().path("/chat?room=1").header("origin", "https://a.example").build();
//! assert_eq!(req.query("room").as_deref(), Some("1"));
//! assert_eq!(sluice_plugin_sdk::host::now_secs(), 1_700_000_000);
//! ```

use crate::bindings::sluice::plugin::types as wire;
use crate::request::TEXT_FIELDS;
use crate::{CloseInfo, CloseReason, Config, Decision, Fields, Plugin, Request, RequestKind};

/// Run a plugin's `init` with a JSON config, as the gateway does at load.
pub fn init<P: Plugin>(config_json: &str) -> Result<P, String> {
    P::init(Config::new(config_json))
}

/// Run a plugin's `on_request` as the gateway does: with only the headers
/// its [`Plugin::request_headers`] names and the fields its
/// [`Plugin::request_fields`] names (all of them for `None`). Reading anything
/// else panics with a message naming the declaration to add, failing the test.
pub fn on_request<P: Plugin>(plugin: &P, req: &Request) -> Decision {
    let wanted = plugin.request_headers();
    let fields = plugin.request_fields().unwrap_or_else(Fields::all);
    let wanted_lower: Option<Vec<String>> =
        (wanted.as_ref()).map(|w| w.iter().map(|n| n.to_ascii_lowercase()).collect());
    let seen = Draft::of(req).pack(fields, wanted_lower.as_deref());
    /// Lifts the header declaration when the call ends, even by a panic.
    struct Undeclare;
    impl Drop for Undeclare {
        fn drop(&mut self) {
            crate::declare_headers(None);
        }
    }
    crate::declare_headers(wanted);
    let _undeclare = Undeclare;
    plugin.on_request(&seen)
}

/// A request's parts, owned: what a [`RequestBuilder`] collects, and what
/// [`on_request`] narrows to a plugin's declarations.
#[derive(Debug, Clone)]
struct Draft {
    kind: RequestKind,
    /// The fields given (a built request has all).
    fields: Fields,
    /// The text fields' values, in [`TEXT_FIELDS`] order (`tenant`: empty for none).
    texts: [String; 9],
    /// SNI, ALPN and client certificate subject (each empty when absent), and the
    /// certificate's DNS names; `None` on plain text.
    tls: Option<([String; 3], Vec<String>)>,
    subprotocols: Vec<String>,
    headers: Vec<(String, String)>,
}

impl Draft {
    /// The parts of `req` (of the fields it was given).
    fn of(req: &Request) -> Draft {
        let given = req.fields();
        let read = |f: Fields, value: fn(&Request) -> &str| match given.contains(f) {
            true => value(req).to_owned(),
            false => String::new(),
        };
        let texts = [
            read(Fields::METHOD, Request::method),
            read(Fields::SCHEME, Request::scheme),
            read(Fields::AUTHORITY, Request::authority),
            read(Fields::PATH, Request::path),
            read(Fields::QUERY, Request::query_string),
            read(Fields::CLIENT_ADDR, Request::client_addr),
            read(Fields::CLIENT_IP, Request::client_ip),
            read(Fields::ROUTE, Request::route),
            read(Fields::TENANT, |r| r.tenant().unwrap_or("")),
        ];
        let owned = |v: Option<&str>| v.unwrap_or("").to_owned();
        let tls = (given.contains(Fields::TLS))
            .then(|| req.tls())
            .flatten()
            .map(|t| {
                let names = t
                    .client_cert_names
                    .iter()
                    .map(|n| (*n).to_owned())
                    .collect();
                (
                    [owned(t.sni), owned(t.alpn), owned(t.client_cert_subject)],
                    names,
                )
            });
        let subprotocols = match given.contains(Fields::SUBPROTOCOLS) {
            true => req.subprotocols().map(str::to_owned).collect(),
            false => Vec::new(),
        };
        Draft {
            kind: req.kind(),
            fields: given,
            texts,
            tls,
            subprotocols,
            headers: (req.headers())
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect(),
        }
    }

    /// The request as the gateway shows it to a plugin that reads `fields` and the
    /// headers named in `wanted` (lower-case; `None`: all).
    fn pack(&self, fields: Fields, wanted: Option<&[String]>) -> Request {
        let fields = fields & self.fields;
        let (mut text, mut ends) = (String::new(), Vec::new());
        let mut part = |value: &str| {
            text.push_str(value);
            ends.push(u32::try_from(text.len()).unwrap_or(u32::MAX));
            text.push('\0');
        };
        for (field, value) in TEXT_FIELDS.iter().zip(&self.texts) {
            if fields.contains(*field) {
                part(value);
            }
        }
        let tls = self.tls.as_ref().filter(|_| fields.contains(Fields::TLS));
        if let Some((values, names)) = tls {
            values.iter().chain(names).for_each(|v| part(v));
        }
        let subprotocols = match fields.contains(Fields::SUBPROTOCOLS) {
            true => self.subprotocols.as_slice(),
            false => &[],
        };
        subprotocols.iter().for_each(|p| part(p));
        let mut headers = 0;
        for (name, value) in &self.headers {
            if wanted.is_none_or(|w| w.contains(name)) {
                part(name);
                part(value);
                headers += 1;
            }
        }
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Request::from(wire::Request {
            kind: self.kind,
            fields,
            tls_on: tls.is_some(),
            cert_names: count(tls.map_or(0, |(_, names)| names.len())),
            subprotocols: count(subprotocols.len()),
            headers,
            text,
            ends,
        })
    }
}

/// Start a request: `GET ws://example.com/`, a WebSocket upgrade on route
/// `default` from `127.0.0.1:40000`, no headers.
pub fn request() -> RequestBuilder {
    let text = |s: &str| s.to_owned();
    RequestBuilder(Draft {
        kind: RequestKind::Websocket,
        fields: Fields::all(),
        texts: [
            text("GET"),
            text("http"),
            text("example.com"),
            text("/"),
            String::new(),
            text("127.0.0.1:40000"),
            text("127.0.0.1"),
            text("default"),
            String::new(),
        ],
        tls: None,
        subprotocols: Vec::new(),
        headers: Vec::new(),
    })
}

/// Builder for a [`Request`]; see [`request`].
#[derive(Debug, Clone)]
pub struct RequestBuilder(Draft);

impl RequestBuilder {
    fn set(mut self, field: Fields, value: &str) -> Self {
        let i = TEXT_FIELDS.iter().position(|f| *f == field).unwrap_or(0);
        self.0.texts[i] = value.to_owned();
        self
    }

    /// Make it a plain HTTP request instead of an upgrade.
    pub fn http(mut self) -> Self {
        self.0.kind = RequestKind::Http;
        self
    }

    /// Set the method.
    pub fn method(self, method: &str) -> Self {
        self.set(Fields::METHOD, method)
    }

    /// Set the authority (`host[:port]`).
    pub fn authority(self, authority: &str) -> Self {
        self.set(Fields::AUTHORITY, authority)
    }

    /// Set path and query from `"/path?query"`.
    pub fn path(self, path_and_query: &str) -> Self {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        self.set(Fields::PATH, path).set(Fields::QUERY, query)
    }

    /// Add a header (name lower-cased, as the gateway delivers them).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.0
            .headers
            .push((name.to_ascii_lowercase(), value.into()));
        if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            let offered = value.split(',').map(|p| p.trim().to_owned());
            self.0.subprotocols.extend(offered);
        }
        self
    }

    /// Mark the request as arriving over TLS with this SNI.
    pub fn tls_sni(mut self, sni: &str) -> Self {
        self.0.tls = Some(([sni.into(), "http/1.1".into(), String::new()], Vec::new()));
        self.set(Fields::SCHEME, "https")
    }

    /// Set the client address (`ip:port`, `[ipv6]:port`), and the client IP
    /// from it, as the gateway gives them.
    pub fn client(self, addr: &str) -> Self {
        let ip = addr.rsplit_once(':').map_or(addr, |(ip, _)| ip);
        let ip = ip
            .strip_prefix('[')
            .and_then(|ip| ip.strip_suffix(']'))
            .unwrap_or(ip);
        self.set(Fields::CLIENT_IP, ip)
            .set(Fields::CLIENT_ADDR, addr)
    }

    /// Set the route name.
    pub fn route(self, route: &str) -> Self {
        self.set(Fields::ROUTE, route)
    }

    /// Set the tenant name.
    pub fn tenant(self, tenant: &str) -> Self {
        self.set(Fields::TENANT, tenant)
    }

    /// Finish.
    pub fn build(self) -> Request {
        self.0.pack(Fields::all(), None)
    }
}

/// A close report for a WebSocket on route `default` that ended normally.
pub fn close_info() -> CloseInfo {
    CloseInfo {
        kind: RequestKind::Websocket,
        route: "default".into(),
        tenant: None,
        upstream: Some("127.0.0.1:9000".into()),
        duration_ms: 1_000,
        bytes_from_client: 0,
        bytes_to_client: 0,
        reason: CloseReason::Completed,
    }
}

/// A log record captured by the native host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Severity.
    pub level: crate::Level,
    /// Message text.
    pub message: String,
    /// Key/value fields.
    pub fields: Vec<(String, String)>,
}

/// Set the native host's wall clock (milliseconds since the Unix epoch).
/// Until set, the real system clock is used.
pub fn set_now_ms(ms: u64) {
    host::STATE.with(|s| s.borrow_mut().now_ms = Some(ms));
}

/// Take the log records written on this thread so far.
pub fn take_logs() -> Vec<LogRecord> {
    host::STATE.with(|s| std::mem::take(&mut s.borrow_mut().logs))
}

/// Give the native host's watched document at `url` a new copy (its version grows by
/// one), as a fetch by the gateway would.
pub fn set_document(url: &str, body: &[u8]) {
    host::STATE.with(|s| {
        let mut s = s.borrow_mut();
        let version = s.documents.get(url).map_or(0, |d| d.version) + 1;
        s.documents.insert(
            url.to_owned(),
            crate::documents::Document {
                version,
                body: body.to_vec(),
            },
        );
    });
}

/// How many times the plugin asked for an early fetch of `url` on this thread.
pub fn refresh_requests(url: &str) -> usize {
    host::STATE.with(|s| s.borrow().refreshes.get(url).copied().unwrap_or(0))
}

/// The URLs the plugin watched on this thread, in order.
pub fn watched() -> Vec<String> {
    host::STATE.with(|s| s.borrow().watched.clone())
}

/// Forget this thread's logs, counters, documents and clock override.
pub fn reset() {
    host::STATE.with(|s| *s.borrow_mut() = host::State::default());
}

/// The native stand-in for the gateway's host imports (per test thread).
pub(crate) mod host {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::time::{Instant, SystemTime, UNIX_EPOCH};

    use super::LogRecord;
    use crate::Level;

    #[derive(Default)]
    pub(crate) struct State {
        pub(crate) now_ms: Option<u64>,
        pub(crate) logs: Vec<LogRecord>,
        /// key → (window start, count).
        counters: HashMap<String, (u64, u64)>,
        /// url → the current copy.
        pub(crate) documents: HashMap<String, crate::documents::Document>,
        /// url → early fetches asked for.
        pub(crate) refreshes: HashMap<String, usize>,
        pub(crate) watched: Vec<String>,
    }

    thread_local! {
        pub(crate) static STATE: RefCell<State> = RefCell::new(State::default());
        static ORIGIN: Instant = Instant::now();
    }

    pub(crate) fn log(level: Level, message: &str, fields: &[(String, String)]) {
        STATE.with(|s| {
            s.borrow_mut().logs.push(LogRecord {
                level,
                message: message.to_owned(),
                fields: fields.to_vec(),
            })
        });
    }

    pub(crate) fn now_ms() -> u64 {
        STATE.with(|s| s.borrow().now_ms).unwrap_or_else(|| {
            let since = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
    }

    pub(crate) fn monotonic_ns() -> u64 {
        ORIGIN.with(|o| u64::try_from(o.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    pub(crate) fn counter_add(key: &str, delta: u64, window_ms: u64) -> u64 {
        let start = now_ms() / window_ms * window_ms;
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            let slot = s.counters.entry(key.to_owned()).or_insert((start, 0));
            if slot.0 != start {
                *slot = (start, 0);
            }
            slot.1 = slot.1.saturating_add(delta);
            slot.1
        })
    }
}

/// The native stand-in for the `documents` imports: every URL may be watched, and
/// copies come from [`set_document`].
pub(crate) mod documents {
    use super::host::STATE;
    use crate::documents::Document;

    pub(crate) fn watch(url: &str, _min_ms: u32, _max_ms: u32) -> Result<(), String> {
        STATE.with(|s| s.borrow_mut().watched.push(url.to_owned()));
        Ok(())
    }

    pub(crate) fn latest(url: &str, seen: u64) -> Option<Document> {
        STATE.with(|s| {
            s.borrow()
                .documents
                .get(url)
                .filter(|d| d.version > seen)
                .cloned()
        })
    }

    pub(crate) fn refresh_soon(url: &str) {
        STATE.with(|s| *s.borrow_mut().refreshes.entry(url.to_owned()).or_default() += 1);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::host;

    #[test]
    fn counters_reset_per_window() {
        reset();
        set_now_ms(10_000);
        let w = Duration::from_secs(1);
        assert_eq!(host::counter_add("k", 1, w), 1);
        assert_eq!(host::counter_add("k", 2, w), 3);
        assert_eq!(host::counter_add("other", 0, w), 0);
        set_now_ms(11_000);
        assert_eq!(host::counter_add("k", 1, w), 1);
    }

    #[test]
    fn on_request_hides_headers_the_plugin_does_not_read() {
        struct Echo(Option<Vec<String>>);
        impl Plugin for Echo {
            fn init(_: Config) -> Result<Self, String> {
                Ok(Echo(None))
            }
            fn request_headers(&self) -> Option<Vec<String>> {
                self.0.clone()
            }
            fn on_request(&self, req: &Request) -> Decision {
                let names: Vec<&str> = req.headers().map(|(name, _)| name).collect();
                Decision::allow().set_header("x-saw", &names.join(","))
            }
        }
        let req = request()
            .header("Origin", "https://a.example")
            .header("cookie", "a=1")
            .header("origin", "https://b.example")
            .build();
        let saw = |p: &Echo| {
            on_request(p, &req)
                .upstream_header("x-saw")
                .map(str::to_owned)
        };
        assert_eq!(saw(&Echo(None)).as_deref(), Some("origin,cookie,origin"));
        let origin_only = Echo(Some(vec!["ORIGIN".into()]));
        assert_eq!(saw(&origin_only).as_deref(), Some("origin,origin"));
        assert_eq!(saw(&Echo(Some(Vec::new()))).as_deref(), Some(""));
        assert_eq!(
            crate::interest(&origin_only, crate::Hooks::empty()).headers,
            Some(vec!["ORIGIN".to_owned()])
        );
    }

    /// A plugin that reads what it did not declare fails its test, with the fix.
    #[test]
    fn reading_an_undeclared_field_or_header_is_loud() {
        struct Admin;
        impl Plugin for Admin {
            fn init(_: Config) -> Result<Self, String> {
                Ok(Admin)
            }
            fn request_headers(&self) -> Option<Vec<String>> {
                Some(vec!["origin".into()])
            }
            fn request_fields(&self) -> Option<Fields> {
                Some(Fields::QUERY)
            }
            fn on_request(&self, req: &Request) -> Decision {
                if req.query_string() == "cookie" {
                    let _ = req.cookie("session");
                }
                if req.path().starts_with("/admin") {
                    return Decision::deny(403, "no");
                }
                Decision::allow()
            }
        }
        let panic_of = |path: &str| {
            let req = request().path(path).build();
            let caught = std::panic::catch_unwind(|| on_request(&Admin, &req));
            let payload = caught.expect_err("an undeclared read panics");
            payload
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_default()
        };
        let message = panic_of("/admin");
        assert!(message.contains("add Fields::PATH"), "{message}");
        let message = panic_of("/x?cookie");
        assert!(message.contains("`cookie`"), "{message}");
        // Called directly (not as the gateway would), nothing is hidden.
        assert!(
            Admin
                .on_request(&request().path("/admin").build())
                .is_deny()
        );
    }

    #[test]
    fn logs_are_captured() {
        reset();
        host::log(crate::Level::Warn, "hi", &[("a", "b")]);
        host::info("there");
        let logs = take_logs();
        assert_eq!(logs.len(), 2);
        assert_eq!(logs[0].fields, [("a".to_owned(), "b".to_owned())]);
        assert!(take_logs().is_empty());
    }

    #[test]
    fn subprotocols_follow_the_header() {
        let req = request()
            .header("Sec-WebSocket-Protocol", "chat, bearer.abc")
            .build();
        assert_eq!(
            req.subprotocols().collect::<Vec<_>>(),
            ["chat", "bearer.abc"]
        );
    }
}
