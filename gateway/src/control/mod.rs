//! The control loop: binds the listeners, starts the worker threads that serve
//! connections and the admin listener, reloads on SIGHUP, `POST /reload` or a watched
//! file's change, reopens the access log and capture files on SIGUSR1, and drains on
//! SIGTERM/SIGINT or `POST /drain`. It runs on its own runtime, off the request path;
//! the state it shares with the stages is in `state`.

mod listeners;
mod logs;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin};
use crate::config::{Config, ConfigError};
use crate::snapshot::LoadError;
use crate::state::{Command, Gateway, ReloadEvent, Trigger};
use listeners::{Listeners, Workers};
pub use logs::{LogError, Logs, check_files as check_log_files, init as init_logging};
use watch::Watch;

/// Why the gateway could not start, or why a reload was refused (the running config
/// serves on). Each message names what failed: the file, listener or address.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The config file could not be read or is not valid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The snapshot could not be built (TLS, a plugin, a capture file).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The logs could not follow the config.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The config asks for another number of workers.
    #[error("{}: runtime.workers: changing the number of workers needs a restart", path.display())]
    Workers {
        /// The config file.
        path: PathBuf,
    },
    /// A listener's address could not be bound.
    #[error("listener `{listener}`: cannot bind {addr}: {source}")]
    BindListener {
        /// The listener.
        listener: String,
        /// Its address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The admin address could not be bound.
    #[error("admin: cannot bind {addr}: {source}")]
    BindAdmin {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A worker could not start accepting on a bound listener.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The listener's address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A worker thread is gone.
    #[error("a worker thread has stopped")]
    WorkerStopped,
    /// The signal handlers could not be installed.
    #[error("cannot handle signals: {0}")]
    Signals(std::io::Error),
    /// The `listening NAME ADDR` line could not be written to stdout.
    #[error("cannot write `listening` to stdout: {0}")]
    Announce(std::io::Error),
    /// The worker threads could not be started.
    #[error("cannot start the worker threads: {0}")]
    Threads(std::io::Error),
}

/// Runs the gateway until SIGTERM/SIGINT or `POST /drain`, then drains tunnels for the
/// configured grace.
///
/// The calling runtime only handles signals, reloads, the admin listener, the file watch
/// and health checks. Connections are served by `config.workers` threads, each running
/// its own single-threaded event loop with its own socket per listener (`SO_REUSEPORT`):
/// a connection, its upstream and its tunnel stay on the thread that accepted it, so no
/// wake-up crosses threads, as in nginx and HAProxy.
pub async fn run(path: PathBuf, config: Config, logs: Logs) -> Result<(), ControlError> {
    // Handlers first: a signal that arrives once `listening` is printed must be handled,
    // not take its default action and kill the process.
    let handler = |kind| signal(kind).map_err(ControlError::Signals);
    let mut hup = handler(SignalKind::hangup())?;
    let mut term = handler(SignalKind::terminate())?;
    let mut int = handler(SignalKind::interrupt())?;
    let mut usr1 = handler(SignalKind::user_defined1())?;
    raise_open_files_limit();

    let (commands, mut requests) = mpsc::channel(8);
    let mut listeners = Listeners::default();
    let staged = listeners.stage(&config, config.workers)?;
    let admin_listener = match &config.admin {
        Some(a) => Some(bind_admin(a.bind)?),
        None => None,
    };
    // The watch starts before the listeners announce `listening`: a file replaced once
    // the gateway is up must be seen, however soon after.
    let mut watch = start_watch(config.reload, &watched_files(&path, &config), &commands);
    let gw = Arc::new(
        Gateway::start(
            config,
            staged.names(),
            Arc::default(),
            Some(commands.clone()),
        )
        .await?,
    );
    let done = CancellationToken::new();
    let workers =
        Workers::start(gw.snapshot().config.workers, &gw, &done).map_err(ControlError::Threads)?;
    if let Err(e) = listeners.commit(staged, &workers).await {
        done.cancel();
        return Err(e);
    }
    let mut admin = admin_listener.map(|l| Admin::start(gw.clone(), l));
    gw.record_reload(ReloadEvent {
        at: SystemTime::now(),
        trigger: Trigger::Start,
        generation: 1,
        error: None,
        duration: std::time::Duration::ZERO,
    });

    let mut control = Control {
        path,
        gw: gw.clone(),
        logs,
        listeners,
        workers: &workers,
    };
    loop {
        let (trigger, reply) = tokio::select! {
            _ = hup.recv() => (Trigger::Signal, None),
            _ = usr1.recv() => {
                control.logs.reopen();
                control.reopen_captures();
                continue;
            }
            c = requests.recv() => match c {
                Some(Command::Reload { trigger, reply }) => (trigger, reply),
                Some(Command::Drain) | None => break,
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let event = {
            let path = control.path.clone();
            // The files the config names are watched from when it is read: a file written
            // while the reload loads, or fixed after a reload that failed on it, reloads.
            let mut learn = |config: &Config| {
                if let Some(w) = &mut watch {
                    w.add(&watched_files(&path, config));
                }
            };
            control.reload(trigger, &mut admin, &mut learn).await
        };
        if event.error.is_none() {
            let config = &gw.snapshot().config;
            let files = watched_files(&control.path, config);
            match &mut watch {
                Some(w) if config.reload.watch && w.debounce() == config.reload.debounce => {
                    w.set(&files);
                }
                _ => watch = start_watch(config.reload, &files, &commands),
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(event);
        }
    }
    drop(watch);

    let grace = gw.snapshot().config.shutdown_grace;
    tracing::info!(grace = ?grace, "shutting down: no new connections, draining tunnels");
    gw.stopping().cancel();
    workers.accepting.close();
    workers.accepting.wait().await;
    let tracker = gw.tracker();
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::info!(
            open = tracker.len(),
            "drain deadline passed: closing tunnels"
        );
        gw.closing().cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tracker.wait()).await;
    }
    done.cancel();
    workers.join().await;
    if let Some(a) = admin {
        a.stop();
    }
    gw.snapshot().retire();
    tracing::info!("stopped");
    Ok(())
}

/// Binds the admin address (before a reload is published, so a failure refuses it).
fn bind_admin(addr: SocketAddr) -> Result<tokio::net::TcpListener, ControlError> {
    admin::bind(addr).map_err(|source| ControlError::BindAdmin { addr, source })
}

/// The files whose change reloads `config`: the config file itself and what it reads.
fn watched_files(path: &Path, config: &Config) -> Vec<PathBuf> {
    let mut files = config.watched_files();
    files.push(path.to_owned());
    files
}

fn start_watch(
    cfg: crate::config::ReloadConfig,
    files: &[PathBuf],
    commands: &mpsc::Sender<Command>,
) -> Option<Watch> {
    if !cfg.watch {
        return None;
    }
    match Watch::start(files, cfg.debounce, commands.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch files for changes; reload with SIGHUP or POST /reload");
            None
        }
    }
}

/// What a reload changes besides the snapshot.
struct Control<'a> {
    path: PathBuf,
    gw: Arc<Gateway>,
    logs: Logs,
    listeners: Listeners,
    workers: &'a Workers,
}

