//! The admin listener: `/metrics` parsed as Prometheus text and checked against the
//! traffic the test sent, `/status` and `/upstreams`, `POST /reload` and `POST /drain`,
//! the bearer token, and the access log in its own file, reopened on SIGUSR1.

#![forbid(unsafe_code)]

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use tokio_tungstenite::tungstenite::Message;

/// Every counter of one exchange of traffic shows up with the right labels: tunnels
/// (opened, open, closed with their reason, their bytes), refused handshakes, plain
/// requests by status, upstream servers, and the config's generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_traffic_the_test_sent() {
    let backend = Backend::start("a").await;
    let gateway = ConfigBuilder::new(&[backend.addr])
        .extra(ADMIN)
        .start()
        .await;
    let admin = gateway.admin().await;
    let addr = gateway.addr();

    let mut tunnels = Vec::new();
    for i in 0..3 {
        let mut ws = ws_connect(addr, "/chat").await;
        let echoed = roundtrip(&mut ws, Message::text(format!("hello {i}"))).await;
        assert_eq!(echoed, Message::text(format!("hello {i}")));
        tunnels.push(ws);
    }
    assert_answered(addr, &Head::get("/plain"), "a").await;
    assert_answered(addr, &Head::get("/plain"), "a").await;
    assert_eq!(
        request_once(addr, &Head::get("/internal")).await.status,
        403
    );
    let old_version = Head::websocket("/chat").set("Sec-WebSocket-Version", "8");
    assert_eq!(request_once(addr, &old_version).await.status, 426);

    let server = backend.addr.to_string();
    let m = Metrics::scrape(admin).await;
    let main = [("route", "main")];
    assert_eq!(m.value("sluice_tunnels_open", &main), 3.0);
    let tunnel = [("route", "main"), ("outcome", "tunnel"), ("status", "101")];
    assert_eq!(m.value("sluice_handshakes_total", &tunnel), 3.0);
    let refused = [("route", "main"), ("outcome", "refused"), ("status", "426")];
    assert_eq!(m.value("sluice_handshakes_total", &refused), 1.0);
    let ok = [("route", "main"), ("status", "200")];
    assert_eq!(m.value("sluice_requests_total", &ok), 2.0);
    let forbidden = [("route", "internal"), ("status", "403")];
    assert_eq!(m.value("sluice_requests_total", &forbidden), 1.0);
    let on_server = [("pool", "echo"), ("server", server.as_str())];
    assert_eq!(m.value("sluice_upstream_active", &on_server), 3.0);
    assert_eq!(m.value("sluice_upstream_healthy", &on_server), 1.0);
    assert_eq!(
        m.value("sluice_upstream_connect_failures_total", &on_server),
        0.0
    );
    assert_eq!(m.get("sluice_config_generation", &[]), Some(1.0));
    assert_eq!(m.get("sluice_snapshot_generations_alive", &[]), Some(1.0));
    let public = [("listener", "public")];
    assert_eq!(m.value("sluice_connections_accepted_total", &public), 7.0);
    assert!(m.value("sluice_connections_open", &public) >= 3.0);

    for ws in tunnels {
        close_ws(ws).await;
    }
    wait_metric(admin, "sluice_tunnels_open", &main, 0.0).await;
    let closed = [("route", "main"), ("reason", "client_closed")];
    wait_metric(admin, "sluice_tunnel_closes_total", &closed, 3.0).await;
    eventually(STEP, "three tunnel access logs", || {
        let n = gateway
            .access_logs()
            .iter()
            .filter(|l| l.kind == "tunnel")
            .count();
        (n == 3).then_some(())
    })
    .await;
    let m = Metrics::scrape(admin).await;
    assert_eq!(m.value("sluice_tunnel_duration_seconds_count", &main), 3.0);
    // Bytes each way are the access log's, summed over the route's requests and tunnels.
    let logs: Vec<AccessLog> = gateway
        .access_logs()
        .into_iter()
        .filter(|l| l.route == "main")
        .collect();
    let from_client: u64 = logs.iter().map(|l| l.bytes_in).sum();
    let to_client: u64 = logs.iter().map(|l| l.bytes_out).sum();
    assert!(from_client > 0 && to_client > 0, "{logs:?}");
    let dir = |d: &'static str| [("route", "main"), ("direction", d)];
    assert_eq!(
        m.value("sluice_bytes_total", &dir("from_client")),
        from_client as f64
    );
    assert_eq!(
        m.value("sluice_bytes_total", &dir("to_client")),
        to_client as f64
    );
    assert_eq!(m.value("sluice_upstream_active", &on_server), 0.0);

    // `/status` and `/upstreams` say the same.
    let status = admin_json(admin, "/status").await;
    assert_eq!(status["generation"], 1);
    assert_eq!(status["draining"], false);
    assert_eq!(status["listeners"][0]["name"], "public");
    assert_eq!(status["listeners"][0]["addr"], addr.to_string());
    let main_route = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "main")
        .expect("route main in /status")
        .clone();
    assert_eq!(main_route["handshakes"], 4);
    assert_eq!(main_route["requests"], 2);
    assert_eq!(status["last_reload"]["trigger"], "start");
    let upstreams = admin_json(admin, "/upstreams").await;
    let s = &upstreams["pools"][0]["servers"][0];
    assert_eq!(upstreams["pools"][0]["name"], "echo");
    assert_eq!(s["addr"], server);
    assert_eq!(s["state"], "healthy");
    assert_eq!(s["active"], 0);
}

