//! The VM lifecycle: launch with rollback, QMP and console access, shutdown through the
//! ladder, exit supervision on a pidfd, cleanup, and the exit report.
//!
//! This file holds the `Machine` type, its configuration accessors and what its parts share;
//! each phase has a file of its own: `launch.rs` (command line, spawn, handshake, rollback),
//! `running.rs` (console, QMP, events, fd passing), `exit.rs` (the blocking ladder, reaping,
//! the exit report, cleanup) and `stepping.rs` (the same phases driven by an owner's poll).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};
use qmp_client::Connection;

use crate::share::Sharing;
use qmp_proto::Event;
use serde_json::{Map, Value};

use crate::argv::CommandLine;
use crate::config::{Config, Monitor};
use crate::error::{Error, Result};
use crate::ladder::ShutdownLadder;
use crate::output::OutputDrain;
use crate::process::{ChildGuard, ExitStatus};
use crate::report::{ExitReport, ShutdownEvent};

/// Longest unix socket path we accept (`sun_path` is 108 bytes with its NUL).
pub const UNIX_PATH_MAX: usize = 107;
/// Most bytes of QEMU's output a [`Error::LaunchFailed`] carries.
pub const LAUNCH_OUTPUT_LIMIT: usize = 64 * 1024;
/// How long the output drain may take to see end-of-file after QEMU was reaped.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

const PIDFD: Token = Token(0);
const QMP: Token = Token(1);
/// A blocking launch's abort fd ([`Machine::launch_with_abort`]).
const ABORT: Token = Token(2);

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

/// One running QEMU and everything that lives exactly as long as it.
struct Run {
    child: ChildGuard,
    poll: Poll,
    events: Events,
    qmp: Option<Connection>,
    /// A unix or TCP monitor QEMU has not connected to yet, and until when it may.
    listener: Option<(qmp_client::Listener, Instant)>,
    /// The owner's registry and QMP token while a listener waits ([`Machine::register`]):
    /// the accepted connection goes on the owner's poll in place of the listener.
    owner: Option<(mio::Registry, Token)>,
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
    /// The console's drainer while the owner's poll drives it ([`Machine::register_console`]),
    /// with that poll's registry.
    console_drainer: Option<(console_socket::Drainer, mio::Registry)>,
    /// The last step left console output unread at its budget.
    console_more: bool,
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
            console_drainer: None,
            console_more: false,
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
        let fd = crate::config::take_passed_fd(fd);
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
}

mod exit;
mod launch;
mod running;
mod stepping;

pub use launch::prepare_socket_path;
pub(crate) use running::reply_value;
pub use stepping::{MachineState, Tokens};

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
