//! Pools: how new tunnels and requests are spread over servers (round-robin, least-conn,
//! consistent hash), failover when a server dies, and active health checks.
//! Every echo [`Backend`] answers the WebSocket text `whoami` with its name (`a`, `b`, ...).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// Starts `n` echo backends and a gateway whose pool `echo` holds them, with `upstream`
/// lines added to the pool.
async fn pool(n: usize, upstream: &str) -> (Vec<Backend>, Gateway) {
    let backends = Backend::start_many(n).await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let gateway = ConfigBuilder::new(&addrs)
        .upstream_toml(upstream)
        .start()
        .await;
    (backends, gateway)
}

/// How many times each name occurs.
fn tally<'a>(names: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in names {
        *counts.entry(name.clone()).or_insert(0) += 1;
    }
    counts
}

/// Opens a tunnel with `path` and `headers`, asks which backend it reached, closes it.
async fn reached(addr: SocketAddr, path: &str, headers: &[(String, String)]) -> String {
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (ws, name) = ws_whoami(addr, path, &headers).await;
    close_ws(ws).await;
    name
}

/// Sends one plain request on a fresh connection and returns the answering backend's name.
async fn http_reached(addr: SocketAddr) -> String {
    let answer = request_once(addr, &Head::get("/who")).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    answer.text()
}

