//! The quickstart in a real browser: headless Chromium loads the quickstart page through
//! the real `sluice` binary, and the page's own script opens a WebSocket back through
//! Sluice, learns which echo backend it reached and sends one message round trip.
//!
//! Sluice runs on `examples/quickstart.toml` (and `quickstart-tls.toml`) itself, with its
//! listener moved to port 0 and its pool to the test's echo backends (`sluice_examples`,
//! which also serve the page). Over TLS the certificates are the TLS quickstart's own,
//! made at test time, and Chromium trusts the served key by its pin
//! (`--ignore-certificate-errors-spki-list`), computed here from the certificate's DER.
//! The TLS page runs twice: with HTTP/2 on (the default), where the WebSocket must be an
//! RFC 8441 extended CONNECT stream (the access log's `method`/`proto` and
//! `sluice_http2_websockets_total` say so), and with `[listeners.secure.http2]
//! enabled = false`, where it must be an HTTP/1.1 `GET` upgrade.
//! Chromium is driven over the DevTools protocol (`--remote-debugging-port=0`): the test
//! navigates, waits for the `load` event, then evaluates a promise that settles when the
//! page's `#status` leaves `connecting` (a `MutationObserver`, no polling), so the
//! assertion runs on what the page reported after the echo. Every step is bounded.
//!
//! Chromium is required: without it (`chromium` on `PATH`, or the path in `$CHROMIUM`)
//! these tests fail, saying so. `.ci/run` installs Debian's `chromium`.

#![forbid(unsafe_code)]

mod common;

use std::collections::VecDeque;
use std::io::BufRead;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use common::{
    ADMIN, AccessLog, Backend, ConfigBuilder, Gateway, Metrics, TempDir, admin_json, closed_port,
    eventually, plugin_wasm, within, ws_connect,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sluice_examples::tls;
use tokio_tungstenite::tungstenite::Message;

/// How long Chromium may take to start and open its DevTools endpoint (2 shared cores).
const START: Duration = Duration::from_secs(30);
/// How long one DevTools call or one page load may take.
const CALL: Duration = Duration::from_secs(30);
/// How long the page may take, after `load`, to report its echo (the page's own bound;
/// the test's is [`CALL`] on top).
const ECHO_MS: u64 = 20_000;

// ---- the quickstart's config, moved to test addresses --------------------------------

/// `examples/NAME` with `edits` applied, each `(from, to)` required to occur.
fn example_config(name: &str, edits: &[(&str, String)]) -> String {
    let path = format!("{}/../examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    for (from, to) in edits {
        assert!(text.contains(from), "{path} no longer contains {from:?}");
        text = text.replace(from, to);
    }
    text
}

/// The `servers = [...]` line for `backends`.
fn servers_line(backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!("servers = [{}]", list.join(", "))
}

/// Two quickstart echo backends (which also serve the page) on ephemeral ports.
async fn echo_backends() -> Vec<SocketAddr> {
    let mut addrs = Vec::new();
    for name in ["backend-a", "backend-b"] {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let addr = sluice_examples::bind_echo(any, name)
            .await
            .expect("bind an echo backend");
        addrs.push(addr);
    }
    addrs
}

// ---- certificates ---------------------------------------------------------------------

/// Chromium's pin for the first certificate in the PEM file `path`: base64 of the SHA-256 of
/// its SubjectPublicKeyInfo, read from the certificate itself (not from the key).
fn spki_pin(path: &std::path::Path) -> String {
    let pem = std::fs::read_to_string(path).expect("read the certificate");
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("certificate base64");
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    //   serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, ... } ... }
    let (_, certificate, _) = der_element(&der);
    let (_, mut tbs, _) = der_element(certificate);
    if tbs[0] == 0xa0 {
        tbs = der_element(tbs).2;
    }
    for _ in 0..5 {
        tbs = der_element(tbs).2;
    }
    let spki_len = tbs.len() - der_element(tbs).2.len();
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&tbs[..spki_len]))
}

