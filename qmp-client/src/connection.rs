//! The QMP connection: one [`Driver`](crate::driver) held in place ([`Owned`], the default)
//! or shared between threads ([`Sharing`], see [`Shared`](crate::Shared)); the command API is
//! written once for both.

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use qmp_proto::{Command, Event, EventFilter, Greeting, ServerMessage};
use serde_json::{Map, Value};

use crate::config::Config;
use crate::driver::{self, Holder, Link, Owned, Place, Poller, Pump, SessionGuard, Sharing, State};
use crate::error::{Error, Result};
use crate::io::{self as sockio, Stream};
use crate::session::{Phase, RequestId, Session};
use crate::sys;

/// Most bytes one [`Connection::process_io`] call reads before it returns control.
pub const PROCESS_BUDGET: usize = 1024 * 1024;

/// A QMP connection, with a deadline on every wait.
///
/// One type, two ways of holding it: `Connection` (that is, `Connection<Owned>`) is driven by
/// the thread that owns it; [`Shared`](crate::Shared) (`Connection<Sharing>`, made with
/// [`Connection::into_shared`] or [`Shared::new`](crate::Shared::new)) is cloned into many
/// threads that issue commands at once. Both run the same driver and the same command methods.
///
/// Obtain one with [`Connection::connect_unix`], [`Connection::connect_tcp`],
/// [`Connection::from_unix_stream`] (a socketpair end) or [`crate::Listener::accept`]; each runs
/// the greeting and `qmp_capabilities` handshake as [`Config`] says before returning. Or adopt
/// a socket without waiting ([`Connection::adopt_unix_stream`]) and drive the handshake from
/// your own poll ([`Connection::handshake_step`]).
///
/// Events that arrive while a call waits for something else are queued (bounded, see
/// [`Config::event_capacity`]), never dropped silently and never mistaken for replies. Once the
/// connection fails (EOF, socket error, undecodable data, an id-less error) every later call
/// returns [`Error::Disconnected`] with that cause at once. After a `quit` we sent, EOF or
/// ECONNRESET is a clean close and `quit` itself returns `Ok`.
///
/// # Driving it from your own `mio::Poll`
///
/// Nothing here needs a thread. Register the socket with a token of your choice
/// ([`Connection::register`]); on each readiness event for that token call
/// [`Connection::process_io`] (and call it again, before you wait, while
/// [`Connection::wants_read`] is true: it reads a budget per call so that one flooding peer
/// cannot starve your other sources). Send without waiting with [`Connection::submit`] and
/// pick up the reply later with [`Connection::take_reply`]; events with
/// [`Connection::pop_event`] / [`Session::take_matching_event`] through
/// [`Connection::session_mut`]. Deadlines are yours to keep: [`Session::request_info`] tells
/// how long a request has waited, [`Session::abandon`] forgets one.
///
/// ```no_run
/// use mio::{Events, Poll, Token};
/// use qmp_client::{Config, Connection};
/// use qmp_proto::Command;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (ours, _qemus_end) = std::os::unix::net::UnixStream::pair()?;
/// let mut qmp = Connection::adopt_unix_stream(ours, &Config::default())?;
/// let mut poll = Poll::new()?;
/// let mut events = Events::with_capacity(64);
/// qmp.register(poll.registry(), Token(7))?;
/// // The handshake, stepped: `Some(deadline)` while it runs.
/// while let Some(deadline) = qmp.handshake_step()? {
///     let timeout = deadline.saturating_duration_since(std::time::Instant::now());
///     poll.poll(&mut events, Some(timeout))?;
///     qmp.process_io()?;
/// }
/// let id = qmp.submit(Command::new("query-status"))?;
/// let reply = loop {
///     if let Some(reply) = qmp.take_reply(id) {
///         break reply?;
///     }
///     poll.poll(&mut events, None)?;
///     qmp.process_io()?;
/// };
/// println!("{}", reply.to_value());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Connection<H = Owned> {
    hold: H,
}

