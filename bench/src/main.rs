//! `sluice-bench`: side-by-side WebSocket benchmarks of the direct path, Sluice, nginx and
//! HAProxy, with its own load generator and echo backend. See `bench/README.md`.

mod backend;
mod client;
mod http2;
mod plugins;
mod redis;
mod relay;
mod report;
mod run;
mod scenario;
mod sys;
mod targets;
mod tls;
mod tung;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Side-by-side WebSocket benchmarks: direct, Sluice, nginx, HAProxy.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run scenarios against targets (defaults: everything, 3 repetitions).
    #[command(alias = "all")]
    Run(run::RunArgs),
    /// Print the Markdown report of a results file (`results/*.jsonl`).
    Report {
        /// A JSON-lines file written by `run`.
        file: PathBuf,
    },
    /// Write a proxy's bench config and print the command that runs it, one argument per
    /// line (used by `bench/callgrind/cg.sh`).
    #[command(hide = true)]
    Config {
        /// sluice (or a plugin target: sluice-1p, sluice-4p, sluice-4p-called,
        /// sluice-4p-floor), nginx or haproxy.
        target: targets::Target,
        /// The echo backend's address.
        #[arg(long)]
        backend: SocketAddr,
        /// Address the proxy listens on.
        #[arg(long)]
        listen: SocketAddr,
        /// Directory for the config, pid file and logs.
        #[arg(long)]
        dir: PathBuf,
        /// The sluice executable.
        #[arg(long, default_value = "target/dist/sluice")]
        sluice: PathBuf,
        /// nginx without its master process, HAProxy without master-worker.
        #[arg(long)]
        single_process: bool,
        /// Listen with TLS: a throw-away CA and certificate are written into DIR
        /// (`ca.pem` is what `drive --tls-ca` trusts).
        #[arg(long)]
        tls: bool,
        /// Directory of the plugin components of a plugin target.
        #[arg(long, default_value = "target/plugins")]
        plugins: PathBuf,
    },
    /// The echo backend (started by `run` as a separate process).
    #[command(hide = true)]
    Backend {
        /// Address to listen on; prints `listening ADDR` when ready.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Runtime threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Which echo server: `bench` (the bench's own) or `tungstenite`.
        #[arg(long, default_value = "bench")]
        ws: scenario::Pair,
    },
    /// Makes N handshake cycles (connect, upgrade, close handshake, the server's TCP end)
    /// through ADDR, C at a time, with a pair's client; exits non-zero on any error (used by
    /// `bench/callgrind/cg.sh` and `bench/counts.sh`).
    #[command(hide = true)]
    Drive {
        /// Where to connect.
        addr: SocketAddr,
        /// Handshake cycles to make.
        n: usize,
        /// Cycles in flight at a time.
        c: usize,
        /// Which client: `bench` (the bench's own) or `tungstenite`.
        #[arg(long, default_value = "bench")]
        ws: scenario::Pair,
        /// Speak TLS (full TLS 1.3 handshakes), trusting the CA certificate in this PEM
        /// file (the bench pair only).
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// Send what this target's plugin chain needs to admit the upgrade, as `run`
        /// does (`sluice-4p-called`: a new token and origin every time).
        #[arg(long, default_value = "sluice")]
        target: targets::Target,
    },
    /// The `floor` target: a plain TCP relay doing one `recv` and one `send` per event
    /// (started by `run`).
    #[command(hide = true)]
    Relay {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// The echo backend's address.
        #[arg(long)]
        upstream: SocketAddr,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Relay on io_uring instead of `epoll` (the `floor-uring` target).
        #[arg(long)]
        uring: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Run(args) => run::run(args),
        Cmd::Report { file } => run::report(&file),
        Cmd::Config {
            target,
            backend,
            listen,
            dir,
            sluice,
            single_process,
            tls,
            plugins,
        } => targets::print_command(
            target,
            backend,
            listen,
            dir,
            sluice,
            targets::ConfigOptions {
                single_process,
                tls,
                plugins,
            },
        ),
        Cmd::Backend {
            listen,
            threads,
            ws,
        } => backend::serve(listen, threads, ws),
        Cmd::Drive {
            addr,
            n,
            c,
            ws,
            tls_ca,
            target,
        } => scenario::drive(addr, n, c, ws, tls_ca.as_deref(), target),
        Cmd::Relay {
            listen,
            upstream,
            workers,
            uring,
        } => {
            if uring {
                sys::raise_nofile_limit();
                Ok(sluice_bench_uring::serve(listen, upstream, workers)?)
            } else {
                relay::serve(listen, upstream, workers)
            }
        }
    }
}
