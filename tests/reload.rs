//! Reloads that pick up every change, through all three triggers (SIGHUP, `POST
//! /reload`, the file watch): a `.wasm` rebuilt in place, listeners added, removed and
//! rebound, a new `max_connections`, keep-alive connections meeting the newest config,
//! old generations freed when their last tunnel ends; and a reload storm under a few
//! hundred live tunnels that loses no message.

#![forbid(unsafe_code)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// Copies `from` over `to` the way a deploy does: a new file renamed into place.
fn install(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).expect("copy component");
    std::fs::rename(&tmp, to).expect("rename component into place");
}

/// Waits for the next successful reload after `generation`; returns the new generation.
async fn reloaded_past(admin: SocketAddr, generation: u64) -> u64 {
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let status = admin_json(admin, "/status").await;
        let g = status["generation"].as_u64().expect("generation");
        if g > generation {
            return g;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reload past generation {generation}: {:#}",
            status["last_reload"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The status of a WebSocket handshake to `path` with `Origin: origin`.
async fn handshake_status(addr: SocketAddr, path: &str, origin: &str) -> u16 {
    request_once(addr, &Head::websocket(path).header("Origin", origin))
        .await
        .status
}

/// A plugin's component replaced at the same path (same config) is loaded on reload:
/// the new code decides the next handshake, while a tunnel the old code admitted runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasm_rebuilt_in_place_is_loaded_on_reload() {
    let backend = Backend::start("a").await;
    let dir = TempDir::new();
    let policy = dir.path().join("policy.wasm");
    install(&plugin_wasm("hostile"), &policy);
    let config = ConfigBuilder::new(&[backend.addr])
        .route_toml("plugins = [\"policy\"]")
        .extra(&format!(
            "{ADMIN}[reload]\nwatch = false\n[plugins.policy]\npath = {:?}\n",
            policy.display().to_string()
        ))
        .build();
    let gateway = Gateway::start(&config).await;
    let admin = gateway.admin().await;
    let (mut old, name) = ws_whoami(gateway.addr(), "/ws", &[]).await;
    assert_eq!(name, "a");

    install(&plugin_wasm("hostile-deny"), &policy);
    gateway.signal("HUP");
    reloaded_past(admin, 1).await;
    let refused = request_once(gateway.addr(), &Head::websocket("/ws")).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_eq!(refused.text(), "hostile: the deny build\n");
    assert_eq!(whoami(&mut old).await, "a", "the old tunnel runs on");

    // An unchanged file keeps the loaded plugin: its counters go on.
    let calls = |m: &Metrics| m.value("sluice_plugin_calls_total", &[("plugin", "policy")]);
    let latency = |m: &Metrics| {
        m.value(
            "sluice_plugin_call_duration_seconds_count",
            &[("plugin", "policy")],
        )
    };
    // The old build's on-request for the open tunnel, the deny build's on-request and
    // its on-close for the refusal (heard after the 403 is sent).
    wait_metric(
        admin,
        "sluice_plugin_calls_total",
        &[("plugin", "policy")],
        3.0,
    )
    .await;
    let before = Metrics::scrape(admin).await;
    let (calls_before, timed_before) = (calls(&before), latency(&before));
    assert_eq!(
        timed_before, 2.0,
        "both builds' on-request calls were timed"
    );
    assert_eq!(admin_post(admin, "/reload", None).await.status, 200);
    assert_eq!(calls(&Metrics::scrape(admin).await), calls_before);

    // A rebuilt file is loaded anew, and its counters count on from the old build's: a
    // counter that fell back to zero at every deploy would read as a restart.
    install(&plugin_wasm("hostile"), &policy);
    assert_eq!(admin_post(admin, "/reload", None).await.status, 200);
    let (_ws, name) = ws_whoami(gateway.addr(), "/ws", &[]).await;
    assert_eq!(name, "a", "the allowing build is back");
    let after = Metrics::scrape(admin).await;
    assert!(
        calls(&after) >= calls_before + 1.0,
        "calls went from {calls_before} to {}",
        calls(&after)
    );
    assert!(
        latency(&after) >= timed_before + 1.0,
        "timed calls went from {timed_before} to {}",
        latency(&after)
    );
}

/// The config of [`listeners_follow_the_config_on_reload`]: `listeners` as TOML.
fn with_listeners(backend: SocketAddr, listeners: &str) -> String {
    format!(
        "[log]\nformat = \"json\"\n{listeners}\n{ADMIN}\
         [upstreams.echo]\nservers = [\"{backend}\"]\n\
         [[routes]]\nname = \"main\"\npath_prefix = \"/\"\nupstream = \"echo\"\n"
    )
}

/// A connection to `addr` gets no WebSocket: refused, or closed without an answer.
async fn not_served(addr: SocketAddr) {
    let r = within(
        STEP,
        "a refused connection",
        try_ws_connect(addr, "/ws", &[]),
    )
    .await;
    assert!(r.is_err(), "{addr} still served a WebSocket");
}

/// Listeners added, removed, renamed and rebound by a reload: a new one accepts at once,
/// a removed one stops accepting while its tunnels run on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_follow_the_config_on_reload() {
    let backend = Backend::start("a").await;
    let gateway = Gateway::start(&with_listeners(
        backend.addr,
        "[listeners.public]\nbind = \"127.0.0.1:0\"\n",
    ))
    .await;
    let admin = gateway.admin().await;
    let public = gateway.addr();
    let (mut on_public, _) = ws_whoami(public, "/ws", &[]).await;

    // Added: `second` on another loopback address; `public` removed.
    gateway.reload(&with_listeners(
        backend.addr,
        "[listeners.second]\nbind = \"127.0.0.2:0\"\n",
    ));
    let second = gateway.listening("second", 1).await;
    assert_eq!(ws_whoami(second, "/ws", &[]).await.1, "a");
    not_served(public).await;
    assert_eq!(
        whoami(&mut on_public).await,
        "a",
        "a removed listener's tunnel runs on"
    );
    let status = admin_json(admin, "/status").await;
    let names: Vec<&str> = status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["second"]);

    // Rebound: `second` moves to another address.
    gateway.reload(&with_listeners(
        backend.addr,
        "[listeners.second]\nbind = \"127.0.0.3:0\"\n",
    ));
    let moved = gateway.listening("second", 2).await;
    assert_ne!(moved, second);
    assert_eq!(ws_whoami(moved, "/ws", &[]).await.1, "a");
    not_served(second).await;

    // Renamed at the same fixed address: the socket is kept, and routes see the new name.
    let fixed = format!("[listeners.third]\nbind = \"{moved}\"\n");
    gateway.reload(&with_listeners(backend.addr, &fixed));
    assert_eq!(gateway.listening("third", 1).await, moved);
    assert_answered(moved, &Head::get("/renamed"), "a").await;
    let line = gateway
        .wait_access_log("a request on the renamed listener", |l| {
            l.listener == "third"
        })
        .await;
    assert_eq!(line.route, "main");
    assert!(
        !gateway
            .stderr_lines()
            .iter()
            .any(|l| l.contains("cannot bind")),
        "the renamed listener kept its socket"
    );
}

/// A lower or higher `max_connections` applies to the next connection: a client held
/// at the limit is let through once a reload raises it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_max_connections_applies_on_reload() {
    let backend = Backend::start("a").await;
    let builder = ConfigBuilder::new(&[backend.addr]).extra(ADMIN);
    let gateway = builder
        .clone()
        .listener_toml("max_connections = 1")
        .start()
        .await;
    let admin = gateway.admin().await;
    let (_first, _) = ws_whoami(gateway.addr(), "/ws", &[]).await;
    let addr = gateway.addr();
    let waiting = tokio::spawn(async move { try_ws_connect(addr, "/ws", &[]).await });
    // Held at the limit: no answer while the first tunnel is open.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a second client got through max_connections = 1"
    );
    gateway.reload(&builder.listener_toml("max_connections = 2").build());
    let mut second = within(STEP, "the waiting client", waiting)
        .await
        .expect("task")
        .expect("the second WebSocket after the limit was raised");
    assert_eq!(whoami(&mut second).await, "a");
    let m = Metrics::scrape(admin).await;
    assert_eq!(
        m.value("sluice_connections_max", &[("listener", "public")]),
        2.0
    );
}

