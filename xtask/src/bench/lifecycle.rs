//! `lifecycle/cycle`: launch -> `query-status` -> shutdown on `-M none -accel tcg` with
//! `Machine`, beside the same cycle with no library at all (socketpair, greeting, negotiation,
//! query, `quit`, reap by hand), one of each per round, order alternating.
//! Target: at most 0.3 ms more per cycle (median of the paired differences).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use machine_core::MachineBuilder;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};

use super::{measure, Cpu, Figure, Settings, Target};

/// Measures the cycle, if `settings` selects it.
pub fn run(settings: &Settings) -> Result<Vec<Figure>, String> {
    let mut figure = Figure::new(
        "lifecycle/cycle",
        "launch -> query -> shutdown, `-M none`",
        "ms",
        "machine_core::Machine",
        "raw spawn + QMP by hand",
        Target::DiffAtMost(0.3),
    );
    if !settings.wants(&figure.id, &figure.name) {
        return Ok(Vec::new());
    }
    let cycles = settings.pick(40, 4);
    let base = settings.scratch.join("lifecycle");
    std::fs::create_dir_all(&base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    // Warm-up: page cache, lazy statics.
    for _ in 0..2 {
        raw_cycle().map_err(|e| format!("raw cycle: {e}"))?;
        machine_cycle(&base)?;
    }
    for round in 0..cycles {
        for raw in [round % 2 == 0, round % 2 == 1] {
            if raw {
                let (result, wall, cpu) = measure(Cpu::process, raw_cycle);
                result.map_err(|e| format!("raw cycle: {e}"))?;
                figure.baseline.push(ms(wall), cpu, 1);
            } else {
                let (result, wall, cpu) = measure(Cpu::process, || machine_cycle(&base));
                result?;
                figure.ours.push(ms(wall), cpu, 1);
            }
        }
    }
    figure.notes.push(format!(
        "{cycles} cycles per side; CPU: this process (all threads) per cycle, QEMU's not counted"
    ));
    Ok(vec![figure])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One cycle with `Machine`.
fn machine_cycle(base: &Path) -> Result<(), String> {
    let mut m = MachineBuilder::new(crate::qemu::binary())
        .machine_type("none")
        .args(["-nodefaults", "-accel", "tcg"])
        .base_temp_dir(base)
        .build();
    m.launch().map_err(|e| format!("launch: {e}"))?;
    let status = m
        .cmd("query-status", ())
        .map_err(|e| format!("query-status: {e}"))?;
    if status["status"] != "running" {
        return Err(format!("query-status returned {status}"));
    }
    let report = m.shutdown().map_err(|e| format!("shutdown: {e}"))?;
    if !report.status.success() {
        return Err(format!("QEMU ended with {}", report.status));
    }
    Ok(())
}

/// One cycle with no library: QEMU spawned by `std::process::Command` (which can use
/// `posix_spawn`), its monitor end made inheritable by clearing close-on-exec.
fn raw_cycle() -> io::Result<()> {
    let (mut ours, theirs) = UnixStream::pair()?;
    fcntl(&theirs, FcntlArg::F_SETFD(FdFlag::empty())).map_err(io::Error::from)?;
    let child = raw_command(theirs.as_raw_fd()).spawn()?;
    let mut child = Reaped(child);
    drop(theirs);
    ours.set_read_timeout(Some(Duration::from_secs(10)))?;
    read_line(&mut ours)?;
    ours.write_all(br#"{"execute":"qmp_capabilities"}"#)?;
    read_reply(&mut ours)?;
    ours.write_all(br#"{"execute":"query-status"}"#)?;
    let reply = read_reply(&mut ours)?;
    if !reply.contains("running") {
        return Err(io::Error::other(format!("query-status: {reply}")));
    }
    ours.write_all(br#"{"execute":"quit"}"#)?;
    let mut rest = Vec::new();
    match ours.read_to_end(&mut rest) {
        Ok(_) => {}
        // QEMU exits with our last byte unread, which resets the connection (qemu-facts).
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(e),
    }
    let status = child.0.wait()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("QEMU ended with {status}")))
    }
}

/// QEMU on `-M none` under TCG with its monitor on `monitor_fd` (which must be inheritable)
/// and no output: the command of the no-library baselines (here and in the fleet figures).
pub(super) fn raw_command(monitor_fd: RawFd) -> Command {
    let mut command = Command::new(crate::qemu::binary());
    command
        .args(["-display", "none", "-vga", "none", "-chardev"])
        .arg(format!("socket,id=mon,fd={monitor_fd}"))
        .args(["-mon", "chardev=mon,mode=control"])
        .args(["-machine", "none", "-nodefaults", "-accel", "tcg"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// Kills and reaps the raw cycle's QEMU if the cycle fails half-way (`wait` reaps it first on
/// success, and then the kill does nothing).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads one line byte by byte (a baseline must not read past the line; QEMU's are short).
fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
    }
}

/// Reads lines until one that is not an event.
fn read_reply(stream: &mut UnixStream) -> io::Result<String> {
    loop {
        let line = read_line(stream)?;
        // An event (`{"timestamp": ..., "event": ...}`) is not the reply.
        if !line.contains("\"event\"") {
            return Ok(line);
        }
    }
}