impl Connection<Owned> {
    /// Connects to a QMP server listening on the unix socket `path`, then does the handshake.
    ///
    /// A path longer than the platform limit fails with [`Error::PathTooLong`] before any
    /// socket is created. A server whose backlog is full is retried until
    /// [`Config::connect_timeout`].
    pub fn connect_unix(path: &Path, config: &Config) -> Result<Connection> {
        sys::check_unix_path(path)?;
        let start = Instant::now();
        let deadline = start + config.connect_timeout;
        let mut backoff = Duration::from_millis(1);
        let stream = loop {
            match mio::net::UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // The listener's backlog is full: nothing to poll on for a unix socket.
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Error::ConnectTimeout {
                            address: path.display().to_string(),
                            timeout: config.connect_timeout,
                        });
                    }
                    std::thread::sleep(backoff.min(deadline - now));
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::Connect {
                        address: path.display().to_string(),
                        source: e,
                    })
                }
            }
        };
        info!("connected to {}", path.display());
        Connection::establish(Stream::Unix(stream), config, None)
    }

    /// Connects over TCP (every resolved address in turn, within [`Config::connect_timeout`]),
    /// then does the handshake. A non-loopback address works but logs a warning: QMP has no
    /// authentication.
    pub fn connect_tcp(addr: impl ToSocketAddrs, config: &Config) -> Result<Connection> {
        let (addr, stream) = connect_tcp_any(addr, config.connect_timeout)?;
        if !addr.ip().is_loopback() {
            warn!("QMP over TCP to non-loopback {addr}: QMP has no authentication");
        }
        info!("connected to {addr}");
        Connection::establish(Stream::Tcp(stream), config, None)
    }

    /// Adopts a connected unix socket (e.g. our end of the socketpair handed to QEMU as
    /// `-chardev socket,fd=N`), then does the handshake.
    pub fn from_unix_stream(
        stream: std::os::unix::net::UnixStream,
        config: &Config,
    ) -> Result<Connection> {
        Connection::from_unix_stream_with_abort(stream, config, None)
    }

    /// Like [`Connection::from_unix_stream`], but the handshake also watches `abort`: when it
    /// turns readable (QEMU's pidfd when QEMU exits) the wait ends at once with
    /// [`Error::Aborted`] instead of running into the greeting timeout.
    pub fn from_unix_stream_with_abort(
        stream: std::os::unix::net::UnixStream,
        config: &Config,
        abort: Option<BorrowedFd<'_>>,
    ) -> Result<Connection> {
        let stream = adopt_unix(stream)?;
        Connection::establish(Stream::Unix(stream), config, abort)
    }

    /// Adopts a connected unix socket without waiting for anything: the handshake has not
    /// run yet. Drive it with [`Connection::handshake_step`] and [`Connection::process_io`]
    /// from your own poll (see the type's docs); the greeting deadline starts now.
    pub fn adopt_unix_stream(
        stream: std::os::unix::net::UnixStream,
        config: &Config,
    ) -> Result<Connection> {
        let stream = adopt_unix(stream)?;
        Connection::adopt(Stream::Unix(stream), config)
    }

    pub(crate) fn adopt(stream: Stream, config: &Config) -> Result<Connection> {
        let poller = Poller::new(&stream)?;
        Ok(Connection {
            hold: Owned {
                place: Place::Here {
                    link: Arc::new(Link {
                        stream,
                        command_timeout: config.command_timeout,
                        greeting_timeout: config.greeting_timeout,
                    }),
                    state: State::new(Session::new(config), Some(poller)),
                },
            },
        })
    }

    pub(crate) fn establish(
        stream: Stream,
        config: &Config,
        abort: Option<BorrowedFd<'_>>,
    ) -> Result<Connection> {
        Connection::adopt(stream, config)?.finish_handshake(abort)
    }

    /// Runs the handshake of an adopted connection to its end, also ending (with
    /// [`Error::Aborted`]) when `abort` turns readable; on failure the socket is shut down.
    pub(crate) fn finish_handshake(mut self, abort: Option<BorrowedFd<'_>>) -> Result<Connection> {
        self.with_poller(|p| sockio::register_abort(p.poll.registry(), abort))?;
        let outcome = self.handshake();
        self.with_poller(|p| {
            sockio::deregister_abort(p.poll.registry(), abort);
            Ok(())
        })?;
        match outcome {
            Ok(()) => Ok(self),
            Err(e) => {
                let _ = self.hold.link().stream.shutdown();
                Err(e)
            }
        }
    }

    /// The blocking handshake: a loop over [`Connection::handshake_step`].
    fn handshake(&mut self) -> Result<()> {
        while let Some(deadline) = self.handshake_step()? {
            let phase = self.with(|s| s.phase());
            driver::pump(&mut self.hold, deadline, |_, s| {
                (s.phase() != phase || !s.in_handshake()).then_some(())
            })?;
        }
        Ok(())
    }

    /// One step of the handshake, without blocking: reads nothing itself (call
    /// [`Connection::process_io`] on readiness), but checks where the handshake stands.
    ///
    /// `Ok(Some(deadline))` while it runs (wake up by then at the latest: the greeting has
    /// [`Config::greeting_timeout`] from the adoption, `qmp_capabilities` has
    /// [`Config::command_timeout`] from the greeting); `Ok(None)` once the session is ready;
    /// an error when the deadline passed ([`Error::GreetingTimeout`], [`Error::Negotiation`])
    /// or the session failed (the original cause, not [`Error::Disconnected`]).
    pub fn handshake_step(&mut self) -> Result<Option<Instant>> {
        let (link, st) = self.hold.lock();
        let session = &st.session;
        let now = Instant::now();
        // A session that got ready and then failed (the peer closed right after the
        // negotiation) did complete its handshake: the next command reports the failure.
        let outcome = if session.handshake_completed() {
            Some(None)
        } else if session.failure().is_some() {
            None
        } else if session.phase() == Phase::Greeting {
            let deadline = session.created() + link.greeting_timeout;
            if now >= deadline {
                return Err(Error::GreetingTimeout {
                    timeout: link.greeting_timeout,
                });
            }
            Some(Some(deadline))
        } else if session.in_handshake() {
            let since = session.phase_since();
            let deadline = since + link.command_timeout;
            if now >= deadline {
                return Err(Error::Negotiation {
                    cause: Box::new(Error::CommandTimeout {
                        command: "qmp_capabilities".into(),
                        waited: since.elapsed(),
                    }),
                });
            }
            Some(Some(deadline))
        } else {
            None
        };
        drop(st);
        outcome.ok_or_else(|| self.take_failure())
    }

    /// Replaces the session's failure by a plain `Closed` and returns the original.
    fn take_failure(&mut self) -> Error {
        self.with(|session| {
            let fresh = Session::new(&Config::default());
            let mut old = std::mem::replace(session, fresh);
            session.close();
            old.close();
            old.into_failure()
        })
    }

    /// Runs `f` on the poller (when it is in place: always, unless the connection is shared
    /// and another thread is pumping).
    fn with_poller(&mut self, f: impl FnOnce(&mut Poller) -> Result<()>) -> Result<()> {
        let (_, mut st) = self.hold.lock();
        match st.poller.as_mut() {
            Some(poller) => f(poller),
            None => Ok(()),
        }
    }

    /// The protocol state, for inspection (under the lock once the connection is shared).
    pub fn session(&mut self) -> SessionGuard<'_> {
        SessionGuard(self.hold.lock().1)
    }

    /// The protocol state, for callers driving the socket from their own `mio::Poll`: queue
    /// commands with [`Session::send`], call [`Connection::process_io`] on readiness, collect
    /// replies with [`Session::take_reply`] and events with [`Session::pop_event`].
    pub fn session_mut(&mut self) -> SessionGuard<'_> {
        SessionGuard(self.hold.lock().1)
    }

    /// Registers the socket in the caller's `registry` under `token`, edge-triggered for
    /// READABLE | WRITABLE (what [`Connection::process_io`] expects). The connection's own
    /// blocking calls keep working beside it. Undo with [`Connection::deregister`] before the
    /// registry's poll goes away, or simply drop the connection.
    pub fn register(&self, registry: &Registry, token: Token) -> Result<()> {
        let raw = self.hold.link().stream.as_raw_fd();
        registry
            .register(
                &mut SourceFd(&raw),
                token,
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| Error::Io {
                op: "poll",
                source: e,
            })
    }

    /// Removes the socket from a registry it was [registered](Connection::register) in.
    pub fn deregister(&self, registry: &Registry) -> Result<()> {
        let raw = self.hold.link().stream.as_raw_fd();
        registry
            .deregister(&mut SourceFd(&raw))
            .map_err(|e| Error::Io {
                op: "poll",
                source: e,
            })
    }

    /// Nonblocking: writes pending output and reads what is available, until `WouldBlock` or
    /// [`PROCESS_BUDGET`] bytes, whichever comes first. Call it when the socket is readable or
    /// writable in the caller's own Poll (register it edge-triggered, READABLE | WRITABLE,
    /// e.g. with [`Connection::register`]). Fails only with the sticky failure.
    ///
    /// The budget keeps one flooding peer from holding a thread that drives many connections:
    /// when it runs out, [`Connection::wants_read`] is true and no new readiness event may come
    /// for the input left, so call `process_io` again (after serving the other sources) before
    /// waiting in the poll.
    pub fn process_io(&mut self) -> Result<()> {
        let (link, mut guard) = self.hold.lock();
        let state = &mut *guard;
        state.flush(link);
        // Without the poller (shared, and another thread is pumping) that thread reads. The
        // caller's Poll may not tell us about RDHUP: read until WouldBlock here, within the
        // budget.
        state.read_budgeted(link, PROCESS_BUDGET);
        // What was read may have queued output (the greeting queues `qmp_capabilities`): send
        // it now, no readiness event will come for it.
        if state.session.wants_write() {
            state.flush(link);
        }
        match state.session.failure() {
            Some(_) => Err(state.session.disconnected()),
            None => Ok(()),
        }
    }

    /// True when [`Connection::process_io`] stopped at its budget with input possibly left
    /// (call it again; no readiness event may announce that input).
    pub fn wants_read(&mut self) -> bool {
        self.hold
            .lock()
            .1
            .poller
            .as_ref()
            .is_some_and(|p| p.read_hint)
    }

    /// Nonblocking send: queues `cmd` (its id is replaced by a fresh one) and writes what the
    /// socket takes now; the rest goes out on the next [`Connection::process_io`]. Fails with
    /// [`Error::TooManyInFlight`] instead of waiting when no slot is free, and with the
    /// sticky failure. Pick the reply up with [`Connection::take_reply`].
    pub fn submit(&mut self, cmd: Command) -> Result<RequestId> {
        let (link, mut state) = self.hold.lock();
        let id = state.session.send(cmd)?;
        state.flush(link);
        Ok(id)
    }

    /// Nonblocking: the reply to `id` if it has arrived (a QMP error reply is
    /// `Ok(ServerMessage::Error)`; a failed session is `Err`). `None` while it is pending.
    pub fn take_reply(&mut self, id: RequestId) -> Option<Result<ServerMessage>> {
        self.with(|s| s.take_reply(id))
    }

    /// Nonblocking: the oldest queued event, if any (no read: call
    /// [`Connection::process_io`] on readiness).
    pub fn pop_event(&mut self) -> Option<Event> {
        self.with(|s| s.pop_event())
    }

    /// Shares this connection with other threads: returns a [`Shared`](crate::Shared)
    /// handle (clone it for more). This connection keeps working beside the handles, through
    /// the same driver (the first call moves the driver behind a mutex; later calls return
    /// new handles on it). Events are one queue: whoever takes an event takes it for all.
    pub fn share(&mut self) -> Result<crate::Shared> {
        Ok(Connection {
            hold: self.hold.share()?,
        })
    }

    /// Whether [`Connection::share`] was called.
    pub fn is_shared(&self) -> bool {
        self.hold.is_shared()
    }

    /// Turns this connection into a [`Shared`](crate::Shared) handle for many threads.
    pub fn into_shared(mut self) -> Result<crate::Shared> {
        self.share()
    }

    /// Closes the connection: writes what is still queued (within
    /// [`Config::command_timeout`]), then shuts the socket down. Pending requests are lost.
    pub fn close(mut self) -> Result<()> {
        self.shut(true)
    }

    #[cfg(test)]
    pub(crate) fn fail_next_poll(&mut self, kind: std::io::ErrorKind) {
        let _ = self.with_poller(|p| {
            p.fail_next_poll = Some(kind);
            Ok(())
        });
    }
}

