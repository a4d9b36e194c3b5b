//! The socket side of the multiplexer: listeners and client connections on an owner's
//! `mio::Poll`, driving a [`Mux`].

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use log::{debug, info, warn};
use mio::event::Event;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use super::core::{ClientId, Mux, MuxStats};
use crate::error::{Error, Result};
use crate::io::{read_chunk, Chunk, Stream, READ_BUDGET, READ_CHUNK};
use crate::listener::{clear_stale_socket, Listener};
use crate::session::Session;
use crate::sys;

/// Pending connections each listener holds before `accept`.
const BACKLOG: i32 = 16;

/// Name of the socket inside a private directory.
const SOCKET_NAME: &str = "qmp.sock";

/// Where a [`MuxServer`] listens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShareAddress {
    /// The unix socket path; `None`: `qmp.sock` in a new private (0700) directory under
    /// `$XDG_RUNTIME_DIR` or the temp dir, removed with the server. An existing path is
    /// replaced only when it is a stale socket (nothing listens); any other file is refused.
    pub unix: Option<PathBuf>,
    /// A loopback TCP address to listen on as well (port 0 picks a free one).
    pub tcp: Option<SocketAddr>,
}

impl ShareAddress {
    /// A unix socket at `path`.
    pub fn unix(path: impl Into<PathBuf>) -> ShareAddress {
        ShareAddress {
            unix: Some(path.into()),
            tcp: None,
        }
    }

    /// Also listen on the loopback TCP address `addr`.
    pub fn with_tcp(mut self, addr: SocketAddr) -> ShareAddress {
        self.tcp = Some(addr);
        self
    }
}

struct Conn {
    stream: Stream,
    client: ClientId,
    /// Readiness was reported and the socket has not been read until `WouldBlock` since.
    readable: bool,
    write_interest: bool,
}

/// Shares one QMP monitor: accepts clients on a unix socket (and optionally loopback TCP) and
/// drives a [`Mux`] for them on the owner's `mio::Poll`.
///
/// The owner registers it ([`MuxServer::register`], which takes every token from `base` up),
/// hands it each readiness event of those tokens ([`MuxServer::handle`]), and calls
/// [`MuxServer::pump`] with the shared session each time round its loop, after the session
/// processed its own input; then it writes the session's output. Before waiting again it asks
/// [`MuxServer::wants_pump`]: a client that floods input is read at most a budget at a time,
/// so it cannot starve QEMU's socket or other clients, and input the owner read while writing
/// must still be relayed.
///
/// Dropping the server closes every client and removes its socket file (only if it is still
/// the one it bound) and its private directory.
pub struct MuxServer {
    mux: Mux,
    unix: Option<Listener>,
    tcp: Option<Listener>,
    path: PathBuf,
    private_dir: Option<PathBuf>,
    conns: HashMap<Token, Conn>,
    base: Option<usize>,
    buf: Box<[u8]>,
    /// Some client stopped at its read budget with input possibly left.
    more: bool,
}

impl std::fmt::Debug for MuxServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxServer")
            .field("path", &self.path)
            .field("tcp", &self.tcp_addr())
            .field("mux", &self.mux)
            .finish_non_exhaustive()
    }
}

impl MuxServer {
    /// Binds the sockets of `address` for `mux`. Nothing is registered yet.
    pub fn bind(mux: Mux, address: &ShareAddress) -> Result<MuxServer> {
        let (path, private_dir) = match &address.unix {
            Some(path) => {
                clear_stale_socket(path)?;
                (path.clone(), None)
            }
            None => {
                let dir = private_dir()?;
                (dir.join(SOCKET_NAME), Some(dir))
            }
        };
        let mut server = MuxServer {
            mux,
            unix: None,
            tcp: None,
            path,
            private_dir,
            conns: HashMap::new(),
            base: None,
            buf: vec![0; READ_CHUNK].into_boxed_slice(),
            more: false,
        };
        // From here on, Drop cleans up whatever was created.
        server.unix = Some(Listener::bind_unix_backlog(&server.path, BACKLOG)?);
        if let Err(e) =
            std::fs::set_permissions(&server.path, std::fs::Permissions::from_mode(0o600))
        {
            warn!("cannot make {} private: {e}", server.path.display());
        }
        if let Some(addr) = address.tcp {
            if !addr.ip().is_loopback() {
                return Err(Error::NotLoopback { addr });
            }
            server.tcp = Some(Listener::bind_tcp_backlog(addr, BACKLOG)?);
        }
        info!(
            "sharing QMP on {}{}",
            server.path.display(),
            server
                .tcp_addr()
                .map(|a| format!(" and tcp {a}"))
                .unwrap_or_default()
        );
        Ok(server)
    }

