//! The blocking QMP connection: a [`Session`] driven on a socket by its own `mio::Poll`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::{Events, Interest, Poll, Token};
use qmp_proto::{Command, Event, EventFilter, Greeting, ServerMessage};
use serde_json::{Map, Value};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::io::{self as sockio, Stream, READ_CHUNK};
use crate::session::{Phase, RequestId, Session};
use crate::sys;

/// Most bytes one [`Connection::process_io`] call reads before it returns control.
pub const PROCESS_BUDGET: usize = 1024 * 1024;

/// How a wait on the session ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pump {
    /// The condition holds.
    Done,
    /// The session failed (its error is sticky).
    Failed,
    /// The deadline passed.
    TimedOut,
}

/// A QMP connection driven in the caller's thread, with a deadline on every wait.
///
/// Obtain one with [`Connection::connect_unix`], [`Connection::connect_tcp`],
/// [`Connection::from_unix_stream`] (a socketpair end) or [`crate::Listener::accept`]; each runs
/// the greeting and `qmp_capabilities` handshake as [`Config`] says before returning.
///
/// Events that arrive while a call waits for something else are queued (bounded, see
/// [`Config::event_capacity`]), never dropped silently and never mistaken for replies. Once the
/// connection fails (EOF, socket error, undecodable data, an id-less error) every later call
/// returns [`Error::Disconnected`] with that cause at once. After a `quit` we sent, EOF or
/// ECONNRESET is a clean close and `quit` itself returns `Ok`.
///
/// The socket can also be watched by a caller's own `mio::Poll` (through [`AsRawFd`]): on
/// readiness call [`Connection::process_io`], then use [`Connection::session_mut`] to send
/// commands and collect replies and events without blocking.
#[derive(Debug)]
pub struct Connection {
    stream: Stream,
    poll: Poll,
    events: Events,
    buf: Box<[u8]>,
    write_interest: bool,
    read_hint: bool,
    peer_closed: bool,
    session: Session,
    command_timeout: Duration,
    greeting_timeout: Duration,
    /// Test hook: the next poll fails with this error instead of polling.
    #[cfg(test)]
    fail_next_poll: Option<std::io::ErrorKind>,
}