impl Connection<Sharing> {
    /// Wraps an established connection for many threads (same as
    /// [`Connection::into_shared`]).
    pub fn new(conn: Connection) -> Result<crate::Shared> {
        conn.into_shared()
    }

    /// Closes the connection for every handle: pending and later calls get
    /// [`Error::Disconnected`] with cause [`Error::Closed`].
    pub fn close(&self) -> Result<()> {
        self.clone().shut(false)
    }

    #[cfg(test)]
    pub(crate) fn fail_next_poll(&self, kind: std::io::ErrorKind) {
        if let Some(p) = self.hold.inner.lock().poller.as_mut() {
            p.fail_next_poll = Some(kind);
        }
    }

    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.hold.inner.lock().session.in_flight()
    }
}

/// The command API, the same for both ways of holding a connection.
#[allow(private_bounds)]
impl<H: Holder> Connection<H> {
    /// Runs `f` on the session under the lock.
    fn with<R>(&mut self, f: impl FnOnce(&mut Session) -> R) -> R {
        let (_, mut st) = self.hold.lock();
        f(&mut st.session)
    }

    fn pump<R>(
        &mut self,
        deadline: Instant,
        done: impl FnMut(&Link, &mut Session) -> Option<R>,
    ) -> Result<(Option<R>, Pump)> {
        driver::pump(&mut self.hold, deadline, done)
    }

