//! Capture and replay: the gateway writes what a route's plugin chain saw and decided
//! (`[routes.capture]`), and `sluice replay` runs that capture through a config's chains
//! offline — the same config gives the same decisions, a changed origin allowlist shows
//! exactly the requests it would decide differently. Real binary, real sockets, the real
//! `origin-allowlist` component.
//!
//! - a capture taken by the gateway: allowed and refused upgrades and a plain request,
//!   a redacted header that never reaches the file, the capture counters;
//! - `sluice replay` with the same config, `--against` a changed allowlist, and a
//!   malformed line in the middle (named by number, the others replayed);
//! - hand-written bad lines (garbage, wrong types, an unknown route) never panic it;
//! - capture off writes nothing; a reload turns capture on and off;
//! - SIGUSR1 reopens a capture file moved away, as it does the access log.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{
    ADMIN, Backend, ConfigBuilder, Gateway, Head, STEP, TempDir, eventually, plugin_wasm,
    request_once, wait_metric,
};
use serde_json::Value;

/// How long `sluice replay` may take: it compiles and starts the plugins first.
const REPLAY_LIMIT: Duration = Duration::from_secs(120);

/// The credential the redacted header carries; it must never reach the capture file.
const SECRET: &str = "Bearer top-secret-token-4711";

/// The `[plugins.origin]` table allowing `allowed`.
fn origin_plugin(allowed: &[&str]) -> String {
    format!(
        "[plugins.origin]\npath = {:?}\nconfig = {{ allowed = {allowed:?} }}\n",
        plugin_wasm("origin-allowlist").display().to_string()
    )
}

/// A config whose `main` route runs origin-allowlist with `allowed`, capturing to
/// `capture.jsonl` beside the config when `capture` is set.
fn config(backend: &Backend, allowed: &[&str], capture: bool) -> String {
    let mut builder = ConfigBuilder::new(&[backend.addr])
        .route_toml("plugins = [\"origin\"]")
        .extra(ADMIN)
        .extra(&origin_plugin(allowed));
    if capture {
        builder = builder.route_toml(
            "capture = { file = \"capture.jsonl\", redact = [\"authorization\", \"x-secret\"] }",
        );
    }
    builder.build()
}

/// A WebSocket upgrade to `/ws` from `origin` (none when empty).
fn upgrade_from(origin: &str) -> Head {
    let head = Head::websocket("/ws");
    if origin.is_empty() {
        head
    } else {
        head.header("Origin", origin)
    }
}

/// The capture file's lines once it has `n` of them (polled, bounded).
async fn capture_lines(file: &Path, n: usize) -> Vec<Value> {
    eventually(STEP, &format!("{n} lines in {}", file.display()), || {
        let text = std::fs::read_to_string(file).ok()?;
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a capture line is JSON"))
            .collect();
        (lines.len() >= n).then_some(lines)
    })
    .await
}

/// Runs `sluice replay ARGS` to its end (killed, and failing, after [`REPLAY_LIMIT`]).
fn replay(args: &[&Path]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .arg("replay")
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("spawn sluice replay");
    let deadline = Instant::now() + REPLAY_LIMIT;
    while child.try_wait().expect("poll sluice").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sluice replay did not finish within {REPLAY_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("sluice replay output")
}

/// `sluice replay CONFIG CAPTURE --against OTHER`.
fn replay_against(config: &Path, capture: &Path, other: &Path) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .arg("replay")
        .arg(config)
        .arg(capture)
        .arg("--against")
        .arg(other)
        .stdin(std::process::Stdio::null());
    let out = command.output().expect("run sluice replay --against");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{out:?}"
    );
    out
}

