//! The crate's one error type: configuration, launch, QMP, console and shutdown failures.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::process::ExitStatus;
use crate::report::{format_duration, ExitReport};

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
    /// Sharing the QMP monitor with other clients failed (binding its socket, starting its
    /// loop), or it was asked for on a machine whose handshake is not done.
    #[error("cannot share the QMP monitor on {path:?}: {source}")]
    Share {
        /// The socket path asked for (empty for a private one not created yet).
        path: std::path::PathBuf,
        /// What failed.
        #[source]
        source: Box<qmp_client::Error>,
    },
    /// `console()` on a machine configured without a console.
    #[error("the machine has no console (see set_console)")]
    NoConsole,
    /// The machine has no guest agent channel (see `MachineBuilder::guest_agent`).
    #[error("the machine has no guest agent channel (see MachineBuilder::guest_agent)")]
    NoAgent,
    /// A guest agent call failed (timeout, error reply, closed channel...).
    #[error("guest agent: {source}")]
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
    #[error("linux test guest: cannot {step} {path:?}: {source}")]
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
    #[error("cannot execute {path:?}: {source}")]
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
    #[error("cannot create a temporary directory in {base:?}: {source}")]
    TempDir {
        /// The base directory.
        base: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating QEMU's log file failed.
    #[error("cannot create log file {path:?}: {source}")]
    LogFile {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An OS operation failed (`what` names it: `socketpair`, `pipe`, `pidfd_open`, ...).
    #[error("{what} failed: {source}")]
    Os {
        /// The operation.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `fork`/`exec` of QEMU failed.
    #[error("cannot spawn {command}: {source}")]
    Spawn {
        /// The full command line.
        command: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// QEMU was started but the launch did not complete (it exited first, the handshake failed
    /// or timed out). Everything was rolled back: no process, fd, temp dir or socket is left.
    #[error("{}", launch_failed_text(*status, *killed, output, cause))]
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
    #[error("qmp {command}: {source}")]
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
    #[error("console: {source}")]
    Console {
        /// The console's error.
        #[source]
        source: console_socket::Error,
    },
    /// Writing the built-in tiny guest's kernel ([`crate::MachineBuilder::tiny_guest`]) failed.
    #[error("cannot write the tiny guest's kernel to {path:?}: {source}")]
    GuestKernel {
        /// The kernel file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Opening a file to pass to QEMU failed.
    #[error("cannot open {path:?}: {source}")]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// QEMU did not exit within the time given.
    #[error("qemu did not exit within {}", format_duration(*waited))]
    ExitTimeout {
        /// How long we waited.
        waited: Duration,
    },
    /// QEMU could not be reaped even after SIGKILL (stuck in the kernel).
    #[error("qemu pid {pid} was not reaped within {} after SIGKILL", format_duration(*waited))]
    ReapTimeout {
        /// The pid.
        pid: u32,
        /// The bound.
        waited: Duration,
    },
    /// A graceful shutdown failed: QEMU was killed. Cleanup was done anyway; the report says
    /// what each step did.
    #[error("graceful shutdown failed ({cause}); qemu was killed: {}", report.summary())]
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

/// [`Error::LaunchFailed`]'s text: QEMU's exit status and its own last words first, when it
/// exited by itself; else what went wrong with the launch.
fn launch_failed_text(
    status: Option<ExitStatus>,
    killed: bool,
    output: &str,
    cause: &Error,
) -> String {
    let said = output.lines().map(str::trim).rfind(|line| !line.is_empty());
    match (status, killed) {
        (Some(status), false) => match said {
            Some(line) => format!("qemu exited during launch ({status}): {line}"),
            None => format!("qemu exited during launch ({status}) without a message"),
        },
        (Some(_), true) => format!("qemu launch failed ({cause}); qemu was killed"),
        (None, _) => format!("qemu launch failed: {cause}"),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: io::ErrorKind) -> io::Error {
        io::Error::from(kind)
    }

    /// The variant's name; no wildcard, so a new variant must be added to the table below.
    fn name(error: &Error) -> &'static str {
        match error {
            Error::AlreadyRunning { .. } => "AlreadyRunning",
            Error::NotRunning => "NotRunning",
            Error::NoMonitor => "NoMonitor",
            Error::QmpShared => "QmpShared",
            Error::Share { .. } => "Share",
            Error::NoConsole => "NoConsole",
            Error::BinaryNotFound { .. } => "BinaryNotFound",
            Error::SocketPathTooLong { .. } => "SocketPathTooLong",
            Error::SocketPathInUse { .. } => "SocketPathInUse",
            Error::RemoteMonitor { .. } => "RemoteMonitor",
            Error::TempDir { .. } => "TempDir",
            Error::LogFile { .. } => "LogFile",
            Error::Os { .. } => "Os",
            Error::Spawn { .. } => "Spawn",
            Error::LaunchFailed { .. } => "LaunchFailed",
            Error::LaunchAborted => "LaunchAborted",
            Error::Qmp { .. } => "Qmp",
            Error::Command { .. } => "Command",
            Error::ArgumentsNotObject { .. } => "ArgumentsNotObject",
            Error::Console { .. } => "Console",
            Error::OpenFile { .. } => "OpenFile",
            Error::ExitTimeout { .. } => "ExitTimeout",
            Error::ReapTimeout { .. } => "ReapTimeout",
            Error::AbnormalShutdown { .. } => "AbnormalShutdown",
            Error::StepFailed { .. } => "StepFailed",
            Error::Qtest(_) => "Qtest",
            Error::NoAgent => "NoAgent",
            Error::Agent { .. } => "Agent",
            Error::GuestPackages { .. } => "GuestPackages",
            Error::GuestBuild { .. } => "GuestBuild",
            Error::GuestKernel { .. } => "GuestKernel",
        }
    }

    const ALL: usize = 31;

    fn handshake_eof() -> Box<Error> {
        Box::new(Error::Qmp {
            command: "handshake".into(),
            source: qmp_client::Error::GreetingTimeout {
                timeout: Duration::from_secs(10),
            },
        })
    }

    /// `Display` alone says what failed and why: the table of every variant.
    #[test]
    fn every_variant_reads_well_alone() {
        let report = ExitReport {
            ended_by: crate::EndedBy::Kill,
            status: ExitStatus::Signal {
                signal: libc::SIGKILL,
                core_dumped: false,
            },
            pid: 42,
            shutdown_event: None,
            steps: Vec::new(),
            output_tail: Vec::new(),
            console_tail: Vec::new(),
            last_events: Vec::new(),
            command: "qemu".into(),
            uptime: Duration::from_millis(30_120),
        };
        let table: Vec<(Error, &str)> = vec![
            (
                Error::AlreadyRunning { pid: 42 },
                "the machine is already running (pid 42)",
            ),
            (Error::NotRunning, "the machine is not running"),
            (Error::NoMonitor, "the machine has no QMP monitor"),
            (
                Error::QmpShared,
                "the QMP connection is shared; use the shared handle",
            ),
            (
                Error::Share {
                    path: "/tmp/vm.qmp".into(),
                    source: Box::new(qmp_client::Error::NotASocket {
                        path: "/tmp/vm.qmp".into(),
                    }),
                },
                "cannot share the QMP monitor on \"/tmp/vm.qmp\": refusing to replace \"/tmp/vm.qmp\": it exists and is not a socket",
            ),
            (
                Error::NoConsole,
                "the machine has no console (see set_console)",
            ),
            (
                Error::BinaryNotFound {
                    path: "/no/qemu".into(),
                    source: io(io::ErrorKind::NotFound),
                },
                "cannot execute \"/no/qemu\": entity not found",
            ),
            (
                Error::SocketPathTooLong {
                    path: "/tmp/long".into(),
                    len: 120,
                    limit: 107,
                },
                "unix socket path \"/tmp/long\" is 120 bytes long, the limit is 107 bytes",
            ),
            (
                Error::SocketPathInUse {
                    path: "/tmp/file".into(),
                },
                "socket path \"/tmp/file\" already exists",
            ),
            (
                Error::RemoteMonitor {
                    addr: "10.0.0.1:4444".parse().expect("addr"),
                },
                "refusing a QMP monitor on non-loopback address 10.0.0.1:4444",
            ),
            (
                Error::TempDir {
                    base: "/ro".into(),
                    source: io(io::ErrorKind::PermissionDenied),
                },
                "cannot create a temporary directory in \"/ro\": permission denied",
            ),
            (
                Error::LogFile {
                    path: "/ro/vm.log".into(),
                    source: io(io::ErrorKind::PermissionDenied),
                },
                "cannot create log file \"/ro/vm.log\": permission denied",
            ),
            (
                Error::Os {
                    what: "socketpair",
                    source: io(io::ErrorKind::OutOfMemory),
                },
                "socketpair failed: out of memory",
            ),
            (
                Error::Spawn {
                    command: "qemu -M none".into(),
                    source: io(io::ErrorKind::PermissionDenied),
                },
                "cannot spawn qemu -M none: permission denied",
            ),
            (
                Error::LaunchFailed {
                    status: Some(ExitStatus::Code(1)),
                    killed: false,
                    command: "qemu -bogus".into(),
                    output: "qemu: -bogus: invalid option\n\n".into(),
                    cause: handshake_eof(),
                },
                "qemu exited during launch (exit code 1): qemu: -bogus: invalid option",
            ),
            (
                Error::LaunchFailed {
                    status: Some(ExitStatus::Signal {
                        signal: libc::SIGKILL,
                        core_dumped: false,
                    }),
                    killed: true,
                    command: "qemu".into(),
                    output: String::new(),
                    cause: handshake_eof(),
                },
                "qemu launch failed (qmp handshake: no QMP greeting within 10s); qemu was \
                 killed",
            ),
            (Error::LaunchAborted, "the launch was aborted"),
            (
                Error::Qmp {
                    command: "event wait".into(),
                    source: qmp_client::Error::EventTimeout {
                        names: "STOP".into(),
                        timeout: Duration::from_secs(5),
                    },
                },
                "qmp event wait: no event matching STOP within 5s",
            ),
            (
                Error::Command {
                    command: "device_del".into(),
                    class: "DeviceNotFound".into(),
                    desc: "Device 'x' not found".into(),
                },
                "`device_del` failed: DeviceNotFound: Device 'x' not found",
            ),
            (
                Error::ArgumentsNotObject {
                    command: "stop".into(),
                    value: serde_json::json!([1]),
                },
                "arguments of `stop` are not a json object: [1]",
            ),
            (
                Error::Console {
                    source: console_socket::Error::DrainThreadPanicked,
                },
                "console: console drain thread panicked",
            ),
            (
                Error::OpenFile {
                    path: "/disk.img".into(),
                    source: io(io::ErrorKind::NotFound),
                },
                "cannot open \"/disk.img\": entity not found",
            ),
            (
                Error::ExitTimeout {
                    waited: Duration::from_millis(30_004),
                },
                "qemu did not exit within 30s",
            ),
            (
                Error::ReapTimeout {
                    pid: 42,
                    waited: Duration::from_secs(60),
                },
                "qemu pid 42 was not reaped within 1m after SIGKILL",
            ),
            (
                Error::AbnormalShutdown {
                    report: Box::new(report),
                    cause: Box::new(Error::ExitTimeout {
                        waited: Duration::from_secs(30),
                    }),
                },
                "graceful shutdown failed (qemu did not exit within 30s); qemu was killed: we \
                 killed qemu: signal 9 (SIGKILL) after 30.1s",
            ),
            (
                Error::StepFailed {
                    step: "quit, wait 30s".into(),
                    detail: "monitor gone".into(),
                },
                "shutdown step `quit, wait 30s` failed: monitor gone",
            ),
            (
                Error::Qtest(crate::qtest::Error::NotRunning),
                "qtest socket not available: the machine is not running",
            ),
            (
                Error::NoAgent,
                "the machine has no guest agent channel (see MachineBuilder::guest_agent)",
            ),
            (
                Error::Agent {
                    source: qmp_client::Error::CommandTimeout {
                        command: "guest-ping".into(),
                        waited: Duration::from_secs(5),
                    },
                },
                "guest agent: no reply to `guest-ping` within 5s",
            ),
            (
                Error::GuestPackages {
                    what: "busybox-static is not installed".into(),
                    fix: "apt-get install busybox-static".into(),
                },
                "linux test guest: busybox-static is not installed; run: apt-get install \
                 busybox-static",
            ),
            (
                Error::GuestBuild {
                    step: "write",
                    path: "/ro/initrd".into(),
                    source: io(io::ErrorKind::PermissionDenied),
                },
                "linux test guest: cannot write \"/ro/initrd\": permission denied",
            ),
            (
                Error::GuestKernel {
                    path: "/ro/qemu-machine-tiny-guest.bin".into(),
                    source: io(io::ErrorKind::PermissionDenied),
                },
                "cannot write the tiny guest's kernel to \"/ro/qemu-machine-tiny-guest.bin\": \
                 permission denied",
            ),
        ];
        let mut names: Vec<&str> = table.iter().map(|(e, _)| name(e)).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL, "every variant is in the table");
        for (error, text) in &table {
            assert_eq!(error.to_string(), *text, "{}", name(error));
        }
    }
}
