//! The socket side of a session: nonblocking reads and writes on mio, drained until `WouldBlock`.
//!
//! Shared by the blocking [`crate::Connection`] and the thread-safe [`crate::Shared`]. The socket
//! is registered through its raw fd (`SourceFd`), so registration needs no `&mut` to the stream
//! and the stream can be read by one thread while another writes.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};

use crate::error::{Error, Result};
use crate::session::Session;

/// Token of the connection's socket in its Poll.
pub(crate) const SOCKET: Token = Token(0);
/// Token of the optional abort fd (e.g. a pidfd).
pub(crate) const ABORT: Token = Token(1);

/// Size of one read from the socket.
pub(crate) const READ_CHUNK: usize = 64 * 1024;
/// The first size of a connection's read buffer: enough for QMP's usual short messages. A
/// program holding hundreds of connections (a fleet of machines) would otherwise hold
/// `READ_CHUNK` per connection (measured: about 12 MB more peak RSS for 200 machines).
pub(crate) const READ_START: usize = 4 * 1024;

/// After a read of `n` bytes into `buf`: a read that filled it grows it (times four, up to
/// [`READ_CHUNK`]), so large replies are read in large chunks from then on. What was read is
/// consumed before this is called.
pub(crate) fn grow_if_full(buf: &mut Box<[u8]>, n: usize) {
    if n == buf.len() && buf.len() < READ_CHUNK {
        *buf = vec![0; (buf.len() * 4).min(READ_CHUNK)].into_boxed_slice();
    }
}
/// Most bytes read in one go before the caller's condition is checked again, so an event flood
/// never starves the reply the caller waits for.
pub(crate) const READ_BUDGET: usize = 4 * READ_CHUNK;

/// A connected stream socket.
#[derive(Debug)]
pub(crate) enum Stream {
    /// A unix socket: path, socketpair end or adopted fd. Can pass fds.
    Unix(mio::net::UnixStream),
    /// A TCP socket.
    Tcp(mio::net::TcpStream),
}