    /// One nonblocking step for a relay driven from another thread's poll (the QMP
    /// multiplexer sharing this connection): writes pending output, reads what is available
    /// (within [`PROCESS_BUDGET`]) unless another thread is pumping the socket right now, runs
    /// `f` on the session, writes what `f` queued, and wakes threads waiting on the
    /// connection. Works the same on an owned and on a shared connection.
    ///
    /// Returns `f`'s value and whether this step could read: `false` means another thread
    /// reads (the session's relay waker, [`Session::set_relay_waker`], says when it relays
    /// something; come back soon for input it may leave unread). Fails only with the sticky
    /// failure, after `f` has seen the failed session.
    pub fn step_relay<R>(&mut self, f: impl FnOnce(&mut Session) -> R) -> Result<(R, bool)> {
        let (link, mut guard) = self.hold.lock();
        let state = &mut *guard;
        state.flush(link);
        let read = state.read_budgeted(link, PROCESS_BUDGET);
        if read {
            state.seq += 1;
        }
        let value = f(&mut state.session);
        state.flush(link);
        let failed = state
            .session
            .failure()
            .map(|_| state.session.disconnected());
        drop(guard);
        if read {
            self.hold.notify();
        }
        match failed {
            Some(e) => Err(e),
            None => Ok((value, read)),
        }
    }

    /// The greeting the server sent (None when [`Config::await_greeting`] was false).
    pub fn greeting(&mut self) -> Option<Greeting> {
        self.with(|s| s.greeting().cloned())
    }

    /// True when the `oob` capability was negotiated.
    pub fn oob_enabled(&mut self) -> bool {
        self.with(|s| s.oob_enabled())
    }

