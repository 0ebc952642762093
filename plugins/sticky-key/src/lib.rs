//! `sticky-key`: derive the consistent-hash key from a cookie, a header, a
//! query parameter or a JWT claim, so one user (room, session…) keeps landing
//! on the same upstream server across reconnects.
//!
//! Config: `{"sources": [{"cookie": "session"}, {"jwt_claim": "sub"},
//! {"header": "x-user"}, {"query": "room"}], "fallback": "client_ip"}`. The
//! first source that yields a non-empty value wins; `fallback` is
//! `"client_ip"` or `"none"` (leave the balancer's own choice).
//!
//! The JWT is read where `jwt-auth` reads it and is **not** verified here:
//! put `jwt-auth` earlier in the chain. Better still, behind `jwt-auth` read
//! the header its `forward_claims` sets (`{"header": "x-user"}` for
//! `sub = "x-user"`): the verified claim, without decoding the token again.
//!
//! The key depends on what the sources read alone (the fallback reads the
//! client's IP, not its port), so the gateway may give it again to alike
//! requests for a minute without a call.

use std::time::Duration;

use serde::Deserialize;
use sluice_jwt::peek_claim;
use sluice_jwt::token::TokenSources;
use sluice_plugin_sdk::{Config, Decision, Fields, Plugin, Request, export};

/// One place to read the key from.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Source {
    Cookie(String),
    Header(String),
    Query(String),
    JwtClaim(String),
}

/// What to do when no source yields a key.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Fallback {
    /// Hash the client IP address.
    ClientIp,
    /// Set no key.
    #[default]
    None,
}

/// The plugin: ordered key sources and a fallback.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickyKey {
    sources: Vec<Source>,
    #[serde(default)]
    fallback: Fallback,
    /// Where to find the JWT for `jwt_claim` sources.
    #[serde(default)]
    token: TokenSources,
}

impl StickyKey {
    fn key(&self, req: &Request) -> Option<String> {
        self.sources.iter().find_map(|source| {
            let value = match source {
                Source::Cookie(name) => req.cookie(name).map(str::to_owned),
                Source::Header(name) => req.header(name).map(str::to_owned),
                Source::Query(name) => req.query(name).map(|v| v.into_owned()),
                Source::JwtClaim(claim) => {
                    // Only the payload, and only this claim: no header, no
                    // signature, no claims map.
                    let (token, _) = self.token.find(req)?;
                    peek_claim(&token, claim)
                }
            };
            value.filter(|v| !v.is_empty())
        })
    }
}

impl Plugin for StickyKey {
    fn init(config: Config) -> Result<Self, String> {
        let this: Self = config.parse()?;
        if this.sources.is_empty() && matches!(this.fallback, Fallback::None) {
            return Err("`sources` is empty and there is no fallback".into());
        }
        Ok(this)
    }

    /// Only the headers the sources read: a named header, `cookie`, or the
    /// token's `authorization`.
    fn request_headers(&self) -> Option<Vec<String>> {
        let mut names = Vec::new();
        for source in &self.sources {
            match source {
                Source::Cookie(_) => names.push("cookie".to_owned()),
                Source::Header(name) => names.push(name.clone()),
                Source::Query(_) => {}
                Source::JwtClaim(_) => names.extend(self.token.headers()),
            }
        }
        Some(names)
    }

    /// The query for a query source, the token's other places for a claim,
    /// and the client address for the IP fallback.
    fn request_fields(&self) -> Option<Fields> {
        let mut fields = Fields::empty();
        for source in &self.sources {
            match source {
                Source::Query(_) => fields |= Fields::QUERY,
                Source::JwtClaim(_) => fields |= self.token.fields(),
                Source::Cookie(_) | Source::Header(_) => {}
            }
        }
        if matches!(self.fallback, Fallback::ClientIp) {
            fields |= Fields::CLIENT_IP;
        }
        Some(fields)
    }

    fn on_request(&self, req: &Request) -> Decision {
        let key = self.key(req).or_else(|| match self.fallback {
            Fallback::ClientIp => Some(req.client_ip().to_owned()),
            Fallback::None => None,
        });
        let decision = match key {
            Some(key) => Decision::allow().sticky_key(key),
            None => Decision::allow(),
        };
        decision.reuse_for(REUSE)
    }
}

/// How long the gateway may give a key again to alike requests.
const REUSE: Duration = Duration::from_secs(60);

export!(StickyKey);

#[cfg(test)]
mod tests {
    use serde_json::json;
    use sluice_jwt::mint;
    use sluice_plugin_sdk::testing::{init, on_request, request};

    use super::*;

    fn key_of(p: &StickyKey, req: Request) -> Option<String> {
        let d = on_request(p, &req);
        assert!(!d.is_deny(), "{d:?}");
        d.choices().sticky_key.map(str::to_owned)
    }

    #[test]
    fn first_source_wins() {
        let config = json!({"sources": [{"cookie": "session"}, {"jwt_claim": "sub"}, {"header": "x-user"}, {"query": "room"}]});
        let p: StickyKey = init(&config.to_string()).unwrap();
        let token = mint::hs256(&json!({"sub": "alice"}), b"unverified-here");
        let bearer = format!("Bearer {token}");
        let both = request()
            .header("cookie", "session=s1")
            .header("authorization", &bearer)
            .build();
        assert_eq!(key_of(&p, both).as_deref(), Some("s1"));
        let jwt = request()
            .header("authorization", &bearer)
            .header("x-user", "bob")
            .build();
        assert_eq!(key_of(&p, jwt).as_deref(), Some("alice"));
        let header = request().header("x-user", "bob").build();
        assert_eq!(key_of(&p, header).as_deref(), Some("bob"));
        assert_eq!(
            key_of(&p, request().path("/?room=r%201").build()).as_deref(),
            Some("r 1")
        );
        assert_eq!(key_of(&p, request().build()), None);
        // The key depends on the sources alone: reusable.
        assert_eq!(on_request(&p, &request().build()).reuse(), REUSE);
    }

    #[test]
    fn client_ip_fallback() {
        let p: StickyKey = init(r#"{"sources": [], "fallback": "client_ip"}"#).unwrap();
        assert_eq!(
            key_of(&p, request().client("10.1.2.3:5555").build()).as_deref(),
            Some("10.1.2.3")
        );
        assert_eq!(
            key_of(&p, request().client("[::1]:5555").build()).as_deref(),
            Some("::1")
        );
        // The IP alone, not the port: reusable across a client's connections.
        assert_eq!(on_request(&p, &request().build()).reuse(), REUSE);
    }

    #[test]
    fn config_errors() {
        assert!(
            init::<StickyKey>(r#"{"sources": []}"#)
                .err()
                .unwrap()
                .contains("no fallback")
        );
        assert!(
            init::<StickyKey>(r#"{"sources": [{"bogus": "x"}]}"#)
                .err()
                .unwrap()
                .contains("invalid config")
        );
    }
}
