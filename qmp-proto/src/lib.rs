//! QMP (QEMU Machine Protocol) messages, and a streaming decoder and encoder for them.
//!
//! This is the bottom layer of the workspace: a pure, sans-IO protocol crate. It opens no
//! sockets, starts no threads and logs nothing; bytes go in and typed messages come out, and
//! back. `qmp-client` drives it over a socket, and its fake QMP server uses it to speak the
//! server side with the same types.
//!
//! - [`Decoder`] frames arbitrary chunks of server output into [`ServerMessage`]s (greeting,
//!   [`ReturnReply`], [`ErrorReply`], [`Event`], or an unknown shape kept whole), with a
//!   size cap ([`DecoderConfig`]), QEMU's depth limit, and typed [`Error`]s after which
//!   decoding carries on.
//! - [`Command`] encodes a command in the fewest bytes (QEMU 7.2 reads its monitor one byte
//!   per system call); [`ServerMessage::encode_into`] writes the server side as QEMU does.
//! - [`event_match`], [`EventFilter`] and [`conv_keys`] are the helpers of `qemu.machine`.
//!
//! ```
//! use qmp_proto::{Command, Decoder, ServerMessage};
//!
//! let mut decoder = Decoder::new();
//! decoder.feed(br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "#);
//! assert!(decoder.next_message().is_none());
//! decoder.feed(b"\"package\": \"Debian\"}, \"capabilities\": [\"oob\"]}}\r\n");
//! let Some(Ok(ServerMessage::Greeting(greeting))) = decoder.next_message() else {
//!     panic!("expected a greeting");
//! };
//! assert_eq!(greeting.version.qemu.to_string(), "7.2.22");
//! assert!(greeting.has_capability("oob"));
//!
//! let mut out = Vec::new();
//! Command::new("qmp_capabilities").with_id(0).encode_into(&mut out);
//! assert_eq!(out, br#"{"execute":"qmp_capabilities","id":0}"#);
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod decoder;
mod encode;
mod error;
mod filter;
mod message;

pub use decoder::{Decoder, DecoderConfig};
pub use error::{Error, Result, MAX_RAW_LEN};
pub use filter::{conv_keys, event_match, EventFilter};
pub use message::{
    nesting, Command, ErrorClass, ErrorInfo, ErrorReply, Event, Greeting, QemuVersion, ReturnReply,
    ServerMessage, Timestamp, Version, MAX_NESTING,
};
