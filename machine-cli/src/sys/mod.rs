//! The CLI's own system calls (through nix), kept here as in every crate of the workspace:
//! our signals taken on a thread with `sigwait` (`signals`) and the terminal mode of `run`
//! (`tty`).

pub mod signals;
pub mod tty;