/// A server that refuses connections is counted, ejected, and shown as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_and_ejections_are_counted() {
    let backend = Backend::start("a").await;
    let dead = closed_port();
    let gateway = ConfigBuilder::new(&[dead, backend.addr])
        .upstream_toml("balance = \"round-robin\"\nmax_fails = 1\nfail_timeout = \"1h\"")
        .extra(ADMIN)
        .start()
        .await;
    let admin = gateway.admin().await;
    // Round-robin reaches the dead server within two requests; failover answers both.
    assert_answered(gateway.addr(), &Head::get("/"), "a").await;
    assert_answered(gateway.addr(), &Head::get("/"), "a").await;
    let m = Metrics::scrape(admin).await;
    let dead = dead.to_string();
    let on_dead = [("pool", "echo"), ("server", dead.as_str())];
    assert_eq!(
        m.value("sluice_upstream_connect_failures_total", &on_dead),
        1.0
    );
    assert_eq!(m.value("sluice_upstream_ejections_total", &on_dead), 1.0);
    assert_eq!(m.value("sluice_upstream_ejected", &on_dead), 1.0);
    assert_eq!(m.value("sluice_upstream_healthy", &on_dead), 0.0);
    let upstreams = admin_json(admin, "/upstreams").await;
    let state = upstreams["pools"][0]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["addr"] == dead)
        .map(|s| s["state"].clone());
    assert_eq!(state, Some("ejected".into()));
}

/// With a token, every endpoint wants it, as a bearer token or a Basic password; and
/// an admin listener on a public address without one is refused by `sluice check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_every_endpoint() {
    let dir = TempDir::new();
    let token = "s3cret-admin-token-0123456789";
    let token_file = dir.write("admin.token", &format!("{token}\n"));
    let (_backend, gateway) = start_echo_gateway(|c| {
        c.extra(&format!(
            "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = {:?}\n",
            token_file.display().to_string()
        ))
    })
    .await;
    let admin = gateway.admin().await;
    for path in ["/", "/metrics", "/status", "/upstreams"] {
        let none = admin_get(admin, path, None).await;
        assert_eq!(none.status, 401, "{path} without a token");
        assert!(
            none.header("www-authenticate")
                .is_some_and(|v| v.contains("Bearer")),
            "{:?}",
            none.headers
        );
        let wrong = admin_get(admin, path, Some("s3cret-admin-token-012345678X")).await;
        assert_eq!(wrong.status, 401, "{path} with a wrong token");
        assert_eq!(
            admin_get(admin, path, Some(token)).await.status,
            200,
            "{path}"
        );
    }
    assert_eq!(admin_post(admin, "/reload", None).await.status, 401);
    assert_eq!(admin_post(admin, "/drain", Some("nope")).await.status, 401);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("ops:{token}"));
    let page = request_once(
        admin,
        &Head::get("/").header("Authorization", &format!("Basic {basic}")),
    )
    .await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<title>"), "the status page");
    assert_eq!(admin_post(admin, "/reload", Some(token)).await.status, 200);

    // A public address needs a token: `sluice check` says which field.
    let public = ConfigBuilder::new(&[closed_port()])
        .extra("[admin]\nbind = \"0.0.0.0:0\"\n")
        .build();
    let stderr = check_refuses(&dir, "public.toml", &public);
    assert!(
        stderr.contains("admin.bind") && stderr.contains("token_file"),
        "{stderr}"
    );
    // And a token too short to guard anything is refused, naming its file's field.
    std::fs::write(dir.path().join("short.token"), "abc\n").expect("write");
    let short = ConfigBuilder::new(&[closed_port()])
        .extra("[admin]\nbind = \"0.0.0.0:0\"\ntoken_file = \"short.token\"\n")
        .build();
    let stderr = check_refuses(&dir, "short.toml", &short);
    assert!(stderr.contains("admin.token_file"), "{stderr}");
}

