//! The immutable view of the configuration that connections use: routes and pools built
//! from a [`Config`]. A connection takes the current snapshot once at accept and keeps it
//! for its life, so a reload never changes a live tunnel under its feet.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::balance::Pool;
use crate::config::Config;
use crate::health;
use crate::route::RouteTable;

/// Routes, pools and the config they came from.
#[derive(Debug)]
pub struct Snapshot {
    /// The validated config.
    pub config: Config,
    /// Routes with pools resolved.
    pub routes: RouteTable,
    /// Pools by name.
    pub pools: HashMap<String, Arc<Pool>>,
    health: CancellationToken,
}

impl Snapshot {
    /// Builds a snapshot and starts its health checks (so it must run inside the tokio
    /// runtime). Servers that `previous` already knew keep their live state: health,
    /// ejection and connection counts carry over a reload.
    pub fn build(config: Config, previous: Option<&Snapshot>) -> Snapshot {
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
        let routes = RouteTable::new(&config.routes, &pools);
        Snapshot {
            config,
            routes,
            pools,
            health,
        }
    }

    /// Stops this snapshot's health checks (its successor runs its own).
    pub fn retire(&self) {
        self.health.cancel();
    }
}
