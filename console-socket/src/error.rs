//! The crate's one error type: every failure names what failed and carries its context.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Why a console stopped delivering output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer closed its end: for a QEMU console, QEMU exited or dropped the chardev.
    Eof,
    /// The peer reset the connection (QEMU exited with our input still unread).
    Reset,
    /// We closed the console ourselves ([`Console::close`](crate::Console::close) or drop), or
    /// dropped its [`Drainer`](crate::Drainer) before the stream ended.
    Local,
    /// Reading the socket failed with this error kind; the drain stopped.
    ReadFailed(io::ErrorKind),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Eof => f.write_str("end of file"),
            CloseReason::Reset => f.write_str("connection reset by peer"),
            CloseReason::Local => f.write_str("closed locally"),
            CloseReason::ReadFailed(kind) => write!(f, "read failed: {kind}"),
        }
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A unix socket path is longer than the kernel's `sun_path` allows.
    #[error("unix socket path {path:?} is {len} bytes long, the limit is {max}")]
    PathTooLong {
        /// The offending path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The longest path that works (107 bytes).
        max: usize,
    },
    /// Connecting to a unix socket failed with an error that retrying cannot fix.
    #[error("cannot connect to console socket {path:?}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Nobody accepted a connection on the socket path before the deadline.
    #[error("no console listener at {path:?} within {timeout:?}: {source}")]
    ConnectTimeout {
        /// The socket path.
        path: PathBuf,
        /// How long we kept trying.
        timeout: Duration,
        /// The error of the last attempt (usually "not found" or "connection refused").
        #[source]
        source: io::Error,
    },
    /// The file descriptor handed over is not a connected stream socket.
    #[error("console fd is not a stream socket{}", source.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    NotAStreamSocket {
        /// Why the check failed (for example `ENOTSOCK`), if the OS said.
        #[source]
        source: Option<io::Error>,
    },
    /// Setting up the socket, the poller or the drain thread failed.
    #[error("cannot set up the console: {what}: {source}")]
    Setup {
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A configuration value is unusable.
    #[error("invalid console config: {reason}")]
    InvalidConfig {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The log file could not be created.
    #[error("cannot create console log file {path:?}: {source}")]
    LogOpen {
        /// The log file path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing or flushing the log file failed; logging stopped at that point (the drain went on).
    #[error("cannot write console log file {path:?}: {source}")]
    LogWrite {
        /// The log file path.
        path: PathBuf,
        /// The first write or flush error.
        #[source]
        source: io::Error,
    },
    /// A regular expression did not compile.
    #[error("invalid console pattern {pattern:?}: {source}")]
    InvalidPattern {
        /// The expression as given.
        pattern: String,
        /// The regex crate's diagnostic.
        #[source]
        source: Box<regex::Error>,
    },
    /// A wait reached its deadline; nothing was consumed.
    #[error("timed out after {timeout:?} waiting for {waiting_for}")]
    Timeout {
        /// What the wait was looking for (pattern descriptions or "a line").
        waiting_for: String,
        /// The timeout the caller gave.
        timeout: Duration,
        /// The most recent unconsumed output (at most 4 KiB), for the diagnostic.
        recent: Vec<u8>,
    },
    /// The console reached end of file (or was closed) before the wait was satisfied.
    ///
    /// Returned as soon as the drain sees the end, not at the deadline. `unconsumed` is the
    /// output that arrived and was not yet consumed: it is handed over (consumed) with the error.
    #[error("console closed ({reason}) with {} unconsumed bytes", unconsumed.len())]
    Closed {
        /// Output read from the console and not consumed by an earlier call.
        unconsumed: Vec<u8>,
        /// Why the console ended.
        reason: CloseReason,
    },
    /// The peer closed its end while we were sending (`EPIPE` or `ECONNRESET`).
    #[error("console peer went away after {written} of {len} bytes were sent")]
    BrokenPipe {
        /// Bytes the kernel accepted before the error.
        written: usize,
        /// Bytes we meant to send.
        len: usize,
    },
    /// The peer did not take our input before the deadline (its receive buffer stayed full).
    #[error(
        "sending to the console timed out after {timeout:?} with {written} of {len} bytes sent"
    )]
    SendTimeout {
        /// Bytes the kernel accepted before the deadline.
        written: usize,
        /// Bytes we meant to send.
        len: usize,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// Sending failed with another OS error.
    #[error("cannot send to the console after {written} of {len} bytes: {source}")]
    Send {
        /// Bytes the kernel accepted before the error.
        written: usize,
        /// Bytes we meant to send.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The background drain thread panicked (a bug in this crate).
    #[error("console drain thread panicked")]
    DrainThreadPanicked,
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
            Error::PathTooLong { .. } => "PathTooLong",
            Error::Connect { .. } => "Connect",
            Error::ConnectTimeout { .. } => "ConnectTimeout",
            Error::NotAStreamSocket { .. } => "NotAStreamSocket",
            Error::Setup { .. } => "Setup",
            Error::InvalidConfig { .. } => "InvalidConfig",
            Error::LogOpen { .. } => "LogOpen",
            Error::LogWrite { .. } => "LogWrite",
            Error::InvalidPattern { .. } => "InvalidPattern",
            Error::Timeout { .. } => "Timeout",
            Error::Closed { .. } => "Closed",
            Error::BrokenPipe { .. } => "BrokenPipe",
            Error::SendTimeout { .. } => "SendTimeout",
            Error::Send { .. } => "Send",
            Error::DrainThreadPanicked => "DrainThreadPanicked",
        }
    }

    /// `Display` alone says what failed and why: the table of every variant.
    #[test]
    fn every_variant_reads_well_alone() {
        // Built at run time so the linter does not reject the bad pattern itself.
        let bad = ["(", ""].concat();
        let regex_error = regex::Regex::new(&bad).expect_err("bad regex");
        let regex_text = regex_error.to_string();
        let table: Vec<(Error, String)> = vec![
            (
                Error::PathTooLong {
                    path: "/long".into(),
                    len: 120,
                    max: 107,
                },
                "unix socket path \"/long\" is 120 bytes long, the limit is 107".into(),
            ),
            (
                Error::Connect {
                    path: "/run/con.sock".into(),
                    source: io(io::ErrorKind::ConnectionRefused),
                },
                "cannot connect to console socket \"/run/con.sock\": connection refused".into(),
            ),
            (
                Error::ConnectTimeout {
                    path: "/run/con.sock".into(),
                    timeout: Duration::from_secs(5),
                    source: io(io::ErrorKind::NotFound),
                },
                "no console listener at \"/run/con.sock\" within 5s: entity not found".into(),
            ),
            (
                Error::NotAStreamSocket { source: None },
                "console fd is not a stream socket".into(),
            ),
            (
                Error::Setup {
                    what: "epoll",
                    source: io(io::ErrorKind::OutOfMemory),
                },
                "cannot set up the console: epoll: out of memory".into(),
            ),
            (
                Error::InvalidConfig {
                    reason: "capacity must be positive",
                },
                "invalid console config: capacity must be positive".into(),
            ),
            (
                Error::LogOpen {
                    path: "/ro/con.log".into(),
                    source: io(io::ErrorKind::PermissionDenied),
                },
                "cannot create console log file \"/ro/con.log\": permission denied".into(),
            ),
            (
                Error::LogWrite {
                    path: "/full/con.log".into(),
                    source: io(io::ErrorKind::StorageFull),
                },
                "cannot write console log file \"/full/con.log\": no storage space".into(),
            ),
            (
                Error::InvalidPattern {
                    pattern: "(".into(),
                    source: Box::new(regex_error),
                },
                format!("invalid console pattern \"(\": {regex_text}"),
            ),
            (
                Error::Timeout {
                    waiting_for: "\"login: \"".into(),
                    timeout: Duration::from_secs(30),
                    recent: Vec::new(),
                },
                "timed out after 30s waiting for \"login: \"".into(),
            ),
            (
                Error::Closed {
                    unconsumed: b"bye".to_vec(),
                    reason: CloseReason::Eof,
                },
                "console closed (end of file) with 3 unconsumed bytes".into(),
            ),
            (
                Error::BrokenPipe {
                    written: 2,
                    len: 10,
                },
                "console peer went away after 2 of 10 bytes were sent".into(),
            ),
            (
                Error::SendTimeout {
                    written: 0,
                    len: 10,
                    timeout: Duration::from_secs(1),
                },
                "sending to the console timed out after 1s with 0 of 10 bytes sent".into(),
            ),
            (
                Error::Send {
                    written: 0,
                    len: 10,
                    source: io(io::ErrorKind::InvalidInput),
                },
                "cannot send to the console after 0 of 10 bytes: invalid input parameter".into(),
            ),
            (
                Error::DrainThreadPanicked,
                "console drain thread panicked".into(),
            ),
        ];
        let mut names: Vec<&str> = table.iter().map(|(e, _)| name(e)).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 15, "every variant is in the table");
        for (error, text) in &table {
            assert_eq!(error.to_string(), *text, "{}", name(error));
        }
    }
}
