//! The `documents` import: JSON documents (an identity provider's JWKS, say) fetched
//! for a plugin in the background from the URLs its `grants.http` names.
//!
//! A narrow host function rather than wasi-http's outgoing handler: the plugin names a
//! URL once, in `init`, and reads the host's latest good copy on the request path, so it
//! can never make a request wait on the network, open a socket of its own, or reach an
//! address the operator did not grant, and the host alone owns the schedule (cache
//! headers, bounds, back-off), the size bound and what counts as a good copy.
//!
//! One task per watched URL runs on the runtime that loaded the plugin (the control
//! loop's) and ends when the plugin is dropped (a reload that replaces it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::types::DocumentState;
use crate::config::UpstreamTls;
use crate::sync::Hold;
use crate::tls::Connector;

/// Largest document kept; a bigger one is a failed fetch (a JWKS is a few KiB).
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Longest one fetch may take, connect to last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest time between two fetches of one URL, whatever the plugin asks.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Most URLs one plugin may watch.
const MAX_WATCHED: usize = 16;

/// Why a fetch gave no good copy; the last good one is kept.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("answered {0}, not 200")]
    Status(StatusCode),
    #[error("content type {0:?} is not JSON")]
    ContentType(String),
    #[error("larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge,
    #[error("not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("no answer within {FETCH_TIMEOUT:?}")]
    Timeout,
}

/// A good copy.
#[derive(Debug)]
pub(super) struct Copy {
    pub(super) version: u64,
    pub(super) body: Bytes,
}

/// Fetch counts, for `/metrics`.
#[derive(Debug, Default)]
pub(super) struct FetchStats {
    /// A new copy was kept.
    pub(super) changed: AtomicU64,
    /// The copy was still current (same body, or `304`).
    pub(super) unchanged: AtomicU64,
    /// The fetch failed; the last good copy was kept.
    pub(super) failed: AtomicU64,
}

/// One watched URL.
#[derive(Debug)]
struct Watched {
    url: Uri,
    min: Duration,
    max: Duration,
    current: ArcSwapOption<Copy>,
    soon: Notify,
    /// How its last fetch went, for `/status`.
    last: Mutex<LastFetch>,
}

/// When a URL was last fetched, and why that fetch failed, if it did.
#[derive(Debug, Default, Clone)]
struct LastFetch {
    at: Option<SystemTime>,
    error: Option<String>,
    failures: u32,
}

/// The documents of one loaded plugin.
#[derive(Debug)]
pub(super) struct Documents {
    plugin: Arc<str>,
    /// The URLs the operator granted, exactly as written.
    grants: Box<[String]>,
    watched: Mutex<HashMap<String, Arc<Watched>>>,
    /// Grows whenever any watched document changes: a decision made before rests on
    /// an old copy, so the reuse table compares it.
    generation: AtomicU64,
    stats: Arc<FetchStats>,
    /// Ends the fetch tasks when the plugin goes.
    cancel: CancellationToken,
}

impl Drop for Documents {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Documents {
    pub(super) fn new(plugin: Arc<str>, grants: &[String], stats: Arc<FetchStats>) -> Documents {
        Documents {
            plugin,
            grants: grants.into(),
            watched: Mutex::default(),
            generation: AtomicU64::new(0),
            stats,
            cancel: CancellationToken::new(),
        }
    }

    /// Whether any URL was granted.
    pub(super) fn granted(&self) -> bool {
        !self.grants.is_empty()
    }

    /// Changes with every new copy of any watched document.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn get(&self, url: &str) -> Option<Arc<Watched>> {
        self.watched.hold().get(url).cloned()
    }

    /// `watch`: the first call for a granted URL fetches it and starts its task.
    pub(super) async fn watch(
        self: &Arc<Self>,
        url: String,
        min_ms: u32,
        max_ms: u32,
    ) -> Result<(), String> {
        if !self.grants.contains(&url) {
            return Err(format!(
                "{url:?} is not granted to plugin `{}`: add it to `grants.http` of [plugins.{}]",
                self.plugin, self.plugin
            ));
        }
        let min = Duration::from_millis(min_ms.into()).max(MIN_INTERVAL);
        let max = Duration::from_millis(max_ms.into()).max(min);
        let watched = {
            let mut map = self.watched.hold();
            if map.contains_key(&url) {
                return Ok(());
            }
            if map.len() >= MAX_WATCHED {
                return Err(format!(
                    "a plugin may watch at most {MAX_WATCHED} documents"
                ));
            }
            // Granted URLs were checked to be absolute http(s) URIs at load.
            let parsed: Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
            let watched = Arc::new(Watched {
                url: parsed,
                min,
                max,
                current: ArcSwapOption::empty(),
                soon: Notify::new(),
                last: Mutex::default(),
            });
            map.insert(url, watched.clone());
            watched
        };
        let mut schedule = Schedule::default();
        let next = self.refresh(&watched, &mut schedule).await;
        tokio::spawn(keep_fresh(
            Arc::downgrade(self),
            watched,
            schedule,
            next,
            self.cancel.clone(),
        ));
        Ok(())
    }

