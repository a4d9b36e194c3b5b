//! Finding (or installing) `qemu-system-x86_64` for the tasks that need a real QEMU, and
//! reporting what it can do here (version, accelerators, whether KVM really works).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// The first line of `qemu-system-x86_64 --version`, e.g. `QEMU emulator version 7.2.22 (...)`.
pub fn version(qemu: &Path) -> Result<String, String> {
    let out = Command::new(qemu)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {} --version: {e}", qemu.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed: {}",
            qemu.display(),
            out.status
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

/// The accelerators compiled into the binary (`-accel help`), e.g. `["tcg", "kvm"]`.
pub fn accelerators(qemu: &Path) -> Result<Vec<String>, String> {
    let out = Command::new(qemu)
        .args(["-accel", "help"])
        .output()
        .map_err(|e| format!("cannot run {} -accel help: {e}", qemu.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} -accel help failed: {}",
            qemu.display(),
            out.status
        ));
    }
    // The first line is a heading ("Accelerators supported in QEMU binary:").
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect())
}

/// Whether KVM really works: `/dev/kvm` opens read-write, and QEMU starts `-M none -accel kvm`
/// and quits through QMP on stdio within 10 s. Ok carries how long the QEMU probe took; Err why
/// KVM is unusable.
pub fn probe_kvm(qemu: &Path) -> Result<Duration, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    probe_accel(qemu, "kvm")
}

/// Whether QEMU starts `-M none -accel NAME` and quits through QMP on stdio within 10 s (`-accel
/// help` is no proof: QEMU 11.1 has the qtest accelerator but does not list it). Ok carries how
/// long the probe took; Err why the accelerator is unusable.
pub fn probe_accel(qemu: &Path, accel: &str) -> Result<Duration, String> {
    let started = Instant::now();
    let mut child = Command::new(qemu)
        .args([
            "-M",
            "none",
            "-accel",
            accel,
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    // QEMU reads the commands once its monitor is up; it exits after `quit`, or at once with an
    // error when KVM cannot be used. Closing stdin afterwards is harmless either way.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
    }
    let deadline = started + Duration::from_secs(10);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("qemu -accel {accel} did not quit within 10 s"));
            }
            Err(e) => return Err(format!("cannot wait for qemu: {e}")),
        }
    };
    let elapsed = started.elapsed();
    if status.success() {
        Ok(elapsed)
    } else {
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        Err(format!(
            "qemu -accel {accel} exited with {status}: {}",
            stderr.trim()
        ))
    }
}

/// The version number in a `--version` line: `7.2.22` from `QEMU emulator version 7.2.22 (...)`.
pub fn version_number(line: &str) -> &str {
    line.strip_prefix("QEMU emulator version ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or(line)
}

/// The `-compat` policy the suite and the recorder run QEMU under (where QEMU has `-compat`):
/// deprecated commands and arguments are refused, deprecated output is left out, so nothing
/// we do depends on them.
pub const COMPAT: &str = "deprecated-input=reject,deprecated-output=hide";

/// Whether the binary has `-compat` (QEMU 6.0 and later), from its `-help` text.
pub fn has_compat(qemu: &Path) -> Result<bool, String> {
    let out = Command::new(qemu)
        .arg("-help")
        .output()
        .map_err(|e| format!("cannot run {} -help: {e}", qemu.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|line| line.starts_with("-compat ")))
}

/// The Linux test guest (`machine_core::linux`), cached under `target/`: built when missing.
/// A missing package list is fixed by running `apt-get update` once when running as root;
/// otherwise the error says which command to run.
pub fn ensure_linux_guest() -> Result<machine_core::linux::LinuxGuest, String> {
    use machine_core::linux::LinuxGuest;
    let cache = crate::workspace_root().join("target");
    let started = Instant::now();
    let first = LinuxGuest::ensure(&cache);
    let guest = match first {
        Ok(guest) => guest,
        Err(machine_core::Error::GuestPackages { what, fix })
            if nix::unistd::geteuid().is_root() =>
        {
            eprintln!("xtask: {what}; running apt-get update and trying again");
            let status = Command::new("apt-get")
                .args(["update", "-qq"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .map_err(|e| format!("cannot run apt-get update: {e}"))?;
            if !status.success() {
                return Err(format!("apt-get update failed ({status}); then run: {fix}"));
            }
            LinuxGuest::ensure(&cache).map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    };
    let took = started.elapsed();
    if took > Duration::from_secs(1) {
        eprintln!(
            "xtask: built the Linux test guest in {:.1} s: {}",
            took.as_secs_f64(),
            guest.dir().display()
        );
    }
    Ok(guest)
}