/// Writes `config` as `dir/name`, runs `sluice check` on it, asserts exit status 1 and
/// returns its stderr.
fn check_refuses(dir: &TempDir, name: &str, config: &str) -> String {
    let path = dir.write(name, config);
    let out = sluice_command("check", &path)
        .output()
        .expect("run sluice check");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

/// A broken config and a plugin whose `init` fails: `POST /reload` answers 422 with the
/// located error, `/status` reports it, the failure counter rises, and the old config
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_is_reported_and_the_old_config_serves_on() {
    let backend = Backend::start("a").await;
    let builder =
        ConfigBuilder::new(&[backend.addr]).extra(&format!("{ADMIN}[reload]\nwatch = false\n"));
    let gateway = builder.start().await;
    let admin = gateway.admin().await;

    let broken = builder.clone().listener_toml("max_connections = 0").build();
    std::fs::write(gateway.config_path(), broken).expect("write config");
    let r = admin_post(admin, "/reload", None).await;
    assert_eq!(r.status, 422, "{}", r.text());
    let body: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    let error = body["error"].as_str().expect("an error").to_owned();
    assert!(
        error.contains("sluice.toml:") && error.contains("listeners.public.max_connections"),
        "{error}"
    );
    assert_eq!(body["ok"], false);
    let status = admin_json(admin, "/status").await;
    assert_eq!(status["last_reload"]["ok"], false);
    assert_eq!(status["last_reload"]["trigger"], "admin");
    assert_eq!(status["last_reload"]["error"], error.as_str());
    assert_eq!(status["generation"], 1);
    assert_answered(gateway.addr(), &Head::get("/"), "a").await;

    // A plugin whose init refuses its config.
    let origin = plugin_wasm("origin-allowlist");
    let bad_plugin = builder
        .clone()
        .route_toml("plugins = [\"origin\"]")
        .extra(&format!(
            "[plugins.origin]\npath = {:?}\nconfig = {{ allowed = [\"not an origin\"] }}\n",
            origin.display().to_string()
        ))
        .build();
    std::fs::write(gateway.config_path(), bad_plugin).expect("write config");
    gateway.signal("HUP");
    let failed = gateway
        .wait_log("the failed reload", |l| {
            l["message"] == "reload failed; still serving the previous config"
                && l["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("init rejected"))
        })
        .await;
    assert_eq!(failed["trigger"], "sighup");
    let m = Metrics::scrape(admin).await;
    assert_eq!(
        m.value("sluice_reloads_total", &[("outcome", "failed")]),
        2.0
    );
    assert_eq!(m.value("sluice_reloads_total", &[("outcome", "ok")]), 0.0);
    assert_eq!(m.get("sluice_config_generation", &[]), Some(1.0));
    assert_answered(gateway.addr(), &Head::get("/"), "a").await;

    // Fixed, it applies.
    std::fs::write(gateway.config_path(), builder.build()).expect("write config");
    let r = admin_post(admin, "/reload", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let status = admin_json(admin, "/status").await;
    assert_eq!(status["generation"], 2);
    assert_eq!(status["last_reload"]["ok"], true);
    let reloads = status["reloads"].as_array().expect("reloads");
    let triggers: Vec<&str> = reloads
        .iter()
        .map(|r| r["trigger"].as_str().unwrap())
        .collect();
    assert_eq!(triggers, ["admin", "sighup", "admin", "start"]);

    // What a reload cannot apply refuses it whole: the number of workers.
    let workers = builder.clone().extra("[runtime]\nworkers = 999\n").build();
    std::fs::write(gateway.config_path(), workers).expect("write config");
    let r = admin_post(admin, "/reload", None).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text()
            .contains("runtime.workers: changing the number of workers needs a restart"),
        "{}",
        r.text()
    );
    assert_eq!(admin_json(admin, "/status").await["generation"], 2);
}

/// `POST /drain` drains like SIGTERM: new connections are refused, the open tunnel runs
/// until it ends, then the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_drain_drains_and_exits() {
    let backend = Backend::start("a").await;
    let mut gateway = ConfigBuilder::new(&[backend.addr])
        .grace("30s")
        .extra(ADMIN)
        .start()
        .await;
    let admin = gateway.admin().await;
    let mut ws = ws_connect(gateway.addr(), "/chat").await;
    let r = admin_post(admin, "/drain", None).await;
    assert_eq!(r.status, 202, "{}", r.text());
    gateway
        .wait_log("the drain", |l| {
            l["message"] == "shutting down: no new connections, draining tunnels"
        })
        .await;
    assert_eq!(
        roundtrip(&mut ws, Message::text("still here")).await,
        Message::text("still here")
    );
    drop(ws);
    let status = gateway.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{status}");
}

/// `[log] access_file`: access events go to the file, not stderr; after the file is
/// moved away (as logrotate does), SIGUSR1 makes the gateway write a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_file_is_reopened_on_sigusr1() {
    let (_backend, gateway) =
        start_echo_gateway(|c| c.log_toml("access_file = \"access.log\"")).await;
    let file = gateway.config_path().with_file_name("access.log");
    let lines = |path: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON access line"))
            .collect()
    };
    assert_answered(gateway.addr(), &Head::get("/first"), "a").await;
    eventually(STEP, "the first access line in the file", || {
        (lines(&file).len() == 1).then_some(())
    })
    .await;
    assert_eq!(lines(&file)[0]["path"], "/first");
    assert_eq!(lines(&file)[0]["target"], "sluice::access");

    let rotated = file.with_file_name("access.log.1");
    std::fs::rename(&file, &rotated).expect("rotate");
    gateway.signal("USR1");
    gateway
        .wait_log("the reopen", |l| l["message"] == "access log reopened")
        .await;
    assert_answered(gateway.addr(), &Head::get("/second"), "a").await;
    eventually(STEP, "the second access line in the new file", || {
        (lines(&file).len() == 1).then_some(())
    })
    .await;
    assert_eq!(lines(&file)[0]["path"], "/second");
    assert_eq!(
        lines(&rotated).len(),
        1,
        "the rotated file got nothing more"
    );
    assert!(
        gateway.access_logs().is_empty(),
        "access events went to stderr too"
    );
}

