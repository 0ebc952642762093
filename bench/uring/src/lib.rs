//! The bench's `floor-uring` target: the `floor` relay (`sluice-bench relay`) on io_uring
//! instead of `epoll`, to measure what io_uring would save a relay on this machine.
//!
//! Each worker thread has its own ring (`SINGLE_ISSUER`, `DEFER_TASKRUN`) and its own
//! `SO_REUSEPORT` listener with a multishot accept. Each accepted connection gets a
//! blocking connection to the backend, and each of the two sockets one multishot `recv`
//! that takes its buffers from the worker's provided-buffer ring (no buffer is tied to a
//! connection while nothing arrives). What arrives is sent on from that same buffer, one
//! `send` in flight per socket so bytes keep their order, and the buffer goes back to the
//! ring once the peer's socket has taken all of it. When either side ends or fails, both
//! sockets are shut, once what that side sent has gone on. Completions are reaped in
//! batches, one `io_uring_enter` submitting and waiting for each batch. It does no
//! protocol work, so its CPU per round trip is what relaying costs the kernel when
//! readiness, `recv` and `send` go through io_uring.
//!
//! Linux only: elsewhere [`serve`] says so and fails. Its tests are the `floor` relay's
//! (`bench/src/relay.rs`), run against both relays.

use std::io;
use std::net::{SocketAddr, TcpListener};

/// Relays connections on `listen` to `upstream` with `workers` threads until killed.
/// Prints `listening ADDR` once the listeners are bound.
pub fn serve(listen: SocketAddr, upstream: SocketAddr, workers: usize) -> io::Result<()> {
    let listeners = bind(listen, workers.max(1))?;
    println!("listening {}", listeners[0].local_addr()?);
    serve_on(listeners, upstream)
}

/// Whether this kernel lets a process make an io_uring: `false` where it has none or
/// forbids it (`ENOSYS`, `EPERM`), an error for anything else.
#[cfg(target_os = "linux")]
pub fn available() -> io::Result<bool> {
    match io_uring::IoUring::new(2) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether this kernel lets a process make an io_uring: never, off Linux.
#[cfg(not(target_os = "linux"))]
pub fn available() -> io::Result<bool> {
    Ok(false)
}

/// `count` listeners sharing `addr` with `SO_REUSEPORT` (the first may pick the port).
pub fn bind(addr: SocketAddr, count: usize) -> io::Result<Vec<TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let mut addr = addr;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        #[cfg(target_os = "linux")]
        socket.set_reuse_port(true)?;
        // Accepted sockets inherit it on Linux.
        socket.set_tcp_nodelay(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: TcpListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// [`serve`] on listeners from [`bind`], one worker thread each: fails off Linux.
#[cfg(not(target_os = "linux"))]
pub fn serve_on(_: Vec<TcpListener>, _: SocketAddr) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "io_uring is Linux only",
    ))
}

/// [`serve`] on listeners from [`bind`], one worker thread each, until killed.
#[cfg(target_os = "linux")]
pub fn serve_on(listeners: Vec<TcpListener>, upstream: SocketAddr) -> io::Result<()> {
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|listener| std::thread::spawn(move || ring::Worker::new(upstream)?.run(&listener)))
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| io::Error::other("a relay worker panicked"))??;
    }
    Ok(())
}

