//! The plugin host with the real components built by `plugins/build.sh`
//! (in `target/plugins/`): decisions, chains, load errors, hostile plugins.

mod common;

use std::time::{Duration, Instant};

use common::plugin_wasm as wasm;

use serde_json::json;
use sluice::config::{PluginConfig, PluginLimits};
use sluice::plugin::{
    Chain, ChainDecision, CloseInfo, CloseReason, Fault, HeaderOp, Mutations, Plugin, PluginError,
    PluginHost, RequestInfo, RequestKind,
};

const SECRET: &str = "plugin-host-test-secret";

fn spec(name: &str, config: serde_json::Value) -> PluginConfig {
    PluginConfig {
        name: name.to_owned(),
        wasm: wasm(name),
        config_json: config.to_string(),
        limits: PluginLimits::default(),
        fail_open: false,
        grants: Vec::new(),
        config_at: String::new(),
    }
}

fn hostile(name: &str, behaviour: &str, fail_open: bool) -> PluginConfig {
    PluginConfig {
        name: name.to_owned(),
        fail_open,
        limits: PluginLimits {
            cpu_deadline: Duration::from_millis(50),
            memory_bytes: 16 << 20,
            max_instances: 2,
            ..PluginLimits::default()
        },
        ..spec("hostile", json!({"on_request": behaviour}))
    }
}

async fn load(host: &PluginHost, spec: &PluginConfig) -> Plugin {
    match host.load(spec).await {
        Ok(plugin) => plugin,
        Err(e) => panic!("loading {}: {e}", spec.name),
    }
}

fn request(headers: &[(&str, &str)]) -> RequestInfo<'static> {
    RequestInfo {
        kind: RequestKind::WebSocket,
        method: "GET".into(),
        scheme: "http".into(),
        authority: "chat.acme.example".into(),
        path: "/ws".into(),
        query: "".into(),
        headers: headers
            .iter()
            .map(|(n, v)| ((*n).to_owned().into(), (*v).to_owned().into()))
            .collect(),
        client_addr: "127.0.0.1:40000".parse().unwrap(),
        tls: None,
        route: "chat".into(),
        tenant: None,
        subprotocols: Vec::new(),
    }
}

fn token(sub: &str) -> String {
    let claims = json!({"sub": sub, "tenant": "acme", "exp": 4_000_000_000u64});
    format!(
        "Bearer {}",
        sluice_jwt::mint::hs256(&claims, SECRET.as_bytes())
    )
}

fn continued(decision: ChainDecision) -> Mutations {
    match decision {
        ChainDecision::Continue(m) => m,
        ChainDecision::Deny(d) => panic!("expected continue, got {d:?}"),
    }
}

/// The values the chain's plugins set for header `name`, in order.
fn values_set(m: Mutations, name: &str) -> Vec<String> {
    m.headers
        .into_iter()
        .filter_map(|op| match op {
            HeaderOp::Set(n, value) if n == name => Some(value),
            _ => None,
        })
        .collect()
}

fn denied(decision: &ChainDecision) -> (u16, &str, Option<&Fault>) {
    match decision {
        ChainDecision::Deny(d) => (d.status, d.plugin.as_str(), d.fault.as_ref()),
        ChainDecision::Continue(m) => panic!("expected deny, got {m:?}"),
    }
}

/// origin-allowlist admitting `https://*.acme.example`.
fn acme_origins() -> PluginConfig {
    spec(
        "origin-allowlist",
        json!({"allowed": ["https://*.acme.example"]}),
    )
}

/// jwt-auth with the test secret, forwarding `sub` and `tenant` as `x-user` and `x-tenant`.
fn jwt_config() -> serde_json::Value {
    json!({"keys": [{"alg": "HS256", "secret": SECRET}],
           "forward_claims": {"sub": "x-user", "tenant": "x-tenant"}})
}

/// origin-allowlist → jwt-auth → tenant-router → sticky-key, as in examples/.
async fn full_chain(host: &PluginHost) -> Chain {
    load_chain(host, &full_chain_specs()).await
}

async fn load_chain(host: &PluginHost, specs: &[PluginConfig]) -> Chain {
    let mut plugins = Vec::new();
    for s in specs {
        plugins.push(load(host, s).await);
    }
    Chain::new(plugins)
}

fn full_chain_specs() -> [PluginConfig; 4] {
    [
        acme_origins(),
        spec("jwt-auth", jwt_config()),
        spec(
            "tenant-router",
            json!({"rules": [{"header": "x-tenant", "value": "acme", "tenant": "acme", "pool": "blue"}],
                   "default": {"tenant": "public", "pool": "green"}}),
        ),
        spec(
            "sticky-key",
            json!({"sources": [{"jwt_claim": "sub"}], "fallback": "client_ip"}),
        ),
    ]
}

