//! The error type of the qtest channel (the line protocol); lifecycle failures of a
//! `QtestMachine` are the crate's own `Error`.

use std::path::PathBuf;
use std::time::Duration;

/// A failure of a qtest command or of the qtest connection.
///
/// `Failed` is QEMU's answer (`FAIL ...` or `ERR ...`), i.e. data about the command; every
/// other variant is a transport or usage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// QEMU answered the command with `FAIL <message>` (or `ERR <message>`).
    #[error("qtest command `{command}` failed: {message}")]
    Failed {
        /// The command line as sent, without its newline.
        command: String,
        /// QEMU's explanation (may be empty).
        message: String,
    },
    /// No reply arrived before the deadline. The late reply, if it ever comes, is discarded
    /// so that it is never taken for the reply of a later command.
    #[error("qtest command `{command}` got no reply within {timeout:?}")]
    Timeout {
        /// The command line as sent.
        command: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// The reply was neither `OK`, `FAIL` nor `ERR`, or its value did not parse.
    #[error("unexpected reply to qtest command `{command}`: {line:?}")]
    BadReply {
        /// The command line as sent.
        command: String,
        /// The reply line (lossily decoded, bounded).
        line: String,
    },
    /// A line from QEMU exceeded the configured limit; it was discarded up to its newline.
    #[error("qtest line longer than {limit} bytes")]
    LineTooLong {
        /// The command whose reply it was, if one was pending.
        command: Option<String>,
        /// The configured `Config::max_line`.
        limit: usize,
    },
    /// The peer closed the connection (EOF or reset); sticky: every later call fails the same
    /// way at once.
    #[error("qtest connection closed by peer")]
    Closed {
        /// The command that was waiting for its reply, if any.
        command: Option<String>,
        /// Bytes of an incomplete last line, if any.
        unread: Vec<u8>,
    },
    /// A command or argument that QEMU cannot parse (QEMU aborts on many malformed commands,
    /// so they are refused before sending).
    #[error("invalid qtest command {command:?}: {reason}")]
    InvalidCommand {
        /// The offending command line or argument.
        command: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// No matching `IRQ` line arrived before the deadline.
    #[error("no matching qtest irq event within {timeout:?}")]
    IrqTimeout {
        /// The IRQ number waited for (None: any).
        irq: Option<u32>,
        /// The time allowed.
        timeout: Duration,
    },
    /// Reading from or writing to the qtest socket failed.
    #[error("qtest socket i/o failed{}: {source}", command.as_ref().map(|c| format!(" (`{c}`)")).unwrap_or_default())]
    Io {
        /// The command being sent or waited for, if any.
        command: Option<String>,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to a qtest socket path failed.
    #[error("cannot connect to qtest socket {}: {source}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The qtest channel is not available: the machine is not running.
    #[error("qtest socket not available: the machine is not running")]
    NotRunning,
}

/// The result type of the qtest module.
pub type Result<T> = std::result::Result<T, Error>;