/// The DER element at the start of `der`: (tag, contents, the bytes after it).
fn der_element(der: &[u8]) -> (u8, &[u8], &[u8]) {
    let (len, header) = match der[1] {
        short if short < 0x80 => (usize::from(short), 2),
        long => {
            let count = usize::from(long & 0x7f);
            let len = der[2..2 + count]
                .iter()
                .fold(0usize, |len, b| len << 8 | usize::from(*b));
            (len, 2 + count)
        }
    };
    (der[0], &der[header..header + len], &der[header + len..])
}

// ---- Chromium -------------------------------------------------------------------------

/// A headless Chromium with a fresh profile and its DevTools endpoint; the whole process
/// group is killed on drop.
struct Chromium {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    devtools: String,
    _profile: TempDir,
}

impl Chromium {
    /// Starts Chromium (with `extra` flags) on `about:blank` and waits for its DevTools
    /// endpoint.
    async fn launch(extra: &[String]) -> Chromium {
        let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".to_string());
        let profile = TempDir::new();
        let mut command = Command::new(&binary);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--no-proxy-server",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so drop can end the renderers and helpers with it.
            .process_group(0);
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start Chromium ({binary:?}): {e}. These tests need a Chromium: \
                 `apt-get install chromium` (as .ci/run does), or set CHROMIUM to its path"
            )
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        let pipe = child.stderr.take().expect("chromium stderr");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("stderr lock").push(line);
            }
        });
        let mut chromium = Chromium {
            child,
            stderr,
            devtools: String::new(),
            _profile: profile,
        };
        let (lines, child) = (&chromium.stderr, &mut chromium.child);
        chromium.devtools = eventually(START, "Chromium's `DevTools listening on`", || {
            if let Some(status) = child.try_wait().expect("poll chromium") {
                panic!(
                    "Chromium exited ({status}) before opening DevTools; stderr:\n{}",
                    lines.lock().expect("stderr lock").join("\n")
                );
            }
            lines.lock().expect("stderr lock").iter().find_map(|l| {
                l.split_once("DevTools listening on ")
                    .map(|(_, url)| url.trim().to_string())
            })
        })
        .await;
        chromium
    }

    /// Opens `url` in a new tab, waits for its `load` event and then for the page's
    /// `#status` to leave `connecting`, and returns what the page shows.
    async fn open(&self, url: &str) -> Result<Page, String> {
        let mut cdp = Cdp::connect(&self.devtools).await;
        let target = cdp
            .call("Target.createTarget", json!({"url": "about:blank"}), None)
            .await?;
        let target = target["targetId"].as_str().expect("targetId").to_string();
        let attached = cdp
            .call(
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
                None,
            )
            .await?;
        let session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        let session = Some(session.as_str());
        cdp.call("Page.enable", json!({}), session).await?;
        let navigated = cdp
            .call("Page.navigate", json!({"url": url}), session)
            .await?;
        if let Some(error) = navigated["errorText"].as_str() {
            return Err(format!("navigation to {url} failed: {error}"));
        }
        cdp.event("Page.loadEventFired", session).await;
        let report = cdp
            .call(
                "Runtime.evaluate",
                json!({
                    "expression": REPORT_JS.replace("ECHO_MS", &ECHO_MS.to_string()),
                    "awaitPromise": true,
                    "returnByValue": true,
                }),
                session,
            )
            .await?;
        if let Some(exception) = report.get("exceptionDetails") {
            return Err(format!("the page's report threw: {exception}"));
        }
        let value = &report["result"]["value"];
        let field = |name: &str| value[name].as_str().unwrap_or_default().to_string();
        Ok(Page {
            state: field("state"),
            status: field("status"),
            backend: field("backend"),
            log: field("log"),
            protocol: field("protocol"),
        })
    }

    /// Chromium's stderr so far, for failure messages.
    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").join("\n")
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The group's id is the browser's pid (`process_group(0)`).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Settles when `#status` leaves `connecting`, or after `ECHO_MS` with it still there.
const REPORT_JS: &str = r#"new Promise((resolve) => {
  const status = document.getElementById('status');
  const report = () => resolve({
    state: status.dataset.state,
    status: status.textContent,
    backend: document.querySelector('b').textContent,
    log: document.getElementById('log').textContent,
    protocol: performance.getEntriesByType('navigation')[0]?.nextHopProtocol ?? '',
  });
  if (status.dataset.state !== 'connecting') return report();
  new MutationObserver(() => { if (status.dataset.state !== 'connecting') report(); })
    .observe(status, { attributes: true });
  setTimeout(report, ECHO_MS);
})"#;

