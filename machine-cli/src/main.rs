//! The `qemu-machine` command (skeleton; see issue 7).

fn main() {}
