//! The process's logs: diagnostics on stderr at the config's level (changed by a reload
//! unless `RUST_LOG` sets it), and access-log events (`sluice::access`) on stderr or in
//! `[log] access_file`, which SIGUSR1 reopens so that logrotate can move it away (as
//! `nginx -s reopen`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry, reload};

use crate::access;
use crate::capture::appendable;
use crate::config::{Config, LogFormat};
use crate::sync::Hold;

/// The access-log file, when one is configured; reopened in place.
#[derive(Debug, Default)]
struct AccessFile {
    file: Mutex<Option<(PathBuf, File)>>,
}

/// Writes one formatted event to the access file (the formatter hands over whole lines).
impl Write for &AccessFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut file = self.file.hold();
        if let Some((_, f)) = file.as_mut() {
            f.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Handles on the installed log subscriber, for reloads and SIGUSR1.
pub struct Logs {
    /// Whether `RUST_LOG` set the level (a reload then leaves it).
    from_env: bool,
    stderr: reload::Handle<EnvFilter, Registry>,
    file: reload::Handle<Targets, Registry>,
    format: LogFormat,
    access: Arc<AccessFile>,
}

/// Why a log setting could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The access-log file could not be opened.
    #[error("log.access_file: cannot open {}: {source}", path.display())]
    AccessFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A setting that only a restart applies.
    #[error("log.format: changing the log format needs a restart")]
    Format,
}

/// Whether the access file `config` names can be opened, leaving nothing behind
/// (`sluice check`).
pub fn check_files(config: &Config) -> Result<(), LogError> {
    match &config.log.access_file {
        Some(path) => appendable(path).map_err(|source| LogError::AccessFile {
            path: path.clone(),
            source,
        }),
        None => Ok(()),
    }
}

fn open(path: &Path) -> Result<File, LogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| LogError::AccessFile {
            path: path.to_owned(),
            source,
        })
}

/// The stderr filter: `RUST_LOG` or the config's level, without the access events when
/// they go to a file. Both are static per call site (levels and targets only), so a
/// disabled event costs its call site one cached check, and `log` records below the
/// level are refused by `log`'s own maximum.
fn stderr_filter(from_env: bool, level: &str, to_file: bool) -> EnvFilter {
    let filter = match from_env {
        true => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level)),
        false => EnvFilter::new(level),
    };
    match (to_file, format!("{}=off", access::TARGET).parse()) {
        (true, Ok(off)) => filter.add_directive(off),
        _ => filter,
    }
}

/// The access file's filter: the access events when a file is open, else nothing.
fn file_filter(to_file: bool) -> Targets {
    match to_file {
        true => Targets::new().with_target(access::TARGET, LevelFilter::INFO),
        false => Targets::new(),
    }
}

/// Installs the log subscriber: `RUST_LOG` if set, else the config's level; text or JSON
/// lines on stderr; access events in the access file when one is configured.
pub fn init(config: &Config) -> Result<Logs, LogError> {
    let access = Arc::new(AccessFile::default());
    let to_file = match &config.log.access_file {
        Some(path) => {
            let file = open(path)?;
            *access.file.hold() = Some((path.clone(), file));
            true
        }
        None => false,
    };
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let (stderr_filter, stderr) =
        reload::Layer::new(stderr_filter(from_env, &config.log.level, to_file));
    let (file_filter, file) = reload::Layer::new(file_filter(to_file));
    // Colour only for a person at a terminal: a pipe or a log collector gets plain text.
    let on_stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let in_file = tracing_subscriber::fmt::layer()
        .with_writer(access.clone())
        .with_ansi(false);
    let layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = match config.log.format {
        LogFormat::Json => vec![
            on_stderr
                .json()
                .flatten_event(true)
                .with_filter(stderr_filter)
                .boxed(),
            in_file
                .json()
                .flatten_event(true)
                .with_filter(file_filter)
                .boxed(),
        ],
        LogFormat::Text => vec![
            on_stderr.with_filter(stderr_filter).boxed(),
            in_file.with_filter(file_filter).boxed(),
        ],
    };
    tracing_subscriber::registry().with(layers).init();
    Ok(Logs {
        from_env,
        stderr,
        file,
        format: config.log.format,
        access,
    })
}

impl Logs {
    /// Whether `config`'s log settings can be applied without a restart.
    pub fn check(&self, config: &Config) -> Result<(), LogError> {
        if config.log.format != self.format {
            return Err(LogError::Format);
        }
        Ok(())
    }

    /// The access file `config` names, opened if it differs from the current one (a
    /// reload's first step, so that a bad path refuses the reload).
    pub fn stage(&self, config: &Config) -> Result<Option<(PathBuf, File)>, LogError> {
        let current = self.access.file.hold();
        let current = current.as_ref().map(|(p, _)| p.as_path());
        match &config.log.access_file {
            Some(p) if Some(p.as_path()) != current => Ok(Some((p.clone(), open(p)?))),
            _ => Ok(None),
        }
    }

    /// Applies `config`'s level and access file (`staged` from [`Logs::stage`]).
    pub fn apply(&self, config: &Config, staged: Option<(PathBuf, File)>) {
        {
            let mut file = self.access.file.hold();
            match (staged, &config.log.access_file) {
                (Some(f), _) => *file = Some(f),
                (None, None) => *file = None,
                (None, Some(_)) => {}
            }
        }
        let to_file = config.log.access_file.is_some();
        let _ = self
            .stderr
            .reload(stderr_filter(self.from_env, &config.log.level, to_file));
        let _ = self.file.reload(file_filter(to_file));
    }

    /// Reopens the access file at its path (SIGUSR1): after logrotate renamed it, new
    /// events go to a new file at the configured path.
    pub fn reopen(&self) {
        let mut file = self.access.file.hold();
        if let Some((path, f)) = file.as_mut() {
            match open(path) {
                Ok(new) => {
                    *f = new;
                    drop(file);
                    tracing::info!("access log reopened");
                }
                Err(e) => {
                    drop(file);
                    tracing::error!(error = %e, "access log not reopened; still writing to the old file");
                }
            }
        }
    }
}
