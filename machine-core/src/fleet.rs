//! Many machines from one thread: a [`Fleet`] owns N [`Machine`]s and drives their QMP
//! handshakes, commands, events and exits from one `mio::Poll`.
//!
//! Each member is an ordinary [`Machine`] (its own builder settings, temp dir, fd allow-list,
//! exit report) driven through the machine's stepping API: [`Machine::launch_begin`],
//! [`Machine::register`], [`Machine::step`] on readiness or at [`Machine::next_deadline`],
//! [`Machine::submit`] / [`Machine::take_reply`], [`Machine::take_event`] and
//! [`Machine::shutdown_begin`] (the shutdown ladder itself, walked for all members at once).
//! So all handshakes, commands and ladders progress together. Each member's pidfd, QMP
//! socket and output pipe sit in the fleet's poll, so a member has no thread of its own (a
//! member with a console keeps the console's drain thread). One member that fails to launch, stops
//! answering, floods its monitor or is killed from outside ends in its own slot (a typed
//! [`Error`]) and never holds the others up: every wait has one deadline for all, and a busy
//! member is read at most a budget per turn.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use qmp_client::RequestId;
use qmp_proto::{Event, EventFilter};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::machine::{Args, Machine, MachineState, Tokens};
use crate::report::ExitReport;
use crate::ShutdownLadder;

/// A member's place in its [`Fleet`] (the order of [`Fleet::add`], from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberId(usize);

