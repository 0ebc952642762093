//! `tenant-router`: map a request to a tenant and an upstream pool by host,
//! path prefix and/or header. The first rule whose conditions all hold wins.
//!
//! Config:
//!
//! ```json
//! {
//!   "rules": [
//!     {"host": "*.acme.example", "tenant": "acme", "pool": "blue"},
//!     {"path_prefix": "/t/globex/", "tenant": "globex", "pool": "green"},
//!     {"header": "x-tenant", "value": "initech", "tenant": "initech", "pool": "green"}
//!   ],
//!   "default": {"tenant": "public", "pool": "blue"},
//!   "tenant_header": "x-sluice-tenant"
//! }
//! ```
//!
//! Without a `default`, an unmatched request is refused with 404. The tenant
//! is also sent upstream in `tenant_header` (replacing any client value) and
//! added to the access log.
//!
//! Each answer depends on the host, path and headers the rules read alone, so
//! the gateway may give it again to alike requests for a minute without a call.

use std::time::Duration;

use serde::Deserialize;
use sluice_plugin_sdk::matching::host_matches;
use sluice_plugin_sdk::{Config, Decision, Fields, Plugin, Request, export};

/// Where an unmatched request goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    tenant: String,
    pool: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    host: Option<String>,
    path_prefix: Option<String>,
    header: Option<String>,
    value: Option<String>,
    tenant: String,
    pool: Option<String>,
}

impl Rule {
    fn matches(&self, req: &Request) -> bool {
        self.host
            .as_deref()
            .is_none_or(|h| host_matches(h, req.host()))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| req.path().starts_with(p))
            && self.header.as_deref().is_none_or(|name| {
                let value = req.header(name);
                match &self.value {
                    Some(expected) => value == Some(expected.as_str()),
                    None => value.is_some(),
                }
            })
    }
}

/// The plugin: ordered rules and an optional default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantRouter {
    rules: Vec<Rule>,
    default: Option<Target>,
    #[serde(default = "default_tenant_header")]
    tenant_header: String,
}

fn default_tenant_header() -> String {
    "x-sluice-tenant".into()
}

impl Plugin for TenantRouter {
    fn init(config: Config) -> Result<Self, String> {
        let this: Self = config.parse()?;
        for (i, rule) in this.rules.iter().enumerate() {
            if rule.host.is_none() && rule.path_prefix.is_none() && rule.header.is_none() {
                return Err(format!(
                    "rules[{i}] needs `host`, `path_prefix` or `header`"
                ));
            }
            if rule.value.is_some() && rule.header.is_none() {
                return Err(format!("rules[{i}] has `value` without `header`"));
            }
        }
        Ok(this)
    }

    /// Only the headers the rules look at.
    fn request_headers(&self) -> Option<Vec<String>> {
        Some(self.rules.iter().filter_map(|r| r.header.clone()).collect())
    }

    /// The authority for host rules, the path for prefix rules.
    fn request_fields(&self) -> Option<Fields> {
        let mut fields = Fields::empty();
        for rule in &self.rules {
            if rule.host.is_some() {
                fields |= Fields::AUTHORITY;
            }
            if rule.path_prefix.is_some() {
                fields |= Fields::PATH;
            }
        }
        Some(fields)
    }

    fn on_request(&self, req: &Request) -> Decision {
        self.decide(req).reuse_for(REUSE)
    }
}

/// How long the gateway may give an answer again to alike requests.
const REUSE: Duration = Duration::from_secs(60);

impl TenantRouter {
    fn decide(&self, req: &Request) -> Decision {
        let matched = match self.rules.iter().find(|r| r.matches(req)) {
            Some(rule) => Some((&rule.tenant, &rule.pool)),
            None => self.default.as_ref().map(|d| (&d.tenant, &d.pool)),
        };
        let Some((tenant, pool)) = matched else {
            return Decision::deny(404, "no tenant for this request\n");
        };
        let decision = Decision::allow()
            .tenant(tenant)
            .set_header(&self.tenant_header, tenant)
            .log_field("tenant", tenant);
        match pool {
            Some(pool) => decision.pool(pool),
            None => decision,
        }
    }
}

export!(TenantRouter);

#[cfg(test)]
mod tests {
    use serde_json::json;
    use sluice_plugin_sdk::testing::{init, on_request, request};

    use super::*;

    fn plugin(default: bool) -> TenantRouter {
        let mut config = json!({"rules": [
            {"host": "*.acme.example", "tenant": "acme", "pool": "blue"},
            {"path_prefix": "/t/globex/", "tenant": "globex", "pool": "green"},
            {"header": "x-tenant", "value": "initech", "tenant": "initech"}
        ]});
        if default {
            config["default"] = json!({"tenant": "public", "pool": "blue"});
        }
        init(&config.to_string()).unwrap()
    }

    fn route(p: &TenantRouter, req: Request) -> (Option<String>, Option<String>) {
        let d = on_request(p, &req);
        assert!(!d.is_deny(), "{d:?}");
        let chose = d.choices();
        assert_eq!(d.upstream_header("x-sluice-tenant"), chose.tenant);
        (
            chose.tenant.map(str::to_owned),
            chose.pool.map(str::to_owned),
        )
    }

    #[test]
    fn rules_in_order() {
        let p = plugin(true);
        let acme = request()
            .authority("eu.acme.example:443")
            .path("/t/globex/x")
            .build();
        assert_eq!(route(&p, acme), (Some("acme".into()), Some("blue".into())));
        let globex = request().path("/t/globex/room").build();
        assert_eq!(
            route(&p, globex),
            (Some("globex".into()), Some("green".into()))
        );
        let initech = request().header("x-tenant", "initech").build();
        assert_eq!(route(&p, initech), (Some("initech".into()), None));
        assert_eq!(
            route(&p, request().build()),
            (Some("public".into()), Some("blue".into()))
        );
        assert_eq!(on_request(&p, &request().build()).reuse(), REUSE);
    }

    #[test]
    fn unmatched_without_default_is_404() {
        assert_eq!(
            on_request(&plugin(false), &request().build()).status(),
            Some(404)
        );
    }

    #[test]
    fn bad_rules_are_config_errors() {
        let err = |c: serde_json::Value| init::<TenantRouter>(&c.to_string()).err().unwrap();
        assert!(err(json!({"rules": [{"tenant": "x"}]})).contains("rules[0] needs"));
        assert!(
            err(json!({"rules": [{"path_prefix": "/", "value": "v", "tenant": "x"}]}))
                .contains("without `header`")
        );
        assert!(
            err(json!({"rules": [{"host": "a", "tenant": "x", "bogus": 1}]}))
                .contains("invalid config")
        );
    }
}
