//! The session: start the backend, then for each repetition, scenario and target start a
//! fresh target, run the scenario, stop the target and record one JSON line; finally
//! print and save the Markdown report.

use std::collections::{BTreeMap, btree_map};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde::Serialize;

use crate::backend::Backend;
use crate::report::{self, RunRecord};
use crate::scenario::{self, Params, Probe, Scenario};
use crate::targets::{self, Env, Limits, Target};
use crate::{plugins, sys};

/// Options of `sluice-bench run` (alias `all`); the defaults run everything.
#[derive(Debug, Clone, Args, Serialize)]
pub struct RunArgs {
    /// Targets, comma-separated: direct, sluice, sluice-b, sluice-1p, sluice-4p,
    /// sluice-4p-called, sluice-4p-floor, sluice-limits, sluice-limits-redis, nginx,
    /// haproxy, floor, floor-uring (sluice-b: the `--sluice-b` build, configured as sluice;
    /// sluice-1p/-4p: Sluice with a 1- or 4-plugin policy chain; sluice-4p-called: the
    /// 4-plugin chain with decision reuse off; sluice-4p-floor: four plugins called the same
    /// way that only allow, the price of the calls alone; sluice-limits: the route in a
    /// tenant with tenant and per-address limits none reaches; sluice-limits-redis: the
    /// same shared through a `redis-server` the bench starts; floor: a plain TCP relay with
    /// no protocol work, the kernel's share of relaying; floor-uring: that relay on
    /// io_uring; these nine are not in the default set).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,sluice,nginx,haproxy"
    )]
    pub targets: Vec<Target>,
    /// Scenarios, comma-separated: echo-SIZE (e.g. echo-32, echo-16k), handshake,
    /// handshake-tungstenite, idle, over TLS wss-echo-SIZE, wss-handshake, wss-idle, and
    /// WebSockets over HTTP/2 h2-echo-SIZE, h2-idle.
    /// `handshake` runs the bench's own client and echo
    /// backend; `handshake-tungstenite` the same cycle with tokio-tungstenite on both ends
    /// (`client_async` with tungstenite's own request head, then `close` and read to the
    /// end; an `accept_async` echo server in its own process that answers the Close and
    /// drops the connection, so the server ends TCP first). `wss-*`: the proxy
    /// terminates TLS (a full TLS 1.3 handshake per connection, a throw-away ECDSA P-256
    /// certificate per run) and proxies to the same plain echo backend; targets without
    /// TLS (direct, floor, floor-uring) skip them. `h2-*`: each WebSocket is an RFC 8441
    /// extended CONNECT stream, many to one HTTP/2 connection over TLS (ALPN h2), made
    /// an HTTP/1.1 upgrade to the echo backend by the proxy; only Sluice and HAProxy run
    /// them (nginx has no RFC 8441: its row says so).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "echo-32,echo-16k,handshake,handshake-tungstenite,idle,wss-echo-32,wss-echo-16k,wss-handshake,wss-idle,h2-echo-32,h2-echo-16k,h2-idle"
    )]
    pub scenarios: Vec<Scenario>,
    /// Repetitions of every scenario and target; the report shows medians.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Measured window of echo and handshake runs, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Warm-up before each measured window, in seconds.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Connections in the echo loop.
    #[arg(long, default_value_t = 64)]
    pub echo_conns: usize,
    /// Concurrent connect-upgrade-close workers.
    #[arg(long, default_value_t = 32)]
    pub handshake_conns: usize,
    /// Tunnels held open in the idle scenario.
    #[arg(long, default_value_t = 9000)]
    pub tunnels: usize,
    /// Concurrency for opening and pinging idle tunnels.
    #[arg(long, default_value_t = 64)]
    pub idle_conns: usize,
    /// HTTP/2 connections the h2-echo-* WebSockets (--echo-conns of them) are spread
    /// over; h2-idle opens one per 100 tunnels (both proxies' default stream limit).
    #[arg(long, default_value_t = 4)]
    pub h2_conns: usize,
    /// Worker threads (Sluice, HAProxy) or worker processes (nginx) of every proxy.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Start nginx and HAProxy with `TCP_DEFER_ACCEPT` too (`listen … deferred`,
    /// `bind … defer-accept`), as Sluice always listens; their standard recipes leave it off.
    #[arg(long)]
    pub peers_defer_accept: bool,
    /// Threads of the load generator (1 = a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub loadgen_threads: usize,
    /// Threads of the echo backend process.
    #[arg(long, default_value_t = 1)]
    pub backend_threads: usize,
    /// A second sluice executable, run as the `sluice-b` target with the same config as
    /// `sluice`: A/B of two builds in one run, interleaved, with B ÷ A per repetition in
    /// the report (e.g. `--targets sluice,sluice-b --sluice-b /tmp/sluice-new`).
    #[arg(long)]
    pub sluice_b: Option<PathBuf>,
    /// The sluice executable [default: `sluice` beside this program].
    #[arg(long)]
    pub sluice: Option<PathBuf>,
    /// Directory of the plugin components for sluice-1p and sluice-4p (built by
    /// `plugins/build.sh`).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/plugins"))]
    pub plugins: PathBuf,
    /// Directory for JSON lines, reports and profiles.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    pub out: PathBuf,
    /// Record each proxy's measured window with `perf record` (slows the proxy: for
    /// finding where CPU goes, not for the table).
    #[arg(long)]
    pub perf: bool,
    /// Quick look: 1 repetition, 3 s windows, 1 s warm-up, 1,000 idle tunnels.
    #[arg(long)]
    pub quick: bool,
}

