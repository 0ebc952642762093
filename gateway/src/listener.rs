//! A listening address's shared state: its connection limit (`max_connections`, which a
//! reload may change), its counters, and the signal that a reload removed it. Its sockets
//! on every worker accept through it (`accept`); each connection holds a [`Permit`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::ListenerStats;

/// One listening address, shared by its sockets on every worker: its connection limit
/// (`max_connections`, changeable by a reload), its counters, and the signal that a
/// reload removed it.
#[derive(Debug)]
pub struct Listener {
    /// The bound address (the real port when the config asked for port 0).
    pub addr: SocketAddr,
    /// Accepted connections and accept failures.
    pub stats: ListenerStats,
    open: AtomicUsize,
    max: AtomicUsize,
    freed: Notify,
    /// Cancelled when a reload removes the listener: its sockets stop accepting (their
    /// connections and tunnels run on).
    pub stop: CancellationToken,
}

impl Listener {
    /// A listener on `addr` serving at most `max` connections at once.
    pub fn new(addr: SocketAddr, max: usize) -> Listener {
        Listener {
            addr,
            stats: ListenerStats::default(),
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            freed: Notify::new(),
            stop: CancellationToken::new(),
        }
    }

    /// Waits for a connection slot.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.try_acquire() {
                return Permit(self.clone());
            }
            freed.await;
        }
    }

    fn try_acquire(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Connections being served now (tunnels included).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The connection limit.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Changes the connection limit: a higher one lets waiting accepts through at once;
    /// a lower one closes nothing, and new connections wait until enough have ended.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
        self.freed.notify_waiters();
    }
}

/// A connection slot of a [`Listener`], held until the connection (and any tunnel it
/// became) ends.
#[derive(Debug)]
pub struct Permit(Arc<Listener>);

impl Permit {
    /// The listener the slot is of.
    pub fn listener(&self) -> &Listener {
        &self.0
    }

    /// A slot outside any limit, for connections served without a listener (tests).
    pub fn unlimited() -> Permit {
        let l = Arc::new(Listener::new(
            SocketAddr::from(([0, 0, 0, 0], 0)),
            usize::MAX,
        ));
        l.open.fetch_add(1, Ordering::Relaxed);
        Permit(l)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_changed_limit_applies_to_the_next_connection() {
        let l = Arc::new(Listener::new("127.0.0.1:1".parse().unwrap(), 1));
        let first = l.acquire().await;
        // At the limit, the next one waits until the limit is raised.
        let waiting = tokio::spawn({
            let l = l.clone();
            async move { l.acquire().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        l.set_max(2);
        let second = waiting.await.unwrap();
        assert_eq!(l.open(), 2);
        // Lowered below what is open: nothing closes, and a new one waits for two to end.
        l.set_max(1);
        let third = tokio::spawn({
            let l = l.clone();
            async move { l.acquire().await }
        });
        drop(first);
        tokio::task::yield_now().await;
        assert!(!third.is_finished());
        drop(second);
        let _third = third.await.unwrap();
        assert_eq!(l.open(), 1);
    }
}
