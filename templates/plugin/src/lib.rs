//! A policy plugin for the Sluice gateway: refuses WebSocket upgrades whose path is
//! under one of the configured prefixes, and tags the others in the access log.
//!
//! Config (the `[plugins.NAME.config]` table, handed to `init` as JSON):
//!
//! ```toml
//! [plugins.blocklist.config]
//! blocked = ["/admin", "/internal"]
//! ```

use std::time::Duration;

use serde::Deserialize;
use sluice_plugin_sdk::{Config, Decision, Fields, Plugin, Request, export};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Blocklist {
    /// Path prefixes refused with 403.
    blocked: Vec<String>,
}

impl Plugin for Blocklist {
    fn init(config: Config) -> Result<Self, String> {
        config.parse()
    }

    // Declare what `on_request` reads: only that is copied into the plugin, and
    // reading anything else panics with a message naming what to add.
    fn request_headers(&self) -> Option<Vec<String>> {
        Some(Vec::new())
    }
    fn request_fields(&self) -> Option<Fields> {
        Some(Fields::PATH)
    }

    fn on_request(&self, req: &Request) -> Decision {
        let decision = match self
            .blocked
            .iter()
            .find(|p| req.path().starts_with(p.as_str()))
        {
            Some(prefix) => Decision::deny(403, "forbidden\n").log_field("blocked", prefix),
            None => Decision::allow().log_field("blocked", "-"),
        };
        // The answer depends on the path alone: the gateway may give it again to
        // requests for the same path for a minute without calling the plugin.
        decision.reuse_for(Duration::from_secs(60))
    }
}

export!(Blocklist);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_plugin_sdk::testing::{init, on_request, request};

    #[test]
    fn blocked_prefixes_are_refused_and_the_rest_allowed() {
        let p: Blocklist = init(r#"{"blocked": ["/admin"]}"#).unwrap();
        let refused = on_request(&p, &request().path("/admin/users").build());
        assert_eq!(
            (refused.status(), refused.logged("blocked")),
            (Some(403), Some("/admin"))
        );
        let allowed = on_request(&p, &request().path("/chat").build());
        assert!(!allowed.is_deny());
        assert!(init::<Blocklist>(r#"{"blocked": "/admin"}"#).is_err());
    }
}
