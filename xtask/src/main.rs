//! `cargo xtask`: the developer entry points of the workspace.
//!
//! - `cargo xtask ci`: everything CI checks (format, lints, docs, the workspace rules, tests of
//!   the workspace and of each crate alone, the real-QEMU suite).
//! - `cargo xtask tidy`: the rules of ARCHITECTURE.md a program can check (dependency arrows,
//!   `unsafe` only in `sys`, no printing in libraries, a `//!` line opening every file).
//! - `cargo xtask e2e [--qemu system|10.0|11.1|all|PATH] [--accel tcg|kvm|both] [--filter TEXT]`:
//!   the real-QEMU end-to-end suite, against the system's QEMU or the cached other versions.
//! - `cargo xtask qemu [system|10.0|11.1|all|PATH]`: builds the cached QEMU versions (root) and
//!   prints each binary's path and version.
//! - `cargo xtask record [--qemu ...] [--out DIR]`: QMP transcripts of each QEMU for the
//!   offline replay tests (`qmp_client::replay`).
//! - `cargo xtask bench [--quick] [--filter TEXT] [--json FILE]`: every benchmark in one table,
//!   each figure beside a baseline from the same run.
//! - `cargo xtask fuzz --seconds N`: the cargo-fuzz targets, N seconds each.
//! - `cargo xtask reliability [--quick] [--json FILE]`: the fault catalogue's measured figures.
//! - `cargo xtask catalogue`: checks that `RELIABILITY.md` has every catalogue case and that
//!   every test it cites exists.

mod bench;
mod catalogue;
mod ci;
mod e2e;
mod fuzz;
mod qemu;
mod record;
mod reliability;
mod tidy;
mod versions;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <ci | tidy | catalogue | e2e [--qemu system|10.0|11.1|all|PATH] [--accel tcg|kvm|both] [--filter TEXT] | record [--qemu ...] [--out DIR] | qemu [system|10.0|11.1|all|PATH] | bench [--quick] [--filter TEXT] [--json FILE] | fuzz [--seconds N] [--target NAME] | reliability [--quick] [--json FILE]>";

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((task, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match task.as_str() {
        "ci" => ci::run(rest),
        "tidy" => tidy::run(rest),
        "e2e" => e2e::run(rest),
        "bench" => bench::run(rest),
        "fuzz" => fuzz::run(rest),
        "reliability" => reliability::run(rest),
        "record" => record::run(rest),
        "qemu" => versions::run(rest),
        "catalogue" => catalogue::run(rest),
        // Internal: the security figure runs it as another user.
        "connect-probe" => reliability::connect_probe(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown task `{other}`\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask {task}: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Runs `cargo` with `args` in the workspace root, inheriting stdio; Ok when it exits 0.
pub fn cargo(args: &[&str], envs: &[(&str, &str)]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(args).current_dir(workspace_root());
    for (key, value) in envs {
        cmd.env(key, value);
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run cargo {}: {e}", args.join(" ")))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo {} failed: {status}", args.join(" ")))
    }
}
