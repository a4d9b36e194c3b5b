//! Server mode: we listen (backlog 1), QEMU connects to us (`-qmp unix:PATH` without `server`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::{Events, Interest, Poll};

use crate::config::Config;
use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::io::{self as sockio, Stream};
use crate::sys;

#[derive(Debug)]
enum Inner {
    Unix(mio::net::UnixListener),
    Tcp(mio::net::TcpListener),
}

/// A listening socket waiting for one QMP server (QEMU) to connect.
///
/// A unix listener removes its socket file when dropped (only if the file is still the socket
/// it created). An existing path is never replaced: binding fails with [`Error::Bind`].
#[derive(Debug)]
pub struct Listener {
    inner: Inner,
    path: Option<PathBuf>,
    identity: Option<(u64, u64)>,
    address: String,
}

impl Listener {
    /// Binds a unix socket at `path` (backlog 1). [`Error::PathTooLong`] comes before anything
    /// is created.
    pub fn bind_unix(path: &Path) -> Result<Listener> {
        Listener::bind_unix_backlog(path, 1)
    }

    /// [`Listener::bind_unix`] with room for `backlog` pending connections (the multiplexer
    /// takes many clients).
    pub(crate) fn bind_unix_backlog(path: &Path, backlog: i32) -> Result<Listener> {
        sys::check_unix_path(path)?;
        let address = path.display().to_string();
        let std_listener = sys::listen_unix(path, backlog).map_err(|e| Error::Bind {
            address: address.clone(),
            source: e,
        })?;
        let identity = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        debug!("listening on {address}");
        Ok(Listener {
            inner: Inner::Unix(mio::net::UnixListener::from_std(std_listener)),
            path: Some(path.to_owned()),
            identity,
            address,
        })
    }

    /// Binds a TCP socket at `addr` (backlog 1; port 0 picks a free port, see
    /// [`Listener::local_addr`]). A non-loopback address logs a warning: QMP has no
    /// authentication.
    pub fn bind_tcp(addr: SocketAddr) -> Result<Listener> {
        Listener::bind_tcp_backlog(addr, 1)
    }

    /// [`Listener::bind_tcp`] with room for `backlog` pending connections.
    pub(crate) fn bind_tcp_backlog(addr: SocketAddr, backlog: i32) -> Result<Listener> {
        let address = addr.to_string();
        if !addr.ip().is_loopback() {
            warn!("QMP listener on non-loopback {addr}: QMP has no authentication");
        }
        let std_listener = sys::listen_tcp(addr, backlog).map_err(|e| Error::Bind {
            address: address.clone(),
            source: e,
        })?;
        Ok(Listener {
            inner: Inner::Tcp(mio::net::TcpListener::from_std(std_listener)),
            path: None,
            identity: None,
            address,
        })
    }