/// Each request of a keep-alive connection meets the newest config, and the connection
/// does not keep an old generation alive; a tunnel does, until it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_requests_meet_the_newest_config_and_old_generations_are_freed() {
    let backend = Backend::start("a").await;
    let fixed = |body: &str| {
        ConfigBuilder::new(&[backend.addr])
            .extra(&format!(
                "{ADMIN}[[routes]]\nname = \"fixed\"\npath_prefix = \"/fixed\"\nstatus = 200\nbody = {body:?}\n"
            ))
            .build()
    };
    let gateway = Gateway::start(&fixed("one")).await;
    let admin = gateway.admin().await;
    let mut client = RawClient::connect(gateway.addr()).await;
    let first = client.request(&Head::get("/fixed")).await;
    assert_eq!(first.text(), "one");
    let (tunnel, _) = ws_whoami(gateway.addr(), "/ws", &[]).await;

    gateway.reload(&fixed("two"));
    reloaded_past(admin, 1).await;
    let second = client.request(&Head::get("/fixed")).await;
    assert_eq!(
        second.text(),
        "two",
        "the same connection meets the new config"
    );

    // Generation 1 lives on in the tunnel only.
    let alive = |m: &Metrics| m.get("sluice_snapshot_generations_alive", &[]);
    assert_eq!(alive(&Metrics::scrape(admin).await), Some(2.0));
    close_ws(tunnel).await;
    wait_metric(admin, "sluice_snapshot_generations_alive", &[], 1.0).await;
    // The keep-alive connection still works, on the current generation.
    assert_eq!(client.request(&Head::get("/fixed")).await.text(), "two");
}

