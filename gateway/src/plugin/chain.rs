//! A route's plugin chain: the first deny wins, mutations accumulate in
//! order, and each plugin sees the headers and tenant as the plugins before
//! it left them.

use std::collections::HashMap;

use super::Plugin;
use super::bindings;
use super::bindings::wit::{self, Fields};
use super::types::{ChainDecision, CloseInfo, Denial, Fault, Mutations, RequestInfo};

/// Status answered when a fail-closed plugin faults.
const FAULT_STATUS: u16 = 503;

/// An ordered list of plugins run for one route.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    plugins: Vec<Plugin>,
    /// Some plugin asked for `on-close`.
    wants_close: bool,
    /// The request fields some plugin reads (`None`: a plugin reads all).
    fields: Option<Fields>,
    /// The request headers some plugin reads, lower-case (`None`: a plugin
    /// reads all). Only these are copied out of the request for the chain.
    headers: Option<Vec<String>>,
}

impl Chain {
    /// A chain running `plugins` in this order.
    pub fn new(plugins: Vec<Plugin>) -> Self {
        let wants_close = plugins.iter().any(Plugin::wants_close);
        let fields = plugins
            .iter()
            .try_fold(Fields::empty(), |all, p| Some(all | p.fields()?));
        let headers = plugins.iter().try_fold(Vec::new(), |mut all, p| {
            for name in p.headers()? {
                if !all.contains(name) {
                    all.push(name.clone());
                }
            }
            Some(all)
        });
        Self {
            plugins,
            wants_close,
            fields,
            headers,
        }
    }

    /// The chain of a route that lists `names`, from the loaded `plugins` by name (names
    /// were checked by config validation).
    pub fn named(names: &[String], plugins: &HashMap<String, Plugin>) -> Self {
        Self::new(
            names
                .iter()
                .filter_map(|n| plugins.get(n).cloned())
                .collect(),
        )
    }

    /// Whether any plugin asked for `on-close`. When none did, the close
    /// path need not build a [`CloseInfo`] or start a task at all.
    pub fn wants_close(&self) -> bool {
        self.wants_close
    }

    /// Whether the chain has no plugins (the request path can skip it).
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// The request headers some plugin of the chain reads, lower-case (`None`: a plugin
    /// reads all), so the policy stage copies no others.
    pub fn headers(&self) -> Option<&[String]> {
        self.headers.as_deref()
    }

    /// The plugins, in order.
    pub fn plugins(&self) -> &[Plugin] {
        &self.plugins
    }

    /// Run `on-request` through the chain.
    pub async fn on_request(&self, req: &RequestInfo<'_>) -> ChainDecision {
        if self.plugins.is_empty() {
            return ChainDecision::Continue(Mutations::default());
        }
        let mut view = bindings::View::new(req, self.fields);
        // Each plugin's request parts, written in turn into the same buffers.
        let mut parts = bindings::Parts::new();
        for plugin in &self.plugins {
            let shown = view.request(plugin.headers(), plugin.fields(), &mut parts);
            let decision = plugin.pool.on_request(shown, view.tenant()).await;
            match decision {
                Ok(d) if d.refuses() => {
                    return bindings::denial(&d, plugin.name(), view.into_changes());
                }
                Ok(d) => bindings::accumulate(&d, &mut view),
                Err(fault) => {
                    report(plugin, "on-request", &fault);
                    if !plugin.fail_open() {
                        return fail_closed(plugin, fault, view.into_changes());
                    }
                }
            }
        }
        ChainDecision::Continue(view.into_changes())
    }

    /// Run `on-close` on every plugin that asked for it in `init`; faults
    /// are logged and counted only.
    pub async fn on_close(&self, info: &CloseInfo) {
        if !self.wants_close {
            return;
        }
        let info: wit::CloseInfo<'_> = info.into();
        for plugin in self.plugins.iter().filter(|p| p.wants_close()) {
            if let Err(fault) = plugin.pool.on_close(info.clone()).await {
                report(plugin, "on-close", &fault);
            }
        }
    }
}

fn report(plugin: &Plugin, hook: &str, fault: &Fault) {
    tracing::warn!(
        plugin = plugin.name(),
        hook,
        fail_open = plugin.fail_open(),
        %fault,
        "plugin fault"
    );
}

/// The 503 for a fail-closed plugin's fault; the log keeps the earlier plugins' fields.
fn fail_closed(plugin: &Plugin, fault: Fault, earlier: Mutations) -> ChainDecision {
    ChainDecision::Deny(Denial {
        status: FAULT_STATUS,
        headers: vec![("retry-after".into(), "1".into())],
        body: "service unavailable: policy check failed\n".into(),
        log_fields: earlier.log_fields,
        plugin: plugin.name().to_owned(),
        fault: Some(fault),
    })
}
