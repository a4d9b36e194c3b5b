//! Integration tests of the `qemu-machine` binary: each runs the built binary against the
//! scripted fake QMP server on a unix socket path (or with a missing QEMU), and checks its exit
//! status and output.

mod errors;
mod events;
mod fleet;
mod misc;
mod qmp;
mod qom;
mod run;
mod shell;
mod util;
