//! End-to-end scenarios for the console area: `console_socket::Console` against a real QEMU.
//!
//! QEMU's own HMP monitor (`-mon chardev=con,mode=readline`) is the text peer on the console
//! channel, so these scenarios need no guest: it prints a banner and a `(qemu) ` prompt without a
//! newline, echoes input, answers commands, floods on demand (`help` is about 11 KB) and closes
//! the channel when QEMU exits on `quit`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use console_socket::{Config, Console, Error, Pattern};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};

use super::{Accel, Ctx, Scenario};

/// The scenarios of this area.
pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "console-hmp-socketpair",
            accels: &[Accel::Tcg, Accel::Kvm],
            timeout: Duration::from_secs(30),
            run: hmp_socketpair,
        },
        Scenario {
            name: "console-hmp-flood-unread",
            accels: &[Accel::Tcg],
            timeout: Duration::from_secs(60),
            run: hmp_flood_unread,
        },
        Scenario {
            name: "console-hmp-connect-path",
            accels: &[Accel::Tcg],
            timeout: Duration::from_secs(30),
            run: hmp_connect_path,
        },
    ]
}

/// The prompt HMP prints, without a newline after it.
const PROMPT: &str = "(qemu) ";

/// A QEMU process that is killed (if still running) and reaped when dropped, so no scenario
/// leaves one behind, whatever fails.
struct Qemu {
    child: Child,
    status: Option<ExitStatus>,
}

impl Qemu {
    /// Spawns `qemu -M none -nodefaults -display none <accel> <extra>`, stdio to /dev/null
    /// (stderr kept for diagnostics in the error path is not needed: HMP talks on the console).
    fn spawn(ctx: &Ctx, extra: &[String]) -> Result<Qemu, String> {
        let child = Command::new(&ctx.qemu)
            .args(["-M", "none", "-nodefaults", "-display", "none"])
            .args(["-accel", ctx.accel.as_str()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", ctx.qemu.display()))?;
        Ok(Qemu {
            child,
            status: None,
        })
    }

    /// Spawns QEMU with `fd` inherited under its own number (its close-on-exec flag cleared
    /// for the exec only: our copy is closed right after, so only QEMU holds that end).
    fn spawn_with_fd(ctx: &Ctx, fd: OwnedFd, extra: &[String]) -> Result<Qemu, String> {
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::empty()))
            .map_err(|e| format!("cannot clear FD_CLOEXEC on fd {}: {e}", fd.as_raw_fd()))?;
        let qemu = Qemu::spawn(ctx, extra);
        drop(fd);
        qemu
    }