impl MemberId {
    /// The index: 0 for the first member added.
    pub fn index(self) -> usize {
        self.0
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One result per member asked, in the order asked.
pub type Replies<T> = Vec<(MemberId, Result<T>)>;

/// Tokens per member in the fleet's poll: its pidfd, its QMP socket, its output pipe.
const TOKENS_PER_MEMBER: usize = 3;
/// The caller's abort fd during [`Fleet::launch_all_with_abort`].
const ABORT: Token = Token(usize::MAX);

/// N machines driven from one thread (see the module docs).
///
/// ```no_run
/// use std::time::Duration;
/// use machine_core::{Fleet, MachineBuilder};
///
/// let mut fleet = Fleet::new()?;
/// for i in 0..100 {
///     fleet.add(
///         MachineBuilder::new("qemu-system-x86_64")
///             .name(format!("vm{i}"))
///             .machine_type("none")
///             .args(["-accel", "tcg", "-nodefaults"])
///             .build(),
///     );
/// }
/// for (id, result) in fleet.launch_all() {
///     if let Err(err) = result {
///         eprintln!("{id} did not launch: {err}");
///     }
/// }
/// let ids: Vec<_> = fleet.running().collect();
/// for (id, reply) in fleet.qmp_all(&ids, "query-status", (), Duration::from_secs(5)) {
///     println!("{id}: {:?}", reply.map(|r| r["return"]["status"].clone()));
/// }
/// for (id, report) in fleet.shutdown_all(Duration::from_secs(10)) {
///     println!("{id}: {}", report.map(|r| r.ended_by.to_string()).unwrap_or_else(|e| e.to_string()));
/// }
/// # Ok::<(), machine_core::Error>(())
/// ```
pub struct Fleet {
    members: Vec<Member>,
    poll: Poll,
    events: Events,
    spawn_cap: Option<usize>,
    /// The abort fd of a launch turned readable.
    aborted: bool,
}

struct Member {
    machine: Machine,
    /// Whether its sources are in the fleet's poll for the current run.
    registered: bool,
    /// How its run ended, once it has (launch failure aside), until a shutdown collects it.
    ended: Option<Result<ExitReport>>,
}

impl fmt::Debug for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fleet")
            .field("members", &self.members.len())
            .field("spawn_cap", &self.spawn_cap)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// An empty fleet with its poll.
    pub fn new() -> Result<Fleet> {
        Ok(Fleet {
            members: Vec::new(),
            poll: Poll::new().map_err(Error::os("epoll_create"))?,
            events: Events::with_capacity(256),
            spawn_cap: None,
            aborted: false,
        })
    }

    /// Adds a machine (configured, not launched) and returns its id.
    pub fn add(&mut self, machine: Machine) -> MemberId {
        self.members.push(Member {
            machine,
            registered: false,
            ended: None,
        });
        MemberId(self.members.len() - 1)
    }

    /// How many handshakes [`Fleet::launch_all`] keeps in progress at once (`None`: all
    /// members spawn at once, the default). On a small machine a cap stops hundreds of QEMUs
    /// from starting up together and missing their greeting deadlines.
    pub fn set_spawn_cap(&mut self, cap: Option<usize>) {
        self.spawn_cap = cap.map(|c| c.max(1));
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the fleet has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member's id, in order.
    pub fn ids(&self) -> impl Iterator<Item = MemberId> {
        (0..self.members.len()).map(MemberId)
    }

    /// The members that are running (launched, QMP ready, not known to have exited).
    pub fn running(&self) -> impl Iterator<Item = MemberId> + '_ {
        self.ids()
            .filter(|&id| self.members[id.0].machine.state() == MachineState::Running)
    }

    /// A member's machine, e.g. for its console, log or exit report. Calls on it block this
    /// thread like on any [`Machine`].
    ///
    /// # Panics
    ///
    /// If `id` is not from this fleet.
    pub fn machine(&mut self, id: MemberId) -> &mut Machine {
        &mut self.members[id.0].machine
    }

    /// Where a member stands ([`MachineState::Exited`] once QEMU has ended, however it
    /// ended), after reading what the fleet's poll has without waiting.
    pub fn state(&mut self, id: MemberId) -> MachineState {
        self.turn(Instant::now());
        self.members[id.0].machine.state()
    }

    /// Launches every member that is not running, with their handshakes in progress together
    /// (at most [`Fleet::set_spawn_cap`] at once). Each launch is the one of
    /// [`Machine::launch`]: on failure it is rolled back and the member's result is
    /// [`Error::LaunchFailed`], while the others go on.
    pub fn launch_all(&mut self) -> Replies<()> {
        self.launch_all_with(|_, _| {})
    }

    /// [`Fleet::launch_all`] that calls `on_done` as each member's launch ends (for progress
    /// output), in the order they end.
    pub fn launch_all_with(&mut self, on_done: impl FnMut(MemberId, &Result<()>)) -> Replies<()> {
        self.launch_members(None, on_done)
    }

    /// [`Fleet::launch_all_with`] that also ends at once when `abort` turns readable (e.g.
    /// the read end of a pipe a signal handler writes to), as [`Machine::launch_with_abort`]
    /// does for one machine: each launch still in progress is killed and rolled back
    /// ([`Error::LaunchFailed`] with the cause [`Error::LaunchAborted`]), members not spawned
    /// yet get [`Error::LaunchAborted`], and members already launched stay running.
    pub fn launch_all_with_abort(
        &mut self,
        abort: BorrowedFd<'_>,
        on_done: impl FnMut(MemberId, &Result<()>),
    ) -> Replies<()> {
        self.launch_members(Some(abort), on_done)
    }

    fn launch_members(
        &mut self,
        abort: Option<BorrowedFd<'_>>,
        mut on_done: impl FnMut(MemberId, &Result<()>),
    ) -> Replies<()> {
        self.aborted = false;
        let watched = abort.map(|fd| {
            let registered = self.poll.registry().register(
                &mut SourceFd(&fd.as_raw_fd()),
                ABORT,
                Interest::READABLE,
            );
            if let Err(err) = &registered {
                log::warn!("the fleet's launch cannot watch its abort fd: {err}");
            }
            (fd, registered.is_ok())
        });
        let mut waiting: VecDeque<usize> = (0..self.members.len())
            .filter(|&i| !self.members[i].registered)
            .collect();
        let asked: Vec<usize> = waiting.iter().copied().collect();
        let mut results: BTreeMap<usize, Result<()>> = BTreeMap::new();
        let mut launching: BTreeSet<usize> = BTreeSet::new();
        let mut finish =
            |i: usize, result: Result<()>, results: &mut BTreeMap<usize, Result<()>>| {
                on_done(MemberId(i), &result);
                results.insert(i, result);
            };
        loop {
            // Looked at before each spawn too: no member starts once the abort fd is readable.
            self.aborted |= abort.is_some_and(|fd| {
                crate::process::poll_readable(fd, Duration::ZERO).unwrap_or(false)
            });
            if self.aborted {
                for i in std::mem::take(&mut launching) {
                    let err = self.members[i].machine.abort_launch();
                    self.members[i].registered = false;
                    self.members[i].ended = None;
                    finish(i, Err(err), &mut results);
                }
                for i in waiting.drain(..) {
                    finish(i, Err(Error::LaunchAborted), &mut results);
                }
                break;
            }
            let cap = self.spawn_cap.unwrap_or(usize::MAX);
            while launching.len() < cap {
                let Some(i) = waiting.pop_front() else { break };
                match self.begin(i) {
                    Ok(()) => {
                        launching.insert(i);
                    }
                    Err(err) => finish(i, Err(err), &mut results),
                }
            }
            if launching.is_empty() {
                break;
            }
            let deadline = self.next_deadline(&launching).unwrap_or_else(Instant::now);
            for (i, step) in self.turn(deadline) {
                if !launching.contains(&i) {
                    continue;
                }
                match step {
                    Ok(MachineState::Launching) => {}
                    // Running, or ended right after its handshake (the exit is kept for the
                    // shutdown).
                    Ok(_) => {
                        launching.remove(&i);
                        finish(i, Ok(()), &mut results);
                    }
                    Err(err) => {
                        launching.remove(&i);
                        self.members[i].registered = false;
                        self.members[i].ended = None;
                        finish(i, Err(err), &mut results);
                    }
                }
            }
        }
        if let Some((fd, true)) = watched {
            if let Err(err) = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&fd.as_raw_fd()))
            {
                log::debug!("the fleet's launch: deregistering its abort fd: {err}");
            }
        }
        self.aborted = false;
        asked
            .into_iter()
            .map(|i| {
                let result = results.remove(&i).unwrap_or(Err(Error::NotRunning));
                (MemberId(i), result)
            })
            .collect()
    }

    /// Spawns member `i` and registers its sources.
    fn begin(&mut self, i: usize) -> Result<()> {
        let member = &mut self.members[i];
        member.registered = false;
        member.ended = None;
        member.machine.launch_begin()?;
        let registry = self.poll.registry();
        let base = i * TOKENS_PER_MEMBER;
        let tokens = Tokens {
            exit: Token(base),
            qmp: Token(base + 1),
            output: Token(base + 2),
        };
        if let Err(err) = member.machine.register(registry, tokens) {
            // Not driven, so not left running: end it now (its report is not needed).
            let _ = member.machine.kill();
            return Err(err);
        }
        member.registered = true;
        Ok(())
    }

    /// The earliest [`Machine::next_deadline`] among `members`.
    fn next_deadline(&self, members: &BTreeSet<usize>) -> Option<Instant> {
        members
            .iter()
            .filter_map(|&i| self.members[i].machine.next_deadline())
            .min()
    }

    /// One turn of the poll: waits for readiness until `deadline` (or less, for a member's
    /// own deadline; not at all if a member has input left over from its read budget), then
    /// steps every member that is ready or due. Returns each
    /// stepped member's result. A member whose QEMU has ended keeps how it ended for
    /// [`Fleet::shutdown_all`].
    fn turn(&mut self, deadline: Instant) -> Vec<(usize, Result<MachineState>)> {
        let mut ready: BTreeSet<usize> = BTreeSet::new();
        let mut soonest = deadline;
        for (i, member) in self.members.iter_mut().enumerate() {
            if !member.registered {
                continue;
            }
            if member.machine.wants_step() {
                ready.insert(i);
            }
            if let Some(due) = member.machine.next_deadline() {
                soonest = soonest.min(due);
            }
        }
        let timeout = if ready.is_empty() {
            soonest.saturating_duration_since(Instant::now())
        } else {
            Duration::ZERO
        };
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                // Only a broken epoll fd gets here; the callers' deadlines still end their
                // waits.
                log::warn!("fleet poll: {err}");
                std::thread::sleep(timeout.min(Duration::from_millis(10)));
            }
        }
        for event in self.events.iter() {
            if event.token() == ABORT {
                self.aborted = true;
            } else {
                ready.insert(event.token().0 / TOKENS_PER_MEMBER);
            }
        }
        let now = Instant::now();
        let mut stepped = Vec::new();
        for (i, member) in self.members.iter_mut().enumerate() {
            if !member.registered {
                continue;
            }
            let due = member.machine.next_deadline().is_some_and(|d| d <= now);
            if !ready.contains(&i) && !due {
                continue;
            }
            let step = member.machine.step();
            match &step {
                Ok(MachineState::Exited) => {
                    member.registered = false;
                    if let Some(report) = member.machine.exit_report() {
                        member.ended = Some(Ok(report.clone()));
                    }
                }
                Err(err) if !matches!(err, Error::LaunchFailed { .. }) => {
                    // The ladder ended abnormally (forced, or QEMU not reaped): keep the
                    // error for the shutdown's result.
                    if member.machine.state() == MachineState::Exited {
                        member.registered = false;
                    }
                    member.ended = Some(Err(clone_shutdown_error(err)));
                }
                _ => {}
            }
            stepped.push((i, step));
        }
        stepped
    }

    /// Runs `command` on each member in `ids` at once and collects each one's whole reply
    /// (`{"return": ...}` or `{"error": ...}`, as [`Machine::qmp`]) within `timeout`, counted
    /// from the call for all of them. A member that does not answer in time gets
    /// [`Error::Qmp`] with [`qmp_client::Error::CommandTimeout`] (its late reply is dropped);
    /// one that is not running, or whose QEMU dies, gets its error; the others are not
    /// affected.
    pub fn qmp_all(
        &mut self,
        ids: &[MemberId],
        command: &str,
        args: impl Into<Args>,
        timeout: Duration,
    ) -> Replies<Value> {
        let deadline = Instant::now() + timeout;
        let args: Args = args.into();
        let mut results: BTreeMap<MemberId, Result<Value>> = BTreeMap::new();
        let mut pending: BTreeMap<usize, RequestId> = BTreeMap::new();
        for &id in ids {
            let Some(member) = self.members.get_mut(id.0) else {
                results.insert(id, Err(Error::NotRunning));
                continue;
            };
            match member.machine.submit(command, args.clone()) {
                Ok(request) => {
                    pending.insert(id.0, request);
                }
                Err(err) => {
                    results.insert(id, Err(err));
                }
            }
        }
        let started = Instant::now();
        while !pending.is_empty() {
            self.turn(deadline);
            let timed_out = Instant::now() >= deadline;
            let mut done = Vec::new();
            for (&i, &request) in &pending {
                let machine = &mut self.members[i].machine;
                match machine.take_reply(request) {
                    Some(reply) => done.push((i, reply.map_err(|e| rename(e, command)))),
                    None if machine.state() == MachineState::Exited => {
                        done.push((i, Err(Error::qmp(command, qmp_client::Error::Closed))));
                    }
                    None if timed_out => {
                        if let Ok(conn) = machine.qmp_connection() {
                            conn.session_mut().abandon(request);
                        }
                        done.push((
                            i,
                            Err(Error::qmp(
                                command,
                                qmp_client::Error::CommandTimeout {
                                    command: command.to_owned(),
                                    waited: started.elapsed(),
                                },
                            )),
                        ));
                    }
                    None => {}
                }
            }
            for (i, result) in done {
                pending.remove(&i);
                results.insert(MemberId(i), result);
            }
        }
        ids.iter()
            .map(|&id| {
                let result = results.remove(&id).unwrap_or(Err(Error::NotRunning));
                (id, result)
            })
            .collect()
    }

    /// Waits up to `timeout` for the first event matching any of `filters` (every event when
    /// `filters` is empty) from any member, and says which member sent it. Events already
    /// queued count (lowest member first); other events stay queued for [`Machine::events`].
    /// [`Error::Qmp`] with [`qmp_client::Error::EventTimeout`] when none came.
    pub fn event_wait(
        &mut self,
        filters: &[EventFilter],
        timeout: Duration,
    ) -> Result<(MemberId, Event)> {
        let deadline = Instant::now() + timeout;
        loop {
            for (i, member) in self.members.iter_mut().enumerate() {
                if let Some(event) = member.machine.take_event(filters) {
                    return Ok((MemberId(i), event));
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::qmp(
                    "event wait",
                    qmp_client::Error::EventTimeout {
                        names: filters
                            .iter()
                            .map(|f| f.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        timeout,
                    },
                ));
            }
            self.turn(deadline);
        }
    }

    /// Shuts every member down at once through the shutdown ladder
    /// [`ShutdownLadder::graceful`]`(timeout)` (`quit`, up to `timeout` for the exit, then
    /// SIGKILL), all ladders walked together, and collects each member's [`ExitReport`] (a
    /// member that had to be killed gets [`Error::AbnormalShutdown`], as from
    /// [`Machine::shutdown`]). Members that ended by themselves since their launch are
    /// collected too (their report says how they ended); members never launched are left out.
    pub fn shutdown_all(&mut self, timeout: Duration) -> Replies<ExitReport> {
        self.shutdown_all_with(&ShutdownLadder::graceful(timeout))
    }

    /// [`Fleet::shutdown_all`] with any ladder (the same for every member).
    pub fn shutdown_all_with(&mut self, ladder: &ShutdownLadder) -> Replies<ExitReport> {
        // Read what is there first: members that have ended are collected, not stopped.
        self.turn(Instant::now());
        let mut ids = Vec::new();
        let mut stopping = BTreeSet::new();
        for i in 0..self.members.len() {
            let member = &mut self.members[i];
            if member.ended.is_some() {
                ids.push(i);
                continue;
            }
            if !member.registered {
                continue;
            }
            ids.push(i);
            match member.machine.shutdown_begin(ladder) {
                Ok(()) if member.machine.state() == MachineState::Exited => {
                    member.registered = false;
                    member.ended = member.machine.exit_report().cloned().map(Ok);
                }
                Ok(()) => {
                    stopping.insert(i);
                }
                Err(err) => {
                    member.registered = false;
                    member.ended = Some(Err(err));
                }
            }
        }
        while !stopping.is_empty() {
            let deadline = self
                .next_deadline(&stopping)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            self.turn(deadline);
            stopping.retain(|&i| self.members[i].ended.is_none());
        }
        ids.into_iter()
            .map(|i| {
                let member = &mut self.members[i];
                let result = member.ended.take().unwrap_or(Err(Error::NotRunning));
                (MemberId(i), result)
            })
            .collect()
    }
}

