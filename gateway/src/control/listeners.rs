//! The worker threads and the listeners they accept on, as a reload changes them: new
//! listeners are bound before the new snapshot is published (so a bind failure refuses
//! the reload), and started, stopped, renamed or given a new `max_connections` right
//! after it.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ControlError;
use crate::accept;
use crate::config::Config;
use crate::listener::Listener;
use crate::state::Gateway;

/// What a worker is asked to do.
enum Job {
    /// Accept on this socket for this listener until it stops.
    Accept {
        listener: Arc<Listener>,
        socket: std::net::TcpListener,
        done: oneshot::Sender<std::io::Result<()>>,
    },
}

/// The worker threads: each runs its own single-threaded event loop and accepts on its
/// own socket of every listener (`SO_REUSEPORT`), so a connection, its upstream and its
/// tunnel stay on the thread that accepted it, as in nginx and HAProxy.
pub struct Workers {
    jobs: Vec<mpsc::UnboundedSender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The accept loops, so shutdown can wait for them to stop.
    pub accepting: TaskTracker,
}

impl Workers {
    /// Starts `n` workers serving `gw`; they run until `done`.
    pub fn start(
        n: usize,
        gw: &Arc<Gateway>,
        done: &CancellationToken,
    ) -> std::io::Result<Workers> {
        let accepting = TaskTracker::new();
        let mut jobs = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (gw, accepting, done) = (gw.clone(), accepting.clone(), done.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("sluice-worker-{i}"))
                    .spawn(move || runtime.block_on(work(gw, rx, accepting, done)))?,
            );
            jobs.push(tx);
        }
        Ok(Workers {
            jobs,
            threads,
            accepting,
        })
    }

    /// The number of workers.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Waits for the worker threads to end (after `done`).
    pub async fn join(self) {
        for thread in self.threads {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// A worker's event loop: takes jobs until `done`.
async fn work(
    gw: Arc<Gateway>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    accepting: TaskTracker,
    done: CancellationToken,
) {
    loop {
        let job = tokio::select! {
            j = jobs.recv() => j,
            () = done.cancelled() => None,
        };
        match job {
            Some(Job::Accept {
                listener,
                socket,
                done,
            }) => {
                let started = tokio::net::TcpListener::from_std(socket)
                    .map(|socket| drop(accepting.spawn(accept::run(gw.clone(), listener, socket))));
                let _ = done.send(started);
            }
            None => break,
        }
    }
}

/// One listener as the config names it.
struct Live {
    name: Arc<str>,
    bind: SocketAddr,
    listener: Arc<Listener>,
}

/// The listeners being served.
#[derive(Default)]
pub struct Listeners {
    live: Vec<Live>,
}

/// The listeners a config asks for, bound but not yet accepting.
pub struct Staged {
    live: Vec<Live>,
    fresh: Vec<(Arc<Listener>, Vec<std::net::TcpListener>)>,
    limits: Vec<(Arc<Listener>, usize)>,
}

impl Staged {
    /// The listeners by name, for the snapshot.
    pub fn names(&self) -> Vec<(Arc<str>, Arc<Listener>)> {
        self.live
            .iter()
            .map(|l| (l.name.clone(), l.listener.clone()))
            .collect()
    }
}

impl Listeners {
    /// Binds what `config` adds: a listener keeps its sockets when its name and address
    /// are unchanged, or when only its name changed; any other is new and bound here
    /// (an error names the listener). Nothing is served differently until
    /// [`Listeners::commit`].
    pub fn stage(&self, config: &Config, workers: usize) -> Result<Staged, ControlError> {
        let mut taken = vec![false; self.live.len()];
        // The configured address, or the one it resolved to (port 0 made concrete).
        let at = |l: &Live, bind: SocketAddr| l.bind == bind || l.listener.addr == bind;
        let mut keep = |name: &str, bind: SocketAddr, by_name: bool| {
            let i = self.live.iter().enumerate().position(|(i, l)| {
                !taken[i]
                    && at(l, bind)
                    && (!by_name || *l.name == *name)
                    && (by_name || bind.port() != 0)
            })?;
            taken[i] = true;
            Some(self.live[i].listener.clone())
        };
        // Same name and address first, then a renamed one at the same fixed address.
        let mut kept: Vec<Option<Arc<Listener>>> = config
            .listeners
            .iter()
            .map(|l| keep(&l.name, l.bind, true))
            .collect();
        for (k, l) in kept.iter_mut().zip(&config.listeners) {
            if k.is_none() {
                *k = keep(&l.name, l.bind, false);
            }
        }
        let mut staged = Staged {
            live: Vec::new(),
            fresh: Vec::new(),
            limits: Vec::new(),
        };
        for (k, l) in kept.into_iter().zip(&config.listeners) {
            let listener = match k {
                Some(listener) => {
                    staged.limits.push((listener.clone(), l.max_connections));
                    listener
                }
                None => {
                    let bind_err = |source| ControlError::BindListener {
                        listener: l.name.clone(),
                        addr: l.bind,
                        source,
                    };
                    let sockets = accept::bind(l.bind, workers).map_err(bind_err)?;
                    let addr = sockets[0].local_addr().map_err(bind_err)?;
                    let listener = Arc::new(Listener::new(addr, l.max_connections));
                    staged.fresh.push((listener.clone(), sockets));
                    listener
                }
            };
            staged.live.push(Live {
                name: l.name.as_str().into(),
                bind: l.bind,
                listener,
            });
        }
        Ok(staged)
    }

    /// Serves `staged` (whose snapshot has just been published): new listeners start
    /// accepting on every worker, kept ones take their new limit, and removed ones stop
    /// accepting while their connections and tunnels run on.
    pub async fn commit(&mut self, staged: Staged, workers: &Workers) -> Result<(), ControlError> {
        for (listener, limit) in &staged.limits {
            listener.set_max(*limit);
        }
        let mut started = Vec::new();
        for (listener, sockets) in staged.fresh {
            for (socket, jobs) in sockets.into_iter().zip(&workers.jobs) {
                let (done, ack) = oneshot::channel();
                let job = Job::Accept {
                    listener: listener.clone(),
                    socket,
                    done,
                };
                if jobs.send(job).is_err() {
                    return Err(ControlError::WorkerStopped);
                }
                started.push((listener.clone(), ack));
            }
        }
        for (listener, ack) in started {
            match ack.await {
                Ok(Ok(())) => {}
                Ok(Err(source)) => {
                    return Err(ControlError::Listen {
                        addr: listener.addr,
                        source,
                    });
                }
                Err(_) => return Err(ControlError::WorkerStopped),
            }
        }
        for old in &self.live {
            if !staged
                .live
                .iter()
                .any(|l| Arc::ptr_eq(&l.listener, &old.listener))
            {
                old.listener.stop.cancel();
                tracing::info!(listener = %old.name, addr = %old.listener.addr, "listener removed: no longer accepting");
            }
        }
        let mut out = std::io::stdout().lock();
        for l in &staged.live {
            let known = self
                .live
                .iter()
                .find(|o| Arc::ptr_eq(&o.listener, &l.listener));
            if known.is_none_or(|o| o.name != l.name) {
                // Tests and scripts read the bound address (port 0) from stdout.
                writeln!(out, "listening {} {}", l.name, l.listener.addr)
                    .map_err(ControlError::Announce)?;
                tracing::info!(listener = %l.name, addr = %l.listener.addr, workers = workers.len(), "listening");
            }
        }
        out.flush().map_err(ControlError::Announce)?;
        self.live = staged.live;
        Ok(())
    }
}
