//! The immutable view of the configuration that connections use: routes, pools and
//! loaded plugins built from a [`Config`]. A connection takes the current snapshot once
//! at accept and keeps it for its life, so a reload never changes a live tunnel under
//! its feet.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::balance::Pool;
use crate::config::{Config, PluginConfig};
use crate::health;
use crate::plugin::{Plugin, PluginError, PluginHost};
use crate::route::RouteTable;

/// Routes, pools, plugins and the config they came from.
#[derive(Debug)]
pub struct Snapshot {
    /// The validated config.
    pub config: Config,
    /// Routes with pools and plugin chains resolved.
    pub routes: RouteTable,
    /// Pools by name.
    pub pools: HashMap<String, Arc<Pool>>,
    /// Loaded plugins by name, with the spec they were loaded from.
    plugins: HashMap<String, (PluginConfig, Plugin)>,
    health: CancellationToken,
}

impl Snapshot {
    /// Loads the config's plugins (compiling and running `init`, so a bad plugin fails
    /// here, before anything is served), builds the pools and routes, and starts the
    /// health checks. Must run inside the tokio runtime.
    ///
    /// From `previous`, servers keep their live state (health, ejection, connection
    /// counts) and plugins whose spec is unchanged are reused as they are.
    pub async fn load(
        config: Config,
        previous: Option<&Snapshot>,
        host: Option<&PluginHost>,
    ) -> Result<Snapshot, PluginError> {
        let mut plugins = HashMap::new();
        for spec in &config.plugins {
            let reused = previous
                .and_then(|p| p.plugins.get(&spec.name))
                .filter(|(old, _)| old == spec)
                .map(|(_, plugin)| plugin.clone());
            let plugin = match (reused, host) {
                (Some(p), _) => p,
                (None, Some(host)) => host.load(spec).await?,
                (None, None) => {
                    return Err(PluginError::Host(format!(
                        "plugin `{}`: the plugin runtime is not available",
                        spec.name
                    )));
                }
            };
            plugins.insert(spec.name.clone(), (spec.clone(), plugin));
        }
        let health = CancellationToken::new();
        let pools: HashMap<String, Arc<Pool>> = config
            .upstreams
            .iter()
            .map(|u| {
                let prev = previous.and_then(|p| p.pools.get(&u.name)).map(|p| &**p);
                let pool = Arc::new(Pool::new(u, prev));
                if let Some(h) = &u.health {
                    health::spawn(&pool, h, &health);
                }
                (u.name.clone(), pool)
            })
            .collect();
        let by_name: HashMap<String, Plugin> = plugins
            .iter()
            .map(|(n, (_, p))| (n.clone(), p.clone()))
            .collect();
        let routes = RouteTable::new(&config.routes, &pools, &by_name);
        Ok(Snapshot {
            config,
            routes,
            pools,
            plugins,
            health,
        })
    }

    /// Loads every plugin of `config` once (compile + `init`), as `sluice check` does,
    /// without starting anything else.
    pub async fn check_plugins(config: &Config) -> Result<(), PluginError> {
        if config.plugins.is_empty() {
            return Ok(());
        }
        let host = PluginHost::new()?;
        for spec in &config.plugins {
            host.load(spec).await?;
        }
        Ok(())
    }

    /// Stops this snapshot's health checks (its successor runs its own).
    pub fn retire(&self) {
        self.health.cancel();
    }
}
