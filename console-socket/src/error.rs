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
    /// The drainer could not be moved between the drain thread and an owner's poll
    /// ([`Console::take_drainer`](crate::Console::take_drainer),
    /// [`Console::drain_on_thread`](crate::Console::drain_on_thread)).
    #[error("cannot move the console's drainer: {reason}")]
    DrainerHandover {
        /// Why not.
        reason: &'static str,
    },
    /// The background drain thread panicked (a bug in this crate).
    #[error("console drain thread panicked")]
    DrainThreadPanicked,
}
