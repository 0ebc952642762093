//! The `floor` target: the least a proxy can do, measured the same way as the proxies.
//!
//! A plain TCP relay with no protocol at all: each accepted connection gets a connection to
//! the backend, and bytes are copied between the two as they come (the WebSocket upgrade
//! passes through untouched, end to end). Per readiness event it makes exactly one `recv`
//! into a 64 KiB buffer and one `send` of what it read, on nonblocking sockets under one
//! level-triggered `epoll` per worker thread (the listener is shared with
//! `EPOLLEXCLUSIVE`, and a connection stays on the thread that accepted it). Its user
//! space does next to nothing, so its CPU per round trip is the kernel's share that every
//! relay on this machine pays: the floor under Sluice, nginx and HAProxy in the echo
//! scenarios. It parses no HTTP, so for upgrades it is a TCP-level floor only.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;

use anyhow::{Context, Result};
use rustix::buffer::spare_capacity;
use rustix::event::epoll::{self, CreateFlags, Event, EventData, EventFlags};
use rustix::fd::OwnedFd;

/// The token of the listener in every worker's `epoll`.
const LISTENER: u64 = u64::MAX;
/// Bytes read per `recv`.
const BUF: usize = 64 * 1024;
/// Events taken per `epoll_wait`.
const EVENTS: usize = 256;

/// Relays connections on `listen` to `upstream` with `workers` threads until killed.
/// Prints `listening ADDR` once the listener is bound.
pub fn serve(listen: SocketAddr, upstream: SocketAddr, workers: usize) -> Result<()> {
    crate::sys::raise_nofile_limit();
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    println!("listening {}", listener.local_addr()?);
    serve_on(listener, upstream, workers)
}

