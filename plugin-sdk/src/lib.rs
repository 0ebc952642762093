//! Write Sluice gateway policy plugins in Rust.
//!
//! A plugin is a WebAssembly component built for `wasm32-wasip2` against the
//! `sluice:plugin@0.5.0` WIT package (`wit/plugin.wit`). This crate is the only
//! one a plugin author depends on: it holds the bindings, a [`Plugin`] trait
//! whose hooks have defaults, typed accessors on [`Request`], builders on
//! [`Decision`], the host helpers in [`host`], one [`export!`] macro, and
//! [`testing`] helpers so plugin logic is unit-tested natively, without wasm.
//!
//! # Lifecycle
//!
//! ```text
//! load ─► init(config JSON) ─► on_request(req) ─► … ─► on_close(info) ─► …
//!          once per instance    every request            every exchange end,
//!                                                        if ON_CLOSE is true
//! ```
//!
//! The gateway keeps a few initialised instances per plugin and reuses them,
//! one request at a time; state kept in `self` is per instance, state that must
//! be shared (rate limits) goes through [`host::counter_add`].
//!
//! `on_request` is always called. [`Plugin::on_close`] is an opt-in hook: the
//! gateway calls it only for plugins that set [`Plugin::ON_CLOSE`] to `true`
//! (the export glue reports it from `init`), so a plugin that does not need
//! it costs nothing when a connection ends.
//!
//! A decision that depends only on what the plugin reads (an origin check, a
//! routing table, a verified token until it expires) can say so with
//! [`Decision::reuse_for`]: the gateway then gives it again to requests that
//! show the plugin the same inputs, without calling it. Narrowing those inputs
//! ([`Plugin::request_headers`], [`Plugin::request_fields`]) is what makes two
//! requests alike.
//!
//! # Example: API-key auth in twenty lines
//!
//! ```
//! use sluice_plugin_sdk::{Config, Decision, Fields, Plugin, Request, export};
//! use std::collections::HashMap;
//!
//! #[derive(serde::Deserialize)]
//! struct ApiKeyAuth {
//!     /// API key → client name.
//!     keys: HashMap<String, String>,
//! }
//!
//! impl Plugin for ApiKeyAuth {
//!     fn init(config: Config) -> Result<Self, String> {
//!         config.parse()
//!     }
//!
//!     // Only this header is copied into the plugin, and none of the other
//!     // request fields (default: all of both).
//!     fn request_headers(&self) -> Option<Vec<String>> {
//!         Some(vec!["x-api-key".into()])
//!     }
//!     fn request_fields(&self) -> Option<Fields> {
//!         Some(Fields::empty())
//!     }
//!
//!     fn on_request(&self, req: &Request) -> Decision {
//!         let Some(key) = req.header("x-api-key") else {
//!             return Decision::deny(401, "missing api key").set_header("www-authenticate", "ApiKey");
//!         };
//!         match self.keys.get(key) {
//!             Some(client) => Decision::allow().remove_header("x-api-key").set_header("x-client", client),
//!             None => Decision::deny(403, "unknown api key"),
//!         }
//!     }
//! }
//!
//! export!(ApiKeyAuth);
//!
//! // A plugin that wants `on_close` (metrics, quotas, audit) says so:
//! struct CountCloses;
//!
//! impl Plugin for CountCloses {
//!     const ON_CLOSE: bool = true;
//!
//!     fn init(_config: Config) -> Result<Self, String> {
//!         Ok(CountCloses)
//!     }
//!
//!     fn on_close(&self, info: &sluice_plugin_sdk::CloseInfo) {
//!         let key = format!("closed:{}", info.route);
//!         sluice_plugin_sdk::host::counter_add(&key, 1, std::time::Duration::from_secs(60));
//!     }
//! }
//!
//! // Natively, the same logic runs under `cargo test` (and sees only the
//! // headers and fields it asked for, as in the gateway):
//! use sluice_plugin_sdk::testing::{init, on_request, request};
//! let auth: ApiKeyAuth = init(r#"{"keys": {"k-123": "alice"}}"#).unwrap();
//! let ok = on_request(&auth, &request().header("x-api-key", "k-123").build());
//! assert_eq!(ok.upstream_header("x-client"), Some("alice"));
//! assert_eq!(on_request(&auth, &request().build()).status(), Some(401));
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` on a crate of
//! `crate-type = ["cdylib"]`; the `.wasm` file is the component.

mod decision;
pub mod host;
pub mod matching;
mod request;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

/// The generated WIT bindings (`wit_bindgen::generate!`, the only site).
///
/// Plugin authors normally use the re-exports at the crate root instead.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "sluice_plugin_sdk::bindings",
        additional_derives: [PartialEq, Eq],
    });
}

use std::cell::RefCell;
use std::rc::Rc;

pub use bindings::sluice::plugin::host::Level;
pub use bindings::sluice::plugin::types::{
    CloseInfo, CloseReason, Decision, Denial, Fields, Header, HeaderOp, Hooks, Interest, Mutations,
    Request, RequestKind, TlsInfo,
};

/// The configuration handed to [`Plugin::init`]: the JSON text of the
/// plugin's `config` table in the gateway config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config(String);

impl Config {
    /// Wrap a JSON document (an empty string counts as `{}`).
    pub fn new(json: impl Into<String>) -> Self {
        Self(json.into())
    }

    /// The raw JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Deserialize the config, with a readable error for the operator.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        let text = if self.0.trim().is_empty() {
            "{}"
        } else {
            &self.0
        };
        serde_json::from_str(text).map_err(|e| format!("invalid config: {e}"))
    }
}

/// A policy plugin. Override only the hooks you need; they are listed in the
/// order the gateway calls them.
pub trait Plugin: Sized + 'static {
    /// Whether the gateway should call [`Plugin::on_close`]. Default `false`:
    /// the hook is never called, and a finished connection costs the gateway
    /// no plugin call at all. Set it to `true` when you implement `on_close`.
    const ON_CLOSE: bool = false;

    /// Build an instance from its config; an `Err` makes the gateway refuse
    /// to load the plugin and report the message.
    fn init(config: Config) -> Result<Self, String>;

    /// The request headers [`Plugin::on_request`] reads (names, in any case),
    /// or `None` for all of them. Asked once, right after `init`; the
    /// gateway then hands `on_request` only these headers, which saves
    /// copying every other header into the plugin for every request (about
    /// a third of a microsecond each). Default: all.
    ///
    /// Test with [`testing::on_request`], which hides the other headers as
    /// the gateway does.
    fn request_headers(&self) -> Option<Vec<String>> {
        None
    }

    /// The other fields of the request [`Plugin::on_request`] reads (path,
    /// query, authority, client address, …), or `None` for all of them.
    /// Asked once, right after `init`; a field left out arrives as `None`
    /// (its accessor, e.g. [`Request::path`], then gives `""`), which saves
    /// a guest allocation and a copy per field per request. `kind` and the
    /// headers are always there. Default: all.
    ///
    /// ```
    /// # use sluice_plugin_sdk::Fields;
    /// // A plugin that reads the path and the query string.
    /// let fields = Fields::PATH | Fields::QUERY;
    /// # assert!(fields.contains(Fields::PATH));
    /// ```
    ///
    /// [`testing::on_request`] hides the other fields as the gateway does.
    fn request_fields(&self) -> Option<Fields> {
        None
    }

    /// Decide on a request before the upstream is chosen. Default: allow,
    /// unchanged.
    fn on_request(&self, req: &Request) -> Decision {
        let _ = req;
        Decision::allow()
    }

    /// Observe the end of a tunnel or request. Called only when
    /// [`Plugin::ON_CLOSE`] is `true`. Default: nothing.
    fn on_close(&self, info: &CloseInfo) {
        let _ = info;
    }
}

