//! Capture stage: for a route with `[routes.capture]`, what its plugin chain saw (the
//! [`RequestInfo`]) and what it decided, one JSON [`Line`] per request appended to a
//! file, so that `sluice replay` (`replay`) can run real traffic through another config.
//!
//! Off, it costs the request path one `Option` check (`Route::capture`). On, the policy
//! stage hands the view and the decision to a bounded queue and goes on: a full queue
//! drops the line (counted in `sluice_capture_dropped_total`) rather than make a request
//! wait. A thread of the capture's own redacts the configured headers, encodes and
//! appends, one `write` per batch; past `max_size` it stops writing and logs once.
//! Every line says which header names it redacted, and the replay keeps them redacted.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::CaptureConfig;
use crate::metrics::RouteStats;
use crate::plugin::{HeaderOp, RequestInfo, RequestKind, TlsInfo};
use crate::sync::Hold;

/// What a redacted header value is replaced with.
pub const REDACTED: &str = "<redacted>";

/// The format version a capture line carries in `v`.
pub const VERSION: u32 = 1;

/// Lines waiting for the writer, at most; past it a request's line is dropped.
const QUEUE: usize = 4096;

/// Bytes gathered from the queue before one `write`.
const BATCH: usize = 64 << 10;

/// One line of a capture file: a request as the chain saw it and what was decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// The format version ([`VERSION`]).
    pub v: u32,
    /// When the decision was taken, in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// The route's name.
    pub route: String,
    /// The request as the chain saw it.
    pub request: Request,
    /// The header names whose values were replaced by [`REDACTED`] (the route's `redact`).
    #[serde(default)]
    pub redacted: Vec<String>,
    /// What the chain (and the policy stage's checks of it) decided.
    pub decision: Decision,
}