/// An admin request carrying the bearer `token`.
fn authed(method: &str, path: &str, token: &str) -> Head {
    Head::new(method, path).header("Authorization", &format!("Bearer {token}"))
}

/// `[admin.tls]`: the admin answers over HTTPS with the configured certificate (the
/// token still required), a plain HTTP request gets no HTTP answer, and a reload that
/// replaced the certificate's files serves the new certificate to the next connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_https_with_admin_tls() {
    let dir = TempDir::new();
    let token = "s3cret-admin-token-0123456789";
    let token_file = dir.write("admin.token", &format!("{token}\n"));
    let ca = TestCa::new("Sluice admin CA");
    let first = ca.issue("localhost", &["localhost"]);
    let (cert, key) = first.write(&dir, "admin");
    let backend = Backend::start("a").await;
    let gw = ConfigBuilder::new(&[backend.addr])
        .extra(&format!(
            "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = {token_file:?}\n\
             [admin.tls]\ncertificates = [{{ cert = {cert:?}, key = {key:?} }}]\n"
        ))
        .start()
        .await;
    let admin = gw.admin().await;
    let https = || async {
        within(
            STEP,
            "a TLS handshake",
            tls_connect(admin, "localhost", ca.client()),
        )
        .await
        .expect("the admin's TLS handshake")
    };

    let status = exchange(https().await, authed("GET", "/status", token)).await;
    assert!(status.starts_with("HTTP/1.1 200 "), "{status}");
    assert!(status.contains("\"generation\""), "{status}");
    let refused = exchange(
        https().await,
        authed("GET", "/status", "wrong-token-0123456789"),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 401 "), "{refused}");
    let tls = https().await;
    let served = tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone();
    assert_eq!(served, first.chain()[0]);

    // Plain HTTP on the HTTPS port: no HTTP answer (rustls answers a TLS alert, if anything).
    let tcp = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    let plain = exchange(tcp, authed("GET", "/status", token)).await;
    assert!(!plain.starts_with("HTTP/"), "{plain}");

    // New files at the same paths, then a reload: the next connection gets the new one.
    let second = ca.issue("localhost", &["localhost"]);
    second.write(&dir, "admin");
    let reloaded = exchange(https().await, authed("POST", "/reload", token)).await;
    assert!(reloaded.starts_with("HTTP/1.1 200 "), "{reloaded}");
    let tls = https().await;
    let served = tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone();
    assert_eq!(served, second.chain()[0], "the rotated certificate");

    // A certificate file that is not there: `sluice check` names the field and the file.
    let stderr = check_refuses(
        &dir,
        "missing.toml",
        &ConfigBuilder::new(&[backend.addr])
            .extra(&format!(
                "[admin]\nbind = \"127.0.0.1:0\"\n[admin.tls]\n\
                 certificates = [{{ cert = \"nowhere.pem\", key = {key:?} }}]\n"
            ))
            .build(),
    );
    assert!(
        stderr.contains("admin.tls.certificates") && stderr.contains("nowhere.pem"),
        "{stderr}"
    );
}
