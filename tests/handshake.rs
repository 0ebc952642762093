//! Handshakes: what the gateway forwards from a client's upgrade request, which client
//! requests it refuses, and which upstream answers open a tunnel. Whenever no tunnel opens,
//! the client connection must stay plain HTTP: a request "smuggled" after the answer on the
//! same connection is routed by the gateway (to the fixed 403 route) and never reaches the
//! backend.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_forwards_end_to_end_headers_and_strips_hop_by_hop_ones() {
    forwards_end_to_end_headers_only(false).await;
}

/// The same upgrade after a plain request on the connection: hyper reads it, and its
/// fields go upstream through a header map instead of the first head's raw fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_after_a_plain_request_forwards_the_same_headers() {
    forwards_end_to_end_headers_only(true).await;
}

async fn forwards_end_to_end_headers_only(after_plain: bool) {
    let (backend, gateway) = start_echo_gateway(|c| c).await;
    let head = with_hop_by_hop(Head::websocket("/chat/room?x=1"), "keep-alive, Upgrade")
        .set("Host", "chat.example:8443")
        .header("Origin", "https://app.example")
        .header("Sec-WebSocket-Protocol", "chat, superchat")
        .header(
            "Sec-WebSocket-Extensions",
            "permessage-deflate; client_max_window_bits",
        )
        .header("X-Forwarded-For", "1.2.3.4")
        .header("X-End-To-End", "kept")
        .header("X-Repeated", "one")
        .header("x-repeated", "two");
    let mut client = client_for(&gateway, after_plain).await;
    let answer = client.request(&head).await;

    assert_eq!(answer.status, 101, "{answer:?}");
    assert_eq!(
        answer.header("sec-websocket-accept"),
        Some(head.expected_accept().as_str())
    );
    assert!(
        answer
            .header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket")),
        "{answer:?}"
    );
    assert_eq!(
        answer.header("sec-websocket-protocol"),
        Some("chat"),
        "chosen subprotocol relayed"
    );
    let mut ws = client.into_websocket().await;
    assert_eq!(
        whoami(&mut ws).await,
        "a",
        "the tunnel works after the relayed 101"
    );

    let requests = backend.requests();
    assert_eq!(requests.len(), 1 + usize::from(after_plain), "{requests:?}");
    let seen = requests.last().unwrap();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.target, "/chat/room?x=1");
    assert_eq!(seen.values("x-repeated"), ["one", "two"], "{seen:?}");
    assert_eq!(seen.values("host"), ["chat.example:8443"], "Host preserved");
    assert_eq!(seen.header("origin"), Some("https://app.example"));
    assert_eq!(
        seen.header("sec-websocket-protocol"),
        Some("chat, superchat")
    );
    assert_eq!(
        seen.header("sec-websocket-extensions"),
        Some("permessage-deflate; client_max_window_bits")
    );
    assert_eq!(seen.header("sec-websocket-version"), Some("13"));
    assert_eq!(
        seen.header("sec-websocket-key").map(str::len),
        Some(24),
        "{seen:?}"
    );
    assert_eq!(seen.header("x-end-to-end"), Some("kept"));
    let connection: Vec<String> = seen
        .values("connection")
        .iter()
        .map(|v| v.to_ascii_lowercase())
        .collect();
    assert_eq!(
        connection,
        ["upgrade"],
        "only `Connection: Upgrade` goes upstream"
    );
    let upgrade: Vec<String> = seen
        .values("upgrade")
        .iter()
        .map(|v| v.to_ascii_lowercase())
        .collect();
    assert_eq!(upgrade, ["websocket"]);
    assert_forwarded_cleanly(seen, "1.2.3.4, 127.0.0.1", "chat.example:8443");
    close_ws(ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_preserve_host_the_server_address_is_sent_as_host() {
    for after_plain in [false, true] {
        let (backend, gateway) =
            start_echo_gateway(|c| c.route_toml("preserve_host = false")).await;
        let head = Head::websocket("/").set("Host", "chat.example");
        let seen = upgrade_seen_upstream(&backend, &gateway, &head, after_plain).await;
        assert_eq!(
            seen.values("host"),
            [backend.addr.to_string()],
            "{after_plain}"
        );
        assert_eq!(
            seen.values("x-forwarded-host"),
            ["chat.example"],
            "{after_plain}"
        );
    }
}

/// A `Host` the client lists in `Connection` is hop-by-hop: it does not go upstream, and
/// the server's address is sent instead (never an empty `Host`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_listed_in_connection_is_replaced_by_the_servers_address() {
    for after_plain in [false, true] {
        let (backend, gateway) = start_echo_gateway(|c| c).await;
        let head = Head::websocket("/")
            .set("Host", "chat.example")
            .set("Connection", "Upgrade, Host");
        let seen = upgrade_seen_upstream(&backend, &gateway, &head, after_plain).await;
        assert_eq!(
            seen.values("host"),
            [backend.addr.to_string()],
            "{after_plain}"
        );
        assert!(seen.values("x-forwarded-host").is_empty(), "{seen:?}");
    }
}