/// A command's error under the command's name (the stepping API names replies `reply`).
fn rename(err: Error, command: &str) -> Error {
    match err {
        Error::Qmp { source, .. } => Error::qmp(command, source),
        other => other,
    }
}

/// The error a ladder ended with, kept for the shutdown's result (errors are not `Clone`;
/// the ones a ladder ends with carry their report or their numbers, others their text).
fn clone_shutdown_error(err: &Error) -> Error {
    match err {
        Error::AbnormalShutdown { report, cause } => Error::AbnormalShutdown {
            report: report.clone(),
            cause: Box::new(clone_shutdown_error(cause)),
        },
        Error::ExitTimeout { waited } => Error::ExitTimeout { waited: *waited },
        Error::ReapTimeout { pid, waited } => Error::ReapTimeout {
            pid: *pid,
            waited: *waited,
        },
        Error::StepFailed { step, detail } => Error::StepFailed {
            step: step.clone(),
            detail: detail.clone(),
        },
        other => Error::StepFailed {
            step: "shutdown".into(),
            detail: other.to_string(),
        },
    }
}

impl Drop for Fleet {
    /// Kills every running member at once, then reaps each (dropping its [`Machine`]).
    fn drop(&mut self) {
        for member in &mut self.members {
            let _ = member.machine.send_signal(libc::SIGKILL);
        }
        // The machines' own drops reap them and clean up.
    }
}
