//! Policy plugins through the running gateway: the real `sluice` binary with the real
//! components that `plugins/build.sh` writes to `target/plugins/`, echo backends that say
//! who they are, and clients on loopback.
//!
//! - each plugin on its own: origin-allowlist, jwt-auth (three algorithms, three token
//!   sources), tenant-router, sticky-key, and the JavaScript api-key-js;
//! - the four-plugin chain of `examples/plugins/` end to end, and `sluice check` on it;
//! - hostile fixtures (infinite loop, memory bomb, trap) answered per their failure mode,
//!   in bounded time, while good traffic on another route keeps echoing;
//! - load errors: a slow `init`, a missing file, a non-component, a rejected config.
//!
//! Every test starts its own backends and gateway on `127.0.0.1:0`, so they run in
//! parallel; every wait has a deadline.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    Backend, ConfigBuilder, Gateway, Head, RawClient, Response, STEP, TempDir, Ws, assert_answered,
    close_ws, closed_port, eventually, pattern, plugin_wasm, request_once, roundtrip,
    sluice_command, whoami,
};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

/// HS256 secret of the jwt-auth instances configured by this file.
const SECRET: &str = "gateway-plugins-test-secret";
/// Audience and issuer those instances require.
const AUDIENCE: &str = "sluice-tests";
const ISSUER: &str = "https://auth.sluice.test";

/// How long `sluice check` may take: it compiles every component (seconds for the
/// 12 MB JavaScript one when wasmtime's cache is cold, on a loaded debug build).
const CHECK_LIMIT: Duration = Duration::from_secs(120);

// ---- paths and processes --------------------------------------------------------------

/// The workspace root.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the gateway crate sits in the workspace")
        .to_path_buf()
}

/// The component `plugins/build.sh` builds for plugin `name`, as a config string.
fn wasm(name: &str) -> String {
    plugin_wasm(name).display().to_string()
}

