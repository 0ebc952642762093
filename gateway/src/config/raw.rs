//! The configuration file as serde reads it: one struct per table, unknown fields
//! refused, values still carrying their spans so that validation can point at them.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::LogFormat;
use super::units::{Dur, Size};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) shutdown: RawShutdown,
    #[serde(default)]
    pub(super) runtime: RawRuntime,
    pub(super) admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    pub(super) reload: RawReload,
    #[serde(default)]
    pub(super) listeners: BTreeMap<String, Spanned<RawListener>>,
    #[serde(default)]
    pub(super) upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default)]
    pub(super) routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pub(super) plugins: BTreeMap<String, Spanned<RawPlugin>>,
    #[serde(default)]
    pub(super) tenants: BTreeMap<String, Spanned<RawTenant>>,
    #[serde(default)]
    pub(super) limits: RawGlobalLimits,
    pub(super) cluster: Option<Spanned<RawCluster>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    pub(super) hosts: Option<Vec<Spanned<String>>>,
    pub(super) limits: Option<RawLimits>,
    pub(super) per_ip: Option<RawLimits>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) tunnels: Option<Spanned<u64>>,
    pub(super) handshakes: Option<Spanned<RawRate>>,
    pub(super) requests: Option<Spanned<RawRate>>,
    pub(super) bandwidth: Option<Spanned<Size>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRate {
    pub(super) rate: Spanned<f64>,
    pub(super) burst: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGlobalLimits {
    pub(super) max_clients: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) redis: Spanned<String>,
    pub(super) on_failure: Option<Spanned<String>>,
    pub(super) lease: Option<Dur>,
    pub(super) timeout: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlugin {
    pub(super) path: Spanned<String>,
    pub(super) config: Option<Spanned<toml::Table>>,
    pub(super) fail_open: Option<bool>,
    pub(super) cpu_deadline: Option<Dur>,
    pub(super) memory: Option<Spanned<Size>>,
    pub(super) max_instances: Option<Spanned<u32>>,
    pub(super) max_reused: Option<Spanned<u32>>,
    pub(super) grants: Option<RawGrants>,
}

/// What a plugin may reach beyond the host's clocks, logs and counters.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGrants {
    /// URLs whose JSON documents the host fetches for it (the `documents` import).
    pub(super) http: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    #[serde(default = "default_level")]
    pub(super) level: Spanned<String>,
    #[serde(default = "default_format")]
    pub(super) format: LogFormat,
    pub(super) access_file: Option<Spanned<String>>,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: default_level(),
            format: default_format(),
            access_file: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) bind: Spanned<String>,
    pub(super) token_file: Option<Spanned<String>>,
    pub(super) tls: Option<Spanned<RawListenerTls>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReload {
    pub(super) watch: Option<bool>,
    pub(super) debounce: Option<Dur>,
}

fn default_level() -> Spanned<String> {
    Spanned::new(0..0, "info".into())
}
fn default_format() -> LogFormat {
    LogFormat::Text
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShutdown {
    pub(super) grace: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    pub(super) workers: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) bind: Spanned<String>,
    pub(super) max_connections: Option<Spanned<u64>>,
    pub(super) header_read_timeout: Option<Dur>,
    pub(super) max_header_size: Option<Spanned<Size>>,
    pub(super) tls: Option<Spanned<RawListenerTls>>,
    pub(super) http2: Option<Spanned<RawHttp2>>,
    pub(super) proxy_protocol: Option<Vec<Spanned<String>>>,
    pub(super) trusted_proxies: Option<Vec<Spanned<String>>>,
    pub(super) per_ip: Option<RawLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp2 {
    pub(super) enabled: Option<bool>,
    pub(super) max_concurrent_streams: Option<Spanned<u32>>,
    pub(super) max_pending_resets: Option<Spanned<u32>>,
    pub(super) max_reset_rate: Option<Spanned<u32>>,
    pub(super) stream_window: Option<Spanned<Size>>,
    pub(super) connection_window: Option<Spanned<Size>>,
    pub(super) max_send_buffer: Option<Spanned<Size>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListenerTls {
    pub(super) certificates: Spanned<Vec<Spanned<RawCertificate>>>,
    pub(super) unknown_name: Option<Spanned<String>>,
    pub(super) handshake_timeout: Option<Dur>,
    pub(super) client_auth: Option<Spanned<String>>,
    pub(super) client_ca: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertificate {
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
    pub(super) names: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) servers: Spanned<Vec<Spanned<String>>>,
    pub(super) balance: Option<Spanned<String>>,
    pub(super) hash_key: Option<Spanned<String>>,
    pub(super) connect_timeout: Option<Dur>,
    pub(super) max_fails: Option<u32>,
    pub(super) fail_timeout: Option<Dur>,
    pub(super) health: Option<Spanned<RawHealth>>,
    pub(super) tls: Option<Spanned<RawUpstreamTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTls {
    pub(super) ca: Option<Spanned<String>>,
    pub(super) server_name: Option<Spanned<String>>,
    pub(super) client_cert: Option<Spanned<String>>,
    pub(super) client_key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) check: Spanned<String>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) expect_status: Option<Spanned<u16>>,
    pub(super) interval: Option<Dur>,
    pub(super) timeout: Option<Dur>,
    pub(super) rise: Option<Spanned<u32>>,
    pub(super) fall: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: Option<String>,
    pub(super) listeners: Option<Vec<Spanned<String>>>,
    pub(super) host: Option<Spanned<String>>,
    pub(super) path_prefix: Option<Spanned<String>>,
    pub(super) upstream: Option<Spanned<String>>,
    pub(super) status: Option<Spanned<u16>>,
    pub(super) body: Option<String>,
    pub(super) preserve_host: Option<bool>,
    pub(super) normalize_path: Option<bool>,
    pub(super) idle_timeout: Option<Dur>,
    pub(super) handshake_timeout: Option<Dur>,
    pub(super) request_timeout: Option<Dur>,
    pub(super) plugins: Option<Vec<Spanned<String>>>,
    pub(super) pools: Option<Vec<Spanned<String>>>,
    pub(super) tenant: Option<String>,
    pub(super) capture: Option<Spanned<RawCapture>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCapture {
    pub(super) file: Spanned<String>,
    pub(super) redact: Option<Vec<Spanned<String>>>,
    pub(super) max_size: Option<Spanned<Size>>,
}
