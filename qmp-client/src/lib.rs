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
//! - [`Connection`]: the QMP handle. Get one from [`Connection::connect_unix`],
//!   [`Connection::connect_tcp`], [`Connection::from_unix_stream`] (a socketpair end, the
//!   default in `machine-core`) or a [`Listener`] (server mode: QEMU connects to us); each
//!   returns after the handshake. [`Connection::adopt_unix_stream`] returns at once, for a
//!   caller that steps the handshake itself.
//! - [`Shared`] (`Connection<Sharing>`): the same connection held for many threads: clone it,
//!   one clone per thread. [`Connection::share`] hands out such handles while the owner keeps
//!   using its connection; [`Connection::into_shared`] gives the owner's up.
//! - [`Session`]: the sans-IO protocol state (handshake phase, ids, pending replies, event
//!   queue, output buffer) under every connection.
//! - [`Agent`]: a client for QEMU's guest agent (`qemu-ga`): no greeting or negotiation,
//!   `guest-sync-delimited` with the `0xFF` resync, stale replies skipped by id.
//! - [`Config`], [`Error`]; with the `testing` feature, `testing::FakeServer`, a scripted fake
//!   QMP server for tests.
//!
//! # One driver, three ways to drive it
//!
//! Under every [`Connection`] there is one transport driver: the socket, a private
//! `mio::Poll`, the read and write state, and one pump that every blocking call runs (with a
//! deadline). How it is held is the type parameter: [`Owned`] (one thread, no lock) or
//! [`Sharing`] (behind a mutex; whichever waiting thread finds the socket unattended pumps it
//! for all, the others sleep until their reply is routed). The command methods
//! (`execute`, `execute_raw`, `execute_oob`, `send`/`wait_reply`, `execute_and_wait`, the
//! event calls, `send_fds`/`getfd`/`add_fd`) are written once for both.
//!
//! 1. **Blocking, one thread**: call the command methods; each waits with its deadline.
//! 2. **Blocking, many threads**: [`Connection::share`], then the same methods on the clones.
//! 3. **Stepped from your own event loop**, with no thread and no blocking call:
//!    [`Connection::register`] the socket in your `mio::Registry` under a token of your choice,
//!    call [`Connection::process_io`] on its readiness (again while
//!    [`Connection::wants_read`]), send with [`Connection::submit`], pick up replies with
//!    [`Connection::take_reply`] and events with [`Connection::pop_event`]. The handshake too
//!    can be stepped ([`Connection::adopt_unix_stream`] + [`Connection::handshake_step`]). See
//!    [`Connection`]'s docs for a complete loop.
//!
//! ## Another runtime
//!
//! The protocol itself is [`Session`], which does no I/O: write [`Session::pending_output`]
//! to the socket when it is writable ([`Session::consume_output`] what was written), feed
//! what you read to [`Session::feed`] (and [`Session::feed_eof`] / [`Session::feed_io_error`]),
//! then take replies and events. That is all an async runtime needs: the example
//! `qmp-client/examples/tokio_session.rs` drives a `Session` on a tokio `UnixStream` against
//! real QEMU (`cargo run -p qmp-client --example tokio_session -- /path/to/qemu`). Any other
//! runtime (async-std, smol, glommio, a hand-written epoll loop) does the same with its own
//! socket type: the session never asks how the bytes travel.
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
//! - **Pipelining.** Several commands may be in flight ([`Connection::send`] or
//!   [`Connection::submit`] +
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
mod driver;
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
pub use driver::{Owned, OwnedGuard, SessionGuard, Sharing};
pub use error::{Error, Result};
pub use listener::{clear_stale_socket, Listener};
pub use mux::{
    ClientId, ClientInfo, DropReason, Mux, MuxConfig, MuxServer, MuxStats, QuitPolicy, ShareAddress,
};
pub use session::{Phase, RelayWaker, Relayed, RequestId, Session, MAX_IN_FLIGHT};
pub use shared::Shared;
pub use sys::UNIX_PATH_MAX;
