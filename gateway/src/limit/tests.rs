use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::config::Config;

fn rate(per_second: f64, burst: u32) -> Rate {
    Rate { per_second, burst }
}

#[test]
fn a_bucket_gives_its_burst_then_says_when_the_next_token_is_free() {
    let r = rate(2.0, 3);
    let now = Instant::now();
    let mut b = Bucket::full(r, now);
    for _ in 0..3 {
        assert_eq!(b.take(r, now), Ok(()));
    }
    let wait = b.take(r, now).expect_err("empty");
    assert_eq!(wait, Duration::from_millis(500));
    assert_eq!(b.take(r, now + Duration::from_millis(500)), Ok(()));
    // Refills stop at the burst.
    let later = now + Duration::from_secs(60);
    for _ in 0..3 {
        assert_eq!(b.take(r, later), Ok(()));
    }
    assert!(b.take(r, later).is_err());
}

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | n))
}

#[test]
fn the_client_table_stays_within_its_bound_and_refuses_when_every_entry_is_busy() {
    let clients = Clients::default();
    let limits = Limits {
        tunnels: Some(1),
        ..Limits::default()
    };
    let scope: Arc<str> = "listener:x".into();
    // Each entry holds a tunnel: none can be swept.
    for n in 0..10 {
        assert_eq!(
            clients.admit(&(scope.clone(), ip(n)), &limits, true, 10),
            Ok(true)
        );
    }
    let refused = clients
        .admit(&(scope.clone(), ip(10)), &limits, true, 10)
        .expect_err("full of busy entries");
    assert_eq!((refused.limit, refused.scope), (Limit::Clients, Scope::Ip));
    assert_eq!(clients.len(), 10);
    // Freed entries are swept when the table is full (after the sweep pause).
    for n in 0..5 {
        clients.release(&(scope.clone(), ip(n)));
    }
    *clients.swept.lock().unwrap() = Some(Instant::now() - SWEEP_EVERY);
    assert_eq!(
        clients.admit(&(scope.clone(), ip(10)), &limits, true, 10),
        Ok(true)
    );
    assert_eq!(clients.len(), 6);
}

#[test]
fn an_entry_whose_bucket_has_not_refilled_is_kept() {
    let clients = Clients::default();
    let limits = Limits {
        requests: Some(rate(0.001, 1)),
        ..Limits::default()
    };
    let scope: Arc<str> = "s".into();
    assert_eq!(
        clients.admit(&(scope.clone(), ip(1)), &limits, false, 1),
        Ok(false)
    );
    let again = clients.admit(&(scope.clone(), ip(1)), &limits, false, 1);
    assert_eq!(again.map_err(|r| r.limit), Err(Limit::Requests));
    // A second address cannot push out the first, whose bucket is still empty.
    let other = clients.admit(&(scope.clone(), ip(2)), &limits, false, 1);
    assert_eq!(other.map_err(|r| r.limit), Err(Limit::Clients));
}

const CONFIG: &str = r#"
[listeners.l]
bind = "127.0.0.1:0"
[listeners.l.per_ip]
tunnels = 1
[upstreams.u]
servers = ["127.0.0.1:1"]
[tenants.t.limits]
tunnels = 2
bandwidth = "4KiB"
[tenants.t.per_ip]
tunnels = 5
bandwidth = "2KiB"
[[routes]]
upstream = "u"
"#;

#[tokio::test]
async fn a_tenant_slot_is_given_back_when_its_admission_drops() {
    let config = Config::parse("test.toml", CONFIG).expect("config");
    let limiter = Arc::new(Limiter::default());
    let table = Table::new(&config, &limiter);
    let t = table.tenant(Some("t"));
    let a = table.admit("l", t.as_ref(), ip(1), true).await.expect("1");
    // The tenant's own per_ip (5) applies, not the listener's (1); the tighter
    // bandwidth of the two wins.
    let b = table.admit("l", t.as_ref(), ip(1), true).await.expect("2");
    assert_eq!(b.bandwidth, Some(2048));
    let refused = table
        .admit("l", t.as_ref(), ip(2), true)
        .await
        .expect_err("3");
    assert_eq!(
        (refused.limit, refused.scope),
        (Limit::Tunnels, Scope::Tenant)
    );
    assert_eq!(refused.retry_after_secs(), 1);
    drop(a);
    let c = table
        .admit("l", t.as_ref(), ip(2), true)
        .await
        .expect("a slot came back");
    assert_eq!(limiter.tenant("t").tunnels(), 2);
    drop((b, c));
    assert_eq!(limiter.tenant("t").tunnels(), 0);
    // No tenant: the listener's per-IP default.
    let d = table.admit("l", None, ip(3), true).await.expect("first");
    let refused = table
        .admit("l", None, ip(3), true)
        .await
        .expect_err("second");
    assert_eq!((refused.limit, refused.scope), (Limit::Tunnels, Scope::Ip));
    drop(d);
    // A tenant not in the config has no limits and is counted as the other tenants.
    let other = table.tenant(Some("nobody")).expect("counted");
    assert_eq!(&*other.name, OTHER_TENANT);
}

/// What the README's `max_clients` says an address costs (about 150 bytes with the
/// map's own overhead) stays true.
#[test]
fn a_client_entry_stays_small() {
    let size = std::mem::size_of::<(ClientKey, Client)>();
    assert!(size <= 112, "an entry is {size} bytes");
}
