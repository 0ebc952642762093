//! [`Decision`]: what `on_request` returns, built by chained calls and read back by
//! tests.
//!
//! Header builders act on the upstream request of a decision that lets the request
//! through and on the response headers of a refusal, so one chain of calls reads the
//! same either way: `Decision::deny(401, "…").set_header("www-authenticate", "Bearer")`.
//!
//! A decision crosses into the gateway as the WIT's `decision`: one string of items
//! (header changes, choices, log fields, in the order they were made), then the body.
//! The builders write the items as they go, so returning a decision hands over one
//! string, not one per name and value.

use std::time::Duration;

use crate::bindings::sluice::plugin::types::Decision as Crossing;

/// A plugin's verdict on a request: [`Decision::allow`] or [`Decision::deny`], with
/// header changes, choices and log fields added by chained calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// `0` lets the request through; otherwise the refusal's status.
    status: u16,
    reuse_ms: u32,
    /// The items (the WIT's `decision`): a kind character, then NUL-ended parts. Names
    /// are kept as given: the gateway lower-cases them, and the readers match them in
    /// any case.
    text: String,
    items: u32,
    /// A refusal's body, written after the items when the decision crosses.
    body: String,
}

/// A change a decision makes to a header ([`Decision::header_ops`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderOp<'d> {
    /// Replace every value of the header (name, value).
    Set(&'d str, &'d str),
    /// Add a value, keeping the others (name, value).
    Append(&'d str, &'d str),
    /// Remove the header (name).
    Remove(&'d str),
}

/// The choices of a decision that lets the request through ([`Decision::choices`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Choices<'d> {
    /// Upstream pool ([`Decision::pool`]).
    pub pool: Option<&'d str>,
    /// Tenant ([`Decision::tenant`]).
    pub tenant: Option<&'d str>,
    /// Consistent-hash key ([`Decision::sticky_key`]).
    pub sticky_key: Option<&'d str>,
    /// Subprotocol ([`Decision::subprotocol`]).
    pub subprotocol: Option<&'d str>,
}

