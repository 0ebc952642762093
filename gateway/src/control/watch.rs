//! The file watch: a reload when the config file, a plugin's `.wasm`, or a certificate,
//! key or CA file changes (`[reload] watch`, on by default). It watches the directories
//! that hold them (a deploy or an editor that replaces a file by renaming a new one over
//! it leaves no watch on the old file behind), counts only writes, creations, renames and
//! removals (the gateway's own reads of those files must not trigger it), and waits until
//! the files have been quiet for the debounce time, so a burst of writes makes one reload.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::state::{Command, Trigger};
use crate::sync::Hold;

/// A running watch; dropping it stops it.
pub struct Watch {
    watcher: RecommendedWatcher,
    dirs: BTreeSet<PathBuf>,
    files: Arc<Mutex<BTreeSet<PathBuf>>>,
    debouncer: tokio::task::JoinHandle<()>,
    debounce: Duration,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.debouncer.abort();
    }
}

/// A path made absolute, with its directory free of symlinks, as events name it.
fn canonical(path: &Path) -> Option<PathBuf> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new(".")).canonicalize().ok()?;
    Some(dir.join(path.file_name()?))
}

/// Whether an event may have changed a file's contents (reads and opens do not).
fn changes(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}

impl Watch {
    /// Starts watching `files`: after a change and `debounce` of quiet, a reload command
    /// goes on `commands`. Must run inside the control runtime.
    pub fn start(
        files: &[PathBuf],
        debounce: Duration,
        commands: mpsc::Sender<Command>,
    ) -> notify::Result<Watch> {
        let watched: Arc<Mutex<BTreeSet<PathBuf>>> = Arc::default();
        let seen = watched.clone();
        let (changed, mut changes_rx) = mpsc::channel::<PathBuf>(64);
        let watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
            let Ok(event) = event else { return };
            if !changes(&event.kind) {
                return;
            }
            let files = seen.hold();
            if let Some(path) = event.paths.iter().find(|p| files.contains(*p)) {
                // A full queue already holds a change to act on.
                let _ = changed.try_send(path.clone());
            }
        })?;
        let debouncer = tokio::spawn(async move {
            while let Some(first) = changes_rx.recv().await {
                // Quiet for `debounce` since the last change: the writes are done.
                while let Ok(Some(_)) = tokio::time::timeout(debounce, changes_rx.recv()).await {}
                tracing::info!(file = %first.display(), "watched file changed: reloading");
                let reload = Command::Reload {
                    trigger: Trigger::Watch,
                    reply: None,
                };
                if commands.send(reload).await.is_err() {
                    return;
                }
            }
        });
        let mut watch = Watch {
            watcher,
            dirs: BTreeSet::new(),
            files: watched,
            debouncer,
            debounce,
        };
        watch.set(files);
        Ok(watch)
    }

    /// The quiet time it waits for.
    pub fn debounce(&self) -> Duration {
        self.debounce
    }

    /// Watches `files` too, from now on: a reload's config names them before it is
    /// loaded, so a file written while it loads, or fixed after a load it failed, still
    /// brings a reload.
    pub fn add(&mut self, files: &[PathBuf]) {
        let mut all = self.files.hold().clone();
        all.extend(files.iter().filter_map(|f| canonical(f)));
        self.watch_exactly(all);
    }

    /// Watches exactly `files` from now on (a reload may have changed the set).
    pub fn set(&mut self, files: &[PathBuf]) {
        self.watch_exactly(files.iter().filter_map(|f| canonical(f)).collect());
    }

    /// Watches exactly `files` (canonical) and their directories.
    fn watch_exactly(&mut self, files: BTreeSet<PathBuf>) {
        let dirs: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_owned))
            .collect();
        for gone in self.dirs.difference(&dirs) {
            let _ = self.watcher.unwatch(gone);
        }
        for new in dirs.difference(&self.dirs) {
            if let Err(e) = self.watcher.watch(new, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %new.display(), error = %e, "cannot watch for changes");
            }
        }
        self.dirs = dirs;
        *self.files.hold() = files;
    }
}