#[cfg(target_os = "linux")]
mod ring {
    use std::alloc::{Layout, alloc_zeroed, dealloc};
    use std::collections::VecDeque;
    use std::io;
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicU16, Ordering};

    use io_uring::types::{BufRingEntry, Fd};
    use io_uring::{IoUring, cqueue, opcode, squeue};

    /// Buffers in the provided-buffer ring (a power of two).
    const BUFS: u16 = 256;
    /// Bytes per buffer: a 16 KiB message and its frame header take one.
    const BUF_LEN: usize = 32 * 1024;
    /// The buffer group every `recv` takes from.
    const GROUP: u16 = 0;
    /// Submission queue entries.
    const ENTRIES: u32 = 1024;
    /// `user_data` of the accept.
    const ACCEPT: u64 = u64::MAX;
    /// Low bit of a side's `user_data`: set for its `send`, clear for its `recv`.
    const SEND: u64 = 1;

    /// One side of a relayed pair.
    struct Side {
        stream: TcpStream,
        /// The token of the other side.
        peer: u32,
        /// Requests of this side's in flight (its `recv` and its `send`).
        in_flight: u32,
        /// The `send` in flight to this socket: buffer id, bytes sent, bytes in it.
        sending: Option<(u16, usize, usize)>,
        /// Buffers waiting to be sent to this socket after the one in flight.
        queue: VecDeque<(u16, usize)>,
        /// Its `recv` stopped for want of buffers; re-armed when one comes back.
        starved: bool,
        /// It has read the end of its stream: the pair closes once what it read has
        /// been sent on.
        eof: bool,
        /// The pair is shutting down: nothing new is submitted for it.
        closing: bool,
    }

    /// The worker's provided buffers and the ring that hands them to the kernel.
    struct Buffers {
        /// `BUFS` ring entries, page aligned, shared with the kernel.
        ring: *mut BufRingEntry,
        /// `BUFS * BUF_LEN` bytes of buffers, written by the kernel.
        memory: *mut u8,
        tail: u16,
    }

    impl Buffers {
        fn ring_layout() -> Layout {
            Layout::from_size_align(BUFS as usize * size_of::<BufRingEntry>(), 4096)
                .expect("a valid layout")
        }

        fn memory_layout() -> Layout {
            Layout::from_size_align(BUFS as usize * BUF_LEN, 4096).expect("a valid layout")
        }

        fn new() -> io::Result<Buffers> {
            // SAFETY: both layouts have a non-zero size.
            let (ring, memory) = unsafe {
                (
                    alloc_zeroed(Self::ring_layout()).cast::<BufRingEntry>(),
                    alloc_zeroed(Self::memory_layout()),
                )
            };
            if ring.is_null() || memory.is_null() {
                return Err(io::Error::from(io::ErrorKind::OutOfMemory));
            }
            Ok(Buffers {
                ring,
                memory,
                tail: 0,
            })
        }

        fn address(&self, bid: u16) -> *const u8 {
            // SAFETY: `bid < BUFS`, so the offset stays inside `memory`.
            unsafe { self.memory.add(bid as usize * BUF_LEN) }
        }

        /// Hands buffer `bid` (back) to the kernel.
        fn give(&mut self, bid: u16) {
            let index = (self.tail & (BUFS - 1)) as usize;
            // SAFETY: `index < BUFS`; the kernel reads entries only up to the tail, which
            // is published below, after the entry is written. The entry setters leave
            // the first entry's `resv` (the tail) alone.
            let entry = unsafe { &mut *self.ring.add(index) };
            entry.set_addr(self.address(bid) as u64);
            entry.set_len(BUF_LEN as u32);
            entry.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
            // SAFETY: the tail is the aligned `u16` the kernel reads the ring's tail from;
            // it lives as long as `ring`, and is only ever written here.
            let tail = unsafe { AtomicU16::from_ptr(BufRingEntry::tail(self.ring).cast_mut()) };
            tail.store(self.tail, Ordering::Release);
        }
    }

    impl Drop for Buffers {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with these layouts; the ring that used them is
            // dropped first (`Worker`'s field order).
            unsafe {
                dealloc(self.ring.cast(), Self::ring_layout());
                dealloc(self.memory, Self::memory_layout());
            }
        }
    }

    /// One thread's ring, buffers and connections.
    pub struct Worker {
        ring: IoUring,
        buffers: Buffers,
        upstream: SocketAddr,
        sides: Vec<Option<Side>>,
        free: Vec<u32>,
        /// Sides whose `recv` waits for a buffer.
        starved: Vec<u32>,
    }

    impl Worker {
        pub fn new(upstream: SocketAddr) -> io::Result<Worker> {
            let ring = IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .build(ENTRIES)?;
            let mut buffers = Buffers::new()?;
            // SAFETY: the ring entries stay allocated until `buffers` is dropped, after
            // `ring` (field order), which unregisters them.
            unsafe {
                ring.submitter().register_buf_ring_with_flags(
                    buffers.ring as u64,
                    BUFS,
                    GROUP,
                    0,
                )?;
            }
            for bid in 0..BUFS {
                buffers.give(bid);
            }
            Ok(Worker {
                ring,
                buffers,
                upstream,
                sides: Vec::new(),
                free: Vec::new(),
                starved: Vec::new(),
            })
        }

        pub fn run(mut self, listener: &TcpListener) -> io::Result<()> {
            let accept = opcode::AcceptMulti::new(Fd(listener.as_raw_fd()))
                .build()
                .user_data(ACCEPT);
            self.push(accept)?;
            let mut done: Vec<(u64, i32, u32)> = Vec::with_capacity(ENTRIES as usize);
            loop {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(e),
                }
                done.clear();
                done.extend(
                    self.ring
                        .completion()
                        .map(|c| (c.user_data(), c.result(), c.flags())),
                );
                for &(data, result, flags) in &done {
                    if data == ACCEPT {
                        if !cqueue::more(flags) {
                            let accept = opcode::AcceptMulti::new(Fd(listener.as_raw_fd()))
                                .build()
                                .user_data(ACCEPT);
                            self.push(accept)?;
                        }
                        if result >= 0 {
                            self.pair(result)?;
                        }
                    } else if data & SEND == SEND {
                        self.sent((data >> 1) as u32, result)?;
                    } else {
                        self.received((data >> 1) as u32, result, flags)?;
                    }
                }
            }
        }

        /// Queues `entry`, submitting what is queued first if the queue is full.
        fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
            loop {
                // SAFETY: every buffer an entry names is either in the provided-buffer
                // ring or held by a `Side` until its completion is reaped; both outlive
                // the ring.
                if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                    return Ok(());
                }
                self.ring.submit()?;
            }
        }

        /// A new client: connects it to the backend and starts reading both.
        fn pair(&mut self, fd: i32) -> io::Result<()> {
            use std::os::fd::FromRawFd;
            // SAFETY: the accept completion hands over a new descriptor that nothing
            // else owns.
            let client = unsafe { TcpStream::from_raw_fd(fd) };
            let Ok(server) = TcpStream::connect(self.upstream) else {
                return Ok(());
            };
            server.set_nodelay(true)?;
            let (a, b) = (self.slot(), self.slot());
            for (token, stream, peer) in [(a, client, b), (b, server, a)] {
                self.sides[token as usize] = Some(Side {
                    stream,
                    peer,
                    in_flight: 0,
                    sending: None,
                    queue: VecDeque::new(),
                    starved: false,
                    eof: false,
                    closing: false,
                });
                self.recv(token)?;
            }
            Ok(())
        }

        fn slot(&mut self) -> u32 {
            self.free.pop().unwrap_or_else(|| {
                self.sides.push(None);
                self.sides.len() as u32 - 1
            })
        }

        fn side(&mut self, token: u32) -> &mut Side {
            self.sides[token as usize]
                .as_mut()
                .expect("a side stays until its last completion")
        }

        fn recv(&mut self, token: u32) -> io::Result<()> {
            let side = self.side(token);
            side.in_flight += 1;
            let fd = side.stream.as_raw_fd();
            let entry = opcode::RecvMulti::new(Fd(fd), GROUP)
                .build()
                .user_data(u64::from(token) << 1);
            self.push(entry)
        }

        fn send(&mut self, token: u32, bid: u16, from: usize, len: usize) -> io::Result<()> {
            let address = self.buffers.address(bid);
            let side = self.side(token);
            side.in_flight += 1;
            side.sending = Some((bid, from, len));
            let fd = side.stream.as_raw_fd();
            // SAFETY: `from < len <= BUF_LEN`, inside buffer `bid`.
            let start = unsafe { address.add(from) };
            let entry = opcode::Send::new(Fd(fd), start, (len - from) as u32)
                .build()
                .user_data(u64::from(token) << 1 | SEND);
            self.push(entry)
        }

        /// A completion of `token`'s `recv`.
        fn received(&mut self, token: u32, result: i32, flags: u32) -> io::Result<()> {
            let more = cqueue::more(flags);
            let side = self.side(token);
            if !more {
                side.in_flight -= 1;
            }
            let (peer, closing) = (side.peer, side.closing);
            if let Some(bid) = cqueue::buffer_select(flags) {
                let len = result.max(0) as usize;
                if closing || len == 0 {
                    self.give(bid)?;
                } else if self.side(peer).sending.is_some() {
                    self.side(peer).queue.push_back((bid, len));
                } else {
                    self.send(peer, bid, 0, len)?;
                }
            }
            if closing {
                return self.release(token);
            }
            match result {
                r if r > 0 => {
                    if !more {
                        self.recv(token)?;
                    }
                    Ok(())
                }
                r if r == -libc::ENOBUFS => {
                    self.side(token).starved = true;
                    self.starved.push(token);
                    Ok(())
                }
                // End of stream: close the pair once the peer has sent all this side
                // read (sends still queued are submitted after this, in the same batch).
                0 => {
                    self.side(token).eof = true;
                    let peer = self.side(peer);
                    if peer.sending.is_none() && peer.queue.is_empty() {
                        return self.close(token);
                    }
                    Ok(())
                }
                // An error: close the pair.
                _ => self.close(token),
            }
        }

        /// A completion of the `send` to `token`.
        fn sent(&mut self, token: u32, result: i32) -> io::Result<()> {
            let side = self.side(token);
            side.in_flight -= 1;
            let (bid, from, len) = side.sending.take().expect("a send was in flight");
            if side.closing || result < 0 {
                self.give(bid)?;
                if self.side(token).closing {
                    return self.release(token);
                }
                return self.close(token);
            }
            let from = from + result as usize;
            if from < len {
                return self.send(token, bid, from, len);
            }
            self.give(bid)?;
            if let Some((next, len)) = self.side(token).queue.pop_front() {
                return self.send(token, next, 0, len);
            }
            let source = self.side(token).peer;
            if self.side(source).eof {
                return self.close(token);
            }
            Ok(())
        }

        /// Returns buffer `bid` to the ring, and re-arms the `recv`s that ran out.
        fn give(&mut self, bid: u16) -> io::Result<()> {
            self.buffers.give(bid);
            while let Some(token) = self.starved.pop() {
                let Some(side) = self.sides[token as usize].as_mut() else {
                    continue;
                };
                if side.starved && !side.closing {
                    side.starved = false;
                    self.recv(token)?;
                }
            }
            Ok(())
        }

        /// Shuts both sockets of `token`'s pair, which ends their requests in flight;
        /// each side is freed once its last completion is in.
        fn close(&mut self, token: u32) -> io::Result<()> {
            let peer = self.side(token).peer;
            for t in [token, peer] {
                let side = self.side(t);
                if side.closing {
                    continue;
                }
                side.closing = true;
                let _ = side.stream.shutdown(Shutdown::Both);
                let queued: Vec<u16> = side.queue.drain(..).map(|(bid, _)| bid).collect();
                for bid in queued {
                    self.give(bid)?;
                }
            }
            for t in [token, peer] {
                self.release(t)?;
            }
            Ok(())
        }

        /// Frees a closing side once nothing of it is in flight (its socket closes).
        fn release(&mut self, token: u32) -> io::Result<()> {
            if let Some(side) = self.sides[token as usize].as_ref()
                && side.closing
                && side.in_flight == 0
            {
                self.sides[token as usize] = None;
                self.free.push(token);
            }
            Ok(())
        }
    }
}