/// An item of a decision's text, read back.
enum Item<'d> {
    Header(HeaderOp<'d>),
    Choice(u8, &'d str),
    Log(&'d str, &'d str),
}

/// Appends `value` and its NUL; a NUL inside it is written as U+FFFD, so it cannot end
/// the part early.
fn push_part(out: &mut String, value: &str) {
    match has_nul(value.as_bytes()) {
        false => out.push_str(value),
        true => out.push_str(&value.replace('\0', "\u{FFFD}")),
    }
    out.push('\0');
}

/// Whether `bytes` holds a NUL, read eight bytes at a time: `contains(&0)` calls
/// core's `memchr`, whose setup costs a short part about 100 instructions in wasm.
fn has_nul(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let (words, rest) = bytes.as_chunks::<8>();
    // A word has a zero byte exactly when this is non-zero (the borrow a zero byte
    // starts sets its high bit, and no byte above 0x80 is counted: `!w`).
    words.iter().any(|w| {
        let w = u64::from_ne_bytes(*w);
        w.wrapping_sub(ONES) & !w & HIGHS != 0
    }) || rest.contains(&0)
}

impl Decision {
    fn new(status: u16, body: String) -> Self {
        Decision {
            status,
            reuse_ms: 0,
            text: String::new(),
            items: 0,
            body,
        }
    }

    /// Let the request through unchanged.
    pub fn allow() -> Self {
        Decision::new(0, String::new())
    }

    /// Refuse the request with `status` (300 to 599; the gateway treats any other as
    /// a fault of the plugin) and a plain-text `body`.
    pub fn deny(status: u16, body: impl Into<String>) -> Self {
        Decision::new(status, body.into())
    }

    /// Starts an item of `kind`; its parts follow.
    fn start(&mut self, kind: char) {
        if self.text.is_empty() {
            self.text.reserve(96);
        }
        self.text.push(kind);
        self.items += 1;
    }

    /// Appends a header change or log field: `name` (the gateway lower-cases it), then
    /// `value`.
    fn named(mut self, kind: char, name: &str, value: Option<&str>) -> Self {
        self.start(kind);
        push_part(&mut self.text, name);
        if let Some(value) = value {
            push_part(&mut self.text, value);
        }
        self
    }

    /// Replace a header: upstream when letting through, in the response on a refusal.
    pub fn set_header(self, name: &str, value: &str) -> Self {
        self.named('=', name, Some(value))
    }

    /// Add a header value, keeping existing ones (upstream or response).
    pub fn append_header(self, name: &str, value: &str) -> Self {
        self.named('+', name, Some(value))
    }

    /// Remove a header (upstream or response).
    pub fn remove_header(self, name: &str) -> Self {
        self.named('-', name, None)
    }

    /// Appends a choice, unless this is a refusal.
    fn choose(mut self, kind: char, value: &str) -> Self {
        if !self.is_deny() {
            self.start(kind);
            push_part(&mut self.text, value);
        }
        self
    }

    /// Choose the upstream pool (among those the route allows). No effect on a refusal.
    pub fn pool(self, pool: impl AsRef<str>) -> Self {
        self.choose('p', pool.as_ref())
    }

    /// Assign the tenant (later plugins see it in `req.tenant`). No effect on a refusal.
    pub fn tenant(self, tenant: impl AsRef<str>) -> Self {
        self.choose('t', tenant.as_ref())
    }

    /// Set the consistent-hash key. No effect on a refusal.
    pub fn sticky_key(self, key: impl AsRef<str>) -> Self {
        self.choose('k', key.as_ref())
    }

    /// Select one of the client's offered subprotocols. No effect on a refusal.
    pub fn subprotocol(self, protocol: impl AsRef<str>) -> Self {
        self.choose('s', protocol.as_ref())
    }

    /// Add a field to the access-log line (of an admitted or a refused request).
    pub fn log_field(self, name: &str, value: &str) -> Self {
        self.named('l', name, Some(value))
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
        self.reuse_ms = u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX);
        self
    }

    /// How long the gateway may give this decision again ([`Decision::reuse_for`]).
    pub fn reuse(&self) -> Duration {
        Duration::from_millis(self.reuse_ms.into())
    }

    /// Whether this decision refuses the request.
    pub fn is_deny(&self) -> bool {
        self.status != 0
    }

    /// The refusal's status, or `None` when it lets the request through.
    pub fn status(&self) -> Option<u16> {
        self.is_deny().then_some(self.status)
    }

    /// Its items, read back in order.
    fn read(&self) -> impl Iterator<Item = Item<'_>> + '_ {
        let mut parts = self.text.split_terminator('\0');
        std::iter::from_fn(move || {
            let first = parts.next()?;
            let (kind, first) = first.split_at(1);
            Some(match kind {
                "=" => Item::Header(HeaderOp::Set(first, parts.next()?)),
                "+" => Item::Header(HeaderOp::Append(first, parts.next()?)),
                "-" => Item::Header(HeaderOp::Remove(first)),
                "l" => Item::Log(first, parts.next()?),
                other => Item::Choice(other.as_bytes()[0], first),
            })
        })
    }

    /// The header changes, in order (upstream, or the response's on a refusal).
    pub fn header_ops(&self) -> impl Iterator<Item = HeaderOp<'_>> + '_ {
        self.read().filter_map(|item| match item {
            Item::Header(op) => Some(op),
            _ => None,
        })
    }

    /// The choices made, the last of each kind (all `None` on a refusal).
    pub fn choices(&self) -> Choices<'_> {
        let mut chose = Choices::default();
        for item in self.read() {
            if let Item::Choice(kind, value) = item {
                let slot = match kind {
                    b'p' => &mut chose.pool,
                    b't' => &mut chose.tenant,
                    b'k' => &mut chose.sticky_key,
                    _ => &mut chose.subprotocol,
                };
                *slot = Some(value);
            }
        }
        chose
    }

    /// The value a header ends up with after the header changes, starting from no
    /// value.
    fn header_after(&self, name: &str) -> Option<&str> {
        let mut value = None;
        for op in self.header_ops() {
            match op {
                HeaderOp::Set(n, v) if n.eq_ignore_ascii_case(name) => value = Some(v),
                HeaderOp::Append(n, v) if value.is_none() && n.eq_ignore_ascii_case(name) => {
                    value = Some(v);
                }
                HeaderOp::Remove(n) if n.eq_ignore_ascii_case(name) => value = None,
                _ => {}
            }
        }
        value
    }

    /// The value a header ends up with upstream after this decision's changes,
    /// starting from no value (for tests and assertions); `None` on a refusal.
    pub fn upstream_header(&self, name: &str) -> Option<&str> {
        self.header_after(name).filter(|_| !self.is_deny())
    }

    /// A response header of a refusal (its first value).
    pub fn response_header(&self, name: &str) -> Option<&str> {
        self.header_after(name).filter(|_| self.is_deny())
    }

    /// The body of a refusal.
    pub fn body(&self) -> Option<&str> {
        self.is_deny().then_some(self.body.as_str())
    }

    /// The value of an access-log field this decision adds ([`Decision::log_field`]
    /// writes them; this reads one back, for tests).
    pub fn logged(&self, name: &str) -> Option<&str> {
        self.read().find_map(|item| match item {
            Item::Log(n, v) if n.eq_ignore_ascii_case(name) => Some(v),
            _ => None,
        })
    }

    /// The WIT's `decision`: the items, then the body, in one string.
    pub(crate) fn crossing(self) -> Crossing {
        let mut text = self.text;
        text.push_str(&self.body);
        Crossing {
            status: self.status,
            reuse_ms: self.reuse_ms,
            items: self.items,
            text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_is_found_at_every_place_and_only_there() {
        for len in 0..24 {
            for fill in [0x01, 0x7f, 0x80, 0xff] {
                let clean = vec![fill; len];
                assert!(!has_nul(&clean), "{len} bytes of {fill:#x}");
                for at in 0..len {
                    let mut one = clean.clone();
                    one[at] = 0;
                    assert!(has_nul(&one), "{len} bytes of {fill:#x}, NUL at {at}");
                }
            }
        }
    }

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
        assert_eq!(d.reuse(), Duration::from_secs(30));
        assert_eq!(Decision::allow().reuse(), Duration::ZERO);
        assert_eq!(
            d.header_ops().collect::<Vec<_>>(),
            [
                HeaderOp::Set("X-User", "alice"),
                HeaderOp::Append("x-role", "a"),
                HeaderOp::Remove("x-secret")
            ]
        );
        assert_eq!(
            d.choices(),
            Choices {
                pool: Some("blue"),
                tenant: Some("acme"),
                sticky_key: Some("alice"),
                subprotocol: Some("chat"),
            }
        );
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
        assert_eq!(d.logged("denied_origin"), Some("https://evil.example"));
        assert_eq!(d.status(), Some(401));
        assert_eq!(d.response_header("www-authenticate"), Some("Basic"));
        assert_eq!(d.response_header("x-a"), None);
        assert_eq!(d.choices(), Choices::default());
        assert_eq!(d.upstream_header("www-authenticate"), None);
    }

    #[test]
    fn the_crossing_holds_the_items_in_the_order_made() {
        let d = Decision::allow()
            .log_field("User", "al\0ice")
            .sticky_key("K")
            .set_header("X-User", "alice")
            .pool("blue")
            .remove_header("x-secret")
            .crossing();
        assert_eq!((d.status, d.items), (0, 5));
        assert_eq!(
            d.text,
            "lUser\0al\u{FFFD}ice\0kK\0=X-User\0alice\0pblue\0-x-secret\0"
        );
        let d = Decision::deny(429, "slow\0down")
            .set_header("Retry-After", "1")
            .pool("ignored")
            .crossing();
        assert_eq!((d.status, d.items), (429, 1));
        assert_eq!(d.text, "=Retry-After\x001\0slow\0down");
    }
}