/// A file of `plugins/jwt/testdata/` (throw-away keys).
fn testdata(file: &str) -> String {
    let path = workspace().join("plugins/jwt/testdata").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Runs `sluice SUBCOMMAND CONFIG` to its end, killing it (and failing) after `limit`.
fn sluice_until_exit(subcommand: &str, config: &Path, limit: Duration) -> Output {
    let mut child = sluice_command(subcommand, config)
        .spawn()
        .expect("spawn sluice");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("poll sluice").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect sluice output");
            panic!(
                "`sluice {subcommand} {}` still running after {limit:?}; stderr: {}",
                config.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect sluice output")
}

/// Runs `sluice check CONFIG` and returns its exit success and stderr.
fn check(config: &Path) -> (bool, String) {
    let out = sluice_until_exit("check", config, CHECK_LIMIT);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts that `sluice check` refuses `config` with a message starting with
/// `error: CONFIG: plugin `NAME`:` and containing `reason`.
fn assert_check_fails(config: &Path, plugin: &str, reason: &str) {
    let (ok, stderr) = check(config);
    let prefix = format!("error: {}: plugin `{plugin}`: ", config.display());
    assert!(
        !ok && stderr.starts_with(&prefix) && stderr.contains(reason),
        "expected `sluice check` to fail with {prefix:?} … {reason:?}; ok={ok}, stderr: {stderr}"
    );
}

/// Checks `config` with `sluice check` (which compiles every component, warming wasmtime's
/// cache so the gateway starts within the harness's deadline), then starts a gateway on it.
async fn start(config: &str) -> Gateway {
    let dir = TempDir::new();
    let path = dir.write("sluice.toml", config);
    let (ok, stderr) = tokio::task::spawn_blocking(move || check(&path))
        .await
        .expect("check task");
    assert!(
        ok,
        "`sluice check` refused the test config: {stderr}\n{config}"
    );
    Gateway::start(config).await
}

// ---- config -------------------------------------------------------------------------

/// `value` as a TOML value on one line (objects become inline tables). serde_json's
/// string escapes are all valid in TOML basic strings.
fn toml_value(value: &Value) -> String {
    let list = |items: Vec<String>| items.join(", ");
    match value {
        Value::Null => panic!("TOML has no null"),
        Value::Bool(_) | Value::Number(_) | Value::String(_) => value.to_string(),
        Value::Array(items) => format!("[{}]", list(items.iter().map(toml_value).collect())),
        Value::Object(map) => format!(
            "{{ {} }}",
            list(
                map.iter()
                    .map(|(k, v)| format!("{} = {}", Value::from(k.as_str()), toml_value(v)))
                    .collect()
            )
        ),
    }
}

/// A `[plugins.NAME]` table running the component at `path` with `config` handed to its
/// `init`, plus `settings` lines such as `fail_open = true`.
fn plugin_table(name: &str, path: &str, config: &Value, settings: &str) -> String {
    format!(
        "[plugins.{name}]\npath = {path:?}\nconfig = {config}\n{settings}\n",
        config = toml_value(config),
    )
}

/// A config whose `main` route (`/` → `servers`) runs plugin `name` from `path` with
/// `config` (and `settings` lines, as in [`plugin_table`]).
fn config_with_plugin(
    servers: &[SocketAddr],
    name: &str,
    path: &str,
    config: &Value,
    settings: &str,
) -> String {
    ConfigBuilder::new(servers)
        .route_toml(&format!("plugins = [{name:?}]"))
        .extra(&plugin_table(name, path, config, settings))
        .build()
}

/// A `[[routes]]` entry `prefix` → pool `echo` through `plugins`.
fn route_table(name: &str, prefix: &str, plugins: &[&str]) -> String {
    format!(
        "[[routes]]\nname = {name:?}\npath_prefix = {prefix:?}\nupstream = \"echo\"\nplugins = {plugins}\n",
        plugins = toml_value(&json!(plugins)),
    )
}

/// One backend `a` and a gateway whose `main` route (`/`) runs `component` as plugin
/// `name` with `config`.
async fn single_plugin_gateway(name: &str, component: &str, config: Value) -> (Backend, Gateway) {
    let backend = Backend::start("a").await;
    let gateway = start(&config_with_plugin(
        &[backend.addr],
        name,
        &wasm(component),
        &config,
        "",
    ))
    .await;
    (backend, gateway)
}

/// Waits for the access-log line of the request to `path` whose `tags` field satisfies
/// `pred`, and returns it (the harness's `AccessLog` has no `tags`).
async fn access_with_tags(gateway: &Gateway, path: &str, pred: impl Fn(&str) -> bool) -> Value {
    gateway
        .wait_log(
            &format!("an access log for {path} with the expected tags"),
            |v| {
                v["target"] == "sluice::access"
                    && v["path"] == path
                    && v["tags"].as_str().is_some_and(&pred)
            },
        )
        .await
}

// ---- tokens -------------------------------------------------------------------------

/// Seconds since the epoch.
fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Claims the test jwt-auth instances accept (until `exp` is changed).
fn claims(sub: &str, tenant: &str) -> Value {
    json!({"sub": sub, "tenant": tenant, "aud": AUDIENCE, "iss": ISSUER, "exp": now() + 3600})
}

/// `claims` with `key` replaced by `value`.
fn with_claim(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

/// A jwt-auth config trusting [`SECRET`] and the test RSA and EC keys.
fn jwt_config() -> Value {
    json!({
        "keys": [
            {"alg": "HS256", "secret": SECRET},
            {"alg": "RS256", "public_key_pem": testdata("rsa_public.pem")},
            {"alg": "ES256", "public_key_pem": testdata("ec_public.pem")},
        ],
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "forward_claims": {"sub": "x-user", "tenant": "x-tenant"},
    })
}

// ---- clients --------------------------------------------------------------------------

/// Sends a WebSocket upgrade: the tunnel and the `101` on success, the answer otherwise.
async fn upgrade(addr: SocketAddr, head: &Head) -> Result<(Ws, Response), Response> {
    let mut client = RawClient::connect(addr).await;
    let answer = client.request(head).await;
    if answer.status == 101 {
        Ok((client.into_websocket().await, answer))
    } else {
        Err(answer)
    }
}

/// Upgrades, asks the backend its name, closes, and returns the name and the `101`.
async fn reach(addr: SocketAddr, head: &Head) -> (String, Response) {
    match upgrade(addr, head).await {
        Ok((mut ws, answer)) => {
            let name = whoami(&mut ws).await;
            close_ws(ws).await;
            (name, answer)
        }
        Err(refused) => panic!(
            "{head:?} was refused: {} {}",
            refused.status,
            refused.text()
        ),
    }
}

/// Asserts the upgrade is refused with `status` and returns the answer.
async fn refused(addr: SocketAddr, head: &Head, status: u16) -> Response {
    match upgrade(addr, head).await {
        Ok(_) => panic!("{head:?} was let through; expected {status}"),
        Err(answer) => {
            assert_eq!(
                answer.status,
                status,
                "answer to {head:?}: {}",
                answer.text()
            );
            answer
        }
    }
}

/// The request head `backend` recorded whose header `name` is `value`.
fn seen_with(backend: &Backend, name: &str, value: &str) -> common::RecordedRequest {
    backend
        .requests()
        .into_iter()
        .find(|r| r.header(name) == Some(value))
        .unwrap_or_else(|| panic!("backend saw no request with {name}: {value}"))
}

// ---- single plugins -------------------------------------------------------------------

/// origin-allowlist lets an exact origin and any subdomain of a wildcard through and
/// refuses other origins (and none) with 403 before the backend sees anything.
#[tokio::test]
async fn origin_allowlist_admits_listed_origins_and_refuses_others() {
    let config = json!({"allowed": ["https://app.example.com", "https://*.example.org"]});
    let (backend, gateway) = single_plugin_gateway("origin", "origin-allowlist", config).await;
    let addr = gateway.addr();
    let from = |origin: &str| Head::websocket("/ws").header("Origin", origin);

    for origin in ["https://app.example.com", "https://chat.eu.example.org"] {
        assert_eq!(reach(addr, &from(origin)).await.0, "a", "{origin}");
    }
    for origin in [
        "https://evil.example.com",
        "https://example.org",             // the bare domain is not a subdomain
        "http://app.example.com",          // the scheme must match
        "https://app.example.com.evil.io", // a suffix trick
    ] {
        refused(addr, &from(origin), 403).await;
    }
    refused(addr, &Head::websocket("/ws"), 403).await;

    assert_eq!(
        backend.upgrades(),
        2,
        "refused handshakes reached the backend"
    );
    access_with_tags(&gateway, "/ws", |t| t == "denied_by=origin").await;
    // The plugin's own field on a refusal reaches the access log too.
    access_with_tags(&gateway, "/ws", |t| {
        t == "denied_by=origin denied_origin=https://evil.example.com"
    })
    .await;
}

/// jwt-auth accepts HS256 from `Authorization`, RS256 from a subprotocol entry and ES256
/// from the query, forwards the configured claims (over any client-sent copy), and keeps
/// the token out of the subprotocol list sent upstream.
#[tokio::test]
async fn jwt_auth_accepts_tokens_from_every_source_and_forwards_claims() {
    let (backend, gateway) = single_plugin_gateway("auth", "jwt-auth", jwt_config()).await;
    let addr = gateway.addr();
    let (rsa, ec) = (testdata("rsa_private.pem"), testdata("ec_private.pem"));

    let hs = sluice_jwt::mint::hs256(&claims("hs-user", "acme"), SECRET.as_bytes());
    let header = Head::websocket("/ws")
        .header("Authorization", &format!("Bearer {hs}"))
        .header("X-User", "spoofed");
    assert_eq!(reach(addr, &header).await.0, "a");

    let rs = sluice_jwt::mint::rs256(&claims("rs-user", "globex"), &rsa).expect("mint RS256");
    let protocol =
        Head::websocket("/ws").header("Sec-WebSocket-Protocol", &format!("chat, bearer.{rs}"));
    let (name, answer) = reach(addr, &protocol).await;
    assert_eq!(name, "a");
    assert_eq!(answer.header("sec-websocket-protocol"), Some("chat"));

    let es = sluice_jwt::mint::es256(&claims("es-user", "initech"), &ec).expect("mint ES256");
    assert_eq!(
        reach(addr, &Head::websocket(&format!("/ws?access_token={es}")))
            .await
            .0,
        "a"
    );

    for (user, tenant) in [
        ("hs-user", "acme"),
        ("rs-user", "globex"),
        ("es-user", "initech"),
    ] {
        let seen = seen_with(&backend, "x-user", user);
        assert_eq!(seen.values("x-user"), [user], "{seen:?}");
        assert_eq!(seen.values("x-tenant"), [tenant], "{seen:?}");
    }
    let seen = seen_with(&backend, "x-user", "rs-user");
    assert_eq!(
        seen.values("sec-websocket-protocol"),
        ["chat"],
        "the token entry went upstream: {seen:?}"
    );
    access_with_tags(&gateway, "/ws", |t| t.contains("jwt_sub=hs-user")).await;
}

/// jwt-auth refuses a missing, expired, wrong-audience, wrong-issuer, badly signed or
/// garbled token with 401 and a `WWW-Authenticate` challenge; nothing reaches the backend.
#[tokio::test]
async fn jwt_auth_refuses_bad_tokens_with_401() {
    let (backend, gateway) = single_plugin_gateway("auth", "jwt-auth", jwt_config()).await;
    let good = claims("mallory", "acme");
    let hs = |c: &Value, secret: &str| sluice_jwt::mint::hs256(c, secret.as_bytes());
    let tokens = [
        hs(
            &with_claim(good.clone(), "exp", json!(now() - 3600)),
            SECRET,
        ),
        hs(
            &with_claim(good.clone(), "aud", json!("someone-else")),
            SECRET,
        ),
        hs(
            &with_claim(good.clone(), "iss", json!("https://evil.test")),
            SECRET,
        ),
        hs(&good, "not-the-gateway-secret"),
        "not.a.token".to_string(),
    ];
    for token in &tokens {
        let head = Head::websocket("/ws").header("Authorization", &format!("Bearer {token}"));
        let answer = refused(gateway.addr(), &head, 401).await;
        assert!(
            answer
                .header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer")),
            "no Bearer challenge: {answer:?}"
        );
    }
    refused(gateway.addr(), &Head::websocket("/ws"), 401).await;
    assert_eq!(
        backend.upgrades(),
        0,
        "a refused handshake reached the backend"
    );
    access_with_tags(&gateway, "/ws", |t| t == "denied_by=auth").await;
}

/// tenant-router sends hosts and path prefixes to the pools its rules name, tells the
/// backend the tenant, and a pool the route does not allow fails closed with 503.
#[tokio::test]
async fn tenant_router_routes_hosts_and_paths_to_their_pools() {
    let blue = Backend::start("blue").await;
    let green = Backend::start("green").await;
    let config = json!({
        "rules": [
            {"host": "*.globex.example", "tenant": "globex", "pool": "green"},
            {"path_prefix": "/t/initech/", "tenant": "initech", "pool": "green"},
            {"path_prefix": "/t/stray/", "tenant": "stray", "pool": "nowhere"},
        ],
        "default": {"tenant": "public", "pool": "echo"},
    });
    let builder = ConfigBuilder::new(&[blue.addr])
        .route_toml("plugins = [\"tenants\"]\npools = [\"green\"]")
        .extra(&format!(
            "[upstreams.green]\nservers = [\"{}\"]\n",
            green.addr
        ))
        .extra(&plugin_table(
            "tenants",
            &wasm("tenant-router"),
            &config,
            "",
        ));
    let gateway = start(&builder.build()).await;
    let addr = gateway.addr();

    let cases = [
        (
            Head::websocket("/ws").set("Host", "chat.globex.example"),
            "green",
            "globex",
        ),
        (Head::websocket("/t/initech/ws"), "green", "initech"),
        (Head::websocket("/ws"), "blue", "public"),
    ];
    for (head, pool, tenant) in &cases {
        assert_eq!(reach(addr, head).await.0, *pool, "{head:?}");
        let backend = if *pool == "green" { &green } else { &blue };
        seen_with(backend, "x-sluice-tenant", tenant);
    }
    refused(addr, &Head::websocket("/t/stray/ws"), 503).await;
    access_with_tags(&gateway, "/t/initech/ws", |t| t.contains("tenant=initech")).await;
}

/// A plugin's path rule sees the path routing matched, normalised: `..`, `.` and
/// percent-encoded letters cannot walk a request past a rule on a prefix, into a path an
/// upstream that normalises would serve.
#[tokio::test]
async fn a_path_rule_sees_the_normalised_path_and_cannot_be_walked_around() {
    let config = json!({
        "rules": [{"path_prefix": "/public/", "tenant": "public", "pool": "echo"}],
    });
    let (backend, gateway) = single_plugin_gateway("paths", "tenant-router", config).await;
    let addr = gateway.addr();
    assert_eq!(reach(addr, &Head::websocket("/public/chat")).await.0, "a");
    for sneaky in [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public/./../ad%6din",
        "//public/..//admin",
    ] {
        let answer = refused(addr, &Head::websocket(sneaky), 404).await;
        assert_eq!(answer.text(), "no tenant for this request\n", "{sneaky}");
    }
    // A path that only looks odd but normalises under the prefix is let through.
    assert_eq!(
        reach(addr, &Head::websocket("/x/../public/./chat")).await.0,
        "a"
    );
    assert!(
        backend
            .requests()
            .iter()
            .all(|r| !r.target.contains("admin")),
        "a walked-around request reached the backend"
    );
}

/// With `balance = "hash"`, sticky-key's key (a cookie or a query parameter) lands every
/// reconnect on the same server, and different keys spread over the pool (all clients
/// share one IP, so without the plugin's key they would all hash alike).
#[tokio::test]
async fn sticky_key_lands_each_key_on_one_server_across_reconnects() {
    let backends = Backend::start_many(3).await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let config = json!({"sources": [{"cookie": "session"}, {"query": "room"}], "fallback": "none"});
    let builder = ConfigBuilder::new(&addrs)
        .upstream_toml("balance = \"hash\"")
        .route_toml("plugins = [\"sticky\"]")
        .extra(&plugin_table("sticky", &wasm("sticky-key"), &config, ""));
    let gateway = start(&builder.build()).await;

    let mut servers = std::collections::BTreeSet::new();
    for key in 0..8 {
        let heads = [
            Head::websocket("/ws").header("Cookie", &format!("theme=dark; session=user-{key}")),
            Head::websocket(&format!("/ws?room=user-{key}")),
        ];
        let first = reach(gateway.addr(), &heads[0]).await.0;
        for head in heads.iter().cycle().take(4) {
            assert_eq!(
                reach(gateway.addr(), head).await.0,
                first,
                "key user-{key}: {head:?}"
            );
        }
        servers.insert(first);
    }
    assert!(servers.len() >= 2, "8 keys all landed on {servers:?}");
}

/// The JavaScript api-key-js plugin admits a known key (replacing it upstream with the
/// client's name), refuses a missing key (401) and an unknown one (403), and rate-limits
/// a client per minute (429).
#[tokio::test]
async fn javascript_api_key_plugin_admits_refuses_and_rate_limits() {
    let config = json!({"keys": {"k-acme-1": "acme"}, "rate_limit_per_minute": 3});
    let (backend, gateway) = single_plugin_gateway("apikey", "api-key-js", config).await;
    let addr = gateway.addr();
    let keyed = |head: Head, key: &str| head.header("X-Api-Key", key);

    assert_eq!(
        reach(addr, &keyed(Head::websocket("/ws"), "k-acme-1"))
            .await
            .0,
        "a"
    );
    let seen = seen_with(&backend, "x-client", "acme");
    assert!(
        seen.values("x-api-key").is_empty(),
        "key forwarded: {seen:?}"
    );

    let missing = refused(addr, &Head::websocket("/ws"), 401).await;
    assert_eq!(missing.header("www-authenticate"), Some("ApiKey"));
    refused(addr, &keyed(Head::websocket("/ws"), "k-wrong"), 403).await;

    // Plain requests run the chain too: two more fit in the limit of 3, the next does not.
    for _ in 0..2 {
        let answer = request_once(addr, &keyed(Head::get("/"), "k-acme-1")).await;
        assert_eq!((answer.status, answer.text().as_str()), (200, "a"));
    }
    let limited = request_once(addr, &keyed(Head::get("/"), "k-acme-1")).await;
    assert_eq!(limited.status, 429, "{}", limited.text());
    assert_eq!(limited.header("retry-after"), Some("60"));
    assert_eq!(backend.upgrades(), 1);
    access_with_tags(&gateway, "/", |t| t.contains("client=acme")).await;
}

// ---- hostile plugins ------------------------------------------------------------------

/// Misbehaviours of the `hostile` fixture exercised on the request path.
const HOSTILE: [&str; 3] = ["loop", "memory", "trap"];
/// The fixture's CPU deadline, and the bound on answering a request it faults on
/// (generous: debug build, parallel tests, a 2-core machine).
const HOSTILE_DEADLINE: &str = "50ms";
const ANSWER_BOUND: Duration = Duration::from_secs(3);

/// Echo round trips on `ws` until `stop` is set: the count and the slowest one.
async fn keep_echoing(mut ws: Ws, stop: Arc<AtomicBool>) -> (usize, Duration) {
    let (mut count, mut slowest) = (0, Duration::ZERO);
    while !stop.load(Ordering::SeqCst) {
        let payload = pattern(512, count as u64);
        let started = Instant::now();
        let echoed = roundtrip(&mut ws, Message::binary(payload.clone())).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(echoed, Message::binary(payload), "echo {count} corrupted");
        count += 1;
    }
    close_ws(ws).await;
    (count, slowest)
}

/// An infinite loop, a memory bomb and a trap, each fail-closed and fail-open: every
/// request gets its answer (503 closed; through to the backend, without the plugin's
/// header, open) within a bound, while a tunnel on an unaffected route keeps echoing.
#[tokio::test]
async fn hostile_plugins_are_answered_per_failure_mode_while_good_traffic_flows() {
    let backend = Backend::start("a").await;
    let mut builder = ConfigBuilder::new(&[backend.addr]);
    for behaviour in HOSTILE {
        for fail_open in [false, true] {
            let name = format!("{behaviour}-{}", if fail_open { "open" } else { "closed" });
            let settings = format!(
                "fail_open = {fail_open}\ncpu_deadline = {HOSTILE_DEADLINE:?}\nmemory = \"16MiB\"\nmax_instances = 2"
            );
            let config = json!({"on_request": behaviour});
            builder = builder
                .extra(&plugin_table(&name, &wasm("hostile"), &config, &settings))
                .extra(&route_table(&name, &format!("/{name}"), &[&name]));
        }
    }
    let gateway = start(&builder.build()).await;
    let addr = gateway.addr();

    let stop = Arc::new(AtomicBool::new(false));
    let (good, _) = upgrade(addr, &Head::websocket("/good"))
        .await
        .unwrap_or_else(|r| panic!("good route refused: {r:?}"));
    let echoing = tokio::spawn(keep_echoing(good, stop.clone()));

    let mut requests = JoinSet::new();
    for behaviour in HOSTILE {
        for mode in ["closed", "open"] {
            for _ in 0..3 {
                let path = format!("/{behaviour}-{mode}");
                requests.spawn(async move {
                    let started = Instant::now();
                    let outcome = match upgrade(addr, &Head::websocket(&path)).await {
                        Ok((ws, answer)) => {
                            close_ws(ws).await;
                            answer.status
                        }
                        Err(answer) => answer.status,
                    };
                    (path, mode, outcome, started.elapsed())
                });
            }
        }
    }
    let mut answered = 0;
    while let Some(done) =
        common::within(STEP * 3, "the hostile requests", requests.join_next()).await
    {
        let (path, mode, status, took) = done.expect("request task");
        let expected = if mode == "closed" { 503 } else { 101 };
        assert_eq!(status, expected, "{path}");
        assert!(took < ANSWER_BOUND, "{path} took {took:?}");
        answered += 1;
    }
    assert_eq!(answered, HOSTILE.len() * 2 * 3);

    stop.store(true, Ordering::SeqCst);
    let (echoes, slowest) = common::within(STEP, "the good tunnel to finish", echoing)
        .await
        .expect("good traffic task");
    assert!(echoes > 0, "no good traffic flowed");
    assert!(slowest < ANSWER_BOUND, "a good echo took {slowest:?}");

    for behaviour in HOSTILE {
        let passed = format!("/{behaviour}-open");
        let through: Vec<_> = backend
            .requests()
            .into_iter()
            .filter(|r| r.target == passed)
            .collect();
        assert_eq!(through.len(), 3, "{passed} did not pass through fail-open");
        assert!(
            through.iter().all(|r| r.header("x-hostile").is_none()),
            "{through:?}"
        );
        assert!(
            backend
                .requests()
                .iter()
                .all(|r| r.target != format!("/{behaviour}-closed")),
            "a fail-closed request reached the backend"
        );
        let closed = format!("/{behaviour}-closed");
        access_with_tags(&gateway, &closed, |t| {
            t == format!("denied_by={behaviour}-closed")
        })
        .await;
    }
    // The gateway is still whole: a new tunnel works.
    assert_eq!(reach(addr, &Head::websocket("/after")).await.0, "a");
}

// ---- load errors ----------------------------------------------------------------------

/// An `init` slower than its CPU deadline fails `sluice check` and `sluice run` with a
/// message naming the plugin, well before the init would have finished.
#[tokio::test]
async fn slow_init_fails_check_and_run_naming_the_plugin() {
    let dir = TempDir::new();
    let config = config_with_plugin(
        &[closed_port()],
        "slowpoke",
        &wasm("hostile"),
        &json!({"init_ms": 60_000}),
        "cpu_deadline = \"100ms\"",
    );
    let path = dir.write("sluice.toml", &config);
    let started = Instant::now();
    let check_path = path.clone();
    tokio::task::spawn_blocking(move || {
        assert_check_fails(&check_path, "slowpoke", "failed to start");
    })
    .await
    .expect("check task");
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "init was not cut short"
    );

    let out = tokio::task::spawn_blocking(move || sluice_until_exit("run", &path, CHECK_LIMIT))
        .await
        .expect("run task");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("plugin `slowpoke`"),
        "`sluice run` with a slow init: {}, stderr: {stderr}",
        out.status
    );
}

/// `sluice check` names the plugin and the reason for a missing `.wasm` (resolved
/// against the config's directory), a file that is not a component, and a config the
/// plugin's `init` rejects.
#[tokio::test]
async fn check_reports_missing_broken_and_misconfigured_plugins() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("garbage.wasm"), b"definitely not wasm").expect("write");
    let missing = dir.path().join("missing.wasm").display().to_string();
    // A relative path is resolved against the config's directory, and shown resolved.
    let elsewhere = dir
        .path()
        .parent()
        .expect("a parent")
        .join("elsewhere/missing.wasm");
    let cases = [
        (
            "../elsewhere/./missing.wasm".to_string(),
            json!({}),
            format!("cannot read {}", elsewhere.display()),
        ),
        (
            "missing.wasm".to_string(),
            json!({}),
            format!("cannot read {missing}"),
        ),
        (
            "garbage.wasm".to_string(),
            json!({}),
            "is not a usable WebAssembly component".to_string(),
        ),
        (
            wasm("jwt-auth"),
            json!({"keys": [{"alg": "HS256", "secret": "short"}]}),
            // `LINE`: where the config is written in the TOML file.
            "init rejected the config at line LINE, column 10 (plugins.auth.config): HS256 secret must be at least 16 bytes".to_string(),
        ),
        (
            wasm("tenant-router"),
            json!({"rules": [{"tenant": "x"}]}),
            "(plugins.auth.config): rules[0] needs".to_string(),
        ),
    ];
    for (i, (path, config, reason)) in cases.into_iter().enumerate() {
        let text = config_with_plugin(&[closed_port()], "auth", &path, &config, "");
        let line = text
            .lines()
            .position(|l| l.starts_with("config = "))
            .map_or(0, |i| i + 1);
        let reason = reason.replace("LINE", &line.to_string());
        let file = dir.write(&format!("case{i}.toml"), &text);
        tokio::task::spawn_blocking(move || assert_check_fails(&file, "auth", &reason))
            .await
            .expect("check task");
    }
}

