//! Policy stage: runs the route's plugin chain on a routed, validated request before a
//! server is chosen, and turns its decision into what the later stages use — the pool,
//! the sticky key, upstream header changes, the subprotocol — or a denial.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderMap;
use http::header;

use crate::balance::Pool;
use crate::capture::{Decision, HeaderEdit};
use crate::config::RouteConfig;
use crate::head::{HeaderFields, RequestHead};
use crate::headers::{FieldEdit, edit_map, lower_case, tokens, value_text};
use crate::plugin::{
    Chain, ChainDecision, Denial, HeaderOp, Mutations, RequestInfo, RequestKind, TlsInfo,
};
use crate::route::{Route, authority};
use crate::snapshot::Snapshot;
use crate::tls::{self, Facts};

/// What the chain decided for a request that may proceed.
#[derive(Debug)]
pub struct Verdict {
    /// The pool to select a server from (the route's, or one it allows).
    pub pool: Arc<Pool>,
    /// Consistent-hash key chosen by a plugin, replacing the pool's own key source.
    pub sticky_key: Option<String>,
    /// Upstream request header changes, in order.
    pub headers: Vec<HeaderOp>,
    /// The subprotocol to offer upstream, instead of the client's list.
    pub subprotocol: Option<String>,
    /// Tenant named by the route or a plugin.
    pub tenant: Option<String>,
    /// Extra access-log fields, as `key=value` pairs joined by spaces.
    pub tags: String,
}

/// Who sent a request: what plugins are told of the client's connection.
#[derive(Clone, Copy)]
pub struct Client<'a> {
    /// The client's address.
    pub addr: SocketAddr,
    /// Its TLS session, on a TLS listener.
    pub tls: Option<&'a Facts>,
}

/// Runs the route's chain. A route without plugins (and without capture) costs nothing
/// here. `path` is the normalised path routing matched, and the path plugins see: a rule
/// on `/admin` must also catch `/public/../admin`, which routing and a normalising
/// upstream treat alike. With `[routes.capture]`, what the chain saw and decided is
/// handed to the route's capture.
pub async fn decide(
    route: &Route,
    pool: &Arc<Pool>,
    snapshot: &Snapshot,
    req: &impl RequestHead,
    path: &str,
    kind: RequestKind,
    client: Client<'_>,
) -> Result<Verdict, Denial> {
    if route.chain.is_empty() && route.capture.is_none() {
        return Ok(Verdict {
            pool: pool.clone(),
            sticky_key: None,
            headers: Vec::new(),
            subprotocol: None,
            tenant: route.config.tenant.clone(),
            tags: String::new(),
        });
    }
    // A capture records every header; otherwise only those a plugin reads are copied.
    let headers = match route.capture {
        Some(_) => None,
        None => route.chain.headers(),
    };
    let info = request_info(route, req, path, kind, client, headers);
    let judged = judge(&route.config, &route.chain, &info).await;
    if let Some(capture) = &route.capture {
        capture.record(info, captured(&route.config, &judged));
    }
    let choice = judged?;
    let pool = match &choice.pool {
        None => pool.clone(),
        // `judge` checked the route allows it; validation, that the config defines it.
        Some(name) => match snapshot.pools.get(name) {
            Some(p) => p.clone(),
            None => return Err(pool_refused(&route.config, name, choice.log_fields)),
        },
    };
    Ok(Verdict {
        pool,
        sticky_key: choice.sticky_key,
        headers: choice.headers,
        subprotocol: choice.subprotocol,
        tenant: choice.tenant,
        tags: tags(
            choice
                .log_fields
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        ),
    })
}

/// What the chain decided for a request that may proceed, by name: a [`Verdict`] before
/// its pool is looked up in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The pool a plugin chose (one the route allows); `None`: the route's own.
    pub pool: Option<String>,
    /// Consistent-hash key chosen by a plugin.
    pub sticky_key: Option<String>,
    /// Upstream request header changes, in order.
    pub headers: Vec<HeaderOp>,
    /// The subprotocol to offer upstream (one the client offered).
    pub subprotocol: Option<String>,
    /// Tenant named by the route or a plugin.
    pub tenant: Option<String>,
    /// Extra access-log fields.
    pub log_fields: Vec<(String, String)>,
}

/// Runs `chain` (the chain of the route configured as `route`) on what it sees of a
/// request, and checks its choices against the route: a pool it does not allow is a
/// 503, a subprotocol the client did not offer is dropped. Needs no snapshot, so
/// `sluice replay` gives the same answers offline.
pub async fn judge(
    route: &RouteConfig,
    chain: &Chain,
    info: &RequestInfo<'_>,
) -> Result<Choice, Denial> {
    let m: Mutations = match chain.on_request(info).await {
        ChainDecision::Continue(m) => m,
        ChainDecision::Deny(d) => return Err(d),
    };
    if let Some(name) = &m.pool {
        let allowed =
            route.action_pool() == Some(name.as_str()) || route.pools.iter().any(|p| p == name);
        if !allowed {
            return Err(pool_refused(route, name, m.log_fields));
        }
    }
    Ok(Choice {
        pool: m.pool,
        sticky_key: m.sticky_key,
        headers: m.headers,
        subprotocol: (m.subprotocol).filter(|p| info.subprotocols.iter().any(|o| o == p)),
        tenant: m.tenant.or_else(|| route.tenant.clone()),
        log_fields: m.log_fields,
    })
}