    /// Waits for QEMU to exit by `deadline`.
    fn wait_until(&mut self, deadline: Instant) -> Result<ExitStatus, String> {
        loop {
            if let Some(status) = self.status {
                return Ok(status);
            }
            self.status = self
                .child
                .try_wait()
                .map_err(|e| format!("cannot wait for qemu: {e}"))?;
            if self.status.is_none() {
                if Instant::now() >= deadline {
                    return Err("qemu still running at the deadline".into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.status.is_none() {
            // Fails only if it already exited; the wait reaps it either way.
            let _ = self.child.kill();
            if let Err(e) = self.child.wait() {
                log::warn!("cannot reap qemu {}: {e}", self.child.id());
            }
        }
    }
}

/// `Err(String)` from a console error, naming the step.
fn step<T>(what: &str, r: console_socket::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// A socketpair: ours, and QEMU's end as an `OwnedFd`.
fn socketpair() -> Result<(UnixStream, OwnedFd), String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    Ok((ours, OwnedFd::from(theirs)))
}

/// Sends `quit` and checks that the console reports the end promptly and QEMU exits 0.
fn quit_and_expect_closed(ctx: &Ctx, qemu: &mut Qemu, console: &mut Console) -> Result<(), String> {
    step("send quit", console.send_line("quit"))?;
    let sent = Instant::now();
    let remaining = ctx.deadline.saturating_duration_since(sent);
    match console.wait_for(&Pattern::substring("never printed"), remaining) {
        Err(Error::Closed { reason, .. }) => {
            let lag = sent.elapsed();
            ctx_note(ctx, &format!("quit -> Closed ({reason}) in {lag:?}"));
            if lag > Duration::from_secs(2) {
                return Err(format!("Closed came {lag:?} after quit"));
            }
        }
        other => return Err(format!("after quit expected Closed, got {other:?}")),
    }
    let status = qemu.wait_until(ctx.deadline)?;
    if !status.success() {
        return Err(format!("qemu exited with {status} after quit"));
    }
    Ok(())
}

/// Logs a measurement (the harness prints pass/FAIL lines; details go to the log).
fn ctx_note(ctx: &Ctx, text: &str) {
    log::info!("[{}] {text}", ctx.accel.as_str());
}

/// Checks the log file holds exactly `total` bytes and contains each of `needles`.
fn check_log(log: &Path, total: u64, needles: &[&str]) -> Result<(), String> {
    let bytes = std::fs::read(log).map_err(|e| format!("cannot read {}: {e}", log.display()))?;
    if bytes.len() as u64 != total {
        return Err(format!(
            "log holds {} bytes, the console read {total}",
            bytes.len()
        ));
    }
    let text = String::from_utf8_lossy(&bytes);
    for needle in needles {
        if !text.contains(needle) {
            return Err(format!("log lacks {needle:?}: {text:?}"));
        }
    }
    Ok(())
}

/// HMP on a socketpair handed over as `fd=N`: banner, prompt, `info version`, `quit`.
fn hmp_socketpair(ctx: &Ctx) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let log = dir.path().join("console.log");
    let (ours, theirs) = socketpair()?;
    let fd = theirs.as_raw_fd();
    let mut qemu = Qemu::spawn_with_fd(
        ctx,
        theirs,
        &[
            "-chardev".into(),
            format!("socket,id=con,fd={fd}"),
            "-mon".into(),
            "chardev=con,mode=readline".into(),
        ],
    )?;
    let started = Instant::now();
    let mut console = step(
        "attach console",
        Console::from_unix_stream(ours, Config::default().with_log_file(&log)),
    )?;

    let prompt = Pattern::substring(PROMPT);
    let banner = step("first prompt", console.wait_for(&prompt, remaining(ctx)))?;
    ctx_note(ctx, &format!("first prompt after {:?}", started.elapsed()));
    if !banner.text_lossy().contains("QEMU 7.2") {
        return Err(format!("unexpected banner {:?}", banner.text_lossy()));
    }

    let version = step(
        "info version",
        console.exec_and_wait("info version", &Pattern::substring("7.2"), remaining(ctx)),
    )?;
    // The echo of the command comes first, then the answer.
    if !version.text_lossy().contains("info version") {
        return Err(format!(
            "no echo before the answer: {:?}",
            version.text_lossy()
        ));
    }
    let rest = step("answer line", console.read_line(remaining(ctx)))?;
    let answer = format!("7.2{}", String::from_utf8_lossy(&rest));
    if !answer.starts_with("7.2.") {
        return Err(format!("unexpected version line {answer:?}"));
    }
    ctx_note(ctx, &format!("info version: {answer}"));
    step(
        "prompt after info version",
        console.wait_for(&prompt, remaining(ctx)),
    )?;

    quit_and_expect_closed(ctx, &mut qemu, &mut console)?;
    let total = console.bytes_total();
    step("close console", console.close())?;
    check_log(&log, total, &["QEMU 7.2", PROMPT, &answer, "quit"])
}

/// Time left before the scenario's deadline (zero once past it).
fn remaining(ctx: &Ctx) -> Duration {
    ctx.deadline.saturating_duration_since(Instant::now())
}

/// W1 against real QEMU: we ask for about 700 KB of output and do not read any of it; the
/// drain keeps QEMU going (the monitor stays responsive), memory stays at the configured
/// 64 KiB, and the log gets every byte.
fn hmp_flood_unread(ctx: &Ctx) -> Result<(), String> {
    const HELPS: usize = 64;
    const CAPACITY: usize = 64 * 1024;
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let log = dir.path().join("console.log");
    let (ours, theirs) = socketpair()?;
    let fd = theirs.as_raw_fd();
    let mut qemu = Qemu::spawn_with_fd(
        ctx,
        theirs,
        &[
            "-chardev".into(),
            format!("socket,id=con,fd={fd}"),
            "-mon".into(),
            "chardev=con,mode=readline".into(),
        ],
    )?;
    let mut console = step(
        "attach console",
        Console::from_unix_stream(
            ours,
            Config::default()
                .with_log_file(&log)
                .with_buffer_capacity(CAPACITY),
        ),
    )?;
    step(
        "first prompt",
        console.wait_for(&Pattern::substring(PROMPT), remaining(ctx)),
    )?;

    // All commands in one write, then no reads until the end.
    let started = Instant::now();
    let mut burst = "help\r".repeat(HELPS);
    burst.push_str("info version\r");
    step("send the burst", console.send(burst.as_bytes()))?;
    // `info version` runs only after every `help` has been written out: its answer (a line
    // starting with the version) proves QEMU never stalled on the unread output.
    let answer = Pattern::regex(r"\r\n7\.2\.\d+").map_err(|e| e.to_string())?;
    step(
        "answer after the flood",
        console.wait_for(&answer, remaining(ctx)),
    )?;
    let took = started.elapsed();
    let total = console.bytes_total();
    if total < (HELPS * 10_000) as u64 {
        return Err(format!("only {total} bytes for {HELPS} helps"));
    }
    if console.buffer_len() > CAPACITY {
        return Err(format!("buffer grew to {}", console.buffer_len()));
    }
    ctx_note(
        ctx,
        &format!(
            "{total} bytes unread in {took:?}, {} dropped from memory",
            console.bytes_dropped()
        ),
    );
    if console.bytes_dropped() == 0 {
        return Err(format!(
            "{total} bytes fit in {CAPACITY}: the flood was too small"
        ));
    }

    quit_and_expect_closed(ctx, &mut qemu, &mut console)?;
    let total = console.bytes_total();
    step("close console", console.close())?;
    check_log(&log, total, &["announce_self", "info version"])
}

/// QEMU listens on a path (`server=on,wait=off`); `Console::connect` retries until it exists.
fn hmp_connect_path(ctx: &Ctx) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let path = dir.path().join("con.sock");
    let mut qemu = Qemu::spawn(
        ctx,
        &[
            "-chardev".into(),
            format!("socket,id=con,path={},server=on,wait=off", path.display()),
            "-mon".into(),
            "chardev=con,mode=readline".into(),
        ],
    )?;
    let started = Instant::now();
    let mut console = step(
        "connect",
        Console::connect(
            &path,
            Config::default().with_connect_timeout(remaining(ctx)),
        ),
    )?;
    ctx_note(ctx, &format!("connected after {:?}", started.elapsed()));
    step(
        "first prompt",
        console.wait_for(&Pattern::substring(PROMPT), remaining(ctx)),
    )?;
    step(
        "info version",
        console.exec_and_wait("info version", &Pattern::substring("7.2"), remaining(ctx)),
    )?;
    quit_and_expect_closed(ctx, &mut qemu, &mut console)?;
    step("close console", console.close())?;
    // QEMU removes its socket when it exits; make sure nothing is left for the leak check.
    if path.exists() {
        std::fs::remove_file(&path).map_err(|e| format!("remove {}: {e}", path.display()))?;
    }
    Ok(())
}
