//! TLS on listeners and to upstreams: `wss://` through the real `sluice` binary with
//! certificates from CAs made at test time (rcgen), SNI, client certificates, rotation on
//! reload, upstream verification with failover, and the bad input a TLS port meets.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// The `[listeners.public.tls]` table serving `cert`/`key`, plus `extra` lines.
fn tls_table(certs: &[(&Path, &Path)], extra: &str) -> String {
    let list = certs
        .iter()
        .map(|(c, k)| format!("{{ cert = {:?}, key = {:?} }}", c, k))
        .collect::<Vec<_>>()
        .join(", ");
    format!("[listeners.public.tls]\ncertificates = [{list}]\n{extra}")
}

/// A CA, a `localhost` certificate from it written to `dir`, and a gateway serving it
/// in front of one echo backend; `configure` adds to the config.
async fn tls_gateway(
    dir: &TempDir,
    extra_tls: &str,
    configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> (TestCa, Backend, Gateway) {
    let ca = TestCa::new("Sluice test CA");
    let (cert, key) = ca
        .issue("localhost", &["localhost", "127.0.0.1"])
        .write(dir, "localhost");
    let table = tls_table(&[(&cert, &key)], extra_tls);
    let (backend, gateway) = start_echo_gateway(|c| configure(c).listener_toml(&table)).await;
    (ca, backend, gateway)
}

/// Sends `text` and waits for the same text back.
async fn echo<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.expect("send");
    let reply = within(STEP, "the echo", ws.next())
        .await
        .expect("a reply")
        .expect("a message");
    assert_eq!(reply, Message::text(text));
}

#[tokio::test]
async fn wss_and_https_go_through_a_tls_listener_and_upstreams_learn_https() {
    let dir = TempDir::new();
    let (ca, backend, gateway) = tls_gateway(&dir, "", |c| c).await;

    let mut ws = wss_connect(gateway.addr(), "localhost", ca.client(), "/chat").await;
    echo(&mut ws, "hello over TLS").await;
    ws.close(None).await.expect("close");
    let upgrade = backend
        .requests()
        .pop()
        .expect("the upgrade reached the backend");
    assert_eq!(upgrade.header("x-forwarded-proto"), Some("https"));
    let log = gateway
        .wait_access_log("the tunnel's access log", |l| l.kind == "tunnel")
        .await;
    assert_eq!(log.sni.as_deref(), Some("localhost"));
    assert_eq!(log.reason.as_deref(), Some("client_closed"));

    // Plain requests over TLS: one answered by Sluice, one forwarded.
    let tls = tls_connect(gateway.addr(), "localhost", ca.client())
        .await
        .expect("TLS handshake");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "ALPN http/1.1 negotiated"
    );
    let answer = exchange(tls, Head::get("/internal").set("Host", "localhost")).await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    let client = ca.client();
    let tls = tls_connect(gateway.addr(), "localhost", client.clone())
        .await
        .expect("TLS handshake");
    let answer = exchange(tls, Head::get("/page").set("Host", "localhost")).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    // The session resumes on the next connection (the tickets came with the first).
    let tls = tls_connect(gateway.addr(), "localhost", client)
        .await
        .expect("TLS handshake");
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    // TLS 1.2 clients are served too, with an AEAD suite.
    let mut tls12 =
        rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
            .with_root_certificates(ca.roots())
            .with_no_client_auth();
    tls12.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tls_connect(gateway.addr(), "localhost", Arc::new(tls12))
        .await
        .expect("TLS 1.2 handshake");
    let conn = tls.get_ref().1;
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let suite = format!(
        "{:?}",
        conn.negotiated_cipher_suite().expect("suite").suite()
    );
    assert!(
        suite.starts_with("TLS_ECDHE_") && (suite.contains("GCM") || suite.contains("CHACHA20")),
        "{suite}"
    );
    assert!(
        answer.ends_with("a"),
        "the backend's name as body: {answer}"
    );
    let plain = backend
        .requests()
        .pop()
        .expect("the request reached the backend");
    assert_eq!(plain.target, "/page");
    assert_eq!(plain.header("x-forwarded-proto"), Some("https"));
}