    /// The unix socket clients connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The TCP address, when listening on TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(Listener::local_addr)
    }

    /// The multiplexer.
    pub fn mux(&self) -> &Mux {
        &self.mux
    }

    /// The multiplexer's counters.
    pub fn stats(&self) -> MuxStats {
        self.mux.stats()
    }

    /// Registers the listeners on `registry`. The server uses `base` and every token above
    /// it (listeners, then one per client).
    pub fn register(&mut self, registry: &Registry, base: Token) -> Result<()> {
        self.base = Some(base.0);
        if let Some(l) = &mut self.unix {
            l.register(registry, Token(base.0))?;
        }
        if let Some(l) = &mut self.tcp {
            l.register(registry, Token(base.0 + 1))?;
        }
        Ok(())
    }

    /// Whether `token` is one of the server's.
    pub fn owns(&self, token: Token) -> bool {
        self.base.is_some_and(|base| token.0 >= base)
    }

    /// True when [`MuxServer::pump`] must run again before the owner waits for readiness: a
    /// client stopped at its read budget, or `upstream` holds relayed messages (the owner's
    /// own reads, when it writes the session's output, may bring some in).
    pub fn wants_pump(&self, upstream: &Session) -> bool {
        self.more || upstream.has_relayed()
    }

    /// Handles one readiness event of the server's tokens: accepts new clients, reads input
    /// (within a budget) and writes queued output. Call [`MuxServer::pump`] afterwards.
    pub fn handle(&mut self, registry: &Registry, event: &Event) {
        let Some(base) = self.base else { return };
        let token = event.token();
        if token.0 == base || token.0 == base + 1 {
            self.accept(registry, token.0 == base);
            return;
        }
        if let Some(conn) = self.conns.get_mut(&token) {
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                conn.readable = true;
            }
            self.service(registry, token);
        }
    }

    /// Moves messages between the clients and `upstream` (see [`Mux::pump`]), reads input of
    /// clients that have room again, writes every client's output and closes the clients
    /// that are done. Then the owner writes `upstream`'s output.
    pub fn pump(&mut self, registry: &Registry, upstream: &mut Session) {
        self.more = false;
        self.mux.pump(upstream);
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for token in &tokens {
            self.service(registry, *token);
        }
        // Input read just now may have queued commands; forward them at once.
        self.mux.pump(upstream);
        for token in tokens {
            self.flush(registry, token);
        }
        self.close_dropped(registry);
    }

    fn accept(&mut self, registry: &Registry, unix: bool) {
        let Some(base) = self.base else { return };
        loop {
            let listener = if unix { &self.unix } else { &self.tcp };
            let Some(listener) = listener else { return };
            let stream = match listener.try_accept() {
                Ok(Some(stream)) => stream,
                Ok(None) => return,
                Err(e) => {
                    warn!("shared QMP monitor: {e}");
                    return;
                }
            };
            let peer = describe_peer(&stream);
            let client = self.mux.add_client(peer);
            let token = Token(base + 1 + client.as_u64() as usize);
            let raw = stream.as_raw_fd();
            if let Err(e) = registry.register(
                &mut SourceFd(&raw),
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                warn!("cannot register {client}: {e}");
                self.mux.remove_client(client);
                continue;
            }
            self.conns.insert(
                token,
                Conn {
                    stream,
                    client,
                    // Input may already wait; writable interest is on until the greeting is out.
                    readable: true,
                    write_interest: true,
                },
            );
            self.service(registry, token);
        }
    }

    /// Reads what the client may send now (within the budget), then writes its output.
    fn service(&mut self, registry: &Registry, token: Token) {
        let mut total = 0;
        loop {
            let Some(conn) = self.conns.get_mut(&token) else {
                return;
            };
            if !conn.readable || !self.mux.wants_input(conn.client) {
                break;
            }
            if total >= READ_BUDGET {
                self.more = true;
                break;
            }
            match read_chunk(&conn.stream, &mut self.buf) {
                Chunk::Data(n) => {
                    total += n;
                    let client = conn.client;
                    self.mux.feed(client, &self.buf[..n]);
                }
                Chunk::WouldBlock => conn.readable = false,
                Chunk::Eof => return self.close(registry, token, "closed the connection"),
                Chunk::Failed(e) => {
                    let why = format!("read failed: {e}");
                    return self.close(registry, token, &why);
                }
            }
        }
        self.flush(registry, token);
    }

    /// Writes the client's queued output until done or `WouldBlock`, with writable interest
    /// while some is left; closes the client once a closing client's output is out.
    fn flush(&mut self, registry: &Registry, token: Token) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let client = conn.client;
        loop {
            let out = self.mux.output(client);
            if out.is_empty() {
                break;
            }
            match conn.stream.write(out) {
                Ok(0) => {
                    return self.close(registry, token, "write returned 0");
                }
                Ok(n) => self.mux.consume_output(client, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    let why = format!("write failed: {e}");
                    return self.close(registry, token, &why);
                }
            }
        }
        let left = !self.mux.output(client).is_empty();
        if !left && self.mux.closing(client) {
            return self.close(registry, token, "closed by the multiplexer");
        }
        if left != conn.write_interest {
            let interest = if left {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            let raw = conn.stream.as_raw_fd();
            match registry.reregister(&mut SourceFd(&raw), token, interest) {
                Ok(()) => conn.write_interest = left,
                Err(e) => {
                    let why = format!("poll registration failed: {e}");
                    self.close(registry, token, &why);
                }
            }
        }
    }

    /// Closes the sockets of clients the multiplexer dropped for overflowing.
    fn close_dropped(&mut self, registry: &Registry) {
        for (info, reason) in self.mux.take_dropped() {
            debug!("{info} dropped: {reason:?}");
            let token = self
                .conns
                .iter()
                .find(|(_, c)| c.client == info.id)
                .map(|(t, _)| *t);
            if let Some(token) = token {
                // Overflowed clients are gone from the mux; refused and closing ones go once
                // their last bytes are out (see `flush`).
                if self.mux.output(info.id).is_empty() {
                    self.close(registry, token, "dropped by the multiplexer");
                }
            }
        }
    }

    fn close(&mut self, registry: &Registry, token: Token, why: &str) {
        let Some(conn) = self.conns.remove(&token) else {
            return;
        };
        let raw = conn.stream.as_raw_fd();
        if let Err(e) = registry.deregister(&mut SourceFd(&raw)) {
            debug!("cannot deregister {}: {e}", conn.client);
        }
        debug!("{}: {why}", conn.client);
        self.mux.remove_client(conn.client);
    }

    /// Closes every client and deregisters everything (the sockets are closed when the
    /// server is dropped).
    pub fn shutdown(&mut self, registry: &Registry) {
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for token in tokens {
            self.close(registry, token, "the shared monitor is shutting down");
        }
        for listener in [&mut self.unix, &mut self.tcp].into_iter().flatten() {
            listener.deregister(registry);
        }
        self.base = None;
    }
}

