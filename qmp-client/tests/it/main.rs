//! Integration tests of qmp-client against the scripted fake QMP server (one binary).

mod commands;
mod concurrency;
mod deadlines;
mod events;
mod fds;
mod framing;
mod handshake;
mod mux;
mod replay;
mod util;