/// A request as plugins see it: [`RequestInfo`] but for the route and its tenant, which
/// a replay takes from the config it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// `websocket` or `http`.
    pub kind: Kind,
    /// Method, upper-case.
    pub method: String,
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]`.
    pub authority: String,
    /// The normalised path routing matched.
    pub path: String,
    /// The query without `?`.
    #[serde(default)]
    pub query: String,
    /// Headers in arrival order, names lower-case, `[name, value]`.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The client's address.
    pub client: SocketAddr,
    /// TLS facts, on a TLS listener.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// The offered `Sec-WebSocket-Protocol` entries.
    #[serde(default)]
    pub subprotocols: Vec<String>,
}

/// Which kind of exchange a request opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A WebSocket upgrade.
    WebSocket,
    /// A plain HTTP request.
    Http,
}

/// TLS facts of the client's connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tls {
    /// SNI server name.
    #[serde(default)]
    pub sni: Option<String>,
    /// Negotiated ALPN protocol.
    #[serde(default)]
    pub alpn: Option<String>,
    /// Verified client-certificate subject.
    #[serde(default)]
    pub client_cert_subject: Option<String>,
    /// DNS names of the verified client certificate.
    #[serde(default)]
    pub client_cert_names: Vec<String>,
}

/// A decision, by name: what a request was allowed to do, or how it was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Decision {
    /// Proceed.
    Allow {
        /// The pool a server is picked from.
        pool: String,
        /// The consistent-hash key a plugin chose.
        #[serde(default)]
        sticky_key: Option<String>,
        /// Upstream header changes, in order.
        #[serde(default)]
        headers: Vec<HeaderEdit>,
        /// The subprotocol offered upstream.
        #[serde(default)]
        subprotocol: Option<String>,
        /// The tenant (the route's, or a plugin's choice).
        #[serde(default)]
        tenant: Option<String>,
        /// Access-log fields, `[key, value]`.
        #[serde(default)]
        tags: Vec<(String, String)>,
    },
    /// Answer the client instead.
    Deny {
        /// HTTP status.
        status: u16,
        /// Response headers, `[name, value]`.
        #[serde(default)]
        headers: Vec<(String, String)>,
        /// Response body.
        #[serde(default)]
        body: String,
        /// The plugin that refused (`pool:NAME` when the chain chose a pool the route
        /// does not allow).
        denied_by: String,
        /// The plugin's fault, when the refusal is a fail-closed fault.
        #[serde(default)]
        fault: Option<String>,
        /// Access-log fields, `[key, value]`.
        #[serde(default)]
        tags: Vec<(String, String)>,
    },
}

/// One upstream header change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum HeaderEdit {
    /// Replace all values.
    Set {
        /// Header name.
        name: String,
        /// Value.
        value: String,
    },
    /// Add a value.
    Append {
        /// Header name.
        name: String,
        /// Value.
        value: String,
    },
    /// Remove all values.
    Remove {
        /// Header name.
        name: String,
    },
}

impl From<&HeaderOp> for HeaderEdit {
    fn from(op: &HeaderOp) -> Self {
        match op {
            HeaderOp::Set(name, value) => HeaderEdit::Set {
                name: name.clone(),
                value: value.clone(),
            },
            HeaderOp::Append(name, value) => HeaderEdit::Append {
                name: name.clone(),
                value: value.clone(),
            },
            HeaderOp::Remove(name) => HeaderEdit::Remove { name: name.clone() },
        }
    }
}

/// The aspects in which two decisions differ, as `sluice replay` names them: `outcome`
/// (allow ↔ deny); for two allows `pool`, `sticky_key`, `headers`, `subprotocol`,
/// `tenant`; for two denials `status`, `headers`, `body`. Access-log tags, the denying
/// plugin's name and a fault's text are shown but not compared.
pub fn differences(a: &Decision, b: &Decision) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut differ = |name, same: bool| {
        if !same {
            out.push(name);
        }
    };
    match (a, b) {
        (
            Decision::Allow {
                pool,
                sticky_key,
                headers,
                subprotocol,
                tenant,
                tags: _,
            },
            Decision::Allow {
                pool: pool2,
                sticky_key: sticky_key2,
                headers: headers2,
                subprotocol: subprotocol2,
                tenant: tenant2,
                tags: _,
            },
        ) => {
            differ("pool", pool == pool2);
            differ("sticky_key", sticky_key == sticky_key2);
            differ("headers", headers == headers2);
            differ("subprotocol", subprotocol == subprotocol2);
            differ("tenant", tenant == tenant2);
        }
        (
            Decision::Deny {
                status,
                headers,
                body,
                ..
            },
            Decision::Deny {
                status: status2,
                headers: headers2,
                body: body2,
                ..
            },
        ) => {
            differ("status", status == status2);
            differ("headers", headers == headers2);
            differ("body", body == body2);
        }
        _ => differ("outcome", false),
    }
    out
}

impl Decision {
    /// Replaces the values of the headers named in `names` (lower-case) with
    /// [`REDACTED`]: the plugins' upstream header changes, or a denial's headers.
    pub fn redact(&mut self, names: &[String]) {
        match self {
            Decision::Allow { headers, .. } => {
                for edit in headers {
                    if let HeaderEdit::Set { name, value } | HeaderEdit::Append { name, value } =
                        edit
                    {
                        redact_value(names, name, value);
                    }
                }
            }
            Decision::Deny { headers, .. } => {
                for (name, value) in headers {
                    redact_value(names, name, value);
                }
            }
        }
    }
}

/// Replaces `value` when `name` (compared without case) is one of `names` (lower-case).
fn redact_value(names: &[String], name: &str, value: &mut String) {
    if names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
        REDACTED.clone_into(value);
    }
}

impl Request {
    /// The request as captured: `info` with the values of the headers named in `redact`
    /// replaced.
    pub fn redacted(info: RequestInfo<'_>, redact: &[String]) -> Request {
        let mut headers: Vec<(String, String)> = (info.headers.into_iter())
            .map(|(n, v)| (n.into_owned(), v.into_owned()))
            .collect();
        for (name, value) in &mut headers {
            redact_value(redact, name, value);
        }
        Request {
            kind: match info.kind {
                RequestKind::WebSocket => Kind::WebSocket,
                RequestKind::Http => Kind::Http,
            },
            method: info.method.into_owned(),
            scheme: info.scheme.into_owned(),
            authority: info.authority.into_owned(),
            path: info.path.into_owned(),
            query: info.query.into_owned(),
            headers,
            client: info.client_addr,
            tls: info.tls.map(|t| Tls {
                sni: t.sni,
                alpn: t.alpn,
                client_cert_subject: t.client_cert_subject,
                client_cert_names: t.client_cert_names,
            }),
            subprotocols: info.subprotocols.into_iter().map(Cow::into_owned).collect(),
        }
    }

    /// What the chain of `route` (whose tenant is `tenant`) would be shown for this
    /// request.
    pub fn to_info<'a>(&'a self, route: &'a str, tenant: Option<&'a str>) -> RequestInfo<'a> {
        RequestInfo {
            kind: match self.kind {
                Kind::WebSocket => RequestKind::WebSocket,
                Kind::Http => RequestKind::Http,
            },
            method: self.method.as_str().into(),
            scheme: self.scheme.as_str().into(),
            authority: self.authority.as_str().into(),
            path: self.path.as_str().into(),
            query: self.query.as_str().into(),
            headers: (self.headers.iter())
                .map(|(n, v)| (n.as_str().into(), v.as_str().into()))
                .collect(),
            client_addr: self.client,
            tls: self.tls.as_ref().map(|t| TlsInfo {
                sni: t.sni.clone(),
                alpn: t.alpn.clone(),
                client_cert_subject: t.client_cert_subject.clone(),
                client_cert_names: t.client_cert_names.clone(),
            }),
            route: route.into(),
            tenant: tenant.map(Cow::Borrowed),
            subprotocols: self
                .subprotocols
                .iter()
                .map(|p| p.as_str().into())
                .collect(),
        }
    }
}

/// Why a capture file could not be opened (the config that asks for it is not
/// applied).
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The file could not be opened for appending.
    #[error("capture file {}: {source}", file.display())]
    Open {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The writer thread could not be started.
    #[error("capture file {}: cannot start its writer: {source}", file.display())]
    Thread {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What the request path hands the writer.
struct Entry {
    ts_ms: u64,
    info: RequestInfo<'static>,
    decision: Decision,
}

/// A route's open capture: the queue to its writer thread. Kept across a reload that
/// leaves the route's `[routes.capture]` as it was; the writer ends once the last
/// snapshot holding it is gone and the queue is drained.
#[derive(Debug)]
pub struct Capture {
    config: CaptureConfig,
    queue: SyncSender<Entry>,
    /// Set by the writer once the file reached `max_size` or a write failed.
    stopped: Arc<AtomicBool>,
    stats: Arc<RouteStats>,
    /// The opened file's device and inode, to tell whether it was moved away.
    identity: Mutex<Option<Identity>>,
    /// A file opened again at the path ([`Capture::reopen`]), and its size, for the
    /// writer to take up before its next line.
    reopened: Arc<Mutex<Option<(File, u64)>>>,
}

/// A file's device and inode.
type Identity = (u64, u64);

/// Opens `config.file` for appending (creating it): the file, its size, and its device
/// and inode.
fn open_file(config: &CaptureConfig) -> Result<(File, u64, Option<Identity>), CaptureError> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&config.file)
        .map_err(|source| CaptureError::Open {
            file: config.file.clone(),
            source,
        })?;
    let meta = file.metadata().ok();
    let size = meta.as_ref().map_or(0, |m| m.len());
    let identity = meta.map(|m| (m.dev(), m.ino()));
    Ok((file, size, identity))
}

/// Whether `config.file` can be opened as [`Capture::open`] opens it, leaving nothing
/// behind: `sluice check`'s test of a capture path.
pub fn check(config: &CaptureConfig) -> Result<(), CaptureError> {
    appendable(&config.file).map_err(|source| CaptureError::Open {
        file: config.file.clone(),
        source,
    })
}

/// Whether `path` can be opened for appending (created if missing), leaving nothing
/// behind: a file it had to create is removed again, an existing one is not changed.
/// What `sluice check` asks of the files `run` would open.
pub fn appendable(path: &Path) -> std::io::Result<()> {
    let open = |create_new| {
        OpenOptions::new()
            .append(true)
            .create_new(create_new)
            .open(path)
    };
    match open(true) {
        Ok(file) => {
            drop(file);
            std::fs::remove_file(path)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => open(false).map(drop),
        Err(e) => Err(e),
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("ts_ms", &self.ts_ms).finish()
    }
}

impl Capture {
    /// Opens `config.file` for appending (creating it) and starts its writer thread;
    /// lines written and dropped are counted in `stats`.
    pub fn open(config: &CaptureConfig, stats: Arc<RouteStats>) -> Result<Capture, CaptureError> {
        let (file, size, identity) = open_file(config)?;
        let (queue, rx) = mpsc::sync_channel(QUEUE);
        let stopped = Arc::new(AtomicBool::new(false));
        let reopened = Arc::default();
        let writer = Writer {
            file,
            size,
            config: config.clone(),
            stopped: stopped.clone(),
            stats: stats.clone(),
            reopened: Arc::clone(&reopened),
        };
        std::thread::Builder::new()
            .name("sluice-capture".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| CaptureError::Thread {
                file: config.file.clone(),
                source,
            })?;
        Ok(Capture {
            config: config.clone(),
            queue,
            stopped,
            stats,
            identity: Mutex::new(identity),
            reopened,
        })
    }

    /// Opens the file at its path again (SIGUSR1, after logrotate moved it away): the
    /// lines from now on go there, up to `max_size` of it, and a capture stopped at
    /// `max_size` or by a failed write starts again. On an error the capture goes on as
    /// it was.
    pub fn reopen(&self) -> Result<(), CaptureError> {
        let (file, size, identity) = open_file(&self.config)?;
        *self.reopened.hold() = Some((file, size));
        *self.identity.hold() = identity;
        self.stopped.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// The route it captures for.
    pub fn route(&self) -> &str {
        &self.stats.name
    }

    /// The settings it was opened with.
    pub fn config(&self) -> &CaptureConfig {
        &self.config
    }

    /// Whether it has stopped writing (the file reached `max_size`, or a write failed);
    /// a reload opens such a capture anew.
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Whether its file is still the one at its path (not moved away or removed since it
    /// was opened); a reload opens a capture whose file is not.
    pub fn still_at_path(&self) -> bool {
        let now = std::fs::metadata(&self.config.file).ok();
        let identity = *self.identity.hold();
        identity.is_some() && now.map(|m| (m.dev(), m.ino())) == identity
    }

    /// Queues one request's line, never waiting: when the queue is full or the
    /// capture has stopped, the line is dropped and counted.
    pub fn record(&self, info: RequestInfo<'_>, decision: Decision) {
        if self.stopped() {
            self.stats.capture_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let entry = Entry {
            ts_ms: now_ms(),
            info: info.into_owned(),
            decision,
        };
        match self.queue.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.capture_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Milliseconds since the Unix epoch (0 for a clock before it).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The writer thread's side: the file and how much it holds.
struct Writer {
    file: File,
    size: u64,
    config: CaptureConfig,
    stopped: Arc<AtomicBool>,
    stats: Arc<RouteStats>,
    /// Set by [`Capture::reopen`].
    reopened: Arc<Mutex<Option<(File, u64)>>>,
}

impl Writer {
    /// Writes what arrives until every sender is gone, gathering what is already queued
    /// into one `write`.
    fn run(mut self, rx: Receiver<Entry>) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut lines = 0u64;
        while let Ok(entry) = rx.recv() {
            if let Some((file, size)) = self.reopened.hold().take() {
                self.file = file;
                self.size = size;
            }
            let mut next = Some(entry);
            while let Some(entry) = next.take() {
                self.encode(entry, &mut batch, &mut lines);
                if batch.len() < BATCH {
                    next = rx.try_recv().ok();
                }
            }
            self.write(&mut batch, lines);
            lines = 0;
        }
    }

    /// Appends `entry`'s line to `batch`, or drops it when it would take the file past
    /// `max_size` (stopping the capture, logged once).
    fn encode(&mut self, entry: Entry, batch: &mut Vec<u8>, lines: &mut u64) {
        if self.stopped.load(Ordering::Relaxed) {
            self.stats.capture_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let route = entry.info.route.to_string();
        let mut line = Line {
            v: VERSION,
            ts_ms: entry.ts_ms,
            route,
            request: Request::redacted(entry.info, &self.config.redact),
            redacted: self.config.redact.clone(),
            decision: entry.decision,
        };
        line.decision.redact(&self.config.redact);
        let start = batch.len();
        if serde_json::to_writer(&mut *batch, &line).is_err() {
            batch.truncate(start);
            self.stats.capture_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        batch.push(b'\n');
        let added = (batch.len() - start) as u64;
        if self.size + added > self.config.max_size {
            batch.truncate(start);
            self.stop("capture file reached its max_size; capturing stopped until a reload");
            self.stats.capture_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.size += added;
        *lines += 1;
    }

    /// Writes the batch; a failed write drops its lines and stops the capture.
    fn write(&mut self, batch: &mut Vec<u8>, lines: u64) {
        if batch.is_empty() {
            return;
        }
        match self.file.write_all(batch) {
            Ok(()) => {
                self.stats.capture_lines.fetch_add(lines, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, file = %self.config.file.display(), "capture write failed");
                self.stop("capture stopped after a failed write until a reload");
                self.stats
                    .capture_dropped
                    .fetch_add(lines, Ordering::Relaxed);
            }
        }
        batch.clear();
    }

    fn stop(&self, message: &str) {
        if !self.stopped.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                route = %self.stats.name,
                file = %self.config.file.display(),
                max_size = self.config.max_size,
                "{message}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> RequestInfo<'static> {
        RequestInfo {
            kind: RequestKind::WebSocket,
            method: "GET".into(),
            scheme: "http".into(),
            authority: "chat.example".into(),
            path: "/ws".into(),
            query: "room=1".into(),
            headers: vec![
                ("origin".into(), "https://app.example".into()),
                ("authorization".into(), "Bearer secret".into()),
            ],
            client_addr: "127.0.0.1:4000".parse().unwrap(),
            tls: None,
            route: "ws".into(),
            tenant: Some("acme".into()),
            subprotocols: vec!["chat".into()],
        }
    }

    fn allow() -> Decision {
        Decision::Allow {
            pool: "echo".into(),
            sticky_key: None,
            headers: vec![HeaderEdit::Set {
                name: "Authorization".into(),
                value: "Bearer inner".into(),
            }],
            subprotocol: Some("chat".into()),
            tenant: Some("acme".into()),
            tags: vec![],
        }
    }

    #[test]
    fn a_line_round_trips_with_its_redacted_values_replaced() {
        let redact = vec!["authorization".to_string()];
        let mut decision = allow();
        decision.redact(&redact);
        let line = Line {
            v: VERSION,
            ts_ms: 1,
            route: "ws".into(),
            request: Request::redacted(info(), &redact),
            redacted: redact,
            decision,
        };
        let text = serde_json::to_string(&line).unwrap();
        assert!(
            !text.contains("secret") && !text.contains("inner"),
            "{text}"
        );
        assert!(text.contains(r#""outcome":"allow""#), "{text}");
        let back: Line = serde_json::from_str(&text).unwrap();
        assert_eq!(back, line);
        let seen = back.request.to_info("ws", Some("acme"));
        assert_eq!(seen.headers[1].1, REDACTED);
        assert_eq!(seen.path, "/ws");
    }

    #[test]
    fn differences_name_each_aspect() {
        let deny = |status, body: &str| Decision::Deny {
            status,
            headers: vec![],
            body: body.into(),
            denied_by: "origin".into(),
            fault: None,
            tags: vec![],
        };
        assert!(differences(&allow(), &allow()).is_empty());
        assert_eq!(differences(&allow(), &deny(403, "")), ["outcome"]);
        assert_eq!(
            differences(&deny(403, "a"), &deny(401, "b")),
            ["status", "body"]
        );
        let mut other = allow();
        if let Decision::Allow {
            pool, sticky_key, ..
        } = &mut other
        {
            *pool = "eu".into();
            *sticky_key = Some("k".into());
        }
        assert_eq!(differences(&allow(), &other), ["pool", "sticky_key"]);
    }

    #[test]
    fn the_writer_appends_lines_and_stops_at_max_size() {
        let dir = std::env::temp_dir().join(format!("sluice-capture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.jsonl");
        let _ = std::fs::remove_file(&file);
        let config = CaptureConfig {
            file: file.clone(),
            redact: vec!["authorization".into()],
            max_size: 4096,
        };
        let stats = Arc::new(RouteStats::new("ws"));
        let capture = Capture::open(&config, stats.clone()).unwrap();
        for _ in 0..100 {
            capture.record(info(), allow());
        }
        drop(capture);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stats.capture_lines.load(Ordering::Relaxed)
            + stats.capture_dropped.load(Ordering::Relaxed)
            < 100
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer never finished"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let lines = text.lines().count() as u64;
        assert!(lines > 0 && text.len() <= 4096, "{} bytes", text.len());
        assert_eq!(lines, stats.capture_lines.load(Ordering::Relaxed));
        assert!(!text.contains("secret"));
        for l in text.lines() {
            serde_json::from_str::<Line>(l).unwrap();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