/// [`serve`] on a bound listener.
fn serve_on(listener: TcpListener, upstream: SocketAddr, workers: usize) -> Result<()> {
    listener.set_nonblocking(true)?;
    let listener = Arc::new(listener);
    let threads: Vec<_> = (0..workers.max(1))
        .map(|_| {
            let listener = listener.clone();
            std::thread::spawn(move || Worker::new(upstream).and_then(|w| w.run(&listener)))
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a relay worker panicked"))??;
    }
    Ok(())
}

/// One side of a relayed pair.
struct Side {
    stream: TcpStream,
    /// The token of the other side.
    peer: u64,
    /// Bytes read from the other side that this side's socket has not taken yet; while
    /// any are left, the other side is not read.
    pending: Vec<u8>,
}

/// One thread's connections and its `epoll`.
struct Worker {
    epoll: OwnedFd,
    upstream: SocketAddr,
    sides: Vec<Option<Side>>,
    free: Vec<u64>,
    buf: Vec<u8>,
}

impl Worker {
    fn new(upstream: SocketAddr) -> io::Result<Worker> {
        Ok(Worker {
            epoll: epoll::create(CreateFlags::CLOEXEC)?,
            upstream,
            sides: Vec::new(),
            free: Vec::new(),
            buf: vec![0; BUF],
        })
    }

    fn run(mut self, listener: &TcpListener) -> io::Result<()> {
        epoll::add(
            &self.epoll,
            listener,
            EventData::new_u64(LISTENER),
            EventFlags::IN | EventFlags::EXCLUSIVE,
        )?;
        let mut events: Vec<Event> = Vec::with_capacity(EVENTS);
        loop {
            events.clear();
            match epoll::wait(&self.epoll, spare_capacity(&mut events), None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            for ev in &events {
                // `Event` is packed: copy the fields out before use.
                let (token, flags) = (ev.data.u64(), { ev.flags });
                if token == LISTENER {
                    self.accept(listener);
                } else if flags.contains(EventFlags::OUT) {
                    self.flush(token);
                } else {
                    self.relay(token);
                }
            }
        }
    }

    /// Accepts what is waiting; each client gets its own backend connection.
    fn accept(&mut self, listener: &TcpListener) {
        while let Ok((client, _)) = listener.accept() {
            // A client whose backend connection fails is dropped (closed).
            if let Ok(server) = TcpStream::connect(self.upstream) {
                let _ = self.pair(client, server);
            }
        }
    }

    fn pair(&mut self, client: TcpStream, server: TcpStream) -> io::Result<()> {
        for s in [&client, &server] {
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
        }
        let (a, b) = (self.slot(), self.slot());
        for (token, stream, peer) in [(a, client, b), (b, server, a)] {
            epoll::add(
                &self.epoll,
                &stream,
                EventData::new_u64(token),
                EventFlags::IN,
            )?;
            self.sides[token as usize] = Some(Side {
                stream,
                peer,
                pending: Vec::new(),
            });
        }
        Ok(())
    }

    fn slot(&mut self) -> u64 {
        self.free.pop().unwrap_or_else(|| {
            self.sides.push(None);
            self.sides.len() as u64 - 1
        })
    }

    /// One `recv` from `token`, and one `send` of it to its peer; what the peer does not
    /// take waits there, and `token` is not read until it has gone.
    fn relay(&mut self, token: u64) {
        let Some(side) = self.sides[token as usize].as_mut() else {
            return;
        };
        let peer = side.peer;
        let n = match side.stream.read(&mut self.buf) {
            Ok(0) => return self.close(token),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => return self.close(token),
        };
        let Some(to) = self.sides[peer as usize].as_mut() else {
            return self.close(token);
        };
        let sent = match to.stream.write(&self.buf[..n]) {
            Ok(sent) => sent,
            Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
            Err(_) => return self.close(token),
        };
        if sent < n {
            to.pending.extend_from_slice(&self.buf[sent..n]);
            let (from, to) = (self.stream(token), self.stream(peer));
            let _ = epoll::modify(
                &self.epoll,
                from,
                EventData::new_u64(token),
                EventFlags::empty(),
            );
            let _ = epoll::modify(&self.epoll, to, EventData::new_u64(peer), EventFlags::OUT);
        }
    }

    /// `token` is writable again: sends what waits for it, and once all has gone reads
    /// its peer again.
    fn flush(&mut self, token: u64) {
        let Some(side) = self.sides[token as usize].as_mut() else {
            return;
        };
        let peer = side.peer;
        match side.stream.write(&side.pending) {
            Ok(sent) => {
                side.pending.drain(..sent);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => return self.close(token),
        }
        if side.pending.is_empty() {
            let (this, from) = (self.stream(token), self.stream(peer));
            let _ = epoll::modify(&self.epoll, this, EventData::new_u64(token), EventFlags::IN);
            let _ = epoll::modify(&self.epoll, from, EventData::new_u64(peer), EventFlags::IN);
        }
    }

    fn stream(&self, token: u64) -> &TcpStream {
        &self.sides[token as usize]
            .as_ref()
            .expect("both sides of a pair are open together")
            .stream
    }

    /// Closes both sides of `token`'s pair (closing a socket takes it out of `epoll`).
    fn close(&mut self, token: u64) {
        if let Some(side) = self.sides[token as usize].take() {
            let _ = side.stream.shutdown(Shutdown::Both);
            self.free.push(token);
            if let Some(peer) = self.sides[side.peer as usize].take() {
                let _ = peer.stream.shutdown(Shutdown::Both);
                self.free.push(side.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Starts a relay to `upstream` on an ephemeral port; returns its address.
    type Start = fn(SocketAddr) -> SocketAddr;

    /// The relays under test: this `epoll` one (`floor`), and the io_uring one
    /// (`floor-uring`) where the kernel lets a process make a ring.
    fn relays() -> Vec<(&'static str, Start)> {
        let mut relays: Vec<(&'static str, Start)> = vec![("epoll", |upstream| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            std::thread::spawn(move || serve_on(listener, upstream, 2));
            addr
        })];
        if sluice_bench_uring::available().unwrap() {
            relays.push(("io_uring", |upstream| {
                let listeners =
                    sluice_bench_uring::bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
                let addr = listeners[0].local_addr().unwrap();
                std::thread::spawn(move || sluice_bench_uring::serve_on(listeners, upstream));
                addr
            }));
        } else {
            eprintln!("io_uring is not available here: floor-uring not tested");
        }
        relays
    }

    /// Bytes go through both ways unchanged and in order, also when more arrive than
    /// the peer's socket takes at once (and io_uring's buffer ring runs dry), and the
    /// backend's close reaches the client.
    #[test]
    fn relays_bytes_both_ways_and_closes_both_sides() {
        for (relay, start) in relays() {
            let backend = TcpListener::bind("127.0.0.1:0").unwrap();
            let upstream = backend.local_addr().unwrap();
            // Echo until the client half-closes, then close. The backend reads nothing
            // for its first half second, so what the client sends piles up in the relay.
            std::thread::spawn(move || {
                let (mut s, _) = backend.accept().unwrap();
                std::thread::sleep(Duration::from_millis(500));
                let _ = std::io::copy(&mut s.try_clone().unwrap(), &mut s);
            });
            let addr = start(upstream);

            let mut client = TcpStream::connect(addr).unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            // 16 MiB: more than the sockets and io_uring's buffer ring hold, so sends are
            // partial and what is read waits for the peer to take it.
            let sent: Vec<u8> = (0..16 << 20).map(|i: u32| (i % 251) as u8).collect();
            let writer = {
                let mut client = client.try_clone().unwrap();
                let sent = sent.clone();
                std::thread::spawn(move || client.write_all(&sent))
            };
            let mut echoed = vec![0; sent.len()];
            client.read_exact(&mut echoed).unwrap();
            writer.join().unwrap().unwrap();
            assert!(
                echoed == sent,
                "{relay}: the echo differs from what was sent"
            );
            client.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            assert_eq!(
                client.read_to_end(&mut rest).unwrap(),
                0,
                "{relay}: closed, nothing more"
            );
        }
    }

    /// What a server sends just before it closes reaches the client before the close,
    /// as in a WebSocket close handshake where the server closes TCP first.
    #[test]
    fn the_last_bytes_before_a_close_arrive() {
        const ROUNDS: usize = 50;
        for (relay, start) in relays() {
            let backend = TcpListener::bind("127.0.0.1:0").unwrap();
            let upstream = backend.local_addr().unwrap();
            std::thread::spawn(move || {
                for _ in 0..ROUNDS {
                    let (mut s, _) = backend.accept().unwrap();
                    let mut hello = [0; 5];
                    s.read_exact(&mut hello).unwrap();
                    s.write_all(b"bye").unwrap();
                }
            });
            let addr = start(upstream);
            for round in 0..ROUNDS {
                let mut client = TcpStream::connect(addr).unwrap();
                client
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                client.write_all(b"hello").unwrap();
                let mut got = Vec::new();
                client.read_to_end(&mut got).unwrap();
                assert_eq!(got, b"bye", "{relay}: round {round}");
            }
        }
    }
}
