//! The one transport driver under the sans-IO [`Session`]: the socket, its poll, the read and
//! write state, and the single pump every blocking call runs.
//!
//! A [`crate::Connection`] holds a driver in one of two ways ([`Owned`]: in place, for one
//! thread; [`Sharing`]: behind a mutex, for clones in many threads). The pump is written once
//! against [`Holder`], so a fix to how the socket is driven is made once.
//!
//! How the pump shares the socket between threads: whichever waiting caller finds the
//! [`Poller`] in its place takes it and becomes the pump (it polls and reads without holding
//! the lock, then feeds the session under the lock and wakes the others); the others sleep
//! until something was routed or their deadline passes. With [`Owned`] the poller is always
//! there, so the same loop never sleeps on anyone.

use std::ops::DerefMut;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mio::{Events, Poll, Registry};

use crate::error::{Error, Result};
use crate::io::{self as sockio, Stream, READ_START};
use crate::session::Session;

/// How a wait on the session ended.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Pump {
    /// The condition holds.
    Done,
    /// The session failed (its error is sticky).
    Failed,
    /// The deadline passed.
    TimedOut,
}

/// What does not change while a connection lives: the socket and the timeouts.
#[derive(Debug)]
pub struct Link {
    pub(crate) stream: Stream,
    pub(crate) command_timeout: Duration,
    pub(crate) greeting_timeout: Duration,
}

/// The polling side: whoever holds it may wait on the socket.
#[derive(Debug)]
pub struct Poller {
    pub(crate) poll: Poll,
    pub(crate) events: Events,
    pub(crate) buf: Box<[u8]>,
    /// Data may be waiting without a new readiness event to say so.
    pub(crate) read_hint: bool,
    /// The peer closed (RDHUP): read until `WouldBlock`, a short read is no proof of empty.
    pub(crate) peer_closed: bool,
    /// Test hook: the next poll fails with this error instead of polling.
    #[cfg(test)]
    pub(crate) fail_next_poll: Option<std::io::ErrorKind>,
}

impl Poller {
    pub(crate) fn new(stream: &Stream) -> Result<Poller> {
        Ok(Poller {
            poll: sockio::new_poll(stream.as_raw_fd())?,
            events: Events::with_capacity(8),
            buf: vec![0; READ_START].into_boxed_slice(),
            // Data may already be waiting (a greeting sent before we registered).
            read_hint: true,
            peer_closed: false,
            #[cfg(test)]
            fail_next_poll: None,
        })
    }
}

/// The state the pump changes: the protocol session and who polls.
#[derive(Debug)]
pub struct State {
    pub(crate) session: Session,
    pub(crate) write_interest: bool,
    /// `None` while some thread is pumping.
    pub(crate) poller: Option<Poller>,
    /// Bumped whenever the pump routed something, so a sleeper never misses a wake-up.
    pub(crate) seq: u64,
    /// A handle on the poller's registry for writers that run while the poller is out (a
    /// shared driver needs one; in place the poller never leaves while someone writes).
    pub(crate) registry: Option<Registry>,
}

impl State {
    /// A fresh state on `session` with `poller`.
    pub(crate) fn new(session: Session, poller: Option<Poller>) -> State {
        State {
            session,
            write_interest: false,
            poller,
            seq: 0,
            registry: None,
        }
    }

    /// Writes pending output (registering WRITABLE interest while some is left).
    pub(crate) fn flush(&mut self, link: &Link) {
        let State {
            session,
            write_interest,
            poller,
            registry,
            ..
        } = self;
        let registry = match (poller.as_ref(), registry.as_ref()) {
            (Some(p), _) => p.poll.registry(),
            (None, Some(r)) => r,
            (None, None) => return,
        };
        sockio::flush(&link.stream, registry, write_interest, session);
    }

    /// Reads until `WouldBlock` or `budget` bytes, whichever comes first, when this state has
    /// the poller (no other thread is pumping the socket); sets the read hint to whether input
    /// may be left. Returns false, reading nothing, without the poller.
    pub(crate) fn read_budgeted(&mut self, link: &Link, mut budget: usize) -> bool {
        let Some(poller) = self.poller.as_mut() else {
            return false;
        };
        let mut more = true;
        while more && budget > 0 {
            more = sockio::read_available(&link.stream, &mut poller.buf, &mut self.session, true);
            budget = budget.saturating_sub(sockio::READ_BUDGET);
        }
        poller.read_hint = more;
        true
    }
}

