//! A thread-safe handle: many threads issue commands on one connection at once.
//!
//! No hidden thread: whichever waiting caller finds the socket unattended becomes its pump (it
//! polls and reads without holding the lock, then feeds the session under the lock and wakes
//! the others through a condvar); the others sleep on the condvar until their reply is routed
//! or their deadline passes. When the pump's own wait is over it hands the role to the next.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry};
use qmp_proto::{Command, Event, EventFilter, ServerMessage};
use serde_json::{Map, Value};

use crate::connection::{command, event_wait_result, into_return, Connection, Pump};
use crate::error::{Error, Result};
use crate::io::{self as sockio, Stream, READ_CHUNK};
use crate::session::{RequestId, Session};
use crate::sys;

/// A [`Connection`] shared between threads: clone it and call from anywhere.
///
/// Every reply reaches the thread that sent its command (routing by id); the limit of 8 in-band
/// commands in flight (and [`Config::max_oob_in_flight`](crate::Config::max_oob_in_flight) for
/// out-of-band ones) is respected across all threads (a sender waits for a slot within its
/// deadline). Events, the sticky error and the `quit` handling behave as on [`Connection`].
/// A poll failure in whichever thread drives the socket fails the session like a socket error:
/// every waiter, and every later call, gets [`Error::Disconnected`] with it as the cause.
#[derive(Clone, Debug)]
pub struct Shared {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    stream: Stream,
    registry: Registry,
    state: Mutex<State>,
    cond: Condvar,
    command_timeout: Duration,
}

#[derive(Debug)]
struct State {
    session: Session,
    write_interest: bool,
    /// The polling side; `None` while some thread is pumping.
    poller: Option<Poller>,
}

#[derive(Debug)]
struct Poller {
    poll: Poll,
    events: Events,
    buf: Box<[u8]>,
    read_hint: bool,
    peer_closed: bool,
    /// Test hook: the next poll fails with this error instead of polling.
    #[cfg(test)]
    fail_next_poll: Option<std::io::ErrorKind>,
}