// ---- the example ----------------------------------------------------------------------

/// `examples/plugins/sluice.toml`.
fn example_config() -> PathBuf {
    workspace().join("examples/plugins/sluice.toml")
}

/// The example's HS256 secret, issuer and audience (see its `[plugins.auth.config]`).
const EXAMPLE_SECRET: &str = "sluice-example-secret-do-not-use";
const EXAMPLE_ISSUER: &str = "https://auth.example.com";
const EXAMPLE_AUDIENCE: &str = "sluice-example";

/// `sluice check` accepts the example as written, so it cannot rot.
#[tokio::test]
async fn example_config_passes_check() {
    let (ok, stderr) = tokio::task::spawn_blocking(|| check(&example_config()))
        .await
        .expect("check task");
    assert!(
        ok,
        "`sluice check examples/plugins/sluice.toml` failed: {stderr}"
    );
}

/// The example's text with `from` replaced by `to`, asserting `from` is there (so a
/// change to the example fails here loudly instead of testing something else).
fn replaced(text: String, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "examples/plugins/sluice.toml no longer contains {from:?}"
    );
    text.replace(from, to)
}

/// The four-plugin chain of the example, end to end: its listener moved to port 0, its
/// four servers replaced by test backends, its plugin paths made absolute, its log JSON.
/// An acme user lands on the green pool, anyone else on blue, each user on one server
/// across reconnects, with the claims forwarded; a bad Origin (403), a missing token and
/// an expired one (401) are refused before any backend sees them.
#[tokio::test]
async fn example_chain_admits_routes_and_refuses() {
    let names = ["blue-1", "blue-2", "green-1", "green-2"];
    let ports = ["9101", "9102", "9201", "9202"];
    let mut backends = Vec::new();
    let mut text = std::fs::read_to_string(example_config()).expect("read the example");
    for (name, port) in names.iter().zip(ports) {
        let backend = Backend::start(name).await;
        text = replaced(
            text,
            &format!("\"127.0.0.1:{port}\""),
            &format!("\"{}\"", backend.addr),
        );
        backends.push(backend);
    }
    text = replaced(text, "bind = \"127.0.0.1:8080\"", "bind = \"127.0.0.1:0\"");
    text = replaced(text, "format = \"text\"", "format = \"json\"");
    let plugins_dir = workspace().join("target/plugins/");
    text = replaced(
        text,
        "\"../../target/plugins/",
        &format!("\"{}", plugins_dir.display()),
    );
    for component in [
        "origin-allowlist",
        "jwt-auth",
        "tenant-router",
        "sticky-key",
    ] {
        wasm(component);
    }
    let gateway = start(&text).await;
    let addr = gateway.addr();

    let token = |sub: &str, tenant: &str, exp: i64| {
        let claims = json!({"sub": sub, "tenant": tenant, "iss": EXAMPLE_ISSUER, "aud": EXAMPLE_AUDIENCE, "exp": exp});
        sluice_jwt::mint::hs256(&claims, EXAMPLE_SECRET.as_bytes())
    };
    let head = |origin: &str, token: Option<String>| {
        let head = Head::websocket("/ws").header("Origin", origin);
        match token {
            Some(t) => head.header("Authorization", &format!("Bearer {t}")),
            None => head,
        }
    };
    let origin = "https://app.example.com";

    for (sub, tenant, pool) in [
        ("alice", "acme", "green"),
        ("bob", "acme", "green"),
        ("carol", "initech", "blue"),
    ] {
        let allowed = head(origin, Some(token(sub, tenant, now() + 600)));
        let server = reach(addr, &allowed).await.0;
        assert!(
            server.starts_with(pool),
            "{sub} of {tenant} reached {server}"
        );
        for _ in 0..3 {
            assert_eq!(reach(addr, &allowed).await.0, server, "{sub} moved");
        }
        let backend = backends
            .iter()
            .find(|b| b.name() == server)
            .expect("a test backend");
        let seen = seen_with(backend, "x-user", sub);
        assert_eq!(seen.values("x-tenant"), [tenant], "{seen:?}");
        assert_eq!(
            seen.values("x-sluice-tenant"),
            [if pool == "green" { "acme" } else { "public" }]
        );
    }
    let upgrades = || backends.iter().map(Backend::upgrades).sum::<usize>();
    let before = upgrades();
    let good = Some(token("mallory", "acme", now() + 600));
    refused(addr, &head("https://evil.example.net", good), 403).await;
    refused(addr, &head(origin, None), 401).await;
    refused(
        addr,
        &head(origin, Some(token("mallory", "acme", now() - 600))),
        401,
    )
    .await;
    assert_eq!(upgrades(), before, "a refused handshake reached a backend");
    access_with_tags(&gateway, "/ws", |t| {
        t == "denied_by=origin denied_origin=https://evil.example.net"
    })
    .await;
    access_with_tags(&gateway, "/ws", |t| {
        t.contains("tenant=acme") && t.contains("jwt_sub=alice")
    })
    .await;
    eventually(STEP, "the refusals in the access log", || {
        let denied = gateway
            .json_logs()
            .iter()
            .filter(|v| v["target"] == "sluice::access" && v["tags"] == "denied_by=auth")
            .count();
        (denied == 2).then_some(())
    })
    .await;
}

