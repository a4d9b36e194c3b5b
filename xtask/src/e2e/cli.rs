//! End-to-end scenarios for the cli area: the built `qemu-machine` binary against the real
//! `qemu-system-x86_64`. `run` boots the tiny guest (non-interactive: `--exit-after-banner`,
//! `--send`, SIGINT); `qmp`, `events` and `shell` (piped stdin) talk to a QEMU started by
//! `run --qmp-listen`; `wrap` launches its own.
//!
//! The binary is built once (debug profile, the same target directory as xtask) by the first
//! scenario that needs it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use machine_core::guest;
use serde_json::Value;

use super::{check, Accel, Ctx, Scenario};

const TCG: &[Accel] = &[Accel::Tcg];
const BOTH: &[Accel] = &[Accel::Tcg, Accel::Kvm];

/// The scenarios of this area.
pub fn scenarios() -> Vec<Scenario> {
    let s = |name, accels, secs, run| Scenario {
        name,
        accels,
        timeout: Duration::from_secs(secs),
        run,
    };
    // The first one may have to build the binary.
    vec![
        s(
            "cli_run_tiny_guest_banner_then_clean_exit",
            BOTH,
            300,
            run_banner_exit,
        ),
        s(
            "cli_run_exit_status_from_guest",
            TCG,
            60,
            run_guest_exit_status,
        ),
        s("cli_run_sigint_graceful_shutdown", TCG, 60, run_sigint),
        s("cli_run_second_sigint_kills", TCG, 60, run_second_sigint),
        s(
            "cli_run_ctrl_c_on_a_terminal",
            TCG,
            60,
            run_ctrl_c_on_terminal,
        ),
        s("cli_run_missing_qemu", TCG, 60, run_missing_qemu),
        s("cli_run_linux_and_ga", TCG, 300, run_linux_and_ga),
        s(
            "cli_readme_samples_match_a_real_run",
            TCG,
            60,
            readme_samples,
        ),
        s(
            "cli_run_qmp_listen_never_replaces_a_file",
            TCG,
            60,
            run_listen_on_existing_file,
        ),
        s(
            "cli_qmp_events_shell_against_run",
            TCG,
            60,
            qmp_events_shell,
        ),
        s("cli_qom_and_shell_hmp_mode", TCG, 60, shell_hmp),
        s("cli_fleet_tiny_guests", TCG, 120, fleet_tiny_guests),
        s("cli_wrap_shell_quit", TCG, 60, wrap_shell),
        s(
            "cli_wrap_live_events_on_a_terminal",
            TCG,
            60,
            wrap_live_events,
        ),
    ]
}

/// The `qemu-machine` binary, built on first use.
pub(super) fn binary() -> Result<PathBuf, String> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY.get_or_init(build_binary).clone()
}

fn build_binary() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let output = Command::new(cargo)
        .args([
            "build",
            "-p",
            "machine-cli",
            "--bin",
            "qemu-machine",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(crate::workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo build: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo build -p machine-cli failed: {}",
            output.status
        ));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|msg| {
            msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "qemu-machine"
        })
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "cargo build did not report the qemu-machine executable".to_string())
}

/// A running `qemu-machine`, its output read line by line with arrival times. Killed and
/// reaped when dropped.
pub(super) struct Proc {
    child: Child,
    started: Instant,
    out: mpsc::Receiver<(Instant, String)>,
    err: mpsc::Receiver<(Instant, String)>,
    out_lines: Vec<String>,
    err_lines: Vec<String>,
}

impl Proc {
    /// Starts `qemu-machine ARGS` (QEMU taken from the context), with `stdin` piped in and
    /// closed, or /dev/null.
    pub(super) fn spawn(ctx: &Ctx, args: &[&str], stdin: Option<&str>) -> Result<Proc, String> {
        Proc::spawn_program(ctx, &binary()?, args, stdin)
    }

    /// [`Proc::spawn`] for another program (a Python QMP client, say).
    pub(super) fn spawn_program(
        ctx: &Ctx,
        program: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Proc, String> {
        let mut command = Command::new(program);
        command
            .args(args)
            .env("QEMU", &ctx.qemu)
            .env_remove("QMP_SOCKET")
            .current_dir(&ctx.scratch)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let text = text.to_string();
            thread::spawn(move || {
                // The binary may stop reading early; that is its business.
                let _ = pipe.write_all(text.as_bytes());
            });
        }
        let out = lines_of(child.stdout.take());
        let err = lines_of(child.stderr.take());
        Ok(Proc {
            child,
            started,
            out,
            err,
            out_lines: Vec::new(),
            err_lines: Vec::new(),
        })
    }