impl Shared {
    /// Wraps an established connection.
    pub fn new(conn: Connection) -> Result<Shared> {
        let (stream, poll, session, command_timeout, write_interest) = conn.into_parts();
        let registry = poll.registry().try_clone().map_err(|e| Error::Io {
            op: "poll",
            source: e,
        })?;
        Ok(Shared {
            inner: Arc::new(Inner {
                stream,
                registry,
                state: Mutex::new(State {
                    session,
                    write_interest,
                    poller: Some(Poller {
                        poll,
                        events: Events::with_capacity(8),
                        buf: vec![0; READ_CHUNK].into_boxed_slice(),
                        read_hint: true,
                        peer_closed: false,
                        #[cfg(test)]
                        fail_next_poll: None,
                    }),
                }),
                cond: Condvar::new(),
                command_timeout,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the session inconsistent mid-update in a way that
        // matters more than losing the connection, so keep going.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn flush(&self, st: &mut State) {
        let State {
            session,
            write_interest,
            ..
        } = st;
        sockio::flush(
            &self.inner.stream,
            &self.inner.registry,
            write_interest,
            session,
        );
    }

    fn pump<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        deadline: Instant,
        mut done: impl FnMut(&mut Session) -> bool,
    ) -> Result<(MutexGuard<'a, State>, Pump)> {
        let mut checked_once = false;
        loop {
            if st.session.wants_write() {
                self.flush(&mut st);
            }
            if done(&mut st.session) {
                return Ok((st, Pump::Done));
            }
            if st.session.failure().is_some() {
                return Ok((st, Pump::Failed));
            }
            let now = Instant::now();
            if checked_once && now >= deadline {
                return Ok((st, Pump::TimedOut));
            }
            let Some(mut poller) = st.poller.take() else {
                // Another thread pumps: sleep until it routes something or our deadline.
                let timeout = deadline.saturating_duration_since(now);
                st = self
                    .inner
                    .cond
                    .wait_timeout(st, timeout)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                checked_once = true;
                continue;
            };
            drop(st);
            let mut failure = None;
            let mut chunk = None;
            #[cfg(test)]
            if let Some(kind) = poller.fail_next_poll.take() {
                poller.read_hint = false;
                failure = Some(Error::Io {
                    op: "poll",
                    source: kind.into(),
                });
            }
            if !poller.read_hint && failure.is_none() {
                match sockio::wait(&mut poller.poll, &mut poller.events, deadline) {
                    Ok(wake) => {
                        poller.read_hint = wake.socket;
                        poller.peer_closed |= wake.closed;
                    }
                    Err(e) => failure = Some(e),
                }
            }
            // Read at once what the poll reported: with the deadline reached (a zero timeout
            // above all) the loop would otherwise end before looking at it.
            if poller.read_hint && failure.is_none() {
                chunk = Some(sockio::read_chunk(&self.inner.stream, &mut poller.buf));
            }
            // A read is a check too: under a flood that never lets the socket run dry the
            // deadline must still end the wait.
            checked_once = true;
            st = self.lock();
            if let Some(chunk) = chunk {
                // A short read drained the socket (see `sockio::read_available`).
                let full = matches!(chunk, sockio::Chunk::Data(n) if n == poller.buf.len());
                let more = sockio::feed_chunk(&mut st.session, chunk, &poller.buf);
                poller.read_hint = more && (full || poller.peer_closed);
            }
            if let Some(e) = failure {
                // The socket can no longer be driven: the session fails for every caller
                // (sticky), and the waiters' requests end with it, freeing their slots.
                log::warn!("poll failed, the QMP session ends: {e}");
                st.session.fail_with(e);
            }
            st.poller = Some(poller);
            self.inner.cond.notify_all();
        }
    }

    /// Runs `cmd`; see [`Connection::execute`].
    pub fn execute(&self, cmd: &str, args: Option<Map<String, Value>>) -> Result<Value> {
        self.execute_with_timeout(cmd, args, self.inner.command_timeout)
    }

    /// Runs `cmd` with its own timeout; see [`Connection::execute_with_timeout`].
    pub fn execute_with_timeout(
        &self,
        cmd: &str,
        args: Option<Map<String, Value>>,
        timeout: Duration,
    ) -> Result<Value> {
        let reply = self.run(command(cmd, args, false), Instant::now() + timeout)?;
        into_return(cmd, reply)
    }

    /// Runs `cmd` and returns the whole reply; see [`Connection::execute_raw`].
    pub fn execute_raw(
        &self,
        cmd: &str,
        args: Option<Map<String, Value>>,
    ) -> Result<ServerMessage> {
        self.run(
            command(cmd, args, false),
            Instant::now() + self.inner.command_timeout,
        )
    }

    /// Runs `cmd` out of band; see [`Connection::execute_oob`].
    pub fn execute_oob(&self, cmd: &str, args: Option<Map<String, Value>>) -> Result<Value> {
        let reply = self.run(
            command(cmd, args, true),
            Instant::now() + self.inner.command_timeout,
        )?;
        into_return(cmd, reply)
    }

    fn run(&self, cmd: Command, deadline: Instant) -> Result<ServerMessage> {
        let id = self.send_by(cmd, deadline)?;
        self.wait_reply(id, deadline)
    }

    /// Queues `cmd` (waiting for a slot if 8 in-band commands are in flight); see
    /// [`Connection::send`].
    pub fn send(&self, cmd: Command) -> Result<RequestId> {
        self.send_by(cmd, Instant::now() + self.inner.command_timeout)
    }

    fn send_by(&self, cmd: Command, deadline: Instant) -> Result<RequestId> {
        let start = Instant::now();
        let oob = cmd.oob;
        let (mut st, outcome) = self.pump(self.lock(), deadline, |s| s.has_slot(oob))?;
        if outcome == Pump::TimedOut {
            return Err(Error::CommandTimeout {
                command: cmd.execute,
                waited: start.elapsed(),
            });
        }
        let id = st.session.send(cmd)?;
        self.flush(&mut st);
        Ok(id)
    }

    /// Waits for the reply to `id`; see [`Connection::wait_reply`].
    pub fn wait_reply(&self, id: RequestId, deadline: Instant) -> Result<ServerMessage> {
        let (mut st, _) = self.pump(self.lock(), deadline, |s| s.reply_ready(id))?;
        if let Some(outcome) = st.session.take_reply(id) {
            return outcome;
        }
        let (command, waited) = st
            .session
            .request_info(id)
            .map(|(c, age)| (c.to_owned(), age))
            .unwrap_or_default();
        st.session.abandon(id);
        // A slot may have been freed for a waiting sender.
        self.inner.cond.notify_all();
        Err(Error::CommandTimeout { command, waited })
    }

    /// Takes the oldest queued event, waiting up to `timeout`; see [`Connection::pull_event`].
    pub fn pull_event(&self, timeout: Duration) -> Result<Option<Event>> {
        let deadline = Instant::now() + timeout;
        let (mut st, outcome) = self.pump(self.lock(), deadline, |s| s.queued_events() > 0)?;
        if let Some(lost) = st.session.take_events_lost() {
            return Err(lost);
        }
        match outcome {
            Pump::Failed if st.session.queued_events() == 0 => Err(st.session.disconnected()),
            _ => Ok(st.session.pop_event()),
        }
    }

    /// Waits for an event matching any of `filters` within a total `timeout`; see
    /// [`Connection::wait_event`].
    pub fn wait_event(&self, filters: &[EventFilter], timeout: Duration) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        let mut found = None;
        let (mut st, outcome) = self.pump(self.lock(), deadline, |s| {
            found = s.take_matching_event(filters, 0);
            found.is_some()
        })?;
        event_wait_result(
            &mut st.session,
            found,
            outcome == Pump::Failed,
            filters,
            timeout,
        )
    }

    /// Takes every queued event (after a nonblocking read of what has arrived, unless another
    /// thread is reading right now), oldest first.
    pub fn drain_events(&self) -> Vec<Event> {
        // A failure here is sticky and reported by the next call that can return an error.
        match self.pump(self.lock(), Instant::now(), |_| false) {
            Ok((mut st, _)) => st.session.drain_events(),
            Err(_) => self.lock().session.drain_events(),
        }
    }

    /// Discards every queued event.
    pub fn clear_events(&self) {
        self.lock().session.clear_events();
    }

    /// Events discarded because the queue was full.
    pub fn events_dropped(&self) -> u64 {
        self.lock().session.events_dropped()
    }

    /// Replies dropped because of an unknown id.
    pub fn unknown_replies(&self) -> u64 {
        self.lock().session.unknown_replies()
    }

    /// True until the connection fails or closes.
    pub fn is_connected(&self) -> bool {
        self.lock().session.failure().is_none()
    }

    /// Passes `fd` and names it `name` with `getfd`; see [`Connection::getfd`]. The fd and the
    /// command go out back to back under the lock, so another thread's fd can never be the
    /// one this `getfd` claims.
    pub fn getfd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        let mut args = Map::new();
        args.insert("fdname".into(), Value::from(name));
        let cmd = command("getfd", Some(args), false);
        let reply = self.with_fd(fd, cmd, Instant::now() + self.inner.command_timeout)?;
        into_return("getfd", reply).map(|_| ())
    }

    /// Passes `fd` and adds it to an fd set with `add-fd`; see [`Connection::add_fd`].
    pub fn add_fd(
        &self,
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
        let cmd = command("add-fd", Some(args), false);
        let reply = self.with_fd(fd, cmd, Instant::now() + self.inner.command_timeout)?;
        into_return("add-fd", reply)
    }

    fn with_fd(
        &self,
        fd: BorrowedFd<'_>,
        cmd: Command,
        deadline: Instant,
    ) -> Result<ServerMessage> {
        let unix = self
            .inner
            .stream
            .unix()
            .ok_or(Error::FdPassingUnsupported)?;
        let start = Instant::now();
        let mut st = self.lock();
        let id = loop {
            // Everything queued before must be on the wire, and the command must have a slot.
            let (guard, outcome) =
                self.pump(st, deadline, |s| !s.wants_write() && s.has_slot(false))?;
            st = guard;
            match outcome {
                Pump::Done => {}
                Pump::Failed => return Err(st.session.disconnected()),
                Pump::TimedOut => {
                    return Err(Error::CommandTimeout {
                        command: cmd.execute,
                        waited: start.elapsed(),
                    })
                }
            }
            match sys::send_fds(unix, &[fd]) {
                Ok(()) => {
                    log::debug!("--> 1 fd (SCM_RIGHTS)");
                    break st.session.send(cmd)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // The peer is not reading: wait for room without holding the lock.
                    drop(st);
                    wait_writable(unix, deadline)?;
                    // The pump above checks nothing when its condition already holds, so the
                    // deadline is checked here, or a peer that never reads would spin us.
                    if Instant::now() >= deadline {
                        return Err(Error::CommandTimeout {
                            command: cmd.execute,
                            waited: start.elapsed(),
                        });
                    }
                    st = self.lock();
                }
                Err(e) => {
                    st.session.feed_io_error("write", e);
                    self.inner.cond.notify_all();
                    return Err(st.session.disconnected());
                }
            }
        };
        self.flush(&mut st);
        drop(st);
        self.wait_reply(id, deadline)
    }

    /// Closes the connection for every handle: pending and later calls get
    /// [`Error::Disconnected`] with cause [`Error::Closed`].
    pub fn close(&self) -> Result<()> {
        let mut st = self.lock();
        st.session.close();
        self.inner.cond.notify_all();
        drop(st);
        self.inner.stream.shutdown().map_err(|e| Error::Io {
            op: "shutdown",
            source: e,
        })
    }
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

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::testing::Script;

    const LONG: Duration = Duration::from_secs(10);

    fn is_poll_failure(e: &Error) -> bool {
        matches!(e, Error::Disconnected { .. })
            && matches!(e.root(), Error::Io { op: "poll", source } if source.kind() == std::io::ErrorKind::InvalidInput)
    }

    /// A poll error in whichever thread drives the socket ends the session for everyone: each
    /// waiter gets `Disconnected` with the poll error as cause, slots are released, and later
    /// calls fail the same way instead of polling a broken poller again.
    #[test]
    fn a_poll_error_in_the_driving_thread_fails_the_session_for_every_waiter() {
        // "stall" is never answered.
        let (_server, stream) = Script::new().on("stall", Vec::new()).start_pair().unwrap();
        let conn = Connection::from_unix_stream(stream, &crate::Config::default()).unwrap();
        let shared = Shared::new(conn).unwrap();
        let a = shared.send(command("stall", None, false)).unwrap();
        let b = shared.send(command("stall", None, false)).unwrap();
        assert_eq!(shared.lock().session.in_flight(), 2);
        if let Some(p) = shared.lock().poller.as_mut() {
            p.fail_next_poll = Some(std::io::ErrorKind::InvalidInput);
        }
        let waiters: Vec<_> = [a, b]
            .into_iter()
            .map(|id| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let start = Instant::now();
                    (shared.wait_reply(id, start + LONG), start.elapsed())
                })
            })
            .collect();
        for w in waiters {
            let (res, took) = w.join().unwrap();
            match res {
                Err(e) => assert!(is_poll_failure(&e), "unexpected {e:?}"),
                Ok(m) => panic!("unexpected reply {m:?}"),
            }
            assert!(took < LONG / 2, "took {took:?}");
        }
        assert!(!shared.is_connected());
        assert_eq!(shared.lock().session.in_flight(), 0);
        match shared.execute("query-status", None) {
            Err(e) => assert!(is_poll_failure(&e), "unexpected {e:?}"),
            Ok(v) => panic!("unexpected {v}"),
        }
    }
}