    /// True until the connection fails or closes.
    pub fn is_connected(&mut self) -> bool {
        self.with(|s| s.failure().is_none())
    }

    /// Runs `cmd` with `args` and returns its `return` value, within [`Config::command_timeout`].
    ///
    /// A QMP error reply is [`Error::Command`] with the class, the description and `cmd`.
    pub fn execute(&mut self, cmd: &str, args: Option<Map<String, Value>>) -> Result<Value> {
        let timeout = self.hold.link().command_timeout;
        self.execute_with_timeout(cmd, args, timeout)
    }

    /// [`Connection::execute`] with its own timeout.
    pub fn execute_with_timeout(
        &mut self,
        cmd: &str,
        args: Option<Map<String, Value>>,
        timeout: Duration,
    ) -> Result<Value> {
        let reply = self.run(command(cmd, args, false), Instant::now() + timeout)?;
        into_return(cmd, reply)
    }

    /// Runs `cmd` and returns the whole reply, QMP errors included (like `qmp()` in QEMU's
    /// Python `machine.py`). Transport failures are still errors.
    pub fn execute_raw(
        &mut self,
        cmd: &str,
        args: Option<Map<String, Value>>,
    ) -> Result<ServerMessage> {
        let deadline = Instant::now() + self.hold.link().command_timeout;
        self.run(command(cmd, args, false), deadline)
    }

    /// Runs `cmd` out of band (`exec-oob`): it may overtake in-band commands still queued in the
    /// server and is not counted against the limit of 8 in-band commands in flight, but against
    /// [`Config::max_oob_in_flight`] out-of-band ones (default 64). Needs the
    /// `oob` capability ([`Connection::oob_enabled`]), else the server rejects it.
    pub fn execute_oob(&mut self, cmd: &str, args: Option<Map<String, Value>>) -> Result<Value> {
        let deadline = Instant::now() + self.hold.link().command_timeout;
        let reply = self.run(command(cmd, args, true), deadline)?;
        into_return(cmd, reply)
    }

    fn run(&mut self, cmd: Command, deadline: Instant) -> Result<ServerMessage> {
        let id = self.send_by(cmd, deadline)?;
        self.wait_reply(id, deadline)
    }

    /// Queues `cmd` (its id is replaced by a fresh one) and starts writing it; returns at once
    /// unless 8 in-band commands (for an out-of-band one, [`Config::max_oob_in_flight`]
    /// out-of-band commands) are already in flight, in which case it first waits (up to
    /// [`Config::command_timeout`]) for one to complete. Collect the reply with
    /// [`Connection::wait_reply`]; several commands may be in flight (pipelining).
    pub fn send(&mut self, cmd: Command) -> Result<RequestId> {
        let deadline = Instant::now() + self.hold.link().command_timeout;
        self.send_by(cmd, deadline)
    }

    fn send_by(&mut self, cmd: Command, deadline: Instant) -> Result<RequestId> {
        let start = Instant::now();
        let name = cmd.execute.clone();
        let mut cmd = Some(cmd);
        let (sent, outcome) = self.pump(deadline, |_, s| {
            let oob = cmd.as_ref().is_some_and(|c| c.oob);
            if !s.has_slot(oob) {
                return None;
            }
            cmd.take().map(|c| s.send(c))
        })?;
        match (sent, outcome) {
            (Some(sent), _) => {
                let id = sent?;
                let (link, mut st) = self.hold.lock();
                st.flush(link);
                Ok(id)
            }
            (None, Pump::Failed) => Err(self.with(|s| s.disconnected())),
            (None, _) => Err(Error::CommandTimeout {
                command: name,
                waited: start.elapsed(),
            }),
        }
    }

    /// Waits until `deadline` for the reply to `id`: the whole message (a QMP error reply is
    /// `Ok(ServerMessage::Error)`). On timeout the request is forgotten (its late reply will be
    /// dropped and counted) and [`Error::CommandTimeout`] is returned.
    pub fn wait_reply(&mut self, id: RequestId, deadline: Instant) -> Result<ServerMessage> {
        let (reply, _) = self.pump(deadline, |_, s| s.take_reply(id))?;
        if let Some(outcome) = reply {
            return outcome;
        }
        let result = self.with(|s| {
            if let Some(outcome) = s.take_reply(id) {
                return outcome;
            }
            let (command, waited) = s
                .request_info(id)
                .map(|(c, age)| (c.to_owned(), age))
                .unwrap_or_default();
            s.abandon(id);
            Err(Error::CommandTimeout { command, waited })
        });
        // A slot may have been freed for a waiting sender.
        self.hold.notify();
        result
    }

