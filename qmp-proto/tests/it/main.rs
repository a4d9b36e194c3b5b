//! Integration tests of `qmp-proto`: tables of bytes in and messages out, chunking, limits,
//! malformed input and the transcripts recorded from a real QEMU.

// Helpers outside `#[test]` functions unwrap too: a failed unwrap is a failed test here.
#![allow(clippy::unwrap_used)]

mod encoding;
mod fixtures;
mod limits;
mod malformed;
mod split;
mod tables;
mod util;
