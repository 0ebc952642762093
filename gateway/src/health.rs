//! Active health checks: one task per server of each pool that has `[upstreams.X.health]`,
//! probing on an interval and flipping the server's health after `rise`/`fall` results.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::balance::{Pool, Server};
use crate::config::{HealthCheck, HealthConfig};
use crate::connect;

/// Starts the probes of one pool; they stop when `stop` is cancelled.
pub fn spawn(pool: &Arc<Pool>, config: &HealthConfig, stop: &CancellationToken) {
    for server in &pool.servers {
        let (server, config, stop) = (server.clone(), config.clone(), stop.clone());
        let pool = pool.clone();
        tokio::spawn(async move {
            stop.run_until_cancelled(probe_loop(pool, server, config))
                .await;
        });
    }
}

async fn probe_loop(pool: Arc<Pool>, server: Arc<Server>, config: HealthConfig) {
    let pool_name = &pool.name;
    let (mut oks, mut fails) = (0u32, 0u32);
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = match tokio::time::timeout(
            config.timeout,
            probe(&pool, &server, &config.check),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err("probe timed out".to_string()),
        };
        match result {
            Ok(()) => {
                (oks, fails) = (oks.saturating_add(1), 0);
                if !server.is_healthy() && oks >= config.rise {
                    server.set_healthy(true);
                    tracing::info!(pool = %pool_name, server = %server.config.authority, "server is healthy again");
                }
            }
            Err(why) => {
                (oks, fails) = (0, fails.saturating_add(1));
                if server.is_healthy() && fails >= config.fall {
                    server.set_healthy(false);
                    tracing::warn!(pool = %pool_name, server = %server.config.authority, reason = %why, "server marked unhealthy");
                }
            }
        }
    }
}

/// One probe: a connection (with TLS to a TLS server), and for an HTTP check a request.
async fn probe(pool: &Pool, server: &Server, check: &HealthCheck) -> Result<(), String> {
    let mut stream = connect::stream(pool, server)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let HealthCheck::Http {
        path,
        expect_status,
    } = check
    else {
        return Ok(());
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: sluice-health-check\r\nConnection: close\r\n\r\n",
        server.config.authority
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    // The status line is all we need; read until it is complete.
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| "no HTTP status line".to_string())?;
    if status == *expect_status {
        Ok(())
    } else {
        Err(format!("status {status}, expected {expect_status}"))
    }
}
