//! The one error type of `qmp-proto`: everything that can go wrong turning bytes into messages.

use thiserror::Error;

/// How many bytes of offending input an [`Error`](enum@Error) keeps (the start of the message).
///
/// Errors carry a bounded copy so that a 10 MiB garbage line cannot make an error value huge.
pub const MAX_RAW_LEN: usize = 256;

/// The `Result` of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong while decoding a message or reading a command.
///
/// Every decoding variant carries `raw`: the first [`MAX_RAW_LEN`] bytes of the offending
/// message, so the caller can log what the peer actually sent. After any of these errors the
/// [`Decoder`](crate::Decoder) has already skipped the bad input and carries on with the next
/// message: the caller decides whether the session survives.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A message grew past the configured maximum size; its bytes were discarded as they came.
    #[error("message exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// The configured maximum message size in bytes.
        limit: usize,
        /// The first bytes of the oversized message.
        raw: Vec<u8>,
    },
    /// A message nests arrays and objects deeper than the configured maximum.
    #[error("message nests deeper than {limit} levels")]
    TooDeep {
        /// The configured maximum depth.
        limit: usize,
    },
    /// A message is not valid UTF-8 (for example QEMU's `0xFF` resync byte).
    #[error("message is not valid utf-8")]
    InvalidUtf8 {
        /// The first bytes of the message.
        raw: Vec<u8>,
    },
    /// A message is valid JSON but not an object (`[]`, `null`, `42`, `"x"`).
    #[error("message is json but not an object")]
    NotAnObject {
        /// The first bytes of the message.
        raw: Vec<u8>,
    },
    /// A message is not valid JSON: a syntax error, a truncated message, a lone surrogate, a
    /// control character in a string, a number out of range.
    #[error("malformed json message: {source}")]
    Malformed {
        /// The first bytes of the message.
        raw: Vec<u8>,
        /// What the JSON parser found wrong.
        #[source]
        source: serde_json::Error,
    },
    /// A JSON object is not a valid QMP command (see [`Command::from_object`](crate::Command::from_object)).
    #[error("invalid qmp command: {reason}")]
    InvalidCommand {
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    /// The bounded copy of the offending bytes, when the error has one.
    pub fn raw(&self) -> Option<&[u8]> {
        match self {
            Error::MessageTooLarge { raw, .. }
            | Error::InvalidUtf8 { raw }
            | Error::NotAnObject { raw }
            | Error::Malformed { raw, .. } => Some(raw),
            Error::TooDeep { .. } | Error::InvalidCommand { .. } => None,
        }
    }
}

/// A bounded copy of `bytes`: at most [`MAX_RAW_LEN`] of them.
pub(crate) fn raw_copy(bytes: &[u8]) -> Vec<u8> {
    bytes[..bytes.len().min(MAX_RAW_LEN)].to_vec()
}
