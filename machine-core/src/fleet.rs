//! Many machines from one thread: a [`Fleet`] owns N [`Machine`]s and drives their QMP
//! handshakes, commands, events and exits from one `mio::Poll`.
//!
//! Each member is an ordinary [`Machine`] (its own builder settings, temp dir, fd allow-list,
//! exit report), launched through the same code as [`Machine::launch`] except that the QMP
//! handshake is stepped ([`qmp_client::Connection::handshake_step`]) instead of waited for,
//! so all handshakes progress together. The fleet registers every member's QMP socket and
//! exit pidfd in its own poll; one member that fails to launch, stops answering, floods its
//! monitor or is killed from outside ends in its own slot (a typed [`Error`]) and never holds
//! the others up: every wait has one deadline for all, and a busy member is read at most a
//! budget per turn.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use qmp_client::RequestId;
use qmp_proto::{Command, Event, EventFilter, ServerMessage};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::machine::{reply_value, Args, Machine};
use crate::report::ExitReport;
use crate::ShutdownLadder;

/// Tokens per member in the fleet's poll: its QMP socket, its pidfd, its output pipe.
const TOKENS_PER_MEMBER: usize = 3;

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

/// Where a member stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemberState {
    /// Not launched (or launched and ended: see [`Machine::exit_report`]).
    Idle,
    /// Its QMP handshake is in progress.
    Launching,
    /// Launched and not known to have exited.
    Running,
    /// QEMU has exited and not been collected yet (shut it down to get the report).
    Exited,
}

/// One result per member asked, in the order asked.
pub type Replies<T> = Vec<(MemberId, Result<T>)>;

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
    /// Members whose output pipe was left with input at the read budget.
    output_left: BTreeSet<usize>,
}