/// What the quickstart page showed.
#[derive(Debug)]
struct Page {
    /// `#status`'s `data-state`: `ok`, `failed`, or still `connecting`.
    state: String,
    /// `#status`'s text, e.g. `echo ok: hello, sluice (ws: tunnel to backend-a)`.
    status: String,
    /// The backend that served the page.
    backend: String,
    /// The page's message log.
    log: String,
    /// The protocol the page itself came over, as the browser saw it (the navigation's
    /// `nextHopProtocol`): `h2`, `http/1.1`.
    protocol: String,
}

/// A DevTools protocol connection (browser endpoint, flattened sessions): calls by id, and
/// events kept until asked for, so none is missed between calls.
struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
    events: VecDeque<Value>,
}

impl Cdp {
    async fn connect(url: &str) -> Cdp {
        let (ws, _) = within(
            CALL,
            "the DevTools WebSocket",
            tokio_tungstenite::connect_async(url),
        )
        .await
        .unwrap_or_else(|e| panic!("DevTools WebSocket {url}: {e}"));
        Cdp {
            ws,
            next_id: 1,
            events: VecDeque::new(),
        }
    }

    /// Calls `method` and returns its result, or the protocol's error as text.
    async fn call(
        &mut self,
        method: &str,
        params: Value,
        session: Option<&str>,
    ) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let text = message.to_string();
        let what = format!("DevTools {method}");
        within(CALL, &what, async {
            self.ws
                .send(Message::text(text))
                .await
                .unwrap_or_else(|e| panic!("send {method}: {e}"));
            loop {
                let message = self.next_message(method).await;
                if message["id"] == json!(id) {
                    return match message.get("error") {
                        Some(error) => Err(format!("{method}: {error}")),
                        None => Ok(message["result"].clone()),
                    };
                }
                self.events.push_back(message);
            }
        })
        .await
    }

    /// Waits for event `method` on `session` (one already received counts).
    async fn event(&mut self, method: &str, session: Option<&str>) -> Value {
        let matches = |m: &Value| m["method"] == method && m["sessionId"].as_str() == session;
        if let Some(i) = self.events.iter().position(matches) {
            return self.events.remove(i).expect("event at index");
        }
        within(CALL, &format!("DevTools event {method}"), async {
            loop {
                let message = self.next_message(method).await;
                if matches(&message) {
                    return message;
                }
                self.events.push_back(message);
            }
        })
        .await
    }

    async fn next_message(&mut self, waiting_for: &str) -> Value {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(text.as_str()).expect("DevTools JSON");
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("DevTools connection failed waiting for {waiting_for}: {e}"),
                None => panic!("DevTools connection closed waiting for {waiting_for}"),
            }
        }
    }
}

// ---- tests ----------------------------------------------------------------------------

/// The plain quickstart: `http://` page through Sluice, `ws://` echo through Sluice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_page_echoes_over_ws_in_chromium() {
    let backends = echo_backends().await;
    let config = example_config(
        "quickstart.toml",
        &[
            (
                "bind = \"127.0.0.1:8080\"",
                "bind = \"127.0.0.1:0\"".to_string(),
            ),
            (
                "bind = \"127.0.0.1:9901\"",
                "bind = \"127.0.0.1:0\"".to_string(),
            ),
            (
                "servers = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]",
                servers_line(&backends),
            ),
        ],
    );
    let gateway = Gateway::start(&config).await;
    let addr = gateway.addr();
    let chromium = Chromium::launch(&[]).await;
    let page = chromium
        .open(&format!("http://{addr}/"))
        .await
        .unwrap_or_else(|e| panic!("{e}; Chromium's stderr:\n{}", chromium.stderr()));

    assert_eq!(page.state, "ok", "the page reported no echo: {page:?}");
    assert!(
        page.status
            .starts_with("echo ok: hello, sluice (ws: tunnel to backend-"),
        "{page:?}"
    );
    assert!(
        ["backend-a", "backend-b"].contains(&page.backend.as_str()),
        "page not served by a quickstart backend: {page:?}"
    );
    assert!(
        page.log
            .starts_with(&format!("connected to ws://{addr}/echo\n")),
        "the WebSocket did not go to the gateway: {page:?}"
    );
}

