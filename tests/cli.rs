//! The command line: `sluice check` (and `sluice run`) on valid and invalid files, with
//! exact messages; the listener report of `sluice run`; and SIGHUP reloads.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

/// The smallest valid config; the error positions below are counted in this text.
const BASE: &str = r#"
[listeners.public]
bind = "127.0.0.1:0"

[upstreams.echo]
servers = ["127.0.0.1:9001"]

[[routes]]
path_prefix = "/"
upstream = "echo"
"#;

/// Runs `sluice SUBCOMMAND PATH` (killed after 10 s) and returns its output.
fn sluice(subcommand: &str, path: &Path) -> Output {
    let mut child = sluice_command(subcommand, path)
        .spawn()
        .expect("spawn sluice");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("poll sluice").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sluice {subcommand} did not finish within 10s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("sluice output")
}

/// Writes `config`, runs `sluice SUBCOMMAND` on it, and asserts exit 1, nothing on stdout,
/// and exactly the line `error: PATH:` + `located` on stderr.
fn assert_fails(subcommand: &str, config: &str, located: &str) {
    let dir = TempDir::new();
    let path = dir.write("sluice.toml", config);
    assert_fails_at(
        subcommand,
        &path,
        &format!("error: {}:{located}", path.display()),
    );
}

/// Runs `sluice SUBCOMMAND PATH` and asserts exit 1 without a panic, nothing on stdout,
/// and the line `expected` on stderr.
fn assert_fails_at(subcommand: &str, path: &Path, expected: &str) {
    let out = sluice(subcommand, path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.lines().any(|l| l == expected),
        "expected the line\n{expected}\non stderr, got:\n{stderr}"
    );
}

#[test]
fn check_accepts_a_valid_config() {
    let dir = TempDir::new();
    let path = dir.write("sluice.toml", BASE);
    let out = sluice("check", &path);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}: ok\n", path.display())
    );
}

#[test]
fn check_opens_capture_and_access_files_and_leaves_none_behind() {
    fn with_capture(file: &str) -> String {
        BASE.replace("[[routes]]\n", "[[routes]]\nname = \"main\"\n")
            + &format!("capture = {{ file = {file:?} }}\n")
    }
    fn with_access(file: &str) -> String {
        format!("{BASE}\n[log]\naccess_file = {file:?}\n")
    }
    /// A config naming a file, the file's name, and how an error names it.
    type Case = (fn(&str) -> String, &'static str, &'static str);
    let cases: [Case; 2] = [
        (with_capture, "capture.jsonl", "route `main`: capture file"),
        (with_access, "access.log", "log.access_file: cannot open"),
    ];
    let dir = TempDir::new();
    for (config, name, names) in cases {
        // A file that cannot be created: what it is and where are named.
        let path = dir.write("sluice.toml", &config(&format!("missing-dir/{name}")));
        let file = dir.path().join("missing-dir").join(name);
        assert_fails_at(
            "check",
            &path,
            &format!(
                "error: {}: {names} {}: No such file or directory (os error 2)",
                path.display(),
                file.display()
            ),
        );
        // One that can: accepted, and not left behind.
        let path = dir.write("sluice.toml", &config(name));
        let out = sluice("check", &path);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert!(!dir.path().join(name).exists(), "{name}");
        // One that exists is kept as it is.
        dir.write(name, "{}\n");
        let out = sluice("check", &path);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let kept = std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(kept, "{}\n", "{name}");
    }
}

#[test]
fn check_reports_an_unknown_field_with_file_line_and_field() {
    assert_fails(
        "check",
        &BASE.replace("servers = [", "serverz = 1\nservers = ["),
        "6:1: upstreams.echo.serverz: unknown field `serverz`, expected one of `servers`, \
         `balance`, `hash_key`, `connect_timeout`, `max_fails`, `fail_timeout`, `health`, `tls`",
    );
}

#[test]
fn check_and_run_report_a_bad_duration() {
    for subcommand in ["check", "run"] {
        assert_fails(
            subcommand,
            &format!("{BASE}idle_timeout = \"3 weeks\"\n"),
            "11:16: routes[0].idle_timeout: expected a duration such as \"30s\", \"500ms\" \
             or \"1h\", got \"3 weeks\"",
        );
    }
}

#[test]
fn check_reports_an_overflowing_duration_or_size_instead_of_panicking() {
    for duration in ["18446744073709551615s1s", "9999999999999999h"] {
        assert_fails(
            "check",
            &format!("{BASE}idle_timeout = \"{duration}\"\n"),
            &format!("11:16: routes[0].idle_timeout: must be at most 365d, got \"{duration}\""),
        );
    }
    assert_fails(
        "check",
        &BASE.replace(
            "bind = \"127.0.0.1:0\"",
            "bind = \"127.0.0.1:0\"\nmax_header_size = \"99999999999999999GiB\"",
        ),
        "4:19: listeners.public.max_header_size: must be at most 1TiB, got \"99999999999999999GiB\"",
    );
}

#[test]
fn check_reports_an_unknown_upstream() {
    assert_fails(
        "check",
        &format!("{BASE}\n[[routes]]\npath_prefix = \"/x\"\nupstream = \"nope\"\n"),
        "14:12: routes[1].upstream: unknown upstream `nope` (defined: echo)",
    );
}

