//! What a machine is made of before it runs: the builder and the configuration it produces.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::agent::{AgentChannel, AgentSettings};
use crate::error::{Error, Result};
use crate::ladder::ShutdownLadder;
use crate::machine::Machine;

/// Where the QMP monitor lives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Monitor {
    /// A socketpair: QEMU gets its end as `-chardev socket,id=mon,fd=N`. No path, no port,
    /// no race. The default.
    #[default]
    SocketPair,
    /// A unix socket at this path: we listen, QEMU connects (`path=` on its chardev). The
    /// path must be at most 107 bytes and must not exist (a stale socket nobody listens on
    /// is replaced; anything else is refused). It is removed after the exit.
    Unix(PathBuf),
    /// A TCP address: we listen (port 0 picks a free port), QEMU connects. Loopback only
    /// unless [`MachineBuilder::allow_remote_monitor`].
    Tcp(SocketAddr),
    /// No QMP monitor at all (`set_qmp_monitor(False)` in QEMU's Python `qemu.machine`): shutdown uses SIGTERM.
    None,
}

/// The serial console the machine exposes through [`console_socket::Console`].
#[derive(Debug, Clone, Default)]
pub struct ConsoleSettings {
    /// `-device TYPE,chardev=console` (e.g. `isa-serial`); None: `-serial chardev:console`.
    pub device_type: Option<String>,
    /// Number of `-serial null` before the console (`console_index` in QEMU's Python `qemu.machine`).
    pub index: u32,
    /// Draining and logging settings (log file, buffer capacity, line ending...).
    pub config: console_socket::Config,
}

/// An fd handed to QEMU, kept open by us for every launch.
#[derive(Debug)]
pub(crate) struct PassedFd {
    pub(crate) fd: OwnedFd,
}

/// One `-add-fd` on the command line.
#[derive(Debug)]
pub(crate) struct AddFd {
    pub(crate) fd: RawFd,
    pub(crate) fdset: u64,
    pub(crate) opaque: Option<String>,
    pub(crate) opts: String,
}

/// Default size of the in-memory copy of QEMU's stdout/stderr.
pub const DEFAULT_OUTPUT_CAPACITY: usize = 1024 * 1024;

/// The complete configuration of a machine (what the builder builds).
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) binary: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) wrapper: Vec<OsString>,
    pub(crate) name: String,
    pub(crate) base_temp_dir: PathBuf,
    pub(crate) log_dir: Option<PathBuf>,
    pub(crate) monitor: Monitor,
    pub(crate) allow_remote_monitor: bool,
    pub(crate) qmp: qmp_client::Config,
    pub(crate) console: Option<ConsoleSettings>,
    pub(crate) display_args: bool,
    pub(crate) machine_type: Option<String>,
    pub(crate) passed: Vec<PassedFd>,
    pub(crate) add_fds: Vec<AddFd>,
    pub(crate) ladder: ShutdownLadder,
    pub(crate) parent_death_signal: bool,
    pub(crate) new_session: bool,
    pub(crate) output_capacity: usize,
    pub(crate) agent: Option<AgentSettings>,
    /// Boot the built-in tiny guest on this machine type ([`MachineBuilder::tiny_guest`]).
    pub(crate) tiny_guest: Option<crate::guest::GuestMachine>,
    /// Share the QMP monitor right after launch ([`MachineBuilder::share_qmp`]).
    pub(crate) share: Option<(qmp_client::ShareAddress, qmp_client::MuxConfig)>,
}

static MACHINE_COUNTER: AtomicU64 = AtomicU64::new(0);