// ---- reload ---------------------------------------------------------------------------

/// SIGHUP swaps in a plugin's new config for new connections; a reload whose plugin
/// cannot load is refused and the running chain keeps deciding as before.
#[tokio::test]
async fn reload_swaps_plugin_config_and_keeps_the_chain_when_a_plugin_breaks() {
    let backend = Backend::start("a").await;
    let config = |path: &str, origin: &str| {
        config_with_plugin(
            &[backend.addr],
            "origin",
            path,
            &json!({"allowed": [origin]}),
            "",
        )
    };
    let component = wasm("origin-allowlist");
    let gateway = start(&config(&component, "https://one.example")).await;
    let from = |origin: &str| Head::websocket("/ws").header("Origin", origin);
    assert_eq!(
        reach(gateway.addr(), &from("https://one.example")).await.0,
        "a"
    );
    refused(gateway.addr(), &from("https://two.example"), 403).await;

    // origin-allowlist lets the gateway reuse each answer for a minute: the
    // reload must forget the admission of one.example given above.
    gateway.reload(&config(&component, "https://two.example"));
    gateway
        .wait_log("the reload", |v| v.to_string().contains("config reloaded"))
        .await;
    assert_eq!(
        reach(gateway.addr(), &from("https://two.example")).await.0,
        "a"
    );
    refused(gateway.addr(), &from("https://one.example"), 403).await;

    let missing = gateway.config_path().with_file_name("missing.wasm");
    gateway.reload(&config(
        &missing.display().to_string(),
        "https://one.example",
    ));
    let failed = gateway
        .wait_log("the failed reload", |v| {
            v.to_string().contains("reload failed")
        })
        .await;
    assert!(failed.to_string().contains("plugin `origin`"), "{failed}");
    assert_eq!(
        reach(gateway.addr(), &from("https://two.example")).await.0,
        "a"
    );
    refused(gateway.addr(), &from("https://one.example"), 403).await;
}

