//! Tunnels: after a WebSocket upgrade, bytes flow unchanged both ways, half-closes are
//! forwarded, idle tunnels are closed, and each tunnel leaves one access-log line.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::{Bytes, Message};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_binary_and_control_messages_pass_through_unchanged() {
    let (_backend, gateway) = start_echo_gateway(|c| c).await;
    let mut ws = ws_connect(gateway.addr(), "/chat").await;
    let messages = [
        Message::text(""),
        Message::text("hello"),
        Message::text("héllo wörld ✓ 🚀"),
        Message::text("x".repeat(200_000)),
        Message::binary(Vec::new()),
        Message::binary((0..=255u8).collect::<Vec<u8>>()),
        Message::binary(pattern(70_000, 1)),
    ];
    for msg in messages {
        assert_eq!(roundtrip(&mut ws, msg.clone()).await, msg);
    }
    within(
        STEP,
        "a ping send",
        ws.send(Message::Ping(Bytes::from_static(b"p1"))),
    )
    .await
    .expect("send ping");
    let pong = within(STEP, "the backend's pong", async {
        loop {
            match futures_util::StreamExt::next(&mut ws).await {
                Some(Ok(Message::Pong(payload))) => return payload,
                Some(Ok(_)) => continue,
                other => panic!("tunnel ended before the pong: {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(&pong[..], b"p1");
    close_ws(ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_binary_message_round_trips_intact() {
    let (_backend, gateway) = start_echo_gateway(|c| c).await;
    let mut ws = ws_connect(gateway.addr(), "/bulk").await;
    let payload = pattern(16 << 20, 7);
    let sent = checksum(&payload);
    let echoed = within(
        Duration::from_secs(30),
        "a 16 MiB echo",
        roundtrip(&mut ws, Message::binary(payload)),
    )
    .await;
    let Message::Binary(echoed) = echoed else {
        panic!("echo was not binary: {echoed:?}")
    };
    assert_eq!(echoed.len(), 16 << 20);
    assert_eq!(checksum(&echoed), sent);
    close_ws(ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_tunnels_each_echo_their_own_payload() {
    const TUNNELS: usize = 1000;
    const BATCH: usize = 100;
    let (backend, gateway) = start_echo_gateway(|c| c).await;
    let addr = gateway.addr();
    within(Duration::from_secs(60), "1,000 tunnels", async {
        let mut tunnels = Vec::with_capacity(TUNNELS);
        for batch in 0..TUNNELS / BATCH {
            let mut connecting = JoinSet::new();
            for i in batch * BATCH..(batch + 1) * BATCH {
                connecting.spawn(async move { (i, ws_connect(addr, &format!("/t/{i}")).await) });
            }
            while let Some(done) = connecting.join_next().await {
                tunnels.push(done.expect("connect task"));
            }
        }
        eventually(STEP, "all tunnels open at the backend at once", || {
            (backend.open_tunnels() == TUNNELS).then_some(())
        })
        .await;
        let mut echoing = JoinSet::new();
        for (i, mut ws) in tunnels {
            echoing.spawn(async move {
                let text = Message::text(format!("tunnel {i} says hello"));
                assert_eq!(roundtrip(&mut ws, text.clone()).await, text, "tunnel {i}");
                let binary = Message::binary(pattern(64 + i, i as u64));
                assert_eq!(
                    roundtrip(&mut ws, binary.clone()).await,
                    binary,
                    "tunnel {i}"
                );
                close_ws(ws).await;
            });
        }
        let mut verified = 0;
        while let Some(done) = echoing.join_next().await {
            done.expect("tunnel task");
            verified += 1;
        }
        assert_eq!(verified, TUNNELS);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_raw_byte_after_the_upgrade_arrives_promptly_both_ways() {
    let mut tunnel = RawTunnel::open().await;
    let (client, server) = (&mut tunnel.client, &mut tunnel.server);
    let prompt = Duration::from_secs(2);
    let mut byte = [0u8; 1];

    client.write_all(b"!").await.expect("client write");
    within(
        prompt,
        "one byte at the backend",
        server.read_exact(&mut byte),
    )
    .await
    .expect("backend read");
    assert_eq!(&byte, b"!");

    server.write_all(b"?").await.expect("backend write");
    within(
        prompt,
        "one byte at the client",
        client.read_exact(&mut byte),
    )
    .await
    .expect("client read");
    assert_eq!(&byte, b"?");
}

/// `closer` sends its last bytes and shuts down its write side; `peer` must read them and
/// then EOF, and must still be able to send back to `closer`, which then sees EOF too.
async fn assert_half_close_is_forwarded(closer: &mut TcpStream, peer: &mut TcpStream) {
    closer
        .write_all(b"last words")
        .await
        .expect("write before half-close");
    closer.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    within(STEP, "EOF after the half-close", peer.read_to_end(&mut got))
        .await
        .expect("read up to EOF");
    assert_eq!(got, b"last words");

    peer.write_all(b"still talking")
        .await
        .expect("write after the other side's EOF");
    peer.shutdown().await.expect("second half-close");
    let mut back = Vec::new();
    within(
        STEP,
        "the reply after the half-close",
        closer.read_to_end(&mut back),
    )
    .await
    .expect("read the reply");
    assert_eq!(back, b"still talking");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_reaches_the_backend_which_can_still_reply() {
    let mut tunnel = RawTunnel::open().await;
    let (client, server) = (&mut tunnel.client, &mut tunnel.server);
    assert_half_close_is_forwarded(client, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_reaches_the_client_which_can_still_send() {
    let mut tunnel = RawTunnel::open().await;
    let (client, server) = (&mut tunnel.client, &mut tunnel.server);
    assert_half_close_is_forwarded(server, client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnel_is_closed_after_idle_timeout_while_a_busy_one_stays_open() {
    let (_backend, gateway) = start_echo_gateway(|c| c.route_toml("idle_timeout = \"1s\"")).await;
    let mut idle = ws_connect(gateway.addr(), "/idle").await;
    let idle_client = idle.get_ref().local_addr().expect("local addr").to_string();
    let opened = Instant::now();
    let mut busy = ws_connect(gateway.addr(), "/busy").await;

    let busy_traffic = async {
        for i in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let msg = Message::text(format!("keepalive {i}"));
            assert_eq!(roundtrip(&mut busy, msg.clone()).await, msg);
        }
    };
    let idle_closed = async {
        ws_closed_within(&mut idle, Duration::from_secs(5)).await;
        opened.elapsed()
    };
    let ((), closed_after) = tokio::join!(busy_traffic, idle_closed);
    assert!(
        closed_after >= Duration::from_millis(800) && closed_after <= Duration::from_secs(3),
        "idle tunnel closed after {closed_after:?}, expected about 1s"
    );
    // The busy tunnel has now lived three idle timeouts and still echoes.
    let msg = Message::text("still here");
    assert_eq!(roundtrip(&mut busy, msg.clone()).await, msg);

    let line = gateway
        .wait_access_log("the idle tunnel's access log", |l| l.client == idle_client)
        .await;
    assert_eq!(line.reason.as_deref(), Some("idle_timeout"), "{line:?}");
    close_ws(busy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tunnel_leaves_one_json_access_log_line_at_close() {
    let (backend, mut gateway) = start_echo_gateway(|c| c).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut ws = ws_connect(gateway.addr(), &format!("/room/{i}")).await;
        // The gateway's record of the tunnel starts before its 101 came.
        let opened = Instant::now();
        let msg = Message::text("hello");
        assert_eq!(roundtrip(&mut ws, msg.clone()).await, msg);
        clients.push((
            ws.get_ref().local_addr().expect("local addr").to_string(),
            ws,
            opened,
        ));
    }
    // The tunnels live a while, so that their lifetime is not their handshake's.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Before any tunnel closes, there is no tunnel access log line: a plain request's line,
    // written after everything the gateway logged for the open tunnels, comes first.
    let mut plain = RawClient::connect(gateway.addr()).await;
    let plain_addr = plain.local_addr().to_string();
    assert_eq!(plain.request(&Head::get("/plain")).await.status, 200);
    gateway
        .wait_access_log("the plain request's access log", |l| l.client == plain_addr)
        .await;
    assert!(
        gateway.access_logs().iter().all(|l| l.kind != "tunnel"),
        "access log written before close: {:?}",
        gateway.access_logs()
    );
    let mut closed = Vec::new();
    // The client closes its TCP connection first. (After a WebSocket close handshake the
    // server closes TCP first, per RFC 6455, so a byte-level tunnel sees the server end.)
    for (name, ws, opened) in clients {
        drop(ws);
        // The gateway's record ends after this close.
        closed.push((name, opened.elapsed()));
    }
    for (client, lived) in &closed {
        let line = gateway
            .wait_access_log("a tunnel's access log", |l| &l.client == client)
            .await;
        assert_eq!(line.kind, "tunnel", "{line:?}");
        assert_eq!(line.listener, "public", "{line:?}");
        assert_eq!(line.route, "main", "{line:?}");
        assert_eq!(line.upstream, backend.addr.to_string(), "{line:?}");
        assert_eq!(line.status, 101, "{line:?}");
        assert_eq!(line.reason.as_deref(), Some("client_closed"), "{line:?}");
        // A masked 5-byte text frame is 11 bytes each way at least (plus close frames).
        assert!(line.bytes_in >= 11, "{line:?}");
        assert!(line.bytes_out >= 7, "{line:?}");
        assert!(
            line.duration_ms >= lived.as_millis() as f64,
            "the tunnel lived {lived:?}: {line:?}"
        );
    }
    // Once the gateway has exited and its stderr has ended, every line it will ever write
    // is here: still one per tunnel, and all of them JSON.
    let status = gateway.terminate().await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let tunnel_lines: Vec<AccessLog> = gateway
        .access_logs()
        .into_iter()
        .filter(|l| l.kind == "tunnel")
        .collect();
    assert_eq!(
        tunnel_lines.len(),
        3,
        "one line per tunnel: {tunnel_lines:?}"
    );
    for line in gateway.stderr_lines() {
        let parsed: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
        assert!(
            parsed.is_object(),
            "stderr line is not a JSON object: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_counts_raw_tunnel_bytes_and_reports_server_close() {
    let RawTunnel {
        gateway,
        backend,
        mut client,
        mut server,
    } = RawTunnel::open().await;
    let client_addr = client.local_addr().expect("local addr").to_string();

    client.write_all(&[1u8; 10]).await.expect("client write");
    let mut got = [0u8; 10];
    within(STEP, "10 bytes at the backend", server.read_exact(&mut got))
        .await
        .expect("backend read");
    server.write_all(&[2u8; 7]).await.expect("backend write");
    drop(server);
    let mut back = Vec::new();
    within(STEP, "the client to see EOF", client.read_to_end(&mut back))
        .await
        .expect("client read");
    assert_eq!(back, [2u8; 7]);
    drop(client);

    let line = gateway
        .wait_access_log("the raw tunnel's access log", |l| l.client == client_addr)
        .await;
    assert_eq!(line.kind, "tunnel", "{line:?}");
    assert_eq!(line.reason.as_deref(), Some("server_closed"), "{line:?}");
    assert_eq!(line.upstream, backend.addr.to_string(), "{line:?}");
    // The contract does not say whether handshake bytes count; the tunnel bytes must,
    // and nothing beyond one request or response head may be added.
    assert!(
        (10..10 + 1024).contains(&line.bytes_in),
        "bytes_in: {line:?}"
    );
    assert!(
        (7..7 + 1024).contains(&line.bytes_out),
        "bytes_out: {line:?}"
    );
}
