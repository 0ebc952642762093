//! The `sluice` command: `sluice run CONFIG` serves, `sluice check CONFIG` validates.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::config::Config;

/// mimalloc rather than glibc's malloc: less CPU per upgrade and less memory per idle
/// tunnel, measured by the bench (bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A WebSocket-first programmable gateway.
#[derive(Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with this config (SIGHUP reloads it, SIGUSR1 reopens the access log,
    /// SIGTERM/SIGINT drain and stop).
    Run {
        /// Path to the TOML config.
        config: PathBuf,
    },
    /// Validate a config without serving (exit 1 and a located message if invalid).
    Check {
        /// Path to the TOML config.
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (Command::Run { config: path } | Command::Check { config: path }) = &cli.command;
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The control loop (signals, reloads, health checks, plugin compiles on its blocking
    // pool); connections are served by `[runtime] workers` threads of their own.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Check { .. } = cli.command {
        // TLS settings built and plugins compiled and their `init` run, as `run` would.
        if let Err(e) = runtime.block_on(sluice::snapshot::Snapshot::check(&config)) {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    let logs = match sluice::control::init_logging(&config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sluice::control::run(path.clone(), config, logs)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "sluice stopped with an error");
            eprintln!("error: {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}
