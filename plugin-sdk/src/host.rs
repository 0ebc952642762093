//! What the gateway lends a plugin: structured logging, clocks, and shared
//! windowed counters.
//!
//! Inside the gateway these call the `sluice:plugin/host` imports. In native
//! builds (unit tests) they use the in-memory host of [`crate::testing`], so
//! plugin code calls them the same way in both.

use std::time::Duration;

use crate::Level;

#[cfg(target_arch = "wasm32")]
use crate::bindings::sluice::plugin::host as imp;
#[cfg(not(target_arch = "wasm32"))]
use crate::testing::host as imp;

/// Log a message with key/value fields; the host tags it with the plugin name.
pub fn log(level: Level, message: &str, fields: &[(&str, &str)]) {
    let fields: Vec<(String, String)> = fields
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    imp::log(level, message, &fields);
}

/// Log at debug level without fields.
pub fn debug(message: &str) {
    log(Level::Debug, message, &[]);
}

/// Log at info level without fields.
pub fn info(message: &str) {
    log(Level::Info, message, &[]);
}

/// Log at warn level without fields.
pub fn warn(message: &str) {
    log(Level::Warn, message, &[]);
}

/// Wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    imp::now_ms()
}

/// Wall-clock time in whole seconds since the Unix epoch (JWT `exp`, `nbf`).
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

/// Monotonic nanoseconds; only differences are meaningful.
pub fn monotonic_ns() -> u64 {
    imp::monotonic_ns()
}

/// Add `delta` to counter `key` in the current fixed `window` and return its
/// value in that window (pass `0` to read). Counters are shared by all
/// instances of this plugin and private to it, kept apart by the tenant of the
/// request the call is about, and shared by the fleet when the gateway has
/// `[cluster]` (one Redis round trip per call then).
pub fn counter_add(key: &str, delta: u64, window: Duration) -> u64 {
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
    imp::counter_add(key, delta, window_ms)
}
