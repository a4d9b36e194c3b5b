//! QEMU's Python QMP client as the anchor beside ours: `qemu.qmp` from PyPI, installed by this
//! task into a private venv under `target/`, running `qemu_qmp_anchor.py` on a monitor of the
//! same QEMU, block by block when asked, so its rounds interleave with ours.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::e2e::{QemuChild, QemuCommand};

use super::Cpu;

/// The anchor's version: the maintained upstream of QEMU's `python/qemu/qmp`.
pub const PACKAGE: &str = "qemu.qmp==0.0.6";
/// How the anchor is named in the table.
pub const NAME: &str = "qemu.qmp 0.0.6 (Python)";

const SCRIPT: &str = include_str!("qemu_qmp_anchor.py");

/// A running anchor client.
pub struct Anchor {
    // Field order: the control socket closes before the process is killed and reaped.
    control: BufReader<UnixStream>,
    child: QemuChild,
}

/// One block's result: wall time, the Python process's CPU time, events received.
pub struct Block {
    /// Wall time of the loop, measured inside Python.
    pub wall: Duration,
    /// The Python process's CPU time over the loop.
    pub cpu: Cpu,
    /// Events received (the event loop only).
    pub received: u64,
}

impl Anchor {
    /// Installs the venv if needed and starts the client on `monitor` (our end of a QMP
    /// socketpair whose other end QEMU has). Err says why the anchor cannot run here.
    pub fn start(monitor: OwnedFd, scratch: &Path) -> Result<Anchor, String> {
        let python = venv_python()?;
        let script = scratch.join("qemu_qmp_anchor.py");
        std::fs::write(&script, SCRIPT)
            .map_err(|e| format!("cannot write {}: {e}", script.display()))?;
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| format!("cannot create a socketpair: {e}"))?;
        ours.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| format!("set_read_timeout: {e}"))?;
        let mut cmd = QemuCommand::new(python, scratch.join("python-anchor.log"));
        cmd.arg(&script);
        let monitor_fd = cmd.pass_fd(monitor);
        let control_fd = cmd.pass_fd(OwnedFd::from(theirs));
        if (monitor_fd, control_fd) != (3, 4) {
            return Err(format!(
                "the anchor expects fds 3 and 4, got {monitor_fd} and {control_fd}"
            ));
        }
        let child = cmd.spawn()?;
        Ok(Anchor {
            control: BufReader::new(ours),
            child,
        })
    }

    /// Runs `count` round trips (`roundtrip`) or stop/cont pairs (`events`).
    pub fn run(&mut self, what: &str, count: usize) -> Result<Block, String> {
        let fail = |this: &Anchor, e: String| {
            format!("python anchor: {e}; its log: {}", this.child.log_tail())
        };
        let request = format!("{what} {count}\n");
        if let Err(e) = self.control.get_mut().write_all(request.as_bytes()) {
            return Err(fail(self, format!("write: {e}")));
        }
        let mut line = String::new();
        match self.control.read_line(&mut line) {
            Ok(0) => return Err(fail(self, "ended without an answer".to_string())),
            Err(e) => return Err(fail(self, format!("read: {e}"))),
            Ok(_) => {}
        }
        let numbers: Vec<u64> = line
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        let [wall, user, system, received] = numbers[..] else {
            return Err(fail(self, format!("unexpected answer {line:?}")));
        };
        Ok(Block {
            wall: Duration::from_nanos(wall),
            cpu: Cpu::from_parts(Duration::from_nanos(user), Duration::from_nanos(system)),
            received,
        })
    }

    /// Asks the client to disconnect and waits for it to end (killed after 10 s).
    pub fn quit(mut self) -> Result<(), String> {
        let _ = self.control.get_mut().write_all(b"quit\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        match self.child.wait_until(deadline) {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!(
                "python anchor exited with {status}; its log: {}",
                self.child.log_tail()
            )),
            Err(e) => Err(e),
        }
    }
}

/// The venv's python with `qemu.qmp` importable, creating the venv (`python3 -m venv`, then
/// `pip install qemu.qmp==0.0.6` from PyPI) under `target/bench-venv` when needed.
pub(crate) fn venv_python() -> Result<PathBuf, String> {
    let venv = crate::workspace_root().join("target/bench-venv");
    let python = venv.join("bin/python");
    let importable = |python: &Path| {
        Command::new(python)
            .args([
                "-c",
                "from qemu.qmp import EventListener, ExecuteError, QMPClient",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if importable(&python) {
        return Ok(python);
    }
    let run = |program: &Path, args: &[&str]| -> Result<(), String> {
        let shown = format!("{} {}", program.display(), args.join(" "));
        eprintln!("xtask bench: {shown}");
        let out = Command::new(program)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {shown}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{shown} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    // A venv left half-made (a full disk, an interrupted pip) is removed and made again, and
    // one that fails now is removed too, so no later run picks up a broken install.
    let remove = || match std::fs::remove_dir_all(&venv) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("cannot remove {}: {e}", venv.display()))
        }
        _ => Ok(()),
    };
    remove()?;
    let venv_arg = venv.to_string_lossy().into_owned();
    let made = run(Path::new("python3"), &["-m", "venv", &venv_arg])
        .and_then(|()| {
            run(
                &venv.join("bin/pip"),
                &["install", "--quiet", "--disable-pip-version-check", PACKAGE],
            )
        })
        .and_then(|()| {
            if importable(&python) {
                Ok(())
            } else {
                Err(format!(
                    "{PACKAGE} installed but `from qemu.qmp import ...` fails"
                ))
            }
        });
    match made {
        Ok(()) => Ok(python),
        Err(why) => {
            remove()?;
            Err(why)
        }
    }
}
