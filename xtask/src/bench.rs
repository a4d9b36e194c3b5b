//! `cargo xtask bench`: runs every crate's benchmark targets in release mode.
//!
//! Each benchmark is a `harness = false` target in its own crate's `benches/` that prints its
//! figure beside a baseline measured in the same run; this task only runs them all.

use crate::cargo;

/// Runs `cargo bench --workspace --benches`, passing any extra arguments to the bench binaries.
pub fn run(args: &[String]) -> Result<(), String> {
    crate::qemu::ensure_installed()?;
    let mut cargo_args = vec!["bench", "--workspace", "--benches"];
    if !args.is_empty() {
        cargo_args.push("--");
        cargo_args.extend(args.iter().map(String::as_str));
    }
    cargo(&cargo_args, &[])
}