#[test]
fn check_reports_a_missing_file() {
    let dir = TempDir::new();
    let path = dir.path().join("missing.toml");
    assert_fails_at(
        "check",
        &path,
        &format!(
            "error: {}: cannot read config: No such file or directory (os error 2)",
            path.display()
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reports_every_listener_once_and_serves_on_each() {
    let (_backend, mut gateway) = start_echo_gateway(|c| {
        c.extra(
            "[listeners.admin]\nbind = \"127.0.0.1:0\"\n\n\
             [[routes]]\nname = \"admin\"\nlisteners = [\"admin\"]\npath_prefix = \"/admin\"\n\
             status = 200\nbody = \"admin ok\"\n",
        )
    })
    .await;
    let (public, admin) = (gateway.listener("public"), gateway.listener("admin"));
    assert_ne!(public, admin);
    assert!(public.ip().is_loopback() && public.port() != 0);
    assert!(admin.ip().is_loopback() && admin.port() != 0);

    assert_answered(admin, &Head::get("/admin/status"), "admin ok").await;
    // The admin route is bound to its listener: on `public` the catch-all route answers.
    assert_answered(public, &Head::get("/admin/status"), "a").await;
    let mut ws = ws_connect(public, "/").await;
    assert_eq!(whoami(&mut ws).await, "a");
    close_ws(ws).await;

    // Everything the process ever printed, once it has exited and its stdout has ended.
    let status = gateway.terminate().await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let stdout = gateway.stdout_lines();
    assert_eq!(
        stdout.len(),
        2,
        "one line per listener, then quiet: {stdout:?}"
    );
    assert!(
        stdout.contains(&format!("listening public {public}")),
        "{stdout:?}"
    );
    assert!(
        stdout.contains(&format!("listening admin {admin}")),
        "{stdout:?}"
    );
}

/// A config with two pools, `echo` (backend a) and `other` (backend b), whose main route
/// uses `pool`.
fn two_pool_config(a: &Backend, b: &Backend, pool: &str) -> String {
    ConfigBuilder::new(&[a.addr])
        .route_upstream(pool)
        .extra(&format!("[upstreams.other]\nservers = [\"{}\"]\n", b.addr))
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_file_logs_an_error_and_keeps_serving() {
    let backends = Backend::start_many(2).await;
    let gateway = Gateway::start(&two_pool_config(&backends[0], &backends[1], "echo")).await;
    let (mut tunnel, name) = ws_whoami(gateway.addr(), "/", &[]).await;
    assert_eq!(name, "a");

    // Broken (bad duration), and it would route to `b` if it were applied.
    let broken = two_pool_config(&backends[0], &backends[1], "other").replace(
        "upstream = \"other\"",
        "upstream = \"other\"\nidle_timeout = \"3 weeks\"",
    );
    gateway.reload(&broken);
    let path = gateway.config_path().display().to_string();
    gateway
        .wait_log("an error about the broken config", |l| {
            l["level"] == "ERROR" && l.to_string().contains(&path)
        })
        .await;

    assert_eq!(
        whoami(&mut tunnel).await,
        "a",
        "the open tunnel is untouched"
    );
    for _ in 0..3 {
        let (ws, name) = ws_whoami(gateway.addr(), "/", &[]).await;
        assert_eq!(name, "a", "new connections still use the old config");
        close_ws(ws).await;
    }
    assert_answered(gateway.addr(), &Head::get("/"), "a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_valid_file_moves_new_connections_and_keeps_old_tunnels() {
    let backends = Backend::start_many(2).await;
    let gateway = Gateway::start(&two_pool_config(&backends[0], &backends[1], "echo")).await;
    let (mut tunnel, name) = ws_whoami(gateway.addr(), "/", &[]).await;
    assert_eq!(name, "a");

    gateway.reload(&two_pool_config(&backends[0], &backends[1], "other"));
    // Logged once the new config is in place: every connection made after it uses it.
    gateway
        .wait_log("the reload", |l| l["message"] == "config reloaded")
        .await;
    for _ in 0..3 {
        let (ws, name) = ws_whoami(gateway.addr(), "/", &[]).await;
        assert_eq!(name, "b", "a new connection after the reload");
        close_ws(ws).await;
    }

    assert_eq!(
        whoami(&mut tunnel).await,
        "a",
        "the tunnel opened before the reload stays up"
    );
    assert_answered(gateway.addr(), &Head::get("/"), "b").await;
    close_ws(tunnel).await;
}

/// Text logs on a pipe (a log collector, systemd, a test) carry no ANSI colour codes.
#[tokio::test]
async fn text_logs_on_a_pipe_have_no_colour_codes() {
    let backend = Backend::start("a").await;
    let config = ConfigBuilder::new(&[backend.addr])
        .build()
        .replace("format = \"json\"", "format = \"text\"");
    let mut gateway = Gateway::start(&config).await;
    assert_answered(gateway.addr(), &Head::get("/"), "a").await;
    gateway.terminate().await;
    let lines = gateway.stderr_lines();
    assert!(
        lines.iter().any(|l| l.contains("sluice::access")),
        "no access line in {lines:?}"
    );
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "escape codes in {lines:?}"
    );
}
