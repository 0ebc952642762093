//! Sluice: a WebSocket-first gateway. Modules are named for the stage of the data flow
//! they own, and listed here in the order a connection meets them; `docs/ARCHITECTURE.md`
//! follows one connection through them. A stage calls later stages, never earlier ones.
#![forbid(unsafe_code)]

// The process: config, the snapshot built from it, the state the stages share, the
// control loop that starts the workers, reloads and drains, the admin listener, and
// `sluice replay`, which runs captured requests through a config's chains offline.
pub mod admin;
pub mod config;
pub mod control;
pub mod replay;
pub mod snapshot;
pub mod state;

// One connection, in order.
pub mod accept;
pub mod access;
pub mod admit;
pub mod balance;
pub mod capture;
pub mod client;
pub mod client_handshake;
pub mod connect;
pub mod forward;
pub mod head;
pub mod limit;
pub mod listener;
pub mod open;
pub mod policy;
pub mod proxy_protocol;
pub mod respond;
pub mod route;
pub mod serve;
pub mod stream;
pub mod tls;
pub mod tunnel;
pub mod upstream_handshake;

// Used by several stages.
pub mod headers;
pub mod health;
pub mod metrics;
pub mod plugin;
pub mod sync;

#[cfg(test)]
mod module_graph;
