//! Round-trip benchmark against a real QEMU (written next).
fn main() {}