impl Drop for MuxServer {
    fn drop(&mut self) {
        // The listener removes its socket file; then the private directory can go.
        self.unix = None;
        if let Some(dir) = &self.private_dir {
            if let Err(e) = std::fs::remove_dir(dir) {
                warn!("cannot remove {}: {e}", dir.display());
            }
        }
    }
}

/// Describes the peer of an accepted connection for logs and reports.
fn describe_peer(stream: &Stream) -> String {
    match stream {
        Stream::Unix(s) => match sys::peer_credentials(s.as_fd()) {
            Some((pid, uid)) => format!("unix pid {pid} uid {uid}"),
            None => "unix".to_owned(),
        },
        Stream::Tcp(s) => match s.peer_addr() {
            Ok(addr) => format!("tcp {addr}"),
            Err(_) => "tcp".to_owned(),
        },
    }
}

/// A new 0700 directory for a socket: under `$XDG_RUNTIME_DIR` when set, else the temp dir.
fn private_dir() -> Result<PathBuf> {
    let parent = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let pid = std::process::id();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for attempt in 0..100u32 {
        let dir = parent.join(format!(
            "qemu-machine-qmp-{pid}-{:08x}",
            nanos.wrapping_add(attempt.wrapping_mul(0x9e37_79b9))
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::PrivateDir { parent, source: e }),
        }
    }
    Err(Error::PrivateDir {
        parent,
        source: io::ErrorKind::AlreadyExists.into(),
    })
}
