//! Builders and readers on [`Decision`].
//!
//! Header builders act on the upstream request of a `continue` decision and on
//! the response headers of a `deny` decision, so one chain of calls reads the
//! same either way: `Decision::deny(401, "…").set_header("www-authenticate", "Bearer")`.

use std::time::Duration;

use crate::{Decision, Denial, Header, HeaderOp, Mutations};

fn header(name: &str, value: &str) -> Header {
    Header {
        name: name.to_ascii_lowercase(),
        value: value.to_owned(),
    }
}

// wit-bindgen's derives apply to every generated type, and enums cannot derive
// `Default`, so this record gets it by hand.
#[allow(clippy::derivable_impls)]
impl Default for Mutations {
    fn default() -> Self {
        Mutations {
            headers: Vec::new(),
            pool: None,
            tenant: None,
            sticky_key: None,
            subprotocol: None,
            log_fields: Vec::new(),
            reuse_ms: 0,
        }
    }
}

impl Decision {
    /// Let the request through unchanged.
    pub fn allow() -> Self {
        Decision::Continue(Mutations::default())
    }

    /// Refuse the request with `status` and a plain-text `body`.
    pub fn deny(status: u16, body: impl Into<String>) -> Self {
        Decision::Deny(Denial {
            status,
            headers: Vec::new(),
            body: body.into(),
            log_fields: Vec::new(),
            reuse_ms: 0,
        })
    }

    /// Replace a header: upstream on `continue`, in the response on `deny`.
    pub fn set_header(mut self, name: &str, value: &str) -> Self {
        match &mut self {
            Decision::Continue(m) => m.headers.push(HeaderOp::Set(header(name, value))),
            Decision::Deny(d) => {
                d.headers.retain(|h| !h.name.eq_ignore_ascii_case(name));
                d.headers.push(header(name, value));
            }
        }
        self
    }

    /// Add a header value, keeping existing ones (upstream or response).
    pub fn append_header(mut self, name: &str, value: &str) -> Self {
        match &mut self {
            Decision::Continue(m) => m.headers.push(HeaderOp::Append(header(name, value))),
            Decision::Deny(d) => d.headers.push(header(name, value)),
        }
        self
    }

    /// Remove a header (upstream or response).
    pub fn remove_header(mut self, name: &str) -> Self {
        match &mut self {
            Decision::Continue(m) => m.headers.push(HeaderOp::Remove(name.to_ascii_lowercase())),
            Decision::Deny(d) => d.headers.retain(|h| !h.name.eq_ignore_ascii_case(name)),
        }
        self
    }

    /// Choose the upstream pool (among those the route allows). No effect on `deny`.
    pub fn pool(self, pool: impl Into<String>) -> Self {
        self.with_mutations(|m| m.pool = Some(pool.into()))
    }

    /// Assign the tenant (later plugins see it in `req.tenant`). No effect on `deny`.
    pub fn tenant(self, tenant: impl Into<String>) -> Self {
        self.with_mutations(|m| m.tenant = Some(tenant.into()))
    }

    /// Set the consistent-hash key. No effect on `deny`.
    pub fn sticky_key(self, key: impl Into<String>) -> Self {
        self.with_mutations(|m| m.sticky_key = Some(key.into()))
    }

    /// Select one of the client's offered subprotocols. No effect on `deny`.
    pub fn subprotocol(self, protocol: impl Into<String>) -> Self {
        self.with_mutations(|m| m.subprotocol = Some(protocol.into()))
    }

    /// Add a field to the access-log line (of an admitted or a refused
    /// request).
    pub fn log_field(mut self, name: &str, value: &str) -> Self {
        match &mut self {
            Decision::Continue(m) => m.log_fields.push(header(name, value)),
            Decision::Deny(d) => d.log_fields.push(header(name, value)),
        }
        self
    }