/// The TLS quickstart running on test addresses: its own certificates (made for the test),
/// the test's echo backends, an admin listener for `/metrics`, and `extra` appended to the
/// config.
struct TlsQuickstart {
    gateway: Gateway,
    admin: SocketAddr,
    /// The page, `https://localhost:PORT/`.
    url: String,
    port: u16,
    /// Chromium's pin for the served certificate.
    pin: String,
    _certs: TempDir,
}

impl TlsQuickstart {
    async fn start(extra: &str) -> TlsQuickstart {
        let dir = TempDir::new();
        let certs = tls::generate_certs(dir.path()).expect("make certificates");
        let pin = spki_pin(&certs.cert);
        assert_eq!(
            pin, certs.spki_sha256,
            "the pin quickstart-tls prints is not that of the certificate it serves"
        );
        let backends = echo_backends().await;
        let quickstart_dir = tls::QUICKSTART_DIR;
        let mut config = example_config(
            "quickstart-tls.toml",
            &[
                // JSON logs, for the access log's fields.
                (
                    "level = \"info\"",
                    "level = \"info\"\nformat = \"json\"".to_string(),
                ),
                (
                    "bind = \"127.0.0.1:8443\"",
                    "bind = \"127.0.0.1:0\"".to_string(),
                ),
                (
                    "servers = [\"127.0.0.1:9011\", \"127.0.0.1:9012\"]",
                    servers_line(&backends),
                ),
                (
                    &format!("\"{quickstart_dir}/{}\"", tls::CERT_FILE),
                    format!("{:?}", certs.cert),
                ),
                (
                    &format!("\"{quickstart_dir}/{}\"", tls::KEY_FILE),
                    format!("{:?}", certs.key),
                ),
            ],
        );
        config.push_str(&format!("\n{ADMIN}\n{extra}"));
        let gateway = Gateway::start(&config).await;
        let admin = gateway.admin().await;
        let port = gateway.listener("secure").port();
        TlsQuickstart {
            gateway,
            admin,
            url: format!("https://localhost:{port}/"),
            port,
            pin,
            _certs: dir,
        }
    }

    /// Loads the page in a Chromium that trusts the served key by its pin, checks that the
    /// page's echo went over `wss://` through the gateway, then ends Chromium (so the
    /// tunnel closes) and returns what the page showed with the tunnel's access-log line.
    async fn echo_in_chromium(&self) -> (Page, AccessLog) {
        let trust = format!("--ignore-certificate-errors-spki-list={}", self.pin);
        let chromium = Chromium::launch(&[trust]).await;
        let page = chromium
            .open(&self.url)
            .await
            .unwrap_or_else(|e| panic!("{e}; Chromium's stderr:\n{}", chromium.stderr()));
        assert_eq!(page.state, "ok", "the page reported no echo: {page:?}");
        assert!(
            page.status
                .starts_with("echo ok: hello, sluice (wss: tunnel to backend-"),
            "{page:?}"
        );
        assert!(
            page.log.starts_with(&format!(
                "connected to wss://localhost:{}/echo\n",
                self.port
            )),
            "the WebSocket did not go to the gateway over TLS: {page:?}"
        );
        // A tunnel is logged when it ends: Chromium's exit closes it.
        drop(chromium);
        let tunnel = self
            .gateway
            .wait_access_log("the page's tunnel in the access log", |l| {
                l.kind == "tunnel" && l.route == "echo"
            })
            .await;
        let tunnels = self
            .gateway
            .access_logs()
            .into_iter()
            .filter(|l| l.kind == "tunnel")
            .count();
        assert_eq!(tunnels, 1, "the page opens one WebSocket");
        assert_eq!(tunnel.listener, "secure", "{tunnel:?}");
        (page, tunnel)
    }

