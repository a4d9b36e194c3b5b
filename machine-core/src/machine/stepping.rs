//! Machines that can be stepped: launch, running and the shutdown ladder as state machines an
//! owner's `mio::Poll` drives, so one thread can run many machines (and other sources).
//!
//! The blocking shutdown ([`Machine::shutdown`], [`Machine::wait`], [`Machine::kill`]) is a
//! loop over the same ladder walk; see [`Machine::step`] for the owner's side.

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use console_socket::DrainStatus;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use qmp_client::RequestId;
use qmp_proto::{Command, Event, EventFilter, ServerMessage};
use serde_json::Value;

use super::{Args, Machine, ABORT, QMP};
use crate::error::{Error, Result};
use crate::ladder::{LadderOps, RequestError, ShutdownLadder, Walk};
use crate::output::OutputDrain;
use crate::report::ExitReport;

/// Where a machine stands, for an owner that steps it ([`Machine::state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MachineState {
    /// Not launched, or cleaned up after a failed launch.
    Idle,
    /// QEMU is spawned; the QMP handshake runs ([`Machine::launch_begin`]).
    Launching,
    /// QEMU runs and QMP is ready.
    Running,
    /// The shutdown ladder is at `step` (0-based) of `steps` ([`Machine::shutdown_begin`]).
    Stopping {
        /// The step being walked.
        step: usize,
        /// How many steps the ladder has.
        steps: usize,
    },
    /// QEMU has ended and the machine is cleaned up: [`Machine::exit_report`] has the report.
    Exited,
}

/// The tokens a machine's sources get in the owner's `mio::Registry`
/// ([`Machine::register`]). Any values the owner likes; it routes events with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tokens {
    /// QEMU's pidfd: readable once QEMU has exited.
    pub exit: Token,
    /// The QMP monitor socket (absent without a monitor).
    pub qmp: Token,
    /// The read end of QEMU's stdout/stderr pipe: after [`Machine::launch_begin`] no thread
    /// drains it, [`Machine::step`] does.
    pub output: Token,
}

/// A ladder being walked, with the request it waits on.
#[derive(Debug)]
pub(crate) struct Stopping {
    walk: Walk,
    ladder: ShutdownLadder,
    request: Option<RequestId>,
}

/// The ladder's view of a running machine: nothing here blocks.
struct Ops<'a> {
    machine: &'a mut Machine,
    request: &'a mut Option<RequestId>,
}