impl Stream {
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tcp(s) => (&*s).read(buf),
        }
    }

    pub(crate) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).write(buf),
            Stream::Tcp(s) => (&*s).write(buf),
        }
    }

    pub(crate) fn shutdown(&self) -> io::Result<()> {
        let res = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
        match res {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        }
    }

    pub(crate) fn unix(&self) -> Option<&mio::net::UnixStream> {
        match self {
            Stream::Unix(s) => Some(s),
            Stream::Tcp(_) => None,
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// What one read attempt produced.
pub(crate) enum Chunk {
    Data(usize),
    WouldBlock,
    Eof,
    Failed(io::Error),
}

/// One read, retrying EINTR.
pub(crate) fn read_chunk(stream: &Stream, buf: &mut [u8]) -> Chunk {
    loop {
        match stream.read(buf) {
            Ok(0) => return Chunk::Eof,
            Ok(n) => return Chunk::Data(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Chunk::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Chunk::Failed(e),
        }
    }
}

/// Feeds one read outcome into the session. Returns true when more data may be waiting.
pub(crate) fn feed_chunk(session: &mut Session, chunk: Chunk, buf: &[u8]) -> bool {
    match chunk {
        Chunk::Data(n) => {
            session.feed(&buf[..n]);
            session.failure().is_none()
        }
        Chunk::WouldBlock => false,
        Chunk::Eof => {
            session.feed_eof();
            false
        }
        Chunk::Failed(e) => {
            session.feed_io_error("read", e);
            false
        }
    }
}

/// Reads until the socket is drained, EOF, an error, or the read budget. Returns true when the
/// budget ran out first (more data may be waiting and no new readiness event will say so).
///
/// "Drained" is `WouldBlock`, or, unless `until_would_block`, a short read: a stream socket
/// returns everything it holds up to the buffer's size, so a short read means it was empty at
/// that moment, and edge-triggered epoll reports every later arrival as a new event (tokio
/// relies on the same). That saves one `read` per reply. After the peer closed (`RDHUP`), the
/// closing edge has already been consumed, so the caller asks for a read until `WouldBlock`
/// (which then sees the EOF).
pub(crate) fn read_available(
    stream: &Stream,
    buf: &mut Box<[u8]>,
    session: &mut Session,
    until_would_block: bool,
) -> bool {
    let mut total = 0;
    loop {
        let chunk = read_chunk(stream, buf);
        let n = match chunk {
            Chunk::Data(n) => n,
            _ => 0,
        };
        if !feed_chunk(session, chunk, buf) {
            return false;
        }
        if n < buf.len() && !until_would_block {
            return false;
        }
        grow_if_full(buf, n);
        total += n;
        if total >= READ_BUDGET {
            return true;
        }
    }
}

/// Writes the session's pending output until done or `WouldBlock`. While output is left over,
/// WRITABLE interest is registered (and dropped again once everything is written), so a slow
/// peer costs no busy loop.
pub(crate) fn flush(
    stream: &Stream,
    registry: &Registry,
    write_interest: &mut bool,
    session: &mut Session,
) {
    while session.wants_write() {
        match stream.write(session.pending_output()) {
            Ok(0) => {
                session.feed_io_error("write", io::ErrorKind::WriteZero.into());
                return;
            }
            Ok(n) => {
                log::trace!("wrote {n} bytes");
                session.consume_output(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                session.feed_io_error("write", e);
                return;
            }
        }
    }
    let want = session.wants_write();
    if want != *write_interest {
        let interest = if want {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let raw = stream.as_raw_fd();
        match registry.reregister(&mut SourceFd(&raw), SOCKET, interest) {
            Ok(()) => *write_interest = want,
            Err(e) => session.feed_io_error("write", e),
        }
    }
}

/// The readiness a wait produced.
#[derive(Default)]
pub(crate) struct Wake {
    /// The socket is readable (or writable, or closed).
    pub(crate) socket: bool,
    /// The peer closed its side or the socket has an error: read until `WouldBlock` from now on.
    pub(crate) closed: bool,
    /// The abort fd is readable.
    pub(crate) abort: bool,
}

/// Waits on `poll` until readiness or `timeout`, retrying EINTR with the remaining time.
pub(crate) fn wait(poll: &mut Poll, events: &mut Events, deadline: Instant) -> Result<Wake> {
    loop {
        let timeout = deadline.saturating_duration_since(Instant::now());
        match poll.poll(events, Some(timeout)) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                if Instant::now() >= deadline {
                    return Ok(Wake::default());
                }
                continue;
            }
            Err(e) => {
                return Err(Error::Io {
                    op: "poll",
                    source: e,
                })
            }
        }
    }
    let mut wake = Wake::default();
    for event in events.iter() {
        if log::log_enabled!(log::Level::Trace) {
            log::trace!("poll event {event:?}");
        }
        match event.token() {
            SOCKET => {
                wake.socket = true;
                wake.closed |= event.is_read_closed() || event.is_error();
            }
            ABORT => wake.abort = true,
            _ => {}
        }
    }
    Ok(wake)
}

/// A fresh Poll with `fd` registered for reading under [`SOCKET`].
pub(crate) fn new_poll(fd: RawFd) -> Result<Poll> {
    let poll = Poll::new().map_err(|e| Error::Io {
        op: "poll",
        source: e,
    })?;
    poll.registry()
        .register(&mut SourceFd(&fd), SOCKET, Interest::READABLE)
        .map_err(|e| Error::Io {
            op: "poll",
            source: e,
        })?;
    Ok(poll)
}

/// Registers `abort` (if any) under [`ABORT`]; undo with [`deregister_abort`].
pub(crate) fn register_abort(registry: &Registry, abort: Option<BorrowedFd<'_>>) -> Result<()> {
    if let Some(fd) = abort {
        let raw = fd.as_raw_fd();
        registry
            .register(&mut SourceFd(&raw), ABORT, Interest::READABLE)
            .map_err(|e| Error::Io {
                op: "poll",
                source: e,
            })?;
    }
    Ok(())
}

/// Removes the abort fd registered by [`register_abort`]; the fd must still be open.
pub(crate) fn deregister_abort(registry: &Registry, abort: Option<BorrowedFd<'_>>) {
    if let Some(fd) = abort {
        let raw = fd.as_raw_fd();
        if let Err(e) = registry.deregister(&mut SourceFd(&raw)) {
            log::warn!("cannot deregister the abort fd: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_buffer_grows_only_after_full_reads_and_stops_at_the_chunk() {
        let mut buf = vec![0; READ_START].into_boxed_slice();
        grow_if_full(&mut buf, READ_START - 1);
        assert_eq!(buf.len(), READ_START);
        let mut sizes = Vec::new();
        for _ in 0..4 {
            let n = buf.len();
            grow_if_full(&mut buf, n);
            sizes.push(buf.len());
        }
        assert_eq!(sizes, [16 * 1024, READ_CHUNK, READ_CHUNK, READ_CHUNK]);
    }

    #[test]
    fn a_large_message_is_read_whole_through_a_small_buffer() {
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        ours.set_nonblocking(true).expect("nonblocking");
        let stream = Stream::Unix(mio::net::UnixStream::from_std(ours));
        let mut session = Session::new(&crate::Config::default());
        let text = "x".repeat(200 * 1024);
        let greeting = format!(
            r#"{{"QMP": {{"version": {{"qemu": {{"micro": 0, "minor": 2, "major": 7}}, "package": "{text}"}}, "capabilities": []}}}}"#
        );
        std::io::Write::write_all(&mut theirs, greeting.as_bytes()).expect("write");
        std::io::Write::write_all(&mut theirs, b"\r\n").expect("write");
        drop(theirs);
        let mut buf = vec![0; READ_START].into_boxed_slice();
        while read_available(&stream, &mut buf, &mut session, true) {}
        assert_eq!(buf.len(), READ_CHUNK);
        let package = session.greeting().map(|g| g.version.package.len());
        assert_eq!(package, Some(text.len()));
    }
}
