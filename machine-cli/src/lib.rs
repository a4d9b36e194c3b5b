//! The parts of `qemu-machine` that touch no terminal, socket or process, as a library: the
//! qmp-shell language ([`lang`]) and the error type it returns ([`error`]).
//!
//! The binary (`src/main.rs`) uses them from here, so that the fuzz targets in `fuzz/` can
//! drive the same parser the shell runs, without a copy of it.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod error;
pub mod lang;
