//! The poll-driven drainer: reads the console socket in 64 KiB chunks whenever an owner's
//! `mio::Poll` reports it readable, and feeds the shared core. The background thread of
//! [`Console`] runs exactly this type with its own `Poll`.

use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use mio::event::Source;
use mio::{Interest, Registry, Token};

use crate::config::Config;
use crate::console::Console;
use crate::core::Shared;
use crate::error::{CloseReason, Result};

/// Longest run of bytes read without waking the waiters during a flood.
const NOTIFY_MAX: usize = 256 * 1024;

/// Most bytes one [`Drainer::drain`] call reads before it returns control
/// ([`DrainStatus::More`]), so that one flooding console cannot hold the thread that drives
/// many. Four 64 KiB reads.
pub const DRAIN_BUDGET: usize = 256 * 1024;

/// What [`Drainer::drain`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainStatus {
    /// Everything available was read (`WouldBlock`); wait for the next readiness event.
    Open,
    /// The call read [`DRAIN_BUDGET`] bytes and stopped with input possibly left. No readiness
    /// event may announce that input (the registration is edge-triggered and the peer may have
    /// gone quiet): call [`drain`](Drainer::drain) again, after serving the other sources,
    /// without waiting in the poll for this one (poll with a zero timeout meanwhile).
    More,
    /// The stream ended (EOF, reset, read error or local close): deregister and drop the
    /// drainer. Later calls keep returning `Closed`.
    Closed,
}

/// The reading half of a console, driven by its owner's [`mio::Poll`].
///
/// Create it with [`Drainer::from_unix_stream`] (or [`from_fd`](Drainer::from_fd),
/// [`connect`](Drainer::connect)); you get the drainer and the [`Console`] handle that reads,
/// waits and sends. Register the drainer (it is a [`mio::event::Source`]) for
/// [`Interest::READABLE`], then, following mio's contract:
///
/// - call [`drain`](Drainer::drain) after every readiness event for its token, and once right
///   after registering; it reads until `WouldBlock` ([`DrainStatus::Open`]) or until
///   [`DRAIN_BUDGET`] bytes ([`DrainStatus::More`]);
/// - after [`DrainStatus::More`], call `drain` again without waiting for a readiness event
///   (there may be none: the registration is edge-triggered): keep such drainers on a ready
///   list, serve the other sources, and poll with a zero timeout while the list is not empty.
///   The budget keeps one flooding console from starving the others on the same thread;
///   [`wants_read`](Drainer::wants_read) tells the same as the last status;
/// - bound your `poll` timeout by [`next_flush`](Drainer::next_flush) and call
///   [`flush_if_due`](Drainer::flush_if_due) when it passes, so the log file is never more than
///   the flush interval behind;
/// - when `drain` returns [`DrainStatus::Closed`], deregister and drop it.
///
/// Waits on the [`Console`] block until the drainer delivers output, so they must run on
/// another thread than the one driving the poll; on the driving thread use a zero timeout
/// (a non-blocking check). Dropping the drainer flushes the log and, if the stream had not
/// ended yet, ends it for the [`Console`]: its waits return [`Error::Closed`] with
/// [`CloseReason::Local`] at once, as nothing will deliver output any more.
///
/// [`Error::Closed`]: crate::Error::Closed
///
/// ```
/// use std::os::unix::net::UnixStream;
/// use std::io::Write;
/// use std::time::Duration;
/// use console_socket::{Config, Drainer, DrainStatus, Pattern};
/// use mio::{Events, Interest, Poll, Token};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (ours, mut guest) = UnixStream::pair()?;
/// let (mut drainer, mut console) = Drainer::from_unix_stream(ours, Config::default())?;
/// let mut poll = Poll::new()?;
/// poll.registry().register(&mut drainer, Token(7), Interest::READABLE)?;
///
/// guest.write_all(b"Welcome\r\nlogin: ")?;
/// let mut events = Events::with_capacity(16);
/// let pattern = Pattern::substring("login: ");
/// let found = loop {
///     assert_eq!(drainer.drain(), DrainStatus::Open);
///     match console.wait_for(&pattern, Duration::ZERO) {
///         Ok(found) => break found,
///         Err(console_socket::Error::Timeout { .. }) => {}
///         Err(e) => return Err(e.into()),
///     }
///     poll.poll(&mut events, Some(Duration::from_secs(5)))?;
/// };
/// assert_eq!(found.before(), b"Welcome\r\n");
/// # Ok(())
/// # }
/// ```
pub struct Drainer {
    stream: mio::net::UnixStream,
    shared: Arc<Shared>,
    /// Wake waiters at least this often (bytes) while the socket stays readable.
    notify_every: usize,
    finished: bool,
    /// The last `drain` stopped at its budget.
    wants_read: bool,
}

