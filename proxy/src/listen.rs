//! Listening sockets and the original destination of a captured connection.

use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::sys::socket::{getsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot bind {addr}: {source} (is another proxy running in this pod, or the port excluded from capture?)")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Where a listener's connections were headed before capture.
#[derive(Debug, Clone, Copy)]
pub enum OrigDst {
    /// Read it from conntrack (`SO_ORIGINAL_DST`): the iptables REDIRECT case.
    Redirect,
    /// A fixed destination: an explicit listener (no iptables), as used by benchmarks and tests.
    Fixed(SocketAddr),
}

/// Binds `count` sockets on `addr` with `SO_REUSEPORT`, one per worker, so the kernel spreads
/// connections across cores without a shared accept queue.
pub fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, ListenError> {
    (0..count)
        .map(|_| bind_one(addr).map_err(|source| ListenError::Bind { addr, source }))
        .collect()
}

fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Whether this host has IPv6 at all (a pod on an IPv4-only cluster may not).
pub fn ipv6_available() -> bool {
    Socket::new(Domain::IPV6, Type::STREAM, None)
        .and_then(|s| s.bind(&SocketAddr::from((Ipv6Addr::LOCALHOST, 0)).into()))
        .is_ok()
}

/// The destination the client dialled before iptables redirected it to us.
pub fn original_dst(fd: &impl AsRawFd, local: SocketAddr) -> io::Result<SocketAddr> {
    // SAFETY: the fd belongs to a stream that outlives this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    original_dst_fd(fd.as_fd(), local)
}

fn original_dst_fd(fd: BorrowedFd<'_>, local: SocketAddr) -> io::Result<SocketAddr> {
    if local.is_ipv4() {
        let raw = getsockopt(&fd, sockopt::OriginalDst).map_err(io::Error::from)?;
        let ip = std::net::Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(raw.sin_port),
        )))
    } else {
        let raw = getsockopt(&fd, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
        let ip = Ipv6Addr::from(raw.sin6_addr.s6_addr);
        Ok(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(raw.sin6_port),
            0,
            0,
        )))
    }
}

/// The local address of an accepted socket.
pub fn local_addr(fd: &impl AsRawFd) -> io::Result<SocketAddr> {
    // SAFETY: as above.
    let fd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    socket2::SockRef::from(&fd)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket"))
}
