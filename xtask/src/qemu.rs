//! Finding (or installing) `qemu-system-x86_64` for the tasks that need a real QEMU.

use std::path::PathBuf;
use std::process::Command;

/// The QEMU binary the real-QEMU tasks use: `$QEMU` if set, else `qemu-system-x86_64` on PATH.
pub fn binary() -> PathBuf {
    std::env::var_os("QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// Makes sure QEMU runs: installs Debian's `qemu-system-x86` when missing and running as root,
/// otherwise fails with the exact command to run.
pub fn ensure_installed() -> Result<(), String> {
    let qemu = binary();
    if Command::new(&qemu)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    const INSTALL: &str = "apt-get update && apt-get install -y qemu-system-x86";
    if !nix::unistd::geteuid().is_root() {
        return Err(format!(
            "{} not found; install it with: sudo sh -c '{INSTALL}'",
            qemu.display()
        ));
    }
    eprintln!("xtask: {} not found, running: {INSTALL}", qemu.display());
    let status = Command::new("sh")
        .args(["-c", INSTALL])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if !status.success() {
        return Err(format!("`{INSTALL}` failed: {status}"));
    }
    match Command::new(&qemu).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => Err(format!(
            "{} still does not run after installing",
            qemu.display()
        )),
    }
}
