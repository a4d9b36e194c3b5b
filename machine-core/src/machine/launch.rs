//! Launching QEMU: the command line, the spawn with its fd allow-list, the QMP handshake
//! (one state machine: stepped from an owner's poll, or looped over by the blocking
//! [`Machine::launch`]) and the rollback of a failed launch, so a reader finds everything that
//! happens before QEMU is "running" in one place.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll};
use qmp_client::{Connection, Listener};

use crate::argv::{CommandLine, OptString};
use crate::config::Monitor;
use crate::error::{Error, Result};
use crate::ladder::ShutdownLadder;
use crate::output::OutputDrain;
use crate::process::{ChildGuard, ExitStatus, SpawnSpec};

use super::{Machine, Run, ABORT, LAUNCH_OUTPUT_LIMIT, OUTPUT_GRACE, PIDFD, QMP};

/// How long a launch waits for QEMU's own exit once the monitor hit end-of-file, before it
/// kills QEMU (the exit usually follows the socket close within microseconds).
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// How long a failed launch may take to reap a killed QEMU.
const LAUNCH_REAP_BOUND: Duration = Duration::from_secs(10);

/// Who reads QEMU's stdout/stderr pipe after the spawn.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// A thread of its own (the blocking [`Machine::launch`]: nothing steps the machine).
    Thread,
    /// [`Machine::step`], on the owner's poll ([`Machine::launch_begin`]).
    Stepped,
}

