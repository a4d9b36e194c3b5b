//! The VM lifecycle: launch with rollback, QMP and console access, shutdown through the
//! ladder, exit supervision on a pidfd, cleanup, and the exit report.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use qmp_client::{Connection, Listener, Shared};

use crate::share::{Sharing, SharingInfo};
use qmp_proto::{Event, EventFilter};
use serde_json::{Map, Value};

use crate::argv::{CommandLine, OptString};
use crate::config::{Config, Monitor};
use crate::error::{Error, Result};
use crate::ladder::{self, ShutdownLadder, Step};
use crate::output::{last_lines, OutputDrain};
use crate::process::{ChildGuard, ExitStatus, SpawnSpec};
use crate::report::{classify, EndedBy, ExitReport, Facts, ShutdownEvent};

/// Longest unix socket path we accept (`sun_path` is 108 bytes with its NUL).
pub const UNIX_PATH_MAX: usize = 107;
/// Most bytes of QEMU's output a [`Error::LaunchFailed`] carries.
pub const LAUNCH_OUTPUT_LIMIT: usize = 64 * 1024;
/// How long a launch waits for QEMU's own exit once the monitor hit end-of-file, before it
/// kills QEMU (the exit usually follows the socket close within microseconds).
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// How long the output drain may take to see end-of-file after QEMU was reaped.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);
/// How long a failed launch may take to reap a killed QEMU.
const LAUNCH_REAP_BOUND: Duration = Duration::from_secs(10);
/// Events kept for the exit report.
const RECENT_EVENTS: usize = 16;
/// Lines of output and console in the exit report.
const REPORT_LINES: usize = 20;

const PIDFD: Token = Token(0);
const QMP: Token = Token(1);

/// QMP command arguments, with the `_` to `-` key conversion of QEMU's Python `qemu.machine` on by default.
///
/// `Value`, `Map` and `()` convert into converted arguments; [`Args::exact`] skips the
/// conversion for commands whose argument names really contain underscores.
///
/// ```
/// use machine_core::Args;
/// use serde_json::json;
/// let converted = Args::from(json!({"node_name": "disk0"}));
/// let exact = Args::exact(json!({"bps_rd": 1024}));
/// # let _ = (converted, exact);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Args {
    value: Option<Value>,
    convert: bool,
}

impl Args {
    /// No arguments.
    pub fn none() -> Args {
        Args::default()
    }

    /// Arguments sent exactly as given (no key conversion).
    pub fn exact(value: impl Into<Value>) -> Args {
        Args {
            value: Some(value.into()),
            convert: false,
        }
    }

    /// Arguments whose top-level keys get `_` replaced by `-` (the default).
    pub fn converted(value: impl Into<Value>) -> Args {
        Args {
            value: Some(value.into()),
            convert: true,
        }
    }

    pub(crate) fn into_map(self, command: &str) -> Result<Option<Map<String, Value>>> {
        let map = match self.value {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(map)) => map,
            Some(value) => {
                return Err(Error::ArgumentsNotObject {
                    command: command.to_owned(),
                    value,
                })
            }
        };
        if self.convert {
            Ok(Some(conv_keys(map)))
        } else {
            Ok(Some(map))
        }
    }
}

impl From<()> for Args {
    fn from((): ()) -> Args {
        Args::none()
    }
}

impl From<Value> for Args {
    fn from(value: Value) -> Args {
        Args::converted(value)
    }
}

impl From<Map<String, Value>> for Args {
    fn from(map: Map<String, Value>) -> Args {
        Args::converted(Value::Object(map))
    }
}

impl From<Option<Map<String, Value>>> for Args {
    fn from(map: Option<Map<String, Value>>) -> Args {
        match map {
            Some(map) => Args::from(map),
            None => Args::none(),
        }
    }
}

/// Like `_qmp_args(conv_keys=True)` in QEMU's Python `qemu.machine`: `_` becomes `-` in top-level keys only.
fn conv_keys(map: Map<String, Value>) -> Map<String, Value> {
    map.into_iter()
        .map(|(k, v)| (k.replace('_', "-"), v))
        .collect()
}

/// How a launch does its QMP handshake.
enum Handshake<'a> {
    /// Waited for here, also ending when the caller's abort fd (if any) turns readable.
    Blocking(Option<BorrowedFd<'a>>),
    /// Left to [`Machine::launch_step`], driven by the owner's poll; the output pipe is then
    /// read by [`Machine::step`] too, not by a thread.
    Stepped,
}

/// One running QEMU and everything that lives exactly as long as it.
struct Run {
    child: ChildGuard,
    poll: Poll,
    events: Events,
    qmp: Option<Connection>,
    output: Option<OutputDrain>,
    command: CommandLine,
    started: Instant,
    shutdown_event: Option<ShutdownEvent>,
    /// Other QMP clients attached through the multiplexer ([`Machine::share_qmp`]).
    share: Option<Sharing>,
    /// A [`Shared`] handle was given to the user ([`Machine::qmp_shared`]).
    handed_out: bool,
}

/// A QEMU virtual machine: configure, [`launch`](Machine::launch), drive through QMP and the
/// console, then [`shutdown`](Machine::shutdown) (or drop it: QEMU is killed and reaped).
///
/// The same object can be launched again after QEMU has exited.
pub struct Machine {
    config: Config,
    once_fds: Vec<OwnedFd>,
    temp_dir: Option<tempfile::TempDir>,
    run: Option<Run>,
    console: Option<console_socket::Console>,
    agent: Option<qmp_client::Agent>,
    leftover_events: VecDeque<Event>,
    recent_events: VecDeque<Event>,
    quit_sent: bool,
    /// A stepped launch ([`Machine::launch_begin`]) whose handshake has not completed.
    launching: bool,
    command: Option<CommandLine>,
    log_text: Option<String>,
    last_status: Option<ExitStatus>,
    report: Option<ExitReport>,
    /// The deadline of a stepped launch's handshake, as its last step said.
    launch_deadline: Option<Instant>,
    /// The last step left QEMU's output unread at its budget.
    output_more: bool,
    /// The shutdown ladder being walked.
    stopping: Option<stepping::Stopping>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("name", &self.config.name)
            .field("pid", &self.pid())
            .field("last_status", &self.last_status)
            .finish_non_exhaustive()
    }
}