#[tokio::test]
async fn chain_allows_mutates_and_denies() {
    let host = PluginHost::new().unwrap();
    let chain = full_chain(&host).await;
    let alice = token("alice");

    let ok = chain
        .on_request(&request(&[
            ("origin", "https://app.acme.example"),
            ("authorization", &alice),
            ("x-user", "spoofed"),
        ]))
        .await;
    let m = continued(ok);
    assert!(
        m.headers
            .contains(&HeaderOp::Set("x-user".into(), "alice".into()))
    );
    assert!(
        m.headers
            .contains(&HeaderOp::Set("x-sluice-tenant".into(), "acme".into()))
    );
    // tenant-router saw the header jwt-auth forwarded.
    assert_eq!(m.tenant.as_deref(), Some("acme"));
    assert_eq!(m.pool.as_deref(), Some("blue"));
    assert_eq!(m.sticky_key.as_deref(), Some("alice"));
    assert!(m.log_fields.contains(&("jwt_sub".into(), "alice".into())));

    let cross_site = chain
        .on_request(&request(&[
            ("origin", "https://evil.example"),
            ("authorization", &alice),
        ]))
        .await;
    assert_eq!(denied(&cross_site), (403, "origin-allowlist", None));

    let anonymous = chain
        .on_request(&request(&[("origin", "https://app.acme.example")]))
        .await;
    assert_eq!(denied(&anonymous), (401, "jwt-auth", None));
    let ChainDecision::Deny(d) = anonymous else {
        unreachable!()
    };
    assert!(
        d.headers
            .iter()
            .any(|(n, v)| n == "www-authenticate" && v.contains("Bearer"))
    );

    // None of the four asks for on-close, so closing calls nothing.
    assert!(!chain.wants_close());
    let calls: Vec<u64> = chain.plugins().iter().map(|p| p.stats().calls).collect();
    chain.on_close(&close_info()).await;
    for (plugin, calls) in chain.plugins().iter().zip(calls) {
        assert!(!plugin.wants_close(), "{}", plugin.name());
        let stats = plugin.stats();
        assert_eq!(stats.calls, calls, "{}: on-close not called", plugin.name());
        assert_eq!(stats.faults, 0, "{}: {stats:?}", plugin.name());
        assert_eq!(
            stats.instances_created, 1,
            "instances are reused: {stats:?}"
        );
    }
}

fn close_info() -> CloseInfo {
    CloseInfo {
        kind: RequestKind::WebSocket,
        route: "chat".into(),
        tenant: Some("acme".into()),
        upstream: Some("127.0.0.1:9000".into()),
        duration: Duration::from_secs(3),
        bytes_from_client: 10,
        bytes_to_client: 20,
        reason: CloseReason::ClientClosed,
    }
}

#[tokio::test]
async fn on_close_is_called_only_for_plugins_that_ask_for_it() {
    let host = PluginHost::new().unwrap();
    // `hostile` opts into on-close (ON_CLOSE in the SDK); origin-allowlist does not.
    let wants = load(&host, &spec("hostile", json!({}))).await;
    let does_not = load(
        &host,
        &spec(
            "origin-allowlist",
            json!({"allowed": [], "allow_missing": true}),
        ),
    )
    .await;
    assert!(wants.wants_close());
    assert!(!does_not.wants_close());
    let chain = Chain::new(vec![does_not.clone(), wants.clone()]);
    assert!(chain.wants_close());
    assert!(!Chain::new(vec![does_not.clone()]).wants_close());
    assert!(!Chain::default().wants_close());

    continued(chain.on_request(&request(&[])).await);
    chain.on_close(&close_info()).await;
    chain.on_close(&close_info()).await;
    assert_eq!(wants.stats().calls, 3, "one on-request, two on-close");
    assert_eq!(does_not.stats().calls, 1, "on-request only");
    assert_eq!(wants.stats().faults, 0);
}