struct Member {
    machine: Machine,
    /// Whether its sources are in the fleet's poll for the current run.
    registered: bool,
    launching: bool,
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
            output_left: BTreeSet::new(),
        })
    }

    /// Adds a machine (configured, not launched) and returns its id.
    pub fn add(&mut self, machine: Machine) -> MemberId {
        self.members.push(Member {
            machine,
            registered: false,
            launching: false,
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

    /// The members that are running (launched, not known to have exited).
    pub fn running(&self) -> impl Iterator<Item = MemberId> + '_ {
        self.ids()
            .filter(|&id| self.members[id.0].machine.is_running() && !self.members[id.0].launching)
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

    /// Where a member stands.
    pub fn state(&mut self, id: MemberId) -> MemberState {
        let member = &self.members[id.0];
        if member.launching {
            MemberState::Launching
        } else if member.machine.is_running() {
            MemberState::Running
        } else if member.machine.has_run() {
            MemberState::Exited
        } else {
            MemberState::Idle
        }
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
    pub fn launch_all_with(
        &mut self,
        mut on_done: impl FnMut(MemberId, &Result<()>),
    ) -> Replies<()> {
        let mut waiting: VecDeque<usize> = (0..self.members.len())
            .filter(|&i| !self.members[i].machine.is_running())
            .collect();
        let asked: Vec<usize> = waiting.iter().copied().collect();
        let mut results: BTreeMap<usize, Result<()>> = BTreeMap::new();
        // Member -> the deadline of its current handshake step.
        let mut launching: BTreeMap<usize, Instant> = BTreeMap::new();
        loop {
            let cap = self.spawn_cap.unwrap_or(usize::MAX);
            while launching.len() < cap {
                let Some(i) = waiting.pop_front() else { break };
                match self.begin(i) {
                    Ok(Some(deadline)) => {
                        launching.insert(i, deadline);
                    }
                    Ok(None) => {
                        on_done(MemberId(i), &Ok(()));
                        results.insert(i, Ok(()));
                    }
                    Err(err) => {
                        let err = Err(err);
                        on_done(MemberId(i), &err);
                        results.insert(i, err);
                    }
                }
            }
            if launching.is_empty() {
                break;
            }
            let next = launching
                .values()
                .min()
                .copied()
                .unwrap_or_else(Instant::now);
            let ready = self.poll_once(next);
            let now = Instant::now();
            let due: Vec<usize> = launching
                .iter()
                .filter(|(i, deadline)| ready.contains(i) || **deadline <= now)
                .map(|(i, _)| *i)
                .collect();
            for i in due {
                match self.step_launch(i) {
                    Ok(Some(deadline)) => {
                        launching.insert(i, deadline);
                    }
                    Ok(None) => {
                        launching.remove(&i);
                        on_done(MemberId(i), &Ok(()));
                        results.insert(i, Ok(()));
                    }
                    Err(err) => {
                        launching.remove(&i);
                        let err = Err(err);
                        on_done(MemberId(i), &err);
                        results.insert(i, err);
                    }
                }
            }
        }
        asked
            .into_iter()
            .map(|i| {
                let result = results.remove(&i).unwrap_or(Err(Error::NotRunning));
                (MemberId(i), result)
            })
            .collect()
    }

    /// Spawns member `i` and registers its sources: the next handshake deadline, `None` if
    /// it is ready already.
    fn begin(&mut self, i: usize) -> Result<Option<Instant>> {
        let member = &mut self.members[i];
        member.registered = false;
        member.machine.launch_begin()?;
        member.launching = true;
        let registry = self.poll.registry();
        let token = Token(i * TOKENS_PER_MEMBER);
        if let Ok(conn) = member.machine.qmp_connection() {
            conn.register(registry, token)
                .map_err(|source| Error::qmp("handshake", source))?;
        }
        if let Some(pidfd) = member.machine.launch_pidfd() {
            let raw = pidfd.as_raw_fd();
            registry
                .register(&mut SourceFd(&raw), Token(token.0 + 1), Interest::READABLE)
                .map_err(Error::os("epoll_ctl"))?;
        }
        if let Some(pipe) = member.machine.output_fd() {
            let raw = pipe.as_raw_fd();
            registry
                .register(&mut SourceFd(&raw), Token(token.0 + 2), Interest::READABLE)
                .map_err(Error::os("epoll_ctl"))?;
        }
        member.registered = true;
        self.step_launch(i)
    }

    fn step_launch(&mut self, i: usize) -> Result<Option<Instant>> {
        let member = &mut self.members[i];
        let step = member.machine.launch_step();
        if !matches!(step, Ok(Some(_))) {
            member.launching = false;
        }
        step
    }

    /// Waits for readiness until `deadline` (not at all if a member has input left over from
    /// its read budget), reads what arrived on every ready QMP socket, and returns the ready
    /// members.
    fn poll_once(&mut self, deadline: Instant) -> BTreeSet<usize> {
        let mut ready: BTreeSet<usize> = std::mem::take(&mut self.output_left);
        for (i, member) in self.members.iter_mut().enumerate() {
            if member.registered
                && member
                    .machine
                    .qmp_connection()
                    .is_ok_and(|conn| conn.wants_read())
            {
                ready.insert(i);
            }
        }
        let timeout = if ready.is_empty() {
            deadline.saturating_duration_since(Instant::now())
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
            let i = event.token().0 / TOKENS_PER_MEMBER;
            if self.members.get(i).is_some_and(|m| m.registered) {
                ready.insert(i);
            }
        }
        for &i in &ready {
            if self.members[i].machine.pump_output() {
                self.output_left.insert(i);
            }
            if let Ok(conn) = self.members[i].machine.qmp_connection() {
                // A failure is sticky: the member's pending request or next step reports it.
                let _ = conn.process_io();
                // What reading queued (`qmp_capabilities` after the greeting) goes out now:
                // the socket stays writable, so no new readiness event would announce it.
                if conn.session().wants_write() {
                    let _ = conn.process_io();
                }
            }
        }
        ready
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
        let args = args.into().into_map(command);
        let mut results: BTreeMap<MemberId, Result<Value>> = BTreeMap::new();
        let mut pending: BTreeMap<usize, RequestId> = BTreeMap::new();
        for &id in ids {
            let args = match &args {
                Ok(args) => args.clone(),
                Err(err) => {
                    results.insert(id, Err(Error::qmp(command, qmp_client::Error::Closed)));
                    log::debug!("{id}: bad arguments: {err}");
                    continue;
                }
            };
            let Some(member) = self.members.get_mut(id.0) else {
                results.insert(id, Err(Error::NotRunning));
                continue;
            };
            let mut cmd = Command::new(command);
            if let Some(args) = args {
                cmd = cmd.with_arguments(args);
            }
            match member.machine.qmp_connection() {
                Ok(conn) => match conn.submit(cmd) {
                    Ok(request) => {
                        pending.insert(id.0, request);
                    }
                    Err(source) => {
                        results.insert(id, Err(Error::qmp(command, source)));
                    }
                },
                Err(err) => {
                    results.insert(id, Err(err));
                }
            }
        }
        if command == "quit" {
            for &i in pending.keys() {
                self.members[i].machine.note_quit_sent();
            }
        }
        let started = Instant::now();
        while !pending.is_empty() {
            let ready = self.poll_once(deadline);
            let timed_out = Instant::now() >= deadline;
            let mut done = Vec::new();
            for (&i, &request) in &pending {
                if !ready.contains(&i) && !timed_out {
                    continue;
                }
                let Ok(conn) = self.members[i].machine.qmp_connection() else {
                    done.push((i, Err(Error::NotRunning)));
                    continue;
                };
                match conn.take_reply(request) {
                    Some(Ok(reply)) => done.push((i, Ok(reply))),
                    Some(Err(source)) => done.push((i, Err(Error::qmp(command, source)))),
                    None if timed_out => {
                        conn.session_mut().abandon(request);
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
                let result = result.map(|reply: ServerMessage| reply_value(reply));
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
    /// `filters` is empty) from any running member, and says which member sent it. Events
    /// already queued count (oldest member first); other events stay queued for
    /// [`Machine::events`]. [`Error::EventTimeout`](crate::Error) when none came.
    pub fn event_wait(
        &mut self,
        filters: &[EventFilter],
        timeout: Duration,
    ) -> Result<(MemberId, Event)> {
        let deadline = Instant::now() + timeout;
        loop {
            for (i, member) in self.members.iter_mut().enumerate() {
                if !member.registered || member.launching {
                    continue;
                }
                let Ok(conn) = member.machine.qmp_connection() else {
                    continue;
                };
                let found = conn.session_mut().take_matching_event(filters, 0);
                if let Some(event) = found {
                    member.machine.note_event(&event);
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
            self.poll_once(deadline);
        }
    }

    /// Shuts every running member down at once: `quit` to all, then up to `timeout` for all
    /// to exit together, then SIGKILL for the ones still there; each is reaped and gets its
    /// [`ExitReport`]. A member that had to be killed gets [`Error::AbnormalShutdown`] (its
    /// report inside, the cause [`Error::ExitTimeout`]); one whose monitor was already gone
    /// gets SIGTERM instead of `quit`, as the ladder's `quit` step does. Members that exited
    /// by themselves are collected too (their report says how they ended); members that
    /// were never launched are left out.
    pub fn shutdown_all(&mut self, timeout: Duration) -> Replies<ExitReport> {
        let ids: Vec<MemberId> = self
            .ids()
            .filter(|id| self.members[id.0].machine.has_run())
            .collect();
        let asked: Vec<MemberId> = ids
            .iter()
            .copied()
            .filter(|id| {
                let member = &self.members[id.0];
                !member.launching && member.machine.is_running()
            })
            .collect();
        // The quit replies are not waited for: the exits are.
        for &id in &asked {
            let machine = &mut self.members[id.0].machine;
            let sent = match machine.qmp_connection() {
                Ok(conn) => conn.is_connected() && conn.submit(Command::new("quit")).is_ok(),
                Err(_) => false,
            };
            if sent {
                machine.note_quit_sent();
            } else if let Err(err) = machine.send_signal(libc::SIGTERM) {
                log::debug!("{id}: SIGTERM: {err}");
            }
        }
        let deadline = Instant::now() + timeout;
        let mut alive: BTreeSet<usize> = asked.iter().map(|id| id.0).collect();
        while !alive.is_empty() {
            let ready = self.poll_once(deadline);
            let now = Instant::now();
            alive.retain(|i| !(ready.contains(i) && self.members[*i].machine.has_exited()));
            if now >= deadline {
                alive.retain(|i| !self.members[*i].machine.has_exited());
                break;
            }
        }
        for &i in &alive {
            if let Err(err) = self.members[i].machine.send_signal(libc::SIGKILL) {
                log::debug!("#{i}: SIGKILL: {err}");
            }
        }
        ids.into_iter()
            .map(|id| {
                let member = &mut self.members[id.0];
                member.registered = false;
                member.launching = false;
                let result = member.machine.shutdown_with(&ShutdownLadder::hard());
                let result = match result {
                    Ok(report) if alive.contains(&id.0) => Err(Error::AbnormalShutdown {
                        report: Box::new(report),
                        cause: Box::new(Error::ExitTimeout { waited: timeout }),
                    }),
                    other => other,
                };
                (id, result)
            })
            .collect()
    }
}

impl Drop for Fleet {
    /// Kills every running member at once, then reaps each (dropping its [`Machine`]).
    fn drop(&mut self) {
        for member in &mut self.members {
            if member.machine.has_run() {
                let _ = member.machine.send_signal(libc::SIGKILL);
            }
        }
        // The machines' own drops reap them and clean up.
    }
}