fn default_name() -> String {
    format!(
        "qemu-{}-{}",
        std::process::id(),
        MACHINE_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Configures a [`Machine`]. Every setting has the default of QEMU's Python `qemu.machine`.
///
/// ```no_run
/// use machine_core::{MachineBuilder, Monitor};
/// use std::time::Duration;
///
/// let mut machine = MachineBuilder::new("qemu-system-x86_64")
///     .machine_type("none")
///     .args(["-accel", "tcg"])
///     .monitor(Monitor::SocketPair)
///     .greeting_timeout(Duration::from_secs(10))
///     .build();
/// machine.launch()?;
/// # Ok::<(), machine_core::Error>(())
/// ```
#[derive(Debug)]
pub struct MachineBuilder {
    config: Config,
}

impl MachineBuilder {
    /// Starts a configuration for `binary` (a path, or a name looked up on `PATH`).
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        MachineBuilder {
            config: Config {
                binary: binary.into(),
                args: Vec::new(),
                wrapper: Vec::new(),
                name: default_name(),
                base_temp_dir: std::env::temp_dir(),
                log_dir: None,
                monitor: Monitor::SocketPair,
                allow_remote_monitor: false,
                // Like the legacy client of QEMU's Python `qemu.machine`: no `oob` unless
                // asked. QEMU reads the monitor one byte per system call, so the shorter
                // negotiation saves ~0.25 ms a launch.
                qmp: qmp_client::Config::default().with_oob(qmp_client::OobPolicy::Off),
                console: None,
                display_args: true,
                machine_type: None,
                passed: Vec::new(),
                add_fds: Vec::new(),
                ladder: ShutdownLadder::default(),
                parent_death_signal: true,
                new_session: false,
                tiny_guest: None,
                output_capacity: DEFAULT_OUTPUT_CAPACITY,
                agent: None,
                share: None,
            },
        }
    }

    /// Appends one user argument (after the generated base arguments).
    pub fn arg(&mut self, arg: impl Into<OsString>) -> &mut Self {
        self.config.args.push(arg.into());
        self
    }

    /// Appends user arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.config.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An argv prefix such as `["gdb", "--args"]` or `["valgrind"]`.
    pub fn wrapper<I, S>(&mut self, wrapper: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.config.wrapper = wrapper.into_iter().map(Into::into).collect();
        self
    }

    /// The machine's name: the log file is `{name}.log`. Default `qemu-{pid}-{n}`.
    pub fn name(&mut self, name: impl Into<String>) -> &mut Self {
        self.config.name = name.into();
        self
    }

    /// Where the private 0700 temp dir is created (on first use of [`Machine::temp_dir`]).
    /// Default: `std::env::temp_dir()`.
    pub fn base_temp_dir(&mut self, dir: impl Into<PathBuf>) -> &mut Self {
        self.config.base_temp_dir = dir.into();
        self
    }

    /// Where `{name}.log` (QEMU's stdout and stderr) is written and kept. Default: none; the
    /// output is kept in memory only (see [`Machine::log`], [`Machine::log_tail`]).
    pub fn log_dir(&mut self, dir: impl Into<PathBuf>) -> &mut Self {
        self.config.log_dir = Some(dir.into());
        self
    }

    /// The QMP monitor's transport. Default [`Monitor::SocketPair`].
    pub fn monitor(&mut self, monitor: Monitor) -> &mut Self {
        self.config.monitor = monitor;
        self
    }

    /// Accept a [`Monitor::Tcp`] on a non-loopback address (QMP has no authentication).
    pub fn allow_remote_monitor(&mut self, allow: bool) -> &mut Self {
        self.config.allow_remote_monitor = allow;
        self
    }

    /// All QMP client settings at once (timeouts, event queue, oob...). The default is
    /// `qmp_client::Config::default()` with `oob` off (enable it here to use
    /// `exec-oob` through [`Machine::qmp_connection`]).
    pub fn qmp_config(&mut self, config: qmp_client::Config) -> &mut Self {
        self.config.qmp = config;
        self
    }

    /// Deadline for QEMU's greeting at launch. Default 30 s. The `qmp_capabilities`
    /// negotiation that follows is a command like any other and is bounded by
    /// [`MachineBuilder::command_timeout`]: its reply waits until QEMU has built the machine,
    /// which can take long for a big configuration. QEMU exiting ends either wait at once.
    pub fn greeting_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.config.qmp.greeting_timeout = timeout;
        self
    }

    /// Default deadline of each QMP command. Default 30 s.
    pub fn command_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.config.qmp.command_timeout = timeout;
        self
    }

    /// Adds a console with default settings (`-serial chardev:console`).
    pub fn console(&mut self) -> &mut Self {
        self.config
            .console
            .get_or_insert_with(ConsoleSettings::default);
        self
    }

    /// Adds a console with these settings.
    pub fn console_settings(&mut self, settings: ConsoleSettings) -> &mut Self {
        self.config.console = Some(settings);
        self
    }

    /// Like `set_console(device_type, console_index)` in QEMU's Python `qemu.machine`.
    pub fn set_console(&mut self, device_type: Option<&str>, index: u32) -> &mut Self {
        let console = self
            .config
            .console
            .get_or_insert_with(ConsoleSettings::default);
        console.device_type = device_type.map(str::to_owned);
        console.index = index;
        self
    }

    /// Writes every console byte to `path` too (adds a console if none).
    pub fn console_log(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        let console = self
            .config
            .console
            .get_or_insert_with(ConsoleSettings::default);
        console.config.log_file = Some(path.into());
        self
    }

    /// Whether to add `-display none -vga none` (default true; turn off for display tests).
    pub fn display_args(&mut self, on: bool) -> &mut Self {
        self.config.display_args = on;
        self
    }

    /// `-machine TYPE` (passed verbatim: it may carry options such as `q35,accel=tcg`).
    pub fn machine_type(&mut self, machine: impl Into<String>) -> &mut Self {
        self.config.machine_type = Some(machine.into());
        self
    }

    /// Boots the built-in tiny guest ([`crate::guest`]) on `machine`: turns the console on,
    /// and at every launch writes the kernel into the machine's private temp dir (which each
    /// exit removes, so a relaunch writes it again) and adds `-nodefaults` and
    /// [`crate::guest::qemu_args`] (machine type, firmware, `-kernel`, the `isa-debug-exit`
    /// device) after the other arguments. Pick the accelerator with [`MachineBuilder::args`]
    /// (`-accel tcg` boots fastest here); leave [`MachineBuilder::machine_type`] unset.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use machine_core::guest::{self, GuestMachine};
    /// use machine_core::console_socket::Pattern;
    /// use machine_core::MachineBuilder;
    ///
    /// let mut vm = MachineBuilder::new("qemu-system-x86_64")
    ///     .tiny_guest(GuestMachine::Q35)
    ///     .args(["-accel", "tcg"])
    ///     .build();
    /// vm.launch()?;
    /// vm.console()?
    ///     .wait_for(&Pattern::substring(guest::BANNER), Duration::from_secs(10))
    ///     .map_err(|source| machine_core::Error::Console { source })?;
    /// let report = vm.shutdown()?;
    /// println!("{}", report.summary());
    /// # Ok::<(), machine_core::Error>(())
    /// ```
    pub fn tiny_guest(&mut self, machine: crate::guest::GuestMachine) -> &mut Self {
        self.console();
        self.config.tiny_guest = Some(machine);
        self
    }

    /// Shares the QMP monitor with other clients as soon as QEMU is launched, at `address`
    /// with `config` (see [`Machine::share_qmp`](crate::Machine::share_qmp)). Turns `oob` on
    /// in the machine's own negotiation, so that clients get the capabilities QEMU offers.
    /// A launch that cannot share (the path is taken, say) fails and leaves nothing running.
    pub fn share_qmp(
        &mut self,
        address: qmp_client::ShareAddress,
        config: qmp_client::MuxConfig,
    ) -> &mut Self {
        self.config.qmp = self
            .config
            .qmp
            .clone()
            .with_oob(qmp_client::OobPolicy::Auto);
        self.config.share = Some((address, config));
        self
    }

    /// Adds a guest agent channel over a fresh socketpair at every launch (no socket file):
    /// QEMU gets its end as `-chardev socket,id=qga0,fd=N` on the `channel` device, and
    /// [`Machine::agent`] gives a [`qmp_client::Agent`] on ours.
    pub fn guest_agent(&mut self, channel: AgentChannel) -> &mut Self {
        let config = self
            .config
            .agent
            .take()
            .map(|a| a.config)
            .unwrap_or_default();
        self.config.agent = Some(AgentSettings { channel, config });
        self
    }

    /// The [`qmp_client::AgentConfig`] of the agent channel (adds an
    /// [`AgentChannel::IsaSerial`] channel if none).
    pub fn agent_config(&mut self, config: qmp_client::AgentConfig) -> &mut Self {
        let channel = self
            .config
            .agent
            .take()
            .map(|a| a.channel)
            .unwrap_or_default();
        self.config.agent = Some(AgentSettings { channel, config });
        self
    }

    /// Adds `-monitor null` (an unused HMP monitor instance).
    pub fn add_monitor_null(&mut self) -> &mut Self {
        self.config.add_monitor_null();
        self
    }

    /// Hands `fd` to QEMU at every launch and returns the number QEMU sees it under (for your
    /// own arguments, e.g. `-chardev socket,id=x,fd=N`). Only these fds, stdio and our own
    /// monitor and console ends reach QEMU. We keep it open (close-on-exec for everyone
    /// else) for the machine's lifetime.
    pub fn pass_fd(&mut self, fd: OwnedFd) -> RawFd {
        self.config.pass_fd(fd)
    }

    /// Passes a duplicate of `fd` to QEMU and adds `-add-fd fd=N,set=FDSET,opaque=OPAQUE[,OPTS]`
    /// (`add_fd` in QEMU's Python `qemu.machine`). `opaque` is escaped; `opts` is a raw option string. Returns N.
    pub fn add_fd(
        &mut self,
        fd: impl AsFd,
        fdset: u64,
        opaque: Option<&str>,
        opts: &str,
    ) -> Result<RawFd> {
        self.config.add_fd(fd, fdset, opaque, opts)
    }

    /// The shutdown ladder [`Machine::shutdown`] uses. Default: as in QEMU's Python `qemu.machine` (quit, 30 s, kill).
    pub fn shutdown_ladder(&mut self, ladder: ShutdownLadder) -> &mut Self {
        self.config.ladder = ladder;
        self
    }

    /// Whether QEMU gets SIGKILL when the thread that launched it exits
    /// (`PR_SET_PDEATHSIG`; default true). Turn it off when the `Machine` moves to another
    /// thread that outlives the launching one.
    pub fn parent_death_signal(&mut self, on: bool) -> &mut Self {
        self.config.parent_death_signal = on;
        self
    }

    /// Whether QEMU runs in its own session and process group (`setsid()` in the child;
    /// default false). Turn it on in terminal programs so Ctrl-C reaches only this process,
    /// which can then end QEMU through the ladder.
    pub fn new_session(&mut self, on: bool) -> &mut Self {
        self.config.new_session = on;
        self
    }

    /// Bytes of QEMU's stdout/stderr kept in memory for [`Machine::log`] and the tails.
    /// Default 1 MiB (the log file, if kept, has everything).
    pub fn output_capacity(&mut self, bytes: usize) -> &mut Self {
        self.config.output_capacity = bytes;
        self
    }

    /// Builds the machine (nothing is started until [`Machine::launch`]). The builder is left
    /// empty of passed fds (they move into the machine).
    pub fn build(&mut self) -> Machine {
        let config = Config {
            binary: self.config.binary.clone(),
            args: self.config.args.clone(),
            wrapper: self.config.wrapper.clone(),
            name: self.config.name.clone(),
            base_temp_dir: self.config.base_temp_dir.clone(),
            log_dir: self.config.log_dir.clone(),
            monitor: self.config.monitor.clone(),
            allow_remote_monitor: self.config.allow_remote_monitor,
            qmp: self.config.qmp.clone(),
            console: self.config.console.clone(),
            display_args: self.config.display_args,
            machine_type: self.config.machine_type.clone(),
            passed: std::mem::take(&mut self.config.passed),
            add_fds: std::mem::take(&mut self.config.add_fds),
            ladder: self.config.ladder.clone(),
            parent_death_signal: self.config.parent_death_signal,
            new_session: self.config.new_session,
            output_capacity: self.config.output_capacity,
            agent: self.config.agent.clone(),
            tiny_guest: self.config.tiny_guest,
            share: self.config.share.clone(),
        };
        Machine::from_config(config)
    }
}