    /// Sends `cmd` and waits for its reply and for the first event matching any of `filters`
    /// that arrives after the command was sent (before or after the reply), all within one
    /// total `timeout`. Events queued or already waiting unread in the socket when it is
    /// called count as older and are not taken. Avoids the race of subscribing after the
    /// command: e.g. `device_del` and `DEVICE_DELETED` for that device. Other events stay
    /// queued in order.
    pub fn execute_and_wait(
        &mut self,
        cmd: &str,
        args: Option<Map<String, Value>>,
        filters: &[EventFilter],
        timeout: Duration,
    ) -> Result<(Value, Event)> {
        let start = Instant::now();
        let deadline = start + timeout;
        // Events already waiting in the socket predate the command as much as queued ones:
        // read them (without blocking) before drawing the line. A failure found here is
        // sticky and reported by the send below.
        let _ = self.pump(start, |_, _| None::<()>);
        let since = self.with(|s| s.event_seq());
        let value = into_return(cmd, self.run(command(cmd, args, false), deadline)?)?;
        let event = self.wait_event_since(filters, since, deadline, timeout)?;
        Ok((value, event))
    }

    /// Takes the oldest queued event, waiting up to `timeout` for one to arrive
    /// (`Duration::ZERO`: just check what has arrived). `Ok(None)` when none came.
    pub fn pull_event(&mut self, timeout: Duration) -> Result<Option<Event>> {
        let deadline = Instant::now() + timeout;
        let (found, outcome) = self.pump(deadline, |_, s| match s.take_events_lost() {
            Some(lost) => Some(Err(lost)),
            None => s.pop_event().map(Ok),
        })?;
        match (found, outcome) {
            (Some(found), _) => found.map(Some),
            (None, Pump::Failed) => Err(self.with(|s| s.disconnected())),
            (None, _) => Ok(None),
        }
    }

    /// Waits for the first event matching any of `filters` (any event when empty), queued or
    /// new. `timeout` is a total: non-matching events do not restart it; they stay queued, in
    /// order.
    pub fn wait_event(&mut self, filters: &[EventFilter], timeout: Duration) -> Result<Event> {
        let start = Instant::now();
        self.wait_event_since(filters, 0, start + timeout, timeout)
    }