fn expected_even(names: &[&str], each: usize) -> BTreeMap<String, usize> {
    names.iter().map(|n| (n.to_string(), each)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_tunnels_evenly() {
    let (_backends, gateway) = pool(3, "balance = \"round-robin\"").await;
    let mut names = Vec::new();
    for _ in 0..30 {
        names.push(reached(gateway.addr(), "/", &[]).await);
    }
    assert_eq!(
        tally(&names),
        expected_even(&["a", "b", "c"], 10),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_plain_requests_evenly() {
    let (_backends, gateway) = pool(3, "balance = \"round-robin\"").await;
    let mut names = Vec::new();
    for _ in 0..30 {
        names.push(http_reached(gateway.addr()).await);
    }
    assert_eq!(
        tally(&names),
        expected_even(&["a", "b", "c"], 10),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_sends_new_tunnels_to_the_server_with_fewer_open_ones() {
    // One worker thread: a tunnel's access-log line and the release of its server's count
    // happen in one step of that thread, so a connection made after the line is read is
    // served after the release.
    let backends = Backend::start_many(2).await;
    let gateway = ConfigBuilder::new(&[backends[0].addr, backends[1].addr])
        .upstream_toml("balance = \"least-conn\"")
        .extra("[runtime]\nworkers = 1\n")
        .start()
        .await;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(ws_whoami(gateway.addr(), "/", &[]).await);
    }
    let names: Vec<String> = open.iter().map(|(_, n)| n.clone()).collect();
    assert_eq!(tally(&names), expected_even(&["a", "b"], 2), "{names:?}");

    // Close both tunnels on `a`: it now has 0 open tunnels, `b` has 2.
    let (on_a, on_b): (Vec<_>, Vec<_>) = open.into_iter().partition(|(_, n)| n == "a");
    for (ws, _) in on_a {
        close_ws(ws).await;
    }
    eventually(STEP, "a's tunnels to close", || {
        (backends[0].open_tunnels() == 0).then_some(())
    })
    .await;
    let a_addr = backends[0].addr.to_string();
    eventually(STEP, "the access log lines of a's two tunnels", || {
        (gateway
            .access_logs()
            .iter()
            .filter(|l| l.kind == "tunnel" && l.upstream == a_addr)
            .count()
            == 2)
            .then_some(())
    })
    .await;

    let mut fresh = Vec::new();
    for _ in 0..2 {
        fresh.push(ws_whoami(gateway.addr(), "/", &[]).await);
    }
    let names: Vec<&str> = fresh.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        names,
        ["a", "a"],
        "new tunnels go to the less loaded server"
    );
    drop(on_b);
}

/// Places 24 keys on a 4-server hash pool (the key sent as `keyed(key)` = path and
/// headers), checks every key sticks across reconnects, then stops the busiest server and
/// checks that only its keys move (to live servers) and that they stick where they moved.
async fn assert_consistent_hash(
    hash_key: &str,
    keyed: impl Fn(&str) -> (String, Vec<(String, String)>),
) {
    let (mut backends, gateway) =
        pool(4, &format!("balance = \"hash\"\nhash_key = \"{hash_key}\"")).await;
    let addr = gateway.addr();
    let keys: Vec<String> = (0..24).map(|i| format!("user-{i}")).collect();
    let place = |key: &str| {
        let (path, headers) = keyed(key);
        async move { reached(addr, &path, &headers).await }
    };

    let mut before = BTreeMap::new();
    for key in &keys {
        before.insert(key.clone(), place(key).await);
    }
    for key in &keys {
        assert_eq!(
            place(key).await,
            before[key],
            "key {key} moved on reconnect"
        );
    }
    let load = tally(before.values());
    assert!(load.len() >= 2, "all keys hashed to one server: {load:?}");
    let (victim, _) = load.iter().max_by_key(|(_, n)| **n).expect("some load");
    let victim = victim.clone();
    let index = backends
        .iter()
        .position(|b| b.name() == victim)
        .expect("victim backend");
    backends[index].stop().await;

    let mut after = BTreeMap::new();
    for round in 0..2 {
        for key in &keys {
            let now = place(key).await;
            if before[key] == victim {
                assert_ne!(now, victim, "key {key} still reached the stopped server");
            } else {
                assert_eq!(now, before[key], "key {key} was on a live server but moved");
            }
            if round == 0 {
                after.insert(key.clone(), now);
            } else {
                assert_eq!(now, after[key], "key {key} did not stick after the removal");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_on_a_header_is_sticky_and_moves_only_the_removed_servers_keys() {
    assert_consistent_hash("header:x-user", |key| {
        ("/".into(), vec![("x-user".into(), key.into())])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_on_a_cookie_is_sticky_and_moves_only_the_removed_servers_keys() {
    assert_consistent_hash("cookie:session", |key| {
        (
            "/".into(),
            vec![(
                "cookie".into(),
                format!("theme=dark; session={key}; lang=en"),
            )],
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_on_a_query_parameter_is_sticky_and_moves_only_the_removed_servers_keys() {
    assert_consistent_hash("query:session", |key| {
        (format!("/lobby?room=7&session={key}&v=2"), Vec::new())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_is_skipped_without_client_errors_and_502_only_when_all_are_dead() {
    let (mut backends, gateway) = pool(3, "balance = \"round-robin\"").await;
    let mut names = Vec::new();
    for _ in 0..6 {
        names.push(reached(gateway.addr(), "/", &[]).await);
    }
    assert_eq!(tally(&names).len(), 3, "all servers used: {names:?}");

    backends[1].stop().await;
    for i in 0..30 {
        let name = reached(gateway.addr(), "/", &[]).await;
        assert_ne!(name, "b", "tunnel {i} reached the dead server");
    }
    for i in 0..10 {
        let name = http_reached(gateway.addr()).await;
        assert_ne!(name, "b", "request {i} reached the dead server");
    }

    backends[0].stop().await;
    backends[2].stop().await;
    let answer = request_once(gateway.addr(), &Head::websocket("/")).await;
    assert_eq!(answer.status, 502, "{answer:?}");
    let answer = request_once(gateway.addr(), &Head::get("/")).await;
    assert_eq!(answer.status, 502, "{answer:?}");
}

/// A listener whose accept queue is full: with a backlog of 0 it holds one connection (the
/// returned filler, never accepted), and the kernel drops every further SYN, so a connect
/// to it stays in SYN-SENT until a retransmitted SYN finds room.
async fn full_listener() -> (tokio::net::TcpListener, tokio::net::TcpStream) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let filler = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    (listener, filler)
}

/// The upgrade head is written together with the connect; a server whose TCP handshake
/// completes only after a SYN retransmit (about 1 s) still gets it, and the tunnel works.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_completes_the_connect_late_still_gets_the_upgrade() {
    let (listener, filler) = full_listener().await;
    // SYNs are retransmitted 1, 3 and 7 s after the first: room made within 7 s is found
    // before this timeout, and before the client's handshake wait (10 s), runs out.
    let gateway = ConfigBuilder::new(&[listener.local_addr().unwrap()])
        .upstream_toml("connect_timeout = \"30s\"")
        .start()
        .await;
    let server = listener.local_addr().unwrap();
    let client = tokio::spawn(async move { reached(gateway.addr(), "/", &[]).await });
    // The gateway's SYN was dropped: its connection waits for a retransmit. (Reading the
    // socket table can take a good part of a second on a busy machine.)
    eventually(STEP, "the gateway's connect in SYN-SENT", || {
        syn_sent_to(server).then_some(())
    })
    .await;
    // Make room in the accept queue; the gateway's next SYN is answered.
    let (queued, _) = listener.accept().await.unwrap();
    drop((queued, filler));
    let backend = Backend::serve("late", listener);
    let name = within(Duration::from_secs(30), "the late upgrade", client)
        .await
        .unwrap();
    assert_eq!(name, "late");
    assert_eq!(backend.upgrades(), 1);
}

/// Whether a socket of this network namespace is in SYN-SENT towards `server` (IPv4).
#[cfg(target_os = "linux")]
fn syn_sent_to(server: SocketAddr) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let SocketAddr::V4(v4) = server else {
        panic!("{server} is not IPv4")
    };
    // `rem_address` is the IPv4 address as the kernel stores it (network order, printed
    // as a native-endian hex u32) and the port in hex; state 02 is SYN-SENT.
    let remote = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(2) == Some(&remote.as_str()) && fields.get(3) == Some(&"02")
    })
}

/// A server that never completes the TCP handshake costs each tunnel sent to it the
/// pool's connect timeout, then the next server takes the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_completes_the_connect_fails_over_after_the_timeout() {
    let (listener, _filler) = full_listener().await;
    let good = Backend::start("good").await;
    let gateway = ConfigBuilder::new(&[listener.local_addr().unwrap(), good.addr])
        .upstream_toml("balance = \"round-robin\"\nconnect_timeout = \"300ms\"")
        .start()
        .await;
    for i in 0..4 {
        let name = within(
            Duration::from_secs(5),
            "a tunnel",
            reached(gateway.addr(), "/", &[]),
        )
        .await;
        assert_eq!(name, "good", "tunnel {i}");
    }
    assert_eq!(good.upgrades(), 4);
    // Logged before the tunnel failed over, so before its answer; read from the pipe
    // some time after.
    gateway
        .wait_log("a logged connect timeout", |l| {
            l["message"] == "upstream connect failed"
                && l["error"].as_str().is_some_and(|e| e.contains("timed out"))
        })
        .await;
}

/// Waits for the gateway's log line `message` about `backend`'s health, which it writes
/// once it has changed the server's state.
async fn wait_for_health_log(gateway: &Gateway, backend: &Backend, message: &str) {
    let server = backend.addr.to_string();
    gateway
        .wait_log(&format!("{message:?} for {server}"), |l| {
            l["message"] == message && l["server"] == server.as_str()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_takes_a_failing_server_out_and_brings_it_back() {
    let (backends, gateway) = pool(
        2,
        "balance = \"round-robin\"\n\
         [upstreams.echo.health]\n\
         check = \"http\"\n\
         path = \"/healthz\"\n\
         expect_status = 200\n\
         interval = \"200ms\"\n\
         timeout = \"1s\"\n\
         rise = 1\n\
         fall = 1",
    )
    .await;
    let a = &backends[0];
    a.set_health(503);
    wait_for_health_log(&gateway, a, "server marked unhealthy").await;
    let upgrades_before = a.upgrades();
    for i in 0..10 {
        let name = reached(gateway.addr(), "/", &[]).await;
        assert_eq!(name, "b", "tunnel {i} reached the unhealthy server");
    }
    assert_eq!(
        a.upgrades(),
        upgrades_before,
        "no handshakes reach the unhealthy server"
    );

    a.set_health(200);
    wait_for_health_log(&gateway, a, "server is healthy again").await;
    let mut names = Vec::new();
    for _ in 0..10 {
        names.push(reached(gateway.addr(), "/", &[]).await);
    }
    let counts = tally(&names);
    assert!(
        counts.get("a").copied().unwrap_or(0) >= 4,
        "a gets traffic again: {counts:?}"
    );
}