impl Machine {
    pub(crate) fn from_config(config: Config) -> Machine {
        Machine {
            config,
            once_fds: Vec::new(),
            temp_dir: None,
            run: None,
            console: None,
            agent: None,
            leftover_events: VecDeque::new(),
            recent_events: VecDeque::new(),
            quit_sent: false,
            launching: false,
            command: None,
            log_text: None,
            last_status: None,
            report: None,
            launch_deadline: None,
            output_more: false,
            stopping: None,
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn agent_slot(&mut self) -> &mut Option<qmp_client::Agent> {
        &mut self.agent
    }

    /// A builder for `binary` (same as [`crate::MachineBuilder::new`]).
    pub fn builder(binary: impl Into<PathBuf>) -> crate::MachineBuilder {
        crate::MachineBuilder::new(binary)
    }

    // ----- configuration (takes effect at the next launch) -----

    /// The QEMU binary.
    pub fn binary(&self) -> &Path {
        &self.config.binary
    }

    /// The machine's name (prefix of the log file).
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The user arguments (after the generated base arguments).
    pub fn args(&self) -> &[OsString] {
        &self.config.args
    }

    /// The user arguments, mutable (the live `args` list of QEMU's Python `qemu.machine`).
    pub fn args_mut(&mut self) -> &mut Vec<OsString> {
        &mut self.config.args
    }

    /// Appends user arguments.
    pub fn add_args<I, S>(&mut self, args: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.config.args.extend(args.into_iter().map(Into::into));
    }

    /// `-machine TYPE` from the next launch on.
    pub fn set_machine(&mut self, machine: impl Into<String>) {
        self.config.machine_type = Some(machine.into());
    }

    /// Like `set_console(device_type, console_index)` in QEMU's Python `qemu.machine`.
    pub fn set_console(&mut self, device_type: Option<&str>, index: u32) {
        let console = self
            .config
            .console
            .get_or_insert_with(crate::ConsoleSettings::default);
        console.device_type = device_type.map(str::to_owned);
        console.index = index;
    }

    /// Adds `-monitor null`.
    pub fn add_monitor_null(&mut self) {
        self.config.add_monitor_null();
    }

    /// Like `set_qmp_monitor(enabled)` in QEMU's Python `qemu.machine`: false means [`Monitor::None`], true restores
    /// the socketpair monitor if there was none.
    pub fn set_qmp_monitor(&mut self, enabled: bool) {
        match (enabled, &self.config.monitor) {
            (false, _) => self.config.monitor = Monitor::None,
            (true, Monitor::None) => self.config.monitor = Monitor::SocketPair,
            (true, _) => {}
        }
    }

    /// Hands `fd` to every launch; returns its number in QEMU (see
    /// [`crate::MachineBuilder::pass_fd`]).
    pub fn pass_fd(&mut self, fd: OwnedFd) -> RawFd {
        self.config.pass_fd(fd)
    }

    /// Hands `fd` to the next launch only: it is closed in this process right after QEMU is
    /// spawned (a per-launch channel, such as qtest's socketpair end). Returns its number in
    /// QEMU.
    pub fn pass_fd_once(&mut self, fd: OwnedFd) -> RawFd {
        let fd = crate::config::off_stdio(fd);
        if let Err(err) = nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        ) {
            log::warn!("cannot set close-on-exec on fd {}: {err}", fd.as_raw_fd());
        }
        let raw = fd.as_raw_fd();
        self.once_fds.push(fd);
        raw
    }

    /// Like `add_fd` in QEMU's Python `qemu.machine`: passes a duplicate of `fd` with `-add-fd` at every launch.
    pub fn add_fd(
        &mut self,
        fd: impl AsFd,
        fdset: u64,
        opaque: Option<&str>,
        opts: &str,
    ) -> Result<RawFd> {
        self.config.add_fd(fd, fdset, opaque, opts)
    }

    /// The ladder [`Machine::shutdown`] uses.
    pub fn set_shutdown_ladder(&mut self, ladder: ShutdownLadder) {
        self.config.ladder = ladder;
    }

    /// The private temp dir (created 0700 under the base temp dir on first use; removed,
    /// with everything in it, after QEMU's exit, after a failed launch and on drop, as the
    /// `_post_shutdown` in QEMU's Python `qemu.machine` does).
    pub fn temp_dir(&mut self) -> Result<&Path> {
        if self.temp_dir.is_none() {
            let base = &self.config.base_temp_dir;
            let dir = tempfile::Builder::new()
                .prefix("qemu-machine-")
                .permissions(std::fs::Permissions::from_mode(0o700))
                .tempdir_in(base)
                .map_err(|source| Error::TempDir {
                    base: base.clone(),
                    source,
                })?;
            self.temp_dir = Some(dir);
        }
        match &self.temp_dir {
            Some(dir) => Ok(dir.path()),
            None => Err(Error::NotRunning),
        }
    }

    /// The log dir: the configured one (where `{name}.log` is written and kept), else the
    /// temp dir (the default of QEMU's Python `qemu.machine`). Without a configured log dir no log file is written:
    /// QEMU's output is kept in memory ([`Machine::log`], [`Machine::log_tail`]).
    pub fn log_dir(&mut self) -> Result<PathBuf> {
        match &self.config.log_dir {
            Some(dir) => Ok(dir.clone()),
            None => self.temp_dir().map(Path::to_path_buf),
        }
    }

    // ----- state -----

    /// Whether QEMU is running (a non-blocking check of its pidfd).
    pub fn is_running(&self) -> bool {
        match &self.run {
            Some(run) => {
                run.child.status().is_none()
                    && !crate::process::poll_readable(run.child.pidfd(), Duration::ZERO)
                        .unwrap_or(false)
            }
            None => false,
        }
    }

    /// QEMU's pid while it runs: None before the launch and as soon as QEMU has exited
    /// (a non-blocking check of its pidfd, as `get_pid()` in QEMU's Python `qemu.machine`), even before it is
    /// reaped. The exit report keeps it ([`ExitReport::pid`]).
    pub fn pid(&self) -> Option<u32> {
        self.run
            .as_ref()
            .filter(|_| self.is_running())
            .map(|run| run.child.pid())
    }

    /// How QEMU ended (reaping it if it has just exited); None while it runs or before the
    /// first launch.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if let Some(run) = &mut self.run {
            return run.child.try_reap().ok().flatten();
        }
        self.last_status
    }

    /// The command line of the current or last launch.
    pub fn command_line(&self) -> Option<&CommandLine> {
        self.command.as_ref()
    }

    /// QEMU's stdout and stderr text of the last run, available once it has ended (lossy
    /// UTF-8; at most [`crate::MachineBuilder::output_capacity`] bytes, the end kept).
    pub fn log(&self) -> Option<&str> {
        self.log_text.as_deref()
    }

    /// The last `max_bytes` of QEMU's output so far, at any time (lossy UTF-8).
    pub fn log_tail(&self, max_bytes: usize) -> String {
        if let Some(output) = self.run.as_ref().and_then(|r| r.output.as_ref()) {
            return output
                .with_tail(|t| String::from_utf8_lossy(&t.last_bytes(max_bytes)).into_owned());
        }
        match &self.log_text {
            Some(text) => {
                let start = text.len().saturating_sub(max_bytes);
                let start = (start..=text.len())
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(text.len());
                text[start..].to_owned()
            }
            None => String::new(),
        }
    }

    /// The report of the last run, once QEMU has ended and the machine cleaned up.
    pub fn exit_report(&self) -> Option<&ExitReport> {
        self.report.as_ref()
    }

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

    fn qmp_handle(&mut self) -> Result<&mut Connection> {
        if self.config.monitor == Monitor::None {
            return Err(Error::NoMonitor);
        }
        self.run
            .as_mut()
            .and_then(|run| run.qmp.as_mut())
            .ok_or(Error::NotRunning)
    }

    // ----- launch -----

    /// Starts QEMU and completes the QMP handshake (with the configured greeting deadline).
    ///
    /// If QEMU exits first, the launch fails at once (the pidfd ends the wait) with
    /// [`Error::LaunchFailed`] carrying the exit status, the command line and QEMU's output.
    /// On any failure everything is rolled back: no process, fd, temp dir or socket file
    /// is left.
    pub fn launch(&mut self) -> Result<()> {
        self.launch_inner(None)
    }

    /// [`Machine::launch`] that also ends at once when `abort` turns readable (e.g. the read
    /// end of a pipe a signal handler or another thread writes to): QEMU is then killed and
    /// everything rolled back, and the result is [`Error::LaunchFailed`] with the cause
    /// [`Error::LaunchAborted`]. The machine can be launched again afterwards.
    pub fn launch_with_abort(&mut self, abort: BorrowedFd<'_>) -> Result<()> {
        self.launch_inner(Some(abort))
    }

    fn launch_inner(&mut self, abort: Option<BorrowedFd<'_>>) -> Result<()> {
        let once = self.prepare_launch()?;
        let started = self.start(once, abort, false);
        self.launch_ended(started)
    }

    /// Resets what a previous run left and takes the one-launch fds; fails while running.
    fn prepare_launch(&mut self) -> Result<Vec<OwnedFd>> {
        if let Some(run) = &mut self.run {
            let pid = run.child.pid();
            match run.child.try_reap() {
                Ok(Some(_)) => {
                    // Ended by itself and never collected: finish that run first.
                    self.end_run(&ShutdownLadder::hard())?;
                }
                _ => return Err(Error::AlreadyRunning { pid }),
            }
        }
        if let Some(mut console) = self.console.take() {
            if let Err(err) = console.close() {
                log::warn!("closing the previous console: {err}");
            }
        }
        self.agent = None;
        self.leftover_events.clear();
        self.recent_events.clear();
        self.quit_sent = false;
        self.log_text = None;
        self.last_status = None;
        self.report = None;
        self.command = None;
        Ok(std::mem::take(&mut self.once_fds))
    }

    /// Keeps the run of a completed launch, or cleans up after a failed one.
    /// After a failed launch: remove what we created; the temp dir goes, as after any run.
    fn launch_rollback(&mut self) {
        self.remove_temp_dir();
        if let Some(mut console) = self.console.take() {
            let _ = console.close();
        }
    }

    fn launch_ended(&mut self, started: Result<Run>) -> Result<()> {
        match started {
            Ok(run) => {
                log::info!(
                    "launched qemu pid {} ({})",
                    run.child.pid(),
                    self.config.name
                );
                self.run = Some(run);
                if let Some((address, config)) = self.config.share.clone() {
                    if let Err(err) = self.share_qmp(&address, config) {
                        // A launch is all or nothing: no machine that was to be shared runs
                        // unshared.
                        let _ = self.kill();
                        self.remove_temp_dir();
                        return Err(err);
                    }
                }
                Ok(())
            }
            Err(err) => {
                self.launch_rollback();
                Err(err)
            }
        }
    }

    /// Starts QEMU like [`Machine::launch`] but returns right after the spawn: the QMP
    /// handshake is then driven by [`Machine::step`] from the owner's poll (see the crate
    /// docs; [`crate::Fleet`] drives it through `launch_step`), [`MachineState::Launching`]
    /// until it is done. QEMU exiting, the greeting deadline or a failed negotiation make
    /// `step` return [`Error::LaunchFailed`], everything rolled back as after a failed
    /// [`Machine::launch`].
    ///
    /// Only the socketpair monitor (the default) and no monitor are stepped; with a unix or
    /// TCP monitor (QEMU connects to us), this waits for QEMU's connection and handshake
    /// like [`Machine::launch`] before it returns.
    pub fn launch_begin(&mut self) -> Result<()> {
        let once = self.prepare_launch()?;
        let started = self.start(once, None, true);
        self.launching = started.is_ok();
        self.launch_ended(started)
    }

    /// One step of a launch begun with [`Machine::launch_begin`], after reading what arrived
    /// (`Connection::process_io`): `Ok(Some(deadline))` while the handshake runs,
    /// `Ok(None)` once QEMU is ready. When QEMU exits first or the handshake fails, the
    /// launch is rolled back as in [`Machine::launch`] and the error is
    /// [`Error::LaunchFailed`].
    pub(crate) fn launch_step(&mut self) -> Result<Option<Instant>> {
        if !self.launching {
            return Ok(None);
        }
        let Some(run) = self.run.as_mut() else {
            self.launching = false;
            return Err(Error::NotRunning);
        };
        let exited =
            crate::process::poll_readable(run.child.pidfd(), Duration::ZERO).unwrap_or(false);
        let step = match run.qmp.as_mut() {
            // The owner has read what arrived (`process_io`) on readiness.
            Some(conn) => conn.handshake_step(),
            None => Ok(None),
        };
        let cause = match step {
            Ok(None) => {
                self.launching = false;
                return Ok(None);
            }
            Ok(Some(_)) if exited => Error::qmp("handshake", qmp_client::Error::Aborted),
            Ok(Some(deadline)) => return Ok(Some(deadline)),
            Err(source) => Error::qmp("handshake", source),
        };
        self.launching = false;
        let Some(run) = self.run.take() else {
            return Err(cause);
        };
        let err = self.fail_launch(run, cause, None);
        self.launch_ended(Err(err)).map(|()| None)
    }

    /// Reads QEMU's output after [`Machine::launch_begin`], up to a budget; true if input
    /// may be left (call again without waiting for readiness).
    pub(crate) fn pump_output(&mut self) -> bool {
        self.run
            .as_mut()
            .and_then(|run| run.output.as_mut())
            .is_some_and(OutputDrain::pump)
    }

    /// Sends `signal` to QEMU now (no wait), for an owner stopping many machines at once.
    pub(crate) fn send_signal(&mut self, signal: i32) -> io::Result<()> {
        match self.run.as_mut() {
            Some(run) => run.child.signal(signal),
            None => Ok(()),
        }
    }

    fn start(
        &mut self,
        once: Vec<OwnedFd>,
        abort: Option<BorrowedFd<'_>>,
        stepped: bool,
    ) -> Result<Run> {
        let program = self
            .config
            .wrapper
            .first()
            .map(PathBuf::from)
            .unwrap_or_else(|| self.config.binary.clone());
        check_executable(&program)?;

        // Monitor.
        let mut monitor_theirs: Option<OwnedFd> = None;
        let mut monitor_ours: Option<UnixStream> = None;
        let mut listener: Option<Listener> = None;
        let monitor = self.config.monitor.clone();
        match &monitor {
            Monitor::SocketPair => {
                let (ours, theirs) = UnixStream::pair().map_err(Error::os("socketpair"))?;
                monitor_ours = Some(ours);
                monitor_theirs = Some(
                    crate::sys::above_stdio(OwnedFd::from(theirs))
                        .map_err(Error::os("dup of the monitor socket"))?,
                );
            }
            Monitor::Unix(path) => {
                prepare_socket_path(path)?;
                listener =
                    Some(Listener::bind_unix(path).map_err(|source| Error::qmp("listen", source))?);
            }
            Monitor::Tcp(addr) => {
                if !addr.ip().is_loopback() && !self.config.allow_remote_monitor {
                    return Err(Error::RemoteMonitor { addr: *addr });
                }
                listener =
                    Some(Listener::bind_tcp(*addr).map_err(|source| Error::qmp("listen", source))?);
            }
            Monitor::None => {}
        }

        // Console.
        let mut console_pair: Option<(UnixStream, OwnedFd)> = None;
        if self.config.console.is_some() {
            let (ours, theirs) = UnixStream::pair().map_err(Error::os("socketpair"))?;
            let theirs = crate::sys::above_stdio(OwnedFd::from(theirs))
                .map_err(Error::os("dup of the console socket"))?;
            console_pair = Some((ours, theirs));
        }

        // Guest agent channel.
        let agent_pair = match &self.config.agent {
            Some(settings) => {
                let (ours, theirs) = crate::agent::agent_pair()?;
                Some((crate::agent::agent_client(ours, settings)?, theirs))
            }
            None => None,
        };

        // Log file and the output pipe.
        // A log file only where it outlives the run; otherwise the in-memory copy serves
        // log() and log_tail() (the file QEMU's Python `qemu.machine` keeps in its temp dir is deleted at shutdown).
        let log_file = match &self.config.log_dir {
            Some(dir) => {
                let path = dir.join(format!("{}.log", self.config.name));
                Some(File::create(&path).map_err(|source| Error::LogFile { path, source })?)
            }
            None => None,
        };
        let (out_read, out_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::Os {
                what: "pipe",
                source: io::Error::from(e),
            })?;

        // The command line.
        let tcp_addr = listener.as_ref().and_then(Listener::local_addr);
        let mut command = self.command_line_for(
            monitor_theirs.as_ref().map(AsRawFd::as_raw_fd),
            tcp_addr,
            console_pair.as_ref().map(|(_, t)| t.as_raw_fd()),
        );
        if let Some(guest_machine) = self.config.tiny_guest {
            // Written at every launch: the temp dir goes with each exit.
            let dir = self.temp_dir()?.to_path_buf();
            let kernel = crate::guest::write_kernel(&dir).map_err(|source| Error::GuestKernel {
                path: dir.join(crate::guest::KERNEL_FILE_NAME),
                source,
            })?;
            let mut argv = command.argv().to_vec();
            argv.push("-nodefaults".into());
            argv.extend(crate::guest::qemu_args(&kernel, guest_machine));
            command = CommandLine::new(argv);
        }
        if let (Some(settings), Some((_, theirs))) = (&self.config.agent, &agent_pair) {
            let mut argv = command.argv().to_vec();
            argv.extend(crate::agent::agent_args(
                settings.channel,
                theirs.as_raw_fd(),
            ));
            command = CommandLine::new(argv);
        }
        log::debug!("qemu command line: {command}");
        self.command = Some(command.clone());

        let mut keep: Vec<RawFd> = self
            .config
            .passed
            .iter()
            .map(|p| p.fd.as_raw_fd())
            .collect();
        keep.extend(once.iter().map(AsRawFd::as_raw_fd));
        keep.extend(monitor_theirs.as_ref().map(AsRawFd::as_raw_fd));
        keep.extend(console_pair.as_ref().map(|(_, t)| t.as_raw_fd()));
        keep.extend(agent_pair.as_ref().map(|(_, t)| t.as_raw_fd()));

        let started = Instant::now();
        let child = ChildGuard::spawn(SpawnSpec {
            argv: command.argv(),
            stdout: out_write,
            keep,
            parent_death_signal: self.config.parent_death_signal,
            new_session: self.config.new_session,
        })
        .map_err(|source| Error::Spawn {
            command: command.to_string(),
            source,
        })?;
        // The child's ends are QEMU's alone now: with ours closed, QEMU's death is an EOF.
        drop(monitor_theirs);
        drop(once);
        let console_ours = console_pair.map(|(ours, theirs)| {
            drop(theirs);
            ours
        });
        self.agent = agent_pair.map(|(agent, theirs)| {
            drop(theirs);
            agent
        });

        let mut run = Run {
            child,
            poll: Poll::new().map_err(Error::os("epoll_create"))?,
            events: Events::with_capacity(4),
            qmp: None,
            output: None,
            command,
            started,
            shutdown_event: None,
            share: None,
            handed_out: false,
        };
        let result = self.connect(
            &mut run,
            out_read,
            log_file,
            (monitor_ours, listener),
            console_ours,
            if stepped {
                Handshake::Stepped
            } else {
                Handshake::Blocking(abort)
            },
        );
        match result {
            Ok(()) => Ok(run),
            Err(cause) => Err(self.fail_launch(run, cause, abort)),
        }
    }

    /// Everything after the spawn that can fail: supervision, draining, the handshake.
    fn connect(
        &mut self,
        run: &mut Run,
        out_read: OwnedFd,
        log_file: Option<File>,
        // Our socketpair end, or the listener QEMU connects to.
        (monitor_ours, listener): (Option<UnixStream>, Option<Listener>),
        console_ours: Option<UnixStream>,
        handshake: Handshake<'_>,
    ) -> Result<()> {
        let (abort, stepped) = match handshake {
            Handshake::Blocking(abort) => (abort, false),
            Handshake::Stepped => (None, true),
        };
        let pidfd_raw = run.child.pidfd().as_raw_fd();
        run.poll
            .registry()
            .register(&mut SourceFd(&pidfd_raw), PIDFD, Interest::READABLE)
            .map_err(Error::os("epoll_ctl"))?;
        run.output = Some(if stepped {
            OutputDrain::stepped(out_read, log_file, self.config.output_capacity)
                .map_err(Error::os("output pipe"))?
        } else {
            OutputDrain::start(
                out_read,
                log_file,
                self.config.output_capacity,
                &self.config.name,
            )
            .map_err(Error::os("output drain thread"))?
        });
        if let (Some(stream), Some(settings)) = (console_ours, &self.config.console) {
            let console =
                console_socket::Console::from_unix_stream(stream, settings.config.clone())
                    .map_err(|source| Error::Console { source })?;
            self.console = Some(console);
        }
        let qmp_config = &self.config.qmp;
        // The handshake watches one fd: QEMU's pidfd, or, with a caller's abort fd, an epoll
        // fd readable when either is.
        let combined = match abort {
            Some(abort) => Some(
                crate::sys::combine_readable(&[run.child.pidfd(), abort])
                    .map_err(Error::os("epoll_create"))?,
            ),
            None => None,
        };
        let pidfd = match &combined {
            Some(fd) => fd.as_fd(),
            None => run.child.pidfd(),
        };
        let connection = match (monitor_ours, listener) {
            (Some(stream), _) if stepped => Some(
                Connection::adopt_unix_stream(stream, qmp_config)
                    .map_err(|source| Error::qmp("handshake", source))?,
            ),
            (Some(stream), _) => Some(
                Connection::from_unix_stream_with_abort(stream, qmp_config, Some(pidfd))
                    .map_err(|source| Error::qmp("handshake", source))?,
            ),
            (None, Some(listener)) => Some(
                listener
                    .accept(qmp_config.greeting_timeout, Some(pidfd), qmp_config)
                    .map_err(|source| Error::qmp("handshake", source))?,
            ),
            (None, None) => None,
        };
        if let Some(conn) = &connection {
            let raw = conn.as_raw_fd();
            run.poll
                .registry()
                .register(&mut SourceFd(&raw), QMP, Interest::READABLE)
                .map_err(Error::os("epoll_ctl"))?;
        }
        run.qmp = connection;
        Ok(())
    }

    /// Rolls a failed launch back and builds the error.
    fn fail_launch(&mut self, mut run: Run, cause: Error, abort: Option<BorrowedFd<'_>>) -> Error {
        // The caller's abort (not QEMU's exit) ended the handshake: kill at once.
        let aborted = matches!(&cause, Error::Qmp { source, .. }
                if matches!(source.root(), qmp_client::Error::Aborted))
            && abort.is_some_and(|fd| {
                crate::process::poll_readable(fd, Duration::ZERO).unwrap_or(false)
            })
            && !crate::process::poll_readable(run.child.pidfd(), Duration::ZERO).unwrap_or(false);
        let cause = if aborted { Error::LaunchAborted } else { cause };
        let gone = matches!(&cause, Error::Qmp { source, .. } if monitor_gone(source));
        let grace = if gone { EXIT_GRACE } else { Duration::ZERO };
        let mut status = run.child.wait_until(Instant::now() + grace).ok().flatten();
        if status.is_none() {
            status = run.child.kill_and_reap(LAUNCH_REAP_BOUND).ok().flatten();
        }
        // Only our SIGKILL counts as a kill: QEMU may have exited by itself meanwhile.
        let killed = status.and_then(ExitStatus::signal) == Some(libc::SIGKILL)
            && run.child.sent_signals().contains(&libc::SIGKILL);
        run.qmp = None;
        let output = match run.output.take() {
            Some(drain) => {
                let tail = drain.finish(OUTPUT_GRACE);
                String::from_utf8_lossy(&tail.last_bytes(LAUNCH_OUTPUT_LIMIT)).into_owned()
            }
            None => String::new(),
        };
        self.log_text = Some(output.clone());
        self.last_status = status;
        let command = run.command.to_string();
        log::debug!("launch failed: {cause}; qemu {status:?}; output: {output}");
        // Dropping the run drops the child guard: if it is still not reaped it tries again.
        drop(run);
        Error::LaunchFailed {
            status,
            killed,
            command,
            output,
            cause: Box::new(cause),
        }
    }

    fn command_line_for(
        &self,
        monitor_fd: Option<RawFd>,
        tcp_addr: Option<SocketAddr>,
        console_fd: Option<RawFd>,
    ) -> CommandLine {
        let c = &self.config;
        let mut argv: Vec<OsString> = c.wrapper.clone();
        argv.push(c.binary.clone().into_os_string());
        if c.display_args {
            argv.extend(["-display", "none", "-vga", "none"].map(OsString::from));
        }
        let monitor_chardev = match (&c.monitor, monitor_fd, tcp_addr) {
            (Monitor::SocketPair, Some(fd), _) => Some(
                OptString::new("socket")
                    .value("id", "mon")
                    .value("fd", fd.to_string()),
            ),
            (Monitor::Unix(path), _, _) => Some(
                OptString::new("socket")
                    .value("id", "mon")
                    .value("path", path.as_os_str()),
            ),
            (Monitor::Tcp(_), _, Some(addr)) => Some(
                OptString::new("socket")
                    .value("id", "mon")
                    .value("host", addr.ip().to_string())
                    .value("port", addr.port().to_string()),
            ),
            _ => None,
        };
        if let Some(chardev) = monitor_chardev {
            argv.push("-chardev".into());
            argv.push(chardev.into_os_string());
            // `-qmp chardev:NAME` rather than `-mon chardev=NAME,mode=control`: QEMU 11.1
            // deprecates `-mon` (a warning on every start); `-qmp` works on 7.2 to 11.1.
            argv.push("-qmp".into());
            argv.push("chardev:mon".into());
        }
        if let Some(machine) = &c.machine_type {
            argv.push("-machine".into());
            argv.push(machine.into());
        }
        if let (Some(console), Some(fd)) = (&c.console, console_fd) {
            for _ in 0..console.index {
                argv.push("-serial".into());
                argv.push("null".into());
            }
            argv.push("-chardev".into());
            argv.push(
                OptString::new("socket")
                    .value("id", "console")
                    .value("fd", fd.to_string())
                    .into_os_string(),
            );
            match &console.device_type {
                None => {
                    argv.push("-serial".into());
                    argv.push("chardev:console".into());
                }
                Some(device) => {
                    argv.push("-device".into());
                    argv.push(
                        OptString::new(device)
                            .raw("chardev=console")
                            .into_os_string(),
                    );
                }
            }
        }
        for add in &c.add_fds {
            let mut opts =
                OptString::new(&format!("fd={}", add.fd)).value("set", add.fdset.to_string());
            if let Some(opaque) = &add.opaque {
                opts = opts.value("opaque", opaque);
            }
            argv.push("-add-fd".into());
            argv.push(opts.raw(&add.opts).into_os_string());
        }
        argv.extend(c.args.iter().cloned());
        CommandLine::new(argv)
    }

    // ----- QMP -----

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

    // ----- ending -----

    /// Ends QEMU with the configured ladder (default: `quit`, wait 30 s, SIGKILL), cleans up
    /// and returns the exit report.
    ///
    /// If a graceful step fails and QEMU had to be killed, the result is
    /// [`Error::AbnormalShutdown`] with the cause and the report, after the same cleanup.
    /// Called after the exit, it just returns the last report.
    pub fn shutdown(&mut self) -> Result<ExitReport> {
        let ladder = self.config.ladder.clone();
        self.shutdown_with(&ladder)
    }

    /// Ends QEMU with `ladder` (see [`ShutdownLadder`]).
    pub fn shutdown_with(&mut self, ladder: &ShutdownLadder) -> Result<ExitReport> {
        if self.run.is_none() {
            return self.report.clone().ok_or(Error::NotRunning);
        }
        self.end_run(ladder)
    }

    /// SIGKILL, reap, clean up (`kill()` / `shutdown(hard=True)` in QEMU's Python `qemu.machine`).
    pub fn kill(&mut self) -> Result<ExitReport> {
        self.shutdown_with(&ShutdownLadder::hard())
    }

    /// Waits up to `timeout` for QEMU to exit by itself (a guest power-off), then cleans up;
    /// past the timeout it kills QEMU and returns [`Error::AbnormalShutdown`] (as
    /// `wait()` in QEMU's Python `qemu.machine`).
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitReport> {
        self.shutdown_with(&ShutdownLadder::wait(timeout))
    }

    /// The blocking shutdown: a loop over the stepped ladder ([`stepping`]), waiting on
    /// the run's own poll (QEMU's pidfd and the monitor) between steps.
    fn end_run(&mut self, ladder: &ShutdownLadder) -> Result<ExitReport> {
        // A blocking call takes over from a stepped launch or ladder with its own ladder.
        self.launching = false;
        self.launch_deadline = None;
        self.stopping = None;
        self.stop_begin(ladder)?;
        while let Some(deadline) = self.stop_advance() {
            self.wait_run(deadline);
        }
        self.stop_finish()
    }

    /// What follows the walk: the report, or the error when QEMU survived or had to be forced.
    fn end_walk(
        &mut self,
        ladder: &ShutdownLadder,
        ladder_run: ladder::LadderRun,
    ) -> Result<ExitReport> {
        let Some(run) = self.run.take() else {
            return Err(Error::NotRunning);
        };
        if !ladder_run.exited {
            let waited = ladder.steps().last().map(Step::timeout).unwrap_or_default();
            let pid = run.child.pid();
            log::error!("qemu pid {pid} survived SIGKILL for {waited:?}");
            // Keep it: a later call (or Drop) tries again.
            self.run = Some(run);
            return Err(Error::ReapTimeout { pid, waited });
        }
        let ended_during = ladder_run
            .ended_at
            .and_then(|i| ladder_run.records.get(i))
            .map(|r| r.step);
        let report = self.finish(run, ladder_run.records, ended_during);
        // Abnormal: we had to force it although the ladder had gentler steps first.
        let forced_fallback = matches!(ended_during, Some(Step::Kill { .. }))
            && report.ended_by == EndedBy::Kill
            && ladder.steps().len() > 1;
        if forced_fallback {
            let cause = report
                .steps
                .iter()
                .rev()
                .find(|r| !r.step.is_forced())
                .map(|r| match &r.outcome {
                    ladder::StepOutcome::TimedOut => Error::ExitTimeout { waited: r.elapsed },
                    other => Error::StepFailed {
                        step: r.step.to_string(),
                        detail: format!("{other:?}"),
                    },
                })
                .unwrap_or(Error::ExitTimeout {
                    waited: Duration::ZERO,
                });
            return Err(Error::AbnormalShutdown {
                report: Box::new(report),
                cause: Box::new(cause),
            });
        }
        Ok(report)
    }

    /// Cleans up after QEMU has been reaped and builds the report.
    fn finish(
        &mut self,
        mut run: Run,
        steps: Vec<ladder::StepRecord>,
        ended_during: Option<Step>,
    ) -> ExitReport {
        let status = run.child.status().unwrap_or(ExitStatus::Code(-1));
        // The shared monitor's clients are closed first; a client's forwarded quit is kept
        // for the report.
        let client_quit = run.share.take().and_then(|mut share| {
            share.stop();
            share.quit_by().map(|client| client.to_string())
        });
        // Events QEMU sent before it died (SHUTDOWN comes before quit's reply) are still in
        // the socket; keep them for events() and the report.
        if let Some(mut qmp) = run.qmp.take() {
            if !qmp.is_shared() {
                let raw = qmp.as_raw_fd();
                let _ = run.poll.registry().deregister(&mut SourceFd(&raw));
            }
            // A `quit` sent straight on the connection (qmp_connection, a shared handle) is
            // as much our request as one through `cmd`.
            self.quit_sent |= qmp.session().quit_sent();
            let leftovers = qmp.drain_events();
            for event in &leftovers {
                self.note_event(event);
                if let Some(shutdown) = ShutdownEvent::from_event(event) {
                    run.shutdown_event = Some(shutdown);
                }
            }
            self.leftover_events.extend(leftovers);
        }
        let tail = run.output.take().map(|drain| drain.finish(OUTPUT_GRACE));
        let log_text = tail.as_ref().map(|t| t.text()).unwrap_or_default();
        if let Some(tail) = tail.as_ref().filter(|t| t.dropped() > 0) {
            log::debug!(
                "qemu wrote {} bytes; the first {} are not kept in memory",
                tail.total(),
                tail.dropped()
            );
        }
        let console_tail = match self.console.as_mut() {
            Some(console) => {
                if let Err(err) = console.close() {
                    log::warn!("closing the console: {err}");
                }
                let bytes = console.tail(64 * 1024);
                last_lines(&String::from_utf8_lossy(&bytes), REPORT_LINES)
            }
            None => Vec::new(),
        };
        self.remove_temp_dir();
        let command = run.command.to_string();
        let sent = run.child.sent_signals().to_vec();
        if let Some(signal) = status.signal() {
            if !sent.contains(&signal) {
                log::warn!("qemu received signal {signal}; command: \"{command}\"");
            }
        }
        let ended_by = classify(&Facts {
            status,
            ended_during,
            quit_sent: self.quit_sent,
            sent_signals: &sent,
            shutdown_event: run.shutdown_event.as_ref(),
            debug_exit_device: run.command.has_device("isa-debug-exit"),
            client_quit: client_quit.as_deref(),
        });
        if matches!(ended_by, EndedBy::Crash { .. }) {
            log::warn!("qemu crashed: {status}");
        }
        let report = ExitReport {
            ended_by,
            status,
            pid: run.child.pid(),
            shutdown_event: run.shutdown_event.clone(),
            steps,
            output_tail: last_lines(&log_text, REPORT_LINES),
            console_tail,
            last_events: self.recent_events.iter().cloned().collect(),
            command,
            uptime: run.started.elapsed(),
        };
        log::info!(
            "qemu {} ended by {}: {status}",
            self.config.name,
            report.ended_by
        );
        self.log_text = Some(log_text);
        self.last_status = Some(status);
        self.report = Some(report.clone());
        report
    }

    fn remove_temp_dir(&mut self) {
        if let Some(dir) = self.temp_dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(err) = dir.close() {
                // Removed underneath us counts as removed.
                if err.kind() != io::ErrorKind::NotFound {
                    log::warn!("cannot remove temp dir {}: {err}", path.display());
                }
            }
        }
    }
}

