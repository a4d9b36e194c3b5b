//! Everything that can make `qemu-machine` fail, each mapped to an exit status.

use std::io;
use std::path::PathBuf;

use machine_core::qmp_client;

/// Result type of the command.
pub type Result<T> = std::result::Result<T, Error>;

/// Exit status for a QMP error reply (or a failed shell line).
pub const EXIT_COMMAND: u8 = 1;
/// Exit status for bad usage or bad input.
pub const EXIT_USAGE: u8 = 2;
/// Exit status for connection failures.
pub const EXIT_CONNECTION: u8 = 3;
/// Exit status when QEMU cannot be launched.
pub const EXIT_LAUNCH: u8 = 4;
/// Exit status when a signal ended `run` before QEMU was up (128 + SIGINT, as a shell says).
pub const EXIT_INTERRUPTED: u8 = 130;

/// A failure of `qemu-machine`, printed once with its causes by `main`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A token is not `key=value`.
    #[error("expected key=value, got `{token}`")]
    ExpectedKeyValue {
        /// The token.
        token: String,
    },
    /// An empty key or an empty part of a dotted key.
    #[error("bad key `{key}`: keys and their dotted parts cannot be empty")]
    BadKey {
        /// The key.
        key: String,
    },
    /// A key is used both as a value and as an object of nested keys.
    #[error("cannot use `{key}` as both leaf and non-leaf key")]
    LeafAndNode {
        /// The key path.
        key: String,
    },
    /// A key is given twice.
    #[error("cannot set `{key}` multiple times")]
    SetTwice {
        /// The key path.
        key: String,
    },
    /// A quote is never closed.
    #[error("unterminated quote in `{line}`")]
    UnterminatedQuote {
        /// The line.
        line: String,
    },
    /// A quoted value has text after its closing quote, or a bad escape.
    #[error("bad quoted string for `{key}`: {text}")]
    BadString {
        /// The key.
        key: String,
        /// The value as typed.
        text: String,
    },
    /// A value (or a whole line) starting with `{` or `[` is not valid JSON.
    #[error("invalid JSON{}: {text} ({source})", key.as_ref().map(|k| format!(" for `{k}`")).unwrap_or_default())]
    BadJson {
        /// The key, when the JSON was a value.
        key: Option<String>,
        /// The text.
        text: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A JSON command line has the wrong shape.
    #[error("bad JSON command: {reason}")]
    BadRawCommand {
        /// What is wrong.
        reason: String,
    },
    /// `--args` is not a JSON object.
    #[error("--args must be a JSON object, got: {text}")]
    ArgsNotObject {
        /// The text given.
        text: String,
    },
    /// `transaction(` while one is open.
    #[error("a transaction is already open; close it with `)`")]
    NestedTransaction,
    /// `)` outside a transaction.
    #[error("`)` outside a transaction")]
    CloseOutsideTransaction,
    /// Text after the `)` that closes a transaction.
    #[error("unexpected input after the `)` closing the transaction")]
    TextAfterClose,
    /// Arguments nest deeper than QEMU's JSON parser accepts.
    #[error("arguments nest {depth} levels deep, at most {limit} fit in QEMU's limit of 1024")]
    TooDeep {
        /// Levels of the arguments object (itself included).
        depth: usize,
        /// The most allowed.
        limit: usize,
    },
    /// `cpu` without a valid index.
    #[error("usage: cpu INDEX (a CPU number), got `{text}`")]
    BadCpuIndex {
        /// The line.
        text: String,
    },
    /// A `qom` property is not `PATH.PROPERTY`.
    #[error("expected PATH.PROPERTY (e.g. /machine.type), got `{text}`")]
    BadQomProperty {
        /// What was given.
        text: String,
    },
    /// `qmp` was given an address but no command.
    #[error("no QMP command given")]
    MissingCommand,
    /// No address given and `$QMP_SOCKET` unset.
    #[error("no QMP server address: give ADDRESS (unix path or host:port) or set $QMP_SOCKET")]
    MissingAddress,
    /// Connecting (and greeting, negotiating) failed.
    #[error("cannot connect to QMP server at {address}: {}", connect_cause(source))]
    Connect {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: qmp_client::Error,
    },
    /// A `ga` command line that does not parse.
    #[error("bad ga command `{text}`: {why}")]
    BadGaCommand {
        /// The words given.
        text: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The Linux test guest for `run --linux` could not be built.
    #[error("cannot build the Linux test guest: {source}")]
    LinuxGuest {
        /// Why (the message names the apt command to run when a package is missing).
        #[source]
        source: machine_core::Error,
    },
    /// A command came back with a QMP error reply.
    #[error("{command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The transport failed while running a command (timeout, disconnect, garbage).
    #[error("`{command}` failed: {source}")]
    Transport {
        /// The command.
        command: String,
        /// Why.
        #[source]
        source: qmp_client::Error,
    },
    /// Waiting for events failed.
    #[error("event stream from {address} failed: {source}")]
    Events {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: qmp_client::Error,
    },
    /// The QMP connection ended while the shell was running.
    #[error("disconnected from {address}: {source}")]
    Disconnected {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: qmp_client::Error,
    },
    /// Some shell lines failed (parse or command errors); each was reported when it happened.
    #[error("{failed} of {total} shell lines failed")]
    ShellFailures {
        /// Lines that failed.
        failed: u64,
        /// Lines run.
        total: u64,
    },
    /// QEMU could not be launched (missing binary, bad arguments, no greeting).
    #[error("cannot launch {}: {source}", binary.display())]
    Launch {
        /// The QEMU binary.
        binary: PathBuf,
        /// Why, with QEMU's exit status and output when it started at all.
        #[source]
        source: machine_core::Error,
    },
    /// A signal (Ctrl-C, SIGTERM...) arrived while QEMU was starting: it was killed.
    #[error("interrupted by {signal} while qemu was starting; qemu was killed")]
    Interrupted {
        /// The signal, as named in messages.
        signal: &'static str,
    },
    /// The QEMU binary is not an executable file (nor found on `$PATH`).
    #[error("QEMU binary {} not found (install qemu-system-x86, or give --qemu PATH or $QEMU)", path.display())]
    QemuNotFound {
        /// The binary as given.
        path: PathBuf,
    },
    /// An operation on the running machine failed.
    #[error("{what} failed: {source}")]
    Machine {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: machine_core::Error,
    },
    /// The console failed.
    #[error("{what} failed: {source}")]
    Console {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: machine_core::console_socket::Error,
    },
    /// The tiny guest only boots on the machine types it knows.
    #[error("the built-in guest boots on q35 or pc, not `{machine}` (give QEMU arguments after -- for other guests)")]
    TinyGuestMachine {
        /// The machine type asked for.
        machine: String,
    },
    /// A `--qmp-listen` path longer than a unix socket address can hold.
    #[error("--qmp-listen path {} is {len} bytes long, the limit is {limit}", path.display())]
    ListenPathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A `--qmp-listen` path that exists and is not a stale socket (QEMU would unlink it).
    #[error("cannot listen on {}: {source}", path.display())]
    ListenPath {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<machine_core::Error>,
    },
    /// A `--qmp-listen` TCP address that is (or resolves to) a non-loopback address.
    #[error("refusing --qmp-listen {address}: not a loopback address, and QMP has no authentication (--allow-remote-qmp overrides)")]
    RemoteQmp {
        /// The address as given.
        address: String,
    },
    /// Opening or writing a file failed.
    #[error("cannot write {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The `--logfile` cannot be opened for appending (a usage error: checked before
    /// connecting).
    #[error("cannot open log file {}: {source}", path.display())]
    LogFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A unix socket address names something that is not a socket.
    #[error("{} is not a socket (a QMP server address is a unix socket path or host:port)", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// An address looks like `host:port` but its port is not a number from 1 to 65535 (and
    /// no unix socket has that name).
    #[error("invalid port `{port}` in `{address}` (expected host:PORT with PORT from 1 to 65535, or a unix socket path)")]
    BadPort {
        /// The address as given.
        address: String,
        /// The part after the last `:`.
        port: String,
    },
    /// Reading input or writing output failed.
    #[error("{what} failed: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The line editor failed.
    #[error("line editor failed: {source}")]
    Readline {
        /// Why.
        #[source]
        source: rustyline::error::ReadlineError,
    },
}

/// Why connecting failed, without repeating the address: the OS error of a failed connect,
/// else the client's error.
fn connect_cause(source: &qmp_client::Error) -> String {
    match source {
        qmp_client::Error::Connect { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

impl Error {
    /// The exit status this failure maps to.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Command { .. } | Error::ShellFailures { .. } => EXIT_COMMAND,
            Error::Connect { .. }
            | Error::Transport { .. }
            | Error::Events { .. }
            | Error::Disconnected { .. } => EXIT_CONNECTION,
            Error::Launch { .. } | Error::QemuNotFound { .. } => EXIT_LAUNCH,
            Error::NotASocket { .. } => EXIT_CONNECTION,
            Error::Interrupted { .. } => EXIT_INTERRUPTED,
            Error::File { .. }
            | Error::Io { .. }
            | Error::Readline { .. }
            | Error::Machine { .. }
            | Error::Console { .. } => EXIT_COMMAND,
            Error::LinuxGuest { .. } => EXIT_LAUNCH,
            _ => EXIT_USAGE,
        }
    }

    /// Extra lines worth showing after the causes: QEMU's own output when a launch failed,
    /// and what a missing greeting usually means.
    pub fn details(&self) -> Option<String> {
        if let Error::Connect { source, .. } = self {
            if matches!(source.root(), qmp_client::Error::GreetingTimeout { .. }) {
                return Some(
                    "QEMU serves one client at a time on each -qmp socket, and greets the next \
                     one only when the first has left: another client may hold this monitor. \
                     Give QEMU one -qmp socket per client (`run --qmp-listen` can be repeated), \
                     or share one monitor through a multiplexed chardev (mux=on)."
                        .to_string(),
                );
            }
            return None;
        }
        let Error::Launch { source, .. } = self else {
            return None;
        };
        let machine_core::Error::LaunchFailed { output, .. } = source else {
            return None;
        };
        let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
        // One line is already in the message (see machine_core::Error::LaunchFailed).
        if lines.len() < 2 {
            return None;
        }
        let tail = &lines[lines.len().saturating_sub(20)..];
        Some(format!("QEMU said:\n  {}", tail.join("\n  ")))
    }

    /// Turns a failure of `command` into [`Error::Command`] for a QMP error reply, else
    /// [`Error::Transport`].
    pub fn from_qmp(command: &str, error: qmp_client::Error) -> Error {
        match error {
            qmp_client::Error::Command {
                command,
                class,
                desc,
            } => Error::Command {
                command,
                class: class.as_str().to_string(),
                desc,
            },
            source => Error::Transport {
                command: command.to_string(),
                source,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The variant's name; no wildcard, so a new variant must be added to the table below.
    fn name(error: &Error) -> &'static str {
        match error {
            Error::ExpectedKeyValue { .. } => "ExpectedKeyValue",
            Error::BadKey { .. } => "BadKey",
            Error::LeafAndNode { .. } => "LeafAndNode",
            Error::SetTwice { .. } => "SetTwice",
            Error::UnterminatedQuote { .. } => "UnterminatedQuote",
            Error::BadString { .. } => "BadString",
            Error::BadJson { .. } => "BadJson",
            Error::BadRawCommand { .. } => "BadRawCommand",
            Error::ArgsNotObject { .. } => "ArgsNotObject",
            Error::NestedTransaction => "NestedTransaction",
            Error::CloseOutsideTransaction => "CloseOutsideTransaction",
            Error::TextAfterClose => "TextAfterClose",
            Error::TooDeep { .. } => "TooDeep",
            Error::BadCpuIndex { .. } => "BadCpuIndex",
            Error::BadQomProperty { .. } => "BadQomProperty",
            Error::MissingCommand => "MissingCommand",
            Error::MissingAddress => "MissingAddress",
            Error::Connect { .. } => "Connect",
            Error::BadGaCommand { .. } => "BadGaCommand",
            Error::LinuxGuest { .. } => "LinuxGuest",
            Error::Command { .. } => "Command",
            Error::Transport { .. } => "Transport",
            Error::Events { .. } => "Events",
            Error::Disconnected { .. } => "Disconnected",
            Error::ShellFailures { .. } => "ShellFailures",
            Error::Launch { .. } => "Launch",
            Error::Interrupted { .. } => "Interrupted",
            Error::QemuNotFound { .. } => "QemuNotFound",
            Error::Machine { .. } => "Machine",
            Error::Console { .. } => "Console",
            Error::TinyGuestMachine { .. } => "TinyGuestMachine",
            Error::ListenPathTooLong { .. } => "ListenPathTooLong",
            Error::ListenPath { .. } => "ListenPath",
            Error::RemoteQmp { .. } => "RemoteQmp",
            Error::File { .. } => "File",
            Error::LogFile { .. } => "LogFile",
            Error::NotASocket { .. } => "NotASocket",
            Error::BadPort { .. } => "BadPort",
            Error::Io { .. } => "Io",
            Error::Readline { .. } => "Readline",
        }
    }

    /// `Display` alone says what failed and why: the table of every variant, with its exit
    /// status.
    #[test]
    fn every_variant_reads_well_alone() {
        let io = |kind| io::Error::from(kind);
        let closed = || qmp_client::Error::Closed;
        let json_error = serde_json::from_str::<serde_json::Value>("[1,").expect_err("json");
        let s = |text: &str| text.to_string();
        let table: Vec<(Error, &str, u8)> = vec![
            (
                Error::ExpectedKeyValue { token: s("x") },
                "expected key=value, got `x`",
                2,
            ),
            (
                Error::BadKey { key: s("a..b") },
                "bad key `a..b`: keys and their dotted parts cannot be empty",
                2,
            ),
            (
                Error::LeafAndNode { key: s("a") },
                "cannot use `a` as both leaf and non-leaf key",
                2,
            ),
            (
                Error::SetTwice { key: s("a") },
                "cannot set `a` multiple times",
                2,
            ),
            (
                Error::UnterminatedQuote { line: s("x a='b") },
                "unterminated quote in `x a='b`",
                2,
            ),
            (
                Error::BadString {
                    key: s("a"),
                    text: s("'b'c"),
                },
                "bad quoted string for `a`: 'b'c",
                2,
            ),
            (
                Error::BadJson {
                    key: Some(s("a")),
                    text: s("[1,"),
                    source: json_error,
                },
                "invalid JSON for `a`: [1, (EOF while parsing a value at line 1 column 3)",
                2,
            ),
            (
                Error::BadRawCommand {
                    reason: s("no execute"),
                },
                "bad JSON command: no execute",
                2,
            ),
            (
                Error::ArgsNotObject { text: s("[]") },
                "--args must be a JSON object, got: []",
                2,
            ),
            (
                Error::NestedTransaction,
                "a transaction is already open; close it with `)`",
                2,
            ),
            (
                Error::CloseOutsideTransaction,
                "`)` outside a transaction",
                2,
            ),
            (
                Error::TextAfterClose,
                "unexpected input after the `)` closing the transaction",
                2,
            ),
            (
                Error::TooDeep {
                    depth: 1021,
                    limit: 1020,
                },
                "arguments nest 1021 levels deep, at most 1020 fit in QEMU's limit of 1024",
                2,
            ),
            (
                Error::BadCpuIndex { text: s("cpu x") },
                "usage: cpu INDEX (a CPU number), got `cpu x`",
                2,
            ),
            (
                Error::BadQomProperty {
                    text: s("/machine"),
                },
                "expected PATH.PROPERTY (e.g. /machine.type), got `/machine`",
                2,
            ),
            (Error::MissingCommand, "no QMP command given", 2),
            (
                Error::MissingAddress,
                "no QMP server address: give ADDRESS (unix path or host:port) or set \
                 $QMP_SOCKET",
                2,
            ),
            (
                Error::Connect {
                    address: s("/run/qmp.sock"),
                    source: qmp_client::Error::Connect {
                        address: s("/run/qmp.sock"),
                        source: io(io::ErrorKind::ConnectionRefused),
                    },
                },
                "cannot connect to QMP server at /run/qmp.sock: connection refused",
                3,
            ),
            (
                Error::BadGaCommand {
                    text: s("fsfreeze melt"),
                    why: "expected status, freeze or thaw",
                },
                "bad ga command `fsfreeze melt`: expected status, freeze or thaw",
                2,
            ),
            (
                Error::LinuxGuest {
                    source: machine_core::Error::NoAgent,
                },
                "cannot build the Linux test guest: the machine has no guest agent channel \
                 (see MachineBuilder::guest_agent)",
                4,
            ),
            (
                Error::Command {
                    command: s("stop"),
                    class: s("GenericError"),
                    desc: s("nope"),
                },
                "stop: GenericError: nope",
                1,
            ),
            (
                Error::Transport {
                    command: s("stop"),
                    source: closed(),
                },
                "`stop` failed: connection closed",
                3,
            ),
            (
                Error::Events {
                    address: s("/run/qmp.sock"),
                    source: closed(),
                },
                "event stream from /run/qmp.sock failed: connection closed",
                3,
            ),
            (
                Error::Disconnected {
                    address: s("/run/qmp.sock"),
                    source: closed(),
                },
                "disconnected from /run/qmp.sock: connection closed",
                3,
            ),
            (
                Error::ShellFailures {
                    failed: 2,
                    total: 5,
                },
                "2 of 5 shell lines failed",
                1,
            ),
            (
                Error::Launch {
                    binary: "qemu".into(),
                    source: machine_core::Error::LaunchAborted,
                },
                "cannot launch qemu: the launch was aborted",
                4,
            ),
            (
                Error::Interrupted { signal: "SIGTERM" },
                "interrupted by SIGTERM while qemu was starting; qemu was killed",
                130,
            ),
            (
                Error::QemuNotFound {
                    path: "/no/qemu".into(),
                },
                "QEMU binary /no/qemu not found (install qemu-system-x86, or give --qemu PATH \
                 or $QEMU)",
                4,
            ),
            (
                Error::Machine {
                    what: "ending qemu",
                    source: machine_core::Error::NotRunning,
                },
                "ending qemu failed: the machine is not running",
                1,
            ),
            (
                Error::Console {
                    what: "sending a --send line",
                    source: machine_core::console_socket::Error::DrainThreadPanicked,
                },
                "sending a --send line failed: console drain thread panicked",
                1,
            ),
            (
                Error::TinyGuestMachine {
                    machine: s("microvm"),
                },
                "the built-in guest boots on q35 or pc, not `microvm` (give QEMU arguments \
                 after -- for other guests)",
                2,
            ),
            (
                Error::ListenPathTooLong {
                    path: "/long".into(),
                    len: 120,
                    limit: 107,
                },
                "--qmp-listen path /long is 120 bytes long, the limit is 107",
                2,
            ),
            (
                Error::ListenPath {
                    path: "/etc/passwd".into(),
                    source: Box::new(machine_core::Error::SocketPathInUse {
                        path: "/etc/passwd".into(),
                    }),
                },
                "cannot listen on /etc/passwd: socket path \"/etc/passwd\" already exists",
                2,
            ),
            (
                Error::RemoteQmp {
                    address: s("0.0.0.0:4444"),
                },
                "refusing --qmp-listen 0.0.0.0:4444: not a loopback address, and QMP has no \
                 authentication (--allow-remote-qmp overrides)",
                2,
            ),
            (
                Error::File {
                    path: "/ro/x".into(),
                    source: io(io::ErrorKind::PermissionDenied),
                },
                "cannot write /ro/x: permission denied",
                1,
            ),
            (
                Error::LogFile {
                    path: "/no/dir/log".into(),
                    source: io(io::ErrorKind::NotFound),
                },
                "cannot open log file /no/dir/log: entity not found",
                2,
            ),
            (
                Error::NotASocket {
                    path: "/etc/passwd".into(),
                },
                "/etc/passwd is not a socket (a QMP server address is a unix socket path or \
                 host:port)",
                3,
            ),
            (
                Error::BadPort {
                    address: s("localhost:x"),
                    port: s("x"),
                },
                "invalid port `x` in `localhost:x` (expected host:PORT with PORT from 1 to \
                 65535, or a unix socket path)",
                2,
            ),
            (
                Error::Io {
                    what: "writing to stdout",
                    source: io(io::ErrorKind::BrokenPipe),
                },
                "writing to stdout failed: broken pipe",
                1,
            ),
            (
                Error::Readline {
                    source: rustyline::error::ReadlineError::Eof,
                },
                "line editor failed: EOF",
                1,
            ),
        ];
        let mut names: Vec<&str> = table.iter().map(|(e, _, _)| name(e)).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 40, "every variant is in the table");
        for (error, text, code) in &table {
            assert_eq!(error.to_string(), *text, "{}", name(error));
            assert_eq!(error.exit_code(), *code, "{}", name(error));
        }
    }
}
