//! QEMU VM lifecycle (skeleton; see issue 6).
#![deny(missing_docs)]

pub mod guest;
pub mod qtest;

pub use console_socket;
pub use qmp_client;
pub use qmp_proto;