    /// `latest`: the current copy when it is newer than `seen`.
    pub(super) fn latest(&self, url: &str, seen: u64) -> Option<Arc<Copy>> {
        let copy = self.get(url)?.current.load_full()?;
        (copy.version > seen).then_some(copy)
    }

    /// Each watched URL's copy and last fetch, by URL.
    pub(super) fn states(&self) -> Vec<DocumentState> {
        let mut states: Vec<DocumentState> = self
            .watched
            .hold()
            .iter()
            .map(|(url, w)| {
                let copy = w.current.load();
                let last = w.last.hold().clone();
                DocumentState {
                    url: url.clone(),
                    version: copy.as_ref().map_or(0, |c| c.version),
                    bytes: copy.as_ref().map_or(0, |c| c.body.len()),
                    fetched_at: last.at,
                    failures_in_a_row: last.failures,
                    error: last.error,
                }
            })
            .collect();
        states.sort_by(|a, b| a.url.cmp(&b.url));
        states
    }

    /// `refresh-soon`: wake the URL's task (it keeps to `min` between fetches).
    pub(super) fn refresh_soon(&self, url: &str) {
        if let Some(w) = self.get(url) {
            w.soon.notify_one();
        }
    }

    /// One fetch and what it changes; returns how long until the next one.
    async fn refresh(&self, w: &Watched, schedule: &mut Schedule) -> Duration {
        let url = w.url.to_string();
        let result = match tokio::time::timeout(
            FETCH_TIMEOUT,
            fetch(&w.url, schedule.etag.as_ref()),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout),
        };
        schedule.last = Some(Instant::now());
        let error = result.as_ref().err().map(ToString::to_string);
        let next = match result {
            Ok(fetched) => {
                if schedule.failures > 0 {
                    tracing::info!(plugin = %self.plugin, url, "plugin document fetched again");
                }
                schedule.failures = 0;
                let next = fetched.max_age.unwrap_or(w.max).clamp(w.min, w.max);
                // Only this task stores a copy, so the one read here stays current.
                let current = w.current.load_full();
                match fetched.body {
                    Some(body) if current.as_ref().is_none_or(|c| c.body != body) => {
                        let version = current.as_ref().map_or(0, |c| c.version) + 1;
                        tracing::info!(plugin = %self.plugin, url, version, bytes = body.len(), "plugin document updated");
                        w.current.store(Some(Arc::new(Copy { version, body })));
                        schedule.etag = fetched.etag;
                        self.generation.fetch_add(1, Ordering::AcqRel);
                        self.stats.changed.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
                    }
                }
                next
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                if schedule.failures == 0 {
                    tracing::warn!(plugin = %self.plugin, url, error = %e, "plugin document fetch failed; keeping the last good copy");
                }
                schedule.failures = schedule.failures.saturating_add(1);
                // Back off from `min`, doubling up to `max`.
                let doubling = 1u32 << (schedule.failures - 1).min(16);
                w.min.saturating_mul(doubling).min(w.max)
            }
        };
        *w.last.hold() = LastFetch {
            at: Some(SystemTime::now()),
            error,
            failures: schedule.failures,
        };
        next
    }
}

/// Where a URL's fetches stand.
#[derive(Debug, Default)]
struct Schedule {
    /// When the last fetch ended.
    last: Option<Instant>,
    /// Failures in a row.
    failures: u32,
    /// The `ETag` of the current copy, sent as `If-None-Match`.
    etag: Option<HeaderValue>,
}