#[tokio::test]
async fn sni_chooses_the_certificate_and_unknown_names_get_the_default_or_a_refusal() {
    let dir = TempDir::new();
    let ca = TestCa::new("Sluice test CA");
    let default = ca
        .issue("default", &["default.test"])
        .write(&dir, "default");
    let a = ca.issue("a", &["a.test"]).write(&dir, "a");
    let wild = ca.issue("wild", &["*.b.test"]).write(&dir, "wild");
    // `names` overrides the SAN list.
    let named = ca.issue("named", &["ignored.test"]).write(&dir, "named");
    let table = format!(
        "[listeners.public.tls]\ncertificates = [\n\
         {{ cert = {:?}, key = {:?} }},\n\
         {{ cert = {:?}, key = {:?} }},\n\
         {{ cert = {:?}, key = {:?} }},\n\
         {{ cert = {:?}, key = {:?}, names = [\"Given.Test\"] }},\n]\n",
        default.0, default.1, a.0, a.1, wild.0, wild.1, named.0, named.1
    );
    let (_backend, gateway) = start_echo_gateway(|c| c.listener_toml(&table)).await;
    for (sni, served) in [
        ("a.test", "a.test"),
        ("A.Test", "a.test"),
        ("x.b.test", "*.b.test"),
        ("given.test", "ignored.test"),
        ("ignored.test", "default.test"),
        // A wildcard covers one label only.
        ("y.x.b.test", "default.test"),
        ("unknown.test", "default.test"),
    ] {
        let tls = tls_connect(gateway.addr(), sni, any_cert_client())
            .await
            .unwrap_or_else(|e| panic!("TLS handshake for {sni}: {e}"));
        assert_eq!(served_names(&tls), [served], "certificate served for {sni}");
    }
    // The right certificate verifies against the CA.
    let mut ws = wss_connect(gateway.addr(), "x.b.test", ca.client(), "/").await;
    echo(&mut ws, "wildcard").await;

    // With `unknown_name = "refuse"`, an unknown name gets no certificate at all.
    let table = tls_table(&[(&a.0, &a.1)], "unknown_name = \"refuse\"");
    let (_backend, gateway) = start_echo_gateway(|c| c.listener_toml(&table)).await;
    let refused = tls_connect(gateway.addr(), "unknown.test", any_cert_client()).await;
    assert!(refused.is_err(), "an unknown name must be refused");
    let tls = tls_connect(gateway.addr(), "a.test", ca.client()).await;
    assert!(tls.is_ok(), "a known name is served: {:?}", tls.err());
}