impl RunArgs {
    fn apply_quick(&mut self) {
        if self.quick {
            self.reps = 1;
            self.duration = 3.0;
            self.warmup = 1.0;
            self.tunnels = self.tunnels.min(1000);
        }
    }

    fn params(&self) -> Params {
        Params {
            warmup: Duration::from_secs_f64(self.warmup),
            duration: Duration::from_secs_f64(self.duration),
            echo_conns: self.echo_conns,
            handshake_conns: self.handshake_conns,
            tunnels: self.tunnels,
            idle_conns: self.idle_conns,
            h2_conns: self.h2_conns,
        }
    }
}

/// Runs the session described by `args`.
pub fn run(mut args: RunArgs) -> Result<()> {
    args.apply_quick();
    ensure!(
        args.reps >= 1 && args.duration > 0.0 && args.workers >= 1 && args.h2_conns >= 1,
        "reps, duration, workers and h2-conns must be positive"
    );
    let nofile = sys::raise_nofile_limit();
    ensure!(
        (args.tunnels + args.echo_conns + 200) as u64 <= nofile,
        "{} tunnels need more descriptors than this process may open ({nofile})",
        args.tunnels
    );
    let sluice_bin = match &args.sluice {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("sluice"),
    };
    if args.targets.iter().any(|t| t.is_sluice()) && !sluice_bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p sluice`, pass --sluice PATH, or leave sluice out of --targets",
            sluice_bin.display()
        );
    }
    if args.targets.contains(&Target::SluiceB) {
        match &args.sluice_b {
            Some(b) if b.exists() => {}
            Some(b) => bail!("{} not found (--sluice-b)", b.display()),
            None => bail!("the sluice-b target needs --sluice-b PATH"),
        }
    }
    let plugin_dir = plugin_dir(&args)?;
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let started = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let stamp = format!("run-{started}");
    let jsonl_path = args.out.join(format!("{stamp}.jsonl"));
    let mut jsonl = fs::File::create(&jsonl_path)?;

    // One echo backend process per client/server pair the scenarios use.
    let mut backends = BTreeMap::new();
    for pair in args.scenarios.iter().map(|s| s.pair()) {
        if let btree_map::Entry::Vacant(slot) = backends.entry(pair) {
            slot.insert(Backend::spawn(args.backend_threads, pair)?);
        }
    }
    let first = backends.values().next().context("no scenario")?;
    let work_dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    fs::create_dir_all(&work_dir)?;
    // One Redis server for the session when a target shares its limits through one.
    let redis = match args.targets.iter().any(|t| t.limits() == Limits::Redis) {
        true => Some(crate::redis::Server::start(&work_dir.join("redis"))?),
        false => None,
    };
    // One throw-away CA and server certificate per run, for every TLS target.
    let pki = if args.scenarios.iter().any(|s| s.tls) {
        Some(crate::tls::Pki::generate(&work_dir.join("tls"))?)
    } else {
        None
    };
    let mut env = Env {
        backend: first.addr,
        backend_pid: first.pid(),
        workers: args.workers,
        sluice_bin: sluice_bin.clone(),
        sluice_b_bin: args
            .sluice_b
            .as_ref()
            .map(std::path::absolute)
            .transpose()?,
        work_dir: work_dir.clone(),
        plugin_dir,
        token: plugins::token(),
        peers_defer_accept: args.peers_defer_accept,
        pki,
        redis: redis.as_ref().map(|r| (r.addr, r.pid())),
    };

    let meta = serde_json::json!({
        "type": "meta",
        "started_unix": started,
        "machine": machine(),
        "versions": {
            "sluice": sys::version_of(&sluice_bin.to_string_lossy(), &["--version"]),
            "nginx": sys::version_of("nginx", &["-v"]),
            "haproxy": sys::version_of("haproxy", &["-v"]),
            "redis": redis.as_ref().map(|_| sys::version_of("redis-server", &["--version"])),
            "kernel": sys::version_of("uname", &["-r"]),
            "nginx_openssl": sys::line_of("nginx", &["-V"], "OpenSSL"),
            "haproxy_openssl": sys::line_of("haproxy", &["-vv"], "Running on OpenSSL"),
        },
        "open_file_limit": nofile,
        "settings": &args,
    });
    writeln!(jsonl, "{meta}")?;
    println!("{meta}");

    let rt = sys::runtime(args.loadgen_threads)?;
    let params = args.params();
    let mut records = Vec::new();
    for rep in 1..=args.reps {
        // Rotate the target order each repetition so no target always runs first.
        let mut order = args.targets.clone();
        let turn = (rep - 1) % order.len().max(1);
        order.rotate_left(turn);
        for &scenario in &args.scenarios {
            let backend = &backends[&scenario.pair()];
            env.backend = backend.addr;
            env.backend_pid = backend.pid();
            for &target in &order {
                if scenario.tls && !target.supports_tls() {
                    if rep == 1 {
                        eprintln!(
                            "[rep {rep}/{}] {scenario}: {target} has no TLS, skipped",
                            args.reps
                        );
                    }
                    continue;
                }
                if scenario.h2 && !target.supports_h2() {
                    // nginx gets a row that says why it has no figures.
                    if rep == 1 {
                        eprintln!(
                            "[rep {rep}/{}] {scenario}: {target} {}, skipped",
                            args.reps,
                            targets::H2_UNSUPPORTED
                        );
                        let conns = params.conns(scenario);
                        let record = RunRecord::not_run(
                            rep,
                            scenario,
                            target,
                            conns,
                            targets::H2_UNSUPPORTED,
                        );
                        let line = serde_json::to_string(&record)?;
                        writeln!(jsonl, "{line}")?;
                        println!("{line}");
                        records.push(record);
                    }
                    continue;
                }
                eprintln!("[rep {rep}/{}] {scenario} via {target}", args.reps);
                let conns = params.conns(scenario);
                let perf = (args.perf && target != Target::Direct).then(|| {
                    args.out
                        .join(format!("{stamp}-{scenario}-{target}-rep{rep}.perf.data"))
                });
                let record = run_one(&rt, &env, &params, scenario, target, perf)
                    .map(|outcome| RunRecord::new(rep, scenario, target, conns, &outcome))
                    .unwrap_or_else(|e| {
                        eprintln!("  failed: {e:#}");
                        RunRecord::failed(rep, scenario, target, conns, Some(format!("{e:#}")))
                    });
                let line = serde_json::to_string(&record)?;
                writeln!(jsonl, "{line}")?;
                println!("{line}");
                records.push(record);
                // Let sockets in TIME_WAIT and the backend's closing tasks settle.
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    drop(backends);
    drop(redis);
    let _ = fs::remove_dir_all(&work_dir);

    let md = report::markdown(&records);
    println!("\n{md}");
    let md_path = args.out.join(format!("{stamp}.md"));
    fs::write(&md_path, &md)?;
    fs::write(args.out.join("latest.md"), &md)?;
    fs::copy(&jsonl_path, args.out.join("latest.jsonl"))?;
    eprintln!("wrote {} and {}", jsonl_path.display(), md_path.display());
    Ok(())
}

/// Starts `target`, runs `scenario` through it, and stops it.
fn run_one(
    rt: &tokio::runtime::Runtime,
    env: &Env,
    params: &Params,
    scenario: Scenario,
    target: Target,
    perf: Option<PathBuf>,
) -> Result<scenario::Outcome> {
    let running = targets::start(target, env, scenario.tls, scenario.h2)?;
    let redis = env.redis.filter(|_| target.limits() == Limits::Redis);
    let mut probe = Probe::new(running.pid(), env.backend_pid, perf).with_redis(redis);
    let outcome = rt.block_on(scenario::run(
        scenario,
        &running.endpoint,
        params,
        &mut probe,
    ))?;
    running.stop()?;
    Ok(outcome)
}

/// The plugin directory made absolute (the generated configs name plugins by absolute
/// path); when a plugin target is selected, every component its chain loads must exist.
fn plugin_dir(args: &RunArgs) -> Result<PathBuf> {
    let longest = args.targets.iter().map(|t| t.plugins()).max().unwrap_or(0);
    if longest == 0 {
        return Ok(std::path::absolute(&args.plugins)?);
    }
    let dir = fs::canonicalize(&args.plugins).with_context(|| {
        format!(
            "plugin directory {} (run `bash plugins/build.sh`, or pass --plugins DIR)",
            args.plugins.display()
        )
    })?;
    let floor = args.targets.iter().any(|t| t.floor_chain());
    let files = plugins::CHAIN[..longest].iter().map(|(_, file)| *file);
    for file in files.chain(floor.then_some(plugins::FLOOR_FILE)) {
        let path = dir.join(file);
        ensure!(
            path.is_file(),
            "{} not found: run `bash plugins/build.sh`, or pass --plugins DIR",
            path.display()
        );
    }
    Ok(dir)
}

/// Re-renders the Markdown report from a JSON-lines results file.
pub fn report(path: &Path) -> Result<()> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}:{}", path.display(), i + 1))?;
        if value["type"] == "run" {
            records.push(serde_json::from_value::<RunRecord>(value)?);
        }
    }
    println!("{}", report::markdown(&records));
    Ok(())
}

/// CPU model and count, memory, for the meta line.
fn machine() -> serde_json::Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name")?
            .split_once(':')
            .map(|(_, m)| m.trim().to_string())
    });
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = meminfo.lines().find_map(|l| {
        l.strip_prefix("MemTotal:")?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    });
    serde_json::json!({
        "cpu": model,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "mem_kib": mem_kib,
    })
}