/// The JSON lines of a replay's stdout.
fn printed(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The `changed` list of a printed line.
fn changed(line: &Value) -> Vec<&str> {
    line["changed"]
        .as_array()
        .expect("changed is a list")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

/// The requests of the capture test: origin, whether the old allowlist admits it, and
/// whether it is an upgrade.
const TRAFFIC: &[(&str, bool, bool)] = &[
    ("https://app.example.com", true, true),
    ("https://old.example.com", true, true),
    ("https://evil.example.com", false, true),
    ("https://app.example.com", true, false),
    ("", false, true),
];

#[tokio::test]
async fn a_capture_replays_to_its_decisions_and_shows_what_a_new_allowlist_changes() {
    let backend = Backend::start("a").await;
    let old = ["https://app.example.com", "https://old.example.com"];
    let gateway = Gateway::start(&config(&backend, &old, true)).await;
    let addr = gateway.addr();
    for (origin, allowed, websocket) in TRAFFIC {
        let head = if *websocket {
            upgrade_from(origin)
        } else {
            Head::get("/api").header("Origin", origin)
        };
        let head = head
            .header("Authorization", SECRET)
            .header("X-Secret", "hush");
        let answer = request_once(addr, &head).await;
        let want = match (allowed, websocket) {
            (false, _) => 403,
            (true, true) => 101,
            (true, false) => 200,
        };
        assert_eq!(answer.status, want, "{origin:?}: {}", answer.text());
    }

    let file = gateway.config_path().with_file_name("capture.jsonl");
    let lines = capture_lines(&file, TRAFFIC.len()).await;
    assert_eq!(lines.len(), TRAFFIC.len());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains("top-secret") && !text.contains("hush"),
        "{text}"
    );
    for (line, (origin, allowed, websocket)) in lines.iter().zip(TRAFFIC) {
        assert_eq!(line["v"], 1);
        assert_eq!(line["route"], "main");
        let outcome = if *allowed { "allow" } else { "deny" };
        assert_eq!(line["decision"]["outcome"], outcome, "{line}");
        let request = &line["request"];
        assert_eq!(
            request["kind"],
            if *websocket { "websocket" } else { "http" }
        );
        let header = |name: &str| {
            request["headers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|h| h[0] == name)
                .map(|h| h[1].as_str().unwrap().to_owned())
        };
        assert_eq!(header("authorization").as_deref(), Some("<redacted>"));
        assert_eq!(header("x-secret").as_deref(), Some("<redacted>"));
        let seen_origin = header("origin").unwrap_or_default();
        assert_eq!(seen_origin, *origin);
        if *allowed {
            assert_eq!(line["decision"]["pool"], "echo");
        } else {
            assert_eq!(line["decision"]["status"], 403);
            assert_eq!(line["decision"]["denied_by"], "origin");
        }
    }
    let admin = gateway.admin().await;
    let route = [("route", "main")];
    wait_metric(admin, "sluice_capture_lines_total", &route, 5.0).await;
    wait_metric(admin, "sluice_capture_dropped_total", &route, 0.0).await;

    // The same config: every request replayed, each to the decision captured.
    let out = replay(&[gateway.config_path(), &file]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let same = printed(&out);
    assert_eq!(same.len(), TRAFFIC.len(), "{out:?}");
    for (i, (replayed, captured)) in same.iter().zip(&lines).enumerate() {
        assert_eq!(replayed["line"], i + 1);
        assert_eq!(replayed["route"], "main");
        assert_eq!(replayed["decision"], captured["decision"], "{replayed}");
        assert!(changed(replayed).is_empty(), "{replayed}");
        assert!(replayed.get("captured").is_none(), "{replayed}");
    }

    // A new allowlist: old.example.com dropped, evil.example.com added. Exactly those two
    // requests change, allow <-> deny.
    let dir = TempDir::new();
    let new = ["https://app.example.com", "https://evil.example.com"];
    let other = dir.write("new.toml", &config(&backend, &new, false));
    let out = replay_against(gateway.config_path(), &file, &other);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let diff = printed(&out);
    assert_eq!(diff.len(), 2, "{out:?}");
    assert_eq!(diff[0]["line"], 2);
    assert_eq!(diff[0]["decision"]["outcome"], "allow");
    assert_eq!(diff[0]["against"]["outcome"], "deny");
    assert_eq!(diff[0]["against"]["status"], 403);
    assert_eq!(diff[1]["line"], 3);
    assert_eq!(diff[1]["decision"]["outcome"], "deny");
    assert_eq!(diff[1]["against"]["outcome"], "allow");
    for d in &diff {
        assert_eq!(changed(d), ["outcome"], "{d}");
    }
    // Replayed through the new config alone, the changed requests say what they were.
    let out = replay(&[&other, &file]);
    let alone = printed(&out);
    assert_eq!(alone.len(), TRAFFIC.len());
    let moved: Vec<_> = alone.iter().filter(|l| !changed(l).is_empty()).collect();
    assert_eq!(moved.len(), 2, "{out:?}");
    assert_eq!(moved[0]["captured"]["outcome"], "allow");

    // A malformed line in the middle: named by its number, the others replayed.
    let mut broken: Vec<String> = text.lines().map(str::to_owned).collect();
    broken.insert(2, "{\"v\": 1, \"route\": \"main\", \"request\": ".into());
    let broken_file = dir.write("broken.jsonl", &(broken.join("\n") + "\n"));
    let out = replay(&[gateway.config_path(), &broken_file]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr.starts_with(&format!(
            "{}:3: not a capture line: ",
            broken_file.display()
        )),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let numbers: Vec<u64> = printed(&out)
        .iter()
        .map(|l| l["line"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 4, 5, 6]);
}

/// Hand-written bad lines: each named with its number, none panics the replay, and the
/// good line among them is replayed.
#[tokio::test]
async fn bad_capture_lines_are_named_and_skipped() {
    let backend = Backend::start("a").await;
    let dir = TempDir::new();
    let conf = dir.write(
        "sluice.toml",
        &config(&backend, &["https://app.example.com"], false),
    );
    let good = r#"{"v":1,"ts_ms":0,"route":"main","request":{"kind":"websocket","method":"GET","scheme":"http","authority":"x","path":"/ws","headers":[["origin","https://app.example.com"]],"client":"127.0.0.1:1"},"decision":{"outcome":"deny","status":403,"denied_by":"origin"}}"#;
    let lines = [
        "garbage".to_string(),
        good.replace("\"main\"", "\"gone\""),
        good.replace("127.0.0.1:1", "not an address"),
        good.replace("403", "70000"),
        good.replace("\"v\":1", "\"v\":9"),
        good.replace("websocket", "carrier-pigeon"),
        String::new(),
        good.to_string(),
        "[1, 2, 3]".to_string(),
        "{\"v\":1".to_string(),
    ];
    let mut bytes = lines.join("\n").into_bytes();
    bytes.extend_from_slice(b"\n\xff\xfe not utf-8\n");
    let file = dir.path().join("bad.jsonl");
    std::fs::write(&file, bytes).unwrap();

    let out = replay(&[&conf, &file]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let named: Vec<String> = stderr
        .lines()
        .map(|l| {
            let rest = l
                .strip_prefix(&format!("{}:", file.display()))
                .unwrap_or_else(|| panic!("{l}"));
            rest.split(':').next().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        named,
        ["1", "2", "3", "4", "5", "6", "9", "10", "11"],
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(":2: route `gone` is not in {}", conf.display())),
        "{stderr}"
    );
    assert!(stderr.contains(":5: capture format version 9"), "{stderr}");
    // The good line: the capture says deny, this config allows its origin.
    let out = printed(&out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["line"], 8);
    assert_eq!(out[0]["decision"]["outcome"], "allow");
    assert_eq!(out[0]["captured"]["outcome"], "deny");
    assert_eq!(changed(&out[0]), ["outcome"]);

    // A capture file that is not there is an error of its own (exit 1).
    let out = replay(&[&conf, &dir.path().join("missing.jsonl")]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// Waits until the gateway has logged `n` reloads.
async fn reloads(gateway: &Gateway, n: usize) {
    eventually(STEP, &format!("reload {n}"), || {
        let done = gateway
            .json_logs()
            .iter()
            .filter(|v| v["message"] == "config reloaded")
            .count();
        (done >= n).then_some(())
    })
    .await;
}

/// Without `capture`, nothing is written; a reload turns capture on, one after the file
/// was moved away starts a new file, and another turns capture off.
#[tokio::test]
async fn capture_follows_the_config_and_is_off_by_default() {
    let backend = Backend::start("a").await;
    let allowed = ["https://app.example.com"];
    let gateway = Gateway::start(&config(&backend, &allowed, false)).await;
    let addr = gateway.addr();
    let dir: PathBuf = gateway.config_path().parent().unwrap().to_owned();
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let from_app = upgrade_from("https://app.example.com");
    assert_eq!(request_once(addr, &from_app).await.status, 101);
    assert_eq!(
        request_once(addr, &upgrade_from("https://x.example"))
            .await
            .status,
        403
    );
    gateway
        .wait_access_log("the refused upgrade", |l| l.status == 403)
        .await;
    assert_eq!(listing(), ["sluice.toml"]);

    gateway.reload(&config(&backend, &allowed, true));
    reloads(&gateway, 1).await;
    assert_eq!(request_once(addr, &from_app).await.status, 101);
    let file = dir.join("capture.jsonl");
    let lines = capture_lines(&file, 1).await;
    assert_eq!(lines[0]["decision"]["outcome"], "allow");

    // Moved away (as logrotate would), then the same config reloaded: a new file.
    let rotated = dir.join("capture.1.jsonl");
    std::fs::rename(&file, &rotated).unwrap();
    gateway.reload(&config(&backend, &allowed, true));
    reloads(&gateway, 2).await;
    assert_eq!(
        request_once(addr, &upgrade_from("https://x.example"))
            .await
            .status,
        403
    );
    let lines = capture_lines(&file, 1).await;
    assert_eq!(lines[0]["decision"]["outcome"], "deny");
    assert_eq!(capture_lines(&rotated, 1).await.len(), 1);

    gateway.reload(&config(&backend, &allowed, false));
    reloads(&gateway, 3).await;
    let before = gateway.access_logs().len();
    assert_eq!(request_once(addr, &from_app).await.status, 101);
    eventually(STEP, "the access log of the last upgrade", || {
        (gateway.access_logs().len() > before).then_some(())
    })
    .await;
    assert_eq!(capture_lines(&file, 1).await.len(), 1);
    assert_eq!(
        listing(),
        ["capture.1.jsonl", "capture.jsonl", "sluice.toml"]
    );
}

/// A capture file moved away (as logrotate does) is reopened at its path on SIGUSR1:
/// the next line goes to a new file, the moved one gets nothing more.
#[tokio::test]
async fn a_capture_file_moved_away_is_reopened_on_sigusr1() {
    let backend = Backend::start("a").await;
    let gateway = Gateway::start(&config(&backend, &["https://app.example.com"], true)).await;
    let addr = gateway.addr();
    let file = gateway.config_path().with_file_name("capture.jsonl");
    let from_app = upgrade_from("https://app.example.com");
    assert_eq!(request_once(addr, &from_app).await.status, 101);
    assert_eq!(
        capture_lines(&file, 1).await[0]["decision"]["outcome"],
        "allow"
    );

    let rotated = file.with_file_name("capture.1.jsonl");
    std::fs::rename(&file, &rotated).unwrap();
    gateway.signal("USR1");
    gateway
        .wait_log("the reopen", |l| l["message"] == "capture reopened")
        .await;
    assert!(file.exists(), "SIGUSR1 created the new file");
    let refused = request_once(addr, &upgrade_from("https://x.example")).await;
    assert_eq!(refused.status, 403);
    let lines = capture_lines(&file, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["decision"]["outcome"], "deny");
    let old = capture_lines(&rotated, 1).await;
    assert_eq!(old.len(), 1, "the moved file got nothing more: {old:?}");
}
