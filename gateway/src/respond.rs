//! The answers Sluice writes itself rather than relaying: its own statuses (404, 502,
//! 503, 504, a fixed-answer route, a refused handshake), a plugin's refusal, and an
//! upstream's refusal of an upgrade framed anew for the client. Each is logged when its
//! body ends, through the access record it carries.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::access::{Counted, Record};
use crate::connect::ConnectError;
use crate::headers::strip_hop_by_hop;
use crate::plugin::Denial;
use crate::policy;

/// The body of every response Sluice sends: a relayed upstream body or its own text.
pub type ResponseBody = Counted<Either<Incoming, Full<Bytes>>>;

/// A response of Sluice's own, logged at once.
pub fn respond(
    mut rec: Record,
    status: StatusCode,
    body: &str,
    headers: &[(HeaderName, &'static str)],
) -> Response<ResponseBody> {
    rec.status = status.as_u16();
    let mut resp = Response::new(Counted::logged(
        Either::Right(Full::new(Bytes::copy_from_slice(body.as_bytes()))),
        rec,
    ));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    for (name, value) in headers {
        resp.headers_mut()
            .insert(name.clone(), HeaderValue::from_static(value));
    }
    resp
}

/// A plugin's refusal, sent as the plugin wrote it.
pub fn deny(mut rec: Record, denial: Denial) -> Response<ResponseBody> {
    let status = StatusCode::from_u16(denial.status).unwrap_or(StatusCode::FORBIDDEN);
    if !denial.plugin.is_empty() {
        let fields = denial
            .log_fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()));
        rec.tags =
            policy::tags(std::iter::once(("denied_by", denial.plugin.as_str())).chain(fields));
    }
    let mut resp = respond(rec, status, &denial.body, &[]);
    for (name, value) in &denial.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            resp.headers_mut().append(n, v);
        }
    }
    resp
}

/// The 502 for a request no server of its pool would take.
pub fn no_upstream(rec: Record, e: &ConnectError) -> Response<ResponseBody> {
    tracing::warn!(route = %rec.route, error = %e, "no upstream server available");
    respond(
        rec,
        StatusCode::BAD_GATEWAY,
        "no upstream server is available\n",
        &[],
    )
}

/// Relays a server's refusal of an upgrade (read whole by the upstream handshake), framed
/// anew for the client.
pub fn relay_refusal(
    mut rec: Record,
    status: StatusCode,
    mut headers: HeaderMap,
    body: Bytes,
) -> Response<ResponseBody> {
    rec.status = status.as_u16();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::CONTENT_LENGTH);
    let mut resp = Response::new(Counted::logged(Either::Right(Full::new(body)), rec));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}
