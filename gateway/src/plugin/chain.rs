//! A route's plugin chain: the first deny wins, mutations accumulate in
//! order, and each plugin sees the headers and tenant as the plugins before
//! it left them.

use std::collections::HashMap;

use super::Plugin;
use super::bindings::wit::{self, Fields};
use super::bindings::{self, Decision, Request};
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
    pub async fn on_request(&self, req: &RequestInfo) -> ChainDecision {
        let mut acc = Mutations::default();
        if self.plugins.is_empty() {
            return ChainDecision::Continue(acc);
        }
        // Only what some plugin of the chain reads (the tenant always, since a
        // plugin may set it for the later ones).
        let mut view = bindings::request(req, self.fields, self.headers.as_deref());
        for plugin in &self.plugins {
            // Only the headers and fields it reads are lowered into the plugin; the
            // others wait aside (each costs a guest allocation and a copy per call).
            let aside = hide(&mut view, plugin.headers(), plugin.fields());
            let decision = plugin.pool.on_request(&view).await;
            restore(&mut view, aside);
            match decision {
                Ok(Decision::Continue(m)) => bindings::accumulate(m, &mut view, &mut acc),
                Ok(Decision::Deny(d)) => return bindings::denial(d, plugin.name(), acc),
                Err(fault) => {
                    report(plugin, "on-request", &fault);
                    if !plugin.fail_open() {
                        return fail_closed(plugin, fault, acc);
                    }
                }
            }
        }
        ChainDecision::Continue(acc)
    }

    /// Run `on-close` on every plugin that asked for it in `init`; faults
    /// are logged and counted only.
    pub async fn on_close(&self, info: &CloseInfo) {
        if !self.wants_close {
            return;
        }
        let info = info.into();
        for plugin in self.plugins.iter().filter(|p| p.wants_close()) {
            if let Err(fault) = plugin.pool.on_close(&info).await {
                report(plugin, "on-close", &fault);
            }
        }
    }
}

/// What [`hide`] took out of a view: the fields a plugin left out, in a request of
/// their own, and the headers it did not name with the places they had.
struct Aside {
    fields: Request,
    headers: Vec<(usize, wit::Header)>,
}

/// Takes out of `view` what a plugin does not read: the headers it did not name in
/// `wanted` (lower-case, as the view's names are; the rest keep their order) and the
/// fields `reads` leaves out (`None`: it reads all). Moved, not copied; [`restore`]
/// puts them back.
fn hide(view: &mut Request, wanted: Option<&[String]>, reads: Option<Fields>) -> Aside {
    let mut aside = Aside {
        fields: nothing(view.kind),
        headers: Vec::new(),
    };
    if let Some(wanted) = wanted
        && !view.headers.iter().all(|h| wanted.contains(&h.name))
    {
        let all = std::mem::take(&mut view.headers);
        for (at, header) in all.into_iter().enumerate() {
            match wanted.contains(&header.name) {
                true => view.headers.push(header),
                false => aside.headers.push((at, header)),
            }
        }
    }
    if let Some(reads) = reads {
        macro_rules! take_unread {
            ($($flag:ident => $field:ident),*) => {$(
                if !reads.contains(Fields::$flag) {
                    aside.fields.$field = view.$field.take();
                }
            )*};
        }
        take_unread!(
            METHOD => method, SCHEME => scheme, AUTHORITY => authority, PATH => path,
            QUERY => query, CLIENT_ADDR => client_addr,
            CLIENT_IP => client_ip, TLS => tls, ROUTE => route,
            TENANT => tenant, SUBPROTOCOLS => subprotocols
        );
    }
    aside
}

/// A request of `kind` with no headers and every field `none`.
fn nothing(kind: wit::RequestKind) -> Request {
    Request {
        kind,
        method: None,
        scheme: None,
        authority: None,
        path: None,
        query: None,
        headers: Vec::new(),
        client_addr: None,
        client_ip: None,
        tls: None,
        route: None,
        tenant: None,
        subprotocols: None,
    }
}

/// Puts back what [`hide`] took out of `view`, each header in its place.
fn restore(view: &mut Request, aside: Aside) {
    // In ascending places: each lands where it was, before the ones after it return.
    for (at, header) in aside.headers {
        view.headers.insert(at, header);
    }
    let aside = aside.fields;
    // A field is either in the view or aside, never both.
    macro_rules! put_back {
        ($($field:ident),*) => {$( view.$field = view.$field.take().or(aside.$field); )*};
    }
    put_back!(
        method,
        scheme,
        authority,
        path,
        query,
        client_addr,
        client_ip,
        tls,
        route,
        tenant,
        subprotocols
    );
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

#[cfg(test)]
mod tests {
    use super::bindings::header;
    use super::*;

    #[test]
    fn hidden_headers_and_fields_come_back_in_their_places() {
        let headers = vec![
            header("a", "1"),
            header("b", "2"),
            header("a", "3"),
            header("c", "4"),
            header("b", "5"),
        ];
        let mut view = Request {
            method: Some("GET".into()),
            path: Some("/p".into()),
            headers: headers.clone(),
            ..nothing(wit::RequestKind::Websocket)
        };
        // The generated types have no `PartialEq`; their `Debug` shows every field.
        let shown = |r: &Request| format!("{r:?}");
        let original = shown(&view);
        let wanted = ["b".to_owned()];
        let aside = hide(&mut view, Some(&wanted), Some(Fields::PATH));
        let values: Vec<&str> = view.headers.iter().map(|h| h.value.as_str()).collect();
        assert_eq!(values, ["2", "5"]);
        assert_eq!(
            (view.method.as_deref(), view.path.as_deref()),
            (None, Some("/p"))
        );
        restore(&mut view, aside);
        assert_eq!(shown(&view), original);
        // Every header wanted, every field read: nothing moves.
        let all = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let aside = hide(&mut view, Some(&all), None);
        assert_eq!(shown(&view), original);
        restore(&mut view, aside);
        assert_eq!(format!("{:?}", view.headers), format!("{headers:?}"));
    }
}