/// The task that keeps one URL fresh: fetch when `next` has passed, or at `min` after
/// the last fetch when the plugin asked for it sooner; until the plugin is dropped.
async fn keep_fresh(
    documents: Weak<Documents>,
    watched: Arc<Watched>,
    mut schedule: Schedule,
    mut next: Duration,
    cancel: CancellationToken,
) {
    loop {
        let last = schedule.last.unwrap_or_else(Instant::now);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(last + next) => {}
            () = watched.soon.notified() => {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep_until(last + watched.min) => {}
                }
            }
        }
        let Some(documents) = documents.upgrade() else {
            return;
        };
        next = documents.refresh(&watched, &mut schedule).await;
    }
}

/// A successful answer: a new body (`None` for `304 Not Modified`), its `ETag`, and
/// the `Cache-Control` lifetime (`Some(ZERO)` for `no-cache` or `no-store`).
struct Fetched {
    body: Option<Bytes>,
    etag: Option<HeaderValue>,
    max_age: Option<Duration>,
}

/// One `GET` over HTTP/1.1 (TLS for `https`, verified against the Mozilla roots).
async fn fetch(url: &Uri, etag: Option<&HeaderValue>) -> Result<Fetched, FetchError> {
    let https = url.scheme_str() == Some("https");
    let authority = url.authority().map_or("", |a| a.as_str());
    let host = url.host().unwrap_or("");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let host_for_connect = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((host_for_connect, port))
        .await
        .map_err(FetchError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let mut req = Request::get(path)
        .header(header::HOST, authority)
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("sluice/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(etag) = etag {
        req = req.header(header::IF_NONE_MATCH, etag);
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Connect(std::io::Error::other(e)))?;
    let response = if https {
        let tls = Connector::new(&UpstreamTls::default())
            .map_err(|e| FetchError::Tls(std::io::Error::other(e)))?
            .connect_to(authority, tcp)
            .await
            .map_err(FetchError::Tls)?;
        send(TokioIo::new(tls), req).await?
    } else {
        send(TokioIo::new(tcp), req).await?
    };
    let (parts, body) = response.into_parts();
    let max_age = max_age(&parts.headers);
    if parts.status == StatusCode::NOT_MODIFIED {
        return Ok(Fetched {
            body: None,
            etag: None,
            max_age,
        });
    }
    if parts.status != StatusCode::OK {
        return Err(FetchError::Status(parts.status));
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    if !is_json(&content_type) {
        return Err(FetchError::ContentType(content_type));
    }
    let body = Limited::new(body, MAX_DOCUMENT_BYTES)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => FetchError::Http(*e),
            Err(_) => FetchError::TooLarge,
        })?
        .to_bytes();
    serde_json::from_slice::<serde::de::IgnoredAny>(&body).map_err(FetchError::NotJson)?;
    Ok(Fetched {
        body: Some(body),
        etag: parts.headers.get(header::ETAG).cloned(),
        max_age,
    })
}

/// Sends `req` on a new HTTP/1.1 connection over `io`.
async fn send<I>(
    io: I,
    req: Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, FetchError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        // Ends with the response or the fetch's timeout; its error is the response's.
        let _ = conn.await;
    });
    Ok(sender.send_request(req).await?)
}

/// `application/json` or any `application/…+json`, parameters ignored.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
}

/// The lifetime `Cache-Control` gives: `max-age`, or zero for `no-cache`/`no-store`.
fn max_age(headers: &HeaderMap) -> Option<Duration> {
    let mut age = None;
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',').map(str::trim) {
            let lower = directive.to_ascii_lowercase();
            if lower == "no-cache" || lower == "no-store" {
                return Some(Duration::ZERO);
            }
            if let Some(secs) = lower.strip_prefix("max-age=") {
                age = secs.trim_matches('"').parse().ok().map(Duration::from_secs);
            }
        }
    }
    age
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/jwk-set+json"));
        assert!(!is_json("text/html"));
        assert!(!is_json(""));
        assert!(!is_json("application/jsonp"));
    }

    #[test]
    fn cache_control_lifetimes() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
            max_age(&h)
        };
        assert_eq!(with("public, max-age=300"), Some(Duration::from_secs(300)));
        assert_eq!(with("no-store"), Some(Duration::ZERO));
        assert_eq!(with("max-age=60, no-cache"), Some(Duration::ZERO));
        assert_eq!(with("private"), None);
        assert_eq!(with("max-age=oops"), None);
        assert_eq!(max_age(&HeaderMap::new()), None);
    }
}