impl LadderOps for Ops<'_> {
    fn exited(&mut self) -> bool {
        self.machine
            .run
            .as_mut()
            .is_none_or(|run| matches!(run.child.try_reap(), Ok(Some(_))))
    }

    fn has_qmp(&mut self) -> bool {
        // Read what has arrived first: an end-of-file may be waiting in the socket.
        self.machine
            .run
            .as_mut()
            .and_then(|run| run.qmp.as_mut())
            .is_some_and(|c| c.process_io().is_ok())
    }

    fn quit_sent(&self) -> bool {
        self.machine.quit_sent
    }

    fn submit(&mut self, command: &str) -> std::result::Result<(), RequestError> {
        let Some(conn) = self.machine.run.as_mut().and_then(|run| run.qmp.as_mut()) else {
            return Err(RequestError::Transport("no QMP connection".into()));
        };
        let sent = conn.submit(Command::new(command));
        if command == "quit" {
            self.machine.quit_sent = true;
        }
        match sent {
            Ok(id) => {
                *self.request = Some(id);
                Ok(())
            }
            Err(err) if err.is_closed() => Ok(()),
            Err(err) => Err(RequestError::Transport(err.to_string())),
        }
    }

    fn reply(&mut self) -> Option<std::result::Result<(), RequestError>> {
        let Some(id) = *self.request else {
            // Nothing awaited (a `quit` on a closing connection): done.
            return Some(Ok(()));
        };
        let conn = self.machine.run.as_mut().and_then(|run| run.qmp.as_mut())?;
        let reply = conn.take_reply(id)?;
        *self.request = None;
        Some(match reply {
            Ok(ServerMessage::Error(e)) => Err(RequestError::Refused(format!(
                "{}: {}",
                e.error.class.as_str(),
                e.error.desc
            ))),
            Ok(_) => Ok(()),
            Err(err) if err.is_closed() => Ok(()),
            Err(err) => Err(RequestError::Transport(err.to_string())),
        })
    }

    fn signal(&mut self, signal: i32) -> std::result::Result<(), String> {
        match self.machine.run.as_mut() {
            Some(run) => run.child.signal(signal).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

impl Machine {
    // ----- the stepping API -----

    /// Registers QEMU's pidfd and the QMP socket in the owner's `registry` under `tokens`
    /// (readable, edge-triggered; call it after [`Machine::launch_begin`]). On any event for
    /// either token, call [`Machine::step`]. Before the registry's poll goes away or the
    /// machine is launched again, [`Machine::deregister`] (the machine's exit removes the fds
    /// from every poll anyway, as closing them does).
    pub fn register(&mut self, registry: &Registry, tokens: Tokens) -> Result<()> {
        let run = self.run.as_mut().ok_or(Error::NotRunning)?;
        let pidfd = run.child.pidfd().as_raw_fd();
        registry
            .register(&mut SourceFd(&pidfd), tokens.exit, Interest::READABLE)
            .map_err(Error::os("epoll_ctl"))?;
        if let Some(conn) = run.qmp.as_ref() {
            conn.register(registry, tokens.qmp)
                .map_err(|source| Error::qmp("register", source))?;
        }
        if let Some((listener, _)) = run.listener.as_ref() {
            // QEMU has not connected yet: the listener stands in for the connection, which
            // takes its place in `registry` once accepted.
            registry
                .register(
                    &mut SourceFd(&listener.as_fd().as_raw_fd()),
                    tokens.qmp,
                    Interest::READABLE,
                )
                .map_err(Error::os("epoll_ctl"))?;
            run.owner = Some((
                registry.try_clone().map_err(Error::os("epoll fd dup"))?,
                tokens.qmp,
            ));
        }
        if let Some(pipe) = run.output.as_ref().and_then(OutputDrain::stepped_fd) {
            registry
                .register(
                    &mut SourceFd(&pipe.as_raw_fd()),
                    tokens.output,
                    Interest::READABLE,
                )
                .map_err(Error::os("epoll_ctl"))?;
        }
        Ok(())
    }

    /// Removes what [`Machine::register`] and [`Machine::register_console`] added (the
    /// console gets a drain thread again).
    pub fn deregister(&mut self, registry: &Registry) -> Result<()> {
        self.release_console_drainer(true);
        let run = self.run.as_mut().ok_or(Error::NotRunning)?;
        let pidfd = run.child.pidfd().as_raw_fd();
        registry
            .deregister(&mut SourceFd(&pidfd))
            .map_err(Error::os("epoll_ctl"))?;
        if let Some(conn) = run.qmp.as_ref() {
            conn.deregister(registry)
                .map_err(|source| Error::qmp("deregister", source))?;
        }
        if let Some((listener, _)) = run.listener.as_ref() {
            registry
                .deregister(&mut SourceFd(&listener.as_fd().as_raw_fd()))
                .map_err(Error::os("epoll_ctl"))?;
        }
        run.owner = None;
        if let Some(pipe) = run.output.as_ref().and_then(OutputDrain::stepped_fd) {
            registry
                .deregister(&mut SourceFd(&pipe.as_raw_fd()))
                .map_err(Error::os("epoll_ctl"))?;
        }
        Ok(())
    }

    /// Takes the console's drain onto the owner's poll: its socket is registered in
    /// `registry` under `token` (readable, edge-triggered) and [`Machine::step`] reads it
    /// (call `step` on events for `token` too), so no thread of the machine's is left
    /// running. Call it after [`Machine::launch_begin`] or [`Machine::launch`], for a machine
    /// with a console. Until [`Machine::deregister`] (which gives the console a drain thread
    /// again) or QEMU's exit, the console only gets output when `step` runs: on the thread
    /// that drives the poll, wait on it with a zero timeout
    /// (`console.read_available()`, `wait_for(.., Duration::ZERO)`).
    ///
    /// Without this call the console keeps its own drain thread, and blocking waits on it
    /// work from any thread.
    pub fn register_console(&mut self, registry: &Registry, token: Token) -> Result<()> {
        if self.run.is_none() {
            return Err(Error::NotRunning);
        }
        let console = self.console()?;
        let mut drainer = console
            .take_drainer()
            .map_err(|source| Error::Console { source })?;
        let registered = registry
            .register(&mut drainer, token, Interest::READABLE)
            .map_err(Error::os("epoll_ctl"))
            .and_then(|()| registry.try_clone().map_err(Error::os("epoll fd dup")));
        match registered {
            Ok(owner) => {
                self.console_drainer = Some((drainer, owner));
                // What arrived before the registration has no event of its own.
                self.console_more = self.drain_console();
                Ok(())
            }
            Err(err) => {
                let _ = registry.deregister(&mut drainer);
                if let Err(back) = self.console()?.drain_on_thread(drainer) {
                    log::warn!("the console lost its drain: {back}");
                }
                Err(err)
            }
        }
    }

    /// One budgeted read of an owner-driven console; true when input may be left.
    fn drain_console(&mut self) -> bool {
        self.console_drainer
            .as_mut()
            .is_some_and(|(drainer, _)| drainer.drain() == DrainStatus::More)
    }

    /// Gives an owner-driven console's drainer up: with `to_thread` back to a drain thread
    /// (the owner deregistered), else drained to the end of what QEMU wrote and dropped (the
    /// run is over).
    pub(super) fn release_console_drainer(&mut self, to_thread: bool) {
        let Some((mut drainer, registry)) = self.console_drainer.take() else {
            return;
        };
        self.console_more = false;
        if let Err(err) = registry.deregister(&mut drainer) {
            log::debug!("deregistering the console: {err}");
        }
        if to_thread {
            if let Some(console) = self.console.as_mut() {
                if let Err(err) = console.drain_on_thread(drainer) {
                    log::warn!("the console lost its drain: {err}");
                }
            }
            return;
        }
        // QEMU is gone: what it wrote is in the socket, up to its end.
        while drainer.drain() == DrainStatus::More {}
    }

    /// Moves the machine along without blocking: reads what QMP has (within a budget, see
    /// [`Machine::wants_step`]), advances the handshake of a stepped launch, notices QEMU's
    /// exit, and walks the shutdown ladder. Call it on every readiness event for the
    /// machine's [`Tokens`], when [`Machine::next_deadline`] passes, and again while
    /// [`Machine::wants_step`] says so.
    ///
    /// When QEMU exits by itself, the machine cleans up at once and the state becomes
    /// [`MachineState::Exited`] (the report is in [`Machine::exit_report`]). Errors are those
    /// of the blocking calls: [`Error::LaunchFailed`] for a launch that failed (the machine is
    /// [`MachineState::Idle`] again), [`Error::AbnormalShutdown`] / [`Error::ReapTimeout`]
    /// when the ladder ends that way.
    pub fn step(&mut self) -> Result<MachineState> {
        // QEMU's output and console first: it must never block on a full pipe or socket.
        self.output_more = self.pump_output();
        self.console_more = self.drain_console();
        if self.launching {
            self.launch_advance()?;
        }
        if !self.launching {
            let exited = match self.run.as_mut() {
                Some(run) => {
                    if let Some(conn) = run.qmp.as_mut() {
                        // Events and replies; a failure here is the connection ending, which
                        // the exit explains.
                        let _ = conn.process_io();
                    }
                    matches!(run.child.try_reap(), Ok(Some(_)))
                }
                None => false,
            };
            if exited && self.stopping.is_none() {
                // Collected at once: no step is walked for a QEMU that is already gone.
                self.stop_begin(&ShutdownLadder::wait(Duration::ZERO))?;
            }
        }
        if self.stopping.is_some() && self.stop_advance().is_none() {
            self.stop_finish()?;
        }
        Ok(self.state())
    }

    /// Where the machine stands.
    pub fn state(&self) -> MachineState {
        if let Some(stopping) = &self.stopping {
            return MachineState::Stopping {
                step: stopping.walk.step_index().unwrap_or(0),
                steps: stopping.walk.len(),
            };
        }
        match (&self.run, self.launching) {
            (Some(_), true) => MachineState::Launching,
            (Some(_), false) => MachineState::Running,
            (None, _) if self.report.is_some() => MachineState::Exited,
            (None, _) => MachineState::Idle,
        }
    }

    /// The latest time [`Machine::step`] must be called by, whatever the poll says: the
    /// handshake's or the current ladder step's deadline, or when an owner-driven console's
    /// log is due for a flush. None when only readiness matters.
    pub fn next_deadline(&self) -> Option<Instant> {
        let walk = match &self.stopping {
            Some(stopping) => stopping.walk.deadline(),
            // Before the first step of a launch, its deadline is not known yet: step now.
            None => self
                .launching
                .then(|| self.launch_deadline.unwrap_or_else(Instant::now)),
        };
        // An owner-driven console's log is flushed by `step` too.
        let flush = self
            .console_drainer
            .as_ref()
            .and_then(|(drainer, _)| drainer.next_flush());
        walk.into_iter().chain(flush).min()
    }

    /// True when the last [`Machine::step`] stopped reading QMP or QEMU's output at its budget
    /// with input left: call `step` again before waiting in the poll (no readiness event may announce
    /// that input).
    pub fn wants_step(&mut self) -> bool {
        self.output_more
            || self.console_more
            || self
                .run
                .as_mut()
                .and_then(|run| run.qmp.as_mut())
                .is_some_and(|c| c.wants_read())
    }

    /// Sends `command` without waiting (arguments as for [`Machine::qmp`]); pick the reply up
    /// with [`Machine::take_reply`] after later steps. Fails at once when 8 commands are in
    /// flight ([`qmp_client::Error::TooManyInFlight`] inside [`Error::Qmp`]).
    pub fn submit(&mut self, command: &str, args: impl Into<Args>) -> Result<RequestId> {
        let args = args.into().into_map(command)?;
        let mut cmd = Command::new(command);
        if let Some(args) = args {
            cmd = cmd.with_arguments(args);
        }
        let id = self
            .qmp_handle()?
            .submit(cmd)
            .map_err(|source| Error::qmp(command, source))?;
        if command == "quit" {
            self.quit_sent = true;
        }
        Ok(id)
    }

    /// The whole reply to `id` once it has come (like [`Machine::qmp`]: a QMP error reply is
    /// `Ok`, only transport failures are `Err`); None while it is pending.
    pub fn take_reply(&mut self, id: RequestId) -> Option<Result<Value>> {
        let conn = self.qmp_handle().ok()?;
        let reply = conn.take_reply(id)?;
        Some(
            reply
                .map(super::reply_value)
                .map_err(|source| Error::qmp("reply", source)),
        )
    }

    /// Takes the first queued event matching any of `filters` (any event when empty), without
    /// reading or waiting: what the last [`Machine::step`] read. Other events stay queued.
    pub fn take_event(&mut self, filters: &[EventFilter]) -> Option<Event> {
        if let Some(pos) = self
            .leftover_events
            .iter()
            .position(|e| filters.is_empty() || filters.iter().any(|f| f.matches(e)))
        {
            return self.leftover_events.remove(pos);
        }
        let conn = self.qmp_handle().ok()?;
        let event = conn.session_mut().take_matching_event(filters, 0)?;
        self.note_event(&event);
        Some(event)
    }

    /// Starts walking `ladder` (see [`Machine::shutdown_with`]): enters its first step at once
    /// (sends the request or signal), then [`Machine::step`] walks it. State
    /// [`MachineState::Stopping`] until QEMU has ended and the machine is cleaned up; when
    /// QEMU was already gone, the machine is cleaned up here (errors as for `step`).
    pub fn shutdown_begin(&mut self, ladder: &ShutdownLadder) -> Result<()> {
        if self.launching {
            // A launch still shaking hands is ended by the ladder like a running machine.
            self.launching = false;
            self.launch_deadline = None;
        }
        self.stop_begin(ladder)?;
        // Enter the first step now (send its request or signal): nothing else would wake the
        // owner's poll for it.
        if self.stop_advance().is_none() {
            self.stop_finish()?;
        }
        Ok(())
    }

    // ----- the pieces the blocking calls share -----

    pub(super) fn stop_begin(&mut self, ladder: &ShutdownLadder) -> Result<()> {
        let Some(run) = self.run.as_mut() else {
            return Err(Error::NotRunning);
        };
        // A `quit` sent straight on the connection (a shell on `qmp_connection`, a shared
        // handle) is as much ours as one through `cmd`: the Quit step then only waits.
        if let Some(conn) = run.qmp.as_mut() {
            self.quit_sent |= conn.session().quit_sent();
        }
        if self.stopping.is_none() {
            self.stopping = Some(Stopping {
                walk: Walk::new(ladder),
                ladder: ladder.clone(),
                request: None,
            });
        }
        Ok(())
    }

    /// One non-blocking advance of the ladder; None once it is over.
    pub(super) fn stop_advance(&mut self) -> Option<Instant> {
        let mut stopping = self.stopping.take()?;
        let next = {
            let mut ops = Ops {
                machine: self,
                request: &mut stopping.request,
            };
            stopping.walk.advance(&mut ops)
        };
        self.stopping = Some(stopping);
        next
    }

    /// The end of a walk: cleanup and the report (or the error saying why not).
    pub(super) fn stop_finish(&mut self) -> Result<ExitReport> {
        let Some(stopping) = self.stopping.take() else {
            return Err(Error::NotRunning);
        };
        let Stopping { walk, ladder, .. } = stopping;
        self.end_walk(&ladder, walk.finish())
    }

    /// Waits on the run's own poll until `deadline` or an event (QEMU's pidfd, QMP input, a
    /// blocking launch's abort fd), reading what QMP has: the blocking calls' wait between
    /// two steps. True when the abort fd turned readable.
    pub(super) fn wait_run(&mut self, deadline: Instant) -> bool {
        let Some(run) = self.run.as_mut() else {
            return false;
        };
        // process_io stops after a budget under a flood; what it left may never be announced
        // by another readiness event, so only look at the pidfd (no sleep) before reading on.
        let more = run
            .qmp
            .as_mut()
            .is_some_and(|c| !c.is_shared() && c.wants_read());
        let timeout = if more {
            Duration::ZERO
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        let (ready, aborted) = match run.poll.poll(&mut run.events, Some(timeout)) {
            Ok(()) => (
                more || run.events.iter().any(|e| e.token() == QMP),
                run.events.iter().any(|e| e.token() == ABORT),
            ),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => (false, false),
            Err(err) => {
                // Cannot wait on the poll: wait on the pidfd alone.
                log::warn!("waiting for qemu's exit: poll failed: {err}");
                let _ = crate::process::poll_readable(run.child.pidfd(), timeout);
                (false, false)
            }
        };
        if let Some(output) = run.output.as_mut() {
            // A stepped launch has no drain thread: read what QEMU wrote meanwhile.
            output.pump();
        }
        if ready {
            if let Some(conn) = run.qmp.as_mut().filter(|c| !c.is_shared()) {
                // Keep the event queue current while we wait (SHUTDOWN, reasons); a failure
                // here is the connection ending, which the exit explains.
                let _ = conn.process_io();
            }
        }
        aborted
    }
}
