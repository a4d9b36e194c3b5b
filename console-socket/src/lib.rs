//! Drain a QEMU serial console socket continuously into a bounded buffer and a log file, and
//! wait for patterns in it.
//!
//! # Where it sits
//!
//! `console-socket` is a leaf crate of the workspace: it knows nothing of QMP or of processes.
//! `machine-core` creates a socketpair for each machine's serial console, passes one end to QEMU
//! (`-chardev socket,id=con,fd=N`) and attaches a [`Console`] to the other; tests and the CLI
//! reach it through `machine-core`.
//!
//! # The problem it solves: console back-pressure
//!
//! A socketpair console is always connected, so QEMU always writes to it. If nobody reads, the
//! socket buffer (a few hundred KiB) fills, QEMU's character device spins on `EAGAIN`, the
//! guest's UART stalls and the guest hangs: a test that never looks at the console, or looks
//! only later, deadlocks QEMU (the Python `qemu.machine` has this bug; its drain is optional,
//! starts lazily on first read, reads one byte per system call, flushes its log per byte, keeps
//! an unbounded buffer and spins forever at EOF).
//!
//! Here the **drain starts when the console is created** and never stops until the stream ends
//! or the console is closed: every byte is read (in 64 KiB chunks) into
//!
//! - the optional log file ([`Config::log_file`]), buffered and flushed every 64 KiB, every
//!   [`Config::flush_interval`] (100 ms) and at close; it keeps everything, and
//! - a bounded in-memory buffer ([`Config::buffer_capacity`], 1 MiB) from which the reading
//!   methods serve; when the caller falls behind, the oldest output is evicted and counted
//!   ([`Console::bytes_dropped`]), so memory stays bounded and QEMU never blocks.
//!
//! Reading never races the drain: callers read from the buffer, never from the socket.
//! End of file is seen at once: waits return [`Error::Closed`] with the unconsumed output
//! instead of sitting out their timeout.
//!
//! Against the weak points of the console in QEMU's Python `qemu.machine`: QEMU blocking on a
//! full socket (back-pressure deadlock) and output lost before anyone reads are avoided by
//! draining from creation; no end-of-file handling, one byte per system call, a log flush per
//! byte and an unbounded buffer by EOF detection, 64 KiB reads, buffered logging and the
//! bounded buffer; a second reader racing the drain because nothing reads the socket but the
//! drain; a reader spinning at end of file by [`Error::Closed`].
//!
//! The console takes the socket over: it sets `O_NONBLOCK` on it and shuts it down at close.
//!
//! # Two ways to drive the drain
//!
//! - [`Console::from_unix_stream`] / [`from_fd`](Console::from_fd) /
//!   [`connect`](Console::connect): a background thread drains.
//! - [`Drainer::from_unix_stream`]: returns a [`Drainer`] for the owner's `mio::Poll` (many
//!   consoles on one thread) together with the [`Console`] handle.
//!
//! Both run the same core (buffer, log writer, wait engine), and a console moves between
//! them without losing a byte: [`Console::take_drainer`] stops its thread and hands the
//! drainer to the owner's poll, [`Console::drain_on_thread`] starts a thread for it again.
//!
//! # QEMU's functional-test console helpers
//!
//! QEMU's `tests/functional/qemu_test/cmd.py` drives guests through a few console helpers;
//! each has its call here, with a deadline, returning what it saw:
//!
//! | `cmd.py` | here |
//! |---|---|
//! | `wait_for_console_pattern(success, failure)` | [`Console::wait_for_any`] (failure patterns such as [`KERNEL_PANIC`] come back as [`Outcome::Failure`], at once, not at the deadline) or [`Console::wait_for`] |
//! | `exec_command(command)` | [`Console::send_line`] |
//! | `exec_command_and_wait_for_pattern(command, success, failure)` | [`Console::exec_and_wait_any`], or [`Console::exec_and_wait`] without failure patterns |
//! | `interrupt_interactive_console_until_pattern(success, failure, interrupt)` | [`Console::interrupt_until`] |
//!
//! Everything before the match is in [`Match::before`]; output that arrived before a wait is
//! never missed.
//!
//! # Example
//!
//! A socketpair stands in for QEMU: the peer prints a boot log and a prompt while nobody reads;
//! the console still has it all when we look.
//!
//! ```
//! use std::io::{BufRead, BufReader, Write};
//! use std::os::unix::net::UnixStream;
//! use std::time::Duration;
//! use console_socket::{Config, Console, Error, LineEnding, Pattern};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let log = dir.path().join("console.log");
//! let (ours, mut guest) = UnixStream::pair()?;
//! let mut console = Console::from_unix_stream(
//!     ours,
//!     Config::default().with_log_file(&log).with_line_ending(LineEnding::Lf),
//! )?;
//!
//! guest.write_all(b"booting...\r\nready\r\n$ ")?;
//! let prompt = console.wait_for(&Pattern::substring("$ "), Duration::from_secs(5))?;
//! assert_eq!(prompt.before(), b"booting...\r\nready\r\n");
//!
//! // The guest answers our command.
//! console.send_line("uname")?;
//! let mut input = BufReader::new(guest.try_clone()?);
//! let mut command = String::new();
//! input.read_line(&mut command)?;
//! assert_eq!(command, "uname\n");
//! guest.write_all(b"Linux\r\n$ ")?;
//! let uname = console.wait_for(&Pattern::regex(r"\w+\r\n")?, Duration::from_secs(5))?;
//! assert_eq!(uname.matched(), b"Linux\r\n");
//!
//! // The guest goes away: the wait ends at once with what was left.
//! drop((guest, input));
//! match console.wait_for(&Pattern::substring("never"), Duration::from_secs(60)) {
//!     Err(Error::Closed { unconsumed, .. }) => assert_eq!(unconsumed, b"$ "),
//!     other => panic!("expected Closed, got {other:?}"),
//! }
//! console.close()?;
//! assert_eq!(std::fs::read(&log)?, b"booting...\r\nready\r\n$ Linux\r\n$ ");
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod config;
mod console;
mod core;
mod drainer;
mod error;
mod pattern;
mod ring;
mod sys;

pub use crate::config::{Config, LineEnding};
pub use crate::console::Console;
pub use crate::drainer::{DrainStatus, Drainer, DRAIN_BUDGET};
pub use crate::error::{CloseReason, Error, Result};
pub use crate::pattern::{AnyMatch, Match, Outcome, Pattern, KERNEL_PANIC};
