//! OS-level helpers: socket creation with backlog 1, SCM_RIGHTS fd passing, path limits.
//!
//! Every nix call and the crate's only `unsafe` block live here, so the layers above deal in
//! typed, owned values.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};

use crate::error::{Error, Result};

/// Longest usable unix socket path on this platform, in bytes (`sun_path` minus its NUL).
#[cfg(target_os = "linux")]
pub const UNIX_PATH_MAX: usize = 107;
/// Longest usable unix socket path on this platform, in bytes (`sun_path` minus its NUL).
#[cfg(not(target_os = "linux"))]
pub const UNIX_PATH_MAX: usize = 103;

/// Most fds sent in one SCM_RIGHTS message (Linux's `SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 253;

/// Fails with [`Error::PathTooLong`] when `path` cannot be a unix socket address.
pub fn check_unix_path(path: &Path) -> Result<()> {
    let len = path.as_os_str().len();
    if len > UNIX_PATH_MAX {
        return Err(Error::PathTooLong {
            path: path.to_owned(),
            len,
            limit: UNIX_PATH_MAX,
        });
    }
    Ok(())
}

/// A nonblocking, close-on-exec unix listener on `path` with room for `backlog` pending peers.
pub fn listen_unix(path: &Path, backlog: i32) -> io::Result<std::os::unix::net::UnixListener> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    socket::bind(fd.as_raw_fd(), &addr)?;
    socket::listen(&fd, Backlog::new(backlog)?)?;
    Ok(std::os::unix::net::UnixListener::from(fd))
}

/// A nonblocking, close-on-exec TCP listener on `addr` with room for `backlog` pending peers.
pub fn listen_tcp(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    // Linux lets `listen` be called again on a listening socket to change its backlog.
    socket::listen(&listener, Backlog::new(backlog)?)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Sends one space byte (JSON whitespace, ignored by QEMU's parser) carrying `fds` as
/// SCM_RIGHTS. Runs inside mio's `try_io`, so `WouldBlock` clears the socket's readiness.
pub fn send_fds(stream: &mio::net::UnixStream, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raws: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let iov = [IoSlice::new(b" ")];
    let cmsg = [ControlMessage::ScmRights(&raws)];
    loop {
        let sent = stream.try_io(|| {
            socket::sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// poll(2) on `fds`, each for writing (`true`) or reading (`false`), for at most `timeout`
/// (`None`: no limit; whole milliseconds, 60 s at most). Says which are ready (any event,
/// hang-ups and errors included); EINTR is an [`io::ErrorKind::Interrupted`] error. Used by
/// the fake server.
#[cfg_attr(not(feature = "testing"), allow(dead_code))]
pub fn poll_ready(
    fds: &[(BorrowedFd<'_>, bool)],
    timeout: Option<Duration>,
) -> io::Result<Vec<bool>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let timeout = match timeout {
        None => PollTimeout::NONE,
        Some(t) => {
            PollTimeout::try_from(t.as_millis().min(60_000) as u32).unwrap_or(PollTimeout::MAX)
        }
    };
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|(fd, write)| {
            let flags = if *write {
                PollFlags::POLLOUT
            } else {
                PollFlags::POLLIN
            };
            PollFd::new(*fd, flags)
        })
        .collect();
    poll(&mut polled, timeout).map_err(io::Error::from)?;
    Ok(polled.iter().map(|p| p.any().unwrap_or(false)).collect())
}

/// Reads from a (blocking or nonblocking) unix socket, appending any fds received with
/// SCM_RIGHTS to `fds` (close-on-exec). Used by the fake server to record passed fds.
#[cfg_attr(not(feature = "testing"), allow(dead_code))]
#[allow(unsafe_code)]
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(
        sock.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut cmsg_buf),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let n = msg.bytes;
    for cmsg in msg.cmsgs()? {
        if let socket::ControlMessageOwned::ScmRights(raws) = cmsg {
            for raw in raws {
                // SAFETY: the kernel just installed `raw` in our fd table for this message
                // (SCM_RIGHTS); nothing else knows about it, so we are its sole owner.
                fds.push(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
            }
        }
    }
    Ok(n)
}

/// The pid and uid of the process at the other end of a unix socket (`SO_PEERCRED`), as
/// the peer was when it connected.
pub fn peer_credentials(sock: BorrowedFd<'_>) -> Option<(i32, u32)> {
    let creds = socket::getsockopt(&sock, socket::sockopt::PeerCredentials).ok()?;
    Some((creds.pid(), creds.uid()))
}