mod stepping;

pub use stepping::{MachineState, Tokens};

impl Drop for Machine {
    fn drop(&mut self) {
        if self.run.is_some() {
            match self.end_run(&ShutdownLadder::hard()) {
                Ok(report) => log::debug!("machine dropped while running: {}", report.ended_by),
                Err(err) => log::warn!("machine dropped while running: {err}"),
            }
        }
        self.remove_temp_dir();
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

/// Whether a handshake error means the monitor's peer went away (QEMU is exiting), as
/// opposed to QEMU being alive but silent or garbled.
fn monitor_gone(err: &qmp_client::Error) -> bool {
    match err.root() {
        qmp_client::Error::Aborted
        | qmp_client::Error::Eof { .. }
        | qmp_client::Error::Io { .. }
        | qmp_client::Error::Closed => true,
        qmp_client::Error::Negotiation { cause } => monitor_gone(cause),
        _ => false,
    }
}

/// Fails early, with a clear error, when `program` cannot be executed.
fn check_executable(program: &Path) -> Result<()> {
    crate::process::resolve_program(program)
        .map(drop)
        .map_err(|source| Error::BinaryNotFound {
            path: program.to_owned(),
            source,
        })
}

/// Checks a unix socket path before anything (we, or QEMU with `server=on`) binds it: the
/// length limit ([`UNIX_PATH_MAX`], [`Error::SocketPathTooLong`]), and no existing file. A
/// stale socket nobody listens on is removed; anything else (a regular file, a symlink, a
/// live socket) is [`Error::SocketPathInUse`], never replaced.
///
/// QEMU itself unlinks whatever is at a `-qmp unix:PATH,server=on` path before binding it, so
/// call this on such paths before launching QEMU.
pub fn prepare_socket_path(path: &Path) -> Result<()> {
    // One check for every socket we or QEMU bind: qmp-client's (the shared monitor uses it).
    qmp_client::clear_stale_socket(path).map_err(|err| match err {
        qmp_client::Error::PathTooLong { path, len, limit } => {
            Error::SocketPathTooLong { path, len, limit }
        }
        qmp_client::Error::NotASocket { path } | qmp_client::Error::SocketInUse { path } => {
            Error::SocketPathInUse { path }
        }
        qmp_client::Error::Bind { source, .. } => Error::OpenFile {
            path: path.to_owned(),
            source,
        },
        other => Error::OpenFile {
            path: path.to_owned(),
            source: io::Error::other(other.to_string()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MachineBuilder;
    use serde_json::json;

    fn strings(cl: &CommandLine) -> Vec<String> {
        cl.argv()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn argv_layout_is_wrapper_binary_base_then_user() {
        let mut b = MachineBuilder::new("/usr/bin/qemu");
        b.wrapper(["strace", "-f"])
            .machine_type("none")
            .set_console(Some("isa-serial"), 2)
            .args(["-S", "-accel", "tcg"]);
        let m = b.build();
        let cl = m.command_line_for(Some(7), None, Some(9));
        assert_eq!(
            strings(&cl),
            vec![
                "strace",
                "-f",
                "/usr/bin/qemu",
                "-display",
                "none",
                "-vga",
                "none",
                "-chardev",
                "socket,id=mon,fd=7",
                "-qmp",
                "chardev:mon",
                "-machine",
                "none",
                "-serial",
                "null",
                "-serial",
                "null",
                "-chardev",
                "socket,id=console,fd=9",
                "-device",
                "isa-serial,chardev=console",
                "-S",
                "-accel",
                "tcg",
            ]
        );
    }

    #[test]
    fn display_args_can_be_turned_off_and_no_qmp_has_no_monitor() {
        let mut b = MachineBuilder::new("qemu");
        b.display_args(false).monitor(Monitor::None).console();
        let m = b.build();
        let cl = m.command_line_for(None, None, Some(4));
        assert_eq!(
            strings(&cl),
            vec![
                "qemu",
                "-chardev",
                "socket,id=console,fd=4",
                "-serial",
                "chardev:console"
            ]
        );
    }

    #[test]
    fn unix_monitor_path_with_commas_cannot_inject_options() {
        let mut b = MachineBuilder::new("qemu");
        b.monitor(Monitor::Unix("/tmp/a,server=on,wait=off".into()));
        let m = b.build();
        let cl = m.command_line_for(None, None, None);
        let args = strings(&cl);
        let chardev = &args[6];
        assert_eq!(chardev, "socket,id=mon,path=/tmp/a,,server=on,,wait=off");
        let parts = crate::argv::split_options(chardev);
        assert_eq!(
            parts,
            vec!["socket", "id=mon", "path=/tmp/a,server=on,wait=off"]
        );
    }

    #[test]
    fn tcp_monitor_uses_host_and_port() {
        let mut b = MachineBuilder::new("qemu");
        b.monitor(Monitor::Tcp("127.0.0.1:0".parse().expect("addr")));
        let m = b.build();
        let cl = m.command_line_for(None, Some("127.0.0.1:4444".parse().expect("addr")), None);
        assert_eq!(strings(&cl)[6], "socket,id=mon,host=127.0.0.1,port=4444");
    }

    #[test]
    fn add_fd_builds_an_escaped_add_fd_option() {
        let file = tempfile::tempfile().expect("tempfile");
        let mut b = MachineBuilder::new("qemu");
        let n = b.add_fd(&file, 3, Some("x,y=z"), "").expect("add_fd");
        let m = b.build();
        let cl = m.command_line_for(Some(5), None, None);
        let args = strings(&cl);
        let pos = args.iter().position(|a| a == "-add-fd").expect("-add-fd");
        assert_eq!(args[pos + 1], format!("fd={n},set=3,opaque=x,,y=z"));
        assert_ne!(n, file.as_raw_fd(), "a duplicate is passed");
    }

    #[test]
    fn args_convert_keys_unless_exact() {
        let converted = Args::from(json!({"node_name": "a", "nested": {"x_y": 1}}))
            .into_map("c")
            .expect("map")
            .expect("some");
        assert!(converted.contains_key("node-name"));
        assert_eq!(
            converted["nested"],
            json!({"x_y": 1}),
            "only top-level keys"
        );
        let exact = Args::exact(json!({"bps_rd": 1}))
            .into_map("c")
            .expect("map")
            .expect("some");
        assert!(exact.contains_key("bps_rd"));
        assert_eq!(Args::from(()).into_map("c").expect("none"), None);
        assert_eq!(Args::from(Value::Null).into_map("c").expect("none"), None);
        let err = Args::from(json!([1])).into_map("c").expect_err("array");
        assert!(matches!(err, Error::ArgumentsNotObject { .. }));
    }

    #[test]
    fn socket_path_checks() {
        let dir = tempfile::tempdir().expect("dir");
        let long = dir.path().join("x".repeat(UNIX_PATH_MAX));
        let err = prepare_socket_path(&long).expect_err("too long");
        assert!(
            matches!(
                err,
                Error::SocketPathTooLong {
                    limit: UNIX_PATH_MAX,
                    ..
                }
            ),
            "{err:?}"
        );
        let file = dir.path().join("regular");
        std::fs::write(&file, b"user data").expect("write");
        let err = prepare_socket_path(&file).expect_err("exists");
        assert!(matches!(err, Error::SocketPathInUse { .. }));
        assert_eq!(std::fs::read(&file).expect("still there"), b"user data");
        // A stale socket (bound, then its listener closed) is replaced.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
        prepare_socket_path(&stale).expect("stale socket removed");
        assert!(!stale.exists());
        // A live one is refused.
        let live = dir.path().join("live.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&live).expect("bind");
        assert!(matches!(
            prepare_socket_path(&live),
            Err(Error::SocketPathInUse { .. })
        ));
    }

    #[test]
    fn missing_binary_fails_before_anything_is_created() {
        let base = tempfile::tempdir().expect("dir");
        let mut m = MachineBuilder::new("/nonexistent/qemu-system-x86_64")
            .base_temp_dir(base.path())
            .build();
        let err = m.launch().expect_err("missing");
        assert!(matches!(err, Error::BinaryNotFound { .. }), "{err:?}");
        assert_eq!(std::fs::read_dir(base.path()).expect("ls").count(), 0);
        let err = MachineBuilder::new("no-such-qemu-binary-anywhere")
            .base_temp_dir(base.path())
            .build()
            .launch()
            .expect_err("missing on PATH");
        assert!(matches!(err, Error::BinaryNotFound { .. }), "{err:?}");
    }

    #[test]
    fn remote_tcp_monitor_is_refused_by_default() {
        let base = tempfile::tempdir().expect("dir");
        let mut m = MachineBuilder::new("/bin/true")
            .base_temp_dir(base.path())
            .monitor(Monitor::Tcp("0.0.0.0:0".parse().expect("addr")))
            .build();
        let err = m.launch().expect_err("refused");
        assert!(matches!(err, Error::RemoteMonitor { .. }), "{err:?}");
        assert_eq!(std::fs::read_dir(base.path()).expect("ls").count(), 0);
    }

    #[test]
    fn temp_dir_is_private() {
        let base = tempfile::tempdir().expect("dir");
        let mut m = MachineBuilder::new("qemu")
            .base_temp_dir(base.path())
            .build();
        let dir = m.temp_dir().expect("temp dir").to_path_buf();
        let mode = std::fs::metadata(&dir).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        drop(m);
        assert!(!dir.exists(), "removed on drop");
    }
}
