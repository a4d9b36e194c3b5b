//! The crate's one error type: configuration, launch, QMP, console and shutdown failures.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::process::ExitStatus;
use crate::report::ExitReport;

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong driving a QEMU machine.
///
/// A QMP error reply is [`Error::Command`] (data: class and description), kept apart from
/// transport failures ([`Error::Qmp`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `launch()` on a machine whose QEMU is still running.
    #[error("the machine is already running (pid {pid})")]
    AlreadyRunning {
        /// The running QEMU's pid.
        pid: u32,
    },
    /// An operation that needs a running QEMU was called before `launch()` or after the exit.
    #[error("the machine is not running")]
    NotRunning,
    /// A QMP operation on a machine configured without a monitor ([`crate::Monitor::None`]).
    #[error("the machine has no QMP monitor")]
    NoMonitor,
    /// The QMP connection is shared ([`crate::Machine::qmp_shared`]): the operation needs the
    /// connection itself (use the [`qmp_client::Shared`] handle instead).
    #[error("the QMP connection is shared; use the shared handle")]
    QmpShared,
    /// `console()` on a machine configured without a console.
    #[error("the machine has no console (see set_console)")]
    NoConsole,
    /// The machine has no guest agent channel (see `MachineBuilder::guest_agent`).
    #[error("the machine has no guest agent channel (see MachineBuilder::guest_agent)")]
    NoAgent,
    /// A guest agent call failed (timeout, error reply, closed channel...).
    #[error("guest agent")]
    Agent {
        /// The agent client's error.
        #[source]
        source: qmp_client::Error,
    },
    /// The Linux test guest cannot be built: a package or tool is missing, or apt failed.
    #[error("linux test guest: {what}; run: {fix}")]
    GuestPackages {
        /// What is missing or failed.
        what: String,
        /// The exact command that fixes it.
        fix: String,
    },
    /// A file step of building the Linux test guest failed.
    #[error("linux test guest: cannot {step} {path:?}")]
    GuestBuild {
        /// What we tried.
        step: &'static str,
        /// The path.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The program to run (the wrapper's first element, or the binary) cannot be executed.
    #[error("cannot execute {path:?}")]
    BinaryNotFound {
        /// The program as configured.
        path: PathBuf,
        /// Why (not found, not executable).
        #[source]
        source: io::Error,
    },
    /// A unix socket path does not fit in `sockaddr_un`; detected before anything is spawned.
    #[error("unix socket path {path:?} is {len} bytes long, the limit is {limit} bytes")]
    SocketPathTooLong {
        /// The offending path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The limit (107 on Linux).
        limit: usize,
    },
    /// A monitor socket path exists and is not a stale socket; we never replace user files.
    #[error("socket path {path:?} already exists")]
    SocketPathInUse {
        /// The path.
        path: PathBuf,
    },
    /// A TCP monitor on a non-loopback address without
    /// [`crate::MachineBuilder::allow_remote_monitor`]: QMP has no authentication.
    #[error("refusing a QMP monitor on non-loopback address {addr}")]
    RemoteMonitor {
        /// The address.
        addr: std::net::SocketAddr,
    },
    /// Creating the private temporary directory failed.
    #[error("cannot create a temporary directory in {base:?}")]
    TempDir {
        /// The base directory.
        base: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating QEMU's log file failed.
    #[error("cannot create log file {path:?}")]
    LogFile {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An OS operation failed (`what` names it: `socketpair`, `pipe`, `pidfd_open`, ...).
    #[error("{what} failed")]
    Os {
        /// The operation.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `fork`/`exec` of QEMU failed.
    #[error("cannot spawn {command}")]
    Spawn {
        /// The full command line.
        command: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// QEMU was started but the launch did not complete (it exited first, the handshake failed
    /// or timed out). Everything was rolled back: no process, fd, temp dir or socket is left.
    #[error("qemu launch failed ({})", status.map_or_else(|| "not started".to_owned(), |s| s.to_string()))]
    LaunchFailed {
        /// QEMU's exit status (after our SIGKILL when it had to be killed).
        status: Option<ExitStatus>,
        /// Whether we had to kill it (it did not exit by itself).
        killed: bool,
        /// The full command line.
        command: String,
        /// The end of QEMU's stdout and stderr (at most 64 KiB), lossy UTF-8.
        output: String,
        /// What went wrong.
        #[source]
        cause: Box<Error>,
    },
    /// The caller's abort fd turned readable during the launch
    /// ([`crate::Machine::launch_with_abort`]); the cause of an [`Error::LaunchFailed`].
    #[error("the launch was aborted")]
    LaunchAborted,
    /// The QMP connection failed while running `command` (transport, timeout, protocol).
    #[error("qmp {command}")]
    Qmp {
        /// The command, or the operation (`handshake`, `events`, ...).
        command: String,
        /// The client's error.
        #[source]
        source: qmp_client::Error,
    },
    /// QEMU answered `command` with a QMP error reply.
    #[error("`{command}` failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// The error class (`GenericError`, `DeviceNotFound`, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// Command arguments must be a JSON object (or null for none).
    #[error("arguments of `{command}` are not a json object: {value}")]
    ArgumentsNotObject {
        /// The command.
        command: String,
        /// What was given.
        value: serde_json::Value,
    },
    /// The console failed.
    #[error("console")]
    Console {
        /// The console's error.
        #[source]
        source: console_socket::Error,
    },
    /// Opening a file to pass to QEMU failed.
    #[error("cannot open {path:?}")]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// QEMU did not exit within the time given.
    #[error("qemu did not exit within {waited:?}")]
    ExitTimeout {
        /// How long we waited.
        waited: Duration,
    },
    /// QEMU could not be reaped even after SIGKILL (stuck in the kernel).
    #[error("qemu pid {pid} was not reaped within {waited:?} after SIGKILL")]
    ReapTimeout {
        /// The pid.
        pid: u32,
        /// The bound.
        waited: Duration,
    },
    /// A graceful shutdown failed: QEMU was killed. Cleanup was done anyway; the report says
    /// what each step did.
    #[error("graceful shutdown failed; qemu was killed ({})", report.status)]
    AbnormalShutdown {
        /// The exit report.
        report: Box<ExitReport>,
        /// The failure of the last graceful step.
        #[source]
        cause: Box<Error>,
    },
    /// A step of the shutdown ladder failed; `detail` is its recorded error.
    #[error("shutdown step `{step}` failed: {detail}")]
    StepFailed {
        /// The step.
        step: String,
        /// Its error.
        detail: String,
    },
    /// A qtest command or the qtest channel failed (see [`crate::qtest::Error`]); lets code
    /// that drives a `QtestMachine` use one result type for QMP, lifecycle and qtest.
    #[error(transparent)]
    Qtest(#[from] crate::qtest::Error),
}

impl Error {
    pub(crate) fn os(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Os { what, source }
    }

    pub(crate) fn qmp(command: &str, source: qmp_client::Error) -> Error {
        match source {
            qmp_client::Error::Command {
                command,
                class,
                desc,
            } => Error::Command {
                command,
                class: class.as_str().to_owned(),
                desc,
            },
            source => Error::Qmp {
                command: command.to_owned(),
                source,
            },
        }
    }
}
