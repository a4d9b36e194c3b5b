//! A QMP (QEMU Machine Protocol) client on `mio`, driven in the caller's thread.
//!
//! # Place in the workspace
//!
//! `qmp-client` sits between the pure protocol crate [`qmp_proto`] (bytes in, messages out, no
//! I/O) and `machine-core` (which launches QEMU and hands us one end of a socketpair). It owns
//! the sockets, the deadlines and the protocol rules; it never spawns processes and never starts
//! a thread of its own.
//!
//! # Main types
//!
//! - [`Connection`]: a blocking connection with its own `mio::Poll`. Get one from
//!   [`Connection::connect_unix`], [`Connection::connect_tcp`], [`Connection::from_unix_stream`]
//!   (a socketpair end, the default in `machine-core`) or a [`Listener`] (server mode: QEMU
//!   connects to us).
//! - [`Session`]: the sans-IO protocol state (handshake phase, ids, pending replies, event
//!   queue, output buffer). A caller with its own event loop registers the connection's fd
//!   ([`std::os::fd::AsRawFd`]) and drives it through [`Connection::process_io`] and
//!   [`Connection::session_mut`].
//! - [`Shared`]: a clonable, thread-safe handle; many threads may issue commands at once.
//! - [`Agent`]: a client for QEMU's guest agent (`qemu-ga`): no greeting or negotiation,
//!   `guest-sync-delimited` with the `0xFF` resync, stale replies skipped by id.
//! - [`Config`], [`Error`]; with the `testing` feature, `testing::FakeServer`, a scripted fake
//!   QMP server for tests.
//!
//! # Protocol contracts
//!
//! - **Handshake.** The greeting is awaited with a deadline ([`Config::greeting_timeout`]), then
//!   `qmp_capabilities` is sent, enabling `oob` when offered ([`Config::oob`]). Both steps can be
//!   skipped (QEMU's guest agent speaks QMP without them).
//! - **Events are queued, never dropped silently, never taken for replies.** Events arriving
//!   before the greeting, during negotiation or between a command and its reply all go to one
//!   bounded queue ([`Config::event_capacity`]). When it is full, [`OverflowPolicy`] decides:
//!   drop the oldest and count it ([`Connection::events_dropped`]), or discard the newcomer and
//!   report [`Error::EventsLost`] once. A flood of events never delays a reply: reads are
//!   processed in bounded batches and the caller's condition is checked after each.
//! - **Ids.** Every command carries a fresh client-chosen small integer id (1, 2, 3...; never
//!   reused). Replies are routed by id; a reply with an unknown id (for example one that comes
//!   after its command timed out) is dropped, logged at warn and counted
//!   ([`Connection::unknown_replies`]); it never reaches another caller. An `error` without an
//!   id while no id-less command is pending ends the session with [`Error::ServerParse`], as the
//!   QMP specification describes; the late reply of a timed-out id-less command is dropped like
//!   any late reply, and no new id-less command is sent until it has come.
//! - **Pipelining.** Several commands may be in flight ([`Connection::send`] +
//!   [`Connection::wait_reply`]); at most 8 in-band ones, the limit of the spec: a further send
//!   waits for a slot within its deadline. `exec-oob` commands ([`Connection::execute_oob`]) are
//!   not counted there; they have a cap of their own, [`Config::max_oob_in_flight`] (default
//!   64; the spec sets no number, but every pending request costs memory), with the same
//!   waiting.
//! - **Deadlines.** Every wait has one: connect, accept, greeting, negotiation, each command,
//!   each event wait. An event wait's timeout is a total, not restarted by non-matching events.
//!   A command that times out is forgotten; its late reply is dropped.
//! - **Sticky errors.** After EOF, a socket error or undecodable data, the first failure is
//!   kept: pending and later calls fail at once with [`Error::Disconnected`] carrying it. EOF or
//!   ECONNRESET after a `quit` we sent is a clean close ([`Error::Closed`]) and `quit` returns
//!   `Ok` even when QEMU exits before replying.
//! - **I/O.** Sockets are nonblocking; readiness is drained until `WouldBlock`; partial writes
//!   stay buffered with WRITABLE interest; EAGAIN and EINTR never reach the caller. Each message
//!   goes out in one `write` when the socket allows.
//! - **File descriptors** travel with SCM_RIGHTS ([`Connection::send_fds`],
//!   [`Connection::getfd`], [`Connection::add_fd`]); public fd APIs take `BorrowedFd`.
//! - **Logging.** Each message is logged at debug level as `--> ...` / `<-- ...`; nothing is
//!   formatted when debug logging is off.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use qmp_client::{Config, Connection};
//! use qmp_proto::EventFilter;
//!
//! # fn main() -> qmp_client::Result<()> {
//! // QEMU started with `-qmp unix:/tmp/qmp.sock,server=on,wait=off`.
//! let config = Config::default().with_command_timeout(Duration::from_secs(5));
//! let mut qmp = Connection::connect_unix("/tmp/qmp.sock".as_ref(), &config)?;
//! let status = qmp.execute("query-status", None)?;
//! println!("running: {}", status["running"]);
//! let (_, event) = qmp.execute_and_wait(
//!     "stop",
//!     None,
//!     &[EventFilter::new("STOP")],
//!     Duration::from_secs(5),
//! )?;
//! println!("{} at {}", event.event, event.timestamp.seconds);
//! qmp.execute("quit", None)?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
// The only unsafe block (adopting fds received with SCM_RIGHTS) lives in `sys`.
#![deny(unsafe_code)]

mod agent;
mod config;
mod connection;
mod error;
mod io;
mod listener;
mod mux;
#[cfg(feature = "testing")]
pub mod replay;
mod session;
mod shared;
mod sys;
#[cfg(feature = "testing")]
pub mod testing;

pub use agent::{Agent, AgentConfig, ExecStatus, FileChunk, SuspendMode};
pub use config::{Config, OobPolicy, OverflowPolicy};
pub use connection::{Connection, PROCESS_BUDGET};
pub use error::{Error, Result};
pub use listener::Listener;
pub use mux::{
    ClientId, ClientInfo, DropReason, Mux, MuxConfig, MuxServer, MuxStats, QuitPolicy, ShareAddress,
};
pub use session::{Phase, RelayWaker, Relayed, RequestId, Session, MAX_IN_FLIGHT};
pub use shared::Shared;
pub use sys::UNIX_PATH_MAX;
