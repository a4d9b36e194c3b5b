//! End-to-end scenarios for the console area: `console_socket::Console` against a real QEMU.
//!
//! QEMU's own HMP monitor (`-mon chardev=con,mode=readline`) is the text peer on the console
//! channel, so these scenarios need no guest: it prints a banner and a `(qemu) ` prompt without a
//! newline, echoes input, answers commands, floods on demand (`help` is about 11 KB) and closes
//! the channel when QEMU exits on `quit`.

use std::path::Path;
use std::time::{Duration, Instant};

use console_socket::{Config, Console, Error, Pattern};

use super::{describe_status, socketpair, Accel, Ctx, QemuChild, Scenario};

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

/// Starts `qemu -M none -nodefaults -display none -accel A` with HMP on a socketpair handed
/// over as `fd=N` (QEMU's end is closed on our side once QEMU has it), and attaches a
/// [`Console`] to our end. The returned [`QemuChild`] kills and reaps QEMU when dropped.
fn spawn_hmp_on_socketpair(ctx: &Ctx, config: Config) -> Result<(QemuChild, Console), String> {
    let (ours, theirs) = socketpair()?;
    let mut cmd = ctx.qemu_command();
    let fd = cmd.pass_fd(theirs);
    cmd.args(["-M", "none", "-nodefaults", "-display", "none"])
        .args(ctx.accel_args())
        .args(["-chardev", &format!("socket,id=con,fd={fd}")])
        .args(["-mon", "chardev=con,mode=readline"]);
    let qemu = cmd.spawn()?;
    let console = step("attach console", Console::from_unix_stream(ours, config))?;
    Ok((qemu, console))
}

