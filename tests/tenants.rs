//! Tenants and their limits through the real `sluice` binary: concurrent tunnels, the
//! handshake and request rates (429 with a `Retry-After` that, honoured, succeeds), per
//! client address within a tenant and listener-wide, bandwidth shaping, the client named
//! by a trusted proxy (`X-Forwarded-For`, the PROXY protocol), a tenant a plugin chose,
//! the client table's bound under a flood of addresses, and the per-tenant metrics.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Two tenants on their own hosts (`a.example`, `b.example`), the admin listener, and
/// `tables` (more `[tenants.*]` settings) appended.
fn tenants(backend: &Backend, tables: &str) -> ConfigBuilder {
    ConfigBuilder::new(&[backend.addr]).extra(&format!(
        r#"{ADMIN}
[tenants.a]
hosts = ["a.example"]

[tenants.b]
hosts = ["b.example"]

[[routes]]
name = "a"
host = "a.example"
upstream = "echo"

[[routes]]
name = "b"
host = "b.example"
upstream = "echo"

{tables}"#
    ))
}

fn ip(text: &str) -> Option<IpAddr> {
    Some(text.parse().expect("an address"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_tunnel_limit_gets_429_while_another_tenant_connects() {
    let backend = Backend::start("a").await;
    let gateway = tenants(&backend, "[tenants.a.limits]\ntunnels = 2\n")
        .start()
        .await;
    let addr = gateway.addr();
    let first = upgrade(addr, "a.example", None).await.expect("tunnel 1");
    let second = upgrade(addr, "a.example", None).await.expect("tunnel 2");
    let upgrades = backend.upgrades();

    let refused = upgrade(addr, "a.example", None)
        .await
        .expect_err("over the limit");
    assert_limited(&refused, "tenant limit on tunnels");
    assert_eq!(
        backend.upgrades(),
        upgrades,
        "a refused upgrade reached the upstream"
    );
    let b = upgrade(addr, "b.example", None)
        .await
        .expect("tenant b is not limited");

    // Closing one of a's tunnels frees its slot.
    close_ws(first).await;
    let third = within(STEP, "a's slot to come back", async {
        loop {
            match upgrade(addr, "a.example", None).await {
                Ok(ws) => return ws,
                Err(r) => assert_limited(&r, "tunnels"),
            };
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let log = gateway
        .wait_access_log("a refusal", |l| l.status == 429)
        .await;
    assert_eq!(log.tenant.as_deref(), Some("a"), "{log:?}");
    assert_eq!(log.kind, "websocket", "a refused upgrade is logged as one");
    assert_eq!(log.limit.as_deref(), Some("tenant.tunnels"), "{log:?}");
    let m = Metrics::scrape(gateway.admin().await).await;
    let limited = [("tenant", "a"), ("limit", "tunnels"), ("scope", "tenant")];
    assert!(m.value("sluice_limited_total", &limited) >= 1.0);
    assert_eq!(
        m.value("sluice_tenant_tunnels_open", &[("tenant", "a")]),
        2.0
    );
    assert_eq!(
        m.value("sluice_tenant_tunnels_open", &[("tenant", "b")]),
        1.0
    );
    let tunnels = [("tenant", "a"), ("outcome", "tunnel")];
    assert_eq!(m.value("sluice_tenant_handshakes_total", &tunnels), 3.0);
    let refused = [("tenant", "a"), ("status", "429")];
    assert!(m.value("sluice_tenant_handshakes_total", &refused) >= 1.0);
    let status = admin_json(gateway.admin().await, "/status").await;
    let a = status["tenants"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == "a"))
        .unwrap_or_else(|| panic!("no tenant a in {status}"));
    assert_eq!(
        (a["tunnels_open"].as_i64(), a["tunnel_limit"].as_i64()),
        (Some(2), Some(2))
    );
    assert!(a["limited"].as_u64() >= Some(1), "{a}");
    for ws in [second, third, b] {
        close_ws(ws).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_burst_past_the_bucket_gets_429_and_honouring_retry_after_succeeds() {
    let backend = Backend::start("a").await;
    let limits = "[tenants.a.limits]\nhandshakes = { rate = 1, burst = 3 }\n";
    let gateway = tenants(&backend, limits).start().await;
    let addr = gateway.addr();
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(
            upgrade(addr, "a.example", None)
                .await
                .expect("within the burst"),
        );
    }
    let refused = upgrade(addr, "a.example", None)
        .await
        .expect_err("past the burst");
    let wait = assert_limited(&refused, "tenant limit on handshakes");
    assert!(wait <= 1, "Retry-After {wait}s for a bucket refilling 1/s");
    // The other tenant's bucket is its own.
    open.push(upgrade(addr, "b.example", None).await.expect("tenant b"));
    tokio::time::sleep(Duration::from_secs(wait)).await;
    open.push(
        upgrade(addr, "a.example", None)
            .await
            .expect("after Retry-After"),
    );
    for ws in open {
        close_ws(ws).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_limits_within_a_tenant_and_on_a_listener_keep_addresses_apart() {
    let backend = Backend::start("a").await;
    let gateway = tenants(
        &backend,
        "[tenants.a.per_ip]\ntunnels = 1\n[tenants.a.limits]\ntunnels = 100\n",
    )
    .listener_toml("[listeners.public.per_ip]\nrequests = { rate = 0.5, burst = 2 }")
    .start()
    .await;
    let addr = gateway.addr();
    // Tenant a: one tunnel per address.
    let two = upgrade(addr, "a.example", ip("127.0.0.2"))
        .await
        .expect("first from .2");
    let refused = upgrade(addr, "a.example", ip("127.0.0.2"))
        .await
        .expect_err("second from .2");
    assert_limited(&refused, "ip limit on tunnels");
    let three = upgrade(addr, "a.example", ip("127.0.0.3"))
        .await
        .expect("first from .3");

    // The listener's default: two plain requests per address, then 429.
    for from in ["127.0.0.2", "127.0.0.3"] {
        for _ in 0..2 {
            let mut c = RawClient::from_stream(connect_from(from.parse().unwrap(), addr).await);
            assert_eq!(c.request(&Head::get("/")).await.status, 200);
        }
    }
    let mut c = RawClient::from_stream(connect_from("127.0.0.2".parse().unwrap(), addr).await);
    let wait = assert_limited(&c.request(&Head::get("/")).await, "ip limit on requests");
    assert!(
        wait <= 2,
        "Retry-After {wait}s for a bucket refilling 0.5/s"
    );
    let log = gateway
        .wait_access_log("the request refusal", |l| {
            l.status == 429 && l.limit.as_deref() == Some("ip.requests")
        })
        .await;
    assert!(log.client.starts_with("127.0.0.2:"), "{log:?}");
    close_ws(two).await;
    close_ws(three).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shaped_tunnel_moves_about_its_bandwidth() {
    let backend = Backend::start("a").await;
    let gateway = tenants(&backend, "[tenants.a.limits]\nbandwidth = \"64KiB\"\n")
        .start()
        .await;
    let addr = gateway.addr();
    let mut ws = upgrade(addr, "a.example", None).await.expect("tunnel");
    // 256 KiB each way through a bucket of 64 KiB/s that starts full: at least 3 s, and
    // (however loaded the machine) not many times that.
    let data = pattern(256 * 1024, 7);
    let started = Instant::now();
    let mut back = Vec::new();
    within(Duration::from_secs(30), "the shaped echo", async {
        ws.send(Message::binary(data.clone())).await.expect("send");
        while back.len() < data.len() {
            match next_data(&mut ws).await {
                Message::Binary(b) => back.extend_from_slice(&b),
                other => panic!("{other:?}"),
            }
        }
    })
    .await;
    let took = started.elapsed();
    assert_eq!(checksum(&back), checksum(&data));
    assert!(
        took >= Duration::from_millis(2900),
        "256 KiB at 64 KiB/s took only {took:?}"
    );
    assert!(took <= Duration::from_secs(20), "took {took:?}");
    // Another tenant's tunnel is not shaped.
    let mut fast = upgrade(addr, "b.example", None).await.expect("tunnel b");
    let started = Instant::now();
    let echoed = roundtrip(&mut fast, Message::binary(data.clone())).await;
    assert_eq!(echoed.len(), data.len());
    assert!(started.elapsed() < took, "the unshaped echo was as slow");
    close_ws(ws).await;
    close_ws(fast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxys_forwarded_for_names_the_client_that_limits_and_upstreams_see() {
    let backend = Backend::start("a").await;
    let gateway = tenants(&backend, "[tenants.a.per_ip]\ntunnels = 1\n")
        .listener_toml("trusted_proxies = [\"127.0.0.1\"]")
        .start()
        .await;
    let addr = gateway.addr();
    let via = |client: &str| {
        Head::websocket("/")
            .set("Host", "a.example")
            .header("X-Forwarded-For", &format!("198.51.100.1, {client}"))
    };
    let one = upgrade_with(addr, via("203.0.113.1"), ip("127.0.0.1"))
        .await
        .expect("203.0.113.1");
    let refused = upgrade_with(addr, via("203.0.113.1"), ip("127.0.0.1"))
        .await
        .expect_err("203.0.113.1 again");
    assert_limited(&refused, "ip limit on tunnels");
    let two = upgrade_with(addr, via("203.0.113.2"), ip("127.0.0.1"))
        .await
        .expect("203.0.113.2");
    let seen = backend.requests();
    let last = seen.last().expect("the upgrade reached the backend");
    assert_eq!(
        last.header("x-forwarded-for"),
        Some("198.51.100.1, 203.0.113.2, 127.0.0.1"),
        "the proxy's own address is appended"
    );
    let log = gateway
        .wait_access_log("the refusal", |l| l.status == 429)
        .await;
    assert!(log.client.starts_with("203.0.113.1:"), "{log:?}");

    // From an address that is not trusted, the header names no one: the socket's
    // address is the client, and its one tunnel is taken.
    let three = upgrade_with(addr, via("203.0.113.3"), ip("127.0.0.5"))
        .await
        .expect(".5");
    let refused = upgrade_with(addr, via("203.0.113.4"), ip("127.0.0.5"))
        .await
        .expect_err("spoofed");
    assert_limited(&refused, "ip limit on tunnels");
    for ws in [one, two, three] {
        close_ws(ws).await;
    }
}

/// A v1 PROXY header naming `client`.
fn proxy_v1(client: IpAddr, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 {port} 8080\r\n").into_bytes()
}

/// A v2 PROXY header (TCP over IPv4) naming `client`.
fn proxy_v2(client: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x21, 0x11, 0, 12]);
    h.extend(client);
    h.extend([127, 0, 0, 1]);
    h.extend(port.to_be_bytes());
    h.extend(8080u16.to_be_bytes());
    h
}

/// A connection that sent `header` first.
async fn behind_balancer(addr: SocketAddr, header: &[u8]) -> RawClient {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(header).await.expect("PROXY header");
    RawClient::from_stream(tcp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_clients_are_limited_apart_and_a_flood_of_addresses_stays_bounded() {
    let backend = Backend::start("a").await;
    let gateway = tenants(&backend, "[limits]\nmax_clients = 1000\n")
        .listener_toml(
            "proxy_protocol = [\"127.0.0.1\"]\n[listeners.public.per_ip]\ntunnels = 1\n\
             requests = { rate = 1, burst = 1 }",
        )
        .start()
        .await;
    let addr = gateway.addr();
    let admin = gateway.admin().await;
    let head = Head::websocket("/").set("Host", "a.example");
    // v1 and v2 name the same client: its second tunnel is refused.
    let mut c = behind_balancer(addr, &proxy_v1("203.0.113.7".parse().unwrap(), 5000)).await;
    assert_eq!(c.request(&head).await.status, 101);
    let mut one = c.into_websocket().await;
    assert_eq!(whoami(&mut one).await, "a");
    let mut c = behind_balancer(addr, &proxy_v2([203, 0, 113, 7], 5001)).await;
    assert_limited(&c.request(&head).await, "ip limit on tunnels");
    let mut c = behind_balancer(addr, &proxy_v2([203, 0, 113, 8], 5002)).await;
    assert_eq!(c.request(&head).await.status, 101, "another client");

    // 100,000 addresses, one request each, in 16 lanes; the table stays within its bound.
    let upstream_before = backend.requests().len();
    let sent = std::sync::atomic::AtomicUsize::new(0);
    let lanes = (0..16u32).map(|lane| {
        let sent = &sent;
        async move {
            for i in (lane..100_000).step_by(16) {
                let client = [10, (i >> 16) as u8, (i >> 8) as u8, i as u8];
                let mut c = behind_balancer(addr, &proxy_v2(client, 6000)).await;
                let answer = c.request(&Head::get("/").set("Connection", "close")).await;
                assert!(
                    [200, 429].contains(&answer.status),
                    "client {client:?}: {answer:?}"
                );
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let flood = futures_util::future::join_all(lanes);
    let watch = async {
        let mut most = 0.0f64;
        while sent.load(std::sync::atomic::Ordering::Relaxed) < 100_000 {
            let held = Metrics::scrape(admin)
                .await
                .value("sluice_limit_clients", &[]);
            most = most.max(held);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        most
    };
    let (_, most) = within(Duration::from_secs(240), "the flood", async {
        tokio::join!(flood, watch)
    })
    .await;
    let held = Metrics::scrape(admin)
        .await
        .value("sluice_limit_clients", &[]);
    assert!(
        most <= 1000.0 && held <= 1000.0,
        "the client table held {most} at most, {held} at the end; the bound is 1000"
    );
    let served = backend.requests().len() - upstream_before;
    assert!(served > 0, "no flood request reached the upstream");
    let m = Metrics::scrape(admin).await;
    assert!(
        m.value(
            "sluice_limited_total",
            &[("tenant", ""), ("limit", "clients"), ("scope", "ip")]
        ) > 0.0,
        "a full table of busy addresses refuses new ones"
    );
    // The earlier client still has its one tunnel, and still may not open a second.
    assert_eq!(whoami(&mut one).await, "a");
    let mut c = behind_balancer(addr, &proxy_v1("203.0.113.7".parse().unwrap(), 5003)).await;
    assert_limited(&c.request(&head).await, "ip limit on tunnels");
    close_ws(one).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_chosen_by_a_plugin_gets_that_tenants_limits() {
    let backend = Backend::start("a").await;
    let router = plugin_wasm("tenant-router");
    let gateway = ConfigBuilder::new(&[backend.addr])
        .route_toml("plugins = [\"router\"]")
        .extra(&format!(
            r#"{ADMIN}
[plugins.router]
path = {router:?}

[plugins.router.config]
rules = [{{ header = "x-tenant", value = "acme", tenant = "acme", pool = "echo" }}]
default = {{ tenant = "public", pool = "echo" }}

[tenants.acme.limits]
tunnels = 1
"#
        ))
        .start()
        .await;
    let addr = gateway.addr();
    let acme = Head::websocket("/").header("X-Tenant", "acme");
    let one = upgrade_with(addr, acme.clone(), None)
        .await
        .expect("acme's one tunnel");
    let refused = upgrade_with(addr, acme, None)
        .await
        .expect_err("acme's second");
    assert_limited(&refused, "tenant limit on tunnels");
    // The default tenant `public` is not in the config: no limit, counted as `_other`.
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(upgrade(addr, "sluice.test", None).await.expect("public"));
    }
    let m = Metrics::scrape(gateway.admin().await).await;
    assert_eq!(
        m.value("sluice_tenant_tunnels_open", &[("tenant", "acme")]),
        1.0
    );
    assert_eq!(
        m.value("sluice_tenant_tunnels_open", &[("tenant", "_other")]),
        3.0
    );
    close_ws(one).await;
    for ws in open {
        close_ws(ws).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_a_tenants_limits_and_its_open_tunnels_still_count() {
    let backend = Backend::start("a").await;
    let config = |n: u32| tenants(&backend, &format!("[tenants.a.limits]\ntunnels = {n}\n"));
    let gateway = config(1).start().await;
    let addr = gateway.addr();
    let one = upgrade(addr, "a.example", None)
        .await
        .expect("the one tunnel");
    assert_limited(
        &upgrade(addr, "a.example", None).await.expect_err("2nd"),
        "tunnels",
    );
    std::fs::write(gateway.config_path(), config(2).build()).expect("rewrite config");
    let reload = admin_post(gateway.admin().await, "/reload", None).await;
    assert_eq!(reload.status, 200, "{}", reload.text());
    let two = upgrade(addr, "a.example", None)
        .await
        .expect("the raised limit");
    // The tunnel opened before the reload still holds its slot: 2 of 2.
    assert_limited(
        &upgrade(addr, "a.example", None).await.expect_err("3rd"),
        "tunnels",
    );
    close_ws(one).await;
    close_ws(two).await;
}
