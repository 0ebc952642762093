//! The control loop: binds the listeners, starts the worker threads that serve
//! connections, reloads on SIGHUP and drains on SIGTERM/SIGINT. It runs on its own
//! runtime, off the request path; the state it shares with the stages is in `state`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept;
use crate::config::{Config, LogFormat};
use crate::state::Gateway;

/// Runs the gateway until SIGTERM/SIGINT, then drains tunnels for the configured grace.
///
/// The calling runtime only handles signals, reloads and health checks. Connections are
/// served by `config.workers` threads, each running its own single-threaded event loop
/// with its own socket per listener (`SO_REUSEPORT`): a connection, its upstream and its
/// tunnel stay on the thread that accepted it, so no wake-up crosses threads, as in
/// nginx and HAProxy.
pub async fn run(path: PathBuf, config: Config) -> anyhow::Result<()> {
    let grace = config.shutdown_grace;
    let workers = config.workers;
    // Handlers first: a signal that arrives once `listening` is printed must be handled,
    // not take its default action and kill the process.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    // Every worker's socket set, and what to print once they all listen.
    let mut per_worker: Vec<Vec<WorkerSocket>> = (0..workers).map(|_| Vec::new()).collect();
    let mut listening = Vec::new();
    for l in &config.listeners {
        let sockets = accept::bind(l.bind, workers)
            .map_err(|e| anyhow::anyhow!("listener `{}`: cannot bind {}: {e}", l.name, l.bind))?;
        let name: Arc<str> = l.name.as_str().into();
        listening.push((name.clone(), sockets[0].local_addr()?));
        let limit = Arc::new(Semaphore::new(l.max_connections));
        for (socket, set) in sockets.into_iter().zip(&mut per_worker) {
            set.push(WorkerSocket {
                name: name.clone(),
                socket,
                limit: limit.clone(),
            });
        }
    }
    let gw = Arc::new(Gateway::load(config).await?);
    let accepting = TaskTracker::new();
    let done = CancellationToken::new();
    let mut threads = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(workers.max(1));
    for (i, sockets) in per_worker.into_iter().enumerate() {
        let (gw, accepting, done, ready) = (
            gw.clone(),
            accepting.clone(),
            done.clone(),
            ready_tx.clone(),
        );
        threads.push(
            std::thread::Builder::new()
                .name(format!("sluice-worker-{i}"))
                .spawn(move || worker(gw, sockets, accepting, done, ready))?,
        );
    }
    drop(ready_tx);
    for _ in 0..workers {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                done.cancel();
                return Err(e);
            }
            None => anyhow::bail!("a worker thread stopped while starting"),
        }
    }
    accepting.close();
    {
        let mut out = std::io::stdout().lock();
        for (name, addr) in &listening {
            writeln!(out, "listening {name} {addr}")?;
            tracing::info!(listener = %name, %addr, workers, "listening");
        }
        out.flush()?;
    }

    loop {
        tokio::select! {
            _ = hup.recv() => gw.reload(&path).await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    tracing::info!(grace = ?grace, "shutting down: no new connections, draining tunnels");
    gw.stopping().cancel();
    accepting.wait().await;
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
    for thread in threads {
        // The workers end at once now that `done` is cancelled; joining is off the loop.
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    gw.snapshot().retire();
    tracing::info!("stopped");
    Ok(())
}

/// One listener's socket on one worker.
struct WorkerSocket {
    name: Arc<str>,
    socket: accept::Bound,
    /// The listener's `max_connections`, shared by its sockets on all workers.
    limit: Arc<Semaphore>,
}

/// A worker thread: a single-threaded event loop that listens on its sockets, says so on
/// `ready`, and serves connections until `done` (after shutdown has drained them).
fn worker(
    gw: Arc<Gateway>,
    sockets: Vec<WorkerSocket>,
    accepting: TaskTracker,
    done: CancellationToken,
    ready: tokio::sync::mpsc::Sender<anyhow::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.try_send(Err(anyhow::anyhow!("cannot start a worker: {e}")));
            return;
        }
    };
    runtime.block_on(async move {
        for s in sockets {
            match s.socket.listen() {
                Ok(listener) => {
                    accepting.spawn(accept::run(gw.clone(), s.name, listener, s.limit));
                }
                Err(e) => {
                    let e = anyhow::anyhow!("listener `{}`: cannot listen: {e}", s.name);
                    let _ = ready.send(Err(e)).await;
                    return;
                }
            }
        }
        let _ = ready.send(Ok(())).await;
        drop(ready);
        done.cancelled().await;
    });
}

/// Installs the log subscriber: `RUST_LOG` if set, else the config's level; text or JSON
/// lines on stderr.
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