/// A connection to `gateway` whose next request is its first head (read by the client
/// stage), or, when `after_plain`, follows a plain request (read by hyper).
async fn client_for(gateway: &Gateway, after_plain: bool) -> RawClient {
    let mut client = RawClient::connect(gateway.addr()).await;
    if after_plain {
        assert_eq!(client.request(&Head::get("/plain")).await.status, 200);
    }
    client
}

/// Upgrades with `head` on a connection from [`client_for`], asserts the `101`, and
/// returns the request the backend saw last (the upgrade).
async fn upgrade_seen_upstream(
    backend: &Backend,
    gateway: &Gateway,
    head: &Head,
    after_plain: bool,
) -> RecordedRequest {
    let mut client = client_for(gateway, after_plain).await;
    assert_eq!(client.request(head).await.status, 101);
    backend
        .requests()
        .pop()
        .expect("the backend saw the upgrade")
}

/// Sends `head` to a gateway in front of an echo backend, asserts the answer's status,
/// and that the backend never received the request. Returns the answer.
///
/// The gateway must be done with the refused request before it serves the next one: a
/// plain request on the same connection (or, when the refusal closed it, once the close
/// has arrived, on a new one). That request reaching the backend is the moment after
/// which the refused one can no longer show up there.
async fn assert_refused(head: Head, status: u16) -> Response {
    let (backend, gateway) = start_echo_gateway(|c| c).await;
    let mut client = RawClient::connect(gateway.addr()).await;
    let client_addr = client.local_addr().to_string();
    let answer = client.request(&head).await;
    assert_eq!(answer.status, status, "answer to {head:?}: {answer:?}");
    let line = gateway
        .wait_access_log("the refusal's access log", |l| l.client == client_addr)
        .await;
    assert_eq!(
        (line.status, line.upstream.as_str()),
        (status, ""),
        "the refusal's access log names a server: {line:?}"
    );

    let closes = answer
        .header("connection")
        .is_some_and(|c| c.eq_ignore_ascii_case("close"));
    if closes {
        match client.read_some(STEP).await {
            Some(Ok(bytes)) if bytes.is_empty() => {}
            Some(Err(_)) => {}
            other => panic!("no close after `Connection: close`: {other:?}"),
        }
        client = RawClient::connect(gateway.addr()).await;
    }
    let next = client.request(&Head::get("/next")).await;
    assert_eq!(
        (next.status, next.text()),
        (200, "a".to_string()),
        "{next:?}"
    );
    let targets: Vec<String> = backend.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/next"], "the backend saw the refused request");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_without_a_key_is_400() {
    assert_refused(Head::websocket("/").without("Sec-WebSocket-Key"), 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_a_malformed_key_is_400() {
    for key in [
        "not base64 at all!",
        "AAAAAAAAAAAAAAAAAAAA",         // 15 bytes
        "AAAAAAAAAAAAAAAAAAAAAAAAAA==", // 19 bytes
        "",
    ] {
        assert_refused(Head::websocket("/").set("Sec-WebSocket-Key", key), 400).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_the_wrong_version_is_426_naming_version_13() {
    let answer = assert_refused(Head::websocket("/").set("Sec-WebSocket-Version", "8"), 426).await;
    assert_eq!(
        answer.header("sec-websocket-version"),
        Some("13"),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_with_upgrade_websocket_is_400_and_never_tunneled() {
    let head = Head::websocket("/")
        .method("POST")
        .header("Content-Length", "0");
    assert_refused(head, 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_is_served_as_a_plain_request() {
    let (backend, gateway) = start_echo_gateway(|c| c).await;
    let mut client = RawClient::connect(gateway.addr()).await;
    let head = Head::get("/plain")
        .header("Upgrade", "h2c")
        .header("Connection", "Upgrade, HTTP2-Settings")
        .header("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA");
    let answer = client.request(&head).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.text(), "a");
    // No tunnel: the same connection carries another ordinary request.
    let again = client.request(&Head::get("/again")).await;
    assert_eq!((again.status, again.text()), (200, "a".to_string()));

    let seen = &backend.requests()[0];
    assert_eq!(seen.target, "/plain");
    assert!(
        seen.values("upgrade").is_empty(),
        "Upgrade forwarded: {seen:?}"
    );
    assert!(seen.values("http2-settings").is_empty(), "{seen:?}");
    assert!(
        seen.values("connection")
            .iter()
            .all(|v| !v.to_ascii_lowercase().contains("upgrade")),
        "{seen:?}"
    );
    assert_eq!(backend.upgrades(), 0);
}

/// A gateway whose only server answers every request head with `reply`, and a valid
/// upgrade sent to it; asserts the client gets `status`, then smuggles `GET /internal` on
/// the same connection: the gateway must answer it (403) and the backend must never see it.
async fn assert_answer_keeps_connection_http(reply: &str, status: u16) -> Response {
    let backend = ScriptedBackend::start(Script::Reply(reply.to_string())).await;
    let gateway = ConfigBuilder::new(&[backend.addr]).start().await;
    let mut client = RawClient::connect(gateway.addr()).await;
    let answer = client.request(&Head::websocket("/chat")).await;
    assert_eq!(answer.status, status, "{answer:?}");

    let smuggled = client.request(&Head::get("/internal/admin")).await;
    assert_eq!(smuggled.status, 403, "smuggled request: {smuggled:?}");
    assert_eq!(smuggled.text(), "forbidden");
    // The gateway reads the next request on this connection only once it is done with the
    // smuggled one, so by the time that request reaches the backend, anything sent on
    // the smuggled one's behalf has too. (Its answer depends on the script; not read.)
    client.send(Head::get("/after").to_bytes()).await;
    let seen = eventually(STEP, "the next request at the backend", || {
        let seen = backend.received_text();
        seen.contains("GET /after HTTP/1.1").then_some(seen)
    })
    .await;
    assert!(
        !seen.contains("/internal"),
        "the backend received the smuggled request:\n{seen}"
    );
    assert_eq!(seen.matches("GET /chat HTTP/1.1").count(), 1, "{seen}");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_200_is_relayed_and_no_tunnel_opens() {
    let answer = assert_answer_keeps_connection_http(
        "HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX-Backend: scripted\r\n\r\nnot a socket",
        200,
    )
    .await;
    assert_eq!(answer.text(), "not a socket");
    assert_eq!(answer.header("x-backend"), Some("scripted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_426_is_relayed_and_no_tunnel_opens() {
    let answer = assert_answer_keeps_connection_http(
        "HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n",
        426,
    )
    .await;
    assert_eq!(answer.header("sec-websocket-version"), Some("13"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_302_is_relayed_and_no_tunnel_opens() {
    let answer = assert_answer_keeps_connection_http(
        "HTTP/1.1 302 Found\r\nLocation: /login\r\nContent-Length: 0\r\n\r\n",
        302,
    )
    .await;
    assert_eq!(answer.header("location"), Some("/login"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_chunked_refusal_is_relayed_whole_and_no_tunnel_opens() {
    let answer = assert_answer_keeps_connection_http(
        "HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\nX-Reason: origin\r\n\r\n\
         7\r\nnot you\r\n5;ext=1\r\n, sir\r\n0\r\nX-Trailer: t\r\n\r\n",
        403,
    )
    .await;
    assert_eq!(answer.text(), "not you, sir");
    assert_eq!(answer.header("x-reason"), Some("origin"));
    assert_eq!(
        answer.header("transfer-encoding"),
        None,
        "re-framed: {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refusal_ending_at_close_is_relayed() {
    let backend = ScriptedBackend::start(Script::ReplyAndClose(
        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\n\r\nlog in first".into(),
    ))
    .await;
    let gateway = ConfigBuilder::new(&[backend.addr]).start().await;
    let mut client = RawClient::connect(gateway.addr()).await;
    let answer = client.request(&Head::websocket("/chat")).await;
    assert_eq!(answer.status, 401, "{answer:?}");
    assert_eq!(answer.text(), "log in first");
    assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_interim_100_is_skipped_before_the_101() {
    let backend = ScriptedBackend::start(Script::Reply(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            .into(),
    ))
    .await;
    let gateway = ConfigBuilder::new(&[backend.addr]).start().await;
    let mut client = RawClient::connect(gateway.addr()).await;
    let answer = client.request(&Head::websocket("/chat")).await;
    assert_eq!(answer.status, 101, "{answer:?}");
}

/// The server's `101` reaches the client with its end-to-end fields as sent, none of its
/// hop-by-hop ones (nor a `Content-Length`), exactly one `Upgrade`/`Connection` pair and a
/// `Date`: on the client stage's own path, and on hyper's (an upgrade that follows
/// another request on the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_101_fields_reach_the_client_without_hop_by_hop_ones() {
    let backend = ScriptedBackend::start(Script::Reply(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Hop\r\n\
         Sec-WebSocket-Accept: {accept}\r\nSet-Cookie: a=1\r\nX-Hop: 1\r\n\
         Keep-Alive: timeout=5\r\nContent-Length: 0\r\nSec-WebSocket-Protocol: chat\r\n\
         Set-Cookie: b=2\r\n\r\n"
            .into(),
    ))
    .await;
    let gateway = ConfigBuilder::new(&[backend.addr]).start().await;
    let check = |path: &str, answer: Response| {
        assert_eq!(answer.status, 101, "{path}: {answer:?}");
        assert_eq!(
            answer.values("set-cookie"),
            ["a=1", "b=2"],
            "{path}: {answer:?}"
        );
        assert_eq!(answer.values("sec-websocket-protocol"), ["chat"], "{path}");
        assert_eq!(
            answer.values("upgrade"),
            ["websocket"],
            "{path}: {answer:?}"
        );
        assert_eq!(
            answer.values("connection"),
            ["Upgrade"],
            "{path}: {answer:?}"
        );
        assert_eq!(answer.values("sec-websocket-accept").len(), 1, "{path}");
        assert_eq!(answer.values("date").len(), 1, "{path}: {answer:?}");
        for hop in ["x-hop", "keep-alive", "content-length"] {
            assert!(
                answer.values(hop).is_empty(),
                "{path}: {hop} relayed: {answer:?}"
            );
        }
    };

    let mut first = RawClient::connect(gateway.addr()).await;
    check(
        "client stage",
        first.request(&Head::websocket("/chat")).await,
    );

    let mut second = RawClient::connect(gateway.addr()).await;
    let before = second.request(&Head::get("/internal/admin")).await;
    assert_eq!(before.status, 403, "{before:?}");
    check("hyper", second.request(&Head::websocket("/chat")).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_head_larger_than_64k_is_502() {
    let huge = format!(
        "HTTP/1.1 101 Switching Protocols\r\nX-Big: {}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Accept: {{accept}}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    assert_answer_keeps_connection_http(&huge, 502).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_101_with_a_wrong_accept_is_502() {
    assert_answer_keeps_connection_http(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        502,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_101_without_an_accept_is_502() {
    assert_answer_keeps_connection_http(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        502,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_101_without_upgrade_websocket_is_502() {
    assert_answer_keeps_connection_http(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n",
        502,
    )
    .await;
    assert_answer_keeps_connection_http(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n",
        502,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_silent_past_the_handshake_timeout_gets_a_gateway_error() {
    let backend = ScriptedBackend::start(Script::Silent).await;
    let gateway = ConfigBuilder::new(&[backend.addr])
        .route_toml("handshake_timeout = \"1s\"")
        .start()
        .await;
    let mut client = RawClient::connect(gateway.addr()).await;
    let started = Instant::now();
    let answer = client.request(&Head::websocket("/slow")).await;
    let waited = started.elapsed();
    // The contract names no status for this case; a gateway error is what a user expects.
    assert!(matches!(answer.status, 502 | 504), "{answer:?}");
    assert!(
        waited >= Duration::from_millis(900) && waited <= Duration::from_secs(5),
        "answered after {waited:?}, handshake_timeout is 1s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrade_leaves_the_connection_serving_plain_requests() {
    let (backend, gateway) = start_echo_gateway(|c| c).await;
    let mut client = RawClient::connect(gateway.addr()).await;
    let refused = client
        .request(&Head::websocket("/").set("Sec-WebSocket-Key", "short"))
        .await;
    assert_eq!(refused.status, 400, "{refused:?}");
    let next = client.request(&Head::get("/after")).await;
    assert_eq!(
        (next.status, next.text()),
        (200, "a".to_string()),
        "{next:?}"
    );
    let requests = backend.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].target, "/after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_after_a_plain_request_on_the_same_connection_opens_a_tunnel() {
    let (backend, gateway) = start_echo_gateway(|c| c).await;
    let mut client = RawClient::connect(gateway.addr()).await;
    let plain = client.request(&Head::get("/first")).await;
    assert_eq!((plain.status, plain.text()), (200, "a".to_string()));
    let head = Head::websocket("/then-ws");
    let answer = client.request(&head).await;
    assert_eq!(answer.status, 101, "{answer:?}");
    assert_eq!(
        answer.header("sec-websocket-accept"),
        Some(head.expected_accept().as_str())
    );
    let mut ws = client.into_websocket().await;
    assert_eq!(whoami(&mut ws).await, "a");
    assert_eq!(backend.upgrades(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_sent_together_with_the_upgrade_head_reaches_the_server() {
    let (_backend, gateway) = start_echo_gateway(|c| c).await;
    let mut client = RawClient::connect(gateway.addr()).await;
    // The head and a masked text frame "whoami" (all-zero mask) in one write.
    let mut bytes = Head::websocket("/eager").to_bytes();
    bytes.extend_from_slice(&[0x81, 0x80 | 6, 0, 0, 0, 0]);
    bytes.extend_from_slice(b"whoami");
    client.send(bytes).await;
    let answer = client.response().await;
    assert_eq!(answer.status, 101, "{answer:?}");
    let mut ws = client.into_websocket().await;
    let reply = within(STEP, "the echo of the eager frame", ws.next())
        .await
        .expect("a message")
        .expect("a valid frame");
    assert_eq!(reply, Message::text("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_with_upgrade_gets_a_bodiless_400_and_the_connection_goes_on() {
    let (_backend, gateway) = start_echo_gateway(|c| c).await;
    let mut client = RawClient::connect(gateway.addr()).await;
    // Pipelined: a HEAD "upgrade", then a plain GET on the same connection.
    let mut bytes = Head::websocket("/").method("HEAD").to_bytes();
    bytes.extend(Head::get("/next").to_bytes());
    client.send(bytes).await;
    let mut seen = Vec::new();
    for _ in 0..20 {
        let text = String::from_utf8_lossy(&seen);
        if text.contains("HTTP/1.1 200") && text.ends_with("\r\n\r\na") {
            break;
        }
        match client.read_some(STEP).await {
            Some(Ok(more)) if !more.is_empty() => seen.extend(more),
            other => panic!("connection ended after {text:?}: {other:?}"),
        }
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(
        !text.contains("must use GET"),
        "a body was sent for HEAD: {text}"
    );
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{text}");
    assert!(text.ends_with("\r\n\r\na"), "{text}");
}