    /// The page's own request (`/`) in the access log: its `(method, proto)`.
    async fn page_request(&self) -> (String, String) {
        let line = self
            .gateway
            .wait_log("the page's request in the access log", |l| {
                l["target"] == "sluice::access" && l["kind"] == "http" && l["path"] == "/"
            })
            .await;
        let field = |name: &str| line[name].as_str().unwrap_or_default().to_string();
        (field("method"), field("proto"))
    }

    /// `sluice_http2_connections_total` and `sluice_http2_websockets_total` of listener
    /// `secure`.
    async fn http2_counts(&self) -> (f64, f64) {
        let metrics = Metrics::scrape(self.admin).await;
        let listener = [("listener", "secure")];
        (
            metrics.value("sluice_http2_connections_total", &listener),
            metrics.value("sluice_http2_websockets_total", &listener),
        )
    }
}

/// The TLS quickstart: `https://` page through Sluice's TLS listener, `wss://` echo through
/// it, in a Chromium that trusts the served key by its pin; without the pin Chromium
/// refuses the page, so the certificate really is checked. HTTP/2 is on (the default):
/// the page comes over `h2` and the WebSocket is an RFC 8441 extended CONNECT stream on
/// that connection (Sluice sends SETTINGS_ENABLE_CONNECT_PROTOCOL), as the gateway's
/// counters and access log show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_quickstart_page_echoes_over_wss_in_chromium() {
    let quickstart = TlsQuickstart::start("").await;

    let strict = Chromium::launch(&[]).await;
    let refused = strict
        .open(&quickstart.url)
        .await
        .expect_err("an unknown CA's certificate accepted");
    assert!(refused.contains("ERR_CERT_AUTHORITY_INVALID"), "{refused}");
    drop(strict);

    let (page, tunnel) = quickstart.echo_in_chromium().await;
    assert_eq!(
        page.protocol, "h2",
        "the page did not come over HTTP/2: {page:?}"
    );
    let (method, proto) = quickstart.page_request().await;
    assert_eq!((method.as_str(), proto.as_str()), ("GET", "HTTP/2.0"));
    assert_eq!(
        (tunnel.method.as_str(), tunnel.proto.as_str()),
        ("CONNECT", "HTTP/2.0"),
        "the WebSocket was not an HTTP/2 extended CONNECT: {tunnel:?}"
    );
    let (connections, websockets) = quickstart.http2_counts().await;
    assert!(connections >= 1.0, "no HTTP/2 connection counted");
    assert_eq!(websockets, 1.0, "the WebSocket was not counted as HTTP/2");
}

/// The same page with `[listeners.secure.http2] enabled = false`: ALPN offers only
/// `http/1.1`, so the page comes over HTTP/1.1 and the WebSocket is a `GET` upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_quickstart_page_echoes_over_http1_with_http2_off_in_chromium() {
    let quickstart = TlsQuickstart::start("[listeners.secure.http2]\nenabled = false\n").await;

    let (page, tunnel) = quickstart.echo_in_chromium().await;
    assert_eq!(page.protocol, "http/1.1", "{page:?}");
    let (method, proto) = quickstart.page_request().await;
    assert_eq!((method.as_str(), proto.as_str()), ("GET", "HTTP/1.1"));
    assert_eq!(
        (tunnel.method.as_str(), tunnel.proto.as_str(), tunnel.status),
        ("GET", "HTTP/1.1", 101),
        "{tunnel:?}"
    );
    let (connections, websockets) = quickstart.http2_counts().await;
    assert_eq!((connections, websockets), (0.0, 0.0), "HTTP/2 is off");
}

