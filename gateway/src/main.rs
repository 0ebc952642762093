//! The `sluice` command: `sluice run CONFIG` serves, `sluice check CONFIG` validates,
//! `sluice replay CONFIG CAPTURE` runs captured requests through a config's plugins.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::config::Config;
use sluice::replay::Chains;

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
    /// Serve with this config (SIGHUP reloads it, SIGUSR1 reopens the access log and
    /// capture files, SIGTERM/SIGINT drain and stop).
    Run {
        /// Path to the TOML config.
        config: PathBuf,
    },
    /// Validate a config without serving (exit 1 and a located message if invalid).
    Check {
        /// Path to the TOML config.
        config: PathBuf,
    },
    /// Run the requests of a capture file (`[routes.capture]`) through CONFIG's plugin
    /// chains offline and print each decision as a JSON line; with `--against`, print
    /// only the requests whose decisions differ between the two configs. Exit 0 when
    /// every line was replayed, 2 when some were skipped (named on stderr as
    /// CAPTURE:LINE), 1 when the replay could not run.
    Replay {
        /// Path to the TOML config whose chains decide.
        config: PathBuf,
        /// The capture file (JSON lines).
        capture: PathBuf,
        /// Another config to compare with: print only what it decides differently.
        #[arg(long, value_name = "OTHER_CONFIG")]
        against: Option<PathBuf>,
    },
}

/// Exit status of a replay that skipped some lines.
const SKIPPED_LINES: u8 = 2;

/// Loads a config or says why not.
fn load(path: &Path) -> Option<Config> {
    match Config::load(path) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("error: {e}");
            None
        }
    }
}

/// `sluice replay`: both configs loaded, their plugins started on one host, and the
/// capture replayed through them.
async fn replay(config: &Path, capture: &Path, against: Option<&Path>) -> ExitCode {
    let Some(main) = load(config) else {
        return ExitCode::FAILURE;
    };
    let other = match against {
        Some(path) => match load(path) {
            Some(c) => Some((path, c)),
            None => return ExitCode::FAILURE,
        },
        None => None,
    };
    let run = async {
        let host = sluice::plugin::PluginHost::new().map_err(|e| e.to_string())?;
        let main = Chains::load(config, &main, &host)
            .await
            .map_err(|e| e.to_string())?;
        let other = match &other {
            Some((path, c)) => Some(
                Chains::load(path, c, &host)
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        sluice::replay::replay(
            &main,
            other.as_ref(),
            capture,
            &mut out,
            &mut std::io::stderr(),
        )
        .await
        .map_err(|e| e.to_string())
    };
    match run.await {
        Ok(summary) if summary.skipped > 0 => ExitCode::from(SKIPPED_LINES),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let path = match &cli.command {
        Command::Run { config } | Command::Check { config } => config,
        Command::Replay {
            config,
            capture,
            against,
        } => return runtime.block_on(replay(config, capture, against.as_deref())),
    };
    let Some(config) = load(path) else {
        return ExitCode::FAILURE;
    };
    if let Command::Check { .. } = cli.command {
        // TLS settings built, plugins compiled and their `init` run, and the capture and
        // access files opened, as `run` would.
        let checked = runtime
            .block_on(sluice::snapshot::Snapshot::check(&config))
            .map_err(|e| e.to_string())
            .and_then(|()| sluice::control::check_log_files(&config).map_err(|e| e.to_string()));
        if let Err(e) = checked {
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
