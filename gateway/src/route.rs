//! Route stage: listener → host → path prefix picks the route, which names an upstream
//! pool or a fixed answer.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::balance::Pool;
use crate::capture::Capture;
use crate::config::{HostMatch, RouteAction, RouteConfig};
use crate::head::{HeaderFields, RequestHead};
use crate::headers::value_text;
use crate::metrics::{Metrics, RouteStats};
use crate::plugin::{Chain, Plugin};

/// A route with its pool resolved.
#[derive(Debug)]
pub struct Route {
    /// The route as configured.
    pub config: RouteConfig,
    /// The pool it proxies to (`None` for fixed-answer routes).
    pub pool: Option<Arc<Pool>>,
    /// Its plugin chain (empty when it lists none).
    pub chain: Chain,
    /// Its traffic counters (shared with the same-named route of other snapshots).
    pub stats: Arc<RouteStats>,
    /// Where its chain's inputs and decisions are written (`[routes.capture]`); `None`:
    /// off, and nothing is built for it.
    pub capture: Option<Arc<Capture>>,
}

/// All routes of a snapshot.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    /// Counters of requests no route matched (route `""`).
    pub unrouted: Arc<RouteStats>,
}

impl RouteTable {
    /// Resolves each route's pool and plugins by name (names were checked by config
    /// validation), and its capture by file (`captures`, opened by the snapshot).
    pub fn new(
        routes: &[RouteConfig],
        pools: &HashMap<String, Arc<Pool>>,
        plugins: &HashMap<String, Plugin>,
        captures: &HashMap<PathBuf, Arc<Capture>>,
        metrics: &Metrics,
    ) -> RouteTable {
        RouteTable {
            unrouted: metrics.route(""),
            routes: routes
                .iter()
                .map(|r| {
                    let pool = match &r.action {
                        RouteAction::Proxy(name) => pools.get(name).cloned(),
                        RouteAction::Respond { .. } => None,
                    };
                    Arc::new(Route {
                        config: r.clone(),
                        pool,
                        chain: Chain::named(&r.plugins, plugins),
                        stats: metrics.route(&r.name),
                        capture: (r.capture.as_ref()).and_then(|c| captures.get(&c.file).cloned()),
                    })
                })
                .collect(),
        }
    }

    /// The routes, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }

    /// The most specific route for a request: an exact host beats a wildcard beats none,
    /// then the longest path prefix wins; earlier routes win ties.
    /// `path` must already be normalised with [`normalize_path`].
    pub fn find(&self, listener: &str, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        let mut best: Option<(&Arc<Route>, (usize, usize))> = None;
        for r in &self.routes {
            let c = &r.config;
            if let Some(ls) = &c.listeners
                && !ls.iter().any(|l| l == listener)
            {
                continue;
            }
            let host_score = match (&c.host, host) {
                (None, _) => 0,
                (Some(HostMatch::Exact(h)), Some(req)) if h == req => usize::MAX,
                (Some(HostMatch::Suffix(s)), Some(req)) if req.ends_with(s.as_str()) => 1 + s.len(),
                _ => continue,
            };
            if !path.starts_with(&c.path_prefix) {
                continue;
            }
            let score = (host_score, c.path_prefix.len());
            if best.as_ref().is_none_or(|(_, b)| score > *b) {
                best = Some((r, score));
            }
        }
        best.map(|(r, _)| r)
    }
}

/// The authority a request is for, as sent: the URI's (absolute-form) or the first `Host`
/// field's.
pub fn authority(req: &impl RequestHead) -> Option<&str> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => value_text(req.fields().values_of(http::header::HOST.as_str()).next()?),
    }
}

/// The host a request is for ([`authority`]), lower-cased and without port or userinfo.
pub fn request_host(req: &impl RequestHead) -> Option<String> {
    let raw = authority(req)?;
    let raw = raw.rsplit_once('@').map_or(raw, |(_, host)| host);
    let host = if raw.starts_with('[') {
        // IPv6 literal: keep the brackets, drop the port.
        raw.split_inclusive(']').next().unwrap_or(raw)
    } else {
        raw.rsplit_once(':').map(|(h, _)| h).unwrap_or(raw)
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

/// Normalises a path for matching only (the upstream gets the path as sent): decodes
/// percent-encoded unreserved characters, collapses repeated slashes and resolves `.` and
/// `..` segments, so `/a/../internal`, `//internal` and `/%69nternal` all match `/internal`.
/// A path that is already normal (the usual case) is returned as it is, without copying.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    if is_normal(path) {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(normalize(path))
    }
}

/// Whether [`normalize`] would return `path` unchanged: it starts with `/`, has no `%`,
/// and no segment is empty (but the last), `.` or `..`.
fn is_normal(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if path.contains('%') {
        return false;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if (seg.is_empty() && !last) || seg == "." || seg == ".." {
            return false;
        }
    }
    true
}

/// [`normalize_path`] for a path that is not already normal.
fn normalize(path: &str) -> String {
    let mut decoded = String::with_capacity(path.len());
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok())
                && (v.is_ascii_alphanumeric() || b"-._~".contains(&v))
            {
                decoded.push(v as char);
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i] as char);
        i += 1;
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut norm = String::with_capacity(decoded.len() + 1);
    for s in &out {
        norm.push('/');
        norm.push_str(s);
    }
    if norm.is_empty() || (decoded.ends_with('/') && !out.is_empty()) {
        norm.push('/');
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_sneaky_paths() {
        assert_eq!(normalize_path("/internal"), "/internal");
        assert_eq!(normalize_path("//internal/x"), "/internal/x");
        assert_eq!(normalize_path("/a/../internal"), "/internal");
        assert_eq!(normalize_path("/%69nternal"), "/internal");
        assert_eq!(normalize_path("/./internal/"), "/internal/");
        assert_eq!(normalize_path("/../../"), "/");
        assert_eq!(normalize_path("/a%2Fb"), "/a%2Fb");
        assert_eq!(normalize_path("/x%"), "/x%");
        assert_eq!(normalize_path(""), "/");
    }

    #[test]
    fn normal_paths_are_borrowed_and_equal_to_their_normal_form() {
        for path in [
            "/",
            "/a",
            "/a/",
            "/a/b",
            "/a/b/",
            "/chat/room",
            "/a.b/c..d/.e",
            "/a b",
            "//",
            "/a//",
            "//a",
            "/./",
            "/.",
            "/..",
            "/a/.",
            "/a/..",
            "/a/./b",
            "/%41",
            "a",
            "",
            "/a/b//",
            "/...",
            "/.a/",
            "/a/.b",
        ] {
            let fast = normalize_path(path);
            assert_eq!(fast, normalize(path), "{path:?}");
            assert_eq!(
                matches!(fast, Cow::Borrowed(_)),
                normalize(path) == path,
                "{path:?} is borrowed exactly when it is normal"
            );
        }
    }

    #[test]
    fn host_strips_port_and_case() {
        let r = http::Request::get("/")
            .header("host", "Example.COM:8080")
            .body(())
            .unwrap();
        assert_eq!(request_host(&r).as_deref(), Some("example.com"));
        let r = http::Request::get("/")
            .header("host", "[::1]:80")
            .body(())
            .unwrap();
        assert_eq!(request_host(&r).as_deref(), Some("[::1]"));
        // Absolute-form wins over Host; userinfo and port are not part of the host.
        let r = http::Request::get("http://u@Other.example:81/x")
            .header("host", "example.com")
            .body(())
            .unwrap();
        assert_eq!(request_host(&r).as_deref(), Some("other.example"));
        assert_eq!(authority(&r), Some("u@Other.example:81"));
    }
}