/// Whether a WebSocket upgrade over `tls` fails (a client certificate refused shows up
/// at the first read after the client's side of the handshake).
async fn upgrade_fails(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> bool {
    let Ok(tls) = tls_connect(addr, "localhost", config).await else {
        return true;
    };
    let url = format!("wss://localhost:{}/", addr.port());
    within(
        STEP,
        "a refused upgrade",
        tokio_tungstenite::client_async(url, tls),
    )
    .await
    .is_err()
}

#[tokio::test]
async fn client_certificates_are_required_verified_and_reach_plugins_and_the_log() {
    let dir = TempDir::new();
    let clients = TestCa::new("Client CA");
    let ca_path = dir.write("clients.pem", &clients.pem);
    let extra = format!("client_auth = \"required\"\nclient_ca = [{ca_path:?}]");
    // A plugin that reports, in upstream headers, what it was told of the connection.
    let seer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins/hostile.wasm");
    assert!(
        seer.exists(),
        "run plugins/build.sh first: {}",
        seer.display()
    );
    let plugin = format!("[plugins.seer]\npath = {seer:?}\nconfig = {{ on_request = \"allow\" }}");
    let (ca, backend, gateway) = tls_gateway(&dir, &extra, |c| {
        c.route_toml("plugins = [\"seer\"]").extra(&plugin)
    })
    .await;

    // No certificate, and one from another CA: refused, and nothing reaches the backend.
    assert!(upgrade_fails(gateway.addr(), ca.client()).await);
    let stranger = TestCa::new("Other CA").issue("stranger", &["stranger.test"]);
    assert!(upgrade_fails(gateway.addr(), ca.client_with(&stranger)).await);
    assert!(backend.requests().is_empty(), "{:?}", backend.requests());

    // The right one: served, and its subject logged.
    let alice = clients.issue("alice", &["alice.test"]);
    let tls = tls_connect(gateway.addr(), "localhost", ca.client_with(&alice))
        .await
        .expect("TLS handshake");
    let url = format!("wss://localhost:{}/", gateway.addr().port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("upgrade with a client certificate");
    echo(&mut ws, "mutual").await;
    ws.close(None).await.expect("close");
    let upgrade = backend
        .requests()
        .pop()
        .expect("the upgrade reached the backend");
    assert_eq!(upgrade.header("x-hostile-scheme"), Some("https"));
    assert_eq!(
        upgrade.header("x-hostile-tls"),
        Some("localhost;http/1.1;CN=alice;alice.test"),
        "the plugin sees SNI, ALPN and the client certificate's subject and names"
    );
    let log = gateway
        .wait_access_log("the tunnel's access log", |l| l.kind == "tunnel")
        .await;
    assert_eq!(log.tls_client.as_deref(), Some("CN=alice"));
}

#[tokio::test]
async fn optional_client_certificates_let_clients_without_one_in() {
    let dir = TempDir::new();
    let clients = TestCa::new("Client CA");
    let ca_path = dir.write("clients.pem", &clients.pem);
    let extra = format!("client_auth = \"optional\"\nclient_ca = [{ca_path:?}]");
    let (ca, _backend, gateway) = tls_gateway(&dir, &extra, |c| c).await;
    let mut ws = wss_connect(gateway.addr(), "localhost", ca.client(), "/").await;
    echo(&mut ws, "anonymous").await;
    let stranger = TestCa::new("Other CA").issue("stranger", &["stranger.test"]);
    assert!(upgrade_fails(gateway.addr(), ca.client_with(&stranger)).await);
}

#[tokio::test]
async fn a_reload_rotates_the_certificate_and_live_tunnels_keep_running() {
    let dir = TempDir::new();
    let ca = TestCa::new("Sluice test CA");
    let a = ca.issue("A", &["localhost"]);
    let b = ca.issue("B", &["localhost"]);
    let (a_cert, a_key) = a.write(&dir, "a");
    let (b_cert, b_key) = b.write(&dir, "b");
    let backend = Backend::start("a").await;
    let config = |cert: &Path, key: &Path| {
        ConfigBuilder::new(&[backend.addr]).listener_toml(&tls_table(&[(cert, key)], ""))
    };
    let gateway = config(&a_cert, &a_key).start().await;

    let tls = tls_connect(gateway.addr(), "localhost", ca.client())
        .await
        .expect("TLS handshake");
    assert_eq!(served_der(&tls), a.der);
    let url = format!("wss://localhost:{}/", gateway.addr().port());
    let (mut under_a, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("upgrade");
    echo(&mut under_a, "before").await;

    gateway.reload(&config(&b_cert, &b_key).build());
    gateway
        .wait_log("the reload", |l| l["message"] == "config reloaded")
        .await;
    echo(&mut under_a, "after the rotation").await;
    let tls = tls_connect(gateway.addr(), "localhost", ca.client())
        .await
        .expect("TLS handshake");
    assert_eq!(
        served_der(&tls),
        b.der,
        "new handshakes get the new certificate"
    );

    // A broken rotation (a key file that is gone) keeps B serving.
    std::fs::remove_file(&a_key).expect("remove");
    gateway.reload(&config(&a_cert, &a_key).build());
    let failed = gateway
        .wait_log("the failed reload", |l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("reload failed"))
        })
        .await;
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(error.contains("a-key.pem"), "{error}");
    assert!(error.contains("listeners.public.tls"), "{error}");
    let tls = tls_connect(gateway.addr(), "localhost", ca.client())
        .await
        .expect("TLS handshake");
    assert_eq!(served_der(&tls), b.der);
    echo(&mut under_a, "still").await;
}

/// With the file watch on (the default), certificate and key files replaced in place are
/// a reload of their own: new handshakes get the new certificate without a signal.
#[tokio::test]
async fn replaced_certificate_files_are_reloaded_by_the_file_watch() {
    let dir = TempDir::new();
    let ca = TestCa::new("Sluice test CA");
    let a = ca.issue("A", &["localhost"]);
    let b = ca.issue("B", &["localhost"]);
    let (cert, key) = a.write(&dir, "served");
    let backend = Backend::start("a").await;
    let gateway = ConfigBuilder::new(&[backend.addr])
        .listener_toml(&tls_table(&[(&cert, &key)], ""))
        .extra("[reload]\ndebounce = \"100ms\"\n")
        .start()
        .await;
    let served = async || {
        let tls = tls_connect(gateway.addr(), "localhost", ca.client())
            .await
            .expect("TLS handshake");
        served_der(&tls)
    };
    assert_eq!(served().await, a.der);
    // Written beside them, then renamed over them, as a deploy or an ACME client does.
    let (new_cert, new_key) = b.write(&dir, "incoming");
    std::fs::rename(&new_key, &key).expect("rename key");
    std::fs::rename(&new_cert, &cert).expect("rename certificate");
    let deadline = Instant::now() + STEP;
    while served().await != b.der {
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reload = gateway
        .wait_log("the watch's reload", |l| l["message"] == "config reloaded")
        .await;
    assert_eq!(reload["trigger"], "watch");
}

fn served_der(
    tls: &tokio_rustls::client::TlsStream<TcpStream>,
) -> rustls::pki_types::CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().expect("certificates")[0]
        .clone()
        .into_owned()
}

/// A gateway whose pool `echo` is `servers` (with schemes), with `tls` lines for the
/// pool's `[upstreams.echo.tls]` table; a plain listener.
async fn gateway_to(servers: &[String], tls: &str, extra: &str) -> Gateway {
    let list = servers
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let config = ConfigBuilder::new(&[])
        .upstream_toml(&format!("balance = \"round-robin\"\n{extra}"))
        .build()
        .replace("servers = []", &format!("servers = [{list}]"))
        .replace(
            "\n[[routes]]\nname = \"internal\"",
            &format!("[upstreams.echo.tls]\n{tls}\n\n[[routes]]\nname = \"internal\""),
        );
    Gateway::start(&config).await
}

#[tokio::test]
async fn upstream_wss_is_verified_against_the_pool_ca_and_failures_fail_over() {
    let dir = TempDir::new();
    let ca = TestCa::new("Upstream CA");
    let ca_path = dir.write("upstream-ca.pem", &ca.pem);
    let good = Backend::start_tls("good", ca.issue("good", &["localhost"]).server()).await;
    let stranger = TestCa::new("Stranger CA");
    let untrusted =
        Backend::start_tls("untrusted", stranger.issue("x", &["localhost"]).server()).await;
    let expired =
        Backend::start_tls("expired", ca.issue_expired("old", &["localhost"]).server()).await;
    let wrong_name = Backend::start_tls("wrong", ca.issue("other", &["other.test"]).server()).await;
    let wss = |b: &Backend| format!("wss://localhost:{}", b.addr.port());

    // Only the good server verifies; the others fail the connect and the next is tried,
    // so every upgrade and request lands on `good`.
    let servers = [wss(&untrusted), wss(&expired), wss(&wrong_name), wss(&good)];
    let gateway = gateway_to(&servers, &format!("ca = {ca_path:?}"), "max_fails = 0").await;
    for round in 0..4 {
        let mut ws = ws_connect(gateway.addr(), "/chat").await;
        ws.send(Message::text("whoami")).await.expect("send");
        let reply = within(STEP, "the reply", ws.next()).await;
        assert_eq!(
            reply.expect("a reply").expect("a message"),
            Message::text("good"),
            "round {round}"
        );
        let mut raw = TcpStream::connect(gateway.addr()).await.expect("connect");
        let answer = exchange(&mut raw, Head::get("/page").set("Host", "localhost")).await;
        assert!(answer.ends_with("good"), "round {round}: {answer}");
    }
    let upgrade = good.requests()[0].clone();
    assert_eq!(upgrade.header("x-forwarded-proto"), Some("http"));
    for (server, why) in [
        (&untrusted, "UnknownIssuer"),
        (&expired, "certificate expired"),
        (&wrong_name, "certificate not valid for name"),
    ] {
        let authority = format!("localhost:{}", server.addr.port());
        let line = gateway
            .wait_log("a connect failure naming the server", |l| {
                l["message"] == "upstream connect failed" && l["server"] == authority.as_str()
            })
            .await;
        let error = line["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{authority}: {error}");
        assert!(server.requests().is_empty(), "nothing reached {authority}");
    }

    // With no server that verifies: 502.
    let gateway = gateway_to(&[wss(&untrusted)], &format!("ca = {ca_path:?}"), "").await;
    let mut raw = TcpStream::connect(gateway.addr()).await.expect("connect");
    let answer = exchange(&mut raw, Head::get("/page").set("Host", "localhost")).await;
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
    let (status, _) = raw_upgrade_status(gateway.addr()).await;
    assert_eq!(status, 502);
}

/// The status of a WebSocket upgrade sent by hand to `addr`, and the raw answer.
async fn raw_upgrade_status(addr: SocketAddr) -> (u16, String) {
    let mut raw = TcpStream::connect(addr).await.expect("connect");
    raw.write_all(
        b"GET /chat HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write");
    let mut buf = vec![0; 4096];
    let n = within(STEP, "the answer", raw.read(&mut buf))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn server_name_and_client_certificates_reach_tls_upstreams_and_health_checks_use_tls() {
    let dir = TempDir::new();
    let ca = TestCa::new("Upstream CA");
    let ca_path = dir.write("upstream-ca.pem", &ca.pem);
    // The backend asks for a client certificate from `clients`.
    let clients = TestCa::new("Gateway client CA");
    let leaf = ca.issue("backend", &["backend.internal"]);
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(clients.roots()))
        .build()
        .expect("verifier");
    let mut server = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(leaf.chain(), leaf.key())
        .expect("server config");
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let backend = Backend::start_tls("mtls", Arc::new(server)).await;
    let (cert, key) = clients
        .issue("sluice", &["sluice.test"])
        .write(&dir, "client");
    let tls = format!(
        "ca = {ca_path:?}\nserver_name = \"backend.internal\"\n\
         client_cert = {cert:?}\nclient_key = {key:?}"
    );
    // Written as `127.0.0.1:PORT`: the pool's `tls` table makes it a TLS server.
    let gateway = gateway_to(
        &[backend.addr.to_string()],
        &tls,
        "[upstreams.echo.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"",
    )
    .await;
    let mut ws = ws_connect(gateway.addr(), "/").await;
    echo(&mut ws, "through mutual TLS upstream").await;
    // Probes arrive over TLS (the backend speaks nothing else).
    eventually(STEP, "TLS health probes", || {
        (backend.health_probes() >= 2).then_some(())
    })
    .await;

    // A health check against a server whose certificate does not verify marks it down.
    let stranger = TestCa::new("Stranger CA");
    let untrusted =
        Backend::start_tls("untrusted", stranger.issue("x", &["localhost"]).server()).await;
    let gateway = gateway_to(
        &[format!("https://localhost:{}", untrusted.addr.port())],
        &format!("ca = {ca_path:?}"),
        "[upstreams.echo.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"\nfall = 1",
    )
    .await;
    let down = gateway
        .wait_log("the server marked unhealthy", |l| {
            l["message"] == "server marked unhealthy"
        })
        .await;
    assert!(
        down["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("UnknownIssuer"),
        "{down}"
    );
    assert_eq!(untrusted.health_probes(), 0);
}

/// The start of a real TLS ClientHello (rustls's, for `localhost`).
async fn client_hello() -> Vec<u8> {
    let (mine, mut theirs) = tokio::io::duplex(1 << 16);
    let connect = tokio::spawn(async move {
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let _ = tokio_rustls::TlsConnector::from(any_cert_client())
            .connect(name, mine)
            .await;
    });
    let mut buf = vec![0; 4096];
    let n = within(STEP, "a ClientHello", theirs.read(&mut buf))
        .await
        .expect("read");
    connect.abort();
    buf.truncate(n);
    buf
}

/// Reads until the gateway closes `stream`, within `limit`; what it sent first.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration, what: &str) -> Vec<u8> {
    let mut all = Vec::new();
    within(limit, what, async {
        let mut buf = [0; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    all
}

#[tokio::test]
async fn wrong_protocols_on_either_port_are_answered_and_closed() {
    let dir = TempDir::new();
    let (ca, _backend, tls_gw) = tls_gateway(&dir, "handshake_timeout = \"2s\"", |c| c).await;
    // Plain HTTP on a TLS port: a TLS alert (or nothing), then the close.
    let mut raw = TcpStream::connect(tls_gw.addr()).await.expect("connect");
    raw.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let answer = read_until_closed(&mut raw, STEP, "the TLS port to close").await;
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "a TLS alert record or nothing: {answer:?}"
    );

    // A ClientHello on a plain port: a 400 from the HTTP parser, then the close.
    let (_backend, plain_gw) = start_echo_gateway(|c| c).await;
    let mut raw = TcpStream::connect(plain_gw.addr()).await.expect("connect");
    raw.write_all(&client_hello().await).await.expect("write");
    let answer = read_until_closed(&mut raw, STEP, "the plain port to close").await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");

    // A truncated ClientHello, then silence: closed at the handshake deadline.
    let hello = client_hello().await;
    let mut raw = TcpStream::connect(tls_gw.addr()).await.expect("connect");
    raw.write_all(&hello[..hello.len() / 2])
        .await
        .expect("write");
    let answer = read_until_closed(&mut raw, STEP, "a stalled handshake to be closed").await;
    assert!(answer.is_empty(), "{answer:?}");

    // The gateway still serves.
    let mut ws = wss_connect(tls_gw.addr(), "localhost", ca.client(), "/").await;
    echo(&mut ws, "still here").await;
}

#[tokio::test]
async fn silent_clients_are_closed_at_the_handshake_deadline_while_others_are_served() {
    let dir = TempDir::new();
    let (ca, _backend, gateway) = tls_gateway(&dir, "handshake_timeout = \"1s\"", |c| c).await;
    // 200 clients that connect and send nothing (the kernel hands them over after its
    // deferred-accept second), and 200 that send half a ClientHello.
    let hello = client_hello().await;
    let mut silent = Vec::new();
    for i in 0..400 {
        let mut s = TcpStream::connect(gateway.addr()).await.expect("connect");
        if i % 2 == 1 {
            s.write_all(&hello[..hello.len() / 2]).await.expect("write");
        }
        silent.push(s);
    }
    // A normal client is served meanwhile.
    let mut ws = wss_connect(gateway.addr(), "localhost", ca.client(), "/").await;
    echo(&mut ws, "not held back").await;
    // Every silent one is closed: within the deferred accept (up to a few SYN-ACK
    // retransmits) plus the 1 s deadline, with room for a loaded machine.
    let mut closed = tokio::task::JoinSet::new();
    for mut s in silent {
        closed.spawn(async move {
            let mut buf = [0; 64];
            matches!(s.read(&mut buf).await, Ok(0) | Err(_))
        });
    }
    within(
        Duration::from_secs(30),
        "all 400 silent clients closed",
        async {
            while let Some(done) = closed.join_next().await {
                assert!(done.expect("join"), "a silent client got bytes");
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_handshake_in_progress_holds_a_connection_slot() {
    let dir = TempDir::new();
    let (ca, _backend, gateway) = tls_gateway(&dir, "handshake_timeout = \"2s\"", |c| {
        c.listener_toml("max_connections = 1").extra(ADMIN)
    })
    .await;
    let admin = gateway.admin().await;
    // A stalled handshake takes the one slot for its 2 s deadline ...
    let hello = client_hello().await;
    let started = Instant::now();
    let mut stalled = TcpStream::connect(gateway.addr()).await.expect("connect");
    stalled
        .write_all(&hello[..hello.len() / 2])
        .await
        .expect("write");
    // (it holds the slot once accepted: wait for that, or the real client, landing on the
    // other worker, could take the slot first)
    let public = [("listener", "public")];
    wait_metric(admin, "sluice_connections_open", &public, 1.0).await;
    // ... so a real client's handshake cannot complete before that deadline has passed
    // (its clock starts after `started`; a slow machine only makes the wait longer).
    let tls = within(
        STEP,
        "the real client",
        tls_connect(gateway.addr(), "localhost", ca.client()),
    )
    .await;
    assert!(
        tls.is_ok(),
        "the real client is served once the slot is free"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900),
        "served after {waited:?}, while the stalled handshake held the only slot"
    );
    let rest = read_until_closed(&mut stalled, STEP, "the stalled handshake to be closed").await;
    assert!(rest.is_empty());
}

#[tokio::test]
async fn sluice_check_names_a_mismatched_key_and_its_listener() {
    let dir = TempDir::new();
    let ca = TestCa::new("Sluice test CA");
    let (cert, _key) = ca.issue("a", &["a.test"]).write(&dir, "a");
    let (_, other_key) = ca.issue("b", &["b.test"]).write(&dir, "b");
    let config = ConfigBuilder::new(&["127.0.0.1:9".parse().expect("addr")])
        .listener_toml(&tls_table(&[(&cert, &other_key)], ""))
        .build();
    let path = dir.write("check.toml", &config);
    let out = sluice_command("check", &path)
        .output()
        .expect("run sluice check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("listeners.public.tls.certificates[0].key")
            && stderr.contains("b-key.pem: this key does not fit the certificate in"),
        "{stderr}"
    );
    let path = dir.write("ok.toml", &config.replace("b-key.pem", "a-key.pem"));
    let out = sluice_command("check", &path)
        .output()
        .expect("run sluice check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_certificate_close_to_expiry_is_logged_at_load() {
    let dir = TempDir::new();
    let ca = TestCa::new("Sluice test CA");
    let (soon, soon_key) = ca
        .issue_for_days("soon", &["soon.test"], 3)
        .write(&dir, "soon");
    let (later, later_key) = ca
        .issue_for_days("later", &["later.test"], 60)
        .write(&dir, "later");
    let table = tls_table(&[(&later, &later_key), (&soon, &soon_key)], "");
    let (_backend, mut gateway) = start_echo_gateway(|c| c.listener_toml(&table)).await;
    let warning = gateway
        .wait_log("the expiry warning", |l| {
            l["message"] == "TLS certificate expires soon"
        })
        .await;
    assert_eq!(warning["listener"], "public");
    assert_eq!(warning["names"], "soon.test");
    assert!(
        warning["days_left"].as_u64().is_some_and(|d| d <= 3),
        "{warning}"
    );
    // Only the one close to expiry: everything logged is there once the process is gone.
    gateway.terminate().await;
    let warnings = gateway
        .json_logs()
        .into_iter()
        .filter(|l| l["message"] == "TLS certificate expires soon")
        .count();
    assert_eq!(warnings, 1);
}
