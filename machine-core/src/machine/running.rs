//! The running handle: the console, the QMP connection (own, shared with other threads or
//! with other clients through the multiplexer), commands, events and fd passing on a
//! launched machine.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use mio::unix::SourceFd;
use qmp_client::{Connection, Shared};

use crate::share::{Sharing, SharingInfo};
use qmp_proto::{Event, EventFilter};
use serde_json::Value;

use crate::config::Monitor;
use crate::error::{Error, Result};
use crate::output::OutputDrain;
use crate::report::ShutdownEvent;

use super::{Args, Machine};

/// Events kept for the exit report.
const RECENT_EVENTS: usize = 16;

impl Machine {
    /// The console (draining since launch; still readable after the exit until the next
    /// launch).
    pub fn console(&mut self) -> Result<&mut console_socket::Console> {
        if self.config.console.is_none() {
            return Err(Error::NoConsole);
        }
        self.console.as_mut().ok_or(Error::NotRunning)
    }

    /// The QMP connection itself, for what this type does not wrap. Not available once the
    /// connection is shared ([`Machine::qmp_shared`]): then [`Error::QmpShared`].
    pub fn qmp_connection(&mut self) -> Result<&mut Connection> {
        // Sharing with the multiplexer's thread alone leaves the connection usable: both go
        // through the same driver.
        let handed_out = self.run.as_ref().is_some_and(|run| run.handed_out);
        let conn = self.qmp_handle()?;
        if conn.is_shared() && handed_out {
            return Err(Error::QmpShared);
        }
        Ok(conn)
    }