impl Config {
    pub(crate) fn add_monitor_null(&mut self) {
        self.args.push("-monitor".into());
        self.args.push("null".into());
    }

    pub(crate) fn pass_fd(&mut self, fd: OwnedFd) -> RawFd {
        let fd = take_passed_fd(fd);
        let raw = fd.as_raw_fd();
        self.passed.push(PassedFd { fd });
        raw
    }

    pub(crate) fn add_fd(
        &mut self,
        fd: impl AsFd,
        fdset: u64,
        opaque: Option<&str>,
        opts: &str,
    ) -> Result<RawFd> {
        let owned = fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(Error::os("dup of an add_fd fd"))?;
        let raw = self.pass_fd(owned);
        self.add_fds.push(AddFd {
            fd: raw,
            fdset,
            opaque: opaque.map(str::to_owned),
            opts: opts.to_owned(),
        });
        Ok(raw)
    }
}

/// A caller's fd made ours to pass to QEMU: off the stdio numbers ([`off_stdio`]) and
/// close-on-exec, so no other child spawned by this process inherits it (the spawn's
/// allow-list hands it to QEMU alone).
pub(crate) fn take_passed_fd(fd: OwnedFd) -> OwnedFd {
    let fd = off_stdio(fd);
    if let Err(err) = crate::sys::set_cloexec(fd.as_fd()) {
        log::warn!(
            "cannot set close-on-exec on passed fd {}: {err}",
            fd.as_raw_fd()
        );
    }
    fd
}

/// `fd` moved to a number from 3 up if it sits on 0-2 (QEMU's stdio would clobber it there),
/// so the number returned to the caller is the one QEMU sees. If no duplicate can be made (no
/// free fd), the original stays and the launch refuses it with an error.
pub(crate) fn off_stdio(fd: OwnedFd) -> OwnedFd {
    if fd.as_raw_fd() >= 3 {
        return fd;
    }
    match crate::sys::dup_above_stdio(fd.as_fd()) {
        Ok(moved) => moved,
        Err(err) => {
            log::warn!(
                "cannot move fd {} off the stdio numbers: {err}",
                fd.as_raw_fd()
            );
            fd
        }
    }
}
