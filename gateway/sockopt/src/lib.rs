//! Socket options that neither `socket2`, `tokio` nor the standard library (where
//! `set_deferaccept` is still unstable) set, kept apart so that the gateway itself can
//! `forbid(unsafe_code)`.
//!
//! `TCP_DEFER_ACCEPT` is here because the benchmark measured it (bench/README.md): a
//! listener that hands over a connection only once its first bytes have arrived saves
//! the proxy an event-loop turn and a `recv` that would find nothing, on about a third
//! of upgrades, and keeps clients that connect and say nothing out of the connection
//! limit.
//!
//! Linux only: elsewhere the crate is empty.
#![cfg(target_os = "linux")]

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Makes a listening TCP socket hand over a new connection only once data has arrived
/// on it, or once `seconds` have passed (after which a silent connection is accepted as
/// usual). Linux keeps the connection half-open until then and answers the client's bare
/// ACK by resending its SYN-ACK when the wait is over; the client sees an established
/// connection at once either way.
pub fn set_tcp_defer_accept(socket: impl AsFd, seconds: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(seconds).unwrap_or(libc::c_int::MAX);
    setsockopt_int(socket, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, value)
}

/// The socket's `TCP_DEFER_ACCEPT` wait in seconds, as the kernel rounds it (0: off).
pub fn tcp_defer_accept(socket: impl AsFd) -> io::Result<u32> {
    let value = getsockopt_int(socket, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT)?;
    Ok(u32::try_from(value).unwrap_or(0))
}

#[allow(
    unsafe_code,
    reason = "setsockopt(2) has no safe wrapper for this option"
)]
fn setsockopt_int(
    socket: impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    let fd = socket.as_fd();
    // SAFETY: `fd` is borrowed, so it stays open for the call; the option value points to
    // a live `c_int` on this stack frame and the length passed is exactly its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    errno(rc)
}

#[allow(
    unsafe_code,
    reason = "getsockopt(2) has no safe wrapper for this option"
)]
fn getsockopt_int(
    socket: impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let fd = socket.as_fd();
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is borrowed, so it stays open for the call; `value` and `len` are live
    // locals, and `len` holds the size of `value`, which the kernel writes at most.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    errno(rc).map(|()| value)
}

/// A socket call's return code as a result: 0 is success, anything else sets `errno`.
fn errno(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defer_accept_is_set_and_read_back() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(tcp_defer_accept(&listener).unwrap(), 0);
        set_tcp_defer_accept(&listener, 1).unwrap();
        assert_eq!(tcp_defer_accept(&listener).unwrap(), 1);
    }

    #[test]
    fn a_socket_of_another_kind_gives_the_kernels_error() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(set_tcp_defer_accept(&udp, 1).is_err());
    }
}
