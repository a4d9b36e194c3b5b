//! Integration tests of console-socket: a socketpair end plays QEMU (the peer) while the
//! tests drive the public API.

// Test helpers outside `#[test]` functions unwrap too (clippy.toml only exempts test bodies).
#![allow(clippy::unwrap_used)]

mod drainer;
mod flood;
mod lifecycle;
mod matching;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use console_socket::{Config, Console};

/// Upper bound for waits that should succeed quickly; hitting it means a bug.
pub const LONG: Duration = Duration::from_secs(10);

/// A console on one end of a socketpair, and the other end (the "guest").
pub fn pair(config: Config) -> (Console, UnixStream) {
    let (ours, peer) = UnixStream::pair().unwrap();
    let console = Console::from_unix_stream(ours, config).unwrap();
    (console, peer)
}
