//! `jwt-auth` with keys from an identity provider's JWKS: the gateway fetches it in the
//! background from a URL granted in config (a real HTTP server here, whose keys rotate
//! mid-test), honours its cache headers, fetches early on an unknown `kid`, keeps the
//! last good keys when the server is down or serves something bad, and refuses to load
//! a plugin that asks for a URL it was not granted; or finds the key set through an
//! OpenID provider's discovery document.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use sluice_jwt::mint;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite;

const EC_PRIVATE: &str = include_str!("../plugins/jwt/testdata/ec_private.pem");
const EC_PUBLIC: &str = include_str!("../plugins/jwt/testdata/ec_public.pem");
const EC2_PRIVATE: &str = include_str!("../plugins/jwt/testdata/ec2_private.pem");
const EC2_PUBLIC: &str = include_str!("../plugins/jwt/testdata/ec2_public.pem");
const RSA_PRIVATE: &str = include_str!("../plugins/jwt/testdata/rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("../plugins/jwt/testdata/rsa_public.pem");

/// What the identity provider serves now.
#[derive(Clone)]
struct Served {
    status: u16,
    content_type: &'static str,
    cache_control: &'static str,
    body: Vec<u8>,
}

/// A JWKS server on a fixed loopback port: it can go down and come back.
struct Provider {
    addr: SocketAddr,
    served: Arc<Mutex<Served>>,
    /// One entry per request answered: the body it got.
    log: Arc<Mutex<Vec<Vec<u8>>>>,
    task: Option<JoinHandle<()>>,
}

impl Provider {
    async fn start(body: Vec<u8>) -> Provider {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut provider = Provider {
            addr: listener.local_addr().unwrap(),
            served: Arc::new(Mutex::new(Served {
                status: 200,
                content_type: "application/json",
                cache_control: "max-age=1",
                body,
            })),
            log: Arc::default(),
            task: None,
        };
        provider.serve(listener);
        provider
    }

    fn url(&self) -> String {
        self.at("/.well-known/jwks.json")
    }

    /// A URL of this server (it serves the same body at every path).
    fn at(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn serve(&mut self, listener: TcpListener) {
        let (served, log) = (self.served.clone(), self.log.clone());
        self.task = Some(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (served, log) = (served.clone(), log.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let now = served.lock().unwrap().clone();
                        log.lock().unwrap().push(now.body.clone());
                        async move {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(now.status)
                                    .header("content-type", now.content_type)
                                    .header("cache-control", now.cache_control)
                                    .body(Full::new(Bytes::from(now.body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }));
    }

    fn set(&self, change: impl FnOnce(&mut Served)) {
        change(&mut self.served.lock().unwrap());
    }

    fn fetches(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Waits until the gateway has fetched `body` `times` times since `from` fetches.
    async fn wait_served(&self, from: usize, body: &[u8], times: usize) {
        eventually(
            Duration::from_secs(15),
            "the gateway to fetch the JWKS",
            || {
                let log = self.log.lock().unwrap();
                (log[from.min(log.len())..]
                    .iter()
                    .filter(|b| *b == body)
                    .count()
                    >= times)
                    .then_some(())
            },
        )
        .await;
    }

    /// Stops listening: connections are refused.
    async fn down(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

fn jwks(keys: &[(&str, &str)]) -> Vec<u8> {
    mint::jwks(keys).unwrap().to_string().into_bytes()
}

/// An ES256 token for the P-256 key `private_pem`, naming it `kid`.
fn token(private_pem: &str, kid: &str) -> String {
    mint::es256_kid(&claims(kid), private_pem, kid).unwrap()
}

/// An RS256 token for the RSA key `private_pem`, naming it `kid`.
fn rsa_token(private_pem: &str, kid: &str) -> String {
    mint::rs256_kid(&claims(kid), private_pem, kid).unwrap()
}

fn claims(sub: &str) -> serde_json::Value {
    json!({"sub": sub, "exp": 4_000_000_000u64})
}

/// A gateway whose route runs `jwt-auth` on `provider`'s JWKS.
async fn gateway(provider: &Provider, grant: &str, refresh: &str) -> (Backend, Gateway) {
    let backend = Backend::start("a").await;
    let gateway = ConfigBuilder::new(&[backend.addr])
        .route_toml("plugins = [\"auth\"]")
        .extra(&jwt_auth(&provider.url(), grant, refresh))
        .start()
        .await;
    (backend, gateway)
}

fn jwt_auth(url: &str, grant: &str, refresh: &str) -> String {
    format!(
        r#"{ADMIN}
[plugins.auth]
path = {path:?}
grants = {{ http = [{grant:?}] }}

[plugins.auth.config]
jwks = {{ url = {url:?}, {refresh} }}
"#,
        path = plugin_wasm("jwt-auth"),
    )
}

/// The status of an upgrade carrying `token`: 101 when admitted.
async fn upgrade_status(gw: &Gateway, token: &str) -> u16 {
    let auth = format!("Bearer {token}");
    let attempt = within(
        STEP,
        "an upgrade",
        try_ws_connect(gw.addr(), "/", &[("authorization", &auth)]),
    )
    .await;
    match attempt {
        Ok(ws) => {
            close_ws(ws).await;
            101
        }
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

/// Waits until the gateway has taken its `n`th differing copy of the JWKS (the first is
/// the one fetched at load): the next request reads it.
async fn wait_copies(gw: &Gateway, n: f64) {
    wait_metric(
        gw.admin().await,
        "sluice_plugin_document_fetches_total",
        &[("plugin", "auth"), ("outcome", "changed")],
        n,
    )
    .await;
}

/// What `/status` says of the plugin's one watched document.
async fn document_status(gw: &Gateway) -> serde_json::Value {
    let status = admin_json(gw.admin().await, "/status").await;
    let auth = status["plugins"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "auth"))
        .expect("plugin auth in /status")
        .clone();
    auth["documents"][0].clone()
}

async fn failed_fetches(gw: &Gateway) -> f64 {
    Metrics::scrape(gw.admin().await).await.value(
        "sluice_plugin_document_fetches_total",
        &[("plugin", "auth"), ("outcome", "failed")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_keys_are_picked_up_without_a_reload() {
    let mut idp = Provider::start(jwks(&[(EC_PUBLIC, "a")])).await;
    let url = idp.url();
    // An hour at most: only the server's `max-age` (1 s) or an unknown `kid` fetches sooner.
    let (_backend, gw) = gateway(&idp, &url, "min_refresh_secs = 1, max_refresh_secs = 3600").await;
    let (a, b, c) = (
        token(EC_PRIVATE, "a"),
        token(EC2_PRIVATE, "b"),
        rsa_token(RSA_PRIVATE, "c"),
    );
    // Fetched at load, before the first request.
    assert_eq!(upgrade_status(&gw, &a).await, 101);
    assert_eq!(upgrade_status(&gw, &b).await, 401);

    // The provider rotates: a out, b in. `max-age=1` brings the new set within seconds,
    // and a's admission, cached by the plugin and reusable by the gateway, goes with it.
    idp.set(|s| s.body = jwks(&[(EC2_PUBLIC, "b")]));
    wait_copies(&gw, 2.0).await;
    assert_eq!(upgrade_status(&gw, &a).await, 401, "a removed key's token");
    assert_eq!(upgrade_status(&gw, &b).await, 101);

    // Now the server says an hour: only an unknown `kid` makes the gateway ask early.
    idp.set(|s| s.cache_control = "max-age=3600");
    let from = idp.fetches();
    idp.wait_served(from, &jwks(&[(EC2_PUBLIC, "b")]), 1).await;
    idp.set(|s| s.body = jwks(&[(EC2_PUBLIC, "b"), (RSA_PUBLIC, "c")]));
    // c's unknown kid asks for the early fetch that brings c.
    upgrade_status(&gw, &c).await;
    wait_copies(&gw, 3.0).await;
    assert_eq!(
        upgrade_status(&gw, &c).await,
        101,
        "a new RSA key named by kid"
    );

    // Unknown kids in a burst: at most one fetch per `min_refresh_secs`.
    let before = idp.fetches();
    let start = Instant::now();
    for i in 0..20 {
        let stranger = token(EC_PRIVATE, &format!("x{i}"));
        assert_eq!(upgrade_status(&gw, &stranger).await, 401);
    }
    let allowed = 2 + start.elapsed().as_secs() as usize;
    let fetched = idp.fetches() - before;
    assert!(
        fetched <= allowed,
        "{fetched} fetches for 20 unknown kids (at most {allowed})"
    );

    // The provider goes down: the gateway keeps the last good keys.
    idp.down().await;
    let failed = failed_fetches(&gw).await;
    let stranger = token(EC_PRIVATE, "after-down");
    assert_eq!(upgrade_status(&gw, &stranger).await, 401);
    wait_metric(
        gw.admin().await,
        "sluice_plugin_document_fetches_total",
        &[("plugin", "auth"), ("outcome", "failed")],
        failed + 1.0,
    )
    .await;
    gw.wait_log("the failed fetch logged", |v| {
        v["message"] == "plugin document fetch failed; keeping the last good copy"
    })
    .await;
    assert_eq!(upgrade_status(&gw, &b).await, 101);
    assert_eq!(upgrade_status(&gw, &c).await, 101);
    assert_eq!(upgrade_status(&gw, &a).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_documents_keep_the_last_good_keys() {
    let good = jwks(&[(EC_PUBLIC, "a")]);
    let idp = Provider::start(good.clone()).await;
    let url = idp.url();
    let (_backend, gw) = gateway(&idp, &url, "min_refresh_secs = 1, max_refresh_secs = 2").await;
    let (a, b) = (token(EC_PRIVATE, "a"), token(EC2_PRIVATE, "b"));
    assert_eq!(upgrade_status(&gw, &a).await, 101);

    // Each bad answer names key b; none may let b in, and a stays admitted.
    let with_b = jwks(&[(EC_PUBLIC, "a"), (EC2_PUBLIC, "b")]);
    let mut truncated = with_b.clone();
    truncated.truncate(with_b.len() / 2);
    let mut too_large = with_b.clone();
    too_large.truncate(with_b.len() - 1);
    too_large.extend_from_slice(format!(", \"pad\": \"{}\"}}", "x".repeat(300 * 1024)).as_bytes());
    let bad: [(&str, Served); 4] = [
        (
            "malformed JSON",
            Served {
                body: truncated,
                ..served()
            },
        ),
        (
            "over the size bound",
            Served {
                body: too_large,
                ..served()
            },
        ),
        (
            "served as HTML",
            Served {
                content_type: "text/html",
                body: with_b.clone(),
                ..served()
            },
        ),
        (
            "a 500",
            Served {
                status: 500,
                body: with_b.clone(),
                ..served()
            },
        ),
    ];
    for (what, answer) in bad {
        let failed = failed_fetches(&gw).await;
        let from = idp.fetches();
        let body = answer.body.clone();
        idp.set(|s| *s = answer);
        // Fetches of one URL are sequential: the second has begun only after the first
        // answer was judged.
        idp.wait_served(from, &body, 2).await;
        assert!(
            failed_fetches(&gw).await > failed,
            "{what}: counted as a failed fetch"
        );
        assert_eq!(upgrade_status(&gw, &b).await, 401, "{what}: b let in");
        assert_eq!(upgrade_status(&gw, &a).await, 101, "{what}: a refused");
        // `/status` names the document, keeps its first copy, and says why it failed.
        let doc = document_status(&gw).await;
        assert_eq!(doc["url"], url.as_str(), "{what}: {doc}");
        assert_eq!(doc["version"], 1, "{what}: {doc}");
        assert!(
            doc["failures_in_a_row"].as_u64() >= Some(1),
            "{what}: {doc}"
        );
        assert!(doc["error"].is_string(), "{what}: {doc}");
    }
    let doc = document_status(&gw).await;
    assert!(
        doc["error"].as_str().is_some_and(|e| e.contains("500")),
        "{doc}"
    );

    // JSON, but no key set: the host takes it, the plugin keeps its keys and says so.
    let not_jwks = br#"{"keys": "none"}"#.to_vec();
    let from = idp.fetches();
    idp.set(|s| {
        *s = Served {
            body: not_jwks.clone(),
            ..served()
        }
    });
    idp.wait_served(from, &not_jwks, 2).await;
    // The instance reads the new copy at its next request.
    assert_eq!(upgrade_status(&gw, &a).await, 101);
    gw.wait_log("the plugin's warning", |v| {
        v["message"] == "JWKS not usable; keeping the previous keys" && v["plugin"] == "auth"
    })
    .await;

    // A good set again is taken.
    idp.set(|s| {
        *s = Served {
            body: with_b.clone(),
            ..served()
        }
    });
    // The copies taken: the first, the JSON that was no key set, and this one.
    wait_copies(&gw, 3.0).await;
    assert_eq!(upgrade_status(&gw, &b).await, 101, "b after a good set");
    let doc = document_status(&gw).await;
    assert_eq!(
        (&doc["version"], &doc["error"], &doc["failures_in_a_row"]),
        (
            &serde_json::json!(3),
            &serde_json::Value::Null,
            &serde_json::json!(0)
        ),
        "{doc}"
    );
    assert!(doc["fetched_at_unix_ms"].as_u64() > Some(0), "{doc}");
}

/// What the provider serves when all is well (its body aside).
fn served() -> Served {
    Served {
        status: 200,
        content_type: "application/json",
        cache_control: "max-age=1",
        body: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_not_granted_is_refused_at_load() {
    let idp = Provider::start(jwks(&[(EC_PUBLIC, "a")])).await;
    let dir = TempDir::new();
    let backend = Backend::start("a").await;
    let config = ConfigBuilder::new(&[backend.addr])
        .route_toml("plugins = [\"auth\"]")
        .extra(&jwt_auth(
            &idp.url(),
            "https://idp.example/other.json",
            "min_refresh_secs = 1",
        ))
        .build();
    let path = dir.write("sluice.toml", &config);
    let out = sluice_command("check", &path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("plugin `auth`")
            && stderr.contains("is not granted")
            && stderr.contains("grants.http")
            && stderr.contains(&idp.url()),
        "{stderr}"
    );
    assert_eq!(idp.fetches(), 0, "nothing fetched from a URL not granted");
}

/// An OpenID provider named by its discovery document: the gateway fetches it at load
/// (granted), then the key set its `jwks_uri` names (granted too), and the provider's
/// `issuer` is the `iss` tokens must carry. A `jwks_uri` not granted fails the load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_is_found_by_its_discovery_document() {
    let keys = Provider::start(jwks(&[(EC_PUBLIC, "a")])).await;
    let idp = Provider::start(Vec::new()).await;
    let (issuer, discovery) = (idp.at(""), idp.at("/.well-known/openid-configuration"));
    let document = json!({"issuer": issuer, "jwks_uri": keys.url(), "id_token_signing_alg_values_supported": ["ES256"]});
    idp.set(|s| s.body = document.to_string().into_bytes());
    let config = |grants: &[String]| {
        format!(
            r#"{ADMIN}
[plugins.auth]
path = {path:?}
grants = {{ http = {grants:?} }}

[plugins.auth.config]
jwks = {{ discovery = {discovery:?} }}
"#,
            path = plugin_wasm("jwt-auth"),
        )
    };
    let backend = Backend::start("a").await;
    let gw = ConfigBuilder::new(&[backend.addr])
        .route_toml("plugins = [\"auth\"]")
        .extra(&config(&[discovery.clone(), keys.url()]))
        .start()
        .await;
    let signed = |iss: &str| {
        let claims = json!({"sub": "a", "iss": iss, "exp": 4_000_000_000u64});
        mint::es256_kid(&claims, EC_PRIVATE, "a").unwrap()
    };
    assert_eq!(upgrade_status(&gw, &signed(&issuer)).await, 101);
    assert_eq!(
        upgrade_status(&gw, &signed("https://elsewhere.example")).await,
        401
    );
    assert_eq!(
        upgrade_status(&gw, &token(EC_PRIVATE, "a")).await,
        401,
        "no `iss`"
    );

    // The discovery document granted, the key set it names not.
    let dir = TempDir::new();
    let ungranted = ConfigBuilder::new(&[backend.addr])
        .route_toml("plugins = [\"auth\"]")
        .extra(&config(std::slice::from_ref(&discovery)))
        .build();
    let out = sluice_command("check", &dir.write("sluice.toml", &ungranted))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("jwks.discovery")
            && stderr.contains("jwks_uri")
            && stderr.contains(&keys.url())
            && stderr.contains("grants.http"),
        "{stderr}"
    );
}
