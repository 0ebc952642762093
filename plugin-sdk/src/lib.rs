//! Write Sluice gateway policy plugins in Rust.
//!
//! A plugin is a WebAssembly component built for `wasm32-wasip2` against the
//! `sluice:plugin@0.7.0` WIT package (`wit/plugin.wit`, shipped in this crate). This crate is the only
//! one a plugin author depends on: it holds the bindings, a [`Plugin`] trait
//! whose hooks have defaults, typed accessors on [`Request`], builders on
//! [`Decision`], the host helpers in [`host`], one [`export!`] macro, and
//! [`testing`] helpers so plugin logic is unit-tested natively, without wasm.
//!
//! # Lifecycle
//!
//! ```text
//! load ─► init(config JSON) ─► on_request(req) ─► … ─► on_close(info) ─► …
//!          once per instance    every request            every exchange end, for
//!                                                        a plugin that implements
//!                                                        OnClose
//! ```
//!
//! The gateway keeps a few initialised instances per plugin and reuses them,
//! one request at a time; state kept in `self` is per instance, state that must
//! be shared (rate limits) goes through [`host::counter_add`]. A plugin has no
//! network of its own: JSON documents the operator granted it (`grants.http`),
//! such as an identity provider's JWKS, are fetched by the gateway in the
//! background and read through [`documents`]. Signatures and MACs are checked by
//! the gateway too, in native code, with keys made once through [`crypto`].
//!
//! `on_request` is always called. [`OnClose::on_close`] is called for a plugin
//! that implements [`OnClose`] ([`export!`] finds out at compile time and tells
//! the gateway from `init`), so a plugin that does not costs nothing when a
//! connection ends.
//!
//! A plugin reads only what it declares ([`Plugin::request_headers`],
//! [`Plugin::request_fields`]). Reading anything else is loud, never a silent
//! empty value: the accessor panics with a message naming the declaration it
//! lacks. Under `cargo test` (through [`testing::on_request`]) that fails the
//! test; in the gateway the call faults and the message is logged.
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
//! // A plugin that wants `on_close` (metrics, quotas, audit) implements it:
//! struct CountCloses;
//!
//! impl Plugin for CountCloses {
//!     fn init(_config: Config) -> Result<Self, String> {
//!         Ok(CountCloses)
//!     }
//! }
//!
//! impl sluice_plugin_sdk::OnClose for CountCloses {
//!     fn on_close(&self, info: &sluice_plugin_sdk::CloseInfo) {
//!         let key = format!("closed:{}", info.route);
//!         sluice_plugin_sdk::host::counter_add(&key, 1, std::time::Duration::from_secs(60));
//!     }
//! }
//! assert_eq!(sluice_plugin_sdk::hooks!(CountCloses), sluice_plugin_sdk::Hooks::ON_CLOSE);
//! assert_eq!(sluice_plugin_sdk::hooks!(ApiKeyAuth), sluice_plugin_sdk::Hooks::empty());
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

pub mod crypto;
mod decision;
pub mod documents;
pub mod host;
pub mod matching;
mod request;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

/// Plugins built with the SDK allocate with `sluice-plugin-alloc` rather than wasi-libc's
/// dlmalloc (the `allocator` feature, on by default): a hook allocates a few dozen small
/// blocks (the request it is handed, the decision it returns) and frees them all at its
/// end, which free lists per size class serve in a fraction of a general allocator's
/// work.
#[cfg(all(
    feature = "allocator",
    target_arch = "wasm32",
    not(target_feature = "atomics")
))]
#[global_allocator]
static ALLOCATOR: sluice_plugin_alloc::Wasm = sluice_plugin_alloc::wasm();

/// The generated WIT bindings (`wit_bindgen::generate!`, the only site).
///
/// Plugin authors normally use the re-exports at the crate root instead.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "sluice_plugin_sdk::bindings",
        additional_derives: [PartialEq, Eq],
    });
}

use std::cell::RefCell;