    fn wait_event_since(
        &mut self,
        filters: &[EventFilter],
        since: u64,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Event> {
        if let Some(lost) = self.with(|s| s.take_events_lost()) {
            return Err(lost);
        }
        let (found, outcome) = self.pump(deadline, |_, s| s.take_matching_event(filters, since))?;
        self.with(|s| event_wait_result(s, found, outcome == Pump::Failed, filters, timeout))
    }

    /// Takes every queued event (after a nonblocking read of what has arrived, unless another
    /// thread is reading right now), oldest first.
    pub fn drain_events(&mut self) -> Vec<Event> {
        // A failure here is sticky and reported by the next call that can return an error.
        let _ = self.pump(Instant::now(), |_, _| None::<()>);
        self.with(|s| s.drain_events())
    }

    /// Discards every queued event.
    pub fn clear_events(&mut self) {
        self.with(|s| s.clear_events());
    }

    /// Events discarded because the queue was full.
    pub fn events_dropped(&mut self) -> u64 {
        self.with(|s| s.events_dropped())
    }

    /// Replies dropped because of an unknown id (late replies to timed-out commands included).
    pub fn unknown_replies(&mut self) -> u64 {
        self.with(|s| s.unknown_replies())
    }

    /// Passes `fds` to the server with SCM_RIGHTS (one message per 253 fds, on a one-byte
    /// space, which QMP ignores), after everything queued before it. The server keeps them
    /// until a command such as `getfd` or `add-fd` claims them. Unix sockets only. Our fds
    /// stay open.
    pub fn send_fds(&mut self, fds: &[BorrowedFd<'_>]) -> Result<()> {
        let deadline = Instant::now() + self.hold.link().command_timeout;
        for group in fds.chunks(sys::MAX_FDS) {
            self.fds_then(group, None, deadline)?;
        }
        log::debug!("--> {} fds (SCM_RIGHTS)", fds.len());
        Ok(())
    }

    /// Sends `fds`, then (if given) queues `cmd` right behind them under the same lock, so
    /// another thread's fd can never be the one this command claims. Waits (until
    /// `deadline`) for earlier output to be written, for a slot, and for room in the socket.
    fn fds_then(
        &mut self,
        fds: &[BorrowedFd<'_>],
        cmd: Option<Command>,
        deadline: Instant,
    ) -> Result<Option<RequestId>> {
        if self.hold.link().stream.unix().is_none() {
            return Err(Error::FdPassingUnsupported);
        }
        let start = Instant::now();
        let name = cmd
            .as_ref()
            .map_or_else(|| "(fd passing)".to_owned(), |c| c.execute.clone());
        let mut cmd = cmd;
        loop {
            let (sent, outcome) = self.pump(deadline, |link, s| {
                // Everything queued before must be on the wire, and the command needs a slot.
                if s.wants_write() || (cmd.is_some() && !s.has_slot(false)) {
                    return None;
                }
                let unix = link.stream.unix()?;
                match sys::send_fds(unix, fds) {
                    Ok(()) => Some(Ok(cmd.take().map(|c| s.send(c)))),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Some(Err(None)),
                    Err(e) => {
                        s.feed_io_error("write", e);
                        Some(Err(Some(s.disconnected())))
                    }
                }
            })?;
            match (sent, outcome) {
                (Some(Ok(queued)), _) => {
                    let id = queued.transpose()?;
                    let (link, mut st) = self.hold.lock();
                    st.flush(link);
                    return Ok(id);
                }
                (Some(Err(Some(failure))), _) => {
                    self.hold.notify();
                    return Err(failure);
                }
                (Some(Err(None)), _) => {
                    // The peer is not reading: wait for room without holding the lock.
                    if let Some(unix) = self.hold.link().stream.unix() {
                        wait_writable(unix, deadline)?;
                    }
                    // The pump checks nothing when its condition already holds, so the
                    // deadline is checked here, or a peer that never reads would spin us.
                    if Instant::now() >= deadline {
                        return Err(Error::CommandTimeout {
                            command: name,
                            waited: start.elapsed(),
                        });
                    }
                }
                (None, Pump::Failed) => return Err(self.with(|s| s.disconnected())),
                (None, _) => {
                    return Err(Error::CommandTimeout {
                        command: name,
                        waited: start.elapsed(),
                    })
                }
            }
        }
    }

    fn fd_command(&mut self, fd: BorrowedFd<'_>, cmd: Command) -> Result<Value> {
        let deadline = Instant::now() + self.hold.link().command_timeout;
        let name = cmd.execute.clone();
        let id = self.fds_then(&[fd], Some(cmd), deadline)?;
        log::debug!("--> 1 fd (SCM_RIGHTS)");
        let Some(id) = id else {
            return Err(Error::FdPassingUnsupported);
        };
        into_return(&name, self.wait_reply(id, deadline)?)
    }

    /// Passes `fd` and names it `name` in QEMU with `getfd` (for `-netdev`'s `fd=name` and the
    /// like). The fd and the command go out back to back, so with several threads another
    /// thread's fd can never be the one this `getfd` claims.
    pub fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        let mut args = Map::new();
        args.insert("fdname".into(), Value::from(name));
        self.fd_command(fd, command("getfd", Some(args), false))
            .map(|_| ())
    }

    /// Passes `fd` and adds it to an fd set with `add-fd` (a new set when `fdset_id` is None);
    /// returns QEMU's reply (`{"fdset-id": N, "fd": M}`).
    pub fn add_fd(
        &mut self,
        fd: BorrowedFd<'_>,
        fdset_id: Option<u64>,
        opaque: Option<&str>,
    ) -> Result<Value> {
        let mut args = Map::new();
        if let Some(id) = fdset_id {
            args.insert("fdset-id".into(), Value::from(id));
        }
        if let Some(opaque) = opaque {
            args.insert("opaque".into(), Value::from(opaque));
        }
        self.fd_command(fd, command("add-fd", Some(args), false))
    }

    /// Ends the session (after writing what is queued, when `flush` and it is still up),
    /// wakes every waiter and shuts the socket down.
    fn shut(&mut self, flush: bool) -> Result<()> {
        if flush && self.with(|s| s.failure().is_none() && s.wants_write()) {
            let deadline = Instant::now() + self.hold.link().command_timeout;
            self.pump(deadline, |_, s| (!s.wants_write()).then_some(()))?;
        }
        self.with(|s| s.close());
        self.hold.notify();
        self.hold.link().stream.shutdown().map_err(|e| Error::Io {
            op: "shutdown",
            source: e,
        })
    }
}

impl<H: Holder> AsFd for Connection<H> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.hold.link().stream.as_fd()
    }
}

impl<H: Holder> AsRawFd for Connection<H> {
    fn as_raw_fd(&self) -> RawFd {
        self.hold.link().stream.as_raw_fd()
    }
}

/// Connects to every address `addr` resolves to in turn, all within `timeout`; the first that
/// answers wins.
pub(crate) fn connect_tcp_any(
    addr: impl ToSocketAddrs,
    timeout: Duration,
) -> Result<(SocketAddr, mio::net::TcpStream)> {
    let deadline = Instant::now() + timeout;
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| Error::Connect {
            address: "(unresolved address)".into(),
            source: e,
        })?
        .collect();
    let mut last: Option<Error> = None;
    for addr in addrs {
        match connect_tcp_one(addr, deadline, timeout) {
            Ok(stream) => return Ok((addr, stream)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::Connect {
        address: "(no address)".into(),
        source: std::io::ErrorKind::NotFound.into(),
    }))
}

/// Makes a std unix stream nonblocking and hands it to mio.
fn adopt_unix(stream: std::os::unix::net::UnixStream) -> Result<mio::net::UnixStream> {
    stream.set_nonblocking(true).map_err(|e| Error::Io {
        op: "set_nonblocking",
        source: e,
    })?;
    Ok(mio::net::UnixStream::from_std(stream))
}