    /// Let the gateway give this same decision, without calling the plugin, to
    /// requests that show the plugin the same inputs (the headers and fields
    /// it reads, as it sees them) for up to `ttl` (whole milliseconds; the
    /// gateway keeps it for at most 5 minutes, and may forget it sooner).
    ///
    /// Only for a decision that is a function of those inputs alone: not of
    /// [`host::counter_add`](crate::host::counter_add) (a rate limit), not of
    /// the clock beyond `ttl` (a token's `exp`), and with nothing the plugin
    /// must see or log for every request. [`Duration::ZERO`] (the default)
    /// asks to be called every time.
    pub fn reuse_for(mut self, ttl: Duration) -> Self {
        let ms = u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX);
        match &mut self {
            Decision::Continue(m) => m.reuse_ms = ms,
            Decision::Deny(d) => d.reuse_ms = ms,
        }
        self
    }

    /// How long the gateway may give this decision again ([`Decision::reuse_for`]).
    pub fn reuse(&self) -> Duration {
        Duration::from_millis(
            match self {
                Decision::Continue(m) => m.reuse_ms,
                Decision::Deny(d) => d.reuse_ms,
            }
            .into(),
        )
    }

    fn with_mutations(mut self, f: impl FnOnce(&mut Mutations)) -> Self {
        if let Decision::Continue(m) = &mut self {
            f(m);
        }
        self
    }

    /// Whether this decision refuses the request.
    pub fn is_deny(&self) -> bool {
        matches!(self, Decision::Deny(_))
    }

    /// The denial status, or `None` for `continue`.
    pub fn status(&self) -> Option<u16> {
        match self {
            Decision::Deny(d) => Some(d.status),
            Decision::Continue(_) => None,
        }
    }

    /// The mutations of a `continue` decision.
    pub fn mutations(&self) -> Option<&Mutations> {
        match self {
            Decision::Continue(m) => Some(m),
            Decision::Deny(_) => None,
        }
    }

    /// The value a header ends up with upstream after this decision's
    /// operations, starting from no value (for tests and assertions).
    pub fn upstream_header(&self, name: &str) -> Option<&str> {
        let mut value = None;
        for op in self.mutations()?.headers.iter() {
            match op {
                HeaderOp::Set(h) if h.name.eq_ignore_ascii_case(name) => {
                    value = Some(h.value.as_str());
                }
                HeaderOp::Append(h) if value.is_none() && h.name.eq_ignore_ascii_case(name) => {
                    value = Some(h.value.as_str());
                }
                HeaderOp::Remove(n) if n.eq_ignore_ascii_case(name) => value = None,
                _ => {}
            }
        }
        value
    }

    /// The body of a `deny` decision.
    pub fn body(&self) -> Option<&str> {
        match self {
            Decision::Deny(d) => Some(d.body.as_str()),
            Decision::Continue(_) => None,
        }
    }

    /// The value of an access-log field this decision adds ([`Decision::log_field`]
    /// writes them; this reads one back, for tests).
    pub fn logged(&self, name: &str) -> Option<&str> {
        let fields = match self {
            Decision::Continue(m) => &m.log_fields,
            Decision::Deny(d) => &d.log_fields,
        };
        fields
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.value.as_str())
    }

    /// A response header of a `deny` decision.
    pub fn response_header(&self, name: &str) -> Option<&str> {
        match self {
            Decision::Deny(d) => d
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value.as_str()),
            Decision::Continue(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_give_back_the_body_and_log_fields() {
        let d = Decision::deny(403, "no").log_field("why", "origin");
        assert_eq!((d.body(), d.logged("why")), (Some("no"), Some("origin")));
        let a = Decision::allow().log_field("user", "alice");
        assert_eq!(
            (a.body(), a.logged("user"), a.logged("x")),
            (None, Some("alice"), None)
        );
    }

    #[test]
    fn continue_builders_accumulate() {
        let d = Decision::allow()
            .set_header("X-User", "alice")
            .append_header("x-role", "a")
            .remove_header("x-secret")
            .pool("blue")
            .tenant("acme")
            .sticky_key("alice")
            .subprotocol("chat")
            .log_field("user", "alice")
            .reuse_for(Duration::from_secs(30));
        let m = d.mutations().unwrap();
        assert_eq!(m.reuse_ms, 30_000);
        assert_eq!(d.reuse(), Duration::from_secs(30));
        assert_eq!(Decision::allow().reuse(), Duration::ZERO);
        assert_eq!(m.headers.len(), 3);
        assert_eq!(m.pool.as_deref(), Some("blue"));
        assert_eq!(m.sticky_key.as_deref(), Some("alice"));
        assert_eq!(m.tenant.as_deref(), Some("acme"));
        assert_eq!(m.subprotocol.as_deref(), Some("chat"));
        assert_eq!(d.upstream_header("x-user"), Some("alice"));
        assert_eq!(d.upstream_header("x-secret"), None);
        assert!(!d.is_deny());
        assert_eq!(d.status(), None);
    }

    #[test]
    fn deny_builders_shape_the_response() {
        let d = Decision::deny(401, "no")
            .set_header("WWW-Authenticate", "Bearer")
            .set_header("www-authenticate", "Basic")
            .append_header("x-a", "1")
            .remove_header("x-a")
            .pool("ignored")
            .sticky_key("ignored")
            .log_field("Denied_Origin", "https://evil.example")
            .reuse_for(Duration::from_millis(1500));
        assert!(d.is_deny());
        assert_eq!(d.reuse(), Duration::from_millis(1500));
        match &d {
            Decision::Deny(denial) => assert_eq!(
                denial.log_fields,
                [Header {
                    name: "denied_origin".into(),
                    value: "https://evil.example".into()
                }]
            ),
            Decision::Continue(_) => unreachable!(),
        }
        assert_eq!(d.status(), Some(401));
        assert_eq!(d.response_header("www-authenticate"), Some("Basic"));
        assert_eq!(d.response_header("x-a"), None);
        assert_eq!(d.mutations(), None);
        assert_eq!(d.upstream_header("www-authenticate"), None);
    }
}
