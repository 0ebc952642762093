//! The gateway-side plain types of the plugin API: what the request path
//! hands the chain and what it gets back. No wasmtime type appears here.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

/// Which kind of exchange a request opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// A WebSocket upgrade.
    WebSocket,
    /// A plain HTTP request.
    Http,
}

/// TLS facts about the client connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsInfo {
    /// SNI server name.
    pub sni: Option<String>,
    /// Negotiated ALPN protocol.
    pub alpn: Option<String>,
    /// Verified client-certificate subject (mutual TLS).
    pub client_cert_subject: Option<String>,
    /// DNS names of the verified client certificate's SAN list.
    pub client_cert_names: Vec<String>,
}

/// A request as the policy stage sees it, its text borrowed from the request where it
/// can be (a chain copies only what each plugin reads, into the plugin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo<'a> {
    /// Upgrade or plain request.
    pub kind: RequestKind,
    /// Method, upper-case.
    pub method: Cow<'a, str>,
    /// `http` or `https`.
    pub scheme: Cow<'a, str>,
    /// `host[:port]`.
    pub authority: Cow<'a, str>,
    /// Path without query, normalised as routing matched it.
    pub path: Cow<'a, str>,
    /// Raw query without `?` (empty when absent).
    pub query: Cow<'a, str>,
    /// Headers in arrival order (names are lower-cased for plugins).
    pub headers: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// Client socket address.
    pub client_addr: SocketAddr,
    /// TLS facts, `None` on plain-text listeners.
    pub tls: Option<TlsInfo>,
    /// Matched route name.
    pub route: Cow<'a, str>,
    /// Tenant, if the route assigns one.
    pub tenant: Option<Cow<'a, str>>,
    /// Offered `Sec-WebSocket-Protocol` entries.
    pub subprotocols: Vec<Cow<'a, str>>,
}

impl RequestInfo<'_> {
    /// The same request owning all its text (a capture keeps it past the request).
    pub fn into_owned(self) -> RequestInfo<'static> {
        let owned = |c: Cow<'_, str>| Cow::Owned(c.into_owned());
        RequestInfo {
            kind: self.kind,
            method: owned(self.method),
            scheme: owned(self.scheme),
            authority: owned(self.authority),
            path: owned(self.path),
            query: owned(self.query),
            headers: (self.headers.into_iter())
                .map(|(n, v)| (owned(n), owned(v)))
                .collect(),
            client_addr: self.client_addr,
            tls: self.tls,
            route: owned(self.route),
            tenant: self.tenant.map(owned),
            subprotocols: self.subprotocols.into_iter().map(owned).collect(),
        }
    }
}

/// Why an exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Finished normally.
    Completed,
    /// The client closed or reset.
    ClientClosed,
    /// The upstream closed or reset.
    UpstreamClosed,
    /// Idle timeout.
    IdleTimeout,
    /// Refused before reaching an upstream.
    Denied,
    /// No upstream reachable, or its handshake failed.
    UpstreamError,
    /// Gateway shutdown.
    Shutdown,
}

/// The end of an exchange, reported to `on-close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// Upgrade or plain request.
    pub kind: RequestKind,
    /// Matched route name.
    pub route: String,
    /// Tenant, if assigned.
    pub tenant: Option<String>,
    /// Upstream server address, if one was selected.
    pub upstream: Option<String>,
    /// Accept to close.
    pub duration: Duration,
    /// Bytes client → upstream.
    pub bytes_from_client: u64,
    /// Bytes upstream → client.
    pub bytes_to_client: u64,
    /// Why it ended.
    pub reason: CloseReason,
}

/// One change to the upstream request headers (names lower-case, validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderOp {
    /// Replace all values.
    Set(String, String),
    /// Add a value.
    Append(String, String),
    /// Remove all values.
    Remove(String),
}

/// What the chain asks for on `continue`, accumulated over its plugins:
/// header operations in order; for single values the last plugin to set one wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mutations {
    /// Upstream header operations, to apply in order.
    pub headers: Vec<HeaderOp>,
    /// Pool to use (the caller must check the route allows it).
    pub pool: Option<String>,
    /// Tenant for this exchange.
    pub tenant: Option<String>,
    /// Consistent-hash key.
    pub sticky_key: Option<String>,
    /// Subprotocol to select (the caller must check it was offered).
    pub subprotocol: Option<String>,
    /// Extra access-log fields.
    pub log_fields: Vec<(String, String)>,
}

/// The response for a refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// HTTP status (300–599).
    pub status: u16,
    /// Response headers (validated).
    pub headers: Vec<(String, String)>,
    /// Plain-text body.
    pub body: String,
    /// Access-log fields: those of the plugins before it, then the denying
    /// plugin's own (validated).
    pub log_fields: Vec<(String, String)>,
    /// Name of the plugin that denied or faulted.
    pub plugin: String,
    /// Set when the denial comes from a plugin fault (fail-closed), not a decision.
    pub fault: Option<Fault>,
}

/// The chain's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainDecision {
    /// Proceed, with these changes.
    Continue(Mutations),
    /// Answer the client with this response.
    Deny(Denial),
}

/// How a plugin call failed. The gateway survives all of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// The call used more CPU time than the plugin's deadline.
    #[error("exceeded its CPU deadline of {0:?}")]
    Timeout(Duration),
    /// The instance tried to grow memory past its cap.
    #[error("exceeded its memory cap of {0} bytes")]
    Memory(usize),
    /// The guest trapped (panic, unreachable, out-of-bounds…).
    #[error("trapped: {0}")]
    Trap(String),
    /// The guest returned a decision the gateway cannot use.
    #[error("returned an invalid decision: {0}")]
    InvalidDecision(String),
    /// Every instance stayed busy for the whole wait.
    #[error("no free instance within {0:?}")]
    Overloaded(Duration),
    /// `init` returned an error for the plugin's config.
    #[error("init refused the config: {0}")]
    InitRefused(String),
    /// A new instance could not be created.
    #[error("could not start an instance: {0}")]
    Start(String),
}

/// Where one document a plugin watches (`grants.http`) stands, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentState {
    /// The URL, as granted.
    pub url: String,
    /// The good copy's version (1 for the first; 0: none yet).
    pub version: u64,
    /// The good copy's size.
    pub bytes: usize,
    /// When the last fetch ended, good or not.
    pub fetched_at: Option<std::time::SystemTime>,
    /// Fetches that failed since the last good one.
    pub failures_in_a_row: u32,
    /// Why the last fetch failed (`None`: it did not).
    pub error: Option<String>,
}

/// Counters of one plugin since the gateway started: a reload that loads it anew (a
/// rebuilt `.wasm`, a changed config) counts on from where it was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PluginStats {
    /// Hook calls attempted.
    pub calls: u64,
    /// `on-request` decisions given again without a call (`reuse-ms`).
    pub reused: u64,
    /// `deny` decisions returned.
    pub denies: u64,
    /// Faults of any kind.
    pub faults: u64,
    /// Faults that were CPU timeouts.
    pub timeouts: u64,
    /// Faults that were memory-cap hits.
    pub memory_faults: u64,
    /// Instances created (first one included).
    pub instances_created: u64,
    /// Fetches of its documents (`grants.http`) that brought a new copy.
    pub fetches_changed: u64,
    /// Fetches that found the copy current (the same body, or `304`).
    pub fetches_unchanged: u64,
    /// Fetches that failed (the last good copy kept).
    pub fetches_failed: u64,
}