/// The 503 for a chain that chose a pool the route does not allow: a policy bug, and
/// failing closed keeps tenants apart.
fn pool_refused(route: &RouteConfig, name: &str, log_fields: Vec<(String, String)>) -> Denial {
    tracing::error!(route = %route.name, pool = %name, "plugin chose a pool the route does not allow");
    Denial {
        status: 503,
        headers: Vec::new(),
        body: "service unavailable: policy chose an unknown pool\n".into(),
        log_fields,
        // Logged as `denied_by=pool:NAME`: the chain's choice was refused.
        plugin: format!("pool:{name}"),
        fault: None,
    }
}

/// A decision as a capture line (and `sluice replay`) writes it.
pub fn captured(route: &RouteConfig, judged: &Result<Choice, Denial>) -> Decision {
    match judged {
        Ok(c) => Decision::Allow {
            pool: (c.pool.as_deref())
                .or(route.action_pool())
                .unwrap_or_default()
                .to_owned(),
            sticky_key: c.sticky_key.clone(),
            headers: c.headers.iter().map(HeaderEdit::from).collect(),
            subprotocol: c.subprotocol.clone(),
            tenant: c.tenant.clone(),
            tags: c.log_fields.clone(),
        },
        Err(d) => Decision::Deny {
            status: d.status,
            headers: d.headers.clone(),
            body: d.body.clone(),
            denied_by: d.plugin.clone(),
            fault: d.fault.as_ref().map(ToString::to_string),
            tags: d.log_fields.clone(),
        },
    }
}

/// Access-log fields as the `tags` value: `key=value` pairs joined by spaces.
pub fn tags<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (k, v) in fields {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// Applies the verdict's header changes to an upstream request head. Hop-by-hop headers
/// stay the gateway's to manage and are never touched by plugins.
pub fn apply(verdict: &Verdict, headers: &mut HeaderMap) {
    edit_map(headers, &edits(verdict));
}

/// The verdict's header changes, in order, the subprotocol last: what [`apply`] makes
/// on a header map, and the raw upgrade path as it writes the fields
/// ([`crate::headers::push_upgrade_fields`]).
pub fn edits(verdict: &Verdict) -> Vec<FieldEdit<'_>> {
    let ops = verdict.headers.iter().map(|op| match op {
        HeaderOp::Set(n, v) => FieldEdit::Set(n, v),
        HeaderOp::Append(n, v) => FieldEdit::Append(n, v),
        HeaderOp::Remove(n) => FieldEdit::Remove(n),
    });
    let protocol = verdict.subprotocol.as_deref();
    let protocol = protocol.map(|p| FieldEdit::Set(header::SEC_WEBSOCKET_PROTOCOL.as_str(), p));
    ops.chain(protocol).collect()
}

/// What plugins see of a request: of its headers, those named in `wanted` (lower-case;
/// `None`: all).
fn request_info<'a>(
    route: &'a Route,
    req: &'a impl RequestHead,
    path: &'a str,
    kind: RequestKind,
    client: Client<'_>,
    wanted: Option<&[String]>,
) -> RequestInfo<'a> {
    let fields = req.fields();
    // Names lower-case, as a header map has them, whichever form the head is in.
    let headers = fields
        .each()
        .filter(|(k, _)| {
            wanted.is_none_or(|names| names.iter().any(|n| n.as_bytes().eq_ignore_ascii_case(k)))
        })
        .filter_map(|(k, v)| {
            let value = value_text(v)?;
            Some((
                lower_case(std::str::from_utf8(k).ok()?),
                Cow::Borrowed(value),
            ))
        })
        .collect();
    let subprotocols = tokens(fields, header::SEC_WEBSOCKET_PROTOCOL.as_str())
        .map(Cow::Borrowed)
        .collect();
    RequestInfo {
        kind,
        method: req.method().as_str().into(),
        scheme: tls::scheme(client.tls).into(),
        authority: authority(req).unwrap_or_default().into(),
        path: path.into(),
        query: req.uri().query().unwrap_or_default().into(),
        headers,
        client_addr: client.addr,
        tls: client.tls.map(|t| TlsInfo {
            sni: t.sni.clone(),
            alpn: t.alpn.clone(),
            client_cert_subject: t.client_subject.clone(),
            client_cert_names: t.client_names.clone(),
        }),
        route: route.config.name.as_str().into(),
        tenant: route.config.tenant.as_deref().map(Cow::Borrowed),
        subprotocols,
    }
}
