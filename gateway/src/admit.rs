//! Admission: route → client handshake → policy. Decides where a request goes (a
//! [`Plan`]) or what Sluice answers instead, before any upstream is contacted, and says
//! how the request's head is rewritten for the upstream hop.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use http::header;
use http::{HeaderMap, Response, StatusCode, Uri, Version};

use crate::access::{CloseHook, Record};
use crate::balance::hash_key;
use crate::client_handshake::{self, Upgrade};
use crate::config::RouteAction;
use crate::head::RequestHead;
use crate::headers::{forwarded_client, set_upstream_fields};
use crate::limit::Refusal;
use crate::plugin::RequestKind;
use crate::policy::{self, Client, Verdict};
use crate::respond::{ResponseBody, deny, respond};
use crate::route::{Route, normalize_path, request_host};
use crate::snapshot::Snapshot;
use crate::tls::{self, Facts};

/// Who is asking: what admission reads of the client's connection.
#[derive(Clone, Copy)]
pub struct Caller<'a> {
    /// The snapshot the connection took at accept.
    pub snapshot: &'a Snapshot,
    /// The listener that accepted it.
    pub listener: &'a Arc<str>,
    /// The client's address.
    pub peer: SocketAddr,
    /// The client's TLS session, on a TLS listener.
    pub tls: Option<&'a Arc<Facts>>,
}

/// A request that may go upstream.
pub struct Admitted {
    /// Where it goes.
    pub plan: Plan,
    /// Its access record, logged when it ends.
    pub rec: Record,
    /// The client's `Sec-WebSocket-Key` when this is a valid WebSocket upgrade.
    pub ws_key: Option<String>,
}

/// Where a routed, policy-approved request goes.
pub struct Plan {
    /// The matched route.
    pub route: Arc<Route>,
    /// The consistent-hash key (empty unless the pool hashes).
    pub key: Vec<u8>,
    /// What the plugin chain decided.
    pub verdict: Verdict,
    /// The client's address (named by a trusted proxy's `X-Forwarded-For`, or the
    /// connection's).
    pub peer: SocketAddr,
    /// The address the request came from, appended to `X-Forwarded-For` upstream.
    pub hop: SocketAddr,
    /// The scheme the client used (`http` or `https`), for `X-Forwarded-Proto`.
    pub scheme: &'static str,
    /// The origin-form target sent upstream instead of the client's: its normalised path
    /// (and query), when the route has `normalize_path` and normalising changed it.
    pub normal_target: Option<Uri>,
}