/// The ways of holding a driver. Sealed: the two are [`Owned`] and [`Sharing`].
pub trait Holder {
    /// The locked state.
    type Guard<'a>: DerefMut<Target = State>
    where
        Self: 'a;
    /// The socket and timeouts.
    fn link(&self) -> &Link;
    /// The state, with the link.
    fn lock(&mut self) -> (&Link, Self::Guard<'_>);
    /// Sleeps until the state changes after `seq` or `deadline` passes (only called while
    /// another thread holds the poller).
    fn park(&mut self, seq: u64, deadline: Instant);
    /// Wakes the sleepers: the state changed.
    fn notify(&self);
}

/// A driver held by one owner: in place (one thread, no lock) until the owner
/// [shares](crate::Connection::share) it; from then on it sits behind the same mutex as the
/// [`crate::Shared`] handles, and the owner keeps working through it.
#[derive(Debug)]
pub struct Owned {
    pub(crate) place: Place,
}

/// Where an owned driver is.
// In place is the common case, on every call's path: no box to chase. A connection is made
// once and never moved in a hot loop, so the size of the rare shared variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Place {
    /// In place.
    Here { link: Arc<Link>, state: State },
    /// Behind the mutex of shared handles.
    Shared(Sharing),
}

/// The locked state of an [`Owned`] driver.
pub enum OwnedGuard<'a> {
    /// In place: a plain borrow.
    Here(&'a mut State),
    /// Shared: the mutex guard.
    Shared(MutexGuard<'a, State>),
}

impl std::ops::Deref for OwnedGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        match self {
            OwnedGuard::Here(s) => s,
            OwnedGuard::Shared(g) => g,
        }
    }
}

impl std::ops::DerefMut for OwnedGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        match self {
            OwnedGuard::Here(s) => s,
            OwnedGuard::Shared(g) => g,
        }
    }
}

impl Holder for Owned {
    type Guard<'a> = OwnedGuard<'a>;

    fn link(&self) -> &Link {
        match &self.place {
            Place::Here { link, .. } => link,
            Place::Shared(sharing) => sharing.link(),
        }
    }

    fn lock(&mut self) -> (&Link, OwnedGuard<'_>) {
        match &mut self.place {
            Place::Here { link, state } => (link, OwnedGuard::Here(state)),
            Place::Shared(sharing) => (
                &sharing.inner.link,
                OwnedGuard::Shared(sharing.inner.lock()),
            ),
        }
    }

    fn park(&mut self, seq: u64, deadline: Instant) {
        // In place the poller never leaves while nobody pumps; shared, others may hold it.
        if let Place::Shared(sharing) = &mut self.place {
            sharing.park(seq, deadline);
        }
    }

    fn notify(&self) {
        if let Place::Shared(sharing) = &self.place {
            sharing.notify();
        }
    }
}

/// A driver behind a mutex: every clone of a [`crate::Shared`] holds the same one.
#[derive(Debug, Clone)]
pub struct Sharing {
    pub(crate) inner: Arc<SharedDriver>,
}

/// The shared driver itself.
#[derive(Debug)]
pub struct SharedDriver {
    pub(crate) link: Arc<Link>,
    pub(crate) state: Mutex<State>,
    pub(crate) cond: Condvar,
}

impl SharedDriver {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the session inconsistent mid-update in a way that
        // matters more than losing the connection, so keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Holder for Sharing {
    type Guard<'a> = MutexGuard<'a, State>;

    fn link(&self) -> &Link {
        &self.inner.link
    }

    fn lock(&mut self) -> (&Link, MutexGuard<'_, State>) {
        (&self.inner.link, self.inner.lock())
    }