    /// Whether the process is still running.
    pub(super) fn running(&mut self) -> Result<bool, String> {
        self.child
            .try_wait()
            .map(|status| status.is_none())
            .map_err(|e| format!("waiting for {}: {e}", self.child.id()))
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// Waits for a stdout line matching `want`; returns it with the time since the spawn.
    fn wait_stdout(
        &mut self,
        ctx: &Ctx,
        want: impl Fn(&str) -> bool,
    ) -> Result<(Duration, String), String> {
        loop {
            match self.out.recv_timeout(ctx.remaining()) {
                Ok((at, line)) => {
                    self.out_lines.push(line.clone());
                    if want(&line) {
                        return Ok((at - self.started, line));
                    }
                }
                Err(_) => {
                    let stderr = self.drain_stderr();
                    return Err(format!(
                        "expected stdout line not seen; stdout: {:?}; stderr: {stderr:?}",
                        self.out_lines
                    ));
                }
            }
        }
    }

    /// Waits for a stderr line matching `want`.
    pub(super) fn wait_stderr(
        &mut self,
        ctx: &Ctx,
        want: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        loop {
            match self.err.recv_timeout(ctx.remaining()) {
                Ok((_, line)) => {
                    self.err_lines.push(line.clone());
                    if want(&line) {
                        return Ok(line);
                    }
                }
                Err(_) => {
                    return Err(format!(
                        "expected stderr line not seen; stderr: {:?}",
                        self.err_lines
                    ))
                }
            }
        }
    }

    fn drain_stderr(&mut self) -> Vec<String> {
        self.err_lines.extend(self.err.try_iter().map(|(_, l)| l));
        self.err_lines.clone()
    }

    /// Waits for the exit (by the context's deadline) and returns the status, the time since
    /// the spawn, and all of stdout and stderr.
    pub(super) fn finish(mut self, ctx: &Ctx) -> Result<Finished, String> {
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < ctx.deadline => {
                    thread::sleep(Duration::from_millis(1))
                }
                Ok(None) => {
                    let stderr = self.drain_stderr();
                    return Err(format!(
                        "qemu-machine did not exit in time; stdout: {:?}; stderr: {stderr:?}",
                        self.out_lines
                    ));
                }
                Err(e) => return Err(format!("waiting for qemu-machine: {e}")),
            }
        };
        let elapsed = self.started.elapsed();
        // The readers end at EOF now that the process is gone.
        let mut stdout = std::mem::take(&mut self.out_lines);
        stdout.extend(self.out.iter().map(|(_, l)| l));
        let mut stderr = std::mem::take(&mut self.err_lines);
        stderr.extend(self.err.iter().map(|(_, l)| l));
        Ok(Finished {
            status,
            elapsed,
            stdout,
            stderr,
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a finished `qemu-machine` gave.
pub(super) struct Finished {
    pub(super) status: ExitStatus,
    pub(super) elapsed: Duration,
    pub(super) stdout: Vec<String>,
    pub(super) stderr: Vec<String>,
}

impl Finished {
    pub(super) fn expect_code(&self, code: i32) -> Result<&Self, String> {
        if self.status.code() == Some(code) {
            Ok(self)
        } else {
            Err(format!(
                "expected exit status {code}, got {}; stdout: {:?}; stderr: {:?}",
                super::describe_status(self.status),
                self.stdout,
                self.stderr
            ))
        }
    }

    pub(super) fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn lines_of(
    pipe: Option<impl std::io::Read + Send + 'static>,
) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    if let Some(pipe) = pipe {
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                if tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
    }
    rx
}

fn accel(ctx: &Ctx) -> &'static str {
    ctx.accel.as_str()
}

/// Runs a one-shot `qemu-machine ARGS` to completion.
pub(super) fn one_shot(ctx: &Ctx, args: &[&str], stdin: Option<&str>) -> Result<Finished, String> {
    Proc::spawn(ctx, args, stdin)?.finish(ctx)
}

/// Runs of each kind measured for the timing note (medians are reported).
const TIMING_RUNS: usize = 5;

fn run_banner_exit(ctx: &Ctx) -> Result<(), String> {
    binary()?;
    let mut to_banner = Vec::new();
    let mut to_exit = Vec::new();
    for _ in 0..TIMING_RUNS {
        let (banner, exit) = banner_then_exit(ctx)?;
        to_banner.push(banner);
        to_exit.push(exit);
    }
    let mut raw = Vec::new();
    for _ in 0..TIMING_RUNS {
        raw.push(raw_banner(ctx)?);
    }
    ctx.note(format!(
        "qemu-machine run --exit-after-banner (median of {TIMING_RUNS}): start -> banner {:.1} ms, \
         start -> exit {:.1} ms; baseline in the same run, QEMU spawned directly: exec -> banner {:.1} ms",
        median_ms(&mut to_banner),
        median_ms(&mut to_exit),
        median_ms(&mut raw)
    ));
    Ok(())
}

fn median_ms(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples
        .get(samples.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// One `run --exit-after-banner --json`, checked; returns start -> banner and start -> exit.
fn banner_then_exit(ctx: &Ctx) -> Result<(Duration, Duration), String> {
    let mut proc = Proc::spawn(
        ctx,
        &[
            "run",
            "--accel",
            accel(ctx),
            "--exit-after-banner",
            "--json",
        ],
        None,
    )?;
    let (to_banner, _) = proc.wait_stdout(ctx, |l| l.contains(r#""type":"banner""#))?;
    let done = proc.finish(ctx)?;
    done.expect_code(0)?;
    let lines = done.json_lines();
    let console: String = lines
        .iter()
        .filter(|l| l["type"] == "console")
        .filter_map(|l| l["text"].as_str())
        .collect();
    if !console.contains(guest::BANNER) || !console.contains(guest::POWER_BUTTON_LINE) {
        return Err(format!(
            "console lacks the banner or the power button: {console:?}"
        ));
    }
    let shutdown = lines
        .iter()
        .find(|l| l["type"] == "event" && l["event"] == "SHUTDOWN")
        .ok_or("no SHUTDOWN event printed")?;
    if shutdown["data"]["reason"] != "guest-shutdown" {
        return Err(format!("unexpected SHUTDOWN: {shutdown}"));
    }
    let exit = lines
        .iter()
        .find(|l| l["type"] == "exit")
        .ok_or("no exit line")?;
    if exit["exit_code"] != 0 || exit["shutdown_reason"] != "guest-shutdown" {
        return Err(format!("unexpected exit line: {exit}"));
    }
    Ok((to_banner, done.elapsed))
}

/// The baseline: the same guest and accelerator, QEMU spawned directly with its console on a
/// socketpair and no QMP; returns exec -> banner.
fn raw_banner(ctx: &Ctx) -> Result<Duration, String> {
    let kernel = ctx.write_guest_kernel()?;
    let (mut ours, theirs) = super::socketpair()?;
    let mut command = ctx.qemu_command();
    let fd = command.pass_fd(theirs);
    command
        .args(guest::qemu_args(&kernel, guest::GuestMachine::Q35))
        .args(ctx.accel_args())
        .args(["-nodefaults", "-display", "none", "-chardev"])
        .arg(format!("socket,id=con,fd={fd}"))
        .args(["-serial", "chardev:con"]);
    let mut child = command.spawn()?;
    let started = child.started();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(guest::BANNER) {
        ours.set_read_timeout(Some(ctx.remaining().max(Duration::from_millis(1))))
            .map_err(|e| format!("set_read_timeout: {e}"))?;
        match std::io::Read::read(&mut ours, &mut buf) {
            Ok(0) => {
                return Err(format!(
                    "console closed before the banner: {}",
                    child.log_tail()
                ))
            }
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("reading the console: {e}")),
        }
    }
    let elapsed = started.elapsed();
    child.kill()?;
    Ok(elapsed)
}

fn run_guest_exit_status(ctx: &Ctx) -> Result<(), String> {
    let log = ctx.scratch.join("console.log");
    let log_arg = log.to_str().ok_or("non-UTF-8 scratch path")?;
    let done = one_shot(
        ctx,
        &[
            "run",
            "--accel",
            accel(ctx),
            "--send",
            "exit 5",
            "--console-log",
            log_arg,
        ],
        None,
    )?;
    done.expect_code(guest::exit_status_for(5))?;
    if !done.stdout.iter().any(|l| l.contains(guest::BANNER)) {
        return Err(format!("no banner on stdout: {:?}", done.stdout));
    }
    if !done
        .stderr
        .iter()
        .any(|l| l.contains("the guest asked to exit with 5 through isa-debug-exit: exit code 11"))
    {
        return Err(format!(
            "report does not say how it ended: {:?}",
            done.stderr
        ));
    }
    let logged = std::fs::read_to_string(&log).map_err(|e| format!("console log: {e}"))?;
    if !logged.contains(guest::BANNER) || !logged.contains("exit 5") {
        return Err(format!("console log lacks the session: {logged:?}"));
    }
    Ok(())
}

fn run_sigint(ctx: &Ctx) -> Result<(), String> {
    let mut proc = Proc::spawn(ctx, &["run", "--accel", accel(ctx)], None)?;
    proc.wait_stdout(ctx, |l| l.contains(guest::BANNER))?;
    // The guest sits at its prompt: the loop must sleep in its poll, not wake on a tick (a
    // 5 ms tick would be ~100 wake-ups in this window).
    let pid = proc.pid().as_raw();
    let window = Duration::from_millis(500);
    let before = voluntary_switches(pid)?;
    thread::sleep(window);
    let wakeups = voluntary_switches(pid)? - before;
    if wakeups > 10 {
        return Err(format!(
            "the idle run loop woke {wakeups} times in {window:?}: a fixed tick?"
        ));
    }
    ctx.note(format!(
        "idle run loop: {wakeups} wake-ups of the main thread in {} ms",
        window.as_millis()
    ));
    let sent = Instant::now();
    nix::sys::signal::kill(proc.pid(), nix::sys::signal::Signal::SIGINT)
        .map_err(|e| format!("kill -INT: {e}"))?;
    let done = proc.finish(ctx)?;
    done.expect_code(0)?;
    if !done.stdout.iter().any(|l| l.contains(guest::POWEROFF_LINE)) {
        return Err(format!("the guest did not power off: {:?}", done.stdout));
    }
    if !done
        .stderr
        .iter()
        .any(|l| l.contains("the guest powered off"))
    {
        return Err(format!(
            "report does not say guest shutdown: {:?}",
            done.stderr
        ));
    }
    ctx.note(format!(
        "SIGINT -> exit of qemu-machine {:.1} ms",
        sent.elapsed().as_secs_f64() * 1000.0
    ));
    Ok(())
}

/// How often the main thread of process `pid` has gone to sleep voluntarily (each time it
/// waited and was woken again), from `/proc/PID/task/PID/status`.
fn voluntary_switches(pid: i32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/task/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("{path}: no voluntary_ctxt_switches"))
}

/// `qemu-machine fleet` with real QEMUs: four tiny guests boot from one thread, each
/// answers `--exec query-status` and shuts down cleanly; then a fleet left running is shut
/// down by Ctrl-C, every member cleanly.
fn fleet_tiny_guests(ctx: &Ctx) -> Result<(), String> {
    const COUNT: usize = 4;
    let json_lines = |lines: &[String]| -> Result<Vec<serde_json::Value>, String> {
        lines
            .iter()
            .map(|l| serde_json::from_str(l).map_err(|e| format!("not JSON: {l:?}: {e}")))
            .collect()
    };
    let of = |lines: &[serde_json::Value], kind: &str| -> Vec<serde_json::Value> {
        lines
            .iter()
            .filter(|l| l["type"] == kind)
            .cloned()
            .collect()
    };
    let n = COUNT.to_string();
    let done = one_shot(
        ctx,
        &[
            "fleet",
            "--count",
            &n,
            "--json",
            "--exec",
            "query-status",
            "--exit-after-ready",
        ],
        None,
    )?;
    done.expect_code(0)?;
    let lines = json_lines(&done.stdout)?;
    let banners = of(&lines, "banner").len();
    let running = of(&lines, "reply")
        .iter()
        .filter(|r| r["reply"]["return"]["status"] == "running")
        .count();
    let clean = of(&lines, "exit")
        .iter()
        .filter(|e| e["clean"] == true)
        .count();
    check(
        (banners, running, clean) == (COUNT, COUNT, COUNT),
        format!(
            "{banners} banners, {running} running replies, {clean} clean exits of {COUNT}: {:?}",
            done.stdout
        ),
    )?;
    ctx.note(format!(
        "fleet of {COUNT} tiny guests: launch, banners, query-status, shutdown in {:.0} ms",
        done.elapsed.as_secs_f64() * 1000.0
    ));

    // Left running until Ctrl-C.
    let mut proc = Proc::spawn(ctx, &["fleet", "--count", &n, "--json"], None)?;
    proc.wait_stderr(ctx, |l| l.contains("Ctrl-C shuts all down"))?;
    nix::sys::signal::kill(proc.pid(), nix::sys::signal::Signal::SIGINT)
        .map_err(|e| format!("kill -INT: {e}"))?;
    let done = proc.finish(ctx)?;
    done.expect_code(0)?;
    let lines = json_lines(&done.stdout)?;
    let exits = of(&lines, "exit");
    check(
        exits.len() == COUNT && exits.iter().all(|e| e["clean"] == true),
        format!("after Ctrl-C: {:?}", done.stdout),
    )?;
    Ok(())
}

/// `qemu-machine` running with a pseudo-terminal as its controlling terminal (started through
/// `setsid -c`), with a thread collecting what it writes.
struct Terminal {
    child: std::process::Child,
    master: std::fs::File,
    output: mpsc::Receiver<Vec<u8>>,
    pump: Option<thread::JoinHandle<()>>,
    seen: String,
}

impl Terminal {
    /// Starts `qemu-machine ARGS` on a new pty, in the scratch dir, with `QEMU` set.
    fn spawn(ctx: &Ctx, args: &[&std::ffi::OsStr]) -> Result<Terminal, String> {
        use std::io::Read;
        let pty = nix::pty::openpty(None, None).map_err(|e| format!("openpty: {e}"))?;
        // openpty(3) leaves both ends inheritable: keep close-on-exec copies only, so that no
        // child keeps the master open (qemu-machine would then never see its terminal hang up).
        let dup = |fd: &std::os::fd::OwnedFd| fd.try_clone().map_err(|e| format!("dup: {e}"));
        let (master, slave_end) = (dup(&pty.master)?, dup(&pty.slave)?);
        drop(pty);
        let slave = |fd: &std::os::fd::OwnedFd| {
            fd.try_clone()
                .map(Stdio::from)
                .map_err(|e| format!("dup: {e}"))
        };
        let mut command = Command::new("setsid");
        command
            .arg("-c")
            .arg(binary()?)
            .args(args)
            .env("QEMU", &ctx.qemu)
            .env("HOME", &ctx.scratch)
            .env("TERM", "xterm")
            .current_dir(&ctx.scratch)
            .stdin(slave(&slave_end)?)
            .stdout(slave(&slave_end)?)
            .stderr(slave(&slave_end)?);
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start setsid -c qemu-machine: {e}"))?;
        // Only the child may hold the slave now, so the master reads EIO once it is gone.
        drop(command);
        drop(slave_end);
        let master = std::fs::File::from(master);
        let mut reader = master.try_clone().map_err(|e| format!("dup: {e}"))?;
        let (tx, output) = mpsc::channel::<Vec<u8>>();
        let pump = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        Ok(Terminal {
            child,
            master,
            output,
            pump: Some(pump),
            seen: String::new(),
        })
    }

    /// Waits (within the scenario's deadline) until the terminal has shown `needle`.
    fn wait_for(&mut self, ctx: &Ctx, needle: &str) -> Result<(), String> {
        while !self.seen.contains(needle) {
            match self.output.recv_timeout(ctx.remaining()) {
                Ok(chunk) => self.seen.push_str(&String::from_utf8_lossy(&chunk)),
                Err(_) => {
                    return Err(format!(
                        "{needle:?} not seen on the terminal: {:?}",
                        self.seen
                    ))
                }
            }
        }
        Ok(())
    }

    /// Types `keys`, one write per key as a person would.
    fn type_keys(&mut self, keys: &[u8]) -> Result<(), String> {
        for key in keys {
            self.master
                .write_all(&[*key])
                .map_err(|e| format!("typing {key:#04x}: {e}"))?;
        }
        Ok(())
    }

    /// Waits for the program to exit after `steps` (the scenario's interaction) ran; kills it
    /// if the steps failed or the deadline passed. Returns its status and all it showed.
    fn finish(
        mut self,
        ctx: &Ctx,
        steps: Result<(), String>,
        after: &str,
    ) -> Result<(std::process::ExitStatus, String), String> {
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < ctx.deadline && steps.is_ok() => {
                    thread::sleep(Duration::from_millis(1))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    steps?;
                    return Err(format!(
                        "qemu-machine did not exit after {after}: {:?}",
                        self.seen
                    ));
                }
            }
        };
        drop(self.master);
        if let Some(pump) = self.pump.take() {
            let _ = pump.join();
        }
        steps?;
        let mut seen = self.seen;
        seen.extend(
            self.output
                .try_iter()
                .map(|c| String::from_utf8_lossy(&c).into_owned()),
        );
        Ok((status, seen))
    }
}

/// On a real terminal (a pty as controlling terminal): typed keys reach the guest, and Ctrl-C
/// (the terminal signals the whole foreground process group) runs the ladder instead of QEMU
/// quitting on its own: the guest sees the power button.
fn run_ctrl_c_on_terminal(ctx: &Ctx) -> Result<(), String> {
    let args = ["run", "--accel", accel(ctx)].map(std::ffi::OsStr::new);
    let mut term = Terminal::spawn(ctx, &args)?;
    let steps = (|| {
        term.wait_for(ctx, guest::PROMPT)?;
        term.type_keys(b"flood 3\r")?;
        term.wait_for(ctx, guest::FLOOD_DONE)?;
        term.type_keys(b"\x03")?;
        term.wait_for(ctx, "the guest powered off")
    })();
    let (status, seen) = term.finish(ctx, steps, "Ctrl-C")?;
    if status.code() != Some(0) {
        return Err(format!("exit {status:?} after Ctrl-C: {seen:?}"));
    }
    for want in [guest::POWER_BUTTON_LINE, "the guest powered off", "012"] {
        if !seen.contains(want) {
            return Err(format!("{want:?} not on the terminal: {seen:?}"));
        }
    }
    Ok(())
}

fn run_second_sigint(ctx: &Ctx) -> Result<(), String> {
    // -M none ignores system_powerdown: the first SIGINT starts a 30 s rung; the second kills.
    let mut proc = Proc::spawn(
        ctx,
        &[
            "run",
            "--accel",
            accel(ctx),
            "--shutdown-timeout",
            "30s",
            "--",
            "-M",
            "none",
        ],
        None,
    )?;
    proc.wait_stderr(ctx, |l| l.contains("launched qemu"))?;
    nix::sys::signal::kill(proc.pid(), nix::sys::signal::Signal::SIGINT)
        .map_err(|e| format!("kill -INT: {e}"))?;
    proc.wait_stderr(ctx, |l| l.contains("system_powerdown"))?;
    let sent = Instant::now();
    nix::sys::signal::kill(proc.pid(), nix::sys::signal::Signal::SIGINT)
        .map_err(|e| format!("kill -INT: {e}"))?;
    let done = proc.finish(ctx)?;
    done.expect_code(137)?;
    if sent.elapsed() > Duration::from_secs(5) {
        return Err(format!(
            "the second SIGINT took {:?} to end it",
            sent.elapsed()
        ));
    }
    if !done
        .stderr
        .iter()
        .any(|l| l.contains("we killed qemu: signal 9 (SIGKILL)"))
    {
        return Err(format!("report does not say SIGKILL: {:?}", done.stderr));
    }
    Ok(())
}

/// The `qemu-machine run` samples in README.md and machine-cli/README.md (```text blocks whose
/// first line is `$ qemu-machine run ...`) are what that command really prints: each is run
/// and compared line by line, stdout (the console) and stderr (lines starting with
/// `[qemu-machine ` or two blanks: lifecycle, events, report) each in order, with times, pids,
/// timestamps and command lines normalised.
fn readme_samples(ctx: &Ctx) -> Result<(), String> {
    let root = crate::workspace_root();
    // The samples were taken with QEMU 7.2. Later versions send events 7.2 does not (10.0+:
    // SHUTDOWN {guest: true} before an isa-debug-exit exit): there the lines that only report
    // QEMU's events are left out of the comparison, everything else must match.
    let samples_qemu = ctx.qemu_version.starts_with("7.2.");
    if !samples_qemu {
        ctx.note(format!(
            "QEMU {}: event lines left out (the samples show QEMU 7.2's events)",
            ctx.qemu_version
        ));
    }
    let mut checked = 0;
    for file in ["README.md", "machine-cli/README.md"] {
        let text =
            std::fs::read_to_string(root.join(file)).map_err(|e| format!("reading {file}: {e}"))?;
        for (command, sample) in readme_blocks(&text) {
            let mut args = shell_words(&command);
            if args.first().map(String::as_str) != Some("run") {
                continue;
            }
            args.insert(1, "--accel".to_string());
            args.insert(2, accel(ctx).to_string());
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let done = one_shot(ctx, &argv, None)?;
            let (want_err, want_out): (Vec<&str>, Vec<&str>) = sample
                .iter()
                .map(String::as_str)
                .partition(|l| l.starts_with("[qemu-machine ") || l.starts_with("  "));
            for (stream, want, got) in [
                ("stdout", want_out, &done.stdout),
                ("stderr", want_err, &done.stderr),
            ] {
                let want: Vec<String> = want.iter().map(|l| normalise(l)).collect();
                let got: Vec<String> = got.iter().map(|l| normalise(l)).collect();
                let (want, got) = if samples_qemu {
                    (want, got)
                } else {
                    (without_event_detail(want), without_event_detail(got))
                };
                if want != got {
                    return Err(format!(
                        "{file}: `qemu-machine {command}` {stream} differs from the sample\n\
                         sample: {want:#?}\nreal run: {got:#?}"
                    ));
                }
            }
            checked += 1;
        }
    }
    if checked == 0 {
        return Err("no `$ qemu-machine run` sample found in the READMEs".to_string());
    }
    ctx.note(format!("{checked} README samples match a real run"));
    Ok(())
}

/// `lines` without what only reports QEMU's events: `[qemu-machine event]` lines, the report's
/// `last events:` line, and the exit line's `(qemu sent SHUTDOWN ... first)` remark.
fn without_event_detail(lines: Vec<String>) -> Vec<String> {
    lines
        .into_iter()
        .filter(|l| !l.starts_with("[qemu-machine event]") && !l.starts_with("  last events:"))
        .map(|l| match l.find(" (qemu sent SHUTDOWN") {
            Some(at) => l[..at].to_string(),
            None => l,
        })
        .collect()
}

/// The ```text blocks that start with `$ qemu-machine `: the command after it, and the lines
/// that follow.
fn readme_blocks(text: &str) -> Vec<(String, Vec<String>)> {
    let mut blocks = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "```text" {
            continue;
        }
        let body: Vec<String> = lines
            .by_ref()
            .take_while(|l| l.trim() != "```")
            .map(str::to_string)
            .collect();
        if let Some(command) = body.first().and_then(|l| l.strip_prefix("$ qemu-machine ")) {
            blocks.push((command.to_string(), body[1..].to_vec()));
        }
    }
    blocks
}

/// Splits a command line into words: blanks separate, single quotes group.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}

/// A line with what changes from run to run replaced: durations (`+98ms`, `after 5.13s`),
/// pids, RFC 3339 timestamps and the launched command line.
fn normalise(line: &str) -> String {
    const PUNCTUATION: [char; 5] = [']', ',', ')', ';', ':'];
    let mut line = line.trim_end_matches('\r').to_string();
    if line.contains("] launched qemu pid ") {
        if let Some(at) = line.find(": ") {
            line = format!("{}: COMMAND", &line[..at]);
        }
    }
    if line.starts_with("  command: ") {
        line = "  command: COMMAND".to_string();
    }
    let words: Vec<&str> = line.split(' ').collect();
    let mut out = Vec::new();
    for (i, word) in words.iter().enumerate() {
        let previous = if i > 0 { words[i - 1] } else { "" };
        let trimmed = word.trim_end_matches(PUNCTUATION);
        let tail = &word[trimmed.len()..];
        let bare = trimmed.trim_start_matches('+');
        let number = bare.trim_end_matches('s').trim_end_matches('m');
        let is_duration = bare.ends_with('s')
            && !number.is_empty()
            && number.chars().all(|c| c.is_ascii_digit() || c == '.');
        let is_timestamp = word.len() == 27 && word.ends_with('Z') && word.as_bytes()[10] == b'T';
        out.push(if is_duration && word.starts_with('+') {
            format!("+T{tail}")
        } else if is_duration && previous == "after" {
            format!("T{tail}")
        } else if is_timestamp {
            "TIMESTAMP".to_string()
        } else if previous == "pid" && trimmed.chars().all(|c| c.is_ascii_digit()) {
            format!("N{tail}")
        } else {
            word.to_string()
        });
    }
    out.join(" ")
}

fn run_missing_qemu(ctx: &Ctx) -> Result<(), String> {
    let missing = ctx.scratch.join("no-such-qemu");
    let missing = missing.to_str().ok_or("non-UTF-8 scratch path")?;
    let done = one_shot(
        ctx,
        &["run", "--qemu", missing, "--exit-after-banner"],
        None,
    )?;
    done.expect_code(4)?;
    if !done.stderr.iter().any(|l| l.contains(missing))
        || done.stderr.iter().any(|l| l.contains("panicked"))
    {
        return Err(format!("unexpected error output: {:?}", done.stderr));
    }
    Ok(())
}

/// QEMU unlinks whatever is at a `-qmp unix:PATH,server=on` path before binding it: a user's
/// file there must make `run` refuse, before QEMU starts, and survive.
fn run_listen_on_existing_file(ctx: &Ctx) -> Result<(), String> {
    let file = ctx.scratch.join("precious.txt");
    std::fs::write(&file, b"user data").map_err(|e| format!("write: {e}"))?;
    let path = file.to_str().ok_or("non-UTF-8 scratch path")?;
    let done = one_shot(
        ctx,
        &[
            "run",
            "--accel",
            accel(ctx),
            "--timeout",
            "1s",
            "--qmp-listen",
            path,
            "--",
            "-M",
            "none",
        ],
        None,
    )?;
    let kept = std::fs::read(&file).map_err(|e| format!("{path} is gone: {e}"))?;
    if kept != b"user data" {
        return Err(format!("{path} was replaced: {kept:?}"));
    }
    done.expect_code(2)?;
    if !done.stderr.iter().any(|l| l.contains("already exists")) {
        return Err(format!("no clear refusal: {:?}", done.stderr));
    }
    Ok(())
}

/// `run --linux --agent-listen SOCK`, then `ga SOCK` ping, exec (the guest's exit status
/// becomes ours), info --json, a failing cat (typed, status 1) and powerdown: the run ends with
/// a clean guest power-off (status 0) and removes the socket.
fn run_linux_and_ga(ctx: &Ctx) -> Result<(), String> {
    let guest = crate::qemu::ensure_linux_guest()?;
    let cache = guest
        .dir()
        .parent()
        .and_then(Path::to_str)
        .ok_or("non-UTF-8 cache path")?
        .to_string();
    let sock_path = ctx.scratch.join("qga.sock");
    let sock = sock_path.to_str().ok_or("non-UTF-8 scratch path")?;
    let mut vm = Proc::spawn(
        ctx,
        &[
            "run",
            "--linux",
            "--linux-cache",
            &cache,
            "--agent-listen",
            sock,
            "--shutdown-timeout",
            "10s",
        ],
        None,
    )?;
    vm.wait_stderr(ctx, |l| l.contains("banner seen"))?;
    one_shot(ctx, &["ga", sock, "ping"], None)?.expect_code(0)?;
    let exec = one_shot(
        ctx,
        &["ga", sock, "exec", "/bin/sh", "-c", "echo hi; exit 3"],
        None,
    )?;
    exec.expect_code(3)?;
    if exec.stdout != ["hi"] {
        return Err(format!("exec printed {:?}", exec.stdout));
    }
    let info = one_shot(ctx, &["ga", "--json", sock, "info"], None)?;
    info.expect_code(0)?;
    let version = info
        .json_lines()
        .first()
        .and_then(|v| v["version"].as_str().map(str::to_owned))
        .ok_or_else(|| format!("ga --json info: {:?}", info.stdout))?;
    let missing = one_shot(ctx, &["ga", sock, "cat", "/nonexistent"], None)?;
    missing.expect_code(1)?;
    if !missing.stderr.iter().any(|l| l.contains("guest-file-open")) {
        return Err(format!("no typed error for cat: {:?}", missing.stderr));
    }
    one_shot(ctx, &["ga", sock, "powerdown"], None)?.expect_code(0)?;
    let ended = vm.finish(ctx)?;
    ended.expect_code(0)?;
    if sock_path.exists() {
        return Err("the --agent-listen socket was left behind".to_string());
    }
    ctx.note(format!(
        "qemu-ga {version}: ping, exec (status 3 passed on), info, typed cat error, powerdown -> run exit 0 after {:.1} s",
        ended.elapsed.as_secs_f64()
    ));
    Ok(())
}

/// Starts `run --qmp-listen SOCK...` on `-M none` and waits until clients may connect.
fn listening_vm(ctx: &Ctx, socks: &[&Path]) -> Result<Proc, String> {
    let mut args = vec!["run", "--accel", accel(ctx), "--shutdown-timeout", "1s"];
    for sock in socks {
        args.push("--qmp-listen");
        args.push(sock.to_str().ok_or("non-UTF-8 scratch path")?);
    }
    args.extend(["--", "-M", "none"]);
    let mut vm = Proc::spawn(ctx, &args, None)?;
    for _ in socks {
        vm.wait_stderr(ctx, |l| l.contains("QMP clients can connect"))?;
    }
    Ok(vm)
}

/// `qmp` of an unknown command fails with exit 1 and the typed error; `events` on
/// `events_sock` streams exactly the STOP and RESUME that `qmp stop` / `qmp cont` on `sock` cause.
pub(crate) fn typed_error_and_events(
    ctx: &Ctx,
    sock: &str,
    events_sock: &str,
) -> Result<(), String> {
    let bad = one_shot(ctx, &["qmp", sock, "no-such-command"], None)?;
    bad.expect_code(1)?;
    if !bad.stderr.iter().any(|l| l.contains("CommandNotFound")) {
        return Err(format!("no typed error: {:?}", bad.stderr));
    }
    let mut events = Proc::spawn(
        ctx,
        &["events", events_sock, "--json", "--count", "2"],
        None,
    )?;
    events.wait_stderr(ctx, |l| l.contains("streaming events"))?;
    one_shot(ctx, &["qmp", sock, "stop"], None)?.expect_code(0)?;
    one_shot(ctx, &["qmp", sock, "cont"], None)?.expect_code(0)?;
    let streamed = events.finish(ctx)?;
    streamed.expect_code(0)?;
    let names: Vec<Value> = streamed
        .json_lines()
        .iter()
        .map(|e| e["event"].clone())
        .collect();
    if names != [Value::from("STOP"), Value::from("RESUME")] {
        return Err(format!("unexpected events: {:?}", streamed.stdout));
    }
    Ok(())
}

fn qmp_events_shell(ctx: &Ctx) -> Result<(), String> {
    // QEMU serves one client per socket at a time: events get their own.
    let sock_path = ctx.scratch.join("qmp.sock");
    let events_path = ctx.scratch.join("events.sock");
    let sock = sock_path.to_str().ok_or("non-UTF-8 scratch path")?;
    let events_sock = events_path.to_str().ok_or("non-UTF-8 scratch path")?;
    let vm = listening_vm(ctx, &[&sock_path, &events_path])?;

    let status = one_shot(ctx, &["qmp", sock, "query-status"], None)?;
    status.expect_code(0)?;
    let reply: Value =
        serde_json::from_str(status.stdout.first().map(String::as_str).unwrap_or(""))
            .map_err(|e| format!("qmp output is not JSON ({e}): {:?}", status.stdout))?;
    if reply["running"] != true {
        return Err(format!("unexpected query-status: {reply}"));
    }
    typed_error_and_events(ctx, sock, events_sock)?;

    let shell = one_shot(
        ctx,
        &["shell", sock],
        Some("query-status\nstop\n\ncont\nquery-name\n"),
    )?;
    shell.expect_code(0)?;
    let out = shell.stdout.join("\n");
    for want in [
        r#""status":"running""#,
        " STOP",
        " RESUME",
        r#"{"return":{}}"#,
    ] {
        if !out.contains(want) {
            return Err(format!("shell output lacks {want}: {out}"));
        }
    }

    one_shot(ctx, &["qmp", sock, "quit"], None)?.expect_code(0)?;
    let ended = vm.finish(ctx)?;
    ended.expect_code(0)?;
    if !ended.stderr.iter().any(|l| l.contains("host-qmp-quit")) {
        return Err(format!("run did not report the quit: {:?}", ended.stderr));
    }
    if sock_path.exists() || events_path.exists() {
        return Err("a --qmp-listen socket was left behind".to_string());
    }
    Ok(())
}

fn shell_hmp(ctx: &Ctx) -> Result<(), String> {
    let sock_path = ctx.scratch.join("qmp.sock");
    let sock = sock_path.to_str().ok_or("non-UTF-8 scratch path")?;
    let mut vm = listening_vm(ctx, &[&sock_path])?;
    let machine_type = one_shot(ctx, &["qom", "-s", sock, "get", "/machine.type"], None)?;
    machine_type.expect_code(0)?;
    if machine_type.stdout != ["none-machine"] {
        return Err(format!("qom get /machine.type: {:?}", machine_type.stdout));
    }
    let listed = one_shot(ctx, &["qom", "-s", sock, "list", "/"], None)?;
    listed.expect_code(0)?;
    if !listed.stdout.iter().any(|l| l == "machine/") {
        return Err(format!("qom list /: {:?}", listed.stdout));
    }
    let shell = one_shot(
        ctx,
        &["shell", "-H", sock],
        Some("info status\n   \ncpu 0\n"),
    )?;
    // -M none has no CPU 0: `cpu 0` is refused, so the shell ends with status 1.
    shell.expect_code(1)?;
    if shell.stdout.first().map(String::as_str) != Some("VM status: running") {
        return Err(format!("unexpected HMP output: {:?}", shell.stdout));
    }
    nix::sys::signal::kill(vm.pid(), nix::sys::signal::Signal::SIGTERM)
        .map_err(|e| format!("kill -TERM: {e}"))?;
    vm.wait_stderr(ctx, |l| l.contains("SIGTERM"))?;
    vm.finish(ctx)?.expect_code(0)?;
    Ok(())
}

fn wrap_shell(ctx: &Ctx) -> Result<(), String> {
    let done = one_shot(
        ctx,
        &["wrap", "--", "-M", "none", "-accel", accel(ctx)],
        Some("query-status\nquit\n"),
    )?;
    done.expect_code(0)?;
    let out = done.stdout.join("\n");
    if !out.contains(r#""status":"running""#) || !out.contains("SHUTDOWN") {
        return Err(format!("unexpected wrap output: {out}"));
    }
    if !done
        .stderr
        .iter()
        .any(|l| l.contains("qemu quit on our request"))
    {
        return Err(format!("no exit report: {:?}", done.stderr));
    }
    Ok(())
}

/// `wrap` on a terminal shows an event while the prompt sits idle: another QMP client stops
/// the VM through a second monitor, and STOP appears without a key being pressed.
fn wrap_live_events(ctx: &Ctx) -> Result<(), String> {
    let extra = ctx.scratch.join("wrap-extra.sock");
    let extra_arg = format!("unix:{},server=on,wait=off", extra.display());
    let args = [
        "wrap",
        "--",
        "-M",
        "none",
        "-accel",
        accel(ctx),
        "-qmp",
        &extra_arg,
    ]
    .map(std::ffi::OsStr::new);
    let mut term = Terminal::spawn(ctx, &args)?;
    let steps = (|| {
        term.wait_for(ctx, "(QEMU) ")?;
        let config = qmp_client::Config::default();
        let mut other = qmp_client::Connection::connect_unix(&extra, &config)
            .map_err(|e| format!("second monitor: {e}"))?;
        other
            .execute("stop", None)
            .map_err(|e| format!("stop through the second monitor: {e}"))?;
        // Nothing typed: the event must show up by itself.
        term.wait_for(ctx, " STOP")?;
        drop(other);
        term.type_keys(b"\x04")?;
        term.wait_for(ctx, "qemu quit on our request")
    })();
    let (status, seen) = term.finish(ctx, steps, "Ctrl-D")?;
    if status.code() != Some(0) {
        return Err(format!("exit {status:?}: {seen:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_normalised_and_split() {
        assert_eq!(
            normalise("[qemu-machine +98ms] launched qemu pid 28080: qemu-system-x86_64 -M q35"),
            "[qemu-machine +T] launched qemu pid N: COMMAND"
        );
        assert_eq!(
            normalise("[qemu-machine event] 2026-11-25T17:06:23.425956Z POWERDOWN\r"),
            "[qemu-machine event] TIMESTAMP POWERDOWN"
        );
        assert_eq!(
            normalise("[qemu-machine +5.14s] the guest powered off: exit code 0 after 5.13s"),
            "[qemu-machine +T] the guest powered off: exit code 0 after T"
        );
        assert_eq!(normalise("flood 10 after 5s"), "flood 10 after T");
        assert_eq!(normalise("  command: qemu -M q35"), "  command: COMMAND");
        assert_eq!(normalise("(up to 5s; x)"), "(up to 5s; x)");
        assert_eq!(
            shell_words("run --send 'flood 10' --exit-after-banner"),
            ["run", "--send", "flood 10", "--exit-after-banner"]
        );
        let text = "x\n```text\n$ qemu-machine run --json\na\nb\n```\n```text\nother\n```\n";
        assert_eq!(
            readme_blocks(text),
            [(
                "run --json".to_string(),
                vec!["a".to_string(), "b".to_string()]
            )]
        );
    }
}