#[tokio::test]
async fn plugins_see_only_the_headers_they_read_as_earlier_plugins_left_them() {
    let host = PluginHost::new().unwrap();
    let auth = load(&host, &spec("jwt-auth", jwt_config())).await;
    assert_eq!(auth.headers(), Some(&["authorization".to_owned()][..]));
    let narrow = PluginConfig {
        name: "narrow".into(),
        ..spec("hostile", json!({"headers": ["X-User", "Origin"]}))
    };
    let narrow = load(&host, &narrow).await;
    assert_eq!(
        narrow.headers(),
        Some(&["x-user".to_owned(), "origin".to_owned()][..])
    );
    let everything = load(&host, &spec("hostile", json!({}))).await;
    assert_eq!(everything.headers(), None);

    let chain = Chain::new(vec![auth, narrow, everything]);
    let req = request(&[
        ("origin", "https://app.acme.example"),
        ("authorization", &token("alice")),
        ("cookie", "a=1"),
        ("x-user", "spoofed"),
    ]);
    let saw = values_set(continued(chain.on_request(&req).await), "x-hostile-saw");
    assert_eq!(
        saw,
        [
            // Only what it asked for, with jwt-auth's x-user in place of the client's.
            "origin,x-user",
            // Everything, including the headers the plugins before it set.
            "origin,authorization,cookie,x-user,x-tenant,x-hostile-call,x-hostile,x-hostile-saw,x-hostile-fields,x-hostile-scheme,x-hostile-tls,x-hostile-request,x-hostile-client",
        ]
    );
}

#[tokio::test]
async fn plugins_get_only_the_fields_they_read_and_later_plugins_get_them_all_back() {
    let host = PluginHost::new().unwrap();
    let narrow = PluginConfig {
        name: "narrow".into(),
        ..spec("hostile", json!({"fields": ["path", "client-addr"]}))
    };
    let none = PluginConfig {
        name: "none".into(),
        ..spec("hostile", json!({"fields": []}))
    };
    let chain = Chain::new(vec![
        load(&host, &narrow).await,
        load(&host, &none).await,
        load(&host, &spec("hostile", json!({}))).await,
    ]);
    let mut req = request(&[("origin", "https://app.acme.example")]);
    req.tenant = Some("acme".into());
    let given = values_set(continued(chain.on_request(&req).await), "x-hostile-fields");
    assert_eq!(
        given,
        [
            "path,client-addr",
            "",
            // No TLS on this listener; everything else, the tenant included.
            "method,scheme,authority,path,query,client-addr,client-ip,route,tenant,subprotocols",
        ]
    );
    // A field name the plugin does not know is its init error, caught at load.
    let typo = spec("hostile", json!({"fields": ["paths"]}));
    let err = host
        .load(&typo)
        .await
        .expect_err("a bad field name is refused");
    assert!(err.to_string().contains("unknown request field"), "{err}");
}

/// The `x-hostile-call` a chain of one `hostile` plugin answered `req` with:
/// the plugin's call count when it decided, so a reused decision repeats it.
async fn call_number(chain: &Chain, req: &RequestInfo<'_>) -> String {
    let m = continued(chain.on_request(req).await);
    values_set(m, "x-hostile-call").concat()
}

#[tokio::test]
async fn a_decision_is_given_again_only_for_the_same_inputs_and_only_as_long_as_allowed() {
    let host = PluginHost::new().unwrap();
    // Long enough for the checks of reuse below on a loaded machine.
    const REUSE: Duration = Duration::from_millis(1500);
    let reusing = |max_reused: usize| PluginConfig {
        limits: PluginLimits {
            max_reused,
            ..PluginLimits::default()
        },
        ..spec(
            "hostile",
            json!({"reuse_ms": REUSE.as_millis() as u64, "headers": ["origin"], "fields": ["path"]}),
        )
    };
    let plugin = load(&host, &reusing(1024)).await;
    let chain = Chain::new(vec![plugin.clone()]);
    let a = request(&[("origin", "https://a.example")]);
    let first = call_number(&chain, &a).await;
    // The decision may be given again until `REUSE` after its call began, before this.
    let reusable_until = Instant::now() + REUSE;
    assert_eq!(call_number(&chain, &a).await, first, "same inputs: reused");
    // What the plugin does not read makes no difference...
    let mut a_elsewhere = request(&[("origin", "https://a.example"), ("x-other", "1")]);
    a_elsewhere.authority = "other.example".into();
    a_elsewhere.client_addr = "127.0.0.2:5".parse().unwrap();
    assert_eq!(call_number(&chain, &a_elsewhere).await, first);
    // ...what it reads does: another header value, another field value.
    let b = request(&[("origin", "https://b.example")]);
    let second = call_number(&chain, &b).await;
    assert_ne!(second, first);
    let mut a_other_path = a.clone();
    a_other_path.path = "/other".into();
    assert_ne!(call_number(&chain, &a_other_path).await, first);
    assert_eq!(call_number(&chain, &b).await, second);
    let stats = plugin.stats();
    assert_eq!((stats.calls, stats.reused), (3, 3), "{stats:?}");
    // After `reuse_ms`, the plugin is asked again.
    tokio::time::sleep_until((reusable_until + Duration::from_millis(50)).into()).await;
    assert_ne!(call_number(&chain, &a).await, first);
    assert_eq!(plugin.stats().calls, 4);

    // `max_reused = 0` turns reuse off, whatever the plugin allows. (Loads of one name
    // share its counters, as a reload's would: these count on from the first load's.)
    let off = load(&host, &reusing(0)).await;
    let chain = Chain::new(vec![off.clone()]);
    let first = call_number(&chain, &a).await;
    assert_ne!(call_number(&chain, &a).await, first);
    assert_eq!((off.stats().calls, off.stats().reused), (4 + 2, 3));

    // A plugin that does not allow reuse is called every time.
    let plain = load(&host, &spec("hostile", json!({"headers": ["origin"]}))).await;
    let chain = Chain::new(vec![plain.clone()]);
    let first = call_number(&chain, &a).await;
    assert_ne!(call_number(&chain, &a).await, first);
    assert_eq!((plain.stats().calls, plain.stats().reused), (6 + 2, 3));
}