pub use bindings::sluice::plugin::host::Level;
pub use bindings::sluice::plugin::types::{
    CloseInfo, CloseReason, Fields, Hooks, Interest, RequestKind,
};
pub use decision::{Choices, Decision, HeaderOp};
pub use request::{Request, Tls};

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
/// order the gateway calls them. The end of an exchange is a hook of its own,
/// [`OnClose`].
pub trait Plugin: Sized + 'static {
    /// Build an instance from its config; an `Err` makes the gateway refuse
    /// to load the plugin and report the message.
    fn init(config: Config) -> Result<Self, String>;

    /// The request headers [`Plugin::on_request`] reads (names, in any case),
    /// or `None` for all of them. Asked once, right after `init`; the
    /// gateway then hands `on_request` only these headers, which saves
    /// copying every other header into the plugin for every request.
    /// Default: all. Reading another header
    /// ([`Request::header`]) panics, naming it.
    ///
    /// Test with [`testing::on_request`], which hides the other headers as
    /// the gateway does.
    fn request_headers(&self) -> Option<Vec<String>> {
        None
    }

    /// The other fields of the request [`Plugin::on_request`] reads (path,
    /// query, authority, client address, …), or `None` for all of them.
    /// Asked once, right after `init`; a field left out is not handed over,
    /// which saves copying it into the plugin for every request, and
    /// its accessor (e.g. [`Request::path`]) panics, naming the flag to add.
    /// `kind` and the headers are always there. Default: all.
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
}

/// Observe the end of a tunnel or request. Implement it and the gateway calls it
/// for every exchange of the plugin's routes; a plugin that does not implement it
/// costs nothing when a connection ends ([`export!`] tells the gateway which).
pub trait OnClose: Plugin {
    /// How the exchange ended.
    fn on_close(&self, info: &CloseInfo);
}

/// The optional hooks a plugin type implements, as `init` reports them to the
/// gateway: `Hooks::ON_CLOSE` when it implements [`OnClose`].
#[macro_export]
macro_rules! hooks {
    ($plugin:ty) => {
        match $crate::__close_hook!($plugin) {
            ::core::option::Option::Some(_) => $crate::Hooks::ON_CLOSE,
            ::core::option::Option::None => $crate::Hooks::empty(),
        }
    };
}

/// `Some(on_close)` when the plugin type implements [`OnClose`], found at compile
/// time (autoref specialisation over a concrete type); not part of the API.
#[doc(hidden)]
#[macro_export]
macro_rules! __close_hook {
    ($plugin:ty) => {{
        #[allow(unused_imports)]
        use $crate::__private::{Closing as _, NotClosing as _};
        (&$crate::__private::Probe::<$plugin>(::core::marker::PhantomData)).close_hook()
    }};
}

/// What `init` reports to the gateway for `plugin` with `hooks` (see [`hooks!`]):
/// its hooks and the request headers and fields it reads.
pub fn interest<P: Plugin>(plugin: &P, hooks: Hooks) -> Interest {
    Interest {
        hooks,
        headers: plugin.request_headers(),
        fields: plugin.request_fields(),
    }
}