impl Machine {
    /// Starts QEMU and completes the QMP handshake (with the configured greeting deadline).
    ///
    /// If QEMU exits first, the launch fails at once (the pidfd ends the wait) with
    /// [`Error::LaunchFailed`] carrying the exit status, the command line and QEMU's output.
    /// On any failure everything is rolled back: no process, fd, temp dir or socket file
    /// is left.
    ///
    /// This is [`Machine::launch_begin`] followed by a loop over the same launch steps
    /// [`Machine::step`] takes, waiting on the machine's own poll (QEMU's pidfd and the
    /// monitor) between them; QEMU's output is drained by a thread, as nothing steps a
    /// machine launched this way.
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
        self.spawn_for_launch(Drain::Thread)?;
        if let Some(abort) = abort {
            let registered = self.run.as_ref().map(|run| {
                run.poll.registry().register(
                    &mut SourceFd(&abort.as_raw_fd()),
                    ABORT,
                    Interest::READABLE,
                )
            });
            if let Some(Err(err)) = registered {
                return Err(self.launch_failed(Error::os("epoll_ctl")(err)));
            }
        }
        let launched = loop {
            if let Err(err) = self.launch_advance() {
                break Err(err);
            }
            if !self.launching {
                break Ok(());
            }
            let deadline = self.launch_deadline.unwrap_or_else(Instant::now);
            if self.wait_run(deadline) && !self.exited_now() {
                // The caller's abort, not QEMU's exit, ended the wait: kill at once.
                break Err(self.launch_failed(Error::LaunchAborted));
            }
        };
        if let (Some(abort), Some(run)) = (abort, self.run.as_ref()) {
            // The caller's fd must not stay in a poll that lives as long as QEMU.
            if let Err(err) = run
                .poll
                .registry()
                .deregister(&mut SourceFd(&abort.as_raw_fd()))
            {
                log::debug!("deregistering the launch's abort fd: {err}");
            }
        }
        launched
    }

    /// Starts QEMU like [`Machine::launch`] but returns right after the spawn: the QMP
    /// handshake (and, with a unix or TCP monitor, the wait for QEMU to connect to us) is
    /// then driven by [`Machine::step`] from the owner's poll (see the crate docs;
    /// [`crate::Fleet`] drives many this way), [`MachineState::Launching`](super::MachineState::Launching)
    /// until it is done. QEMU exiting, the greeting deadline or a failed negotiation make
    /// `step` return [`Error::LaunchFailed`], everything rolled back as after a failed
    /// [`Machine::launch`]. QEMU's output is read by `step` too, not by a thread.
    pub fn launch_begin(&mut self) -> Result<()> {
        self.spawn_for_launch(Drain::Stepped)
    }

    /// The first half of every launch: reset, spawn, and the run in state "launching".
    fn spawn_for_launch(&mut self, drain: Drain) -> Result<()> {
        let once = self.prepare_launch()?;
        match self.start(once, drain) {
            Ok(run) => {
                log::info!(
                    "launched qemu pid {} ({})",
                    run.child.pid(),
                    self.config.name
                );
                self.run = Some(run);
                self.launching = true;
                self.launch_deadline = None;
                Ok(())
            }
            Err(err) => {
                self.launch_rollback();
                Err(err)
            }
        }
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

    /// After a failed launch: remove what we created; the temp dir goes, as after any run.
    fn launch_rollback(&mut self) {
        self.launching = false;
        self.launch_deadline = None;
        self.release_console_drainer(false);
        self.remove_temp_dir();
        if let Some(mut console) = self.console.take() {
            let _ = console.close();
        }
    }

    /// Ends a launch in progress with `cause`: QEMU killed (or reaped), everything rolled
    /// back, and the error to return ([`Error::LaunchFailed`]).
    fn launch_failed(&mut self, cause: Error) -> Error {
        let err = match self.run.take() {
            Some(run) => self.fail_launch(run, cause),
            None => cause,
        };
        self.launch_rollback();
        err
    }

    /// Ends a launch begun with [`Machine::launch_begin`] that is still in progress, as the
    /// abort fd of [`Machine::launch_with_abort`] does: QEMU killed, everything rolled back;
    /// returns the launch's error ([`Error::LaunchFailed`] with the cause
    /// [`Error::LaunchAborted`]), or [`Error::NotRunning`] when no launch is in progress.
    pub(crate) fn abort_launch(&mut self) -> Error {
        if !self.launching {
            return Error::NotRunning;
        }
        self.launch_failed(Error::LaunchAborted)
    }

    /// Whether QEMU has exited (its pidfd is readable), without waiting.
    fn exited_now(&self) -> bool {
        self.run.as_ref().is_some_and(|run| {
            crate::process::poll_readable(run.child.pidfd(), Duration::ZERO).unwrap_or(false)
        })
    }

    /// One step of a launch (read what arrived, accept QEMU's connection, advance the
    /// handshake), the same for the blocking [`Machine::launch`] and for [`Machine::step`]:
    /// `self.launching` turns false once QEMU is ready; `self.launch_deadline` says when to
    /// step again at the latest. When QEMU exits first or the handshake fails, the launch is
    /// rolled back and the error is [`Error::LaunchFailed`].
    pub(super) fn launch_advance(&mut self) -> Result<()> {
        if !self.launching {
            return Ok(());
        }
        let exited = self.exited_now();
        let step = match self.run.as_mut() {
            Some(run) => run.handshake_step(&self.config.qmp),
            None => {
                self.launching = false;
                return Err(Error::NotRunning);
            }
        };
        let cause = match step {
            Ok(None) => {
                self.launching = false;
                self.launch_deadline = None;
                return self.launch_ready();
            }
            Ok(Some(_)) if exited => Error::qmp("handshake", qmp_client::Error::Aborted),
            Ok(Some(deadline)) => {
                self.launch_deadline = Some(deadline);
                return Ok(());
            }
            Err(cause) => cause,
        };
        Err(self.launch_failed(cause))
    }

    /// QEMU is ready: what a launch does last (sharing the monitor when configured).
    fn launch_ready(&mut self) -> Result<()> {
        if let Some(run) = &self.run {
            log::info!("qemu pid {} ready ({})", run.child.pid(), self.config.name);
        }
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

    fn start(&mut self, once: Vec<OwnedFd>, drain: Drain) -> Result<Run> {
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
        let (out_read, out_write) = crate::sys::pipe_cloexec().map_err(Error::os("pipe"))?;

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
            listener: None,
            owner: None,
            output: None,
            command,
            started,
            shutdown_event: None,
            share: None,
            handed_out: false,
        };
        let result = self.attach(
            &mut run,
            out_read,
            log_file,
            (monitor_ours, listener),
            console_ours,
            drain,
        );
        match result {
            Ok(()) => Ok(run),
            Err(cause) => Err(self.fail_launch(run, cause)),
        }
    }

    /// Everything after the spawn that can fail: exit supervision, draining, the console and
    /// the monitor, whose handshake [`Machine::launch_advance`] then steps.
    fn attach(
        &mut self,
        run: &mut Run,
        out_read: OwnedFd,
        log_file: Option<File>,
        // Our socketpair end, or the listener QEMU connects to.
        (monitor_ours, listener): (Option<UnixStream>, Option<Listener>),
        console_ours: Option<UnixStream>,
        drain: Drain,
    ) -> Result<()> {
        let pidfd_raw = run.child.pidfd().as_raw_fd();
        run.poll
            .registry()
            .register(&mut SourceFd(&pidfd_raw), PIDFD, Interest::READABLE)
            .map_err(Error::os("epoll_ctl"))?;
        run.output = Some(match drain {
            Drain::Stepped => OutputDrain::stepped(out_read, log_file, self.config.output_capacity)
                .map_err(Error::os("output pipe"))?,
            Drain::Thread => OutputDrain::start(
                out_read,
                log_file,
                self.config.output_capacity,
                &self.config.name,
            )
            .map_err(Error::os("output drain thread"))?,
        });
        if let (Some(stream), Some(settings)) = (console_ours, &self.config.console) {
            let console =
                console_socket::Console::from_unix_stream(stream, settings.config.clone())
                    .map_err(|source| Error::Console { source })?;
            self.console = Some(console);
        }
        if let Some(stream) = monitor_ours {
            let conn = Connection::adopt_unix_stream(stream, &self.config.qmp)
                .map_err(|source| Error::qmp("handshake", source))?;
            run.attach_qmp(conn)?;
        }
        if let Some(listener) = listener {
            let raw = listener.as_fd().as_raw_fd();
            run.poll
                .registry()
                .register(&mut SourceFd(&raw), QMP, Interest::READABLE)
                .map_err(Error::os("epoll_ctl"))?;
            // QEMU has the greeting timeout to connect, then again to greet.
            run.listener = Some((listener, run.started + self.config.qmp.greeting_timeout));
        }
        Ok(())
    }

    /// Rolls a failed launch back and builds the error.
    fn fail_launch(&mut self, mut run: Run, cause: Error) -> Error {
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

    pub(super) fn command_line_for(
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
}

impl Run {
    /// Puts the monitor connection in place: on the run's own poll, and on the owner's when
    /// it registered the machine while QEMU had not connected yet.
    fn attach_qmp(&mut self, conn: Connection) -> Result<()> {
        let raw = conn.as_raw_fd();
        self.poll
            .registry()
            .register(&mut SourceFd(&raw), QMP, Interest::READABLE)
            .map_err(Error::os("epoll_ctl"))?;
        if let Some((registry, token)) = self.owner.take() {
            conn.register(&registry, token)
                .map_err(|source| Error::qmp("register", source))?;
        }
        self.qmp = Some(conn);
        Ok(())
    }

    /// Accepts QEMU's connection when a listener waits for it, then reads what arrived and
    /// checks the handshake: `Ok(None)` once QMP is ready (or there is no monitor),
    /// `Ok(Some(deadline))` while it runs.
    fn handshake_step(&mut self, config: &qmp_client::Config) -> Result<Option<Instant>> {
        if let Some((listener, deadline)) = &self.listener {
            let accepted = listener
                .accept_step(*deadline, config.greeting_timeout, config)
                .map_err(|source| Error::qmp("handshake", source))?;
            let Some(conn) = accepted else {
                return Ok(Some(*deadline));
            };
            let raw = listener.as_fd().as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
            if let Some((registry, _)) = &self.owner {
                let _ = registry.deregister(&mut SourceFd(&raw));
            }
            // Dropping the listener removes its socket file: later peers are refused.
            self.listener = None;
            self.attach_qmp(conn)?;
        }
        match self.qmp.as_mut() {
            Some(conn) => {
                // A failure found here is what the handshake step reports.
                let _ = conn.process_io();
                conn.handshake_step()
                    .map_err(|source| Error::qmp("handshake", source))
            }
            None => Ok(None),
        }
    }
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
/// length limit ([`UNIX_PATH_MAX`](super::UNIX_PATH_MAX), [`Error::SocketPathTooLong`]), and no existing file. A
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