/// A plugin that reads a request field it did not declare faults, with the SDK's message
/// naming the declaration in the gateway's log, instead of reading it as empty; declared,
/// the same read is served.
#[tokio::test]
async fn an_undeclared_read_faults_loudly_and_a_declared_one_is_served() {
    let reader = |fields: &[&str]| json!({"on_request": "read_path", "fields": fields});
    let (_backend, gateway) = single_plugin_gateway("reader", "hostile", reader(&[])).await;
    let answer = request_once(gateway.addr(), &Head::get("/admin")).await;
    assert_eq!(answer.status, 503, "{answer:?}");
    gateway
        .wait_log("the SDK's message", |l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("add Fields::PATH"))
        })
        .await;
    let (_backend, declared) = single_plugin_gateway("reader", "hostile", reader(&["path"])).await;
    assert_answered(declared.addr(), &Head::get("/admin"), "a").await;
}

/// A plugin's `crypto` keys are bounded per instance: the gateway refuses the 1,025th
/// with a reason the plugin can show, and keeps serving.
#[tokio::test]
async fn crypto_keys_are_bounded_per_instance() {
    let hoarder = json!({"on_request": "keys"});
    let (_backend, gateway) = single_plugin_gateway("hoarder", "hostile", hoarder).await;
    let answer = request_once(gateway.addr(), &Head::get("/")).await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(
        answer.text(),
        "hostile: 1024 keys, then: this instance already holds 1024 keys\n"
    );
    // The next request finds the instance at the bound and the gateway still serving.
    let again = request_once(gateway.addr(), &Head::get("/")).await;
    assert_eq!(again.text(), answer.text());
}