impl Drainer {
    /// Attaches to a connected stream socket (for example our end of a socketpair whose other
    /// end QEMU got as `-chardev socket,fd=N`).
    pub fn from_unix_stream(stream: UnixStream, config: Config) -> Result<(Drainer, Console)> {
        crate::sys::check_stream_socket(std::os::fd::AsFd::as_fd(&stream))?;
        let shared = Arc::new(Shared::new(&config)?);
        stream
            .set_nonblocking(true)
            .map_err(|source| crate::Error::Setup {
                what: "make the socket non-blocking",
                source,
            })?;
        let writer = stream.try_clone().map_err(|source| crate::Error::Setup {
            what: "duplicate the socket for writing",
            source,
        })?;
        let drainer = Drainer {
            stream: mio::net::UnixStream::from_std(stream),
            shared: Arc::clone(&shared),
            // A quarter of the buffer: waiters get to scan output well before it is evicted.
            notify_every: (config.buffer_capacity / 4).clamp(1, NOTIFY_MAX),
            finished: false,
            wants_read: false,
        };
        Ok((drainer, Console::new(shared, writer, &config)))
    }

    /// Attaches to a connected stream socket given as an owned fd.
    pub fn from_fd(fd: OwnedFd, config: Config) -> Result<(Drainer, Console)> {
        Drainer::from_unix_stream(UnixStream::from(fd), config)
    }

    /// Connects to a unix socket path where QEMU listens (`server=on,wait=off`), retrying
    /// until [`Config::connect_timeout`] while the path is missing, refuses connections or has a
    /// full backlog.
    pub fn connect(path: &Path, config: Config) -> Result<(Drainer, Console)> {
        let stream = crate::console::connect_unix(path, config.connect_timeout)?;
        Drainer::from_unix_stream(stream, config)
    }

    /// Reads what is available, in 64 KiB chunks, into the log and the buffer, until the
    /// socket would block ([`DrainStatus::Open`]), the stream ends ([`DrainStatus::Closed`]) or
    /// [`DRAIN_BUDGET`] bytes were read ([`DrainStatus::More`]: call again without waiting for
    /// an event). Flushes the log if a flush is due.
    pub fn drain(&mut self) -> DrainStatus {
        // Waiters are woken when the socket runs dry or the budget runs out, and at least every
        // `notify_every` bytes during a flood: one wake-up per burst instead of one per chunk.
        let mut unannounced = 0;
        let mut budget = DRAIN_BUDGET;
        self.wants_read = false;
        while !self.finished {
            if budget == 0 {
                if unannounced > 0 {
                    self.shared.notify();
                }
                self.shared.flush_log_if_due(Instant::now());
                self.wants_read = true;
                return DrainStatus::More;
            }
            let mut stream = &self.stream;
            let read = self.shared.ingest_from(|spare| {
                // At most the budget left: one call never reads more than `DRAIN_BUDGET`.
                let (first, rest) = spare.split_at_mut(1);
                if first[0].len() >= budget || rest[0].is_empty() {
                    let n = first[0].len().min(budget);
                    stream.read(&mut first[0][..n])
                } else {
                    let n = rest[0].len().min(budget - first[0].len());
                    let mut bufs = [
                        io::IoSliceMut::new(&mut first[0]),
                        io::IoSliceMut::new(&mut rest[0][..n]),
                    ];
                    stream.read_vectored(&mut bufs)
                }
            });
            match read {
                Ok(0) => self.finish(CloseReason::Eof),
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    unannounced += n;
                    if unannounced >= self.notify_every {
                        self.shared.notify();
                        unannounced = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if unannounced > 0 {
                        self.shared.notify();
                    }
                    self.shared.flush_log_if_due(Instant::now());
                    return DrainStatus::Open;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.finish(CloseReason::Reset)
                }
                Err(e) => {
                    log::warn!("console read failed, draining stops: {e}");
                    self.finish(CloseReason::ReadFailed(e.kind()));
                }
            }
        }
        DrainStatus::Closed
    }

    /// When the log file next needs a flush ([`flush_if_due`](Drainer::flush_if_due)), if
    /// buffered log bytes are pending.
    pub fn next_flush(&self) -> Option<Instant> {
        self.shared.flush_due()
    }

    /// Flushes the log file if its oldest buffered byte has waited the flush interval.
    pub fn flush_if_due(&mut self) {
        self.shared.flush_log_if_due(Instant::now());
    }

    /// True when the last [`drain`](Drainer::drain) returned [`DrainStatus::More`]: input may
    /// be left that no readiness event will announce, so call `drain` again before waiting.
    pub fn wants_read(&self) -> bool {
        self.wants_read
    }

    /// True once [`drain`](Drainer::drain) has returned [`DrainStatus::Closed`].
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Whether this drainer feeds the console sharing `shared`.
    pub(crate) fn feeds(&self, shared: &Arc<Shared>) -> bool {
        Arc::ptr_eq(&self.shared, shared)
    }

    /// Ends the drain for a reason found outside `drain` (the thread's poll failing).
    pub(crate) fn fail(&mut self, reason: CloseReason) {
        self.finish(reason);
    }

    fn finish(&mut self, reason: CloseReason) {
        self.finished = true;
        self.shared.finish(reason);
    }
}

impl Source for Drainer {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.stream.register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.stream.reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        self.stream.deregister(registry)
    }
}

impl Drop for Drainer {
    fn drop(&mut self) {
        // Nobody will deliver output any more: waiters get `Closed` now instead of sitting
        // out their timeouts. `finish` also flushes the log.
        if self.finished {
            self.shared.flush_log();
        } else {
            self.finish(CloseReason::Local);
        }
    }
}

impl std::fmt::Debug for Drainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drainer")
            .field("finished", &self.finished)
            .field("bytes_total", &self.shared.bytes_total())
            .finish_non_exhaustive()
    }
}