impl Control<'_> {
    /// Opens every capture file again at its path (SIGUSR1), each once however many
    /// routes write to it.
    fn reopen_captures(&self) {
        let snapshot = self.gw.snapshot();
        let mut done: Vec<&std::path::Path> = Vec::new();
        for capture in snapshot.routes.iter().filter_map(|r| r.capture.as_ref()) {
            let file = capture.config().file.as_path();
            if done.contains(&file) {
                continue;
            }
            done.push(file);
            match capture.reopen() {
                Ok(()) => tracing::info!(file = %file.display(), "capture reopened"),
                Err(e) => tracing::error!(
                    error = %e,
                    "capture not reopened; still writing to the old file"
                ),
            }
        }
    }

    /// Re-reads the config file and applies all of it, or none of it: everything that
    /// can fail (reading and checking the file, binding new listeners and the admin
    /// address, opening the access log, compiling and initialising changed plugins) is
    /// done before the new snapshot is published; on any error the old one keeps serving.
    async fn reload(
        &mut self,
        trigger: Trigger,
        admin: &mut Option<Admin>,
        learn: &mut dyn FnMut(&Config),
    ) -> ReloadEvent {
        let began = Instant::now();
        let result = self.try_reload(admin, learn).await;
        let generation = self.gw.snapshot().generation;
        let event = ReloadEvent {
            at: SystemTime::now(),
            trigger,
            generation,
            error: result.as_ref().err().map(ToString::to_string),
            duration: began.elapsed(),
        };
        match &event.error {
            None => {
                tracing::info!(config = %self.path.display(), trigger = trigger.as_str(), generation, "config reloaded")
            }
            Some(e) => {
                tracing::error!(error = %e, trigger = trigger.as_str(), "reload failed; still serving the previous config")
            }
        }
        self.gw.record_reload(event.clone());
        event
    }

    async fn try_reload(
        &mut self,
        admin: &mut Option<Admin>,
        learn: &mut dyn FnMut(&Config),
    ) -> Result<(), ControlError> {
        let config = Config::load(&self.path)?;
        learn(&config);
        let current = self.gw.snapshot();
        if config.workers != current.config.workers {
            return Err(ControlError::Workers {
                path: self.path.clone(),
            });
        }
        self.logs.check(&config)?;
        let access = self.logs.stage(&config)?;
        let staged = self.listeners.stage(&config, self.workers.len())?;
        let new_admin = match (&config.admin, &current.config.admin) {
            (Some(a), Some(old)) if a.bind == old.bind => None,
            (Some(a), _) => Some(bind_admin(a.bind)?),
            (None, _) => None,
        };
        let admin_off = config.admin.is_none();
        let next = self.gw.prepare(config, staged.names()).await?;
        self.logs.apply(&next.config, access);
        self.gw.publish(next);
        self.listeners.commit(staged, self.workers).await?;
        if let Some(l) = new_admin {
            if let Some(old) = admin.take() {
                old.stop();
            }
            *admin = Some(Admin::start(self.gw.clone(), l));
        } else if admin_off && let Some(old) = admin.take() {
            old.stop();
        }
        Ok(())
    }
}

/// Raises the soft limit on open files to the hard limit, as nginx's
/// `worker_rlimit_nofile` does: most systems start processes at 1,024, which would cap
/// the gateway at about 500 tunnels (each holds two sockets).
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    let soft = match setrlimit(Resource::Nofile, raised) {
        Ok(()) => limit.maximum,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
            limit.current
        }
    };
    let show = |v: Option<u64>| v.map_or("unlimited".to_owned(), |v| v.to_string());
    tracing::info!(
        soft = show(soft),
        hard = show(limit.maximum),
        "open files limit"
    );
}
