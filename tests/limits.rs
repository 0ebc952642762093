//! Limits and shutdown: slow request heads are cut off, oversized heads get 431,
//! connections over `max_connections` wait their turn, and SIGTERM drains tunnels for the
//! grace period before the process exits 0.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_client_is_cut_off_while_others_are_served() {
    let (_backend, gateway) =
        start_echo_gateway(|c| c.listener_toml("header_read_timeout = \"2s\"")).await;
    let mut slow = RawClient::connect(gateway.addr()).await;
    let started = Instant::now();
    slow.send("GET / HTTP/1.1\r\nHost: slow.example\r\n").await;
    let dribbled = AtomicUsize::new(0);

    // One byte every 200 ms (never finishing the head) until the gateway hangs up.
    let dribble = async {
        for byte in b"X-Dribble: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
            match slow.read_some(Duration::from_millis(200)).await {
                None => {
                    if slow.writer.write_all(&[*byte]).await.is_err() {
                        return started.elapsed();
                    }
                    dribbled.fetch_add(1, Ordering::SeqCst);
                }
                Some(Ok(bytes)) if bytes.is_empty() => return started.elapsed(),
                Some(Err(_)) => return started.elapsed(),
                // An error answer such as 408 may come first; the close must follow.
                Some(Ok(_)) => continue,
            }
        }
        panic!(
            "the slow client was still connected after {:?}",
            started.elapsed()
        );
    };
    // Others are served while the slow client is connected, part-way through its head.
    let others = async {
        eventually(STEP, "the slow client to dribble", || {
            (dribbled.load(Ordering::SeqCst) >= 1).then_some(())
        })
        .await;
        assert_answered(gateway.addr(), &Head::get("/"), "a").await;
        let mut ws = ws_connect(gateway.addr(), "/").await;
        assert_eq!(whoami(&mut ws).await, "a");
        close_ws(ws).await;
        started.elapsed()
    };
    let (cut_after, served_after) = tokio::join!(dribble, others);
    assert!(
        cut_after >= Duration::from_millis(1800) && cut_after <= Duration::from_secs(8),
        "slow client cut off after {cut_after:?}, header_read_timeout is 2s"
    );
    assert!(
        served_after < cut_after,
        "others were served after {served_after:?}, once the slow client was cut off \
         ({cut_after:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_head_gets_431_and_the_next_client_is_served() {
    let (backend, gateway) =
        start_echo_gateway(|c| c.listener_toml("max_header_size = \"8KiB\"")).await;
    let mut big = RawClient::connect(gateway.addr()).await;
    let answer = big
        .request(&Head::get("/").header("X-Big", &"a".repeat(12 * 1024)))
        .await;
    assert_eq!(answer.status, 431, "{answer:?}");

    let mut next = RawClient::connect(gateway.addr()).await;
    let answer = next
        .request(&Head::get("/").header("X-Fine", &"b".repeat(2 * 1024)))
        .await;
    assert_eq!((answer.status, answer.text()), (200, "a".to_string()));
    let requests = backend.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(requests[0].header("x-big").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_over_max_connections_waits_instead_of_being_refused() {
    let (_backend, gateway) = start_echo_gateway(|c| c.listener_toml("max_connections = 2")).await;
    let (first, _) = ws_whoami(gateway.addr(), "/1", &[]).await;
    let (mut second, _) = ws_whoami(gateway.addr(), "/2", &[]).await;

    let mut third = RawClient::connect(gateway.addr()).await;
    let head = Head::websocket("/3");
    third.send(head.to_bytes()).await;
    // Nothing marks the moment a connection would have been served, so this waits a bound
    // instead: served at once, the third would be answered in milliseconds, and well
    // within 2 s even on a loaded 2-core machine.
    match third.read_some(Duration::from_secs(2)).await {
        None => {}
        Some(Ok(bytes)) if bytes.is_empty() => {
            panic!("third connection was closed instead of waiting")
        }
        Some(Ok(bytes)) => panic!(
            "third connection served while two were open: {:?}",
            String::from_utf8_lossy(&bytes)
        ),
        Some(Err(e)) => panic!("third connection failed instead of waiting: {e}"),
    }

    close_ws(first).await;
    let answer = third.response().await;
    assert_eq!(answer.status, 101, "{answer:?}");
    let mut third = third.into_websocket().await;
    assert_eq!(whoami(&mut third).await, "a");
    assert_eq!(
        whoami(&mut second).await,
        "a",
        "the second connection is still served"
    );
}

/// A client that connects and says nothing takes no connection slot: the kernel holds its
/// connection (`TCP_DEFER_ACCEPT`) until its first bytes, so the next client is served at
/// once. After the deferral (one second) the silent client is accepted and meets the
/// header-read timeout like any other.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_takes_no_slot_and_is_still_closed() {
    let (_backend, gateway) = start_echo_gateway(|c| {
        c.listener_toml("max_connections = 1\nheader_read_timeout = \"2s\"")
    })
    .await;
    let mut silent = RawClient::connect(gateway.addr()).await;
    let started = Instant::now();

    let (ws, name) = ws_whoami(gateway.addr(), "/", &[]).await;
    assert_eq!(name, "a");
    // Had the silent connection been accepted, it would hold the only slot until its
    // header-read timeout (2 s) and this client would wait that long.
    let served_after = started.elapsed();
    assert!(
        served_after < Duration::from_millis(1500),
        "the next client waited {served_after:?} behind a silent connection"
    );
    close_ws(ws).await;

    let closed = within(
        Duration::from_secs(8),
        "the silent client to be closed",
        async {
            loop {
                match silent.read_some(Duration::from_secs(8)).await {
                    Some(Ok(bytes)) if !bytes.is_empty() => continue,
                    _ => return started.elapsed(),
                }
            }
        },
    )
    .await;
    assert!(
        closed >= Duration::from_secs(2),
        "silent client closed after {closed:?}, before its header-read timeout"
    );
}

/// Waits until every worker has stopped accepting on listener `public` (a debug line,
/// which needs `sluice::accept=debug`), after which its sockets are closed.
async fn wait_stopped_accepting(gateway: &Gateway) {
    let workers = gateway.workers().await;
    eventually(STEP, "every worker to stop accepting", || {
        let stopped = gateway
            .json_logs()
            .iter()
            .filter(|l| l["message"] == "stopped accepting" && l["listener"] == "public")
            .count();
        (stopped == workers).then_some(())
    })
    .await;
}

/// Asserts that a new client gets no service once the listener has stopped accepting:
/// the connect is refused, or the connection is closed or reset without an answer.
async fn assert_not_served(addr: SocketAddr) {
    let Ok(mut stream) = within(STEP, "a connect", TcpStream::connect(addr)).await else {
        return;
    };
    if stream.write_all(&Head::get("/").to_bytes()).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 4096];
    if let Ok(n) = within(STEP, "the new connection to end", stream.read(&mut buf)).await {
        assert_eq!(
            n,
            0,
            "a new connection was served after SIGTERM: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
}

/// A gateway with one open tunnel, just sent SIGTERM.
struct Draining {
    backend: Backend,
    gateway: Gateway,
    ws: Ws,
    /// The tunnel's client address, as the access log names it.
    client: String,
    /// When SIGTERM was sent.
    signalled: Instant,
}

impl Draining {
    /// Starts a gateway with `[shutdown] grace`, opens a tunnel, sends SIGTERM.
    async fn start(grace: &str) -> Draining {
        let (backend, gateway) =
            start_echo_gateway(|c| c.grace(grace).log_level("info,sluice::accept=debug")).await;
        let mut ws = ws_connect(gateway.addr(), "/").await;
        let client = ws.get_ref().local_addr().expect("local addr").to_string();
        assert_eq!(whoami(&mut ws).await, "a");
        gateway.signal("TERM");
        Draining {
            backend,
            gateway,
            ws,
            client,
            signalled: Instant::now(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_drains_tunnels_for_the_grace_period_and_exits_0() {
    let Draining {
        backend: _backend,
        mut gateway,
        mut ws,
        client,
        signalled,
    } = Draining::start("2s").await;
    wait_stopped_accepting(&gateway).await;
    assert_not_served(gateway.addr()).await;

    // Well inside the grace period the tunnel still echoes.
    let msg = Message::text("still draining");
    assert_eq!(roundtrip(&mut ws, msg.clone()).await, msg);
    assert!(
        signalled.elapsed() < Duration::from_millis(1800),
        "test too slow to check the grace period"
    );

    ws_closed_within(&mut ws, Duration::from_secs(6)).await;
    let closed_after = signalled.elapsed();
    assert!(
        closed_after >= Duration::from_millis(1500) && closed_after <= Duration::from_secs(5),
        "tunnel closed {closed_after:?} after SIGTERM, grace is 2s"
    );
    let status = gateway.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        signalled.elapsed() <= Duration::from_secs(6),
        "exited {:?} after SIGTERM",
        signalled.elapsed()
    );
    let line = gateway
        .wait_access_log("the drained tunnel's access log", |l| l.client == client)
        .await;
    assert_eq!(line.reason.as_deref(), Some("shutdown"), "{line:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_as_soon_as_the_last_tunnel_ends() {
    let Draining {
        backend: _backend,
        mut gateway,
        ws,
        client,
        signalled,
    } = Draining::start("30s").await;
    // The tunnel ends while the gateway drains.
    wait_stopped_accepting(&gateway).await;
    let ended = Instant::now();
    drop(ws); // the client closes its TCP connection first
    let status = gateway.wait_exit(Duration::from_secs(8)).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        ended.elapsed() < Duration::from_secs(8),
        "exited {:?} after the only tunnel ended (grace 30s; SIGTERM {:?} ago)",
        ended.elapsed(),
        signalled.elapsed()
    );
    let line = gateway
        .wait_access_log("the tunnel's access log", |l| l.client == client)
        .await;
    assert_eq!(line.reason.as_deref(), Some("client_closed"), "{line:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_without_tunnels_exits_0_promptly() {
    let (_backend, mut gateway) = start_echo_gateway(|c| c.grace("30s")).await;
    assert_answered(gateway.addr(), &Head::get("/"), "a").await;
    gateway.signal("INT");
    let status = gateway.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

/// Sends `GET /internal` on a new connection and waits up to `limit` for the start of
/// its answer; the connection when answered (kept open: keep-alive holds one descriptor
/// of the gateway), `Err` with the unanswered connection otherwise.
async fn held_request(addr: SocketAddr, limit: Duration) -> Result<TcpStream, TcpStream> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /internal HTTP/1.1\r\nHost: sluice.test\r\n\r\n")
        .await
        .expect("send");
    let mut buf = [0u8; 12];
    match tokio::time::timeout(limit, stream.read_exact(&mut buf)).await {
        Ok(Ok(_)) if &buf == b"HTTP/1.1 403" => Ok(stream),
        Ok(other) => panic!("unexpected answer: {other:?} {buf:?}"),
        Err(_) => Err(stream),
    }
}

/// Out of file descriptors (`RLIMIT_NOFILE` of 64, set with `prlimit`): the gateway says
/// what limit it runs with, accepts what it can, keeps every open tunnel echoing while
/// `accept` fails, counts the failures, and serves the waiting client as soon as
/// descriptors are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_it_backs_off_and_recovers() {
    let backend = Backend::start("a").await;
    let config = ConfigBuilder::new(&[backend.addr])
        .listener_toml("header_read_timeout = \"60s\"")
        .extra(&format!(
            "[runtime]\nworkers = 1\n[reload]\nwatch = false\n{ADMIN}"
        ))
        .build();
    let gateway = Gateway::start_with(&config, |path| {
        let mut command = std::process::Command::new("prlimit");
        command
            .args(["--nofile=64:64", "--", env!("CARGO_BIN_EXE_sluice"), "run"])
            .arg(path)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        command
    })
    .await;
    let limit = gateway
        .wait_log("the open-files limit", |l| {
            l["message"] == "open files limit"
        })
        .await;
    assert_eq!(
        (limit["soft"].as_str(), limit["hard"].as_str()),
        (Some("64"), Some("64"))
    );
    let admin = gateway.admin().await;
    let addr = gateway.addr();

    // Tunnels (two descriptors each) until one cannot be had.
    let mut tunnels = Vec::new();
    for _ in 0..40 {
        match tokio::time::timeout(Duration::from_secs(2), try_ws_connect(addr, "/ws", &[])).await {
            Ok(Ok(ws)) => tunnels.push(ws),
            _ => break,
        }
    }
    assert!(
        (5..40).contains(&tunnels.len()),
        "{} tunnels under a limit of 64 descriptors",
        tunnels.len()
    );
    // Then plain keep-alive connections (one each) until `accept` itself fails.
    let mut held = Vec::new();
    let mut waiting = None;
    for _ in 0..40 {
        match held_request(addr, Duration::from_secs(1)).await {
            Ok(s) => held.push(s),
            Err(s) => {
                waiting = Some(s);
                break;
            }
        }
    }
    let mut waiting = waiting.expect("a client left waiting once descriptors ran out");
    gateway
        .wait_log("the accept failure", |l| {
            l["message"] == "accept failed; backing off until it succeeds"
        })
        .await;

    // Every tunnel still echoes.
    for (i, ws) in tunnels.iter_mut().enumerate() {
        let msg = Message::text(format!("still here {i}"));
        assert_eq!(roundtrip(ws, msg.clone()).await, msg);
    }
    // Clients leave: the waiting one is answered.
    held.truncate(held.len().saturating_sub(3));
    tunnels.truncate(tunnels.len() - 2);
    let mut buf = [0u8; 12];
    within(
        STEP,
        "the waiting client's answer",
        waiting.read_exact(&mut buf),
    )
    .await
    .expect("an answer once descriptors are free");
    assert_eq!(&buf, b"HTTP/1.1 403");
    let m = Metrics::scrape(admin).await;
    assert!(m.value("sluice_accept_errors_total", &[("listener", "public")]) >= 1.0);
    let mut fresh = ws_connect(addr, "/ws").await;
    assert_eq!(whoami(&mut fresh).await, "a");
}