/// One tunnel that keeps exchanging numbered messages until told to stop, checking every
/// echo arrives whole and in order.
async fn chatter(mut ws: Ws, stop: Arc<AtomicBool>, count: Arc<AtomicU64>, seed: u64) -> Ws {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && n < 100_000 {
        let payload = pattern(64 + (n as usize % 200), seed.wrapping_mul(1_000_003) + n);
        let sum = checksum(&payload);
        within(STEP, "a send", ws.send(Message::binary(payload)))
            .await
            .expect("send");
        match next_data(&mut ws).await {
            Message::Binary(b) => assert_eq!(checksum(&b), sum, "message {n} of tunnel {seed}"),
            other => panic!("tunnel {seed}: {other:?}"),
        }
        n += 1;
        count.fetch_add(1, Ordering::Relaxed);
        // A pace the 2-core machine sustains for a few hundred tunnels.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ws
}

/// Config `i` of the reload storm: origin B allowed when `i` is even, and the policy
/// plugin of route `/p` at `policy`.
fn storm_config(backend: SocketAddr, policy: &Path, i: usize) -> String {
    let allowed = if i.is_multiple_of(2) {
        "[\"https://a.example\", \"https://b.example\"]"
    } else {
        "[\"https://a.example\"]"
    };
    ConfigBuilder::new(&[backend])
        .listener_toml("max_connections = 2000")
        .route_toml("plugins = [\"origin\"]")
        .extra(&format!(
            "{ADMIN}[reload]\ndebounce = \"100ms\"\n\
             [plugins.origin]\npath = {origin:?}\nconfig = {{ allowed = {allowed} }}\n\
             [plugins.policy]\npath = {policy:?}\n\
             [[routes]]\nname = \"p\"\npath_prefix = \"/p\"\nupstream = \"echo\"\nplugins = [\"policy\"]\n",
            origin = plugin_wasm("origin-allowlist").display().to_string(),
            policy = policy.display().to_string(),
        ))
        .build()
}

/// Ten reloads through all three triggers under 200 live tunnels exchanging checksummed
/// messages: no tunnel drops, no message is lost or reordered, each reload's policy
/// decides the handshakes after it (a newly refused origin gets 403 while its old tunnel
/// runs on), and once the old tunnels close only the current generation is alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_drop_nothing() {
    const TUNNELS: usize = 200;
    let backend = Backend::start("a").await;
    let dir = TempDir::new();
    let policy = dir.path().join("policy.wasm");
    let builds = [plugin_wasm("hostile"), plugin_wasm("hostile-deny")];
    install(&builds[0], &policy);
    let gateway = Gateway::start(&storm_config(backend.addr, &policy, 0)).await;
    let admin = gateway.admin().await;
    let addr = gateway.addr();
    let config_path: PathBuf = gateway.config_path().to_owned();

    let a = [("Origin", "https://a.example")];
    let b = [("Origin", "https://b.example")];
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..TUNNELS {
        let ws = ws_connect_with(addr, "/chat", &a).await;
        tasks.push(tokio::spawn(chatter(
            ws,
            stop.clone(),
            count.clone(),
            i as u64,
        )));
    }
    // Origin B is allowed now; its tunnel must outlive the reload that refuses it.
    let (mut from_b, _) = ws_whoami(addr, "/chat", &b).await;

    for i in 1..=10 {
        let before = count.load(Ordering::Relaxed);
        // Odd steps also swap the policy component (deny build on odd `i / 2`).
        let build = &builds[(i / 2) % 2];
        install(build, &policy);
        std::fs::write(&config_path, storm_config(backend.addr, &policy, i)).expect("write");
        match i % 3 {
            0 => gateway.signal("HUP"),
            1 => {
                let r = admin_post(admin, "/reload", None).await;
                assert_eq!(r.status, 200, "{}", r.text());
            }
            _ => {} // the file watch
        }
        // The new policy decides: wait for it (a watch reload lands after its debounce).
        let b_want = if i.is_multiple_of(2) { 101 } else { 403 };
        let p_want = if (i / 2).is_multiple_of(2) { 101 } else { 403 };
        eventually_async(|| async {
            let b_got = handshake_status(addr, "/chat", "https://b.example").await;
            let p_got = handshake_status(addr, "/p", "https://a.example").await;
            (b_got == b_want && p_got == p_want).then_some(())
        })
        .await;
        if i == 1 {
            assert_eq!(
                handshake_status(addr, "/chat", "https://b.example").await,
                403,
                "origin B is refused now"
            );
            assert_eq!(whoami(&mut from_b).await, "a", "B's old tunnel runs on");
        }
        // The tunnels kept talking through the reload.
        eventually(STEP, "tunnels talking after the reload", || {
            (count.load(Ordering::Relaxed) >= before + TUNNELS as u64).then_some(())
        })
        .await;
    }
    let status = admin_json(admin, "/status").await;
    let triggers: Vec<String> = status["reloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["trigger"].as_str().unwrap().to_owned())
        .collect();
    for t in ["sighup", "admin", "watch"] {
        assert!(
            triggers.iter().any(|x| x == t),
            "no {t} reload in {triggers:?}"
        );
    }
    assert!(
        status["reloads"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["ok"] == true),
        "{:#}",
        status["reloads"]
    );

    stop.store(true, Ordering::Relaxed);
    let mut closing = Vec::new();
    for t in tasks {
        closing.push(
            within(STEP, "a tunnel's task", t)
                .await
                .expect("tunnel task"),
        );
    }
    assert_eq!(whoami(&mut from_b).await, "a");
    closing.push(from_b);
    for ws in closing {
        close_ws(ws).await;
    }
    wait_metric(admin, "sluice_snapshot_generations_alive", &[], 1.0).await;
    wait_metric(admin, "sluice_tunnels_open", &[("route", "main")], 0.0).await;
    // Every tunnel (the test's and the probes') ended because its client closed it.
    let m = Metrics::scrape(admin).await;
    let closed = [("route", "main"), ("reason", "client_closed")];
    assert!(m.value("sluice_tunnel_closes_total", &closed) >= (TUNNELS + 1) as f64);
    for reason in ["server_closed", "idle_timeout", "shutdown", "error"] {
        let other = [("route", "main"), ("reason", reason)];
        assert_eq!(
            m.value("sluice_tunnel_closes_total", &other),
            0.0,
            "{reason}"
        );
    }
}

/// Polls `probe` (an async check) until it gives `Some`, for at most [`STEP`].
async fn eventually_async<T, F: Future<Output = Option<T>>>(mut probe: impl FnMut() -> F) -> T {
    let deadline = std::time::Instant::now() + STEP;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reload's policy never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A reload that names a plugin whose `.wasm` is not there yet fails, and the old config
/// serves on; the watch follows the files the new config names from when it read them,
/// so the component arriving later (in a directory no config named before) is a reload
/// of its own, which loads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_named_before_its_wasm_exists_loads_when_the_wasm_arrives() {
    let backend = Backend::start("a").await;
    let dir = TempDir::new();
    let config = |plugin: &str| {
        ConfigBuilder::new(&[backend.addr])
            .route_toml(plugin)
            .extra(&format!("{ADMIN}[reload]\ndebounce = \"50ms\"\n"))
            .build()
    };
    let gateway = Gateway::start(&config("")).await;
    let admin = gateway.admin().await;
    let (_ws, name) = ws_whoami(gateway.addr(), "/ws", &[]).await;
    assert_eq!(name, "a");

    let later = dir.path().join("later");
    std::fs::create_dir(&later).expect("mkdir");
    let policy = later.join("policy.wasm");
    let with_policy = format!(
        "{}[plugins.policy]\npath = {:?}\n",
        config("plugins = [\"policy\"]"),
        policy.display().to_string()
    );
    let failed = |status: &Value| status["last_reload"]["error"].as_str().map(str::to_owned);
    // Written without a signal: the watch's own reload (one), which fails.
    std::fs::write(gateway.config_path(), &with_policy).expect("rewrite config");
    let error = eventually_async(|| async { failed(&admin_json(admin, "/status").await) }).await;
    assert!(error.contains("policy.wasm"), "{error}");
    let (_ws, name) = ws_whoami(gateway.addr(), "/ws", &[]).await;
    assert_eq!(name, "a", "the old config serves on");

    let generation = admin_json(admin, "/status").await["generation"]
        .as_u64()
        .unwrap();
    install(&plugin_wasm("hostile-deny"), &policy);
    reloaded_past(admin, generation).await;
    let refused = request_once(gateway.addr(), &Head::websocket("/ws")).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
}