    /// The unix socket path, for a unix listener.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The bound TCP address, for a TCP listener.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.inner {
            Inner::Tcp(l) => l.local_addr().ok(),
            Inner::Unix(_) => None,
        }
    }

    /// Waits up to `timeout` for one peer, then runs the handshake per `config`. The listener
    /// is closed (and its socket file removed) afterwards, so later peers are refused.
    ///
    /// When `abort` turns readable (e.g. QEMU's pidfd: QEMU exited) during the accept or the
    /// handshake, the wait ends at once with [`Error::Aborted`]. This is a loop over
    /// [`Listener::accept_step`] and [`Connection::handshake_step`], the same steps an owner's
    /// poll drives.
    pub fn accept(
        mut self,
        timeout: Duration,
        abort: Option<BorrowedFd<'_>>,
        config: &Config,
    ) -> Result<Connection> {
        let deadline = Instant::now() + timeout;
        let mut poll = Poll::new().map_err(|e| Error::Io {
            op: "poll",
            source: e,
        })?;
        let mut events = Events::with_capacity(4);
        self.register(poll.registry(), sockio::SOCKET)?;
        sockio::register_abort(poll.registry(), abort)?;
        let accepted = loop {
            match self.accept_step(deadline, timeout, config) {
                Ok(Some(conn)) => break Ok(conn),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            match sockio::wait(&mut poll, &mut events, deadline) {
                Ok(wake) if wake.abort => break Err(Error::Aborted),
                Ok(_) => {}
                Err(e) => break Err(e),
            }
        };
        sockio::deregister_abort(poll.registry(), abort);
        let conn = accepted?;
        drop(self);
        conn.finish_handshake(abort)
    }

    /// One step of an accept driven by the caller's poll (register the listener's fd, see
    /// [`AsFd`], for readable): takes a pending peer without waiting. `Ok(Some(connection))`
    /// once a peer is there: its handshake has not run yet (drive it with
    /// [`Connection::handshake_step`] and [`Connection::process_io`]; the greeting deadline
    /// starts now), and the listener can be dropped to refuse later peers. `Ok(None)` while
    /// nobody has connected and `deadline` has not passed; [`Error::AcceptTimeout`] (naming
    /// `timeout`) once it has.
    pub fn accept_step(
        &self,
        deadline: Instant,
        timeout: Duration,
        config: &Config,
    ) -> Result<Option<Connection>> {
        match self.try_accept()? {
            Some(stream) => {
                info!("accepted a QMP peer on {}", self.address);
                Connection::adopt(stream, config).map(Some)
            }
            None if Instant::now() >= deadline => Err(Error::AcceptTimeout {
                address: self.address.clone(),
                timeout,
            }),
            None => Ok(None),
        }
    }

    /// Accepts one pending peer without waiting: `None` when there is none (`WouldBlock`).
    pub(crate) fn try_accept(&self) -> Result<Option<Stream>> {
        loop {
            let accepted = match &self.inner {
                Inner::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Inner::Tcp(l) => l.accept().map(|(s, addr)| {
                    if let Err(e) = s.set_nodelay(true) {
                        debug!("cannot set TCP_NODELAY for {addr}: {e}");
                    }
                    Stream::Tcp(s)
                }),
            };
            return match accepted {
                Ok(stream) => Ok(Some(stream)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => Err(Error::Accept {
                    address: self.address.clone(),
                    source: e,
                }),
            };
        }
    }

    /// Registers the listening socket on `registry` under `token` (readable: a peer waits).
    pub(crate) fn register(&mut self, registry: &mio::Registry, token: mio::Token) -> Result<()> {
        let registered = match &mut self.inner {
            Inner::Unix(l) => registry.register(l, token, Interest::READABLE),
            Inner::Tcp(l) => registry.register(l, token, Interest::READABLE),
        };
        registered.map_err(|e| Error::Io {
            op: "poll",
            source: e,
        })
    }

    /// Removes the listening socket from `registry`.
    pub(crate) fn deregister(&mut self, registry: &mio::Registry) {
        let result = match &mut self.inner {
            Inner::Unix(l) => registry.deregister(l),
            Inner::Tcp(l) => registry.deregister(l),
        };
        if let Err(e) = result {
            debug!("cannot deregister the listener on {}: {e}", self.address);
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.inner {
            Inner::Unix(l) => l.as_fd(),
            Inner::Tcp(l) => l.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let (Some(path), Some(identity)) = (&self.path, self.identity) else {
            return;
        };
        // Remove the socket file only if it is still the one we bound.
        match std::fs::symlink_metadata(path) {
            Ok(m) if (m.dev(), m.ino()) == identity => {
                if let Err(e) = std::fs::remove_file(path) {
                    warn!("cannot remove socket {}: {e}", path.display());
                }
            }
            _ => {}
        }
    }
}

/// Makes `path` free for a unix socket: nothing there is fine; a socket nobody listens on (a
/// stale one) is removed; a live socket is [`Error::SocketInUse`] and any other file (a
/// regular file, a symlink, a directory) [`Error::NotASocket`]: never replaced. Checks the
/// length first ([`Error::PathTooLong`]). The probe is a nonblocking connect, so a listener
/// with a full backlog counts as live instead of blocking us.
pub fn clear_stale_socket(path: &Path) -> Result<()> {
    sys::check_unix_path(path)?;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::Bind {
                address: path.display().to_string(),
                source: e,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotASocket {
            path: path.to_owned(),
        });
    }
    // A nonblocking connect: refused at once when nothing listens; a full backlog
    // (`WouldBlock`) means something does.
    match mio::net::UnixStream::connect(path) {
        Ok(_) => Err(Error::SocketInUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Error::SocketInUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!("removing stale socket {}", path.display());
            std::fs::remove_file(path).map_err(|e| Error::Bind {
                address: path.display().to_string(),
                source: e,
            })
        }
        Err(e) => Err(Error::Bind {
            address: path.display().to_string(),
            source: e,
        }),
    }
}
