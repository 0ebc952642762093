//! TLS on listeners and to upstreams: `wss://` through the real `sluice` binary with
//! certificates from CAs made at test time (rcgen), SNI, client certificates, rotation on
//! reload, upstream verification with failover, and the bad input a TLS port meets.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

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
    let (backend, gateway) = start_echo_gateway(|c| configure(c.listener_toml(&table))).await;
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

/// One plain HTTP/1.1 request over `stream` with `Connection: close`; the whole answer.
async fn http_get<S>(mut stream: S, path: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = within(STEP, "the response", stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
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
    let answer = http_get(tls, "/internal").await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    let tls = tls_connect(gateway.addr(), "localhost", ca.client())
        .await
        .expect("TLS handshake");
    let answer = http_get(tls, "/page").await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
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
async fn client_certificates_are_required_verified_and_named_in_the_log() {
    let dir = TempDir::new();
    let clients = TestCa::new("Client CA");
    let ca_path = dir.write("clients.pem", &clients.pem);
    let extra = format!("client_auth = \"required\"\nclient_ca = [{ca_path:?}]");
    let (ca, backend, gateway) = tls_gateway(&dir, &extra, |c| c).await;

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

fn served_der(
    tls: &tokio_rustls::client::TlsStream<TcpStream>,
) -> rustls::pki_types::CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().expect("certificates")[0]
        .clone()
        .into_owned()
}
