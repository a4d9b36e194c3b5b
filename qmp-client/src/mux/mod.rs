//! Sharing one QMP monitor: other clients attach through us and see QEMU as if they were alone.
//!
//! QEMU serves one client per QMP monitor; once this crate owns it, nobody else could look.
//! [`Mux`] is the sans-IO core (many client byte streams in, one [`crate::Session`] out);
//! [`MuxServer`] drives it with sockets (a unix socket, optionally loopback TCP) on an owner's
//! `mio::Poll`, beside the owner's own connection.

mod check;
mod core;

pub use self::core::{ClientId, ClientInfo, DropReason, Mux, MuxConfig, MuxStats, QuitPolicy};
mod server;

pub use self::server::{MuxServer, ShareAddress};