#[tokio::test]
async fn a_reused_admission_ends_when_the_token_expires() {
    let host = PluginHost::new().unwrap();
    let jwt = load(
        &host,
        &spec(
            "jwt-auth",
            json!({"keys": [{"alg": "HS256", "secret": SECRET}], "leeway_secs": 0}),
        ),
    )
    .await;
    let chain = Chain::new(vec![jwt.clone()]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Valid for the rest of this second and the next one.
    let claims = json!({"sub": "alice", "exp": now + 1});
    let bearer = format!(
        "Bearer {}",
        sluice_jwt::mint::hs256(&claims, SECRET.as_bytes())
    );
    let req = request(&[("authorization", &bearer)]);
    continued(chain.on_request(&req).await);
    continued(chain.on_request(&req).await);
    assert_eq!(
        jwt.stats().reused,
        1,
        "an admission is reused while the token is valid"
    );
    let expired_at = Duration::from_secs(now + 2);
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    tokio::time::sleep(expired_at.saturating_sub(since_epoch) + Duration::from_millis(50)).await;
    let refused = chain.on_request(&req).await;
    let (status, by, _) = denied(&refused);
    assert_eq!((status, by), (401, "jwt-auth"));
    // A refusal is never reused: the plugin was asked.
    denied(&chain.on_request(&req).await);
    assert_eq!(jwt.stats().calls, 3);
}

#[tokio::test]
async fn a_refusal_keeps_the_log_fields_of_the_plugins_before_it_and_its_own() {
    let host = PluginHost::new().unwrap();
    let chain = Chain::new(vec![
        load(&host, &spec("jwt-auth", jwt_config())).await,
        load(&host, &acme_origins()).await,
    ]);
    let req = request(&[
        ("origin", "https://evil.example"),
        ("authorization", &token("alice")),
    ]);
    match chain.on_request(&req).await {
        ChainDecision::Deny(d) => {
            assert_eq!((d.status, d.plugin.as_str()), (403, "origin-allowlist"));
            assert_eq!(
                d.log_fields,
                [
                    ("jwt_sub".to_owned(), "alice".to_owned()),
                    (
                        "denied_origin".to_owned(),
                        "https://evil.example".to_owned()
                    ),
                ]
            );
        }
        ChainDecision::Continue(m) => panic!("expected deny, got {m:?}"),
    }
}

#[tokio::test]
async fn javascript_plugin_runs_against_the_same_wit() {
    let host = PluginHost::new().unwrap();
    let config = json!({"keys": {"k-123": "alice"}, "rate_limit_per_minute": 2});
    let plugin = load(&host, &spec("api-key-js", config)).await;
    assert!(!plugin.wants_close(), "init returned {{ onClose: false }}");
    assert_eq!(plugin.headers(), Some(&["x-api-key".to_owned()][..]));
    let chain = Chain::new(vec![plugin]);

    let m = continued(chain.on_request(&request(&[("x-api-key", "k-123")])).await);
    assert_eq!(
        m.headers,
        [
            HeaderOp::Remove("x-api-key".into()),
            HeaderOp::Set("x-client".into(), "alice".into())
        ]
    );
    let missing = chain.on_request(&request(&[])).await;
    assert_eq!(denied(&missing).0, 401);
    let unknown = chain.on_request(&request(&[("x-api-key", "nope")])).await;
    assert_eq!(denied(&unknown).0, 403);
    // Third admitted request in the window: the shared counter says 429.
    continued(chain.on_request(&request(&[("x-api-key", "k-123")])).await);
    let limited = chain.on_request(&request(&[("x-api-key", "k-123")])).await;
    assert_eq!(denied(&limited).0, 429);

    let bad = host.load(&spec("api-key-js", json!({"keys": 7}))).await;
    let err = bad.expect_err("bad config refused").to_string();
    assert!(
        err.contains("api-key-js") && err.contains("`keys` must map"),
        "{err}"
    );
}

#[tokio::test]
async fn python_plugin_runs_against_the_same_wit() {
    let host = PluginHost::new().unwrap();
    let guard = load(
        &host,
        &spec("path-guard-py", json!({"blocked": ["/admin"]})),
    )
    .await;
    // It declares the path alone, and no headers.
    assert_eq!(guard.headers(), Some(&[][..]));
    let chain = Chain::new(vec![guard]);
    let at = |path: &str| RequestInfo {
        path: path.to_owned().into(),
        ..request(&[("origin", "https://a.example")])
    };
    let refused = chain.on_request(&at("/admin/users")).await;
    assert_eq!(denied(&refused).0, 403);
    match &refused {
        ChainDecision::Deny(d) => assert_eq!(d.log_fields, [("blocked".into(), "/admin".into())]),
        ChainDecision::Continue(_) => unreachable!(),
    }
    let m = continued(chain.on_request(&at("/chat")).await);
    assert_eq!(values_set(m, "x-path-guard"), ["passed"]);

    let bad = host
        .load(&spec("path-guard-py", json!({"blocked": "/admin"})))
        .await;
    let err = bad.expect_err("bad config refused").to_string();
    assert!(
        err.contains("path-guard-py") && err.contains("`blocked` must be a list"),
        "{err}"
    );
}

#[tokio::test]
async fn load_errors_name_the_plugin_and_the_reason() {
    let host = PluginHost::new().unwrap();
    let dir = std::env::temp_dir().join(format!("sluice-plugin-host-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let with_file = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        PluginConfig {
            wasm: path,
            ..spec("origin-allowlist", json!({}))
        }
    };

    let missing = PluginConfig {
        wasm: dir.join("nope.wasm"),
        ..spec("origin-allowlist", json!({}))
    };
    let err = host.load(&missing).await.unwrap_err();
    assert!(matches!(err, PluginError::Read { .. }), "{err}");
    assert!(err.to_string().contains("origin-allowlist") && err.to_string().contains("nope.wasm"));

    let text = host
        .load(&with_file("text.wasm", b"hello"))
        .await
        .unwrap_err();
    assert!(
        text.to_string().contains("not a WebAssembly file"),
        "{text}"
    );
    let core = host
        .load(&with_file("core.wasm", b"\0asm\x01\0\0\0"))
        .await
        .unwrap_err();
    assert!(core.to_string().contains("core wasm module"), "{core}");
    // An empty component: valid, but exports nothing of the plugin world.
    let empty = host
        .load(&with_file("empty.wasm", b"\0asm\x0d\0\x01\0"))
        .await
        .unwrap_err();
    assert!(matches!(empty, PluginError::WrongWorld { .. }), "{empty}");
    // A component that imports the host interface of an older WIT:
    // `(component (import "sluice:plugin/host@0.1.0" (instance)))`.
    let mut old = b"\0asm\x0d\0\x01\0\x07\x03\x01\x42\x00\x0a\x1d\x01\x00\x18".to_vec();
    old.extend_from_slice(b"sluice:plugin/host@0.1.0\x05\x00");
    let old = host.load(&with_file("old.wasm", &old)).await.unwrap_err();
    assert!(matches!(old, PluginError::WrongWorld { .. }), "{old}");
    assert!(
        old.to_string()
            .contains("built against sluice:plugin@0.1.0; rebuild it"),
        "{old}"
    );

    let bad_config = host.load(&spec("jwt-auth", json!({}))).await.unwrap_err();
    assert!(
        matches!(bad_config, PluginError::Init { .. }),
        "{bad_config}"
    );
    assert!(
        bad_config
            .to_string()
            .contains("`keys` must list at least one key"),
        "{bad_config}"
    );

    let tiny_memory = PluginConfig {
        limits: PluginLimits {
            memory_bytes: 64 << 10,
            ..PluginLimits::default()
        },
        ..spec("origin-allowlist", json!({"allowed": []}))
    };
    let err = host.load(&tiny_memory).await.unwrap_err();
    assert!(
        err.to_string().contains("origin-allowlist") && err.to_string().contains("memory"),
        "{err}"
    );

    // A deadline shorter than the 5 ms epoch tick could not be kept: refused, saying so.
    let hasty = PluginConfig {
        limits: PluginLimits {
            cpu_deadline: Duration::from_millis(2),
            ..PluginLimits::default()
        },
        ..spec("origin-allowlist", json!({"allowed": []}))
    };
    let err = host.load(&hasty).await.unwrap_err().to_string();
    assert!(
        err.contains("cpu deadline 2ms is below the epoch tick 5ms"),
        "{err}"
    );

    let zero = PluginConfig {
        limits: PluginLimits {
            max_instances: 0,
            ..PluginLimits::default()
        },
        ..spec("origin-allowlist", json!({"allowed": []}))
    };
    assert!(matches!(
        host.load(&zero).await,
        Err(PluginError::Limits { .. })
    ));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn slow_init_fails_the_load_within_the_deadline() {
    let host = PluginHost::new().unwrap();
    let slow = PluginConfig {
        config_json: json!({"init_ms": 10_000}).to_string(),
        ..hostile("slow-init", "allow", false)
    };
    let started = Instant::now();
    let err = host.load(&slow).await.unwrap_err();
    assert!(
        matches!(
            &err,
            PluginError::Start {
                fault: Fault::Timeout(_),
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("slow-init"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // A merely slow init within the deadline loads fine.
    let ok = PluginConfig {
        config_json: json!({"init_ms": 5}).to_string(),
        ..hostile("slowish-init", "allow", false)
    };
    load(&host, &ok).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_fail_per_mode_while_good_traffic_flows() {
    let host = PluginHost::new().unwrap();
    let good = Chain::new(vec![load(&host, &acme_origins()).await]);
    // The memory bomb fills its 16 MiB in about 7 ms of CPU, but the deadline counts
    // epoch ticks seen while it runs, and on a loaded 2-core machine every time the OS
    // takes its thread away a tick goes by: a 50 ms deadline there once fired before the
    // memory cap did. The faults other than the loop get a deadline they cannot meet.
    let roomy = |spec: PluginConfig| PluginConfig {
        limits: PluginLimits {
            cpu_deadline: Duration::from_secs(1),
            ..spec.limits
        },
        ..spec
    };
    let cases = [
        (hostile("loop", "loop", false), Some("CPU deadline")),
        (
            roomy(hostile("memory-bomb", "memory", false)),
            Some("memory cap"),
        ),
        (roomy(hostile("trap", "trap", false)), Some("trapped")),
        (hostile("loop-open", "loop", true), None),
    ];
    let mut hostile_chains = Vec::new();
    for (spec, expect) in &cases {
        hostile_chains.push((Chain::new(vec![load(&host, spec).await]), *expect));
    }

    // Good traffic runs on its own task the whole time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let good_traffic = {
        let (good, stop) = (good.clone(), stop.clone());
        tokio::spawn(async move {
            let req = request(&[("origin", "https://app.acme.example")]);
            let (mut calls, mut slowest) = (0u32, Duration::ZERO);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                continued(good.on_request(&req).await);
                slowest = slowest.max(t.elapsed());
                calls += 1;
                tokio::task::yield_now().await;
            }
            (calls, slowest)
        })
    };

    let mut hostile_calls = Vec::new();
    for (chain, expect) in hostile_chains.iter().cloned() {
        hostile_calls.push(tokio::spawn(async move {
            for _ in 0..3 {
                let started = Instant::now();
                let decision = chain.on_request(&request(&[])).await;
                let took = started.elapsed();
                assert!(took < Duration::from_secs(2), "answered in {took:?}");
                match expect {
                    Some(text) => {
                        let (status, _, fault) = denied(&decision);
                        assert_eq!(status, 503);
                        let fault = fault.expect("a fault").to_string();
                        assert!(fault.contains(text), "{fault}");
                    }
                    None => assert_eq!(continued(decision), Mutations::default()),
                }
            }
        }));
    }
    for call in hostile_calls {
        call.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (calls, slowest) = good_traffic.await.unwrap();
    assert!(calls > 10, "good traffic kept flowing: {calls} calls");
    assert!(
        slowest < Duration::from_millis(500),
        "slowest good call {slowest:?}"
    );
    assert_eq!(good.plugins()[0].stats().faults, 0);

    for (chain, _) in &hostile_chains {
        let stats = chain.plugins()[0].stats();
        assert_eq!(stats.faults, 3, "{}: {stats:?}", chain.plugins()[0].name());
        // Each fault threw its instance away.
        assert_eq!(stats.instances_created, 3, "{stats:?}");
    }
    assert_eq!(hostile_chains[0].0.plugins()[0].stats().timeouts, 3);
    assert_eq!(hostile_chains[1].0.plugins()[0].stats().memory_faults, 3);
}

/// A decision the gateway cannot act on (here a header name that is not a token) is the
/// plugin's fault, whatever else it holds: a 503 naming the reason when the plugin fails
/// closed, the plugin skipped when it fails open. Nothing of it reaches the request.
#[tokio::test]
async fn an_invalid_decision_is_a_fault_of_the_plugin() {
    let host = PluginHost::new().unwrap();
    let closed = Chain::new(vec![
        load(&host, &hostile("bad-closed", "bad_header", false)).await,
    ]);
    let decision = closed.on_request(&request(&[])).await;
    let (status, plugin, fault) = denied(&decision);
    assert_eq!((status, plugin), (503, "bad-closed"));
    match fault {
        Some(Fault::InvalidDecision(why)) => {
            assert!(why.contains("invalid header name \"x bad\""), "{why}")
        }
        other => panic!("expected an invalid decision, got {other:?}"),
    }
    let open = Chain::new(vec![
        load(&host, &hostile("bad-open", "bad_header", true)).await,
    ]);
    assert_eq!(
        continued(open.on_request(&request(&[])).await),
        Mutations::default()
    );
    let stats = open.plugins()[0].stats();
    assert_eq!((stats.faults, stats.calls), (1, 1), "{stats:?}");
}

/// Per-call costs quoted in `gateway/src/plugin/mod.rs`. Run with
/// `cargo test --release -p sluice --test plugin_host -- --ignored --nocapture measure`.
#[tokio::test(flavor = "current_thread")]
#[ignore = "measurement; run in release"]
async fn measure() {
    fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[v.len() / 2]
    }
    /// Per-call wall time over 15 runs: the median, and the fastest run
    /// (the least disturbed by other work on a shared machine).
    struct Cost {
        median: Duration,
        min: Duration,
    }
    impl std::fmt::Display for Cost {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?} (fastest run {:?})", self.median, self.min)
        }
    }
    async fn per_call(chain: &Chain, req: &RequestInfo<'_>, n: u32) -> Cost {
        let mut runs = Vec::new();
        for _ in 0..15 {
            let t = Instant::now();
            for _ in 0..n {
                std::hint::black_box(chain.on_request(req).await);
            }
            runs.push(t.elapsed() / n);
        }
        Cost {
            min: runs.iter().copied().min().unwrap_or_default(),
            median: median(runs),
        }
    }
    /// Each plugin of `chain` alone, on `req`.
    async fn each_alone(chain: &Chain, req: &RequestInfo<'_>, label: &str) {
        for plugin in chain.plugins() {
            let alone = Chain::new(vec![plugin.clone()]);
            let cost = per_call(&alone, req, 3_000).await;
            println!("  {label} {}: {cost}", plugin.name());
        }
    }
    let host = PluginHost::new().unwrap();
    let origin = json!({"allowed": ["https://*.acme.example"]});
    let req = request(&[
        ("origin", "https://app.acme.example"),
        ("authorization", &token("alice")),
    ]);
    let trivial = Chain::new(vec![load(&host, &spec("hostile", json!({}))).await]);
    let trivial_cost = per_call(&trivial, &req, 10_000).await;
    println!("reused instance, trivial Rust plugin: {trivial_cost}");
    // What a browser's upgrade carries: the request record grows with every header.
    let auth = token("alice");
    let browser = request(&[
        ("host", "chat.acme.example"),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "13"),
        ("origin", "https://app.acme.example"),
        ("authorization", &auth),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Safari/537.36",
        ),
        ("accept-language", "en-GB,en;q=0.9"),
        ("cookie", "session=4f2a9c1e8b7d; theme=dark"),
    ]);
    println!(
        "reused instance, trivial Rust plugin, 10-header request: {}",
        per_call(&trivial, &browser, 10_000).await
    );
    println!(
        "reused instance, trivial Rust plugin, no headers: {}",
        per_call(&trivial, &request(&[]), 10_000).await
    );
    let one = Chain::new(vec![
        load(&host, &spec("origin-allowlist", origin.clone())).await,
    ]);
    println!(
        "reused instance, 1 Rust plugin: {}",
        per_call(&one, &req, 10_000).await
    );
    let no_reuse = |s: PluginConfig| PluginConfig {
        limits: PluginLimits {
            max_reused: 0,
            ..s.limits
        },
        ..s
    };
    // Every plugin called: no decision reuse (the cost of a first request, or
    // of a chain whose plugins do not allow reuse).
    let four_called = load_chain(&host, &full_chain_specs().map(no_reuse)).await;
    each_alone(&four_called, &req, "called every time").await;
    println!(
        "reused instances, 4-plugin chain, every plugin called: {}",
        per_call(&four_called, &req, 2_000).await
    );
    // A token's signature checked on every call (no token cache, no reuse), per
    // algorithm: the price of verifying a new token.
    let claims = json!({"sub": "alice", "exp": 4_000_000_000u64});
    for (alg, key, signed) in [
        (
            "HS256",
            json!({"alg": "HS256", "secret": SECRET}),
            sluice_jwt::mint::hs256(&claims, SECRET.as_bytes()),
        ),
        (
            "RS256",
            json!({"alg": "RS256", "public_key_pem": include_str!("../plugins/jwt/testdata/rsa_public.pem")}),
            sluice_jwt::mint::rs256(
                &claims,
                include_str!("../plugins/jwt/testdata/rsa_private.pem"),
            )
            .unwrap(),
        ),
        (
            "ES256",
            json!({"alg": "ES256", "public_key_pem": include_str!("../plugins/jwt/testdata/ec_public.pem")}),
            sluice_jwt::mint::es256(
                &claims,
                include_str!("../plugins/jwt/testdata/ec_private.pem"),
            )
            .unwrap(),
        ),
    ] {
        let config = json!({"keys": [key], "cache_size": 0});
        let verifier = Chain::new(vec![load(&host, &no_reuse(spec("jwt-auth", config))).await]);
        let bearer = format!("Bearer {signed}");
        let req = request(&[("authorization", &bearer)]);
        println!(
            "jwt-auth, {alg} signature checked every call: {}",
            per_call(&verifier, &req, 300).await
        );
    }
    // With reuse (the default): the same request again, as on a reconnect.
    let four = full_chain(&host).await;
    each_alone(&four, &req, "of which").await;
    println!(
        "reused instances, 4-plugin chain: {}",
        per_call(&four, &req, 2_000).await
    );
    println!(
        "reused instances, 4-plugin chain, 10-header request: {}",
        per_call(&four, &browser, 2_000).await
    );
    // Again, warm: the first measurement of a process runs slower here.
    println!(
        "reused instance, trivial Rust plugin, again: {}",
        per_call(&trivial, &req, 10_000).await
    );
    let js = Chain::new(vec![
        load(&host, &spec("api-key-js", json!({"keys": {"k": "a"}}))).await,
    ]);
    let js_req = request(&[("x-api-key", "k")]);
    println!(
        "reused instance, JS plugin: {}",
        per_call(&js, &js_req, 1_000).await
    );
    let py = Chain::new(vec![
        load(
            &host,
            &no_reuse(spec("path-guard-py", json!({"blocked": ["/admin"]}))),
        )
        .await,
    ]);
    println!(
        "reused instance, Python plugin (called every time): {}",
        per_call(&py, &req, 1_000).await
    );

    let mut fresh = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let plugin = load(&host, &spec("origin-allowlist", origin.clone())).await;
        std::hint::black_box(Chain::new(vec![plugin]).on_request(&req).await);
        fresh.push(t.elapsed());
    }
    println!(
        "fresh instance per request (load from cache + init + call): {:?}",
        median(fresh)
    );

    let mut blocking = Vec::new();
    for _ in 0..2_000 {
        let t = Instant::now();
        tokio::task::spawn_blocking(|| ()).await.unwrap();
        blocking.push(t.elapsed());
    }
    println!("spawn_blocking round trip: {:?}", median(blocking));
}

#[tokio::test]
async fn a_plugins_counters_are_kept_apart_by_tenant() {
    let host = PluginHost::new().unwrap();
    let chain = Chain::new(vec![load(&host, &spec("hostile", json!({}))).await]);
    let of = |tenant: Option<&str>| RequestInfo {
        tenant: tenant.map(|t| t.to_owned().into()),
        ..request(&[])
    };
    assert_eq!(call_number(&chain, &of(Some("acme"))).await, "1");
    assert_eq!(call_number(&chain, &of(Some("acme"))).await, "2");
    // Another tenant, and no tenant, count from zero: neither sees acme's calls.
    assert_eq!(call_number(&chain, &of(Some("globex"))).await, "1");
    assert_eq!(call_number(&chain, &of(None)).await, "1");
    assert_eq!(call_number(&chain, &of(Some("acme"))).await, "3");
}