/// Route → upgrade validation → policy: where the request goes, or Sluice's answer.
pub async fn admit(
    req: &impl RequestHead,
    caller: Caller<'_>,
) -> Result<Admitted, Response<ResponseBody>> {
    let Caller {
        snapshot,
        listener,
        peer: hop,
        tls,
    } = caller;
    // Behind a trusted proxy, the client it names is the one limits, hashing, plugins and
    // logs see; `X-Forwarded-For` still gets the connection's own address appended.
    let peer = forwarded_client(req.fields(), hop, snapshot.limits.trusted_proxies(listener));
    // Classified first so that every answer to a WebSocket handshake, a 404 included,
    // is counted as one; refusals still come after routing.
    let upgrade = match req.version() {
        Version::HTTP_2 => {
            client_handshake::classify_h2(req.method(), req.protocol(), req.fields())
        }
        version => client_handshake::classify(req.method(), version, req.fields()),
    };
    let upgrade_asked = !matches!(upgrade, Upgrade::None);
    let mut rec = Record {
        // Until the tunnel opens (`tunnel`): a refused upgrade is logged as `websocket`.
        kind: if upgrade_asked { "websocket" } else { "http" },
        upgrade: upgrade_asked,
        stats: snapshot.routes.unrouted.clone(),
        client: peer,
        listener: listener.clone(),
        route: String::new(),
        upstream: String::new(),
        method: req.method().clone(),
        version: req.version(),
        path: req.uri().path().to_string(),
        status: 0,
        start: Instant::now(),
        bytes_in: Arc::new(AtomicU64::new(0)),
        hold: None,
        tags: String::new(),
        close_hook: None,
        tls: tls.cloned(),
        tenant: None,
        limited: None,
        admission: None,
    };
    let host = request_host(req);
    let path = normalize_path(req.uri().path());
    let Some(route) = snapshot
        .routes
        .find(listener, host.as_deref(), &path)
        .cloned()
    else {
        return Err(respond(
            rec,
            StatusCode::NOT_FOUND,
            "no route for this request\n",
            &[],
        ));
    };
    rec.route = route.config.name.clone();
    rec.stats = route.stats.clone();
    let pool = match (&route.config.action, &route.pool) {
        (RouteAction::Respond { status, body }, _) => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::FORBIDDEN);
            return Err(respond(rec, status, body, &[]));
        }
        (RouteAction::Proxy(_), Some(pool)) => pool.clone(),
        (RouteAction::Proxy(_), None) => {
            return Err(respond(
                rec,
                StatusCode::BAD_GATEWAY,
                "route has no pool\n",
                &[],
            ));
        }
    };
    let (kind, ws_key) = match upgrade {
        Upgrade::Refused(r) => {
            let headers = client_handshake::refusal_headers(&r);
            return Err(respond(rec, r.status, &format!("{}\n", r.reason), &headers));
        }
        Upgrade::WebSocket { key } => (RequestKind::WebSocket, Some(key)),
        Upgrade::None => (RequestKind::Http, None),
    };
    // Only for a chain with a plugin that asked for `on-close`: the hook clones the chain.
    if route.chain.wants_close() {
        rec.close_hook = Some(Arc::new(CloseHook {
            chain: route.chain.clone(),
            kind,
            tenant: route.config.tenant.clone(),
        }));
    }
    let verdict = match policy::decide(
        &route,
        &pool,
        snapshot,
        req,
        &path,
        kind,
        Client {
            addr: peer,
            tls: tls.map(|t| &**t),
        },
    )
    .await
    {
        Ok(v) => v,
        Err(denial) => return Err(deny(rec, denial)),
    };
    rec.tags = verdict.tags.clone();
    if let (Some(hook), Some(tenant)) = (&mut rec.close_hook, &verdict.tenant) {
        Arc::make_mut(hook).tenant = Some(tenant.clone());
    }
    // Limits come after the chain, which may name the tenant, and before any upstream.
    rec.tenant = snapshot.limits.tenant(verdict.tenant.as_deref());
    let websocket = matches!(kind, RequestKind::WebSocket);
    match snapshot
        .limits
        .admit(listener, rec.tenant.as_ref(), peer.ip(), websocket)
        .await
    {
        Ok(admission) => rec.admission = (!admission.is_empty()).then(|| Arc::new(admission)),
        Err(refusal) => return Err(limited(rec, refusal)),
    }
    let key = match (&verdict.sticky_key, verdict.pool.hash_key()) {
        (Some(k), Some(_)) => k.as_bytes().to_vec(),
        _ => hash_key(&verdict.pool, req, peer),
    };
    let target = match &path {
        Cow::Owned(normal) if route.config.normalize_path => {
            let query = req.uri().query().map_or(String::new(), |q| format!("?{q}"));
            Uri::try_from(format!("{normal}{query}")).ok()
        }
        _ => None,
    };
    let plan = Plan {
        route,
        key,
        verdict,
        peer,
        hop,
        scheme: tls::scheme(tls.map(|t| &**t)),
        normal_target: target,
    };
    Ok(Admitted { plan, rec, ws_key })
}

/// The answer to a request a limit refused: `429` with `Retry-After` (a `503` when the
/// fleet's store is down and `on_failure = "closed"`), logged with the limit's name.
fn limited(mut rec: Record, refusal: Refusal) -> Response<ResponseBody> {
    rec.limited = Some((refusal.limit, refusal.scope));
    let (status, body) = if refusal.unavailable {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "service unavailable: the shared limit store is unreachable\n".to_string(),
        )
    } else {
        (
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many requests: {} limit on {}\n",
                refusal.scope.as_str(),
                refusal.limit.as_str()
            ),
        )
    };
    let mut resp = respond(rec, status, &body, &[]);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, refusal.retry_after_secs().into());
    resp
}

impl Plan {
    /// The request target sent upstream for the client's `uri`: its own, or the
    /// normalised one ([`Plan::normal_target`]).
    pub fn target<'a>(&'a self, uri: &'a Uri) -> &'a Uri {
        self.normal_target.as_ref().unwrap_or(uri)
    }

    /// The head sent upstream: origin-form URI ([`Plan::target`]), the client's `headers`
    /// (already cleaned for this hop by the caller: `strip_hop_by_hop`, or
    /// `set_upgrade_hop` for an upgrade), `Host` per the route (`authority` is the
    /// server's, for when the client's is not kept), the `X-Forwarded-*` headers, and the
    /// plugins' header changes.
    pub fn upstream_head(
        &self,
        uri: &Uri,
        mut headers: HeaderMap,
        authority: &str,
    ) -> (Uri, HeaderMap) {
        let uri = self
            .target(uri)
            .path_and_query()
            .map(|pq| Uri::from(pq.clone()))
            .unwrap_or_else(|| Uri::from_static("/"));
        let host = !self.keeps_client_host(headers.contains_key(header::HOST));
        set_upstream_fields(
            &mut headers,
            self.hop,
            self.scheme,
            host.then_some(authority),
        );
        policy::apply(&self.verdict, &mut headers);
        (uri, headers)
    }

    /// Whether the upstream request keeps the client's `Host`: `preserve_host` (the
    /// default), and the client sent one that is not hop-by-hop. Otherwise `Host` names
    /// the server.
    pub fn keeps_client_host(&self, has_host: bool) -> bool {
        self.route.config.preserve_host && has_host
    }
}
