//! The OS calls this crate makes through nix (socket type check, non-signalling send, poll for
//! writability), wrapped in safe, typed functions so the rest of the crate never sees errno.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    connect, getsockopt, send, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockType,
    UnixAddr,
};

use crate::error::{Error, Result};

/// Fails unless `fd` is a stream socket (what a QEMU `-chardev socket` peer is).
pub(crate) fn check_stream_socket(fd: BorrowedFd<'_>) -> Result<()> {
    match getsockopt(&fd, sockopt::SockType) {
        Ok(SockType::Stream) => Ok(()),
        Ok(_) => Err(Error::NotAStreamSocket { source: None }),
        Err(errno) => Err(Error::NotAStreamSocket {
            source: Some(io::Error::from(errno)),
        }),
    }
}

/// Sends all of `data` on a non-blocking socket before `deadline`.
///
/// Uses `MSG_NOSIGNAL`, so a vanished peer is [`Error::BrokenPipe`], never a `SIGPIPE` that
/// would kill a process that has not ignored it. `timeout` only labels the error.
pub(crate) fn send_all(
    fd: BorrowedFd<'_>,
    data: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<()> {
    let mut written = 0;
    while written < data.len() {
        match send(fd.as_raw_fd(), &data[written..], MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => written += n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::SendTimeout {
                        written,
                        len: data.len(),
                        timeout,
                    });
                }
                wait_writable(fd, deadline - now).map_err(|source| Error::Send {
                    written,
                    len: data.len(),
                    source,
                })?;
            }
            Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN) => {
                return Err(Error::BrokenPipe {
                    written,
                    len: data.len(),
                })
            }
            Err(errno) => {
                return Err(Error::Send {
                    written,
                    len: data.len(),
                    source: io::Error::from(errno),
                })
            }
        }
    }
    log::trace!("console --> {} bytes", data.len());
    Ok(())
}

/// Waits up to `timeout` for `fd` to accept output (or report an error, which the next send
/// then returns). A timeout simply returns; the caller rechecks its deadline.
fn wait_writable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    // Round up so that we never wake a hair before the deadline and spin.
    let millis = timeout.as_nanos().div_ceil(1_000_000);
    let timeout = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    match poll(&mut fds, timeout) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(errno) => Err(io::Error::from(errno)),
    }
}

/// One nonblocking connect to the unix socket `path` (close-on-exec). A listener whose backlog
/// is full gives `WouldBlock` at once, where a blocking connect would sleep without limit.
pub(crate) fn connect_unix_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}