/// Object-safe view of a [`Plugin`] kept by the export glue.
trait DynPlugin {
    fn on_request(&self, req: &Request) -> Decision;
    fn on_close(&self, info: &CloseInfo);
}

impl<P: Plugin> DynPlugin for P {
    fn on_request(&self, req: &Request) -> Decision {
        Plugin::on_request(self, req)
    }
    fn on_close(&self, info: &CloseInfo) {
        Plugin::on_close(self, info)
    }
}

thread_local! {
    /// The instance built by `init` (a component instance is single-threaded).
    static INSTANCE: RefCell<Option<Rc<dyn DynPlugin>>> = const { RefCell::new(None) };
}

/// The optional hooks `P` asks the gateway to call, as `init` reports them.
pub fn hooks<P: Plugin>() -> Hooks {
    if P::ON_CLOSE {
        Hooks::ON_CLOSE
    } else {
        Hooks::empty()
    }
}

/// What `init` reports to the gateway for `plugin`: its hooks and the
/// request headers and fields it reads.
pub fn interest<P: Plugin>(plugin: &P) -> Interest {
    Interest {
        hooks: hooks::<P>(),
        headers: plugin.request_headers(),
        fields: plugin.request_fields(),
    }
}

/// Export glue behind [`export!`]; not part of the API.
#[doc(hidden)]
pub struct Export<P>(std::marker::PhantomData<P>);

impl<P: Plugin> bindings::Guest for Export<P> {
    fn init(config: String) -> Result<Interest, String> {
        let plugin = P::init(Config(config))?;
        let interest = interest(&plugin);
        INSTANCE.with(|slot| *slot.borrow_mut() = Some(Rc::new(plugin)));
        Ok(interest)
    }

    fn on_request(req: Request) -> Decision {
        match INSTANCE.with(|slot| slot.borrow().clone()) {
            Some(plugin) => plugin.on_request(&req),
            None => Decision::deny(500, "plugin used before init"),
        }
    }

    fn on_close(info: CloseInfo) {
        if let Some(plugin) = INSTANCE.with(|slot| slot.borrow().clone()) {
            plugin.on_close(&info);
        }
    }
}

/// Export a [`Plugin`] type as the component's implementation of the
/// `sluice:plugin/plugin` world. Use it once per plugin crate. On native
/// targets it expands to nothing, so the crate still builds and tests.
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            type SluiceExport = $crate::Export<$plugin>;
    $crate::bindings::__export_world!(SluiceExport with_types_in $crate::bindings);
        };
    };
}