impl Connection {
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
        stream.set_nonblocking(true).map_err(|e| Error::Io {
            op: "set_nonblocking",
            source: e,
        })?;
        let stream = mio::net::UnixStream::from_std(stream);
        Connection::establish(Stream::Unix(stream), config, abort)
    }

    pub(crate) fn establish(
        stream: Stream,
        config: &Config,
        abort: Option<BorrowedFd<'_>>,
    ) -> Result<Connection> {
        let poll = sockio::new_poll(stream.as_raw_fd())?;
        let mut conn = Connection {
            stream,
            poll,
            events: Events::with_capacity(8),
            buf: vec![0; READ_CHUNK].into_boxed_slice(),
            write_interest: false,
            // Data may already be waiting (a greeting sent before we registered).
            read_hint: true,
            peer_closed: false,
            session: Session::new(config),
            command_timeout: config.command_timeout,
            greeting_timeout: config.greeting_timeout,
            #[cfg(test)]
            fail_next_poll: None,
        };
        sockio::register_abort(conn.poll.registry(), abort)?;
        let outcome = conn.handshake();
        sockio::deregister_abort(conn.poll.registry(), abort);
        match outcome {
            Ok(()) => Ok(conn),
            Err(e) => {
                let _ = conn.stream.shutdown();
                Err(e)
            }
        }
    }

    fn handshake(&mut self) -> Result<()> {
        let start = Instant::now();
        let deadline = start + self.greeting_timeout;
        match self.pump(deadline, |s| s.phase() != Phase::Greeting)? {
            Pump::Done => {}
            Pump::Failed => return Err(self.take_failure()),
            Pump::TimedOut => {
                return Err(Error::GreetingTimeout {
                    timeout: self.greeting_timeout,
                })
            }
        }
        let negotiation_start = Instant::now();
        let deadline = negotiation_start + self.command_timeout;
        match self.pump(deadline, |s| !s.in_handshake())? {
            Pump::Done if self.session.handshake_completed() => Ok(()),
            Pump::Done | Pump::Failed => Err(self.take_failure()),
            Pump::TimedOut => Err(Error::Negotiation {
                cause: Box::new(Error::CommandTimeout {
                    command: "qmp_capabilities".into(),
                    waited: negotiation_start.elapsed(),
                }),
            }),
        }
    }

    /// Replaces the session's failure by a plain `Closed` and returns the original.
    fn take_failure(&mut self) -> Error {
        let fresh = Session::new(&Config::default());
        let mut old = std::mem::replace(&mut self.session, fresh);
        self.session.close();
        old.close();
        old.into_failure()
    }

    /// Drives the socket until `done` holds, the session fails, or `deadline` passes (one
    /// nonblocking check is always made, so a deadline in the past still reads what is there).
    pub(crate) fn pump(
        &mut self,
        deadline: Instant,
        mut done: impl FnMut(&mut Session) -> bool,
    ) -> Result<Pump> {
        let mut polled = false;
        loop {
            if self.session.wants_write() {
                sockio::flush(
                    &self.stream,
                    self.poll.registry(),
                    &mut self.write_interest,
                    &mut self.session,
                );
            }
            if self.read_hint {
                self.read_hint = sockio::read_available(
                    &self.stream,
                    &mut self.buf,
                    &mut self.session,
                    self.peer_closed,
                );
            }
            if done(&mut self.session) {
                return Ok(Pump::Done);
            }
            if self.session.failure().is_some() {
                return Ok(Pump::Failed);
            }
            if self.read_hint {
                // The read budget ran out with data still waiting (a flood): keep reading,
                // but never past the deadline, or a peer that never pauses would hold the
                // caller forever. What is left is read by the next call.
                if Instant::now() >= deadline {
                    return Ok(Pump::TimedOut);
                }
                continue;
            }
            if polled && Instant::now() >= deadline {
                return Ok(Pump::TimedOut);
            }
            polled = true;
            let waited = self.test_poll_failure().map_or_else(
                || sockio::wait(&mut self.poll, &mut self.events, deadline),
                Err,
            );
            let wake = match waited {
                Ok(wake) => wake,
                Err(e) => {
                    // The socket can no longer be driven: the session fails (sticky), so the
                    // pending requests end with it and later calls fail fast, as in `Shared`.
                    log::warn!("poll failed, the QMP session ends: {e}");
                    self.session.fail_with(e);
                    return Ok(Pump::Failed);
                }
            };
            if wake.abort {
                return Err(Error::Aborted);
            }
            if wake.socket {
                self.read_hint = true;
            }
            self.peer_closed |= wake.closed;
        }
    }

    /// The test hook's injected poll failure, if one is armed (never outside tests).
    fn test_poll_failure(&mut self) -> Option<Error> {
        #[cfg(test)]
        if let Some(kind) = self.fail_next_poll.take() {
            return Some(Error::Io {
                op: "poll",
                source: kind.into(),
            });
        }
        None
    }

    /// The greeting the server sent (None when [`Config::await_greeting`] was false).
    pub fn greeting(&self) -> Option<&Greeting> {
        self.session.greeting()
    }

    /// True when the `oob` capability was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.session.oob_enabled()
    }

    /// True until the connection fails or closes.
    pub fn is_connected(&self) -> bool {
        self.session.failure().is_none()
    }

    /// The protocol state, for inspection.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The protocol state, for callers driving the socket from their own `mio::Poll`: queue
    /// commands with [`Session::send`], call [`Connection::process_io`] on readiness, collect
    /// replies with [`Session::take_reply`] and events with [`Session::pop_event`].
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Nonblocking: writes pending output and reads what is available, until `WouldBlock` or
    /// [`PROCESS_BUDGET`] bytes, whichever comes first. Call it when the socket is readable or
    /// writable in the caller's own Poll (register it edge-triggered, READABLE | WRITABLE).
    /// Fails only with the sticky failure.
    ///
    /// The budget keeps one flooding peer from holding a thread that drives many connections:
    /// when it runs out, [`Connection::wants_read`] is true and no new readiness event may come
    /// for the input left, so call `process_io` again (after serving the other sources) before
    /// waiting in the poll.
    pub fn process_io(&mut self) -> Result<()> {
        sockio::flush(
            &self.stream,
            self.poll.registry(),
            &mut self.write_interest,
            &mut self.session,
        );
        // The caller's Poll may not tell us about RDHUP: read until WouldBlock here, within
        // the budget.
        let mut budget = PROCESS_BUDGET;
        let mut more = true;
        while more && budget > 0 {
            more = sockio::read_available(&self.stream, &mut self.buf, &mut self.session, true);
            budget = budget.saturating_sub(sockio::READ_BUDGET);
        }
        self.read_hint = more;
        match self.session.failure() {
            Some(_) => Err(self.session.disconnected()),
            None => Ok(()),
        }
    }

    /// True when [`Connection::process_io`] stopped at its budget with input possibly left
    /// (call it again; no readiness event may announce that input).
    pub fn wants_read(&self) -> bool {
        self.read_hint
    }

    /// Runs `cmd` with `args` and returns its `return` value, within [`Config::command_timeout`].
    ///
    /// A QMP error reply is [`Error::Command`] with the class, the description and `cmd`.
    pub fn execute(&mut self, cmd: &str, args: Option<Map<String, Value>>) -> Result<Value> {
        let timeout = self.command_timeout;
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
        let deadline = Instant::now() + self.command_timeout;
        self.run(command(cmd, args, false), deadline)
    }

    /// Runs `cmd` out of band (`exec-oob`): it may overtake in-band commands still queued in the
    /// server and is not counted against the limit of 8 in-band commands in flight, but against
    /// [`Config::max_oob_in_flight`] out-of-band ones (default 64). Needs the
    /// `oob` capability ([`Connection::oob_enabled`]), else the server rejects it.
    pub fn execute_oob(&mut self, cmd: &str, args: Option<Map<String, Value>>) -> Result<Value> {
        let deadline = Instant::now() + self.command_timeout;
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
        let deadline = Instant::now() + self.command_timeout;
        self.send_by(cmd, deadline)
    }

    pub(crate) fn send_by(&mut self, cmd: Command, deadline: Instant) -> Result<RequestId> {
        if !self.session.has_slot(cmd.oob) {
            let start = Instant::now();
            let oob = cmd.oob;
            if self.pump(deadline, |s| s.has_slot(oob))? == Pump::TimedOut {
                return Err(Error::CommandTimeout {
                    command: cmd.execute,
                    waited: start.elapsed(),
                });
            }
        }
        let id = self.session.send(cmd)?;
        sockio::flush(
            &self.stream,
            self.poll.registry(),
            &mut self.write_interest,
            &mut self.session,
        );
        Ok(id)
    }

    /// Waits until `deadline` for the reply to `id`: the whole message (a QMP error reply is
    /// `Ok(ServerMessage::Error)`). On timeout the request is forgotten (its late reply will be
    /// dropped and counted) and [`Error::CommandTimeout`] is returned.
    pub fn wait_reply(&mut self, id: RequestId, deadline: Instant) -> Result<ServerMessage> {
        self.pump(deadline, |s| s.reply_ready(id))?;
        if let Some(outcome) = self.session.take_reply(id) {
            return outcome;
        }
        let (command, waited) = self
            .session
            .request_info(id)
            .map(|(c, age)| (c.to_owned(), age))
            .unwrap_or_default();
        self.session.abandon(id);
        Err(Error::CommandTimeout { command, waited })
    }

    /// Sends `cmd` and waits for its reply and for the first event matching any of `filters`
    /// that arrives after the command was sent (before or after the reply), all within one
    /// total `timeout`. Events queued or already waiting unread in the socket when it is
    /// called count as older and are not taken. Avoids the race of subscribing after the command: e.g. `device_del` and
    /// `DEVICE_DELETED` for that device. Other events stay queued in order.
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
        let _ = self.pump(start, |_| false);
        let since = self.session.event_seq();
        let value = into_return(cmd, self.run(command(cmd, args, false), deadline)?)?;
        let event = self.wait_event_since(filters, since, deadline, timeout)?;
        Ok((value, event))
    }

    /// Takes the oldest queued event, waiting up to `timeout` for one to arrive
    /// (`Duration::ZERO`: just check what has arrived). `Ok(None)` when none came.
    pub fn pull_event(&mut self, timeout: Duration) -> Result<Option<Event>> {
        if let Some(lost) = self.session.take_events_lost() {
            return Err(lost);
        }
        if let Some(event) = self.session.pop_event() {
            return Ok(Some(event));
        }
        let deadline = Instant::now() + timeout;
        match self.pump(deadline, |s| s.queued_events() > 0)? {
            Pump::Done => {}
            Pump::Failed => return Err(self.session.disconnected()),
            Pump::TimedOut => return Ok(None),
        }
        if let Some(lost) = self.session.take_events_lost() {
            return Err(lost);
        }
        Ok(self.session.pop_event())
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
        if let Some(lost) = self.session.take_events_lost() {
            return Err(lost);
        }
        let mut found = None;
        let outcome = self.pump(deadline, |s| {
            found = s.take_matching_event(filters, since);
            found.is_some()
        })?;
        event_wait_result(
            &mut self.session,
            found,
            outcome == Pump::Failed,
            filters,
            timeout,
        )
    }

    /// Takes every queued event (after a nonblocking read of what has arrived), oldest first.
    pub fn drain_events(&mut self) -> Vec<Event> {
        // A failure here is sticky and reported by the next call that can return an error.
        let _ = self.pump(Instant::now(), |_| false);
        self.session.drain_events()
    }

    /// Discards every queued event.
    pub fn clear_events(&mut self) {
        self.session.clear_events();
    }

    /// Events discarded because the queue was full.
    pub fn events_dropped(&self) -> u64 {
        self.session.events_dropped()
    }

    /// Replies dropped because of an unknown id (late replies to timed-out commands included).
    pub fn unknown_replies(&self) -> u64 {
        self.session.unknown_replies()
    }

    /// Passes `fds` to the server with one SCM_RIGHTS message (on a one-byte space, which QMP
    /// ignores), after everything queued before it. The server keeps them until a command such
    /// as `getfd` or `add-fd` claims them. Unix sockets only. Our fds stay open.
    pub fn send_fds(&mut self, fds: &[BorrowedFd<'_>]) -> Result<()> {
        if self.stream.unix().is_none() {
            return Err(Error::FdPassingUnsupported);
        }
        if let Some(_failure) = self.session.failure() {
            return Err(self.session.disconnected());
        }
        let start = Instant::now();
        let deadline = start + self.command_timeout;
        // Everything queued before must reach the server first.
        if self.pump(deadline, |s| !s.wants_write())? != Pump::Done {
            return Err(self.fd_failure(start));
        }
        for group in fds.chunks(sys::MAX_FDS) {
            loop {
                let Some(unix) = self.stream.unix() else {
                    return Err(Error::FdPassingUnsupported);
                };
                match sys::send_fds(unix, group) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let raw = self.stream.as_raw_fd();
                        self.poll
                            .registry()
                            .reregister(
                                &mut mio::unix::SourceFd(&raw),
                                sockio::SOCKET,
                                Interest::READABLE | Interest::WRITABLE,
                            )
                            .map_err(|e| Error::Io {
                                op: "poll",
                                source: e,
                            })?;
                        self.write_interest = true;
                        let wake = sockio::wait(&mut self.poll, &mut self.events, deadline)?;
                        if wake.socket {
                            self.read_hint = true;
                        }
                        self.peer_closed |= wake.closed;
                        if Instant::now() >= deadline {
                            return Err(self.fd_failure(start));
                        }
                    }
                    Err(e) => {
                        self.session.feed_io_error("write", e);
                        return Err(self.session.disconnected());
                    }
                }
            }
        }
        log::debug!("--> {} fds (SCM_RIGHTS)", fds.len());
        Ok(())
    }

    fn fd_failure(&self, start: Instant) -> Error {
        if self.session.failure().is_some() {
            self.session.disconnected()
        } else {
            Error::CommandTimeout {
                command: "(fd passing)".into(),
                waited: start.elapsed(),
            }
        }
    }

    /// Passes `fd` and names it `name` in QEMU with `getfd` (for `-netdev`'s `fd=name` and the
    /// like).
    pub fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        self.send_fds(&[fd])?;
        let mut args = Map::new();
        args.insert("fdname".into(), Value::from(name));
        self.execute("getfd", Some(args)).map(|_| ())
    }

    /// Passes `fd` and adds it to an fd set with `add-fd` (a new set when `fdset_id` is None);
    /// returns QEMU's reply (`{"fdset-id": N, "fd": M}`).
    pub fn add_fd(
        &mut self,
        fd: BorrowedFd<'_>,
        fdset_id: Option<u64>,
        opaque: Option<&str>,
    ) -> Result<Value> {
        self.send_fds(&[fd])?;
        let mut args = Map::new();
        if let Some(id) = fdset_id {
            args.insert("fdset-id".into(), Value::from(id));
        }
        if let Some(opaque) = opaque {
            args.insert("opaque".into(), Value::from(opaque));
        }
        self.execute("add-fd", Some(args))
    }

    /// Closes the connection: writes what is still queued (within
    /// [`Config::command_timeout`]), then shuts the socket down. Pending requests are lost.
    pub fn close(mut self) -> Result<()> {
        if self.session.failure().is_none() && self.session.wants_write() {
            let deadline = Instant::now() + self.command_timeout;
            self.pump(deadline, |s| !s.wants_write())?;
        }
        self.session.close();
        self.stream.shutdown().map_err(|e| Error::Io {
            op: "shutdown",
            source: e,
        })
    }

    pub(crate) fn into_parts(self) -> (Stream, Poll, Session, Duration, bool) {
        (
            self.stream,
            self.poll,
            self.session,
            self.command_timeout,
            self.write_interest,
        )
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
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
        conn.fail_next_poll = Some(std::io::ErrorKind::InvalidInput);
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