    fn park(&mut self, seq: u64, deadline: Instant) {
        let mut st = self.inner.lock();
        while st.seq == seq && st.poller.is_none() {
            let timeout = deadline.saturating_duration_since(Instant::now());
            if timeout.is_zero() {
                return;
            }
            st = self
                .inner
                .cond
                .wait_timeout(st, timeout)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn notify(&self) {
        self.inner.cond.notify_all();
    }
}

impl Owned {
    /// Moves an in-place driver behind a mutex (once) and returns a handle on it.
    pub(crate) fn share(&mut self) -> Result<Sharing> {
        if let Place::Here { link, state } = &mut self.place {
            let placeholder = State::new(Session::new(&crate::Config::default()), None);
            let mut state = std::mem::replace(state, placeholder);
            if let Some(poller) = state.poller.as_ref() {
                let registry = poller.poll.registry().try_clone().map_err(|e| Error::Io {
                    op: "poll",
                    source: e,
                })?;
                state.registry = Some(registry);
            }
            let sharing = Sharing {
                inner: Arc::new(SharedDriver {
                    link: Arc::clone(link),
                    state: Mutex::new(state),
                    cond: Condvar::new(),
                }),
            };
            self.place = Place::Shared(sharing);
        }
        match &self.place {
            Place::Shared(sharing) => Ok(sharing.clone()),
            Place::Here { .. } => Err(Error::Closed),
        }
    }

    /// Whether the driver has been shared.
    pub(crate) fn is_shared(&self) -> bool {
        matches!(self.place, Place::Shared(_))
    }
}

/// The [`crate::Session`] of an owned connection, borrowed (under the lock once shared).
pub struct SessionGuard<'a>(pub(crate) OwnedGuard<'a>);

impl std::ops::Deref for SessionGuard<'_> {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.0.session
    }
}

impl std::ops::DerefMut for SessionGuard<'_> {
    fn deref_mut(&mut self) -> &mut Session {
        &mut self.0.session
    }
}

/// The pump: drives the socket until `done` returns a value (it runs under the lock, so it
/// can take a reply or an event atomically), the session fails, or `deadline` passes. One
/// nonblocking check is always made, so a deadline in the past still reads what is there.
///
/// Errors only with [`Error::Aborted`] (the abort fd fired); a poll failure fails the
/// session (sticky) and returns [`Pump::Failed`].
pub(crate) fn pump<H: Holder, R>(
    hold: &mut H,
    deadline: Instant,
    mut done: impl FnMut(&Link, &mut Session) -> Option<R>,
) -> Result<(Option<R>, Pump)> {
    let mut checked_once = false;
    loop {
        let mut poller = {
            let (link, mut st) = hold.lock();
            if st.session.wants_write() {
                st.flush(link);
            }
            if let Some(found) = done(link, &mut st.session) {
                return Ok((Some(found), Pump::Done));
            }
            if st.session.failure().is_some() {
                return Ok((None, Pump::Failed));
            }
            if checked_once && Instant::now() >= deadline {
                return Ok((None, Pump::TimedOut));
            }
            match st.poller.take() {
                Some(poller) => poller,
                None => {
                    // Another thread pumps: sleep until it routes something or our deadline.
                    let seq = st.seq;
                    drop(st);
                    hold.park(seq, deadline);
                    checked_once = true;
                    continue;
                }
            }
        };
        let mut failure = None;
        let mut aborted = false;
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
                    aborted = wake.abort;
                }
                Err(e) => failure = Some(e),
            }
        }
        // Read at once what the poll reported: with the deadline reached (a zero timeout
        // above all) the loop would otherwise end before looking at it.
        if poller.read_hint && failure.is_none() && !aborted {
            chunk = Some(sockio::read_chunk(&hold.link().stream, &mut poller.buf));
        }
        // A read is a check too: under a flood that never lets the socket run dry the
        // deadline must still end the wait.
        checked_once = true;
        let (_, mut st) = hold.lock();
        if let Some(chunk) = chunk {
            // A short read drained the socket (see `sockio::read_available`).
            let read = match chunk {
                sockio::Chunk::Data(n) => n,
                _ => 0,
            };
            let full = read == poller.buf.len();
            let more = sockio::feed_chunk(&mut st.session, chunk, &poller.buf);
            sockio::grow_if_full(&mut poller.buf, read);
            poller.read_hint = more && (full || poller.peer_closed);
        }
        if let Some(e) = failure {
            // The socket can no longer be driven: the session fails for every caller
            // (sticky), and the waiters' requests end with it, freeing their slots.
            log::warn!("poll failed, the QMP session ends: {e}");
            st.session.fail_with(e);
        }
        st.poller = Some(poller);
        st.seq = st.seq.wrapping_add(1);
        drop(st);
        hold.notify();
        if aborted {
            return Err(Error::Aborted);
        }
    }
}
