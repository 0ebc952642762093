//! Sluice: a WebSocket-first gateway. Modules are named for the stage of the data flow
//! they own (see `DESIGN.md`):
//!
//! accept → client (first head) → serve (HTTP) → route → (policy) → balance (select) → connect →
//! handshake → tunnel → access (close); plain requests take `forward` after `connect`.
#![forbid(unsafe_code)]

pub mod accept;
pub mod access;
pub mod balance;
pub mod client;
pub mod config;
pub mod connect;
pub mod forward;
pub mod gateway;
pub mod handshake;
pub mod headers;
pub mod health;
pub mod plugin;
pub mod policy;
pub mod route;
pub mod serve;
pub mod snapshot;
pub mod tunnel;
pub mod upgrade;
