//! Opening the upstream side of an upgrade: connect to a server of the plan's pool with
//! the upgrade head written at once (`connect::sending`), fail over to the next
//! server on a failed connect, then complete the WebSocket handshake with it
//! (`upstream_handshake`). The result is the server's side of the tunnel, or the
//! client's answer (502, 504, or the server's own refusal).

use std::sync::Arc;
use std::time::Duration;

use http::header;
use http::{HeaderMap, Response, StatusCode, Uri};

use crate::access::Record;
use crate::admit::Plan;
use crate::balance::{ActiveGuard, Server};
use crate::connect::{self, Upstream, with_failover};
use crate::head::{RequestHead, UpgradeHead};
use crate::headers::{FieldEdit, set_upgrade_hop};
use crate::policy;
use crate::respond::{ResponseBody, no_upstream, relay_refusal, respond};
use crate::tunnel::Side;
use crate::upstream_handshake::{self, Outcome, Switch};

/// The client's upgrade request, in the form the stage that read it keeps.
pub enum ClientHead<'a> {
    /// Read by hyper: its fields in a header map.
    Map {
        /// The request target.
        uri: &'a Uri,
        /// The request's fields.
        headers: HeaderMap,
    },
    /// Read by the client stage: its raw fields.
    Raw(&'a UpgradeHead),
}

/// An upstream that answered the upgrade with a valid `101`.
pub struct Opened {
    /// The server's `101` fields for the client's `101`: its end-to-end ones (the client
    /// stage or hyper adds exactly one `Upgrade`/`Connection` pair).
    pub head: Switch,
    /// The server's side of the tunnel.
    pub server: Side<Upstream>,
    /// Counts the tunnel as active on its server.
    pub guard: ActiveGuard,
    /// The access record, now of a tunnel.
    pub rec: Record,
    /// The route's idle timeout.
    pub idle: Option<Duration>,
}

/// Connects to a server of the plan's pool and completes the WebSocket handshake with it;
/// any failure or refusal is the client's answer instead.
pub async fn open(
    client: ClientHead<'_>,
    ws_key: String,
    plan: Plan,
    mut rec: Record,
) -> Result<Opened, Response<ResponseBody>> {
    let (route, pool) = (&plan.route, &plan.verdict.pool);
    let attempt = UpgradeAttempt::new(client, &plan);
    let (server, stream) = match with_failover(pool, &plan.key, attempt).await {
        Ok(s) => s,
        Err(e) => return Err(no_upstream(rec, &e)),
    };
    rec.upstream = server.config.authority.clone();
    let guard = server.acquire();
    let outcome = tokio::time::timeout(
        route.config.handshake_timeout,
        upstream_handshake::handshake(stream, &ws_key),
    )
    .await;
    let (head, server_side) = match outcome {
        Err(_) => {
            tracing::warn!(route = %route.config.name, upstream = %rec.upstream, "upstream WebSocket handshake timed out");
            return Err(respond(
                rec,
                StatusCode::GATEWAY_TIMEOUT,
                "upstream did not answer the WebSocket handshake in time\n",
                &[],
            ));
        }
        Ok(Err(e)) => {
            tracing::warn!(route = %route.config.name, upstream = %rec.upstream, error = %e, "upstream WebSocket handshake refused");
            return Err(respond(
                rec,
                StatusCode::BAD_GATEWAY,
                "upstream sent an invalid WebSocket handshake\n",
                &[],
            ));
        }
        Ok(Ok(Outcome::Declined {
            status,
            headers,
            body,
        })) => return Err(relay_refusal(rec, status, headers, body)),
        Ok(Ok(Outcome::Upgraded { head, server })) => (head, server),
    };
    rec.kind = "tunnel";
    // What the client gets: `101`, or `200` to an HTTP/2 extended CONNECT (RFC 8441).
    rec.status = if rec.version == http::Version::HTTP_2 {
        200
    } else {
        101
    };
    Ok(Opened {
        head,
        server: server_side,
        guard,
        rec,
        idle: route.config.idle_timeout,
    })
}

/// Connects to a server and sends it the upgrade head in the same step
/// ([`connect::sending`]).
struct UpgradeAttempt<'a> {
    plan: &'a Plan,
    head: Prepared<'a>,
    /// The plugins' header changes, for heads made per server from raw fields.
    edits: Vec<FieldEdit<'a>>,
}

/// The upgrade head for the servers tried.
enum Prepared<'a> {
    /// `Host` is the client's (with `preserve_host`, the default): the same bytes for
    /// every server, made once.
    Fixed(Vec<u8>),
    /// `Host` names the server: made for each server tried, from the client's head.
    PerServer(ClientHead<'a>),
}

impl<'a> UpgradeAttempt<'a> {
    /// The client's raw fields are written upstream without a header map, with the
    /// plugins' changes made as they are written; fields hyper read are in a map already.
    fn new(client: ClientHead<'a>, plan: &'a Plan) -> Self {
        // The raw path writes the changes as it writes the fields; a map has them made
        // by `Plan::upstream_head`.
        let mut edits = Vec::new();
        let head = match client {
            ClientHead::Raw(req) => {
                edits = policy::edits(&plan.verdict);
                // Made at once with the client's `Host`, and kept if it had one.
                let fixed = plan.route.config.preserve_host.then(|| {
                    let target = plan.target(req.uri());
                    upstream_handshake::request_head_raw(
                        target,
                        req.fields(),
                        None,
                        plan.hop,
                        plan.scheme,
                        &edits,
                    )
                });
                match fixed {
                    Some((head, true)) => Prepared::Fixed(head),
                    _ => Prepared::PerServer(ClientHead::Raw(req)),
                }
            }
            ClientHead::Map { uri, mut headers } => {
                // Cleaned for the hop once, for every server tried; the `Host` decision
                // sees what goes upstream (a `Host` listed in `Connection` does not).
                set_upgrade_hop(&mut headers);
                if plan.keeps_client_host(headers.contains_key(header::HOST)) {
                    // No server's authority is written: the client's Host stays.
                    let (uri, headers) = plan.upstream_head(uri, headers, "");
                    Prepared::Fixed(upstream_handshake::request_head(&uri, &headers))
                } else {
                    Prepared::PerServer(ClientHead::Map { uri, headers })
                }
            }
        };
        UpgradeAttempt { plan, head, edits }
    }
}

impl connect::Attempt for UpgradeAttempt<'_> {
    type Output = Upstream;
    async fn attempt(&mut self, server: &Arc<Server>) -> std::io::Result<Upstream> {
        let pool = &self.plan.verdict.pool;
        let authority = server.config.authority.as_str();
        let head = match &self.head {
            Prepared::Fixed(head) => return connect::sending(pool, server, head).await,
            Prepared::PerServer(ClientHead::Raw(req)) => {
                let (target, peer) = (self.plan.target(req.uri()), self.plan.hop);
                let fields = req.fields();
                let (scheme, edits) = (self.plan.scheme, &self.edits);
                let host = Some(authority);
                upstream_handshake::request_head_raw(target, fields, host, peer, scheme, edits).0
            }
            Prepared::PerServer(ClientHead::Map { uri, headers }) => {
                let (uri, headers) = self.plan.upstream_head(uri, headers.clone(), authority);
                upstream_handshake::request_head(&uri, &headers)
            }
        };
        connect::sending(pool, server, &head).await
    }
}
