//! Integration tests of qmp-client against the scripted fake QMP server (one binary).

mod handshake;
mod util;