/// `Err(String)` from a console error, naming the step.
fn step<T>(what: &str, r: console_socket::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Sends `quit` and checks that the console reports the end promptly and QEMU exits 0.
fn quit_and_expect_closed(
    ctx: &Ctx,
    qemu: &mut QemuChild,
    console: &mut Console,
) -> Result<(), String> {
    step("send quit", console.send_line("quit"))?;
    let sent = Instant::now();
    match console.wait_for(&Pattern::substring("never printed"), ctx.remaining()) {
        Err(Error::Closed { reason, .. }) => {
            let lag = sent.elapsed();
            ctx.note(format!("quit -> console Closed ({reason}) in {lag:?}"));
            if lag > Duration::from_secs(2) {
                return Err(format!("Closed came {lag:?} after quit"));
            }
        }
        other => return Err(format!("after quit expected Closed, got {other:?}")),
    }
    let status = qemu.wait_until(ctx.deadline)?;
    if !status.success() {
        return Err(format!(
            "qemu exited with {} after quit; log: {}",
            describe_status(status),
            qemu.log_tail()
        ));
    }
    Ok(())
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
    let log = ctx.scratch.join("console.log");
    let (mut qemu, mut console) =
        spawn_hmp_on_socketpair(ctx, Config::default().with_log_file(&log))?;

    let prompt = Pattern::substring(PROMPT);
    let banner = step("first prompt", console.wait_for(&prompt, ctx.remaining()))?;
    ctx.note(format!(
        "exec -> first (qemu) prompt {:?}",
        qemu.started().elapsed()
    ));
    let release = ctx.qemu_major_minor();
    let banner_start = format!("QEMU {release}");
    if !banner.text_lossy().contains(&banner_start) {
        return Err(format!(
            "unexpected banner {:?} (expected {banner_start:?})",
            banner.text_lossy()
        ));
    }

    let version = step(
        "info version",
        console.exec_and_wait(
            "info version",
            &Pattern::substring(&release),
            ctx.remaining(),
        ),
    )?;
    // The echo of the command comes first, then the answer.
    if !version.text_lossy().contains("info version") {
        return Err(format!(
            "no echo before the answer: {:?}",
            version.text_lossy()
        ));
    }
    let rest = step("answer line", console.read_line(ctx.remaining()))?;
    let answer = format!("{release}{}", String::from_utf8_lossy(&rest));
    if !answer.starts_with(&format!("{release}.")) {
        return Err(format!("unexpected version line {answer:?}"));
    }
    ctx.note(format!("info version: {answer}"));
    step(
        "prompt after info version",
        console.wait_for(&prompt, ctx.remaining()),
    )?;

    quit_and_expect_closed(ctx, &mut qemu, &mut console)?;
    let total = console.bytes_total();
    step("close console", console.close())?;
    check_log(&log, total, &[&banner_start, PROMPT, &answer, "quit"])
}

/// The back-pressure deadlock of QEMU's Python `qemu.machine`'s console, against real QEMU: we ask for about 700 KB of output and do not read any of it; the
/// drain keeps QEMU going (the monitor stays responsive), memory stays at the configured
/// 64 KiB, and the log gets every byte.
fn hmp_flood_unread(ctx: &Ctx) -> Result<(), String> {
    const HELPS: usize = 64;
    const CAPACITY: usize = 64 * 1024;
    let log = ctx.scratch.join("console.log");
    let (mut qemu, mut console) = spawn_hmp_on_socketpair(
        ctx,
        Config::default()
            .with_log_file(&log)
            .with_buffer_capacity(CAPACITY),
    )?;
    step(
        "first prompt",
        console.wait_for(&Pattern::substring(PROMPT), ctx.remaining()),
    )?;

    // All commands in one write, then no reads until the end.
    let started = Instant::now();
    let mut burst = "help\r".repeat(HELPS);
    burst.push_str("info version\r");
    step("send the burst", console.send(burst.as_bytes()))?;
    // `info version` runs only after every `help` has been written out: its answer (a line
    // starting with the version) proves QEMU never stalled on the unread output.
    let release = ctx.qemu_major_minor().replace('.', r"\.");
    let answer = Pattern::regex(&format!(r"\r\n{release}\.\d+")).map_err(|e| e.to_string())?;
    step(
        "answer after the flood",
        console.wait_for(&answer, ctx.remaining()),
    )?;
    let took = started.elapsed();
    let total = console.bytes_total();
    if total < (HELPS * 10_000) as u64 {
        return Err(format!("only {total} bytes for {HELPS} helps"));
    }
    if console.buffer_len() > CAPACITY {
        return Err(format!("buffer grew to {}", console.buffer_len()));
    }
    ctx.note(format!(
        "{total} bytes of HMP output unread for {took:?}, {} dropped from memory, all logged",
        console.bytes_dropped()
    ));
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
    let path = ctx.scratch.join("con.sock");
    let mut cmd = ctx.qemu_command();
    cmd.args(["-M", "none", "-nodefaults", "-display", "none"])
        .args(ctx.accel_args())
        .args([
            "-chardev",
            &format!("socket,id=con,path={},server=on,wait=off", path.display()),
        ])
        .args(["-mon", "chardev=con,mode=readline"]);
    let mut qemu = cmd.spawn()?;
    let started = Instant::now();
    let mut console = step(
        "connect",
        Console::connect(
            &path,
            Config::default().with_connect_timeout(ctx.remaining()),
        ),
    )?;
    ctx.note(format!(
        "connected to the path after {:?}",
        started.elapsed()
    ));
    step(
        "first prompt",
        console.wait_for(&Pattern::substring(PROMPT), ctx.remaining()),
    )?;
    step(
        "info version",
        console.exec_and_wait(
            "info version",
            &Pattern::substring(ctx.qemu_major_minor()),
            ctx.remaining(),
        ),
    )?;
    quit_and_expect_closed(ctx, &mut qemu, &mut console)?;
    step("close console", console.close())?;
    // QEMU removes its socket when it exits; make sure nothing is left for the leak check.
    if path.exists() {
        std::fs::remove_file(&path).map_err(|e| format!("remove {}: {e}", path.display()))?;
    }
    Ok(())
}
