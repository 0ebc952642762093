//! `origin-allowlist`: refuse requests whose `Origin` is not allowed, with 403.
//! This stops cross-site WebSocket hijacking: a browser attaches the user's
//! cookies to a WebSocket opened by any page, but always says which page.
//!
//! Config: `{"allowed": ["https://app.example.com", "https://*.example.org"],
//! "allow_missing": false}`. A `*.` host matches subdomains at any depth, not
//! the bare domain; scheme and port must match exactly. Requests without an
//! `Origin` (non-browser clients) pass only when `allow_missing` is true.
//!
//! Each answer depends on the `Origin` alone, so the gateway may give it again
//! to requests with the same `Origin` for a minute without a call.

use std::time::Duration;

use serde::Deserialize;
use sluice_plugin_sdk::matching::{Origin, OriginPattern};
use sluice_plugin_sdk::{Config, Decision, Fields, Plugin, Request, export};

/// The config, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    allowed: Vec<String>,
    #[serde(default)]
    allow_missing: bool,
}

/// The plugin: the allowed origin patterns, parsed once.
#[derive(Debug)]
pub struct OriginAllowlist {
    allowed: Vec<OriginPattern>,
    allow_missing: bool,
}

impl Plugin for OriginAllowlist {
    fn init(config: Config) -> Result<Self, String> {
        let raw: RawConfig = config.parse()?;
        let allowed = raw
            .allowed
            .iter()
            .map(|p| {
                OriginPattern::parse(p)
                    .ok_or_else(|| format!("{p:?} is not an origin like \"https://host[:port]\""))
            })
            .collect::<Result<_, _>>()?;
        Ok(OriginAllowlist {
            allowed,
            allow_missing: raw.allow_missing,
        })
    }

    fn request_headers(&self) -> Option<Vec<String>> {
        Some(vec!["origin".into()])
    }

    fn request_fields(&self) -> Option<Fields> {
        Some(Fields::empty())
    }

    fn on_request(&self, req: &Request) -> Decision {
        self.decide(req).reuse_for(REUSE)
    }
}

/// How long the gateway may give an answer again for the same `Origin`.
const REUSE: Duration = Duration::from_secs(60);

impl OriginAllowlist {
    fn decide(&self, req: &Request) -> Decision {
        match req.header("origin") {
            None if self.allow_missing => Decision::allow(),
            None => Decision::deny(403, "forbidden: missing Origin\n"),
            Some(origin)
                if Origin::parse(origin)
                    .is_some_and(|o| self.allowed.iter().any(|p| p.matches(&o))) =>
            {
                Decision::allow()
            }
            Some(origin) => Decision::deny(403, "forbidden: origin not allowed\n")
                .log_field("denied_origin", origin),
        }
    }
}

export!(OriginAllowlist);

#[cfg(test)]
mod tests {
    use sluice_plugin_sdk::testing::{init, on_request, request};

    use super::*;

    fn plugin(allow_missing: bool) -> OriginAllowlist {
        let config = format!(
            r#"{{"allowed": ["https://app.example.com", "https://*.example.org"], "allow_missing": {allow_missing}}}"#
        );
        init(&config).unwrap()
    }

    fn with_origin(origin: &str) -> Request {
        request().header("origin", origin).build()
    }

    #[test]
    fn exact_and_wildcard() {
        let p = plugin(false);
        assert!(!on_request(&p, &with_origin("https://app.example.com")).is_deny());
        assert!(!on_request(&p, &with_origin("https://a.b.example.org")).is_deny());
        assert_eq!(
            on_request(&p, &with_origin("https://example.org")).status(),
            Some(403)
        );
        assert_eq!(
            on_request(&p, &with_origin("https://evil.com")).status(),
            Some(403)
        );
        assert_eq!(
            on_request(&p, &with_origin("http://app.example.com")).status(),
            Some(403)
        );
        // Both answers depend on the Origin alone.
        assert_eq!(
            on_request(&p, &with_origin("https://evil.com")).reuse(),
            REUSE
        );
        assert_eq!(
            on_request(&p, &with_origin("https://app.example.com")).reuse(),
            REUSE
        );
    }

    #[test]
    fn missing_origin_per_config() {
        assert_eq!(
            on_request(&plugin(false), &request().build()).status(),
            Some(403)
        );
        assert!(!on_request(&plugin(true), &request().build()).is_deny());
    }

    #[test]
    fn bad_pattern_is_a_config_error() {
        let err = init::<OriginAllowlist>(r#"{"allowed": ["app.example.com"]}"#)
            .err()
            .unwrap();
        assert!(err.contains("app.example.com"), "{err}");
    }
}
