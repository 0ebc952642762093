//! Plain HTTP: non-upgrade requests are reverse-proxied with streamed bodies, the same
//! header hygiene as upgrades, gateway errors (502, 504) and upstream keep-alive.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_request_is_proxied_with_header_hygiene_and_logged() {
    let (backend, gateway) = start_echo_gateway(|c| c).await;
    let mut client = RawClient::connect(gateway.addr()).await;
    let head = with_hop_by_hop(Head::get("/api/items?page=2"), "keep-alive")
        .set("Host", "shop.example")
        .header("X-Forwarded-For", "1.2.3.4, 5.6.7.8")
        .header("X-Custom", "kept");
    let answer = client.request(&head).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.text(), "a");
    assert_eq!(answer.header("x-backend"), Some("a"));

    let seen = &backend.requests()[0];
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.target, "/api/items?page=2");
    assert_eq!(seen.values("host"), ["shop.example"]);
    assert_eq!(seen.header("x-custom"), Some("kept"));
    assert!(seen.values("upgrade").is_empty(), "{seen:?}");
    assert_forwarded_cleanly(seen, "1.2.3.4, 5.6.7.8, 127.0.0.1", "shop.example");

    let client_addr = client.local_addr().to_string();
    let line = gateway
        .wait_access_log("the request's access log", |l| l.client == client_addr)
        .await;
    assert_eq!(line.kind, "http", "{line:?}");
    assert_eq!(line.status, 200, "{line:?}");
    assert_eq!(line.listener, "public", "{line:?}");
    assert_eq!(line.route, "main", "{line:?}");
    assert_eq!(line.upstream, backend.addr.to_string(), "{line:?}");
    assert!(line.bytes_out >= 1, "{line:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_stripped() {
    let backend = ScriptedBackend::start(Script::Reply(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Resp-Hop\r\nX-Resp-Hop: 1\r\n\
         Keep-Alive: timeout=5\r\nX-Resp-Kept: 1\r\n\r\nok"
            .into(),
    ))
    .await;
    let gateway = ConfigBuilder::new(&[backend.addr]).start().await;
    let mut client = RawClient::connect(gateway.addr()).await;
    let answer = client.request(&Head::get("/")).await;
    assert_eq!(
        (answer.status, answer.text()),
        (200, "ok".to_string()),
        "{answer:?}"
    );
    assert_eq!(answer.header("x-resp-kept"), Some("1"));
    assert_eq!(answer.header("x-resp-hop"), None, "{answer:?}");
    assert_eq!(answer.header("keep-alive"), None, "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_chunked_post_body_is_echoed_intact() {
    let (_backend, gateway) = start_echo_gateway(|c| c).await;
    let body = pattern(6 << 20, 11);
    let mut client = RawClient::connect(gateway.addr()).await;
    let head = Head::new("POST", "/echo/upload")
        .header("Transfer-Encoding", "chunked")
        .header("Content-Type", "application/octet-stream");
    let writer = &mut client.writer;
    let reader = &mut client.reader;
    let send = async {
        writer.write_all(&head.to_bytes()).await?;
        let mut rest = &body[..];
        let mut size = 1;
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(size.min(rest.len()));
            writer
                .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            writer.write_all(chunk).await?;
            writer.write_all(b"\r\n").await?;
            rest = tail;
            size = size * 7 % 65_521 + 1;
        }
        writer.write_all(b"0\r\n\r\n").await
    };
    // Read while writing: a streaming proxy may start echoing before the upload ends.
    let (sent, answer) = within(Duration::from_secs(30), "a 6 MiB chunked echo", async {
        tokio::join!(send, read_response(reader))
    })
    .await;
    sent.expect("upload");
    let answer = answer.expect("response");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body.len(), body.len());
    assert_eq!(checksum(&answer.body), checksum(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_is_streamed_before_it_ends() {
    let (_backend, gateway) = start_echo_gateway(|c| c).await;
    let mut client = RawClient::connect(gateway.addr()).await;
    let head = Head::new("POST", "/echo/stream").header("Transfer-Encoding", "chunked");
    let first = pattern(1024, 5);
    let mut opening = head.to_bytes();
    opening.extend_from_slice(format!("{:x}\r\n", first.len()).as_bytes());
    opening.extend_from_slice(&first);
    opening.extend_from_slice(b"\r\n");
    client.send(&opening).await;

    // The backend echoes as it reads, so the first kilobyte comes back before the body ends.
    let (status, headers) = within(
        STEP,
        "the response head",
        read_response_head(&mut client.reader),
    )
    .await
    .expect("response head");
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")),
        "a streamed response is chunked: {headers:?}"
    );
    let mut echoed = Vec::new();
    while echoed.len() < first.len() {
        let chunk = within(
            STEP,
            "the first echoed bytes",
            read_chunk(&mut client.reader),
        )
        .await
        .expect("read chunk")
        .expect("body ended early");
        echoed.extend_from_slice(&chunk);
    }
    assert_eq!(echoed, first);

    client.send(b"5\r\nlast!\r\n0\r\n\r\n").await;
    while let Some(chunk) = within(STEP, "the rest of the echo", read_chunk(&mut client.reader))
        .await
        .expect("read chunk")
    {
        echoed.extend_from_slice(&chunk);
    }
    assert_eq!(&echoed[first.len()..], b"last!");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answering_server_gives_502() {
    let gateway = ConfigBuilder::new(&[closed_port(), closed_port()])
        .start()
        .await;
    let mut client = RawClient::connect(gateway.addr()).await;
    let answer = client.request(&Head::get("/anything")).await;
    assert_eq!(answer.status, 502, "{answer:?}");

    let mut upgrade = RawClient::connect(gateway.addr()).await;
    let answer = upgrade.request(&Head::websocket("/ws")).await;
    assert_eq!(answer.status, 502, "{answer:?}");

    let client_addr = client.local_addr().to_string();
    let line = gateway
        .wait_access_log("the 502's access log", |l| l.client == client_addr)
        .await;
    assert_eq!((line.kind.as_str(), line.status), ("http", 502), "{line:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_slower_than_request_timeout_gives_504() {
    let (_backend, gateway) =
        start_echo_gateway(|c| c.route_toml("request_timeout = \"1s\"")).await;
    let mut client = RawClient::connect(gateway.addr()).await;
    let started = Instant::now();
    let answer = client.request(&Head::get("/slow")).await;
    let waited = started.elapsed();
    assert_eq!(answer.status, 504, "{answer:?}");
    assert!(
        waited >= Duration::from_millis(900) && waited <= Duration::from_secs(5),
        "answered after {waited:?}, request_timeout is 1s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_upstream_connections() {
    let (backend, gateway) = start_echo_gateway(|c| c).await;
    let mut client = RawClient::connect(gateway.addr()).await;
    for i in 0..5 {
        let answer = client.request(&Head::get(&format!("/item/{i}"))).await;
        assert_eq!(
            (answer.status, answer.text()),
            (200, "a".to_string()),
            "request {i}"
        );
    }
    assert_eq!(backend.requests().len(), 5);
    assert!(
        backend.connections() < 5,
        "5 sequential requests used {} upstream connections",
        backend.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_status_route_answers_without_an_upstream() {
    let (backend, gateway) = start_echo_gateway(|c| c).await;
    let mut client = RawClient::connect(gateway.addr()).await;
    let answer = client.request(&Head::get("/internal/metrics")).await;
    assert_eq!(
        (answer.status, answer.text()),
        (403, "forbidden".to_string())
    );
    // The longest matching prefix wins: `/internal` over `/`, while other paths go to `/`.
    let answer = client.request(&Head::get("/public")).await;
    assert_eq!((answer.status, answer.text()), (200, "a".to_string()));
    assert_eq!(backend.requests().len(), 1, "{:?}", backend.requests());

    let client_addr = client.local_addr().to_string();
    let line = gateway
        .wait_access_log("the 403's access log", |l| {
            l.client == client_addr && l.status == 403
        })
        .await;
    assert_eq!(line.kind, "http", "{line:?}");
    assert_eq!(line.route, "internal", "{line:?}");
    assert_eq!(line.upstream, "", "{line:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_exact_and_wildcard_hosts_before_the_catch_all() {
    let (_backend, gateway) = start_echo_gateway(|c| {
        c.extra(
            "[[routes]]\nname = \"api\"\nhost = \"api.example\"\nstatus = 200\nbody = \"api\"\n\n\
             [[routes]]\nname = \"tenants\"\nhost = \"*.tenant.example\"\nstatus = 200\nbody = \"tenant\"\n",
        )
    })
    .await;
    for (host, expected) in [
        ("api.example", "api"),
        ("API.Example:8080", "api"),
        ("blue.tenant.example", "tenant"),
        ("tenant.example", "a"),
        ("other.example", "a"),
    ] {
        assert_answered(
            gateway.addr(),
            &Head::get("/page").set("Host", host),
            expected,
        )
        .await;
    }
}

/// A route with `normalize_path = true` sends the upstream the normalised path routing
/// matched (query kept); other routes send the path as the client wrote it. Both for
/// plain requests and for upgrades, read first on the socket or after a plain request
/// (by hyper).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_may_send_the_normalised_path_upstream() {
    let backend = Backend::start("a").await;
    let gateway = ConfigBuilder::new(&[backend.addr])
        .extra(
            "[[routes]]\nname = \"norm\"\npath_prefix = \"/norm/\"\nupstream = \"echo\"\n\
             normalize_path = true\n",
        )
        .start()
        .await;
    let addr = gateway.addr();
    let cases = [
        (
            Head::get("/norm/a/../b//c?x=1&y=..%2F"),
            "/norm/b/c?x=1&y=..%2F",
        ),
        (Head::get("/raw/a/../b//c"), "/raw/a/../b//c"),
        (Head::get("/x/../norm/%61"), "/norm/a"),
        (
            Head::get("/norm/already/normal?q"),
            "/norm/already/normal?q",
        ),
        (Head::websocket("/norm/./x/../ws"), "/norm/ws"),
        (Head::websocket("/raw/./ws"), "/raw/./ws"),
    ];
    for (head, sent) in &cases {
        let answer = request_once(addr, head).await;
        assert!(matches!(answer.status, 200 | 101), "{head:?}: {answer:?}");
        let seen = backend.requests().pop().unwrap();
        assert_eq!(seen.target, *sent, "{head:?}");
    }
    // An upgrade after a plain request on the same connection (hyper's path).
    let mut client = RawClient::connect(addr).await;
    assert_eq!(client.request(&Head::get("/norm/first")).await.status, 200);
    let answer = client.request(&Head::websocket("/norm//ws//")).await;
    assert_eq!(answer.status, 101, "{answer:?}");
    assert_eq!(backend.requests().pop().unwrap().target, "/norm/ws/");
}
