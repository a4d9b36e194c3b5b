//! Console settings: log file, memory bound, line ending and the deadlines of the I/O paths.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

/// What [`Console::send_line`](crate::Console::send_line) appends to a line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LineEnding {
    /// `\r`, what a terminal's Enter key sends (QEMU's own test helpers use it).
    #[default]
    Cr,
    /// `\n`.
    Lf,
    /// `\r\n`.
    CrLf,
}

impl LineEnding {
    /// The bytes of this line ending.
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            LineEnding::Cr => b"\r",
            LineEnding::Lf => b"\n",
            LineEnding::CrLf => b"\r\n",
        }
    }
}

/// How a console drains, logs, matches and sends.
///
/// Build it with [`Config::default`] and the `with_*` setters:
///
/// ```
/// use console_socket::{Config, LineEnding};
/// let config = Config::default()
///     .with_log_file("/tmp/console.log")
///     .with_buffer_capacity(256 * 1024)
///     .with_line_ending(LineEnding::Lf);
/// assert_eq!(config.buffer_capacity, 256 * 1024);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// Where every byte read from the console is written (created, truncated). `None`: no log.
    pub log_file: Option<PathBuf>,
    /// Bytes of recent output kept in memory for reads, matching and [`tail`]
    /// (default 1 MiB). Older bytes are evicted; unconsumed evicted bytes are counted by
    /// [`bytes_dropped`]. The log file keeps everything regardless. The allocation is this
    /// plus 64 KiB, the room the socket is read into directly (pages never filled are never
    /// touched).
    ///
    /// [`tail`]: crate::Console::tail
    /// [`bytes_dropped`]: crate::Console::bytes_dropped
    pub buffer_capacity: usize,
    /// Appended by [`send_line`](crate::Console::send_line) (default `\r`).
    pub line_ending: LineEnding,
    /// Longest time logged bytes may sit in the write buffer before a flush (default 100 ms).
    /// The buffer also flushes whenever 64 KiB accumulate, and at close.
    pub flush_interval: Duration,
    /// Longest time a send may wait for the peer to accept input (default 10 s).
    pub send_timeout: Duration,
    /// How long [`Console::connect`](crate::Console::connect) keeps retrying a socket path that
    /// does not exist yet or refuses connections (default 10 s).
    pub connect_timeout: Duration,
    /// How far back (bytes) a regular expression is re-run over already scanned output when
    /// new output arrives (default 4 KiB); see [`Pattern::regex`](crate::Pattern::regex).
    pub regex_lookback: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            log_file: None,
            buffer_capacity: 1024 * 1024,
            line_ending: LineEnding::Cr,
            flush_interval: Duration::from_millis(100),
            send_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            regex_lookback: 4096,
        }
    }
}

impl Config {
    /// Logs every byte to `path` (created, truncated).
    pub fn with_log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_file = Some(path.into());
        self
    }

    /// Sets the in-memory buffer size in bytes (at least 1).
    pub fn with_buffer_capacity(mut self, bytes: usize) -> Self {
        self.buffer_capacity = bytes;
        self
    }

    /// Sets the line ending of [`send_line`](crate::Console::send_line).
    pub fn with_line_ending(mut self, ending: LineEnding) -> Self {
        self.line_ending = ending;
        self
    }

    /// Sets the periodic log flush interval.
    pub fn with_flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = interval;
        self
    }

    /// Sets the send deadline.
    pub fn with_send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// Sets how long a path connect keeps retrying.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the regex rescan window in bytes.
    pub fn with_regex_lookback(mut self, bytes: usize) -> Self {
        self.regex_lookback = bytes;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.buffer_capacity == 0 {
            return Err(Error::InvalidConfig {
                reason: "buffer_capacity must be at least 1 byte",
            });
        }
        if self.flush_interval.is_zero() {
            return Err(Error::InvalidConfig {
                reason: "flush_interval must be positive",
            });
        }
        Ok(())
    }
}