    /// A thread-safe handle on this run's QMP connection ([`qmp_client::Shared`]): clone it,
    /// send commands and wait for events from other threads while this machine keeps
    /// working (its own [`Machine::cmd`], [`Machine::qmp`], events and shutdown go through the
    /// same handle from then on).
    ///
    /// The first call turns the machine's connection into the shared one for the rest of the
    /// run; later calls return clones. Events are one queue: whichever thread takes an event
    /// (through the handle or through [`Machine::event`]) takes it for everybody, so give the
    /// events to one reader. Afterwards [`Machine::qmp_connection`] and
    /// [`Machine::send_fd_scm`] are not available ([`Error::QmpShared`]; [`Machine::getfd`]
    /// is). The handle fails with a disconnection once QEMU has exited.
    ///
    /// ```no_run
    /// # fn main() -> machine_core::Result<()> {
    /// use std::time::Duration;
    /// let mut vm = machine_core::MachineBuilder::new("qemu-system-x86_64")
    ///     .machine_type("none")
    ///     .build();
    /// vm.launch()?;
    /// let mut qmp = vm.qmp_shared()?;
    /// let watcher = std::thread::spawn(move || qmp.pull_event(Duration::from_secs(5)));
    /// vm.cmd("stop", ())?;
    /// let _stop = watcher.join();
    /// vm.shutdown()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn qmp_shared(&mut self) -> Result<Shared> {
        let shared = self.share_connection()?;
        if let Some(run) = self.run.as_mut() {
            run.handed_out = true;
        }
        Ok(shared)
    }

    /// Moves the connection behind the shared driver (once) and returns a handle on it.
    fn share_connection(&mut self) -> Result<Shared> {
        self.qmp_handle()?;
        let Some(run) = self.run.as_mut() else {
            return Err(Error::NotRunning);
        };
        let Some(conn) = run.qmp.as_mut() else {
            return Err(Error::NotRunning);
        };
        if !conn.is_shared() {
            // From now on the handle's users read the socket too; the exit watch keeps only
            // the pidfd.
            let raw = conn.as_raw_fd();
            if let Err(err) = run.poll.registry().deregister(&mut SourceFd(&raw)) {
                log::debug!("deregistering the monitor: {err}");
            }
        }
        conn.share().map_err(|source| Error::qmp("share", source))
    }

    /// Shares this running machine's QMP monitor: other QMP clients (QEMU's `qmp-shell`, its
    /// Python `qemu.qmp`, `qemu-machine shell`, a monitoring tool) attach on a unix socket
    /// (and optionally loopback TCP) and talk to QEMU as if they were alone, while this machine
    /// keeps working through the same connection, unaffected by what they do (see
    /// [`qmp_client::Mux`] for the contracts: QEMU's greeting and error replies, rewritten
    /// ids, events to every client, bounded queues, the `quit` policy). Clients are served by a
    /// thread of the machine's; it stops, closing them, when QEMU exits or the machine is shut
    /// down or dropped. (An owner stepping the machine on its own `mio::Poll` can serve a
    /// [`qmp_client::MuxServer`] on that poll instead: see the `share` module's docs.)
    ///
    /// Clients get `oob` only when this machine negotiated it (off by default; the builder's
    /// [`MachineBuilder::share_qmp`](crate::MachineBuilder::share_qmp) turns it on). When a
    /// client's `quit` is allowed and ends QEMU, the exit report says so
    /// ([`EndedBy::SharedClient`](crate::EndedBy::SharedClient)). A second call returns where
    /// the monitor is already shared.
    ///
    /// ```no_run
    /// # fn main() -> machine_core::Result<()> {
    /// use machine_core::qmp_client::{MuxConfig, ShareAddress};
    /// let mut vm = machine_core::MachineBuilder::new("qemu-system-x86_64")
    ///     .machine_type("none")
    ///     .build();
    /// vm.launch()?;
    /// let shared = vm.share_qmp(&ShareAddress::unix("/tmp/vm.qmp"), MuxConfig::default())?;
    /// println!("qmp-shell {}", shared.path.display());
    /// vm.qmp("query-status", None)?; // still ours
    /// # Ok(())
    /// # }
    /// ```
    pub fn share_qmp(
        &mut self,
        address: &qmp_client::ShareAddress,
        config: qmp_client::MuxConfig,
    ) -> Result<SharingInfo> {
        if let Some(share) = self.run.as_ref().and_then(|run| run.share.as_ref()) {
            return Ok(share.info().clone());
        }
        let shared = self.share_connection()?;
        let path = address.unix.clone().unwrap_or_default();
        let conn = self.qmp_handle()?;
        let mux = {
            let mut session = conn.session_mut();
            qmp_client::Mux::for_session(&mut session, config)
        };
        let mux = mux.ok_or_else(|| Error::Share {
            path: path.clone(),
            source: Box::new(qmp_client::Error::NotReady {
                phase: qmp_client::Phase::Greeting,
            }),
        })?;
        let server = qmp_client::MuxServer::bind(mux, address).map_err(|source| Error::Share {
            path,
            source: Box::new(source),
        })?;
        let sharing = Sharing::start(shared, server)?;
        let info = sharing.info().clone();
        match self.run.as_mut() {
            Some(run) => run.share = Some(sharing),
            None => return Err(Error::NotRunning),
        }
        Ok(info)
    }

    /// Where the QMP monitor is shared, while it is ([`Machine::share_qmp`]).
    pub fn sharing(&self) -> Option<&SharingInfo> {
        self.run
            .as_ref()
            .and_then(|run| run.share.as_ref())
            .map(Sharing::info)
    }

    /// The counters of the shared monitor's multiplexer, while it is shared.
    pub fn sharing_stats(&self) -> Option<qmp_client::MuxStats> {
        self.run
            .as_ref()
            .and_then(|run| run.share.as_ref())
            .map(Sharing::stats)
    }

    pub(super) fn qmp_handle(&mut self) -> Result<&mut Connection> {
        if self.config.monitor == Monitor::None {
            return Err(Error::NoMonitor);
        }
        self.run
            .as_mut()
            .and_then(|run| run.qmp.as_mut())
            .ok_or(Error::NotRunning)
    }

    /// Reads QEMU's output after [`Machine::launch_begin`], up to a budget; true if input
    /// may be left (call again without waiting for readiness).
    pub(crate) fn pump_output(&mut self) -> bool {
        self.run
            .as_mut()
            .and_then(|run| run.output.as_mut())
            .is_some_and(OutputDrain::pump)
    }

    /// Runs `command` and returns QEMU's whole reply (`{"return": ...}` or `{"error": ...}`),
    /// without the `id` we added to match it (as QEMU's Python `qemu.machine` does in
    /// `qmp()`); only transport failures are errors. A successful `quit` is remembered: the
    /// connection closing afterwards is then expected.
    pub fn qmp(&mut self, command: &str, args: impl Into<Args>) -> Result<Value> {
        let args = args.into().into_map(command)?;
        let reply = self
            .qmp_handle()?
            .execute_raw(command, args)
            .map_err(|source| Error::qmp(command, source))?;
        if command == "quit" && matches!(reply, qmp_proto::ServerMessage::Return(_)) {
            self.quit_sent = true;
        }
        Ok(reply_value(reply))
    }

    /// Runs `command` and returns its `return` value; a QMP error reply is
    /// [`Error::Command`] (`cmd()` in QEMU's Python `qemu.machine`).
    pub fn cmd(&mut self, command: &str, args: impl Into<Args>) -> Result<Value> {
        let timeout = self.config.qmp.command_timeout;
        self.cmd_with_timeout(command, args, timeout)
    }

    /// [`Machine::cmd`] with its own deadline.
    pub fn cmd_with_timeout(
        &mut self,
        command: &str,
        args: impl Into<Args>,
        timeout: Duration,
    ) -> Result<Value> {
        let args = args.into().into_map(command)?;
        let result = self
            .qmp_handle()?
            .execute_with_timeout(command, args, timeout);
        if command == "quit" {
            // Like QEMU's Python `qemu.machine`: a quit is considered sent even if its reply was lost to the exit.
            self.quit_sent = true;
        }
        result.map_err(|source| Error::qmp(command, source))
    }

    pub(crate) fn note_event(&mut self, event: &Event) {
        if let (Some(run), Some(shutdown)) = (&mut self.run, ShutdownEvent::from_event(event)) {
            run.shutdown_event = Some(shutdown);
        }
        if self.recent_events.len() == RECENT_EVENTS {
            self.recent_events.pop_front();
        }
        self.recent_events.push_back(event.clone());
    }

    /// Takes the oldest event, waiting up to `timeout` for one (`Duration::ZERO`: do not
    /// wait). After the exit, returns the events left over from the run.
    pub fn event(&mut self, timeout: Duration) -> Result<Option<Event>> {
        if let Some(event) = self.leftover_events.pop_front() {
            return Ok(Some(event));
        }
        if self.run.is_none() {
            return Ok(None);
        }
        let event = self
            .qmp_handle()?
            .pull_event(timeout)
            .map_err(|source| Error::qmp("events", source))?;
        if let Some(event) = &event {
            self.note_event(event);
        }
        Ok(event)
    }

    /// Takes every event that has arrived, oldest first.
    pub fn events(&mut self) -> Vec<Event> {
        let mut out: Vec<Event> = self.leftover_events.drain(..).collect();
        if let Some(qmp) = self.run.as_mut().and_then(|r| r.qmp.as_mut()) {
            out.extend(qmp.drain_events());
        }
        for event in &out[..] {
            self.note_event(event);
        }
        out
    }

    /// Waits for the first event called `name` whose data matches `pattern` (as
    /// `event_match` in QEMU's Python `qemu.machine`: recursive subset, `null` is a wildcard), within a total `timeout`.
    /// Other events stay queued, in order.
    pub fn event_wait(
        &mut self,
        name: &str,
        pattern: Option<Value>,
        timeout: Duration,
    ) -> Result<Event> {
        let mut filter = EventFilter::new(name);
        if let Some(pattern) = pattern {
            filter = filter.with_pattern(pattern);
        }
        self.events_wait(&[filter], timeout)
    }

    /// Waits for the first event matching any of `filters`, within a total `timeout`.
    pub fn events_wait(&mut self, filters: &[EventFilter], timeout: Duration) -> Result<Event> {
        if let Some(pos) = self
            .leftover_events
            .iter()
            .position(|e| filters.iter().any(|f| f.matches(e)))
        {
            if let Some(event) = self.leftover_events.remove(pos) {
                return Ok(event);
            }
        }
        let event = self
            .qmp_handle()?
            .wait_event(filters, timeout)
            .map_err(|source| Error::qmp("event wait", source))?;
        self.note_event(&event);
        Ok(event)
    }

    /// Passes `fd` to QEMU over the QMP socket (SCM_RIGHTS) for a following `getfd`/`add-fd`
    /// (`send_fd_scm(fd=...)` in QEMU's Python `qemu.machine`). Unix-socket monitors only; not on a shared
    /// connection (use [`Machine::getfd`], which sends the fd and names it atomically).
    pub fn send_fd_scm(&mut self, fd: BorrowedFd<'_>) -> Result<()> {
        self.qmp_connection()?
            .send_fds(&[fd])
            .map_err(|source| Error::qmp("send_fd_scm", source))
    }

    /// Opens `path` read-only and passes it like [`Machine::send_fd_scm`] (as
    /// `send_fd_scm(file_path=...)` in QEMU's Python `qemu.machine`); our copy is closed afterwards.
    pub fn send_fd_scm_path(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(|source| Error::OpenFile {
            path: path.to_owned(),
            source,
        })?;
        self.send_fd_scm(file.as_fd())
    }

    /// Passes `fd` and names it `name` in QEMU (`getfd`).
    pub fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        self.qmp_handle()?
            .getfd(name, fd)
            .map_err(|source| Error::qmp("getfd", source))
    }
}

/// QEMU's whole reply as JSON (`{"return": ...}` or `{"error": ...}`), without the `id` we
/// added to match it: the id is ours, not the caller's.
pub(crate) fn reply_value(mut reply: qmp_proto::ServerMessage) -> Value {
    match &mut reply {
        qmp_proto::ServerMessage::Return(r) => r.id = None,
        qmp_proto::ServerMessage::Error(e) => e.id = None,
        _ => {}
    }
    reply.to_value()
}
