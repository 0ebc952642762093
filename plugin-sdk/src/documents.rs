//! JSON documents the gateway fetches for the plugin in the background (an identity
//! provider's JWKS, say), from the URLs the operator granted it in `grants.http`.
//!
//! Call [`watch`] from `init`; then [`latest`] on the request path gives the host's
//! latest good copy when it is newer than the one the instance already has (a cheap
//! call otherwise), and [`refresh_soon`] asks for an early fetch when the copy seems
//! stale (a token names a key it lacks). Nothing here waits on the network but the
//! first [`watch`] of a URL, which fetches it once so `init` can read it.
//!
//! In native builds these use the in-memory host of [`crate::testing`]
//! (`set_document`, `refresh_requests`).

use std::time::Duration;

#[cfg(not(target_arch = "wasm32"))]
use crate::testing::documents as imp;
#[cfg(target_arch = "wasm32")]
use wasm as imp;

/// A good copy of a watched document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Grows by one with each copy that differs from the one before.
    pub version: u64,
    /// The response body (JSON).
    pub body: Vec<u8>,
}

/// Keep the document at `url` fresh: fetched again when its `Cache-Control: max-age`
/// says, kept between `min` (at least one second) and `max`, and at `min` after a
/// failure. Refused, with the reason, when the operator did not grant `url`; return
/// that from `init`, so the gateway refuses to load the plugin and says why.
pub fn watch(url: &str, min: Duration, max: Duration) -> Result<(), String> {
    let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    imp::watch(url, ms(min), ms(max))
}

/// The latest good copy of a watched document, when its version is newer than `seen`
/// (`0` before the first).
pub fn latest(url: &str, seen: u64) -> Option<Document> {
    imp::latest(url, seen)
}

/// Ask for a fetch sooner than planned; done in the background, at most once per the
/// `min` given to [`watch`].
pub fn refresh_soon(url: &str) {
    imp::refresh_soon(url);
}

/// The `sluice:plugin/documents` imports in this crate's terms.
#[cfg(target_arch = "wasm32")]
mod wasm {
    use super::Document;
    use crate::bindings::sluice::plugin::documents as wit;

    pub(super) fn watch(url: &str, min_ms: u32, max_ms: u32) -> Result<(), String> {
        wit::watch(url, wit::Refresh { min_ms, max_ms })
    }

    pub(super) fn latest(url: &str, seen: u64) -> Option<Document> {
        wit::latest(url, seen).map(|d| Document {
            version: d.version,
            body: d.body,
        })
    }

    pub(super) fn refresh_soon(url: &str) {
        wit::refresh_soon(url);
    }
}