/// Waits (up to `deadline`) until `stream` is writable, on a Poll of its own.
fn wait_writable(stream: &mio::net::UnixStream, deadline: Instant) -> Result<()> {
    let io_err = |e| Error::Io {
        op: "poll",
        source: e,
    };
    let mut poll = Poll::new().map_err(io_err)?;
    let raw = stream.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&raw), sockio::SOCKET, Interest::WRITABLE)
        .map_err(io_err)?;
    let mut events = Events::with_capacity(2);
    sockio::wait(&mut poll, &mut events, deadline)?;
    Ok(())
}

fn connect_tcp_one(
    addr: SocketAddr,
    deadline: Instant,
    timeout: Duration,
) -> Result<mio::net::TcpStream> {
    let connect_err = |e| Error::Connect {
        address: addr.to_string(),
        source: e,
    };
    let mut stream = mio::net::TcpStream::connect(addr).map_err(connect_err)?;
    let mut poll = Poll::new().map_err(|e| Error::Io {
        op: "poll",
        source: e,
    })?;
    let mut events = Events::with_capacity(2);
    poll.registry()
        .register(&mut stream, Token(0), Interest::WRITABLE)
        .map_err(|e| Error::Io {
            op: "poll",
            source: e,
        })?;
    loop {
        let wake = sockio::wait(&mut poll, &mut events, deadline)?;
        if wake.socket {
            if let Some(e) = stream.take_error().map_err(connect_err)? {
                return Err(connect_err(e));
            }
            match stream.peer_addr() {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => {}
                Err(e) => return Err(connect_err(e)),
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::ConnectTimeout {
                address: addr.to_string(),
                timeout,
            });
        }
    }
    poll.registry()
        .deregister(&mut stream)
        .map_err(|e| Error::Io {
            op: "poll",
            source: e,
        })?;
    stream.set_nodelay(true).map_err(connect_err)?;
    Ok(stream)
}

pub(crate) fn command(cmd: &str, args: Option<Map<String, Value>>, oob: bool) -> Command {
    let mut command = Command::new(cmd).with_oob(oob);
    if let Some(args) = args {
        command = command.with_arguments(args);
    }
    command
}

pub(crate) fn into_return(cmd: &str, reply: ServerMessage) -> Result<Value> {
    match reply {
        ServerMessage::Return(r) => Ok(r.ret),
        ServerMessage::Error(e) => Err(Error::Command {
            command: cmd.to_owned(),
            class: e.error.class,
            desc: e.error.desc,
        }),
        other => Err(Error::BadReply {
            command: cmd.to_owned(),
            raw: crate::session::excerpt(&other.to_value().to_string()),
        }),
    }
}

/// How an event wait ends once the socket was driven: the matching event if one was found,
/// else the report of events lost to the overflow policy, else the session's failure, else a
/// timeout. Shared by [`Connection`] and [`crate::Shared`].
pub(crate) fn event_wait_result(
    session: &mut Session,
    found: Option<Event>,
    failed: bool,
    filters: &[EventFilter],
    timeout: Duration,
) -> Result<Event> {
    if let Some(event) = found {
        return Ok(event);
    }
    if let Some(lost) = session.take_events_lost() {
        return Err(lost);
    }
    if failed {
        return Err(session.disconnected());
    }
    Err(Error::EventTimeout {
        names: filter_names(filters),
        timeout,
    })
}

pub(crate) fn filter_names(filters: &[EventFilter]) -> String {
    if filters.is_empty() {
        return "any event".into();
    }
    filters
        .iter()
        .map(|f| f.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Script;

    /// A poll error ends the session: the waiting command gets `Disconnected` with the poll
    /// error as cause at once, its slot is freed, and later calls fail the same way.
    #[test]
    fn a_poll_error_fails_the_session_and_frees_the_pending_request() {
        // "stall" is never answered.
        let (_server, stream) = Script::new().on("stall", Vec::new()).start_pair().unwrap();
        let mut conn = Connection::from_unix_stream(stream, &Config::default()).unwrap();
        let id = conn.send(Command::new("stall")).unwrap();
        assert_eq!(conn.session().in_flight(), 1);
        conn.fail_next_poll(std::io::ErrorKind::InvalidInput);
        let long = Duration::from_secs(10);
        let start = Instant::now();
        let is_poll_failure = |e: &Error| {
            matches!(e, Error::Disconnected { .. })
                && matches!(e.root(), Error::Io { op: "poll", .. })
        };
        match conn.wait_reply(id, start + long) {
            Err(e) => assert!(is_poll_failure(&e), "unexpected {e:?}"),
            Ok(m) => panic!("unexpected reply {m:?}"),
        }
        assert!(start.elapsed() < long / 2, "took {:?}", start.elapsed());
        assert_eq!(conn.session().in_flight(), 0);
        assert!(!conn.is_connected());
        match conn.execute("query-status", None) {
            Err(e) => assert!(is_poll_failure(&e), "unexpected {e:?}"),
            Ok(v) => panic!("unexpected {v}"),
        }
    }
}
