//! QEMU VM lifecycle (skeleton; see issue 6).
#![deny(missing_docs)]