// ---- the admin status page ------------------------------------------------------------

/// The DOM of `url` after its scripts ran (`--dump-dom`, with up to 5 s of virtual time),
/// from a headless Chromium of its own, bounded by [`CALL`].
async fn dump_dom(url: &str) -> String {
    let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".to_string());
    let profile = TempDir::new();
    let mut child = Command::new(&binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-dev-shm-usage",
            "--no-proxy-server",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start Chromium ({binary:?}): {e}"));
    let mut stdout = child.stdout.take().expect("chromium stdout");
    let reader = std::thread::spawn(move || {
        let mut dom = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut dom);
        dom
    });
    let status = eventually(CALL, "Chromium to dump the DOM", || {
        child.try_wait().expect("poll chromium")
    })
    .await;
    assert!(status.success(), "chromium --dump-dom: {status}");
    reader.join().expect("the DOM reader")
}

/// The opening tag of the element that carries `attr` (`name="value"`), if any.
fn tag_with<'a>(dom: &'a str, attr: &str) -> Option<&'a str> {
    let at = dom.find(attr)?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    Some(&dom[start..=end])
}

/// The admin status page, loaded in Chromium while three tunnels are open and one server
/// of the pool is down: its script has fetched `/status` and `/upstreams` and shows the
/// tunnel count and the unhealthy server; and a plugin whose key set cannot be fetched,
/// with why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_live_tunnels_and_an_unhealthy_server() {
    let backend = Backend::start("a").await;
    let dead = closed_port();
    let jwks = format!("http://{}/jwks.json", closed_port());
    let gateway = ConfigBuilder::new(&[backend.addr, dead])
        .upstream_toml("[upstreams.echo.health]\ncheck = \"tcp\"\ninterval = \"100ms\"\nfall = 1")
        .extra(&format!(
            "{ADMIN}[plugins.auth]\npath = {:?}\ngrants = {{ http = [{jwks:?}] }}\n\
             [plugins.auth.config]\njwks = {{ url = {jwks:?} }}\n",
            plugin_wasm("jwt-auth")
        ))
        .start()
        .await;
    let admin = gateway.admin().await;
    let dead = dead.to_string();
    let mut state = String::new();
    for _ in 0..500 {
        let upstreams = admin_json(admin, "/upstreams").await;
        state = upstreams["pools"][0]["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["addr"] == dead.as_str())
            .map(|s| s["state"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        if state == "unhealthy" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state, "unhealthy", "the health check never took {dead} out");
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        tunnels.push(ws_connect(gateway.addr(), "/chat").await);
    }

    let dom = dump_dom(&format!("http://{admin}/")).await;
    assert!(dom.contains("<title>Sluice status</title>"), "{dom}");
    assert!(
        dom.contains(r#"id="tunnels-open">3<"#),
        "tunnel count not shown:\n{dom}"
    );
    let server = tag_with(&dom, &format!(r#"data-addr="{dead}""#))
        .unwrap_or_else(|| panic!("no row for {dead}:\n{dom}"));
    assert!(server.contains(r#"data-state="unhealthy""#), "{server}");
    let healthy = tag_with(&dom, &format!(r#"data-addr="{}""#, backend.addr))
        .unwrap_or_else(|| panic!("no row for the live server:\n{dom}"));
    assert!(healthy.contains(r#"data-state="healthy""#), "{healthy}");
    assert!(tag_with(&dom, r#"data-route="main""#).is_some(), "{dom}");
    assert!(
        tag_with(&dom, r#"data-listener="public""#).is_some(),
        "{dom}"
    );
    let plugin = dom
        .find(r#"data-plugin="auth""#)
        .map(|at| &dom[at..at + dom[at..].find("</tr>").unwrap_or(0)])
        .unwrap_or_else(|| panic!("no row for plugin auth:\n{dom}"));
    assert!(
        plugin.contains(r#"class="documents mono bad""#)
            && plugin.contains(&format!("{jwks} v0 failing (1): connect:")),
        "{plugin}"
    );
    drop(tunnels);
}