thread_local! {
    /// The headers the plugin declared (`None`: all), which [`Request::header`]
    /// holds reads to.
    static DECLARED_HEADERS: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Holds header reads to `declared` from now on (the export glue at `init`, the
/// testing helpers per call).
pub(crate) fn declare_headers(declared: Option<Vec<String>>) {
    DECLARED_HEADERS.with(|d| *d.borrow_mut() = declared);
}

/// Panics, naming the declaration, when `name` is not among the declared headers.
pub(crate) fn check_header(name: &str) {
    DECLARED_HEADERS.with(|d| {
        if let Some(declared) = &*d.borrow()
            && !declared.iter().any(|h| matching::eq_ignore_case(h, name))
        {
            panic!(
                "the plugin reads the request header `{name}`, which its request_headers() \
                 does not name: add \"{name}\" to it"
            );
        }
    });
}

/// Export glue behind [`export!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    use std::cell::RefCell;
    use std::marker::PhantomData;
    use std::rc::Rc;

    use crate::{CloseInfo, Config, Decision, Hooks, Interest, OnClose, Plugin, Request};

    /// Asks, by method resolution, whether `P` implements [`OnClose`].
    pub struct Probe<P>(pub PhantomData<P>);

    /// Chosen first, when `P: OnClose`.
    pub trait Closing<P> {
        fn close_hook(&self) -> Option<fn(&P, &CloseInfo)>;
    }

    impl<P: OnClose> Closing<P> for Probe<P> {
        fn close_hook(&self) -> Option<fn(&P, &CloseInfo)> {
            Some(<P as OnClose>::on_close)
        }
    }

    /// Chosen otherwise (one more autoref away).
    pub trait NotClosing<P> {
        fn close_hook(&self) -> Option<fn(&P, &CloseInfo)>;
    }

    impl<P> NotClosing<P> for &Probe<P> {
        fn close_hook(&self) -> Option<fn(&P, &CloseInfo)> {
            None
        }
    }

    /// Object-safe view of a plugin and its close hook.
    trait Live {
        fn on_request(&self, req: &Request) -> Decision;
        fn on_close(&self, info: &CloseInfo);
    }

    struct Bound<P> {
        plugin: P,
        close: Option<fn(&P, &CloseInfo)>,
    }

    impl<P: Plugin> Live for Bound<P> {
        fn on_request(&self, req: &Request) -> Decision {
            self.plugin.on_request(req)
        }
        fn on_close(&self, info: &CloseInfo) {
            if let Some(close) = self.close {
                close(&self.plugin, info);
            }
        }
    }

    thread_local! {
        /// The instance built by `init` (a component instance is single-threaded).
        static INSTANCE: RefCell<Option<Rc<dyn Live>>> = const { RefCell::new(None) };
    }

    /// `init`: builds the plugin, holds header reads to what it declares, makes
    /// panics log their message through the host, and reports its interest.
    pub fn init<P: Plugin>(
        config: String,
        close: Option<fn(&P, &CloseInfo)>,
    ) -> Result<Interest, String> {
        std::panic::set_hook(Box::new(|info| {
            crate::host::log(
                crate::Level::Error,
                &format!("plugin panicked: {info}"),
                &[],
            );
        }));
        let plugin = P::init(Config::new(config))?;
        let hooks = if close.is_some() {
            Hooks::ON_CLOSE
        } else {
            Hooks::empty()
        };
        let interest = crate::interest(&plugin, hooks);
        crate::declare_headers(interest.headers.clone());
        let live: Rc<dyn Live> = Rc::new(Bound { plugin, close });
        INSTANCE.with(|slot| *slot.borrow_mut() = Some(live));
        Ok(interest)
    }

    /// `on-request`.
    pub fn on_request(
        req: crate::bindings::sluice::plugin::types::Request,
    ) -> crate::bindings::sluice::plugin::types::Decision {
        match INSTANCE.with(|slot| slot.borrow().clone()) {
            Some(plugin) => plugin.on_request(&Request::from(req)),
            None => Decision::deny(500, "plugin used before init"),
        }
        .crossing()
    }

    /// `on-close`.
    pub fn on_close(info: CloseInfo) {
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
            struct SluiceExport;
            impl $crate::bindings::Guest for SluiceExport {
                fn init(
                    config: ::std::string::String,
                ) -> ::core::result::Result<$crate::Interest, ::std::string::String> {
                    $crate::__private::init::<$plugin>(config, $crate::__close_hook!($plugin))
                }
                fn on_request(
                    req: $crate::bindings::sluice::plugin::types::Request,
                ) -> $crate::bindings::sluice::plugin::types::Decision {
                    $crate::__private::on_request(req)
                }
                fn on_close(info: $crate::CloseInfo) {
                    $crate::__private::on_close(info)
                }
            }
    $crate::bindings::__export_world!(SluiceExport with_types_in $crate::bindings);
        };
    };
}
